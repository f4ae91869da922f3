"""The loss: LM head + cross-entropy, a chunk of tokens at a time (no ``[tokens, vocab]`` fp32
logits beyond one chunk's), for the vocabulary and for the item catalog alike."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _chunk_tokens(vocab: int) -> int:
    """Tokens per chunk: fp32 logits of one chunk stay near 256 MiB."""
    return max(256, (1 << 26) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` whose gradients are computed in the
    forward pass, chunk by chunk (the fused linear + cross-entropy of Liger-Kernel
    and Apple's Cut Cross-Entropy, in plain PyTorch ops): each chunk's logits are
    made, turned into ``softmax - onehot``, used for both gradients and dropped.
    The same three matmuls as an unfused head, no recomputation, and the only
    fp32 ``[tokens, vocab]`` tensor alive is one chunk's."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, chunk: int, smoothing: float = 0.0) -> Tensor:
        # The matmuls run in the autocast dtype when autocast is on (bf16 training with fp32
        # master weights), else in h's dtype; explicit casts, because ops with out= and
        # in-place accumulation do not mix with autocast.
        dev = h.device.type
        cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdtype)
            for s in range(0, h.shape[0], chunk):
                hc, yc = h[s:s + chunk].to(cdtype), labels[s:s + chunk]
                logits = (hc @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                nll = lse - logits.gather(1, yc[:, None]).squeeze(1)
                if smoothing:  # target (1 - eps) * onehot + eps / V: eps * (lse - mean logit) joins the loss
                    nll = (1.0 - smoothing) * nll + smoothing * (lse - logits.mean(dim=-1))
                total += nll.sum()
                # d(sum of losses)/d(logits) = softmax - target, written over the logits
                dlogits = logits.sub_(lse[:, None]).exp_()
                if smoothing:
                    dlogits.sub_(smoothing / logits.shape[1])
                dlogits.scatter_add_(1, yc[:, None], torch.full_like(lse[:, None], -(1.0 - smoothing)))
                dlogits = dlogits.to(cdtype)
                if grad_h is not None:
                    if grad_h.dtype == cdtype:
                        torch.matmul(dlogits, w, out=grad_h[s:s + chunk])
                    else:
                        grad_h[s:s + chunk] = dlogits @ w
                if grad_w is not None:
                    if cdtype == torch.float32:
                        grad_w.addmm_(dlogits.t(), hc)
                    else:  # the matmul in the compute dtype, the sum over chunks in fp32
                        grad_w.add_(dlogits.t() @ hc)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has_grad = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = iter(ctx.saved_tensors)
        grad_h = next(saved) * grad_out if ctx.has_grad[0] else None  # keeps h's dtype (0-d fp32 factor)
        grad_w = (next(saved) * grad_out).to(ctx.weight_dtype) if ctx.has_grad[1] else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk: Optional[int] = None,
                         smoothing: float = 0.0) -> Tensor:
    """Sum over tokens of ``cross_entropy(h @ weight.T, labels, label_smoothing=smoothing)``
    in fp32, for ``h [N, D]``, ``weight [V, D]``, ``labels [N]`` (all valid), never holding
    more than one chunk's fp32 logits."""
    chunk = chunk or _chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, chunk, float(smoothing))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk):
        logits = (h[s:s + chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, labels[s:s + chunk], reduction="sum", label_smoothing=smoothing)
    return total


def sampled_softmax_loss(h: Tensor, target_emb: Tensor, cand_emb: Tensor, excluded: Tensor,
                         target_logq: Optional[Tensor] = None, cand_logq: Optional[Tensor] = None,
                         smoothing: float = 0.0) -> Tensor:
    """Sum over positions of the sampled-softmax cross-entropy: position ``i`` (``h [L, D]``) scores its
    target (``target_emb [L, D]``) against ``K`` shared candidates (``cand_emb [K, D]``), each logit
    minus the log of how often the sampler puts that item among the candidates (``*_logq``: the logQ
    correction, which makes the sampled softmax an estimate of the full one; None = no correction).
    ``excluded [L, K]`` (bool): candidates position ``i`` must not score against -- the target itself
    (an accidental hit) or an item of the user's own history.  ``smoothing`` spreads eps over the
    target and the candidates left in."""
    pos = (h * target_emb.to(h.dtype)).sum(-1).float()
    neg = (h @ cand_emb.to(h.dtype).t()).float()
    if target_logq is not None:
        pos = pos - target_logq.float()
    if cand_logq is not None:
        neg = neg - cand_logq.float()[None, :]
    logits = torch.cat([pos[:, None], neg.masked_fill(excluded, float("-inf"))], dim=1)
    logp = torch.log_softmax(logits, dim=1)
    nll = -logp[:, 0]
    if smoothing:
        kept = torch.cat([torch.ones_like(excluded[:, :1]), ~excluded], dim=1)
        uniform = -(logp.masked_fill(~kept, 0.0).sum(1) / kept.sum(1))
        nll = (1.0 - smoothing) * nll + smoothing * uniform
    return nll.sum()
