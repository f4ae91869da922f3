"""``m6rec quickstart``: the whole pipeline in one command, on the built-in data.

    m6rec quickstart [--config PRESET] [--out RUN_DIR] [--split test|valid] [--dotted.key value ...]

1. **prepare** the built-in MovieLens latest-small (``m6rec prepare``), skipped
   when ``data.output`` already holds a dataset prepared with the same data
   settings (``--force-prepare`` prepares it again);
2. **pretrain** (``m6rec train``: DeepSpeed in this process, one rank), the
   curves drawn to ``RUN_DIR/metrics.png`` (``m6rec plot``);
3. **evaluate** popularity and the trained model on the test split, the whole
   catalog ranked for every user (``m6rec eval``): ``RUN_DIR/eval_test.json``,
   ``.md`` and ``.png``;
4. **recommend** for a few users and one free-text history (as
   ``m6rec recommend``), then a summary of what was written.

The default preset ships inside the package (``m6rec/configs/quickstart.yaml``,
also ``configs/pretrain/quickstart.yaml`` in the repository), so the command
works from any directory; ``data/`` and ``runs/`` are written under the
current directory.  W&B runs offline unless ``--train.wandb.mode`` (or
``WANDB_MODE``) says otherwise.  See docs/training.md#quickstart.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from m6rec.config import Config, ConfigError, load_config, to_dict
from m6rec.data.prepare import prepare, summary
from m6rec.data.prompts import contexts_for
from m6rec.rec.commands import evaluate_runs
from m6rec.rec.evaluate import EvalData
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.plot import plot_run
from m6rec.train.run_dir import load_run
from m6rec.train.trainer import NonFiniteLossError, train

PRESET = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
MARKER = "quickstart.json"  # written first into the run directory: "this directory is a quickstart run"
# Data settings that change where and how training reads a prepared dataset, not what it holds.
_READ_TIME_KEYS = ("output", "stream", "shards", "workers")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _stage(n: int, title: str) -> float:
    _say(f"\n=== [{n}/4] {title} ===")
    return time.perf_counter()


def prepared_differs(data_cfg) -> str | None:
    """Why ``data_cfg.output`` must be prepared (again), or None when it holds a
    finished dataset written with the same data settings (stream settings aside)."""
    out = Path(data_cfg.output)
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return f"{out} holds no prepared dataset"
    try:
        old = json.loads(manifest.read_text()).get("config", {})
    except (OSError, json.JSONDecodeError):
        return f"{manifest} is unreadable"
    new = to_dict(data_cfg)
    changed = sorted(k for k in set(old) | set(new) if k not in _READ_TIME_KEYS and old.get(k) != new.get(k))
    if changed:
        return f"{out} was prepared with other settings (data.{', data.'.join(changed)})"
    missing = [f for f in ("tokenizer.json", "items.parquet", "splits.parquet") if not (out / f).is_file()]
    if missing:
        return f"{out} lacks {', '.join(missing)}"
    return None


def fresh_run_dir(run_dir: Path) -> None:
    """Start from an empty run directory: a previous quickstart run there (it holds
    ``quickstart.json``) is replaced; any other non-empty directory is refused."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file")
    if not any(run_dir.iterdir()):
        return
    if not (run_dir / MARKER).is_file():
        raise ConfigError(f"{run_dir} is not empty and is not a quickstart run directory (no {MARKER}); "
                          "choose another --out or remove it")
    _say(f"replacing the previous quickstart run in {run_dir}")
    shutil.rmtree(run_dir)


def _write_marker(run_dir: Path, record: dict) -> None:
    tmp = run_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(run_dir / MARKER)


def _wandb_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")) + \
        sorted((run_dir / "wandb").glob("run-*/run-*.wandb"))


def _recommend(run_dir: Path, users: list[str], history: str, k: int) -> list[dict]:
    """Top-k for ``users`` (whole timeline excluded, as ``m6rec recommend --user``) and for a
    free-text ``history`` (as ``m6rec recommend --history``), loading the run once."""
    run = load_run(run_dir)
    ctx = contexts_for(run.cfg, run.tokenizer, run.dataset_dir)
    rec = GenerativeRecommender(run.model, ctx, batch_size=1)
    text = ctx.catalog.item_text
    shown = []
    for user in users:
        try:
            prompt = ctx.for_user(user)
        except KeyError:
            _say(f"user {user}: not in the dataset, skipped")
            continue
        items = ctx.timeline(user)[0]
        _say(f"\nuser {user}: {len(items)} items in the history (all excluded); the last three:")
        for iid in items[-3:]:
            _say(f"       {text.get(iid, iid)}")
        shown.append(_print_top(rec, prompt, k, text, user=user))
    if history:
        prompt, matched = ctx.for_titles(history)
        if matched:
            _say("\nfree-text history (a user the model never saw):")
            for title, iid in matched:
                _say(f"       {title}" + ("" if iid is not None else "   (not in the catalog: read as plain text)"))
            shown.append(_print_top(rec, prompt, k, text, history=history))
    return shown


def _print_top(rec, prompt, k: int, text: dict, **who) -> dict:
    (ranked,) = rec.rank_prompts([prompt], k)
    score = "log p(item)" if rec.mode == "token" else "log p(item text) per token"
    _say(f"  top {len(ranked)} by {rec.name} [{score}]:")
    for r, (iid, score) in enumerate(ranked, 1):
        _say(f"  {r:3d}. {text.get(iid, iid)}   [{score:.2f}]")
    return {**who, "items": [iid for iid, _ in ranked]}


def _eval(run_dir: Path, split: str, out: Path) -> dict:
    """``m6rec eval --ckpt RUN_DIR --split SPLIT --out OUT`` with that command's defaults."""
    return evaluate_runs([run_dir], out, split=split)


def _headline(results: list[dict]) -> list[str]:
    cols = ["hr@1", "hr@10", "hr@50", "ndcg@10", "mrr", "coverage@10"]
    cols = [c for c in cols if c in results[0]]
    width = max(len(r["model"]) for r in results)
    lines = [f"  {'model':<{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for r in results:
        lines.append(f"  {r['model']:<{width}}  " + "  ".join(f"{r[c]:>11.4f}" for c in cols))
    return lines


def main(cfg: Config, args) -> int:
    """``m6rec quickstart``.  ``cfg`` (the CLI's defaults + overrides) is not used: the
    shipped preset, or ``--config``, is loaded here with the same overrides."""
    omp, threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    try:
        return _run(args)
    finally:  # in-process callers (tests, notebooks) get their thread settings back
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
        torch.set_num_threads(threads)


def _run(args) -> int:
    t_all = time.perf_counter()
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "out", None):
        overrides += ["--train.run_dir", args.out]
    cfg = load_config(args.config or PRESET, overrides)  # the shipped preset unless --config names one
    run_dir = Path(cfg.train.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    _say(f"m6rec quickstart: {cfg.data.name} -> {run_dir} (preset {args.config or PRESET})")
    fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict = {"status": "running", "started": time.time(), "preset": str(args.config or PRESET),
                    "overrides": overrides, "split": args.split, "seconds": {}}
    _write_marker(run_dir, record)

    # 1. prepare
    t0 = _stage(1, f"prepare {cfg.data.name} -> {cfg.data.output}")
    why = "--force-prepare" if args.force_prepare else prepared_differs(cfg.data)
    if why is None:
        _say(f"{cfg.data.output} is already prepared with these data settings: skipped (--force-prepare redoes it)")
        record["prepared"] = False
    else:
        _say(f"preparing: {why}")
        manifest = prepare(cfg.data, cfg.data.workers)
        _say(summary(manifest))
        record["prepared"] = True
    record["seconds"]["prepare"] = round(time.perf_counter() - t0, 1)

    # 2. pretrain
    t0 = _stage(2, f"pretrain the {cfg.model.preset} model: {cfg.train.steps} steps -> {run_dir}")
    threads = _set_threads(args.threads)
    _say(f"torch CPU threads: {threads or 'the engine default (cores per rank)'}")
    try:
        result = train(cfg, resume="none")
    except NonFiniteLossError as e:
        print(f"m6rec quickstart: {e}", file=sys.stderr, flush=True)
        return 1
    if result["stopped_by"] != "steps" or result["step"] != cfg.train.steps:
        print(f"m6rec quickstart: training stopped at step {result['step']} ({result['stopped_by']}); "
              f"not evaluating a half-trained model", file=sys.stderr, flush=True)
        return 1
    chart = plot_run(run_dir)
    record["train"] = result
    record["seconds"]["pretrain"] = round(time.perf_counter() - t0, 1)

    # 3. evaluate
    t0 = _stage(3, f"evaluate popularity and the model on the {args.split} split (full-catalog ranking)")
    eval_json = run_dir / f"eval_{args.split}.json"
    table = _eval(run_dir, args.split, eval_json)
    record["results"] = table["results"]
    record["seconds"]["evaluate"] = round(time.perf_counter() - t0, 1)

    # 4. recommend
    t0 = _stage(4, "recommend")
    if args.users:
        users = [u.strip() for u in args.users.split(",") if u.strip()]
    else:  # two users drawn with a fixed seed: the same ones every run, not picked for looking good
        ids = sorted({q.user_id for q in _queries(cfg, args.split)})
        users = [str(u) for u in np.random.default_rng(0).choice(ids, size=min(2, len(ids)), replace=False)]
    record["recommendations"] = _recommend(run_dir, users, args.history, args.k)
    record["seconds"]["recommend"] = round(time.perf_counter() - t0, 1)

    # summary
    total = time.perf_counter() - t_all
    record["seconds"]["total"] = round(total, 1)
    files = [run_dir / "metrics.jsonl", chart, eval_json, eval_json.with_suffix(".md"), eval_json.with_suffix(".png"),
             run_dir / "config.yaml", run_dir / "checkpoints" / str(result["last_checkpoint"])]
    wandb_files = _wandb_files(run_dir)
    record["files"] = [str(f) for f in files + wandb_files] + [str(run_dir / MARKER)]
    record["status"] = "done"
    _write_marker(run_dir, record)

    _say(f"\n=== done in {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in record['seconds'].items() if k != 'total')}) ===")
    _say(f"{table['meta']['split']} split, {table['meta']['users']} users, all {table['meta']['catalog_size']} "
         "items ranked, history excluded:")
    for line in _headline(table["results"]):
        _say(line)
    pop, model = table["results"][0], table["results"][1]
    n = table["meta"]["users"]
    _say(f"HR@10: {model['model']} {model['hr@10']:.4f} vs popularity {pop['hr@10']:.4f} "
         f"({round(model['hr@10'] * n)} vs {round(pop['hr@10'] * n)} of {n} targets in the top 10)")
    _say("\nwritten:")
    for f in files:
        _say(f"  {f}")
    if wandb_files:
        for f in wandb_files:
            offline = "offline-run-" in f.parent.name
            _say(f"  {f}   (W&B {'offline run; upload: wandb sync ' + str(f.parent) if offline else 'run'})")
    else:
        _say(f"  (no W&B run: train.wandb.mode={cfg.train.wandb.mode}, or WANDB_MODE in the environment)")
    _say(f"  {run_dir / MARKER}   (this summary as JSON)")
    _say(f"\nnext: m6rec recommend --ckpt {run_dir} --user {users[0] if users else 1} --k 10   "
         f"|   m6rec plot {run_dir}   |   docs/training.md")
    return 0


def _set_threads(threads: int | None) -> int:
    """Training threads: ``--threads``, else OMP_NUM_THREADS when set, else 1; 0 leaves the
    engine's default (the cores split between the ranks of this machine).  One thread: on a
    2-core machine that other jobs share, two OpenMP threads spin-wait for each other and the
    tiny model trains ~6x slower (measured: docs/training.md#quickstart)."""
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    if threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the engine keeps it; DataLoader workers inherit it
        torch.set_num_threads(threads)
    return threads


def _queries(cfg: Config, split: str):
    return EvalData.load(cfg.data.output).queries(split)
