#!/usr/bin/env bash
# Set up m6rec in ./.venv on a fresh machine (idempotent, a few minutes the first time).
#
# PyTorch goes in first, the build chosen by scripts/torch_choice.py from what
# the NVIDIA driver reports (asked for through another package's range, pip
# would pick a build on its own):
#   no NVIDIA GPU (no nvidia-smi, or it lists none): the CPU wheel, torch==2.13.0;
#   NVIDIA GPUs: torch==2.13.0+cuXYZ from https://download.pytorch.org/whl/cuXYZ,
#     the newest CUDA build the driver runs (cu130 for a driver reporting CUDA >= 13.0,
#     cu126 for 12.6-12.9 or pre-Turing GPUs; older drivers: the CPU wheel and a warning).
# Run it on a GPU node: a login node without GPUs gets the CPU wheel.
# A torch already in .venv is kept, except a CPU build (or a CUDA build newer
# than the driver) on a GPU machine, which is replaced, loudly.
#
#   M6REC_TORCH="PIP ARGS"  override the choice (it wins), e.g.
#       M6REC_TORCH="torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126" bash scripts/install.sh
#   M6REC_INSTALL_DRY=1     print the install commands instead of running them (no .venv is made)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${M6REC_INSTALL_DRY:-}

pip_install() {  # pip install, quiet, minus pip's "WARNING: Location" noise; pip's exit status is kept
    if [ -n "$DRY" ]; then
        echo "+ pip install $*"
        return
    fi
    pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2 || true)
}

if [ -n "$DRY" ]; then
    echo "m6rec install: dry run with $PY (nothing is installed)"
else
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    . .venv/bin/activate
    PY=python
fi
pip_install --upgrade pip "setuptools>=77" wheel

INSTALLED=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or 'cpu')" 2>/dev/null || true)
CHOICE=$("$PY" scripts/torch_choice.py --installed "$INSTALLED")  # its warnings go to stderr, as they come
ACTION=$(sed -n 1p <<<"$CHOICE")
TORCH_ARGS=$(sed -n 2p <<<"$CHOICE")
echo "m6rec install: torch: $(sed -n 3p <<<"$CHOICE")"
if [ "$ACTION" = install ]; then
    eval "pip_install $TORCH_ARGS"  # shell-quoted by torch_choice.py
fi

# DeepSpeed builds against the torch already installed: no build isolation.
pip_install --no-build-isolation -e ".[dev]"
if [ -n "$DRY" ]; then
    exit 0
fi
python -c "import torch, deepspeed, webdataset, tokenizers, m6rec; print('m6rec ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
python -m m6rec.hardware || true  # the GPUs found and whether torch can use them: a loud warning, not a failure
