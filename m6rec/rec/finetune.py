"""Adapt one pretrained M6-Rec model to a task: two-tower retrieval or yes/no ranking,
by full fine-tuning or by option tuning (the LM frozen, <= 1% of the parameters trained).

    m6rec finetune --ckpt runs/ml1m-text --finetune.task retrieval --finetune.method option \\
                   --finetune.run_dir runs/ml1m-text-retrieval-option

Both tasks read the user exactly as pretraining wrote it (m6rec.data.prompts.ContextBuilder):

* **retrieval** — the *query tower* pools the LM's hidden states of the user's prompt
  (``... <|predict|><|item|>``): their mean (``finetune.query_pool: mean``, the default), or
  the last one (``last``: the state that, in pretraining, predicts the next item);
  the *item tower* is the mean hidden state of the item written alone
  (``<|bos|><|context|><|predict|><|item|> [item token] [poster] Title (Genres)<|eos|>``).
  Both are L2-normalised; the loss is a softmax over the batch's positives (in-batch
  negatives) plus ``negatives`` catalog items sampled uniformly per step, with a learned
  temperature; a negative that is another query's identical target is masked out.
  Examples: every training interaction with at least one item before it, uniformly.
* **ranking** — ``P(yes | user text, candidate text)``: the user's prompt, the candidate
  written as the next item, then ``" - liked:"``; the score is the LM's own
  ``log p("yes") - log p("no")`` (their first tokens) at the last position plus a learned bias, trained
  with binary cross-entropy.  Training interactions rated >= 4 are positives, <= 2
  negatives (3 is left out), as in evaluation on held-out targets.

**Option tuning** (M6-Rec's parameter-efficient adaptation) adds, per tower, ``options``
learned vectors written over placeholder tokens right after ``<|bos|>`` (a task "prompt"
the frozen model reads), and a bottleneck adapter (``dim -> adapter_dim -> dim``, zero-
initialised output, so training starts from the pretrained model exactly) after every
transformer block.  Only those, the temperature and the bias train.

The loop runs under DeepSpeed (the run's ``deepspeed:`` section, ZeRO 0-2; under the
``deepspeed`` launcher each rank samples its own examples) and logs like pretraining
(console, ``metrics.jsonl``, W&B).  The output directory holds ``finetune.json`` (base run,
task, method, parameter counts), ``weights.safetensors`` (only what was trained) and,
for retrieval, the item index of the base dataset (``item_index.safetensors``), so
``m6rec recommend`` is one query forward and a matrix product.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_weights
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from m6rec.config import (
    Config,
    ConfigError,
    load_config,
    load_yaml_tree,
    save_config,
    to_dict,
)
from m6rec.data import text as T
from m6rec.data.prompts import (
    ContextBuilder,
    Prompt,
    batches_by_length,
    collate,
    contexts_for,
)
from m6rec.model.batch import Batch
from m6rec.model.options import Options
from m6rec.rec.evaluate import EvalData, Query, top_k_excluding
from m6rec.train.distributed import init_distributed
from m6rec.train.ds_config import deepspeed_config
from m6rec.train.metrics import MetricsLogger
from m6rec.train.metrics import progress as progress_bar
from m6rec.train.optim import param_groups, warmup_cosine
from m6rec.train.run_dir import load_run, open_run

log = logging.getLogger("m6rec.finetune")

RANKING_SUFFIX = " - liked:"
ANSWERS = ("yes", "no")  # no leading space: their first tokens always differ (y / n)
# the option-tuning variant of runs whose config.yaml predates the variants' keys
LEGACY_OPTION_TUNING = {"option_layers": "input", "lora_rank": 0, "tune_norms": False, "attn_pool": False,
                        "head_rank": 0, "embed_lora_rank": 0}


def with_options(p: Prompt, n: int, placeholder: int) -> Prompt:
    """``p`` with ``n`` placeholder tokens after ``<|bos|>`` (context; image slots shifted)."""
    if not n:
        return p
    return Prompt(np.concatenate([p.ids[:1], np.full(n, placeholder, dtype=p.ids.dtype), p.ids[1:]]),
                  np.concatenate([p.prefix[:1], np.ones(n, dtype=bool), p.prefix[1:]]),
                  p.image_items, [s + n for s in p.image_starts], p.exclude, p.user_id, p.context_items)


# ---------------------------------------------------------------------------
# The task model
# ---------------------------------------------------------------------------
class TaskModel(nn.Module):
    """The LM plus what a task adds: the retrieval temperature, the ranking bias, options."""
    def __init__(self, lm: nn.Module, task: str, method: str, ft, answer_ids: tuple[int, int], placeholder: int = 3):
        super().__init__()
        self.lm, self.task, self.method = lm, task, method
        self.options = Options(lm, ft.options, ft.adapter_dim, placeholder, ft.option_layers, ft.lora_rank,
                               ft.lora_targets, ft.head_rank, ft.attn_pool, ft.embed_lora_rank) \
            if method == "option" else None
        self.n_options = ft.options if method == "option" else 0
        # shape [1], not []: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / ft.temperature)))
        self.bias = nn.Parameter(torch.zeros(1))
        self.yes_id, self.no_id = answer_ids
        self.query_pool = ft.query_pool
        if method == "option":
            for name, p in self.lm.named_parameters():
                p.requires_grad_(ft.tune_norms and name.split(".")[-2].endswith("norm"))

    def trainable(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.named_parameters() if v.requires_grad}

    def set_tower(self, tower: str) -> None:
        if self.options is not None:
            self.options.tower = tower

    def embed(self, batch: dict, tower: str) -> torch.Tensor:
        """L2-normalised tower embeddings, one per row."""
        self.set_tower(tower)
        b = Batch.of(batch)
        pool = self.query_pool if tower == "query" else "mean"
        opts = self.options
        if opts is None or (opts.head_u is None and opts.pool_w is None):
            emb, _ = self.lm.encode(b, pool=pool)
            return emb.float()
        if opts.pool_w is not None and pool == "mean":
            emb = opts.attention_pool(self.lm.hidden_states(b), b.document_ids, tower)
        else:
            emb, _ = self.lm.encode(b, pool=pool, normalize=False)
        return F.normalize(opts.head(emb.float(), tower), dim=-1)

    def ranking_logits(self, batch: dict) -> torch.Tensor:
        self.set_tower("query")
        s, _ = self.lm.score_yes_no(Batch.of(batch), self.yes_id, self.no_id)
        return s + self.bias

    def forward(self, query: dict, items: Optional[dict] = None, positives: Optional[torch.Tensor] = None,
                candidates: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training loss of a batch (see the module docstring)."""
        if self.task == "ranking":
            return F.binary_cross_entropy_with_logits(self.ranking_logits(query), labels.float())
        q = self.embed(query, "query")
        it = self.embed(items, "item")
        logits = self.log_scale.clamp(max=math.log(100.0)).exp() * q @ it.T
        # the same item as this query's target elsewhere in the candidate list is no negative
        dup = candidates[None, :] == positives[:, None]
        dup[torch.arange(len(q)), torch.arange(len(q))] = False
        logits = logits.masked_fill(dup, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def answer_ids(tokenizer) -> tuple[int, int]:
    """First token of "yes" and of "no" in this tokenizer (they must differ)."""
    yes, no = (tokenizer.encode(a, add_special_tokens=False).ids[0] for a in ANSWERS)
    if yes == no:
        raise ConfigError(f"the tokenizer encodes {ANSWERS[0]!r} and {ANSWERS[1]!r} with the same first token")
    return yes, no


# ---------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------
class Examples:
    """Training examples from the saved split: (user, position) pairs of train interactions."""
    def __init__(self, ctx: ContextBuilder, task: str):
        self.ctx, self.task = ctx, task
        self.users = sorted(ctx._timeline)
        train = ctx.splits[ctx.splits["split"] == "train"]  # the split the builder already read
        counts = train.groupby("user_id").size()
        pairs = []
        for u in self.users:
            items, ts, r = ctx.timeline(u)
            n = int(counts.get(u, 0))
            for t in range(1, n):  # at least one item of history before the target
                if task == "ranking" and 2 < r[t] < 4:
                    continue
                if task == "ranking" and np.isnan(r[t]):
                    continue
                pairs.append((u, t))
        if not pairs:
            raise ConfigError(f"{ctx.dataset_dir}: no training examples for task {task!r}"
                              + (" (ranking needs ratings: >= 4 positive, <= 2 negative)" if task == "ranking" else ""))
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def prompt(self, user: str, t: int) -> tuple[Prompt, str, float]:
        items, ts, r = self.ctx.timeline(user)
        p = self.ctx._render(user, items[:t], ts[:t], r[:t], self.ctx.catalog, set(items[:t].tolist()))
        return p, str(items[t]), float(r[t])

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[Prompt, str, float]]:
        return [self.prompt(*self.pairs[i]) for i in rng.integers(len(self.pairs), size=n)]


def ranking_prompt(ctx: ContextBuilder, p: Prompt, item_id: str) -> Prompt:
    return ctx.append_item(p, item_id, RANKING_SUFFIX)


# ---------------------------------------------------------------------------
# Loading a fine-tuned run
# ---------------------------------------------------------------------------
class TaskRun:
    """A fine-tuned run (or a pretrained one used as is): model, contexts, item index cache."""
    def __init__(self, model: TaskModel, cfg: Config, tokenizer, dataset_dir: Path, meta: dict, out_dir: Optional[Path]):
        self.model, self.cfg, self.tokenizer, self.dataset_dir = model, cfg, tokenizer, Path(dataset_dir)
        self.meta, self.out_dir = meta, out_dir
        self.placeholder = tokenizer.token_to_id(T.CONTEXT)
        self.pad_id = tokenizer.token_to_id(T.PAD)

    @property
    def name(self) -> str:
        if self.out_dir is None:
            return f"{self.meta['task']} (pretrained, not fine-tuned)"
        return f"{self.meta['task']}-{self.meta['method']} ({self.out_dir.name})"

    def prompt(self, p: Prompt) -> Prompt:
        return with_options(p, self.model.n_options, self.placeholder)

    @torch.no_grad()
    def embed(self, ctx: ContextBuilder, prompts: Sequence[Prompt], tower: str, batch_size: int = 64,
              progress: Optional[str] = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = torch.empty(len(prompts), self.model.lm.args.dim)
        bar = None
        if progress:
            bar = tqdm(total=len(prompts), desc=progress, unit="row")
        for idx, batch in batches_by_length(prompts, batch_size):
            b = collate([self.prompt(p) for p in batch], ctx, self.pad_id, device)
            out[torch.as_tensor(idx)] = self.model.embed(b, tower).cpu()
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return out

    def item_index(self, ctx: ContextBuilder, progress: bool = True) -> torch.Tensor:
        """Item-tower embeddings of ``ctx``'s whole catalog, computed once per (weights, catalog)
        and cached in the fine-tuned run directory."""
        # everything the item tower's output depends on: the weights as loaded (base checkpoint and
        # the trained part), their dtype, and each item's exact input (tokens and poster slot)
        h = hashlib.sha256()
        h.update(f"{self.meta.get('base_run')}|{self.meta.get('base_tag')}|{self.meta.get('loaded_sha256', '')}|"
                 f"{next(self.model.parameters()).dtype}|{ctx.source_loaded}".encode())
        items = [ctx.for_item(i) for i in ctx.catalog_ids]  # rendered once: hashed here, embedded on a miss
        for i, p in zip(ctx.catalog_ids, items):
            h.update(f"{i}\t{p.image_items}\t".encode() + p.ids.tobytes())
        key = h.hexdigest()[:16]
        cache = self.out_dir / f"item_index-{key}.safetensors" if self.out_dir is not None else None
        if cache is not None and cache.is_file():
            return load_file(str(cache))["embeddings"]
        emb = self.embed(ctx, items, "item", progress="item index" if progress else None)
        if cache is not None:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            try:
                save_file({"embeddings": emb.contiguous()}, str(tmp),
                          metadata={"dataset": str(ctx.dataset_dir), "items": str(len(ctx.catalog_ids))})
                os.replace(tmp, cache)
            except OSError as e:  # a read-only run directory: serve without the cache
                log.warning("item index not cached in %s: %s", cache.parent, e)
        return emb


def load_task_run(path: str | Path, task: str, device: str = "cpu", tag: Optional[str] = None) -> TaskRun:
    """A directory written by ``m6rec finetune``, or a pretraining run (its towers untrained)."""
    path = Path(path)
    meta_file = path / "finetune.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if tag is not None:  # silently ranking the fine-tuned weights instead would be the wrong row
            raise ConfigError(f"--ckpt {path} --tag {tag}: a fine-tuned run holds one set of weights "
                              f"(weights.safetensors, tuned from {meta['base_run']} at {meta['base_tag']}); "
                              "--tag selects a checkpoint of a pretraining run")
        if meta["task"] != task:
            raise ConfigError(f"--ckpt {path}: fine-tuned for {meta['task']!r}, not {task!r}")
        run = load_run(path / meta["base_run"], meta["base_tag"], device="cpu")  # relative to path, or absolute
        # the fine-tuning config (the base run's + its overrides, e.g. a shorter data.max_items)
        # a run written before the option-tuning variants existed: its config lacks their keys and
        # its weights are the first variant's (options in the input, adapters), not today's defaults
        written = load_yaml_tree(path / "config.yaml").get("finetune") or {}
        legacy = {k: v for k, v in LEGACY_OPTION_TUNING.items() if k not in written}
        cfg = load_config(path / "config.yaml", {"finetune": legacy} if legacy else None)
        ft = cfg.finetune
        model = TaskModel(run.model, task, meta["method"], ft, answer_ids(run.tokenizer),
                          run.tokenizer.token_to_id(T.CONTEXT))
        raw = (path / "weights.safetensors").read_bytes()  # read once: hashed for the index cache, then loaded
        meta["loaded_sha256"] = hashlib.sha256(raw).hexdigest()
        weights = load_weights(raw)
        missing = set(model.trainable()) - set(weights)
        if missing:
            raise ConfigError(f"{path / 'weights.safetensors'}: missing {sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
        out_dir = path
    else:
        run = load_run(path, tag, device="cpu")
        ft = run.cfg.finetune
        model = TaskModel(run.model, task, "full", ft, answer_ids(run.tokenizer))
        meta = {"task": task, "method": "none", "base_run": str(path), "weights_sha256": ""}
        out_dir, cfg = None, run.cfg
    model.to(device).eval()
    return TaskRun(model, cfg, run.tokenizer, run.dataset_dir, meta, out_dir)


# ---------------------------------------------------------------------------
# Recommenders for m6rec eval / recommend
# ---------------------------------------------------------------------------
class Retriever:
    """Two-tower top-k: the cached item index times the query embedding, history excluded."""
    def __init__(self, run: TaskRun, ctx: ContextBuilder, batch_size: int = 64):
        self.run, self.ctx, self.batch_size = run, ctx, batch_size
        self.name = run.name
        self.catalog = np.array(ctx.catalog_ids, dtype=object)
        self.index = run.item_index(ctx)
        self.stats: dict = {}

    def rank_prompts(self, prompts: Sequence[Prompt], k: int, progress: bool = False) -> list[list[tuple[str, float]]]:
        t0 = time.perf_counter()
        q = self.run.embed(self.ctx, prompts, "query", self.batch_size, progress="rank users" if progress else None)
        scores = (q @ self.index.T).numpy()
        out = []
        for s, p in zip(scores, prompts):
            top = top_k_excluding(s, self.catalog, p.exclude, k)
            out.append([(i, float(s[self.ctx.item_index[i]])) for i in top])
        dt = time.perf_counter() - t0
        self.stats = {"users": len(prompts), "seconds": round(dt, 3), "seconds_per_user": round(dt / max(1, len(prompts)), 5)}
        return out

    def rank(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        return [[i for i, _ in r] for r in self.rank_prompts([self.ctx.for_query(q) for q in queries], k)]


def ranking_examples(ctx: ContextBuilder, data: EvalData, split: str, max_users: int = 0, seed: int = 0):
    """Held-out targets of ``split`` rated >= 4 (label 1) or <= 2 (label 0): (query, label)."""
    out = []
    for q in data.queries(split, max_users=max_users, seed=seed):
        items, ts, r = ctx.timeline(q.user_id)
        rating = r[len(q.history)]
        if np.isnan(rating) or 2 < rating < 4:
            continue
        out.append((q, int(rating >= 4)))
    return out


@torch.no_grad()
def ranking_scores(run: TaskRun, ctx: ContextBuilder, examples, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """P(yes) of each (query, label) example's target."""
    device = next(run.model.parameters()).device
    prompts = [run.prompt(ranking_prompt(ctx, ctx.for_query(q), q.target)) for q, _ in examples]
    out = np.zeros(len(prompts))
    for idx, batch in tqdm(batches_by_length(prompts, batch_size), desc=f"score {run.name}", unit="batch",
                           disable=not progress):
        b = collate(batch, ctx, run.pad_id, device)
        out[idx] = torch.sigmoid(run.model.ranking_logits(b)).cpu().numpy()
    return out


# ---------------------------------------------------------------------------
# The fine-tuning loop
# ---------------------------------------------------------------------------
def _batch(task: str, examples: Examples, ctx: ContextBuilder, model: TaskModel, rng, ft, pad_id, placeholder,
           device) -> dict:
    rows = examples.sample(rng, ft.batch_size)
    opt = lambda p: with_options(p, model.n_options, placeholder)  # noqa: E731
    if task == "ranking":
        prompts = [opt(ranking_prompt(ctx, p, item)) for p, item, _ in rows]
        labels = torch.tensor([r >= 4 for _, _, r in rows], dtype=torch.float32, device=device)
        return {"query": collate(prompts, ctx, pad_id, device), "labels": labels}
    index = ctx.item_index
    pos = [item for _, item, _ in rows]
    neg = [ctx.catalog_ids[i] for i in rng.integers(len(ctx.catalog_ids), size=ft.negatives)]
    cands = pos + neg
    return {
        "query": collate([opt(p) for p, _, _ in rows], ctx, pad_id, device),
        "items": collate([opt(ctx.for_item(i)) for i in cands], ctx, pad_id, device),
        "positives": torch.tensor([index[i] for i in pos], device=device),
        "candidates": torch.tensor([index[i] for i in cands], device=device),
    }


def finetune(base: str | Path, overrides: Sequence[str] = (), tag: Optional[str] = None) -> dict:
    """Fine-tune the run ``base`` (its config.yaml + ``overrides``); returns the summary."""
    import deepspeed  # heavy: loaded when a fine-tuning starts, not when eval imports this module

    base_run = open_run(base)
    base = base_run.run_dir
    cfg = load_config(base_run.config_file, list(overrides))
    ft = cfg.finetune
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError("config key 'deepspeed.zero_stage': 3 is not supported by m6rec finetune "
                          "(use 0-2; the fine-tuned models here fit one device)")
    for key in ("steps", "batch_size", "log_every", "temperature"):
        if getattr(ft, key) <= 0:
            raise ConfigError(f"config key 'finetune.{key}': bad value {getattr(ft, key)!r}; allowed: > 0")
    for key in ("negatives", "options", "adapter_dim", "warmup_steps", "lora_rank", "head_rank", "embed_lora_rank"):
        if getattr(ft, key) < 0:
            raise ConfigError(f"config key 'finetune.{key}': bad value {getattr(ft, key)!r}; allowed: >= 0")
    rank, world, device = init_distributed()
    run = base_run
    lm = run.load_model(tag, device="cpu")
    ctx = contexts_for(cfg, run.tokenizer, run.dataset_dir)
    examples = Examples(ctx, ft.task)
    model = TaskModel(lm, ft.task, ft.method, ft, answer_ids(run.tokenizer),
                      run.tokenizer.token_to_id(T.CONTEXT)).to(device)
    model.train()
    trainable = model.trainable()
    n_train = sum(v.numel() for v in trainable.values())
    n_lm = sum(p.numel() for p in model.lm.parameters())
    if ft.method == "option" and n_train > 0.01 * n_lm and rank == 0:
        log.warning("option tuning trains %d parameters, %.2f%% of the LM's %d (more than 1%%): lower "
                    "finetune.options or finetune.adapter_dim", n_train, 100 * n_train / n_lm, n_lm)
    out = Path(ft.run_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    # embeddings and option vectors (options.vectors, options.deep): no weight decay
    optimizer = torch.optim.AdamW(param_groups(model, ft.weight_decay, ("embed", "vectors", "deep")),
                                  lr=ft.lr, betas=(0.9, 0.98))
    ds_cfg = deepspeed_config(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, stream=dataclasses.replace(cfg.data.stream, batch_size=ft.batch_size)),
        train=dataclasses.replace(cfg.train, grad_accum=1)), world, device.type == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    metrics = MetricsLogger(out, to_dict(cfg), rank, world, dataclasses.replace(
        cfg.train.wandb, name=cfg.train.wandb.name or out.name))
    bar = progress_bar(total=ft.steps, desc=f"finetune {ft.task}/{ft.method}", rank=rank)
    pad_id, placeholder = run.tokenizer.token_to_id(T.PAD), run.tokenizer.token_to_id(T.CONTEXT)
    losses, t0, last = [], time.time(), {}
    for step in range(ft.steps):
        lr = warmup_cosine(step, ft.lr, ft.warmup_steps, ft.steps)  # decays to 0
        for g in optimizer.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng((ft.seed, step, rank))
        batch = _batch(ft.task, examples, ctx, model, rng, ft, pad_id, placeholder, device)
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        value = loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
        bar.update(1)
        if (step + 1) % ft.log_every == 0 or step + 1 == ft.steps:
            last = {"loss": float(np.mean(losses)), "lr": lr, "temperature": float(1 / model.log_scale.exp().clamp(max=100.0)),
                    "bias": float(model.bias), "seconds": round(time.time() - t0, 1)}
            metrics.log(step + 1, last)
            losses = []
    bar.close()
    metrics.close()
    # the base run relative to this directory: the pair can move together (to another disk or machine)
    summary = {"task": ft.task, "method": ft.method, "run_dir": str(out),
               "base_run": os.path.relpath(base.resolve(), out.resolve()),
               "base_tag": lm.checkpoint["tag"], "base_step": lm.checkpoint["step"],
               "steps": ft.steps, "world_size": world, "trained_parameters": n_train, "lm_parameters": n_lm,
               "trained_fraction": n_train / n_lm, "train_examples": len(examples),
               "seconds": round(time.time() - t0, 1), "final": last,
               "source_loaded": ctx.source_loaded}  # profiles/tags/posters in the prompts (eval must match)
    if rank == 0:
        sd = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable().items()}
        save_file(sd, str(out / "weights.tmp"))
        os.replace(out / "weights.tmp", out / "weights.safetensors")
        summary["weights_sha256"] = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
        (out / "finetune.json").write_text(json.dumps(summary, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier()  # before rank 0's index: no rank waits in a collective while it runs
    if rank == 0 and ft.task == "retrieval":
        # the serving index of the base catalog, from the saved run loaded as eval loads it
        # (fp32, whatever train.precision was), so eval and recommend find it in the cache
        tr = load_task_run(out, "retrieval")
        tr.item_index(ctx, progress=True)
    return summary


def main(cfg, args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = finetune(args.ckpt, args.overrides, args.tag)
    log.info("fine-tuned %s/%s: %d trained parameters (%.3f%% of the LM), final loss %.4f, %.0f s -> %s",
             s["task"], s["method"], s["trained_parameters"], 100 * s["trained_fraction"],
             s["final"].get("loss", float("nan")), s["seconds"], s["run_dir"])
    return 0
