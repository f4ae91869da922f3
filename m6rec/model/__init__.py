"""The m6rec model: a Llama-style decoder with fused attention masks and image patches.

See ``m6rec/model/README.md`` for the design, the masks, the FLOPs formula
and the Hugging Face export layout.
"""
from m6rec.model.args import ModelArgs
from m6rec.model.masks import AttentionMask, build_attention_mask
from m6rec.model.transformer import M6Transformer, ModelOutput, apply_compile, build_model

__all__ = ["ModelArgs", "M6Transformer", "ModelOutput", "AttentionMask", "build_attention_mask",
           "build_model", "apply_compile"]
