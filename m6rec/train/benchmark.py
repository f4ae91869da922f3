"""``m6rec bench train``: ZeRO 0/1/2/3 at 1 and 2 ranks, side by side, on this machine.

For each world size (1, then 2) one group of processes is spawned (gloo, one
CPU thread per rank: a rank is one "device"), and inside it every ZeRO stage
in turn builds the ``small`` preset, wraps it in DeepSpeed exactly as the
trainer does (:func:`m6rec.train.optim.build_optimizer`,
:func:`~m6rec.train.ds_config.deepspeed_config`), runs ``warmup`` steps, then
times ``steps`` optimizer steps on synthetic packed rows (two documents per
row, half prefix, half targets).  Reported per (stage, world):

* ``step_s``: the fastest of the timed steps (each timed on the slowest
  rank, between barriers) -- the least disturbed one, since the machine may
  be shared; the median is kept beside it (``step_s_median``);
  ``tokens_per_s`` (all ranks) and ``mfu_pct`` (against a one-thread fp32
  matmul peak measured first) from it;
* ``scaling_efficiency`` = tokens/s at 2 ranks / (2 x tokens/s at 1 rank);
* per-rank optimizer memory, measured from the tensors the optimizer holds:
  ``adam_state_bytes`` (exp_avg + exp_avg_sq) and ``fp32_master_bytes``
  (ZeRO's fp32 partition; none at stage 0 in fp32, where the model's own
  weights are the master copy), against the theoretical 8 P / N and 4 P / N
  bytes (N = 1 at stage 0, which partitions nothing).

With ``--config`` the model and the row shape come from that config
(``model``, ``data.stream.seq_len``/``batch_size``); otherwise the ``small``
preset at 256 tokens x 2 rows per rank, 2 warm-up + 6 timed steps.

``--only checkpoint`` (:func:`bench_checkpoint`): the same model on 2 ranks, per
ZeRO stage the step time beside what a checkpoint costs -- m6rec's own save
(:func:`m6rec.train.checkpoint.save`: DeepSpeed's shards, the fsync of the tag, the
``COMPLETE`` marker) and load, seconds and bytes per rank -- see
:func:`bench_checkpoint`.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = (0, 1, 2, 3)
WORLDS = (1, 2)


def bench_config(stage: int, seq_len: int, rows: int, **train):
    """The config a benchmark engine is built from: ZeRO ``stage``, ``rows`` x ``seq_len`` per
    rank, gradient clipping at 1.0 (as the presets), ``train`` overrides."""
    from m6rec.config import load_config

    return load_config(None, {"deepspeed": {"zero_stage": stage}, "data": {"stream": {"seq_len": seq_len,
                                                                                    "batch_size": rows}},
                              "train": {"grad_clip": 1.0, **train}})


def _batch(vocab: int, rows: int, seq_len: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (rows, seq_len), generator=g)
    half, quarter = seq_len // 2, seq_len // 4
    pos = torch.arange(seq_len) % half
    doc = (torch.arange(seq_len) // half).expand(rows, seq_len).contiguous()
    prefix = (pos < quarter).expand(rows, seq_len).contiguous()
    labels = torch.full((rows, seq_len), -100)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    target = (pos >= quarter - 1) & (pos < half - 1)
    labels[:, target] = nxt[:, target]
    return dict(input_ids=ids, labels=labels, position_ids=pos.expand(rows, seq_len).contiguous(),
                document_ids=doc, prefix_mask=prefix)


def _optimizer_bytes(opt, stage: int) -> tuple[int, int]:
    """(Adam moment bytes, fp32 master bytes) this rank's optimizer holds."""
    adam = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if hasattr(v, "numel") and v.ndim > 0)
    # Under ZeRO the optimizer's state is keyed by the fp32 master partitions it steps.
    master = 0 if stage == 0 else sum(p.numel() * p.element_size() for p in opt.state)
    return adam, master


def _init_rank(rank: int, world: int, port: int, threads: int) -> None:
    """A benchmark worker process joins its gloo group (one rank of ``world`` on this machine)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import logging

    import torch

    torch.set_num_threads(threads)
    from m6rec.train.distributed import init_deepspeed_comm

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_deepspeed_comm("gloo")


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    _init_rank(rank, world, port, spec["threads"])
    import deepspeed
    import torch
    import torch.distributed as dist

    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.model.info import flops_per_token
    from m6rec.train.ds_config import deepspeed_config
    from m6rec.train.optim import build_optimizer
    from m6rec.train.metrics import measure_matmul_flops

    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    peak = measure_matmul_flops(torch.float32, "cpu", seconds=1.0) if world == 1 else None
    results = []
    for stage in spec["stages"]:
        cfg = bench_config(stage, T, B, lr=1e-4)
        torch.manual_seed(0)
        model = build_model(margs)
        n_params = model.num_params()
        opt = build_optimizer(cfg, model, on_gpu=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world, False))
        batch = _batch(margs.vocab_size, B, T, seed=rank)
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            dist.barrier()
            t = time.perf_counter()
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            float(loss)
            dist.barrier()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
        adam, master = _optimizer_bytes(opt, stage)
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        mine = dict(adam=adam, master=master, rss=rss, times=times, loss=float(loss))
        every = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            per_step = [max(ts) for ts in zip(*(r["times"] for r in every))]  # the slowest rank sets the pace
            step_s = min(per_step)  # the least disturbed step: the machine may be shared
            n = 1 if stage == 0 else world
            results.append(dict(
                stage=stage, world=world, step_s=step_s, step_s_median=statistics.median(per_step),
                step_s_all=per_step, tokens_per_s=world * B * T / step_s,
                tokens_per_s_median=world * B * T / statistics.median(per_step), loss=every[0]["loss"],
                adam_state_bytes_per_rank=[r["adam"] for r in every],
                fp32_master_bytes_per_rank=[r["master"] for r in every],
                theoretical_adam_state_bytes=8 * n_params / n,
                theoretical_fp32_master_bytes=0 if stage == 0 else 4 * n_params / n,
                adam_state_vs_theory=max(r["adam"] for r in every) / (8 * n_params / n),
                rss_bytes_per_rank=[r["rss"] for r in every], params=n_params,
                flops_per_token=flops_per_token(margs, T)["total"]))
        del engine, opt, model, loss
        gc.collect()
    if rank == 0:
        Path(out).write_text(json.dumps(dict(results=results, peak_flops=peak)))
    dist.destroy_process_group()


def bench_train(cfg: Any, args: Any) -> dict[str, Any]:
    """Both tables: ZeRO scaling at 1 and 2 ranks, and the engine overhead (``--only`` picks one)."""
    only = getattr(args, "only", None)
    out: dict[str, Any] = {"bench": "train"}
    if only in (None, "scaling"):
        out.update(bench_scaling(cfg, args))
    if only in (None, "checkpoint"):
        out["checkpoint"] = bench_checkpoint(cfg, args)
        print("\n".join(["checkpoint cost (per ZeRO stage, 2 ranks):", *out["checkpoint"]["table"]]))
    if only in (None, "overhead"):
        out["overhead"] = bench_overhead()
        print("\n".join(["engine overhead (350m depth, tiny width; per ZeRO stage, one rank):",
                          *out["overhead"]["table"]]))
    if only in (None, "scaling"):
        print("\n".join(["ZeRO scaling:", *out["table"]]))
    return out


def _bench_model(cfg: Any, args: Any):
    """(model args, seq_len, rows per rank): ``--config``'s, else the ``small`` preset at 256 x 2."""
    from m6rec.config import load_config
    from m6rec.model.args import ModelArgs

    root = Path(__file__).resolve().parents[2]
    if getattr(args, "config", None):
        margs, T, B = ModelArgs.from_config(cfg), cfg.data.stream.seq_len, cfg.data.stream.batch_size
    else:
        margs = ModelArgs.from_config(load_config(root / "configs" / "model" / "small.yaml"))
        T, B = 256, 2
    margs = ModelArgs.from_dict({**margs.to_dict(), "max_seq_len": max(margs.max_seq_len, T), "compile": False,
                                 "init_from": None})
    return margs, T, B


def bench_scaling(cfg: Any, args: Any) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from m6rec.train.distributed import free_port

    t0 = time.perf_counter()
    margs, T, B = _bench_model(cfg, args)
    spec = dict(model_args=margs.to_dict(), seq_len=T, rows=B, warmup=2, steps=6, threads=1)
    load_start = os.getloadavg()
    rows, peak = [], None
    for world in WORLDS:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        mp.start_processes(_worker, args=(world, free_port(), spec, out), nprocs=world, start_method="spawn")
        got = json.loads(Path(out).read_text())
        os.unlink(out)
        rows += got["results"]
        peak = got["peak_flops"] or peak
    by = {(r["stage"], r["world"]): r for r in rows}
    for r in rows:
        r["mfu_pct"] = 100 * r["tokens_per_s"] / r["world"] * r["flops_per_token"] / peak
        if r["world"] == 2:
            r["scaling_efficiency"] = r["tokens_per_s"] / (2 * by[(r["stage"], 1)]["tokens_per_s"])
    return dict(bench="train", preset=margs.preset, model_args=margs.to_dict(), seq_len=T, rows_per_rank=B,
                tokens_per_rank_per_step=T * B, warmup_steps=spec["warmup"], timed_steps=spec["steps"],
                threads_per_rank=spec["threads"], precision="fp32", device="cpu", cpus=os.cpu_count(),
                matmul_peak_flops_one_thread=peak, load_avg_start=load_start, load_avg_end=os.getloadavg(),
                results=rows, table=format_table(rows), wall_s=time.perf_counter() - t0)


def format_table(rows: list[dict]) -> list[str]:
    """The Markdown table of docs/training.md."""
    out = ["| ZeRO | ranks | step s (best / median) | tokens/s | MFU % | scaling eff. | Adam state / rank (MiB) | "
           "theory 8P/N (MiB) | fp32 master / rank (MiB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["stage"], r["world"])):
        eff = f"{100 * r['scaling_efficiency']:.0f} %" if "scaling_efficiency" in r else ""
        out.append(f"| {r['stage']} | {r['world']} | {r['step_s']:.2f} / {r['step_s_median']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{r.get('mfu_pct', 0):.1f} | {eff} | {max(r['adam_state_bytes_per_rank']) / 2**20:.1f} | "
                   f"{r['theoretical_adam_state_bytes'] / 2**20:.1f} | {max(r['fp32_master_bytes_per_rank']) / 2**20:.1f} |")
    return out


# ---------------------------------------------------------------------------
# Checkpoint cost: save and load beside the step, per ZeRO stage, on 2 ranks
# ---------------------------------------------------------------------------
def _rank_of_file(name: str) -> int:
    """The rank that writes a checkpoint file: ``zero_pp_rank_{r}_...`` and ``m6rec_rank{r}.pt``
    are rank r's; the rest (``mp_rank_00_model_states.pt``, ``COMPLETE``) rank 0's."""
    import re

    m = re.match(r"zero_pp_rank_(\d+)_|m6rec_rank(\d+)\.pt$", name)
    return int(next(g for g in m.groups() if g is not None)) if m else 0


def _clone_tensors(obj):
    """A copy of every tensor in a (nested) state dict: what an asynchronous save has to take
    before the next optimizer step may change the state."""
    import torch

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
    _init_rank(rank, world, port, spec["threads"])
    import torch
    import torch.distributed as dist

    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.train import checkpoint as ckpt
    from m6rec.train.step import build_engine

    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    batch = _batch(margs.vocab_size, B, T, seed=rank)
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
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            dist.barrier()
            t = time.perf_counter()
            runner.run(i, 1e-4, [batch]).values()
            dist.barrier()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
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
    import torch.multiprocessing as mp

    from m6rec.train.distributed import free_port

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    margs, T, B = _bench_model(cfg, args)
    every = sorted({100, 1000, int(getattr(getattr(cfg, "train", None), "save_every", 0) or 100)})
    folder = tempfile.mkdtemp(prefix="m6rec-bench-ckpt-")
    spec = dict(model_args=margs.to_dict(), seq_len=T, rows=B, warmup=warmup, steps=steps, saves=saves, threads=1,
                dir=folder, save_every=every, stages=list(stages))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        mp.start_processes(_checkpoint_worker, args=(world, free_port(), spec, out), nprocs=world,
                           start_method="spawn")
        rows = json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
        shutil.rmtree(folder, ignore_errors=True)
    return dict(preset=margs.preset, params=rows[0]["params"], model_args=margs.to_dict(),
                seq_len=T, rows_per_rank=B, world=world, warmup_steps=warmup, timed_steps=steps, saves=saves,
                threads_per_rank=1, precision="fp32", device="cpu", directory=str(Path(folder).parent),
                save_every=every, load_avg_start=load_start, load_avg_end=os.getloadavg(), results=rows,
                table=format_checkpoint_table(rows, every), wall_s=time.perf_counter() - t0)


def format_checkpoint_table(rows: list[dict], save_every: list[int]) -> list[str]:
    every = [n for n in save_every if str(n) in rows[0]["overhead_at_save_every"]] if rows else []
    out = ["| ZeRO | step s | save s (fsync) | snapshot s / rank | load s warm / cold | MiB / rank | " +
           " | ".join(f"cost at save_every {n}" for n in every) + " | save_every for 1 % |",
           "|---|---|---|---|---|---|" + "---|" * len(every) + "---|"]
    for r in rows:
        stage = f"{r['stage']}" + (f" (runs as {r['ran_as_stage']})" if r["ran_as_stage"] != r["stage"] else "")
        mib = " / ".join(f"{b / 2**20:.1f}" for b in r["bytes_per_rank"])
        snap = " / ".join(f"{x:.3f}" for x in r["snapshot_s_per_rank"])
        cost = " | ".join(f"{100 * r['overhead_at_save_every'][str(n)]:.2f} %" for n in every)
        out.append(f"| {stage} | {r['step_s']:.2f} | {r['save_s']:.2f} ({r['fsync_s']:.2f}) | {snap} | "
                   f"{r['load_warm_s']:.2f} / {r['load_cold_s']:.2f} | {mib} | {cost} | {r['save_every_for_1pct']} |")
    return out


# ---------------------------------------------------------------------------
# Engine overhead: the engine's step vs a plain PyTorch loop, at negligible compute
# ---------------------------------------------------------------------------
# The `350m` preset's depth (24 blocks, so as many parameter tensors, hooks and kernel
# launches per step) at a width where the arithmetic costs next to nothing: what is
# left of a step is per-tensor and per-op host work -- the engine's overhead.
OVERHEAD_MODEL = dict(preset="350m-depth", dim=64, n_layers=24, n_heads=4, ffn_hidden=128, vocab_size=512,
                      max_seq_len=256)
OVERHEAD_SHAPE = dict(rows=2, seq_len=128)


class HostSyncCounter:
    """Counts aten ops and host syncs while active (a ``TorchDispatchMode`` plus wrappers).

    A *host sync* is a read of device data by Python: ``.item()``/``float()``/``bool()``
    (``aten._local_scalar_dense``), ``.tolist()``, ``.numpy()``, ``.cpu()``,
    and ops whose output size depends on values (``nonzero``, boolean indexing,
    ``masked_select``, ``unique``...).  On a CPU every tensor lives in host memory, so
    "device" is decided by provenance: parameters, gradients and optimizer state, and
    every tensor an op computes from them, are device tensors; tensors the loader made
    and what is computed from those alone are host tensors (on a GPU they stay in host
    memory: reading them costs nothing).  Ops with no tensor input (factories) make host
    tensors until a device tensor is written into them."""

    VALUE_SIZED = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount",
                   "repeat_interleave", "_local_scalar_dense", "argwhere"}

    def __init__(self, device_tensors):
        import collections

        self.ops = 0
        self.syncs = collections.Counter()
        self._ids: set[int] = set()
        self._keep: list = []  # keeps counted tensors alive so their ids are not reused
        for t in device_tensors:
            self._mark(t)

    def _mark(self, t) -> None:
        import torch

        if isinstance(t, torch.Tensor):
            self._ids.add(id(t))
            self._keep.append(t)

    def is_device(self, t) -> bool:
        return id(t) in self._ids or (getattr(t, "_base", None) is not None and id(t._base) in self._ids)

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                counter.ops += 1
                flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                dev = any(counter.is_device(a) for a in flat)
                name = func.overloadpacket.__name__
                if dev and name in counter.VALUE_SIZED:
                    counter.syncs["item" if name == "_local_scalar_dense" else name] += 1
                if dev and name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                   for i in (args[1] or [])):
                    counter.syncs["index(bool)"] += 1
                out = func(*args, **kwargs)
                if dev:
                    for o in tree_flatten(out)[0]:
                        counter._mark(o)
                return out

        def wrap(name):
            orig = getattr(torch.Tensor, name)

            def method(t, *a, **k):
                if counter.is_device(t):
                    counter.syncs[name] += 1
                return orig(t, *a, **k)

            return name, orig, method

        # ``.to(device)`` is not counted: on a CPU a copy to the host cannot be told from a copy
        # to the same device (``clip_grad_norm_`` moves every norm "to the first device").
        self._patches = [wrap("tolist"), wrap("numpy"), wrap("cpu")]
        for name, _, method in self._patches:
            setattr(torch.Tensor, name, method)
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self._mode.__exit__(*exc)
        for name, orig, _ in self._patches:
            setattr(torch.Tensor, name, orig)
        self._keep.clear()
        return False

    @property
    def total(self) -> int:
        return sum(self.syncs.values())


class _InsideModel:
    """Seconds a step spends inside the model's own ``forward`` and inside autograd's
    ``backward``: the model's work, whoever calls it (DeepSpeed's wrappers stay outside)."""

    def __init__(self):
        self.seconds = 0.0
        self._depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self._depth -= 1
        return timed

    @contextlib.contextmanager
    def timing_backward(self):
        import torch

        orig = torch.autograd.backward  # Tensor.backward calls it by attribute: DeepSpeed's too
        torch.autograd.backward = self.wrap(orig)
        try:
            yield
        finally:
            torch.autograd.backward = orig


def _device_tensors(model, optimizer) -> list:
    """Parameters (ZeRO 3: their partitions), gradients and optimizer state: device tensors."""
    out = []
    for p in model.parameters():
        out += [p, getattr(p, "ds_tensor", None), p.grad]
    for opt in (optimizer, getattr(optimizer, "optimizer", None)):
        if opt is None:
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                out += [p, p.grad]
        for state in opt.state.values():
            out += [v for v in state.values()]
    return [t for t in out if t is not None]


def _overhead_worker(spec: dict, out: str) -> None:
    """One process, one rank: every ZeRO stage's engine, the plain loop and forward+backward,
    their steps interleaved so that they share whatever load the machine has."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(spec["port"]), DS_ACCELERATOR="cpu")
    import logging

    import torch

    torch.set_num_threads(spec["threads"])
    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.train.distributed import init_deepspeed_comm
    from m6rec.train.step import build_engine, prepare_inputs

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_deepspeed_comm("gloo")
    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    batch = _batch(margs.vocab_size, B, T, seed=0)
    batch["sample_keys"] = [f"row{i}" for i in range(B)]
    cpu = torch.device("cpu")
    results = []
    for stage in STAGES:
        cfg = bench_config(stage, T, B, lr=1e-4)
        torch.manual_seed(0)
        model = build_model(margs)
        engine, opt, runner, ds_config = build_engine(cfg, model, 1, cpu)
        torch.manual_seed(0)
        plain = build_model(margs)
        plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        prev = [None]

        def engine_step(i):
            # as the trainer runs it on a step that does not log: queue this step, read the previous one
            queued = runner.run(i, 1e-4, [batch])
            if prev[0] is not None:
                prev[0].values()
            prev[0] = queued

        def plain_step(i):
            inputs, _ = prepare_inputs(plain, batch, cpu)
            plain(**inputs).loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0, foreach=True)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def fwd_bwd(model):
            def run(i):
                inputs, _ = prepare_inputs(model, batch, cpu)
                model(**inputs).loss.backward()
                for p in model.parameters():
                    p.grad = None
            return run

        # Forward + backward alone, of each loop's own model object (the engine's: engine.module
        # called directly).  The overheads themselves are taken inside each step (below).
        kinds = {"engine": engine_step, "fwd_bwd": fwd_bwd(engine.module), "plain": plain_step,
                 "plain_fwd_bwd": fwd_bwd(plain)}
        times = {k: [] for k in kinds}
        over = {"engine": [], "plain": []}  # per step: its time minus the time inside the model's
        # forward and autograd's backward during it -- what the loop adds, free of the model's noise
        inside = _InsideModel()
        for m in (engine.module, plain):
            m.forward = inside.wrap(m.forward)
        order = list(kinds)
        gc.disable()  # as timeit does: a collection would land in whichever step allocated last
        try:
            with inside.timing_backward():
                for i in range(spec["warmup"] + spec["steps"]):
                    order = order[1:] + order[:1]  # each kind takes each place in the round in turn
                    for k in order:
                        inside.seconds = 0.0
                        t = time.perf_counter()
                        kinds[k](i)
                        dt = time.perf_counter() - t
                        if i >= spec["warmup"]:
                            times[k].append(dt)
                            if k in over:
                                over[k].append(dt - inside.seconds)
                    gc.collect()
        finally:
            gc.enable()
            for m in (engine.module, plain):
                del m.forward
        counts = {}
        for k, fn, m, o in (("engine", engine_step, engine.module, engine.optimizer),
                            ("plain", plain_step, plain, plain_opt)):
            # the engine's step reads the previous step's vector: a device tensor like the rest
            extra = [prev[0].host] if k == "engine" else []
            with HostSyncCounter(_device_tensors(m, o) + extra) as c:
                fn(spec["warmup"] + spec["steps"])
            counts[k] = dict(ops=c.ops, syncs=dict(c.syncs), total=c.total)
        # bf16 (what GPUs train in): the same count, on its own engine; one step, so the CPU's slow
        # bf16 kernels cost little
        bcfg = bench_config(stage, T, B, lr=1e-4, precision="bf16")
        torch.manual_seed(0)
        bmodel = build_model(margs)
        bengine, bopt, brunner, _ = build_engine(bcfg, bmodel, 1, cpu)
        bprev = brunner.run(0, 1e-4, [batch])
        with HostSyncCounter(_device_tensors(bengine.module, bengine.optimizer) + [bprev.host]) as c:
            brunner.run(1, 1e-4, [batch])
            bprev.values()
        counts["engine_bf16"] = dict(ops=c.ops, syncs=dict(c.syncs), total=c.total)
        del bengine, bopt, bmodel, brunner, bprev
        med = {k: statistics.median(v) for k, v in times.items()}
        engine_over, plain_over = statistics.median(over["engine"]), statistics.median(over["plain"])
        results.append(dict(
            stage=stage, ran_as_stage=engine.zero_optimization_stage(),
            engine_ms=1e3 * med["engine"], plain_ms=1e3 * med["plain"], fwd_bwd_ms=1e3 * med["fwd_bwd"],
            engine_overhead_ms=1e3 * engine_over, plain_overhead_ms=1e3 * plain_over,
            overhead_ratio=engine_over / plain_over if plain_over > 0 else float("inf"),
            engine_vs_plain=med["engine"] / med["plain"],
            host_syncs_per_step=counts["engine"]["total"], host_syncs_by_kind=counts["engine"]["syncs"],
            host_syncs_per_step_bf16=counts["engine_bf16"]["total"], aten_ops_per_step_bf16=counts["engine_bf16"]["ops"],
            aten_ops_per_step=counts["engine"]["ops"], plain_host_syncs_per_step=counts["plain"]["total"],
            plain_aten_ops_per_step=counts["plain"]["ops"], clips_on_device=ds_config["gradient_clipping"] == 0,
            times_ms={k: [1e3 * x for x in v] for k, v in times.items()}))
        del engine, opt, model, plain, plain_opt, runner
        prev[0] = None
        gc.collect()
    Path(out).write_text(json.dumps(results))
    import torch.distributed as dist

    dist.destroy_process_group()


def bench_overhead(warmup: int = 8, steps: int = 30, threads: int = 1) -> dict[str, Any]:
    """The overhead table: per ZeRO stage, engine vs plain loop vs forward+backward (ms, median);
    ``overhead_ratio`` = median over steps of (engine step - time inside the model's forward and
    backward during it) / the same for the plain loop; aten ops and host syncs per step."""
    import torch.multiprocessing as mp

    from m6rec.model.args import ModelArgs
    from m6rec.train.distributed import free_port

    margs = ModelArgs(**OVERHEAD_MODEL)
    spec = dict(model_args=margs.to_dict(), seq_len=OVERHEAD_SHAPE["seq_len"], rows=OVERHEAD_SHAPE["rows"],
                warmup=warmup, steps=steps, threads=threads, port=free_port())
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.perf_counter()
    mp.start_processes(_overhead_entry, args=(spec, out), nprocs=1, start_method="spawn")
    rows = json.loads(Path(out).read_text())
    os.unlink(out)
    return dict(model_args=margs.to_dict(), seq_len=spec["seq_len"], rows_per_step=spec["rows"], warmup_steps=warmup,
                timed_steps=steps, threads=threads, results=rows, table=format_overhead_table(rows),
                wall_s=time.perf_counter() - t0)


def _overhead_entry(_index: int, spec: dict, out: str) -> None:
    _overhead_worker(spec, out)


def format_overhead_table(rows: list[dict]) -> list[str]:
    out = ["| ZeRO | engine ms | plain loop ms | fwd+bwd ms | engine overhead ms | plain overhead ms | "
           "overhead_ratio | host syncs / step (engine; plain) | aten ops / step (engine; plain) | "
           "engine in bf16: host syncs; aten ops |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["host_syncs_by_kind"].items()))
        stage = f"{r['stage']}" + (f" (runs as {r['ran_as_stage']})" if r["ran_as_stage"] != r["stage"] else "")
        out.append(f"| {stage} | {r['engine_ms']:.1f} | {r['plain_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                   f"{r['engine_overhead_ms']:.1f} | {r['plain_overhead_ms']:.1f} | {r['overhead_ratio']:.2f} | "
                   f"{r['host_syncs_per_step']}{' (' + kinds + ')' if kinds else ''}; {r['plain_host_syncs_per_step']} | "
                   f"{r['aten_ops_per_step']}; {r['plain_aten_ops_per_step']} | "
                   f"{r['host_syncs_per_step_bf16']}; {r['aten_ops_per_step_bf16']} |")
    return out
