"""The DeepSpeed JSON, rendered from the one config tree, and the ZeRO stage that runs.

``python -m m6rec.train.ds_config --config X`` prints the JSON of a preset.
"""
from __future__ import annotations

import json
from typing import Any

from m6rec.config import Config, ConfigError


def effective_zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage DeepSpeed is asked for: on one rank stages 1-3 partition nothing
    (the one rank holds every shard) and only add DeepSpeed's per-parameter gradient
    hooks, buckets and copies -- measured by ``m6rec bench train`` -- so without
    offload one rank runs as stage 0.  Checkpoints record the stage that ran."""
    z = cfg.deepspeed
    if world_size == 1 and z.zero_stage > 0 and not z.offload_optimizer:
        return 0
    return z.zero_stage


def clips_on_device(cfg: Config, world_size: int) -> bool:
    """Whether :class:`StepOnDevice` clips and measures the gradient norm itself: when
    DeepSpeed hands it whole gradients in one ``step`` (stage 0, no fp16 loss scaling).
    ZeRO 1/2 step one parameter group's partition at a time, so the global norm is
    not known there: DeepSpeed clips, StepOnDevice still skips on the device."""
    return (cfg.train.optimizer == "adamw" and effective_zero_stage(cfg, world_size) == 0
            and cfg.train.precision != "fp16")


def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool, *, optimizer_clips: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON of a config (``python -m m6rec.train.ds_config --config X`` prints it).

    The optimizer is not in it: the engine passes its own AdamW (see
    :func:`build_optimizer`) and sets the learning rate every step.

    ``optimizer_clips``: the optimizer clips and skips non-finite steps on the
    device itself (:class:`StepOnDevice`, ZeRO 0-2 with ``train.optimizer:
    adamw``), so DeepSpeed is asked for no gradient norm and no overflow
    check -- both read a value back to the host at every step.  What a single
    rank cannot use is not asked for either (no communication overlap, no
    buckets to fill), and DeepSpeed's throughput timer, which synchronises the
    device twice per step, is off (m6rec times its own steps)."""
    t, z, s = cfg.train, cfg.deepspeed, cfg.data.stream
    if z.offload_optimizer and not on_gpu:
        raise ConfigError("config key 'deepspeed.offload_optimizer': true needs GPUs "
                          "(without one the optimizer already lives on the CPU)")
    if z.offload_optimizer and z.zero_stage == 0:
        raise ConfigError("config key 'deepspeed.offload_optimizer': true needs deepspeed.zero_stage 1, 2 or 3")
    if t.precision == "fp16" and not on_gpu:
        raise ConfigError("config key 'train.precision': 'fp16' needs a GPU (CPU kernels lack fp16); "
                          "use 'bf16' or 'fp32' here")
    zero: dict[str, Any] = {
        "stage": effective_zero_stage(cfg, world_size),
        "overlap_comm": z.overlap_comm and world_size > 1,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    clip_here = optimizer_clips and clips_on_device(cfg, world_size)
    # bf16 without ZeRO: DeepSpeed's bf16 wrapper for stage 0 keeps an fp32 master copy per
    # parameter and checks each gradient for overflow with a host read (measured: one .item()
    # per parameter per step).  torch autocast over fp32 weights is the same 16 bytes per
    # parameter (fp32 weights and gradients + Adam) with none of that; DeepSpeed reduces the
    # Linear gradients in bf16 under it.
    autocast = t.precision == "bf16" and effective_zero_stage(cfg, world_size) == 0
    out = {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": s.batch_size * t.grad_accum * world_size,
        "gradient_clipping": 0.0 if clip_here else t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (see StepOnDevice)
        "bf16": {"enabled": t.precision == "bf16" and not autocast, "check_grad_overflow": not clip_here},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "steps_per_print": 1 << 30,  # m6rec logs its own metrics
        "wall_clock_breakdown": False,
    }
    if autocast:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if z.offload_optimizer and t.optimizer == "adamw":
        out["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the offloaded state, no JIT build
    return out


if __name__ == "__main__":  # print the rendered DeepSpeed JSON of a config
    import argparse

    from m6rec.config import load_config

    p = argparse.ArgumentParser(description="print the DeepSpeed config m6rec renders from a YAML preset")
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--gpu", action="store_true", help="render as on GPUs (offload and fp16 allowed)")
    a, rest = p.parse_known_args()
    c = load_config(a.config, rest)
    print(json.dumps(deepspeed_config(c, a.world_size, a.gpu, optimizer_clips=clips_on_device(c, a.world_size)),
                     indent=2))
