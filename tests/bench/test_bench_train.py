"""`m6rec bench train` in full -- ZeRO scaling, checkpoint cost, engine overhead -- through the command
line, shortened with ``--quick`` (timings are not asserted: a benchmark's numbers live in the docs)."""
from __future__ import annotations

import json

import pytest

from m6rec.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_bench_train_runs_every_part_through_the_cli(tmp_path, capsys):
    out = tmp_path / "bench_train.json"
    assert main(["bench", "train", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["bench"] == "train" and r["preset"] == "tiny"
    # scaling: every (stage, world) pair, each world-2 row against its world-1 row
    assert sorted((x["stage"], x["world"]) for x in r["results"]) == [(0, 1), (0, 2), (2, 1), (2, 2)]
    assert r["warmup_steps"] == 1 and r["timed_steps"] == 2 and r["matmul_peak_flops_one_thread"] > 0
    for x in r["results"]:
        assert x["step_s"] > 0 and x["mfu_pct"] > 0 and len(x["step_s_all"]) == 2
        assert ("scaling_efficiency" in x) == (x["world"] == 2)
    assert len(r["table"]) == 2 + 4
    # checkpoint cost and engine overhead: the same stages
    assert [x["stage"] for x in r["checkpoint"]["results"]] == [0, 2] and r["checkpoint"]["saves"] == 1
    assert all(x["save_s"] > 0 and x["load_cold_s"] > 0 for x in r["checkpoint"]["results"])
    assert [x["stage"] for x in r["overhead"]["results"]] == [0, 2]
    assert all(x["host_syncs_per_step"] == 1 for x in r["overhead"]["results"])
    for title in ("ZeRO scaling:", "checkpoint cost (per ZeRO stage, 2 ranks):", "engine overhead ("):
        assert title in printed
