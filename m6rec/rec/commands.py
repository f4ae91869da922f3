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

import argparse
import sys
import time
import warnings
from pathlib import Path


from m6rec.config import ConfigError

TASKS = ("next_item",)


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


def _set_threads(args) -> None:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)


def eval_main(cfg, args) -> int:
    from m6rec.rec.evaluate import EvalData, Popularity, evaluate, markdown_table, write_outputs
    from m6rec.rec.generative import ContextBuilder, GenerativeRecommender, load_run

    if args.task not in TASKS:
        raise ConfigError(f"--task {args.task!r}: implemented: {', '.join(TASKS)} (retrieval, ranking, zero-shot "
                          "and option tuning follow in issue 5)")
    _set_threads(args)
    runs = []
    for path in args.ckpt:
        t0 = time.perf_counter()
        run = load_run(path, args.tag if len(args.ckpt) == 1 else None, device=args.device)
        runs.append((run, time.perf_counter() - t0))
    data = EvalData.load(runs[0][0].dataset_dir)
    for run, _ in runs[1:]:
        if Path(run.dataset_dir).resolve() != Path(data.dataset_dir).resolve() and \
                not _same_protocol(data, EvalData.load(run.dataset_dir), args.split):
            raise ConfigError(f"--ckpt: {run.dataset_dir} and {data.dataset_dir} differ in catalog or {args.split} "
                              "targets; models can share one table only on the same split")
    ks = _parse_ks(args.ks, runs[0][0].cfg.eval.ks)
    queries = data.queries(args.split, max_users=args.max_users, seed=args.seed)
    print(f"m6rec eval: {args.task} on {data.dataset_dir} ({args.split}, {len(queries)} users, "
          f"{len(data.catalog)} items, full ranking, history excluded)", file=sys.stderr)
    rows = [evaluate(Popularity(data), data, queries, ks)]
    models_meta = []
    for run, load_s in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # broken posters were reported by prepare already
            ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
        rec = GenerativeRecommender(run.model, ctx, mode=args.mode, beam=args.beam, batch_size=args.batch_size,
                                    length_norm=args.length_norm)
        # rank once (with a progress bar), then score those rankings through evaluate()'s checks
        ranked = rec.rank_with_scores(queries, max(ks), progress=True)
        stats = dict(rec.stats)

        class _Fixed:
            name = rec.name

            def rank(self, qs, k):
                return [[i for i, _ in r[:k]] for r in ranked]

        row = evaluate(_Fixed(), data, queries, ks)
        row["seconds_per_user"] = stats["seconds_per_user"]
        rows.append(row)
        ck = run.model.checkpoint
        models_meta.append({"model": rec.name, "run_dir": ck["run_dir"], "checkpoint": ck["tag"],
                            "step": ck["step"], "mode": rec.mode,
                            "beam": max(max(ks), args.beam) if rec.mode == "text" else None,
                            "length_norm": args.length_norm if rec.mode == "text" else None,
                            "dataset": str(run.dataset_dir), "load_seconds": round(load_s, 2),
                            "source_rebuilt": ctx.source_loaded, **stats})
        print(f"  {rec.name}: {stats['seconds']:.1f} s for {stats['users']} users "
              f"({1000 * stats['seconds_per_user']:.1f} ms/user)", file=sys.stderr)
    meta = {
        "task": args.task, "split": args.split, "users": len(queries), "dataset": str(data.dataset_dir),
        "catalog_size": len(data.catalog), "ks": ks, "max_users": args.max_users, "seed": args.seed,
        "checkpoint": models_meta[0]["checkpoint"], "models": models_meta,
        "protocol": "saved leave-one-out split (splits.parquet); full ranking over the catalog; the user's "
                    "history excluded; docs/evaluation.md",
    }
    out = Path(args.out)
    write_outputs(rows, ks, out, meta)
    print(markdown_table(rows, ks))
    print(f"written {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}", file=sys.stderr)
    return 0


def recommend_main(cfg, args) -> int:
    from m6rec.rec.generative import ContextBuilder, GenerativeRecommender, load_run

    if (args.user is None) == (args.history is None):
        raise ConfigError("give exactly one of --user ID (a user of the dataset) or --history \"title; title\"")
    _set_threads(args)
    t0 = time.perf_counter()
    run = load_run(args.ckpt, args.tag, device=args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
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
        prompt, matched = ctx.for_titles(args.history)
        if not matched:
            raise ConfigError("--history: no titles (separate them with ';')")
        for title, iid in matched:
            print(f"  history: {title!r} -> " + (f"item {iid} ({ctx.catalog.item_text[iid]})" if iid is not None
                                                  else "not in the catalog: read as plain text"))
    t1 = time.perf_counter()
    (ranked,) = rec.rank_prompts([prompt], args.k)
    dt = time.perf_counter() - t1
    what = ("log p(item) (item-token softmax)" if rec.mode == "token" else
            f"log p(item text + END) / (tokens + 1) ** {args.length_norm:g}")
    print(f"top {len(ranked)} by {rec.name} (score = {what}):")
    width = max((len(str(i)) for i, _ in ranked), default=4)
    for r, (iid, score) in enumerate(ranked, 1):
        print(f"{r:3d}. {str(iid):<{width}}  {score:9.4f}  {ctx.catalog.item_text.get(iid, iid)}")
    sys.stdout.flush()
    print(f"ranked {len(ctx.catalog_ids)} items in {1000 * dt:.0f} ms (loading the run: {load_s:.1f} s)",
          file=sys.stderr)
    return 0


def add_eval_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, action="append",
                   help="a run directory (newest complete checkpoint); repeat to put several models in one table")
    p.add_argument("--tag", default=None, help="a checkpoint tag like step00001000 (with one --ckpt)")
    p.add_argument("--task", default="next_item", help="next_item (generative next-item ranking)")
    p.add_argument("--split", choices=["valid", "test"], default="valid",
                   help="valid for model selection; test once, for the reported number")
    p.add_argument("--max-users", type=int, default=0, help="a seeded random subset of users (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-users subset")
    p.add_argument("--ks", default=None, help="cutoffs, e.g. 1,5,10,20,50 (default: eval.ks of the run's config)")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="FILE.json (FILE.md and FILE.png are written beside it)")


def add_recommend_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="a run directory (newest complete checkpoint)")
    p.add_argument("--tag", default=None, help="a checkpoint tag like step00001000")
    p.add_argument("--user", default=None, help="a user id of the dataset")
    p.add_argument("--history", default=None, help='a free-text history: "Toy Story (1995); Heat (1995)"')
    p.add_argument("--k", type=int, default=10, help="how many items")
    _add_model_arguments(p)


def _add_model_arguments(p) -> None:
    p.add_argument("--mode", choices=["auto", "text", "token"], default="auto",
                   help="auto: item tokens when the data has them, else text (trie beam search)")
    p.add_argument("--beam", type=int, default=0, help="beam width of text mode (at least the largest k)")
    p.add_argument("--length-norm", type=float, default=1.0,
                   help="text mode: score = log p(item text + END) / (tokens + 1) ** this (1 = mean per token, "
                        "0 = the item's probability)")
    p.add_argument("--batch-size", type=int, default=16, help="users per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's default); beam search is many small ops, and one thread "
                        "measured faster than two on a shared 2-core machine")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # the run's own config.yaml is read
