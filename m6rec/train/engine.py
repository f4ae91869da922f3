"""The training loop: DeepSpeed ZeRO engine, streaming shards, atomic checkpoints, metrics.

One entry, :func:`train`, runs unchanged under the ``deepspeed`` launcher,
``torchrun``, ``accelerate launch``, ``srun`` and as a single plain process
(:func:`init_distributed` reads whichever environment is there).

The loop, per optimizer step (:class:`TrainStep`)::

    lr = schedule(step)                        a pure function of the step: nothing to save
    for each micro-batch:  prepare_inputs (labels, label positions, counts, mask spans from the
                           loader's CPU copy) -> forward -> backward (-> engine.step() between)
    one all-reduce of one vector: loss sum, tokens, signal (SIGTERM/SIGUSR1/RUN_DIR/STOP),
                           time to save, data counters -- every rank takes the same branches
    engine.step()          the boundary: the optimizer skips a non-finite update on the device
    read the PREVIOUS step's vector (the step's one host sync; log/save/stop steps also read this one)
    every log_every:       one metrics line (console, JSONL, W&B)
    every eval_every:      validation loss (and train.select_by's ranking metric)
    every save_every, save_every_minutes, on a stop, at the end: checkpoint

Decisions every rank must share are taken together through that one
all-reduce, so no rank can wait in a collective the others never enter.

A non-finite loss on any rank skips the whole optimizer step on every rank:
each micro-batch still runs forward and backward (DeepSpeed's accumulation
and ZeRO's gradient hooks stay in lockstep), and the optimizer leaves every
weight, moment and step count untouched (:class:`StepOnDevice` on the device;
:func:`skippable` with a host flag for DeepSpeed's JIT optimizers); ZeRO 1-3
also see the non-finite gradient norm and skip on their own.  No checkpoint
is written while the latest step was non-finite, and after
``train.max_nonfinite`` in a row the run stops with :class:`NonFiniteLossError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from m6rec.config import Config, ConfigError, save_config, to_dict
from m6rec.train import checkpoint as ckpt

log = logging.getLogger("m6rec.train")

STOP_FILE = "STOP"  # RUN_DIR/STOP: finish the step, checkpoint, exit 0 (slurm/train.sbatch touches it)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite at train.max_nonfinite consecutive steps."""


# ---------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from whatever launched us.

    deepspeed, torchrun and accelerate set them; ``srun`` sets SLURM_* (the
    sbatch script exports MASTER_ADDR/MASTER_PORT); a plain process gets a
    world of one on a free local port."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            raise ConfigError("started by srun without MASTER_ADDR: export MASTER_ADDR (the first node) "
                              "and MASTER_PORT in the sbatch script (see slurm/train.sbatch)")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(_free_port()) if env["WORLD_SIZE"] == "1" else "29500"
    return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def local_world_size() -> int:
    """Ranks on this machine: torchrun, deepspeed, Slurm, else (one machine assumed) the world."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    if per_node[:1].isdigit():  # "2(x3)" or "2,1"
        return int(per_node.split("(")[0].split(",")[0])
    return int(env.get("WORLD_SIZE", "1"))


#: DeepSpeed's CPU all-reduce buffer in /dev/shm, one per rank (ops/csrc/cpu/comm/shm.cpp)
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU backend puts this rank's all-reduce buffer (named by uid,
    MASTER_ADDR, MASTER_PORT and rank, as read from the environment at init)."""
    env = os.environ
    return Path("/dev/shm") / (f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def unlink_shm_buffer() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer, once every rank has mapped it.

    On CPU, ``deepspeed.init_distributed`` builds its shm op and, when all ranks share one
    machine (``LOCAL_SIZE`` = world size, as the ``deepspeed`` launcher sets it), each rank
    creates a 69 MB file in /dev/shm and maps every rank's file -- and nothing ever unlinks
    them.  /dev/shm is memory: every such run leaked world x 69 MB until the machine ran out
    (19 GB over a few days of tests here).  The barrier makes sure every rank has finished
    mapping the others' files; after it the names can go, the mappings stay valid until
    exit, and the kernel frees the memory when the last rank exits, however it exits.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:  # one rank (LOCAL_SIZE=1) maps only its own: nothing to wait for
        dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


def stale_shm_buffers() -> list[Path]:
    """This user's DeepSpeed CPU all-reduce buffers in /dev/shm that no live process maps:
    what runs without :func:`unlink_shm_buffer` (older m6rec, other DeepSpeed programs) left."""
    files = sorted(Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*"))
    if not files:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):  # a process that exits while we read, or not ours
            mapped.update(line.split(None, 5)[5].removesuffix(" (deleted)").strip()
                          for line in maps.read_text().splitlines() if "/dev/shm/" in line)
    return [f for f in files if str(f) not in mapped]


def torch_extensions_root() -> Path:
    """Where torch builds JIT extensions (DeepSpeed's ops among them): ``TORCH_EXTENSIONS_DIR`` or
    torch's default (``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def stale_build_locks() -> list[Path]:
    """JIT build locks that no process on this machine holds: ``<root>/<op>/lock`` under
    ``TORCH_EXTENSIONS_DIR``, ``<root>/<python>_<device>/<op>/lock`` under torch's default root.

    torch takes the lock by creating the file and keeps it open until the build ends, then removes
    it; every other process that needs the op waits -- with no message and no timeout -- for the file
    to go.  A build killed mid-way (Ctrl-C, ``scancel``, a test timeout) leaves the file behind, and
    from then on every run that needs the op hangs at start-up (DeepSpeed builds its CPU
    communication op, ``deepspeed_shm_comm``, in ``init_distributed``).  A lock no live process has
    open is such a leftover -- on this machine: a build on another node of a shared home directory
    is invisible here.  Only this user's locks are judged (another user's processes cannot be
    seen), and only those unheld in two scans apart: torch closes the file before removing it."""
    root = torch_extensions_root()

    def unheld(locks: list[Path]) -> list[Path]:
        held = set()
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            with contextlib.suppress(OSError):  # a process that exits while we read
                for fd in fd_dir.iterdir():
                    with contextlib.suppress(OSError):
                        held.add(os.readlink(fd))
        out = []
        for f in locks:
            with contextlib.suppress(FileNotFoundError):  # gone: the build ended
                if f.stat().st_uid == os.getuid() and str(f.resolve()) not in held:
                    out.append(f)
        return out

    stale = unheld(sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}))
    if stale:
        time.sleep(0.2)
        stale = unheld(stale)
    return stale


def warn_stale_build_locks() -> list[Path]:
    """Say on the console, before DeepSpeed waits on them forever, which build locks are stale."""
    stale = stale_build_locks()
    for f in stale:
        print(f"m6rec: WARNING: {f} was left by a killed JIT build and no process on this machine holds it; "
              f"DeepSpeed waits for it to go before building {f.parent.name}, with no timeout. `m6rec clean-shm` "
              "removes it (with a home directory shared between machines, first make sure none of them is "
              "building).", file=sys.stderr, flush=True)
    return stale


#: DeepSpeed's JIT-built op for all-reduce between CPU ranks of one machine (ops/op_builder/cpu/comm.py)
SHM_COMM_OP = "deepspeed_shm_comm"


def cpu_comm_op_off_reason(env=None) -> Optional[str]:
    """Why DeepSpeed's CPU backend should not build :data:`SHM_COMM_OP` for this run, or None.

    ``deepspeed.init_distributed`` on the CPU accelerator JIT-compiles that op (a C++ compiler with
    OpenMP; 30-60 s on the first launch of a machine).  It only speeds up the all-reduce between
    ranks of one machine, so:

    * one rank has nothing to reduce: the first launch neither needs a compiler nor waits for one;
    * without a C++ compiler the build failed and took ``init_distributed`` down with it, even for
      the README's first command; gloo's own all-reduce does the work instead.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return "one rank"
    cxx = env.get("CXX") or "c++"  # what torch's extension build calls
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    return None


def prepare_cpu_comm(say: bool) -> None:
    """Before ``deepspeed.init_distributed`` on the CPU: turn :data:`SHM_COMM_OP` off where
    :func:`cpu_comm_op_off_reason` says so (DeepSpeed skips an op its compatibility table marks
    off); ``say``: the one process per machine that tells the console."""
    why = cpu_comm_op_off_reason()
    if why is None:
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if say and why != "one rank":
        print(f"m6rec: {why}: DeepSpeed's shared-memory all-reduce for CPU ranks is not built; gloo does the "
              "all-reduce (slower between ranks of one machine; install g++ to have it)", file=sys.stderr, flush=True)


def init_deepspeed_comm(backend: str) -> None:
    """``deepspeed.init_distributed`` with what every m6rec process does around it: the stale build
    locks named first (one process per machine), on the CPU (gloo) the shm op decided
    (:func:`prepare_cpu_comm`) before and the /dev/shm names unlinked after (:func:`unlink_shm_buffer`)."""
    import deepspeed

    first_on_machine = os.environ.get("LOCAL_RANK", "0") == "0"
    if first_on_machine:  # on the CPU the init may build an op
        warn_stale_build_locks()
    on_cpu = backend == "gloo"
    if on_cpu:
        prepare_cpu_comm(say=first_on_machine)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if on_cpu:
        unlink_shm_buffer()


def clean_shm_main(cfg: Config, args) -> int:
    """`m6rec clean-shm`: remove :func:`stale_shm_buffers` and :func:`stale_build_locks`
    (``--dry-run``: only list them)."""
    stale = stale_shm_buffers()
    total = 0
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            total += f.stat().st_size
            if not args.dry_run:
                f.unlink()
    verb = "would remove" if args.dry_run else "removed"
    print(f"m6rec clean-shm: {verb} {len(stale)} stale DeepSpeed buffer(s) in /dev/shm, {total / 2**20:.0f} MiB")
    locks = stale_build_locks()
    for f in locks:
        print(f"m6rec clean-shm: {verb} stale JIT build lock {f}")
        if not args.dry_run:
            f.unlink(missing_ok=True)
    return 0


def init_distributed() -> tuple[int, int, torch.device]:
    launcher_env()
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))
    if not dist.is_initialized():
        init_deepspeed_comm("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# ---------------------------------------------------------------------------
# DeepSpeed configuration: rendered from the one config tree
# ---------------------------------------------------------------------------
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
    """The DeepSpeed JSON of a config (``python -m m6rec.train.engine --config X`` prints it).

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


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to
    train.lr, cosine decay to train.min_lr at train.steps.  A pure function of
    the step, so a resumed run needs no scheduler state."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (1-D weights and the token table).  Also the
    optimizer's parameter order of a checkpoint; under ZeRO 3 a parameter's own shape is
    empty once partitioned, its ``ds_shape`` is the real one."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 or "embed" in name else decay).append(p)
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
    groups = _param_groups(model, cfg.train.weight_decay)
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
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls

        kw["adamw_mode"] = True
    else:
        from deepspeed.ops.adam import FusedAdam as cls

        kw["adam_w_mode"] = True
    return skippable(cls)(groups, **kw)


# ---------------------------------------------------------------------------
# Signals: finish the step, checkpoint, exit 0
# ---------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag while training; :meth:`restore` puts the previous
    handlers back, so a process that called :func:`train` (a test, a notebook) can still be
    terminated afterwards -- and so can the processes it forks (a multiprocessing pool's
    ``terminate`` sends SIGTERM)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum, frame):
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def shielded_children():
    """Processes started inside (DataLoader workers) inherit SIGTERM/SIGUSR1 *blocked*.

    Slurm and torchrun signal every process of a task, and a DataLoader
    worker dies of SIGTERM (torch installs a handler that re-raises it),
    which would crash the rank instead of letting it checkpoint.  A blocked
    signal stays pending in the worker until the rank shuts it down; in this
    thread it is only deferred to the end of the block, never lost."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------------
# The M6 text-infilling objective, as a transform of packed rows
# ---------------------------------------------------------------------------
def infill_documents(batch: dict, rate: float, rng: np.random.Generator, special: dict[str, int]) -> int:
    """Rewrite a share ``rate`` of the batch's documents for text infilling, in place.

    In a chosen document one target item ``B`` (``<|item|>`` + its text, no
    image slot) is cut out and asked for at the end::

        A  B  C <|eos|>   →   A <|item|> C <|predict|> B[1:]

    The empty ``<|item|>`` marks the hole; everything before the new
    ``<|predict|>`` is the bidirectional context (prefix) and the loss is on
    the item's text only.  The length is unchanged (the ``<|eos|>`` makes
    room for ``<|predict|>``), so packing, positions and the other documents
    of the row stay as they are; image slots in ``C`` move with it.  Documents
    without a target item or cut by truncation (no final ``<|eos|>``) stay
    next-item documents.  Returns the number of documents rewritten.
    """
    if rate <= 0:
        return 0
    item, predict, eos, image = (special[k] for k in ("<|item|>", "<|predict|>", "<|eos|>", "<|image|>"))
    ids, labels, prefix = batch["input_ids"], batch["labels"], batch["prefix_mask"]
    doc = batch["document_ids"].numpy()
    img = batch["image_positions"]
    done = 0
    for b in range(ids.shape[0]):
        bounds = np.flatnonzero(np.diff(doc[b], prepend=-2, append=-2)) # document starts, and the end
        for s, e in zip(bounds[:-1], bounds[1:]):
            if doc[b, s] < 0 or rng.random() >= rate:
                continue
            t = ids[b, s:e].numpy()
            starts = np.flatnonzero((t == item) & ~prefix[b, s:e].numpy())
            if t[-1] != eos or len(starts) == 0:
                continue
            ends = np.append(starts[1:], len(t) - 1)
            ok = [(i, j) for i, j in zip(starts, ends) if j - i >= 2 and not (t[i:j] == image).any()]
            if not ok:
                continue
            i, j = ok[rng.integers(len(ok))]
            k = j - i
            new = np.concatenate([t[:i], [item], t[j:-1], [predict], t[i + 1:j]])
            ids[b, s:e] = torch.from_numpy(new)
            cut = e - k  # absolute position of the new <|predict|>
            prefix[b, s:cut] = True
            prefix[b, cut:e] = False
            labels[b, s:e] = -100
            labels[b, cut:e - 1] = ids[b, cut + 1:e]
            moved = (img[:, 0] == b) & (img[:, 1] >= s + j) & (img[:, 1] < e)
            img[moved, 1] -= k - 1
            done += 1
    return done


# ---------------------------------------------------------------------------
# Helpers of the loop
# ---------------------------------------------------------------------------
def prepare_inputs(model, batch: dict, device: torch.device) -> tuple[dict, int]:
    """The model's inputs for a loader batch, and its number of real (non-padding) tokens.

    Everything that needs values rather than shapes is computed here from the
    loader's CPU tensors, where reading them costs nothing: the final labels and
    their positions (``label_index``), the token count, and -- for the per-document
    kernel -- the document spans of the attention mask.  Tensors go to the device
    from pinned memory without blocking; on CUDA the FlexAttention block mask is
    then built once for the batch from the device copies (shared by every layer,
    and by the recomputation of activation checkpointing)."""
    labels, label_index, item_label_index, item_targets = model.label_positions(
        batch["labels"], batch.get("document_ids"), batch.get("prefix_mask"), batch.get("item_positions"),
        batch.get("item_catalog_rows"))
    n_tokens = int(np.count_nonzero(batch["document_ids"].numpy() >= 0)) if "document_ids" in batch \
        else batch["input_ids"].numel()
    host = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    host.update(labels=labels, label_index=label_index)
    if item_label_index is not None:
        host.update(item_label_index=item_label_index, item_targets=item_targets)
    if device.type == "cuda":
        inputs = {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in host.items()}
    else:
        inputs = {k: v.to(device) for k, v in host.items()}
    inputs["attention_mask"] = model.attention_mask(
        batch["input_ids"].shape[1], inputs.get("document_ids"), inputs.get("prefix_mask"), device,
        host_document_ids=host.get("document_ids"), host_prefix_mask=host.get("prefix_mask"))
    return inputs, n_tokens


def _manifest(cfg: Config) -> dict:
    path = Path(cfg.data.output) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"config key 'data.output': no prepared dataset at {cfg.data.output} "
                          f"(manifest.json missing); run `m6rec prepare --config ...` first")
    return json.loads(path.read_text())


def _warn_truncation(manifest: dict, seq_len: int, rank: int) -> None:
    """Samples longer than a row are cut at its end; a validation sample's target sits at its
    end, so with every one cut the validation loss has no tokens and is NaN.  Say so up front."""
    if rank != 0:
        return
    for split in ("train", "valid"):
        lengths = [n for sh in manifest["splits"].get(split, {}).get("shards", []) for n in sh.get("lengths", [])]
        cut = sum(n > seq_len for n in lengths)
        if cut:
            log.warning("%d of %d %s samples are longer than data.stream.seq_len=%d (longest %d tokens) and will be "
                        "truncated%s", cut, len(lengths), split, seq_len, max(lengths),
                        ": their targets are cut off, so the validation loss may be NaN" if split == "valid" else "")


def _init_from_run(model, run_dir: str, rank: int) -> None:
    """``model.init_from: run:RUN_DIR``: the weights of that run's newest complete checkpoint (fine-tuning
    a pretrained run on other data, e.g. the zero-shot source on its target)."""
    from m6rec.train.export import fp32_state_dict

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = ckpt.latest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        raise ConfigError(f"model.init_from run:{run_dir}: no complete checkpoint in {ckpt_dir}")
    try:
        model.load_state_dict(fp32_state_dict(ckpt_dir, tag), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"model.init_from run:{run_dir}: its {tag} does not fit this model "
                          f"(same model settings and vocabulary needed): {str(e).splitlines()[0]}") from None
    if rank == 0:
        log.info("model initialised from %s (weights only; a fresh optimizer)", ckpt_dir / tag)


def model_config_for(cfg: Config, manifest: dict):
    """The model config with the vocabulary, image geometry and item-vector width of the prepared data."""
    m = dataclasses.replace(cfg.model, vocab_size=manifest["vocab_size"],
                            max_seq_len=max(cfg.model.max_seq_len, cfg.data.stream.seq_len),
                            item_vector_dim=int((manifest.get("item_vectors") or {}).get("dim", 0)))
    return dataclasses.replace(cfg, model=m, data=dataclasses.replace(
        cfg.data, images=dataclasses.replace(cfg.data.images, size=manifest["image"]["size"],
                                             patch_size=manifest["image"]["patch_size"])))


def evaluate(engine, loader, device, max_batches: int) -> float:
    """Token-weighted mean loss over the validation split, from its start.

    ``max_batches`` (train.eval_batches) counts batches over all ranks; each
    rank takes ``ceil(max_batches / world)``, so 1 rank with W workers and W
    ranks with one worker each read the same batches.  Every rank runs the
    same number of forwards (ZeRO 3 gathers parameters collectively)."""
    loader.load_state_dict({"epoch": 0, "step_in_epoch": 0, "fingerprint": loader.fingerprint})
    per_rank = -(-max_batches // loader.world_size) if max_batches else 0
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = iter(loader)
    with torch.no_grad():
        for _ in range(min(per_rank or loader.steps_per_epoch, loader.steps_per_epoch)):
            with shielded_children():  # the first next() starts the workers
                batch = next(batches)
            out = engine(**prepare_inputs(engine.module, batch, device)[0])
            n = out.n_tokens.double()
            total += torch.stack([out.loss.double() * n, n])
    batches.close()  # stops the loader's workers now, not at garbage collection
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` as a device scalar (fp32), read nowhere."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


class StepStats:
    """What one step tells every rank, all-reduced on the device and read only when needed.

    ``vector`` holds ``[loss sum, tokens, signal, stop file, time to save, skipped
    samples, corrupt shards, infilled documents]`` summed over ranks; the loss sum is
    non-finite exactly when some rank's loss (or, where the trainer measures it,
    gradient norm) was.  On CUDA a non-blocking copy to pinned memory is queued behind it, so
    :meth:`values` waits for this step's work only, not for the steps queued
    since: the trainer reads a step's numbers one step late and keeps the device
    busy (or at once, on log and save steps)."""

    FIELDS = ("loss_sum", "tokens", "signalled", "stop_file", "time_save", "skipped", "corrupt", "infilled")

    def __init__(self, vector: torch.Tensor, local_losses: list, keys: list, lr: float, tokens: int):
        self.local_losses, self.keys, self.lr = local_losses, keys, lr
        self.tokens = tokens  # this rank's real tokens, counted on the host
        self.event = None
        if vector.is_cuda:
            self.host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            self.host.copy_(vector, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = vector
        self._values: Optional[dict] = None

    def values(self) -> dict:
        if self._values is None:
            if self.event is not None:
                self.event.synchronize()
            self._values = dict(zip(self.FIELDS, self.host.tolist()))  # the step's one host read
            self._values["nonfinite"] = not math.isfinite(self._values["loss_sum"])
        return self._values


class TrainStep:
    """One optimizer step of the DeepSpeed engine, queued without reading anything back.

    For each micro-batch: :func:`prepare_inputs`, forward, backward (and DeepSpeed's
    non-boundary ``step``).  Then one all-reduce of the step's shared numbers
    (:class:`StepStats`: the loss sum from the device, the host's numbers beside it),
    and the boundary ``engine.step()``.  With :class:`StepOnDevice` the optimizer
    reads the all-reduced loss sum on the device and skips the update there when it
    is not finite; DeepSpeed's JIT optimizers can only skip on a host flag, so with
    them it is read before the boundary (one host sync more per step)."""

    def __init__(self, engine, optimizer, cfg: Config, device: torch.device, clips: bool):
        self.engine, self.optimizer, self.device = engine, optimizer, device
        self.accum = cfg.train.grad_accum
        self.on_device = isinstance(optimizer, StepOnDevice)
        if self.on_device:
            optimizer.clip_norm = cfg.train.grad_clip if clips else 0.0
            optimizer.measure_norm = clips
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        stage = effective_zero_stage(cfg, self.world)
        self.stage0_norm = stage == 0 and not clips  # the trainer measures the norm (JIT optimizers)
        self.last_norm: Optional[torch.Tensor] = None
        if self.world == 1 and stage == 0:
            # one rank: DeepSpeed's gradient all-reduce would flatten every gradient into
            # buckets and copy it back, to average over one rank
            engine.enable_backward_allreduce = False
        self.nan_steps = ckpt.fault_steps("nan_loss")

    def run(self, step: int, lr: float, batches: list[dict], host) -> StepStats:
        """Queue optimizer step ``step`` (0-based) at learning rate ``lr``.  ``host`` gives the
        host's numbers for the vector (signal, stop file, time to save, skipped, corrupt,
        infilled): a list, or a function called once the micro-batches are queued, so that
        signals and the clock are looked at as late as possible."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, keys, tokens = [], [], 0
        for micro, batch in enumerate(batches):
            keys.append(batch.get("sample_keys"))
            inputs, n = prepare_inputs(self.engine.module, batch, self.device)
            tokens += n
            loss = self.engine(**inputs).loss
            if step + 1 in self.nan_steps:
                loss = loss * float("nan")  # test hook (M6REC_FAULT=nan_loss@N)
            self.engine.backward(loss)
            losses.append(loss.detach())
            if micro < self.accum - 1:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
        # Few ops on purpose: a NaN/inf loss on any rank makes the all-reduced sum non-finite,
        # which is all the skip needs to know.
        loss_sum = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        if self.stage0_norm:  # a non-finite whole gradient skips too (ZeRO 1-3 check their own)
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                self.last_norm = grad_norm(grads)
                loss_sum = loss_sum + self.last_norm * 0.0
        host_part = torch.tensor([tokens, *(host() if callable(host) else host)], dtype=torch.float64)
        if self.device.type == "cuda":
            host_part = host_part.pin_memory().to(self.device, non_blocking=True)
        vector = torch.cat([loss_sum.reshape(1).double(), host_part])
        if self.world > 1:
            dist.all_reduce(vector)
        if self.on_device:
            self.optimizer.shared_loss = vector[0]
        else:
            self.optimizer.skip_update = not bool(vector[0].isfinite())  # a host read: see the class docstring
        self.engine.step()  # the boundary: clip + optimizer step (skipped if non-finite)
        self.optimizer.skip_update = False
        if self.on_device:
            self.optimizer.shared_loss = None
        return StepStats(vector, losses, keys, lr, tokens)

    def grad_norm(self) -> Optional[float]:
        """The last step's gradient norm before clipping (a host read: log steps only)."""
        if self.on_device and self.optimizer.measure_norm:
            norm = self.optimizer.grad_norm
        else:  # stage 0 without StepOnDevice: measured here; ZeRO: DeepSpeed's own
            norm = self.last_norm if self.stage0_norm else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


class _Trace:
    """``M6REC_TRACE=1``: every rank appends one exact JSON line per step to
    ``RUN_DIR/trace/rank{r}.jsonl`` (losses as float.hex, sample keys, a
    digest of this rank's parameters) -- what the resume tests compare."""

    def __init__(self, run_dir: Path, rank: int):
        self.file = None
        if os.environ.get("M6REC_TRACE") == "1":
            (run_dir / "trace").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "trace" / f"rank{rank}.jsonl", "a", buffering=1)

    def write(self, engine, **rec) -> None:
        if self.file is None:
            return
        h = hashlib.sha256()
        for p in engine.module.parameters():  # ZeRO 3: this rank's partition
            h.update(getattr(p, "ds_tensor", p).detach().float().cpu().numpy().tobytes())
        self.file.write(json.dumps({**rec, "params": h.hexdigest()[:16]}) + "\n")

    def final_weights(self, engine, path: Path) -> None:
        """The live model's full weights (gathered under ZeRO 3) to a safetensors file (rank 0)."""
        if self.file is None:
            return
        import deepspeed
        from safetensors.torch import save_file

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            if dist.get_rank() == 0:
                sd = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
                save_file(sd, str(path))

    def optimizer_state(self, engine, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """The full fp32 weights, AdamW moments and step counts (gathered through DeepSpeed's
        ``safe_get_full_*`` under ZeRO) to a safetensors file (rank 0): ``fp32/<name>``,
        ``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step`` (the distinct step counts).
        Collective under ZeRO.  The resume tests compare the state right after a load
        with the one the saving run held."""
        if self.file is None:
            return
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        from safetensors.torch import save_file

        zero = engine.zero_optimization_stage() > 0
        base = getattr(engine.optimizer, "optimizer", engine.optimizer) if zero else optimizer
        if zero and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state") and base.state:
            # ZeRO 1/2 link each parameter to its slice of the Adam state once, right after the
            # first group's first update -- before the second group has a state (DeepSpeed
            # 0.19.8): linked again here, now that every group has one.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        out = {}
        for name, p in engine.module.named_parameters():
            shape = getattr(p, "ds_shape", p.shape)
            if zero:
                got = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                       "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
            else:  # a parameter that never had a gradient (the image projection on text) has no state yet
                st = optimizer.state.get(p) or {}
                got = {"fp32": p, "exp_avg": st.get("exp_avg", torch.zeros_like(p)),
                       "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(p))}
            for key, v in got.items():
                out[f"{key}/{name}"] = v.detach().float().cpu().reshape(shape).clone()
        steps = {float(st["step"]) for st in base.state.values() if "step" in st}
        out["step"] = torch.tensor(sorted(steps), dtype=torch.float64)
        if dist.get_rank() == 0:
            save_file(out, str(path))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def build_engine(cfg: Config, model: torch.nn.Module, world: int, device: torch.device,
                 load_universal: bool = False):
    """What ``m6rec train`` builds around a model -- the optimizer, the DeepSpeed engine and
    the :class:`TrainStep` -- also used as is by the benchmarks.  ``load_universal``: the
    engine's first load reads a universal checkpoint (later saves are ordinary ones).
    Returns ``(engine, optimizer, step, deepspeed_config)``."""
    import deepspeed

    on_gpu = device.type == "cuda"
    optimizer = build_optimizer(cfg, model, on_gpu)
    clips = isinstance(optimizer, StepOnDevice) and clips_on_device(cfg, world)
    ds_config = deepspeed_config(cfg, world, on_gpu, optimizer_clips=clips)
    init_config = {**ds_config, "checkpoint": {"load_universal": True}} if load_universal else ds_config
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=init_config)
    return engine, optimizer, TrainStep(engine, optimizer, cfg, device, clips), ds_config


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------
_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "tie_embeddings",
               "image_size", "patch_size", "image_channels", "item_vector_dim", "item_proj")


def _resume_plan(ckpt_dir: Path, resume: str, cfg: Config, world: int, margs) -> Optional[dict]:
    """Which tag ``--resume`` loads and how: ``same`` (the topology that wrote it: DeepSpeed's
    own load), ``plain`` (no ZeRO before and now: the full state loads on any number of
    ranks), ``universal`` (ZeRO 1-3 now, ZeRO 1-3 before on another number of ranks or
    another stage: converted with DeepSpeed's ds_to_universal, loaded by DeepSpeed's
    universal loader, which re-partitions it), ``to_plain`` (converted likewise, then into
    an engine without ZeRO), ``from_plain`` (no ZeRO before, ZeRO now).  None: start from
    step 0.  Every world size and stage resumes; only a different model shape is refused
    (its weights and moments fit no parameter of this model)."""
    if resume == "none":
        return None
    if resume != "auto" and not ckpt.TAG_RE.match(resume):
        raise ConfigError(f"--resume: expected 'auto', 'none' or a checkpoint tag like step00000100, got {resume!r}")
    tag = ckpt.latest_complete(ckpt_dir) if resume == "auto" else resume
    if tag is None:
        log.info("--resume auto: no complete checkpoint in %s, starting from step 0", ckpt_dir)
        return None
    if not ckpt.is_complete(ckpt_dir, tag):
        raise ConfigError(f"--resume {resume}: {ckpt_dir / tag} is not a complete checkpoint")
    meta = ckpt.read_meta(ckpt_dir, tag)
    saved_args, now_args = meta.get("model_args") or {}, margs.to_dict()
    diff = [f"{k}: saved {saved_args[k]!r}, this run {now_args.get(k)!r}" for k in _SHAPE_KEYS
            if k in saved_args and saved_args[k] != now_args.get(k)]
    if diff:
        raise ConfigError(f"checkpoint {ckpt_dir / tag} holds another model shape ({'; '.join(diff)}): its weights "
                          f"and optimizer state do not fit this model; resume with the same model settings (another "
                          f"number of ranks or ZeRO stage resumes, another shape cannot)")
    stage = effective_zero_stage(cfg, world)
    saved_world = int(meta.get("world_size") or world)
    saved_stage = int(meta.get("zero_stage", stage))
    if (saved_world, saved_stage) == (world, stage):
        mode = "same"
    elif saved_stage == 0:
        mode = "plain" if stage == 0 else "from_plain"
    elif stage > 0:
        mode = "universal"
    else:
        mode = "to_plain"
    return {"tag": tag, "meta": meta, "mode": mode, "saved_world": saved_world, "saved_stage": saved_stage,
            "stage": stage}


def _convert(plan: dict, ckpt_dir: Path, rank: int) -> None:
    """Rank 0 converts the tag to DeepSpeed's universal layout (once); the others wait."""
    if plan["mode"] not in ("universal", "to_plain"):
        return
    if rank == 0:
        folder, seconds = ckpt.convert_to_universal(ckpt_dir, plan["tag"])
        if seconds:
            log.info("checkpoint %s: written by %d rank(s) at ZeRO stage %d, this run has %d at stage %d: converted "
                     "to DeepSpeed's universal layout in %.2f s (%s)", ckpt_dir / plan["tag"], plan["saved_world"],
                     plan["saved_stage"], dist.get_world_size() if dist.is_initialized() else 1, plan["stage"],
                     seconds, folder)
        else:
            log.info("checkpoint %s: using its universal conversion %s", ckpt_dir / plan["tag"], folder)
    if dist.is_initialized():
        dist.barrier()


def _resume(engine, optimizer, ckpt_dir: Path, plan: Optional[dict], loader) -> dict:
    """Load the checkpoint ``plan`` names into the engine and the stream; return its client state."""
    if plan is None:
        return {}
    tag, mode = plan["tag"], plan["mode"]
    t0 = time.perf_counter()
    if mode in ("same", "plain"):
        client, rank_state = ckpt.load(engine, ckpt_dir, tag)
    else:
        saved = ckpt.client_state_of(ckpt_dir, tag)
        if mode == "universal":
            # DeepSpeed's ZeRO 3 universal loader copies the first saved group's hyper-parameters to
            # every group (weight decay onto the no-decay group): this run's own are put back after.
            base = getattr(engine.optimizer, "optimizer", engine.optimizer)
            hyper = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in base.param_groups]
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=ckpt.universal_dir(ckpt_dir, tag).name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt.universal_dir(ckpt_dir, tag)}")
            for g, h in zip(base.param_groups, hyper):
                g.update(h)
            ckpt.own_step_tensors(engine)  # ZeRO 3's loader shares one step tensor among sub-groups
        elif mode == "to_plain":
            ckpt.load_universal_into_plain(engine, optimizer, ckpt.universal_dir(ckpt_dir, tag))
        else:  # from_plain
            params = [p for g in _param_groups(engine.module, 0.0) for p in g["params"]]
            ckpt.load_plain_into_zero(engine, saved["optimizer"], saved["module"], params)
        client = saved
        rank_file = ckpt_dir / tag / f"m6rec_rank{dist.get_rank() if dist.is_initialized() else 0}.pt"
        rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    loader.load_state_dict(client["stream"])
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])
    if mode == "same":
        log.info("resumed from %s at step %d", ckpt_dir / tag, client["step"])
    else:
        log.info("resumed from %s at step %d: written by %d rank(s) at ZeRO stage %d, continued on %d at stage %d "
                 "(%s load, %.2f s); the stream continues its epoch %d on this run's readers",
                 ckpt_dir / tag, client["step"], plan["saved_world"], plan["saved_stage"], loader.world_size,
                 plan["stage"], mode, time.perf_counter() - t0, loader.epoch)
    return client


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def train(cfg: Config, resume: str = "none") -> dict:
    """Run training; returns a summary (last step, why it stopped, ...)."""
    stop = StopFlag()  # first: a signal during start-up still ends in a clean stop after one step
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(cfg, resume, stop, cleanup)
    finally:
        stop.restore()


def _train(cfg: Config, resume: str, stop: StopFlag, cleanup: contextlib.ExitStack) -> dict:
    from m6rec.data.stream import StreamLoader
    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.model.info import flops_per_token
    from m6rec.train.metrics import MetricsLogger, StepTimer, memory_stats, peak_flops, progress

    rank, world, device = init_distributed()
    on_gpu = device.type == "cuda"
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    manifest = _manifest(cfg)
    _warn_truncation(manifest, cfg.data.stream.seq_len, rank)
    cfg = model_config_for(cfg, manifest)
    deepspeed_config(cfg, world, on_gpu)  # config errors before any work
    accelerate_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if rank == 0 and accelerate_stage not in (None, str(cfg.deepspeed.zero_stage)):
        log.warning("accelerate's DeepSpeed plugin says ZeRO stage %s; m6rec uses deepspeed.zero_stage=%d from "
                    "its config (the one source of truth)", accelerate_stage, cfg.deepspeed.zero_stage)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    model = build_model(cfg, device=device)
    if cfg.model.init_from and cfg.model.init_from.startswith("run:"):
        _init_from_run(model, cfg.model.init_from[4:], rank)
    if model.item_proj is not None:
        from m6rec.data.vectors import attach_catalog

        attach_catalog(model, cfg.data.output, cfg.data.text, training=True)
    margs = ModelArgs.from_config(cfg)
    plan = _resume_plan(ckpt_dir, resume, cfg, world, margs)
    if plan is not None:
        _convert(plan, ckpt_dir, rank)
    engine, optimizer, runner, ds_config = build_engine(
        cfg, model, world, device, load_universal=plan is not None and plan["mode"] == "universal")
    if rank == 0:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
    train_loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=rank, world_size=world,
                                            pin_memory=on_gpu)
    val_loader = StreamLoader.from_config(cfg.data, "valid", train=False, rank=rank, world_size=world,
                                          pin_memory=on_gpu)
    client = _resume(engine, optimizer, ckpt_dir, plan, train_loader)
    selector = None  # train.select_by: the validation ranking metric and the best tag (m6rec/rec/select.py)
    if cfg.train.select_by:
        from m6rec.rec.select import Selector

        selector = Selector(cfg, run_dir, rank, world, effective_zero_stage(cfg, world), resumed=bool(client))
    step, tokens_seen = client.get("step", 0), client.get("tokens_seen", 0)
    nonfinite_total = client.get("nonfinite_steps", 0)
    start_step = step

    metrics = MetricsLogger(run_dir, to_dict(cfg), rank, world, cfg.train.wandb, resume_step=step if client else None)
    peak, peak_source = peak_flops(cfg.train.precision, device, configured=cfg.train.peak_flops)
    fpt = flops_per_token(margs, cfg.data.stream.seq_len)["total"]
    trace = _Trace(run_dir, rank)
    if client:  # tracing: the weights and optimizer state right after the load (the resume tests compare them)
        trace.final_weights(engine, run_dir / "trace" / f"resumed_step{step:08d}.safetensors")
        trace.optimizer_state(engine, optimizer, run_dir / "trace" / f"state_resumed_step{step:08d}.safetensors")
    bar = progress(total=cfg.train.steps, initial=step, desc="train", rank=rank)
    timer = StepTimer()
    stage = effective_zero_stage(cfg, world)
    if stage != cfg.deepspeed.zero_stage and rank == 0:
        log.info("one rank: deepspeed.zero_stage %d would partition nothing, running as ZeRO stage 0",
                 cfg.deepspeed.zero_stage)
    special = manifest["special_tokens"]
    meta = {"world_size": world, "zero_stage": stage, "precision": cfg.train.precision,
            "model_args": margs.to_dict(), "tokenizer": str(Path(cfg.data.output) / "tokenizer.json")}
    last_save_time, last_saved = time.time(), step
    interval_losses: list[float] = []
    consecutive_nonfinite, save_due, stopped_by, want_stop = 0, False, "steps", False
    shared = {"signalled": 0.0, "stop_file": 0.0, "skipped": 0.0, "corrupt": 0.0, "infilled": 0.0}
    pending: list[tuple[int, StepStats]] = []  # queued steps whose numbers are not read yet (at most one)
    batches = iter(train_loader)
    # the loaders' worker processes (the next epoch's among them) end with the loop, however it ends
    cleanup.callback(val_loader.close)
    cleanup.callback(train_loader.close)
    cleanup.callback(lambda: batches.close())  # the current epoch's (``batches`` is rebound per epoch)

    def next_batch() -> dict:
        nonlocal batches
        with timer.waiting_for_data(), shielded_children():  # a new epoch's first next() starts workers
            try:
                return next(batches)
            except StopIteration:  # the epoch ended: the loader moved on to the next one
                batches = iter(train_loader)
                return next(batches)

    def save_now(reason: str) -> None:
        nonlocal last_save_time, last_saved
        state = {"step": step, "tokens_seen": tokens_seen, "stream": train_loader.state_dict(),
                 "nonfinite_steps": nonfinite_total, "reason": reason, "world_size": world}
        with timer.paused():
            tag = ckpt.save(engine, ckpt_dir, step, state, {"rng": ckpt.rng_state()}, cfg.train.keep_last, meta,
                            protect=selector.best_tag if selector else None)
        last_save_time, last_saved = time.time(), step
        trace.optimizer_state(engine, optimizer, run_dir / "trace" / f"state_saved_step{step:08d}.safetensors")
        if selector is not None:
            selector.saved(step, tag)

    def settle(upto: Optional[int] = None) -> None:
        """Read the numbers of the queued steps up to ``upto`` (default: all) -- the host
        sync -- and account for them in order."""
        nonlocal tokens_seen, nonfinite_total, consecutive_nonfinite, save_due
        while pending and (upto is None or pending[0][0] <= upto):
            at, stats = pending.pop(0)
            v = stats.values()
            tokens_seen += int(v["tokens"])
            shared.update({k: v[k] for k in shared})
            save_due |= bool(v["time_save"])
            nonfinite = bool(v["nonfinite"])
            step_loss = v["loss_sum"] / (world * cfg.train.grad_accum) if not nonfinite else float("nan")
            trace.write(engine, step=at, loss=step_loss.hex(), lr=stats.lr, skipped=nonfinite, keys=stats.keys,
                        local=[float(x).hex() for x in stats.local_losses])
            if nonfinite:
                consecutive_nonfinite += 1
                nonfinite_total += 1
                log.warning("step %d: non-finite loss (or gradient) on some rank; update skipped (%d in a row, "
                            "%d in all)", at, consecutive_nonfinite, nonfinite_total)
            else:
                consecutive_nonfinite = 0
                interval_losses.append(step_loss)

    compile_note = margs.compile
    stop_at = ckpt.fault_steps("stop_at")
    while step < cfg.train.steps:
        lr = lr_at(cfg, step)
        micro_batches, infilled = [], 0
        for micro in range(cfg.train.grad_accum):
            batch = next_batch()
            if cfg.train.infill_rate > 0:
                rng = np.random.default_rng((cfg.train.seed, step, rank, micro))
                infilled += infill_documents(batch, cfg.train.infill_rate, rng, special)
            micro_batches.append(batch)

        def host_flags() -> list[float]:
            stop_file = rank == 0 and (run_dir / STOP_FILE).exists()
            time_save = bool(cfg.train.save_every_minutes) and \
                time.time() - last_save_time >= 60 * cfg.train.save_every_minutes
            stats = train_loader.stats
            return [float(stop.signal is not None), float(stop_file), float(time_save), stats["skipped_samples"],
                    stats["corrupt_shards"], infilled]

        t_first = time.perf_counter()
        queued = runner.run(step, lr, micro_batches, host_flags)
        step += 1
        pending.append((step, queued))
        log_now = step % cfg.train.log_every == 0 or step == cfg.train.steps
        # One host read per step: the previous step's numbers, long computed (or, on log steps and
        # when tracing, this step's too).
        settle(None if log_now or trace.file is not None else step - 1)
        if compile_note:
            queued.values()
            log.info("first step %.1f s (includes compiling the %d blocks: model.compile)", time.perf_counter() - t_first,
                     margs.n_layers)
            compile_note = False
        timer.step_done(queued.tokens)
        bar.update(1)
        signalled, stop_file_seen = bool(shared["signalled"]), bool(shared["stop_file"])
        want_stop = signalled or stop_file_seen or step in stop_at
        save_due |= bool(cfg.train.save_every and step % cfg.train.save_every == 0)
        if want_stop or save_due or step == cfg.train.steps or consecutive_nonfinite:
            settle()  # a checkpoint holds this step's counters, and is never written after a skipped update

        row: dict[str, Any] = {}
        if log_now:
            grad_norm = runner.grad_norm() if not consecutive_nonfinite else None
            row = {
                "loss": sum(interval_losses) / len(interval_losses) if interval_losses else float("nan"),
                "lr": lr,
                "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                **timer.interval_metrics(world, fpt, peak),
                "tokens_seen": tokens_seen,
                "samples_skipped": int(shared["skipped"]),
                "corrupt_shards": int(shared["corrupt"]),
                "nonfinite_steps": nonfinite_total,
                "epoch": train_loader.epoch,
                **memory_stats(device),
            }
            if cfg.train.precision == "fp16":
                row["loss_scale"] = float(getattr(engine.optimizer, "cur_scale", float("nan")))
            if cfg.train.infill_rate > 0:
                row["infilled_docs"] = int(shared["infilled"])
            interval_losses = []
        if consecutive_nonfinite >= cfg.train.max_nonfinite:
            metrics.log(step, row or {"nonfinite_steps": nonfinite_total})
            bar.close()
            metrics.close()
            trace.close()
            raise NonFiniteLossError(
                f"stopping at step {step}: the loss was non-finite at {consecutive_nonfinite} consecutive steps "
                f"(train.max_nonfinite={cfg.train.max_nonfinite}); those updates were skipped and no checkpoint was "
                f"written after them (the newest is {ckpt.latest_complete(ckpt_dir) or 'none'}). "
                f"Lower train.lr, prefer bf16 to fp16, or check the data.")
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            with timer.paused():
                row["val_loss"] = evaluate(engine, val_loader, device, cfg.train.eval_batches)
                if selector is not None:  # a checkpoint at every improvement of the validation ranking
                    row.update(selector.evaluate(engine.module, step))
                    save_due |= selector.improved
        if row:
            metrics.log(step, row)

        # Saves wait for a step with a finite loss: no checkpoint right after a skipped update.
        if save_due or want_stop:
            settle()  # (a save decided after the read above, e.g. a better validation ranking)
        if (save_due or want_stop or step == cfg.train.steps) and not consecutive_nonfinite:
            save_now("preempted" if want_stop else "scheduled" if step < cfg.train.steps else "final")
            save_due = False
        if want_stop:
            stopped_by = ("signal " + signal.Signals(stop.signal).name if stop.signal is not None
                          else "signal on another rank" if signalled
                          else f"stop file {run_dir / STOP_FILE}" if stop_file_seen else f"stop_at@{step}")
            if rank == 0:
                # The request is served (checkpoint written): consume the file so the next run
                # does not stop at once.  It is not deleted at start-up, because a USR1 that
                # reaches a requeued job while it starts must still count.
                (run_dir / STOP_FILE).unlink(missing_ok=True)
            break
    settle()
    if step == cfg.train.steps and last_saved != step and step > start_step:
        log.warning("step %d: the last step was non-finite; the final checkpoint was not written", step)
    trace.final_weights(engine, run_dir / "trace" / "final_weights.safetensors")
    bar.close()
    metrics.close()
    trace.close()
    summary = {"step": step, "stopped_by": stopped_by, "tokens_seen": tokens_seen, "start_step": start_step,
               "nonfinite_steps": nonfinite_total, "last_checkpoint": ckpt.latest_complete(ckpt_dir),
               "world_size": world, "zero_stage": stage, "peak_flops": peak, "peak_source": peak_source,
               "best": selector.best if selector else None}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(cfg: Config, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        summary = train(cfg, resume=args.resume)
    except NonFiniteLossError as e:
        print(f"m6rec train: {e}", file=sys.stderr, flush=True)
        return 1
    if summary["stopped_by"] != "steps":
        log.info("stopped by %s at step %d after checkpoint %s", summary["stopped_by"], summary["step"],
                 summary["last_checkpoint"])
    return 0


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
