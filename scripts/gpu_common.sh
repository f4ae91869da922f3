# Sourced by the prepared lent-GPU scripts (gpu_check.sh, gpu_next_item.sh) once they have set OUT and WORK:
# the interpreter, the data root, and empty result files that the stages append to.
PY=${PYTHON:-python3}
DATA_ROOT=${M6REC_DATA_ROOT:-../shared/data}
mkdir -p "$OUT" "$WORK"
: > "$OUT/stages.txt"; : > "$OUT/logs.txt"
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1
