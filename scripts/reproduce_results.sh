#!/usr/bin/env bash
# Every number of docs/results.md, from raw MovieLens to the tables (2-core CPU: ~4 hours).
#   bash scripts/reproduce_results.sh            # all stages
#   bash scripts/reproduce_results.sh eval       # only the evaluations (runs already trained)
#   bash scripts/reproduce_results.sh vectors    # items as text vectors vs item tokens (CPU, ~1.5 h)
#   bash scripts/reproduce_results.sh options    # option tuning vs full fine-tuning, selected pair (~1 h)
#   bash scripts/reproduce_results.sh beauty     # Amazon Beauty, the sparse-data preset (~1 h; needs ../shared)
#   bash scripts/reproduce_results.sh --gpu      # on one H100/H200 (~8 min): scripts/gpu_next_item.sh
# Each training process uses one thread (OMP_NUM_THREADS=1): the tiny model's small ops run
# faster that way on a shared 2-core machine, and two stages can run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
M6="${M6REC:-.venv/bin/m6rec}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" WANDB_MODE="${WANDB_MODE:-offline}"
OUT=results
mkdir -p "$OUT"
stage="${1:-all}"
[[ $stage == --gpu ]] && stage=gpu

if [[ $stage == all || $stage == pretrain ]]; then
  for c in ml1m-id ml1m-rated ml1m-both ml1m-text; do
    "$M6" prepare --config configs/rec/$c.yaml
    "$M6" train --config configs/rec/$c.yaml --resume auto
  done
  # the ID baseline again with ml1m-rated's step count (equal compute, 3.5 epochs)
  "$M6" train --config configs/rec/ml1m-id.yaml --train.steps 1250 --train.run_dir runs/ml1m-id-1250 \
    --train.eval_every 625 --train.save_every 625 --resume auto
  # both again at 3,250 steps: 8.7 epochs of IDs, 3.5 epochs of IDs + words
  for c in id rated; do
    "$M6" train --config configs/rec/ml1m-$c.yaml --train.steps 3250 --train.run_dir runs/ml1m-$c-3250 \
      --train.eval_every 1625 --train.save_every 1625 --train.log_every 250 --resume auto
  done
  "$M6" prepare --config configs/rec/ml100k-zeroshot.yaml   # ml-100k in the ml1m-text tokenizer
fi

# Fine-tuning the text model: the user prompt keeps its last 9 items (data.max_items 10).
FT=(--data.max_items 10 --finetune.steps 300 --finetune.batch_size 16 --finetune.negatives 64)
if [[ $stage == all || $stage == finetune ]]; then
  "$M6" finetune --ckpt runs/ml1m-text "${FT[@]}" --finetune.task retrieval --finetune.method full \
    --finetune.lr 1e-3 --finetune.run_dir runs/ml1m-text-retrieval-full
  "$M6" finetune --ckpt runs/ml1m-text "${FT[@]}" --finetune.task retrieval --finetune.method option \
    --finetune.lr 5e-3 --finetune.run_dir runs/ml1m-text-retrieval-option
  "$M6" finetune --ckpt runs/ml1m-text "${FT[@]}" --finetune.task retrieval --finetune.method option \
    --finetune.lr 2e-2 --finetune.options 16 --finetune.adapter_dim 16 --finetune.run_dir runs/ml1m-text-retrieval-option16
  "$M6" finetune --ckpt runs/ml1m-text "${FT[@]}" --finetune.task ranking --finetune.method full \
    --finetune.lr 1e-3 --finetune.run_dir runs/ml1m-text-ranking-full
  "$M6" finetune --ckpt runs/ml1m-text "${FT[@]}" --finetune.task ranking --finetune.method option \
    --finetune.lr 5e-3 --finetune.run_dir runs/ml1m-text-ranking-option
fi

if [[ $stage == all || $stage == eval ]]; then
  # next item: model selection on validation targets, then test targets once, full ranking:
  # the item-token (SASRec-style) baseline vs item tokens + behaviour in words vs item token + text
  NEXT=(--ckpt runs/ml1m-id --ckpt runs/ml1m-id-1250 --ckpt runs/ml1m-rated --ckpt runs/ml1m-both
        --ckpt runs/ml1m-id-3250 --ckpt runs/ml1m-rated-3250)
  "$M6" eval "${NEXT[@]}" --split valid --out $OUT/ml1m-next-item-valid.json
  "$M6" eval "${NEXT[@]}" --split test --out $OUT/ml1m-next-item.json
  # two-tower retrieval: full fine-tuning vs option tuning (and the untuned pretrained towers)
  "$M6" eval --task retrieval --ckpt runs/ml1m-text-retrieval-full --ckpt runs/ml1m-text-retrieval-option \
    --baseline runs/ml1m-id-1250 --split test --out $OUT/ml1m-retrieval.json
  "$M6" eval --task retrieval --ckpt runs/ml1m-text-retrieval-option16 --split test \
    --out $OUT/ml1m-retrieval-option16.json
  # ranking / CTR: held-out targets rated >= 4 vs <= 2
  "$M6" eval --task ranking --ckpt runs/ml1m-text-ranking-full --ckpt runs/ml1m-text-ranking-option \
    --split test --out $OUT/ml1m-ranking.json
  # zero-shot: ml-1m-partial models on ml-100k, never trained on it
  "$M6" eval --task retrieval --ckpt runs/ml1m-text-retrieval-full --ckpt runs/ml1m-text-retrieval-option \
    --dataset data/ml100k-zeroshot --split test --out $OUT/ml100k-zeroshot-retrieval.json
  "$M6" eval --ckpt runs/ml1m-text --dataset data/ml100k-zeroshot --split test --beam 50 \
    --out $OUT/ml100k-zeroshot-generative.json
fi

# Items as cached text vectors (issue 11) against the item-token baseline, at equal steps (equal
# tokens per step: both write <|item|> + one slot per item) and the baseline again at the text-vector
# runs' wall-clock (2,000 steps), then zero-shot on ml-100k and cold items.
if [[ $stage == all || $stage == vectors ]]; then
  for c in ml1m-id ml1m-vector ml1m-vector-token ml100k-vector ml1m-vector-cold ml1m-id-cold; do
    "$M6" prepare --config configs/rec/$c.yaml
  done
  for c in ml1m-id ml1m-vector ml1m-vector-token; do
    "$M6" train --config configs/rec/$c.yaml --train.steps 1250 --train.run_dir runs/$c-1250 \
      --train.eval_every 625 --train.save_every 625 --resume auto
  done
  "$M6" train --config configs/rec/ml1m-id.yaml --train.steps 2000 --train.run_dir runs/ml1m-id-2000 \
    --train.eval_every 1000 --train.save_every 1000 --resume auto
  "$M6" eval --ckpt runs/ml1m-id-1250 --ckpt runs/ml1m-id-2000 --ckpt runs/ml1m-vector-1250 \
    --ckpt runs/ml1m-vector-token-1250 --split test --out $OUT/ml1m-vectors.json
  "$M6" eval --ckpt runs/ml1m-vector-1250 --dataset data/ml100k-vector --split valid \
    --out $OUT/ml100k-vector-zeroshot-valid.json
  "$M6" eval --ckpt runs/ml1m-vector-1250 --dataset data/ml100k-vector --split test \
    --out $OUT/ml100k-vector-zeroshot.json
  "$M6" train --config configs/rec/ml100k-vector.yaml --model.init_from run:runs/ml1m-vector-1250 --resume auto
  "$M6" eval --ckpt runs/ml100k-vector-ft --split test --out $OUT/ml100k-vector-finetuned.json
  for c in ml1m-vector-cold ml1m-id-cold; do
    "$M6" train --config configs/rec/$c.yaml --train.steps 625 --train.eval_every 625 --train.save_every 625 \
      --resume auto
    "$M6" eval --ckpt runs/$c --split test --out $OUT/$c.json
  done
fi

# Option tuning on par (docs/option_tuning.md): the selected pair on validation, then test once.
# Needs runs/ml1m-text (the pretrain stage).  The study's other rows: docs/option_tuning.md.
if [[ $stage == all || $stage == options ]]; then
  for seed in 0 1; do
    sfx=$([[ $seed == 0 ]] && echo "" || echo "-s$seed")
    M6="$M6" bash scripts/option_tuning.sh "full-lr3e-4$sfx" --finetune.method full --finetune.lr 3e-4 \
      --finetune.seed $seed
    M6="$M6" bash scripts/option_tuning.sh "lora2-norms-lr5e-3$sfx" --finetune.method option --finetune.lr 5e-3 \
      --finetune.seed $seed
  done
  "$M6" eval --task retrieval --ckpt runs/ot-full-lr3e-4 --ckpt runs/ot-lora2-norms-lr5e-3 \
    --split test --out $OUT/option_tuning/final-test.json
  # the same pair on a base pretrained 4 x longer (docs/option_tuning.md, "A stronger base")
  "$M6" train --config configs/rec/ml1m-text.yaml --train.steps 1600 --train.eval_every 800 \
    --train.save_every 800 --train.run_dir runs/ml1m-text-1600 --resume auto
  for seed in 0 1 2; do
    BASE=runs/ml1m-text-1600 M6="$M6" bash scripts/option_tuning.sh "b1600-full-lr3e-4-s$seed" \
      --finetune.method full --finetune.lr 3e-4 --finetune.seed $seed
    BASE=runs/ml1m-text-1600 M6="$M6" bash scripts/option_tuning.sh "b1600-lora2-norms-lr5e-3-s$seed" \
      --finetune.method option --finetune.lr 5e-3 --finetune.seed $seed
    for lr in 5e-3 1e-2; do  # LoRA 3: lr 1e-2 is the variant selected on validation
      BASE=runs/ml1m-text-1600 M6="$M6" bash scripts/option_tuning.sh "b1600-lora3-norms-lr$lr-s$seed" \
        --finetune.method option --finetune.lora_rank 3 --finetune.lr $lr --finetune.seed $seed
    done
    "$M6" eval --task retrieval --ckpt "runs/ot-b1600-full-lr3e-4-s$seed" \
      --ckpt "runs/ot-b1600-lora2-norms-lr5e-3-s$seed" --ckpt "runs/ot-b1600-lora3-norms-lr5e-3-s$seed" \
      --ckpt "runs/ot-b1600-lora3-norms-lr1e-2-s$seed" --split test --out "$OUT/option_tuning/b1600-final-test-s$seed.json"
  done
fi

# Sparse, short histories (docs/evaluation.md, "Sparse data"): Amazon Beauty from ../shared (not in the
# project), the preset trains with checkpoint selection on validation users, the test split read once.
if [[ $stage == all || $stage == beauty ]]; then
  BEAUTY="${M6REC_DATA_ROOT:-../shared/data}/amazon-beauty"
  PY="${PYTHON:-.venv/bin/python}"
  "$PY" scripts/amazon_to_generic.py "$BEAUTY" data/amazon-beauty-generic
  "$M6" prepare --config configs/rec/amazon-beauty.yaml
  "$M6" train --config configs/rec/amazon-beauty.yaml --resume auto
  "$M6" eval --ckpt runs/amazon-beauty --tag best --split test --out $OUT/amazon-beauty.json
fi

# Semantic IDs (docs/results.md, "Semantic IDs"): Amazon Office from ../shared (not in the project), item
# tokens, text vectors and semantic IDs from text, each chosen on validation and tested once; cold items;
# then Beauty with collaborative codes from the sampled SASRec-shaped item-token run.
if [[ $stage == all || $stage == semantic_ids ]]; then
  DATA="${M6REC_DATA_ROOT:-../shared/data}"
  PY="${PYTHON:-.venv/bin/python}"
  "$PY" scripts/amazon_to_generic.py "$DATA/amazon-office" data/amazon-office-generic
  for c in amazon-office amazon-office-vector amazon-office-sid amazon-office-sid-cold amazon-office-vector-cold; do
    "$M6" prepare --config configs/rec/$c.yaml
    "$M6" train --config configs/rec/$c.yaml --resume auto
  done
  "$M6" eval --ckpt runs/amazon-office --ckpt runs/amazon-office-vector --ckpt runs/amazon-office-sid --tag best \
    --split test --agreement-users 500 --out $OUT/amazon-office.json
  "$M6" eval --ckpt runs/amazon-office-vector-cold --ckpt runs/amazon-office-sid-cold --tag best --split test \
    --out $OUT/amazon-office-cold.json
  "$PY" scripts/amazon_to_generic.py "$DATA/amazon-beauty" data/amazon-beauty-generic
  "$M6" prepare --config configs/rec/amazon-beauty.yaml
  "$M6" train --config configs/rec/amazon-beauty-sasrec.yaml --resume auto
  "$M6" prepare --config configs/rec/amazon-beauty-sid.yaml
  "$M6" train --config configs/rec/amazon-beauty-sid.yaml --resume auto
  "$M6" eval --ckpt runs/amazon-beauty-sid --tag best --split test --out $OUT/amazon-beauty-sid.json
fi

# One H100/H200 (docs/results.md, "On a GPU"): the engine benchmark, then item tokens, items as text
# vectors, both, and item tokens + behaviour in words with the small model in bf16, all four at once for
# the same wall-clock, evaluated on the GPU: scripts/gpu_next_item.sh (its header gives the device call).
if [[ $stage == gpu ]]; then
  exec bash scripts/gpu_next_item.sh
fi
