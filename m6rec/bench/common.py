"""What the benchmarks share: the machine's description, clocks and step timing, peak memory, the
Markdown table, the synthetic batch, the engine's config and shape, and benchmark rank processes.

The matmul peak every benchmark divides by is :func:`m6rec.train.peak.measure_matmul_peak`
(the trainer's MFU uses the same measurer).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m6rec.config import Config, load_config
from m6rec.model.args import ModelArgs
from m6rec.train.distributed import free_port, init_deepspeed_comm

STAGES = (0, 1, 2, 3)
QUICK_STAGES = (0, 2)  # `--quick`: one stage that partitions nothing, one that partitions gradients
MODEL_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


# ---------------------------------------------------------------------------
# The machine, clocks, timing, memory
# ---------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU model, torch threads and version, the CUDA device if any, the CPU's vector capability."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                cpu_capability=torch.backends.cpu.get_cpu_capability())


def clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    return time.perf_counter(), time.process_time()


def time_steps(step: Callable[[], None], warmup: int, steps: int, cuda: bool) -> float:
    """Seconds per step: ``warmup`` untimed (compiles), then ``steps`` between device syncs."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def rss_bytes() -> int:
    """This process's resident memory now (CUDA peaks: ``torch.cuda.max_memory_allocated``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines: the header, the ``|---|`` rule, one line a row."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


# ---------------------------------------------------------------------------
# Synthetic batches
# ---------------------------------------------------------------------------
def synthetic_batch(vocab: int, rows: int, seq_len: int, *, doc_len: int | None = None, seed: int = 0,
                    causal: bool = False) -> dict[str, torch.Tensor]:
    """``rows`` x ``seq_len`` random tokens (ids from 7: past the special tokens), on the CPU.

    Packed prefix rows (the default): documents of ``doc_len`` tokens (default half a row), each
    its first half context (bidirectional prefix, no loss) and its second half targets (labels:
    the next token, already shifted; the last context token predicts the first target).
    ``causal``: the same tokens as plain causal rows, every position predicting the next."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (rows, seq_len), generator=g)
    if causal:
        return dict(input_ids=ids, labels=torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], dim=1))
    doc_len = doc_len or seq_len // 2
    context = doc_len // 2
    pos = torch.arange(seq_len) % doc_len
    labels = torch.full((rows, seq_len), -100)
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    target = (pos >= context - 1) & (pos < doc_len - 1)
    labels[:, target] = nxt[:, target]
    return dict(input_ids=ids, labels=labels, position_ids=pos.expand(rows, seq_len).contiguous(),
                document_ids=(torch.arange(seq_len) // doc_len).expand(rows, seq_len).contiguous(),
                prefix_mask=(pos < context).expand(rows, seq_len).contiguous())


# ---------------------------------------------------------------------------
# The engine's config and shape; benchmark rank processes
# ---------------------------------------------------------------------------
def rank_step_times(step: Callable[[int], Any], warmup: int, steps: int) -> tuple[list[float], Any]:
    """In a benchmark rank: ``step(i)`` for ``warmup`` untimed then ``steps`` timed steps, each between
    two barriers (every rank starts and ends it together).  Returns the timed steps' seconds and what
    the last step returned."""
    times, out = [], None
    for i in range(warmup + steps):
        dist.barrier()
        t = time.perf_counter()
        out = step(i)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times, out


def bench_config(stage: int, seq_len: int, rows: int, **train) -> Config:
    """The config a benchmark engine is built from: ZeRO ``stage``, ``rows`` x ``seq_len`` per
    rank, gradient clipping at 1.0 (as the presets), ``train`` overrides."""
    return load_config(None, {"deepspeed": {"zero_stage": stage}, "data": {"stream": {"seq_len": seq_len,
                                                                                    "batch_size": rows}},
                              "train": {"grad_clip": 1.0, **train}})


def bench_shape(cfg: Config, args: Any) -> tuple[ModelArgs, int, int]:
    """(model args, seq_len, rows per rank) of the train benchmarks: ``--config``'s model and
    ``data.stream`` shape, else the ``small`` preset at 256 x 2 (``--quick``: ``tiny`` at 64 x 2)."""
    if getattr(args, "config", None):
        margs, T, B = ModelArgs.from_config(cfg), cfg.data.stream.seq_len, cfg.data.stream.batch_size
    else:
        preset, T, B = ("tiny", 64, 2) if getattr(args, "quick", False) else ("small", 256, 2)
        margs = ModelArgs.from_config(load_config(MODEL_PRESETS / f"{preset}.yaml"))
    margs = ModelArgs.from_dict({**margs.to_dict(), "max_seq_len": max(margs.max_seq_len, T), "compile": False,
                                 "init_from": None})
    return margs, T, B


def init_rank(rank: int, world: int, port: int, threads: int) -> None:
    """A benchmark worker process joins its gloo group (one rank of ``world`` on this machine)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_deepspeed_comm("gloo")


def run_ranks(worker: Callable[[int, int, int, dict, str], None], world: int, spec: dict) -> Any:
    """``worker(rank, world, port, spec, out)`` in ``world`` spawned processes; what it wrote to
    ``out`` (JSON, rank 0)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        mp.start_processes(worker, args=(world, free_port(), spec, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
