"""``m6rec bench train --only checkpoint``: per ZeRO stage on 2 ranks, the step time beside what a
checkpoint costs -- m6rec's own save (:func:`m6rec.train.checkpoint.save`: DeepSpeed's shards, the
fsync of the tag, the ``COMPLETE`` marker) and load, seconds and bytes per rank -- see
:func:`bench_checkpoint`."""
from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from m6rec.bench.common import (
    STAGES,
    bench_config,
    bench_shape,
    format_table,
    init_rank,
    rank_step_times,
    run_ranks,
    synthetic_batch,
)
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.train import checkpoint as ckpt
from m6rec.train.step import build_engine


def _rank_of_file(name: str) -> int:
    """The rank that writes a checkpoint file: ``zero_pp_rank_{r}_...`` and ``m6rec_rank{r}.pt``
    are rank r's; the rest (``mp_rank_00_model_states.pt``, ``COMPLETE``) rank 0's."""
    m = re.match(r"zero_pp_rank_(\d+)_|m6rec_rank(\d+)\.pt$", name)
    return int(next(g for g in m.groups() if g is not None)) if m else 0


def _clone_tensors(obj):
    """A copy of every tensor in a (nested) state dict: what an asynchronous save has to take
    before the next optimizer step may change the state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _drop_page_cache(folder: Path) -> None:
    """Evict a checkpoint's files from the page cache (``POSIX_FADV_DONTNEED``; they were
    fsync'ed, so nothing is lost): the next load reads the disk, as a resume on a fresh
    node does.  Only these files: the machine's other caches stay."""
    for f in sorted(Path(folder).iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _checkpoint_worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    init_rank(rank, world, port, spec["threads"])
    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    batch = synthetic_batch(margs.vocab_size, B, T, seed=rank)
    batch["sample_keys"] = [f"r{rank}-{i}" for i in range(B)]
    cpu = torch.device("cpu")
    root = Path(spec["dir"])
    fsync_tree = ckpt._fsync_tree
    results = []
    for stage in spec["stages"]:
        cfg = bench_config(stage, T, B, lr=1e-4)
        torch.manual_seed(0)
        model = build_model(margs)
        n_params = model.num_params()
        engine, opt, runner, _ = build_engine(cfg, model, world, cpu)
        times, _ = rank_step_times(lambda i, steps=runner: steps.run(i, 1e-4, [batch]).values(), spec["warmup"],
                                   spec["steps"])
        ckpt_dir = root / f"zero{stage}"
        meta = {"world_size": world, "zero_stage": stage, "model_args": margs.to_dict()}
        saves, fsyncs = [], []

        def timed_fsync(path):  # rank 0 fsyncs the whole tag inside save(): its share of the save
            t = time.perf_counter()
            fsync_tree(path)
            fsyncs.append(time.perf_counter() - t)

        ckpt._fsync_tree = timed_fsync
        try:
            for k in range(spec["saves"]):
                step = spec["warmup"] + spec["steps"] + k
                dist.barrier()
                t = time.perf_counter()
                tag = ckpt.save(engine, ckpt_dir, step, {"step": step, "stream": {"epoch": 0}},
                                {"rng": ckpt.rng_state()}, keep_last=spec["saves"], meta=meta)
                saves.append(time.perf_counter() - t)  # save() ends in a barrier: every rank's wait
        finally:
            ckpt._fsync_tree = fsync_tree
        # What an asynchronous save would block for: a copy of the state this rank serializes.
        optim_sd = opt.state_dict() if stage == 0 else engine.optimizer.state_dict()
        module_sd = engine.module_state_dict() if rank == 0 and stage < 3 else {}
        dist.barrier()
        t = time.perf_counter()
        snapshot = _clone_tensors({"optimizer": optim_sd if (stage > 0 or rank == 0) else {}, "module": module_sd})
        snapshot_s = time.perf_counter() - t
        del snapshot, optim_sd, module_sd
        loads = {}
        for kind in ("warm", "cold"):
            if kind == "cold" and rank == 0:
                _drop_page_cache(ckpt_dir / tag)
            dist.barrier()
            t = time.perf_counter()
            ckpt.load(engine, ckpt_dir, tag)
            dist.barrier()
            loads[kind] = time.perf_counter() - t
        runner.run(99, 1e-4, [batch]).values()  # the loaded engine still steps
        mine = dict(times=times, saves=saves, fsyncs=fsyncs, snapshot_s=snapshot_s, loads=loads)
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            files = {f.name: f.stat().st_size for f in sorted((ckpt_dir / tag).iterdir()) if f.is_file()}
            per_rank = [0] * world
            for name, size in files.items():
                per_rank[_rank_of_file(name)] += size
            per_step = [max(ts) for ts in zip(*(r["times"] for r in every))]
            step_s, save_s = min(per_step), min(every[0]["saves"])
            results.append(dict(
                stage=stage, ran_as_stage=engine.zero_optimization_stage(), world=world, params=n_params,
                step_s=step_s,
                step_s_median=statistics.median(per_step), save_s=save_s, save_s_all=every[0]["saves"],
                fsync_s=min(every[0]["fsyncs"]), snapshot_s_per_rank=[r["snapshot_s"] for r in every],
                load_warm_s=max(r["loads"]["warm"] for r in every), load_cold_s=max(r["loads"]["cold"] for r in every),
                bytes_per_rank=per_rank, bytes_total=sum(files.values()), files=files,
                save_every_for_1pct=math.ceil(save_s / (0.01 * step_s)),
                overhead_at_save_every={str(n): save_s / (n * step_s) for n in spec["save_every"]}))
        del engine, opt, model, runner
        gc.collect()
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def bench_checkpoint(cfg: Any, args: Any, *, warmup: int = 1, steps: int = 3, saves: int = 2,
                     world: int = 2, stages: tuple = STAGES) -> dict[str, Any]:
    """Per ZeRO stage on ``world`` ranks (one process each, one thread, gloo), the
    ``scaling`` model and rows: the step time (fastest of ``steps`` timed steps, slowest rank)
    beside m6rec's checkpoint save (:func:`m6rec.train.checkpoint.save`, as the trainer calls
    it: DeepSpeed's shards, the RNG files, rank 0's fsync of the tag, ``COMPLETE``,
    ``latest``; the fastest of ``saves``; ``fsync_s`` is the fsync's share) and load
    (:func:`~m6rec.train.checkpoint.load`, with optimizer states; ``warm`` right after the
    save from the page cache, ``cold`` after evicting the tag's files from it), the bytes
    each rank wrote, and ``snapshot_s``: the copy in memory of the state a rank serializes --
    what a save made asynchronous would still block the step for.  The lost throughput of
    ``train.save_every`` N is ``save_s / (N x step_s)``.  Checkpoints are written under
    ``$TMPDIR`` (default /tmp): point it at the file system the runs save to."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    margs, T, B = bench_shape(cfg, args)
    every = sorted({100, 1000, int(getattr(getattr(cfg, "train", None), "save_every", 0) or 100)})
    folder = tempfile.mkdtemp(prefix="m6rec-bench-ckpt-")
    spec = dict(model_args=margs.to_dict(), seq_len=T, rows=B, warmup=warmup, steps=steps, saves=saves, threads=1,
                dir=folder, save_every=every, stages=list(stages))
    try:
        rows = run_ranks(_checkpoint_worker, world, spec)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return dict(preset=margs.preset, params=rows[0]["params"], model_args=margs.to_dict(),
                seq_len=T, rows_per_rank=B, world=world, warmup_steps=warmup, timed_steps=steps, saves=saves,
                threads_per_rank=1, precision="fp32", device="cpu", directory=str(Path(folder).parent),
                save_every=every, load_avg_start=load_start, load_avg_end=os.getloadavg(), results=rows,
                table=checkpoint_table(rows, every), wall_s=time.perf_counter() - t0)


def checkpoint_table(rows: list[dict], save_every: list[int]) -> list[str]:
    every = [n for n in save_every if str(n) in rows[0]["overhead_at_save_every"]] if rows else []
    return format_table(
        ["ZeRO", "step s", "save s (fsync)", "snapshot s / rank", "load s warm / cold", "MiB / rank",
         *(f"cost at save_every {n}" for n in every), "save_every for 1 %"],
        [[f"{r['stage']}" + (f" (runs as {r['ran_as_stage']})" if r["ran_as_stage"] != r["stage"] else ""),
          f"{r['step_s']:.2f}", f"{r['save_s']:.2f} ({r['fsync_s']:.2f})",
          " / ".join(f"{x:.3f}" for x in r["snapshot_s_per_rank"]), f"{r['load_warm_s']:.2f} / {r['load_cold_s']:.2f}",
          " / ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"]),
          *(f"{100 * r['overhead_at_save_every'][str(n)]:.2f} %" for n in every), r["save_every_for_1pct"]]
         for r in rows])
