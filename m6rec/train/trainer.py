"""The training run: :class:`Trainer` builds the DeepSpeed ZeRO engine, the streaming loaders and
the sinks, resumes, and runs the loop; :func:`train` is the one entry.

:func:`train` runs unchanged under the ``deepspeed`` launcher, ``torchrun``, ``accelerate
launch``, ``srun`` and as a single plain process (m6rec/train/distributed.py reads whichever
environment is there).  One step of :meth:`Trainer.train`::

    lr = lr_at(step)                           a pure function of the step: nothing to save
    micro-batches (infilled at train.infill_rate)
    TrainStep.run: for each micro-batch prepare_inputs -> forward -> backward; one all-reduce of
                   one vector (loss sum, tokens, HostFlags: signal, stop file, time to save, data
                   counters) -- every rank takes the same branches; engine.step(), whose optimizer
                   skips a non-finite update on the device
    read the PREVIOUS step's vector (the step's one host sync; log/save/stop steps read this one too)
    every log_every:       one metrics line (console, JSONL, W&B)
    every eval_every:      validation loss (and train.select_by's ranking metric)
    every save_every, save_every_minutes, on a stop, at the end: checkpoint

When to read, log, evaluate, save and stop is decided in m6rec/train/schedule.py (pure, unit
tested); the step itself is m6rec/train/step.py, the optimizer m6rec/train/optim.py.

A non-finite loss on any rank skips the whole optimizer step on every rank:
each micro-batch still runs forward and backward (DeepSpeed's accumulation
and ZeRO's gradient hooks stay in lockstep), and the optimizer leaves every
weight, moment and step count untouched (``StepOnDevice`` on the device;
``skippable`` with a host flag for DeepSpeed's JIT optimizers); ZeRO 1-3
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

from m6rec.config import Config, ConfigError, save_config, sparse_rows_obstacle, to_dict
from m6rec.data.infill import infill_documents
from m6rec.data.loader import StreamLoader
from m6rec.data.negatives import sampler_for
from m6rec.data.vectors import attach_catalog
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.model.info import flops_per_token
from m6rec.train import checkpoint as ckpt
from m6rec.train.distributed import init_distributed
from m6rec.train.ds_config import deepspeed_config, effective_zero_stage
from m6rec.train.item_rows import RowAdam, detach_table
from m6rec.train.metrics import MetricsLogger, StepTimer, memory_stats, progress
from m6rec.train.optim import lr_at
from m6rec.train.peak import peak_flops
from m6rec.train.resume import convert_for_resume, load_resume, plan_resume
from m6rec.train.run_dir import init_from_run
from m6rec.train.schedule import Cadence, HostFlags, LoopState, finite_or_none
from m6rec.train.select import Selector
from m6rec.train.signals import STOP_FILE, StopFlag, shielded_children
from m6rec.train.step import StepStats, build_engine, prepare_inputs
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


def model_config_for(cfg: Config, manifest: dict):
    """The model config with the vocabulary, image geometry and item-vector width of the prepared data."""
    m = dataclasses.replace(cfg.model, vocab_size=manifest["vocab_size"],
                            max_seq_len=max(cfg.model.max_seq_len, cfg.data.stream.seq_len),
                            item_vector_dim=int((manifest.get("item_vectors") or {}).get("dim", 0)))
    return dataclasses.replace(cfg, model=m, data=dataclasses.replace(
        cfg.data, images=dataclasses.replace(cfg.data.images, size=manifest["image"]["size"],
                                             patch_size=manifest["image"]["patch_size"])))


def validation_loss(engine, loader, device, max_batches: int) -> float:
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
            out = engine(prepare_inputs(engine.module, batch, device)[0])
            n = out.n_tokens.double()
            total += torch.stack([out.loss.double() * n, n])
    batches.close()  # stops the loader's workers now, not at garbage collection
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1]).item() if total[1] > 0 else float("nan")


def train(cfg: Config, resume: str = "none") -> dict:
    """Run training; returns a summary (last step, why it stopped, ...)."""
    stop = StopFlag()  # first: a signal during start-up still ends in a clean stop after one step
    try:
        with contextlib.ExitStack() as cleanup:
            return Trainer(cfg, resume, stop, cleanup).train()
    finally:
        stop.restore()


class Trainer:
    """One training run: built in ``__init__`` (model, engine, loaders, resume, sinks), run by :meth:`train`.

    ``cleanup`` closes the loaders (and their workers, the next epoch's among them) however
    the run ends; ``stop`` is the SIGTERM/SIGUSR1 flag, installed before anything else."""
    def __init__(self, cfg: Config, resume: str, stop: StopFlag, cleanup: contextlib.ExitStack):
        self.rank, self.world, self.device = init_distributed()
        on_gpu = self.device.type == "cuda"
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        manifest = _manifest(cfg)
        _warn_truncation(manifest, cfg.data.stream.seq_len, self.rank)
        self.cfg = cfg = model_config_for(cfg, manifest)
        deepspeed_config(cfg, self.world, on_gpu)  # config errors before any work
        self._say_config_notes()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)

        model = build_model(cfg, device=self.device)
        if cfg.model.init_from and cfg.model.init_from.startswith("run:"):
            init_from_run(model, cfg.model.init_from[4:], self.rank)
        if model.item_proj is not None:
            attach_catalog(model, cfg.data.output, cfg.data.text, training=True)
        self.margs = ModelArgs.from_config(cfg)
        plan = plan_resume(self.ckpt_dir, resume, cfg, self.world, self.margs)
        if plan is not None:
            convert_for_resume(plan, self.ckpt_dir, self.rank)
        negatives = sampler_for(cfg, model, self.rank) if cfg.train.item_loss == "sampled" else None
        sparse_rows = negatives is not None and sparse_rows_obstacle(cfg) is None \
            and cfg.train.sparse_item_rows is not False
        if sparse_rows:
            detach_table(model)  # before the engine: the table is then not one of its parameters
        self.engine, self.optimizer, self.train_step, ds_config = build_engine(
            cfg, model, self.world, self.device, load_universal=plan is not None and plan["mode"] == "universal")
        self.train_step.negatives = negatives
        if sparse_rows:
            self.train_step.rows = RowAdam(model.tok_embeddings.weight, model.row_grads, clip=cfg.train.grad_clip)
        if self.rank == 0:
            (self.run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
        self.train_loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=self.rank,
                                                     world_size=self.world, pin_memory=on_gpu)
        self.val_loader = StreamLoader.from_config(cfg.data, "valid", train=False, rank=self.rank,
                                                   world_size=self.world, pin_memory=on_gpu)
        self.batches = iter(self.train_loader)
        cleanup.callback(self.val_loader.close)
        cleanup.callback(self.train_loader.close)
        cleanup.callback(lambda: self.batches.close())  # the current epoch's (rebound per epoch)
        client = load_resume(self.engine, self.optimizer, self.ckpt_dir, plan, self.train_loader)
        if self.train_step.rows is not None and "item_rows" in client:
            self.train_step.rows.load_state_dict(client["item_rows"])
        self.stage = effective_zero_stage(cfg, self.world)
        self.selector = None  # train.select_by: the validation ranking metric and the best tag
        if cfg.train.select_by:
            self.selector = Selector(cfg, self.run_dir, self.rank, self.world, self.stage, resumed=bool(client))

        self.cadence = Cadence.from_config(cfg.train)
        self.state = LoopState(self.cadence, cfg.train.max_nonfinite, loss_divisor=self.world * cfg.train.grad_accum,
                               step=client.get("step", 0), tokens_seen=client.get("tokens_seen", 0),
                               nonfinite_total=client.get("nonfinite_steps", 0))
        self.start_step = self.last_saved = self.state.step
        self.last_save_time = time.time()
        self.pending: list[tuple[int, StepStats]] = []  # queued steps whose numbers are not read yet
        self.stop, self.stop_at, self.stopped_by = stop, ckpt.fault_steps("stop_at"), "steps"
        self.special = manifest["special_tokens"]
        self.meta = {"world_size": self.world, "zero_stage": self.stage, "precision": cfg.train.precision,
                     "model_args": self.margs.to_dict(), "tokenizer": str(Path(cfg.data.output) / "tokenizer.json")}
        self.metrics = MetricsLogger(self.run_dir, to_dict(cfg), self.rank, self.world, cfg.train.wandb,
                                     resume_step=self.state.step if client else None)
        self.peak, self.peak_source = peak_flops(cfg.train.precision, self.device, configured=cfg.train.peak_flops)
        self.flops_per_token = flops_per_token(self.margs, cfg.data.stream.seq_len)["total"]
        self.trace = Trace(self.run_dir, self.rank)
        if client:  # tracing: the weights and optimizer state right after the load (the resume tests compare them)
            step = self.state.step
            self.trace.final_weights(self.engine, self.run_dir / "trace" / f"resumed_step{step:08d}.safetensors")
            self.trace.optimizer_state(self.engine, self.optimizer,
                                       self.run_dir / "trace" / f"state_resumed_step{step:08d}.safetensors")
        self.bar = progress(total=cfg.train.steps, initial=self.state.step, desc="train", rank=self.rank)
        self.timer = StepTimer()
        if self.stage != cfg.deepspeed.zero_stage and self.rank == 0:
            log.info("one rank: deepspeed.zero_stage %d would partition nothing, running as ZeRO stage 0",
                     cfg.deepspeed.zero_stage)
        self.compile_note = self.margs.compile

    def train(self) -> dict:
        """The loop; the module docstring draws one step of it."""
        s, cadence = self.state, self.cadence
        while s.step < cadence.steps:
            lr = lr_at(self.cfg, s.step)
            batches, infilled = self.micro_batches()
            queued = self.train_step.run(s.step, lr, batches, lambda: self.host_flags(infilled))
            s.step += 1
            self.pending.append((s.step, queued))
            log_now = cadence.log_due(s.step)
            self.settle(cadence.read_upto(s.step, log_now, tracing=self.trace.file is not None))
            self.note_compile(queued)
            self.timer.step_done(queued.tokens)
            self.bar.update(1)
            stop_request = s.stop_requested(self.stop_at)
            s.save_due |= cadence.save_due(s.step)
            if s.must_read_all(stop_request):
                self.settle()
            row = self.log_row(lr) if log_now else {}
            if s.abort_due():
                self.abort(row)
            if cadence.eval_due(s.step):
                row.update(self.validate())
            if row:
                self.metrics.log(s.step, row)
            if s.save_due or stop_request:
                self.settle()  # (a save decided after the read above, e.g. a better validation ranking)
            reason = s.save_reason(stop_request)
            if reason:
                self.save(reason)
            if stop_request:
                self.stopped_by = self.stop_reason(stop_request)
                break
        return self.finish()

    # -- the loop's parts ------------------------------------------------------------------
    def micro_batches(self) -> tuple[list[dict], int]:
        """The step's ``train.grad_accum`` batches (infilled at ``train.infill_rate``) and the
        number of documents rewritten for infilling."""
        batches, infilled = [], 0
        for micro in range(self.cfg.train.grad_accum):
            batch = self.next_batch()
            if self.cfg.train.infill_rate > 0:
                rng = np.random.default_rng((self.cfg.train.seed, self.state.step, self.rank, micro))
                infilled += infill_documents(batch, self.cfg.train.infill_rate, rng, self.special)
            batches.append(batch)
        self.queued_at = time.perf_counter()  # the step is queued from here on
        return batches, infilled

    def next_batch(self) -> dict:
        with self.timer.waiting_for_data(), shielded_children():  # a new epoch's first next() starts workers
            try:
                return next(self.batches)
            except StopIteration:  # the epoch ended: the loader moved on to the next one
                self.batches = iter(self.train_loader)
                return next(self.batches)

    def host_flags(self, infilled: int) -> HostFlags:
        """The host's part of the step's vector, looked at once the micro-batches are queued."""
        stop_file = self.rank == 0 and (self.run_dir / STOP_FILE).exists()
        stats = self.train_loader.stats
        return HostFlags(signalled=float(self.stop.signal is not None), stop_file=float(stop_file),
                         time_save=float(self.cadence.time_to_save(time.time() - self.last_save_time)),
                         skipped=stats["skipped_samples"], corrupt=stats["corrupt_shards"], infilled=infilled)

    def settle(self, upto: Optional[int] = None) -> None:
        """Read the numbers of the queued steps up to ``upto`` (default: all) -- the host sync --
        and account for them in order."""
        while self.pending and (upto is None or self.pending[0][0] <= upto):
            at, stats = self.pending.pop(0)
            loss = self.state.account(stats.values())
            nonfinite = not math.isfinite(loss)
            self.trace.write(self.engine, step=at, loss=loss.hex(), lr=stats.lr, skipped=nonfinite, keys=stats.keys,
                             local=[float(x).hex() for x in stats.local_losses])
            if nonfinite:
                log.warning("step %d: non-finite loss (or gradient) on some rank; update skipped (%d in a row, "
                            "%d in all)", at, self.state.consecutive_nonfinite, self.state.nonfinite_total)

    def note_compile(self, queued: StepStats) -> None:
        if self.compile_note:
            queued.values()
            log.info("first step %.1f s (includes compiling the %d blocks: model.compile)",
                     time.perf_counter() - self.queued_at, self.margs.n_layers)
            self.compile_note = False

    def log_row(self, lr: float) -> dict[str, Any]:
        s = self.state
        row = {
            "loss": s.take_interval_loss(),
            "lr": lr,
            "grad_norm": None if s.consecutive_nonfinite else finite_or_none(self.train_step.grad_norm()),
            **self.timer.interval_metrics(self.world, self.flops_per_token, self.peak),
            "tokens_seen": s.tokens_seen,
            "samples_skipped": int(s.shared["skipped"]),
            "corrupt_shards": int(s.shared["corrupt"]),
            "nonfinite_steps": s.nonfinite_total,
            "epoch": self.train_loader.epoch,
            **memory_stats(self.device),
        }
        if self.cfg.train.precision == "fp16":
            row["loss_scale"] = float(getattr(self.engine.optimizer, "cur_scale", float("nan")))
        if self.cfg.train.infill_rate > 0:
            row["infilled_docs"] = int(s.shared["infilled"])
        return row

    def validate(self) -> dict[str, Any]:
        """Validation loss (and ``train.select_by``'s ranking metric: a better one makes a save due)."""
        with self.timer.paused():
            row = {"val_loss": validation_loss(self.engine, self.val_loader, self.device, self.cfg.train.eval_batches)}
            if self.selector is not None:
                row.update(self.selector.evaluate(self.engine.module, self.state.step))
                self.state.save_due |= self.selector.improved
        return row

    def save(self, reason: str) -> None:
        s = self.state
        client = {"step": s.step, "tokens_seen": s.tokens_seen, "stream": self.train_loader.state_dict(),
                  "nonfinite_steps": s.nonfinite_total, "reason": reason, "world_size": self.world}
        if self.train_step.rows is not None:
            client["item_rows"] = self.train_step.rows.state_dict()
        with self.timer.paused():
            tag = ckpt.save(self.engine, self.ckpt_dir, s.step, client, {"rng": ckpt.rng_state()},
                            self.cfg.train.keep_last, self.meta,
                            protect=self.selector.best_tag if self.selector else None)
        self.last_save_time, self.last_saved, s.save_due = time.time(), s.step, False
        self.trace.optimizer_state(self.engine, self.optimizer,
                                   self.run_dir / "trace" / f"state_saved_step{s.step:08d}.safetensors")
        if self.selector is not None:
            self.selector.saved(s.step, tag)

    def stop_reason(self, requested: str) -> str:
        """Why the run stops early (its checkpoint is written); the stop file is consumed."""
        reason = ("signal " + signal.Signals(self.stop.signal).name if self.stop.signal is not None
                  else "signal on another rank" if requested == "signal"
                  else f"stop file {self.run_dir / STOP_FILE}" if requested == "stop_file"
                  else f"stop_at@{self.state.step}")
        if self.rank == 0:
            # The request is served (checkpoint written): consume the file so the next run does not
            # stop at once.  It is not deleted at start-up, because a USR1 that reaches a requeued
            # job while it starts must still count.
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        return reason

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        self.trace.close()

    def abort(self, row: dict) -> None:
        s = self.state
        self.metrics.log(s.step, row or {"nonfinite_steps": s.nonfinite_total})
        self.close()
        raise NonFiniteLossError(
            f"stopping at step {s.step}: the loss was non-finite at {s.consecutive_nonfinite} consecutive steps "
            f"(train.max_nonfinite={self.cfg.train.max_nonfinite}); those updates were skipped and no checkpoint was "
            f"written after them (the newest is {ckpt.latest_complete(self.ckpt_dir) or 'none'}). "
            f"Lower train.lr, prefer bf16 to fp16, or check the data.")

    def finish(self) -> dict:
        self.settle()
        s = self.state
        if self.cadence.final(s.step) and self.last_saved != s.step and s.step > self.start_step:
            log.warning("step %d: the last step was non-finite; the final checkpoint was not written", s.step)
        self.trace.final_weights(self.engine, self.run_dir / "trace" / "final_weights.safetensors")
        self.close()
        summary = {"step": s.step, "stopped_by": self.stopped_by, "tokens_seen": s.tokens_seen,
                   "start_step": self.start_step, "nonfinite_steps": s.nonfinite_total,
                   "last_checkpoint": ckpt.latest_complete(self.ckpt_dir), "world_size": self.world,
                   "zero_stage": self.stage, "peak_flops": self.peak, "peak_source": self.peak_source,
                   "best": self.selector.best if self.selector else None}
        if self.rank == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _say_config_notes(self) -> None:
        accelerate_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if self.rank == 0 and accelerate_stage not in (None, str(self.cfg.deepspeed.zero_stage)):
            log.warning("accelerate's DeepSpeed plugin says ZeRO stage %s; m6rec uses deepspeed.zero_stage=%d from "
                        "its config (the one source of truth)", accelerate_stage, self.cfg.deepspeed.zero_stage)


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
