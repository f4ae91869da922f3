"""Checkpoint selection by a validation ranking metric during training (``train.select_by``).

At every evaluation step of ``m6rec train`` the model ranks the **whole
catalog** for a seeded subset of validation users (``train.select_users``,
the same subset as ``m6rec eval --split valid --max-users N --seed 0``), with
the same prompts, exclusions and scoring as ``m6rec eval``
(:class:`m6rec.rec.generative.GenerativeRecommender`).  The value is logged as
``val_<metric>`` (e.g. ``val_hr@10``); when it beats the best so far the
engine writes a checkpoint at that step, and ``RUN_DIR/best.json`` names it::

    {"tag": "step00000400", "step": 400, "metric": "hr@10", "value": 0.083, "users": 1000, ...}

The best tag is protected from ``train.keep_last`` pruning; ``m6rec eval
--ckpt RUN_DIR --tag best`` evaluates it.  The test split is never read here.

Every rank takes part: rank r ranks users ``r, r + W, ...`` with its own full
copy of the weights (ZeRO stages 0-2), and one all-reduce sums the results.
ZeRO 3 on several ranks partitions the weights, which this ranking does not
gather, so it is refused at start-up.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from m6rec.config import Config, ConfigError
from m6rec.data.prompts import contexts_for
from m6rec.data.tokenizer import load_tokenizer
from m6rec.rec import metrics as M
from m6rec.rec.evaluate import EvalData
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.run_dir import BEST_FILE, read_best

SELECT_SEED = 0  # the user subset: the same as `m6rec eval --seed 0`


def metric_value(ranks: np.ndarray, metric: str) -> float:
    """``hr@K``, ``ndcg@K`` or ``mrr`` of 1-based target ranks (mean over users)."""
    if metric == "mrr":
        return M.mrr(ranks)
    name, k = metric.split("@")
    return M.hit_rate(ranks, int(k)) if name == "hr" else M.ndcg(ranks, int(k))


class Selector:
    """Ranks the validation subset with the live model; keeps the best checkpoint tag."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, world: int, zero_stage: int, resumed: bool,
                 batch_size: int = 32):
        if zero_stage == 3 and world > 1:
            raise ConfigError("train.select_by: ZeRO stage 3 on several ranks partitions the weights; use stage "
                              "0-2, or select afterwards with `m6rec eval --split valid --tag ...` per checkpoint")
        self.metric = cfg.train.select_by
        self.run_dir, self.rank, self.world, self.batch_size = Path(run_dir), rank, world, batch_size
        dataset_dir = Path(cfg.data.output)
        data = EvalData.load(dataset_dir)
        queries = data.queries("valid", max_users=cfg.train.select_users, seed=SELECT_SEED)
        self.users = len(queries)
        self.k = max(cfg.eval.ks) if self.metric == "mrr" else int(self.metric.split("@")[1])
        mine = queries[rank::world]
        self.ctx = contexts_for(cfg, load_tokenizer(dataset_dir / "tokenizer.json"), dataset_dir)
        self.prompts = [self.ctx.for_query(q) for q in mine]  # written once, ranked at every evaluation
        self.targets = [q.target for q in mine]
        self.rec = None
        best = read_best(run_dir) if resumed else None
        if best is not None and best.get("metric") != self.metric:
            best = None  # selected by another metric before: start over
        if not resumed and rank == 0:
            (self.run_dir / BEST_FILE).unlink(missing_ok=True)  # a new run: an old best.json is stale
        self.best = best
        self.pending: Optional[dict] = None  # an improvement waiting for its checkpoint

    @property
    def best_tag(self) -> Optional[str]:
        return self.best["tag"] if self.best else None

    def evaluate(self, model: torch.nn.Module, step: int) -> dict:
        """Rank this rank's users, sum over ranks; returns ``{"val_<metric>": value}`` for the log row
        and remembers an improvement (:attr:`improved`) until :meth:`saved`."""
        if self.rec is None:
            self.rec = GenerativeRecommender(model, self.ctx, batch_size=self.batch_size)
        was_training = model.training
        model.eval()
        self.rec.refresh()  # the model trained since the last evaluation
        try:
            ranked = self.rec.rank_prompts(self.prompts, self.k) if self.prompts else []
        finally:
            model.train(was_training)
        ranks = M.target_ranks([[i for i, _ in r] for r in ranked], self.targets)
        total = torch.tensor([metric_value(ranks, self.metric) * len(ranks) if len(ranks) else 0.0, len(ranks)],
                             dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dev = next(model.parameters()).device
            total = total.to(dev)
            dist.all_reduce(total)
            total = total.cpu()
        value = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        self.pending = None
        if np.isfinite(value) and (self.best is None or value > self.best["value"]):
            self.pending = {"step": step, "value": value}
        return {f"val_{self.metric}": value}

    @property
    def improved(self) -> bool:
        return self.pending is not None

    def saved(self, step: int, tag: str) -> None:
        """The checkpoint of an improved step was written: it becomes the best (rank 0 writes best.json)."""
        if self.pending is None or self.pending["step"] != step:
            return
        self.best = {"tag": tag, "step": step, "metric": self.metric, "value": self.pending["value"],
                     "split": "valid", "users": self.users, "seed": SELECT_SEED}
        self.pending = None
        if self.rank == 0:
            tmp = self.run_dir / (BEST_FILE + ".tmp")
            tmp.write_text(json.dumps(self.best, indent=1) + "\n")
            os.replace(tmp, self.run_dir / BEST_FILE)
