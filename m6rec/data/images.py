"""Item images: as prepare stores them (decoded once, resized to ``data.images.size``, JPEG
bytes), and as the model reads them (pixels in patches: the layout of the batch contract).

``m6rec prepare`` writes these bytes into the shards; the prompt builder
(:mod:`m6rec.data.prompts`) loads a poster the same way, so a served prompt
reads the pixels training read.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pandas as pd
from PIL import Image


def load_images(items: pd.DataFrame, size: int) -> tuple[dict[str, bytes], list[str]]:
    """Decode and resize each item image once (``items``: ``item_id`` and ``image`` path columns);
    stored at ``size`` so shards stay small.  Returns ``(item_id -> JPEG bytes, failure messages)``;
    each failure is also warned."""
    out: dict[str, bytes] = {}
    failed: list[str] = []
    for iid, path in zip(items["item_id"], items["image"]):
        if not isinstance(path, str) or not path:  # None or NaN: the item has no image
            continue
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
                out[iid] = buf.getvalue()
        except Exception as e:  # PIL raises many types for bad files
            failed.append(f"{path}: cannot decode image ({type(e).__name__}: {e}); item {iid} has no image")
    for msg in failed:
        warnings.warn(msg)
    return out, failed


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Stored image bytes -> uint8 ``[size, size, 3]`` RGB, resized as the model reads it."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, P, 3*patch*patch]`` in [0, 1]: the one patch layout of the
    batch contract (patches in row-major order, each patch's pixels row-major with the channels last)."""
    n, g = len(images), images.shape[1] // patch
    arr = images.reshape(n, g, patch, g, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    return arr.reshape(n, g * g, patch * patch * 3).astype(np.float32) / 255.0


def image_patches(data: bytes, size: int, patch: int) -> np.ndarray:
    """One stored image as the model reads it, ``[P, 3*patch*patch]`` (prompts and the item encoder;
    the stream patchifies a whole batch at once)."""
    return patchify(decode_image(data, size)[None], patch)[0]
