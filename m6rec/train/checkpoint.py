"""Atomic DeepSpeed checkpoints: every rank saves, a marker makes a save complete.

Layout under ``<run_dir>/checkpoints/``::

    step00000100/            one DeepSpeed tag (model, optimizer shards; the client state)
        m6rec_rank{r}.pt     per-rank state DeepSpeed does not keep: RNGs
        COMPLETE             JSON {step, world_size, zero_stage, precision, model_args, tokenizer};
                             written by rank 0 after every rank finished writing and the
                             files were fsync'ed
    latest                   the tag to resume from; replaced (os.replace) only after COMPLETE
    zero_to_fp32.py          DeepSpeed's offline converter (``m6rec export`` does the same)

A crash or kill at any moment of a save leaves a tag without ``COMPLETE`` and
``latest`` still naming the previous complete tag; ``--resume auto`` loads
that one, and the next successful save removes the debris.  A save into a
tag that already exists (a run resumed from an older checkpoint reaching the
same step again) first removes the old tag's ``COMPLETE`` and files, so a
half-overwritten tag can never pass for complete.

Fault hooks for tests (``M6REC_FAULT``, ``;``-separated ``name@step[,step...]``;
``M6REC_FAULT_RANK=r`` restricts them to one rank):

* ``crash_in_save@N``: the process exits (code 17) in the save at step N,
  after writing its shards, before the save is complete;
* ``nan_loss@N,M``: the loss of steps N and M is made non-finite (engine);
* ``kill_in_convert@N``: rank 0 SIGKILLs itself while converting checkpoint N to
  DeepSpeed's universal layout, after the converter wrote its output, before the rename;
* ``stop_at@N``: the run stops after step N as if ``RUN_DIR/STOP`` appeared (checkpoint, exit 0).

A checkpoint resumed on another number of ranks or ZeRO stage is converted once
(:func:`convert_to_universal`) into ``<tag>_universal/`` beside it: written to
``.<tag>_universal.tmp`` and renamed, so only a finished conversion carries the
name; pruning a tag removes its conversion.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step(\d{8})$")
CRASH_EXIT_CODE = 17


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fault_steps(name: str, rank: Optional[int] = None) -> set[int]:
    """Steps at which the test hook ``name`` fires on this rank (see module doc)."""
    only = os.environ.get("M6REC_FAULT_RANK", "")
    if only and int(only) != (_rank() if rank is None else rank):
        return set()
    steps: set[int] = set()
    for part in os.environ.get("M6REC_FAULT", "").split(";"):
        if part.startswith(name + "@"):
            steps |= {int(x) for x in part.split("@", 1)[1].split(",") if x.strip()}
    return steps


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def is_complete(ckpt_dir: Path, tag: str) -> bool:
    return (Path(ckpt_dir) / tag / COMPLETE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file())


def latest_complete(ckpt_dir: Path) -> Optional[str]:
    """The tag ``latest`` names if it is complete, else the newest complete tag."""
    pointer = Path(ckpt_dir) / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if is_complete(ckpt_dir, tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def read_meta(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    """The ``COMPLETE`` marker's JSON (world size, ZeRO stage, model args, ...)."""
    text = (Path(ckpt_dir) / tag / COMPLETE).read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:  # an old plain "step" marker
        meta = {"step": int(text.strip() or 0)}
    if isinstance(meta, int):
        meta = {"step": meta}
    meta.setdefault("world_size", len(list((Path(ckpt_dir) / tag).glob("m6rec_rank*.pt"))))
    return meta


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int,
         meta: Optional[dict] = None, protect: Optional[str] = None) -> str:
    """Collective: every rank must call it (DeepSpeed writes per-rank shards).  ``protect``: a
    complete tag that pruning keeps beyond ``keep_last`` (the best tag of ``train.select_by``)."""
    tag = tag_for(step)
    ckpt_dir = Path(ckpt_dir)
    rank = _rank()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if (ckpt_dir / tag).exists():  # the marker goes first: never a complete-looking mix
            (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / tag)
    _barrier()
    # save_latest=False: DeepSpeed would otherwise rewrite `latest` before the
    # other ranks finish, pointing at a checkpoint that may never be complete.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"m6rec_rank{rank}.pt")
    if step in fault_steps("crash_in_save"):
        os._exit(CRASH_EXIT_CODE)
    _barrier()
    if rank == 0:
        _fsync_tree(ckpt_dir / tag)
        marker = {"step": step, **(meta or {})}
        (ckpt_dir / tag / COMPLETE).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_dir(ckpt_dir / tag)
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        _fsync_dir(ckpt_dir)
        _prune(ckpt_dir, keep_last, keep=tag, protect=protect)
    _barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, keep: str, protect: Optional[str] = None) -> None:
    """Remove complete tags beyond the newest ``keep_last`` (never ``protect``) and incomplete debris."""
    complete = [t for t in complete_tags(ckpt_dir) if t != protect]
    doomed = complete[:-keep_last] if keep_last > 0 else []
    # Incomplete tags older than the newest complete one are debris of crashed saves.
    doomed += [p.name for p in ckpt_dir.iterdir()
               if TAG_RE.match(p.name) and not (p / COMPLETE).is_file() and p.name < keep]
    for tag in doomed:
        if tag != keep:
            (ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(universal_dir(ckpt_dir, tag), ignore_errors=True)


def load(engine, ckpt_dir: Path, tag: str) -> tuple[dict, Optional[dict]]:
    """Load a complete tag into the engine; return (client_state, this rank's state or None)."""
    if not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"checkpoint {Path(ckpt_dir) / tag} is not complete (no {COMPLETE} marker)")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_dir) / tag}")
    rank_file = Path(ckpt_dir) / tag / f"m6rec_rank{_rank()}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return client_state or {}, rank_state


def describe(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    files = sorted(p.name for p in (Path(ckpt_dir) / tag).iterdir())
    return {"tag": tag, "files": files, **read_meta(ckpt_dir, tag)}


# ---------------------------------------------------------------------------
# Another number of ranks / ZeRO stage: DeepSpeed's universal checkpoint
# ---------------------------------------------------------------------------
def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / f"{tag}_universal"


def convert_to_universal(ckpt_dir: Path, tag: str) -> tuple[Path, float]:
    """DeepSpeed's ``ds_to_universal`` of a complete ZeRO 1-3 tag, once (rank 0 only).

    Returns (the universal folder, seconds spent; 0.0 when it already existed).  The
    converter writes into a temporary folder that is renamed when it finished, so a
    kill at any moment leaves the original tag untouched and no folder by the final
    name; a later attempt removes the leftover and converts again."""
    ckpt_dir = Path(ckpt_dir)
    out = universal_dir(ckpt_dir, tag)
    if out.is_dir():
        return out, 0.0
    tmp = ckpt_dir / f".{tag}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"DeepSpeed's ds_to_universal failed on {ckpt_dir / tag} (exit {r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-3000:]}")
    # The converter copies the source's model-states file (ZeRO 1/2: mp_rank_00_model_states.pt,
    # ZeRO 3: zero_pp_rank_0_mp_rank_00_model_states.pt), and a universal load looks for the name of
    # the *loading* stage; DeepSpeed reads only metadata from it (the weights come from zero/), so
    # the other stage's name is added as a link.
    # ds_to_universal also points <parent>/latest_universal at its output (the temporary name):
    # m6rec names the tag when it loads, so the pointer is dropped rather than left stale.
    (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    _both_stages_global_state(tmp / "zero" / "optimizer_state.pt")
    _stage3_files_as_stage12(ckpt_dir / tag, tmp / "zero")
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [n for n in names if (tmp / n).is_file()]
    for n in names:
        if have and not (tmp / n).exists():
            os.link(tmp / have[0], tmp / n)
    _fsync_tree(tmp)
    if int(tag[4:]) in fault_steps("kill_in_convert"):
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace(tmp, out)
    _fsync_dir(ckpt_dir)
    return out, time.perf_counter() - t0


def _both_stages_global_state(path: Path) -> None:
    """ds_to_universal (DeepSpeed 0.19.8) writes ``zero/optimizer_state.pt`` in the layout of the
    *source* stage, and each loader reads its own: ZeRO 3's reads the step from
    ``optimizer_state_dict.state[0].step`` and the hyper-parameters from
    ``optimizer_state_dict.param_groups``; ZeRO 1/2's reads ``param_groups`` and
    ``ds_version`` at the top.  The same values are added under the other stage's keys, so a
    ZeRO 1/2 checkpoint resumes at stage 3 and back (the per-parameter files are the same,
    after :func:`_stage3_files_as_stage12`)."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    from deepspeed.checkpoint.constants import (
        DS_VERSION,
        OPTIMIZER_STATE_DICT,
        PARAM_GROUPS,
    )

    sd = torch.load(path, map_location="cpu", weights_only=False)
    changed = False
    if OPTIMIZER_STATE_DICT not in sd:  # from ZeRO 1/2
        step = None
        for f in sorted(path.parent.glob("*/step.pt")):
            step = torch.load(f, map_location="cpu", weights_only=False)
            break
        sd[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: sd[PARAM_GROUPS]}
        changed = True
    if PARAM_GROUPS not in sd:
        sd[PARAM_GROUPS] = sd[OPTIMIZER_STATE_DICT][PARAM_GROUPS]
        changed = True
    if DS_VERSION not in sd:  # from ZeRO 3
        # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
        import deepspeed

        sd[DS_VERSION] = deepspeed.__version__
        changed = True
    # From ZeRO 3 the converter copies rank 0's whole optimizer shard into this file (its fp32
    # partition and moments: 6 bytes a parameter on 2 ranks), and every rank of the resumed run
    # would read it; no loader uses them (the values come from zero/<name>/), so only the step
    # counts stay.
    state = sd[OPTIMIZER_STATE_DICT].get("state", {})
    if "fp32_flat_groups" in sd or any(set(st) - {"step"} for st in state.values()):
        sd.pop("fp32_flat_groups", None)
        sd[OPTIMIZER_STATE_DICT]["state"] = {i: {"step": st["step"]} for i, st in state.items() if "step" in st}
        changed = True
    if changed:
        torch.save(sd, path)


def _stage3_files_as_stage12(source: Path, zero: Path) -> None:
    """ds_to_universal (DeepSpeed 0.19.8) writes a ZeRO 3 source's per-parameter states
    ``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`` as bare flat tensors and no ``step.pt``;
    from a ZeRO 1/2 source they are ``{"param": tensor of the parameter's shape, ...}`` beside
    a ``step.pt``.  The ZeRO 1/2 loader (``universal_checkpoint.load_hp_checkpoint_state``)
    reads only the second form (``ckpt_dict["param"]``, and the step from ``step.pt``); the
    ZeRO 3 loader reads both (it flattens either).  So a stage-3 source's files are
    rewritten in the second form -- the parameter's shape from the source's ``param_shapes``,
    the step from the optimizer state of the parameter's sub-group -- and every loader,
    and :func:`load_universal_into_plain`, reads them.  Values are not touched."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM, PARAM_SHAPES

    files = sorted(Path(source).glob("zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if not files:  # a ZeRO 1/2 source: already in that form
        return
    shapes = torch.load(files[0], map_location="cpu", weights_only=False)[PARAM_SHAPES]
    state = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
    for sub_group, names in enumerate(shapes):
        step = state["state"][sub_group]["step"]
        for name, shape in names.items():
            folder = zero / name
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                value = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=False)
                if not isinstance(value, dict):
                    torch.save({PARAM: value.reshape(shape)}, folder / f"{key}.pt")
            if not (folder / "step.pt").exists():
                torch.save(step.clone() if torch.is_tensor(step) else step, folder / "step.pt")


def own_step_tensors(engine) -> None:
    """After DeepSpeed's ZeRO 3 universal load: one ``step`` tensor per sub-group.

    ``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``
    (DeepSpeed 0.19.8) assigns the *same* step object to the Adam state of every
    sub-group (``self.optimizer.state[fp32_param]['step'] = state_step``).  torch's AdamW
    increments its step tensors in place, once per ``optimizer.step()``, and ZeRO 3 calls
    it once per sub-group: with two sub-groups (decay / no decay) the shared count
    advanced by two per training step, so every sub-group after the first ran with the
    wrong Adam bias correction (the measured 4.65e-3 relative loss difference of ZeRO 2
    -> ZeRO 3).  Each sub-group gets its own copy (same value and dtype, on its partition's
    device, where torch's fused AdamW wants it).  A step kept as a Python number (DeepSpeed's
    FusedAdam, CPUAdam) is immutable: nothing to do."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for flat, st in base.state.items():
        step = st.get("step")
        if torch.is_tensor(step):
            st["step"] = step.detach().clone().to(flat.device)


def client_state_of(ckpt_dir: Path, tag: str) -> dict:
    """The client state (m6rec's step, stream position, ...) DeepSpeed stored with a tag."""
    folder = Path(ckpt_dir) / tag
    path = folder / "mp_rank_00_model_states.pt"  # ZeRO 0-2; ZeRO 3 names it per data-parallel rank
    if not path.is_file():
        path = folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def load_universal_into_plain(engine, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """A universal checkpoint into an engine without ZeRO (one rank runs as stage 0).

    DeepSpeed's universal loader needs a ZeRO optimizer (it restores through the
    optimizer's parameter fragments and loads no module weights otherwise).  Without
    ZeRO nothing is partitioned: every parameter's full fp32 value and its Adam
    moments, as the universal layout holds them (``zero/<name>/{fp32,exp_avg,
    exp_avg_sq,step}.pt``), go straight into the module and the torch optimizer."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    from deepspeed.checkpoint.constants import PARAM

    zero = Path(folder) / "zero"
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {}
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            d = zero / name
            if not d.is_dir():
                raise FileNotFoundError(f"universal checkpoint {folder} has no parameter {name}")
            def get(what):
                v = torch.load(d / f"{what}.pt", map_location="cpu", weights_only=False)
                return v[PARAM] if isinstance(v, dict) else v
            p.copy_(get("fp32").view_as(p))
            step = get("step")
            step = float(step.item() if torch.is_tensor(step) else step)
            state[index[id(p)]] = {"step": torch.tensor(step, dtype=torch.float32),
                                   "exp_avg": get("exp_avg").view_as(p).float(),
                                   "exp_avg_sq": get("exp_avg_sq").view_as(p).float()}
    sd = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def load_plain_into_zero(engine, optimizer_sd: dict, module_sd: dict, params: list) -> None:
    """A checkpoint written without ZeRO (full weights and the torch optimizer's full
    state in DeepSpeed's model-states file) into a ZeRO 1-3 engine, through DeepSpeed's
    own per-parameter API (``deepspeed.utils.safe_set_full_fp32_param`` /
    ``safe_set_full_optimizer_state``), which writes each rank's partition.  ``params``:
    the parameters in the optimizer's original order (the index of the saved state)."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    names = {id(p): n for n, p in engine.module.named_parameters()}
    every = list(engine.module.parameters())
    # The module's (low-precision) weights: ZeRO 3 gathers and re-partitions them around the copy.
    with torch.no_grad(), deepspeed.zero.GatheredParameters(every, modifier_rank=0,
                                                             enabled=hasattr(every[0], "ds_id")):
        for n, p in engine.module.named_parameters():
            p.data.copy_(module_sd[n].to(p.device, p.dtype))
    saved = optimizer_sd["state"]
    opt = engine.optimizer
    base = opt.optimizer  # the torch optimizer ZeRO steps its flat fp32 partitions with
    # ZeRO 1-3 create the Adam state of their flat fp32 partitions at the first step (ZeRO 1/2
    # only then link each parameter's fragment of it: _lazy_init_hp_params_optimizer_state):
    # create it here as that step would.
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat")
    for hp in flats:
        if "exp_avg" not in base.state.get(hp, {}):
            base.state[hp] = {"step": torch.zeros((), dtype=torch.float32, device=hp.device),
                              "exp_avg": torch.zeros_like(hp), "exp_avg_sq": torch.zeros_like(hp)}
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()
    steps = set()
    for i, p in enumerate(params):
        # torch's AdamW creates a parameter's state at its first gradient: one that never had
        # one (the image projection on text-only data) has none, i.e. moments of zero.
        st = saved.get(i, {})
        full = module_sd[names[id(p)]].float().to(p.device)
        safe_set_full_fp32_param(p, full)
        for key in ("exp_avg", "exp_avg_sq"):
            value = st[key].float().to(p.device) if key in st else torch.zeros_like(full)
            safe_set_full_optimizer_state(p, value, key)
        if "step" in st:
            steps.add(float(st["step"]))
    # torch's AdamW counts steps per parameter and skips one that got no gradient (e.g. the image
    # projection in a text-only stretch); ZeRO keeps one count per flat group: the largest.
    step = max(steps, default=0.0)
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step
    for group in getattr(base, "param_groups", []):
        if "step" in group:
            group["step"] = int(step)
