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
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from m6rec.config import Config, ConfigError, save_config, to_dict
from m6rec.data.infill import infill_documents
from m6rec.train import checkpoint as ckpt
from m6rec.train.distributed import init_distributed
from m6rec.train.ds_config import deepspeed_config, effective_zero_stage
from m6rec.train.optim import lr_at
from m6rec.train.resume import convert_for_resume, load_resume, plan_resume
from m6rec.train.signals import STOP_FILE, StopFlag, shielded_children
from m6rec.train.step import HostFlags, StepStats, build_engine, prepare_inputs
from m6rec.train.trace import Trace

log = logging.getLogger("m6rec.train")

class NonFiniteLossError(RuntimeError):
    """The loss was non-finite at train.max_nonfinite consecutive steps."""



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
    plan = plan_resume(ckpt_dir, resume, cfg, world, margs)
    if plan is not None:
        convert_for_resume(plan, ckpt_dir, rank)
    engine, optimizer, runner, ds_config = build_engine(
        cfg, model, world, device, load_universal=plan is not None and plan["mode"] == "universal")
    if rank == 0:
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
    train_loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=rank, world_size=world,
                                            pin_memory=on_gpu)
    val_loader = StreamLoader.from_config(cfg.data, "valid", train=False, rank=rank, world_size=world,
                                          pin_memory=on_gpu)
    client = load_resume(engine, optimizer, ckpt_dir, plan, train_loader)
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
    trace = Trace(run_dir, rank)
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

        def host_flags() -> HostFlags:
            stop_file = rank == 0 and (run_dir / STOP_FILE).exists()
            time_save = bool(cfg.train.save_every_minutes) and \
                time.time() - last_save_time >= 60 * cfg.train.save_every_minutes
            stats = train_loader.stats
            return HostFlags(signalled=float(stop.signal is not None), stop_file=float(stop_file),
                             time_save=float(time_save), skipped=stats["skipped_samples"],
                             corrupt=stats["corrupt_shards"], infilled=infilled)

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
