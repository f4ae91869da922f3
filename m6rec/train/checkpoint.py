"""Atomic DeepSpeed checkpoints: every rank saves, a marker makes a save complete.

Layout under ``<run_dir>/checkpoints/``::

    step00000100/            one DeepSpeed tag (model, optimizer, scheduler shards)
        m6rec_rank{r}.pt     per-rank state DeepSpeed does not keep: RNGs, stream position
        COMPLETE             written by rank 0 after every rank has finished writing
    latest                   DeepSpeed's pointer file; moved (os.replace) only after COMPLETE

A crash or kill at any moment of a save leaves a tag without ``COMPLETE`` and
``latest`` still naming the previous complete tag; ``--resume auto`` loads
that one, and the next successful save removes the debris.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fault(name: str, step: int) -> None:
    """Test hook: ``M6REC_FAULT=<name>@<step>`` kills this process at a named point."""
    spec = os.environ.get("M6REC_FAULT", "")
    if spec == f"{name}@{step}":
        os._exit(17)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def latest_complete(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names if it is complete, else the newest complete tag."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).is_file():
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int) -> str:
    """Collective: every rank must call it (DeepSpeed writes per-rank shards)."""
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # save_latest=False: DeepSpeed would otherwise rewrite `latest` before the
    # other ranks finish, pointing at a checkpoint that may never be complete.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"m6rec_rank{rank}.pt")
    _fault("crash_in_save", step)
    _barrier()
    if rank == 0:
        (ckpt_dir / tag / COMPLETE).write_text(f"{step}\n")
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        _prune(ckpt_dir, keep_last, keep=tag)
    _barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    # Incomplete tags older than the newest complete one are debris of crashed saves.
    doomed += [p.name for p in ckpt_dir.iterdir()
               if TAG_RE.match(p.name) and not (p / COMPLETE).is_file() and p.name < keep]
    for tag in doomed:
        if tag != keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict, Optional[dict]]:
    """Load a complete tag into the engine; return (client_state, this rank's state or None)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rank_file = ckpt_dir / tag / f"m6rec_rank{rank}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return client_state or {}, rank_state


def saved_world_size(ckpt_dir: Path, tag: str) -> int:
    return len(list((ckpt_dir / tag).glob("m6rec_rank*.pt")))


def describe(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    files = sorted(p.name for p in (ckpt_dir / tag).iterdir())
    return {"tag": tag, "files": files, "world_size": saved_world_size(ckpt_dir, tag)}
