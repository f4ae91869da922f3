"""``m6rec eval`` and ``m6rec recommend``: the command bodies.

    m6rec eval --ckpt RUN_DIR [--ckpt RUN_DIR2 ...] --task next_item --split test|valid \\
               [--max-users N] [--beam B] --out FILE.json
    m6rec recommend --ckpt RUN_DIR --user ID [--k 10]
    m6rec recommend --ckpt RUN_DIR --history "Toy Story (1995); Heat (1995)" [--k 10]

``eval`` ranks the whole catalog for every user (history excluded) with
popularity and each checkpoint, and writes one table: FILE.json (all
numbers + meta), FILE.md and FILE.png (m6rec.rec.evaluate.write_outputs).
The protocol is in docs/evaluation.md.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from m6rec.config import ConfigError
from m6rec.data.prompts import contexts_for
from m6rec.data.vectors import text_encoder
from m6rec.rec import metrics as M
from m6rec.rec.evaluate import (
    EvalData,
    Popularity,
    TransferredPopularity,
    cold_items,
    evaluate,
    markdown_table,
    write_outputs,
)
from m6rec.rec.finetune import (
    Retriever,
    load_task_run,
    ranking_examples,
    ranking_scores,
)
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.run_dir import load_run

TASKS = ("next_item", "retrieval", "ranking")


def _parse_ks(text: str | None, default: list[int]) -> list[int]:
    if not text:
        return list(default)
    try:
        ks = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--ks: expected comma-separated integers like 1,5,10, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--ks: values must be >= 1, got {text!r}")
    return ks


def _same_protocol(a, b, split: str) -> bool:
    """Two datasets agree on the catalog and on every query of ``split``."""
    if a.catalog != b.catalog:
        return False
    qa = [(q.user_id, q.target, tuple(q.history)) for q in a.queries(split)]
    qb = [(q.user_id, q.target, tuple(q.history)) for q in b.queries(split)]
    return qa == qb


def _set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def _check_source(run, ctx) -> None:
    """Profiles, tags and posters come from the raw source: warn when fine-tuning had them and this
    evaluation does not (or the other way round), since the prompts then differ from training."""
    trained = run.meta.get("source_loaded")
    if trained is not None and trained != ctx.source_loaded:
        warnings.warn(f"{run.name}: fine-tuned on prompts {'with' if trained else 'without'} the raw source's "
                      f"profiles/tags/posters, evaluated {'with' if ctx.source_loaded else 'without'} them")


def eval_main(cfg, args) -> int:
    evaluate_runs(args.ckpt, args.out, task=args.task, tag=args.tag, baseline=args.baseline, dataset=args.dataset,
                  split=args.split, max_users=args.max_users, seed=args.seed, ks=args.ks, mode=args.mode,
                  beam=args.beam, length_norm=args.length_norm, batch_size=args.batch_size, device=args.device,
                  threads=args.threads, agreement_users=args.agreement_users)
    return 0


def evaluate_runs(ckpt: Sequence[str | Path], out: str | Path, *, task: str = "next_item", tag: Optional[str] = None,
                  baseline: Optional[Sequence[str | Path]] = None, dataset: Optional[str] = None,
                  split: str = "valid", max_users: int = 0, seed: int = 0, ks: Optional[str] = None,
                  mode: str = "auto", beam: int = 0, length_norm: float = 1.0, batch_size: int = 16,
                  device: str = "cpu", threads: int = 1, agreement_users: Optional[int] = None) -> dict:
    """``m6rec eval`` (the defaults are the command's): ranks with popularity and every run in ``ckpt``
    (each at checkpoint ``tag``, else its newest complete one) and writes ``out`` (.json, .md, .png);
    returns what ``out`` holds (``{"results", "meta"}``)."""
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: one of {', '.join(TASKS)}")
    _set_threads(threads)
    if baseline and task != "retrieval":
        raise ConfigError("--baseline adds a next-item run to a retrieval table; for next_item give it as --ckpt, "
                          "ranking has no next-item baseline")
    loaded = []  # (kind, run, load seconds); a run has .cfg, .tokenizer, .dataset_dir
    for path, kind in [(p, task) for p in ckpt] + [(p, "next_item") for p in baseline or []]:
        t0 = time.perf_counter()
        run_tag = tag if kind == task else None  # --tag names checkpoints of the --ckpt runs, not of a --baseline
        if kind == "next_item":
            run = load_run(path, run_tag, device=device)
        else:
            run = load_task_run(path, task, device=device, tag=run_tag)
        loaded.append((kind, run, time.perf_counter() - t0))
    first = loaded[0][1]
    zero_shot = dataset is not None and any(
        Path(run.dataset_dir).resolve() != Path(dataset).resolve() for _, run, _ in loaded)
    data = EvalData.load(dataset or first.dataset_dir)
    if not zero_shot:
        for _, run, _ in loaded[1:]:
            d = run.dataset_dir
            if Path(d).resolve() != Path(data.dataset_dir).resolve() and \
                    not _same_protocol(data, EvalData.load(d), split):
                raise ConfigError(f"--ckpt: {d} and {data.dataset_dir} differ in catalog or {split} "
                                  "targets; models can share one table only on the same split")
    ks = _parse_ks(ks, first.cfg.eval.ks)
    queries = data.queries(split, max_users=max_users, seed=seed)
    # cold start: targets never seen in training (zero-shot: titles the source model never trained on)
    cold = cold_items(data, EvalData.load(first.dataset_dir) if zero_shot else None)
    contexts = [contexts_for(run.cfg, run.tokenizer, run.dataset_dir, dataset) for _, run, _ in loaded]
    print(f"m6rec eval: {task} on {data.dataset_dir} ({split}, {len(queries)} users, "
          f"{len(data.catalog)} items, full ranking, history excluded"
          + (", zero-shot" if zero_shot else "") + ")", file=sys.stderr)
    rows, models_meta = [], []
    if task == "ranking":
        examples = ranking_examples(contexts[0], data, split, max_users, seed)
        if not examples or len({y for _, y in examples}) < 2:
            raise ConfigError(f"--task ranking: {data.dataset_dir} has no {split} targets rated both >= 4 and "
                              "<= 2 (the ranking task needs ratings)")
        labels = [y for _, y in examples]
        counts = data.train_counts()
        train = data.splits[data.splits["split"] == "train"]
        judged = train[(train["rating"] >= 4) | (train["rating"] <= 2)]
        base = float((judged["rating"] >= 4).mean()) if len(judged) else 0.5
        rows.append({"model": "popularity", "examples": len(examples), "positives": int(sum(labels)),
                     "auc": M.auc(labels, [counts.get(q.target, 0) for q, _ in examples]), "logloss": float("nan")})
        rows.append({"model": f"constant p={base:.3f} (training rate)", "examples": len(examples),
                     "positives": int(sum(labels)), "auc": 0.5, "logloss": M.log_loss(labels, [base] * len(labels))})
        print(f"  {len(examples)} held-out targets rated >= 4 (positive, {sum(labels)}) or <= 2 (negative)",
              file=sys.stderr)
    else:
        rows.append(evaluate(Popularity(data), data, queries, ks, cold=cold))
        if zero_shot:  # the second floor: what the source's item prior alone reaches on this catalog
            source = TransferredPopularity(data, EvalData.load(first.dataset_dir))
            rows.append(evaluate(source, data, queries, ks, cold=cold))
            print(f"  {source.name}: {source.matched} of {len(data.catalog)} items matched by title", file=sys.stderr)
    for (kind, run, load_s), ctx in zip(loaded, contexts):
        t1 = time.perf_counter()
        if kind == "ranking":
            _check_source(run, ctx)
            probs = ranking_scores(run, ctx, examples, batch_size=batch_size)
            row = {"model": run.name, "examples": len(examples), "positives": int(sum(labels)),
                   "auc": M.auc(labels, probs), "logloss": M.log_loss(labels, probs)}
            stats = {"seconds": round(time.perf_counter() - t1, 2)}
            name = run.name
        else:
            if kind == "next_item":
                rec = GenerativeRecommender(run.model, ctx, mode=mode, beam=beam,
                                            batch_size=batch_size, length_norm=length_norm)
            else:
                _check_source(run, ctx)
                rec = Retriever(run, ctx, batch_size=max(batch_size, 32))
            # rank once (with a progress bar), then score those rankings through evaluate()'s checks
            ranked = rec.rank_prompts([ctx.for_query(q) for q in queries], max(ks), progress=True)
            stats = dict(rec.stats)

            class _Fixed:
                name = rec.name

                def rank(self, qs, k):
                    return [[i for i, _ in r[:k]] for r in ranked]

            row = evaluate(_Fixed(), data, queries, ks, cold=cold)
            row["seconds_per_user"] = stats["seconds_per_user"]
            if "invalid_items" in stats:  # a trie beam: how often it returned a sequence that is no catalog item's
                row["invalid_item_rate"] = stats["invalid_items"] / max(1, stats["items_returned"])
                users = (200 if rec.mode == "semantic_id" else 0) if agreement_users is None else agreement_users
                if users:
                    row["beam_exact_agreement@10"], stats["agreement"] = beam_exact_agreement(
                        rec, ranked, [ctx.for_query(q) for q in queries], users, seed)
            name = rec.name
        rows.append(row)
        m = {"model": name, "task": kind, "dataset_trained": str(run.dataset_dir), "load_seconds": round(load_s, 2),
             **stats}
        if kind == "next_item":
            ck = run.model.checkpoint
            m.update({"run_dir": ck["run_dir"], "checkpoint": ck["tag"], "step": ck["step"], "mode": rec.mode,
                      "beam": stats.get("beam"),
                      "length_norm": rec.length_norm if rec.mode == "text" else None,
                      "source_rebuilt": ctx.source_loaded})
        else:
            m.update({k: run.meta.get(k) for k in ("method", "base_run", "base_tag", "steps", "trained_parameters",
                                                   "trained_fraction")})
        models_meta.append(m)
        print(f"  {name}: {stats['seconds']:.1f} s", file=sys.stderr)
    meta = {
        "task": task, "split": split, "users": len(queries), "dataset": str(data.dataset_dir),
        "zero_shot": zero_shot, "catalog_size": len(data.catalog), "ks": ks, "max_users": max_users,
        "seed": seed, "cold_items": len(cold),
        "held_out_items": len(data.held_out), "models": models_meta,
        "protocol": ("held-out targets of the saved split rated >= 4 (positive) or <= 2 (negative); AUC and log loss"
                     if task == "ranking" else
                     "saved leave-one-out split (splits.parquet); full ranking over the catalog; the user's "
                     "history excluded; docs/evaluation.md"),
    }
    out = Path(out)
    write_outputs(rows, ks, out, meta)
    print(markdown_table(rows, ks))
    print(f"written {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return json.loads(out.read_text())


def beam_exact_agreement(rec, ranked: list, prompts: list, users: int, seed: int, k: int = 10) -> tuple[float, dict]:
    """The share of ``users`` (a seeded subset) whose beam top ``k`` (``ranked``) is the same set of items as
    the exact top ``k`` (:meth:`GenerativeRecommender.exact`), and what that cost."""
    pick = np.random.default_rng([seed, 0xBEA4]).permutation(len(prompts))[:users]
    exact = rec.exact()
    if exact is None:
        gib = rec.exact_bytes_per_user() / 2**30
        print(f"  beam vs exact: not measured: the exact scorer needs ~{gib:.1f} GiB per user at this catalog "
              "(over its 4 GiB budget)", file=sys.stderr)
        return float("nan"), {"users": 0, "skipped": f"exact scorer needs ~{gib:.1f} GiB per user"}
    truth = exact.rank_prompts([prompts[i] for i in pick], k, progress=True)
    same = [{i for i, _ in ranked[u][:k]} == {i for i, _ in t} for u, t in zip(pick, truth)]
    overlap = [len({i for i, _ in ranked[u][:k]} & {i for i, _ in t}) / max(1, len(t)) for u, t in zip(pick, truth)]
    info = {"users": len(pick), "k": k, "same_top_k": float(np.mean(same)), "mean_overlap": float(np.mean(overlap)),
            "exact_seconds_per_user": exact.stats.get("seconds_per_user"),
            "exact_invalid_items": exact.stats.get("invalid_items")}
    print(f"  beam {rec.stats.get('beam')} vs exact on {len(pick)} users: top {k} the same for "
          f"{info['same_top_k']:.1%}, mean overlap {info['mean_overlap']:.1%}", file=sys.stderr)
    return info["same_top_k"], info


def recommend_main(cfg, args) -> int:
    if (args.user is None) == (args.history is None):
        raise ConfigError("give exactly one of --user ID (a user of the dataset) or --history \"title; title\"")
    _set_threads(args.threads)
    t0 = time.perf_counter()
    if (Path(args.ckpt) / "finetune.json").is_file():  # a retrieval run of `m6rec finetune`: the cached item index
        run = load_task_run(args.ckpt, "retrieval", device=args.device)
        ctx = contexts_for(run.cfg, run.tokenizer, run.dataset_dir)
        rec = Retriever(run, ctx, batch_size=1)
        rec.mode = "retrieval"
    else:
        run = load_run(args.ckpt, args.tag, device=args.device)
        ctx = contexts_for(run.cfg, run.tokenizer, run.dataset_dir)
        rec = GenerativeRecommender(run.model, ctx, mode=args.mode, beam=args.beam, batch_size=1,
                                    length_norm=args.length_norm)
    load_s = time.perf_counter() - t0
    if args.user is not None:
        try:
            prompt = ctx.for_user(str(args.user))
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        print(f"user {args.user}: {len(prompt.exclude)} items in the history (excluded), "
              f"the last {len(prompt.context_items)} written in the prompt")
    else:
        prompt, matched = ctx.for_titles(args.history, encode=text_encoder(ctx.text_cfg.item_encoder))
        if not matched:
            raise ConfigError("--history: no titles (separate them with ';')")
        for title, iid in matched:
            new = {"vector": "encoded from its text", "semantic_id": "given codes from its text"}.get(
                rec.mode, "read as plain text")
            print(f"  history: {title!r} -> " + (f"item {iid} ({ctx.catalog.item_text[iid]})" if iid is not None
                                                  else f"not in the catalog: {new}"))
    t1 = time.perf_counter()
    (ranked,) = rec.rank_prompts([prompt], args.k)
    dt = time.perf_counter() - t1
    what = ("log p(item) (item-token softmax)" if rec.mode == "token" else
            "log p(item) (softmax over the catalog's cached text vectors)" if rec.mode == "vector" else
            "cosine(user, item) of the two towers (cached item index)" if rec.mode == "retrieval" else
            "log p(item's codes) (trie beam search)" if rec.mode == "semantic_id" else
            f"log p(item text + END) / (tokens + 1) ** {args.length_norm:g}")
    print(f"top {len(ranked)} by {rec.name} (score = {what}):")
    width = max((len(str(i)) for i, _ in ranked), default=4)
    for r, (iid, score) in enumerate(ranked, 1):
        print(f"{r:3d}. {str(iid):<{width}}  {score:9.4f}  {ctx.catalog.item_text.get(iid, iid)}")
    sys.stdout.flush()
    print(f"ranked {len(ctx.catalog_ids)} items in {1000 * dt:.0f} ms (loading the run: {load_s:.1f} s)",
          file=sys.stderr)
    return 0
