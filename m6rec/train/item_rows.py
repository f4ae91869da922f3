"""A lazy, row-wise Adam for the token table of an item-token model (``train.sparse_item_rows``).

With the sampled item loss a step reads the rows of its inputs, its targets, its candidates and
the text vocabulary; :class:`m6rec.model.rows.RowGradients` collects their gradients as rows.  This
optimizer averages them over the data-parallel ranks (an all-gather of ``(rows, gradient rows)``,
never the table) and updates those rows only: AdamW's update (no weight decay: the table is in the
no-decay group anyway) with each row's own step count for the bias correction, as TensorFlow's
LazyAdam and torch's ``SparseAdam`` do.  A step's cost follows the rows it read, not the catalog:
a row nobody read keeps its value and its moments (dense AdamW would keep moving it on momentum).

The table is not a parameter of the engine (``requires_grad`` off): DeepSpeed neither reduces nor
steps it, so this works at ZeRO 0, 1 and 2, where every rank holds the whole table (ZeRO 3 would
partition it: refused in the config check).  Clipping: the rows' gradient is clipped by its own
norm to ``train.grad_clip``; a step whose loss was not finite on some rank moves nothing here either.
The state -- moments, per-row steps and the fp32 table -- travels in the checkpoint's client state.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from m6rec.model.rows import RowGradients, coalesce


class RowAdam:
    def __init__(self, weight: torch.nn.Parameter, sink: RowGradients, betas=(0.9, 0.95), eps: float = 1e-8,
                 clip: float = 0.0):
        self.weight, self.sink = weight, sink
        self.betas, self.eps, self.clip = betas, eps, clip
        # the fp32 rows updated: the table itself in fp32, an fp32 master copy of a bf16 table
        self.table = weight.data if weight.dtype == torch.float32 else weight.detach().float().clone()
        self.m = torch.zeros_like(self.table)
        self.v = torch.zeros_like(self.table)
        self.steps = torch.zeros(self.table.shape[0], dtype=torch.int32, device=self.table.device)
        self.last_rows = 0  # rows updated by the last step (logs, tests)

    def _all_rows(self, rows: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's ``(rows, gradient rows)`` summed per row and averaged over the ranks."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            return rows, grads
        n = torch.tensor([rows.numel()], device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        most = int(max(s.item() for s in sizes))
        d = self.table.shape[1]
        padded_rows = torch.full((most,), -1, dtype=torch.long, device=rows.device)
        padded_rows[:rows.numel()] = rows
        padded = torch.zeros(most, d, dtype=torch.float32, device=rows.device)
        padded[:rows.numel()] = grads.reshape(-1, d)
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        all_grads = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_grads, padded)
        rows, grads = torch.cat(all_rows), torch.cat(all_grads)
        keep = rows >= 0
        rows, grads = coalesce(rows[keep], grads[keep])
        return rows, grads / world

    @torch.no_grad()
    def step(self, lr: float, loss_ok: Optional[Tensor] = None) -> None:
        """Update the rows read since the last step.  ``loss_ok``: a device bool, False when some
        rank's loss was not finite (the step then moves nothing)."""
        rows, grads = self._all_rows(*self.sink.take())
        self.last_rows = rows.numel()
        if not rows.numel():
            return
        norm = torch.linalg.vector_norm(grads)
        ok = torch.isfinite(norm)
        if loss_ok is not None:
            ok = ok & loss_ok.to(ok.device)
        if self.clip > 0:
            grads = grads * (self.clip / (norm + 1e-6)).clamp(max=1.0)
        b1, b2 = self.betas
        m = self.m.index_select(0, rows).mul_(b1).add_(grads, alpha=1 - b1)
        v = self.v.index_select(0, rows).mul_(b2).addcmul_(grads, grads, value=1 - b2)
        t = (self.steps.index_select(0, rows) + 1).float()[:, None]
        bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
        new = self.table.index_select(0, rows) - lr / bias1 * m / (v.sqrt() / bias2.sqrt() + self.eps)
        old = self.table.index_select(0, rows)
        self.m.index_copy_(0, rows, torch.where(ok, m, self.m.index_select(0, rows)))
        self.v.index_copy_(0, rows, torch.where(ok, v, self.v.index_select(0, rows)))
        self.steps.index_add_(0, rows, ok.int().expand(rows.numel()))
        new = torch.where(ok, new, old)
        self.table.index_copy_(0, rows, new)
        if self.table.data_ptr() != self.weight.data_ptr():  # a master copy: write the rows back
            self.weight.data.index_copy_(0, rows, new.to(self.weight.dtype))

    def state_dict(self) -> dict:
        return {"table": self.table, "m": self.m, "v": self.v, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["table"].shape) != tuple(self.table.shape):
            raise ValueError(f"item rows state of shape {tuple(state['table'].shape)}, this table is "
                             f"{tuple(self.table.shape)}")
        for name in ("table", "m", "v", "steps"):
            getattr(self, name).copy_(state[name])
        if self.table.data_ptr() != self.weight.data_ptr():  # a master copy: write the rows back
            self.weight.data.copy_(self.table.to(self.weight.dtype))


def detach_table(model) -> RowGradients:
    """Make ``model``'s token table train by rows: its reads collect row gradients and it is no longer a
    parameter the engine steps.  Call before building the engine; then :class:`RowAdam` on the table."""
    model.row_grads = RowGradients(model.tok_embeddings.weight.device)
    model.tok_embeddings.weight.requires_grad_(False)
    return model.row_grads
