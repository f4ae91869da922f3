"""Shared test settings.

Real MovieLens files are found through one setting, ``M6REC_DATA_ROOT``
(default ``../shared/data`` relative to the project root); tests that need
them take the ``shared_data`` fixture and are skipped with the reason when
the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


def shared_data_root() -> Path:
    return Path(os.environ.get("M6REC_DATA_ROOT", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared MovieLens data not found at {root} (set M6REC_DATA_ROOT)")
    return root


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT
