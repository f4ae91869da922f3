"""train.select_by (checkpoint selection by a validation ranking metric) and data.cold_items
(items held out of training), on the generic test shop with item tokens and the real engine."""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from helpers.generic_data import generic_cfg, write_generic_logs
from helpers.runs import MODEL, shard_samples

from m6rec.cli import main as cli_main
from m6rec.config import ConfigError, load_config
from m6rec.data import prepare as P
from m6rec.data.prompts import contexts_for
from m6rec.rec import metrics as M
from m6rec.rec.evaluate import EvalData, Popularity, cold_items, evaluate
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train import checkpoint as ckpt
from m6rec.train.run_dir import load_run
from m6rec.train.select import metric_value

TOKEN = ["--data.text.item_repr", "token"]


def _prepare(root, out, *extra):
    cfg = generic_cfg(root, out, *MODEL, *TOKEN, *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the shop's deliberately broken poster
        P.prepare(cfg.data, workers=1)
    return cfg


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("select")
    return tmp, write_generic_logs(tmp / "logs")


# ---------------------------------------------------------------------------
# select_by
def test_select_by_keys_are_checked():
    assert load_config(None, ["--train.select_by", "ndcg@10"]).train.select_by == "ndcg@10"
    for bad in ("hr10", "recall@10", "hr@0"):
        with pytest.raises(ConfigError, match="train.select_by"):
            load_config(None, ["--train.select_by", bad])
    with pytest.raises(ConfigError, match="model.attn_dropout"):
        load_config(None, ["--model.attn_dropout", "1.0"])
    with pytest.raises(ConfigError, match="data.cold_items"):
        load_config(None, ["--data.cold_items", "1.5"])


def test_prune_keeps_the_protected_tag(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / ckpt.tag_for(step)).mkdir()
        (tmp_path / ckpt.tag_for(step) / ckpt.COMPLETE).write_text("{}")
    ckpt._prune(tmp_path, 2, keep=ckpt.tag_for(8), protect=ckpt.tag_for(2))
    assert ckpt.complete_tags(tmp_path) == [ckpt.tag_for(s) for s in (2, 6, 8)]
    ckpt._prune(tmp_path, 2, keep=ckpt.tag_for(8))
    assert ckpt.complete_tags(tmp_path) == [ckpt.tag_for(s) for s in (6, 8)]


def test_select_by_keeps_the_best_tag_through_pruning(shop, tmp_path):
    from m6rec.train.trainer import train

    tmp, root = shop
    run_dir = tmp_path / "run"
    cfg = _prepare(root, tmp / "ds_sel", "--train.run_dir", str(run_dir), "--deepspeed.zero_stage", "0",
                   "--train.steps", "12", "--train.eval_every", "2", "--train.eval_batches", "1",
                   "--train.keep_last", "1", "--train.select_by", "hr@10", "--train.select_users", "25",
                   "--model.resid_dropout", "0.1", "--model.embed_dropout", "0.1", "--model.attn_dropout", "0.1")
    summary = train(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_hr@10"]) for r in rows if "val_hr@10" in r]
    assert [s for s, _ in vals] == [2, 4, 6, 8, 10, 12]
    best = json.loads((run_dir / "best.json").read_text())
    want_step, want = max(vals, key=lambda sv: (sv[1], -sv[0]))  # the first step with the highest value
    assert best["step"] == want_step and best["value"] == pytest.approx(want)
    assert best["tag"] == ckpt.tag_for(want_step) and best["users"] == 25 and summary["best"] == best
    # keep_last 1: only the final checkpoint and the best one survive
    tags = ckpt.complete_tags(run_dir / "checkpoints")
    assert tags == sorted({best["tag"], ckpt.tag_for(12)})
    # the logged value is what `m6rec eval` computes from the best tag on the same validation users
    run = load_run(run_dir, "best")
    assert run.model.checkpoint["tag"] == best["tag"]
    data = EvalData.load(run.dataset_dir)
    qs = data.queries("valid", max_users=25, seed=0)
    rec = GenerativeRecommender(run.model, contexts_for(run.cfg, run.tokenizer, run.dataset_dir))
    ranks = M.target_ranks(rec.rank(qs, 10), [q.target for q in qs])
    assert metric_value(ranks, "hr@10") == pytest.approx(best["value"])
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--ckpt", str(run_dir), "--tag", "best", "--split", "valid", "--max-users", "25",
                     "--ks", "10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["models"][0]["checkpoint"] == best["tag"]
    assert res["results"][1]["hr@10"] == pytest.approx(best["value"])


# ---------------------------------------------------------------------------
# cold items
def test_held_out_items_are_in_no_training_window_and_get_their_columns(shop):
    tmp, root = shop
    cfg = _prepare(root, tmp / "ds_cold", "--data.cold_items", "0.25", "--data.seed", "3")
    out = tmp / "ds_cold"
    manifest = json.loads((out / "manifest.json").read_text())
    held = set(manifest["held_out_items"])
    data = EvalData.load(out)
    assert len(held) == round(0.25 * len(data.catalog)) and held <= set(data.catalog)
    assert data.held_out == held
    assert held == set(P.held_out_items(data.catalog, 0.25, 3))  # seeded: the same draw again
    assert held != set(P.held_out_items(data.catalog, 0.25, 4))
    sp = data.splits
    train_rows = sp[sp.split == "train"]
    assert train_rows["item_id"].isin(held).any()  # they were in training rows, and are dropped below
    n = 0
    for meta, _, _ in shard_samples(out, "train"):
        assert not set(meta["items"]) & held, meta
        n += 1
    assert n > 0
    # every non-held training row is still predicted by some window (beyond each user's first item)
    predicted = {(m["user_id"], p) for m, _, _ in shard_samples(out, "train")
                 for p in m["positions"][len(m["items"]) - len(m["targets"]):]}
    keep = train_rows[~train_rows["item_id"].isin(held)]
    first = keep.groupby("user_id")["position"].transform("min")
    assert {(u, p) for u, p, f in zip(keep.user_id, keep.position, first) if p != f} <= predicted
    # held-out items stay valid/test targets and in valid/test histories
    valid_samples = list(shard_samples(out, "valid"))
    assert any(set(m["items"]) & held for m, _, _ in valid_samples)
    # popularity never counted them; the columns count the targets that are held-out items
    counts = data.train_counts()
    assert not any(counts.get(i) for i in held)
    assert held <= cold_items(data)
    qs = data.queries("test")
    row = evaluate(Popularity(data), data, qs, [1, 10])
    n_held = sum(q.target in held for q in qs)
    assert n_held > 0 and row["heldout_targets"] == n_held
    for name in ("hr@10_heldout", "ndcg@10_heldout", "hr@10_rest", "ndcg@10_rest"):
        assert 0.0 <= row[name] <= 1.0
    ranks = M.target_ranks(Popularity(data).rank(qs, 10), [q.target for q in qs])
    is_held = np.array([q.target in held for q in qs])
    assert row["hr@10_rest"] == pytest.approx(M.hit_rate(ranks[~is_held], 10))
    # a model trained on it gets the same columns through `m6rec eval`
    from m6rec.train.trainer import train

    run_dir = tmp / "run_cold"
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(run_dir), steps=4,
                                                             save_every=0, eval_every=0))
    cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=0))
    train(cfg)
    res_file = tmp / "eval_cold.json"
    assert cli_main(["eval", "--ckpt", str(run_dir), "--split", "test", "--ks", "1,10", "--out", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["meta"]["held_out_items"] == len(held)
    assert [r["heldout_targets"] for r in res["results"]] == [n_held, n_held]
    assert "hr@10_heldout" in (res_file.with_suffix(".md")).read_text()


def test_no_cold_items_changes_nothing(shop):
    tmp, root = shop
    out = tmp / "ds_plain"
    _prepare(root, out)
    assert json.loads((out / "manifest.json").read_text())["held_out_items"] == []
    data = EvalData.load(out)
    row = evaluate(Popularity(data), data, data.queries("test"), [10])
    assert "hr@10_heldout" not in row and data.held_out == frozenset()
