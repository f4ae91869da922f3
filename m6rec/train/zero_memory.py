"""``m6rec model-info``: parameters, FLOPs per token (m6rec/model/info.py) and the per-GPU
memory of a preset's model states under ZeRO stages 0-3.

Memory of model states per GPU for mixed-precision Adam (ZeRO paper:
``2 + 2 + 12`` bytes per parameter = bf16 weights, bf16 gradients, fp32
master weights + two moments), ``Psi`` parameters on ``N`` GPUs::

    stage 0: 16 Psi            stage 2: 2 Psi + 14 Psi / N
    stage 1: 4 Psi + 12 Psi/N  stage 3: 16 Psi / N

beside DeepSpeed's own estimators for stages 2 and 3 (which also count fp32
gradient buffers, 18 bytes per sharded parameter, and the largest layer).
Activations are not included.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.model.info import count_params, flops_per_token

GiB = 1024**3


def zero_memory(total_params: int, largest_layer: int, gpus: int) -> list[dict[str, Any]]:
    """Per-GPU bytes of model states for ZeRO stages 0-3 (+ DeepSpeed's estimators)."""
    P, N = total_params, gpus
    own = {0: 16 * P, 1: 4 * P + 12 * P / N, 2: 2 * P + 14 * P / N, 3: 16 * P / N}
    per_node = min(N, 8)
    nodes = math.ceil(N / per_node)
    ds: dict[int, dict[str, float]] = {}
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        # deepspeed: imported only here, and its absence tolerated (the 16-byte rule still stands)
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
        )

        for off in (False, True):
            _, g2 = estimate_zero2_model_states_mem_needs(P, per_node, nodes, cpu_offload=off)
            _, g3, _ = estimate_zero3_model_states_mem_needs(P, largest_layer, per_node, nodes, cpu_offload=off,
                                                              cpu_offload_params=off)
            ds.setdefault(2, {})["offload" if off else "gpu"] = g2
            ds.setdefault(3, {})["offload" if off else "gpu"] = g3
    except Exception as e:  # deepspeed missing or changed: our own numbers still stand
        ds = {"error": str(e)}  # type: ignore[dict-item]
    rows = []
    for stage in range(4):
        row: dict[str, Any] = dict(stage=stage, bytes=own[stage])
        if isinstance(ds.get(stage), dict):
            row["deepspeed_bytes"] = ds[stage]["gpu"]
            row["deepspeed_offload_bytes"] = ds[stage]["offload"]
        rows.append(row)
    return rows


def model_info(cfg: Any, gpus: int = 8) -> dict[str, Any]:
    """Everything ``m6rec model-info`` prints, as a dict."""
    args = cfg if isinstance(cfg, ModelArgs) else ModelArgs.from_config(cfg)
    model = build_model(ModelArgs.from_dict({**args.to_dict(), "init_from": None, "compile": False}), meta=True)
    counted = dict(total=model.num_params(), non_embedding=model.num_params(non_embedding=True))
    closed = count_params(args)
    assert counted["total"] == closed["total"] and counted["non_embedding"] == closed["non_embedding"], (counted, closed)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    del model
    return dict(preset=args.preset, args=args.to_dict(), ffn_dim=args.ffn_dim, params=closed, largest_layer_params=largest,
                flops_per_token=flops_per_token(args), gpus=gpus,
                zero=zero_memory(closed["total"], largest, gpus), torch=torch.__version__)


def _fmt(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.2f}{s}"
    return str(int(n))


def format_info(info: dict[str, Any]) -> str:
    a, p, f = info["args"], info["params"], info["flops_per_token"]
    lines = [
        f"preset {info['preset']}: dim {a['dim']}, layers {a['n_layers']}, heads {a['n_heads']}"
        f" (kv {a['n_kv_heads'] or a['n_heads']}), ffn {info['ffn_dim']},"
        f" vocab {a['vocab_size']}, seq {a['max_seq_len']}, tied {a['tie_embeddings']}, attention {a['attention']}",
        f"parameters: total {p['total']:,} ({_fmt(p['total'])}), non-embedding {p['non_embedding']:,}"
        f" ({_fmt(p['non_embedding'])}); token embedding {p['embedding']:,}, untied LM head {p['lm_head']:,},"
        f" patch embedding {p['patch_embed']:,}",
        f"FLOPs/token (train, T={f['seq_len']}): 6N + 12*L*H*Q*T = 6*{_fmt(f['n_matmul_params'])}"
        f" + {_fmt(f['attention'])} = {_fmt(f['total'])}  (N = non-embedding + V*D LM head;"
        f" causal-halved attention: {_fmt(f['total_causal_halved'])})",
        f"model states per GPU on {info['gpus']} GPU(s), bf16 + fp32 Adam, activations excluded"
        f" (largest layer {info['largest_layer_params']:,} params):",
        f"  {'ZeRO':<6}{'16-byte rule':>14}{'DeepSpeed est.':>16}{'DS est. offload':>17}",
    ]
    for r in info["zero"]:
        ds = f"{r['deepspeed_bytes'] / GiB:.2f} GiB" if "deepspeed_bytes" in r else "-"
        off = f"{r['deepspeed_offload_bytes'] / GiB:.2f} GiB" if "deepspeed_offload_bytes" in r else "-"
        lines.append(f"  {r['stage']:<6}{r['bytes'] / GiB:>10.2f} GiB{ds:>16}{off:>17}")
    return "\n".join(lines)


def main(cfg: Any, args: Any) -> int:
    info = model_info(cfg, gpus=getattr(args, "gpus", 8) or 8)
    print(format_info(info))
    return 0
