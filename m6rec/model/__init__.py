"""The m6rec model: a Llama-style decoder with fused attention masks and image patches.

See ``m6rec/model/README.md`` for the design, the masks, the FLOPs formula
and the Hugging Face export layout.  :func:`build_model` is the one way in.
"""
from __future__ import annotations

import torch

from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.hf import load_hf_weights
from m6rec.model.masks import AttentionMask, build_attention_mask
from m6rec.model.transformer import M6Transformer, ModelOutput, apply_compile

__all__ = ["ModelArgs", "Batch", "M6Transformer", "ModelOutput", "AttentionMask", "build_attention_mask",
           "build_model", "apply_compile"]


def build_model(cfg, *, device: str | torch.device = "cpu", meta: bool = False, **overrides) -> M6Transformer:
    """Build the model of a config (``Config``, ``ModelConfig`` or ``ModelArgs``).

    ``meta=True`` allocates nothing (for counting, or for ``to_empty`` +
    ``init_weights`` / loading later).  ``init_from: hf:DIR`` loads a Llama
    directory's weights; ``compile: true`` compiles each block.
    """
    args = cfg if isinstance(cfg, ModelArgs) else ModelArgs.from_config(cfg, **overrides)
    with torch.device("meta" if meta else device):
        model = M6Transformer(args)
    if meta:
        return model
    if args.init_from and not args.init_from.startswith("run:"):  # run:RUN_DIR is the trainer's (train/trainer.py)
        if not args.init_from.startswith("hf:"):
            raise ValueError(f"model.init_from: 'hf:DIR' or 'run:RUN_DIR' expected, got {args.init_from!r}")
        load_hf_weights(model, args.init_from[3:])
    if args.compile:
        apply_compile(model)
    return model
