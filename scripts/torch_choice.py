#!/usr/bin/env python3
"""Which PyTorch build scripts/install.sh puts in .venv, from what the NVIDIA driver reports.

    python3 scripts/torch_choice.py [--installed "VERSION CUDA|cpu"] [--smi FILE --gpus FILE]

Standard library only: it runs before anything is installed.  Without --smi it
runs ``nvidia-smi`` itself (``$M6REC_NVIDIA_SMI`` names another binary); a
missing binary, a failing one or an empty GPU list all mean "no NVIDIA GPU".
It prints three lines for install.sh -- the action (``install`` or ``keep``),
the pip arguments (shell-quoted) and a one-line reason -- and any warning on
stderr.  ``M6REC_TORCH`` (pip arguments, split like a shell would) overrides
the choice.

The choice:

* no NVIDIA GPU: the CPU wheel, ``torch==2.13.0`` as before (pip finds it in
  the configured indexes / find-links);
* NVIDIA GPUs: ``torch==2.13.0+cuXYZ`` from https://download.pytorch.org/whl/cuXYZ,
  the newest of PyTorch 2.13's stable CUDA builds that (a) the driver runs
  with NVIDIA's full compatibility, i.e. the driver's "CUDA Version" is at
  least the build's CUDA version, and (b) has kernels for every GPU listed;
* GPUs but no such build (a driver older than CUDA 12.6, or Blackwell on a
  pre-580 driver): the CPU wheel with a loud warning that says what to
  upgrade; ``m6rec train`` then refuses to run until fixed (or
  M6REC_ALLOW_CPU=1).

An installed torch is kept, except a CPU build, or a CUDA build newer than the
driver, on a machine where a CUDA build fits: that one is replaced, loudly.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

TORCH = "2.13.0"
INDEX = "https://download.pytorch.org/whl/{tag}"
SMI_ENV = "M6REC_NVIDIA_SMI"
GPU_QUERY = ["--query-gpu=name,compute_cap", "--format=csv,noheader"]


@dataclass(frozen=True)
class Variant:
    tag: str                      # the index name, cu126 -> https://download.pytorch.org/whl/cu126
    cuda: tuple[int, int]         # the CUDA runtime inside the wheel (major, minor)
    min_driver: str               # Linux x86_64 driver of that toolkit release (NVIDIA's release notes, table 3)
    min_cc: tuple[int, int]       # oldest GPU architecture with kernels in the wheel
    max_cc: tuple[int, int] | None  # newest one; None: PTX is shipped, newer GPUs JIT it


# PyTorch 2.13's stable CUDA builds, newest first.  Sources: pytorch/pytorch
# RELEASE.md, "Release Compatibility Matrix" (2.13: stable CUDA 12.6 and 13.0,
# experimental 13.2) and "PyTorch CUDA Support Matrix" (12.6.3: Maxwell 5.0 ..
# Hopper 9.0; 13.0.2: Turing 7.5 .. Blackwell 12.0+PTX); NVIDIA CUDA Toolkit
# release notes, "CUDA Toolkit and Corresponding Driver Versions" (12.6 Update 3
# >= 560.35.05, 13.0 Update 2 >= 580.95.05, 13.0 GA >= 580.65.06).
# cu132 is experimental in 2.13 and is not chosen; M6REC_TORCH can ask for it.
VARIANTS = (
    Variant("cu130", (13, 0), "580.95.05", (7, 5), None),
    Variant("cu126", (12, 6), "560.35.05", (5, 0), (9, 0)),
)

# Why "the driver's CUDA Version >= the build's" and not NVIDIA's minor-version
# compatibility (any CUDA 12.x runtime on a >= 525 driver, any 13.x on >= 580):
# under it an application runs "with limited feature-set" -- no JIT of PTX newer
# than the driver, some APIs answer cudaErrorCallRequiresNewerDriver -- and
# PyTorch users report both outcomes for cu12x wheels on 12.4 (550) drivers.
# So a 12.0-12.5 driver gets no CUDA build by default; the warning names the
# cu126 override for those who accept the risk, and the driver upgrade.

# Driver version -> the newest CUDA it supports (GA rows of the same table);
# used only when nvidia-smi's header has no "CUDA Version" (or only /proc is read).
DRIVER_CUDA = (
    ((580, 65, 6), (13, 0)),
    ((575, 51, 3), (12, 9)),
    ((570, 26, 0), (12, 8)),
    ((560, 28, 3), (12, 6)),
    ((555, 42, 2), (12, 5)),
    ((550, 54, 14), (12, 4)),
    ((545, 23, 6), (12, 3)),
    ((535, 54, 3), (12, 2)),
    ((530, 30, 2), (12, 1)),
    ((525, 60, 13), (12, 0)),
    ((450, 80, 2), (11, 0)),
)


@dataclass
class Machine:
    gpus: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)  # (name, compute capability)
    driver: str | None = None
    cuda: tuple[int, int] | None = None    # the newest CUDA the driver supports
    note: str = ""                         # why no GPU was found, when none was

    def describe(self) -> str:
        names = sorted({n for n, _ in self.gpus})
        caps = sorted({c for _, c in self.gpus if c})
        what = f"{len(self.gpus)} NVIDIA GPU{'s' if len(self.gpus) != 1 else ''} ({', '.join(names)}"
        what += f"; compute {', '.join(_v(c) for c in caps)})" if caps else ")"
        return f"{what}, driver {self.driver or '?'}, CUDA {_v(self.cuda) if self.cuda else '?'}"


@dataclass
class Choice:
    action: str                 # "install" or "keep"
    pip_args: list[str]
    reason: str
    warnings: list[str] = field(default_factory=list)
    variant: Variant | None = None   # the CUDA build chosen for this machine, if any


def _v(t) -> str:
    return ".".join(str(x) for x in t)


def _version(text: str | None) -> tuple[int, ...] | None:
    m = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def cuda_from_driver(driver: str | None) -> tuple[int, int] | None:
    """The newest CUDA a Linux driver supports, from NVIDIA's table (None: unknown or older than 11.0)."""
    ver = _version(driver)
    if not ver:
        return None
    ver = (ver + (0, 0))[:3]
    return next((cuda for floor, cuda in DRIVER_CUDA if ver >= floor), None)


def parse_nvidia_smi(smi: str | None, gpus: str | None = None) -> Machine:
    """``smi``: plain ``nvidia-smi`` output (None: not found); ``gpus``: ``nvidia-smi
    --query-gpu=name,compute_cap --format=csv,noheader`` or ``nvidia-smi -L`` output."""
    if smi is None:
        return Machine(note="nvidia-smi not found")
    m = re.search(r"Driver Version:\s*([0-9.]+)", smi)
    driver = m.group(1) if m else None
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi)
    cuda = (int(m.group(1)), int(m.group(2))) if m else cuda_from_driver(driver)
    found: list[tuple[str, tuple[int, int] | None]] = []
    for line in (gpus or "").splitlines():
        line = line.strip()
        if m := re.match(r"GPU \d+:\s*(.+?)(?:\s*\(UUID:.*)?$", line):          # nvidia-smi -L
            found.append((m.group(1), None))
        elif m := re.match(r"(.+?),\s*(\d+)\.(\d+)\s*$", line):                # the csv query
            found.append((m.group(1).strip(), (int(m.group(2)), int(m.group(3)))))
        elif m := re.match(r"(NVIDIA .+?|Tesla .+?),\s*\[?N/A\]?\s*$", line):  # compute_cap not known
            found.append((m.group(1).strip(), None))
    if not found and driver and gpus is None:
        # no list given: count the rows of the plain table ("|   0  NVIDIA H100 ...  On  |")
        found = [(m.group(1).strip(), None) for m in re.finditer(r"^\|\s+\d+\s+(.+?)\s+(?:On|Off)\s+\|", smi, re.M)]
    if not found:
        first = next((ln.strip() for ln in smi.splitlines() if ln.strip()), "no output")
        return Machine(driver=driver, cuda=cuda, note=f"nvidia-smi lists no GPU ({first[:100]})")
    return Machine(gpus=found, driver=driver, cuda=cuda)


def probe(smi_cmd: str | None = None) -> Machine:
    """Run nvidia-smi (twice: the header holds the CUDA version, the query the compute capabilities)."""
    smi_cmd = smi_cmd or os.environ.get(SMI_ENV) or "nvidia-smi"

    def run(*args: str) -> tuple[int, str] | None:
        try:
            p = subprocess.run([smi_cmd, *args], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return p.returncode, p.stdout + p.stderr

    head = run()
    if head is None:
        return Machine(note=f"{smi_cmd} not found")
    if head[0] != 0:
        return parse_nvidia_smi(head[1], gpus="")
    query = run(*GPU_QUERY)
    if query is None or query[0] != 0:   # drivers before compute_cap existed: the plain list
        query = run("-L")
    return parse_nvidia_smi(head[1], gpus=query[1] if query and query[0] == 0 else None)


def pick_variant(machine: Machine) -> Variant | None:
    if not machine.gpus or not machine.cuda:
        return None
    for v in VARIANTS:
        if machine.cuda < v.cuda:
            continue
        caps = [c for _, c in machine.gpus if c]
        if all(c >= v.min_cc and (v.max_cc is None or c <= v.max_cc) for c in caps):
            return v
    return None


def pip_args(variant: Variant | None) -> list[str]:
    if variant is None:
        return [f"torch=={TORCH}"]
    # The local label pins the build: with only "==2.13.0" pip could still take
    # a CPU wheel from a find-links folder or another configured index.
    return [f"torch=={TORCH}+{variant.tag}", "--index-url", INDEX.format(tag=variant.tag)]


def no_variant_reason(machine: Machine) -> str:
    """Why no CUDA build fits this machine, and what would make one fit."""
    caps = [c for _, c in machine.gpus if c]
    cuda = machine.cuda
    if cuda and cuda >= (12, 6) and caps and max(caps) > (9, 0):
        return (f"the GPUs (compute {_v(max(caps))}) need the cu130 build, which needs a driver "
                f">= {VARIANTS[0].min_driver} (CUDA 13.0); this one reports CUDA {_v(cuda)}")
    why = (f"PyTorch {TORCH}'s oldest CUDA build is cu126 (CUDA 12.6, driver >= {VARIANTS[-1].min_driver}); "
           f"this driver reports CUDA {_v(cuda) if cuda else 'unknown'}")
    if cuda and (12, 0) <= cuda < (12, 6) and all(c <= (9, 0) for c in caps):
        why += (". cu126 would rely on NVIDIA's minor-version compatibility (limited features); to take that "
                f"risk: M6REC_TORCH=\"{' '.join(pip_args(VARIANTS[-1]))}\" bash scripts/install.sh")
    return why


def _no_variant_warning(machine: Machine) -> str:
    return (f"{machine.describe()}: no PyTorch {TORCH} CUDA build fits -- {no_variant_reason(machine)}. "
            "PyTorch stays a CPU build, and `m6rec train` will refuse to run on it (M6REC_ALLOW_CPU=1 to train "
            "on the CPU on purpose). Upgrade the NVIDIA driver and run scripts/install.sh again.")


def choose(machine: Machine, installed: str | None = None, override: str | None = None) -> Choice:
    """``installed``: "VERSION CUDA" of the torch already there ("2.13.0+cpu cpu"), None if none."""
    variant = pick_variant(machine)
    warnings: list[str] = []
    if override and override.strip():
        return Choice("install", shlex.split(override), f"M6REC_TORCH overrides the choice: {override.strip()}",
                      variant=variant)
    args = pip_args(variant)
    if not machine.gpus:
        reason = f"no NVIDIA GPU ({machine.note}): the CPU wheel {args[0]}"
    elif variant is None:
        reason = f"{machine.describe()}: no CUDA build fits, the CPU wheel {args[0]}"
        warnings.append(_no_variant_warning(machine))
    else:
        reason = (f"{machine.describe()}: {args[0]} from {args[-1]} "
                  f"(the newest PyTorch {TORCH} CUDA build this driver and these GPUs run)")
    if not installed or not installed.strip():
        return Choice("install", args, reason, warnings, variant)
    version, _, cuda = installed.strip().partition(" ")
    cuda = cuda.strip() or "cpu"
    if variant is not None and cuda == "cpu":
        warnings.append(f"torch {version} in .venv is a CPU build, but this machine has {machine.describe()}: "
                        f"training would run on the CPU. Replacing it with {args[0]}.")
        return Choice("install", args, reason + f"; replaces the CPU build {version}", warnings, variant)
    if machine.gpus and cuda != "cpu" and machine.cuda and (_version(cuda) or (0,)) > machine.cuda:
        too_new = (f"torch {version} in .venv is built for CUDA {cuda}, newer than this driver supports "
                   f"({machine.driver}, CUDA {_v(machine.cuda)}): it cannot use the GPUs.")
        if variant is not None:
            warnings.append(f"{too_new} Replacing it with {args[0]}.")
            return Choice("install", args, reason + f"; replaces {version}", warnings, variant)
        warnings.append(f"{too_new} Kept, since no CUDA build fits this driver; upgrade the driver.")
    kept = f"torch {version} ({'CPU build' if cuda == 'cpu' else 'CUDA ' + cuda}) already installed, kept"
    return Choice("keep", [], f"{kept}; {reason}", warnings, variant)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--installed", default=None, help='the torch already installed: "VERSION CUDA" or "VERSION cpu"')
    p.add_argument("--smi", default=None, help="a file with plain nvidia-smi output instead of running it "
                   "('-' for none: no nvidia-smi)")
    p.add_argument("--gpus", default=None, help="with --smi: a file with `nvidia-smi --query-gpu=name,compute_cap "
                   "--format=csv,noheader` or `nvidia-smi -L` output")
    args = p.parse_args(argv)
    if args.smi is None:
        machine = probe()
    else:
        smi = None if args.smi == "-" else open(args.smi, encoding="utf-8").read()
        gpus = open(args.gpus, encoding="utf-8").read() if args.gpus else None
        machine = parse_nvidia_smi(smi, gpus)
    choice = choose(machine, args.installed, os.environ.get("M6REC_TORCH"))
    for w in choice.warnings:
        bar = "!" * 78
        print(f"{bar}\nm6rec install: WARNING: {w}\n{bar}", file=sys.stderr)
    print(choice.action)
    print(" ".join(shlex.quote(a) for a in choice.pip_args))
    print(choice.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
