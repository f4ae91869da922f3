"""The training loop's decisions: when it reads a step's numbers, logs, evaluates, saves and stops.

Pure Python over ``train.*`` and the counters of the steps read so far -- no torch, no
DeepSpeed -- so every decision is unit-tested on its own (tests/train/test_schedule.py).
:class:`HostFlags` is what the host adds to a step's all-reduced vector; :class:`Cadence` holds what depends on the step number alone; :class:`LoopState` holds the
counters that the steps' all-reduced numbers (:class:`~m6rec.train.step.StepStats`) update,
and the decisions that depend on them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional


@dataclasses.dataclass(frozen=True)
class HostFlags:
    """What the host adds to a step's all-reduced vector, summed over ranks: a stop signal, the
    stop file (rank 0 looks), time to save (``train.save_every_minutes``), the loader's skipped
    samples and corrupt shards, and the documents rewritten for infilling.  Summed, a flag is
    non-zero when any rank raised it, so every rank takes the same branch."""
    signalled: float = 0.0
    stop_file: float = 0.0
    time_save: float = 0.0
    skipped: float = 0.0
    corrupt: float = 0.0
    infilled: float = 0.0

    def values(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in dataclasses.fields(self)]


#: the host flags and data counters of a step's vector that the loop keeps (the latest read); a
#: time to save is a save made due instead (LoopState.save_due)
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(HostFlags) if f.name != "time_save")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """What happens at optimizer step ``step`` (1-based: the step just queued) by its number."""
    steps: int
    log_every: int
    eval_every: int = 0
    save_every: int = 0
    save_every_minutes: float = 0.0

    @classmethod
    def from_config(cls, t) -> "Cadence":
        """``t``: the config's ``train`` section."""
        return cls(t.steps, t.log_every, t.eval_every, t.save_every, t.save_every_minutes)

    def final(self, step: int) -> bool:
        return step == self.steps

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or self.final(step)

    def eval_due(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or self.final(step))

    def save_due(self, step: int) -> bool:
        """``train.save_every`` (``save_every_minutes`` is a host flag: :meth:`time_to_save`)."""
        return bool(self.save_every) and step % self.save_every == 0

    def time_to_save(self, seconds_since_save: float) -> bool:
        return bool(self.save_every_minutes) and seconds_since_save >= 60 * self.save_every_minutes

    @staticmethod
    def read_upto(step: int, log_now: bool, tracing: bool) -> Optional[int]:
        """Which queued steps to read now: up to the previous one (long computed, so the read
        does not wait for the device), or all of them (None) on a log step and when tracing."""
        return None if log_now or tracing else step - 1


@dataclasses.dataclass
class LoopState:
    """The loop's counters, updated from each step's numbers in step order (:meth:`account`)."""
    cadence: Cadence
    max_nonfinite: int
    loss_divisor: float  # ranks x micro-batches: the all-reduced loss sum over this is the step's mean loss
    step: int = 0
    tokens_seen: int = 0
    nonfinite_total: int = 0
    consecutive_nonfinite: int = 0
    save_due: bool = False
    interval_losses: list = dataclasses.field(default_factory=list)
    shared: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SHARED_FIELDS, 0.0))

    def account(self, values: dict) -> float:
        """Take one step's all-reduced numbers (``StepStats.values()``); returns its mean loss
        (NaN when some rank's loss or gradient was non-finite: the update was skipped)."""
        self.tokens_seen += int(values["tokens"])
        self.shared.update({k: values[k] for k in SHARED_FIELDS})
        self.save_due |= bool(values["time_save"])
        if values["nonfinite"]:
            self.consecutive_nonfinite += 1
            self.nonfinite_total += 1
            return float("nan")
        self.consecutive_nonfinite = 0
        loss = values["loss_sum"] / self.loss_divisor
        self.interval_losses.append(loss)
        return loss

    def take_interval_loss(self) -> float:
        """The mean loss of the steps read since the last log line (NaN if all were skipped)."""
        losses, self.interval_losses = self.interval_losses, []
        return sum(losses) / len(losses) if losses else float("nan")

    def stop_requested(self, stop_at: set) -> Optional[str]:
        """Why the loop stops after this step, or None: ``"signal"`` or ``"stop_file"`` on some rank
        (as last read), or ``"stop_at"`` (the test hook).  Taken now: the reads before the
        checkpoint replace the flags with the next step's."""
        if self.shared["signalled"]:
            return "signal"
        if self.shared["stop_file"]:
            return "stop_file"
        return "stop_at" if self.step in stop_at else None

    def must_read_all(self, stop_request: Optional[str]) -> bool:
        """A checkpoint holds this step's counters and is never written after a skipped update:
        before one may be written (and while steps are being skipped) every queued step is read."""
        return bool(stop_request or self.save_due or self.cadence.final(self.step) or self.consecutive_nonfinite)

    def abort_due(self) -> bool:
        return self.consecutive_nonfinite >= self.max_nonfinite

    def save_reason(self, stop_request: Optional[str]) -> Optional[str]:
        """Why a checkpoint is written now, or None.  Saves wait for a step with a finite loss."""
        if not (self.save_due or stop_request or self.cadence.final(self.step)) or self.consecutive_nonfinite:
            return None
        return "preempted" if stop_request else "scheduled" if self.step < self.cadence.steps else "final"


def finite_or_none(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None
