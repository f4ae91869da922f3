"""The batch layout through the model: one typed record instead of ten keyword tensors.

What each field holds is the batch contract of docs/architecture.md: ``[B, T]`` tensors of
packed rows (``labels`` already shifted, ``position_ids`` restarting per document,
``document_ids`` -1 on padding, ``prefix_mask`` the bidirectional context region), the images
of the batch and where their slots start, and the item text-vector slots with their catalog
rows.  The loaders and the prompt collators produce plain dicts (what DataLoader workers
pickle and pin); :meth:`Batch.of` takes the model's part of one.

The trainer adds the rest from the loader's host copy before the batch goes to the device
(m6rec/train/step.py ``prepare_inputs``): the mask every layer applies, built once, and the flat
positions of the labels, so that the loss reads nothing back from the device (the model computes
them itself when they are absent); with the sampled item loss, the step's candidate items.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from m6rec.model.masks import AttentionMask

#: keys of loader and collator dicts that are not the model's: the samples of each row (logs, traces),
#: the stream's padding flag and counters, a prompt collator's prompt lengths
NOT_THE_MODELS = frozenset({"sample_keys", "is_padding", "stream_stats", "lengths"})


@dataclasses.dataclass
class Batch:
    input_ids: Tensor
    labels: Optional[Tensor] = None
    position_ids: Optional[Tensor] = None
    document_ids: Optional[Tensor] = None
    prefix_mask: Optional[Tensor] = None
    image_patches: Optional[Tensor] = None
    image_positions: Optional[Tensor] = None
    item_positions: Optional[Tensor] = None
    item_catalog_rows: Optional[Tensor] = None
    # added by the trainer (or found by the model when absent)
    attention_mask: Optional[AttentionMask] = None
    label_index: Optional[Tensor] = None
    item_label_index: Optional[Tensor] = None
    item_targets: Optional[Tensor] = None
    # the sampled item loss (train.item_loss sampled; m6rec/data/negatives.py): the step's shared candidate
    # items (item-token ids, or catalog rows in the vector modes), the log of each one's expected count
    # among the candidates and of each item label's target's (the logQ correction), and which
    # candidates are in each item label's own history (masked; absent = none masked)
    item_candidates: Optional[Tensor] = None
    item_candidate_logq: Optional[Tensor] = None
    item_target_logq: Optional[Tensor] = None
    item_history_hits: Optional[Tensor] = None

    @classmethod
    def of(cls, d: Mapping[str, Any], **fields) -> "Batch":
        """The model's fields of a loader or collator dict, with ``fields`` set over them.  The keys
        the data layer adds for others (:data:`NOT_THE_MODELS`) are left out; any other key is an
        error, so that a misspelled field is not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - NOT_THE_MODELS
        if unknown:
            raise KeyError(f"Batch.of: {sorted(unknown)} are not fields of the batch contract ({sorted(names)})")
        return cls(**{**{k: v for k, v in d.items() if k in names}, **fields})

    def replace(self, **fields) -> "Batch":
        return dataclasses.replace(self, **fields)

    def tensors(self) -> dict[str, Tensor]:
        """The fields that hold a tensor (not the attention mask), by name."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The tensors on ``device``; a CUDA copy goes from pinned memory without blocking."""
        device = torch.device(device)
        if device.type == "cuda" and non_blocking:
            moved = {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True)
                     for k, v in self.tensors().items()}
        else:
            moved = {k: v.to(device) for k, v in self.tensors().items()}
        return self.replace(**moved)
