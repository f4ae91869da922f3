"""Byte-level BPE (HF ``tokenizers``) and segment-wise encoding with region masks."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from m6rec.config import ConfigError
from m6rec.data.text import (
    IMAGE,
    MASK_CONTEXT,
    MASK_IMAGE,
    MASK_LOSS,
    MASK_VECTOR,
    SPECIAL_TOKENS,
    Segment,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, extra_special: list[str]) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; special tokens get the first ids, item tokens the last."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if extra_special:
        tok.add_special_tokens(extra_special)
    return tok


def load_tokenizer(path: str | Path, cfg_key: str = "data.tokenizer.path") -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config key '{cfg_key}': tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise ConfigError(f"{path}: not a valid tokenizer.json: {e}") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        # A foreign tokenizer gains m6rec's markers at the end of its vocabulary.
        tok.add_special_tokens(missing)
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: equal for equal vocabularies and merges."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)


class SegmentEncoder:
    """Encodes segments to (ids, mask) with caches: titles and phrases repeat a lot."""

    def __init__(self, tok: Tokenizer, image_patches: int):
        self.tok = tok
        self.image_patches = image_patches
        self.image_id = tok.token_to_id(IMAGE)
        self._cache: dict[str, list[int]] = {}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.dtype = np.uint16 if self.vocab_size <= 65535 else np.int32

    def _ids(self, seg: Segment) -> list[int]:
        if seg.special:
            if seg.text == IMAGE:
                return [self.image_id] * self.image_patches
            tid = self.tok.token_to_id(seg.text)
            if tid is None:
                raise ConfigError(f"tokenizer has no token {seg.text!r}; was it trained with this item_repr?")
            return [tid]
        ids = self._cache.get(seg.text)
        if ids is None:
            ids = self.tok.encode(seg.text, add_special_tokens=False).ids
            if len(self._cache) < 2_000_000:
                self._cache[seg.text] = ids
        return ids

    def prime(self, texts: list[str]) -> None:
        """Encode many distinct texts in one parallel call (Rust threads)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for t, enc in zip(todo, self.tok.encode_batch(todo, add_special_tokens=False)):
            self._cache[t] = enc.ids

    def encode(self, segs: list[Segment]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        mask: list[int] = []
        for s in segs:
            part = self._ids(s)
            bits = MASK_LOSS if s.target else MASK_CONTEXT
            if s.image_item is not None:
                # Image slots carry no loss: nothing sensible predicts a patch placeholder.
                bits = (0 if s.target else MASK_CONTEXT) | MASK_IMAGE
            elif s.vector_item is not None:
                # a vector slot keeps its loss bit: the token before it is trained to score the catalog
                bits |= MASK_VECTOR
            ids.extend(part)
            mask.extend([bits] * len(part))
        return np.asarray(ids, dtype=self.dtype), np.asarray(mask, dtype=np.uint8)
