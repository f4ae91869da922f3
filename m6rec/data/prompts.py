"""Prompts: a user (or an item) written exactly as training wrote it, and batches of prompts.

:class:`ContextBuilder` renders a dataset's users -- their saved timelines,
free-text histories, or a single item -- with the run's text templates
(:mod:`m6rec.data.text`) and tokenizer: the profile, the last
``data.max_items - 1`` items with their ratings, tags and relative times (and
posters), then ``<|predict|><|item|>``.  :func:`collate` pads prompts into the
model's batch contract, :func:`batches_by_length` groups them by length.
Used by the recommenders (:mod:`m6rec.rec`), fine-tuning and the ``run:``
item encoder (:mod:`m6rec.data.vectors`).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from m6rec.config import Config, ConfigError, DataConfig, _build
from m6rec.data import semantic_ids
from m6rec.data import text as T
from m6rec.data.images import image_patches, load_images
from m6rec.data.sources import load_source
from m6rec.data.tokenizer import SegmentEncoder


@dataclass
class Prompt:
    ids: np.ndarray  # int64 token ids, ending with <|predict|><|item|>
    prefix: np.ndarray  # bool, the context region (through <|predict|>)
    image_items: list  # item of each image slot, in order
    image_starts: list  # first slot token of each
    exclude: set  # catalog items never to recommend (the user's history)
    user_id: str = ""
    context_items: list = field(default_factory=list)  # the items written in the prompt
    vector_items: list = field(default_factory=list)  # item of each text-vector slot (item_repr vector*)
    vector_starts: list = field(default_factory=list)  # its token position
    # free-text items not in the catalog (item_repr vector): their text vectors, encoded on the fly
    new_vectors: dict = field(default_factory=dict)


_TARGET = "\x00target"  # placeholder row for the item to predict (cut off before it is written)


class ContextBuilder:
    """Renders users, histories and free-text histories as M6-Rec prompts.

    Item texts come from the dataset's ``items.parquet`` (rendered by
    ``m6rec prepare``).  User profiles, the users' own tags and the item
    posters are not saved there, so they are rebuilt from the raw source
    (``load_source(cfg.data)``, as prepare does) when the text templates use
    them; the rebuilt item texts are checked against ``items.parquet``.
    """

    def __init__(self, cfg: Config, dataset_dir: str | Path, tokenizer, *, load_source: Optional[bool] = None):
        self.cfg = cfg
        self.text_cfg = cfg.data.text
        self.dataset_dir = Path(dataset_dir)
        manifest = json.loads((self.dataset_dir / "manifest.json").read_text())
        t = self.text_cfg
        if manifest.get("format", 1) < 2 and t.item_repr == "token" and (
                t.rating_template or t.tags_template or t.time_unit == "day"):
            warnings.warn(f"{self.dataset_dir} was prepared before item_repr 'token' wrote rating/tag/time phrases "
                          "(manifest format 1): prompts will carry phrases the model never trained on; prepare the "
                          "data again, or empty data.text.rating_template/tags_template and set time_unit none")
        self.image_size = manifest["image"]["size"]
        self.patch_size = manifest["image"]["patch_size"]
        self.P = manifest["image"]["patches"]
        self.items = pd.read_parquet(self.dataset_dir / "items.parquet")
        if (manifest.get("format", 1) < 3 and t.item_repr in T.VECTOR_MODES and t.images
                and self.items["has_image"].any()):
            warnings.warn(f"{self.dataset_dir} was prepared before posters moved into the item vectors (manifest "
                          "format < 3): its shards hold image slots, which prompts no longer write; prepare the data "
                          "again (and retrain) for prompts that match the training text")
        self.catalog_ids = self.items["item_id"].tolist()
        self.item_index = {i: n for n, i in enumerate(self.catalog_ids)}
        self.titles = dict(zip(self.items["item_id"], self.items["title"]))
        self.splits = splits = pd.read_parquet(self.dataset_dir / "splits.parquet").sort_values(["user_id", "position"])
        self._timeline = {u: (g["item_id"].to_numpy(), g["timestamp"].to_numpy(), g["rating"].to_numpy(np.float64))
                          for u, g in splits.groupby("user_id", sort=False)}
        self.catalog = T.Catalog(dict(zip(self.items["item_id"], self.items["text"])), {}, {}, {})
        self.semantic_ids = None
        if t.item_repr == "semantic_id":
            self.semantic_ids = semantic_ids.load(self.dataset_dir)
            self.catalog.item_codes = self.semantic_ids.tokens()
        self.tokenizer = tokenizer
        self.enc = SegmentEncoder(tokenizer, self.P)
        self._pixels: dict[str, np.ndarray] = {}
        self._image_paths: dict[str, str] = {}
        # in the vector modes a poster is part of the item's cached vector, never a slot in the prompt
        need_images = bool(self.text_cfg.images and self.text_cfg.item_repr not in T.VECTOR_MODES
                           and self.items["has_image"].any())
        need_profiles = bool(self.text_cfg.profile_template)
        need_tags = bool(self.text_cfg.tags_template) and cfg.data.source == "ml-latest"
        if load_source is None:
            load_source = need_images or need_profiles or need_tags
        self.source_loaded = False
        if load_source:
            try:
                self._from_source(need_images)
            except (ConfigError, OSError) as e:
                warnings.warn(f"cannot rebuild user profiles, tags and posters from the raw source ({e}); prompts "
                              "will lack them, unlike the training text")

    def _from_source(self, need_images: bool) -> None:
        raw = load_source(self.cfg.data)
        rebuilt = T.build_catalog(raw.items, raw.users, raw.tags, self.text_cfg)
        differ = [i for i, t in self.catalog.item_text.items() if rebuilt.item_text.get(i) != t]
        if differ:
            warnings.warn(f"{len(differ)} item texts rebuilt from {self.cfg.data.root} differ from "
                          f"{self.dataset_dir / 'items.parquet'} (e.g. {differ[0]!r}); the source changed since "
                          f"`m6rec prepare`: profiles, tags and posters may not match training")
        self.catalog.profiles = rebuilt.profiles
        self.catalog.tags = rebuilt.tags
        if need_images:
            has = set(self.items.loc[self.items["has_image"], "item_id"])
            self._image_paths = {i: p for i, p in zip(raw.items["item_id"], raw.items["image"])
                                 if i in has and isinstance(p, str) and p}
            # window_segments puts a slot before every item listed here, as prepare did
            self.catalog.item_image = dict(self._image_paths)
        self.source_loaded = True

    # -- pixels, exactly as prepare stored them and the stream decodes them --
    def pixels(self, item_id: str) -> np.ndarray:
        """``[P, 3*p*p]`` float32 in [0, 1] (patch order as in the stream)."""
        if item_id not in self._pixels:
            sub = pd.DataFrame({"item_id": [item_id], "image": [self._image_paths[item_id]]})
            data, _ = load_images(sub, self.image_size)
            self._pixels[item_id] = image_patches(data[item_id], self.image_size, self.patch_size)
        return self._pixels[item_id]

    # -- rendering -----------------------------------------------------------
    def _render(self, user_id: str, items: np.ndarray, ts: np.ndarray, ratings: np.ndarray, catalog: T.Catalog,
                exclude: set, new_vectors: Optional[dict] = None) -> Prompt:
        """The last max_items-1 of ``items`` as context, then <|predict|><|item|>."""
        n = len(items)
        start = max(0, n + 1 - self.cfg.data.max_items)
        all_items = np.append(np.asarray(items, dtype=object), _TARGET)
        all_ts = np.append(np.asarray(ts, dtype=np.int64), int(ts[-1]) if n else 0)
        all_r = np.append(np.asarray(ratings, dtype=np.float64), np.nan)
        w = T.Window(user_id, "test", 0, np.arange(start, n + 1), n - start)
        segs = T.window_segments(w, all_items, all_ts, all_r, catalog, self.text_cfg)
        cut = next(i for i, s in enumerate(segs) if s.special and s.text == T.PREDICT)
        assert segs[cut + 1].text == T.ITEM
        segs = segs[:cut + 2]
        ids, mask = self.enc.encode(segs)
        starts = np.flatnonzero(mask & T.MASK_IMAGE)[:: self.P].tolist() if self.P else []
        imgs = [s.image_item for s in segs if s.image_item is not None]
        assert len(starts) == len(imgs)
        vecs = [s.vector_item for s in segs if s.vector_item is not None]
        new_vectors = new_vectors or {}
        unknown = [i for i in vecs if i not in self.item_index and i not in new_vectors]
        if unknown:
            raise ConfigError(f"items as text vectors: {unknown[0]!r} is not an item of {self.dataset_dir}")
        return Prompt(ids.astype(np.int64), (mask & T.MASK_CONTEXT) != 0, imgs, starts, exclude, user_id,
                      [str(i) for i in items[start:]], vecs, np.flatnonzero(mask & T.MASK_VECTOR).tolist(),
                      {i: v for i, v in new_vectors.items() if i in vecs})

    def _item_segments(self, item_id: str) -> list:
        """``item_id`` as a one-item window: ``<|bos|><|context|><|predict|><|item|>``, its item
        token, poster slot and text as training writes them, ``<|eos|>`` (no rating, no time)."""
        w = T.Window("", "test", 0, np.array([0]), 0)
        return T.window_segments(w, np.array([item_id], dtype=object), np.zeros(1, dtype=np.int64),
                                 np.full(1, np.nan), self.catalog, self.text_cfg)

    def for_item(self, item_id: str) -> Prompt:
        """An item on its own (:meth:`_item_segments`), all of it context: the item tower's input
        (:mod:`m6rec.rec.finetune`)."""
        segs = self._item_segments(item_id)
        ids, mask = self.enc.encode(segs)
        starts = np.flatnonzero(mask & T.MASK_IMAGE)[:: self.P].tolist() if self.P else []
        imgs = [s.image_item for s in segs if s.image_item is not None]
        return Prompt(ids.astype(np.int64), np.ones(len(ids), dtype=bool), imgs, starts, set(), "", [item_id])

    def append_item(self, prompt: Prompt, item_id: str, suffix: str = "") -> Prompt:
        """``prompt`` (ending in ``<|item|>``) followed by ``item_id`` as training writes it
        (item token, poster slot, text) and ``suffix``: the ranking task's input."""
        segs = self._item_segments(item_id)
        at = next(i for i, s in enumerate(segs) if s.special and s.text == T.ITEM)
        segs = segs[at + 1:-1] + ([T.Segment(suffix, False)] if suffix else [])
        ids, mask = self.enc.encode(segs)
        off = len(prompt.ids)
        starts = [off + int(x) for x in (np.flatnonzero(mask & T.MASK_IMAGE)[:: self.P] if self.P else [])]
        imgs = [s.image_item for s in segs if s.image_item is not None]
        return Prompt(np.concatenate([prompt.ids, ids.astype(np.int64)]),
                      np.concatenate([prompt.prefix, np.zeros(len(ids), dtype=bool)]),
                      prompt.image_items + imgs, prompt.image_starts + starts, prompt.exclude, prompt.user_id,
                      prompt.context_items)

    def timeline(self, user_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if user_id not in self._timeline:
            raise KeyError(f"unknown user {user_id!r} (not in {self.dataset_dir / 'splits.parquet'})")
        return self._timeline[user_id]

    def for_query(self, q) -> Prompt:
        """The evaluation prompt of ``q`` (a :class:`m6rec.rec.evaluate.Query`: ``user_id``, ``history``):
        the history before the target (ratings, times from splits.parquet)."""
        items, ts, r = self.timeline(q.user_id)
        n = len(q.history)
        if list(items[:n]) != list(q.history):
            raise ValueError(f"query of user {q.user_id}: history is not the start of the saved timeline")
        return self._render(q.user_id, items[:n], ts[:n], r[:n], self.catalog, set(q.history))

    def for_user(self, user_id: str) -> Prompt:
        """Serving: everything the user did (all splits), all of it excluded."""
        items, ts, r = self.timeline(user_id)
        return self._render(user_id, items, ts, r, self.catalog, set(items.tolist()))

    def match_titles(self, titles: Sequence[str]) -> list[tuple[str, Optional[str]]]:
        """``(title, item_id or None)``: exact title, then case-insensitive title (first in catalog order)."""
        exact, lower = {}, {}
        for iid, t in zip(self.items["item_id"], self.items["title"]):
            exact.setdefault(t.strip(), iid)
            lower.setdefault(t.strip().casefold(), iid)
        out = []
        for t in titles:
            t = t.strip()
            out.append((t, exact.get(t) or lower.get(t.casefold())))
        return out

    def for_titles(self, titles: Sequence[str] | str, encode: Optional[Callable] = None
                   ) -> tuple[Prompt, list[tuple[str, Optional[str]]]]:
        """A user the model never saw, from a free-text history ("Toy Story (1995); Heat (1995)").

        Known titles become their catalog items (with genres and posters as in
        training).  An unknown one is a new item written from its text: as plain
        text (item_repr text), as its text vector encoded now by ``encode``
        (texts -> vectors: the run's item encoder, :func:`m6rec.data.vectors.text_encoder`;
        item_repr vector), or as the codes of that vector under the dataset's
        semantic-ID centroids (semantic_id from text).  Item tokens have no
        way to write it: an error naming the title.  No ratings, times
        "same day", no profile."""
        if isinstance(titles, str):
            titles = [t for t in titles.split(";") if t.strip()]
        matched = self.match_titles(titles)
        cat = T.Catalog(dict(self.catalog.item_text), self.catalog.item_image, {}, {},
                        dict(self.catalog.item_codes))
        ids, new = [], {}
        for n, (t, iid) in enumerate(matched):
            if iid is None:
                iid = f"\x00text{n}"
                cat.item_text[iid] = t
                new[iid] = t
            ids.append(iid)
        new_vectors = self._new_items(new, cat, encode)
        items = np.array(ids, dtype=object)
        prompt = self._render("", items, np.zeros(len(items), dtype=np.int64), np.full(len(items), np.nan), cat,
                              {i for _, i in matched if i is not None}, new_vectors)
        return prompt, matched

    def _new_items(self, new: dict, cat: T.Catalog, encode: Optional[Callable]) -> dict:
        """Free-text items (placeholder id -> title) in the run's item representation: their text vectors
        (returned, item_repr vector) or their codes (written into ``cat``, semantic_id)."""
        repr_ = self.text_cfg.item_repr
        if not new or repr_ in ("text", "both"):
            return {}
        first = next(iter(new.values()))
        source = self.semantic_ids.report.get("source", "") if self.semantic_ids is not None else ""
        if repr_ in ("token", "vector_token") or (repr_ == "semantic_id" and "run:" in source):
            why = ("its items are item tokens, ids of its own catalog" if repr_ != "semantic_id" else
                   f"its semantic IDs come from {source}, which holds no vector for new text")
            raise ConfigError(f"--history: {first!r} is not an item of {self.dataset_dir}, and this run cannot write "
                              f"an item from its text ({why}); name items of the catalog")
        if encode is None:
            raise ConfigError(f"--history: {first!r} is not an item of {self.dataset_dir}; a new item is written "
                              "from its text by the run's item encoder, and none was given")
        vecs = encode(list(new.values()))
        if repr_ in T.VECTOR_MODES:
            return dict(zip(new, vecs))
        ids = self.semantic_ids
        levels, k = ids.codes.shape[1] - 1, ids.report["codebook_size"]
        taken: dict = {}  # the final codes the catalog's items use under each prefix
        for row in ids.codes:
            taken.setdefault(tuple(row[:levels]), set()).add(int(row[levels]))
        for iid, row in zip(new, semantic_ids.quantize(vecs, ids.centroids)):
            # the final code: the residual level's nearest centroid (collisions "residual"), else the next
            # number, whichever no catalog item with the same codes holds
            used = taken.get(tuple(row[:levels]), set())
            final = int(row[levels]) if len(row) > levels and int(row[levels]) not in used else \
                min(set(range(k)) - used, default=k - 1)
            cat.item_codes[iid] = [T.code_token(level, int(c)) for level, c in enumerate([*row[:levels], final])]
        return {}


def contexts_for(run_cfg: Config, tokenizer, run_dataset_dir: str | Path, dataset: Optional[str] = None) -> ContextBuilder:
    """The prompt builder of a run, on its own dataset or (``dataset``) another one.

    Another dataset is zero-shot: its users and items reach the model only as
    text, written with the model's templates, history length and tokenizer; the
    dataset must have been prepared with that tokenizer (data.tokenizer.path)."""
    target = Path(dataset or run_dataset_dir)
    if not (target / "manifest.json").is_file():
        raise ConfigError(f"--dataset {target}: no prepared dataset (manifest.json missing)")
    cfg = run_cfg
    if dataset and target.resolve() != Path(run_dataset_dir).resolve():
        mine = json.loads((Path(run_dataset_dir) / "manifest.json").read_text())
        theirs = json.loads((target / "manifest.json").read_text())
        repr_ = run_cfg.data.text.item_repr
        if repr_ == "vector_token":
            raise ConfigError(f"--dataset {target}: this run's items are item tokens + text vectors "
                              "(item_repr vector_token); item tokens are ids of its own catalog, so it cannot rank "
                              "another one. Zero-shot needs item_repr vector (or text)")
        if repr_ != "vector" and mine.get("tokenizer_sha256") != theirs.get("tokenizer_sha256"):
            raise ConfigError(f"--dataset {target}: prepared with another tokenizer than the model's "
                              f"({Path(run_dataset_dir) / 'tokenizer.json'}); prepare it with "
                              f"--data.tokenizer.path {Path(run_dataset_dir) / 'tokenizer.json'}")
        data_cfg = _build(DataConfig, theirs["config"], "data")
        if repr_ != "vector" and data_cfg.text.item_repr != "text":
            raise ConfigError(f"--dataset {target}: zero-shot needs items written as text "
                              f"(data.text.item_repr text), it has {data_cfg.text.item_repr!r}")
        # the target's source and split, the model's prompt shape (templates, history length).  Items as
        # text vectors need only the target's items.parquet and splits.parquet: its items are encoded by
        # the run's encoder (cached beside it) and its users written with the run's own tokenizer.
        cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(
            data_cfg, text=run_cfg.data.text, max_items=run_cfg.data.max_items))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*cannot decode image.*")  # prepare reported them already
        return ContextBuilder(cfg, target, tokenizer)


def batches_by_length(prompts: Sequence[Prompt], batch_size: int) -> list[tuple[np.ndarray, list[Prompt]]]:
    """``(indices, prompts)`` batches of at most ``batch_size`` prompts of similar length (sorted by
    length, stable), so a right-padded batch wastes little on padding.  Callers write each batch's
    results at its ``indices``, which puts them back in the order of ``prompts``."""
    order = np.argsort([len(p.ids) for p in prompts], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [(idx, [prompts[i] for i in idx]) for idx in batches]


SHAPE_MULTIPLE = 128  # FlexAttention's block size: padded lengths on CUDA are multiples of it


def collate(prompts: Sequence[Prompt], ctx: ContextBuilder, pad_id: int, device, rows: int = 0,
            multiple: int = 1) -> dict:
    """Right-padded batch in the batch contract (one document per row, padding document -1).

    ``rows``/``multiple``: pad to at least ``rows`` rows (all padding, document -1) and to a length that
    is a multiple of ``multiple``.  On CUDA the attention mask and kernel are compiled for each batch
    shape; length-sorted ranking batches have a new length almost every batch, and each new shape
    cost ~20 s of compiling on an H200 (eval ran at 1.5 users/s).  Padded shapes bound the compiles to
    max_seq_len / ``multiple``.  Padding is after every real token, outside every prefix: the causal
    mask keeps it out of the real positions (tests/rec/test_rec_generative.py checks equal scores)."""
    B, L = max(len(prompts), rows), max(len(p.ids) for p in prompts)
    L = -(-L // multiple) * multiple
    ids = np.full((B, L), pad_id, dtype=np.int64)
    doc = np.full((B, L), -1, dtype=np.int64)
    prefix = np.zeros((B, L), dtype=bool)
    patches, where, vec_where, vec_rows, new_vectors = [], [], [], [], []
    for b, p in enumerate(prompts):
        n = len(p.ids)
        ids[b, :n], doc[b, :n], prefix[b, :n] = p.ids, 0, p.prefix
        for item, st in zip(p.image_items, p.image_starts):
            patches.append(ctx.pixels(item))
            where.append((b, st))
        for item, st in zip(p.vector_items, p.vector_starts):
            vec_where.append((b, st))
            if item in p.new_vectors:  # a free-text item: row -1, its vector in "new_item_vectors"
                new_vectors.append((len(vec_rows), p.new_vectors[item]))
            vec_rows.append(ctx.item_index.get(item, -1))
    P, pd_ = ctx.P, 3 * ctx.patch_size ** 2
    t = torch.from_numpy
    out = {
        "input_ids": t(ids).to(device),
        "position_ids": t(np.where(doc >= 0, np.arange(L), 0)).to(device),
        "document_ids": t(doc).to(device),
        "prefix_mask": t(prefix).to(device),
        "image_patches": (t(np.stack(patches)) if patches else torch.zeros(0, P, pd_)).to(device),
        "image_positions": torch.tensor(where, dtype=torch.int64).reshape(-1, 2).to(device),
        "item_positions": torch.tensor(vec_where, dtype=torch.int64).reshape(-1, 2).to(device),
        "item_catalog_rows": torch.tensor(vec_rows, dtype=torch.int64).to(device),
        "lengths": torch.tensor([len(p.ids) for p in prompts], device=device),
    }
    if new_vectors:  # (slot index among the item slots, raw text vector) of free-text items
        out["new_item_vectors"] = new_vectors
    return out
