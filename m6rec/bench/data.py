"""``m6rec bench data``: preparation throughput, reader throughput, and how far the
reader stays ahead of what one training rank consumes — measured side by side
in one run on the same machine (:func:`bench_pipeline`); with ``--dataset`` only the
reader's .npy decoding (:func:`bench_decode`), with ``--step-seconds`` too the data wait
of a training step (:func:`bench_wait`)."""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import m6rec.data.stream as S
from m6rec.bench.common import format_table
from m6rec.config import Config, ConfigError, load_config
from m6rec.data.loader import StreamLoader
from m6rec.data.prepare import prepare
from m6rec.model import build_model
from m6rec.model.batch import Batch


def bench_data(cfg: Any, args: Any) -> dict[str, Any]:
    """Preparation and reader throughput vs one training rank (:func:`bench_pipeline`).

    ``--config`` defaults to configs/data/ml-1m-partial.yaml; work files go to
    ``<data.output>.bench/``.  ``--dataset DIR`` (repeatable): only the reader's .npy decoding on
    prepared datasets, np.load against load_npy, at ``data.stream``'s batch shape; with
    ``--step-seconds S`` instead: the data wait of a training step of S seconds (bench_wait)."""
    if getattr(args, "step_seconds", None) is not None:  # the data wait a GPU's step would see
        if not getattr(args, "dataset", None):
            raise ConfigError("bench data --step-seconds needs --dataset DIR (a prepared dataset)")
        if args.step_seconds <= 0:
            raise ConfigError(f"bench data --step-seconds: bad value {args.step_seconds!r}; allowed: > 0")
        if cfg.data.stream.num_workers < 1:
            raise ConfigError("bench data --step-seconds measures DataLoader workers: set "
                              "--data.stream.num_workers to 1 or more")
        result = bench_wait(args.dataset, cfg, args.step_seconds)
        print(wait_table(result))
        return result
    if getattr(args, "dataset", None):  # only the reader's decoding, on datasets already prepared
        result = bench_decode(args.dataset, cfg)
        print(decode_table(result))
        return result
    if not getattr(args, "config", None):
        cfg = load_config("configs/data/ml-1m-partial.yaml", getattr(args, "overrides", None))
    result = bench_pipeline(cfg, Path(cfg.data.output + ".bench"))
    print(pipeline_table(result))
    return result


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_prepare(cfg: Config, workers: int, out_dir: Path) -> dict:
    data = dataclasses.replace(cfg.data, output=str(out_dir))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    manifest = prepare(data, workers=workers)
    seconds = time.perf_counter() - t0
    samples = sum(s["samples"] for s in manifest["splits"].values())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    size = _dir_bytes(out_dir)
    return dict(workers=workers, seconds=round(seconds, 2), samples=samples, tokens=tokens, bytes=size,
                samples_per_s=round(samples / seconds, 1), mb_per_s=round(size / seconds / 1e6, 2))


def bench_reader(dataset: Path, cfg: Config, num_workers: int, max_batches: int, max_seconds: float) -> dict:
    stream = dataclasses.replace(cfg.data.stream, num_workers=num_workers)
    loader = StreamLoader(dataset, "train", stream, rank=0, world_size=1)
    loader.next_epoch_lookahead = 0  # throughput of one epoch's workers, none started ahead beside them
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter() - t0
    n = samples = tokens = 0
    t1 = time.perf_counter()
    for batch in it:  # timed after the first batch: steady-state throughput
        n += 1
        samples += sum(len(k) for k in batch["sample_keys"])
        tokens += int((batch["document_ids"] >= 0).sum())
        if n >= max_batches or time.perf_counter() - t1 > max_seconds:
            break
    seconds = time.perf_counter() - t1
    del first, it
    return dict(num_workers=num_workers, first_batch_s=round(t_first, 2), batches=n, seconds=round(seconds, 2),
                batches_per_s=n / seconds, samples_per_s=round(samples / seconds, 1), tokens_per_s=round(tokens / seconds, 1),
                packing_efficiency=round(loader.packing_efficiency, 4))


def bench_train_consumption(dataset: Path, cfg: Config, model_preset: str, steps: int) -> dict:
    """Tokens/s one training rank of ``model_preset`` consumes (fp32 fwd+bwd+AdamW on CPU)."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    mcfg = load_config(model_preset).model
    mcfg = dataclasses.replace(mcfg, vocab_size=manifest["vocab_size"],
                               max_seq_len=max(mcfg.max_seq_len, cfg.data.stream.seq_len))
    torch.manual_seed(0)
    model = build_model(mcfg, image_size=manifest["image"]["size"], patch_size=manifest["image"]["patch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = StreamLoader(dataset, "train", dataclasses.replace(cfg.data.stream, num_workers=0),
                          rank=0, world_size=1)
    batches = [b for _, b in zip(range(steps + 1), loader)]

    def step(b):
        out = model(Batch.of(b))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    tokens = 0
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
        tokens += int((b["document_ids"] >= 0).sum())
    seconds = time.perf_counter() - t0
    return dict(model=model_preset, params=model.num_params(), steps=steps, seconds=round(seconds, 2),
                tokens_per_s=round(tokens / seconds, 1))


def bench_pipeline(cfg: Config, work_dir: Path, prepare_workers=(1, 2), loader_workers=(0, 1, 2),
               model_preset: str = "configs/model/small.yaml", max_batches: int = 1000, max_seconds: float = 40.0,
               train_steps: int = 3) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    result: dict = dict(dataset=cfg.data.name, seq_len=cfg.data.stream.seq_len, batch_size=cfg.data.stream.batch_size)
    result["prepare"] = [bench_prepare(cfg, w, work_dir / f"prepared-w{w}") for w in prepare_workers]
    dataset = work_dir / f"prepared-w{prepare_workers[-1]}"
    result["reader"] = [bench_reader(dataset, cfg, w, max_batches, max_seconds) for w in loader_workers]
    result["train_rank"] = bench_train_consumption(dataset, cfg, model_preset, train_steps)
    need = result["train_rank"]["tokens_per_s"]
    for r in result["reader"]:
        r["x_ahead_of_training"] = round(r["tokens_per_s"] / need, 1)
    result["target_x_ahead"] = 20
    return result


def bench_decode(datasets: list[str], cfg: Config, batches: int = 100, rounds: int = 5) -> dict:
    """The reader in this process (0 workers, :func:`bench_reader`) on prepared datasets at ``cfg``'s
    batch shape, with the shard members' .npy headers parsed by ``np.load`` and by
    :func:`m6rec.data.stream.load_npy`, alternated ``rounds`` times on the same batches so both meet the
    same machine load; the median of each."""
    fast = S.load_npy

    def by_np_load(data: bytes) -> np.ndarray:
        return np.load(io.BytesIO(data), allow_pickle=False)

    def batches_per_s(ds: str) -> tuple[float, float]:
        r = bench_reader(Path(ds), cfg, 0, batches, float("inf"))
        return r["batches_per_s"], r["tokens_per_s"]

    rows = []
    for ds in datasets:
        got: dict[str, list] = {"np.load": [], "load_npy": []}
        for _ in range(rounds):
            for name, fn in (("np.load", by_np_load), ("load_npy", fast)):
                S.load_npy = fn
                try:
                    got[name].append(batches_per_s(ds))
                finally:
                    S.load_npy = fast
        med = {k: (statistics.median(b for b, _ in v), statistics.median(t for _, t in v)) for k, v in got.items()}
        rows.append(dict(dataset=ds, batches=batches, rounds=rounds,
                         np_load_ms_per_batch=round(1e3 / med["np.load"][0], 1),
                         load_npy_ms_per_batch=round(1e3 / med["load_npy"][0], 1),
                         load_npy_tokens_per_s=round(med["load_npy"][1]), speedup=round(med["load_npy"][0] / med["np.load"][0], 2)))
    return dict(seq_len=cfg.data.stream.seq_len, batch_size=cfg.data.stream.batch_size, rows=rows)


def bench_wait(datasets: list[str], cfg: Config, step_seconds: float, epochs: int = 3, max_steps: int = 600) -> dict:
    """The data wait of training with a step of ``step_seconds`` during which this process idles, as it
    does while a GPU computes (a CPU-measurable stand-in for the GPU's data wait): ``epochs`` epochs (at
    most ``max_steps`` steps) of the train split with ``data.stream.num_workers`` real DataLoader
    workers, three loaders side by side on the same batches:

    * torch's defaults: 2 batches ready per worker, the next epoch's workers started at its first batch;
    * ``data.stream.prefetch_factor`` batches ready per worker;
    * that, and the next epoch's workers started :attr:`StreamLoader.NEXT_EPOCH_LOOKAHEAD` steps ahead
      (m6rec's loader).

    The first batch (start-up, the same for all) is not counted; the first epoch (workers filling
    their buffers together) and the later ones (what a long run sees) are reported apart."""
    variants = [("torch defaults (prefetch 2, workers restart per epoch)", 2, False),
                (f"prefetch {cfg.data.stream.prefetch_factor}", cfg.data.stream.prefetch_factor, False),
                (f"prefetch {cfg.data.stream.prefetch_factor}, next epoch {StreamLoader.NEXT_EPOCH_LOOKAHEAD} steps ahead"
                 " (m6rec)", cfg.data.stream.prefetch_factor, True)]
    rows = []
    for ds in datasets:
        for name, prefetch, ahead in variants:
            stream = dataclasses.replace(cfg.data.stream, prefetch_factor=prefetch)
            loader = StreamLoader(ds, "train", stream, rank=0, world_size=1)
            if not ahead:
                loader.next_epoch_lookahead = 0
            per_epoch = loader.steps_per_epoch
            waits, boundary = [], 0.0
            for e in range(epochs):
                it = iter(loader)
                for i in range(per_epoch):
                    if len(waits) == max_steps:
                        break
                    t = time.perf_counter()
                    next(it)
                    w = time.perf_counter() - t
                    waits.append(w)
                    if i == 0 and e > 0:
                        boundary += w
                    time.sleep(step_seconds)  # the accelerator's step: the host waits for it, idle
                del it
            loader.close()
            first, later = waits[1:per_epoch], waits[per_epoch:]
            rows.append(dict(dataset=ds, loader=name, steps=len(waits), steps_per_epoch=per_epoch,
                             first_epoch_wait_s=round(sum(first), 2), later_wait_s=round(sum(later), 2),
                             later_wait_share=round(sum(later) / max(1e-9, sum(later) + step_seconds * len(later)), 4),
                             epoch_boundary_wait_s=round(boundary, 2),
                             later_max_wait_s=round(max(later, default=0), 3)))
            del loader
    return dict(step_seconds=step_seconds, num_workers=cfg.data.stream.num_workers,
                seq_len=cfg.data.stream.seq_len, batch_size=cfg.data.stream.batch_size, rows=rows)


def pipeline_table(r: dict) -> str:
    t = r["train_rank"]
    return "\n".join([
        f"dataset {r['dataset']} (seq_len {r['seq_len']}, batch {r['batch_size']})", "",
        *format_table(["prepare workers", "seconds", "samples/s", "MB/s", "samples", "MB"],
                      [[p["workers"], p["seconds"], p["samples_per_s"], p["mb_per_s"], f"{p['samples']:,}",
                        f"{p['bytes'] / 1e6:.0f}"] for p in r["prepare"]]), "",
        *format_table(["loader workers", "first batch s", "samples/s", "tokens/s", "× one training rank"],
                      [[x["num_workers"], x["first_batch_s"], x["samples_per_s"], f"{x['tokens_per_s']:,.0f}",
                        f"{x['x_ahead_of_training']}×"] for x in r["reader"]]),
        f"\none training rank of `{t['model']}` ({t['params'] / 1e6:.1f}M params, fp32 CPU) consumes "
        f"{t['tokens_per_s']:,.0f} tokens/s; target: reader ≥ {r['target_x_ahead']}× ahead"])


def decode_table(r: dict) -> str:
    return "\n".join([
        f"reader, 0 workers, {r['batch_size']} x {r['seq_len']} tokens a batch", "",
        *format_table(["dataset", "np.load headers ms/batch", "load_npy ms/batch", "tokens/s (load_npy)", "speed-up"],
                      [[x["dataset"], x["np_load_ms_per_batch"], x["load_npy_ms_per_batch"],
                        f"{x['load_npy_tokens_per_s']:,}", f"{x['speedup']}x"] for x in r["rows"]])])


def wait_table(r: dict) -> str:
    return "\n".join([
        f"data wait at a {r['step_seconds']} s step (the host idle, as while a GPU computes); "
        f"{r['num_workers']} workers, {r['batch_size']} x {r['seq_len']} tokens a batch", "",
        *format_table(["dataset", "loader", "steps (per epoch)", "wait, first epoch s", "wait, later epochs s",
                       "share of their step time", "of it at epoch starts s", "longest later wait s"],
                      [[x["dataset"], x["loader"], f"{x['steps']} ({x['steps_per_epoch']})", x["first_epoch_wait_s"],
                        x["later_wait_s"], f"{x['later_wait_share']:.1%}", x["epoch_boundary_wait_s"],
                        x["later_max_wait_s"]] for x in r["rows"]])])
