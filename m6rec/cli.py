"""The ``m6rec`` command line.

Every subcommand takes ``--config PRESET.yaml`` and any number of dotted
overrides (``--data.max_items 50``); the typed tree in :mod:`m6rec.config`
checks them before any work starts.  Subcommand bodies live next to the code
they drive and are imported only when called, so ``m6rec --help`` is fast.
The training commands first check that PyTorch can use the NVIDIA GPUs the
driver lists (exit status 3 when it cannot; see :mod:`m6rec.hardware`).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from m6rec.config import ConfigError, load_config

# name -> (module, function, help). Each function takes (cfg, args).
COMMANDS = {
    "quickstart": ("m6rec.quickstart", "main", "built-in data: prepare -> pretrain -> evaluate vs popularity -> recommend"),
    "config": ("m6rec.cli", "show_config", "print the resolved configuration (or one key with --get)"),
    "prepare": ("m6rec.data.prepare", "main", "raw logs -> M6-Rec text -> tokenizer -> WebDataset shards"),
    "model-info": ("m6rec.model.info", "main", "parameters, FLOPs/token and ZeRO memory of a model preset"),
    "bench": ("m6rec.bench", "main", "benchmarks: data | model | train | gpu | recommend"),
    "train": ("m6rec.train.trainer", "main", "pretrain with DeepSpeed (one machine; launch/train.py for clusters)"),
    "plot": ("m6rec.train.plot", "main", "draw a run's metrics.jsonl to a PNG"),
    "export": ("m6rec.train.export", "main", "a ZeRO checkpoint -> fp32 safetensors or a Hugging Face Llama directory"),
    "eval": ("m6rec.rec.commands", "eval_main", "rank the whole catalog for every user: popularity vs checkpoints"),
    "recommend": ("m6rec.rec.commands", "recommend_main", "top-k items for a user id or a free-text history"),
    "finetune": ("m6rec.rec.finetune", "main", "adapt a pretrained run to retrieval or ranking (full or option tuning)"),
    "clean-shm": ("m6rec.train.leftovers", "clean_shm_main",
                  "remove what killed DeepSpeed runs leave: CPU all-reduce buffers in /dev/shm no process maps, "
                  "JIT build locks no process holds"),
}


# Commands that train: stopped before any work when NVIDIA GPUs are present but
# PyTorch cannot use them (m6rec/hardware.py; M6REC_ALLOW_CPU=1 to train on the CPU anyway).
TRAINING_COMMANDS = ("train", "finetune", "quickstart")
GPU_UNUSABLE_EXIT = 3


def _check_gpus(command: str) -> int:
    from m6rec.hardware import GpuUnusable, check_gpus_usable

    local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    try:
        note = check_gpus_usable(command)
    except GpuUnusable as e:
        # Every rank stops; one per machine says why in full.
        print(str(e) if local_rank == "0" else str(e).splitlines()[0], file=sys.stderr)
        return GPU_UNUSABLE_EXIT
    if note and local_rank == "0":
        print(note, file=sys.stderr)
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (configs/...); dotted overrides may follow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m6rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from m6rec.quickstart import add_arguments as add_quickstart_arguments

    add_quickstart_arguments(sub.add_parser("quickstart", help=COMMANDS["quickstart"][2]))
    p = sub.add_parser("config", help=COMMANDS["config"][2])
    _add_common(p)
    p.add_argument("--get", default=None, help="print only this dotted key, e.g. train.run_dir")
    p = sub.add_parser("prepare", help=COMMANDS["prepare"][2])
    _add_common(p)
    p.add_argument("--workers", type=int, default=None, help="processes on this machine (overrides data.workers)")
    p.add_argument("--part", type=int, default=None, help="prepare only part I of --num-parts (users split by hash)")
    p.add_argument("--num-parts", type=int, default=None, help="number of parts for --part / --merge")
    p.add_argument("--merge", action="store_true", help="merge the manifests of parts written with --part")
    p = sub.add_parser("model-info", help=COMMANDS["model-info"][2])
    _add_common(p)
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs for the ZeRO memory table")
    p = sub.add_parser("train", help=COMMANDS["train"][2])
    _add_common(p)
    p.add_argument("--resume", default="none", help="'auto' = the newest complete checkpoint of train.run_dir, "
                   "'none', or a tag like step00000100")
    p = sub.add_parser("plot", help=COMMANDS["plot"][2])
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("bench", help=COMMANDS["bench"][2])
    p.add_argument("what", choices=["data", "model", "train", "gpu", "recommend"])
    _add_common(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--only", choices=["scaling", "overhead", "checkpoint"], default=None,
                   help="train: only the ZeRO scaling table, the engine overhead table or the checkpoint cost table")
    p.add_argument("--tiny", action="store_true", help="gpu: a tiny fp32 model on the CPU (what CI runs)")
    p.add_argument("--ckpt", action="append", default=None, help="recommend: a run directory (repeat to compare)")
    p.add_argument("--users", type=int, default=200, help="recommend: timed requests per run (after 10 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="recommend: torch threads (0 = torch's default)")
    p.add_argument("--dataset", action="append", default=None,
                   help="data: only the reader's .npy decoding on this prepared dataset (repeat to compare)")
    p.add_argument("--step-seconds", type=float, default=None,
                   help="data, with --dataset: the data wait of training whose step takes this long with the host "
                        "idle (as while a GPU computes), torch's loader defaults against m6rec's, side by side")
    p = sub.add_parser("export", help=COMMANDS["export"][2])
    p.add_argument("--ckpt", required=True, help="RUN_DIR/checkpoints (the newest complete one) or .../checkpoints/TAG")
    p.add_argument("--to", choices=["fp32", "hf"], default="fp32",
                   help="fp32: consolidated model.safetensors; hf: transformers Llama directory")
    p.add_argument("out", help="output directory (fp32 also takes a FILE.safetensors)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    from m6rec.rec.commands import add_eval_arguments, add_recommend_arguments

    add_eval_arguments(sub.add_parser("eval", help=COMMANDS["eval"][2]))
    add_recommend_arguments(sub.add_parser("recommend", help=COMMANDS["recommend"][2]))
    p = sub.add_parser("finetune", help=COMMANDS["finetune"][2])
    p.add_argument("--ckpt", required=True, help="the pretraining run directory (its config.yaml; dotted overrides "
                   "such as --finetune.task ranking --finetune.method option apply to it)")
    p.add_argument("--tag", default=None, help="a checkpoint tag like step00001000 (default: the newest complete)")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("clean-shm", help=COMMANDS["clean-shm"][2])
    p.add_argument("--dry-run", action="store_true", help="only count them")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return parser


def show_config(cfg, args) -> int:
    """`m6rec config`: scripts (slurm/*.sbatch) read resolved values through this."""
    import yaml

    from m6rec.config import to_dict

    tree = to_dict(cfg)
    if args.get:
        node = tree
        for part in args.get.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key '{args.get}'")
            node = node[part]
        print(node if not isinstance(node, (dict, list)) else yaml.safe_dump(node, sort_keys=False).rstrip())
    else:
        print(yaml.safe_dump(tree, sort_keys=False).rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    args, rest = parser.parse_known_args(argv)
    args.overrides = rest  # for commands with a default preset (bench data)
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"m6rec {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command in TRAINING_COMMANDS:
        from_launch = args.command == "train" and os.path.basename(sys.argv[0]) == "train.py"
        code = _check_gpus("launch/train.py" if from_launch else f"m6rec {args.command}")
        if code:
            return code
    module, func, _ = COMMANDS[args.command]
    fn = getattr(importlib.import_module(module), func)
    try:
        return int(fn(cfg, args) or 0)
    except ConfigError as e:
        print(f"m6rec {args.command}: {e}", file=sys.stderr)
        return 2


def entry(argv: list[str] | None = None) -> None:
    """The ``m6rec`` console script and ``launch/*.py``: :func:`main`, then, when it succeeded,
    the process group torn down before the interpreter exits (NCCL otherwise warns that
    destroy_process_group() was not called).  ``main`` itself leaves the group up, because
    tests call it several times in one process."""
    code = main(argv)
    # Only after success: a rank that failed while the others wait in a collective must exit now (so
    # srun --kill-on-bad-exit and the launcher end the job), not block in NCCL's communicator teardown
    # (torchtitan made the same choice).  Only when torch is loaded: `m6rec config` never imports it.
    dist = sys.modules.get("torch.distributed")
    if code == 0 and dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # a teardown problem must not turn a finished run into a failure
            print(f"m6rec: process group teardown: {e}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    entry()
