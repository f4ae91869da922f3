"""Row gradients of the token table: the item rows a step read, and nothing catalog-sized.

With the sampled item loss a step reads a few hundred of a catalog's rows, yet autograd's gradient
of an embedding table is as large as the table (and an optimizer then moves every row).  When the
model holds a :class:`RowGradients` (``model.row_grads``, set by the trainer for item-token models
with ``train.sparse_item_rows``), every read of the token table in a training forward goes through
:meth:`RowGradients.gather`, whose backward keeps ``(rows, gradient rows)`` instead; the table itself
does not require a gradient, so the engine neither sees it nor steps it, and
:class:`m6rec.train.item_rows.RowAdam` updates the rows that were read (TorchRec's and FBGEMM's
fused sparse optimizers do the same for recommendation tables).
"""
from __future__ import annotations

import torch
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """``weight[ids]``; backward hands ``(ids, grad)`` to the sink.  ``anchor`` (an empty tensor that
    requires a gradient) makes autograd call the backward although the table does not."""

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor, anchor: Tensor, sink: "RowGradients") -> Tensor:
        ctx.ids, ctx.sink = ids, sink
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.sink.rows.append(ctx.ids)
        ctx.sink.values.append(grad.float())
        return None, None, torch.zeros(0, device=grad.device), None


class RowGradients:
    """The row gradients of one table, collected over the micro-batches of a step."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.rows: list[Tensor] = []
        self.values: list[Tensor] = []
        self.anchor = torch.zeros(0, device=device, requires_grad=True)

    def gather(self, weight: Tensor, ids: Tensor) -> Tensor:
        """``weight[ids]`` (any shape of ``ids``: ``[..., D]``), its gradient kept as rows."""
        flat = ids.reshape(-1)
        return _GatherRows.apply(weight, flat, self.anchor, self).view(*ids.shape, weight.shape[1])

    def take(self) -> tuple[Tensor, Tensor]:
        """The step's ``(unique rows, summed gradient rows)``, and the collector emptied."""
        if not self.rows:
            dev = self.anchor.device
            return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, 0, device=dev)
        rows, values = torch.cat(self.rows), torch.cat(self.values)
        self.rows, self.values = [], []
        return coalesce(rows, values)


def coalesce(rows: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Sum the gradient rows of repeated row ids: ``(unique ids, [n unique, D])``."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = torch.zeros(unique.numel(), values.shape[1], dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values)
    return unique, summed
