"""Runs for tests: a tiny model trained a few steps on the generic shop, rank processes' environment,
and reading a run's trace and metrics back."""
from __future__ import annotations

import io
import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import webdataset as wds

from helpers.generic_data import generic_cfg
from m6rec.data import prepare as P
from m6rec.train.trainer import train

MODEL = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.ffn_hidden", "128",
         "--model.max_seq_len", "256", "--data.stream.seq_len", "256", "--data.stream.batch_size", "4",
         "--data.stream.num_workers", "0", "--train.steps", "6", "--train.warmup_steps", "2", "--train.lr", "0.003",
         "--train.log_every", "3", "--train.eval_every", "0", "--train.save_every", "0"]


def prepare_and_train(tmp, root, name, zero_stage, *extra):
    cfg = generic_cfg(root, tmp / f"ds_{name}", *MODEL, "--train.run_dir", str(tmp / f"run_{name}"),
                      "--deepspeed.zero_stage", str(zero_stage), *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the shop's deliberately broken poster
        P.prepare(cfg.data, workers=1)
    summary = train(cfg)
    assert summary["last_checkpoint"] == "step00000006"
    return tmp / f"run_{name}"


def shard_samples(ds_dir, split):
    manifest = json.loads((ds_dir / "manifest.json").read_text())
    for sh in manifest["splits"][split]["shards"]:
        for s in wds.WebDataset(str(ds_dir / sh["url"]), shardshuffle=False, empty_check=False):
            yield (json.loads(s["json"]), np.load(io.BytesIO(s["ids.npy"]), allow_pickle=False).astype(np.int64),
                   np.load(io.BytesIO(s["mask.npy"]), allow_pickle=False))


# --------------------------------------------------------------------------
# Launching
# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS", "M6REC_FAULT", "M6REC_FAULT_RANK") and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="disabled", WANDB_SILENT="true", M6REC_TRACE="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb-home" / var.lower())
    env.update(extra)
    return env


def read_trace(run_dir: Path, rank: int = 0) -> list[dict]:
    """The per-step records of a rank, the last one of each step (a resumed run repeats steps)."""
    path = run_dir / "trace" / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the line a SIGKILL cut
                continue
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
