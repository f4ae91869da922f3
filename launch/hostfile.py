#!/usr/bin/env python
"""Write a DeepSpeed/MPI-style hostfile ("host slots=N" per line).

    python launch/hostfile.py --slots 8 node01 node02          # a plain list of hosts
    python launch/hostfile.py --slots 8 --slurm                # the nodes of this Slurm job
    python launch/hostfile.py --slots 8 --nodelist 'gpu[01-03,07]'

--slurm and --nodelist expand Slurm's compressed node lists with
`scontrol show hostnames`, which every Slurm installation has.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys


def expand_nodelist(nodelist: str) -> list[str]:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SystemExit("hostfile: scontrol not found; pass the host names instead") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"hostfile: scontrol could not expand {nodelist!r}: {e.stderr.strip()}") from None
    return out.stdout.split()


def hostfile_lines(hosts: list[str], slots: int) -> list[str]:
    if not hosts:
        raise SystemExit("hostfile: no hosts given")
    if slots < 1:
        raise SystemExit(f"hostfile: --slots must be >= 1, got {slots}")
    seen = []
    for h in hosts:
        if h not in seen:
            seen.append(h)
    return [f"{h} slots={slots}" for h in seen]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hosts", nargs="*", help="host names (or use --slurm / --nodelist)")
    p.add_argument("--slots", type=int, required=True, help="ranks per host (GPUs per node)")
    p.add_argument("--slurm", action="store_true", help="use $SLURM_JOB_NODELIST")
    p.add_argument("--nodelist", help="a Slurm node list such as 'gpu[01-04]'")
    p.add_argument("-o", "--out", help="write here instead of stdout")
    a = p.parse_args(argv)
    hosts = list(a.hosts)
    if a.slurm:
        if "SLURM_JOB_NODELIST" not in os.environ:
            raise SystemExit("hostfile: --slurm outside a Slurm job (SLURM_JOB_NODELIST is not set)")
        hosts += expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
    if a.nodelist:
        hosts += expand_nodelist(a.nodelist)
    text = "\n".join(hostfile_lines(hosts, a.slots)) + "\n"
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
