"""`m6rec bench data` machinery on a small generated dataset (numbers are not asserted: benchmarks print them)."""
import pytest
from helpers.generic_data import generic_cfg, write_generic_logs

from m6rec.bench.data import bench_decode, bench_pipeline, decode_table, pipeline_table


def test_bench_data_runs_side_by_side(tmp_path):
    root = write_generic_logs(tmp_path / "logs", n_users=80, n_items=50)
    cfg = generic_cfg(root, tmp_path / "unused", "--data.shard_size", "40", "--data.stream.seq_len", "256",
                      "--data.stream.batch_size", "2")
    with pytest.warns(UserWarning):
        r = bench_pipeline(cfg, tmp_path / "bench", prepare_workers=(1, 2), loader_workers=(0, 1),
                       model_preset="configs/model/tiny.yaml", max_batches=5, max_seconds=5, train_steps=2)
    assert [p["workers"] for p in r["prepare"]] == [1, 2]
    assert r["prepare"][0]["samples"] == r["prepare"][1]["samples"] > 0
    assert [x["num_workers"] for x in r["reader"]] == [0, 1]
    assert all(x["tokens_per_s"] > 0 and x["x_ahead_of_training"] > 0 for x in r["reader"])
    assert r["train_rank"]["tokens_per_s"] > 0
    assert "one training rank" in pipeline_table(r)


def test_bench_decode_compares_both_decoders_on_a_prepared_dataset(tmp_path):
    from m6rec.data import prepare as P
    from m6rec.data import stream as S

    root = write_generic_logs(tmp_path / "logs", n_users=80, n_items=50)
    cfg = generic_cfg(root, tmp_path / "ds", "--data.stream.seq_len", "256", "--data.stream.batch_size", "2")
    with pytest.warns(UserWarning):
        P.prepare(cfg.data, workers=1)
    fast = S.load_npy
    r = bench_decode([str(tmp_path / "ds")], cfg, batches=3, rounds=1)
    assert S.load_npy is fast  # the A/B swap is undone
    (row,) = r["rows"]
    assert row["np_load_ms_per_batch"] > 0 and row["load_npy_ms_per_batch"] > 0 and row["speedup"] > 0
    assert "speed-up" in decode_table(r)


def test_bench_data_wait_compares_three_loaders_through_the_cli(tmp_path, capsys):
    """`m6rec bench data --dataset D --step-seconds S`: torch's loader defaults, a deeper prefetch and
    m6rec's loader, each over the same epochs with real DataLoader workers; and its bad input."""
    import json

    from m6rec.cli import main
    from m6rec.data import prepare as P

    root = write_generic_logs(tmp_path / "logs", n_users=80, n_items=50)
    cfg = generic_cfg(root, tmp_path / "ds", "--data.shard_size", "40", "--data.stream.seq_len", "256",
                      "--data.stream.batch_size", "2")
    with pytest.warns(UserWarning):
        P.prepare(cfg.data, workers=1)
    shape = ["--data.stream.seq_len", "256", "--data.stream.batch_size", "2"]
    out = tmp_path / "wait.json"
    assert main(["bench", "data", "--dataset", str(tmp_path / "ds"), "--step-seconds", "0.005",
                 "--data.stream.num_workers", "2", "--data.stream.prefetch_factor", "4", *shape,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["num_workers"] == 2 and r["step_seconds"] == 0.005
    assert [x["loader"] for x in r["rows"]] == [
        "torch defaults (prefetch 2, workers restart per epoch)", "prefetch 4",
        "prefetch 4, next epoch 32 steps ahead (m6rec)"]
    spe = r["rows"][0]["steps_per_epoch"]
    assert spe > 0 and all(x["steps"] == min(3 * spe, 600) and x["steps_per_epoch"] == spe for x in r["rows"])
    assert all(x["later_wait_s"] >= 0 and 0 <= x["later_wait_share"] < 1 for x in r["rows"])
    assert "share of their step time" in printed
    for bad, message in ((["--step-seconds", "0.1", *shape], "needs --dataset"),
                         (["--dataset", str(tmp_path / "ds"), "--step-seconds", "0", *shape], "allowed: > 0"),
                         (["--dataset", str(tmp_path / "ds"), "--step-seconds", "0.1", "--data.stream.num_workers",
                           "0", *shape], "num_workers"),
                         (["--dataset", str(tmp_path / "ds"), "--step-seconds", "0.1",
                           "--data.stream.prefetch_factor", "0", *shape], "data.stream.prefetch_factor")):
        assert main(["bench", "data", *bad]) == 2
        assert message in capsys.readouterr().err
