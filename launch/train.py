#!/usr/bin/env python
"""Training entry point for every launcher.

    deepspeed [--hostfile H] launch/train.py --config configs/pretrain/X.yaml [--resume auto] [--train.steps 100 ...]
    torchrun --nproc_per_node 8 launch/train.py --config ...
    accelerate launch --config_file launch/accelerate_deepspeed.yaml launch/train.py --config ...
    srun python launch/train.py --config ...          (ranks from SLURM_PROCID / SLURM_NTASKS)
    python launch/train.py --config ...               (one plain process)

It only parses arguments and calls m6rec.train.trainer.train(); `m6rec train`
is the same thing.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from m6rec.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
