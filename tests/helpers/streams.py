"""Test helpers for m6rec.data.stream: write shard datasets in the documented format,
and consume a stream in a separate process (``python tests/helpers/streams.py consume ...``).

The writer follows docs/architecture.md exactly: per sample ``{key}.txt``,
``{key}.ids.npy`` (uint16), ``{key}.mask.npy`` (uint8 bits 1/2/4),
``{key}.json`` and ``{key}.img.{item}.jpg``; a ``manifest.json`` with per-shard
url, samples, tokens, sha256 and lengths.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from m6rec.data.text import image_member

PAD_ID = 1  # deliberately not 0: the stream must take it from the manifest
IMAGE_ID = 3


def random_specs(rng: np.random.Generator, n: int, low: int = 4, high: int = 90, image_prob: float = 0.3) -> list[dict]:
    """n sample specs with uniform random lengths; some carry 1-2 images."""
    return [
        {"length": int(rng.integers(low, high + 1)), "n_images": int(rng.integers(1, 3)) if rng.random() < image_prob else 0}
        for _ in range(n)
    ]


def realistic_lengths(rng: np.random.Generator, n: int, median: float, cap: int) -> np.ndarray:
    """Log-normal token counts (a long right tail, a few past the row length)."""
    return np.clip(rng.lognormal(np.log(median), 0.6, n).astype(np.int64), 8, cap)


def _tokens(rng: np.random.Generator, spec: dict, P: int):
    """ids/mask for one spec: a context prefix (bit 1) holding the image slots, then a loss region (bit 2)."""
    L = spec["length"]
    ids = rng.integers(10, 500, L).astype(np.uint16)
    mask = np.zeros(L, dtype=np.uint8)
    if "image_starts" in spec:  # explicit layout (e.g. a slot cut by truncation)
        starts = list(spec["image_starts"])
        prefix_len = max([L // 2] + [s + P for s in starts])
    else:
        k = min(spec.get("n_images", 0), max(0, (L // 2 - 1) // P))
        prefix_len = max(1, L // 2)
        free = prefix_len - k * P
        gaps = rng.multinomial(free, [1 / (k + 1)] * (k + 1)) if k else [free]
        starts, p = [], 0
        for j in range(k):  # a zero gap gives adjacent slots: the reader must split runs by P
            p += int(gaps[j])
            starts.append(p)
            p += P
    mask[:prefix_len] = 1
    mask[prefix_len:] = 2
    mask[prefix_len + 3 :: 7] = 0  # some tokens carry no loss
    for s in starts:
        ids[s : s + P] = IMAGE_ID
        mask[s : s + P] = 1 | 4
    return ids, mask, starts


def _jpeg(rng: np.random.Generator) -> bytes:
    h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_dataset(
    root: str | Path,
    splits: dict[str, list[list[dict]]],
    *,
    image_size: int = 16,
    patch_size: int = 8,
    seed: int = 0,
    write_tars: bool = True,
) -> dict:
    """Write ``splits`` = {split: [shard: [sample spec]]} under ``root``.

    Returns ``{"manifest": ..., "samples": {key: {"ids", "mask", "image_starts",
    "images": [item], "jpg": {item: bytes}, "url"}}}`` for checking batches.
    ``write_tars=False`` writes only the manifest (enough for planning).
    """
    import webdataset as wds

    root = Path(root)
    rng = np.random.default_rng(seed)
    P = (image_size // patch_size) ** 2
    truth: dict[str, dict] = {}
    msplits = {}
    user = 0
    for split, shards in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for n, specs in enumerate(shards):
            url = f"{split}/{split}-p000-{n:06d}.tar"
            lengths = []
            if write_tars:
                writer = wds.TarWriter(str(root / url), encoder=False, mtime=0)
            for spec in specs:
                key = f"u{user}-{split}-0"
                user += 1
                lengths.append(spec["length"])
                if not write_tars:
                    continue
                ids, mask, starts = _tokens(rng, spec, P)
                items = [f"Item{user}x{k}" for k in range(len(starts))]  # mixed case: names are case-sensitive
                jpgs = {it: _jpeg(rng) for it in items}
                meta = {"user_id": str(user), "split": split, "window": 0, "items": items, "targets": [],
                        "images": items, "num_tokens": len(ids)}
                sample = {"__key__": key, "txt": f"sample {key}".encode(), "ids.npy": _npy(ids),
                          "mask.npy": _npy(mask), "json": json.dumps(meta).encode()}
                sample.update({image_member(it): b for it, b in jpgs.items()})
                writer.write(sample)
                truth[key] = {"ids": ids, "mask": mask, "image_starts": starts, "images": items, "jpg": jpgs, "url": url}
            sha = ""
            if write_tars:
                writer.close()
                sha = hashlib.sha256((root / url).read_bytes()).hexdigest()
            entries.append({"url": url, "samples": len(specs), "tokens": int(sum(lengths)), "sha256": sha,
                            "lengths": lengths})
        msplits[split] = {"samples": sum(e["samples"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
                          "shards": entries}
    manifest = {"format": 1, "name": "test", "vocab_size": 512,
                "image": {"size": image_size, "patch_size": patch_size, "patches": P},
                "splits": msplits, "special_tokens": {"<|pad|>": PAD_ID, "<|image|>": IMAGE_ID}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return {"manifest": manifest, "samples": truth}


def batch_digest(batch: dict) -> str:
    """A hash of every tensor of a batch: equal digests = identical batches."""
    h = hashlib.sha1()
    for k in ("input_ids", "labels", "position_ids", "document_ids", "prefix_mask", "image_patches", "image_positions"):
        h.update(k.encode())
        h.update(batch[k].numpy().tobytes())
    h.update(json.dumps(batch["sample_keys"]).encode())
    return h.hexdigest()


def consume(args: argparse.Namespace) -> None:
    """Run one rank's stream: record every batch; optionally stop after N batches and save the state."""
    from m6rec.config import StreamConfig
    from m6rec.data.loader import StreamLoader

    cfg = StreamConfig(seq_len=args.seq_len, batch_size=args.batch_size, num_workers=args.workers,
                       shuffle_shards=args.shuffle_shards, seed=args.seed)

    def run(stop_after: int, state_in=None, state_out=None) -> tuple[list, "StreamLoader"]:
        loader = StreamLoader(args.dir, args.split, cfg, rank=args.rank, world_size=args.world, train=not args.eval)
        if state_in:
            loader.load_state_dict(json.loads(Path(state_in).read_text()))
        records, n = [], 0
        while loader.epoch < args.until_epoch:
            epoch = loader.epoch
            for batch in loader:
                records.append({"epoch": epoch, "step": loader.step_in_epoch - 1, "keys": batch["sample_keys"],
                                "digest": batch_digest(batch), "is_padding": batch["is_padding"]})
                n += 1
                if stop_after and n == stop_after:
                    Path(state_out).write_text(json.dumps(loader.state_dict()))
                    return records, loader
        return records, loader

    out = {}
    if args.stop_after:  # an uninterrupted run first, then the interrupted one, in this process
        out["full_records"], _ = run(0)
    out["records"], loader = run(args.stop_after, args.state_in, args.state_out)
    out["steps_per_epoch"] = loader.dataset.steps_per_epoch(0)
    Path(args.out).write_text(json.dumps(out))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consume")
    c.add_argument("--dir", required=True)
    c.add_argument("--split", default="train")
    c.add_argument("--rank", type=int, required=True)
    c.add_argument("--world", type=int, required=True)
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--seq-len", type=int, default=64)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--shuffle-shards", type=int, default=2)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--eval", action="store_true")
    c.add_argument("--until-epoch", type=int, default=1)
    c.add_argument("--stop-after", type=int, default=0)
    c.add_argument("--state-in")
    c.add_argument("--state-out")
    c.add_argument("--out", required=True)
    args = p.parse_args(argv)
    consume(args)


if __name__ == "__main__":
    main(sys.argv[1:])
