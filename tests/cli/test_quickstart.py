"""``m6rec quickstart`` end to end, in its reduced CI form: the shipped preset, found
through the package from a directory without configs/, with the tiny model and a
few steps; every stage is checked through the files and lines it must produce."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re

import pytest
import torch
import yaml
from helpers.wandb_files import read_wandb_records, wandb_history

from m6rec import quickstart as Q
from m6rec.cli import DEFAULT_HISTORY
from m6rec.cli import main as cli_main
from m6rec.config import load_config, to_dict

STEPS = 6
REDUCED = ["--model.preset", "tiny", "--model.dim", "128", "--model.n_layers", "2", "--model.n_heads", "4",
           "--model.ffn_hidden", "384",
           "--data.stream.num_workers", "0", "--train.steps", str(STEPS), "--train.warmup_steps", "2",
           "--train.log_every", "2", "--train.eval_every", "3", "--train.eval_batches", "2",
           "--train.save_every", "0"]
ROW = re.compile(r"^\s+(\d+)\. (.+?)   \[(-?\d+\.\d+)\]$")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """One reduced quickstart run, started from an empty directory (no configs/ there)."""
    tmp = tmp_path_factory.mktemp("qs")
    omp, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.delenv("WANDB_MODE", raising=False)  # the preset's own train.wandb.mode (offline) must decide
    mp.delenv("OMP_NUM_THREADS", raising=False)  # the default: one training thread
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        mp.setenv(var, str(tmp / "wandb-home" / var.lower()))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = cli_main(["quickstart", *REDUCED, "--users", "1,nobody"])
    finally:
        mp.undo()
    assert os.environ.get("OMP_NUM_THREADS") == omp and torch.get_num_threads() == threads  # restored
    return {"rc": rc, "out": out.getvalue(), "tmp": tmp, "run": tmp / "runs" / "quickstart",
            "data": tmp / "data" / "ml-latest-small-token"}


def test_runs_every_stage(quickstart):
    q = quickstart
    assert q["rc"] == 0, q["out"][-3000:]
    out = q["out"]
    for n, stage in enumerate(["prepare", "pretrain", "evaluate", "recommend"], 1):
        assert f"=== [{n}/4] {stage}" in out
    assert f"preset {Q.PRESET}" in out and "torch CPU threads: 1" in out
    record = json.loads((q["run"] / Q.MARKER).read_text())
    assert record["status"] == "done" and record["prepared"] is True
    assert set(record["seconds"]) == {"prepare", "pretrain", "evaluate", "recommend", "total"}


def test_prepared_dataset(quickstart):
    manifest = json.loads((quickstart["data"] / "manifest.json").read_text())
    assert manifest["item_repr"] == "token" and manifest["name"] == "ml-latest-small"
    assert manifest["splits"]["train"]["samples"] > 9000 and manifest["splits"]["test"]["samples"] == 610
    assert manifest["vocab_size"] > 9742  # BPE + one token per item


def test_training_outputs(quickstart):
    run = quickstart["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, STEPS + 1, 2))
    assert all(r["loss"] > 0 for r in rows if "loss" in r) and rows[-1]["tokens_seen"] > 0
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["stopped_by"] == "steps"
    assert summary["last_checkpoint"] == f"step{STEPS:08d}"
    assert (run / "checkpoints" / summary["last_checkpoint"] / "COMPLETE").exists()
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["dim"] == 128 and cfg["train"]["wandb"]["mode"] == "offline"


def test_wandb_offline_run(quickstart):
    run = quickstart["run"]
    run_id = (run / "wandb_id").read_text().strip()
    (wandb_file,) = sorted((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    records = read_wandb_records(wandb_file)
    history = wandb_history(records)
    assert sorted(history) == [2, 3, 4, 6]  # losses every 2 steps, validation at 3 and 6
    assert history[3]["val_loss"] > 0 and "loss" not in history[3]
    assert history[STEPS]["loss"] > 0 and history[STEPS]["val_loss"] > 0
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.display_name == "quickstart" and "quickstart" in run_record.tags
    assert str(wandb_file.relative_to(quickstart["tmp"])) in quickstart["out"]  # listed in the summary


def test_eval_table(quickstart):
    run = quickstart["run"]
    table = json.loads((run / "eval_test.json").read_text())
    meta, results = table["meta"], table["results"]
    assert meta["split"] == "test" and meta["users"] == 610 and meta["catalog_size"] == 9742
    assert [r["model"] for r in results] == ["popularity", f"m6rec-token (quickstart, step{STEPS:08d})"]
    for r in results:
        for key in ("hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "coverage@10"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key)
        assert r["hr@1"] <= r["hr@10"] <= r["hr@50"]
    assert results[0]["hr@50"] > 0.05  # popularity finds some targets: the table scored real rankings
    md = (run / "eval_test.md").read_text()
    assert "| popularity |" in md and f"| m6rec-token (quickstart, step{STEPS:08d}) |" in md
    assert (run / "eval_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = quickstart["out"]
    hits = [round(r["hr@10"] * 610) for r in results]
    assert f"HR@10: m6rec-token (quickstart, step{STEPS:08d}) {results[1]['hr@10']:.4f} vs popularity " \
           f"{results[0]['hr@10']:.4f} ({hits[1]} vs {hits[0]} of 610 targets in the top 10)" in out


def test_recommendations_printed(quickstart):
    import pandas as pd

    out = quickstart["out"]
    items = pd.read_parquet(quickstart["data"] / "items.parquet")
    text = dict(zip(items["item_id"], items["text"]))
    recs = json.loads((quickstart["run"] / Q.MARKER).read_text())["recommendations"]
    assert [r.get("user") for r in recs] == ["1", None] and recs[1]["history"] == DEFAULT_HISTORY
    assert "user nobody: not in the dataset, skipped" in out
    printed = [ROW.match(line) for line in out.split("=== [4/4] recommend")[1].splitlines()]
    printed = [m for m in printed if m]
    assert len(printed) == 20
    # the printed lines are the items of the record, in order, as catalog text
    assert [m.group(2) for m in printed] == [text[i] for r in recs for i in r["items"]]
    assert [int(m.group(1)) for m in printed] == list(range(1, 11)) * 2
    scores = [float(m.group(3)) for m in printed[:10]]
    assert scores == sorted(scores, reverse=True)
    splits = pd.read_parquet(quickstart["data"] / "splits.parquet")
    assert not set(recs[0]["items"]) & set(splits.loc[splits["user_id"] == "1", "item_id"])  # history excluded
    assert not {"1", "6377", "68954"} & set(recs[1]["items"])  # Toy Story, Finding Nemo, Up
    assert "Toy Story (1995)" in out.split("free-text history")[1]
    for name in ("metrics.jsonl", "metrics.png", "eval_test.json", "eval_test.md", "eval_test.png"):
        assert f"runs/quickstart/{name}" in out.split("written:")[1]


def test_rerun_skips_prepare_and_replaces_the_run(quickstart, tmp_path):
    data_cfg = load_config(Q.PRESET, ["--data.output", str(quickstart["data"])]).data
    assert Q.prepared_differs(data_cfg) is None
    data_cfg.stream.batch_size = 64  # read-time settings do not matter
    assert Q.prepared_differs(data_cfg) is None
    data_cfg.text.item_repr = "text"
    assert "data.text" in Q.prepared_differs(data_cfg)
    data_cfg.output = str(tmp_path / "none")
    assert "holds no prepared dataset" in Q.prepared_differs(data_cfg)

    other = tmp_path / "someone-elses-run"
    (other / "checkpoints").mkdir(parents=True)
    with pytest.raises(Exception, match="not a quickstart run directory"):
        Q.fresh_run_dir(other)
    assert (other / "checkpoints").is_dir()
    old = tmp_path / "old-quickstart"
    old.mkdir()
    (old / Q.MARKER).write_text("{}")
    (old / "metrics.jsonl").write_text("{}\n")
    Q.fresh_run_dir(old)
    assert not old.exists()


def test_presets_agree():
    """The shipped preset is what configs/pretrain/quickstart.yaml loads, and its data section
    is configs/data/ml-latest-small.yaml apart from the keys it sets on purpose."""
    from conftest import PROJECT_ROOT

    shipped = to_dict(load_config(Q.PRESET))
    assert to_dict(load_config(PROJECT_ROOT / "configs" / "pretrain" / "quickstart.yaml")) == shipped
    base = to_dict(load_config(PROJECT_ROOT / "configs" / "data" / "ml-latest-small.yaml"))["data"]
    on_purpose = {"output", "shard_size", "stream", "text", "tokenizer"}
    assert {k: v for k, v in shipped["data"].items() if k not in on_purpose} == \
        {k: v for k, v in base.items() if k not in on_purpose}
    assert {**shipped["data"]["text"], "item_repr": "text"} == base["text"]
    assert shipped["train"]["wandb"]["mode"] == "offline" and shipped["train"]["run_dir"] == "runs/quickstart"
    pyproject = (PROJECT_ROOT / "pyproject.toml").read_text()
    assert '"configs/**/*.yaml"' in pyproject  # package data: m6rec/configs/quickstart.yaml is installed
