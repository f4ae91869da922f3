"""``m6rec export``: a ZeRO checkpoint -> consolidated fp32 safetensors, or a Hugging Face Llama directory.

    m6rec export --ckpt RUN_DIR/checkpoints [--to fp32] OUT        the newest complete checkpoint
    m6rec export --ckpt RUN_DIR/checkpoints/step00001000 --to hf OUT

``fp32``: ``OUT/model.safetensors`` (or ``OUT`` itself when it ends in
``.safetensors``) holds every parameter of the model in float32, named as in
``M6Transformer.state_dict()``, with ``OUT/m6rec_model.json`` (the model
args).  ZeRO 1/2/3 checkpoints are merged from the optimizer's fp32 master
partitions (DeepSpeed's ``zero_to_fp32``, which needs no GPU and no process
group; :func:`m6rec.train.run_dir.fp32_state_dict`); a stage-0 checkpoint holds the whole module already.

``hf``: the model library's Llama export (:func:`m6rec.model.hf.export_hf`)
of those weights, with the run's tokenizer when it still exists.

Only complete checkpoints (with the ``COMPLETE`` marker) are exported.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from m6rec.config import ConfigError
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.model.hf import export_hf
from m6rec.train import checkpoint as ckpt
from m6rec.train.run_dir import fp32_state_dict, resolve_checkpoint


def export(ckpt_path: str | Path, to: str, out: str | Path) -> Path:
    ckpt_dir, tag = resolve_checkpoint(ckpt_path)
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
