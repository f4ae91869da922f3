"""slurm/train.sbatch requeued with another size resumes on the new world size (issue 12, item 4).

On the local single-node Slurm (tests/helpers/slurm.py, CPUs=2): a job submitted with
``--ntasks 2`` trains on 2 ranks, is preempted (USR1 to the batch script, as Slurm does
before a time limit), checkpoints and requeues itself; while it is pending again it is
resized to one task (``scontrol hold`` / ``update NumTasks=1`` / ``release`` -- what an
allocation that shrank looks like from inside the job: ``SLURM_TASKS_PER_NODE`` says 1
while ``SLURM_NTASKS`` still says 2), and the requeued run resumes from the checkpoint on
one rank with ``--resume auto`` and finishes, every step logged once.

Both launch forms of the script whose world size follows the allocation: the default
(``deepspeed --no_ssh`` per node, one rank per task on nodes without GPUs) and
``M6REC_LAUNCHER=srun`` (one task per rank).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from helpers.slurm import cluster_for_module, job_env, submit, train_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


slurm = pytest.fixture(scope="module", name="slurm")(cluster_for_module)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from m6rec.config import load_config
    from m6rec.data.prepare import prepare

    # DeepSpeed JIT-builds its CPU shared-memory comm op (cached in ~/.cache/torch_extensions; minutes
    # on a busy machine): once here, not by two ranks at once inside the job's wait for training.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(load_config(ROOT / "configs/pretrain/tiny.yaml", ["--data.output", str(out)]).data)
    return out


def _wait_until(cond, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}: " + (log.read_text(errors="replace")[-3000:] if log.exists() else "no output"))


@pytest.mark.parametrize("launcher", ["deepspeed", "srun"])
def test_requeued_with_fewer_tasks_resumes_on_the_new_world_size(slurm, tiny_data, tmp_path, launcher):
    run, out = tmp_path / "run", tmp_path / "job.out"
    env = job_env(M6REC_LAUNCHER=launcher)
    del env["M6REC_NPROC_PER_NODE"]  # the ranks come from the allocation: --ntasks 2, later 1
    job = submit(slurm, "slurm/train.sbatch", ["--ntasks", "2", "--output", str(out)],
                 train_args(tiny_data, run, STEPS, save_every=0, log_every=1, keep_last=5), env)
    metrics = run / "metrics.jsonl"

    def started() -> bool:
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), out.read_text(errors="replace")[-3000:]
        return metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    _wait_until(started, 600, "training on 2 ranks", out)
    slurm.scancel(job, signal="USR1", batch=True)  # preemption: checkpoint, exit 0, requeue

    # The requeued job waits for its BeginTime (the cluster's credential lifetime, 10 s): hold
    # it, give it one task instead of two, let it go.
    def requeued() -> bool:
        info = slurm.job_info(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"), out.read_text(errors="replace")[-3000:]
        return info.get("JobState") == "PENDING" and info.get("Restarts") == "1"

    _wait_until(requeued, 600, "the requeue", out)
    slurm.run(["scontrol", "hold", job])
    slurm.run(["scontrol", "update", f"JobId={job}", "NumTasks=1", "NumCPUs=1"])
    slurm.release(job)
    state = slurm.wait(job, timeout=900)
    log = out.read_text(errors="replace")
    assert state == "COMPLETED", log[-4000:]
    info = slurm.job_info(job)
    assert int(info["Restarts"]) == 1 and info["NumTasks"] == "1", info

    starts = re.findall(r"m6rec: job \d+ restart (\d) .*: 1 node\(s\) x (\d) rank\(s\) via (\w+), world size (\d)", log)
    assert starts == [("0", "2", launcher, "2"), ("1", "1", launcher, "1")], log[-4000:]
    resumed = re.findall(r"resumed from \S*step(\d{8}) at step (\d+): written by 2 rank\(s\) at ZeRO stage 2, "
                         r"continued on 1 at stage 0", log)
    assert resumed, log[-4000:]
    stop = int(resumed[0][1])
    assert 3 <= stop < STEPS
    ck = run / "checkpoints"
    saved = json.loads((ck / f"step{stop:08d}" / "COMPLETE").read_text())
    assert saved["world_size"] == 2 and saved["zero_stage"] == 2
    assert sorted(p.name for p in (ck / f"step{stop:08d}").glob("m6rec_rank*.pt")) == ["m6rec_rank0.pt",
                                                                                       "m6rec_rank1.pt"]
    final = json.loads((ck / f"step{STEPS:08d}" / "COMPLETE").read_text())
    assert final["world_size"] == 1 and final["zero_stage"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start_step"], summary["step"], summary["world_size"], summary["stopped_by"]) == \
        (stop, STEPS, 1, "steps")
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1)), logged  # the step count went on: none repeated, none skipped
    print(f"{launcher}: 2 ranks stopped at step {stop}, requeued with 1 task, resumed to {STEPS}")
