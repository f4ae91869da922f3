"""What killed DeepSpeed runs leave behind, found and removed (`m6rec clean-shm`).

* DeepSpeed's CPU all-reduce buffers in /dev/shm (memory) that no live process maps;
* JIT build locks that no process holds: every later build of that op waits on them forever.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from m6rec.config import Config

#: DeepSpeed's CPU all-reduce buffer in /dev/shm, one per rank (ops/csrc/cpu/comm/shm.cpp)
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU backend puts this rank's all-reduce buffer (named by uid,
    MASTER_ADDR, MASTER_PORT and rank, as read from the environment at init)."""
    env = os.environ
    return Path("/dev/shm") / (f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                               f"{env.get('MASTER_PORT', '')}_{rank}")


def stale_shm_buffers() -> list[Path]:
    """This user's DeepSpeed CPU all-reduce buffers in /dev/shm that no live process maps:
    what runs without :func:`unlink_shm_buffer` (older m6rec, other DeepSpeed programs) left."""
    files = sorted(Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_{os.getuid()}_*"))
    if not files:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):  # a process that exits while we read, or not ours
            mapped.update(line.split(None, 5)[5].removesuffix(" (deleted)").strip()
                          for line in maps.read_text().splitlines() if "/dev/shm/" in line)
    return [f for f in files if str(f) not in mapped]


def torch_extensions_root() -> Path:
    """Where torch builds JIT extensions (DeepSpeed's ops among them): ``TORCH_EXTENSIONS_DIR`` or
    torch's default (``~/.cache/torch_extensions``)."""
    # torch: `m6rec clean-shm` and the test session's start need it only here
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def stale_build_locks() -> list[Path]:
    """JIT build locks that no process on this machine holds: ``<root>/<op>/lock`` under
    ``TORCH_EXTENSIONS_DIR``, ``<root>/<python>_<device>/<op>/lock`` under torch's default root.

    torch takes the lock by creating the file and keeps it open until the build ends, then removes
    it; every other process that needs the op waits -- with no message and no timeout -- for the file
    to go.  A build killed mid-way (Ctrl-C, ``scancel``, a test timeout) leaves the file behind, and
    from then on every run that needs the op hangs at start-up (DeepSpeed builds its CPU
    communication op, ``deepspeed_shm_comm``, in ``init_distributed``).  A lock no live process has
    open is such a leftover -- on this machine: a build on another node of a shared home directory
    is invisible here.  Only this user's locks are judged (another user's processes cannot be
    seen), and only those unheld in two scans apart: torch closes the file before removing it."""
    root = torch_extensions_root()

    def unheld(locks: list[Path]) -> list[Path]:
        held = set()
        for fd_dir in Path("/proc").glob("[0-9]*/fd"):
            with contextlib.suppress(OSError):  # a process that exits while we read
                for fd in fd_dir.iterdir():
                    with contextlib.suppress(OSError):
                        held.add(os.readlink(fd))
        out = []
        for f in locks:
            with contextlib.suppress(FileNotFoundError):  # gone: the build ended
                if f.stat().st_uid == os.getuid() and str(f.resolve()) not in held:
                    out.append(f)
        return out

    stale = unheld(sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}))
    if stale:
        time.sleep(0.2)
        stale = unheld(stale)
    return stale


def warn_stale_build_locks() -> list[Path]:
    """Say on the console, before DeepSpeed waits on them forever, which build locks are stale."""
    stale = stale_build_locks()
    for f in stale:
        print(f"m6rec: WARNING: {f} was left by a killed JIT build and no process on this machine holds it; "
              f"DeepSpeed waits for it to go before building {f.parent.name}, with no timeout. `m6rec clean-shm` "
              "removes it (with a home directory shared between machines, first make sure none of them is "
              "building).", file=sys.stderr, flush=True)
    return stale


def clean_shm_main(cfg: Config, args) -> int:
    """`m6rec clean-shm`: remove :func:`stale_shm_buffers` and :func:`stale_build_locks`
    (``--dry-run``: only list them)."""
    stale = stale_shm_buffers()
    total = 0
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            total += f.stat().st_size
            if not args.dry_run:
                f.unlink()
    verb = "would remove" if args.dry_run else "removed"
    print(f"m6rec clean-shm: {verb} {len(stale)} stale DeepSpeed buffer(s) in /dev/shm, {total / 2**20:.0f} MiB")
    locks = stale_build_locks()
    for f in locks:
        print(f"m6rec clean-shm: {verb} stale JIT build lock {f}")
        if not args.dry_run:
            f.unlink(missing_ok=True)
    return 0

