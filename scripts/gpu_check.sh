#!/usr/bin/env bash
# One prepared check for one GPU: about 6 minutes, nothing downloaded.  From the project root:
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh          (on a lent machine: . .gpu/on_device.sh first)
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh             (the same stages, tiny, on a CPU: CI runs this)
# Stages, each under its own timeout so one hang does not eat the lease; results are written as they come:
#   1. m6rec bench gpu: matmul peak, the model alone (m6rec eager/compiled, causal/packed prefix; HF Llama),
#      the engine at the same shape -> $OUT/bench_gpu.json
#   2. prepare ml-1m-partial (from M6REC_DATA_ROOT, default ../shared/data) for the base preset
#   3. the base preset through the deepspeed launcher at batch 16 (20 steps, checkpoint at 20) and 64
#   4. resume the batch-16 run to step 30 (--resume auto), export it to HF, evaluate it on cuda (500 users)
#   5. $OUT/gpu_check.json and gpu_check.md: one table; $OUT/logs.txt: every stage's log tail (5 files in all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
. scripts/gpu_common.sh

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  TINY=(--tiny); PRESET=configs/pretrain/tiny.yaml; DATA=(--data.root builtin:ml-latest-small)
  SHAPE=(--data.stream.num_workers 1); LAUNCH=("$PY" launch/train.py); DEVICE=cpu; S=(4 2 6); EVAL_USERS=50
  T_BENCH=300; T_PREP=120; T_TRAIN=180
else
  TINY=(); PRESET=configs/pretrain/base.yaml; DATA=(--data.root "$DATA_ROOT/ml-1m-partial" --data.workers 8)
  SHAPE=(); LAUNCH=(deepspeed --num_gpus 1 launch/train.py); DEVICE=cuda; S=(20 10 30); EVAL_USERS=500
  T_BENCH=170; T_PREP=50; T_TRAIN=70  # with export 40 and eval 60: under 9 minutes at worst
fi
STEPS=${S[0]}; SAVE=${S[1]}; RESUME_TO=${S[2]}
RUNARGS=(--config "$PRESET" --data.output "$WORK/data" "${SHAPE[@]}" --train.log_every 5 --train.eval_every 0)

stage() {  # stage NAME SECONDS CMD...: run under a timeout, log to $OUT/NAME.log, record the exit status
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (timeout ${secs}s)"
  timeout --kill-after=10 "$secs" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/stages.txt"
  # one log file comes back (a lent machine returns at most 8): each stage's last 150 lines
  { echo "=== $name rc=$rc: $*"; tail -150 "$WORK/$name.log"; } >> "$OUT/logs.txt"
  [ $rc = 0 ] || tail -5 "$WORK/$name.log"
  return 0
}

stage bench "$T_BENCH" "$PY" -m m6rec.cli bench gpu "${TINY[@]}" --out "$OUT/bench_gpu.json"
stage prepare "$T_PREP" "$PY" -m m6rec.cli prepare --config "$PRESET" "${DATA[@]}" --data.output "$WORK/data"
stage base_b16 "$T_TRAIN" "${LAUNCH[@]}" "${RUNARGS[@]}" --train.run_dir "$WORK/b16" --data.stream.batch_size 16 \
  --train.steps "$STEPS" --train.save_every "$SAVE"
stage base_b64 "$T_TRAIN" "${LAUNCH[@]}" "${RUNARGS[@]}" --train.run_dir "$WORK/b64" --data.stream.batch_size 64 \
  --train.steps "$STEPS" --train.save_every 0
stage resume "$T_TRAIN" "${LAUNCH[@]}" "${RUNARGS[@]}" --train.run_dir "$WORK/b16" --data.stream.batch_size 16 \
  --train.steps "$RESUME_TO" --train.save_every "$SAVE" --resume auto
stage export 40 "$PY" -m m6rec.cli export --ckpt "$WORK/b16/checkpoints" --to hf "$WORK/hf"
stage eval 60 "$PY" -m m6rec.cli eval --ckpt "$WORK/b16" --split valid --max-users "$EVAL_USERS" --device "$DEVICE" \
  --out "$WORK/eval.json"

"$PY" - "$OUT" "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
out, work = Path(sys.argv[1]), Path(sys.argv[2])
stages = dict(l.split(" ", 1) for l in (out / "stages.txt").read_text().splitlines() if l)
res = {"stages": {k: v for k, v in stages.items()}}
bench = out / "bench_gpu.json"
if bench.is_file():
    res["bench"] = json.loads(bench.read_text())
runs = {}
for name in ("b16", "b64"):
    rows = [json.loads(l) for l in (work / name / "metrics.jsonl").read_text().splitlines()] \
        if (work / name / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "tokens_per_s" in r]
    # the first logged interval holds the compile: the rest is the steady state
    steady = rows[1:] or rows
    if steady:
        runs[name] = dict(tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                          step_time_ms=statistics.median(r["step_time_ms"] for r in steady),
                          mfu_pct=statistics.median(r["mfu_pct"] for r in steady), steps=[r["step"] for r in rows])
    s = work / name / "summary.json"
    if s.is_file():
        runs.setdefault(name, {})["summary"] = json.loads(s.read_text())
res["base_preset"] = runs
ev = work / "eval.json"
res["eval"] = json.loads(ev.read_text()) if ev.is_file() else None
lines = list(res.get("bench", {}).get("table", ["(bench gpu did not finish: see logs.txt)"]))
lines += ["", "| base preset (engine, real data) | ms/step | tokens/s | MFU (engine's own figure) |", "|---|---|---|---|"]
for name, r in runs.items():
    if "tokens_per_s" in r:
        lines.append(f"| {name} | {r['step_time_ms']:.1f} | {r['tokens_per_s'] / 1e3:.1f} k | {r['mfu_pct']:.1f} % |")
resumed = runs.get("b16", {}).get("summary", {})
lines += ["", "stages: " + ", ".join(f"{k} {v}" for k, v in stages.items()),
          f"resume: start_step {resumed.get('start_step')} -> step {resumed.get('step')}"]
(out / "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
