"""Recommendation metrics over full-catalog rankings.

Every function takes plain arrays, so each can be checked against a hand
computation.  Ranks are 1-based: rank 1 is the top recommendation.  A target
that is not in a ranking of length K has rank ``inf`` (it scores 0 in HR@k and
NDCG@k for k <= K, and 0 in MRR, which is then MRR truncated at K).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def target_ranks(rankings: Sequence[Sequence], targets: Sequence) -> np.ndarray:
    """Rank of each user's target in that user's ranking (inf when absent)."""
    out = np.full(len(targets), np.inf)
    for i, (ranked, t) in enumerate(zip(rankings, targets)):
        for r, item in enumerate(ranked, start=1):
            if item == t:
                out[i] = r
                break
    return out


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks <= k)) if len(ranks) else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """With one relevant item per user, IDCG = 1 and DCG = 1 / log2(rank + 1)."""
    if not len(ranks):
        return float("nan")
    gains = np.where(ranks <= k, 1.0 / np.log2(np.minimum(ranks, 1e18) + 1.0), 0.0)
    return float(np.mean(gains))


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(np.where(np.isfinite(ranks), 1.0 / ranks, 0.0))) if len(ranks) else float("nan")


def catalog_coverage(rankings: Sequence[Sequence], k: int, catalog_size: int) -> float:
    """Share of the catalog that appears in at least one user's top-k."""
    seen = {item for ranked in rankings for item in list(ranked)[:k]}
    return len(seen) / catalog_size if catalog_size else float("nan")


def intra_list_diversity(rankings: Sequence[Sequence], k: int, genres: dict) -> float:
    """Mean over users of the mean pairwise genre distance (1 - Jaccard) inside the top-k."""
    per_user = []
    for ranked in rankings:
        top = [frozenset(genres.get(i, ())) for i in list(ranked)[:k]]
        pairs = [(a, b) for x, a in enumerate(top) for b in top[x + 1:]]
        if not pairs:
            continue
        d = [1.0 - (len(a & b) / len(a | b) if (a | b) else 1.0) for a, b in pairs]
        per_user.append(float(np.mean(d)))
    return float(np.mean(per_user)) if per_user else float("nan")


def head_items(train_counts: dict, head_share: float = 0.2) -> set:
    """The most popular ``head_share`` of the interacted items (by training interactions)."""
    items = sorted(train_counts, key=lambda i: (-train_counts[i], str(i)))
    n = max(1, int(round(head_share * len(items))))
    return set(items[:n])


def auc(labels: Iterable[int], scores: Iterable[float]) -> float:
    """ROC AUC via the Mann-Whitney U statistic (ties count one half)."""
    y = np.asarray(list(labels), dtype=np.int64)
    s = np.asarray(list(scores), dtype=np.float64)
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(labels: Iterable[int], probs: Iterable[float], eps: float = 1e-7) -> float:
    y = np.asarray(list(labels), dtype=np.float64)
    p = np.clip(np.asarray(list(probs), dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def ranking_report(rankings: Sequence[Sequence], targets: Sequence, ks: Sequence[int], catalog_size: int,
                   genres: dict | None = None, head: set | None = None, cold: set | None = None,
                   held_out: set | None = None) -> dict:
    """Every ranking metric of one model in one dict (the table row)."""
    ranks = target_ranks(rankings, targets)
    out: dict = {"users": len(targets)}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    out["mrr"] = mrr(ranks)
    kc = 10 if 10 in ks else max(ks)
    out[f"coverage@{kc}"] = catalog_coverage(rankings, kc, catalog_size)
    if genres is not None:
        out[f"diversity@{kc}"] = intra_list_diversity(rankings, kc, genres)
    if head is not None:
        is_head = np.array([t in head for t in targets])
        out[f"hr@{kc}_head"] = hit_rate(ranks[is_head], kc)
        out[f"hr@{kc}_tail"] = hit_rate(ranks[~is_head], kc)
        out["head_targets"] = int(is_head.sum())
    if cold is not None:  # targets the model never saw in training (cold start)
        is_cold = np.array([t in cold for t in targets], dtype=bool)
        out[f"hr@{kc}_cold"] = hit_rate(ranks[is_cold], kc)
        out[f"ndcg@{kc}_cold"] = ndcg(ranks[is_cold], kc)
        out["cold_targets"] = int(is_cold.sum())
    if held_out:  # data.cold_items: targets that are items held out of training, and the rest
        is_held = np.array([t in held_out for t in targets], dtype=bool)
        out[f"hr@{kc}_heldout"] = hit_rate(ranks[is_held], kc)
        out[f"ndcg@{kc}_heldout"] = ndcg(ranks[is_held], kc)
        out[f"hr@{kc}_rest"] = hit_rate(ranks[~is_held], kc)
        out[f"ndcg@{kc}_rest"] = ndcg(ranks[~is_held], kc)
        out["heldout_targets"] = int(is_held.sum())
    return out
