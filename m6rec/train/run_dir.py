"""A run directory of ``m6rec train``, opened in one place::

    RUN_DIR/config.yaml          the resolved configuration; data.output names the prepared dataset
    RUN_DIR/checkpoints/TAG/     DeepSpeed checkpoints; a complete one holds the COMPLETE marker
    RUN_DIR/best.json            the tag train.select_by chose (m6rec.train.select writes it)

:func:`open_run` reads the configuration and the dataset the run trained on
(manifest, tokenizer); :func:`resolve_checkpoint` turns a tag (explicit,
``best``, or none: the newest complete) into a checkpoint; :func:`fp32_state_dict`
reads a checkpoint's weights (any ZeRO stage, on the CPU); :meth:`Run.load_model`
and :func:`load_run` build the model with them.  Every reader of a run goes
through here: ``m6rec eval``/``recommend``/``export``/``finetune``, ``--resume TAG``, the
``run:`` item encoder (data.text.item_encoder) and ``model.init_from: run:``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from m6rec.config import Config, ConfigError, load_config
from m6rec.data.tokenizer import load_tokenizer
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.train import checkpoint as ckpt

log = logging.getLogger("m6rec.train")

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST_FILE = "best.json"
BEST_TAG = "best"  # --tag best: the tag BEST_FILE names


def run_root(path: str | Path) -> Path:
    """``RUN_DIR`` or ``RUN_DIR/checkpoints`` -> ``RUN_DIR``."""
    path = Path(path)
    return path.parent if path.name == CHECKPOINTS else path


def read_best(run_dir: str | Path) -> Optional[dict]:
    f = Path(run_dir) / BEST_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def resolve_checkpoint(path: str | Path, tag: Optional[str] = None, label: Optional[str] = None) -> tuple[Path, str]:
    """``RUN_DIR``, ``RUN_DIR/checkpoints`` or ``RUN_DIR/checkpoints/TAG`` -> (checkpoint dir, complete tag).

    ``tag``: a tag like ``step00001000``, ``best`` (the tag ``RUN_DIR/best.json`` names), or None: the
    tag the path names, else the newest complete one.  ``label`` is how the user named the run and the
    tag (a flag or a config key), the start of every error message; default ``--ckpt PATH [--tag TAG]``."""
    path = Path(path)
    label = label or f"--ckpt {path}" + (f" --tag {tag}" if tag else "")
    if tag is None and ckpt.TAG_RE.match(path.name) and path.is_dir():  # RUN_DIR/checkpoints/TAG
        ckpt_dir, tag = path.parent, path.name
    else:
        ckpt_dir = path if path.name == CHECKPOINTS else path / CHECKPOINTS
    if tag == BEST_TAG:
        best = read_best(ckpt_dir.parent)
        if best is None:
            raise ConfigError(f"{label}: {ckpt_dir.parent / BEST_FILE} missing (written by a run with "
                              "train.select_by)")
        tag = best["tag"]
    if tag is None:
        tag = ckpt.latest_complete(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            raise ConfigError(f"{label}: no complete checkpoint in {ckpt_dir} (is it a run directory written by "
                              "`m6rec train`?)")
    elif not ckpt.is_complete(ckpt_dir, tag):
        why = (f"no {ckpt.COMPLETE} marker: its save was interrupted" if (ckpt_dir / tag).is_dir()
               else "no such directory")
        raise ConfigError(f"{label}: {ckpt_dir / tag} is not a complete checkpoint ({why}); complete ones: "
                          f"{ckpt.complete_tags(ckpt_dir)}")
    return ckpt_dir, tag


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint, on the CPU.  ZeRO 1-3 checkpoints are merged from the
    optimizer's fp32 master partitions (DeepSpeed's ``zero_to_fp32``: no GPU, no process group); a
    stage-0 checkpoint holds the whole module already."""
    meta = ckpt.read_meta(ckpt_dir, tag)
    if meta.get("zero_stage", 1) == 0:
        sd = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,  # deepspeed: heavy
        )

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def _fp32_state_dict_quietly(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """:func:`fp32_state_dict` with DeepSpeed's accelerator choice and console chatter kept out of
    an inference command's output."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fp32_state_dict(ckpt_dir, tag)


@dataclass(frozen=True)
class Run:
    """A run directory's configuration and the prepared dataset it trained on (no weights yet)."""

    run_dir: Path
    cfg: Config
    dataset_dir: Path
    manifest: dict
    tokenizer: object

    @property
    def config_file(self) -> Path:
        return self.run_dir / CONFIG_FILE

    def checkpoint(self, tag: Optional[str] = None, label: Optional[str] = None) -> tuple[Path, str]:
        """(checkpoint dir, complete tag): :func:`resolve_checkpoint` of this run."""
        return resolve_checkpoint(self.run_dir, tag, label)

    def load_model(self, tag: Optional[str] = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model of the newest complete checkpoint (or ``tag``) with its fp32 weights, in eval mode,
        with the manifest's vocabulary; it carries ``model.checkpoint = {"run_dir", "tag", "step"}``."""
        ckpt_dir, tag = self.checkpoint(tag)
        meta = ckpt.read_meta(ckpt_dir, tag)
        if "model_args" in meta:
            args = ModelArgs.from_dict(meta["model_args"])
        else:
            args = ModelArgs.from_config(self.cfg)
        args = ModelArgs.from_dict({**args.to_dict(), "vocab_size": self.manifest["vocab_size"], "compile": False,
                                    "init_from": None, "activation_checkpointing": False})
        model = build_model(args, device="cpu")
        model.load_state_dict(_fp32_state_dict_quietly(ckpt_dir, tag), strict=True)
        model.to(device).eval()
        model.checkpoint = {"run_dir": str(self.run_dir), "tag": tag, "step": meta.get("step")}
        return model


def open_run(path: str | Path) -> Run:
    """``RUN_DIR`` (or ``RUN_DIR/checkpoints``): its ``config.yaml`` and the prepared dataset it names
    (``cfg.data.output``: manifest and tokenizer)."""
    run_dir = run_root(path)
    cfg_file = run_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"--ckpt {run_dir}: {cfg_file} missing (is it a run directory written by `m6rec train`?)")
    cfg = load_config(cfg_file)
    dataset_dir = Path(cfg.data.output)
    if not (dataset_dir / "manifest.json").is_file():
        raise ConfigError(f"{cfg_file}: data.output={cfg.data.output} holds no prepared dataset (manifest.json "
                          f"missing; relative paths resolve against the current directory {Path.cwd()})")
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    return Run(run_dir, cfg, dataset_dir, manifest, load_tokenizer(dataset_dir / "tokenizer.json"))


class LoadedRun(NamedTuple):
    model: torch.nn.Module
    cfg: Config
    tokenizer: object
    dataset_dir: Path


def load_run(path: str | Path, tag: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedRun:
    """A trained run ready for inference: ``(model, cfg, tokenizer, dataset_dir)`` (:func:`open_run`,
    then :meth:`Run.load_model`)."""
    run = open_run(path)
    return LoadedRun(run.load_model(tag, device), run.cfg, run.tokenizer, run.dataset_dir)


def init_from_run(model: torch.nn.Module, run_dir: str | Path, rank: int) -> None:
    """``model.init_from: run:RUN_DIR``: the weights of that run's newest complete checkpoint (fine-tuning
    a pretrained run on other data, e.g. the zero-shot source on its target)."""
    label = f"model.init_from run:{run_dir}"
    ckpt_dir, tag = resolve_checkpoint(run_dir, label=label)
    try:
        model.load_state_dict(fp32_state_dict(ckpt_dir, tag), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{label}: its {tag} does not fit this model (same model settings and vocabulary "
                          f"needed): {str(e).splitlines()[0]}") from None
    if rank == 0:
        log.info("model initialised from %s (weights only; a fresh optimizer)", ckpt_dir / tag)
