"""``m6rec prepare``: raw logs → cleaned split → M6-Rec text → tokenizer → WebDataset shards.

Work is split into *parts* by a stable hash of the user id.  On one machine
``--workers N`` runs N parts in processes and merges them; on a cluster each
job-array task runs ``--part I --num-parts N`` and a last step runs
``--merge``.  Everything is written into ``<output>.staging/`` and the
finished directory replaces ``<output>`` in one rename, so a failed or
interrupted preparation never leaves a half-written dataset where training
looks for one, and never destroys the previous one.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import webdataset as wds
from tqdm import tqdm

from m6rec.config import ConfigError, DataConfig, to_dict
from m6rec.data import semantic_ids, vectors
from m6rec.data import text as T
from m6rec.data.images import load_images
from m6rec.data.sources import clean, load_source
from m6rec.data.split import leave_one_out, save_split
from m6rec.data.tokenizer import (
    SegmentEncoder,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

# 2: item_repr token also writes the rating/tag/time phrases; 3: the vector modes write no image slots
# (a poster goes into the item's vector)
MANIFEST_FORMAT = 3
SPLITS = ("train", "valid", "test")
TOKENIZER_USERS = 300  # training windows of this many users (plus the whole catalog) teach the BPE its phrases


def user_part(user_ids: pd.Series, num_parts: int) -> np.ndarray:
    """Stable across processes and machines (Python's hash() is salted per process)."""
    return np.fromiter((zlib.crc32(u.encode()) % num_parts for u in user_ids), dtype=np.int64, count=len(user_ids))


@dataclass
class Prepared:
    """Everything a part needs; computed identically by every part."""

    cfg: DataConfig
    timeline: pd.DataFrame  # interactions with split/position, sorted by user and time
    items: pd.DataFrame
    catalog: T.Catalog
    images: dict[str, bytes]  # item_id -> resized JPEG bytes
    report: dict
    held_out: frozenset = frozenset()  # data.cold_items: items in no training window
    semantic_ids: semantic_ids.SemanticIds | None = None  # item_repr semantic_id: the items' codes


def held_out_items(item_ids, fraction: float, seed: int) -> list[str]:
    """The ``data.cold_items`` fraction of the catalog, drawn with ``data.seed`` (sorted ids, so the
    draw depends on the catalog and the seed only), sorted."""
    ids = sorted(str(i) for i in item_ids)
    n = int(round(fraction * len(ids)))
    if n == 0:
        return []
    rng = np.random.default_rng([seed, 0xC01D])
    return sorted(ids[i] for i in rng.choice(len(ids), size=n, replace=False))


def _wants_images(cfg: DataConfig) -> bool:
    """Whether the item images are loaded.  In the vector modes a poster goes into the item's cached
    vector, which only an item encoder that read posters in its own pretraining can do (an m6rec run
    with data.text.images); with any other encoder the posters are left out, said on the console."""
    if not cfg.text.images:
        return False
    if cfg.text.item_repr not in T.VECTOR_MODES or vectors.encoder_reads_images(cfg.text.item_encoder):
        return True
    msg = (f"data.text.images: the posters are left out of the item vectors: the item encoder "
           f"{cfg.text.item_encoder!r} reads text only (a poster joins an item's vector through "
           "data.text.item_encoder run:RUN_DIR, an m6rec run pretrained with posters); set data.text.images "
           "false to silence this")
    print(f"m6rec prepare: {msg}", file=sys.stderr)
    return False


def _semantic_id_vectors(cfg: DataConfig, item_ids: Sequence[str], texts: Sequence[str], write_dir: Path,
                         reuse: Sequence[Path] = ()) -> tuple[np.ndarray, str]:
    """The vectors the semantic IDs are built from (data.semantic_ids.source) and what they are:
    the text vectors, a run's item-token embeddings, or both side by side (each unit length, so
    text and behaviour weigh the same in the k-means distances)."""
    src = cfg.semantic_ids.source
    parts, what = [], []
    if src == "text" or src.startswith("text+"):
        parts.append(vectors.bank_for_texts(texts, cfg.text.item_encoder, write_dir, reuse))
        what.append(f"text vectors ({cfg.text.item_encoder})")
    if "run:" in src:
        run = src[src.index("run:"):]
        emb = vectors.run_item_embeddings(run, item_ids, key="data.semantic_ids.source")
        parts.append(emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12))
        what.append(f"item-token embeddings of {run}")
    x = np.concatenate(parts, axis=1) / np.sqrt(len(parts))
    return x.astype(np.float32), " + ".join(what)


def build(cfg: DataConfig) -> Prepared:
    t0 = time.time()
    raw = load_source(cfg)
    data = clean(raw, cfg.filters)
    timeline = leave_one_out(data.interactions)
    wants_images = _wants_images(cfg)
    images, failed = load_images(data.items, cfg.images.size) if wants_images else ({}, [])
    items = data.items.copy()
    items["image"] = [p if iid in images else None for iid, p in zip(items["item_id"], items["image"])]
    catalog = T.build_catalog(items, data.users, data.tags, cfg.text)
    report = dict(data.report)
    report["malformed_rows"] = raw.counts["malformed_rows"]
    report["malformed_examples"] = raw.malformed[:100]
    report["images_found"] = len(images)
    report["images_failed"] = failed
    if cfg.text.images and not wants_images:
        report["images_left_out"] = f"item encoder {cfg.text.item_encoder!r} reads text only"
    held_out = held_out_items(items["item_id"], cfg.cold_items, cfg.seed)
    if held_out:
        train_rows = timeline["split"] == "train"
        report["held_out_items"] = len(held_out)
        report["held_out_train_interactions"] = int((train_rows & timeline["item_id"].isin(held_out)).sum())
    codes = None
    if cfg.text.item_repr == "semantic_id":
        # built (or taken from the cache of an earlier preparation) before any window is written: the
        # windows and the tokenizer hold the code tokens
        ids = items["item_id"].astype(str).tolist()
        x, what = _semantic_id_vectors(cfg, ids, [catalog.item_text[i] for i in ids], _staging(cfg), [Path(cfg.output)])
        codes = semantic_ids.ensure_codes(cfg, ids, x, what, _staging(cfg), reuse=[Path(cfg.output)])
        catalog.item_codes = codes.tokens()
        report["semantic_ids"] = codes.report
    report["seconds_load_clean_split"] = round(time.time() - t0, 2)
    return Prepared(cfg, timeline, items, catalog, images, report, frozenset(held_out), codes)


def _user_arrays(timeline: pd.DataFrame):
    """Yield (user_id, item_ids, timestamps, ratings, splits) per user without per-row Python."""
    users = timeline["user_id"].to_numpy()
    bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
    item = timeline["item_id"].to_numpy()
    ts = timeline["timestamp"].to_numpy()
    rating = timeline["rating"].to_numpy(dtype=np.float64)
    split = timeline["split"].to_numpy()
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield users[a], item[a:b], ts[a:b], rating[a:b], split[a:b]


def _iter_samples(prep: Prepared, user_filter=None):
    c = prep.cfg
    held = np.array(sorted(prep.held_out), dtype=object) if prep.held_out else None
    for uid, items, ts, ratings, splits in _user_arrays(prep.timeline):
        if user_filter is not None and not user_filter(uid):
            continue
        # Seeded per user, so parts and workers draw the same windows wherever the user lands.
        rng = np.random.default_rng([c.seed, zlib.crc32(uid.encode())]) if c.context == "random" else None
        for w in _windows(c, uid, items, splits, rng, held):
            yield w, items, ts, T.window_segments(w, items, ts, ratings, prep.catalog, c.text)


def _windows(c: DataConfig, uid, items: np.ndarray, splits: np.ndarray, rng, held) -> list:
    """The user's windows.  With held-out (cold) items (``held``), training windows are made over the
    training rows of the other items only (rows mapped back to the timeline), so a held-out item is in
    no training window, as context or target; valid/test windows keep the full history."""
    cold = np.isin(items, held) & (splits == "train") if held is not None else None
    if cold is None or not cold.any():
        return T.make_windows(uid, splits, c.max_items, c.stride, c.min_context_items, rng)
    keep = np.flatnonzero(~cold)
    train = [replace(w, rows=keep[w.rows])
             for w in T.make_windows(uid, splits[keep], c.max_items, c.stride, c.min_context_items, rng)
             if w.split == "train"]
    return train + [w for w in T.make_windows(uid, splits, c.max_items, c.stride, c.min_context_items, None)
                    if w.split != "train"]


def get_tokenizer(prep: Prepared):
    """Train the BPE on catalog, profiles and training windows (never valid/test text)."""
    c = prep.cfg
    item_tokens = [T.VECTOR] if c.text.item_repr == "vector" else []
    if c.text.item_repr in ("token", "both", "vector_token"):
        # Item tokens get ids in a seeded random order: an id must carry no hint of
        # when an item appears in anyone's history (P5's leakage).
        ids = prep.items["item_id"].to_numpy()
        order = np.random.default_rng(c.seed).permutation(len(ids))
        item_tokens += [T.item_token(ids[i]) for i in order]
    if c.text.item_repr == "semantic_id":
        item_tokens += semantic_ids.code_vocabulary(c.semantic_ids)
    if c.tokenizer.path:
        tok = load_tokenizer(c.tokenizer.path)
        missing = [t for t in item_tokens if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        return tok
    first_users = set(sorted(prep.timeline["user_id"].unique())[:TOKENIZER_USERS])

    def corpus():
        yield from prep.catalog.item_text.values()
        yield from prep.catalog.profiles.values()
        for w, _, _, segs in _iter_samples(prep, lambda u: u in first_users):
            if w.split == "train":
                yield "".join(s.text for s in segs if not s.special)

    return train_tokenizer(corpus(), c.tokenizer.vocab_size, c.tokenizer.min_frequency, item_tokens)


def _staging(cfg: DataConfig) -> Path:
    out = Path(cfg.output)
    return out.with_name(out.name + ".staging")


class _ShardSet:
    """Writes one split of one part as tar shards of ``shard_size`` samples."""

    def __init__(self, root: Path, split: str, part: int, shard_size: int):
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.part, self.shard_size = split, part, shard_size
        self.shards: list[dict] = []
        self.writer = None

    def _open(self):
        name = f"{self.split}-p{self.part:03d}-{len(self.shards):06d}.tar"
        self.path = self.dir / name
        # An integer mtime keeps tarfile from adding a PAX header to every member
        # (a float mtime needs one): half the header blocks, a third less time.
        self.writer = wds.TarWriter(str(self.path), encoder=False, mtime=int(time.time()))
        self.cur = {"url": f"{self.split}/{name}", "samples": 0, "tokens": 0, "lengths": []}

    def write(self, sample: dict, n_tokens: int):
        if self.writer is None:
            self._open()
        self.writer.write(sample)
        self.cur["samples"] += 1
        self.cur["tokens"] += n_tokens
        self.cur["lengths"].append(n_tokens)
        if self.cur["samples"] >= self.shard_size:
            self._close()

    def _close(self):
        self.writer.close()
        self.writer = None
        self.cur["sha256"] = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.cur["bytes"] = self.path.stat().st_size
        self.shards.append(self.cur)

    def finish(self) -> list[dict]:
        if self.writer is not None:
            self._close()
        return self.shards


def write_part(prep: Prepared, tok, root: Path, part: int, num_parts: int, progress: bool) -> dict:
    """Write the shards of users in ``part`` and its part manifest; return the manifest."""
    c = prep.cfg
    t0 = time.time()
    enc = SegmentEncoder(tok, (c.images.size // c.images.patch_size) ** 2)
    enc.prime(list(prep.catalog.item_text.values()) + list(prep.catalog.profiles.values()))
    for split in SPLITS:  # a re-run part replaces its own shards, nothing else
        for old in (root / split).glob(f"{split}-p{part:03d}-*.tar"):
            old.unlink()
    sets = {s: _ShardSet(root, s, part, c.shard_size) for s in SPLITS}
    users = prep.timeline["user_id"].drop_duplicates()
    mine = set(users[user_part(users, num_parts) == part])
    bar = tqdm(total=len(mine), desc=f"prepare {c.name} part {part}/{num_parts}", unit="user", disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # logs get a line per 30 s, not per user
    last_user = None
    catalog_index = {iid: n for n, iid in enumerate(prep.items["item_id"])}  # rows of items.parquet
    for w, items, ts, segs in _iter_samples(prep, mine.__contains__):
        if w.user_id != last_user:
            bar.update(1)
            last_user = w.user_id
        ids, mask = enc.encode(segs)
        key = w.key
        window_items = [str(items[r]) for r in w.rows]
        imgs = [s.image_item for s in segs if s.image_item is not None]
        vecs = [s.vector_item for s in segs if s.vector_item is not None]
        meta = {
            "user_id": w.user_id,
            "split": w.split,
            "window": w.index,
            "items": window_items,
            "targets": window_items[w.n_context :],
            "timestamps": [int(ts[r]) for r in w.rows],
            "positions": [int(r) for r in w.rows],  # indices in the user's timeline (splits.parquet)
            "images": imgs,
            "num_tokens": int(len(ids)),
        }
        if vecs:
            meta["vectors"] = vecs
        sample = {
            "__key__": key,
            "txt": T.segments_text(segs).encode("utf-8"),
            "ids.npy": _npy(ids),
            "mask.npy": _npy(mask),
            "json": json.dumps(meta).encode("utf-8"),
        }
        for iid in imgs:
            sample[T.image_member(iid)] = prep.images[iid]
        if vecs:  # the catalog row of each vector slot, in slot order: the stream looks the vector up there
            sample["vec.npy"] = _npy(np.array([catalog_index[i] for i in vecs], dtype=np.int32))
        sets[w.split].write(sample, len(ids))
    bar.close()
    manifest = {
        "part": part,
        "num_parts": num_parts,
        "tokenizer_sha256": tokenizer_fingerprint(tok),  # merge() checks every part used the same one
        # and the same item codes (each part builds them; a cached file makes them the same)
        "semantic_ids_sha256": _codes_sha(prep.semantic_ids),
        "users": len(mine),
        "splits": {s: sets[s].finish() for s in SPLITS},
        "seconds": round(time.time() - t0, 2),
    }
    parts_dir = root / "parts"
    parts_dir.mkdir(exist_ok=True)
    _write_json(parts_dir / f"part-{part:03d}.json", manifest)
    return manifest


def _codes_sha(codes) -> str | None:
    return None if codes is None else hashlib.sha256(np.ascontiguousarray(codes.codes).tobytes()).hexdigest()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def write_dataset_files(prep: Prepared, tok, root: Path) -> None:
    """The files every part shares: tokenizer, split, catalog, report."""
    root.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, root / "tokenizer.json")
    save_split(prep.timeline, root / "splits.parquet")
    counts = prep.timeline.groupby("item_id").size()
    items = pd.DataFrame(
        {
            "item_id": prep.items["item_id"],
            "title": prep.items["title"],
            "text": [prep.catalog.item_text[i] for i in prep.items["item_id"]],
            "genres": prep.items["genres"],
            "has_image": [i in prep.images for i in prep.items["item_id"]],
            "interactions": prep.items["item_id"].map(counts).fillna(0).astype("int64"),
        }
    )
    tmp = root / "items.parquet.tmp"
    items.to_parquet(tmp, index=False)
    os.replace(tmp, root / "items.parquet")
    if prep.cfg.text.item_repr in T.VECTOR_MODES and prep.images:
        # the posters (resized JPEGs) stay with the dataset: the item encoder reads them now, and again
        # whenever this dataset's bank is re-encoded (another run as the encoder, evaluation elsewhere)
        vectors.save_posters(root, prep.images)
    else:  # never a stale file of an earlier attempt in this staging directory
        (root / vectors.POSTERS_FILE).unlink(missing_ok=True)
    _write_json(root / "prepare_report.json", prep.report)
    _write_json(root / "held_out_items.json", sorted(prep.held_out))  # merge() puts it in the manifest


def merge(cfg: DataConfig, num_parts: int) -> dict:
    """Combine part manifests into manifest.json and move the dataset into place."""
    root = _staging(cfg)
    parts = []
    for p in range(num_parts):
        f = root / "parts" / f"part-{p:03d}.json"
        if not f.is_file():
            raise ConfigError(f"cannot merge: part {p} of {num_parts} is missing ({f} not written; did that task fail?)")
        parts.append(json.loads(f.read_text()))
        if parts[-1]["num_parts"] != num_parts:
            raise ConfigError(f"cannot merge: {f} was written with --num-parts {parts[-1]['num_parts']}, not {num_parts}")
    tok_file = root / "tokenizer.json"
    if not tok_file.is_file():
        raise ConfigError(f"cannot merge: {tok_file} missing (part 0 writes it)")
    tok = load_tokenizer(tok_file)
    sha = tokenizer_fingerprint(tok)
    for p in parts:
        if p.get("tokenizer_sha256") != sha:
            raise ConfigError(
                f"cannot merge: part {p['part']} used a different tokenizer than part 0 "
                f"({p.get('tokenizer_sha256')} vs {sha}); re-run it with data.tokenizer.path={tok_file}"
            )
    if len({p.get("semantic_ids_sha256") for p in parts}) > 1:
        raise ConfigError("cannot merge: the parts built different semantic IDs (data.semantic_ids); prepare part 0 "
                          f"first, then the others: they reuse the codes it cached in {root}")
    splits = {}
    for s in SPLITS:
        shards = sorted((sh for p in parts for sh in p["splits"][s]), key=lambda sh: sh["url"])
        splits[s] = {
            "samples": sum(sh["samples"] for sh in shards),
            "tokens": sum(sh["tokens"] for sh in shards),
            "shards": shards,
        }
    c = cfg
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": c.name,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "tokenizer_sha256": sha,
        "special_tokens": {t: tok.token_to_id(t) for t in T.SPECIAL_TOKENS},
        "image": {
            "size": c.images.size,
            "patch_size": c.images.patch_size,
            "patches": (c.images.size // c.images.patch_size) ** 2,
        },
        "item_repr": c.text.item_repr,
        # data.cold_items: items held out of every training window (valid/test targets and histories only)
        "held_out_items": json.loads((root / "held_out_items.json").read_text())
        if (root / "held_out_items.json").is_file() else [],
        "splits": splits,
        "config": to_dict(c),
    }
    report_file = root / "prepare_report.json"
    if c.text.item_repr == "semantic_id" and report_file.is_file():
        manifest["semantic_ids"] = {"file": semantic_ids.SID_FILE,
                                    **json.loads(report_file.read_text()).get("semantic_ids", {})}
    if splits["train"]["samples"] == 0:
        raise ConfigError(f"dataset '{c.name}' has no training samples after filtering; loosen data.filters")
    out = Path(c.output)
    if c.text.item_repr in T.VECTOR_MODES:
        # encoded once here; an earlier preparation's cache is reused when texts and encoder are the same
        name = vectors.bank_file(c.text.item_encoder)
        if (out / name).is_file() and not (root / name).exists():
            shutil.copy2(out / name, root / name)
        vectors.ensure_bank(root, c.text.item_encoder)
        manifest["item_vectors"] = vectors.bank_info(root, c.text.item_encoder)
    _write_json(root / "manifest.json", manifest)
    shutil.rmtree(root / "parts")
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    root.rename(out)
    if old.exists():
        shutil.rmtree(old)
    return manifest


_PREP: Prepared | None = None  # inherited by forked workers


def _worker(args):
    part, num_parts = args
    tok = load_tokenizer(_staging(_PREP.cfg) / "tokenizer.json")
    m = write_part(_PREP, tok, _staging(_PREP.cfg), part, num_parts, progress=part == 0)
    return m


def prepare(cfg: DataConfig, workers: int = 1) -> dict:
    """Whole preparation on this machine with ``workers`` processes."""
    global _PREP
    t0 = time.time()
    root = _staging(cfg)
    if root.exists():
        shutil.rmtree(root)
    prep = build(cfg)
    tok = get_tokenizer(prep)
    write_dataset_files(prep, tok, root)
    if workers <= 1:
        parts = [write_part(prep, tok, root, 0, 1, progress=True)]
    else:
        _PREP = prep
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # rayon's pool does not survive fork
        # initializer: default SIGTERM in the workers, whatever handler the parent installed
        # (Pool.terminate ends its workers with SIGTERM)
        with mp.get_context("fork").Pool(workers, initializer=signal.signal,
                                         initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
            parts = pool.map(_worker, [(p, workers) for p in range(workers)])
        _PREP = None
    manifest = merge(cfg, len(parts))
    manifest["seconds_total"] = round(time.time() - t0, 2)
    return manifest


def prepare_part(cfg: DataConfig, part: int, num_parts: int) -> dict:
    """One task of a cluster job array: builds the same tables, writes its users' shards."""
    if not 0 <= part < num_parts:
        raise ConfigError(f"--part {part} out of range for --num-parts {num_parts}")
    root = _staging(cfg)
    root.mkdir(parents=True, exist_ok=True)
    prep = build(cfg)
    # BPE training is deterministic for the same corpus, so every part trains the
    # same tokenizer (merge() checks the fingerprints agree); part 0 saves it.
    tok = get_tokenizer(prep)
    if part == 0:
        write_dataset_files(prep, tok, root)
    return write_part(prep, tok, root, part, num_parts, progress=True)


def summary(manifest: dict) -> str:
    lines = [f"dataset {manifest['name']}: vocab {manifest['vocab_size']}"]
    for s in SPLITS:
        sp = manifest["splits"][s]
        lines.append(f"  {s:5s}: {sp['samples']:>8,} samples {sp['tokens']:>12,} tokens {len(sp['shards'])} shards")
    return "\n".join(lines)


#: what clean() drops, by report key: (the report's counter, why, in words)
DROPPED = (("duplicates_removed", "duplicate rows (same user, item, time, rating and event)"),
           ("unknown_items_removed", "interactions whose item_id is not in the items file"),
           ("below_min_rating_removed", "ratings below data.filters.min_rating"),
           ("kcore_removed", "interactions outside the data.filters.kcore core"),
           ("short_user_interactions_removed", "interactions of users below data.filters.min_user_interactions"))


def skipped_summary(report: dict, examples: int = 3) -> list[str]:
    """The console's account of what preparation left out (the whole list is prepare_report.json's):
    malformed rows with their first ``file:line: reason``, the rows each cleaning rule dropped, the
    images that failed to load."""
    lines = []
    n = report.get("malformed_rows", 0)
    if n:
        first = report.get("malformed_examples", [])[:examples]
        lines.append(f"skipped {n:,} malformed row(s): " + "; ".join(first) + (" ..." if n > len(first) else ""))
    for key, why in DROPPED:
        if report.get(key):
            lines.append(f"dropped {report[key]:,} {why}")
    failed = report.get("images_failed") or []
    if failed:
        lines.append(f"left out {len(failed):,} image(s) that failed to load: "
                     + "; ".join(str(f) for f in failed[:examples]) + (" ..." if len(failed) > examples else ""))
    return lines


def main(cfg, args) -> int:
    d = cfg.data
    if args.merge:
        if not args.num_parts:
            raise ConfigError("--merge needs --num-parts N")
        m = merge(d, args.num_parts)
    elif args.part is not None:
        if not args.num_parts:
            raise ConfigError("--part needs --num-parts N")
        m = prepare_part(d, args.part, args.num_parts)
        print(f"part {args.part}/{args.num_parts} written to {_staging(d)}; run --merge when all parts are done")
        return 0
    else:
        m = prepare(d, args.workers or d.workers)
    print(summary(m))
    if m.get("semantic_ids"):
        for line in semantic_ids.summary_lines(m["semantic_ids"]):
            print(line)
    report_path = Path(d.output) / "prepare_report.json"
    if report_path.is_file():
        for line in skipped_summary(json.loads(report_path.read_text())):
            print(line)
    print(f"written to {d.output}")
    return 0
