"""train.item_loss: sampled through the real trainer and engine on the generic shop (item tokens),
and its config errors."""
from __future__ import annotations

import warnings

import pytest
from helpers.generic_data import generic_cfg, write_generic_logs
from helpers.runs import MODEL, jsonl

from m6rec.config import ConfigError, load_config
from m6rec.data import prepare as P
from m6rec.train.trainer import train

SAMPLED = ["--train.item_loss", "sampled", "--train.item_negatives", "16"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampled")
    root = write_generic_logs(tmp / "logs")
    cfg = generic_cfg(root, tmp / "ds", "--data.text.item_repr", "token", "--data.text.images", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        P.prepare(cfg.data, workers=1)
    return tmp, root


def _train(shop, name, *extra):
    tmp, root = shop
    cfg = generic_cfg(root, tmp / "ds", "--data.text.item_repr", "token", "--data.text.images", "false", *MODEL,
                      "--train.run_dir", str(tmp / name), "--deepspeed.zero_stage", "0",
                      "--train.wandb.mode", "disabled", "--train.log_every", "1", *extra)
    summary = train(cfg)
    return summary, [r for r in jsonl(tmp / name) if "loss" in r]


def test_sampled_item_loss_trains_and_draws_the_same_negatives_again(shop):
    summary, rows = _train(shop, "sampled_a", *SAMPLED, "--train.negative_sampler", "popularity",
                           "--train.in_batch_negatives", "true", "--train.mask_history_negatives", "true")
    assert summary["last_checkpoint"] == "step00000006" and len(rows) == 6
    assert all(0 < r["loss"] < 20 for r in rows)
    _, again = _train(shop, "sampled_b", *SAMPLED, "--train.negative_sampler", "popularity",
                      "--train.in_batch_negatives", "true", "--train.mask_history_negatives", "true")
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]  # seeded draws
    _, full = _train(shop, "full", "--train.item_loss", "full")
    # 16 candidates instead of ~70 items + the text vocabulary: a different, smaller loss from the same start
    assert rows[0]["loss"] < full[0]["loss"]


def test_negatives_beyond_the_catalog_name_the_key(shop):
    with pytest.raises(ConfigError, match=r"train\.item_negatives.*catalog of \d+ items"):
        _train(shop, "too_many", "--train.item_loss", "sampled", "--train.item_negatives", "100000")


def test_sampled_loss_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.item_negatives"):
        load_config(None, ["--train.item_negatives", "0"])
    with pytest.raises(ConfigError, match="train.item_loss.*item_repr text"):
        load_config(None, ["--train.item_loss", "sampled", "--data.text.item_repr", "text"])
    with pytest.raises(ConfigError, match="train.popularity_alpha"):
        load_config(None, ["--train.popularity_alpha", "-1"])


def test_row_adam_first_step_is_adamw_and_later_steps_move_only_the_rows_read():
    """RowAdam against torch's AdamW on the same gradients: step 1 is the same update on every row
    (rows never read have zero moments either way); after it a row that is not read stays put,
    where dense AdamW keeps moving it on momentum."""
    import torch

    from m6rec.model.rows import RowGradients
    from m6rec.train.item_rows import RowAdam

    torch.manual_seed(0)
    w_dense = torch.nn.Parameter(torch.randn(50, 4))
    w_rows = torch.nn.Parameter(w_dense.detach().clone(), requires_grad=False)
    sink = RowGradients()
    opt = torch.optim.AdamW([w_dense], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    rows = RowAdam(w_rows, sink)
    for step, read in enumerate([torch.tensor([1, 3, 3, 7]), torch.tensor([3, 20])]):
        g = torch.randn(len(read), 4)
        dense_grad = torch.zeros(50, 4).index_add_(0, read, g)
        w_dense.grad = dense_grad
        opt.step()
        sink.rows.append(read)
        sink.values.append(g)
        rows.step(0.01)
        if step == 0:
            torch.testing.assert_close(w_rows.data, w_dense.data)
    assert rows.last_rows == 2
    assert torch.equal(w_rows.data[7], rows.table[7]) and not torch.allclose(w_dense.data[7], w_rows.data[7])
    assert rows.steps.tolist()[:8] == [0, 1, 0, 2, 0, 0, 0, 1]
    # a non-finite loss somewhere: nothing moves
    before = w_rows.data.clone()
    sink.rows.append(torch.tensor([5]))
    sink.values.append(torch.ones(1, 4))
    rows.step(0.01, torch.tensor(False))
    assert torch.equal(w_rows.data, before) and rows.steps[5] == 0


def test_sparse_rows_resume_draws_and_updates_as_the_uninterrupted_run(shop, monkeypatch):
    """train.sparse_item_rows (on by default here): the table is not an engine parameter, its rows'
    Adam state rides in the checkpoint, and a run resumed at step 3 repeats steps 4-6 exactly."""
    _, straight = _train(shop, "rows_straight", *SAMPLED, "--train.save_every", "3")
    tmp, root = shop
    cfg = generic_cfg(root, tmp / "ds", "--data.text.item_repr", "token", "--data.text.images", "false", *MODEL,
                      "--train.run_dir", str(tmp / "rows_resumed"), "--deepspeed.zero_stage", "0",
                      "--train.wandb.mode", "disabled", "--train.log_every", "1", *SAMPLED, "--train.save_every", "3")
    monkeypatch.setenv("M6REC_FAULT", "stop_at@3")  # stops after step 3 as a STOP file would, with a checkpoint
    assert train(cfg)["step"] == 3
    monkeypatch.delenv("M6REC_FAULT")
    train(cfg, resume="auto")
    resumed = [r for r in jsonl(tmp / "rows_resumed") if "loss" in r]
    assert [r["step"] for r in resumed][-3:] == [4, 5, 6]
    assert [r["loss"] for r in resumed][-3:] == [r["loss"] for r in straight][-3:]


def test_sparse_rows_refused_where_they_cannot_work():
    with pytest.raises(ConfigError, match="train.sparse_item_rows.*ZeRO 3"):
        load_config(None, ["--train.sparse_item_rows", "true", "--train.item_loss", "sampled",
                           "--data.text.item_repr", "token", "--deepspeed.zero_stage", "3"])
    with pytest.raises(ConfigError, match="train.sparse_item_rows.*item tokens"):
        load_config(None, ["--train.sparse_item_rows", "true", "--data.text.item_repr", "token"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sparse_rows_on_two_ranks_at_zero_2_match_one_rank_with_accumulation(shop):
    """2 real DeepSpeed ranks (ZeRO 2, one micro-batch each) against 1 rank with 2 accumulated
    micro-batches: the same samples, the same negatives (drawn by global micro-batch), and the rows'
    gradients all-gathered and averaged -- so the same losses, step after step, and the same table."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from helpers.generic_data import generic_args
    from helpers.runs import free_port, rank_env, read_trace

    tmp, root = shop
    bin_dir = Path(sys.executable).parent
    common = [*generic_args(root, tmp / "ds", "--data.text.item_repr", "token", "--data.text.images", "false"),
              *MODEL, *SAMPLED, "--train.wandb.mode", "disabled", "--train.log_every", "1", "--train.save_every", "6"]
    env = rank_env(tmp)
    runs = {"one": ([sys.executable, "launch/train.py"], ["--data.stream.num_workers", "2", "--train.grad_accum", "2"]),
            "two": ([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                     "launch/train.py"], ["--data.stream.num_workers", "1", "--deepspeed.zero_stage", "2"])}
    repo = Path(__file__).resolve().parents[2]
    for name, (launcher, extra) in runs.items():
        proc = subprocess.run([*launcher, *common, *extra, "--train.run_dir", str(tmp / f"ranks_{name}")], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = read_trace(tmp / "ranks_one"), read_trace(tmp / "ranks_two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        la, lb = float.fromhex(a["loss"]), float.fromhex(b["loss"])
        assert abs(la - lb) < 2e-5 * abs(la), (a["step"], la, lb)
    from m6rec.train.run_dir import load_run

    w_one = load_run(tmp / "ranks_one").model.tok_embeddings.weight
    w_two = load_run(tmp / "ranks_two").model.tok_embeddings.weight
    torch.testing.assert_close(w_two, w_one, rtol=1e-4, atol=1e-6)


def test_row_adam_keeps_fp32_master_rows_for_a_bf16_table():
    import torch

    from m6rec.model.rows import RowGradients
    from m6rec.train.item_rows import RowAdam

    w = torch.nn.Parameter(torch.randn(10, 4).bfloat16(), requires_grad=False)
    sink = RowGradients()
    rows = RowAdam(w, sink)
    for _ in range(3):  # updates far below bf16's resolution add up in the fp32 rows
        sink.rows.append(torch.tensor([2]))
        sink.values.append(torch.ones(1, 4))
        rows.step(1e-4)
    assert rows.table.dtype == torch.float32 and rows.table.data_ptr() != w.data_ptr()
    torch.testing.assert_close(w.data[2], rows.table[2].bfloat16())
    assert torch.equal(w.data[3], rows.table[3].bfloat16())
