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

import yaml

from m6rec.config import ConfigError, load_config, to_dict
from m6rec.hardware import GpuUnusable, check_gpus_usable

#: the free-text history `m6rec quickstart` recommends for by default
DEFAULT_HISTORY = "Toy Story (1995); Finding Nemo (2003); Up (2009)"

# name -> (module, function, help). Each function takes (cfg, args).
COMMANDS = {
    "quickstart": ("m6rec.quickstart", "main", "built-in data: prepare -> pretrain -> evaluate vs popularity -> recommend"),
    "config": ("m6rec.cli", "show_config", "print the resolved configuration (or one key with --get)"),
    "prepare": ("m6rec.data.prepare", "main", "raw logs -> M6-Rec text -> tokenizer -> WebDataset shards"),
    "model-info": ("m6rec.train.zero_memory", "main", "parameters, FLOPs/token and ZeRO memory of a model preset"),
    "bench": ("m6rec.bench", "main", "benchmarks: data | model | train | gpu | recommend | catalog"),
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


def add_quickstart_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="YAML preset (default: the shipped m6rec/configs/quickstart.yaml); dotted overrides may follow")
    p.add_argument("--out", default=None, help="run directory (default train.run_dir of the preset: runs/quickstart)")
    p.add_argument("--split", choices=["test", "valid"], default="test",
                   help="split of the reported table (default test: reported once, nothing is selected on it)")
    p.add_argument("--users", default=None, help="comma-separated user ids to recommend for (default: two drawn "
                   "with a fixed seed)")
    p.add_argument("--history", default=DEFAULT_HISTORY, help="a free-text history to recommend for ('' = none)")
    p.add_argument("--k", type=int, default=10, help="recommendations per user")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for training (default: OMP_NUM_THREADS, else 1; 0 = cores per rank)")
    p.add_argument("--force-prepare", action="store_true", help="prepare the data even when it is up to date")


def add_eval_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, action="append",
                   help="a run directory (newest complete checkpoint); repeat to put several models in one table")
    p.add_argument("--tag", default=None, help="a checkpoint tag like step00001000, or best (RUN_DIR/best.json of "
                   "train.select_by), for every --ckpt run (default: each run's newest complete checkpoint)")
    p.add_argument("--task", default="next_item",
                   help="next_item (generative: item-token softmax or trie beam search), retrieval (two-tower, "
                        "a run of `m6rec finetune`), ranking (P(yes) of held-out targets: AUC, log loss)")
    p.add_argument("--baseline", action="append", default=None,
                   help="retrieval tables: also rank with this next-item run (e.g. the item-token baseline), "
                        "same split and catalog; repeatable")
    p.add_argument("--dataset", default=None,
                   help="evaluate on this prepared dataset instead of the model's own: zero-shot when it differs "
                        "(prepare it with the model's tokenizer: --data.tokenizer.path RUN_DATA/tokenizer.json)")
    p.add_argument("--split", choices=["valid", "test"], default="valid",
                   help="valid for model selection; test once, for the reported number")
    p.add_argument("--max-users", type=int, default=0, help="a seeded random subset of users (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-users subset")
    p.add_argument("--ks", default=None, help="cutoffs, e.g. 1,5,10,20,50 (default: eval.ks of the run's config)")
    _add_model_arguments(p)
    p.add_argument("--out", required=True, help="FILE.json (FILE.md and FILE.png are written beside it)")


def add_recommend_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="a run directory (newest complete checkpoint)")
    p.add_argument("--tag", default=None, help="a checkpoint tag like step00001000")
    p.add_argument("--user", default=None, help="a user id of the dataset")
    p.add_argument("--history", default=None, help='a free-text history: "Toy Story (1995); Heat (1995)"')
    p.add_argument("--k", type=int, default=10, help="how many items")
    _add_model_arguments(p)


def _add_model_arguments(p) -> None:
    p.add_argument("--mode", choices=["auto", "text", "token", "vector", "semantic_id"], default="auto",
                   help="auto: as the run's data.text.item_repr writes items (item tokens, text vectors, semantic "
                        "IDs: trie beam search, text: trie beam search)")
    p.add_argument("--beam", type=int, default=0, help="beam width of the trie beam (text and semantic_id modes; "
                   "at least the largest k; 0 = the run's eval.beam)")
    p.add_argument("--agreement-users", type=int, default=None,
                   help="m6rec eval, semantic_id and text modes: on this many of the users, the beam's top 10 is "
                        "compared with the exact top 10 (a beam as wide as the catalog); default 200 for semantic "
                        "IDs, 0 (off) for text, whose exact search costs seconds per user; 0 = off")
    p.add_argument("--length-norm", type=float, default=1.0,
                   help="text mode: score = log p(item text + END) / (tokens + 1) ** this (1 = mean per token, "
                        "0 = the item's probability)")
    p.add_argument("--batch-size", type=int, default=16, help="users per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0 = torch's default); beam search is many small ops, and one thread "
                        "measured faster than two on a shared 2-core machine")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # the run's own config.yaml is read


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m6rec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    p.add_argument("what", choices=["data", "model", "train", "gpu", "recommend", "catalog"])
    _add_common(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--only", choices=["scaling", "overhead", "checkpoint", "cells", "zero", "semantic_ids"],
                   default=None,
                   help="train: only the ZeRO scaling table, the engine overhead table or the checkpoint cost table; "
                        "catalog: only the size x representation cells, only the semantic-ID cells, or only the "
                        "2-rank ZeRO memory of the table")
    p.add_argument("--quick", action="store_true",
                   help="train: a shortened run (what CI runs): ZeRO stages 0 and 2, 1 warm-up and 2 timed steps "
                        "in each part, one checkpoint save, the tiny preset at 64 tokens x 2 rows unless --config")
    p.add_argument("--sizes", default=None,
                   help="catalog: catalog sizes, e.g. 10k,100k,1M,10M (the default; --quick: 1k,4k)")
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
