"""``m6rec bench catalog``: what the catalog's size costs each item representation and item loss.

Synthetic catalogs (random item ids, random unit text vectors, random semantic IDs) of ``--sizes``
items, each crossed with {item tokens, text vectors} x {full, sampled} item loss, and semantic IDs
(3 codes of 256 and a numbering code per item, the ordinary next-token loss).  A cell is one fresh process (its
peak memory is its own): the real model and DeepSpeed engine (one rank, ZeRO 0, fp32, AdamW) at a
tiny width train on packed rows of item histories whose every position is an item label, then
answer single-user requests exactly: the history's forward, a score for every catalog item, the
top 10 (semantic IDs: the trie-constrained beam of ``m6rec eval``, width ``beam``, over the
catalog's codes; the codes are drawn at random, as the cost does not depend on how they were
found).  Per cell: ``step_ms`` (median train step), ``peak_mb`` (the process's peak resident
memory), ``params`` and ``serve_ms`` (median request on one thread); per representation and loss,
``growth_1m_over_10k`` (step time at 1M items over that at 10k).

A cell that would not fit says so instead of running: its memory is extrapolated (linearly in
the catalog) from the two smaller sizes' measured peaks and compared with the memory available.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from m6rec.bench.common import format_table, init_rank, machine, run_ranks
from m6rec.config import ConfigError, load_config
from m6rec.data.negatives import NegativeSampler
from m6rec.data.semantic_ids import number_collisions
from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.transformer import IGNORE_INDEX, M6Transformer
from m6rec.rec.evaluate import top_k_excluding
from m6rec.rec.generative import CatalogScorer, ItemTrie, trie_beam
from m6rec.train.item_rows import RowAdam, detach_table
from m6rec.train.step import build_engine

TEXT_VOCAB = 300  # a byte BPE's worth of non-item tokens (the Beauty preset's vocabulary before its items)
VECTOR_SLOT = 5  # the token id the vector slots carry
CELLS = [("item tokens", "full"), ("item tokens", "sampled"), ("text vectors", "full"), ("text vectors", "sampled"),
         ("semantic IDs", "full")]
SID_LEVELS, SID_CODES = 3, 256  # TIGER's shape: 3 codes of 256, then the numbering code
SIZES = "10k,100k,1M,10M"


def parse_sizes(text: str) -> list[int]:
    """``10k,1M`` -> [10000, 1000000]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        try:
            out.append(int(float(part.rstrip("km")) * mult))
        except ValueError:
            raise ConfigError(f"bench catalog --sizes: {part!r} is not a size like 10k or 1M") from None
    return out


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else \
        f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def semantic_codes(n: int, seed: int = 0) -> np.ndarray:
    """``[n, SID_LEVELS + 1]`` token ids (after ``TEXT_VOCAB``) of random semantic IDs, numbered where
    they collide (as :func:`m6rec.data.semantic_ids.number_collisions` does for real ones)."""
    codes = np.random.default_rng(seed).integers(0, SID_CODES, (n, SID_LEVELS))
    full = number_collisions(codes, SID_CODES)
    return TEXT_VOCAB + np.arange(SID_LEVELS + 1) * SID_CODES + full


def _batch(spec: dict, rng: np.random.Generator, codes: np.ndarray | None = None) -> dict:
    """``rows`` x ``seq_len`` packed item histories of ``history`` items, every next item a label
    (semantic IDs: every next code, ``codes`` holding each item's code tokens)."""
    B, T, n, H = spec["rows"], spec["seq_len"], spec["items"], spec["history"]
    if codes is not None:
        c = codes.shape[1]
        ids = codes[rng.integers(0, n, (B, T // c + 1))].reshape(B, -1)[:, :T]
        pos = np.arange(T) % (H * c)
        labels = np.where(pos[1:] > 0, ids[:, 1:], IGNORE_INDEX)  # no label across a history's end
        labels = np.concatenate([labels, np.full((B, 1), IGNORE_INDEX)], 1)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(np.broadcast_to(pos, (B, T)).copy()),
                "document_ids": torch.from_numpy(np.broadcast_to(np.arange(T) // (H * c), (B, T)).copy())}
    items = rng.integers(0, n, (B, T))
    docs = np.arange(T) // H
    pos = np.arange(T) % H
    last = (pos == H - 1) | (np.arange(T) == T - 1)
    labels = np.full((B, T), IGNORE_INDEX)
    if spec["repr"] == "item tokens":
        ids = items + TEXT_VOCAB
        labels[:, ~last] = ids[:, 1:][:, ~last[:-1]]
        extra = {}
    else:
        ids = np.full((B, T), VECTOR_SLOT)
        labels[:, ~last] = VECTOR_SLOT
        rows, cols = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
        extra = {"item_positions": torch.from_numpy(np.stack([rows.ravel(), cols.ravel()], 1)),
                 "item_catalog_rows": torch.from_numpy(items.ravel())}
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(np.broadcast_to(pos, (B, T)).copy()),
            "document_ids": torch.from_numpy(np.broadcast_to(docs, (B, T)).copy()), **extra}


def _cell(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One cell in its own process: build, train ``warmup + steps`` steps, serve ``requests``."""
    init_rank(rank, world, port, spec["threads"])
    codes = semantic_codes(spec["items"]) if spec["repr"] == "semantic IDs" else None
    model, step, times, loss = _train(spec, codes=codes)
    serve = _serve_codes(model, spec, codes) if codes is not None else _serve(model, spec, spec["repr"] == "item tokens")
    result = {"step_ms": round(1000 * statistics.median(times), 1), "final_loss": round(loss, 3),
              "params": sum(p.numel() for p in model.parameters()), **serve,
              "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def _train(spec: dict, world: int = 1, rank: int = 0, codes: np.ndarray | None = None):
    """The cell's model and engine (ZeRO ``spec["stage"]``, default 0), trained ``warmup + steps``
    steps; returns the model, the step, the timed steps' seconds and the last loss."""
    n, tokens, sid = spec["items"], spec["repr"] == "item tokens", codes is not None
    vocab = TEXT_VOCAB + n if tokens else TEXT_VOCAB + (SID_LEVELS + 1) * SID_CODES if sid else TEXT_VOCAB
    args = ModelArgs(dim=spec["dim"], n_layers=spec["layers"], n_heads=spec["heads"], ffn_hidden=4 * spec["dim"],
                     vocab_size=vocab, max_seq_len=spec["seq_len"], attention="causal",
                     item_vector_dim=0 if tokens or sid else spec["vector_dim"], item_proj="mlp")
    torch.manual_seed(0)
    model = M6Transformer(args)
    if not tokens and not sid:
        g = torch.Generator().manual_seed(1)
        bank = torch.empty(n, spec["vector_dim"])
        for s in range(0, n, 1 << 20):  # in blocks: no second catalog-sized temporary
            bank[s:s + (1 << 20)] = F.normalize(torch.randn(min(1 << 20, n - s), spec["vector_dim"], generator=g), dim=1)
        model.set_item_catalog(bank)
        del bank
    cfg = load_config(None, {"deepspeed": {"zero_stage": spec.get("stage", 0)},
                             "data": {"stream": {"seq_len": spec["seq_len"], "batch_size": spec["rows"]},
                                      "text": {"item_repr": "token" if tokens else
                                               "semantic_id" if sid else "vector"}},
                             "train": {"item_loss": spec["loss"], "item_negatives": spec["negatives"], "lr": 1e-3,
                                       "grad_clip": 1.0, "wandb": {"mode": "disabled"}}})
    sparse = tokens and spec["loss"] == "sampled" and spec.get("sparse_rows", True) and spec.get("stage", 0) < 3
    if sparse:
        detach_table(model)
    _, _, step, _ = build_engine(cfg, model, world, torch.device("cpu"))
    if sparse:
        step.rows = RowAdam(model.tok_embeddings.weight, model.row_grads, clip=1.0)
    if spec["loss"] == "sampled":
        if tokens:
            model.set_item_tokens(TEXT_VOCAB)
        names = np.arange(n) + (TEXT_VOCAB if tokens else 0)
        step.negatives = NegativeSampler(names, np.ones(n), spec["negatives"], in_batch=spec["in_batch"], seed=0,
                                         rank=rank)
    rng = np.random.default_rng(rank)
    batches = [_batch(spec, rng, codes) for _ in range(2)]
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        t = time.perf_counter()
        stats = step.run(i, 1e-3, [batches[i % 2]])
        loss = stats.values()["loss_sum"]  # the step's one host read: it has finished
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t)
    return model, step, times, loss


@torch.no_grad()
def _serve(model: M6Transformer, spec: dict, tokens: bool) -> dict:
    """Median latency of one exact top-10 request on one thread, as ``m6rec recommend`` serves it
    (:class:`CatalogScorer`, :func:`top_k_excluding`): a ``history``-item history's forward, the last
    position's log-probability for every catalog item, the top 10 outside the history.  The
    catalog's output embeddings are computed once beforehand (``catalog_ms``), as a server does at
    load.  One thread: torch's, and OpenBLAS's (``OPENBLAS_NUM_THREADS=1``, set for the cell)."""
    torch.set_num_threads(1)
    model.eval()
    t0 = time.perf_counter()
    scorer = CatalogScorer(model.head_weight[TEXT_VOCAB:] if tokens else model.catalog_embeddings())
    catalog_ms = 1000 * (time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    H, n, ms = spec["history"], spec["items"], []
    ids = np.arange(n)
    for r in range(spec["requests"] + 3):
        items = torch.from_numpy(rng.integers(0, n, (1, H)))
        if tokens:
            batch = Batch(input_ids=items + TEXT_VOCAB)
        else:
            batch = Batch(input_ids=torch.full((1, H), VECTOR_SLOT), item_catalog_rows=items[0],
                          item_positions=torch.stack([torch.zeros(H, dtype=torch.long), torch.arange(H)], 1))
        t = time.perf_counter()
        h = model.hidden_states(batch)[:, -1]
        top = top_k_excluding(scorer.log_probs(h)[0], ids, set(items[0].tolist()), 10)
        elapsed = 1000 * (time.perf_counter() - t)
        assert len(top) == 10
        if r >= 3:
            ms.append(elapsed)
    return {"serve_ms": round(statistics.median(ms), 2), "catalog_ms": round(catalog_ms, 1)}


@torch.no_grad()
def _serve_codes(model: M6Transformer, spec: dict, codes: np.ndarray) -> dict:
    """Median latency of one top-10 request as ``m6rec eval`` / ``recommend`` rank semantic IDs: a
    ``history``-item history's forward, then the trie-constrained beam (:func:`trie_beam`, width
    ``spec["beam"]``) down the catalog's codes, the history's items left out.  The trie is built once
    beforehand (``catalog_ms``), as at load."""
    torch.set_num_threads(1)
    model.eval()
    t0 = time.perf_counter()
    trie = ItemTrie(codes)
    catalog_ms = 1000 * (time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    H, n, ms = spec["history"], spec["items"], []
    for r in range(spec["requests"] + 3):
        items = rng.integers(0, n, H)
        ids = torch.from_numpy(codes[items].reshape(1, -1))
        L = ids.shape[1]
        batch = {"input_ids": ids, "position_ids": torch.arange(L)[None], "document_ids": torch.zeros(1, L, dtype=torch.long),
                 "prefix_mask": torch.zeros(1, L, dtype=torch.bool), "lengths": torch.tensor([L])}
        t = time.perf_counter()
        (finished,) = trie_beam(model, batch, trie, [sorted(set(items.tolist()))], spec["beam"], (), 0.0, 0)
        top = sorted(finished, key=lambda f: -f[0])[:10]
        elapsed = 1000 * (time.perf_counter() - t)
        assert len(top) == 10
        if r >= 3:
            ms.append(elapsed)
    return {"serve_ms": round(statistics.median(ms), 2), "catalog_ms": round(catalog_ms, 1)}


def _run_cell(spec: dict) -> dict:
    return run_ranks(_cell, 1, spec)  # one rank, in its own process: its peak memory is its own


def bench_catalog(cfg: Any, args: Any) -> dict[str, Any]:
    """The table of the module docstring, printed as it fills and returned as JSON."""
    quick = getattr(args, "quick", False)
    sizes = parse_sizes(getattr(args, "sizes", None) or ("1k,4k" if quick else SIZES))
    base = dict(dim=64, layers=2, heads=2, vector_dim=64, seq_len=256 if not quick else 64, rows=4, history=50,
                # no in-batch candidates: what the catalog costs, not what the batch costs
                negatives=256 if not quick else 32, in_batch=False, warmup=1 if quick else 2, steps=1 if quick else 5,
                requests=3 if quick else 20, threads=torch.get_num_threads(), beam=50)
    print(f"bench catalog: dim {base['dim']}, {base['layers']} layers, {base['rows']} x {base['seq_len']} tokens "
          f"a step (every next item a label), {base['negatives']} sampled negatives, {base['vector_dim']}-wide "
          f"text vectors; sizes {', '.join(_label(n) for n in sizes)}", flush=True)
    only = getattr(args, "only", None)
    if only not in (None, "cells", "zero", "semantic_ids"):
        raise ConfigError(f"bench catalog --only: {only!r}; allowed: cells, zero, semantic_ids")
    zero = [] if only in ("cells", "semantic_ids") else zero_memory(base, [1_000, 4_000] if quick else [10_000, 1_000_000],
                                                   (3,) if quick else (0, 2, 3))
    blas_threads = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # the cells' numpy (the serving product) on one thread
    try:
        cells = _run_cells(base, sizes, quick, only)
    finally:  # this process's own setting back, for whatever it spawns next
        if blas_threads is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = blas_threads
    growth = {}
    for repr_, loss in CELLS:
        by = {c["items"]: c for c in cells if c["repr"] == repr_ and c["loss"] == loss and "step_ms" in c}
        if 10_000 in by and 1_000_000 in by:
            growth[f"{repr_} {loss}"] = round(by[1_000_000]["step_ms"] / by[10_000]["step_ms"], 2)
    header = ["representation", "loss", "items", "step ms", "peak MB", "params", "serve ms (1 thread)"]
    rows = [[c["repr"], c["loss"], _label(c["items"]), c.get("step_ms", "-"), c.get("peak_mb", "-"),
             f"{c['params']:,}" if "params" in c else "-", c.get("serve_ms", c.get("skipped", "-"))] for c in cells]
    table = format_table(header, rows)
    print("\n".join(table))
    if growth:
        print("step time at 1M over 10k: " + ", ".join(f"{k} {v}x" for k, v in growth.items()))
    return {"machine": machine(), "settings": base, "cells": cells, "growth_1m_over_10k": growth,
            "zero_memory": zero, "markdown": table}


def _zero_rank(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One rank of the ZeRO part: train, then this rank's peak resident memory, gathered on rank 0."""
    init_rank(rank, world, port, spec["threads"])
    _, _, times, loss = _train(spec, world, rank)
    peaks = [None] * world
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_mb": peaks, "step_ms": round(1000 * statistics.median(times), 1),
                                         "final_loss": round(loss, 3)}))
    dist.barrier()
    dist.destroy_process_group()  # a rank that exits with its group open can abort the other (gloo)


def zero_memory(base: dict, sizes: list[int], stages: tuple[int, ...]) -> list[dict]:
    """Per-rank peak memory of the sampled item-token model on 2 ranks at each ZeRO stage, at each
    size; the growth between the smallest and the largest size is what the table (with its gradient
    and optimizer state, partitioned or not) costs a rank."""
    rows = []
    for stage in stages:
        by_size = {}
        for n in sizes:
            spec = {**base, "repr": "item tokens", "loss": "sampled", "items": n, "stage": stage, "threads": 1,
                    "warmup": 1, "steps": 2}
            by_size[n] = run_ranks(_zero_rank, 2, spec)
        small, large = by_size[sizes[0]], by_size[sizes[-1]]
        row = {"stage": stage, "items": sizes[-1], "step_ms": large["step_ms"],
               "peak_mb_per_rank": [round(p) for p in large["peak_mb"]],
               "table_mb_per_rank": [round(b - a) for a, b in zip(small["peak_mb"], large["peak_mb"])],
               "baseline_items": sizes[0]}
        rows.append(row)
        print(f"  ZeRO {stage}, 2 ranks, {_label(sizes[-1])} item tokens (sampled): peak {row['peak_mb_per_rank']} MB "
              f"per rank, {row['table_mb_per_rank']} MB more than at {_label(sizes[0])}; step {row['step_ms']} ms",
              flush=True)
    return rows


def _run_cells(base: dict, sizes: list[int], quick: bool, only) -> list[dict]:
    """Every (representation, loss, size) cell of the table, each in its own process."""
    cells: list[dict] = []
    chosen = [] if only == "zero" else [c for c in CELLS if c[0] == "semantic IDs"] if only == "semantic_ids" else CELLS
    for repr_, loss in chosen:
        done: list[dict] = []
        for n in sizes:
            row = {"repr": repr_, "loss": loss, "items": n}
            need = _extrapolated_mb(done, n)
            avail = _available_mb()
            if need is not None and need > 0.9 * avail:
                row["skipped"] = (f"needs ~{need / 1024:.1f} GiB (extrapolated from the {_label(done[-2]['items'])} "
                                  f"and {_label(done[-1]['items'])} cells' peaks), {avail / 1024:.1f} GiB available")
            else:
                try:
                    big = n >= 1_000_000 and not quick  # fewer steps where one takes seconds
                    row.update(_run_cell({**base, "repr": repr_, "loss": loss, "items": n,
                                          **({"warmup": 1, "steps": 3} if big else {})}))
                    done.append(row)
                except Exception as e:  # a cell that dies (e.g. killed for memory) is reported, not dropped
                    lines = [line for line in str(e).splitlines() if line.strip()]
                    row["skipped"] = f"failed: {lines[-1] if lines else type(e).__name__}"
            cells.append(row)
            print("  " + (f"{repr_:<12} {loss:<7} {_label(n):>5}: " +
                          (row["skipped"] if "skipped" in row else
                           f"step {row['step_ms']} ms, peak {row['peak_mb']:.0f} MB, serve {row['serve_ms']} ms, "
                           f"{row['params']:,} params")), flush=True)
    return cells


def _extrapolated_mb(done: list[dict], n: int) -> float | None:
    """Peak memory at ``n`` items, linear through the two largest measured cells (None: fewer than two)."""
    if len(done) < 2:
        return None
    a, b = done[-2], done[-1]
    slope = (b["peak_mb"] - a["peak_mb"]) / max(1, b["items"] - a["items"])
    return b["peak_mb"] + slope * (n - b["items"])
