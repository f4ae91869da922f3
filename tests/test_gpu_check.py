"""scripts/gpu_check.sh, every stage, in its tiny CPU form (GPU_CHECK_TINY=1): the script a lent GPU
runs must not meet its first bug on the GPU.  On CUDA the same stages run the 350m shape and the
base preset (docs/performance.md)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
