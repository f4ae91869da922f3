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


def pytest_sessionstart(session) -> None:
    """Say so (even under -q) when memory is short or DeepSpeed buffers were left in /dev/shm:
    DeepSpeed's CPU ranks each map a 69 MB file there, and runs that did not unlink theirs
    fill /dev/shm (= RAM) run after run until multi-rank tests crawl or die."""
    from m6rec.train.leftovers import stale_build_locks, stale_shm_buffers

    avail = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemAvailable:")), None)
    stale = stale_shm_buffers()
    locks = stale_build_locks()  # every multi-rank test would hang on one of these
    if stale or locks or (avail is not None and avail < 4096):
        size = sum(f.stat().st_size for f in stale if f.exists()) // 2**20
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"m6rec tests: memory available {avail} MiB; stale DeepSpeed buffers in /dev/shm: "
                                f"{len(stale)} ({size} MiB); stale JIT build locks: "
                                f"{', '.join(map(str, locks)) or 0}"
                                f"{'; `m6rec clean-shm` frees them' if stale or locks else ''}")


@pytest.fixture
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared MovieLens data not found at {root} (set M6REC_DATA_ROOT)")
    return root


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT
