"""Incremental decoding: run tokens after what a batch has already read, through a KV cache.

:func:`decode` runs the model's own blocks (the same :class:`~m6rec.model.transformer.Block`
code as training) with a :class:`KVCache`: every layer appends the new tokens' rotated keys
and values to its :class:`LayerKV`, and the new queries read cached and new keys together.

* **Prefill** (empty cache): the prompt goes through the training mask
  (:func:`~m6rec.model.masks.build_attention_mask`: the M6 context region read
  bidirectionally, padding ``document_ids == -1`` a document of its own), so a
  prompt's hidden states equal ``hidden_states``'.  Padding keys are kept but
  marked unreadable.
* **Later calls**: by default each new token reads every readable cached key and
  the new tokens before it (causal continuation).  ``attn_mask`` replaces that
  rule; beam search uses it to decode a *tree*: all beam slots of a user live in
  one cache row, each step appends one token per slot, and a slot's token reads
  the prompt and its own ancestors only.  The prompt's keys are then stored and
  read once per user, not once per slot, and choosing parents needs no copying
  of keys (m6rec.rec.generative).

Positions are explicit: a token's rotary position is its place in its own
sequence (a right-padded prompt of length ``L`` continues at ``L``, not at the
padded width).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from m6rec.model.batch import Batch
from m6rec.model.masks import AttentionMask, build_attention_mask
from m6rec.model.transformer import M6Transformer, rope_cos_sin


@dataclass
class LayerKV:
    """One layer's cached rotated keys and values, ``[N, H_kv, S, Q]`` (None before the first call)."""

    k: Optional[Tensor] = None
    v: Optional[Tensor] = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new tokens' keys and values; return all of them (cached first)."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


@dataclass
class KVCache:
    """What ``N`` rows have read so far: one :class:`LayerKV` per layer and which of the
    ``S`` cached positions later tokens may read (``readable [N, S]``, False on padding)."""

    layers: list[LayerKV]
    readable: Optional[Tensor] = None  # [N, S] bool; None while empty

    @classmethod
    def empty(cls, model: M6Transformer) -> "KVCache":
        return cls([LayerKV() for _ in model.layers])

    @property
    def length(self) -> int:
        """``S``: cached positions per row."""
        return 0 if self.readable is None else self.readable.shape[1]

    def select(self, rows: Tensor) -> "KVCache":
        """A cache of only these rows (e.g. the users still decoding)."""
        return KVCache([LayerKV(kv.k[rows], kv.v[rows]) for kv in self.layers], self.readable[rows])


def decode(model: M6Transformer, batch: Batch, cache: KVCache, *, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Final-normed hidden states ``[N, T, D]`` of ``batch.input_ids [N, T]`` read after ``cache``'s
    ``S`` positions; ``cache`` is extended by these ``T`` tokens.

    ``batch.position_ids`` default to ``S, S+1, ...``.  ``attn_mask [N, T, S + T]`` (bool, True =
    may attend) overrides the default rule (readable cached keys, new tokens causally).
    ``batch.document_ids`` / ``prefix_mask`` describe a prompt as in the batch contract and apply
    to the first call (prefill) only; labels and the trainer's fields are not read.  The LM head is left to the caller
    (``F.linear(h, model.head_weight)``) so a prefill need not make ``[N, T, V]`` logits."""
    a = model.args
    input_ids, position_ids = batch.input_ids, batch.position_ids
    document_ids, prefix_mask = batch.document_ids, batch.prefix_mask
    N, T = input_ids.shape
    S = cache.length
    device = input_ids.device
    if position_ids is None:
        position_ids = (S + torch.arange(T, device=device)).expand(N, T)
    if S and (document_ids is not None or prefix_mask is not None):
        raise ValueError("decode: document_ids / prefix_mask describe a prompt; pass them with an empty cache only")
    if attn_mask is not None:
        mask = AttentionMask("dense", dense=attn_mask[:, None])
    elif S == 0:  # prefill: exactly the training mask
        mask = build_attention_mask(T, document_ids=document_ids, prefix_mask=prefix_mask, attention=a.attention,
                                    impl=a.attn_impl, device=device)
    else:
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = AttentionMask("dense", dense=torch.cat(
            [cache.readable[:, None, :].expand(N, T, S), causal.expand(N, T, T)], dim=2)[:, None])
    readable = torch.ones(N, T, dtype=torch.bool, device=device) if document_ids is None else document_ids >= 0
    cos, sin = rope_cos_sin(position_ids, a.head_dim, a.rope_theta)
    x = model.embed(batch)
    for layer, kv in zip(model.layers, cache.layers):
        x = layer(x, cos, sin, mask, kv)
    cache.readable = readable if S == 0 else torch.cat([cache.readable, readable], dim=1)
    return model.norm(x)
