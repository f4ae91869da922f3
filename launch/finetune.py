#!/usr/bin/env python
"""Fine-tuning entry point for every launcher (retrieval or ranking, full or option tuning).

    deepspeed [--hostfile H] launch/finetune.py --ckpt runs/base --finetune.task retrieval [--finetune.method option ...]
    torchrun --nproc_per_node 8 launch/finetune.py --ckpt runs/base ...
    python launch/finetune.py --ckpt runs/base ...    (one plain process)

The same as `m6rec finetune`; each rank samples its own training examples.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from m6rec.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["finetune", *sys.argv[1:]])
