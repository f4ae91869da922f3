"""Candidates of the sampled item loss (``train.item_loss: sampled``): negatives drawn on the host.

Each micro-batch of a training step scores its item labels against ``train.item_negatives``
items shared by the whole batch, drawn with replacement from the items that train
(held-out ``data.cold_items`` never are): uniformly, or in proportion to their training
interactions raised to ``train.popularity_alpha`` (``train.negative_sampler: popularity``).
With ``train.in_batch_negatives`` the batch's own targets join them (the other users'
positives).  For the logQ correction every candidate and every target carries the log of its
expected count among the candidates, ``N q(i)`` plus, in-batch, ``B p(i)`` (``p``: the
items' share of the training interactions, ``B``: the batch's item labels): subtracting it
from the logits makes the sampled softmax an estimate of the full one (Bengio & Senecal;
TensorFlow's ``sampled_softmax_loss``; Yi et al. 2019 for retrieval).

The draw is seeded by ``train.seed``, the step and the micro-batch's index among all ranks': a
resumed run draws the same negatives, ranks draw different ones, and 2 ranks draw what 1 rank
with twice the gradient accumulation draws.  Nothing here is catalog-sized per step: the
tables are built once (``8`` bytes per item each), a draw is ``N`` integers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from m6rec.config import Config, ConfigError
from m6rec.data.tokenizer import load_tokenizer
from m6rec.data.vectors import catalog_token_ids
from m6rec.model.batch import Batch

log = logging.getLogger("m6rec.data")


class NegativeSampler:
    """Draws the shared candidates of one micro-batch and adds them to its :class:`Batch`.

    ``items``: the items that may be drawn, as the model names them (item-token ids, or catalog
    rows in the vector modes); ``counts``: their training interactions.  ``token_start``: the
    first item token (item-token models: where :meth:`history_hits` finds a row's items)."""

    def __init__(self, items: np.ndarray, counts: np.ndarray, negatives: int, sampler: str = "uniform",
                 alpha: float = 1.0, in_batch: bool = False, mask_history: bool = False,
                 token_start: Optional[int] = None, seed: int = 0, rank: int = 0, grad_accum: int = 1):
        items, counts = np.asarray(items, np.int64), np.asarray(counts, np.float64)
        if negatives < 1:
            raise ConfigError(f"config key 'train.item_negatives': bad value {negatives!r}; allowed: >= 1")
        if negatives > len(items):
            raise ConfigError(f"config key 'train.item_negatives': {negatives} negatives from a catalog of "
                              f"{len(items)} items that train; allowed: 1 .. {len(items)}")
        self.items, self.negatives, self.sampler = items, negatives, sampler
        self.in_batch, self.mask_history, self.token_start = in_batch, mask_history, token_start
        self.seed, self.rank, self.grad_accum = seed, rank, grad_accum
        if sampler == "uniform":
            q = np.full(len(items), 1.0 / len(items))
            self.cdf = None
        elif sampler == "popularity":
            w = counts ** alpha if alpha else (counts > 0).astype(np.float64)
            if not w.sum():
                raise ConfigError("config key 'train.negative_sampler': 'popularity' needs training interactions; "
                                  "none of the catalog's items has one")
            q = w / w.sum()
            self.cdf = np.cumsum(q)
        else:
            raise ConfigError(f"config key 'train.negative_sampler': bad value {sampler!r}; allowed: uniform, popularity")
        size = int(items.max()) + 1 if len(items) else 0
        # per item id: its probability under the sampler and its share of the training interactions
        self.q_of = np.zeros(size, np.float64)
        self.q_of[items] = q
        self.p_of = np.zeros(size, np.float64)
        if counts.sum():
            self.p_of[items] = counts / counts.sum()

    def draw(self, step: int, micro: int = 0) -> np.ndarray:
        """The ``train.item_negatives`` items of micro-batch ``micro`` of step ``step`` on this rank.
        Seeded by the step and the micro-batch's index among all ranks' (``rank * grad_accum + micro``):
        2 ranks draw what 1 rank with twice the accumulation draws."""
        rng = np.random.default_rng([self.seed, step, self.rank * self.grad_accum + micro])
        if self.cdf is None:
            idx = rng.integers(0, len(self.items), self.negatives)
        else:
            idx = np.minimum(np.searchsorted(self.cdf, rng.random(self.negatives) * self.cdf[-1], side="right"),
                             len(self.items) - 1)
        return self.items[idx]

    def log_expected_counts(self, ids: np.ndarray, batch_items: int) -> np.ndarray:
        """``log(N q(i) + B p(i))`` for each of ``ids`` (``B`` = ``batch_items`` when in-batch, else 0)."""
        ids = np.asarray(ids, np.int64)
        inside = (ids >= 0) & (ids < len(self.q_of))
        safe = np.where(inside, ids, 0)
        expected = np.where(inside, self.negatives * self.q_of[safe], 0.0)
        if self.in_batch:
            expected = expected + np.where(inside, batch_items * self.p_of[safe], 0.0)
        # an item the sampler never draws (a target outside the training items): the smallest count there is
        floor = expected[expected > 0].min() if (expected > 0).any() else 1.0
        return np.log(np.maximum(expected, floor))

    def attach(self, batch: Batch, step: int, micro: int = 0) -> Batch:
        """``batch`` (host tensors, after ``model.label_positions``) with the candidates of this micro-batch."""
        targets = batch.item_targets.numpy() if batch.item_targets is not None else np.zeros(0, np.int64)
        candidates = self.draw(step, micro)
        if self.in_batch and len(targets):
            candidates = np.concatenate([candidates, targets])
        hits = self.history_hits(batch, candidates) if self.mask_history else None
        return batch.replace(
            item_candidates=torch.from_numpy(candidates),
            item_candidate_logq=torch.from_numpy(self.log_expected_counts(candidates, len(targets)).astype(np.float32)),
            item_target_logq=torch.from_numpy(self.log_expected_counts(targets, len(targets)).astype(np.float32)),
            item_history_hits=None if hits is None else torch.from_numpy(hits))

    def history_hits(self, batch: Batch, candidates: np.ndarray) -> np.ndarray:
        """``[item labels, candidates]`` bool: the candidate is an item of the label's own history (an
        item earlier in the same document, at or before the label's position)."""
        B, T = batch.input_ids.shape
        if self.token_start is not None:  # item tokens: every item-token input
            flat_ids = batch.input_ids.numpy().reshape(-1).astype(np.int64)
            occ_flat = np.flatnonzero(flat_ids >= self.token_start)
            occ_ids = flat_ids[occ_flat]
        else:  # vector slots: their catalog rows
            pos = batch.item_positions.numpy()
            occ_flat = pos[:, 0].astype(np.int64) * T + pos[:, 1]
            order = np.argsort(occ_flat, kind="stable")
            occ_flat, occ_ids = occ_flat[order], batch.item_catalog_rows.numpy()[order]
        labels = batch.item_label_index.numpy() if batch.item_label_index is not None else np.zeros(0, np.int64)
        if not len(labels) or not len(occ_flat):
            return np.zeros((len(labels), len(candidates)), bool)
        # where each position's document starts (a row is one document without document_ids)
        if batch.document_ids is not None:
            doc = batch.document_ids.numpy()
            new = np.ones((B, T), bool)
            new[:, 1:] = doc[:, 1:] != doc[:, :-1]
        else:
            new = np.zeros((B, T), bool)
            new[:, 0] = True
        starts = np.maximum.accumulate(np.where(new, np.arange(T)[None, :], 0), axis=1) + np.arange(B)[:, None] * T
        matches = np.zeros((len(occ_flat) + 1, len(candidates)), np.int32)
        np.cumsum(occ_ids[:, None] == candidates[None, :], axis=0, out=matches[1:])
        last = np.searchsorted(occ_flat, labels, side="right")  # occurrences at or before the label
        first = np.searchsorted(occ_flat, starts.reshape(-1)[labels], side="left")
        first = np.minimum(first, last)
        return (matches[last] - matches[first]) > 0


def item_token_start(ids: np.ndarray, item_ids: list[str], vocab_size: int) -> int:
    """The first item token, given each catalog item's token id (``ids``, -1: none; from
    :func:`m6rec.data.vectors.catalog_token_ids`), when the item tokens are the vocabulary's last ids
    in one block (how ``m6rec prepare`` writes them); anything else is an error."""
    if (ids < 0).any():
        raise ConfigError(f"config key 'train.item_loss': the tokenizer has no item token for "
                          f"{int((ids < 0).sum())} catalog items (first: {item_ids[int(np.argmax(ids < 0))]!r})")
    start = int(ids.min())
    if int(ids.max()) != vocab_size - 1 or len(np.unique(ids)) != vocab_size - start:
        raise ConfigError("config key 'train.item_loss': sampled needs the item tokens to be the vocabulary's "
                          f"last {len(ids)} ids in one block (ids {start}..{int(ids.max())} of a vocabulary of "
                          f"{vocab_size}): prepare the dataset again with m6rec prepare")
    return start


def sampler_for(cfg: Config, model, rank: int = 0) -> NegativeSampler:
    """The sampler of a training run on the dataset at ``data.output``; for item-token models it also
    makes the model's item tokens items of their own loss (``model.set_item_tokens``)."""
    t, repr_ = cfg.train, cfg.data.text.item_repr  # item_repr text with a sampled loss: refused by load_config
    d = Path(cfg.data.output)
    item_ids = pd.read_parquet(d / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    held = set(json.loads((d / "manifest.json").read_text()).get("held_out_items", []))
    splits = pd.read_parquet(d / "splits.parquet", columns=["split", "item_id"])
    train_counts = splits[splits["split"] == "train"]["item_id"].astype(str).value_counts()
    counts = np.array([0 if i in held else train_counts.get(i, 0) for i in item_ids], np.float64)
    keep = np.array([i not in held for i in item_ids])
    token_start = None
    if repr_ in ("token", "both"):
        names = catalog_token_ids(load_tokenizer(d / "tokenizer.json"), item_ids)
        token_start = item_token_start(names, item_ids, model.args.vocab_size)
        model.set_item_tokens(token_start)
    else:
        names = np.arange(len(item_ids), dtype=np.int64)
    sampler = NegativeSampler(names[keep], counts[keep], t.item_negatives, t.negative_sampler, t.popularity_alpha,
                              t.in_batch_negatives, t.mask_history_negatives, token_start, t.seed, rank, t.grad_accum)
    if rank == 0:
        log.info("sampled item loss: %d %s negatives per micro-batch from %d items%s%s", t.item_negatives,
                 t.negative_sampler, len(sampler.items), " + the batch's targets" if t.in_batch_negatives else "",
                 ", the user's own history masked" if t.mask_history_negatives else "")
    return sampler
