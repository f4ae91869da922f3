"""M6-Rec text: one user's chronological window written as plain text.

A sample is a list of *segments*, each a piece of text with a region: the
context (profile + earlier items, may be read bidirectionally) or the
targets (items to predict, autoregressive with loss).  Segments are
tokenized one by one (see tokenizer.py), so an item's title always has the
same token ids wherever it appears: the catalog trie of the evaluation and
the training text agree by construction.

Every template lives here and in ``TextConfig``; docs/data.md shows real
renderings.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from m6rec.config import TextConfig

# Special tokens.  Region and structure markers are single tokens so they can
# never be split or forged by item text.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CONTEXT, PREDICT, ITEM, IMAGE = "<|context|>", "<|predict|>", "<|item|>", "<|image|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, CONTEXT, PREDICT, ITEM, IMAGE]
# The slot of an item's text vector (item_repr "vector"); added to a tokenizer only in that mode.
VECTOR = "<|vector|>"
VECTOR_MODES = ("vector", "vector_token")

# Mask bits stored per token in the shards (docs/architecture.md).
MASK_CONTEXT, MASK_LOSS, MASK_IMAGE, MASK_VECTOR = 1, 2, 4, 8


def item_token(item_id: str) -> str:
    return f"<item_{item_id}>"


def code_token(level: int, code: int) -> str:
    """The token of one semantic-ID code (item_repr semantic_id): one vocabulary per position."""
    return f"<sid_{level}_{code}>"


def safe_name(s: str) -> str:
    """A tar member name piece.  webdataset cuts keys at the first dot and lower-cases
    extensions, so other ids get a checksum suffix that keeps them distinct."""
    ok = "".join(c if c.isalnum() or c in "-_" else "_" for c in s).lower()
    return ok if ok == s else f"{ok}_{zlib.crc32(s.encode()):08x}"


def image_member(item_id: str) -> str:
    """The member name (after the sample key) of an item's image in a shard."""
    return f"img.{safe_name(item_id)}.jpg"


@dataclass
class Window:
    """Items [start, end) of one user's timeline; the first ``n_context`` are context."""

    user_id: str
    split: str  # train | valid | test
    index: int  # window number within (user, split)
    rows: np.ndarray  # positions into the user's timeline arrays
    n_context: int

    @property
    def key(self) -> str:
        # webdataset splits keys at the first dot: keys must not contain one.
        return f"u{safe_name(self.user_id)}-{self.split}-{self.index}"


def make_windows(
    user_id: str,
    splits: np.ndarray,
    max_items: int,
    stride: int,
    min_context_items: int,
    rng: np.random.Generator | None = None,
) -> list[Window]:
    """Windows over one user's timeline (``splits`` holds 'train'/'valid'/'test' per row, in time order).

    Training windows cover the training rows only: the first window predicts
    items ``min_context_items..max_items``; every later window advances by
    ``stride`` and predicts only the items no earlier window predicted, with
    the items before them as context.  So each training item is a target
    exactly once (except the first ``min_context_items``), and every target
    sees up to ``max_items - 1`` items of history.

    The validation window predicts the validation target from the training
    items before it; the test window predicts the test target from everything
    before it.  No valid/test target ever appears in a training window.

    With ``rng`` given, each training window keeps a random amount of its
    history (at least ``min_context_items``, or all there is).
    """
    n_train = int((splits == "train").sum())
    windows: list[Window] = []
    end = 0
    k = 0
    while end < n_train:
        new_end = min(n_train, max_items if end == 0 else end + stride)
        start = max(0, new_end - max_items)
        n_context = min_context_items if end == 0 else end - start
        if rng is not None and n_context > min_context_items:
            keep = int(rng.integers(min_context_items, n_context + 1))
            start += n_context - keep
            n_context = keep
        if new_end - start > n_context:  # at least one target
            windows.append(Window(user_id, "train", k, np.arange(start, new_end), n_context))
            k += 1
        end = new_end
    for split in ("valid", "test"):
        where = np.flatnonzero(splits == split)
        if len(where):
            t = int(where[0])
            start = max(0, t + 1 - max_items)
            windows.append(Window(user_id, split, 0, np.arange(start, t + 1), t - start))
    return windows


@dataclass
class Segment:
    text: str
    target: bool  # in the region to predict (loss); False = context
    special: bool = False  # a special token, looked up directly
    image_item: str | None = None  # an image slot for this item
    vector_item: str | None = None  # this token carries the item's text vector (item_repr vector*)


@dataclass
class Catalog:
    """Item and user text, rendered once and shared by every window."""

    item_text: dict[str, str]  # item_id -> "Title (Genre, Genre)"
    item_image: dict[str, str]  # item_id -> image path, only for items that have one
    profiles: dict[str, str]  # user_id -> profile sentence
    tags: dict[tuple[str, str], str] = field(default_factory=dict)  # (user, item) -> "a, b"
    item_codes: dict[str, list[str]] = field(default_factory=dict)  # item_repr semantic_id: its code tokens


def render_item_text(title: str, genres: list[str], extra: dict[str, str] | None, cfg: TextConfig) -> str:
    """The catalog text of an item: what evaluation scores and the trie holds."""
    text = title.strip()
    if genres and cfg.genres_template:
        text += cfg.genres_template.format(genres=", ".join(genres))
    for k, v in (extra or {}).items():
        if v:
            text += f"; {k}: {v}"
    return text


def render_profile(attributes: dict[str, str], cfg: TextConfig) -> str:
    fields = cfg.user_fields or list(attributes)
    parts = [f"{k}: {attributes[k]}" for k in fields if attributes.get(k) not in (None, "")]
    # No attributes, no sentence: tokens spent on "unknown" teach nothing.
    return cfg.profile_template.format(profile=", ".join(parts)) if parts else ""


def build_catalog(items: pd.DataFrame, users: pd.DataFrame, tags: pd.DataFrame, cfg: TextConfig) -> Catalog:
    item_text = {
        iid: render_item_text(t, list(g) if g is not None else [], x if isinstance(x, dict) else None, cfg)
        for iid, t, g, x in zip(items["item_id"], items["title"], items["genres"], items["text"])
    }
    item_image = {iid: p for iid, p in zip(items["item_id"], items["image"]) if isinstance(p, str) and p} if cfg.images else {}
    profiles = {uid: render_profile(a or {}, cfg) for uid, a in zip(users["user_id"], users["attributes"])}
    tag_map: dict[tuple[str, str], str] = {}
    if len(tags):
        grouped = tags.groupby(["user_id", "item_id"], sort=False)["tag"].agg(lambda s: ", ".join(dict.fromkeys(s)))
        tag_map = {k: v for k, v in grouped.items()}
    return Catalog(item_text, item_image, profiles, tag_map)


def _days_phrase(seconds: int) -> str:
    days = int(seconds // 86400)
    if days <= 0:
        return "same day"
    return "1 day later" if days == 1 else f"{days} days later"


def _rating_phrase(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else f"{r:g}"


def window_segments(
    w: Window,
    item_ids: np.ndarray,
    timestamps: np.ndarray,
    ratings: np.ndarray,
    catalog: Catalog,
    cfg: TextConfig,
) -> list[Segment]:
    """The segments of one window (``item_ids`` etc. are the user's whole timeline)."""
    segs = [Segment(BOS, False, True), Segment(CONTEXT, False, True)]
    profile = catalog.profiles.get(w.user_id, "")
    if profile:
        segs.append(Segment(profile, False))
    prev_ts = None
    for j, row in enumerate(w.rows):
        target = j >= w.n_context
        if j == w.n_context:
            segs.append(Segment(PREDICT, False, True))  # last context token: "now predict"
        iid = item_ids[row]
        segs.append(Segment(ITEM, target, True))
        if cfg.item_repr in ("token", "both"):
            segs.append(Segment(item_token(iid), target, True))
        elif cfg.item_repr == "semantic_id":
            # <|item|><sid_0_12><sid_1_7><sid_2_201><sid_3_0>: the codes, coarse to fine, each a token
            # (every catalog item has codes; a prompt's placeholder for the item to predict has none and is cut
            # off after its <|item|>)
            segs.extend(Segment(c, target, True) for c in catalog.item_codes.get(iid, ()))
        elif cfg.item_repr in VECTOR_MODES:
            # one position per item after <|item|>, as an item token is: the model adds the item's text
            # vector there and, at <|item|>, scores every catalog item's vector
            slot = VECTOR if cfg.item_repr == "vector" else item_token(iid)
            segs.append(Segment(slot, target, True, vector_item=str(iid)))
        if cfg.images and iid in catalog.item_image and cfg.item_repr not in VECTOR_MODES:
            # (in the vector modes the poster is encoded into the item's vector: m6rec/data/vectors.py)
            segs.append(Segment(IMAGE, target, True, image_item=iid))
        if cfg.item_repr in ("text", "both"):
            title = catalog.item_text.get(iid, iid)
            prefix = " " if cfg.item_repr == "both" else ""
            segs.append(Segment(prefix + title, target))
        # what the user did with the item, in words, in every item_repr (after an item token too:
        # "<|item|><|i_2858|>, rated 5"); the ID-only baseline switches the templates off
        tail = ""
        r = ratings[row]
        if cfg.rating_template and not np.isnan(r):
            tail += cfg.rating_template.format(rating=_rating_phrase(r))
        tag = catalog.tags.get((w.user_id, iid))
        if cfg.tags_template and tag:
            tail += cfg.tags_template.format(tags=tag)
        if cfg.time_unit == "day" and prev_ts is not None:
            tail += ", " + _days_phrase(int(timestamps[row]) - prev_ts)
        if tail:
            segs.append(Segment(tail, target))
        prev_ts = int(timestamps[row])
    segs.append(Segment(EOS, True, True))
    return segs


def segments_text(segs: list[Segment]) -> str:
    return "".join(s.text for s in segs)
