"""scripts/gpu_check.sh, every stage, in its tiny CPU form (GPU_CHECK_TINY=1): the script a lent GPU
runs must not meet its first bug on the GPU.  On CUDA the same stages run the 350m shape and the
base preset (docs/performance.md)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_script_runs_every_stage(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(work), "GPU_CHECK_TINY": "1",
           "PYTHON": str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else "python3",
           "WANDB_MODE": "offline"}
    for k in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert all(v.startswith("rc=0") for v in res["stages"].values()), res["stages"]
    rows = res["bench"]["rows"]
    assert not [row for row in rows if "error" in row], rows
    names = [row["name"] for row in rows]
    assert "m6rec blocks compiled, packed_prefix" in names and "HF Llama eager, causal" in names
    engine = [row for row in rows if row["kind"] == "engine"]
    assert [row["stage"] for row in engine] == [0, 1, 2, 3] and all(row["of_compiled_model"] > 0 for row in engine)
    assert res["base_preset"]["b16"]["summary"]["start_step"] == 4 and res["base_preset"]["b16"]["summary"]["step"] == 6
    assert res["base_preset"]["b64"]["tokens_per_s"] > 0
    assert res["eval"] and (work / "hf" / "config.json").is_file()
    assert "| m6rec engine, ZeRO 0 |" in (out / "gpu_check.md").read_text()
    # a lent machine returns at most 8 files from $OUT
    assert sorted(p.name for p in out.iterdir()) == ["bench_gpu.json", "gpu_check.json", "gpu_check.md", "logs.txt",
                                                      "stages.txt"]


@pytest.mark.slow
def test_gpu_next_item_script_in_its_tiny_cpu_form(tmp_path, shared_data):
    """scripts/gpu_next_item.sh (issue 11's GPU table) with two of its configurations, tiny, on the CPU:
    prepared from the real ml-1m-partial files, trained through the `deepspeed` launcher one after the
    other (GPU_SEQUENTIAL; all at once is the same train_group with both, as the first GPU run did),
    one stopped by the wall-clock cap (RUN_DIR/STOP, checkpoint), then evaluated together.  The bench
    stage is test_gpu_check_script_runs_every_stage's."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "GPU_WORK": str(work), "GPU_CHECK_TINY": "1", "SKIP_BENCH": "1",
           "GPU_CONFIGS": "ml1m-id ml1m-vector", "GPU_STEPS": "100000 6", "GPU_TRAIN_SECONDS": "45",
           "GPU_SEQUENTIAL": "1", "GPU_WORKERS": "1",
           "M6REC_DATA_ROOT": str(shared_data), "WANDB_MODE": "offline",
           "PYTHON": str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else "python3"}
    venv_bin = ROOT / ".venv" / "bin"
    if venv_bin.is_dir():  # the `deepspeed` launcher of this environment
        env["PATH"] = f"{venv_bin}:{env['PATH']}"
    for k in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run(["bash", "scripts/gpu_next_item.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = (out / "stages.txt").read_text()
    for name in ("prepare-ml1m-id rc=0", "prepare-ml1m-vector rc=0", "train-ml1m-id rc=0", "train-ml1m-vector rc=0",
                 "eval rc=0"):
        assert name in stages, stages
    runs = {row["config"]: row for row in json.loads((out / "gpu_next_item_runs.json").read_text())}
    assert runs["ml1m-vector"]["step"] == 6 and runs["ml1m-vector"]["stopped_by"] == "steps"
    # 100,000 steps cannot finish in 45 s: the cap stopped it, with a checkpoint the evaluation read
    assert runs["ml1m-id"]["stopped_by"].startswith("stop file") and 0 < runs["ml1m-id"]["step"] < 100000
    meta = json.loads((out / "gpu-next-item.json").read_text())["meta"]
    assert meta["split"] == "test" and meta["catalog_size"] == 3883
    assert {Path(m["run_dir"]).name: m["checkpoint"] for m in meta["models"]} == {
        c: f"step{runs[c]['step']:08d}" for c in ("ml1m-id", "ml1m-vector")}
    assert len(list(out.iterdir())) <= 8  # a lent machine returns at most 8 files from $OUT
    # one at a time: the second run started after the first had finished; GPU_WORKERS reached the loaders
    first, second = work / "runs" / "ml1m-id", work / "runs" / "ml1m-vector"
    assert (second / "config.yaml").stat().st_mtime >= (first / "summary.json").stat().st_mtime
    for run in (first, second):
        assert "num_workers: 1" in (run / "config.yaml").read_text()
