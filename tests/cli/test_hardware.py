"""GPU-aware install (scripts/torch_choice.py, scripts/install.sh) and the
"GPUs present but PyTorch cannot use them" check of the training commands.

This machine has no NVIDIA driver, so the driver is faked: ``nvidia-smi`` is a
shell script that prints real-format outputs kept in tests/fixtures/nvidia_smi/
(``*.smi``: plain ``nvidia-smi``; ``*.gpus``: ``nvidia-smi
--query-gpu=name,compute_cap --format=csv,noheader``; ``*.list``:
``nvidia-smi -L``), found through ``M6REC_NVIDIA_SMI`` or PATH, and
``/proc/driver/nvidia`` is a fixture folder named by ``M6REC_NVIDIA_PROC``.
PyTorch here is the real CPU build, so "present but unusable" is real.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from m6rec import cli, hardware

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "nvidia_smi"
INSTALL = ROOT / "scripts" / "install.sh"
PRESET = ROOT / "configs" / "pretrain" / "base.yaml"

spec = importlib.util.spec_from_file_location("torch_choice", ROOT / "scripts" / "torch_choice.py")
tc = importlib.util.module_from_spec(spec)
sys.modules["torch_choice"] = tc
spec.loader.exec_module(tc)

CU126 = ["torch==2.13.0+cu126", "--index-url", "https://download.pytorch.org/whl/cu126"]
CU130 = ["torch==2.13.0+cu130", "--index-url", "https://download.pytorch.org/whl/cu130"]
CPU = ["torch==2.13.0"]


def fake_smi(tmp_path: Path, case: str, *, query_fails: bool = False) -> Path:
    """An executable ``nvidia-smi`` that answers like the driver of ``case`` would."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    smi = DATA / f"{case}.smi"
    gpus = DATA / f"{case}.gpus"
    listing = DATA / f"{case}.list"
    head_rc = {"driver_not_loaded": 9, "no_devices": 6}.get(case, 0)
    query = ('echo \'Field "compute_cap" is not a valid field to query.\'; exit 2' if query_fails
             else f"cat '{gpus}'" if gpus.exists() else f"exit {head_rc}")
    lst = f"cat '{listing}'" if listing.exists() else f"exit {head_rc}"
    script = bindir / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
case "$1" in
  --query-gpu=*) {query} ;;
  -L) {lst} ;;
  "") cat '{smi}'; exit {head_rc} ;;
  *) echo "fake nvidia-smi: unexpected arguments $*" >&2; exit 2 ;;
esac
""")
    script.chmod(0o755)
    return script


# --- scripts/torch_choice.py --------------------------------------------------------------

@pytest.mark.parametrize("case,expected", [
    ("h100_driver550", CPU),     # CUDA 12.4 < 12.6: no build under full compatibility
    ("h100_driver560", CU126),   # CUDA 12.6
    ("h100_driver580", CU130),   # CUDA 13.0
    ("a100_driver590", CU130),   # CUDA 13.1: still cu130 (cu132 is experimental in 2.13)
    ("v100_driver580", CU126),   # Volta (7.0): cu130 has no kernels for it
    ("b200_driver570", CPU),     # Blackwell (10.0) needs cu130, the driver reports 12.8
    ("driver_not_loaded", CPU),
    ("no_devices", CPU),
])
def test_choice_from_real_format_nvidia_smi(tmp_path, case, expected):
    machine = tc.probe(str(fake_smi(tmp_path, case)))
    choice = tc.choose(machine)
    assert choice.action == "install" and choice.pip_args == expected, choice
    # the same from the files, without running anything
    gpus = DATA / f"{case}.gpus"
    parsed = tc.parse_nvidia_smi((DATA / f"{case}.smi").read_text(), gpus.read_text() if gpus.exists() else "")
    assert tc.choose(parsed).pip_args == expected
    gpu_machine = case not in ("driver_not_loaded", "no_devices")
    assert bool(machine.gpus) == gpu_machine
    if gpu_machine and expected == CPU:
        assert choice.warnings and "no PyTorch 2.13.0 CUDA build fits" in choice.warnings[0]
        assert "M6REC_ALLOW_CPU=1" in choice.warnings[0]
    else:
        assert not choice.warnings


def test_choice_parses_driver_cuda_and_gpus(tmp_path):
    m = tc.probe(str(fake_smi(tmp_path, "h100_driver550")))
    assert (m.driver, m.cuda, len(m.gpus), m.gpus[0]) == ("550.54.15", (12, 4), 8, ("NVIDIA H100 80GB HBM3", (9, 0)))
    w = tc.choose(m).warnings[0]
    assert "driver >= 560.35.05" in w and "CUDA 12.4" in w
    assert 'M6REC_TORCH="torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126"' in w
    b = tc.choose(tc.probe(str(fake_smi(tmp_path, "b200_driver570")))).warnings[0]
    assert "need the cu130 build" in b and "cu126 would" not in b


def test_choice_falls_back_to_the_plain_list(tmp_path):
    # a driver whose nvidia-smi cannot query compute_cap: GPUs from `nvidia-smi -L`, capabilities unknown
    m = tc.probe(str(fake_smi(tmp_path, "h100_driver560", query_fails=True)))
    assert len(m.gpus) == 8 and m.gpus[0] == ("NVIDIA H100 80GB HBM3", None)
    assert tc.choose(m).pip_args == CU126


def test_choice_without_nvidia_smi_or_cuda_header():
    none = tc.choose(tc.probe("/nonexistent/nvidia-smi"))
    assert none.pip_args == CPU and "nvidia-smi not found" in none.reason
    # no "CUDA Version" in the header: the driver version says it (NVIDIA's table)
    smi = (DATA / "h100_driver580.smi").read_text().replace("CUDA Version: 13.0", "                 ")
    m = tc.parse_nvidia_smi(smi, (DATA / "h100_driver580.gpus").read_text())
    assert m.cuda == (13, 0) and tc.choose(m).pip_args == CU130
    assert tc.cuda_from_driver("560.35.05") == (12, 6) and tc.cuda_from_driver("550.54.15") == (12, 4)
    assert tc.cuda_from_driver("440.33") is None


def test_choice_with_torch_already_installed(tmp_path):
    gpu = tc.probe(str(fake_smi(tmp_path, "h100_driver580")))
    nogpu = tc.probe("/nonexistent/nvidia-smi")
    c = tc.choose(gpu, installed="2.13.0+cpu cpu")            # CPU build on a GPU machine: replaced, loudly
    assert c.action == "install" and c.pip_args == CU130 and "is a CPU build" in c.warnings[0]
    c = tc.choose(gpu, installed="2.13.0+cu130 13.0")         # the right build: kept
    assert c.action == "keep" and not c.warnings
    c = tc.choose(gpu, installed="2.13.0+cu126 12.6")         # an older CUDA build still runs: kept
    assert c.action == "keep"
    old = tc.probe(str(fake_smi(tmp_path, "h100_driver560")))
    c = tc.choose(old, installed="2.13.0+cu130 13.0")         # newer than the driver: replaced
    assert c.action == "install" and c.pip_args == CU126 and "newer than this driver" in c.warnings[0]
    c = tc.choose(nogpu, installed="2.13.0+cpu cpu")          # no GPU: as before, kept
    assert c.action == "keep" and not c.warnings
    c = tc.choose(nogpu, installed="2.13.0+cu130 13.0")       # a CUDA build on a login node: kept
    assert c.action == "keep"


def test_override_wins(tmp_path):
    gpu = tc.probe(str(fake_smi(tmp_path, "h100_driver580")))
    c = tc.choose(gpu, installed="2.13.0+cu130 13.0", override="torch==2.13.0+cu132 --index-url https://x/cu132")
    assert c.action == "install" and c.pip_args == ["torch==2.13.0+cu132", "--index-url", "https://x/cu132"]
    assert "M6REC_TORCH" in c.reason


def test_choice_script_prints_three_lines():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_choice.py"),
                          "--smi", str(DATA / "v100_driver580.smi"), "--gpus", str(DATA / "v100_driver580.gpus"),
                          "--installed", "2.13.0+cpu cpu"],
                         capture_output=True, text=True, check=True, env={**os.environ, "M6REC_TORCH": ""})
    action, args, reason = out.stdout.splitlines()
    assert action == "install" and args.split() == CU126
    assert reason.startswith("2 NVIDIA GPUs (Tesla V100-SXM2-32GB; compute 7.0), driver 580.95.05, CUDA 13.0")
    assert "WARNING" in out.stderr and "CPU build" in out.stderr


# --- scripts/install.sh, end to end with the pip steps printed (M6REC_INSTALL_DRY=1) ----------

def run_install(tmp_path, python: str, case: str | None, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("M6REC_TORCH", "M6REC_NVIDIA_SMI", "VIRTUAL_ENV")}
    e.update(PYTHON=python, M6REC_INSTALL_DRY="1", **env)
    if case is None:
        e["M6REC_NVIDIA_SMI"] = str(tmp_path / "no-nvidia-smi")
    else:  # found on PATH, as on a real node
        e["PATH"] = f"{fake_smi(tmp_path, case).parent}{os.pathsep}{e['PATH']}"
    venv_before = (ROOT / ".venv").exists()
    p = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (ROOT / ".venv").exists() == venv_before  # a dry run makes nothing
    return p


def torch_pip_lines(p) -> list[str]:
    return [ln for ln in p.stdout.splitlines() if ln.startswith("+ pip install torch")]


def no_torch_python(tmp_path) -> str:
    """This interpreter without site-packages: a machine where torch is not installed yet."""
    w = tmp_path / "python-no-site"
    w.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    w.chmod(0o755)
    return str(w)


def test_install_sh_gpu_node_replaces_the_cpu_build(tmp_path):
    p = run_install(tmp_path, sys.executable, "h100_driver580")   # this interpreter: torch 2.13.0+cpu
    assert torch_pip_lines(p) == ["+ pip install " + " ".join(CU130)], p.stdout
    assert "is a CPU build, but this machine has 8 NVIDIA GPUs" in p.stderr
    assert "m6rec install: torch: 8 NVIDIA GPUs (NVIDIA H100 80GB HBM3; compute 9.0), driver 580.95.05" in p.stdout
    assert "+ pip install --no-build-isolation -e .[dev]" in p.stdout


def test_install_sh_fresh_gpu_node_and_old_driver(tmp_path):
    p = run_install(tmp_path, no_torch_python(tmp_path), "v100_driver580")
    assert torch_pip_lines(p) == ["+ pip install " + " ".join(CU126)]
    p = run_install(tmp_path, no_torch_python(tmp_path), "h100_driver550")
    assert torch_pip_lines(p) == ["+ pip install torch==2.13.0"]
    assert "no PyTorch 2.13.0 CUDA build fits" in p.stderr


def test_install_sh_without_gpu_is_unchanged(tmp_path):
    p = run_install(tmp_path, no_torch_python(tmp_path), None)
    assert torch_pip_lines(p) == ["+ pip install torch==2.13.0"]
    assert "no NVIDIA GPU (" in p.stdout and "WARNING" not in p.stderr
    p = run_install(tmp_path, sys.executable, None)                 # torch already there: kept, as before
    assert torch_pip_lines(p) == [] and "already installed, kept" in p.stdout


def test_install_sh_override_wins(tmp_path):
    p = run_install(tmp_path, sys.executable, "h100_driver580",
                    M6REC_TORCH="torch==2.13.0+cu126 --index-url https://download.pytorch.org/whl/cu126")
    assert torch_pip_lines(p) == ["+ pip install " + " ".join(CU126)]
    assert "M6REC_TORCH overrides the choice" in p.stdout


# --- the training entry points --------------------------------------------------------------

def fake_proc(tmp_path: Path, n: int = 2, driver: str = "580.95.05", model: str = "NVIDIA H100 80GB HBM3",
              excluded: int = 0) -> Path:
    """A /proc/driver/nvidia as the kernel module writes it."""
    root = tmp_path / "proc-nvidia"
    (root / "gpus").mkdir(parents=True)
    (root / "version").write_text(
        f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {driver}  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
    for i in range(n + excluded):
        bus = f"0000:{0x18 + 0x10 * i:02x}:00.0"
        (root / "gpus" / bus).mkdir()
        (root / "gpus" / bus / "information").write_text(
            f"Model: \t\t {model}\nIRQ:   \t\t {100 + i}\nGPU UUID: \t GPU-{i}0c3a1f2-7d4e-4b5a-9c8d-1e2f3a4b5c6d\n"
            f"Video BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\nDMA Mask: \t 0xfffffffffffff\n"
            f"Bus Location: \t {bus}\nDevice Minor: \t {i}\nGPU Excluded:\t {'Yes' if i >= n else 'No'}\n")
    return root


@pytest.fixture
def gpu_env(monkeypatch, tmp_path):
    """Fake driver state; the real (CPU-only) torch; `m6rec train`'s body replaced by a recorder."""
    for k in ("M6REC_ALLOW_CPU", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("M6REC_NVIDIA_SMI", str(tmp_path / "no-nvidia-smi"))
    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(tmp_path / "no-proc"))
    ran = []
    fake = types.SimpleNamespace(main=lambda cfg, args: ran.append(args.command) or 0)
    monkeypatch.setitem(sys.modules, "m6rec_fake_train", fake)
    monkeypatch.setitem(cli.COMMANDS, "train", ("m6rec_fake_train", "main", ""))
    return ran


def test_train_stops_when_gpus_are_present_but_torch_is_a_cpu_build(gpu_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(fake_proc(tmp_path, n=2, excluded=1)))
    assert cli.main(["train", "--config", str(PRESET)]) == cli.GPU_UNUSABLE_EXIT
    assert gpu_env == []  # no work started
    err = capsys.readouterr().err
    assert "m6rec train: this machine has 2 NVIDIA GPUs (NVIDIA H100 80GB HBM3; driver 580.95.05)" in err
    assert "is a CPU build: training would run on the CPU" in err
    assert f'M6REC_TORCH="{" ".join(CU130)}" bash scripts/install.sh' in err
    assert f"pip install {' '.join(CU130)}" in err
    assert "M6REC_ALLOW_CPU=1" in err


def test_train_escape_hatches_and_no_gpu(gpu_env, monkeypatch, tmp_path, capsys):
    assert cli.main(["train", "--config", str(PRESET)]) == 0       # no driver: as before, silently
    assert capsys.readouterr().err == "" and gpu_env == ["train"]
    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(fake_proc(tmp_path)))
    monkeypatch.setenv("M6REC_ALLOW_CPU", "1")
    assert cli.main(["train", "--config", str(PRESET)]) == 0
    assert "M6REC_ALLOW_CPU=1: training on the CPU as asked" in capsys.readouterr().err
    monkeypatch.delenv("M6REC_ALLOW_CPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cli.main(["train", "--config", str(PRESET)]) == 0
    assert "hidden by CUDA_VISIBLE_DEVICES=''" in capsys.readouterr().err
    assert gpu_env == ["train"] * 3


def test_old_driver_and_nvidia_smi_fallback(gpu_env, monkeypatch, tmp_path, capsys):
    # /proc says driver 550 (CUDA 12.4): no build fits, the fix is the driver
    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(fake_proc(tmp_path, driver="550.54.15")))
    assert cli.main(["train", "--config", str(PRESET)]) == cli.GPU_UNUSABLE_EXIT
    err = capsys.readouterr().err
    assert "Fix: upgrade the NVIDIA driver" in err and "driver >= 560.35.05" in err
    # no /proc entry (WSL, some containers): nvidia-smi -L finds them; its header gives CUDA 12.6
    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(tmp_path / "no-proc"))
    monkeypatch.setenv("M6REC_NVIDIA_SMI", str(fake_smi(tmp_path, "h100_driver560")))
    gpus = hardware.nvidia_gpus()
    assert gpus and len(gpus.names) == 8 and gpus.driver == "560.35.05"
    assert cli.main(["train", "--config", str(PRESET)]) == cli.GPU_UNUSABLE_EXIT
    assert f"pip install {' '.join(CU126)}" in capsys.readouterr().err
    assert gpu_env == []


def test_cuda_build_newer_than_the_driver(gpu_env, monkeypatch, tmp_path, capsys):
    # A cu130 build on a CUDA 12.6 driver; torch here is CPU-only, so its CUDA facts are patched in.
    import torch

    monkeypatch.setenv("M6REC_NVIDIA_PROC", str(fake_proc(tmp_path, driver="560.35.05")))
    monkeypatch.setenv("M6REC_NVIDIA_SMI", str(fake_smi(tmp_path, "h100_driver560")))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu130")
    with pytest.raises(hardware.GpuUnusable) as e:
        hardware.check_gpus_usable("m6rec train")
    msg = str(e.value)
    assert "PyTorch 2.13.0+cu130 (built for CUDA 13.0) cannot use them" in msg
    assert "newer than this driver supports (driver 560.35.05, CUDA 12.6)" in msg
    assert f"pip install {' '.join(CU126)}" in msg


def test_launch_train_py_stops_before_any_work(tmp_path):
    env = {**os.environ, "M6REC_NVIDIA_PROC": str(fake_proc(tmp_path)),
           "M6REC_NVIDIA_SMI": str(tmp_path / "no-nvidia-smi"), "PYTHONPATH": str(ROOT)}
    env.pop("M6REC_ALLOW_CPU", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(PRESET),
                        "--train.run_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == cli.GPU_UNUSABLE_EXIT, p.stdout + p.stderr
    assert p.stderr.startswith("launch/train.py: this machine has 2 NVIDIA GPUs")
    assert not (tmp_path / "run").exists()
    # the same through `python -m m6rec.hardware`, install.sh's last line
    p = subprocess.run([sys.executable, "-m", "m6rec.hardware"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and "WARNING: m6rec hardware: this machine has 2 NVIDIA GPUs" in p.stderr
