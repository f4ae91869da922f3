"""The evaluation protocol: saved leave-one-out targets, full-catalog ranking, history excluded.

* Targets come from the dataset's ``splits.parquet`` (written once by
  ``m6rec prepare``): ``valid`` targets for model selection, ``test`` targets
  reported once.
* Every model ranks the **whole catalog** for every user (no sampled
  negatives); items the user interacted with before the target are removed
  from the ranking (a target the user had seen before stays eligible).
* Metrics (m6rec.rec.metrics): HR and NDCG at each k, MRR, catalog coverage,
  intra-list genre diversity, HR on head vs tail targets by training
  popularity.

A recommender is anything with ``rank(queries, k) -> list[list[item_id]]``;
a query is one :class:`Query` per user.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import pandas as pd

from m6rec.rec import metrics as M


@dataclass
class Query:
    user_id: str
    history: list[str]  # items before the target, in time order
    target: str
    split: str  # valid | test


@dataclass
class EvalData:
    dataset_dir: Path
    items: pd.DataFrame  # item_id, title, text, genres, ...
    splits: pd.DataFrame
    # data.cold_items: items held out of training (manifest "held_out_items"); their training-split rows
    # trained nothing, so train_counts() leaves them out (popularity does not see them either)
    held_out: frozenset = frozenset()

    @classmethod
    def load(cls, dataset_dir: str | Path) -> "EvalData":
        d = Path(dataset_dir)
        for f in ("splits.parquet", "items.parquet"):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d / f} missing: is {d} a dataset written by `m6rec prepare`?")
        held = []
        if (d / "manifest.json").is_file():
            held = json.loads((d / "manifest.json").read_text()).get("held_out_items", [])
        return cls(d, pd.read_parquet(d / "items.parquet"), pd.read_parquet(d / "splits.parquet"), frozenset(held))

    @property
    def catalog(self) -> list[str]:
        return self.items["item_id"].tolist()

    def queries(self, split: str, max_users: int = 0, seed: int = 0) -> list[Query]:
        """One query per user: the history before the ``split`` target, and the target.

        ``max_users`` > 0 evaluates a seeded random subset of users (every
        user's ranking is still over the full catalog)."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        df = self.splits
        keep = ("train",) if split == "valid" else ("train", "valid")
        hist = df[df["split"].isin(keep)].sort_values(["user_id", "position"])
        histories = hist.groupby("user_id", sort=False)["item_id"].agg(list).to_dict()
        targets = df[df["split"] == split].set_index("user_id")["item_id"]
        users = sorted(targets.index)
        if max_users and max_users < len(users):
            rng = np.random.default_rng(seed)
            users = sorted(rng.choice(users, size=max_users, replace=False).tolist())
        return [Query(u, histories.get(u, []), targets[u], split) for u in users]

    def train_counts(self) -> dict:
        train = self.splits[self.splits["split"] == "train"]
        if self.held_out:
            train = train[~train["item_id"].isin(self.held_out)]
        return train.groupby("item_id").size().to_dict()

    def genres(self) -> dict:
        return {i: set(g) if g is not None else set() for i, g in zip(self.items["item_id"], self.items["genres"])}


class Recommender(Protocol):
    name: str

    def rank(self, queries: Sequence[Query], k: int) -> list[list[str]]: ...


def top_k_excluding(scores: np.ndarray, catalog: np.ndarray, exclude: set, k: int) -> list[str]:
    """Top-k catalog items by score, skipping ``exclude`` (ties broken by catalog order).  Only the
    items scoring at least the ``k + len(exclude)``-th best are sorted (every tie with it included):
    the same answer as a sort of the whole catalog, in time linear in the catalog."""
    m = k + len(exclude)
    if m < len(scores):
        threshold = np.partition(scores, len(scores) - m)[len(scores) - m]  # the m-th best score
        candidates = np.flatnonzero(scores >= threshold)
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
    else:
        order = np.argsort(-scores, kind="stable")
    out = []
    for idx in order:
        item = catalog[idx]
        if item in exclude:
            continue
        out.append(item)
        if len(out) == k:
            break
    return out


class Popularity:
    """Most-interacted training items first: the baseline every model must beat."""

    name = "popularity"

    def __init__(self, data: EvalData):
        counts = data.train_counts()
        self.catalog = np.array(data.catalog, dtype=object)
        self.scores = np.array([counts.get(i, 0) for i in self.catalog], dtype=np.float64)

    def rank(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [top_k_excluding(self.scores, self.catalog, set(q.history) - {None}, k) for q in queries]


class TransferredPopularity(Popularity):
    """Zero-shot floor: the *source* dataset's training popularity carried to the target catalog by
    item title (case-insensitive); target items with no title match score 0.  A zero-shot model that
    only learned the source's item prior reaches this, not more."""

    def __init__(self, data: EvalData, source: EvalData):
        counts = source.train_counts()
        by_title: dict[str, int] = {}
        for i, t in zip(source.items["item_id"], source.items["title"]):
            key = str(t).strip().casefold()
            by_title[key] = by_title.get(key, 0) + counts.get(i, 0)
        self.catalog = np.array(data.catalog, dtype=object)
        titles = dict(zip(data.items["item_id"], data.items["title"]))
        self.scores = np.array([by_title.get(str(titles[i]).strip().casefold(), 0) for i in self.catalog],
                               dtype=np.float64)
        self.matched = int((self.scores > 0).sum())
        self.name = f"popularity of {source.dataset_dir.name} by title"


def cold_items(data: EvalData, trained_on: Optional[EvalData] = None) -> set:
    """Catalog items of ``data`` the model never saw in training.

    Same dataset: items with no training interaction.  Another dataset (zero-shot):
    items whose title is not among the titles of ``trained_on``'s trained items."""
    if trained_on is None:
        counts = data.train_counts()
        return {i for i in data.catalog if not counts.get(i)}
    counts = trained_on.train_counts()
    seen = {t.strip().casefold() for i, t in zip(trained_on.items["item_id"], trained_on.items["title"]) if counts.get(i)}
    return {i for i, t in zip(data.items["item_id"], data.items["title"]) if t.strip().casefold() not in seen}


def evaluate(model: Recommender, data: EvalData, queries: Sequence[Query], ks: Sequence[int],
             cold: Optional[set] = None) -> dict:
    k_max = max(ks)
    rankings = model.rank(queries, k_max)
    for q, r in zip(queries, rankings):
        # The protocol, enforced: full catalog, the user's history excluded.
        assert not (set(r) & set(q.history)), f"{model.name} recommended history items to user {q.user_id}"
    report = M.ranking_report(rankings, [q.target for q in queries], ks, len(data.catalog),
                              genres=data.genres(), head=M.head_items(data.train_counts()),
                              cold=cold_items(data) if cold is None else cold, held_out=data.held_out or None)
    report["model"] = model.name
    return report


def markdown_table(rows: list[dict], ks: Sequence[int]) -> str:
    if rows and "auc" in rows[0]:  # the ranking task
        lines = ["| model | examples | positives | auc | logloss |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['examples']} | {r['positives']} | {r['auc']:.4f} | {r['logloss']:.4f} |"
                  for r in rows]
        return "\n".join(lines)
    cols = ["model"] + [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]
    shown = ("coverage", "diversity", "hr@10_head", "hr@10_tail", "hr@10_cold", "ndcg@10_cold", "hr@10_heldout",
             "ndcg@10_heldout", "hr@10_rest", "ndcg@10_rest", "invalid_item_rate", "beam_exact_agreement")
    extra = [c for c in dict.fromkeys(k for r in rows for k in r) if c.startswith(shown)]
    cols += extra
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c)) if c == "model" else f"{r.get(c, float('nan')):.4f}"
                                       for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], ks: Sequence[int], out: Path, meta: dict) -> None:
    """JSON (all numbers), a markdown table beside it, and a PNG chart comparing models."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown_table(rows, ks) + "\n")
    # matplotlib: only the chart needs it (Figure + Agg canvas: no pyplot, no display)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    if rows and "auc" in rows[0]:  # the ranking task: AUC and log loss per model
        ax_auc, ax_ll = fig.subplots(1, 2)
        names = [r["model"] for r in rows]
        ax_auc.barh(names, [r["auc"] for r in rows])
        ax_auc.set_xlim(0.4, 1.0)
        ax_auc.set_title(f"AUC ({meta.get('split', '')})")
        ax_ll.barh(names, [r["logloss"] for r in rows])
        ax_ll.set_title("log loss (lower is better)")
        ax_ll.set_yticks([])
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
        return
    ax_hr, ax_nd = fig.subplots(1, 2)
    for r in rows:
        ax_hr.plot(ks, [r[f"hr@{k}"] for k in ks], marker="o", label=r["model"])
        ax_nd.plot(ks, [r[f"ndcg@{k}"] for k in ks], marker="o", label=r["model"])
    for ax, name in ((ax_hr, "HR@k"), (ax_nd, "NDCG@k")):
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_title(f"{name} ({meta.get('split', '')}, full ranking)")
        ax.grid(alpha=0.3)
    ax_hr.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
