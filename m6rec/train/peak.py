"""The device's peak FLOP/s, from a datasheet or measured, and MFU: what the trainer's
``mfu_pct`` and the benchmarks divide by."""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import torch

# Dense (no sparsity) tensor-core peaks per GPU, FLOP/s.  bf16 values are the
# ones torchtitan assumes (torchtitan/tools/utils.py get_peak_flops); all are
# from NVIDIA's product datasheets, whose headline numbers are "with sparsity"
# and so twice these.  "fp32" is the plain CUDA-core peak, used when TF32 is
# off (PyTorch's default for matmuls).  The first entry whose substrings all
# occur in torch.cuda.get_device_name() wins, so specific names come first
# ("H100 PCIe" before "H100", "A100" before "A10").
KNOWN_PEAK_FLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("h100", "nvl"), dict(bf16=835e12, fp16=835e12, tf32=417.5e12, fp32=60e12)),
    (("h100", "pcie"), dict(bf16=756e12, fp16=756e12, tf32=378e12, fp32=51e12)),
    (("h100",), dict(bf16=989e12, fp16=989e12, tf32=494.5e12, fp32=67e12)),  # SXM: "H100 80GB HBM3"
    (("h200", "nvl"), dict(bf16=836e12, fp16=836e12, tf32=418e12, fp32=60e12)),
    (("h200",), dict(bf16=989e12, fp16=989e12, tf32=494.5e12, fp32=67e12)),  # SXM, and GH200
    (("a100",), dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
    (("a10",), dict(bf16=125e12, fp16=125e12, tf32=62.5e12, fp32=31.2e12)),  # A10 datasheet; A10G shares it
    (("l40s",), dict(bf16=362e12, fp16=362e12, tf32=183e12, fp32=91.6e12)),
    (("l4",), dict(bf16=121e12, fp16=121e12, tf32=60e12, fp32=30.3e12)),
    (("v100",), dict(fp16=125e12, fp32=15.7e12)),  # SXM2; no bf16 tensor cores
)

_measured_peaks: dict[tuple[str, str], float] = {}  # (device, dtype) -> FLOP/s, once per process


def measure_matmul_peak(dtype: Any = None, device: Any = "cpu", sizes: tuple[int, ...] = (1024, 2048),
                        seconds: float = 1.0, budget: Optional[float] = None) -> dict[str, Any]:
    """Best achieved FLOP/s of square matmuls in ``dtype`` on ``device``: the machine's practical peak.

    Each size gets two warm-up matmuls, then is timed for ``seconds`` (at least 3 matmuls).  With
    ``budget`` (seconds, all sizes together) a size is left out once its matmuls would not fit
    what is left of it.  ``flops`` is per wall-clock second; on CPU ``flops_per_cpu_s`` divides by
    the process's CPU time over the threads instead (what a busy, shared machine disturbs least;
    it equals ``flops`` on an idle one)."""
    dtype = dtype or torch.float32
    is_cuda = torch.device(device).type == "cuda"
    threads = 1 if is_cuda else torch.get_num_threads()
    deadline = time.perf_counter() + budget if budget is not None else math.inf
    best, best_cpu, per_size, rep_s, last_n = 0.0, 0.0, {}, 0.0, 0
    # its own generator: how many sizes fit the budget depends on the machine's load, and draws
    # from torch's global RNG would leave a run's random state depending on it too
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        if best and time.perf_counter() + 5 * (n / last_n) ** 3 * rep_s > deadline:  # 5 matmuls of this size
            break
        a = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        b = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
        for _ in range(2):  # warm-up: thread pool, kernel selection
            a @ b
        reps, t0 = 0, time.perf_counter()
        rates, cpu_rates = [], []
        while time.perf_counter() - t0 < seconds or reps < 3:
            w, c = time.perf_counter(), time.process_time()
            a @ b
            if is_cuda:
                torch.cuda.synchronize(device)
            w2, c2 = time.perf_counter(), time.process_time()
            rep_s = w2 - w
            rates.append(2 * n**3 / rep_s)
            cpu_rates.append(2 * n**3 / max((c2 - c) / threads, 1e-9))
            reps += 1
        per_size[str(n)], last_n = max(rates), n
        best, best_cpu = max(best, max(rates)), max(best_cpu, max(cpu_rates))
    return dict(flops=best, flops_per_cpu_s=best_cpu, per_size=per_size, dtype=str(dtype).removeprefix("torch."))


def measured_matmul_flops(dtype: Any = None, device: Any = "cpu", seconds: float = 1.0) -> float:
    """:func:`measure_matmul_peak`'s FLOP/s over 512, 1024 and 2048 within ``seconds``, measured
    once per process (device, dtype): where no datasheet applies (CPUs, unknown accelerators)."""

    dtype = dtype or torch.float32
    key = (str(device), str(dtype))
    if key not in _measured_peaks:
        _measured_peaks[key] = measure_matmul_peak(dtype, device, sizes=(512, 1024, 2048), seconds=seconds / 3,
                                                   budget=seconds)["flops"]
    return _measured_peaks[key]


def _matmul_precision_name(precision: str) -> str:
    """Which tensor-core mode a ``train.precision`` runs its matmuls in on CUDA."""
    if precision != "fp32":
        return precision

    # PyTorch runs fp32 matmuls in TF32 only when allowed: precision "high" or
    # "medium" (torch.set_float32_matmul_precision); the default "highest" is fp32.
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(
    precision: str,
    device: Any,
    configured: Optional[float] = None,
    measure: Callable[..., float] = measured_matmul_flops,
) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, and where the number came from.

    Order: ``configured`` (train.peak_flops) > :data:`KNOWN_PEAK_FLOPS` for a
    known CUDA GPU > ``measure(dtype, device)`` (a short matmul measurement,
    the only honest number for CPUs and unlisted devices).
    """

    if configured:
        return float(configured), "configured (train.peak_flops)"
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        mode = _matmul_precision_name(precision)
        for patterns, peaks in KNOWN_PEAK_FLOPS:
            if all(p in name.lower() for p in patterns) and mode in peaks:
                return peaks[mode], f"datasheet {mode} peak of {name} (KNOWN_PEAK_FLOPS)"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    return float(measure(dtype, dev)), f"measured {dtype_name} matmul peak on {label}"


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization as a fraction: achieved model FLOP/s over the peak."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return tokens_per_s_per_device * flops_per_token / peak
