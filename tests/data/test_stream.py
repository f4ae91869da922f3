"""m6rec.data.stream: batch contract, packing, equal steps, eval coverage, corrupt shards, pipe: urls,
and exact mid-epoch resume across real processes (2 ranks x 2 DataLoader workers)."""
from __future__ import annotations

import io
import json
import multiprocessing
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import streams as stream_helpers  # noqa: E402
from helpers.streams import (  # noqa: E402
    IMAGE_ID,
    PAD_ID,
    batch_digest,
    random_specs,
    realistic_lengths,
    write_dataset,
)
from PIL import Image

from m6rec.config import DataConfig, StreamConfig
from m6rec.data.loader import StreamLoader
from m6rec.data.packing import assign_shards, ffd_pack
from m6rec.data.stream import (
    CorruptShardError,
    CorruptShardWarning,
    DroppedDataWarning,
    StreamStateError,
    shard_locations,
)

# The tiny test datasets have few shards per slot; the warning about it has its own test.
pytestmark = pytest.mark.filterwarnings("ignore::m6rec.data.stream.DroppedDataWarning")
SEQ, BS = 64, 4


def cfg(**kw) -> StreamConfig:
    base = dict(seq_len=SEQ, batch_size=BS, num_workers=0, shuffle_shards=2, seed=7)
    base.update(kw)
    return StreamConfig(**base)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """8 train shards (30 samples, lengths 4..90 so some are truncated at 64, ~30% with images),
    one shard with hand-made edge cases, and a small valid split."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    train = [random_specs(rng, 30) for _ in range(8)]
    # edge cases: an image slot cut by truncation at 64 (dropped), one fully inside; adjacent slots; no images
    train.append([{"length": 80, "image_starts": [10, 62]}, {"length": 40, "image_starts": [2, 6]},
                  {"length": 30, "n_images": 0}] + random_specs(rng, 17))
    info = write_dataset(root, {"train": train, "valid": [random_specs(rng, 12) for _ in range(3)]})
    return root, info


def all_keys(info, split):
    return {k for k, v in info["samples"].items() if v["url"].startswith(split + "/")}


def patchify(img: np.ndarray, p: int) -> np.ndarray:
    g = img.shape[0] // p
    return img.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, p * p * 3).astype(np.float32) / 255


# --------------------------------------------------------------------------
def naive_ffd(lengths, T):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties in input order
    caps, rows = [], []
    for i in order:
        for r, c in enumerate(caps):
            if c >= lengths[i]:
                caps[r] -= lengths[i]
                rows[r].append(i)
                break
        else:
            caps.append(T - lengths[i])
            rows.append([i])
    return rows


def test_ffd_is_exactly_first_fit_decreasing():
    rng = np.random.default_rng(1)
    for T, n, hi in [(64, 300, 64), (100, 50, 30), (1024, 800, 900), (8, 40, 8)]:
        lengths = rng.integers(1, hi + 1, n)
        assert [list(r) for r in ffd_pack(lengths, T)] == naive_ffd(list(lengths), T)
    assert ffd_pack([], 10) == []


def test_batch_contract(ds):
    root, info = ds
    truth = info["samples"]
    loader = StreamLoader(root, "train", cfg(), train=False)  # eval policy: every sample, in order
    P, p = 4, 8
    seen, n_images = set(), 0
    for batch in loader:
        assert batch["input_ids"].shape == (BS, SEQ)
        for k in ("input_ids", "labels", "position_ids", "document_ids"):
            assert batch[k].dtype.is_floating_point is False and str(batch[k].dtype) == "torch.int64", k
            assert batch[k].shape == (BS, SEQ)
        assert str(batch["prefix_mask"].dtype) == "torch.bool" and batch["prefix_mask"].shape == (BS, SEQ)
        assert str(batch["image_patches"].dtype) == "torch.float32"
        assert batch["image_patches"].shape[1:] == (P, 3 * p * p)
        assert batch["image_positions"].shape == (batch["image_patches"].shape[0], 2)
        ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
        pos, doc, pre = batch["position_ids"].numpy(), batch["document_ids"].numpy(), batch["prefix_mask"].numpy()
        patches, where = batch["image_patches"].numpy(), batch["image_positions"].numpy().tolist()
        expected_images = []
        for b, keys in enumerate(batch["sample_keys"]):
            o = 0
            for d, key in enumerate(keys):
                t = truth[key]
                n = min(len(t["ids"]), SEQ)
                tid, m = t["ids"][:n].astype(np.int64), t["mask"][:n]
                assert (ids[b, o : o + n] == tid).all()
                assert (pos[b, o : o + n] == np.arange(n)).all()
                assert (doc[b, o : o + n] == d).all()
                assert (pre[b, o : o + n] == ((m & 1) != 0)).all()
                want = np.where((m[1:] & 2) != 0, tid[1:], -100)
                assert (labels[b, o : o + n - 1] == want).all()
                assert labels[b, o + n - 1] == -100  # never predicts across documents
                for item, st in zip(t["images"], t["image_starts"]):
                    if st + P <= n:
                        expected_images.append(((b, o + st), item, t["jpg"][item]))
                o += n
                seen.add(key)
            assert (doc[b, o:] == -1).all() and (ids[b, o:] == PAD_ID).all() and (labels[b, o:] == -100).all()
        assert [e[0] for e in expected_images] == [tuple(w) for w in where]
        for k, ((b, s), item, jpg) in enumerate(expected_images):
            assert (ids[b, s : s + P] == IMAGE_ID).all()  # each image lines up with its slot tokens
            img = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB").resize((16, 16), Image.BICUBIC))
            np.testing.assert_array_equal(patches[k], patchify(img, p))
        assert 0.0 <= patches.min(initial=0) and patches.max(initial=1) <= 1.0
        n_images += len(where)
    assert seen == all_keys(info, "train")
    assert n_images > 10
    # edge cases: the slot at 62 (cut at 64) lost its image; the other images stayed
    edge = [k for k, v in truth.items() if v["image_starts"] == [10, 62]][0]
    assert len(truth[edge]["ids"]) == 80
    assert loader.stats["truncated_samples"] == sum(len(v["ids"]) > SEQ for k, v in truth.items() if k in seen)


def test_packing_efficiency_realistic_mix(tmp_path):
    # Planning only (manifest without tars): 16 shards of 2000 samples as prepare writes them,
    # log-normal lengths (median 250, some past the row), rows of 1024, 2 ranks x 2 workers.
    rng = np.random.default_rng(3)
    shards = [[{"length": int(n)} for n in realistic_lengths(rng, 2000, 250, 2000)] for _ in range(16)]
    write_dataset(tmp_path, {"train": shards}, write_tars=False)
    loader = StreamLoader(tmp_path, "train", StreamConfig(seq_len=1024, batch_size=8, num_workers=2), rank=0, world_size=2)
    print(f"planned packing efficiency {loader.packing_efficiency:.4f}, dropped {loader.dropped_fraction:.4f}")
    assert loader.packing_efficiency >= 0.95
    assert loader.dropped_fraction < 0.05


def test_packing_efficiency_real_batches(tmp_path):
    rng = np.random.default_rng(4)
    shards = [[{"length": int(n), "n_images": 0} for n in realistic_lengths(rng, 250, 40, 300)] for _ in range(4)]
    write_dataset(tmp_path, {"train": shards})
    loader = StreamLoader(tmp_path, "train", cfg(seq_len=256, batch_size=4))
    real = total = 0
    for batch in loader:
        real += int((batch["document_ids"] >= 0).sum())
        total += batch["document_ids"].numel()
    print(f"measured non-pad fraction {real / total:.4f} over {loader.steps_per_epoch} batches")
    assert real / total >= 0.95


def test_equal_steps_with_very_uneven_shards(tmp_path):
    rng = np.random.default_rng(5)
    sizes = [3, 60, 5, 45, 2, 80, 9, 20, 7, 33, 4, 50]
    write_dataset(tmp_path, {"train": [random_specs(rng, n, image_prob=0) for n in sizes]})
    for train in (True, False):
        counts, planned = [], []
        for rank in range(2):
            loader = StreamLoader(tmp_path, "train", cfg(num_workers=2), rank=rank, world_size=2, train=train,
                                  inline_workers=True)
            planned.append(loader.steps_per_epoch)
            counts.append(sum(1 for _ in loader))
        assert counts == planned and len(set(counts)) == 1 and counts[0] > 0, (train, counts, planned)
    # shard granularity (12 shards on 8 slots) makes "drop" lose a lot: said up front
    with pytest.warns(DroppedDataWarning, match=r"drop about \d+%.*data.shard_size"):
        StreamLoader(tmp_path, "train", cfg(num_workers=4), rank=0, world_size=2)
    # the greedy assignment balances tokens: no slot is more than one shard heavier than another
    tokens = [n * 47 for n in sizes]
    for slot_shards in [assign_shards(tokens, 4, 7, e) for e in range(3)]:
        loads = [sum(tokens[s] for s in ss) for ss in slot_shards]
        assert max(loads) - min(loads) <= max(tokens)


def test_fewer_shards_than_readers_is_a_clear_error(tmp_path):
    write_dataset(tmp_path, {"train": [[{"length": 10}] * 5] * 3}, write_tars=False)
    with pytest.raises(ValueError, match=r"3 shards.*2 ranks x 2 workers.*shard_size.*num_workers"):
        StreamLoader(tmp_path, "train", cfg(num_workers=2), rank=0, world_size=2)


def test_eval_sees_every_sample_exactly_once_across_ranks(ds):
    root, info = ds
    keys, steps = Counter(), set()
    for rank in range(2):
        loader = StreamLoader(root, "train", cfg(num_workers=2), rank=rank, world_size=2, train=False,
                              inline_workers=True)
        n = 0
        for batch in loader:
            n += 1
            for row in batch["sample_keys"]:
                keys.update(row)
            if batch["is_padding"]:
                assert (batch["document_ids"] == -1).all() and (batch["labels"] == -100).all()
                assert batch["image_patches"].shape[0] == 0
        steps.add(n)
        assert loader.dropped_fraction == 0.0
    assert len(steps) == 1
    assert set(keys) == all_keys(info, "train") and set(keys.values()) == {1}


def _corrupt_copy(src: Path, dst: Path) -> list[str]:
    """Copy a dataset and damage three shards three ways; return their urls."""
    import shutil

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    urls = [e["url"] for e in m["splits"]["train"]["shards"]]
    a, b, c = dst / urls[1], dst / urls[4], dst / urls[6]
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])  # truncated mid-member
    b.write_bytes(np.random.default_rng(0).bytes(b.stat().st_size))  # garbage
    # a valid tar with fewer samples than the manifest says: cut at a member boundary
    import tarfile

    with tarfile.open(c) as tf:
        members = [(mi, tf.extractfile(mi).read()) for mi in tf.getmembers()]
    keep = sorted({mi.name.split(".")[0] for mi, _ in members})[:-1]
    with tarfile.open(c, "w") as tf:
        for mi, data in members:
            if mi.name.split(".")[0] in keep:
                tf.addfile(mi, io.BytesIO(data))
    return [urls[1], urls[4], urls[6]]


def test_corrupt_shards_are_skipped_or_raise_in_strict_mode(ds, tmp_path):
    root, info = ds
    bad_root = tmp_path / "bad"
    bad = _corrupt_copy(root, bad_root)
    good = StreamLoader(root, "train", cfg(), train=False)
    loader = StreamLoader(bad_root, "train", cfg(), train=False)
    assert loader.steps_per_epoch == good.steps_per_epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptShardWarning)]
    for url in bad:
        assert any(url in msg for msg in messages), (url, messages)
    assert len(batches) == good.steps_per_epoch
    bad_keys = {k for k, v in info["samples"].items() if v["url"] in bad}
    got = Counter(k for b in batches for row in b["sample_keys"] for k in row)
    assert set(got) == all_keys(info, "train") - bad_keys and set(got.values()) == {1}
    assert loader.stats["corrupt_shards"] == 3
    assert loader.stats["skipped_samples"] == len(bad_keys)
    assert loader.stats["corrupt_urls"] == sorted(bad)
    assert batches[-1]["stream_stats"]["corrupt_shards"] == 3

    # in real DataLoader workers (2 ranks' worth of slots on this rank): completes, no hang, counts surface
    loader = StreamLoader(bad_root, "train", cfg(num_workers=2), rank=0, world_size=1)
    n = sum(1 for _ in loader)
    assert n == loader.steps_per_epoch
    assert loader.stats["corrupt_shards"] == 3

    for url in bad:  # strict: the error names the shard
        one = tmp_path / f"strict{bad.index(url)}"
        _corrupt_copy(root, one)
        m = json.loads((one / "manifest.json").read_text())
        m["splits"]["train"]["shards"] = [e for e in m["splits"]["train"]["shards"] if e["url"] == url or e["url"] not in bad]
        (one / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(CorruptShardError, match=url):
            list(StreamLoader(one, "train", cfg(strict=True), train=False))


def test_pipe_and_other_shard_locations(ds):
    root, info = ds
    ref = [batch_digest(b) for b in StreamLoader(root, "train", cfg())]
    piped = [batch_digest(b) for b in StreamLoader(root, "train", cfg(), shards=f"pipe:cat {root}/{{url}}")]
    assert piped == ref
    based = [batch_digest(b) for b in StreamLoader(root, "train", cfg(), shards=str(root) + "/")]
    assert based == ref
    # from_config reads data.output / data.shards / data.stream
    dc = DataConfig(output=str(root), shards=f"pipe:cat {root}/{{url}}", stream=cfg())
    assert [batch_digest(b) for b in StreamLoader.from_config(dc, "train")] == ref

    urls = ["train/train-p000-000000.tar", "train/train-p000-000001.tar"]
    assert shard_locations(urls, "/d") == ["/d/train/train-p000-000000.tar", "/d/train/train-p000-000001.tar"]
    assert shard_locations(urls, "/d", "pipe:aws s3 cp s3://b/ds/{url} -")[1] == \
        "pipe:aws s3 cp s3://b/ds/train/train-p000-000001.tar -"
    assert shard_locations(urls, "/d", "/m/train/train-p000-{000000..000003}.tar")[1] == "/m/train/train-p000-000001.tar"
    with pytest.raises(ValueError, match="train-p000-000001.tar"):
        shard_locations(urls, "/d", "/m/train/train-p000-{000000..000000}.tar")
    with pytest.raises(ValueError, match="url"):
        shard_locations(urls, "/d", "pipe:cat /x")


def test_inline_resume_from_every_step_and_fingerprint(ds):
    """In-process version of the resume guarantee, at every possible stop point (2 ranks x 2 workers)."""
    root, _ = ds
    for rank in range(2):
        full = StreamLoader(root, "train", cfg(num_workers=2), rank=rank, world_size=2, inline_workers=True)
        ref = [batch_digest(b) for b in full]
        assert full.epoch == 1 and len(ref) == full.dataset.steps_per_epoch(0)
        for stop in sorted({0, 1, 2, 3, len(ref) // 2, len(ref) // 2 + 1, len(ref) - 1, len(ref)}):
            a = StreamLoader(root, "train", cfg(num_workers=2), rank=rank, world_size=2, inline_workers=True)
            head = []
            if stop:
                for b in a:  # break right after the stop-th batch: pulling one more would count it
                    head.append(batch_digest(b))
                    if len(head) == stop:
                        break
            state = json.loads(json.dumps(a.state_dict()))
            b_ = StreamLoader(root, "train", cfg(num_workers=2), rank=rank, world_size=2, inline_workers=True)
            b_.load_state_dict(state)
            tail = [batch_digest(x) for x in b_] if stop < len(ref) else []
            assert head + tail == ref, (rank, stop)
    other = StreamLoader(root, "train", cfg(num_workers=1, seed=8), rank=0, world_size=1)
    with pytest.raises(StreamStateError, match=r"seed: saved 7, this run 8"):
        other.load_state_dict(state)


def _keys(b) -> list[str]:
    return [k for row in b["sample_keys"] for k in row]


def _take(root, world, workers, state, n_steps=None):
    """Every rank's batches from ``state`` (None: epoch start) for n_steps (None: to the epoch's end);
    returns (per-rank batch lists, the state after, the loaders)."""
    loaders = [StreamLoader(root, "train", cfg(num_workers=workers), rank=r, world_size=world, inline_workers=True)
               for r in range(world)]
    out = []
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        got = []
        if n_steps != 0:
            for b in ld:
                got.append(b)
                if n_steps is not None and len(got) == n_steps:
                    break
        out.append(got)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in loaders]
    assert all(st == states[0] for st in states)  # identical on every rank
    return out, states[0], loaders


def _global_order(per_rank) -> list[list[str]]:
    """Batches in the order global steps consume them: step i's batches of rank 0, 1, ..."""
    return [_keys(per_rank[r][i]) for i in range(len(per_rank[0])) for r in range(len(per_rank))]


@pytest.mark.parametrize("chain", [[(1, 2), (2, 2)], [(3, 1), (1, 3)], [(1, 1), (2, 1)]])
def test_resume_on_another_number_of_ranks_and_workers(ds, chain):
    """2 ranks x 2 workers stop mid-epoch; the epoch goes on with other numbers of ranks/workers
    (and again others): exactly the undelivered batches of the 2x2 plan, in its global order, every
    rank the same number of steps; the next epoch is this topology's own plan."""
    root, _ = ds
    ref, _, _ = _take(root, 2, 2, None)  # the uninterrupted epoch 0 on 2 x 2
    order = _global_order(ref)
    s1 = 3
    head, state, _ = _take(root, 2, 2, None, s1)
    delivered = _global_order(head)
    assert delivered == order[: len(delivered)]
    for i, (world, workers) in enumerate(chain):
        last = i == len(chain) - 1
        got, state, loaders = _take(root, world, workers, state, None if last else 2)
        assert len({len(g) for g in got}) == 1  # equal steps on every rank
        part = _global_order(got)
        assert part == order[len(delivered): len(delivered) + len(part)]
        delivered += part
    # The whole epoch: the 2 x 2 plan's batches once each, in order, less a tail shorter than one per rank.
    assert len(order) - len(delivered) < chain[-1][0]
    keys = [k for b in delivered for k in b]
    assert len(keys) == len(set(keys))
    # The next epoch is planned for the last topology, as if it had run from the start.
    world, workers = chain[-1]
    assert all(ld.epoch == 1 and ld.step_in_epoch == 0 for ld in loaders)
    nxt = [[_keys(b) for b in ld] for ld in loaders]
    fresh = [StreamLoader(root, "train", cfg(num_workers=workers), rank=r, world_size=world, inline_workers=True)
             for r in range(world)]
    for f in fresh:
        f.set_epoch(1)
    assert nxt == [[_keys(b) for b in f] for f in fresh]


def _run_ranks(root: Path, tmp: Path, tag: str, extra: list[str], world: int = 2) -> list[dict]:
    """One OS process per rank, each with 2 DataLoader worker processes.

    Processes are forked from pytest (torch already imported: a fresh
    interpreter spends seconds importing it) and share nothing with each
    other or with earlier runs; the same code runs as a script with
    ``python tests/helpers/streams.py consume ...``."""
    ctx = multiprocessing.get_context("fork")
    procs = []
    for rank in range(world):
        out = tmp / f"{tag}-{rank}.json"
        argv = ["consume", "--dir", str(root), "--rank", str(rank), "--world", str(world), "--workers", "2",
                "--out", str(out)] + [a.replace("{rank}", str(rank)) for a in extra]
        proc = ctx.Process(target=stream_helpers.main, args=(argv,))
        proc.start()
        procs.append((proc, out))
    results = []
    for proc, out in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0, f"rank process failed (exit {proc.exitcode}); see its traceback above"
        results.append(json.loads(out.read_text()))
    return results


def test_multiprocess_exact_resume(ds, tmp_path):
    """2 ranks x 2 DataLoader workers in separate processes: stop mid-epoch, save, restart fresh
    processes, load: the same batches in the same order per rank, nothing repeated or skipped."""
    root, info = ds
    # Each process first runs epochs 0-1 uninterrupted, then, with a new loader, epoch 0 up to the
    # stop step (the plan is computed locally, so stop = 9 needs no knowledge of steps_per_epoch).
    stop = 9  # odd: the restart must rotate the worker roles; mid-block with these sizes
    part1 = _run_ranks(root, tmp_path, "p1", ["--until-epoch", "2", "--stop-after", str(stop),
                                             "--state-out", str(tmp_path / "state{rank}.json")])
    steps = part1[0]["steps_per_epoch"]
    assert steps == part1[1]["steps_per_epoch"] and steps >= stop + 3
    # the state is identical on every rank: rank 1 resumes from rank 0's file
    assert (tmp_path / "state0.json").read_text() == (tmp_path / "state1.json").read_text()
    part2 = _run_ranks(root, tmp_path, "p2", ["--state-in", str(tmp_path / "state0.json")])

    epoch0_keys = Counter()
    for rank in range(2):
        full = part1[rank]["full_records"]
        ref = [r for r in full if r["epoch"] == 0]
        assert len(ref) == steps
        resumed = part1[rank]["records"] + part2[rank]["records"]
        assert [r["digest"] for r in resumed] == [r["digest"] for r in ref], rank
        assert [r["step"] for r in resumed] == list(range(steps))
        for r in ref:
            for row in r["keys"]:
                epoch0_keys.update(row)
        ep1 = [r for r in full if r["epoch"] == 1]
        assert len(ep1) > 0
        assert [r["keys"] for r in ep1] != [r["keys"] for r in ref]  # a new epoch, a new order
    assert set(epoch0_keys.values()) == {1}  # nothing repeated across ranks and workers
    assert set(epoch0_keys) <= all_keys(info, "train")
    dropped = len(all_keys(info, "train")) - len(epoch0_keys)
    print(f"2x2 train epoch: {steps} steps/rank, {dropped} of {len(all_keys(info, 'train'))} samples dropped")


def test_load_npy_equals_np_load_and_falls_back_for_the_rest():
    """The reader's .npy decoding: the fast path (1-D little-endian numbers, format 1.0: every member
    m6rec writes) returns what np.load returns; any other array goes to np.load; bad data raises."""
    from m6rec.data.stream import load_npy

    fast = [np.arange(83, dtype=np.int16), np.arange(3, dtype=np.int32), np.arange(5, dtype=np.int64),
            np.array([0, 1, 6], np.uint8), np.zeros(0, np.uint8), np.array([1.5, -2], np.float32)]
    other = [np.arange(6).reshape(2, 3), np.arange(3, dtype=">i4"), np.array([True, False]), np.float64(3.0),
             np.asfortranarray(np.arange(6).reshape(2, 3))]
    for a in fast + other:
        buf = io.BytesIO()
        np.save(buf, a)
        got = load_npy(buf.getvalue())
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), a
        assert got.flags.writeable == (a.ndim != 1 or a.dtype.byteorder == ">" or a.dtype == bool)  # which path ran
    buf = io.BytesIO()
    np.save(buf, np.arange(10, dtype=np.int16))
    with pytest.raises(ValueError):
        load_npy(buf.getvalue()[:-4])  # truncated: not taken by the fast path, and np.load refuses it
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(buf.getvalue())  # objects: never unpickled


def test_next_epoch_workers_start_ahead_and_change_nothing(ds):
    """Real DataLoader workers: the next epoch's workers are running before the current epoch's last
    batch (so a fast accelerator does not wait for their start-up at the boundary), and the batches
    of three epochs are the ones the in-process reader gives.  A state saved inside the look-ahead
    window resumes exactly, in a fresh loader and in the same one (whose early workers are dropped)."""
    root, _ = ds

    def loader(**kw):
        return StreamLoader(root, "train", cfg(num_workers=2, prefetch_factor=3), rank=0, world_size=1, **kw)

    ref = loader(inline_workers=True)
    steps = ref.steps_per_epoch
    expected = [batch_digest(b) for _ in range(3) for b in ref]
    assert steps >= 6

    live = loader()
    live.next_epoch_lookahead = 3
    got, children_at = [], {}
    for epoch in range(3):
        for i, b in enumerate(live):
            got.append(batch_digest(b))
            children_at[(epoch, i)] = {c.pid for c in multiprocessing.active_children()}
    assert got == expected
    # two workers before the window; four (this epoch's and the next one's) from steps - 3 on,
    # and never more than four (each set ends with its epoch)
    assert len(children_at[(0, 0)]) == 2 and children_at[(0, steps - 5)] == children_at[(0, 0)]
    assert len(children_at[(0, steps - 3)]) == 4 and max(map(len, children_at.values())) == 4
    # epoch 1 is served by the workers started ahead, not by new ones
    assert children_at[(1, 0)] == children_at[(0, steps - 3)] - children_at[(0, 0)]

    # a state saved at steps - 2 of epoch 1 (the next epoch's workers already started)
    a = loader()
    a.next_epoch_lookahead = 3
    it, seen = iter(a), []
    for _ in range(steps + steps - 2):
        b = next(it, None)
        if b is None:  # the epoch's end: the trainer iterates the loader again
            it = iter(a)
            b = next(it)
        seen.append(batch_digest(b))
    state = json.loads(json.dumps(a.state_dict()))
    assert a._next is not None and a._next[0] == (2, 0)
    fresh = loader()
    fresh.load_state_dict(state)
    rest = [batch_digest(b) for b in fresh] + [batch_digest(b) for b in fresh]
    assert seen + rest == expected
    # the same loader, rewound: the workers started ahead end at once and their batches are not used
    ahead = {c.pid for c in multiprocessing.active_children()}
    a.load_state_dict(json.loads(json.dumps(ref.state_dict() | {"epoch": 0, "step_in_epoch": 1})))
    assert a._next is None and len(ahead - {c.pid for c in multiprocessing.active_children()}) == 2
    assert [batch_digest(b) for b in a] == expected[1:steps]
    del it
    live.close()
    a.close()
