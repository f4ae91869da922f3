"""A real single-node Slurm cluster on localhost, for tests that submit sbatch scripts.

Wraps ``scripts/slurm_local.sh`` (start / stop by recorded pids).  Use it as::

    from helpers.slurm import SlurmUnavailable, local_slurm

    @pytest.fixture(scope="module")
    def slurm(tmp_path_factory):
        try:
            cm = local_slurm(tmp_path_factory.mktemp("slurm"))
            cluster = cm.__enter__()
        except SlurmUnavailable as exc:
            pytest.skip(f"no local slurm: {exc}")
        try:
            yield cluster
        finally:
            cm.__exit__(None, None, None)

    def test_job(slurm, tmp_path):
        job = slurm.sbatch(script, ["--output", str(tmp_path / "out.txt")])
        assert slurm.wait(job, timeout=60) == "COMPLETED"

or simply ``with local_slurm(tmp_path) as slurm: ...``.  All commands get
``SLURM_CONF=<dir>/slurm.conf`` (``slurm.env``); nothing under /etc is used.
There is no slurmdbd, so no ``sacct``: job states come from ``scontrol show job``
(records kept for an hour) and, as a fallback, from ``<dir>/jobcomp.txt``.

Needs root (slurmd runs jobs as root) and, the first time, apt-get (slurm-wlm, munge).
Set ``SLURM_LOCAL_NO_INSTALL=1`` to never install: missing slurm then raises
:class:`SlurmUnavailable`.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"

#: states after which a job (or array task) never runs again
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
    }
)


class SlurmError(RuntimeError):
    """A slurm command or the local cluster failed."""


class SlurmUnavailable(SlurmError):
    """Slurm cannot run here (not root, no apt-get, install failed); tests should skip."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` (one ``scontrol show -o`` record) -> dict."""
    out: dict[str, str] = {}
    matches = list(_KEY.finditer(line))
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def _base_state(state: str) -> str:
    # "CANCELLED by 0" -> "CANCELLED"
    return state.split()[0] if state else state


class LocalSlurm:
    """Handle on a running local cluster (made by :func:`local_slurm`)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.conf = self.dir / "slurm.conf"
        path = os.environ.get("PATH", "")
        for extra in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
            if extra not in path.split(os.pathsep):
                path = f"{path}{os.pathsep}{extra}" if path else extra
        #: environment for subprocesses talking to this cluster: os.environ without any
        #: SLURM_*/SBATCH_*/SRUN_*/SALLOC_* inherited from an outer job or shell, plus SLURM_CONF
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        self.env: dict[str, str] = {**inherited, "SLURM_CONF": str(self.conf), "PATH": path}
        self.started_at = time.monotonic()

    # ------------------------------------------------------------------ commands
    def run(self, args: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a slurm command (``["squeue", ...]``) against this cluster."""
        merged = {**self.env, **(env or {}), "SLURM_CONF": str(self.conf)}
        proc = subprocess.run(list(args), env=merged, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def sbatch(self, script: str | os.PathLike, args: Sequence[str] = (),
               env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
        """Submit ``script`` (path) with extra sbatch ``args``; returns the job id (array: its base id).

        ``env`` is added to :attr:`env` for the submission; sbatch's default
        ``--export=ALL`` hands it to the job.
        """
        cmd = ["sbatch", "--parsable"]
        if cwd is not None:
            cmd += ["--chdir", str(cwd)]
        cmd += [*map(str, args), str(script)]
        proc = self.run(cmd, env=env)
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"unexpected sbatch output: {proc.stdout!r} {proc.stderr!r}")
        return job_id

    def job_infos(self, job_id: str | int) -> list[dict[str, str]]:
        """``scontrol show job -o JOB`` parsed: one dict per job / array task ([] if unknown)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise SlurmError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return [parse_scontrol_line(line) for line in proc.stdout.splitlines() if line.strip()]

    def job_info(self, job_id: str | int) -> dict[str, str]:
        """The parsed ``scontrol show job -o`` record of one job (the first one for an array).

        Useful keys: JobState, Reason, Restarts, ExitCode, Requeue, BatchFlag, BeginTime,
        StdOut, ArrayJobId/ArrayTaskId, NumCPUs, NumTasks, CPUs/Task.
        """
        infos = self.job_infos(job_id)
        if not infos:
            raise SlurmError(f"job {job_id} unknown to slurmctld")
        return infos[0]

    def jobcomp_records(self) -> list[dict[str, str]]:
        """Parsed lines of ``jobcomp.txt``: one per finished run (a requeued job has several)."""
        path = self.dir / "jobcomp.txt"
        if not path.exists():
            return []
        return [parse_scontrol_line(line) for line in path.read_text().splitlines() if line.strip()]

    def states(self, job_id: str | int) -> dict[str, str]:
        """Current state per job / array task id (``"12"`` or ``"12_0"``)."""
        out = {}
        for info in self.job_infos(job_id):
            task = info.get("ArrayTaskId")
            key = f"{info.get('ArrayJobId')}_{task}" if task and task != "N/A" and "ArrayJobId" in info else info.get("JobId", "")
            out[key] = _base_state(info.get("JobState", ""))
        if not out:  # record purged (MinJobAge): last line of the completion log
            for rec in self.jobcomp_records():
                if rec.get("JobId") == str(job_id):
                    out[str(job_id)] = _base_state(rec.get("JobState", ""))
        return out

    def wait(self, job_id: str | int, timeout: float = 120, poll: float = 0.5) -> str:
        """Wait until the job (every task of an array) is in a terminal state; return it.

        For an array the result is ``"COMPLETED"`` when all tasks completed, else the first
        other terminal state.  A requeued job passes through PENDING again and is waited
        for.  Raises TimeoutError (with the job record) when ``timeout`` expires.
        """
        deadline = time.monotonic() + timeout
        while True:
            states = self.states(job_id)
            pending_array = any(s == "PENDING" for s in states.values())
            if states and not pending_array and all(s in TERMINAL_STATES for s in states.values()):
                others = [s for s in states.values() if s != "COMPLETED"]
                return others[0] if others else "COMPLETED"
            if time.monotonic() > deadline:
                infos = self.job_infos(job_id)
                raise TimeoutError(f"job {job_id} not finished after {timeout}s: {states}; "
                                   f"reasons {[i.get('Reason') for i in infos]}")
            time.sleep(poll)

    def wait_state(self, job_id: str | int, wanted: str | Sequence[str], timeout: float = 60,
                   poll: float = 0.2) -> dict[str, str]:
        """Wait until the job's JobState is one of ``wanted`` (e.g. "RUNNING"); return its record."""
        wanted = {wanted} if isinstance(wanted, str) else set(wanted)
        deadline = time.monotonic() + timeout
        while True:
            infos = self.job_infos(job_id)
            if infos and _base_state(infos[0].get("JobState", "")) in wanted:
                return infos[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not in {sorted(wanted)} after {timeout}s: "
                                   f"{infos[0] if infos else 'unknown'}")
            time.sleep(poll)

    def scancel(self, job_id: str | int, signal: str | None = None, batch: bool = False) -> None:
        """``scancel [--signal=SIG] [--batch] JOB`` (signal only the batch shell with batch=True)."""
        cmd = ["scancel"]
        if signal:
            cmd.append(f"--signal={signal}")
        if batch:
            cmd.append("--batch")
        self.run([*cmd, str(job_id)])

    def requeue(self, job_id: str | int, hold: bool = False) -> None:
        self.run(["scontrol", "requeuehold" if hold else "requeue", str(job_id)])

    def release(self, job_id: str | int) -> None:
        self.run(["scontrol", "release", str(job_id)])

    def squeue(self) -> str:
        return self.run(["squeue"]).stdout

    def sinfo(self) -> str:
        return self.run(["sinfo"]).stdout


def _script(action: str, directory: Path, timeout: float) -> subprocess.CompletedProcess:
    if not SCRIPT.exists():
        raise SlurmUnavailable(f"{SCRIPT} missing")
    try:
        return subprocess.run(["bash", str(SCRIPT), action, str(directory)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"slurm_local.sh {action} {directory} timed out after {timeout}s: "
                         f"{(exc.stderr or b'')[-2000:]!r}") from exc


def start_cluster(directory: str | os.PathLike, timeout: float = 900) -> LocalSlurm:
    """``slurm_local.sh start DIR`` (installs slurm the first time); raises SlurmUnavailable."""
    if os.name != "posix" or not Path("/proc").is_dir():
        raise SlurmUnavailable("local slurm cluster needs Linux")
    directory = Path(directory).resolve()
    proc = _script("start", directory, timeout)
    if proc.returncode == 3:
        raise SlurmUnavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "slurm unavailable")
    if proc.returncode != 0:
        raise SlurmError(f"slurm_local.sh start {directory} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return LocalSlurm(directory)


def stop_cluster(directory: str | os.PathLike, timeout: float = 120) -> None:
    """``slurm_local.sh stop DIR``: cancel jobs, kill the recorded pids."""
    proc = _script("stop", Path(directory).resolve(), timeout)
    if proc.returncode != 0:
        raise SlurmError(f"slurm_local.sh stop {directory} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


@contextlib.contextmanager
def local_slurm(tmpdir: str | os.PathLike, start_timeout: float = 900) -> Iterator[LocalSlurm]:
    """Start a cluster with its files under ``tmpdir``, yield a :class:`LocalSlurm`, always stop it.

    Raises :class:`SlurmUnavailable` (before yielding) when slurm cannot run here.
    If the start itself fails half-way, whatever it started is stopped again.
    """
    directory = Path(tmpdir).resolve()
    try:
        cluster = start_cluster(directory, timeout=start_timeout)
    except BaseException:
        if (directory / "pids").exists():
            with contextlib.suppress(Exception):
                stop_cluster(directory)
        raise
    try:
        yield cluster
    finally:
        stop_cluster(directory)


def cluster_for_module(tmp_path_factory) -> Iterator[LocalSlurm]:
    """The body of a module-scoped ``slurm`` fixture: a started cluster, or a skip with the reason.
    Jobs inherit the submitting environment (--export=ALL); in-process training tests earlier in
    the pytest run set the rendezvous variables for their own process group, so they are dropped."""
    import pytest

    try:
        cm = local_slurm(tmp_path_factory.mktemp("slurm"))
        cluster = cm.__enter__()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local Slurm: {exc}")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        cluster.env.pop(k, None)
    try:
        yield cluster
    finally:
        cm.__exit__(None, None, None)


# --- submitting m6rec's sbatch scripts -----------------------------------------------
def job_env(**extra) -> dict:
    return {"M6REC_VENV": sys.prefix, "M6REC_WORKDIR": str(ROOT), "M6REC_NPROC_PER_NODE": "2",
            "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def submit(slurm, script: str, sbatch_args: list, script_args: list, env: dict) -> str:
    proc = slurm.run(["sbatch", "--parsable", "--chdir", str(ROOT), *sbatch_args, str(ROOT / script), *script_args],
                     env=env)
    return proc.stdout.strip().split(";")[0]


def train_args(data: Path, run_dir: Path, steps: int, **kw) -> list[str]:
    args = ["configs/pretrain/tiny.yaml", "--data.output", str(data), "--train.run_dir", str(run_dir),
            "--train.steps", str(steps), "--train.eval_every", "0", "--data.stream.num_workers", "1"]
    for k, v in kw.items():
        args += [f"--train.{k}", str(v)]
    return args
