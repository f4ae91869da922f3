"""NVIDIA GPUs that PyTorch cannot use: found before training starts, not after.

A CPU build of PyTorch on a GPU node (or a CUDA build newer than the driver)
trains on the CPU without a word.  :func:`check_gpus_usable` reads the GPUs
from the driver -- ``/proc/driver/nvidia/gpus/*`` (``$M6REC_NVIDIA_PROC``
instead of ``/proc/driver/nvidia``), else ``nvidia-smi -L`` (``$M6REC_NVIDIA_SMI``
instead of ``nvidia-smi``) -- and, when there are any, asks
``torch.cuda.is_available()``.  GPUs present but unusable stop the training
commands (``m6rec train``, ``launch/train.py``, ``m6rec finetune``,
``m6rec quickstart``) with what was found and the fix, unless
``M6REC_ALLOW_CPU=1`` says CPU training is meant.  ``CUDA_VISIBLE_DEVICES=""``
(or ``-1``) hides the GPUs on purpose and is respected.

``python -m m6rec.hardware`` prints one status line (scripts/install.sh ends
with it); exit status 1 when GPUs are present but unusable.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ALLOW_ENV = "M6REC_ALLOW_CPU"
PROC_ENV = "M6REC_NVIDIA_PROC"
SMI_ENV = "M6REC_NVIDIA_SMI"
_CHOICE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch_choice.py"


class GpuUnusable(RuntimeError):
    """NVIDIA GPUs are present but PyTorch cannot use them."""


@dataclass
class NvidiaGpus:
    names: list[str]
    driver: str | None       # e.g. "550.54.15"
    source: str              # where they were read from
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        names = sorted(set(self.names))
        return (f"{len(self.names)} NVIDIA GPU{'s' if len(self.names) != 1 else ''} ({', '.join(names)}; "
                f"driver {self.driver or 'unknown'})")


def _smi_cmd() -> str:
    return os.environ.get(SMI_ENV) or "nvidia-smi"


def _run_smi(*args: str) -> str | None:
    try:
        p = subprocess.run([_smi_cmd(), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout if p.returncode == 0 else None


def nvidia_gpus() -> NvidiaGpus | None:
    """The NVIDIA GPUs the driver knows of (None: no driver, or no GPU)."""
    root = Path(os.environ.get(PROC_ENV) or "/proc/driver/nvidia")
    if root.is_dir():
        names = []
        for info in sorted((root / "gpus").glob("*/information")):
            text = info.read_text(errors="replace")
            if re.search(r"^GPU Excluded:\s*Yes", text, re.M):
                continue
            m = re.search(r"^Model:\s*(.+?)\s*$", text, re.M)
            names.append(m.group(1) if m else info.parent.name)
        if not names:
            return None
        driver = None
        try:
            m = re.search(r"^NVRM version:.*?\s(\d{3,}\.\d+(?:\.\d+)?)\s", (root / "version").read_text(), re.M)
            driver = m.group(1) if m else None
        except OSError:
            pass
        return NvidiaGpus(names, driver, str(root / "gpus"))
    # No /proc entry (WSL, some containers): ask nvidia-smi.
    listing = _run_smi("-L")
    if not listing:
        return None
    names = [m.group(1) for m in re.finditer(r"^GPU \d+:\s*(.+?)(?:\s*\(UUID:.*)?$", listing, re.M)]
    if not names:
        return None
    m = re.search(r"Driver Version:\s*([0-9.]+)", _run_smi() or "")
    return NvidiaGpus(names, m.group(1) if m else None, f"{_smi_cmd()} -L")


def _torch_choice():
    """scripts/torch_choice.py (what install.sh runs), loaded from the checkout; None if not there."""
    if not _CHOICE_SCRIPT.is_file():
        return None
    spec = importlib.util.spec_from_file_location("m6rec_torch_choice", _CHOICE_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _fix(gpus: NvidiaGpus) -> tuple[str, tuple[int, int] | None]:
    """The fix to print, and the newest CUDA the driver supports (None: unknown)."""
    tc = _torch_choice()
    if tc is None:
        return ("Fix: reinstall PyTorch with a CUDA build that this driver runs, e.g. `pip install "
                "torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126` "
                "(docs/cluster.md lists the builds and the drivers they need).", None)
    machine = tc.probe()  # the header's "CUDA Version" and the compute capabilities
    if not machine.gpus:  # nvidia-smi missing here: what /proc says is enough for the table
        machine = tc.Machine(gpus=[(n, None) for n in gpus.names], driver=gpus.driver,
                             cuda=tc.cuda_from_driver(gpus.driver))
    variant = tc.pick_variant(machine)
    if variant is None:
        return (f"Fix: upgrade the NVIDIA driver, then run scripts/install.sh again on this node: "
                f"{tc.no_variant_reason(machine)}.", machine.cuda)
    args = " ".join(tc.pip_args(variant))
    return ("Fix: install the CUDA build for this driver and these GPUs (scripts/install.sh on this node picks it):\n"
            f"    M6REC_TORCH=\"{args}\" bash scripts/install.sh\n"
            f"  or, in the environment that runs m6rec:\n"
            f"    pip install {args}", machine.cuda)


def diagnose(gpus: NvidiaGpus, torch_version: str, torch_cuda: str | None, init_error: str = "",
             driver_cuda: tuple[int, int] | None = None) -> str:
    """What is wrong, in one sentence, for GPUs that torch cannot use."""
    if not torch_cuda:
        return f"PyTorch {torch_version} is a CPU build: training would run on the CPU."
    what = f"PyTorch {torch_version} (built for CUDA {torch_cuda}) cannot use them: torch.cuda.is_available() is False"
    built = tuple(int(x) for x in re.findall(r"\d+", torch_cuda)[:2])
    if driver_cuda and built > driver_cuda:
        what += (f"; its CUDA {torch_cuda} is newer than this driver supports "
                 f"(driver {gpus.driver or 'unknown'}, CUDA {'.'.join(map(str, driver_cuda))})")
    else:
        what += ("; the driver may be too old for it, or this process was not given the GPUs "
                 "(a Slurm job without --gpus, a container without --gpus)")
    if init_error:
        what += f". CUDA said: {init_error.strip()}"
    return what + "."


def check_gpus_usable(command: str = "m6rec train") -> str | None:
    """Raise :class:`GpuUnusable` when NVIDIA GPUs are present but PyTorch cannot use them.

    Returns a note to print when training goes on without them on purpose
    (``M6REC_ALLOW_CPU=1`` or ``CUDA_VISIBLE_DEVICES`` hiding them), else None.
    Imports torch only when the driver lists GPUs.
    """
    gpus = nvidia_gpus()
    if gpus is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return f"{command}: {gpus.describe()} hidden by CUDA_VISIBLE_DEVICES={visible!r}: training on the CPU"
    import torch  # torch: this module also runs before torch is installed (scripts/install.sh)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if available:
        return None
    init_error = " ".join(str(w.message) for w in caught if "CUDA" in str(w.message))
    fix, driver_cuda = _fix(gpus)
    problem = diagnose(gpus, torch.__version__, torch.version.cuda, init_error, driver_cuda)
    if os.environ.get(ALLOW_ENV) == "1":
        return f"{command}: {gpus.describe()} found, but {problem} {ALLOW_ENV}=1: training on the CPU as asked."
    raise GpuUnusable(
        f"{command}: this machine has {gpus.describe()}, read from {gpus.source}, but {problem}\n"
        f"{fix}\n"
        f"To train on the CPU on purpose, set {ALLOW_ENV}=1.")


def main() -> int:
    gpus = nvidia_gpus()
    if gpus is None:
        print("m6rec hardware: no NVIDIA GPU found: training runs on the CPU")
        return 0
    try:
        note = check_gpus_usable("m6rec hardware")
    except GpuUnusable as e:
        bar = "!" * 78
        print(f"{bar}\nWARNING: {e}\n{bar}", file=sys.stderr)
        return 1
    if note:
        print(note)
        return 0
    import torch  # torch: this module also runs before torch is installed (scripts/install.sh)

    print(f"m6rec hardware: {gpus.describe()}; PyTorch {torch.__version__} (CUDA {torch.version.cuda}) "
          f"sees {torch.cuda.device_count()} of them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
