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

Typical use::

    loader = StreamLoader.from_config(cfg.data, "train")   # rank/world from torch.distributed/env
    loader.load_state_dict(ckpt["stream"])                  # optional, on resume
    while step < steps:
        for batch in loader:                                # the rest of the current epoch
            ...
            ckpt["stream"] = loader.state_dict()
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
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from m6rec.config import DataConfig, ImageConfig, StreamConfig
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


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Stored image bytes -> uint8 ``[size, size, 3]`` RGB, resized as the model reads it."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, P, 3*patch*patch]`` in [0, 1]: the one patch layout of the
    batch contract (patches in row-major order, each patch's pixels row-major with the channels last)."""
    n, g = len(images), images.shape[1] // patch
    arr = images.reshape(n, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return arr.reshape(n, g * g, patch * patch * 3).astype(np.float32) / 255.0


def image_patches(data: bytes, size: int, patch: int) -> np.ndarray:
    """One stored image as the model reads it, ``[P, 3*patch*patch]`` (prompts and the item encoder;
    the stream patchifies a whole batch at once)."""
    return patchify(decode_image(data, size)[None], patch)[0]


class CorruptShardError(RuntimeError):
    """A shard could not be read or decoded (strict mode); the message names its url."""


class CorruptShardWarning(RuntimeWarning):
    """A shard was skipped (non-strict mode); the message names its url."""


class DroppedDataWarning(UserWarning):
    """The "drop" policy will leave out a noticeable part of each epoch (uneven slots)."""


class StreamStateError(ValueError):
    """A saved stream state does not belong to this stream; the message names the differences."""


# --------------------------------------------------------------------------
# Pure planning functions (no I/O): shared by the simulation and the reader,
# which is what makes "computed up front" and "what is actually read" agree.
# --------------------------------------------------------------------------
def _ffd(lengths: np.ndarray, seq_len: int, assign: bool):
    """First-fit-decreasing of ``lengths`` (each 1..seq_len) into bins of ``seq_len``.

    Items are placed longest first, ties in input order.  Returns ``(row_of,
    n_rows, order)``: the row of each item (None unless ``assign``), the number
    of rows and the placement order.

    Equal-length items are placed as a group: under first fit, consecutive
    identical items fill the lowest open row that fits until it no longer
    does, then the next one, then open new rows, so a group is a few vector
    operations instead of one scan per item.  The result is exactly the
    item-by-item first fit (tests check this), at a cost that grows with the
    number of *distinct* lengths (<= seq_len), which keeps the whole-epoch
    simulation cheap.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    srt = lengths[order]
    row_of = np.empty(n, dtype=np.int64) if assign else None
    caps = np.empty(n, dtype=np.int64)  # remaining capacity of each open row
    n_rows = 0
    lo = 0  # rows below lo cannot take even the shortest item again: never scanned
    smallest = int(srt[-1]) if n else 0
    change = np.flatnonzero(np.diff(srt)) + 1
    for st, en in zip(np.concatenate([[0], change]), np.concatenate([change, [n]])):
        if en <= st:
            continue
        size, count, pos = int(srt[st]), int(en - st), int(st)
        while lo < n_rows and caps[lo] < smallest:
            lo += 1
        if lo < n_rows:
            fit = caps[lo:n_rows] // size  # how many of this size each open row still takes
            cum = np.cumsum(fit)
            if cum[-1] > 0:
                if cum[-1] >= count:
                    last = int(np.searchsorted(cum, count))  # first row where the group is used up
                    take = fit[: last + 1].copy()
                    take[last] -= cum[last] - count
                else:
                    take = fit
                placed = int(take.sum())
                caps[lo : lo + len(take)] -= take * size
                if assign:
                    row_of[order[pos : pos + placed]] = np.repeat(np.arange(lo, lo + len(take)), take)
                pos += placed
                count -= placed
        if count:  # nothing open fits: open new rows, each filled with as many as fit
            per = seq_len // size
            n_new = -(-count // per)
            take = np.full(n_new, per, dtype=np.int64)
            take[-1] = count - per * (n_new - 1)
            caps[n_rows : n_rows + n_new] = seq_len - take * size
            if assign:
                row_of[order[pos : pos + count]] = np.repeat(np.arange(n_rows, n_rows + n_new), take)
            n_rows += n_new
    return row_of, n_rows, order


def ffd_pack(lengths: Sequence[int], seq_len: int) -> list[np.ndarray]:
    """Pack items into rows of ``seq_len`` tokens, first-fit-decreasing.

    ``lengths`` are token counts (longer ones count as ``seq_len``: they are
    truncated); returns the rows, each an array of item indices in placement
    order.  Deterministic: ties go in input order.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), seq_len)
    if len(lengths) == 0:
        return []
    if lengths.min() <= 0:
        raise ValueError("ffd_pack: every length must be >= 1")
    row_of, n_rows, order = _ffd(lengths, seq_len, assign=True)
    rows_in_placement = row_of[order]
    placed = order[np.argsort(rows_in_placement, kind="stable")]
    return np.split(placed, np.cumsum(np.bincount(rows_in_placement, minlength=n_rows))[:-1])


def assign_shards(tokens: Sequence[int], num_slots: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Give shards to slots: permute (seeded by (seed, epoch)), then greedily to the lightest slot.

    Greedy by tokens keeps slot loads within about one shard of each other
    even when shard sizes are very uneven, which is what keeps the "drop"
    policy's losses small.  Ties go to the lowest slot index, so every rank
    computes the same assignment.
    """
    n = len(tokens)
    order = np.random.default_rng((seed, epoch)).permutation(n) if shuffle else np.arange(n)
    load = np.zeros(num_slots, dtype=np.int64)
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    for s in order:
        k = int(np.argmin(load))  # argmin returns the first minimum: lowest slot index on ties
        slots[k].append(int(s))
        load[k] += int(tokens[s])
    return slots


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
        # StreamConfig.item_marker_loss: None decides by item_repr (one position per item: no marker loss)
        if item_marker_loss is None:
            item_marker_loss = manifest.get("item_repr", "text") not in ("token", *VECTOR_MODES)
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
        return _ffd(lens, self.seq_len, assign=False)[1] if len(lens) else 0

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


def _identity(batch):  # module level: picklable for spawn/forkserver workers
    return batch


class StreamLoader:
    """A rank's resumable batch stream over one split.

    ``for batch in loader`` yields the rest of the current epoch, then moves
    the position to the next epoch.  What the trainer calls:

    * ``steps_per_epoch`` (same on every rank), ``epoch``, ``step_in_epoch``;
    * ``set_epoch(e)`` (a no-op for the current epoch, so it cannot undo a restore);
    * ``state_dict()`` / ``load_state_dict(sd)``: the position, identical on
      every rank, checked against a fingerprint of the settings;
    * ``stats``: this rank's corrupt/skipped/truncated counts, summed over workers;
    * ``dropped_fraction``, ``packing_efficiency``: for the current epoch, from the plan.

    ``inline_workers=True`` runs the W worker roles round-robin in this
    process instead of a DataLoader: the same batches in the same order
    (handy for debugging and tests).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        stream: Optional[StreamConfig] = None,
        *,
        shards: Optional[str] = None,
        images: Optional[ImageConfig] = None,
        train: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        pin_memory: bool = False,
        inline_workers: bool = False,
    ):
        stream = stream or StreamConfig()
        images = images or ImageConfig()
        self.dataset = PackedStream(
            dataset_dir,
            split,
            seq_len=stream.seq_len,
            batch_size=stream.batch_size,
            num_workers=stream.num_workers,
            shuffle_shards=stream.shuffle_shards,
            seed=stream.seed,
            strict=stream.strict,
            shards=shards,
            shuffle=train,
            policy="drop" if train else "pad",
            rank=rank,
            world_size=world_size,
            image_size=images.size,
            patch_size=images.patch_size,
            item_marker_loss=stream.item_marker_loss,
        )
        self.pin_memory = pin_memory
        self.inline_workers = inline_workers
        # evaluation reads a few batches per pass: a deep queue would only read blocks it never uses
        self.prefetch_factor = stream.prefetch_factor if train else min(2, stream.prefetch_factor)
        # Training only (an evaluation pass is not followed by another): the next epoch's workers
        # start this many batches before the epoch ends (see __iter__).
        self.next_epoch_lookahead = self.NEXT_EPOCH_LOOKAHEAD if train else 0
        self._next: Optional[tuple[tuple[int, int], Iterator[dict]]] = None  # ((epoch, step), started batches)
        self.epoch = 0
        self.step_in_epoch = 0
        self._stats: dict[int, dict] = {}
        # Under "drop" every worker stops at the lightest slot's batch count, so
        # shard granularity (e.g. 10 shards on 4 slots: 2 vs 3 each) can cost
        # a lot.  Estimated from rows, which is free; say so once, up front.
        d = self.dataset
        plan = d.plan(0)
        rows = [sum(r) for r in plan.block_rows]
        lost = 1 - plan.steps_per_worker * d.batch_size * len(rows) / max(1, sum(rows))
        if d.policy == "drop" and lost > 0.05 and d.rank == 0:
            warnings.warn(
                f"split {split!r}: equal steps on {d.world_size} ranks x {d.W} workers drop about {lost:.0%} of "
                f"each epoch's rows ({len(d.urls)} shards give uneven slots); prepare more, smaller shards "
                f"(data.shard_size) or use fewer workers",
                DroppedDataWarning,
                stacklevel=2,
            )

    @classmethod
    def from_config(cls, data: DataConfig, split: str = "train", **kw) -> "StreamLoader":
        return cls(data.output, split, data.stream, shards=data.shards, images=data.images, **kw)

    # ---- position -------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dataset.rank

    @property
    def world_size(self) -> int:
        return self.dataset.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset.steps_per_epoch(self.epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.close()
            self.epoch, self.step_in_epoch = epoch, 0

    def close(self) -> None:
        """End the workers started ahead for the next epoch, if any (a new position, or the end)."""
        ahead, self._next = self._next, None
        if ahead is not None and hasattr(ahead[1], "_shutdown_workers"):
            ahead[1]._shutdown_workers()  # what the iterator's __del__ does, now instead of at collection

    @property
    def fingerprint(self) -> dict:
        d = self.dataset
        return {
            "manifest_sha256": d.manifest_sha256,
            "split": d.split,
            "seed": d.seed,
            "seq_len": d.seq_len,
            "batch_size": d.batch_size,
            "world_size": d.world_size,
            "num_workers": d.W,
            "shuffle_shards": d.shuffle_shards,
            "policy": d.policy,
        }

    def state_dict(self) -> dict:
        out = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "fingerprint": self.fingerprint}
        c = self.dataset.continuation
        if c is not None and c.epoch == self.epoch:
            out["continuation"] = c.to_dict()
        return out

    TOPOLOGY = ("world_size", "num_workers")

    def load_state_dict(self, state: dict) -> None:
        """Restore a position.  Saved by the same number of ranks and workers: the same
        plan goes on (bitwise the stream an uninterrupted run reads).  By another
        number: the interrupted epoch goes on as a :class:`Continuation` -- exactly
        the batches not yet delivered, in the order the saving run would have
        stepped them -- and the next epoch is planned for this topology."""
        saved, now = state.get("fingerprint", {}), self.fingerprint
        diff = [f"{k}: saved {saved.get(k)!r}, this run {now[k]!r}" for k in now
                if saved.get(k) != now[k] and k not in self.TOPOLOGY]
        if diff:
            raise StreamStateError(
                "the stream state cannot resume this stream exactly (the batch order depends on these): "
                + "; ".join(diff)
            )
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        self.close()  # workers started ahead were planned for the position this replaces
        d = self.dataset
        saved_world, saved_w = int(saved.get("world_size", d.world_size)), int(saved.get("num_workers", d.W))
        cont = state.get("continuation")
        if cont is not None or (saved_world, saved_w) != (d.world_size, d.W):
            if cont is not None:
                c = Continuation.from_dict(cont)
            else:
                c = Continuation(epoch, saved_world, saved_w, d.plan(epoch, saved_world * saved_w).steps_per_worker, 0)
            if not 0 <= step <= c.steps_per_rank(saved_world):
                raise StreamStateError(f"step_in_epoch {step} outside the continued epoch {epoch} of "
                                       f"{c.steps_per_rank(saved_world)} steps on {saved_world} ranks")
            c.start += step * saved_world  # global positions delivered so far
            if (c.origin_world, c.origin_workers) == (d.world_size, d.W) and c.start % d.world_size == 0:
                d.continuation, step = None, c.start // d.world_size  # back on the origin's own plan
            else:
                d.continuation, step = c, 0
            self.epoch, self.step_in_epoch = epoch, step
            if step >= self.dataset.steps_per_epoch(epoch):  # nothing left of it
                self.epoch, self.step_in_epoch = epoch + 1, 0
            return
        if not 0 <= step <= self.dataset.steps_per_epoch(epoch):
            raise StreamStateError(f"step_in_epoch {step} outside epoch {epoch} of {self.dataset.steps_per_epoch(epoch)} steps")
        self.epoch, self.step_in_epoch = epoch, step

    # ---- reporting ------------------------------------------------------
    @property
    def stats(self) -> dict:
        """Counts since this rank's workers last started, summed over them."""
        keys = ("corrupt_shards", "skipped_samples", "truncated_samples")
        out = {k: sum(s[k] for s in self._stats.values()) for k in keys}
        out["corrupt_urls"] = sorted({u for s in self._stats.values() for u in s["corrupt_urls"]})
        return out

    @property
    def dropped_fraction(self) -> float:
        """Fraction of this rank's samples the "drop" policy leaves out of the current epoch."""
        dropped, total = self.dataset.dropped_samples(self.epoch)
        return dropped / total if total else 0.0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row capacity over all packed rows of the epoch (every slot)."""
        d = self.dataset
        rows = sum(sum(r) for r in d.plan(self.epoch).block_rows)
        return sum(d.shard_tokens) / (rows * d.seq_len) if rows else 0.0

    # ---- iteration ------------------------------------------------------
    #: Batches before an epoch's end at which the next epoch's DataLoader workers are started.  A new
    #: epoch's workers take ~1-2 s to start and read their first block of shards; on a GPU that steps
    #: in 0.1-0.2 s, restarting them at the boundary was most of the data wait of small datasets
    #: (`m6rec bench data --dataset D --step-seconds S`).  32 steps ahead hides it; the early workers
    #: fill their prefetch buffers and then sit idle until their epoch comes.
    NEXT_EPOCH_LOOKAHEAD = 32

    def _start(self, epoch: int, step: int) -> Iterator[dict]:
        """This rank's batches of ``epoch`` from ``step`` on; with DataLoader workers they start now."""
        ds = self.dataset
        ds.epoch, ds.start_step = epoch, step
        ds.plan(epoch)  # plan once here; forked workers inherit it, spawned ones unpickle it
        if not self._worker_processes:
            return self._round_robin()
        # iter() forks the workers with the dataset as it is now (this epoch and step): setting up the
        # next epoch while this one's workers still run changes nothing for them
        # The workers draw no random numbers (the stream has its own seeds), but each DataLoader iterator
        # draws a base seed: from a generator of its own, so starting workers ahead moves no draw of
        # torch's global generator (dropout on CPU, saved and restored with checkpoints).
        return iter(DataLoader(ds, batch_size=None, num_workers=ds.num_workers, collate_fn=_identity,
                               pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor,
                               generator=torch.Generator().manual_seed(ds.seed * 1_000_003 + epoch)))

    @property
    def _worker_processes(self) -> bool:
        return not self.inline_workers and self.dataset.num_workers > 0

    def __iter__(self) -> Iterator[dict]:
        if self.step_in_epoch >= self.steps_per_epoch:  # state saved right at an epoch's end
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        epoch = self.epoch
        if self._next is not None and self._next[0] == (epoch, self.step_in_epoch):
            batches, self._next = self._next[1], None
        else:  # nothing started ahead, or for another position: its workers end here
            self.close()
            batches = self._start(epoch, self.step_in_epoch)
        self._stats = {}
        lookahead = self.next_epoch_lookahead if self._worker_processes else 0
        for batch in batches:
            self.step_in_epoch += 1  # counted when handed over: a state saved after it excludes it
            st = batch["stream_stats"]
            self._stats[st["slot"]] = st
            if lookahead and self._next is None and self.steps_per_epoch - self.step_in_epoch <= lookahead:
                self._next = ((epoch + 1, 0), self._start(epoch + 1, 0))
            yield batch
        if self.step_in_epoch != self.steps_per_epoch:
            raise RuntimeError(f"stream delivered {self.step_in_epoch} of {self.steps_per_epoch} planned steps")
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def _round_robin(self) -> Iterator[dict]:
        # Same order as torch's DataLoader: cycle workers 0..W-1, skip exhausted ones.
        gens = [self.dataset.iter_worker(w) for w in range(self.dataset.W)]
        while gens:
            alive = []
            for g in gens:
                b = next(g, None)
                if b is not None:
                    alive.append(g)
                    yield b
            gens = alive
