"""Distributed start-up: the launcher's environment, DeepSpeed's communication init, the device.

:func:`init_distributed` runs unchanged under the ``deepspeed`` launcher, ``torchrun``,
``accelerate launch``, ``srun`` and as a single plain process (:func:`launcher_env` reads
whichever environment is there).  On the CPU (gloo) it also decides whether DeepSpeed builds
its shared-memory all-reduce op, and unlinks that op's /dev/shm buffers once mapped.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from typing import Optional

import torch
import torch.distributed as dist

from m6rec.config import ConfigError
from m6rec.train.leftovers import shm_buffer_path, warn_stale_build_locks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from whatever launched us.

    deepspeed, torchrun and accelerate set them; ``srun`` sets SLURM_* (the
    sbatch script exports MASTER_ADDR/MASTER_PORT); a plain process gets a
    world of one on a free local port."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            raise ConfigError("started by srun without MASTER_ADDR: export MASTER_ADDR (the first node) "
                              "and MASTER_PORT in the sbatch script (see slurm/train.sbatch)")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port()) if env["WORLD_SIZE"] == "1" else "29500"
    return {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def local_world_size() -> int:
    """Ranks on this machine: torchrun, deepspeed, Slurm, else (one machine assumed) the world."""
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", ""))
    if per_node[:1].isdigit():  # "2(x3)" or "2,1"
        return int(per_node.split("(")[0].split(",")[0])
    return int(env.get("WORLD_SIZE", "1"))


def unlink_shm_buffer() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer, once every rank has mapped it.

    On CPU, ``deepspeed.init_distributed`` builds its shm op and, when all ranks share one
    machine (``LOCAL_SIZE`` = world size, as the ``deepspeed`` launcher sets it), each rank
    creates a 69 MB file in /dev/shm and maps every rank's file -- and nothing ever unlinks
    them.  /dev/shm is memory: every such run leaked world x 69 MB until the machine ran out
    (19 GB over a few days of tests here).  The barrier makes sure every rank has finished
    mapping the others' files; after it the names can go, the mappings stay valid until
    exit, and the kernel frees the memory when the last rank exits, however it exits.
    """
    if not dist.is_initialized():
        return
    if dist.get_world_size() > 1:  # one rank (LOCAL_SIZE=1) maps only its own: nothing to wait for
        dist.barrier()
    shm_buffer_path(dist.get_rank()).unlink(missing_ok=True)


SHM_COMM_OP = "deepspeed_shm_comm"


def cpu_comm_op_off_reason(env=None) -> Optional[str]:
    """Why DeepSpeed's CPU backend should not build :data:`SHM_COMM_OP` for this run, or None.

    ``deepspeed.init_distributed`` on the CPU accelerator JIT-compiles that op (a C++ compiler with
    OpenMP; 30-60 s on the first launch of a machine).  It only speeds up the all-reduce between
    ranks of one machine, so:

    * one rank has nothing to reduce: the first launch neither needs a compiler nor waits for one;
    * without a C++ compiler the build failed and took ``init_distributed`` down with it, even for
      the README's first command; gloo's own all-reduce does the work instead.
    """
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE") or 1) <= 1:
        return "one rank"
    cxx = env.get("CXX") or "c++"  # what torch's extension build calls
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    return None


def prepare_cpu_comm(say: bool) -> None:
    """Before ``deepspeed.init_distributed`` on the CPU: turn :data:`SHM_COMM_OP` off where
    :func:`cpu_comm_op_off_reason` says so (DeepSpeed skips an op its compatibility table marks
    off); ``say``: the one process per machine that tells the console."""
    why = cpu_comm_op_off_reason()
    if why is None:
        return
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if say and why != "one rank":
        print(f"m6rec: {why}: DeepSpeed's shared-memory all-reduce for CPU ranks is not built; gloo does the "
              "all-reduce (slower between ranks of one machine; install g++ to have it)", file=sys.stderr, flush=True)


def init_deepspeed_comm(backend: str) -> None:
    """``deepspeed.init_distributed`` with what every m6rec process does around it: the stale build
    locks named first (one process per machine), on the CPU (gloo) the shm op decided
    (:func:`prepare_cpu_comm`) before and the /dev/shm names unlinked after (:func:`unlink_shm_buffer`)."""
    # deepspeed: imported once DS_ACCELERATOR is set (init_distributed); its import picks the accelerator
    import deepspeed

    first_on_machine = os.environ.get("LOCAL_RANK", "0") == "0"
    if first_on_machine:  # on the CPU the init may build an op
        warn_stale_build_locks()
    on_cpu = backend == "gloo"
    if on_cpu:
        prepare_cpu_comm(say=first_on_machine)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if on_cpu:
        unlink_shm_buffer()


def init_distributed() -> tuple[int, int, torch.device]:
    launcher_env()
    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    if not on_gpu and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a CPU split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))
    if not dist.is_initialized():
        init_deepspeed_comm("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")

