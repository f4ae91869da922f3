"""One optimizer step of the DeepSpeed engine, queued without reading anything back.

:func:`build_engine` makes the optimizer, the DeepSpeed engine and the :class:`TrainStep`;
:func:`prepare_inputs` turns a loader batch into the model's inputs; :class:`StepStats` holds
what a step tells every rank (one all-reduced vector), read only when needed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from m6rec.config import Config
from m6rec.model.batch import Batch
from m6rec.train import checkpoint as ckpt
from m6rec.train.ds_config import (
    clips_on_device,
    deepspeed_config,
    effective_zero_stage,
)
from m6rec.train.optim import StepOnDevice, build_optimizer, grad_norm
from m6rec.train.schedule import HostFlags


def prepare_inputs(model, batch: Mapping, device: torch.device,
                   candidates: Optional[Callable[[Batch], Batch]] = None) -> tuple[Batch, int]:
    """The model's inputs for a loader batch, and its number of real (non-padding) tokens.

    Everything that needs values rather than shapes is computed here from the
    loader's CPU tensors, where reading them costs nothing: the final labels and
    their positions (``label_index``), the token count, and -- for the per-document
    kernel -- the document spans of the attention mask.  Tensors go to the device
    from pinned memory without blocking; on CUDA the FlexAttention block mask is
    then built once for the batch from the device copies (shared by every layer,
    and by the recomputation of activation checkpointing).  ``candidates``: adds the sampled item
    loss's candidates to the host batch (:meth:`m6rec.data.negatives.NegativeSampler.attach`)."""
    host = model.label_positions(Batch.of(batch))
    if candidates is not None:
        host = candidates(host)
    n_tokens = int(np.count_nonzero(host.document_ids.numpy() >= 0)) if host.document_ids is not None \
        else host.input_ids.numel()
    inputs = host.to(device, non_blocking=True)
    mask = model.attention_mask(host.input_ids.shape[1], inputs.document_ids, inputs.prefix_mask, device,
                                host_document_ids=host.document_ids, host_prefix_mask=host.prefix_mask)
    return inputs.replace(attention_mask=mask), n_tokens


class StepStats:
    """What one step tells every rank, all-reduced on the device and read only when needed.

    ``vector`` holds ``[loss sum, tokens, signal, stop file, time to save, skipped
    samples, corrupt shards, infilled documents]`` summed over ranks; the loss sum is
    non-finite exactly when some rank's loss (or, where the trainer measures it,
    gradient norm) was.  On CUDA a non-blocking copy to pinned memory is queued behind it, so
    :meth:`values` waits for this step's work only, not for the steps queued
    since: the trainer reads a step's numbers one step late and keeps the device
    busy (or at once, on log and save steps)."""
    FIELDS = ("loss_sum", "tokens", *(f.name for f in dataclasses.fields(HostFlags)))

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
        self.negatives = None  # the sampled item loss's NegativeSampler (the trainer sets it)
        self.rows = None  # the token table's RowAdam (train.sparse_item_rows; the trainer sets it)
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

    def run(self, step: int, lr: float, batches: list[dict],
            host: Union[HostFlags, Callable[[], HostFlags]] = HostFlags()) -> StepStats:
        """Queue optimizer step ``step`` (0-based) at learning rate ``lr``.  ``host`` gives the
        host's numbers for the vector (signal, stop file, time to save, skipped, corrupt,
        infilled): a :class:`HostFlags`, or a function returning one called once the micro-batches are queued, so that
        signals and the clock are looked at as late as possible."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, keys, tokens = [], [], 0
        for micro, batch in enumerate(batches):
            keys.append(batch.get("sample_keys"))
            draw = None if self.negatives is None else functools.partial(self.negatives.attach, step=step, micro=micro)
            inputs, n = prepare_inputs(self.engine.module, batch, self.device, draw)
            tokens += n
            loss = self.engine(inputs).loss
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
        flags = host() if callable(host) else host
        host_part = torch.tensor([tokens, *flags.values()], dtype=torch.float64)
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
        if self.rows is not None:
            self.rows.step(lr, torch.isfinite(vector[0]))
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


def build_engine(cfg: Config, model: torch.nn.Module, world: int, device: torch.device,
                 load_universal: bool = False):
    """What ``m6rec train`` builds around a model -- the optimizer, the DeepSpeed engine and
    the :class:`TrainStep` -- also used as is by the benchmarks.  ``load_universal``: the
    engine's first load reads a universal checkpoint (later saves are ordinary ones).
    Returns ``(engine, optimizer, step, deepspeed_config)``."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    import deepspeed

    on_gpu = device.type == "cuda"
    optimizer = build_optimizer(cfg, model, on_gpu)
    clips = isinstance(optimizer, StepOnDevice) and clips_on_device(cfg, world)
    ds_config = deepspeed_config(cfg, world, on_gpu, optimizer_clips=clips)
    init_config = {**ds_config, "checkpoint": {"load_universal": True}} if load_universal else ds_config
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=init_config)
    return engine, optimizer, TrainStep(engine, optimizer, cfg, device, clips), ds_config

