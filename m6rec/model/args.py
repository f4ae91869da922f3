"""The model's own view of its configuration.

:class:`ModelArgs` holds every number the model needs: the fields of
``m6rec.config.ModelConfig`` (``cfg.model``), inherited so that they are
declared once, plus the image geometry that lives under ``cfg.data.images``.
It is built by :meth:`ModelArgs.from_config` or directly, and the model code
never reads YAML: loading and checking config files stays in m6rec.config.
Checkpoints store :meth:`ModelArgs.to_dict`; :meth:`ModelArgs.from_dict`
drops keys it does not know and defaults the ones a dict lacks, so older
dicts still load.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from m6rec.config import ModelConfig


@dataclass
class ModelArgs(ModelConfig):
    # --- image geometry (from cfg.data.images) ------------------------------
    image_size: int = 64
    patch_size: int = 16
    image_channels: int = 3

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim dim/n_heads ({self.head_dim}) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.kv_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.attention not in ("causal", "prefix"):
            raise ValueError(f"model.attention must be 'causal' or 'prefix', got {self.attention!r}")
        if self.attn_impl not in ("auto", "sdpa", "flex", "varlen"):
            raise ValueError(f"attn_impl must be 'auto', 'sdpa', 'flex' or 'varlen', got {self.attn_impl!r}")

    # --- derived sizes ------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        m = self.ffn_multiple_of
        return m * math.ceil(hidden / m)

    @property
    def grid(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """P: image slot tokens per image."""
        return self.grid**2

    @property
    def patch_dim(self) -> int:
        return self.image_channels * self.patch_size**2

    # --- construction -------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> "ModelArgs":
        """Build from a full ``Config`` (model + data.images), a bare ``ModelConfig`` or
        another ``ModelArgs``; ``overrides`` win."""
        model_cfg = getattr(cfg, "model", cfg)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if hasattr(model_cfg, f.name):
                kwargs[f.name] = getattr(model_cfg, f.name)
        images = getattr(getattr(cfg, "data", None), "images", None)
        if images is not None:
            kwargs.setdefault("image_size", images.size)
            kwargs.setdefault("patch_size", images.patch_size)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
