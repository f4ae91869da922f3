#!/usr/bin/env bash
# Behaviour check for refactors: the first STEPS (default 50) steps of a fixed-seed quickstart-size
# run (the shipped quickstart preset, one rank, fp32 on the CPU, M6REC_TRACE=1) at git revision BASE
# and in this working tree must give bitwise the same losses, learning rates, sample keys and
# parameter digests; a second, shorter run with gradient accumulation, infilling and validation
# every 10 steps covers those paths too.  Both use this checkout's .venv; BASE runs from a temporary
# git worktree put first on PYTHONPATH.
#
#   bash scripts/same_losses.sh BASE [STEPS]      e.g. bash scripts/same_losses.sh HEAD~3
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:?usage: scripts/same_losses.sh BASE_REVISION [STEPS]}
STEPS=${2:-50}
PY=$PWD/.venv/bin/python
WORK=$(mktemp -d /tmp/m6rec-same-losses.XXXXXX)
KEEP=1  # the worktree goes in every case; the runs stay for a look unless they are the same
trap 'git worktree remove --force "$WORK/base" >/dev/null 2>&1 || true; [ "$KEEP" = 1 ] || rm -rf "$WORK"' EXIT
git worktree add -q --detach "$WORK/base" "$BASE"
PRESET=$PWD/m6rec/configs/quickstart.yaml
COMMON=(--train.log_every 5 --train.wandb.mode disabled --data.output "$WORK/data")
"$PY" -m m6rec.cli prepare --config "$PRESET" --data.output "$WORK/data" > "$WORK/prepare.log" 2>&1
run() {  # run NAME CODE_ROOT: the two traced runs of the code at CODE_ROOT
    (cd "$WORK" && PYTHONPATH=$2 M6REC_TRACE=1 "$PY" -m m6rec.cli train --config "$PRESET" "${COMMON[@]}" \
        --train.steps "$STEPS" --train.eval_every 25 --train.save_every 25 --train.run_dir "$WORK/$1" \
        > "$WORK/$1.log" 2>&1)
    (cd "$WORK" && PYTHONPATH=$2 M6REC_TRACE=1 "$PY" -m m6rec.cli train --config "$PRESET" "${COMMON[@]}" \
        --train.steps 30 --train.eval_every 10 --train.save_every 15 --train.grad_accum 2 --train.infill_rate 0.3 \
        --train.run_dir "$WORK/$1_accum" > "$WORK/$1_accum.log" 2>&1)
}
run base "$WORK/base"
run now "$PWD"
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work, ok = Path(sys.argv[1]), True
for suffix in ("", "_accum"):
    a, b = ([json.loads(x) for x in (work / f"{n}{suffix}" / "trace" / "rank0.jsonl").read_text().splitlines()]
            for n in ("base", "now"))
    keys = ("step", "loss", "lr", "keys", "params")
    same = len(a) == len(b) > 0 and all(all(x[k] == y[k] for k in keys) for x, y in zip(a, b))
    first = next(((x["step"], [k for k in keys if x[k] != y[k]]) for x, y in zip(a, b) if x != y), None)
    vals = [[json.loads(x).get("val_loss") for x in (work / f"{n}{suffix}" / "metrics.jsonl").read_text().splitlines()]
            for n in ("base", "now")]
    same &= vals[0] == vals[1]
    print(f"{'quickstart' if not suffix else 'accumulation + infilling'}: {len(a)} steps, "
          f"{'bitwise the same' if same else 'DIFFERENT'} (losses, lr, sample keys, parameter digests, val losses)")
    if not same:
        print(f"  first difference: {first}; val losses {vals}; the runs are in {work}")
    ok &= same
sys.exit(0 if ok else 1)
EOF
KEEP=0
