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
