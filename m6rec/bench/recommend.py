"""``m6rec bench recommend``: serving latency of ``m6rec recommend`` after loading, per run."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m6rec.bench.common import machine
from m6rec.config import ConfigError
from m6rec.data.prompts import contexts_for
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.run_dir import load_run


def bench_recommend(cfg: Any, args: Any) -> dict[str, Any]:
    """Serving latency of ``m6rec recommend`` after loading: one request (one user, batch 1, top 10 of
    the whole catalog, history excluded) at a time, for each ``--ckpt`` side by side on the same users.
    The first 10 requests warm up and are not counted."""
    if not getattr(args, "ckpt", None):
        raise ConfigError("bench recommend: give --ckpt RUN_DIR (repeat it to compare runs)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    for path in args.ckpt:
        t0 = time.perf_counter()
        run = load_run(path)
        ctx = contexts_for(run.cfg, run.tokenizer, run.dataset_dir)
        rec = GenerativeRecommender(run.model, ctx, batch_size=1)
        load_s = time.perf_counter() - t0
        users = list(ctx._timeline)[: args.users + 10]
        prompts = [ctx.for_user(u) for u in users]
        ms = []
        for p in prompts:
            t1 = time.perf_counter()
            rec.rank_prompts([p], 10)
            ms.append(1000 * (time.perf_counter() - t1))
        ms = np.array(ms[10:])
        rows.append({"run": str(path), "mode": rec.mode, "items": len(ctx.catalog_ids), "requests": len(ms),
                     "prompt_tokens_mean": round(float(np.mean([len(p.ids) for p in prompts])), 1),
                     "median_ms": round(float(np.median(ms)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
                     "load_s": round(load_s, 2)})
    print(f"{'run':<40} {'mode':<7} {'items':>6} {'tokens':>6} {'median ms':>10} {'p90 ms':>8} {'load s':>7}")
    for r in rows:
        print(f"{Path(r['run']).name:<40} {r['mode']:<7} {r['items']:>6} {r['prompt_tokens_mean']:>6} "
              f"{r['median_ms']:>10} {r['p90_ms']:>8} {r['load_s']:>7}")
    return {"machine": machine(), "threads": torch.get_num_threads(), "rows": rows}
