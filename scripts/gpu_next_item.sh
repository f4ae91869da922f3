#!/usr/bin/env bash
# One lent GPU, one prepared command (~8 minutes): the engine benchmark, then issue 11's next-item table.
#   here:    for c in ml1m-vector ml1m-vector-token; do m6rec prepare --config configs/rec/$c.yaml; done
#            bash ../shared/gpu/make_carry.sh && bash scripts/gpu_next_item.sh --carry-banks
#   device:  carry [".gpu"];  . .gpu/on_device.sh && OUT=$OUT bash scripts/gpu_next_item.sh
#   CPU:     GPU_CHECK_TINY=1 OUT=/tmp/gni bash scripts/gpu_next_item.sh   (the same stages, tiny; tests/bench/test_gpu_check.py
#            runs them with SKIP_BENCH=1 GPU_CONFIGS="ml1m-id ml1m-vector")
# Stages, each under its own timeout, results written as they come (at most 8 files come back):
#   1. m6rec bench gpu -> $OUT/bench_gpu.json (model alone vs the engine; scripts/gpu_check.sh's stage 1),
#      while the four datasets are prepared on the CPU cores from the carried MovieLens files (the GPU
#      image has no sentence encoder: the item-vector banks made here travel in .gpu/banks and are reused)
#   2. item tokens, items as text vectors, both, and item tokens + behaviour in words, with the small model
#      (25 M parameters, bf16, eager) through the `deepspeed` launcher, all four at once on the one GPU for
#      the same wall-clock (GPU_TRAIN_SECONDS), or one after another (GPU_SEQUENTIAL=1); each stops by
#      RUN_DIR/STOP if its steps are not done
#   3. m6rec eval of the four on the test split (whole catalog, history excluded) -> $OUT/gpu-next-item.json
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a CONFIGS <<< "${GPU_CONFIGS:-ml1m-id ml1m-vector ml1m-vector-token ml1m-rated}"  # a subset: tests
if [[ ${1:-} == --carry-banks ]]; then  # here, after make_carry.sh: the vector banks the device reuses
  mkdir -p .gpu/banks
  for c in ml1m-vector ml1m-vector-token; do cp "data/$c/item_vectors.safetensors" ".gpu/banks/$c.safetensors"; done
  du -sh .gpu; exit 0
fi
OUT=${OUT:-/tmp/gpu_next_item}
WORK=${GPU_WORK:-/tmp/gpu_next_item_work}
. scripts/gpu_common.sh
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  TINY=(--tiny); DEVICE=cpu; CAP=${GPU_TRAIN_SECONDS:-60}; T_BENCH=300; T_PREP=600; EVAL=(--max-users 100)
  MODEL=(--train.precision fp32 --data.stream.batch_size 4)
  declare -A STEPS=([ml1m-id]=15 [ml1m-vector]=15 [ml1m-vector-token]=15 [ml1m-rated]=40)
else
  TINY=(); DEVICE=cuda; CAP=${GPU_TRAIN_SECONDS:-150}; T_BENCH=170; T_PREP=150; EVAL=()
  # the small model (docs/results.md "On a GPU"): 32 rows x 512 tokens = 16,384 tokens a step
  MODEL=(--model.dim 512 --model.n_layers 6 --model.n_heads 8 --model.ffn_hidden 1536 --model.compile false
         --train.precision bf16 --data.stream.batch_size 32)
  # 1.45 M training tokens per epoch of item tokens: 89 steps an epoch (behaviour in words: 2.5x the tokens)
  declare -A STEPS=([ml1m-id]=900 [ml1m-vector]=900 [ml1m-vector-token]=900 [ml1m-rated]=2250)
fi
if [ -n "${GPU_STEPS:-}" ]; then  # "ID VECTOR VECTOR_TOKEN RATED": e.g. each one's pace x the wall-clock
  read -r -a n <<< "$GPU_STEPS"
  (( ${#n[@]} == ${#CONFIGS[@]} )) || { echo "GPU_STEPS: give ${#CONFIGS[@]} numbers (${CONFIGS[*]})" >&2; exit 2; }
  for i in "${!CONFIGS[@]}"; do STEPS[${CONFIGS[$i]}]=${n[$i]}; done
fi
# GPU_WORKERS: loader processes per run (the first GPU table's runs waited for data 23-52 % of a step with 2
# each, four runs sharing 16 cores); GPU_SEQUENTIAL=1: one run at a time, each with the GPU and the cores to
# itself for GPU_TRAIN_SECONDS (the per-configuration timing; 4 x the wall-clock of the default, all at once)
COMMON=(--data.stream.num_workers "${GPU_WORKERS:-2}" --deepspeed.zero_stage 0 --train.log_every 50
        --train.eval_every 0 --train.wandb.mode disabled)

log_tail() { { echo "=== $1"; tail -"${2:-60}" "$WORK/$1.log"; } >> "$OUT/logs.txt"; }

# --- 1. the engine benchmark on the GPU, the datasets on the CPU cores meanwhile -------------------------
for c in "${CONFIGS[@]}"; do
  ( mkdir -p "$WORK/data/$c"
    [ -f ".gpu/banks/$c.safetensors" ] && cp ".gpu/banks/$c.safetensors" "$WORK/data/$c/item_vectors.safetensors"
    timeout "$T_PREP" "$PY" -m m6rec.cli prepare --config configs/rec/$c.yaml \
      --data.root "$DATA_ROOT/ml-1m-partial" --data.output "$WORK/data/$c" --data.workers 3 > "$WORK/prep-$c.log" 2>&1
    echo "prepare-$c rc=$?" >> "$OUT/stages.txt" ) &
done
t0=$SECONDS
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout --kill-after=10 "$T_BENCH" "$PY" -m m6rec.cli bench gpu "${TINY[@]}" --out "$OUT/bench_gpu.json" \
    > "$WORK/bench.log" 2>&1
  echo "bench rc=$? seconds=$((SECONDS - t0))" >> "$OUT/stages.txt"; log_tail bench 40
fi
wait; echo "prepared seconds=$((SECONDS - t0))" >> "$OUT/stages.txt"
for c in "${CONFIGS[@]}"; do log_tail "prep-$c" 5; done

# --- 2. the configurations for the same wall-clock each: all at once, or one at a time -----------------
train_group() {  # start the given configurations together, stop them after CAP seconds (RUN_DIR/STOP)
  local t0=$SECONDS pids=() c i alive waited
  for c in "$@"; do
    port=$((port + 1))
    rm -rf "$WORK/runs/$c"
    # its own session: a run that ignores STOP is killed with its launcher's whole process group below
    setsid deepspeed --num_gpus 1 --master_port $port launch/train.py --config configs/rec/$c.yaml "${MODEL[@]}" \
      "${COMMON[@]}" --data.output "$WORK/data/$c" --train.steps "${STEPS[$c]}" --train.save_every "${STEPS[$c]}" \
      --train.run_dir "$WORK/runs/$c" > "$WORK/train-$c.log" 2>&1 &
    pids+=($!)
  done
  while (( SECONDS - t0 < CAP )); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break; sleep 2
  done
  i=0
  for c in "$@"; do
    waited=$SECONDS
    # STOP is read at every step; a run still starting up has no run directory yet, so make it (a finished
    # run has no reader of the file)
    while kill -0 "${pids[$i]}" 2>/dev/null && (( SECONDS - waited < 60 )); do
      mkdir -p "$WORK/runs/$c"; touch "$WORK/runs/$c/STOP"; sleep 1
    done
    kill -0 "${pids[$i]}" 2>/dev/null && { echo "train-$c: no exit after STOP, killed" >> "$OUT/stages.txt"
                                             kill -TERM -- -"${pids[$i]}"; sleep 5; kill -KILL -- -"${pids[$i]}"; }
    wait "${pids[$i]}"; echo "train-$c rc=$? seconds=$((SECONDS - t0))" >> "$OUT/stages.txt"; log_tail "train-$c" 12
    i=$((i + 1))
  done
}
port=29610
if [ "${GPU_SEQUENTIAL:-0}" = 1 ]; then
  for c in "${CONFIGS[@]}"; do train_group "$c"; done
else
  train_group "${CONFIGS[@]}"
fi

# --- 3. the test split, all four side by side ---------------------------------------------------------
runs=(); for c in "${CONFIGS[@]}"; do [ -f "$WORK/runs/$c/summary.json" ] && runs+=(--ckpt "$WORK/runs/$c"); done
t0=$SECONDS
(( ${#runs[@]} )) || echo "eval skipped: no run finished" >> "$OUT/stages.txt"
(( ${#runs[@]} )) && timeout --kill-after=10 "${T_EVAL:-120}" "$PY" -m m6rec.cli eval "${runs[@]}" --split test --device "$DEVICE" "${EVAL[@]}" \
  --out "$OUT/gpu-next-item.json" > "$WORK/eval.log" 2>&1
echo "eval rc=$? seconds=$((SECONDS - t0))" >> "$OUT/stages.txt"; log_tail eval 30

"$PY" - "$OUT" "$WORK" "${CONFIGS[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, work, configs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for c in configs:
    d = work / "runs" / c
    s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
    m = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    m = [r for r in m if {"tokens_per_s", "step_time_ms", "data_wait_pct"} <= set(r)]
    steady = m[1:] or m
    rows.append(dict(config=c, step=s.get("step"), stopped_by=s.get("stopped_by"),
                     ms_per_step=statistics.median(r["step_time_ms"] for r in steady) if steady else None,
                     tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
                     data_wait_pct=statistics.median(r["data_wait_pct"] for r in steady) if steady else None,
                     epoch=m[-1].get("epoch") if m else None,
                     summary=s))
lines = ["| config | steps done | epoch | ms/step (4 sharing one GPU) | tokens/s | data wait |", "|---|---|---|---|---|---|"]
for r in rows:
    ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] else "-"
    tps = f"{r['tokens_per_s'] / 1e3:.1f} k" if r["tokens_per_s"] else "-"
    wait = f"{r['data_wait_pct']:.1f} %" if r["data_wait_pct"] is not None else "-"
    lines.append(f"| {r['config']} | {r['step']} ({r['stopped_by']}) | {r['epoch']} | {ms} | {tps} | {wait} |")
(out / "gpu_next_item_runs.json").write_text(json.dumps(rows, indent=1) + "\n")
print("\n".join(lines))
print((out / "stages.txt").read_text())
EOF
