"""Resume: which checkpoint ``--resume`` loads and how, its conversion, and the load."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from m6rec.config import Config, ConfigError
from m6rec.model import build_model
from m6rec.model.args import ModelArgs
from m6rec.train import checkpoint as ckpt
from m6rec.train.ds_config import effective_zero_stage
from m6rec.train.optim import param_groups
from m6rec.train.run_dir import resolve_checkpoint

log = logging.getLogger("m6rec.train")


def parameter_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Every parameter of the model of ``args`` and its shape, built on the meta device (nothing
    is allocated): what a checkpoint's weights and optimizer moments must fit."""
    model = build_model(ModelArgs.from_dict({**args.to_dict(), "init_from": None, "compile": False}), meta=True)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shape_differences(saved: dict, now: ModelArgs) -> list[str]:
    """The model settings by which a checkpoint saved with model args ``saved`` does not fit the
    model of ``now`` (empty when every parameter has the same shape): each setting that differs
    and, set back alone to its saved value, changes a parameter's shape -- found from the
    models themselves, so no list of "shape settings" can miss one."""
    now_d = now.to_dict()

    def shapes(d: dict):
        try:
            return parameter_shapes(ModelArgs.from_dict(d))
        except (ValueError, AssertionError) as e:  # a combination ModelArgs refuses
            return str(e)

    now_shapes = shapes(now_d)
    if shapes({**now_d, **saved}) == now_shapes:
        return []
    differing = [k for k in now_d if k in saved and saved[k] != now_d[k]]
    culprits = [k for k in differing if shapes({**now_d, k: saved[k]}) != now_shapes] or differing
    return [f"{k}: saved {saved[k]!r}, this run {now_d[k]!r}" for k in culprits]


def plan_resume(ckpt_dir: Path, resume: str, cfg: Config, world: int, margs: ModelArgs) -> Optional[dict]:
    """Which tag ``--resume`` loads and how: ``same`` (the topology that wrote it: DeepSpeed's
    own load), ``plain`` (no ZeRO before and now: the full state loads on any number of
    ranks), ``universal`` (ZeRO 1-3 now, ZeRO 1-3 before on another number of ranks or
    another stage: converted with DeepSpeed's ds_to_universal, loaded by DeepSpeed's
    universal loader, which re-partitions it), ``to_plain`` (converted likewise, then into
    an engine without ZeRO), ``from_plain`` (no ZeRO before, ZeRO now).  None: start from
    step 0.  Every world size and stage resumes; only a different model shape is refused
    (its weights and moments fit no parameter of this model)."""
    if resume == "none":
        return None
    if resume != "auto" and not ckpt.TAG_RE.match(resume):
        raise ConfigError(f"--resume: expected 'auto', 'none' or a checkpoint tag like step00000100, got {resume!r}")
    if resume == "auto":
        tag = ckpt.latest_complete(ckpt_dir)
        if tag is None:
            log.info("--resume auto: no complete checkpoint in %s, starting from step 0", ckpt_dir)
            return None
    else:
        _, tag = resolve_checkpoint(ckpt_dir, resume, label=f"--resume {resume}")
    meta = ckpt.read_meta(ckpt_dir, tag)
    diff = shape_differences(meta.get("model_args") or {}, margs)
    if diff:
        raise ConfigError(f"checkpoint {ckpt_dir / tag} holds another model shape ({'; '.join(diff)}): its weights "
                          f"and optimizer state do not fit this model; resume with the same model settings (another "
                          f"number of ranks or ZeRO stage resumes, another shape cannot)")
    stage = effective_zero_stage(cfg, world)
    saved_world = int(meta.get("world_size") or world)
    saved_stage = int(meta.get("zero_stage", stage))
    if (saved_world, saved_stage) == (world, stage):
        mode = "same"
    elif saved_stage == 0:
        mode = "plain" if stage == 0 else "from_plain"
    elif stage > 0:
        mode = "universal"
    else:
        mode = "to_plain"
    return {"tag": tag, "meta": meta, "mode": mode, "saved_world": saved_world, "saved_stage": saved_stage,
            "stage": stage}


def convert_for_resume(plan: dict, ckpt_dir: Path, rank: int) -> None:
    """Rank 0 converts the tag to DeepSpeed's universal layout (once); the others wait."""
    if plan["mode"] not in ("universal", "to_plain"):
        return
    if rank == 0:
        folder, seconds = ckpt.convert_to_universal(ckpt_dir, plan["tag"])
        if seconds:
            log.info("checkpoint %s: written by %d rank(s) at ZeRO stage %d, this run has %d at stage %d: converted "
                     "to DeepSpeed's universal layout in %.2f s (%s)", ckpt_dir / plan["tag"], plan["saved_world"],
                     plan["saved_stage"], dist.get_world_size() if dist.is_initialized() else 1, plan["stage"],
                     seconds, folder)
        else:
            log.info("checkpoint %s: using its universal conversion %s", ckpt_dir / plan["tag"], folder)
    if dist.is_initialized():
        dist.barrier()


def load_resume(engine, optimizer, ckpt_dir: Path, plan: Optional[dict], loader) -> dict:
    """Load the checkpoint ``plan`` names into the engine and the stream; return its client state."""
    if plan is None:
        return {}
    tag, mode = plan["tag"], plan["mode"]
    t0 = time.perf_counter()
    if mode in ("same", "plain"):
        client, rank_state = ckpt.load(engine, ckpt_dir, tag)
    else:
        saved = ckpt.client_state_of(ckpt_dir, tag)
        if mode == "universal":
            # DeepSpeed's ZeRO 3 universal loader copies the first saved group's hyper-parameters to
            # every group (weight decay onto the no-decay group): this run's own are put back after.
            base = getattr(engine.optimizer, "optimizer", engine.optimizer)
            hyper = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in base.param_groups]
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=ckpt.universal_dir(ckpt_dir, tag).name,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {ckpt.universal_dir(ckpt_dir, tag)}")
            for g, h in zip(base.param_groups, hyper):
                g.update(h)
            ckpt.own_step_tensors(engine)  # ZeRO 3's loader shares one step tensor among sub-groups
        elif mode == "to_plain":
            ckpt.load_universal_into_plain(engine, optimizer, ckpt.universal_dir(ckpt_dir, tag))
        else:  # from_plain
            params = [p for g in param_groups(engine.module, 0.0) for p in g["params"]]
            ckpt.load_plain_into_zero(engine, saved["optimizer"], saved["module"], params)
        client = saved
        rank_file = ckpt_dir / tag / f"m6rec_rank{dist.get_rank() if dist.is_initialized() else 0}.pt"
        rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    loader.load_state_dict(client["stream"])
    if rank_state is not None:
        ckpt.set_rng_state(rank_state["rng"])
    if mode == "same":
        log.info("resumed from %s at step %d", ckpt_dir / tag, client["step"])
    else:
        log.info("resumed from %s at step %d: written by %d rank(s) at ZeRO stage %d, continued on %d at stage %d "
                 "(%s load, %.2f s); the stream continues its epoch %d on this run's readers",
                 ckpt_dir / tag, client["step"], plan["saved_world"], plan["saved_stage"], loader.world_size,
                 plan["stage"], mode, time.perf_counter() - t0, loader.epoch)
    return client
