#!/usr/bin/env bash
# Option tuning vs full fine-tuning on one base (docs/option_tuning.md).
#   bash scripts/option_tuning.sh NAME [finetune overrides...]   fine-tune runs/ot-NAME, then evaluate it on valid
# BASE (default runs/ml1m-text) and STEPS (default 300) from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
M6=${M6:-m6rec}
BASE=${BASE:-runs/ml1m-text}
STEPS=${STEPS:-300}
name=$1; shift
FT=(--data.max_items 10 --finetune.steps "$STEPS" --finetune.batch_size 16 --finetune.negatives 64
    --finetune.task retrieval --train.wandb.mode disabled)
mkdir -p results/option_tuning
$M6 finetune --ckpt "$BASE" "${FT[@]}" "$@" --finetune.run_dir "runs/ot-$name"
$M6 eval --task retrieval --ckpt "runs/ot-$name" --split valid --out "results/option_tuning/$name-valid.json"
