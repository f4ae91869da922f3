"""``m6rec bench train``: ZeRO 0/1/2/3 at 1 and 2 ranks, side by side, on this machine; with the
checkpoint cost (:mod:`m6rec.bench.checkpoint`) and the engine overhead (:mod:`m6rec.bench.overhead`)
beside it (``--only`` picks one part, ``--quick`` shortens every part).

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
``--quick``: ZeRO stages 0 and 2, 1 warm-up + 2 timed steps, the ``tiny`` preset
at 64 x 2 unless ``--config`` (what CI runs).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from m6rec.bench.checkpoint import bench_checkpoint
from m6rec.bench.common import (
    QUICK_STAGES,
    STAGES,
    bench_config,
    bench_shape,
    format_table,
    init_rank,
    rank_step_times,
    rss_bytes,
    run_ranks,
    synthetic_batch,
)
from m6rec.bench.overhead import bench_overhead
from m6rec.config import ConfigError
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.info import flops_per_token
from m6rec.train.ds_config import deepspeed_config
from m6rec.train.optim import build_optimizer
from m6rec.train.peak import measured_matmul_flops

WORLDS = (1, 2)


def bench_train(cfg: Any, args: Any) -> dict[str, Any]:
    """Every part: ZeRO scaling at 1 and 2 ranks, the checkpoint cost and the engine overhead
    (``--only`` picks one, ``--quick`` shortens them)."""
    only, quick = getattr(args, "only", None), getattr(args, "quick", False)
    if only not in (None, "scaling", "overhead", "checkpoint"):
        raise ConfigError(f"bench train --only: {only!r}; allowed: scaling, overhead, checkpoint")
    out: dict[str, Any] = {"bench": "train"}
    if only in (None, "scaling"):
        out.update(bench_scaling(cfg, args))
    if only in (None, "checkpoint"):
        out["checkpoint"] = (bench_checkpoint(cfg, args, steps=2, saves=1, stages=QUICK_STAGES) if quick
                             else bench_checkpoint(cfg, args))
        print("\n".join(["checkpoint cost (per ZeRO stage, 2 ranks):", *out["checkpoint"]["table"]]))
    if only in (None, "overhead"):
        out["overhead"] = bench_overhead(warmup=1, steps=2, stages=QUICK_STAGES) if quick else bench_overhead()
        print("\n".join(["engine overhead (350m depth, tiny width; per ZeRO stage, one rank):",
                          *out["overhead"]["table"]]))
    if only in (None, "scaling"):
        print("\n".join(["ZeRO scaling:", *out["table"]]))
    return out


def _optimizer_bytes(opt, stage: int) -> tuple[int, int]:
    """(Adam moment bytes, fp32 master bytes) this rank's optimizer holds."""
    adam = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if hasattr(v, "numel") and v.ndim > 0)
    # Under ZeRO the optimizer's state is keyed by the fp32 master partitions it steps.
    master = 0 if stage == 0 else sum(p.numel() * p.element_size() for p in opt.state)
    return adam, master


def _worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    init_rank(rank, world, port, spec["threads"])
    import deepspeed  # heavy: DeepSpeed, only in the rank processes

    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    peak = measured_matmul_flops(torch.float32, "cpu", seconds=1.0) if world == 1 else None
    results = []
    for stage in spec["stages"]:
        cfg = bench_config(stage, T, B, lr=1e-4)
        torch.manual_seed(0)
        model = build_model(margs)
        n_params = model.num_params()
        opt = build_optimizer(cfg, model, on_gpu=False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world, False))
        batch = synthetic_batch(margs.vocab_size, B, T, seed=rank)

        def step(i, engine=engine, batch=batch):
            loss = engine(Batch.of(batch)).loss
            engine.backward(loss)
            engine.step()
            float(loss)
            return loss

        times, loss = rank_step_times(step, spec["warmup"], spec["steps"])
        adam, master = _optimizer_bytes(opt, stage)
        mine = dict(adam=adam, master=master, rss=rss_bytes(), times=times, loss=float(loss))
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


def bench_scaling(cfg: Any, args: Any) -> dict[str, Any]:
    """The scaling table: every ZeRO stage at each of :data:`WORLDS` ranks."""
    t0 = time.perf_counter()
    margs, T, B = bench_shape(cfg, args)
    quick = getattr(args, "quick", False)
    spec = dict(model_args=margs.to_dict(), seq_len=T, rows=B, warmup=1 if quick else 2, steps=2 if quick else 6,
                threads=1, stages=list(QUICK_STAGES if quick else STAGES))
    load_start = os.getloadavg()
    rows, peak = [], None
    for world in WORLDS:
        got = run_ranks(_worker, world, spec)
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
                results=rows, table=scaling_table(rows), wall_s=time.perf_counter() - t0)


def scaling_table(rows: list[dict]) -> list[str]:
    """The Markdown table of docs/training.md."""
    return format_table(
        ["ZeRO", "ranks", "step s (best / median)", "tokens/s", "MFU %", "scaling eff.", "Adam state / rank (MiB)",
         "theory 8P/N (MiB)", "fp32 master / rank (MiB)"],
        [[r["stage"], r["world"], f"{r['step_s']:.2f} / {r['step_s_median']:.2f}", f"{r['tokens_per_s']:.0f}",
          f"{r.get('mfu_pct', 0):.1f}",
          f"{100 * r['scaling_efficiency']:.0f} %" if "scaling_efficiency" in r else "",
          f"{max(r['adam_state_bytes_per_rank']) / 2**20:.1f}", f"{r['theoretical_adam_state_bytes'] / 2**20:.1f}",
          f"{max(r['fp32_master_bytes_per_rank']) / 2**20:.1f}"]
         for r in sorted(rows, key=lambda r: (r["stage"], r["world"]))])
