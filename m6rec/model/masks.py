"""Attention masks and the fused kernels that apply them.

Three masks, built once per forward pass from the batch and shared by every
layer (see docs/architecture.md, "The batch contract"):

1. **causal** -- token ``q`` reads keys ``k <= q``;
2. **M6 prefix** -- additionally, tokens of a document's context region read
   each other both ways (bidirectional), while the items to predict stay
   causal;
3. **document isolation** -- in a packed row no token reads a token of another
   document (``document_ids`` differ); padding (``document_ids == -1``) is a
   document of its own, so no real token ever reads it and a padding row is
   never fully masked (no NaNs).

``allowed(q, k) = same_doc(q, k) and (k <= q or (region[q] and region[k]))``

where ``region`` is the *leading run* of ``prefix_mask`` tokens of each
document.  Restricting the region to the leading run makes the mask safe by
construction: a context token placed after a target (a data error) is read
causally, so no future target can leak through it into an earlier position.

Kernels (no hand-written softmax(QK^T) anywhere):

* plain causal, no packing -> ``scaled_dot_product_attention(is_causal=True)``
  (flash / cuDNN on GPU, the flash kernel on CPU);
* any other mask on CUDA (``attn_impl: auto``) -> FlexAttention with a
  ``BlockMask`` (compiled; blocks that are fully masked -- other documents --
  are skipped) in training; under ``no_grad`` (ranking, evaluation) SDPA with a
  boolean mask while ``[B, T, T]`` stays within ``DENSE_INFERENCE_MAX``, because
  Flex compiles again for every new batch shape;
* any other mask elsewhere (``auto``) -> "varlen": one fused SDPA call per
  document span, on that span only (``is_causal`` when it has no context
  region, else a small prefix-LM mask).  Attention then costs
  ``sum(L_doc^2)`` instead of ``T^2`` per row, which the CPU flash kernel
  cannot do by itself (it skips blocks for ``is_causal`` only, never for a
  mask).  The spans are read to the host once per forward pass (free on
  CPU), and the per-span loop runs outside ``torch.compile`` graphs;
* ``attn_impl: sdpa`` -> SDPA with one boolean ``[B, 1, T, T]`` mask (any
  device; the fused CPU flash kernel supports masks with backward).
  FlexAttention (``attn_impl: flex``) has no CPU backward in torch 2.13; on
  CPU it runs forward-only and unfused (tests use it as a cross-check).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


@dataclass
class AttentionMask:
    """What every attention layer of one forward pass applies."""

    kind: str  # "causal" | "dense" | "flex" | "varlen"
    dense: Optional[Tensor] = None  # [B, 1, T, T] bool, True = may attend (kind "dense")
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask (kind "flex")
    spans: Optional[list] = None  # per row: [(length, context length), ...] covering the row (kind "varlen")
    device: Optional[torch.device] = None
    _span_masks: dict = field(default_factory=dict)  # (length, context, dtype) -> additive mask, made on first use

    def span_mask(self, length: int, ctx: int, dtype: torch.dtype) -> Optional[Tensor]:
        """``None`` for a span read plainly causally, else its ``[L, L]`` prefix-LM
        mask as an additive 0 / -inf mask of ``dtype``, made once per forward
        pass and shared by all layers (SDPA would convert a bool mask in every
        call, forward and backward)."""
        if ctx <= 1:  # no context region (or one token): plain causal
            return None
        key = (length, ctx, dtype)
        if key not in self._span_masks:
            pos = torch.arange(length, device=self.device)
            allowed = (pos[:, None] >= pos[None, :]) | ((pos[:, None] < ctx) & (pos[None, :] < ctx))
            self._span_masks[key] = torch.zeros(length, length, dtype=dtype, device=self.device).masked_fill_(
                ~allowed, float("-inf"))
        return self._span_masks[key]


def doc_starts(document_ids: Tensor) -> Tensor:
    """Index of the first token of each token's document, ``[B, T]`` int64."""
    B, T = document_ids.shape
    idx = torch.arange(T, device=document_ids.device).expand(B, T)
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values


def bidirectional_region(document_ids: Tensor, prefix_mask: Tensor) -> Tensor:
    """The leading run of ``prefix_mask`` tokens of each document, ``[B, T]`` bool.

    A token is in the region when it is marked and no unmarked token of its
    document comes before it.  Padding (document -1) is never in the region.
    """
    prefix_mask = prefix_mask.bool()
    unmarked = (~prefix_mask).long()
    upto = unmarked.cumsum(dim=1)  # unmarked tokens in [0, t]
    before = upto - unmarked  # unmarked tokens in [0, t)
    start = doc_starts(document_ids)
    unmarked_in_doc = upto - before.gather(1, start)  # unmarked tokens in [start, t]
    return prefix_mask & (unmarked_in_doc == 0) & (document_ids >= 0)


def dense_mask(document_ids: Tensor, region: Optional[Tensor]) -> Tensor:
    """The boolean ``[B, 1, T, T]`` mask (True = may attend) for SDPA."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = document_ids[:, :, None] == document_ids[:, None, :]
    if region is not None:
        allowed = allowed & (causal | (region[:, :, None] & region[:, None, :]))
    else:
        allowed = allowed & causal
    return allowed[:, None]


def doc_spans(document_ids: Tensor, region: Optional[Tensor]) -> list[list[tuple[int, int]]]:
    """Per row, the runs of equal ``document_ids`` in order as ``(length, region length)``;
    a padding run is a span of its own with no region (read causally, as in the dense mask)."""
    B, T = document_ids.shape
    new = torch.ones_like(document_ids, dtype=torch.bool)
    new[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = [r.nonzero().flatten().tolist() + [T] for r in new]
    upto = None if region is None else F.pad(region.long().cumsum(1), (1, 0)).tolist()  # region tokens before t
    spans = []
    for b in range(B):
        row = starts[b]
        spans.append([(e - s, 0 if upto is None else upto[b][e] - upto[b][s]) for s, e in zip(row[:-1], row[1:])])
    return spans


def flex_block_mask(document_ids: Tensor, region: Optional[Tensor]) -> Any:
    """The same mask as :func:`dense_mask` as a FlexAttention ``BlockMask``."""
    B, T = document_ids.shape
    doc = document_ids
    if region is None:

        def mask_mod(b, h, q, k):
            return (doc[b, q] == doc[b, k]) & (q >= k)

    else:

        def mask_mod(b, h, q, k):
            return (doc[b, q] == doc[b, k]) & ((q >= k) | (region[b, q] & region[b, k]))

    if not doc.is_cuda:
        return create_block_mask(mask_mod, B, None, T, T, device=doc.device)
    global _compiled_create_block_mask
    if _compiled_create_block_mask is None:
        # Compiled once for the process: create_block_mask(_compile=True) wraps itself in a
        # fresh torch.compile on every call, whose guard checks cost milliseconds per batch.
        _compiled_create_block_mask = torch.compile(create_block_mask, dynamic=False)
    return _compiled_create_block_mask(mask_mod, B, None, T, T, device=doc.device)


_compiled_create_block_mask = None
DENSE_INFERENCE_MAX = 2**28  # bytes of a boolean [B, T, T] mask: above it, inference on CUDA uses FlexAttention


def build_attention_mask(
    seq_len: int,
    *,
    document_ids: Optional[Tensor] = None,
    prefix_mask: Optional[Tensor] = None,
    attention: str = "prefix",
    impl: str = "auto",
    device: Optional[torch.device] = None,
    host_document_ids: Optional[Tensor] = None,
    host_prefix_mask: Optional[Tensor] = None,
) -> AttentionMask:
    """Choose the mask and kernel for one batch.

    ``attention="causal"`` ignores ``prefix_mask``; without ``document_ids``
    and without a prefix the plain causal SDPA path is used.  ``host_*`` are
    CPU copies of ``document_ids`` / ``prefix_mask``: the "varlen" kernel then
    reads the document spans from them, not from the device.
    """
    use_prefix = attention == "prefix" and prefix_mask is not None
    if document_ids is None and not use_prefix:
        return AttentionMask("causal")
    if document_ids is None:
        document_ids = torch.zeros(prefix_mask.shape, dtype=torch.long, device=prefix_mask.device)
    device = device or document_ids.device
    on_cuda = torch.device(device).type == "cuda"
    if host_document_ids is not None and (impl == "varlen" or (impl == "auto" and not on_cuda)):
        region = bidirectional_region(host_document_ids, host_prefix_mask) if use_prefix else None
        return AttentionMask("varlen", spans=doc_spans(host_document_ids, region), device=torch.device(device))
    region = bidirectional_region(document_ids, prefix_mask) if use_prefix else None
    if impl == "auto" and on_cuda and not torch.is_grad_enabled() \
            and document_ids.shape[0] * seq_len * seq_len <= DENSE_INFERENCE_MAX:
        # Inference (ranking, evaluation during training): FlexAttention compiles its mask and kernel for
        # every new batch shape (~20 s each on an H200), and ranking batches change length all the time;
        # SDPA with a boolean mask compiles nothing; the mask is B*T*T bytes (a bf16 copy of it per layer), small
        # at ranking lengths.
        impl = "sdpa"
    if impl == "flex" or (impl == "auto" and on_cuda):
        return AttentionMask("flex", block_mask=flex_block_mask(document_ids, region))
    if impl == "varlen" or impl == "auto":
        return AttentionMask("varlen", spans=doc_spans(document_ids, region), device=torch.device(device))
    return AttentionMask("dense", dense=dense_mask(document_ids, region))


_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, enable_gqa: bool) -> Tensor:
    """FlexAttention: compiled (fused) on CUDA; eager on CPU, forward only (torch 2.13)."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with warnings.catch_warnings():  # "called without torch.compile": known, CPU path is for checks only
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@torch.compiler.disable
def _varlen(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, enable_gqa: bool, dropout_p: float = 0.0) -> Tensor:
    """One SDPA call per document span.  ``unbind`` / ``split`` / ``cat`` /
    ``stack`` (not indexing) keep the backward free of zero-filled full-size gradients."""
    rows = []
    for qb, kb, vb, row in zip(q.unbind(0), k.unbind(0), v.unbind(0), mask.spans):
        lengths = [L for L, _ in row]
        outs = []
        for qs, ks, vs, (L, ctx) in zip(qb.split(lengths, 1), kb.split(lengths, 1), vb.split(lengths, 1), row):
            m = mask.span_mask(L, ctx, q.dtype)
            if m is None:
                o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, dropout_p=dropout_p,
                                                   enable_gqa=enable_gqa)
            else:
                o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=m, dropout_p=dropout_p,
                                                   enable_gqa=enable_gqa)
            outs.append(o[0])
        rows.append(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0])
    return torch.stack(rows)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout_p: float = 0.0) -> Tensor:
    """Fused attention of ``q [B, H, T, Q]`` over ``k, v [B, H_kv, T, Q]``.  ``dropout_p``: SDPA's
    dropout on the attention weights (the caller passes 0 outside training); FlexAttention has
    none, so a "flex" mask with ``dropout_p`` > 0 is an error (the model builds "varlen" then)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=gqa)
    if mask.kind == "dense":
        if gqa:  # SDPA's memory-efficient kernel takes a mask but not GQA: without this, the math kernel ([B, H, T, T])
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, dropout_p=dropout_p)
    if mask.kind == "varlen":
        return _varlen(q, k, v, mask, gqa, dropout_p)
    if dropout_p:
        raise ValueError("attention dropout needs an SDPA mask (causal, dense or varlen), not FlexAttention")
    return _flex(q, k, v, mask.block_mask, gqa)
