"""`m6rec bench train --only checkpoint` on a tiny model (timings are printed, not asserted)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from m6rec.bench.checkpoint import _rank_of_file, bench_checkpoint, checkpoint_table
from m6rec.cli import build_parser
from m6rec.config import load_config

pytestmark = pytest.mark.timeout(600)

TINY = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 256, "ffn_hidden": 64, "max_seq_len": 64},
        "data": {"stream": {"seq_len": 64, "batch_size": 2}}, "train": {"save_every": 50}}


def test_files_are_attributed_to_the_rank_that_writes_them():
    assert _rank_of_file("zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert _rank_of_file("zero_pp_rank_12_mp_rank_00_model_states.pt") == 12
    assert _rank_of_file("m6rec_rank3.pt") == 3
    assert _rank_of_file("mp_rank_00_model_states.pt") == 0 and _rank_of_file("COMPLETE") == 0


def test_the_command_line_offers_the_checkpoint_part():
    args = build_parser().parse_args(["bench", "train", "--only", "checkpoint"])
    assert args.only == "checkpoint"


@pytest.mark.slow
def test_bench_checkpoint_saves_and_loads_per_stage_on_two_ranks():
    cfg = load_config(None, TINY)
    r = bench_checkpoint(cfg, SimpleNamespace(config="tiny"), warmup=1, steps=1, saves=1, stages=(0, 2))
    rows = {row["stage"]: row for row in r["results"]}
    assert sorted(rows) == [0, 2] and r["world"] == 2 and r["save_every"] == [50, 100, 1000]
    for row in rows.values():
        assert row["step_s"] > 0 and row["save_s"] > 0 and row["load_warm_s"] > 0 and row["load_cold_s"] > 0
        assert 0 < row["fsync_s"] < row["save_s"]
        assert len(row["snapshot_s_per_rank"]) == 2 and row["ran_as_stage"] == row["stage"]
        assert row["overhead_at_save_every"]["100"] == pytest.approx(row["save_s"] / (100 * row["step_s"]))
        assert row["save_every_for_1pct"] >= 1 and "COMPLETE" in row["files"]
        assert sum(row["bytes_per_rank"]) == row["bytes_total"] == sum(row["files"].values())
    p = rows[0]["params"]
    # Stage 0: rank 0 writes the weights and the whole Adam state (12 bytes a parameter, fp32), rank 1
    # only its RNG file; ZeRO 2: each rank writes its half of the fp32 master and moments (6 bytes a
    # parameter), rank 0 the weights besides (4).
    zero0, zero2 = rows[0]["bytes_per_rank"], rows[2]["bytes_per_rank"]
    assert zero0[0] > 12 * p and zero0[1] < 0.05 * zero0[0]
    assert zero2[1] > 6 * p and zero2[0] > zero2[1] + 3.5 * p
    table = checkpoint_table(r["results"], r["save_every"])
    assert len(table) == 4 and "cost at save_every 50" in table[0]
    print("\n".join(table))
