"""``m6rec export``: a ZeRO checkpoint -> consolidated fp32 safetensors, or a Hugging Face Llama directory.

    m6rec export --ckpt RUN_DIR/checkpoints [--to fp32] OUT        the newest complete checkpoint
    m6rec export --ckpt RUN_DIR/checkpoints/step00001000 --to hf OUT

``fp32``: ``OUT/model.safetensors`` (or ``OUT`` itself when it ends in
``.safetensors``) holds every parameter of the model in float32, named as in
``M6Transformer.state_dict()``, with ``OUT/m6rec_model.json`` (the model
args).  ZeRO 1/2/3 checkpoints are merged from the optimizer's fp32 master
partitions (DeepSpeed's ``zero_to_fp32``, which needs no GPU and no process
group); a stage-0 checkpoint holds the whole module already.

``hf``: the model library's Llama export (:func:`m6rec.model.hf.export_hf`)
of those weights, with the run's tokenizer when it still exists.

Only complete checkpoints (with the ``COMPLETE`` marker) are exported.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from m6rec.config import ConfigError
from m6rec.train import checkpoint as ckpt


def resolve(path: str | Path) -> tuple[Path, str]:
    """``RUN_DIR/checkpoints`` (newest complete tag) or ``RUN_DIR/checkpoints/TAG`` -> (ckpt_dir, tag)."""
    path = Path(path)
    if ckpt.TAG_RE.match(path.name) and path.is_dir():
        if not ckpt.is_complete(path.parent, path.name):
            raise ConfigError(f"--ckpt {path}: not a complete checkpoint (no {ckpt.COMPLETE} marker: "
                              f"its save was interrupted)")
        return path.parent, path.name
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    tag = ckpt.latest_complete(path)
    if tag is None:
        raise ConfigError(f"--ckpt {path}: no complete checkpoint there")
    return path, tag


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a checkpoint, on the CPU."""
    meta = ckpt.read_meta(ckpt_dir, tag)
    if meta.get("zero_stage", 1) == 0:
        sd = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def export(ckpt_path: str | Path, to: str, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from m6rec.model.args import ModelArgs

    ckpt_dir, tag = resolve(ckpt_path)
    meta = ckpt.read_meta(ckpt_dir, tag)
    sd = fp32_state_dict(ckpt_dir, tag)
    out = Path(out)
    args = ModelArgs.from_dict(meta["model_args"]) if "model_args" in meta else None
    if to == "fp32":
        target = out if out.suffix == ".safetensors" else out / "model.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(target), metadata={"format": "pt", "m6rec_checkpoint": str(ckpt_dir / tag)})
        if args is not None:
            (target.parent / "m6rec_model.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        return target
    if to == "hf":
        from m6rec.model import build_model
        from m6rec.model.hf import export_hf

        if args is None:
            raise ConfigError(f"--to hf: {ckpt_dir / tag} has no model args in its {ckpt.COMPLETE} marker")
        args = ModelArgs.from_dict({**args.to_dict(), "compile": False, "init_from": None})
        model = build_model(args)
        model.load_state_dict(sd, strict=True)
        tok = meta.get("tokenizer")
        return export_hf(model, args, out, tokenizer_path=tok if tok and Path(tok).is_file() else None)
    raise ConfigError(f"--to: expected 'fp32' or 'hf', got {to!r}")


def main(cfg, args) -> int:
    out = export(args.ckpt, args.to, args.out)
    print(f"m6rec export: {args.to} weights written to {out}")
    return 0
