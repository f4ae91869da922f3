"""The optimizer side of a step: LR schedule, parameter groups, AdamW that clips and skips on the device."""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Optional, Sequence

import torch

from m6rec.config import Config, ConfigError

log = logging.getLogger("m6rec.train")


def warmup_cosine(step: int, lr: float, warmup_steps: int, steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr`` over
    ``warmup_steps``, cosine decay to ``min_lr`` at ``steps``.  A pure function of the step,
    so a resumed run needs no scheduler state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(cfg: Config, step: int) -> float:
    """Pretraining's learning rate at ``step``: :func:`warmup_cosine` of train.lr, train.warmup_steps,
    train.steps and train.min_lr."""
    t = cfg.train
    return warmup_cosine(step, t.lr, t.warmup_steps, t.steps, t.min_lr)


def skippable(cls: type) -> type:
    """``cls`` (an optimizer class) whose ``step`` does nothing while ``skip_update`` is set.

    DeepSpeed calls the wrapped optimizer's ``step`` at the accumulation
    boundary (ZeRO 3 once per sub-group); with the flag set no parameter and
    no optimizer state moves.  A subclass, so DeepSpeed's isinstance checks
    (FusedAdam, DeepSpeedCPUAdam) still hold.  This host flag is how the
    DeepSpeed JIT optimizers skip; torch's AdamW skips on the device
    (:class:`StepOnDevice`)."""

    class Skippable(cls):
        skip_update = False

        def step(self, *args, **kwargs):
            if self.skip_update:
                return None
            return super().step(*args, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = cls.__name__
    return Skippable


class StepOnDevice(skippable(torch.optim.AdamW)):
    """torch's fused AdamW that clips and skips without reading anything back to the host.

    DeepSpeed calls ``step`` with the gradients this rank steps: at stage 0 the
    whole (already averaged) gradients of every group at once.  Before the update:

    * the global gradient norm, from the whole gradients DeepSpeed hands it at
      stage 0 (a device scalar);
    * clipping to ``clip_norm`` by ``min(1, clip / (norm + 1e-6))``, a device scalar;
    * ``found_inf`` -- non-finite norm, or a non-finite ``shared_loss`` (the loss sum
      all-reduced by the trainer: some rank's loss was NaN/inf) -- which the fused kernel reads to leave every
      parameter, moment and step count untouched, as PyTorch's GradScaler uses it.

    ``grad_norm`` keeps the norm (a device tensor) for the log line.  ZeRO 1-3 step
    one group's partition (or sub-group) per call, so the global norm is not known
    here: DeepSpeed clips (``measure_norm`` and ``clip_norm`` off) and only
    ``shared_loss`` is applied."""

    clip_norm: float = 0.0
    measure_norm: bool = False
    shared_loss: Optional[torch.Tensor] = None  # the all-reduced loss sum (device), set by the trainer
    grad_norm: Optional[torch.Tensor] = None

    def step(self, closure=None):
        if self.skip_update:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = None if self.shared_loss is None else ~torch.isfinite(self.shared_loss)
        if grads and (self.clip_norm > 0 or self.measure_norm):
            norm = grad_norm(grads)
            self.grad_norm = norm
            norm_bad = ~torch.isfinite(norm)
            bad = norm_bad if bad is None else bad | norm_bad
            if self.clip_norm > 0:
                scale = (self.clip_norm / (norm + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        if bad is not None:  # the kernel wants it beside the parameters (the CPU with optimizer offload)
            dev = grads[0].device if grads else bad.device
            self.found_inf = bad.reshape(()).float().to(dev)
        try:
            return super().step(closure)
        finally:
            self.found_inf = None


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: Sequence[str] = ("embed",)) -> list[dict]:
    """The trainable parameters in two groups: ``weight_decay``, and none on norms and embeddings (1-D
    weights, and parameters whose name holds one of ``no_decay_names``: the token table; fine-tuning
    adds its option vectors).  Also the optimizer's parameter order of a checkpoint; under ZeRO 3 a
    parameter's own shape is empty once partitioned, its ``ds_shape`` is the real one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain = len(getattr(p, "ds_shape", p.shape)) < 2 or any(n in name for n in no_decay_names)
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cuda_arch_list_for_jit(capabilities: Optional[list[tuple[int, int]]] = None) -> Optional[tuple[str, str]]:
    """Make ``TORCH_CUDA_ARCH_LIST`` something DeepSpeed's JIT builder can parse.

    DeepSpeed 0.19 reads each entry as ``major.minor[+PTX]`` with integers, so a list
    holding an arch-specific entry such as ``9.0a`` (as some CUDA images carry for
    Hopper) dies with ``invalid literal for int() ... '0a'`` before compiling
    anything.  Without a parseable list, it is set from the visible devices' compute
    capabilities (``capabilities``: those, for tests).  Returns ``(old, new)`` when
    it was changed, else None."""
    current = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    entries = [e for e in re.split(r"[;\s]+", current) if e]
    if entries and all(re.fullmatch(r"\d+\.\d+(\+PTX)?", e) for e in entries):
        return None
    if capabilities is None:
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if not capabilities:
        return None
    value = ";".join(f"{a}.{b}" for a, b in sorted(set(capabilities)))
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    return current or "unset", value


def build_optimizer(cfg: Config, model: torch.nn.Module, on_gpu: bool) -> torch.optim.Optimizer:
    """The optimizer of ``train.optimizer``, built without a compiler by default.

    ``adamw`` (default): :class:`StepOnDevice`, torch's fused AdamW kernel (GPU and
    CPU alike; with optimizer offload it steps the CPU copy). ``fused_adam`` /
    ``cpu_adam``: DeepSpeed's JIT ops, built at first use with nvcc/ninja; the CUDA
    arch list is made parseable first (:func:`_cuda_arch_list_for_jit`).  All skip a
    step on request (:func:`skippable`)."""
    kw: dict[str, Any] = dict(lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)
    groups = param_groups(model, cfg.train.weight_decay)
    name = cfg.train.optimizer
    if name == "adamw":
        return StepOnDevice(groups, fused=True, **kw)
    if not on_gpu:
        raise ConfigError(f"config key 'train.optimizer': {name!r} is a DeepSpeed CUDA op; use 'adamw' without GPUs")
    if name == "cpu_adam" and not cfg.deepspeed.offload_optimizer:
        raise ConfigError("config key 'train.optimizer': 'cpu_adam' steps an offloaded optimizer; set "
                          "deepspeed.offload_optimizer: true, or use 'adamw' / 'fused_adam'")
    changed = _cuda_arch_list_for_jit()
    if changed:
        log.warning("train.optimizer=%s builds a DeepSpeed op: TORCH_CUDA_ARCH_LIST set to %r from the visible "
                    "GPUs (it was %r, which DeepSpeed's JIT builder cannot parse)", name, changed[1], changed[0])
    if name == "cpu_adam":
        # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls

        kw["adamw_mode"] = True
    else:
        # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
        from deepspeed.ops.adam import FusedAdam as cls

        kw["adam_w_mode"] = True
    return skippable(cls)(groups, **kw)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` as a device scalar (fp32), read nowhere."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())

