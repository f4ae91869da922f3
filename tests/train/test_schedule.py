"""The training loop's decisions without DeepSpeed: m6rec/train/schedule.py on its own, and
Trainer.train's order of reads, logs, saves and stops driven by scripted step results.

The loop tests build a Trainer without its __init__ (no model, engine or loaders) and give it
a step runner that returns real StepStats over scripted vectors; the multi-rank and resume
tests (test_train_multirank.py) run the same loop with real DeepSpeed ranks."""
import math

import pytest
import torch

from m6rec.train.schedule import Cadence, HostFlags, LoopState
from m6rec.train.step import StepStats
from m6rec.train.trainer import NonFiniteLossError, Trainer


def values(loss_sum=2.0, tokens=10, **flags):
    v = {"loss_sum": loss_sum, "tokens": tokens, **HostFlags(**flags).__dict__}
    v["nonfinite"] = not math.isfinite(loss_sum)
    return v


def test_cadence_by_step_number():
    c = Cadence(steps=10, log_every=4, eval_every=5, save_every=3, save_every_minutes=0.5)
    assert [s for s in range(1, 11) if c.log_due(s)] == [4, 8, 10]  # the last step always logs
    assert [s for s in range(1, 11) if c.eval_due(s)] == [5, 10]
    assert [s for s in range(1, 11) if c.save_due(s)] == [3, 6, 9]  # the final save is save_reason's
    assert not Cadence(steps=10, log_every=1).eval_due(10)  # eval_every 0: never, not even at the end
    assert c.time_to_save(30.0) and not c.time_to_save(29.9)
    assert not Cadence(steps=10, log_every=1).time_to_save(1e9)
    assert Cadence.read_upto(7, log_now=False, tracing=False) == 6  # one step late: no wait on the device
    assert Cadence.read_upto(7, log_now=True, tracing=False) is None
    assert Cadence.read_upto(7, log_now=False, tracing=True) is None


def test_loop_state_accounts_steps_in_order():
    s = LoopState(Cadence(steps=10, log_every=5), max_nonfinite=2, loss_divisor=4.0)
    assert s.account(values(loss_sum=8.0, tokens=7, skipped=2)) == 2.0
    assert s.tokens_seen == 7 and s.shared["skipped"] == 2 and not s.save_due
    assert math.isnan(s.account(values(loss_sum=float("nan"), tokens=5, time_save=1)))
    assert (s.consecutive_nonfinite, s.nonfinite_total, s.tokens_seen, s.save_due) == (1, 1, 12, True)
    s.step = 2
    assert s.must_read_all(stop_request=None)  # a save is due
    assert s.save_reason(stop_request=None) is None  # never right after a skipped update
    assert not s.abort_due()
    s.account(values(loss_sum=float("inf")))
    assert s.abort_due() and s.nonfinite_total == 2
    assert s.account(values(loss_sum=4.0)) == 1.0 and s.consecutive_nonfinite == 0
    assert s.save_reason(stop_request=None) == "scheduled"
    assert s.take_interval_loss() == 1.5 and s.interval_losses == []
    assert math.isnan(s.take_interval_loss())


def test_loop_state_stop_and_final_save_reasons():
    s = LoopState(Cadence(steps=10, log_every=5), max_nonfinite=3, loss_divisor=1.0, step=4)
    assert s.stop_requested(stop_at=set()) is None and s.stop_requested(stop_at={4}) == "stop_at"
    s.account(values(stop_file=1))
    assert s.stop_requested(stop_at={4}) == "stop_file"
    s.account(values(stop_file=1, signalled=2))
    assert s.stop_requested(stop_at=set()) == "signal"
    assert s.save_reason(stop_request="signal") == "preempted"
    assert s.save_reason(stop_request=None) is None and not s.must_read_all(stop_request=None)
    s.step = 10
    assert s.must_read_all(stop_request=None) and s.save_reason(stop_request=None) == "final"


class ScriptedRunner:
    """TrainStep.run's contract (queue step ``step``, return its StepStats) with scripted numbers:
    ``losses[step]`` is the step's loss sum (default 1.0), the host flags are the trainer's own."""

    def __init__(self, losses=None):
        self.losses = losses or {}
        self.ran = []

    def run(self, step, lr, batches, host):
        self.ran.append(step)
        flags = host() if callable(host) else host
        vector = torch.tensor([self.losses.get(step, 1.0), 3.0, *flags.values()], dtype=torch.float64)
        return StepStats(vector, [vector[0]], [None], lr, 3)

    def grad_norm(self):
        return 0.5


class Metrics:
    def __init__(self):
        self.rows = {}

    def log(self, step, row):
        self.rows[step] = dict(row)

    def close(self):
        pass


def scripted_trainer(tmp_path, steps=10, log_every=5, eval_every=0, save_every=0, max_nonfinite=3, losses=None,
                     signal_at=None, stop_at=()):
    """A Trainer without model, engine or loaders: ``train()`` runs its own loop over a
    :class:`ScriptedRunner`; saves, validations and the host flags are recorded."""
    from types import SimpleNamespace

    from m6rec.train.metrics import StepTimer, progress
    from m6rec.train.trace import Trace

    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(train=SimpleNamespace(lr=1e-3, min_lr=1e-4, warmup_steps=0, steps=steps,
                                                  max_nonfinite=max_nonfinite, precision="fp32", infill_rate=0))
    t.cadence = Cadence(steps=steps, log_every=log_every, eval_every=eval_every, save_every=save_every)
    t.state = LoopState(t.cadence, max_nonfinite, loss_divisor=1.0)
    t.train_step, t.pending, t.rank, t.world, t.engine = ScriptedRunner(losses), [], 0, 1, None
    t.trace, t.timer, t.bar, t.metrics = Trace(tmp_path, 0), StepTimer(), progress(steps, rank=1), Metrics()
    t.compile_note, t.start_step, t.last_saved, t.stop_at, t.stopped_by = False, 0, 0, set(stop_at), "steps"
    t.stop, t.run_dir, t.ckpt_dir = SimpleNamespace(signal=None), tmp_path, tmp_path / "checkpoints"
    t.saves, t.validated = [], []
    t.micro_batches = lambda: ([{}], 0)
    t.host_flags = lambda infilled: HostFlags(signalled=float(t.state.step + 1 == signal_at))
    t.log_row = lambda lr: {"loss": t.state.take_interval_loss(), "tokens_seen": t.state.tokens_seen}
    t.validate = lambda: t.validated.append(t.state.step) or {"val_loss": 0.0}

    def save(reason):
        t.saves.append((t.state.step, reason, t.state.tokens_seen))
        t.last_saved, t.state.save_due = t.state.step, False

    t.save = save
    t.finish = lambda: {"step": t.state.step, "stopped_by": t.stopped_by, "tokens_seen": t.state.tokens_seen}
    return t


def test_loop_logs_evaluates_and_saves_on_schedule(tmp_path):
    t = scripted_trainer(tmp_path, steps=10, log_every=5, eval_every=4, save_every=4)
    summary = t.train()
    assert summary == {"step": 10, "stopped_by": "steps", "tokens_seen": 30}
    assert sorted(t.metrics.rows) == [4, 5, 8, 10]  # log steps, and eval steps (val_loss alone)
    assert t.metrics.rows[5] == {"loss": 1.0, "tokens_seen": 15}  # every step read on a log step
    assert t.validated == [4, 8, 10]
    # a checkpoint holds its own step's counters: every queued step is read before it
    assert t.saves == [(4, "scheduled", 12), (8, "scheduled", 24), (10, "final", 30)]


def test_loop_reads_a_step_one_step_late_and_stops_on_a_signal(tmp_path):
    t = scripted_trainer(tmp_path, steps=10, log_every=100, signal_at=3)
    summary = t.train()
    # step 3 raised the flag; its numbers are read after step 4 is queued: stop there, saved
    assert summary["stopped_by"] == "signal on another rank" and summary["step"] == 4
    assert t.train_step.ran == [0, 1, 2, 3] and t.saves == [(4, "preempted", 12)]
    t = scripted_trainer(tmp_path, steps=10, log_every=100, stop_at={6})
    assert t.train()["stopped_by"] == "stop_at@6" and t.saves == [(6, "preempted", 18)]


def test_loop_never_saves_after_a_skipped_update(tmp_path):
    t = scripted_trainer(tmp_path, steps=10, log_every=100, save_every=4, losses={3: float("nan")})
    t.train()
    # step 4 (0-based 3) was skipped: its save waits for step 5, the next finite one
    assert t.saves == [(5, "scheduled", 15), (8, "scheduled", 24), (10, "final", 30)]
    assert t.state.nonfinite_total == 1 and t.state.consecutive_nonfinite == 0


def test_loop_stops_after_max_nonfinite_in_a_row(tmp_path):
    nan = float("nan")
    t = scripted_trainer(tmp_path, steps=10, log_every=2, save_every=1, max_nonfinite=2, losses={2: nan, 3: nan})
    with pytest.raises(NonFiniteLossError, match="non-finite at 2 consecutive steps"):
        t.train()
    assert t.state.step == 4 and t.saves == [(1, "scheduled", 3), (2, "scheduled", 6)]
    assert math.isnan(t.metrics.rows[4]["loss"]) and t.metrics.rows[4]["tokens_seen"] == 12
