"""slurm/*.sbatch on a real single-node Slurm (slurmctld + slurmd on localhost, CPUs=2).

The cluster is installed from Debian (slurm-wlm, munge) and started by
scripts/slurm_local.sh; it is stopped by its process ids at the end.  Skipped,
with the reason, only where Slurm cannot be installed or started.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from helpers.slurm import cluster_for_module, job_env, submit, train_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


slurm = pytest.fixture(scope="module", name="slurm")(cluster_for_module)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """ml-latest-small (built in) prepared for the tiny preset."""
    from m6rec.config import load_config
    from m6rec.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(load_config(ROOT / "configs/pretrain/tiny.yaml", ["--data.output", str(out)]).data)
    return out


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_train_job_completes_with_two_ranks(slurm, tiny_data, tmp_path, launcher):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    job = submit(slurm, "slurm/train.sbatch", ["--output", str(out)],
                 train_args(tiny_data, run, 10, save_every=5, log_every=5), job_env(M6REC_LAUNCHER=launcher))
    state = slurm.wait(job, timeout=420)
    log = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", log[-3000:]
    assert f"2 rank(s) via {launcher}" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000010"
    assert sorted(p.name for p in (run / "checkpoints" / "step00000010").glob("m6rec_rank*.pt")) == [
        "m6rec_rank0.pt", "m6rec_rank1.pt"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "steps"


def test_preemption_checkpoints_requeues_and_resumes(slurm, tiny_data, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    job = submit(slurm, "slurm/train.sbatch", ["--output", str(out)],
                 train_args(tiny_data, run, 60, save_every=10, log_every=1, keep_last=20), job_env())
    # Wait until training is under way (a few steps logged), then preempt as Slurm does
    # before a time limit: USR1 to the batch script.
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), out.read_text()[-3000:]
        time.sleep(0.5)
    else:
        pytest.fail("training did not start: " + (out.read_text()[-3000:] if out.exists() else "no output"))
    slurm.scancel(job, signal="USR1", batch=True)
    state = slurm.wait(job, timeout=600)
    log = out.read_text()
    assert state == "COMPLETED", log[-4000:]
    info = slurm.job_info(job)
    assert int(info["Restarts"]) == 1, info
    assert "restart 1" in log and "requeueing job" in log
    resumed = re.findall(r"resumed from .*step(\d{8}) at step (\d+)", log)
    assert resumed, log[-4000:]
    stop_step = int(resumed[0][1])
    assert 3 <= stop_step < 60
    # the checkpoint written at the stop, outside the save_every schedule unless it fell on it
    tag = run / "checkpoints" / f"step{stop_step:08d}"
    assert (tag / "COMPLETE").is_file()
    import torch

    client = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["step"] == stop_step and client["reason"] == "preempted"
    # the requeued run went on from that step to the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 60 and summary["stopped_by"] == "steps"
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, 61)), logged  # every step once: nothing repeated, nothing skipped


def test_prepare_job_array_equals_single_process(slurm, tmp_path):
    from m6rec.config import load_config
    from m6rec.data.prepare import prepare

    overrides = ["--data.shard_size", "400"]
    single = tmp_path / "single"
    prepare(load_config(ROOT / "configs/data/ml-latest-small.yaml", [*overrides, "--data.output", str(single)]).data)
    arrayed = tmp_path / "arrayed"
    env = job_env()
    args = ["configs/data/ml-latest-small.yaml", *overrides, "--data.output", str(arrayed)]
    array = submit(slurm, "slurm/prepare.sbatch", ["--array=0-1", "--output", str(tmp_path / "p-%A_%a.out")],
                   ["part", *args], env)
    merge = submit(slurm, "slurm/prepare.sbatch", [f"--dependency=afterok:{array}", "--output", str(tmp_path / "m.out")],
                   ["merge", *args, "--num-parts", "2"], env)
    assert slurm.wait(array, timeout=300) == "COMPLETED", [p.read_text()[-2000:] for p in tmp_path.glob("p-*.out")]
    assert slurm.wait(merge, timeout=300) == "COMPLETED", (tmp_path / "m.out").read_text()[-2000:]

    def samples(d: Path) -> dict:
        m = json.loads((d / "manifest.json").read_text())
        return {split: (sp["samples"], sp["tokens"]) for split, sp in m["splits"].items()}, m

    (one, m1), (two, m2) = samples(single), samples(arrayed)
    assert one == two
    assert {sh["url"].split("-")[1] for sh in m2["splits"]["train"]["shards"]} == {"p000", "p001"}
    assert m1["tokenizer_sha256"] == m2["tokenizer_sha256"]
    import webdataset as wds

    def keys(d: Path, m: dict) -> dict:
        out = {}
        for split in m["splits"]:
            for sh in m["splits"][split]["shards"]:
                for s in wds.WebDataset(str(d / sh["url"]), shardshuffle=False, empty_check=False):
                    out[s["__key__"]] = s["ids.npy"]
        return out

    assert keys(single, m1) == keys(arrayed, m2)


def test_hostfile_from_slurm_nodelist_and_plain_hosts(slurm, tmp_path):
    hostfile = str(ROOT / "launch" / "hostfile.py")
    r = slurm.run([sys.executable, hostfile, "--slots", "8", "--nodelist", "gpu[01-03,07]"])
    assert r.stdout.splitlines() == ["gpu01 slots=8", "gpu02 slots=8", "gpu03 slots=8", "gpu07 slots=8"]
    r = slurm.run([sys.executable, hostfile, "--slots", "2", "a", "b", "a", "-o", str(tmp_path / "h")])
    assert (tmp_path / "h").read_text() == "a slots=2\nb slots=2\n"
    r = slurm.run([sys.executable, hostfile, "--slots", "2", "--slurm"], check=False)
    assert r.returncode != 0 and "outside a Slurm job" in r.stderr
