"""``m6rec bench train --only overhead``: the engine's step against a plain PyTorch loop at negligible
compute, per ZeRO stage on one rank -- what the engine adds to a step, and the host syncs and aten ops
it runs (counted by :class:`HostSyncCounter`)."""
from __future__ import annotations

import collections
import contextlib
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from m6rec.bench.common import (
    STAGES,
    bench_config,
    format_table,
    init_rank,
    run_ranks,
    synthetic_batch,
)
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.train.step import build_engine, prepare_inputs

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
        self.ops = 0
        self.syncs = collections.Counter()
        self._ids: set[int] = set()
        self._keep: list = []  # keeps counted tensors alive so their ids are not reused
        for t in device_tensors:
            self._mark(t)

    def _mark(self, t) -> None:
        if isinstance(t, torch.Tensor):
            self._ids.add(id(t))
            self._keep.append(t)

    def is_device(self, t) -> bool:
        return id(t) in self._ids or (getattr(t, "_base", None) is not None and id(t._base) in self._ids)

    def __enter__(self):
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
        orig = torch.autograd.backward  # Tensor.backward calls it by attribute: DeepSpeed's too
        torch.autograd.backward = self.wrap(orig)
        try:
            yield
        finally:
            torch.autograd.backward = orig


def device_tensors(model, optimizer) -> list:
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


def _overhead_worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One process, one rank: every ZeRO stage's engine, the plain loop and forward+backward,
    their steps interleaved so that they share whatever load the machine has."""
    init_rank(rank, world, port, spec["threads"])
    margs = ModelArgs.from_dict(spec["model_args"])
    T, B = spec["seq_len"], spec["rows"]
    batch = synthetic_batch(margs.vocab_size, B, T, seed=0)
    batch["sample_keys"] = [f"row{i}" for i in range(B)]
    cpu = torch.device("cpu")
    results = []
    for stage in spec["stages"]:
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
            plain(inputs).loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0, foreach=True)
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

        def fwd_bwd(model):
            def run(i):
                inputs, _ = prepare_inputs(model, batch, cpu)
                model(inputs).loss.backward()
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
            with HostSyncCounter(device_tensors(m, o) + extra) as c:
                fn(spec["warmup"] + spec["steps"])
            counts[k] = dict(ops=c.ops, syncs=dict(c.syncs), total=c.total)
        # bf16 (what GPUs train in): the same count, on its own engine; one step, so the CPU's slow
        # bf16 kernels cost little
        bcfg = bench_config(stage, T, B, lr=1e-4, precision="bf16")
        torch.manual_seed(0)
        bmodel = build_model(margs)
        bengine, bopt, brunner, _ = build_engine(bcfg, bmodel, 1, cpu)
        bprev = brunner.run(0, 1e-4, [batch])
        with HostSyncCounter(device_tensors(bengine.module, bengine.optimizer) + [bprev.host]) as c:
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
    dist.destroy_process_group()


def bench_overhead(warmup: int = 8, steps: int = 30, threads: int = 1, stages: tuple = STAGES) -> dict[str, Any]:
    """The overhead table: per ZeRO stage, engine vs plain loop vs forward+backward (ms, median);
    ``overhead_ratio`` = median over steps of (engine step - time inside the model's forward and
    backward during it) / the same for the plain loop; aten ops and host syncs per step."""
    margs = ModelArgs(**OVERHEAD_MODEL)
    spec = dict(model_args=margs.to_dict(), seq_len=OVERHEAD_SHAPE["seq_len"], rows=OVERHEAD_SHAPE["rows"],
                warmup=warmup, steps=steps, threads=threads, stages=list(stages))
    t0 = time.perf_counter()
    rows = run_ranks(_overhead_worker, 1, spec)
    return dict(model_args=margs.to_dict(), seq_len=spec["seq_len"], rows_per_step=spec["rows"], warmup_steps=warmup,
                timed_steps=steps, threads=threads, results=rows, table=overhead_table(rows),
                wall_s=time.perf_counter() - t0)


def overhead_table(rows: list[dict]) -> list[str]:
    return format_table(
        ["ZeRO", "engine ms", "plain loop ms", "fwd+bwd ms", "engine overhead ms", "plain overhead ms",
         "overhead_ratio", "host syncs / step (engine; plain)", "aten ops / step (engine; plain)",
         "engine in bf16: host syncs; aten ops"],
        [[f"{r['stage']}" + (f" (runs as {r['ran_as_stage']})" if r["ran_as_stage"] != r["stage"] else ""),
          f"{r['engine_ms']:.1f}", f"{r['plain_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}", f"{r['engine_overhead_ms']:.1f}",
          f"{r['plain_overhead_ms']:.1f}", f"{r['overhead_ratio']:.2f}",
          f"{r['host_syncs_per_step']}{' (' + kinds + ')' if kinds else ''}; {r['plain_host_syncs_per_step']}",
          f"{r['aten_ops_per_step']}; {r['plain_aten_ops_per_step']}",
          f"{r['host_syncs_per_step_bf16']}; {r['aten_ops_per_step_bf16']}"]
         for r in rows for kinds in [", ".join(f"{k} {v}" for k, v in sorted(r["host_syncs_by_kind"].items()))]])
