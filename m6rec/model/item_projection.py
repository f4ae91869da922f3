"""Items as text vectors: the projection of cached item text vectors into the model's width."""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from m6rec.model.args import ModelArgs


class ItemProjection(nn.Module):
    """Cached item text vectors ``[N, d_v]`` (unit norm, from a frozen sentence encoder) into the
    model's width: the item's input embedding at its slot and its output embedding in the catalog
    softmax (tied, as token embeddings are).  The only item parameters of the vector mode: they act
    on text vectors, never on item ids, so any catalog's vectors go through them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dv, d = args.item_vector_dim, args.dim
        self.kind = args.item_proj
        if self.kind == "mlp":
            h = args.item_proj_hidden or 4 * d
            self.w1 = nn.Linear(dv, h, bias=True)
            # deeper: residual hidden layers, each h -> h (pre-norm, so depth does not change the scale)
            self.hidden = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h, bias=True))
                                        for _ in range(max(0, args.item_proj_layers - 1)))
            self.w2 = nn.Linear(h, d, bias=False)
        else:
            self.w1 = nn.Linear(dv, d, bias=False)
            self.hidden = nn.ModuleList()
            self.w2 = None

    def reset_parameters(self, init_std: float) -> None:
        # unit-norm inputs: pre-activations of std ~1, outputs at the token embeddings' scale
        if self.w2 is None:
            nn.init.normal_(self.w1.weight, std=init_std)
            return
        nn.init.normal_(self.w1.weight, std=1.0)
        nn.init.zeros_(self.w1.bias)
        h = self.w2.in_features
        for block in self.hidden:
            block[0].reset_parameters()
            # each residual layer starts small: the stack begins as the one-hidden-layer MLP
            nn.init.normal_(block[1].weight, std=0.1 / math.sqrt(h))
            nn.init.zeros_(block[1].bias)
        nn.init.normal_(self.w2.weight, std=init_std / math.sqrt(0.425 * h))  # E[gelu(z)^2]

    def forward(self, v: Tensor) -> Tensor:
        v = v.to(self.w1.weight.dtype)
        if self.w2 is None:
            return self.w1(v)
        x = self.w1(v)
        for block in self.hidden:
            x = x + block(F.gelu(x))
        return self.w2(F.gelu(x))
