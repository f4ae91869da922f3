"""``m6rec bench model``: forward+backward of the model alone against transformers' Llama of the same
shape and weights (fp32, CPU), on equal rows and on packed rows against padded ones; on a CUDA
machine also the ``350m`` preset in bf16 (:func:`bench_model_gpu`)."""
from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m6rec.bench.common import (
    MODEL_PRESETS,
    clock,
    machine,
    synthetic_batch,
    time_steps,
)
from m6rec.config import load_config
from m6rec.model import apply_compile, build_model
from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.hf import llama_config_dict, m6rec_to_llama
from m6rec.model.info import flops_per_token
from m6rec.train.peak import measure_matmul_peak


def _small_args(cfg: Any, args: Any):
    """The preset to benchmark: ``--config`` when given, else configs/model/small.yaml."""
    if getattr(args, "config", None):
        return ModelArgs.from_config(cfg)
    return ModelArgs.from_config(load_config(MODEL_PRESETS / "small.yaml"))


def llama_twin(model):
    """A transformers LlamaForCausalLM of identical shape and weights."""
    from transformers import (  # heavy: transformers, only for the comparison
        LlamaConfig,
        LlamaForCausalLM,
    )

    c = llama_config_dict(model.args)
    c.pop("dtype")
    llama = LlamaForCausalLM(LlamaConfig(**c))
    sd, _ = m6rec_to_llama(model.state_dict(), model.args)
    missing, unexpected = llama.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return llama.train()


# Sample lengths of a preliminary ``m6rec prepare`` of ml-1m-partial (defaults: 20 items
# a window, stride 10, BPE 8192; 46,510 train windows): 5/25/50/75/95th percentiles
# 233/289/347/405/483 tokens, max 726.  A log-normal with that median and spread
# stands in until a prepared dataset is passed with --config.
ML1M_MEDIAN, ML1M_SIGMA, ML1M_MIN, ML1M_MAX = 347, 0.22, 50, 726


def _lengths(cfg: Any, args: Any, n: int, max_len: int, seed: int) -> tuple[list[int], str]:
    """Sample lengths: from a prepared dataset's manifest when ``--config`` names
    one, else the synthetic ml-1m-partial stand-in above."""
    rng = np.random.default_rng(seed)
    manifest = Path(getattr(getattr(cfg, "data", None), "output", "") or "nonexistent") / "manifest.json"
    if getattr(args, "config", None) and manifest.is_file():
        m = json.loads(manifest.read_text())
        lens = [L for s in m["splits"]["train"]["shards"] for L in s["lengths"]]
        picked = rng.choice(np.array(lens), size=min(n, len(lens)), replace=False)
        return [int(min(L, max_len)) for L in picked], f"manifest:{manifest}"
    lens = np.clip(rng.lognormal(math.log(ML1M_MEDIAN), ML1M_SIGMA, size=n), ML1M_MIN, min(ML1M_MAX, max_len))
    return [int(L) for L in lens], (f"synthetic: log-normal(median {ML1M_MEDIAN}, sigma {ML1M_SIGMA}) clipped to "
                                     f"[{ML1M_MIN}, {ML1M_MAX}], shaped like a preliminary ml-1m-partial prepare")


def _pack_rows(lengths: list[int], T: int) -> list[list[int]]:
    """First-fit decreasing: longest first, each into the first row with room
    (what a packer with a buffer of this many samples can do)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for L in sorted(lengths, reverse=True):
        for i, r in enumerate(room):
            if L <= r:
                rows[i].append(L)
                room[i] -= L
                break
        else:
            rows.append([L])
            room.append(T - L)
    return rows


def _packed_batches(packed_rows: list[list[int]], T: int, rows: int, vocab: int, seed: int):
    """m6rec side: ``rows`` packed rows a batch.  Each document: first half
    context (bidirectional prefix, no loss), second half targets (loss)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(0, len(packed_rows), rows):
        group = packed_rows[i:i + rows]
        B = len(group)
        b = dict(input_ids=torch.randint(0, vocab, (B, T), generator=g), labels=torch.full((B, T), -100),
                 position_ids=torch.zeros(B, T, dtype=torch.long), document_ids=torch.full((B, T), -1),
                 prefix_mask=torch.zeros(B, T, dtype=torch.bool))
        for r, docs in enumerate(group):
            t = 0
            for d, L in enumerate(docs):
                ctx = L // 2
                b["position_ids"][r, t:t + L] = torch.arange(L)
                b["document_ids"][r, t:t + L] = d
                b["prefix_mask"][r, t:t + ctx] = True
                b["labels"][r, t + ctx - 1:t + L - 1] = b["input_ids"][r, t + ctx:t + L]
                t += L
        batches.append(b)
    return batches


def _padded_batches(lengths: list[int], per_batch: int, vocab: int, seed: int):
    """Reference side: ``per_batch`` samples a batch, each padded to the batch's longest (right padding)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(0, len(lengths), per_batch):
        group = lengths[i:i + per_batch]
        B, T = len(group), max(group)
        ids = torch.randint(0, vocab, (B, T), generator=g)
        att = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100)
        for r, L in enumerate(group):
            att[r, :L] = 1
            labels[r, L // 2:L] = ids[r, L // 2:L]  # HF shifts internally: same target tokens as m6rec
        batches.append(dict(input_ids=ids, attention_mask=att, labels=labels))
    return batches


def _summary(flops_per_token: float, tokens: int, walls: list[float], cpus: list[float], peak: dict,
             threads: int) -> dict[str, Any]:
    """Rates from per-round (wall, CPU) seconds: the best round, the median, and MFU both ways."""
    w, c = min(walls), min(cpus) / threads
    return dict(tokens_per_s=tokens / w, flops=flops_per_token * tokens / w, mfu=flops_per_token * tokens / w / peak["flops"],
                median_tokens_per_s=tokens / statistics.median(walls),
                tokens_per_cpu_s=tokens / c, mfu_cpu_time=flops_per_token * tokens / c / peak["flops_per_cpu_s"],
                rounds_wall_s=walls, rounds_cpu_s=cpus)


def bench_model(cfg: Any, args: Any) -> dict[str, Any]:
    """Forward+backward throughput of the small preset vs transformers' Llama (fp32, CPU).

    Three contenders on the same batches: m6rec eager, m6rec with each block
    ``torch.compile``d (inductor), and ``LlamaForCausalLM`` (eager, SDPA) with
    identical shape and weights.  Contenders run interleaved, round by round,
    and the matmul peak is re-measured every round, so a busy machine slows
    them alike; each contender's best round is the headline, medians are
    kept.  Every step is timed in wall-clock and in process CPU time (the
    latter is what a shared machine disturbs least; see docs/performance.md)."""
    t_start = time.perf_counter()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    margs = _small_args(cfg, args)
    margs = ModelArgs.from_dict({**margs.to_dict(), "init_from": None, "attn_impl": "auto", "compile": False})
    T = margs.max_seq_len
    result: dict[str, Any] = dict(bench="model", machine=machine(), load_avg_start=os.getloadavg(),
                                  preset=margs.preset, args=margs.to_dict(), dtype="float32", device="cpu")

    eager = build_model(margs).train()
    compiled = apply_compile(copy.deepcopy(eager))
    llama = llama_twin(eager)
    assert eager.num_params() == (sum(p.numel() for p in llama.parameters())
                                  + sum(p.numel() for p in eager.patch_embed.parameters()))
    fpt = flops_per_token(margs, T)

    def m6_step(model):
        def step(batch):
            model.zero_grad(set_to_none=True)
            loss = model(Batch.of(batch)).loss
            loss.backward()
            return float(loss.detach())
        return step

    def llama_step(batch):
        llama.zero_grad(set_to_none=True)
        loss = llama(**batch).loss
        loss.backward()
        return float(loss.detach())

    steps = {"m6rec_eager": m6_step(eager), "m6rec_compiled": m6_step(compiled), "llama": llama_step}

    def timed(f, batch) -> tuple[float, float]:
        w, c = clock()
        f(batch)
        w2, c2 = clock()
        return w2 - w, c2 - c

    # --- 1. equal batches: full rows of T tokens, causal, the same for all -----------
    B, n_rounds = 2, 4
    causal = synthetic_batch(margs.vocab_size, B, T, causal=True)  # m6rec takes labels already shifted
    batch_of = {"m6rec_eager": causal, "m6rec_compiled": causal,
                "llama": dict(input_ids=causal["input_ids"], labels=causal["input_ids"])}
    t = time.perf_counter()
    losses = {k: f(batch_of[k]) for k, f in steps.items()}  # warm-up (compiles)
    warm_s = time.perf_counter() - t
    walls, cpus, peaks = {k: [] for k in steps}, {k: [] for k in steps}, []
    for _ in range(n_rounds):
        peaks.append(measure_matmul_peak(torch.float32, "cpu", seconds=0.3))
        for k, f in steps.items():
            w, c = timed(f, batch_of[k])
            walls[k].append(w)
            cpus[k].append(c)
    peak = dict(flops=max(p["flops"] for p in peaks), flops_per_cpu_s=max(p["flops_per_cpu_s"] for p in peaks),
                rounds=[p["flops"] for p in peaks], rounds_per_cpu_s=[p["flops_per_cpu_s"] for p in peaks],
                threads=threads, how="best fp32 square matmul (1024, 2048) of each round")
    result["matmul_peak"] = peak
    equal: dict[str, Any] = dict(batch=[B, T], tokens_per_step=B * T, flops_per_token=fpt["total"],
                                 flops_per_token_causal_halved=fpt["total_causal_halved"], losses=losses,
                                 warmup_s=warm_s)
    for k in steps:
        equal[k] = _summary(fpt["total"], B * T, walls[k], cpus[k], peak, threads)
        equal[k]["mfu_causal_halved"] = equal[k]["mfu"] * fpt["total_causal_halved"] / fpt["total"]
    for k in ("m6rec_eager", "m6rec_compiled"):
        equal[f"speedup_{k.split('_')[1]}_vs_llama"] = min(walls["llama"]) / min(walls[k])
        equal[f"speedup_{k.split('_')[1]}_vs_llama_cpu_time"] = min(cpus["llama"]) / min(cpus[k])
    result["equal_batches"] = equal

    # --- 2. packed (m6rec: prefix + document masks) vs padded per sample (Llama) -------
    Tp = getattr(getattr(getattr(cfg, "data", None), "stream", None), "seq_len", 1024)  # the stream's row length
    per_batch, pool, timed_rows = 8, 240, 8
    # The stream packs first-fit-decreasing over a block of shards (thousands of samples);
    # here: a pool of 240 samples, of whose packed rows 8 chosen at random are timed.
    # The reference gets the same samples in random order, 8 a batch, each batch padded.
    pool_lengths, source = _lengths(cfg, args, n=pool, max_len=Tp, seed=1)
    all_rows = _pack_rows(pool_lengths, Tp)
    pick = random.Random(3).sample(range(len(all_rows)), min(timed_rows, len(all_rows)))
    packed_rows = [all_rows[i] for i in sorted(pick)]
    lengths = [L for r in packed_rows for L in r]
    random.Random(4).shuffle(lengths)
    packed = _packed_batches(packed_rows, Tp, 1, margs.vocab_size, seed=2)
    padded = _padded_batches(lengths, per_batch, margs.vocab_size, seed=2)
    useful = sum(lengths)
    data_of = {"m6rec_eager": packed, "m6rec_compiled": packed, "llama": padded}
    t = time.perf_counter()
    for k, f in steps.items():  # warm-up: the masked path compiles a second graph
        f(data_of[k][0])
    warm_s = time.perf_counter() - t
    tot_w, tot_c = {k: 0.0 for k in steps}, {k: 0.0 for k in steps}
    for i in range(max(len(d) for d in data_of.values())):  # interleaved, batch by batch
        best_w, best_c = {k: math.inf for k in steps}, {k: math.inf for k in steps}
        for _ in range(2):  # each batch twice, the faster counts (as for the equal batches)
            for k, f in steps.items():
                if i < len(data_of[k]):
                    w, c = timed(f, data_of[k][i])
                    best_w[k], best_c[k] = min(best_w[k], w), min(best_c[k], c)
        for k in steps:
            if i < len(data_of[k]):
                tot_w[k] += best_w[k]
                tot_c[k] += best_c[k]
    padded_tokens = sum(int(b["input_ids"].numel()) for b in padded)
    pk: dict[str, Any] = dict(length_source=source, pool_samples=len(pool_lengths),
                              pool_packing_efficiency=sum(pool_lengths) / (len(all_rows) * Tp),
                              samples=len(lengths), useful_tokens=useful, mean_length=useful / len(lengths),
                              seq_len=Tp, packed_rows=len(packed_rows),
                              packing_efficiency=useful / (len(packed_rows) * Tp), padded_tokens=padded_tokens,
                              padding_efficiency=useful / padded_tokens, llama_samples_per_batch=per_batch,
                              warmup_s=warm_s)
    for k in steps:
        pk[k] = dict(seconds=tot_w[k], useful_tokens_per_s=useful / tot_w[k],
                     cpu_seconds=tot_c[k], useful_tokens_per_cpu_s=useful / (tot_c[k] / threads))
    for k in ("m6rec_eager", "m6rec_compiled"):
        pk[f"speedup_{k.split('_')[1]}_vs_llama"] = tot_w["llama"] / tot_w[k]
        pk[f"speedup_{k.split('_')[1]}_vs_llama_cpu_time"] = tot_c["llama"] / tot_c[k]
    result["packed_vs_padded"] = pk
    if torch.cuda.is_available():
        try:
            result["gpu"] = bench_model_gpu()
        except Exception as e:  # never lose the CPU results to a GPU problem
            result["gpu"] = dict(error=f"{type(e).__name__}: {e}")
    result["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    return result


H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (torchtitan's table; docs/performance.md)


def bench_model_gpu(preset: str = "350m", seq_len: int = 2048, batch: int = 4, steps: int = 10) -> dict[str, Any]:
    """The ``350m`` preset in bf16 on one GPU: full causal rows (SDPA flash) and
    packed prefix rows (FlexAttention), each block compiled; MFU against the
    H100's 989 TFLOP/s dense bf16."""
    margs = ModelArgs.from_config(load_config(MODEL_PRESETS / f"{preset}.yaml"), max_seq_len=seq_len,
                                  activation_checkpointing=False)
    torch.manual_seed(0)
    model = apply_compile(build_model(margs, device="cuda").train())
    fpt = flops_per_token(margs, seq_len)
    V, B, T = margs.vocab_size, batch, seq_len
    cases = {"causal": synthetic_batch(V, B, T, causal=True),
             "packed_prefix": synthetic_batch(V, B, T, doc_len=512)}  # 4 documents of 512 a row
    cases = {k: {n: t.to("cuda") for n, t in b.items()} for k, b in cases.items()}
    out: dict[str, Any] = dict(device=torch.cuda.get_device_name(0), preset=preset, dtype="bfloat16", batch=[B, T],
                               flops_per_token=fpt["total"], peak_flops=H100_BF16_DENSE)

    def step(b):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(Batch.of(b)).loss
        loss.backward()

    for name, b in cases.items():
        try:
            dt = time_steps(lambda: step(b), 3, steps, cuda=True)
            out[name] = dict(step_s=dt, tokens_per_s=B * T / dt, mfu=fpt["total"] * B * T / dt / H100_BF16_DENSE,
                             mfu_causal_halved=fpt["total_causal_halved"] * B * T / dt / H100_BF16_DENSE,
                             max_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {e}")
    return out
