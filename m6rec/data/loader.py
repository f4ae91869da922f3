"""``StreamLoader``: a rank's resumable batch stream over one split, the DataLoader around
:class:`~m6rec.data.stream.PackedStream` (its workers, the next epoch's started ahead, the
position saved in checkpoints).

Typical use::

    loader = StreamLoader.from_config(cfg.data, "train")   # rank/world from torch.distributed/env
    loader.load_state_dict(ckpt["stream"])                  # optional, on resume
    while step < steps:
        for batch in loader:                                # the rest of the current epoch
            ...
            ckpt["stream"] = loader.state_dict()
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from m6rec.config import DataConfig, ImageConfig, StreamConfig
from m6rec.data.stream import (
    Continuation,
    DroppedDataWarning,
    PackedStream,
    StreamStateError,
)


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
