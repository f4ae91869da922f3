#!/bin/bash
# Submit a data preparation as an N-task job array plus the merge job that waits for it.
#   slurm/submit_prepare.sh CONFIG N [--data.key value ...] ; prints the merge job id
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: slurm/submit_prepare.sh CONFIG NUM_PARTS [overrides]" >&2; exit 2; fi
CONFIG=$1
N=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
ARRAY=$(sbatch --parsable --array=0-$((N - 1)) "$HERE/prepare.sbatch" part "$CONFIG" "$@")
ARRAY=${ARRAY%%;*}
MERGE=$(sbatch --parsable --dependency=afterok:"$ARRAY" "$HERE/prepare.sbatch" merge "$CONFIG" --num-parts "$N" "$@")
echo "${MERGE%%;*}"
