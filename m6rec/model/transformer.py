"""The m6rec transformer: a decoder-only LM that reads M6-Rec text with posters in place.

A Llama-style block (pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP,
no biases) repeated ``n_layers`` times, a token embedding that is tied or not
to the LM head, and a patch embedding whose outputs replace the ``<|image|>``
placeholder tokens of each image slot.  Masks and kernels live in
:mod:`m6rec.model.masks`; this file holds no softmax of its own.

Inputs follow the batch contract of docs/architecture.md: ``labels`` are
already shifted, ``position_ids`` restart per packed document,
``document_ids`` is -1 on padding, ``prefix_mask`` marks the bidirectional
context region, ``image_patches [N_img, P, 3*p*p]`` go to the P slots starting
at ``image_positions[i] = (row, first slot)``.

Heads: the LM head (``forward``: loss and/or logits), pooled embeddings per
document (``encode``: user / item towers for retrieval) and a yes/no scorer
(``score_yes_no``: the log-odds of "yes" over "no" after a question, for
ranking).

Two fused projections keep the matmuls large: ``wqkv`` is q, k and v stacked
(rows ``[q | k | v]``) and ``w13`` is the SwiGLU gate and up projections
stacked (rows ``[gate | up]``); :mod:`m6rec.model.hf` splits them for Llama.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.item_projection import ItemProjection
from m6rec.model.loss import linear_cross_entropy, sampled_softmax_loss
from m6rec.model.masks import (
    AttentionMask,
    attend,
    bidirectional_region,
    build_attention_mask,
)
from m6rec.model.rows import RowGradients

if TYPE_CHECKING:
    from m6rec.model.decode import LayerKV

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    loss: Optional[Tensor] = None  # mean cross-entropy over labelled tokens (fp32)
    logits: Optional[Tensor] = None  # [B, T, V] when asked for (default: when no labels)
    hidden: Optional[Tensor] = None  # [B, T, D] final-normed hidden states when asked for
    n_tokens: Optional[Tensor] = None  # number of labelled tokens behind ``loss``


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and *signed* sin ``[B, T, 1, head_dim]`` (fp32) for the rotate-half (Llama / NeoX) layout.

    Rotate-half RoPE is ``x * cos + cat(-x2, x1) * sin``; with
    ``sin_signed = cat(-sin, sin)`` it is ``x * cos + roll(x, Q/2) * sin_signed``,
    which costs one kernel less per call than ``neg`` + ``cat``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = (position_ids[..., None].float() * inv_freq)[:, :, None, :]
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs, freqs], dim=-1).sin()


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, Q]`` by its positions."""
    rolled = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # cat(x2, x1)
    return torch.addcmul(x * cos.to(x.dtype), rolled, sin_signed.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.attn_dropout  # on the attention weights, training mode only

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                kv: Optional[LayerKV] = None) -> Tensor:
        """``kv`` (decoding, m6rec.model.decode): this layer's cached keys and values; the new ones
        are appended to it and ``mask`` spans cached + new keys."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv
        qk, v = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim).split([H + Hkv, Hkv], dim=2)
        # q and k rotated in one go, then laid out [B, H, T, Q] contiguous: the CPU flash kernel
        # runs measurably faster on contiguous q and k than on strided views
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).contiguous().split([H, Hkv], dim=1)
        v = v.transpose(1, 2)
        if kv is not None:
            k, v = kv.extend(k, v)
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # [B, H, T, Q]
        return self.wo(out.transpose(1, 2).reshape(B, T, H * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W_gate) * x W_up)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(args.dim, 2 * args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.resid_dropout = args.resid_dropout  # on each branch's output, training mode only

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                kv: Optional[LayerKV] = None) -> Tensor:
        x = x + self._branch(self.attention(self.attention_norm(x), cos, sin, mask, kv))
        return x + self._branch(self.feed_forward(self.ffn_norm(x)))

    def _branch(self, y: Tensor) -> Tensor:
        """Residual dropout on a branch's output (no op at all outside training or at 0)."""
        return F.dropout(y, self.resid_dropout, True) if self.resid_dropout and self.training else y


class PatchEmbed(nn.Module):
    """Pixels of one image's patches ``[N, P, C*p*p]`` -> ``[N, P, dim]``.

    A linear projection of the patch (pixels rescaled from [0, 1] to [-1, 1])
    plus a learned 2-D position: a row and a column embedding, summed.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.grid = args.grid
        self.proj = nn.Linear(args.patch_dim, args.dim, bias=False)
        self.row_pos = nn.Parameter(torch.empty(args.grid, args.dim))
        self.col_pos = nn.Parameter(torch.empty(args.grid, args.dim))

    def forward(self, patches: Tensor) -> Tensor:
        pos = (self.row_pos[:, None, :] + self.col_pos[None, :, :]).reshape(self.grid * self.grid, -1)
        return self.proj(patches.to(self.proj.weight.dtype) * 2 - 1) + pos


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------
class M6Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.patch_embed = PatchEmbed(args)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.item_proj = ItemProjection(args) if args.item_vector_dim else None
        # The catalog of the vector mode: data, not parameters (not saved; set_item_catalog).
        self.register_buffer("item_bank", torch.zeros(0, max(args.item_vector_dim, 1)), persistent=False)
        self.register_buffer("item_token_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        # training softmax over a subset of the catalog (held-out items excluded): rows and row -> position
        self.register_buffer("item_loss_rows", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("item_loss_position", torch.zeros(0, dtype=torch.long), persistent=False)
        # item tokens as items of their own loss (train.item_loss sampled, item_repr token/both):
        # the first item token; the item tokens are the vocabulary's last rows (set_item_tokens)
        self.item_token_start: Optional[int] = None
        # the token table's gradient as rows (train.sparse_item_rows; m6rec/model/rows.py), else None
        self.row_grads: Optional[RowGradients] = None
        self.init_weights()

    # --- initialisation -----------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Scaled init: N(0, init_std) everywhere; the two projections that
        write into the residual stream (``wo``, ``w2``) get init_std/sqrt(2L)
        (GPT-2); patch projection scaled so patch embeddings start at the
        token embeddings' scale.  Call again after ``to_empty`` when the
        model was built on the meta device."""
        a = self.args
        std, out_std = a.init_std, a.init_std / math.sqrt(2 * a.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            nn.init.normal_(layer.attention.wqkv.weight, std=std)
            nn.init.normal_(layer.attention.wo.weight, std=out_std)
            nn.init.normal_(layer.feed_forward.w13.weight, std=std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)
        # inputs in [-1, 1] have E[x^2] = 1/3: std_w * sqrt(patch_dim / 3) = init_std
        nn.init.normal_(self.patch_embed.proj.weight, std=std * math.sqrt(3 / a.patch_dim))
        nn.init.normal_(self.patch_embed.row_pos, std=std)
        nn.init.normal_(self.patch_embed.col_pos, std=std)
        if self.item_proj is not None:
            self.item_proj.reset_parameters(std)

    # --- helpers --------------------------------------------------------------
    @property
    def head_weight(self) -> Tensor:
        """``[V, D]``: the LM head (the token embedding when tied)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def set_item_catalog(self, vectors: Tensor, token_ids: Optional[Tensor] = None,
                         loss_rows: Optional[Tensor] = None) -> None:
        """The catalog the vector mode reads and scores: ``vectors [N, d_v]`` (row ``i`` = catalog row
        ``i``, as the batch's ``item_catalog_rows`` count them) and, for item_repr ``vector_token``,
        each item's item-token id (``-1``: none, e.g. an item of another catalog).  ``loss_rows``: the
        rows the training loss's softmax runs over (default all): items held out of training
        (``data.cold_items``) must not even be negatives, or the model learns never to name them."""
        if self.item_proj is None:
            raise ValueError("this model has no item projection (model.item_vector_dim is 0)")
        if vectors.ndim != 2 or vectors.shape[1] != self.args.item_vector_dim:
            raise ValueError(f"item vectors of shape {tuple(vectors.shape)}: this model reads "
                             f"{self.args.item_vector_dim}-wide vectors")
        dev = self.tok_embeddings.weight.device
        self.item_bank = vectors.detach().to(dev, torch.float32)
        self.item_token_ids = (token_ids.to(dev, torch.long) if token_ids is not None
                               else torch.zeros(0, dtype=torch.long, device=dev))
        if loss_rows is None:
            self.item_loss_rows = torch.zeros(0, dtype=torch.long, device=dev)
            self.item_loss_position = torch.zeros(0, dtype=torch.long, device=dev)
        else:
            self.item_loss_rows = loss_rows.to(dev, torch.long)
            position = torch.full((vectors.shape[0],), -1, dtype=torch.long)
            position[loss_rows.long().cpu()] = torch.arange(len(loss_rows))
            self.item_loss_position = position.to(dev)

    def set_item_tokens(self, start: int) -> None:
        """Item tokens are ids ``start .. vocab_size - 1``; their labels leave the token loss for the
        item loss (:meth:`label_positions`), which a batch with ``item_candidates`` computes over those
        candidates only, the token loss then over the rows before ``start`` only."""
        if not 0 < start < self.args.vocab_size:
            raise ValueError(f"first item token {start} outside the vocabulary of {self.args.vocab_size}")
        self.item_token_start = start

    @property
    def has_catalog(self) -> bool:
        """Items are catalog rows with text vectors (item_repr vector modes, catalog attached)."""
        return self.item_proj is not None and bool(self.item_bank.shape[0])

    def catalog_embeddings(self, projected: Optional[Tensor] = None) -> Tensor:
        """``[N, D]``: every catalog item's output embedding -- its projected text vector (``projected``:
        already computed), plus its item-token embedding where it has one (vector_token)."""
        if not self.has_catalog:
            raise ValueError("no item catalog: call set_item_catalog first (item_repr vector modes)")
        if projected is None and not torch.is_grad_enabled():
            # serving: in blocks, so that the projection's hidden activations never exist for the whole
            # catalog at once (at 1M items they were ~2.5 GB, ten times the result)
            rows = torch.arange(self.item_bank.shape[0], device=self.item_bank.device)
            return torch.cat([self.item_embeddings(r) for r in rows.split(1 << 16)])
        e = self._project_rows(None) if projected is None else projected
        return self._with_item_tokens(e, self.item_token_ids)

    def _with_item_tokens(self, e: Tensor, token_ids: Tensor) -> Tensor:
        """vector_token: the item-token embeddings of ``token_ids`` (-1: none) added to ``e``."""
        if not self.item_token_ids.numel():
            return e
        return e + self.table_rows(token_ids.clamp(min=0)).to(e.dtype) * (token_ids >= 0)[:, None].to(e.dtype)

    def item_embeddings(self, items: Tensor) -> Tensor:
        """Output embeddings ``[n, D]`` of ``items`` only: catalog rows in the vector modes (their text
        vectors projected, plus their item tokens' rows in vector_token), else item-token ids (rows of
        the LM head).  What the sampled item loss reads: nothing catalog-sized."""
        if self.has_catalog:
            return self._with_item_tokens(self._project_rows(items), self.item_token_ids.index_select(0, items)
                                          if self.item_token_ids.numel() else self.item_token_ids)
        return self.table_rows(items) if self.output is None else self.output.weight.index_select(0, items)

    def table_rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the token table, through :attr:`row_grads` when it collects their gradients."""
        if self.row_grads is not None and torch.is_grad_enabled():
            return self.row_grads.gather(self.tok_embeddings.weight, ids)
        return self.tok_embeddings(ids)  # the module's call: ZeRO 3 gathers the table in its hook

    def _project_rows(self, rows: Optional[Tensor]) -> Tensor:
        """Projected text vectors of catalog ``rows`` (all when None)."""
        return self.item_proj(self.item_bank if rows is None else self.item_bank.index_select(0, rows))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counted once (tied weights once).  ``non_embedding``
        drops the token embedding, the untied LM head and the patch embedding."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            total -= sum(p.numel() for p in self.patch_embed.parameters())
            if self.output is not None:
                total -= self.output.weight.numel()
        return total

    def embed(self, batch: Batch, slot_vectors: Optional[Tensor] = None) -> Tensor:
        """Token embeddings with each image's patch embeddings written over its slot tokens, and each
        item vector slot's projected text vector added to its token's embedding (``slot_vectors``:
        those, already computed; by default the slots' rows are projected here)."""
        x = self.table_rows(batch.input_ids)
        image_patches, image_positions = batch.image_patches, batch.image_positions
        item_positions, item_catalog_rows = batch.item_positions, batch.item_catalog_rows
        if item_positions is not None and item_positions.numel():
            v = (self._project_rows(item_catalog_rows) if slot_vectors is None else slot_vectors).to(x.dtype)
            x = x.index_put((item_positions[:, 0], item_positions[:, 1]), v, accumulate=True)
        if image_patches is not None and image_patches.numel():
            n, P = image_patches.shape[:2]
            emb = self.patch_embed(image_patches).to(x.dtype)  # [N, P, D]
            rows = image_positions[:, :1].expand(n, P)
            cols = image_positions[:, 1:2] + torch.arange(P, device=x.device)
            x = x.index_put((rows.reshape(-1), cols.reshape(-1)), emb.reshape(n * P, -1))
        return x

    def hidden_states(self, batch: Batch, slot_vectors: Optional[Tensor] = None) -> Tensor:
        """The final-normed hidden states ``[B, T, D]``.  ``batch.attention_mask``: one built
        beforehand from the same batch (:meth:`attention_mask`), e.g. by the trainer from the
        loader's host copy; by default it is built here."""
        input_ids, position_ids = batch.input_ids, batch.position_ids
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = batch.attention_mask if batch.attention_mask is not None else \
            self.attention_mask(T, batch.document_ids, batch.prefix_mask, input_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta)
        x = self.embed(batch, slot_vectors)
        if self.args.embed_dropout and self.training:
            x = F.dropout(x, self.args.embed_dropout, True)
        ckpt = self.args.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)

    def attention_mask(self, seq_len: int, document_ids: Optional[Tensor], prefix_mask: Optional[Tensor],
                       device: torch.device, host_document_ids: Optional[Tensor] = None,
                       host_prefix_mask: Optional[Tensor] = None) -> AttentionMask:
        """The mask every layer applies to a batch, built once.  ``host_*``: CPU copies of the
        same tensors, from which kernels that need the document spans on the host ("varlen")
        read them without a device-to-host copy.  FlexAttention has no dropout: in training mode with
        ``attn_dropout`` > 0, "auto" and "flex" run as "varlen" (per-document SDPA)."""
        impl = self.args.attn_impl
        if self.args.attn_dropout and self.training and impl in ("auto", "flex"):
            impl = "varlen"
        return build_attention_mask(seq_len, document_ids=document_ids, prefix_mask=prefix_mask,
                                    attention=self.args.attention, impl=impl, device=device,
                                    host_document_ids=host_document_ids, host_prefix_mask=host_prefix_mask)

    # --- LM head ----------------------------------------------------------------
    def forward(self, batch: Batch, *, return_logits: Optional[bool] = None, return_hidden: bool = False) -> ModelOutput:
        """Language-model pass.  With ``labels`` (already shifted, -100 = no
        loss) the loss is the mean fp32 cross-entropy over labelled tokens; the
        LM head runs on those tokens only, a chunk at a time, so neither
        ``[B, T, V]`` nor fp32 ``[N, V]`` logits are ever made
        (:func:`linear_cross_entropy`).  Without labels, logits ``[B, T, V]``
        are returned.

        ``batch.label_index``: the flat positions (``row * T + t``) of the labelled
        tokens, computed by the caller on the host (the trainer does it from
        the loader's CPU copy with :func:`label_positions`); ``labels`` must
        then already be final.  Without it they are found here, which reads
        their number back from the device (a host sync).

        Item labels: a label whose token is an item vector slot (``item_positions``,
        ``item_catalog_rows``; item_repr vector*) or, after :meth:`set_item_tokens`, an item token.
        The position before it scores every catalog item (:meth:`catalog_embeddings`; item tokens:
        the whole vocabulary), or with ``batch.item_candidates`` only the target and those shared
        candidates (the sampled softmax: :func:`sampled_softmax_loss`, with the logQ correction and
        accidental hits masked; token labels then score the non-item vocabulary).
        ``item_label_index`` / ``item_targets`` (from :meth:`label_positions`) are those positions
        and their items; the loss is the mean over token and item labels."""
        labels, item_positions = batch.labels, batch.item_positions
        sampled = batch.item_candidates is not None
        projected = slot_vectors = None
        if labels is not None and not sampled and item_positions is not None and item_positions.numel() \
                and self.has_catalog:
            # full item loss: one projection of the whole catalog serves the slots' inputs and the loss
            # (a 4,096-token batch holds ~2,000 slots; projecting them again cost a third more)
            projected = self._project_rows(None)
            slot_vectors = projected.index_select(0, batch.item_catalog_rows)
        h = self.hidden_states(batch, slot_vectors)
        out = ModelOutput(hidden=h if return_hidden else None)
        if return_logits is None:
            return_logits = labels is None
        if return_logits:
            out.logits = F.linear(h, self.head_weight)
        if labels is not None:
            if batch.label_index is None:
                batch = self.label_positions(batch)
            labels, label_index = batch.labels, batch.label_index
            item_label_index, item_targets = batch.item_label_index, batch.item_targets
            n_items = item_label_index.numel() if item_label_index is not None else 0
            n = label_index.numel() + n_items
            out.n_tokens = torch.full((), n, dtype=torch.long, device=h.device)
            flat = h.flatten(0, 1)
            smoothing = self.args.label_smoothing if self.training else 0.0
            total = h.sum().float() * 0.0  # a zero that keeps the graph when nothing is labelled
            if label_index.numel():
                hs = flat.index_select(0, label_index)
                ys = labels.flatten().index_select(0, label_index)
                head = self.head_weight
                if sampled and self.item_token_start is not None:
                    head = (self.table_rows(torch.arange(self.item_token_start, device=hs.device))
                            if self.output is None else head[:self.item_token_start])
                total = total + linear_cross_entropy(hs, head, ys, smoothing=smoothing)
            if n_items and sampled:
                total = total + self._sampled_item_loss(flat.index_select(0, item_label_index), batch, item_targets,
                                                        smoothing)
            elif n_items and not self.has_catalog:  # item tokens, full: their rows of the whole vocabulary
                total = total + linear_cross_entropy(flat.index_select(0, item_label_index), self.head_weight,
                                                     item_targets, smoothing=smoothing)
            elif n_items:
                catalog = self.catalog_embeddings(projected)
                # training: the training catalog (held-out items are not in it); evaluation (validation loss,
                # whose targets include held-out items) scores the whole catalog, as ranking does
                if self.item_loss_rows.numel() and self.training:
                    catalog = catalog.index_select(0, self.item_loss_rows)
                    item_targets = self.item_loss_position.index_select(0, item_targets)
                total = total + linear_cross_entropy(flat.index_select(0, item_label_index), catalog, item_targets,
                                                     smoothing=smoothing)
            out.loss = total / max(n, 1)
        return out

    def _sampled_item_loss(self, hs: Tensor, batch: Batch, targets: Tensor, smoothing: float) -> Tensor:
        """Summed sampled-softmax loss of the item labels (``hs``: their hidden states): each target
        against the batch's shared candidates, reading the embeddings of those items only."""
        candidates = batch.item_candidates
        both = self.item_embeddings(torch.cat([targets, candidates]))
        excluded = targets[:, None] == candidates[None, :]  # accidental hits
        if batch.item_history_hits is not None:
            excluded = excluded | batch.item_history_hits
        return sampled_softmax_loss(hs, both[:targets.numel()], both[targets.numel():], excluded,
                                    batch.item_target_logq, batch.item_candidate_logq, smoothing)

    def label_positions(self, batch: Batch) -> Batch:
        """``batch`` with its labels made final and ``label_index``, ``item_label_index`` and
        ``item_targets`` set for :meth:`forward`, computed where the tensors are (the trainer calls
        it on the loader's CPU copy, so the counts cost no device sync).  Labels whose token is an
        item vector slot, or an item token after :meth:`set_item_tokens`, move from the token loss to
        the item loss (the last two; None without such labels)."""
        labels, document_ids, prefix_mask = batch.labels, batch.document_ids, batch.prefix_mask
        item_positions, item_catalog_rows = batch.item_positions, batch.item_catalog_rows
        if self.args.attention == "prefix" and prefix_mask is not None:
            labels = self._drop_visible_labels(labels, document_ids, prefix_mask)
        item_label_index = item_targets = None
        if self.item_token_start is not None:
            flat = labels.flatten()
            item_label_index = (flat >= self.item_token_start).nonzero().flatten()
            item_targets = flat.index_select(0, item_label_index)
            flat = flat.clone()
            flat[item_label_index] = IGNORE_INDEX
            labels = flat.view_as(labels)
        elif item_positions is not None and item_positions.numel():
            T = labels.shape[1]
            rows, cols = item_positions[:, 0], item_positions[:, 1]
            before = rows * T + cols - 1  # the position that predicts the slot
            flat = labels.flatten()
            labelled = (cols > 0) & (flat.index_select(0, before.clamp(min=0)) != IGNORE_INDEX)
            item_label_index, item_targets = before[labelled], item_catalog_rows[labelled]
            flat = flat.clone()
            flat[item_label_index] = IGNORE_INDEX
            labels = flat.view_as(labels)
        return batch.replace(labels=labels, label_index=(labels.flatten() != IGNORE_INDEX).nonzero().flatten(),
                             item_label_index=item_label_index, item_targets=item_targets)

    @staticmethod
    def _drop_visible_labels(labels: Tensor, document_ids: Optional[Tensor], prefix_mask: Tensor) -> Tensor:
        """Inside the bidirectional region a position can read its own next
        token, so a label there would be a copy task: ignore it."""
        doc = document_ids if document_ids is not None else torch.zeros_like(labels)
        region = bidirectional_region(doc, prefix_mask)
        sees_next = torch.zeros_like(region)
        sees_next[:, :-1] = region[:, :-1] & region[:, 1:] & (doc[:, :-1] == doc[:, 1:])
        return labels.masked_fill(sees_next, IGNORE_INDEX)

    # --- pooled embeddings (retrieval towers) -------------------------------
    @staticmethod
    def _doc_keys(document_ids: Optional[Tensor], B: int, T: int, device) -> tuple[Tensor, Tensor, int]:
        doc = document_ids if document_ids is not None else torch.zeros(B, T, dtype=torch.long, device=device)
        n_doc = int(doc.max()) + 1 if doc.numel() else 1
        valid = doc >= 0
        keys = torch.arange(B, device=device)[:, None] * n_doc + doc
        return keys, valid, n_doc

    def pool(self, h: Tensor, document_ids: Optional[Tensor] = None, pool: str = "mean") -> tuple[Tensor, Tensor]:
        """One vector per document of ``h [B, T, D]``: ``(emb [N, D], index [N, 2])``
        with ``index[i] = (row, document id)``, rows then documents in order.
        ``pool`` is "mean" (over the document's tokens) or "last" (its last token)."""
        B, T, D = h.shape
        keys, valid, n_doc = self._doc_keys(document_ids, B, T, h.device)
        k, hv = keys[valid], h[valid]
        if pool == "mean":
            sums = torch.zeros(B * n_doc, D, device=h.device, dtype=torch.float32).index_add(0, k, hv.float())
            counts = torch.bincount(k, minlength=B * n_doc)
            present = counts > 0
            emb = (sums[present] / counts[present, None]).to(h.dtype)
        elif pool == "last":
            t = torch.arange(T, device=h.device).expand(B, T)[valid]
            last = torch.full((B * n_doc,), -1, device=h.device, dtype=torch.long).scatter_reduce(0, k, t, "amax")
            present = last >= 0
            rows = torch.arange(B * n_doc, device=h.device)[present] // n_doc
            emb = h[rows, last[present]]
        else:
            raise ValueError(f"pool must be 'mean' or 'last', got {pool!r}")
        ids = torch.arange(B * n_doc, device=h.device)[present]
        return emb, torch.stack([ids // n_doc, ids % n_doc], dim=1)

    def encode(self, batch: Batch, *, pool: str = "mean", normalize: bool = True) -> tuple[Tensor, Tensor]:
        """Pooled (L2-normalised) embeddings of each document: ``(emb [N, D], index [N, 2])``."""
        h = self.hidden_states(batch)
        emb, index = self.pool(h, batch.document_ids, pool)
        return (F.normalize(emb.float(), dim=-1).to(emb.dtype) if normalize else emb), index

    # --- yes/no scorer (ranking) ----------------------------------------------
    def score_yes_no(self, batch: Batch, yes_id: int, no_id: int) -> tuple[Tensor, Tensor]:
        """Log-odds ``log p(yes) - log p(no)`` of the token after each document's
        last token (e.g. after "... Would the user enjoy X? Answer:"): the
        LM's own next-token distribution restricted to the two answers.
        Returns ``(scores [N] fp32, index [N, 2])``."""
        h = self.hidden_states(batch)
        last, index = self.pool(h, batch.document_ids, "last")
        w = self.head_weight
        return (last.float() @ (w[yes_id] - w[no_id]).float()), index


# ---------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------
def apply_compile(model: M6Transformer, **compile_kwargs) -> M6Transformer:
    """``torch.compile`` each block in place (per-block, as torchtitan does:
    small graphs, quick recompiles, works with activation checkpointing).
    ``compile_kwargs`` go to ``torch.compile`` (default ``dynamic=False``)."""
    compile_kwargs.setdefault("dynamic", False)
    for layer in model.layers:
        layer.compile(**compile_kwargs)
    return model
