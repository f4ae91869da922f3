#!/usr/bin/env bash
# Set up m6rec in ./.venv on a fresh machine (idempotent, a few minutes the first time).
# PyTorch's CPU wheel goes in first: asked for through another package's range,
# pip would pull the multi-GB CUDA build instead.  On a GPU machine set
# M6REC_TORCH to the torch requirement you want (e.g. "torch==2.13.0" from the CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check --upgrade pip "setuptools>=68" wheel 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || pip install -q --disable-pip-version-check "${M6REC_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
# DeepSpeed builds against the torch already installed: no build isolation.
pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, deepspeed, webdataset, tokenizers, m6rec; print('m6rec ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
