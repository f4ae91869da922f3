"""Hugging Face Llama interop: export an m6rec model as a ``LlamaForCausalLM``
directory and start from one (``model.init_from: hf:DIR``).

The m6rec block *is* a Llama block (RMSNorm, rotate-half RoPE, SwiGLU, no
biases), so the mapping is a renaming plus two splits:

=============================================  ==============================================
m6rec                                          transformers ``LlamaForCausalLM``
=============================================  ==============================================
``tok_embeddings.weight``                      ``model.embed_tokens.weight``
``layers.i.attention.wqkv.weight`` [q; k; v]   ``model.layers.i.self_attn.{q,k,v}_proj.weight``
``layers.i.attention.wo.weight``               ``model.layers.i.self_attn.o_proj.weight``
``layers.i.feed_forward.w13.weight`` [g; u]    ``model.layers.i.mlp.{gate,up}_proj.weight``
``layers.i.feed_forward.w2.weight``            ``model.layers.i.mlp.down_proj.weight``
``layers.i.attention_norm.weight``             ``model.layers.i.input_layernorm.weight``
``layers.i.ffn_norm.weight``                   ``model.layers.i.post_attention_layernorm.weight``
``norm.weight``                                ``model.norm.weight``
``output.weight`` (untied only)                ``lm_head.weight`` (``tie_word_embeddings`` otherwise)
=============================================  ==============================================

An exported directory holds::

    config.json                   LlamaConfig (transformers writes it)
    model.safetensors             the Llama weights above
    tokenizer.json, tokenizer_config.json   when a tokenizer is given
    m6rec_patch_embed.safetensors patch_embed.{proj.weight,row_pos,col_pos}: the image
                                  patch embedding, and item_proj.* (item_repr vector*: the
                                  text-vector projection), which Llama has no place for
    m6rec_model.json              the full ModelArgs (attention mask kind, image geometry, ...)

``transformers`` ignores the two ``m6rec_*`` files, so the directory loads as
a plain text-only Llama; :func:`load_hf` reads them back when present.
Importing a Llama with biases, a non-SiLU activation, RoPE scaling or a head
dim other than hidden/heads is refused with the reason.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from m6rec.model.args import ModelArgs
from m6rec.model.transformer import M6Transformer, apply_compile

PATCH_FILE = "m6rec_patch_embed.safetensors"
ARGS_FILE = "m6rec_model.json"
PATCH_KEYS = ("patch_embed.proj.weight", "patch_embed.row_pos", "patch_embed.col_pos")


# ---------------------------------------------------------------------------
# State-dict mapping (pure functions, usable on checkpoints without a model)
# ---------------------------------------------------------------------------
def m6rec_to_llama(sd: dict[str, Tensor], args: ModelArgs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """m6rec state dict -> (Llama state dict, the rest: patch embedding and item projection)."""
    H, Hkv, Q, F = args.n_heads, args.kv_heads, args.head_dim, args.ffn_dim
    out: dict[str, Tensor] = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(args.n_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[p + "attention.wqkv.weight"].split([H * Q, Hkv * Q, Hkv * Q], dim=0)
        gate, up = sd[p + "feed_forward.w13.weight"].split([F, F], dim=0)
        out.update({
            hp + "self_attn.q_proj.weight": q, hp + "self_attn.k_proj.weight": k, hp + "self_attn.v_proj.weight": v,
            hp + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
            hp + "mlp.gate_proj.weight": gate, hp + "mlp.up_proj.weight": up,
            hp + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
            hp + "input_layernorm.weight": sd[p + "attention_norm.weight"],
            hp + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"],
        })
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    # everything Llama has no place for: the patch embedding and the item text-vector projection
    extra = {k: v for k, v in sd.items() if k in PATCH_KEYS or k.startswith("item_proj.")}
    return out, extra


def llama_to_m6rec(hf: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Llama state dict -> m6rec state dict (without the patch embedding)."""
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(args.n_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = torch.cat(
            [hf[hp + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")], dim=0)
        sd[p + "attention.wo.weight"] = hf[hp + "self_attn.o_proj.weight"]
        sd[p + "feed_forward.w13.weight"] = torch.cat(
            [hf[hp + "mlp.gate_proj.weight"], hf[hp + "mlp.up_proj.weight"]], dim=0)
        sd[p + "feed_forward.w2.weight"] = hf[hp + "mlp.down_proj.weight"]
        sd[p + "attention_norm.weight"] = hf[hp + "input_layernorm.weight"]
        sd[p + "ffn_norm.weight"] = hf[hp + "post_attention_layernorm.weight"]
    if not args.tie_embeddings:
        sd["output.weight"] = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    elif "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
        raise ValueError("the Llama checkpoint has an untied lm_head but the m6rec model ties embeddings "
                         "(set model.tie_embeddings: false)")
    return sd


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def llama_config_dict(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    return dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, hidden_act="silu", max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, tie_word_embeddings=args.tie_embeddings,
        attention_bias=False, mlp_bias=False, initializer_range=args.init_std,
        dtype=str(dtype).removeprefix("torch."), architectures=["LlamaForCausalLM"],
    )


def args_from_llama_config(c: dict[str, Any], base: Optional[ModelArgs] = None) -> ModelArgs:
    """ModelArgs for a Llama ``config.json`` dict (m6rec-only fields from ``base``)."""
    if c.get("model_type", "llama") != "llama":
        raise ValueError(f"not a Llama config: model_type={c.get('model_type')!r}")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ValueError(f"Llama config has {key}=true; m6rec blocks have no biases")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama config has hidden_act={c['hidden_act']!r}; m6rec uses SiLU (SwiGLU)")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"Llama config uses RoPE scaling {rope_type!r}; m6rec supports plain RoPE only")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"Llama config head_dim={c['head_dim']} != hidden_size/num_attention_heads")
    kv = c.get("num_key_value_heads") or heads
    d = base.to_dict() if base is not None else {}
    d.update(
        dim=hidden, n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=None if kv == heads else kv,
        vocab_size=c["vocab_size"], ffn_hidden=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", d.get("max_seq_len", 1024)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), init_from=None, compile=False,
    )
    return ModelArgs.from_dict(d)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------
def _read_safetensors_dir(d: Path) -> dict[str, Tensor]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(load_file(str(d / f)))
    return sd


def _copy_tokenizer(src: Path, out: Path, max_len: int) -> None:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
    if src.is_dir():
        if not (src / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{src}: no tokenizer.json")
        for n in names:
            if (src / n).is_file():
                shutil.copyfile(src / n, out / n)
    else:
        shutil.copyfile(src, out / "tokenizer.json")
    if not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}, indent=2) + "\n")


def export_hf(model: M6Transformer, cfg: Any = None, out_dir: str | Path = "export",
              tokenizer_path: str | Path | None = None) -> Path:
    """Write ``model`` as a transformers ``LlamaForCausalLM`` directory (see module doc).

    ``cfg`` (Config / ModelConfig / ModelArgs) defaults to ``model.args``;
    ``tokenizer_path`` is a ``tokenizer.json`` or a directory holding one.
    """
    from transformers import (
        LlamaConfig,  # transformers: slow to import, and only the export needs it
    )

    args = model.args if cfg is None else (cfg if isinstance(cfg, ModelArgs) else ModelArgs.from_config(cfg))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf, extra = m6rec_to_llama(sd, args)
    dtype = sd["tok_embeddings.weight"].dtype
    LlamaConfig(**llama_config_dict(args, dtype)).save_pretrained(out)
    save_file({k: v.contiguous().clone() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({k: v.contiguous() for k, v in extra.items()}, str(out / PATCH_FILE), metadata={"format": "pt"})
    (out / ARGS_FILE).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    if tokenizer_path is not None:
        _copy_tokenizer(Path(tokenizer_path), out, args.max_seq_len)
    return out


def load_hf_weights(model: M6Transformer, hf_dir: str | Path, strict_patch: bool = False) -> None:
    """Copy a Llama directory's weights into ``model`` (shapes must match).

    The patch embedding comes from ``m6rec_patch_embed.safetensors`` when the
    directory has one; otherwise it keeps its initialisation."""
    d = Path(hf_dir)
    c = json.loads((d / "config.json").read_text())
    want = args_from_llama_config(c, model.args)
    a = model.args
    for f in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_dim"):
        if getattr(want, f) != getattr(a, f):
            raise ValueError(f"{d}: Llama {f}={getattr(want, f)} but the m6rec model has {f}={getattr(a, f)}")
    sd = llama_to_m6rec(_read_safetensors_dir(d), a)
    if (d / PATCH_FILE).is_file():
        sd.update(load_file(str(d / PATCH_FILE)))
    elif strict_patch:
        raise FileNotFoundError(f"{d}: no {PATCH_FILE}")
    own = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k not in own:
                raise KeyError(f"{d}: unexpected weight {k}")
            if own[k].shape != v.shape:
                raise ValueError(f"{d}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
            own[k].copy_(v)
    missing = [k for k in own if k not in sd and not k.startswith("patch_embed.")]
    if missing:
        raise KeyError(f"{d}: weights missing for {missing[:5]}")


def load_hf(hf_dir: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> M6Transformer:
    """Build an m6rec model from a Llama directory (an m6rec export or any plain Llama)."""
    d = Path(hf_dir)
    base = ModelArgs.from_dict(json.loads((d / ARGS_FILE).read_text())) if (d / ARGS_FILE).is_file() else None
    args = args_from_llama_config(json.loads((d / "config.json").read_text()), base)
    if overrides:
        args = ModelArgs.from_dict({**args.to_dict(), **overrides})
    with torch.device(device):
        model = M6Transformer(ModelArgs.from_dict({**args.to_dict(), "compile": False, "init_from": None}))
    load_hf_weights(model, d)
    if args.compile:
        apply_compile(model)
    return model
