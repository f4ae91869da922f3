"""Option tuning (M6-Rec's parameter-efficient adaptation): a frozen LM read through learned
option vectors, bottleneck adapters and low-rank updates, attached by forward hooks.

Every module here starts as the identity on the pretrained model (zero-initialised
outputs), so training starts from the pretrained model exactly; the LM's own code
is untouched.  The task loop that trains them is :mod:`m6rec.rec.finetune`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from m6rec.config import ConfigError

TOWERS = ("query", "item")  # the two towers of retrieval; each has its own options


class Adapter(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.down.weight, std=dim ** -0.5)
        nn.init.zeros_(self.up.weight)  # identity at start: the pretrained model, unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.silu(self.down(x)))


class LoRA(nn.Module):
    """A low-rank update ``x -> B A x`` added to a frozen linear's output (``B`` zero at start)."""

    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, linear.in_features, generator=torch.Generator().manual_seed(rank))
                              * linear.in_features ** -0.5)
        self.b = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))


class Options(nn.Module):
    """Option vectors per tower and adapters after each block, attached to ``lm`` by hooks.

    The prompts carry ``n`` placeholder tokens after ``<|bos|>`` (:func:`m6rec.rec.finetune.with_options`);
    a forward hook on the token embedding writes the active tower's vectors there, and
    one on each block adds its adapter.  The LM's own code is untouched.

    Variants (``FinetuneConfig``): ``layers="all"`` adds, before every block after the first, a
    learned per-tower vector to each option position (deep options: every layer's keys and
    values at the option positions are learned, as in P-tuning v2); ``lora_rank`` adds a
    low-rank update to the frozen linears named in ``lora_targets``; ``head_rank`` a low-rank
    residual map of each tower's pooled embedding; ``embed_lora_rank`` a low-rank update
    ``U[t] W`` of the frozen token embeddings.  All start as the pretrained model exactly."""

    def __init__(self, lm: nn.Module, n_options: int, adapter_dim: int, placeholder: int = 3,
                 layers: str = "input", lora_rank: int = 0, lora_targets: Sequence[str] = (), head_rank: int = 0,
                 attn_pool: bool = False, embed_lora_rank: int = 0):
        super().__init__()
        self.placeholder = placeholder
        dim = lm.args.dim
        init = lm.tok_embeddings.weight.detach()
        rows = torch.randint(0, init.shape[0], (len(TOWERS), max(n_options, 0)),
                             generator=torch.Generator().manual_seed(0))
        # start from real token embeddings: vectors the frozen model already reads sensibly
        self.vectors = nn.Parameter(init[rows].clone().float().to(init.dtype)) if n_options else None
        self.adapters = nn.ModuleList(Adapter(dim, adapter_dim) for _ in lm.layers) if adapter_dim else None
        self.n = n_options
        self.tower = "query"
        self.embed_u = self.embed_w = None
        if embed_lora_rank:
            g = torch.Generator().manual_seed(2)
            # U at the embeddings' own scale: U W then moves a token's embedding by a fraction of its size per step
            scale = float(init.float().std())
            self.embed_u = nn.Parameter((torch.randn(init.shape[0], embed_lora_rank, generator=g) * scale).to(init.dtype))
            self.embed_w = nn.Parameter(torch.zeros(embed_lora_rank, dim, dtype=init.dtype))
        self._hooks = [lm.tok_embeddings.register_forward_hook(self._write_options)]
        if self.adapters is not None:
            for layer, adapter in zip(lm.layers, self.adapters):
                self._hooks.append(layer.register_forward_hook(lambda m, a, out, ad=adapter: ad(out)))
        # deep options: [tower, block 1.., n, dim], added to the option positions before each block
        self.deep = None
        if layers == "all" and n_options and len(lm.layers) > 1:
            self.deep = nn.Parameter(torch.zeros(len(TOWERS), len(lm.layers) - 1, n_options, dim, dtype=init.dtype))
            for i, layer in enumerate(lm.layers[1:]):
                self._hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: self._deep_options(i, a)))
        self.lora = nn.ModuleDict()
        if lora_rank:
            for i, layer in enumerate(lm.layers):
                for name, mod in layer.named_modules():
                    if isinstance(mod, nn.Linear) and name.split(".")[-1] in lora_targets:
                        lora = self.lora[f"{i}_{name.replace('.', '_')}"] = LoRA(mod, lora_rank)
                        self._hooks.append(mod.register_forward_hook(
                            lambda m, a, out, lo=lora: out + lo(a[0]).to(out.dtype)))
            if not len(self.lora):
                raise ConfigError(f"config key 'finetune.lora_targets': {list(lora_targets)} names no linear "
                                  "layer of the model's blocks (tiny..base: wqkv, wo, w13, w2)")
        self.head_u = self.head_v = None
        if head_rank:
            g = torch.Generator().manual_seed(1)
            self.head_v = nn.Parameter(torch.randn(len(TOWERS), dim, head_rank, generator=g) * dim ** -0.5)
            self.head_u = nn.Parameter(torch.zeros(len(TOWERS), dim, head_rank))
        # attention pooling: softmax(h . w) over the row's tokens; w = 0 is the mean pooling exactly
        self.pool_w = nn.Parameter(torch.zeros(len(TOWERS), dim)) if attn_pool else None

    def _write_options(self, module, args, out):
        if self.embed_u is not None:
            out = out + (F.embedding(args[0], self.embed_u) @ self.embed_w).to(out.dtype)
        if not self.n:
            return out
        slots = args[0][:, 1:1 + self.n]
        if slots.shape[1] != self.n or not bool((slots == self.placeholder).all()):
            raise RuntimeError("option tuning: the input lacks the option placeholders after <|bos|> "
                               "(build prompts with with_options(); this model is a task model, not a plain LM)")
        v = self.vectors[TOWERS.index(self.tower)].to(out.dtype)
        return torch.cat([out[:, :1], v.expand(out.shape[0], -1, -1), out[:, 1 + self.n:]], dim=1)

    def _deep_options(self, i: int, args: tuple) -> tuple:
        x, *rest = args
        d = self.deep[TOWERS.index(self.tower), i].to(x.dtype)
        x = torch.cat([x[:, :1], x[:, 1:1 + self.n] + d, x[:, 1 + self.n:]], dim=1)
        return (x, *rest)

    def attention_pool(self, h: torch.Tensor, document_ids: torch.Tensor, tower: str) -> torch.Tensor:
        """``[B, T, D] -> [B, D]``: one document per row (``collate``), padding (document -1) left out."""
        valid = document_ids >= 0
        if bool((document_ids > 0).any()):
            raise ValueError("attention pooling reads one document per row")
        s = (h.float() @ self.pool_w[TOWERS.index(tower)]).masked_fill(~valid, float("-inf"))
        return (torch.softmax(s, dim=1)[..., None] * h.float()).sum(1)

    def head(self, emb: torch.Tensor, tower: str) -> torch.Tensor:
        """The tower's low-rank residual map of pooled embeddings (identity without ``head_rank``)."""
        if self.head_u is None:
            return emb
        t = TOWERS.index(tower)
        return emb + (emb @ self.head_v[t].to(emb.dtype)) @ self.head_u[t].T.to(emb.dtype)
