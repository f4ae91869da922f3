"""The training loop: DeepSpeed ZeRO engine, streaming shards, atomic checkpoints, metrics.

One entry, :func:`train`, runs unchanged under the ``deepspeed`` launcher,
``torchrun``, ``accelerate launch``, ``srun`` and as a single plain process
(:func:`init_distributed` reads whichever environment is there).

The loop, per optimizer step::

    for each micro-batch of the step:   forward → agree on finiteness → backward → engine.step()
    every log_every:   one metrics line (console, JSONL, W&B)
    every eval_every:  validation loss over the validation split
    every save_every / save_every_minutes, on SIGTERM/SIGUSR1 (after the step), at the end: checkpoint

Decisions every rank must share (stop, save, skip a non-finite update) are
taken together through one small all-reduce per step, so no rank can wait in
a collective the others never enter.
"""
from __future__ import annotations

import dataclasses
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


def init_distributed() -> tuple[int, int, torch.device]:
    launcher_env()
    if torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# ---------------------------------------------------------------------------
# DeepSpeed configuration: rendered from the one config tree
# ---------------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int, on_gpu: bool) -> dict[str, Any]:
    t, z, s = cfg.train, cfg.deepspeed, cfg.data.stream
    if z.offload_optimizer and not on_gpu:
        raise ConfigError("config key 'deepspeed.offload_optimizer': true needs GPUs "
                          "(without one the optimizer already lives on the CPU)")
    if t.precision == "fp16" and not on_gpu:
        raise ConfigError("config key 'train.precision': 'fp16' needs a GPU (CPU kernels lack fp16); "
                          "use 'bf16' or 'fp32' here")
    zero: dict[str, Any] = {
        "stage": z.zero_stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": s.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a torch AdamW on CPU
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 1 << 30,  # m6rec logs its own metrics
        "wall_clock_breakdown": False,
    }
    if on_gpu:
        # DeepSpeed's fused Adam kernels on GPU (CPU-Adam with offload).
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": t.weight_decay}}
    return ds


def lr_lambda(cfg: Config):
    """Linear warmup to train.lr, cosine decay to train.min_lr at train.steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return (t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))) / t.lr

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (1-D weights and the token table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------
# Signals: finish the step, checkpoint, exit 0
# ---------------------------------------------------------------------------
class StopFlag:
    """Set by SIGTERM/SIGUSR1, or by a file ``RUN_DIR/STOP`` (what slurm/train.sbatch
    touches: launchers such as deepspeed's do not forward SIGUSR1 to the ranks)."""

    def __init__(self, stop_file: Path):
        self.signal: Optional[int] = None
        self.stop_file = stop_file
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def requested(self) -> bool:
        return self.signal is not None or self.stop_file.exists()

    def reason(self) -> str:
        if self.signal is not None:
            return "signal " + signal.Signals(self.signal).name
        return f"stop file {self.stop_file}" if self.stop_file.exists() else "stop on another rank"


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def _fault_steps(name: str) -> set[int]:
    """Test hook: ``M6REC_FAULT=nan_loss@3,4`` makes the loss non-finite at those steps."""
    spec = os.environ.get("M6REC_FAULT", "")
    if not spec.startswith(name + "@"):
        return set()
    return {int(x) for x in spec.split("@", 1)[1].split(",")}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _manifest(cfg: Config) -> dict:
    path = Path(cfg.data.output) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"config key 'data.output': no prepared dataset at {cfg.data.output} "
                          f"(manifest.json missing); run `m6rec prepare --config ...` first")
    return json.loads(path.read_text())


def model_config_for(cfg: Config, manifest: dict):
    """The model config with the vocabulary and image geometry of the prepared data."""
    m = dataclasses.replace(cfg.model, vocab_size=manifest["vocab_size"],
                            max_seq_len=max(cfg.model.max_seq_len, cfg.data.stream.seq_len))
    return dataclasses.replace(cfg, model=m, data=dataclasses.replace(
        cfg.data, images=dataclasses.replace(cfg.data.images, size=manifest["image"]["size"],
                                             patch_size=manifest["image"]["patch_size"])))


def evaluate(engine, loader, device, max_batches: int) -> float:
    """Token-weighted mean loss over the validation stream (same steps on every rank)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            out = engine(**_to_device(batch, device))
            n = out.n_tokens.double()
            total += torch.stack([out.loss.double() * n, n])
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def train(cfg: Config, resume: str = "none") -> dict:
    """Run training; returns a summary (last step, last metrics, why it stopped)."""
    import deepspeed

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
    cfg = model_config_for(cfg, manifest)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # A STOP file left by the run that was stopped is stale now (ranks look only
        # inside the loop, after deepspeed.initialize's barriers).
        (run_dir / "STOP").unlink(missing_ok=True)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)

    model = build_model(cfg, device=device)
    margs = ModelArgs.from_config(cfg)
    ds_config = deepspeed_config(cfg, world, on_gpu)
    optimizer = None
    if not on_gpu:
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=(0.9, 0.95), eps=1e-8)
    if optimizer is None:
        ds_params = _param_groups(model, cfg.train.weight_decay)
    else:
        ds_params = None
    # The scheduler goes to DeepSpeed: it steps it at accumulation boundaries and
    # saves it in its checkpoints.
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, model_parameters=ds_params,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    train_loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=rank, world_size=world)
    val_loader = StreamLoader.from_config(cfg.data, "valid", train=False, rank=rank, world_size=world)

    step, tokens_seen, skipped_nonfinite = 0, 0, 0
    if resume not in ("none", "auto") and not resume.startswith("step"):
        raise ConfigError(f"--resume: expected 'auto', 'none' or a checkpoint tag like step00000100, got {resume!r}")
    tag = ckpt.latest_complete(ckpt_dir) if resume == "auto" else (resume if resume != "none" else None)
    if tag is not None:
        saved_world = ckpt.saved_world_size(ckpt_dir, tag)
        if saved_world and saved_world != world:
            raise ConfigError(
                f"checkpoint {ckpt_dir / tag} was written by {saved_world} ranks, this run has {world}: "
                f"resuming ZeRO optimizer shards on a different world size needs a universal checkpoint "
                f"(docs/training.md#changing-the-number-of-gpus)")
        client, rank_state = ckpt.load(engine, ckpt_dir, tag)
        step, tokens_seen = client["step"], client["tokens_seen"]
        train_loader.load_state_dict(client["stream"])
        if rank_state is not None:
            ckpt.set_rng_state(rank_state["rng"])
        if rank == 0:
            log.info("resumed from %s at step %d", ckpt_dir / tag, step)

    metrics = MetricsLogger(run_dir, to_dict(cfg), rank, world, cfg.train.wandb)
    peak, peak_source = peak_flops(cfg.train.precision, device, configured=cfg.train.peak_flops)
    fpt = flops_per_token(margs, cfg.data.stream.seq_len)["total"]
    stop = StopFlag(run_dir / "STOP")
    bar = progress(total=cfg.train.steps, initial=step, desc="train", rank=rank)
    accum = cfg.train.grad_accum
    timer = StepTimer()
    last_save_time = time.time()
    interval_loss, interval_steps = 0.0, 0
    stopped_by = "steps"
    batches = iter(train_loader)
    consecutive_nonfinite = 0
    nan_steps = _fault_steps("nan_loss")

    def save_now(reason: str):
        nonlocal last_save_time
        client = {"step": step, "tokens_seen": tokens_seen, "stream": train_loader.state_dict(),
                  "reason": reason, "world_size": world}
        with timer.paused():
            ckpt.save(engine, ckpt_dir, step, client, {"rng": ckpt.rng_state()}, cfg.train.keep_last)
        last_save_time = time.time()

    while step < cfg.train.steps:
        step_tokens, step_loss, nonfinite_here = 0, 0.0, False
        for _ in range(accum):
            with timer.waiting_for_data():
                try:
                    batch = next(batches)
                except StopIteration:  # the epoch ended: the loader moved on to the next one
                    batches = iter(train_loader)
                    batch = next(batches)
            b = _to_device(batch, device)
            loss = engine(**b).loss
            if step in nan_steps:
                loss = loss * float("nan")  # test hook (M6REC_FAULT=nan_loss@N,M)
            bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=device)
            if dist.is_initialized():
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item():
                # Every rank skips this micro-batch together: no update from it,
                # and no rank waits in a gradient all-reduce the others skip.
                nonfinite_here = True
                continue
            engine.backward(loss)
            engine.step()
            step_tokens += int((b["document_ids"] >= 0).sum())  # real (non-pad) tokens processed
            step_loss += loss.item()  # .item() syncs the device: the step time is real
        if nonfinite_here:
            consecutive_nonfinite += 1
            skipped_nonfinite += 1
            if consecutive_nonfinite >= cfg.train.max_nonfinite:
                bar.close()
                metrics.close()
                raise RuntimeError(
                    f"stopping at step {step}: the loss was non-finite at {consecutive_nonfinite} consecutive "
                    f"steps (train.max_nonfinite={cfg.train.max_nonfinite}); those updates were skipped and no "
                    f"checkpoint was written after them. Lower train.lr, prefer bf16 to fp16, or check the data.")
        else:
            consecutive_nonfinite = 0
        step += 1
        tokens_seen += step_tokens * world
        timer.step_done(step_tokens)
        interval_loss += step_loss / accum
        interval_steps += 1
        bar.update(1)

        # One all-reduce decides what every rank does next.
        decide = torch.tensor([
            1.0 if stop.requested() else 0.0,
            1.0 if (cfg.train.save_every_minutes
                    and time.time() - last_save_time >= 60 * cfg.train.save_every_minutes) else 0.0,
            interval_loss,
        ], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(decide, op=dist.ReduceOp.SUM)
        want_stop, want_time_save, loss_sum = decide.tolist()

        row: dict[str, Any] = {}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            row = {
                "loss": loss_sum / world / max(1, interval_steps),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                **timer.interval_metrics(world, fpt, peak),
                "tokens_seen": tokens_seen,
                "samples_skipped": train_loader.stats.get("skipped_samples", 0),
                "corrupt_shards": train_loader.stats.get("corrupt_shards", 0),
                "nonfinite_steps": skipped_nonfinite,
                "epoch": train_loader.epoch,
                **memory_stats(device),
            }
            if cfg.train.precision == "fp16":
                row["loss_scale"] = float(getattr(optimizer, "cur_scale", float("nan")))
            interval_loss, interval_steps = 0.0, 0
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps):
            with timer.paused():
                row["val_loss"] = evaluate(engine, val_loader, device, cfg.train.eval_batches)
        if row:
            metrics.log(step, row)

        if want_stop:
            stopped_by = stop.reason()
            save_now("preempted")
            break
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or want_time_save or step == cfg.train.steps:
            save_now("scheduled" if step < cfg.train.steps else "final")
    bar.close()
    metrics.close()
    summary = {"step": step, "stopped_by": stopped_by, "tokens_seen": tokens_seen,
               "skipped_nonfinite": skipped_nonfinite, "peak_flops": peak, "peak_source": peak_source}
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(cfg: Config, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(cfg, resume=args.resume)
    return 0
