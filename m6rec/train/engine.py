"""The training loop: DeepSpeed ZeRO engine, streaming shards, atomic checkpoints, metrics.

One entry, :func:`train`, runs unchanged under the ``deepspeed`` launcher,
``torchrun``, ``accelerate launch``, ``srun`` and as a single plain process
(:func:`init_distributed` reads whichever environment is there).

The loop, per optimizer step::

    lr = schedule(step)                        a pure function of the step: nothing to save
    for each micro-batch:  forward → backward → engine.step()   (the last one is the boundary)
    before the boundary:   one all-reduce decides for every rank: skip a non-finite update?
                           stop (SIGTERM/SIGUSR1/RUN_DIR/STOP)? save (minutes elapsed)?
                           plus the step's loss and token count
    every log_every:       one metrics line (console, JSONL, W&B)
    every eval_every:      validation loss over the validation split
    every save_every, save_every_minutes, on a stop, at the end: checkpoint

Decisions every rank must share are taken together through that one
all-reduce, so no rank can wait in a collective the others never enter.

A non-finite loss on any rank skips the whole optimizer step on every rank:
each micro-batch still runs forward and backward (DeepSpeed's accumulation
and ZeRO's gradient hooks stay in lockstep), and the optimizer's ``step`` is
suppressed (:func:`skippable`); ZeRO 1-3 in fp32 also see the non-finite
gradient norm and skip on their own.  No checkpoint is written while the
latest step was non-finite, and after ``train.max_nonfinite`` in a row the
run stops with :class:`NonFiniteLossError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
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


def init_distributed() -> tuple[int, int, torch.device]:
    launcher_env()
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


# ---------------------------------------------------------------------------
# DeepSpeed configuration: rendered from the one config tree
# ---------------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON of a config (``python -m m6rec.train.engine --config X`` prints it).

    The optimizer is not in it: the engine passes its own AdamW (see
    :func:`build_optimizer`) and sets the learning rate every step."""
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
        "stage": z.zero_stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": s.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our AdamW subclass (see skippable())
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1 << 30,  # m6rec logs its own metrics
        "wall_clock_breakdown": False,
    }


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
    (FusedAdam, DeepSpeedCPUAdam) still hold."""

    class Skippable(cls):
        skip_update = False

        def step(self, *args, **kwargs):
            if self.skip_update:
                return None
            return super().step(*args, **kwargs)

    Skippable.__name__ = Skippable.__qualname__ = cls.__name__
    return Skippable


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (1-D weights and the token table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module, on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW: DeepSpeed's fused kernel on GPU (its CPU-Adam with optimizer
    offload), torch's on CPU; always skippable (see :func:`skippable`)."""
    kw: dict[str, Any] = dict(lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-8)
    if on_gpu and cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls

        kw["adamw_mode"] = True
    elif on_gpu:
        from deepspeed.ops.adam import FusedAdam as cls

        kw["adam_w_mode"] = True
    else:
        cls = torch.optim.AdamW
    return skippable(cls)(_param_groups(model, cfg.train.weight_decay), **kw)


# ---------------------------------------------------------------------------
# Signals: finish the step, checkpoint, exit 0
# ---------------------------------------------------------------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self):
        self.signal: Optional[int] = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum


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
def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


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


def model_config_for(cfg: Config, manifest: dict):
    """The model config with the vocabulary and image geometry of the prepared data."""
    m = dataclasses.replace(cfg.model, vocab_size=manifest["vocab_size"],
                            max_seq_len=max(cfg.model.max_seq_len, cfg.data.stream.seq_len))
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
            out = engine(**_to_device(batch, device))
            n = out.n_tokens.double()
            total += torch.stack([out.loss.double() * n, n])
    batches.close()  # stops the loader's workers now, not at garbage collection
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def _global_grad_norm(engine) -> Optional[float]:
    """ZeRO and the fp16/bf16 wrappers report it after the step; plain stage 0
    does not, so it is computed from the (already averaged) gradients before."""
    params = [p for p in engine.module.parameters() if p.grad is not None]
    if not params:
        return None
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params])))


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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------
def _resume(engine, ckpt_dir: Path, resume: str, cfg: Config, world: int, loader) -> dict:
    """Load the checkpoint ``resume`` names into the engine and the stream; return its client state."""
    if resume == "none":
        return {}
    if resume != "auto" and not ckpt.TAG_RE.match(resume):
        raise ConfigError(f"--resume: expected 'auto', 'none' or a checkpoint tag like step00000100, got {resume!r}")
    tag = ckpt.latest_complete(ckpt_dir) if resume == "auto" else resume
    if tag is None:
        log.info("--resume auto: no complete checkpoint in %s, starting from step 0", ckpt_dir)
        return {}
    if not ckpt.is_complete(ckpt_dir, tag):
        raise ConfigError(f"--resume {resume}: {ckpt_dir / tag} is not a complete checkpoint")
    meta = ckpt.read_meta(ckpt_dir, tag)
    if meta.get("world_size") and meta["world_size"] != world:
        raise ConfigError(
            f"checkpoint {ckpt_dir / tag} was written by {meta['world_size']} ranks but this run has {world}: "
            f"the ZeRO optimizer shards and the data stream's position belong to {meta['world_size']} ranks. "
            f"Resume with {meta['world_size']} ranks, or start a new run from its weights "
            f"(m6rec export --ckpt {ckpt_dir / tag} --to hf OUT, then --model.init_from hf:OUT); "
            f"see docs/training.md#changing-the-number-of-ranks")
    if meta.get("zero_stage", cfg.deepspeed.zero_stage) != cfg.deepspeed.zero_stage:
        raise ConfigError(f"checkpoint {ckpt_dir / tag} was written with ZeRO stage {meta['zero_stage']} but "
                          f"deepspeed.zero_stage is {cfg.deepspeed.zero_stage}: resume with the same stage")
    client, rank_state = ckpt.load(engine, ckpt_dir, tag)
    loader.load_state_dict(client["stream"])
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])
    log.info("resumed from %s at step %d", ckpt_dir / tag, client["step"])
    return client


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def train(cfg: Config, resume: str = "none") -> dict:
    """Run training; returns a summary (last step, why it stopped, ...)."""
    import deepspeed

    from m6rec.data.stream import StreamLoader
    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.model.info import flops_per_token
    from m6rec.train.metrics import MetricsLogger, StepTimer, memory_stats, peak_flops, progress

    stop = StopFlag()  # first: a signal during start-up still ends in a clean stop after one step
    rank, world, device = init_distributed()
    on_gpu = device.type == "cuda"
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    manifest = _manifest(cfg)
    _warn_truncation(manifest, cfg.data.stream.seq_len, rank)
    cfg = model_config_for(cfg, manifest)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    accelerate_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if rank == 0 and accelerate_stage not in (None, str(cfg.deepspeed.zero_stage)):
        log.warning("accelerate's DeepSpeed plugin says ZeRO stage %s; m6rec uses deepspeed.zero_stage=%d from "
                    "its config (the one source of truth)", accelerate_stage, cfg.deepspeed.zero_stage)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    model = build_model(cfg, device=device)
    margs = ModelArgs.from_config(cfg)
    optimizer = build_optimizer(cfg, model, on_gpu)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    train_loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=rank, world_size=world)
    val_loader = StreamLoader.from_config(cfg.data, "valid", train=False, rank=rank, world_size=world)
    client = _resume(engine, ckpt_dir, resume, cfg, world, train_loader)
    step, tokens_seen = client.get("step", 0), client.get("tokens_seen", 0)
    nonfinite_total = client.get("nonfinite_steps", 0)
    start_step = step

    metrics = MetricsLogger(run_dir, to_dict(cfg), rank, world, cfg.train.wandb, resume_step=step if client else None)
    peak, peak_source = peak_flops(cfg.train.precision, device, configured=cfg.train.peak_flops)
    fpt = flops_per_token(margs, cfg.data.stream.seq_len)["total"]
    trace = _Trace(run_dir, rank)
    bar = progress(total=cfg.train.steps, initial=step, desc="train", rank=rank)
    timer = StepTimer()
    accum, stage = cfg.train.grad_accum, cfg.deepspeed.zero_stage
    special = manifest["special_tokens"]
    nan_steps = ckpt.fault_steps("nan_loss")
    meta = {"world_size": world, "zero_stage": stage, "precision": cfg.train.precision,
            "model_args": margs.to_dict(), "tokenizer": str(Path(cfg.data.output) / "tokenizer.json")}
    last_save_time, last_saved = time.time(), step
    interval_losses: list[float] = []
    consecutive_nonfinite, save_due, stopped_by = 0, False, "steps"
    batches = iter(train_loader)

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
            ckpt.save(engine, ckpt_dir, step, state, {"rng": ckpt.rng_state()}, cfg.train.keep_last, meta)
        last_save_time, last_saved = time.time(), step

    while step < cfg.train.steps:
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local_losses, keys, step_tokens, infilled = [], [], 0, 0
        for micro in range(accum):
            batch = next_batch()
            if cfg.train.infill_rate > 0:
                rng = np.random.default_rng((cfg.train.seed, step, rank, micro))
                infilled += infill_documents(batch, cfg.train.infill_rate, rng, special)
            keys.append(batch["sample_keys"])
            b = _to_device(batch, device)
            loss = engine(**b).loss
            if step + 1 in nan_steps:
                loss = loss * float("nan")  # test hook (M6REC_FAULT=nan_loss@N)
            engine.backward(loss)
            local_losses.append(loss.detach().float())
            step_tokens += int((b["document_ids"] >= 0).sum())
            if micro < accum - 1:
                engine.step()  # not a boundary: DeepSpeed only counts the micro-step

        # The one all-reduce of the step, before the boundary: every rank takes the same branches.
        losses = torch.stack(local_losses)
        # Stage 0 keeps whole (already averaged) gradients: their norm is cheap, logged, and a
        # non-finite one skips the step like a non-finite loss (ZeRO 1-3 check it themselves).
        grad_norm = _global_grad_norm(engine) if stage == 0 else None
        stop_file = rank == 0 and (run_dir / STOP_FILE).exists()
        time_save = bool(cfg.train.save_every_minutes) and \
            time.time() - last_save_time >= 60 * cfg.train.save_every_minutes
        stats = train_loader.stats
        decide = torch.tensor([
            float(not torch.isfinite(losses).all() or not math.isfinite(grad_norm or 0.0)),
            float(losses.nan_to_num(0.0).sum()), step_tokens,
            float(stop.signal is not None), float(stop_file), float(time_save),
            stats["skipped_samples"], stats["corrupt_shards"], infilled,
        ], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(decide)
        nonfinite, loss_sum, tokens, signalled, stop_file, time_save, skipped, corrupt, infilled = decide.tolist()
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
        optimizer.skip_update = bool(nonfinite)
        engine.step()  # the boundary: clip + optimizer step (suppressed if non-finite)
        optimizer.skip_update = False

        step += 1
        tokens_seen += int(tokens)
        timer.step_done(step_tokens)
        bar.update(1)
        step_loss = loss_sum / (world * accum) if not nonfinite else float("nan")
        trace.write(engine, step=step, loss=step_loss.hex(), lr=lr, skipped=bool(nonfinite), keys=keys,
                    local=[float(x).hex() for x in local_losses])
        if nonfinite:
            consecutive_nonfinite += 1
            nonfinite_total += 1
            log.warning("step %d: non-finite loss (or stage-0 gradient) on some rank; update skipped (%d in a row, %d in all)",
                        step, consecutive_nonfinite, nonfinite_total)
        else:
            consecutive_nonfinite = 0
            interval_losses.append(step_loss)

        row: dict[str, Any] = {}
        if log_now:
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            if nonfinite:
                grad_norm = None
            row = {
                "loss": sum(interval_losses) / len(interval_losses) if interval_losses else float("nan"),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                **timer.interval_metrics(world, fpt, peak),
                "tokens_seen": tokens_seen,
                "samples_skipped": int(skipped),
                "corrupt_shards": int(corrupt),
                "nonfinite_steps": nonfinite_total,
                "epoch": train_loader.epoch,
                **memory_stats(device),
            }
            if cfg.train.precision == "fp16":
                row["loss_scale"] = float(getattr(engine.optimizer, "cur_scale", float("nan")))
            if cfg.train.infill_rate > 0:
                row["infilled_docs"] = int(infilled)
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
        if row:
            metrics.log(step, row)

        # Saves wait for a step with a finite loss: no checkpoint right after a skipped update.
        save_due |= bool(cfg.train.save_every and step % cfg.train.save_every == 0) or bool(time_save)
        want_stop = signalled or stop_file
        if (save_due or want_stop or step == cfg.train.steps) and not consecutive_nonfinite:
            save_now("preempted" if want_stop else "scheduled" if step < cfg.train.steps else "final")
            save_due = False
        if want_stop:
            stopped_by = ("signal " + signal.Signals(stop.signal).name if stop.signal is not None
                          else "signal on another rank" if signalled else f"stop file {run_dir / STOP_FILE}")
            if rank == 0:
                # The request is served (checkpoint written): consume the file so the next run
                # does not stop at once.  It is not deleted at start-up, because a USR1 that
                # reaches a requeued job while it starts must still count.
                (run_dir / STOP_FILE).unlink(missing_ok=True)
            break
    if step == cfg.train.steps and last_saved != step and step > start_step:
        log.warning("step %d: the last step was non-finite; the final checkpoint was not written", step)
    trace.final_weights(engine, run_dir / "trace" / "final_weights.safetensors")
    bar.close()
    metrics.close()
    trace.close()
    summary = {"step": step, "stopped_by": stopped_by, "tokens_seen": tokens_seen, "start_step": start_step,
               "nonfinite_steps": nonfinite_total, "last_checkpoint": ckpt.latest_complete(ckpt_dir),
               "world_size": world, "zero_stage": stage, "peak_flops": peak, "peak_source": peak_source}
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
    print(json.dumps(deepspeed_config(load_config(a.config, rest), a.world_size, a.gpu), indent=2))
