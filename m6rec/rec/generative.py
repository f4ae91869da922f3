"""Generative next-item recommendation: the pretrained LM ranks the whole catalog.

A user is written exactly as in training (m6rec.data.text): the profile, the
last ``data.max_items - 1`` items of the history with their ratings, tags and
relative times (and posters), then ``<|predict|><|item|>``.  What the model
would write next is the recommendation.

* **item-token mode** (``data.text.item_repr`` ``token`` or ``both``): the
  next token after ``<|item|>`` is an item token; the logits at that position
  restricted to the catalog's item tokens, softmaxed, give every item's
  score (one forward pass per user, exact).
* **text mode** (``item_repr: text``): the item is its catalog text
  ("Title (Genre, Genre)").  A prefix trie holds every catalog item's token
  ids (the same segment encoding as the training text), and a trie-constrained
  beam search finds the items of highest length-normalised log-probability::

      score(item) = ( sum_i log p(tok_i | prompt, tok_<i) + log p(END | prompt, tok_1..n) ) / (n + 1) ** A

  where ``p`` is the model's own softmax over the full vocabulary (not
  renormalised over the trie) and END is the event "the item's text ends
  here": in training, the token after an item's text is the first token of
  its rating / tag / time phrase (", rated 4", ", same day": always ``,``,
  a segment of its own), or ``<|item|>`` / ``<|eos|>``; ``p(END)`` sums the
  probabilities of those tokens.  END makes an item whose text is a prefix
  of another's ("Heat (1995)" vs "Heat (1995) (Action)") score on its own
  merits.  Items whose text is identical share a trie leaf and a score (ties
  in catalog order).  History items are removed from the trie per user
  (a branch holding only history items is never entered), so every beam slot
  spends itself on an eligible item and a beam of ``B >= k`` always returns
  ``min(k, eligible)`` items.  ``A`` (``length_norm``) is 1 by default
  (mean log-probability per token); 0 ranks by the item's probability.
  Beam search approximates the exact ranking, the more so with ``A > 0``:
  partial items are pruned by summed log-probability, complete ones ranked
  by their mean (docs/evaluation.md has the measured overlap); with a beam
  as wide as the catalog it is exact.

Decoding goes through the model's KV cache (:mod:`m6rec.model.decode`): the
prompt runs once (prefill, with the M6 prefix mask), then one token per beam
slot per step.  All slots of a user share one cache row (the prompt is stored
once) and a tree mask lets each slot read only the prompt and its own earlier
tokens.  Without the cache every step would re-run the whole prompt for every
slot: for a 500-token prompt, beam 50 and 25 title tokens that is ~625k
token-passes per user instead of ~1.75k.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from m6rec.config import Config, ConfigError, load_config
from m6rec.data import text as T
from m6rec.data.tokenizer import SegmentEncoder, load_tokenizer
from m6rec.model.decode import KVCache, decode
from m6rec.rec.evaluate import Query, top_k_excluding


# ---------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------
class LoadedRun(NamedTuple):
    model: torch.nn.Module
    cfg: Config
    tokenizer: object
    dataset_dir: Path


def resolve_checkpoint(run_dir: str | Path, tag: Optional[str] = None) -> tuple[Path, str]:
    """``RUN_DIR`` (or ``RUN_DIR/checkpoints``) -> (checkpoint dir, complete tag)."""
    from m6rec.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    ckpt_dir = run_dir if run_dir.name == "checkpoints" else run_dir / "checkpoints"
    if tag == "best":  # the tag train.select_by chose (RUN_DIR/best.json)
        from m6rec.rec.select import BEST_FILE, read_best

        best = read_best(ckpt_dir.parent)
        if best is None:
            raise ConfigError(f"--tag best: {ckpt_dir.parent / BEST_FILE} missing (written by a run with "
                              "train.select_by)")
        tag = best["tag"]
    if tag is None:
        tag = ckpt.latest_complete(ckpt_dir)
        if tag is None:
            raise ConfigError(f"--ckpt {run_dir}: no complete checkpoint in {ckpt_dir} (is it a run directory "
                              f"written by `m6rec train`?)")
    elif not ckpt.is_complete(ckpt_dir, tag):
        have = ckpt.complete_tags(ckpt_dir)
        raise ConfigError(f"--tag {tag}: {ckpt_dir / tag} is not a complete checkpoint; complete ones: {have}")
    return ckpt_dir, tag


def _fp32_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """m6rec.train.export's consolidation (ZeRO 0-3, CPU), quietly."""
    import contextlib
    import io

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            from m6rec.train.export import fp32_state_dict
        except ImportError:  # export.py not there: DeepSpeed's converter (stages 1-3)
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
            return {k: v.detach().float().contiguous() for k, v in sd.items()}
        return fp32_state_dict(ckpt_dir, tag)


def load_run(run_dir: str | Path, tag: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedRun:
    """A trained run ready for inference: ``(model, cfg, tokenizer, dataset_dir)``.

    Reads ``RUN_DIR/config.yaml``, the prepared dataset it trained on
    (``cfg.data.output``: manifest and tokenizer), builds the model with the
    manifest's vocabulary and loads the fp32 weights of the newest complete
    checkpoint (or ``tag``).  The model is in eval mode and carries
    ``model.checkpoint = {"run_dir", "tag", "step"}``."""
    import json

    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs
    from m6rec.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"--ckpt {run_dir}: {cfg_file} missing (is it a run directory written by `m6rec train`?)")
    cfg = load_config(cfg_file)
    dataset_dir = Path(cfg.data.output)
    if not (dataset_dir / "manifest.json").is_file():
        raise ConfigError(f"{cfg_file}: data.output={cfg.data.output} holds no prepared dataset (manifest.json "
                          f"missing; relative paths resolve against the current directory {Path.cwd()})")
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    tokenizer = load_tokenizer(dataset_dir / "tokenizer.json")
    ckpt_dir, tag = resolve_checkpoint(run_dir, tag)
    meta = ckpt.read_meta(ckpt_dir, tag)
    if "model_args" in meta:
        args = ModelArgs.from_dict(meta["model_args"])
    else:
        args = ModelArgs.from_config(cfg)
    args = ModelArgs.from_dict({**args.to_dict(), "vocab_size": manifest["vocab_size"], "compile": False,
                                "init_from": None, "activation_checkpointing": False})
    model = build_model(args, device="cpu")
    model.load_state_dict(_fp32_state_dict(ckpt_dir, tag), strict=True)
    model.to(device).eval()
    model.checkpoint = {"run_dir": str(run_dir), "tag": tag, "step": meta.get("step")}
    return LoadedRun(model, cfg, tokenizer, dataset_dir)


# ---------------------------------------------------------------------------
# Prompts: the user written as in training
# ---------------------------------------------------------------------------
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
        import json

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
        from m6rec.data.sources import load_source

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
            from m6rec.data.prepare import _load_images
            from m6rec.data.stream import image_patches

            sub = pd.DataFrame({"item_id": [item_id], "image": [self._image_paths[item_id]]})
            data, _ = _load_images(sub, self.image_size)
            self._pixels[item_id] = image_patches(data[item_id], self.image_size, self.patch_size)
        return self._pixels[item_id]

    # -- rendering -----------------------------------------------------------
    def _render(self, user_id: str, items: np.ndarray, ts: np.ndarray, ratings: np.ndarray, catalog: T.Catalog,
                exclude: set) -> Prompt:
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
        unknown = [i for i in vecs if i not in self.item_index]
        if unknown:
            raise ConfigError(f"items as text vectors: {unknown[0]!r} is not an item of {self.dataset_dir} (only "
                              "catalog items have cached vectors; free-text titles must match catalog titles)")
        return Prompt(ids.astype(np.int64), (mask & T.MASK_CONTEXT) != 0, imgs, starts, exclude, user_id,
                      [str(i) for i in items[start:]], vecs, np.flatnonzero(mask & T.MASK_VECTOR).tolist())

    def _item_segments(self, item_id: str) -> list:
        """``item_id`` as a one-item window: ``<|bos|><|context|><|predict|><|item|>``, its item
        token, poster slot and text as training writes them, ``<|eos|>`` (no rating, no time)."""
        w = T.Window("", "test", 0, np.array([0]), 0)
        return T.window_segments(w, np.array([item_id], dtype=object), np.zeros(1, dtype=np.int64),
                                 np.full(1, np.nan), self.catalog, self.text_cfg)

    def for_item(self, item_id: str) -> Prompt:
        """An item on its own (:meth:`_item_segments`), all of it context: the item tower's input
        (m6rec.rec.finetune)."""
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

    def for_query(self, q: Query) -> Prompt:
        """The evaluation prompt: the history before the target (ratings, times from splits.parquet)."""
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

    def for_titles(self, titles: Sequence[str] | str) -> tuple[Prompt, list[tuple[str, Optional[str]]]]:
        """A user the model never saw, from a free-text history ("Toy Story (1995); Heat (1995)").

        Known titles become their catalog items (with genres and posters as in
        training); unknown ones stay plain text items (the model reads text).
        No ratings, times "same day", no profile."""
        if isinstance(titles, str):
            titles = [t for t in titles.split(";") if t.strip()]
        matched = self.match_titles(titles)
        cat = T.Catalog(dict(self.catalog.item_text), self.catalog.item_image, {}, {})
        ids = []
        for n, (t, iid) in enumerate(matched):
            if iid is None:
                iid = f"\x00text{n}"
                cat.item_text[iid] = t
            ids.append(iid)
        items = np.array(ids, dtype=object)
        prompt = self._render("", items, np.zeros(len(items), dtype=np.int64), np.full(len(items), np.nan), cat,
                              {i for _, i in matched if i is not None})
        return prompt, matched


def contexts_for(run_cfg: Config, tokenizer, run_dataset_dir: str | Path, dataset: Optional[str] = None) -> ContextBuilder:
    """The prompt builder of a run, on its own dataset or (``dataset``) another one.

    Another dataset is zero-shot: its users and items reach the model only as
    text, written with the model's templates, history length and tokenizer; the
    dataset must have been prepared with that tokenizer (data.tokenizer.path)."""
    import dataclasses
    import json

    from m6rec.config import DataConfig, _build

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
    mask keeps it out of the real positions (tests/test_rec_generative.py checks equal scores)."""
    B, L = max(len(prompts), rows), max(len(p.ids) for p in prompts)
    L = -(-L // multiple) * multiple
    ids = np.full((B, L), pad_id, dtype=np.int64)
    doc = np.full((B, L), -1, dtype=np.int64)
    prefix = np.zeros((B, L), dtype=bool)
    patches, where, vec_where, vec_rows = [], [], [], []
    for b, p in enumerate(prompts):
        n = len(p.ids)
        ids[b, :n], doc[b, :n], prefix[b, :n] = p.ids, 0, p.prefix
        for item, st in zip(p.image_items, p.image_starts):
            patches.append(ctx.pixels(item))
            where.append((b, st))
        for item, st in zip(p.vector_items, p.vector_starts):
            vec_where.append((b, st))
            vec_rows.append(ctx.item_index[item])
    P, pd_ = ctx.P, 3 * ctx.patch_size ** 2
    t = torch.from_numpy
    return {
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


# ---------------------------------------------------------------------------
# The catalog trie
# ---------------------------------------------------------------------------
class ItemTrie:
    """Every catalog item's token ids in a prefix trie, stored as flat arrays.

    ``child_ptr/child_tok/child_node``: the children of node ``n`` are
    ``child_tok[child_ptr[n]:child_ptr[n+1]]`` (sorted by token) leading to
    ``child_node[...]``; node 0 is the root.  ``item_node[i]``: the node where
    catalog item ``i``'s sequence ends; ``item_path[i]``: its nodes, root
    first.  ``subtree[n]``: items ending in ``n``'s subtree."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        edges: dict[tuple[int, int], int] = {}
        parent = [-1]
        self.item_node = np.zeros(len(sequences), dtype=np.int64)
        self.item_path: list[np.ndarray] = []
        for i, seq in enumerate(sequences):
            node, path = 0, [0]
            for tok in seq:
                key = (node, int(tok))
                nxt = edges.get(key)
                if nxt is None:
                    nxt = edges[key] = len(parent)
                    parent.append(node)
                node = nxt
                path.append(node)
            self.item_node[i] = node
            self.item_path.append(np.asarray(path, dtype=np.int64))
        self.n_nodes = len(parent)
        pairs = sorted(edges.items())  # by (node, token)
        src = np.array([k[0] for k, _ in pairs], dtype=np.int64)
        self.child_tok = np.array([k[1] for k, _ in pairs], dtype=np.int64)
        self.child_node = np.array([v for _, v in pairs], dtype=np.int64)
        self.child_ptr = np.zeros(self.n_nodes + 1, dtype=np.int64)
        np.add.at(self.child_ptr, src + 1, 1)
        self.child_ptr = np.cumsum(self.child_ptr)
        self.items_at = np.bincount(self.item_node, minlength=self.n_nodes)
        self.subtree = np.zeros(self.n_nodes, dtype=np.int64)
        for p in self.item_path:
            self.subtree[p] += 1
        order = np.argsort(self.item_node, kind="stable")  # items of a node in catalog order
        self._items_sorted = order
        self._items_ptr = np.concatenate([[0], np.cumsum(self.items_at)])
        self.depth = max((len(s) for s in sequences), default=0)

    def items_of(self, node: int) -> np.ndarray:
        return self._items_sorted[self._items_ptr[node]:self._items_ptr[node + 1]]

    def sequences(self) -> list[list[int]]:
        """Every stored sequence, read back from the trie (for checks)."""
        tok_of = np.zeros(self.n_nodes, dtype=np.int64)
        tok_of[self.child_node] = self.child_tok
        return [tok_of[p[1:]].tolist() for p in self.item_path]

    def history_counts(self, history_items: Sequence[int]) -> np.ndarray:
        """Per node, how many of these (catalog indices, distinct) end in its subtree."""
        c = np.zeros(self.n_nodes, dtype=np.int64)
        for i in history_items:
            c[self.item_path[i]] += 1
        return c


# ---------------------------------------------------------------------------
# The recommender
# ---------------------------------------------------------------------------
class GenerativeRecommender:
    """Ranks the whole catalog with the LM (see the module docstring).

    ``mode``: "auto" (item tokens when the data has them, else text),
    "token" or "text".  ``beam``: beam width of text mode (at least ``k``
    is always used).  ``batch_size``: users per forward pass."""

    def __init__(self, model, contexts: ContextBuilder, mode: str = "auto", beam: int = 0, batch_size: int = 16,
                 name: Optional[str] = None, length_norm: float = 1.0):
        repr_ = contexts.text_cfg.item_repr
        if mode == "auto":
            mode = "vector" if repr_ in T.VECTOR_MODES else "token" if repr_ in ("token", "both") else "text"
        if (mode == "vector") != (repr_ in T.VECTOR_MODES):
            raise ConfigError(f"mode {mode!r} does not fit data.text.item_repr {repr_!r} (items as text vectors are "
                              "ranked with mode 'vector', and only they)")
        if mode == "token" and repr_ == "text":
            raise ConfigError("mode 'token' needs a dataset prepared with data.text.item_repr token or both")
        if mode == "text" and repr_ != "text":
            raise ConfigError(f"mode 'text' needs data.text.item_repr 'text' (this run's data has {repr_!r}: "
                              "its item text follows an item token); use mode 'token'")
        if mode not in ("text", "token", "vector"):
            raise ConfigError(f"mode must be auto, text, token or vector, got {mode!r}")
        self.model, self.ctx, self.mode = model, contexts, mode
        self.beam, self.batch_size, self.length_norm = beam, batch_size, float(length_norm)
        self.device = next(model.parameters()).device
        # fixed batch shapes where kernels are compiled per shape (collate's docstring says why)
        self.static_shape = dict(rows=batch_size, multiple=SHAPE_MULTIPLE) if self.device.type == "cuda" else {}
        tok = contexts.tokenizer
        self.pad_id = tok.token_to_id(T.PAD)
        self.catalog = np.array(contexts.catalog_ids, dtype=object)
        ck = getattr(model, "checkpoint", {}) or {}
        where = ", ".join(x for x in (Path(ck["run_dir"]).name if ck.get("run_dir") else "", ck.get("tag") or "") if x)
        self.name = name or f"m6rec-{mode}" + (f" ({where})" if where else "")
        self.stats: dict = {}
        if mode == "vector":
            from m6rec.data.vectors import attach_catalog

            # the catalog of the dataset ranked (its own vectors: zero-shot on another catalog works alike);
            # a model already holding it (train.select_by, in training) keeps its training catalog
            if getattr(model, "item_catalog_source", None) != str(Path(contexts.dataset_dir).resolve()):
                from m6rec.data.vectors import posters_lost

                attach_catalog(model, contexts.dataset_dir, contexts.text_cfg)
                note = posters_lost(contexts.cfg.data.output, contexts.dataset_dir, contexts.text_cfg.item_encoder)
                if note:
                    warnings.warn(note)
            self.refresh()
        elif mode == "token":
            ids = [tok.token_to_id(T.item_token(i)) for i in contexts.catalog_ids]
            missing = [i for i, t in zip(contexts.catalog_ids, ids) if t is None]
            if missing:
                raise ConfigError(f"tokenizer has no item token for {len(missing)} catalog items (e.g. {missing[0]})")
            self.item_token_ids = torch.tensor(ids, device=self.device)
        else:
            texts = [contexts.catalog.item_text[i] for i in contexts.catalog_ids]
            contexts.enc.prime(texts)
            self.sequences = [contexts.enc.encode([T.Segment(t, True)])[0].astype(np.int64).tolist() for t in texts]
            self.trie = ItemTrie(self.sequences)
            self.end_ids = self._end_ids()

    def _end_ids(self) -> list[int]:
        """Tokens that follow an item's text in training: the first token of its
        rating / tag / time phrase (each a segment of its own), <|item|>, <|eos|>."""
        c, tok = self.ctx.text_cfg, self.ctx.tokenizer
        tails = []
        if c.rating_template:
            tails += [c.rating_template.format(rating=r) for r in ("1", "4", "3.5")]
        if c.tags_template:
            tails.append(c.tags_template.format(tags="funny"))
        if c.time_unit == "day":
            tails += [", same day", ", 1 day later", ", 12 days later"]
        ends = {tok.token_to_id(T.ITEM), tok.token_to_id(T.EOS)}
        ends |= {tok.encode(t, add_special_tokens=False).ids[0] for t in tails if t}
        return sorted(ends)

    # -- public --------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Vector mode: project the cached item vectors into the catalog's output embeddings, once --
        a request then costs one forward pass and one ``[D] x [D, N]`` product.  Call again after the
        model trained (train.select_by does)."""
        if self.mode == "vector":
            self.catalog_emb = self.model.catalog_embeddings().float()

    def rank(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[i for i, _ in r] for r in self.rank_with_scores(queries, k)]

    def rank_with_scores(self, queries: Sequence[Query], k: int, progress: bool = False) -> list[list[tuple[str, float]]]:
        return self.rank_prompts([self.ctx.for_query(q) for q in queries], k, progress)

    def rank_prompts(self, prompts: Sequence[Prompt], k: int, progress: bool = False) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per prompt, its ``exclude`` set removed."""
        t0 = time.perf_counter()
        out: list = [None] * len(prompts)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc=f"rank {self.name}", unit="user")
        rank = {"token": self._rank_token, "text": self._rank_text, "vector": self._rank_vector}[self.mode]
        for idx, group in batches_by_length(prompts, self.batch_size):
            res = rank(group, k)
            for i, r in zip(idx, res):
                out[i] = r
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        self.stats = {"users": len(prompts), "seconds": round(dt, 3),
                      "seconds_per_user": round(dt / max(1, len(prompts)), 5),
                      "prompt_tokens_mean": float(np.mean([len(p.ids) for p in prompts])) if prompts else 0.0}
        return out

    # -- item tokens, item text vectors: one softmax over the catalog -------------
    def _rank_token(self, prompts: list[Prompt], k: int) -> list:
        return self._rank_catalog_softmax(prompts, k, self.model.head_weight[self.item_token_ids])

    def _rank_vector(self, prompts: list[Prompt], k: int) -> list:
        """Items as text vectors: every catalog item's output embedding is its projected cached text
        vector (computed once per :meth:`rank_prompts`)."""
        return self._rank_catalog_softmax(prompts, k, self.catalog_emb)

    @torch.no_grad()
    def _rank_catalog_softmax(self, prompts: list[Prompt], k: int, item_weight: torch.Tensor) -> list:
        """One forward pass per user; the hidden state at the final ``<|item|>`` against each catalog
        item's output embedding (row ``i`` = catalog item ``i``), softmaxed over the catalog."""
        b = collate(prompts, self.ctx, self.pad_id, self.device, **self.static_shape)
        lengths = b.pop("lengths")
        h = self.model.hidden_states(**b)
        last = h[torch.arange(len(prompts), device=h.device), lengths - 1]
        scores = torch.log_softmax(last.float() @ item_weight.float().T, dim=-1).cpu().numpy()
        out = []
        for p, s in zip(prompts, scores):
            top = top_k_excluding(s, self.catalog, p.exclude, k)
            out.append([(i, float(s[self.ctx.item_index[i]])) for i in top])
        return out

    # -- text: trie-constrained beam search --------------------------------------
    @torch.no_grad()
    def _rank_text(self, prompts: list[Prompt], k: int) -> list:
        trie, U = self.trie, len(prompts)
        B = max(k, self.beam)
        dec = _BeamDecoder(self.model, collate(prompts, self.ctx, self.pad_id, self.device))
        logits = dec.logits[:, None, :]  # [U, 1, V]: only slot 0 (the root) is live at first
        # per user: history items out of the trie
        hist_sub = np.zeros((U, trie.n_nodes), dtype=np.int64)
        hist_at = np.zeros((U, trie.n_nodes), dtype=np.int64)
        for u, p in enumerate(prompts):
            h = sorted({self.ctx.item_index[i] for i in p.exclude if i in self.ctx.item_index})
            if h:
                hist_sub[u] = trie.history_counts(h)
                np.add.at(hist_at[u], trie.item_node[h], 1)
        dead = hist_sub >= trie.subtree[None, :]  # nothing eligible below
        eligible_at = trie.items_at[None, :] - hist_at
        act = np.arange(U)  # users still searching (rows of node/cum and of the decoder's caches)
        node = np.full((U, 1), 0, dtype=np.int64)
        cum = np.zeros((U, 1), dtype=np.float64)
        finished: list[list[tuple[float, int]]] = [[] for _ in range(U)]
        end_ids = torch.tensor(self.end_ids, device=self.device)
        alpha = self.length_norm
        t = 0
        while True:
            logp = torch.log_softmax(logits, dim=-1)  # [A, width, V]
            A, width = node.shape
            rows = act[:, None]
            live = node >= 0
            live &= ~dead[rows, np.where(live, node, 0)]
            # items ending here
            nd = np.where(live, node, 0)
            term = live & (eligible_at[rows, nd] > 0)
            if term.any():
                end_lp = torch.logsumexp(logp[..., end_ids], dim=-1).cpu().numpy()
                for a, b in zip(*np.nonzero(term)):
                    finished[act[a]].append(((cum[a, b] + end_lp[a, b]) / (t + 1) ** alpha, int(node[a, b])))
            # expansions of every live slot into its children still holding an eligible item
            flat = np.flatnonzero(live.ravel())
            fa, fb, fn = flat // width, flat % width, node.ravel()[flat]
            starts, counts = trie.child_ptr[fn], trie.child_ptr[fn + 1] - trie.child_ptr[fn]
            total = int(counts.sum())
            if total == 0:
                break
            rep = np.repeat(np.arange(len(flat)), counts)
            offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            ci = starts[rep] + offs
            ca, cb, ctok, cnode = fa[rep], fb[rep], trie.child_tok[ci], trie.child_node[ci]
            keep = ~dead[act[ca], cnode]
            ca, cb, ctok, cnode = ca[keep], cb[keep], ctok[keep], cnode[keep]
            if len(ca) == 0:
                break
            lp = logp[torch.from_numpy(ca).to(self.device), torch.from_numpy(cb).to(self.device),
                      torch.from_numpy(ctok).to(self.device)].double().cpu().numpy()
            score = cum[ca, cb] + lp
            o = np.lexsort((-score, ca))  # per user, best first (stable: trie order on ties)
            ca_o = ca[o]
            rank = np.arange(len(o)) - np.searchsorted(ca_o, ca_o, side="left")
            sel, slot = o[rank < B], rank[rank < B]
            # compact: only users with a live slot, only as many slots as the fullest of them
            keep_users = np.unique(ca[sel])
            new_row = np.full(A, -1, dtype=np.int64)
            new_row[keep_users] = np.arange(len(keep_users))
            su = new_row[ca[sel]]
            w = int(slot.max()) + 1
            new_node = np.full((len(keep_users), w), -1, dtype=np.int64)
            new_cum = np.zeros((len(keep_users), w), dtype=np.float64)
            parent = np.zeros((len(keep_users), w), dtype=np.int64)
            tokens = np.full((len(keep_users), w), self.pad_id, dtype=np.int64)
            new_node[su, slot] = cnode[sel]
            new_cum[su, slot] = score[sel]
            parent[su, slot] = cb[sel]
            tokens[su, slot] = ctok[sel]
            logits = dec.step(torch.from_numpy(keep_users).to(self.device), torch.from_numpy(parent).to(self.device),
                              torch.from_numpy(tokens).to(self.device), t)
            act, node, cum = act[keep_users], new_node, new_cum
            t += 1
        out = []
        for u, p in enumerate(prompts):
            ranked = []
            for score, n in finished[u]:
                for i in trie.items_of(n):
                    iid = self.catalog[i]
                    if iid not in p.exclude:
                        ranked.append((iid, float(score), i))
            ranked.sort(key=lambda x: (-x[1], x[2]))
            out.append([(iid, s) for iid, s, _ in ranked[:k]])
        return out


class _BeamDecoder:
    """The beam search's view of :func:`m6rec.model.decode.decode`: one cache row per user
    holding its prompt and every token any of its slots was fed (a tree), and per slot the
    cached positions its next token reads (``reads [U, B, S]``: the prompt and its ancestors)."""

    @torch.no_grad()
    def __init__(self, model, batch: dict):
        self.model, self.lengths = model, batch.pop("lengths")
        self.cache = KVCache.empty(model)
        h = decode(model, batch.pop("input_ids"), self.cache, **batch)  # prefill, with the prompts' own mask
        last = h[torch.arange(len(self.lengths), device=h.device), self.lengths - 1]
        self.logits = F.linear(last, model.head_weight).float()  # [U, V]
        self.reads = self.cache.readable[:, None, :]  # the root slot reads the prompt

    @torch.no_grad()
    def step(self, users: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Keep only ``users`` (indices into the current users; finished ones drop out, so late
        steps cost little); their slot ``b`` continues slot ``parent[u, b]`` and is fed
        ``tokens[u, b]``, the ``t``-th token of its item.  Returns logits ``[U, B, V]``."""
        if len(users) != self.reads.shape[0]:
            self.cache, self.lengths = self.cache.select(users), self.lengths[users]
        reads = self.reads[users]
        reads = reads.gather(1, parent[:, :, None].expand(-1, -1, reads.shape[2]))
        U, B = tokens.shape
        # each new token reads its slot's history and itself, not the other slots' new tokens
        own = torch.eye(B, dtype=torch.bool, device=tokens.device).expand(U, B, B)
        self.reads = torch.cat([reads, own], dim=2)
        h = decode(self.model, tokens, self.cache, (self.lengths[:, None] + t).expand(U, B), attn_mask=self.reads)
        return F.linear(h, self.model.head_weight).float()


def recommender_from_run(run_dir: str | Path, tag: Optional[str] = None, mode: str = "auto", beam: int = 0,
                         batch_size: int = 16, device: str = "cpu", length_norm: float = 1.0) -> GenerativeRecommender:
    """``load_run`` + ``contexts_for`` + ``GenerativeRecommender`` in one call."""
    run = load_run(run_dir, tag, device)
    ctx = contexts_for(run.cfg, run.tokenizer, run.dataset_dir)
    return GenerativeRecommender(run.model, ctx, mode=mode, beam=beam, batch_size=batch_size, length_norm=length_norm)
