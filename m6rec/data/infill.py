"""The M6 text-infilling objective, as a transform of packed rows (``train.infill_rate``)."""
from __future__ import annotations

import numpy as np
import torch


def infill_documents(batch: dict, rate: float, rng: np.random.Generator, special: dict[str, int]) -> int:
    """Rewrite a share ``rate`` of the batch's documents for text infilling, in place.

    In a chosen document one target item ``B`` (``<|item|>`` + its text, no
    image slot) is cut out and asked for at the end::

        A  B  C <|eos|>   →   A <|item|> C <|predict|> B[1:]

    The empty ``<|item|>`` marks the hole; everything before the new
    ``<|predict|>`` is the bidirectional context (prefix) and the loss is on
    the item's text only.  The length is unchanged (the ``<|eos|>`` makes
    room for ``<|predict|>``), so packing, positions and the other documents
    of the row stay as they are; image slots in ``C`` move with it.  Documents
    without a target item or cut by truncation (no final ``<|eos|>``) stay
    next-item documents.  Returns the number of documents rewritten.
    """
    if rate <= 0:
        return 0
    item, predict, eos, image = (special[k] for k in ("<|item|>", "<|predict|>", "<|eos|>", "<|image|>"))
    ids, labels, prefix = batch["input_ids"], batch["labels"], batch["prefix_mask"]
    doc = batch["document_ids"].numpy()
    img = batch["image_positions"]
    done = 0
    for b in range(ids.shape[0]):
        bounds = np.flatnonzero(np.diff(doc[b], prepend=-2, append=-2)) # document starts, and the end
        for s, e in zip(bounds[:-1], bounds[1:]):
            if doc[b, s] < 0 or rng.random() >= rate:
                continue
            t = ids[b, s:e].numpy()
            starts = np.flatnonzero((t == item) & ~prefix[b, s:e].numpy())
            if t[-1] != eos or len(starts) == 0:
                continue
            ends = np.append(starts[1:], len(t) - 1)
            ok = [(i, j) for i, j in zip(starts, ends) if j - i >= 2 and not (t[i:j] == image).any()]
            if not ok:
                continue
            i, j = ok[rng.integers(len(ok))]
            k = j - i
            new = np.concatenate([t[:i], [item], t[j:-1], [predict], t[i + 1:j]])
            ids[b, s:e] = torch.from_numpy(new)
            cut = e - k  # absolute position of the new <|predict|>
            prefix[b, s:cut] = True
            prefix[b, cut:e] = False
            labels[b, s:e] = -100
            labels[b, cut:e - 1] = ids[b, cut + 1:e]
            moved = (img[:, 0] == b) & (img[:, 1] >= s + j) & (img[:, 1] < e)
            img[moved, 1] -= k - 1
            done += 1
    return done

