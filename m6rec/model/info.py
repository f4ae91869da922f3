"""Parameters and FLOPs per token of a model's arguments (``m6rec model-info`` prints them,
with the ZeRO memory table of m6rec/train/zero_memory.py).

Parameters are counted on a model built on the meta device (nothing is
allocated, so the 7b preset is instant) and checked against the closed-form
count below.

FLOPs per trained token (forward + backward)::

    6 * N  +  12 * L * H * Q * T

* ``N`` = the parameters a token's matmuls touch: the non-embedding
  parameters (blocks + final norm) plus the LM head ``V * D`` (a matmul even
  when tied to the embedding).  The embedding lookup and the patch
  embedding (run on image slots only) are not counted.
* ``12 * L * H * Q * T``: attention scores and the weighted sum, forward and
  backward, over the full ``T x T`` square (PaLM appendix B, nanoGPT,
  torchtitan).  The causal kernels skip about half of it; Megatron counts
  ``6 * L * H * Q * T`` for that reason.  MFU figures use the full form
  unless they say otherwise.

"""
from __future__ import annotations

from m6rec.model.args import ModelArgs


def count_params(args: ModelArgs) -> dict[str, int]:
    """Closed-form parameter counts (tied weights counted once)."""
    D, Q = args.dim, args.head_dim
    attn = D * (args.n_heads + 2 * args.kv_heads) * Q + args.n_heads * Q * D
    mlp = 3 * D * args.ffn_dim
    layer = attn + mlp + 2 * D
    blocks = args.n_layers * layer + D  # + final norm
    embedding = args.vocab_size * D
    head = 0 if args.tie_embeddings else args.vocab_size * D
    patch = args.patch_dim * D + 2 * args.grid * D
    return dict(total=blocks + embedding + head + patch, non_embedding=blocks, embedding=embedding,
                lm_head=head, patch_embed=patch, per_layer=layer)


def flops_per_token(args: ModelArgs, seq_len: int | None = None) -> dict[str, float]:
    T = seq_len or args.max_seq_len
    c = count_params(args)
    n_flops = c["non_embedding"] + args.vocab_size * args.dim
    dense = 6 * n_flops
    attn = 12 * args.n_layers * args.n_heads * args.head_dim * T
    return dict(seq_len=T, n_matmul_params=n_flops, dense=dense, attention=attn, total=dense + attn,
                total_causal_halved=dense + attn / 2)
