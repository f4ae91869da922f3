"""``M6REC_TRACE=1``: exact per-step records and state dumps, what the resume tests compare."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file


class Trace:
    """``M6REC_TRACE=1``: every rank appends one exact JSON line per step to
    ``RUN_DIR/trace/rank{r}.jsonl`` (losses as float.hex, sample keys, a
    digest of this rank's parameters) -- what the resume tests compare."""

    def __init__(self, run_dir: Path, rank: int):
        self.file = None
        if os.environ.get("M6REC_TRACE") == "1":
            (run_dir / "trace").mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "trace" / f"rank{rank}.jsonl", "a", buffering=1)

    def write(self, engine, **rec) -> None:
        if self.file is None:
            return
        h = hashlib.sha256()
        for p in engine.module.parameters():  # ZeRO 3: this rank's partition
            h.update(getattr(p, "ds_tensor", p).detach().float().cpu().numpy().tobytes())
        self.file.write(json.dumps({**rec, "params": h.hexdigest()[:16]}) + "\n")

    def final_weights(self, engine, path: Path) -> None:
        """The live model's full weights (gathered under ZeRO 3) to a safetensors file (rank 0)."""
        if self.file is None:
            return
        # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            if dist.get_rank() == 0:
                sd = {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
                save_file(sd, str(path))

    def optimizer_state(self, engine, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """The full fp32 weights, AdamW moments and step counts (gathered through DeepSpeed's
        ``safe_get_full_*`` under ZeRO) to a safetensors file (rank 0): ``fp32/<name>``,
        ``exp_avg/<name>``, ``exp_avg_sq/<name>``, ``step`` (the distinct step counts).
        Collective under ZeRO.  The resume tests compare the state right after a load
        with the one the saving run held."""
        if self.file is None:
            return
        # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
        )

        zero = engine.zero_optimization_stage() > 0
        base = getattr(engine.optimizer, "optimizer", engine.optimizer) if zero else optimizer
        if zero and hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state") and base.state:
            # ZeRO 1/2 link each parameter to its slice of the Adam state once, right after the
            # first group's first update -- before the second group has a state (DeepSpeed
            # 0.19.8): linked again here, now that every group has one.
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        out = {}
        for name, p in engine.module.named_parameters():
            shape = getattr(p, "ds_shape", p.shape)
            if not p.requires_grad:  # not the engine's to step (train.sparse_item_rows: the token table)
                out[f"fp32/{name}"] = p.detach().float().cpu().reshape(shape).clone()
                continue
            if zero:
                got = {"fp32": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                       "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
            else:  # a parameter that never had a gradient (the image projection on text) has no state yet
                st = optimizer.state.get(p) or {}
                got = {"fp32": p, "exp_avg": st.get("exp_avg", torch.zeros_like(p)),
                       "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(p))}
            for key, v in got.items():
                out[f"{key}/{name}"] = v.detach().float().cpu().reshape(shape).clone()
        steps = {float(st["step"]) for st in base.state.values() if "step" in st}
        out["step"] = torch.tensor(sorted(steps), dtype=torch.float64)
        if dist.get_rank() == 0:
            save_file(out, str(path))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
