"""The streaming reader training consumes: prepared tar shards -> packed batches.

What it guarantees, and how:

* **Every rank takes the same number of steps, and nobody hangs.**  The
  manifest lists the token count of every sample, so the packing of every
  (rank, worker) *slot* can be simulated from lengths alone, without reading a
  byte of the shards.  Every rank runs the same simulation and gets the same
  answer with no communication.  Train streams (policy ``"drop"``) yield
  ``K = min over slots`` batches per worker; eval streams (policy ``"pad"``)
  yield ``K = max over slots`` and fill the gap with all-padding batches, so
  every sample is seen exactly once.
* **Exact mid-epoch resume.**  The whole stream state is ``(epoch,
  step_in_epoch)``: the batch sequence of an epoch is a pure function of the
  manifest and the settings.  A restarted worker skips whole blocks using the
  simulation and re-reads only the block it stopped in.
* **Dense rows.**  A block of ``shuffle_shards`` shards is read into memory,
  shuffled, and packed first-fit-decreasing into rows of ``seq_len`` tokens
  (typically > 97 % real tokens).
* **A bad shard costs its samples, not the run.**  A shard that cannot be read
  or decoded, or disagrees with the manifest, is skipped whole (with a warning
  and counters in every batch), and the rows planned for it stay in place as
  padding, so step counts, the order of everything after it and resume are
  unchanged.  ``StreamConfig.strict`` turns this into an error.

The shard format and the batch contract are in ``docs/architecture.md``.

The packing plan is m6rec/data/packing.py; the DataLoader around the stream, with its
workers and resumable position, is m6rec/data/loader.py (``StreamLoader``).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import braceexpand
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from m6rec.data.images import decode_image, patchify
from m6rec.data.packing import assign_shards, ffd_pack, first_fit_decreasing
from m6rec.data.text import ITEM, MASK_VECTOR, VECTOR_MODES, image_member

IGNORE_INDEX = -100  # labels value cross_entropy ignores


# A 1-D numeric .npy (format 1.0) as np.save writes it: what every ids/mask/vec member of our shards is.
_NPY_1D = re.compile(rb"\{'descr': '([<|][iuf][1248])', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of one shard member, without its cost where it is needless: np.load parses every
    header with ``ast.literal_eval`` (a third of the loader's time on 80-token samples). A 1-D
    little-endian numeric array in format 1.0 is read from the header's text directly (read-only,
    no copy); anything else goes to ``np.load`` (``allow_pickle=False``), which also raises on bad data."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        hlen = int.from_bytes(data[8:10], "little")
        m = _NPY_1D.fullmatch(data, 10, 10 + hlen)
        if m:
            dtype, n = np.dtype(m.group(1).decode()), int(m.group(2))
            if len(data) == 10 + hlen + n * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=n, offset=10 + hlen)
    return np.load(io.BytesIO(data), allow_pickle=False)


class CorruptShardError(RuntimeError):
    """A shard could not be read or decoded (strict mode); the message names its url."""


class CorruptShardWarning(RuntimeWarning):
    """A shard was skipped (non-strict mode); the message names its url."""


class DroppedDataWarning(UserWarning):
    """The "drop" policy will leave out a noticeable part of each epoch (uneven slots)."""


class StreamStateError(ValueError):
    """A saved stream state does not belong to this stream; the message names the differences."""


def shard_locations(urls: Sequence[str], dataset_dir: str | Path, shards: Optional[str] = None) -> list[str]:
    """Where to open each manifest url (relative to the dataset dir).

    ``shards`` is ``data.shards``:
      * None: ``<dataset_dir>/<url>``;
      * containing ``{url}``: the url substituted, e.g.
        ``pipe:aws s3 cp s3://bucket/ds/{url} -``;
      * another brace pattern (``/mnt/ds/train/train-p000-{000000..000009}.tar``):
        expanded, and each url found by its file name in the expansion;
      * anything else: a base directory or url prefix, ``<shards>/<url>``.
    """
    if shards is None:
        return [str(Path(dataset_dir) / u) for u in urls]
    if "{url}" in shards:
        return [shards.replace("{url}", u) for u in urls]
    if "{" in shards:
        by_name: dict[str, str] = {}
        for loc in braceexpand.braceexpand(shards):
            for name in re.findall(r"[^/\s]+\.tar\b", loc):
                by_name[name] = loc
        missing = [u for u in urls if Path(u).name not in by_name]
        if missing:
            raise ValueError(
                f"data.shards pattern {shards!r} has no shard named {Path(missing[0]).name!r} "
                f"(manifest url {missing[0]!r}; {len(missing)} missing in all)"
            )
        return [by_name[Path(u).name] for u in urls]
    if shards.startswith("pipe:"):
        raise ValueError(
            f"data.shards {shards!r} is a pipe: command without '{{url}}'; write where the manifest "
            "url goes, e.g. 'pipe:aws s3 cp s3://bucket/ds/{url} -'"
        )
    return [shards.rstrip("/") + "/" + u for u in urls]


def default_rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """Rank and world size: the arguments, else torch.distributed, else env RANK/WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return rank, world_size


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------
@dataclass
class _Sample:
    key: str
    ids: np.ndarray  # 1-D, as stored (uint16/int32)
    mask: np.ndarray  # 1-D uint8
    image_starts: np.ndarray  # int64 [n_img]: first slot token of each image
    images: np.ndarray  # uint8 [n_img, size, size, 3], already resized
    vector_pos: np.ndarray = None  # int64 [n_vec]: the vector slot tokens (item_repr vector*)
    vector_items: np.ndarray = None  # int64 [n_vec]: their catalog rows (items.parquet order)


@dataclass
class _EpochPlan:
    blocks: list[list[list[int]]]  # per slot: blocks of shard indices
    block_rows: list[list[int]]  # per slot: packed rows of each block
    steps_per_worker: int  # K


@dataclass
class Continuation:
    """The rest of an epoch begun on another number of (rank, worker) slots.

    The *origin* topology (``origin_world`` ranks x ``origin_workers`` workers)
    planned the epoch; its **global order** lists the batches as the origin's
    global steps consume them: position ``i * origin_world + r`` is origin rank
    ``r``'s batch ``i`` (rank ``r``'s batch ``i`` comes from its worker role
    ``i mod W`` at that slot's position ``i // W``).  ``start`` batches of that
    order were delivered.  On ``world`` ranks, rank ``r`` takes positions
    ``start + j * world + r`` for ``j < (total - start) // world``: every rank
    the same number of steps, every global step a contiguous run of the order
    -- with the same global batch the very batches the origin would have
    stepped; the last ``(total - start) mod world`` batches (fewer than one
    per rank) are left out.  A further change of topology keeps the origin
    and moves ``start``: the remainder is always a suffix of one order."""

    epoch: int
    origin_world: int
    origin_workers: int
    origin_k: int  # the origin's batches per worker (K)
    start: int

    @property
    def origin_slots(self) -> int:
        return self.origin_world * self.origin_workers

    @property
    def total(self) -> int:
        return self.origin_k * self.origin_workers * self.origin_world

    def steps_per_rank(self, world: int) -> int:
        return (self.total - self.start) // world

    def origin_batch(self, g: int) -> tuple[int, int]:
        """(origin slot, batch position in that slot) of global position ``g``."""
        i, r = divmod(g, self.origin_world)
        return r * self.origin_workers + i % self.origin_workers, i // self.origin_workers

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "origin_world_size": self.origin_world,
                "origin_num_workers": self.origin_workers, "origin_k": self.origin_k, "start": self.start}

    @classmethod
    def from_dict(cls, d: dict) -> "Continuation":
        return cls(int(d["epoch"]), int(d["origin_world_size"]), int(d["origin_num_workers"]), int(d["origin_k"]),
                   int(d["start"]))


class PackedStream(IterableDataset):
    """One rank's view of a split: yields ready batches from a DataLoader worker.

    Use it through :class:`StreamLoader`, which owns the position (epoch,
    step) and the DataLoader.  ``epoch`` and ``start_step`` are set on the
    object before each DataLoader iterator is made; workers get a copy.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        *,
        seq_len: int,
        batch_size: int,
        num_workers: int,
        shuffle_shards: int = 2,
        seed: int = 1234,
        strict: bool = False,
        shards: Optional[str] = None,
        shuffle: bool = True,
        policy: str = "drop",
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        image_size: int = 64,
        patch_size: int = 16,
        item_marker_loss: Optional[bool] = None,
    ):
        if policy not in ("drop", "pad"):
            raise ValueError(f"policy must be 'drop' (train) or 'pad' (eval), got {policy!r}")
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("shuffle_shards", shuffle_shards)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.dataset_dir = Path(dataset_dir)
        mpath = self.dataset_dir / "manifest.json"
        raw = mpath.read_bytes()
        manifest = json.loads(raw)
        if split not in manifest.get("splits", {}):
            raise ValueError(f"{mpath}: no split {split!r}; has {sorted(manifest.get('splits', {}))}")
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        self.split = split
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_workers = num_workers
        self.W = max(1, num_workers)  # slots per rank; num_workers=0 reads in the main process
        self.rank, self.world_size = default_rank_world(rank, world_size)
        self.shuffle_shards, self.seed, self.strict = shuffle_shards, seed, strict
        self.shuffle, self.policy = shuffle, policy
        self.pad_id = int(manifest.get("special_tokens", {}).get("<|pad|>", 0))
        # StreamConfig.item_marker_loss: None decides by item_repr (an item of fixed length -- one position, or
        # semantic_id's codes -- makes the marker after it certain: no marker loss)
        if item_marker_loss is None:
            item_marker_loss = manifest.get("item_repr", "text") not in ("token", "semantic_id", *VECTOR_MODES)
        marker = manifest.get("special_tokens", {}).get(ITEM)
        self.unlabelled_id = -1 if item_marker_loss or marker is None else int(marker)
        # The slot width is baked into the shards, so the manifest's image
        # settings win over the config (which only fills in when absent).
        img = manifest.get("image") or {}
        self.image_size = int(img.get("size", image_size))
        self.patch_size = int(img.get("patch_size", patch_size))
        self.P = (self.image_size // self.patch_size) ** 2
        # item_repr vector*: slots index the catalog's cached vectors (rows of items.parquet)
        self.n_catalog = int((manifest.get("item_vectors") or {}).get("items", 0))

        entries = manifest["splits"][split]["shards"]
        self.urls = [e["url"] for e in entries]
        self.locations = shard_locations(self.urls, self.dataset_dir, shards)
        self.shard_samples = [int(e["samples"]) for e in entries]
        self.lengths = [np.asarray(e["lengths"], dtype=np.int64) for e in entries]
        for e, lens in zip(entries, self.lengths):
            if len(lens) != int(e["samples"]):
                raise ValueError(f"{mpath}: shard {e['url']} lists {len(lens)} lengths for {e['samples']} samples")
        # Packed lengths: truncated to a row.  Zero-length samples carry no
        # tokens and are never packed (consistently in simulation and reading).
        self.packed_lengths = [np.minimum(lens, seq_len) for lens in self.lengths]
        self.shard_tokens = [int(p.sum()) for p in self.packed_lengths]

        n_slots = self.world_size * self.W
        if policy == "drop" and len(self.urls) < n_slots:
            raise ValueError(
                f"split {split!r} has {len(self.urls)} shards but {self.world_size} ranks x {self.W} workers "
                f"= {n_slots} readers need at least one each; prepare smaller shards (lower data.shard_size) "
                f"or use fewer DataLoader workers (data.stream.num_workers)"
            )
        self.epoch = 0
        self.start_step = 0
        self.continuation: Optional[Continuation] = None
        self._plans: dict = {}

    # ---- planning -------------------------------------------------------
    def plan(self, epoch: int, n_slots: Optional[int] = None) -> _EpochPlan:
        """The epoch's slot assignment, rows per block and K, from the manifest alone
        (``n_slots``: for another number of (rank, worker) slots, e.g. the one a
        checkpoint was written with; default this stream's)."""
        n_slots = self.world_size * self.W if n_slots is None else n_slots
        key = epoch if n_slots == self.world_size * self.W else (epoch, n_slots)
        if key not in self._plans:
            assigned = assign_shards(self.shard_tokens, n_slots, self.seed, epoch, self.shuffle)
            blocks = [[a[i : i + self.shuffle_shards] for i in range(0, len(a), self.shuffle_shards)] for a in assigned]
            block_rows = [[self._rows_in_block(b) for b in slot] for slot in blocks]
            totals = [sum(r) for r in block_rows]
            B = self.batch_size
            if self.policy == "drop":
                k = min(t // B for t in totals)
                if k == 0:
                    s = int(np.argmin(totals))
                    raise ValueError(
                        f"split {self.split!r}: reader slot {s} packs only {totals[s]} rows, fewer than one "
                        f"batch of {B}; use fewer ranks/workers, a smaller batch_size or more data"
                    )
            else:
                k = max(-(-t // B) for t in totals) if totals else 0
            if len(self._plans) > 2:  # keep a couple: the current epoch and the one asked about
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = _EpochPlan(blocks, block_rows, k)
        return self._plans[key]

    def _rows_in_block(self, shard_ids: list[int]) -> int:
        lens = np.concatenate([self.packed_lengths[s] for s in shard_ids])
        lens = lens[lens > 0]
        # FFD's row count depends only on the multiset of lengths (equal
        # lengths are interchangeable), so no shuffle is needed to count.
        return first_fit_decreasing(lens, self.seq_len, assign=False)[1] if len(lens) else 0

    def block_rows_plan(self, epoch: int, slot: int, block_idx: int, shard_ids: list[int]) -> list[np.ndarray]:
        """The rows of one block as arrays of sample indices (into the block's shards, concatenated)."""
        lens = np.concatenate([self.packed_lengths[s] for s in shard_ids])
        rng = np.random.default_rng((self.seed, epoch, slot, block_idx))
        perm = rng.permutation(len(lens)) if self.shuffle else np.arange(len(lens))
        perm = perm[lens[perm] > 0]
        rows = [perm[r] for r in ffd_pack(lens[perm], self.seq_len)]
        if self.shuffle:  # same rng: the row order is part of the seeded plan
            rows = [rows[i] for i in rng.permutation(len(rows))]
        return rows

    def steps_per_epoch(self, epoch: int) -> int:
        c = self.continuation
        if c is not None and c.epoch == epoch:
            return c.steps_per_rank(self.world_size)
        return self.plan(epoch).steps_per_worker * self.W

    def dropped_samples(self, epoch: int) -> tuple[int, int]:
        """(samples this rank drops in the epoch, samples of this rank's slots); 0 dropped under "pad"."""
        plan = self.plan(epoch)
        keep = plan.steps_per_worker * self.batch_size
        dropped = total = 0
        for role in range(self.W):
            slot = self.rank * self.W + role
            start = 0
            for b, (shard_ids, n_rows) in enumerate(zip(plan.blocks[slot], plan.block_rows[slot])):
                n = sum(int((self.packed_lengths[s] > 0).sum()) for s in shard_ids)
                total += n
                if self.policy == "drop" and start + n_rows > keep:
                    if start >= keep:
                        dropped += n
                    else:
                        rows = self.block_rows_plan(epoch, slot, b, shard_ids)
                        dropped += sum(len(r) for r in rows[keep - start :])
                start += n_rows
        return dropped, total

    # ---- reading --------------------------------------------------------
    def _read_shard(self, sid: int) -> list[_Sample]:
        url, loc = self.urls[sid], self.locations[sid]
        stream = gopen(loc, "rb")
        try:
            members = ({**m, "__url__": url} for m in tar_file_iterator(stream))
            # lcase=False: item ids in "img.<item>.jpg" member names are case-sensitive.
            out = [self._decode(s) for s in group_by_keys(members, lcase=False)]
            while stream.read(1 << 16):  # drain the tar's end padding so a pipe: writer exits cleanly
                pass
        finally:
            stream.close()  # a pipe: command that failed raises here (non-zero exit)
        if len(out) != self.shard_samples[sid]:
            raise ValueError(f"read {len(out)} samples, manifest says {self.shard_samples[sid]}")
        lens = np.array([len(s.ids) for s in out], dtype=np.int64)
        if not np.array_equal(lens, self.lengths[sid]):
            i = int(np.flatnonzero(lens != self.lengths[sid])[0])
            raise ValueError(f"sample {out[i].key} has {lens[i]} tokens, manifest says {self.lengths[sid][i]}")
        return out

    def _decode(self, s: dict) -> _Sample:
        key = s["__key__"]
        for need in ("ids.npy", "mask.npy", "json"):
            if need not in s:
                raise ValueError(f"sample {key} has no {need} member")
        # allow_pickle=False: shards may come from anywhere; never run pickles.
        ids = load_npy(s["ids.npy"])
        mask = load_npy(s["mask.npy"])
        meta = json.loads(s["json"])
        if ids.ndim != 1 or ids.dtype.kind not in "ui" or mask.shape != ids.shape or mask.dtype != np.uint8:
            raise ValueError(f"sample {key}: ids {ids.dtype}{ids.shape} / mask {mask.dtype}{mask.shape} not as specified")
        items = list(meta.get("images", []))
        slot_tokens = np.flatnonzero(mask & 4)
        if len(slot_tokens) != self.P * len(items):
            raise ValueError(f"sample {key}: {len(slot_tokens)} image-slot tokens for {len(items)} images of {self.P}")
        slots = slot_tokens.reshape(len(items), self.P)
        if len(items) and np.any(slots[:, -1] - slots[:, 0] != self.P - 1):
            raise ValueError(f"sample {key}: an image slot is not {self.P} consecutive tokens")
        images = np.empty((len(items), self.image_size, self.image_size, 3), dtype=np.uint8)
        for k, item in enumerate(items):
            data = s.get(image_member(item))
            if data is None:
                raise ValueError(f"sample {key}: no image member for item {item!r}")
            images[k] = decode_image(data, self.image_size)
        vector_pos = np.flatnonzero(mask & MASK_VECTOR).astype(np.int64)
        vector_items = np.zeros(0, dtype=np.int64)
        if len(vector_pos) or "vec.npy" in s:
            if "vec.npy" not in s:
                raise ValueError(f"sample {key} has {len(vector_pos)} vector slots and no vec.npy member")
            vector_items = load_npy(s["vec.npy"]).astype(np.int64)
            if vector_items.shape != vector_pos.shape:
                raise ValueError(f"sample {key}: vec.npy holds {vector_items.shape} catalog rows for "
                                 f"{len(vector_pos)} vector slots")
            if len(vector_items) and (vector_items.min() < 0 or vector_items.max() >= self.n_catalog):
                raise ValueError(f"sample {key}: a catalog row in vec.npy is outside the catalog of "
                                 f"{self.n_catalog} items")
        return _Sample(key, ids, mask, slots[:, 0].astype(np.int64), images, vector_pos, vector_items)

    def _read_block(self, shard_ids: list[int], stats: dict) -> list[Optional[_Sample]]:
        samples: list[Optional[_Sample]] = []
        for sid in shard_ids:
            try:
                samples.extend(self._read_shard(sid))
            except Exception as e:  # any read/decode failure means the shard is not trustworthy
                msg = f"corrupt shard {self.urls[sid]} (opened as {self.locations[sid]}): {type(e).__name__}: {e}"
                if self.strict:
                    raise CorruptShardError(msg) from e
                warnings.warn(msg + "; skipping its samples", CorruptShardWarning, stacklevel=2)
                stats["corrupt_shards"] += 1
                stats["skipped_samples"] += self.shard_samples[sid]
                stats["corrupt_urls"].append(self.urls[sid])
                # Placeholders keep the block's plan (and so every later row) unchanged.
                samples.extend([None] * self.shard_samples[sid])
        return samples

    # ---- batches --------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.W:
            raise RuntimeError(f"stream planned for {self.W} workers runs under {info.num_workers}")
        return self.iter_worker(info.id if info is not None else 0)

    def iter_worker(self, worker_id: int) -> Iterator[dict]:
        """The batches DataLoader worker ``worker_id`` yields for (self.epoch, self.start_step).

        torch's DataLoader takes batch ``i`` from worker ``i mod W``.  After
        ``start_step`` batches were delivered the next one is due from role
        ``start_step mod W``; the fresh worker 0 takes that role, worker 1 the
        next, ... so the delivered sequence continues exactly as before.
        """
        pos = self.start_step + worker_id
        role, first = pos % self.W, pos // self.W
        c = self.continuation
        if c is not None and c.epoch == self.epoch:
            return self._continued_batches(c, role, first)
        return self._slot_batches(self.epoch, self.rank * self.W + role, first)

    def _continued_batches(self, c: "Continuation", role: int, first: int) -> Iterator[dict]:
        """This rank's batches ``j = first*W + role, (first+1)*W + role, ...`` of an epoch
        continued on another topology: batch ``j`` of rank ``r`` is batch
        ``c.start + j*world_size + r`` of the origin's global order (see :class:`Continuation`)."""
        plan = self.plan(c.epoch, c.origin_slots)
        n = c.steps_per_rank(self.world_size)
        readers: dict[int, Iterator[dict]] = {}
        nxt: dict[int, int] = {}
        for j in range(first * self.W + role, n, self.W):
            slot, pos = c.origin_batch(c.start + j * self.world_size + self.rank)
            if nxt.get(slot) != pos:  # a slot's batches come in order: one reader per slot, re-made on a jump
                readers[slot] = self._slot_batches(c.epoch, slot, pos, plan)
            nxt[slot] = pos + 1
            yield next(readers[slot])

    def _slot_batches(self, epoch: int, slot: int, first: int, plan: Optional[_EpochPlan] = None) -> Iterator[dict]:
        plan = plan or self.plan(epoch)
        B = self.batch_size
        starts = np.concatenate([[0], np.cumsum(plan.block_rows[slot], dtype=np.int64)])
        total = int(starts[-1])
        stats = {"slot": slot, "corrupt_shards": 0, "skipped_samples": 0, "truncated_samples": 0, "corrupt_urls": []}
        cur, rows, samples = -1, [], []
        for j in range(first, plan.steps_per_worker):
            batch_rows = []
            for r in range(j * B, min((j + 1) * B, total)):
                b = int(np.searchsorted(starts, r, side="right") - 1)
                if b != cur:  # blocks before the resume point are skipped without reading
                    shard_ids = plan.blocks[slot][b]
                    rows = self.block_rows_plan(epoch, slot, b, shard_ids)
                    samples = self._read_block(shard_ids, stats)
                    cur = b
                batch_rows.append([samples[i] for i in rows[r - int(starts[b])] if samples[i] is not None])
            yield self._assemble(batch_rows, stats)

    def _assemble(self, rows: list[list[_Sample]], stats: dict) -> dict:
        B, T, P, p = self.batch_size, self.seq_len, self.P, self.patch_size
        ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        doc = np.full((B, T), -1, dtype=np.int64)
        prefix = np.zeros((B, T), dtype=bool)
        images, where, keys = [], [], [[] for _ in range(B)]
        vec_where, vec_items = [], []
        for b, docs in enumerate(rows):
            o = 0
            for d, s in enumerate(docs):
                n = min(len(s.ids), T)
                if len(s.ids) > T:
                    stats["truncated_samples"] += 1
                tok = s.ids[:n].astype(np.int64)
                m = s.mask[:n]
                ids[b, o : o + n] = tok
                pos[b, o : o + n] = np.arange(n)
                doc[b, o : o + n] = d
                prefix[b, o : o + n] = (m & 1) != 0
                # Shifted here so the model needs no shift: predict token t+1 at t
                # when t+1 carries the loss bit; never across documents.
                labels[b, o : o + n - 1] = np.where(((m[1:] & 2) != 0) & (tok[1:] != self.unlabelled_id),
                                                    tok[1:], IGNORE_INDEX)
                for k, st in enumerate(s.image_starts):
                    if st + P <= n:  # a slot cut by truncation loses its image
                        images.append(s.images[k])
                        where.append((b, o + int(st)))
                keep = s.vector_pos < n  # slots cut off by truncation are dropped with their tokens
                vec_where.extend((b, o + int(t)) for t in s.vector_pos[keep])
                vec_items.extend(int(i) for i in s.vector_items[keep])
                o += n
                keys[b].append(s.key)
        if images:
            patches = torch.from_numpy(patchify(np.stack(images), p))
        else:
            patches = torch.zeros((0, P, 3 * p * p), dtype=torch.float32)
        return {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
            "document_ids": torch.from_numpy(doc),
            "prefix_mask": torch.from_numpy(prefix),
            "image_patches": patches,
            "image_positions": torch.tensor(where, dtype=torch.int64).reshape(-1, 2),
            "item_positions": torch.tensor(vec_where, dtype=torch.int64).reshape(-1, 2),
            "item_catalog_rows": torch.tensor(vec_items, dtype=torch.int64),
            "sample_keys": keys,
            "is_padding": not any(rows),
            "stream_stats": {**stats, "corrupt_urls": list(stats["corrupt_urls"])},
        }
