"""Generative next-item recommendation: the pretrained LM ranks the whole catalog.

A user is written exactly as in training (:mod:`m6rec.data.prompts`): the profile, the
last ``data.max_items - 1`` items of the history with their ratings, tags and
relative times (and posters), then ``<|predict|><|item|>``.  What the model
would write next is the recommendation.

* **item-token mode** (``data.text.item_repr`` ``token`` or ``both``): the
  next token after ``<|item|>`` is an item token; the logits at that position
  restricted to the catalog's item tokens, softmaxed, give every item's
  score (one forward pass per user, exact).
* **text mode** (``item_repr: text``): the item is its catalog text
  ("Title (Genre, Genre)").  A prefix trie holds every catalog item's token
  ids (the same segment encoding as the training text), and a trie-constrained
  beam search finds the items of highest length-normalised log-probability::

      score(item) = ( sum_i log p(tok_i | prompt, tok_<i) + log p(END | prompt, tok_1..n) ) / (n + 1) ** A

  where ``p`` is the model's own softmax over the full vocabulary (not
  renormalised over the trie) and END is the event "the item's text ends
  here": in training, the token after an item's text is the first token of
  its rating / tag / time phrase (", rated 4", ", same day": always ``,``,
  a segment of its own), or ``<|item|>`` / ``<|eos|>``; ``p(END)`` sums the
  probabilities of those tokens.  END makes an item whose text is a prefix
  of another's ("Heat (1995)" vs "Heat (1995) (Action)") score on its own
  merits.  Items whose text is identical share a trie leaf and a score (ties
  in catalog order).  History items are removed from the trie per user
  (a branch holding only history items is never entered), so every beam slot
  spends itself on an eligible item and a beam of ``B >= k`` always returns
  ``min(k, eligible)`` items.  ``A`` (``length_norm``) is 1 by default
  (mean log-probability per token); 0 ranks by the item's probability.
  Beam search approximates the exact ranking, the more so with ``A > 0``:
  partial items are pruned by summed log-probability, complete ones ranked
  by their mean (docs/evaluation.md has the measured overlap); with a beam
  as wide as the catalog it is exact.

Decoding goes through the model's KV cache (:mod:`m6rec.model.decode`): the
prompt runs once (prefill, with the M6 prefix mask), then one token per beam
slot per step.  All slots of a user share one cache row (the prompt is stored
once) and a tree mask lets each slot read only the prompt and its own earlier
tokens.  Without the cache every step would re-run the whole prompt for every
slot: for a 500-token prompt, beam 50 and 25 title tokens that is ~625k
token-passes per user instead of ~1.75k.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m6rec.config import ConfigError
from m6rec.data import text as T
from m6rec.data.prompts import (
    SHAPE_MULTIPLE,
    ContextBuilder,
    Prompt,
    batches_by_length,
    collate,
)
from m6rec.data.vectors import attach_catalog, posters_lost
from m6rec.model.batch import Batch
from m6rec.model.decode import KVCache, decode
from m6rec.rec.evaluate import Query, top_k_excluding


# ---------------------------------------------------------------------------
# The catalog trie
# ---------------------------------------------------------------------------
class ItemTrie:
    """Every catalog item's token ids in a prefix trie, stored as flat arrays.

    ``child_ptr/child_tok/child_node``: the children of node ``n`` are
    ``child_tok[child_ptr[n]:child_ptr[n+1]]`` (sorted by token) leading to
    ``child_node[...]``; node 0 is the root, then the nodes of depth 1, 2, ...
    ``item_node[i]``: the node where catalog item ``i``'s sequence ends;
    ``paths[i]``: its nodes, root first (-1 past its end).  ``subtree[n]``:
    items ending in ``n``'s subtree.  ``width[d]``: the nodes at depth ``d + 1``.  Built depth by depth with numpy (1M
    four-code items in seconds)."""
    def __init__(self, sequences: Sequence[Sequence[int]] | np.ndarray):
        if isinstance(sequences, np.ndarray) and sequences.ndim == 2:  # fixed length (semantic IDs)
            toks = sequences.astype(np.int64)
            lens = np.full(len(toks), toks.shape[1], dtype=np.int64)
        else:
            lens = np.array([len(q) for q in sequences], dtype=np.int64)
            toks = np.full((len(sequences), int(lens.max(initial=0))), -1, dtype=np.int64)
            for i, q in enumerate(sequences):
                toks[i, :len(q)] = q
        N, depth = toks.shape
        vocab = int(toks.max(initial=0)) + 1
        node = np.zeros(N, dtype=np.int64)
        self.paths = np.full((N, depth + 1), -1, dtype=np.int64)
        self.paths[:, 0] = 0
        src, tok, dst, n_nodes = [], [], [], 1
        for d in range(depth):
            alive = lens > d
            uniq, inv = np.unique(node[alive] * vocab + toks[alive, d], return_inverse=True)
            ids = n_nodes + np.arange(len(uniq))
            src.append(uniq // vocab)
            tok.append(uniq % vocab)
            dst.append(ids)
            node[alive] = ids[inv.reshape(-1)]
            self.paths[alive, d + 1] = node[alive]
            n_nodes += len(uniq)
        self.n_nodes, self.depth, self.item_node = n_nodes, depth, node
        self.width = [len(d) for d in dst]
        src, tok, dst = (np.concatenate(a) if a else np.zeros(0, dtype=np.int64) for a in (src, tok, dst))
        order = np.lexsort((tok, src))  # by (node, token)
        self.child_tok, self.child_node = tok[order], dst[order]
        self.child_ptr = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n_nodes))]).astype(np.int64)
        self.items_at = np.bincount(self.item_node, minlength=n_nodes)
        self.subtree = np.bincount(self.paths[self.paths >= 0], minlength=n_nodes)
        self._items_sorted = np.argsort(self.item_node, kind="stable")  # items of a node in catalog order
        self._items_ptr = np.concatenate([[0], np.cumsum(self.items_at)])

    def items_of(self, node: int) -> np.ndarray:
        return self._items_sorted[self._items_ptr[node]:self._items_ptr[node + 1]]

    def sequences(self) -> list[list[int]]:
        """Every stored sequence, read back from the trie (for checks)."""
        tok_of = np.zeros(self.n_nodes, dtype=np.int64)
        tok_of[self.child_node] = self.child_tok
        return [tok_of[p[1:][p[1:] >= 0]].tolist() for p in self.paths]


class _Excluded:
    """Per user, the trie nodes its excluded items (its history) pass through and end at, as sorted
    ``user * n_nodes + node`` keys with counts: memory follows the histories, not the catalog."""

    def __init__(self, trie: ItemTrie, history: Sequence[Sequence[int]]):
        self.trie, N = trie, trie.n_nodes
        through, end = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        for u, h in enumerate(history):
            h = np.asarray(sorted(set(h)), dtype=np.int64)
            if len(h):
                p = trie.paths[h]
                through.append(u * N + p[p >= 0])
                end.append(u * N + trie.item_node[h])
        self.through = np.unique(np.concatenate(through), return_counts=True)
        self.end = np.unique(np.concatenate(end), return_counts=True)

    def _count(self, table, users: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        keys, counts = table
        q = users * self.trie.n_nodes + nodes
        if not len(keys):
            return np.zeros(q.shape, dtype=np.int64)
        i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[i] == q, counts[i], 0)

    def dead(self, users: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Nothing eligible below: every item of the node's subtree is excluded."""
        return self._count(self.through, users, nodes) >= self.trie.subtree[nodes]

    def eligible_at(self, users: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        """Items ending exactly at the node that are not excluded."""
        return self.trie.items_at[nodes] - self._count(self.end, users, nodes)


# ---------------------------------------------------------------------------
# The recommender
# ---------------------------------------------------------------------------
class CatalogScorer:
    """Exact log-probabilities of every catalog item for a batch of hidden states: a catalog-sized
    product per request, so its memory traffic is the cost.  On the CPU the catalog is held as a
    C-ordered float32 numpy array and multiplied by OpenBLAS: ``[N, D] x [D]`` at 1M x 64 took 15 ms
    on one thread of this project's machine, torch's ``mv`` 33 ms (both read the same 256 MB)."""

    def __init__(self, item_weight: torch.Tensor):
        w = item_weight.detach().float()
        self.on_cpu = w.device.type == "cpu"
        # a copy numpy allocates: numpy advises transparent huge pages for large arrays, which took the
        # product from 22 ms (torch's allocation, 4 KiB pages) to 15 ms at 1M x 64 on this machine
        self.matrix = np.array(w.numpy(), dtype=np.float32, order="C", copy=True) if self.on_cpu else w

    def log_probs(self, last: torch.Tensor) -> np.ndarray:
        """``[U, N]`` for hidden states ``last [U, D]``."""
        if self.on_cpu:
            h = last.float().numpy()
            # one user: OpenBLAS's gemv (a [D, 1] matrix takes its gemm path: 22 ms instead of 15 at 1M x 64)
            scores = torch.from_numpy((self.matrix @ h[0])[None] if len(h) == 1
                                      else np.ascontiguousarray((self.matrix @ h.T).T))
        else:
            scores = last.float() @ self.matrix.T
        return torch.log_softmax(scores, dim=-1).cpu().numpy()


class GenerativeRecommender:
    """Ranks the whole catalog with the LM (see the module docstring).

    ``mode``: "auto" (item tokens when the data has them, else text),
    "token" or "text".  ``beam``: beam width of text mode (at least ``k``
    is always used).  ``batch_size``: users per forward pass."""
    def __init__(self, model, contexts: ContextBuilder, mode: str = "auto", beam: int = 0, batch_size: int = 16,
                 name: Optional[str] = None, length_norm: float = 1.0):
        repr_ = contexts.text_cfg.item_repr
        if mode == "auto":
            mode = ("vector" if repr_ in T.VECTOR_MODES else "token" if repr_ in ("token", "both") else
                    "semantic_id" if repr_ == "semantic_id" else "text")
        if (mode == "semantic_id") != (repr_ == "semantic_id"):
            raise ConfigError(f"mode {mode!r} does not fit data.text.item_repr {repr_!r} (items as semantic IDs are "
                              "ranked with mode 'semantic_id', and only they)")
        if (mode == "vector") != (repr_ in T.VECTOR_MODES):
            raise ConfigError(f"mode {mode!r} does not fit data.text.item_repr {repr_!r} (items as text vectors are "
                              "ranked with mode 'vector', and only they)")
        if mode == "token" and repr_ == "text":
            raise ConfigError("mode 'token' needs a dataset prepared with data.text.item_repr token or both")
        if mode == "text" and repr_ != "text":
            raise ConfigError(f"mode 'text' needs data.text.item_repr 'text' (this run's data has {repr_!r}: "
                              "its item text follows an item token); use mode 'token'")
        if mode not in ("text", "token", "vector", "semantic_id"):
            raise ConfigError(f"mode must be auto, text, token, vector or semantic_id, got {mode!r}")
        self.model, self.ctx, self.mode = model, contexts, mode
        self.beam, self.batch_size, self.length_norm = beam or contexts.cfg.eval.beam, batch_size, float(length_norm)
        self.device = next(model.parameters()).device
        # fixed batch shapes where kernels are compiled per shape (collate's docstring says why)
        self.static_shape = dict(rows=batch_size, multiple=SHAPE_MULTIPLE) if self.device.type == "cuda" else {}
        tok = contexts.tokenizer
        self.pad_id = tok.token_to_id(T.PAD)
        self.catalog = np.array(contexts.catalog_ids, dtype=object)
        ck = getattr(model, "checkpoint", {}) or {}
        where = ", ".join(x for x in (Path(ck["run_dir"]).name if ck.get("run_dir") else "", ck.get("tag") or "") if x)
        self.name = name or f"m6rec-{mode}" + (f" ({where})" if where else "")
        self.stats: dict = {}
        if mode == "vector":
            # the catalog of the dataset ranked (its own vectors: zero-shot on another catalog works alike);
            # a model already holding it (train.select_by, in training) keeps its training catalog
            if getattr(model, "item_catalog_source", None) != str(Path(contexts.dataset_dir).resolve()):
                attach_catalog(model, contexts.dataset_dir, contexts.text_cfg)
                note = posters_lost(contexts.cfg.data.output, contexts.dataset_dir, contexts.text_cfg.item_encoder)
                if note:
                    warnings.warn(note)
            self.refresh()
        elif mode == "token":
            ids = [tok.token_to_id(T.item_token(i)) for i in contexts.catalog_ids]
            missing = [i for i, t in zip(contexts.catalog_ids, ids) if t is None]
            if missing:
                raise ConfigError(f"tokenizer has no item token for {len(missing)} catalog items (e.g. {missing[0]})")
            self.item_token_ids = torch.tensor(ids, device=self.device)
            self.refresh()
        elif mode == "semantic_id":
            # every item has levels + 1 codes: the beam ranks by the summed code log-probability, no
            # END event and no length normalisation are needed
            self.sequences = [[tok.token_to_id(c) for c in contexts.catalog.item_codes[i]] for i in contexts.catalog_ids]
            self.trie = ItemTrie(self.sequences)
            self.end_ids, self.length_norm = [], 0.0
        else:
            texts = [contexts.catalog.item_text[i] for i in contexts.catalog_ids]
            contexts.enc.prime(texts)
            self.sequences = [contexts.enc.encode([T.Segment(t, True)])[0].astype(np.int64).tolist() for t in texts]
            self.trie = ItemTrie(self.sequences)
            self.end_ids = self._end_ids()

    def _end_ids(self) -> list[int]:
        """Tokens that follow an item's text in training: the first token of its
        rating / tag / time phrase (each a segment of its own), <|item|>, <|eos|>."""
        c, tok = self.ctx.text_cfg, self.ctx.tokenizer
        tails = []
        if c.rating_template:
            tails += [c.rating_template.format(rating=r) for r in ("1", "4", "3.5")]
        if c.tags_template:
            tails.append(c.tags_template.format(tags="funny"))
        if c.time_unit == "day":
            tails += [", same day", ", 1 day later", ", 12 days later"]
        ends = {tok.token_to_id(T.ITEM), tok.token_to_id(T.EOS)}
        ends |= {tok.encode(t, add_special_tokens=False).ids[0] for t in tails if t}
        return sorted(ends)

    # -- public --------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """The catalog's output embeddings, once (vector mode: the cached item vectors projected; token
        mode: the item tokens' rows) -- a request then costs one forward pass and one ``[N, D] x [D]``
        product.  Call again after the model trained (train.select_by does)."""
        if self.mode == "vector":
            self.scorer = CatalogScorer(self.model.catalog_embeddings())
        elif self.mode == "token":
            self.scorer = CatalogScorer(self.model.head_weight.index_select(0, self.item_token_ids))

    def rank(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[i for i, _ in r] for r in self.rank_with_scores(queries, k)]

    def rank_with_scores(self, queries: Sequence[Query], k: int, progress: bool = False) -> list[list[tuple[str, float]]]:
        return self.rank_prompts([self.ctx.for_query(q) for q in queries], k, progress)

    def rank_prompts(self, prompts: Sequence[Prompt], k: int, progress: bool = False) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per prompt, its ``exclude`` set removed."""
        t0 = time.perf_counter()
        out: list = [None] * len(prompts)
        bar = None
        if progress:
            bar = tqdm(total=len(prompts), desc=f"rank {self.name}", unit="user")
        rank = self._rank_text if self.mode in ("text", "semantic_id") else self._rank_catalog_softmax
        self._returned = self._invalid = 0
        for idx, group in batches_by_length(prompts, self.batch_size):
            res = rank(group, k)
            for i, r in zip(idx, res):
                out[i] = r
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        self.stats = {"users": len(prompts), "seconds": round(dt, 3),
                      "seconds_per_user": round(dt / max(1, len(prompts)), 5),
                      "prompt_tokens_mean": float(np.mean([len(p.ids) for p in prompts])) if prompts else 0.0}
        if self.mode in ("text", "semantic_id"):
            self.stats.update(beam=self.beam_width(k), items_returned=self._returned, invalid_items=self._invalid)
        return out

    def beam_width(self, k: int) -> int:
        return max(k, self.beam)

    def exact_bytes_per_user(self) -> int:
        """About the largest attention-score tensor of :meth:`exact` for one user: every prefix of the
        widest depth reads the prompt and every fed prefix (float32 per head)."""
        width = self.trie.width
        fed = sum(width) if self.end_ids else sum(width[:-1])  # fixed-length leaves are never fed
        return 4 * self.model.args.n_heads * max(width, default=1) * (self.model.args.max_seq_len + fed)

    def exact(self, budget_bytes: int = 4 << 30) -> Optional["GenerativeRecommender"]:
        """This recommender with a beam as wide as the catalog: every prefix is kept at every depth, so
        the ranking is the exact one by summed (text mode: length-normalised) log-probability.  Users
        go through it in batches that keep :meth:`exact_bytes_per_user` within ``budget_bytes``; None
        when one user alone exceeds it (the catalog is too large for the exact scorer here)."""
        per_user = self.exact_bytes_per_user()
        if per_user > budget_bytes:
            return None
        twin = object.__new__(GenerativeRecommender)
        twin.__dict__.update(self.__dict__)
        twin.beam, twin.stats = len(self.catalog), {}
        twin.batch_size = max(1, min(self.batch_size, budget_bytes // per_user))
        twin.name = f"{self.name} exact"
        return twin

    # -- item tokens, item text vectors: one softmax over the catalog -------------
    @torch.no_grad()
    def _rank_catalog_softmax(self, prompts: list[Prompt], k: int) -> list:
        """Item tokens and text vectors: one forward pass per user; the hidden state at the final
        ``<|item|>`` against each catalog item's output embedding (row ``i`` = catalog item ``i``, held
        by :meth:`refresh`), softmaxed over the catalog."""
        b = collate(prompts, self.ctx, self.pad_id, self.device, **self.static_shape)
        lengths = b.pop("lengths")
        slot_vectors = None
        new = b.pop("new_item_vectors", None)
        if new:  # free-text items of a history: their text vectors projected as the catalog's are
            raw = self.model.item_bank.index_select(0, b["item_catalog_rows"].clamp(min=0)).clone()
            for slot, vec in new:
                raw[slot] = torch.as_tensor(vec, dtype=raw.dtype, device=raw.device)
            slot_vectors = self.model.item_proj(raw)
        h = self.model.hidden_states(Batch.of(b), slot_vectors)
        last = h[torch.arange(len(prompts), device=h.device), lengths - 1]
        scores = self.scorer.log_probs(last)
        out = []
        for p, s in zip(prompts, scores):
            top = top_k_excluding(s, self.catalog, p.exclude, k)
            out.append([(i, float(s[self.ctx.item_index[i]])) for i in top])
        return out

    # -- text: trie-constrained beam search --------------------------------------
    def _rank_text(self, prompts: list[Prompt], k: int) -> list:
        history = [sorted({self.ctx.item_index[i] for i in p.exclude if i in self.ctx.item_index}) for p in prompts]
        finished = trie_beam(self.model, collate(prompts, self.ctx, self.pad_id, self.device), self.trie, history,
                             self.beam_width(k), self.end_ids, self.length_norm, self.pad_id)
        trie = self.trie
        out = []
        for u, p in enumerate(prompts):
            ranked = []
            for score, n, path in finished[u]:
                for i in trie.items_of(n):
                    iid = self.catalog[i]
                    if iid not in p.exclude:
                        ranked.append((iid, float(score), i, path))
            ranked.sort(key=lambda x: (-x[1], x[2]))
            top = ranked[:k]
            self._returned += len(top)
            # the check behind stats "invalid_items": the tokens the beam generated must spell the returned
            # item's own sequence in the catalog
            self._invalid += sum(list(path) != self.sequences[self.ctx.item_index[iid]] for iid, _, _, path in top)
            out.append([(iid, s) for iid, s, _, _ in top])
        return out


@torch.no_grad()
def trie_beam(model, batch: dict, trie: ItemTrie, history: Sequence[Sequence[int]], width: int,
              end_ids: Sequence[int], length_norm: float, pad_id: int) -> list[list[tuple[float, int, tuple]]]:
    """The trie-constrained beam search of the module docstring for a collated batch of prompts: per
    user, every item sequence it finished as ``(score, trie node, generated tokens)``.  ``history``:
    per user, the catalog rows to leave out (their branches are never entered); ``width``: slots per
    user; ``end_ids``: the END event's tokens (empty: fixed-length items, scored when their last token
    is chosen, without feeding it to the model)."""
    U, device = len(history), batch["input_ids"].device
    B, alpha = width, length_norm
    dec = _BeamDecoder(model, batch)
    logits = dec.logits[:, None, :]  # [U, 1, V]: only slot 0 (the root) is live at first
    excluded = _Excluded(trie, history)  # per user: history items out of the trie
    act = np.arange(U)  # users still searching (rows of node/cum and of the decoder's caches)
    node = np.full((U, 1), 0, dtype=np.int64)
    cum = np.zeros((U, 1), dtype=np.float64)
    paths = np.zeros((U, 1, 0), dtype=np.int64)  # the tokens each slot generated
    finished: list[list[tuple[float, int, tuple]]] = [[] for _ in range(U)]
    end_ids_t = torch.tensor(list(end_ids), device=device, dtype=torch.int64)
    t = 0
    while True:
        logp = torch.log_softmax(logits, dim=-1)  # [A, slots, V]
        A, slots = node.shape
        rows = np.broadcast_to(act[:, None], node.shape)
        live = node >= 0
        live &= ~excluded.dead(rows, np.where(live, node, 0))
        # items ending here
        nd = np.where(live, node, 0)
        term = live & (excluded.eligible_at(rows, nd) > 0)
        if term.any():
            end_lp = torch.logsumexp(logp[..., end_ids_t], dim=-1).cpu().numpy()
            for a, b in zip(*np.nonzero(term)):
                finished[act[a]].append(((cum[a, b] + end_lp[a, b]) / (t + 1) ** alpha, int(node[a, b]),
                                         tuple(paths[a, b])))
        # expansions of every live slot into its children still holding an eligible item
        flat = np.flatnonzero(live.ravel())
        fa, fb, fn = flat // slots, flat % slots, node.ravel()[flat]
        starts, counts = trie.child_ptr[fn], trie.child_ptr[fn + 1] - trie.child_ptr[fn]
        total = int(counts.sum())
        if total == 0:
            break
        rep = np.repeat(np.arange(len(flat)), counts)
        offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        ci = starts[rep] + offs
        ca, cb, ctok, cnode = fa[rep], fb[rep], trie.child_tok[ci], trie.child_node[ci]
        keep = ~excluded.dead(act[ca], cnode)
        ca, cb, ctok, cnode = ca[keep], cb[keep], ctok[keep], cnode[keep]
        if len(ca) == 0:
            break
        lp = logp[torch.from_numpy(ca).to(device), torch.from_numpy(cb).to(device),
                  torch.from_numpy(ctok).to(device)].double().cpu().numpy()
        score = cum[ca, cb] + lp
        o = np.lexsort((-score, ca))  # per user, best first (stable: trie order on ties)
        ca_o = ca[o]
        rank = np.arange(len(o)) - np.searchsorted(ca_o, ca_o, side="left")
        sel, slot = o[rank < B], rank[rank < B]
        # compact: only users with a live slot, only as many slots as the fullest of them
        keep_users = np.unique(ca[sel])
        new_row = np.full(A, -1, dtype=np.int64)
        new_row[keep_users] = np.arange(len(keep_users))
        su = new_row[ca[sel]]
        if not len(end_ids) and (trie.child_ptr[cnode[sel] + 1] == trie.child_ptr[cnode[sel]]).all():
            # fixed-length items (semantic IDs): every selected child is a whole item, and with no END
            # event its score is complete -- finished without feeding the leaves to the model
            for a, b, c, n, sc in zip(ca[sel], cb[sel], ctok[sel], cnode[sel], score[sel]):
                finished[act[a]].append((sc / (t + 1) ** alpha, int(n), (*paths[a, b], int(c))))
            break
        w = int(slot.max()) + 1
        new_node = np.full((len(keep_users), w), -1, dtype=np.int64)
        new_cum = np.zeros((len(keep_users), w), dtype=np.float64)
        parent = np.zeros((len(keep_users), w), dtype=np.int64)
        tokens = np.full((len(keep_users), w), pad_id, dtype=np.int64)
        new_node[su, slot] = cnode[sel]
        new_cum[su, slot] = score[sel]
        parent[su, slot] = cb[sel]
        tokens[su, slot] = ctok[sel]
        new_paths = np.zeros((len(keep_users), w, t + 1), dtype=np.int64)
        new_paths[su, slot, :t] = paths[ca[sel], cb[sel]]
        new_paths[su, slot, t] = ctok[sel]
        logits = dec.step(torch.from_numpy(keep_users).to(device), torch.from_numpy(parent).to(device),
                          torch.from_numpy(tokens).to(device), t)
        act, node, cum, paths = act[keep_users], new_node, new_cum, new_paths
        t += 1
    return finished


class _BeamDecoder:
    """The beam search's view of :func:`m6rec.model.decode.decode`: one cache row per user
    holding its prompt and every token any of its slots was fed (a tree), and per slot the
    cached positions its next token reads (``reads [U, B, S]``: the prompt and its ancestors)."""
    @torch.no_grad()
    def __init__(self, model, batch: dict):
        self.model, self.lengths = model, batch.pop("lengths")
        self.cache = KVCache.empty(model)
        h = decode(model, Batch.of(batch), self.cache)  # prefill, with the prompts' own mask
        last = h[torch.arange(len(self.lengths), device=h.device), self.lengths - 1]
        self.logits = F.linear(last, model.head_weight).float()  # [U, V]
        self.reads = self.cache.readable[:, None, :]  # the root slot reads the prompt

    @torch.no_grad()
    def step(self, users: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Keep only ``users`` (indices into the current users; finished ones drop out, so late
        steps cost little); their slot ``b`` continues slot ``parent[u, b]`` and is fed
        ``tokens[u, b]``, the ``t``-th token of its item.  Returns logits ``[U, B, V]``."""
        if len(users) != self.reads.shape[0]:
            self.cache, self.lengths = self.cache.select(users), self.lengths[users]
        reads = self.reads[users]
        reads = reads.gather(1, parent[:, :, None].expand(-1, -1, reads.shape[2]))
        U, B = tokens.shape
        # each new token reads its slot's history and itself, not the other slots' new tokens
        own = torch.eye(B, dtype=torch.bool, device=tokens.device).expand(U, B, B)
        self.reads = torch.cat([reads, own], dim=2)
        h = decode(self.model, Batch(tokens, position_ids=(self.lengths[:, None] + t).expand(U, B)), self.cache,
                   attn_mask=self.reads)
        return F.linear(h, self.model.head_weight).float()
