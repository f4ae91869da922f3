"""Training metrics: step timing, memory, the progress bar, and the sinks (console, JSONL, W&B).

One :class:`MetricsLogger` per process; only rank 0 writes.  Every ``log``
call goes to three sinks: one console line, one JSON line appended to
``RUN_DIR/metrics.jsonl`` (read by ``m6rec plot``), and Weights & Biases.
W&B is optional at run time: if it cannot be imported or started, a warning
is printed once and the other sinks go on, because a dashboard must never
kill a multi-day run.  See docs/wandb.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import netrc
import os
import re
import resource
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

from m6rec.train.peak import mfu

# Metric names written by the trainer, with units.  The logger accepts any
# name; these are the ones the console line, the plot and docs/wandb.md know.
METRICS: dict[str, str] = {
    "loss": "training loss, nats per target token (mean over the log interval)",
    "val_loss": "validation loss, nats per target token",
    "lr": "learning rate after the step",
    "grad_norm": "global L2 norm of the gradients before clipping",
    "loss_scale": "fp16 dynamic loss scale (fp16 only)",
    "tokens_per_s": "tokens/s over all ranks",
    "tokens_per_s_per_device": "tokens/s on one rank",
    "tflops_per_device": "achieved model TFLOP/s on one rank",
    "mfu_pct": "model FLOPs utilization, % of the device's peak FLOP/s",
    "step_time_ms": "wall time per optimizer step, ms (mean over the interval)",
    "data_wait_pct": "% of the interval's wall time spent waiting for the next batch",
    "memory_gib": "CUDA: max allocated since the last log; CPU: process RSS; GiB",
    "memory_reserved_gib": "CUDA only: max reserved by the caching allocator since the last log, GiB",
    "memory_peak_gib": "CPU only: peak process RSS since start, GiB",
    "tokens_seen": "tokens trained on so far, all ranks",
    "samples_skipped": "corrupt samples skipped so far",
    "corrupt_shards": "corrupt shards skipped so far (this epoch, this rank's readers)",
    "epoch": "epoch of the training stream",
    "infilled_docs": "documents trained with the M6 text-infilling objective in the interval (train.infill_rate > 0)",
    "nonfinite_steps": "updates skipped because the loss was not finite, so far",
}


# --------------------------------------------------------------------------
# Step timing and memory
# --------------------------------------------------------------------------
class StepTimer:
    """Wall time per step and the share of it spent waiting for data.

    ``with timer.waiting_for_data(): batch = next(it)``, then
    ``timer.step_done(tokens)`` after the step (after something that syncs the
    device, such as ``loss.item()``, or CUDA time is not counted), and
    ``timer.interval_metrics(...)`` at every log, which also starts a new
    interval.  ``with timer.paused():`` keeps evaluation and checkpoint saves
    out of the throughput numbers.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock  # injectable so tests need not patch the global time module
        self.reset()

    def reset(self) -> None:
        self._start = self._clock()
        self._excluded = self._data_wait = 0.0
        self._steps = self._tokens = 0

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        t = self._clock()
        try:
            yield
        finally:
            self._data_wait += self._clock() - t

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t = self._clock()
        try:
            yield
        finally:
            self._excluded += self._clock() - t

    def step_done(self, tokens: int = 0) -> None:
        self._steps += 1
        self._tokens += int(tokens)

    def interval_metrics(
        self, world_size: int = 1, flops_per_token: Optional[float] = None, peak: Optional[float] = None
    ) -> dict[str, float]:
        """Throughput metrics of the steps since the last call (tokens counted on this rank)."""
        elapsed = max(self._clock() - self._start - self._excluded, 1e-9)
        out: dict[str, float] = {}
        if self._steps:
            per_device = self._tokens / elapsed
            out = dict(
                step_time_ms=1000 * elapsed / self._steps,
                data_wait_pct=100 * self._data_wait / elapsed,
                tokens_per_s_per_device=per_device,
                tokens_per_s=per_device * world_size,
            )
            if flops_per_token:
                out["tflops_per_device"] = per_device * flops_per_token / 1e12
                if peak:
                    out["mfu_pct"] = 100 * mfu(per_device, flops_per_token, peak)
        self.reset()
        return out


def memory_stats(device: Any = "cpu", reset_peak: bool = True) -> dict[str, float]:
    """This process's memory on ``device``, in GiB (names and meaning in METRICS)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        out = dict(memory_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                   memory_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30)
        if reset_peak:  # so each log shows the peak of its own interval
            torch.cuda.reset_peak_memory_stats(dev)
        return out
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:  # current resident set: second field of /proc/self/statm, in pages
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak_kib * 1024
    return dict(memory_gib=rss / 2**30, memory_peak_gib=peak_kib * 1024 / 2**30)


# --------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------
def current_rank() -> int:
    """This process's global rank: torch.distributed if started, else the launcher's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def progress(total: int, initial: int = 0, desc: str = "train", rank: Optional[int] = None):
    """A tqdm bar on rank 0 (disabled elsewhere).

    When stderr is not a terminal (batch jobs, CI) the bar refreshes at most
    once a minute, so log files get a line a minute rather than one per step.
    """
    rank = current_rank() if rank is None else rank
    interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
    interval = 0.5 if interactive else 60.0
    return auto_tqdm(total=total, initial=initial, desc=desc, unit="step", disable=rank != 0,
                     dynamic_ncols=interactive, mininterval=interval, maxinterval=max(interval, 10.0))


# --------------------------------------------------------------------------
# Weights & Biases mode and secrets
# --------------------------------------------------------------------------
_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_SECRET_NAME = re.compile(r"(api_?key|secret|password|passwd|credential|auth_?token|access_?token)", re.I)
_SECRET_ENV = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.I)  # WANDB_API_KEY, HF_TOKEN


def has_wandb_credentials(env: Mapping[str, str] = os.environ) -> bool:
    """True when W&B could log in: WANDB_API_KEY, an identity token file, or a netrc entry."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = re.sub(r"^\w+://", "", env.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    path = env.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_wandb_mode(configured: str = "auto", env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The W&B mode to use ("online", "offline" or "disabled") and why.

    The WANDB_MODE environment variable wins over train.wandb.mode, so a
    cluster's job script can force offline without touching the config.
    """
    if env.get("WANDB_MODE"):
        mode = env["WANDB_MODE"].strip().lower()
        return _WANDB_MODE_ALIASES.get(mode, mode), "WANDB_MODE"
    if configured == "auto":
        if has_wandb_credentials(env):
            return "online", "auto: W&B credentials found"
        return "offline", "auto: no W&B credentials (WANDB_API_KEY or netrc)"
    return configured, "train.wandb.mode"


def scrub_secrets(config: Any, env: Mapping[str, str] = os.environ) -> dict:
    """The config as a plain dict with anything secret replaced by "<redacted>".

    Secret means: a key named like a credential, or a value containing the
    value of an environment variable named like one (WANDB_API_KEY, HF_TOKEN).
    """
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    secret_values = sorted((v for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= 8),
                           key=len, reverse=True)

    def clean(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {clean(str(k)): "<redacted>" if _SECRET_NAME.search(str(k)) and node[k] else clean(node[k])
                    for k in node}
        if isinstance(node, (list, tuple)):
            return [clean(v) for v in node]
        if isinstance(node, str):
            for s in secret_values:
                node = node.replace(s, "<redacted>")
        return node

    out = clean(dict(config or {}))
    text = json.dumps(out, default=str)
    if any(s in text for s in secret_values):  # cannot happen after clean(); a guard, not a filter
        raise ValueError("a secret survived scrubbing of the run config")
    return out


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits  # what W&B's own ids use
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    """A JSON-able scalar: tensors and numpy numbers to float, NaN/inf to None (strict JSON)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------
# The logger
# --------------------------------------------------------------------------
class MetricsLogger:
    """Console line + ``metrics.jsonl`` + W&B, written by rank 0 only.

    A run directory keeps one W&B run id (in ``RUN_DIR/wandb_id``), so a
    resumed or requeued job continues the same W&B run.

    ``resume_step``: the step of the checkpoint this process resumed from
    (None for a fresh run).  The steps after it were logged by the
    interrupted run and are about to be trained (and logged) again, so each
    sink drops its copy first: the rows of ``metrics.jsonl`` with a larger
    step move to ``metrics.superseded.jsonl`` (:meth:`set_aside_after`), and
    the W&B run is rewound to that step (``resume_from``; see
    docs/wandb.md).  Each step then has one value in every curve.
    """

    SINKS = ("console", "jsonl", "wandb")
    JSONL = "metrics.jsonl"
    SUPERSEDED = "metrics.superseded.jsonl"

    def __init__(
        self,
        run_dir: str | Path,
        config_dict: Any,
        rank: int,
        world_size: int,
        wandb_cfg: Any = None,
        *,
        enabled_sinks: tuple[str, ...] | set[str] = SINKS,
        resume_step: Optional[int] = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.active = rank == 0
        self.sinks = set(enabled_sinks) if self.active else set()
        unknown = self.sinks - set(self.SINKS)
        if unknown:
            raise ValueError(f"unknown metrics sinks {sorted(unknown)}; allowed: {', '.join(self.SINKS)}")
        self.wandb_run = None
        self.wandb_mode = "disabled"
        self.wandb_resume: Optional[str] = None  # how W&B was started: "rewind" or "allow"
        self.resume_step = resume_step
        self.set_aside: list[dict] = []  # rows of metrics.jsonl moved to SUPERSEDED at start-up
        self._jsonl = None
        self._last_fsync = time.monotonic()
        self._warned: set[str] = set()
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in self.sinks:
            if resume_step is not None:
                self.set_aside = self.set_aside_after(resume_step)
            # Line-buffered append: a resumed run adds to the same file, and a
            # crash loses no line that log() returned from.
            self._jsonl = open(self.run_dir / self.JSONL, "a", buffering=1, encoding="utf-8")
        if "wandb" in self.sinks:
            self._start_wandb(scrub_secrets(config_dict), wandb_cfg, resume_step)

    # -- metrics.jsonl on resume ---------------------------------------------
    def set_aside_after(self, resume_step: int) -> list[dict]:
        """Move the rows of ``metrics.jsonl`` with ``step > resume_step`` to ``metrics.superseded.jsonl``.

        They were logged by a run that went on past its last checkpoint and
        then died; the resumed run trains those steps again and logs them
        anew.  Each moved row is appended to the side file as it was, plus a
        ``superseded`` object saying when and why.  A line a crash cut short
        (not JSON) goes there too, as ``{"text": ..., "superseded": ...}``.
        ``metrics.jsonl`` is then rewritten with the remaining lines (a
        temporary file and ``os.replace``: a crash leaves the old file or the
        new one, never half of one).  The side file is written and fsynced
        first, so a crash in between can duplicate a row there but not lose
        it.  Returns the rows moved.
        """
        path = self.run_dir / self.JSONL
        if not path.is_file():
            return []
        kept: list[str] = []
        moved: list[dict] = []
        note = {"time": time.time(), "resume_step": int(resume_step),
                "reason": f"resumed from the checkpoint of step {resume_step}; the interrupted run logged "
                          f"this after it, and the resumed run logs the step again"}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                moved.append({"text": line, "superseded": dict(note, reason="not a complete JSON line "
                                                                            "(cut short by a crash)")})
                continue
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(step, (int, float)) and not isinstance(step, bool) and step > resume_step:
                moved.append({**row, "superseded": note})
            else:
                kept.append(line)
        if not moved:
            return []
        with open(self.run_dir / self.SUPERSEDED, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in moved)
            f.flush()
            os.fsync(f.fileno())
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.run_dir)
        steps = sorted({r["step"] for r in moved if "step" in r})
        span = (f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}") if steps else "no step"
        print(f"m6rec metrics: resumed at step {resume_step}: {len(moved)} line(s) of {self.JSONL} "
              f"({span}) logged after that checkpoint moved to {self.SUPERSEDED}", flush=True)
        return moved

    # -- W&B ---------------------------------------------------------------
    def wandb_run_id(self) -> str:
        """The run directory's W&B id, created on first use."""
        path = self.run_dir / "wandb_id"
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = _new_run_id()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written id
        return run_id

    def _earlier_wandb_runs(self, run_id: str) -> list[Path]:
        """This run directory's earlier W&B folders of ``run_id`` (``[offline-]run-<time>-<ID>[-N]``)."""
        root = self.run_dir / "wandb"
        found = [*root.glob(f"*run-*-{run_id}"), *root.glob(f"*run-*-{run_id}-*")] if root.is_dir() else []
        return sorted(p for p in found if p.is_dir())

    def _wandb_resume_options(self, mode: str, run_id: str, rewind_to: Optional[int]) -> list[dict]:
        """The ``wandb.init`` resume arguments to try, in order, for one mode.

        ``rewind_to`` None: continue (or create) the run id with
        ``resume="allow"``.  Otherwise rewind the W&B run to that step
        (``resume_from="ID?_step=N"``), so the steps the resumed run trains
        again replace the ones the interrupted run sent.  Online, a server
        without rewind (a preview feature) refuses it: then ``resume="allow"``.
        """
        allow = {"resume": "allow", "id": run_id}
        if rewind_to is None:
            return [allow]
        return [{"resume_from": f"{run_id}?_step={int(rewind_to)}", "id": run_id}, allow]

    def _start_wandb(self, config: dict, cfg: Any, resume_step: Optional[int] = None) -> None:
        mode, why = resolve_wandb_mode(getattr(cfg, "mode", "auto"))
        self.wandb_mode = mode
        if mode == "disabled":
            return
        try:
            import wandb  # wandb: optional at run time (a dashboard must never stop training)
        except Exception as e:  # noqa: BLE001 - any import failure must not stop training
            self._warn_once("wandb", f"W&B unavailable ({type(e).__name__}: {e}); logging to console and JSONL only")
            self.wandb_mode = "disabled"
            return
        run_id = self.wandb_run_id()
        # Rewind only when the interrupted run logged past its checkpoint (rows set aside from
        # metrics.jsonl, or unknown without that sink): a clean stop continues as it is.  Offline,
        # the rewind is only recorded (the server applies it at `wandb sync`), so it needs an
        # earlier folder of this run here; online, the server knows the run.
        logged_past = "jsonl" not in self.sinks or any("step" in r for r in self.set_aside)
        earlier = bool(self._earlier_wandb_runs(run_id))
        kwargs = dict(
            project=getattr(cfg, "project", "m6rec"), entity=getattr(cfg, "entity", None),
            name=getattr(cfg, "name", None) or self.run_dir.resolve().name,
            tags=list(getattr(cfg, "tags", []) or []) or None, job_type="train",
            dir=str(self.run_dir), config=config,
        )
        attempts = [mode] + (["offline"] if mode == "online" and why.startswith("auto") else [])
        for attempt in attempts:
            rewind_to = resume_step if logged_past and (attempt != "offline" or earlier) else None
            options = self._wandb_resume_options(attempt, run_id, rewind_to)
            for i, resume in enumerate(options):
                rewinding = "resume_from" in resume
                try:
                    self.wandb_run = wandb.init(mode=attempt, **kwargs, **resume)
                except Exception as e:  # noqa: BLE001
                    # "auto" on a node that has credentials but no internet: keep
                    # the data offline for `wandb sync` rather than losing it.
                    last = attempt == attempts[-1] and i == len(options) - 1
                    self._warn_once(f"wandb-{attempt}-{i}",
                                    f"W&B {attempt} start{f' rewound to step {rewind_to}' if rewinding else ''} "
                                    f"failed ({type(e).__name__}: {e})"
                                    + ("; logging to console and JSONL only" if last else
                                       "; trying resume='allow'" if rewinding else "; trying offline"))
                    continue
                self.wandb_mode = attempt
                self.wandb_resume = "rewind" if rewinding else "allow"
                how = f", rewound to step {rewind_to}" if rewinding else ""
                print(f"m6rec metrics: W&B {attempt} ({why}), run id {run_id}{how}", flush=True)
                return
        self.wandb_mode = "disabled"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"m6rec metrics: warning: {message}", file=sys.stderr, flush=True)

    # -- logging -----------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write ``metrics`` of optimizer step ``step`` to every sink (rank 0 only)."""
        if not self.active:
            return
        metrics = {k: _plain(v) for k, v in metrics.items()}
        if "console" in self.sinks:
            tqdm.write(format_line(step, metrics), file=sys.stdout)  # prints above a live bar
            sys.stdout.flush()
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **metrics}, default=str) + "\n")
            if time.monotonic() - self._last_fsync > 30:  # survive a node crash too, cheaply
                os.fsync(self._jsonl.fileno())
                self._last_fsync = time.monotonic()
        if self.wandb_run is not None:
            self._log_wandb(step, metrics)

    def _log_wandb(self, step: int, metrics: dict) -> None:
        # A resumed run repeats the steps after its last checkpoint.  After a
        # rewind W&B starts after the checkpoint; where it could not rewind
        # (resume="allow" online) it already has them and, keeping steps
        # increasing, would warn on each one, so skip them quietly.
        if step < self.wandb_run.step:
            self._warn_once("wandb-step", f"W&B already has step {self.wandb_run.step - 1}; "
                            f"steps before {self.wandb_run.step} go to metrics.jsonl only")
            return
        try:
            self.wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except Exception as e:  # noqa: BLE001
            self._warn_once("wandb-log", f"W&B log failed ({type(e).__name__}: {e}); W&B logging stopped")
            self.wandb_run = None

    def close(self) -> None:
        """Flush the JSONL file and finish the W&B run (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._jsonl.close()
            self._jsonl = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
                # finish() returns before wandb-core has written the run's
                # .wandb log to disk; teardown waits for it, so the offline
                # files are complete when close() returns.  Only when no other
                # W&B run lives in this process (teardown would finish it too).  wandb: optional, as above.
                import wandb

                if getattr(wandb, "run", None) is None:
                    wandb.teardown()
            except (Exception, SystemExit) as e:  # noqa: BLE001 - teardown may sys.exit
                self._warn_once("wandb-finish", f"W&B finish failed ({type(e).__name__}: {e})")
            self.wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


def format_line(step: int, m: Mapping[str, Any]) -> str:
    """The one console line: ``step 120 | loss 3.214 | val 3.301 | lr 3.0e-04 | ...``."""
    parts = [f"step {step}"]
    fields = (
        ("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
        ("grad_norm", "gnorm {:.3f}"), ("loss_scale", "scale {:g}"),
    )
    parts += [fmt.format(m[k]) for k, fmt in fields if isinstance(m.get(k), (int, float))]
    if isinstance(m.get("tokens_per_s"), (int, float)):
        parts.append(f"{_si(m['tokens_per_s'])} tok/s")
    later = (
        ("mfu_pct", "mfu {:.1f}%"), ("step_time_ms", "{:.0f} ms/step"),
        ("data_wait_pct", "data {:.1f}%"), ("memory_gib", "mem {:.2f} GiB"),
    )
    parts += [fmt.format(m[k]) for k, fmt in later if isinstance(m.get(k), (int, float))]
    if m.get("loss") is None and "loss" in m:
        parts.insert(1, "loss non-finite")  # NaN/inf losses arrive here as None
    return " | ".join(parts)
