"""Metrics sinks (console, JSONL, real offline W&B), MFU arithmetic and the plot."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers.wandb_files import read_wandb_records, wandb_config, wandb_history

from m6rec.config import Config
from m6rec.train import metrics as M
from m6rec.train import peak
from m6rec.train.plot import main as plot_main
from m6rec.train.plot import plot_run, read_metrics

FAKE_KEY = "f4k3" + "0123456789abcdef" * 2 + "beef"  # 40 chars, shaped like a W&B key


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every W&B folder inside tmp_path and a planted API key."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    return tmp_path


def logged_steps(start: int, n: int) -> list[dict]:
    return [
        dict(loss=4.0 - 0.25 * s, lr=1e-3 * (s + 1), grad_norm=0.5 + s, tokens_per_s=1000.0 * (s + 1),
             mfu_pct=10.0 + s, step_time_ms=100.0, data_wait_pct=1.5, memory_gib=0.25)
        for s in range(start, start + n)
    ]


# --------------------------------------------------------------------------
# The real offline W&B run
# --------------------------------------------------------------------------
def test_offline_wandb_run_and_jsonl(wandb_env, capsys):
    run_dir = wandb_env / "runs" / "exp1"
    cfg = Config()
    cfg.train.run_dir = str(run_dir)
    logger = M.MetricsLogger(run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb)
    assert logger.wandb_mode == "offline" and logger.wandb_run is not None
    first = logged_steps(1, 3)
    for step, m in enumerate(first, start=1):
        logger.log(step, m)
    logger.log(3, {"val_loss": 3.5})  # evaluation logs separately at the same step
    logger.close()
    logger.close()  # idempotent

    # Console: one line per log call, with the compact fields.
    out = capsys.readouterr().out
    assert f"m6rec metrics: W&B offline (WANDB_MODE), run id {logger.wandb_run_id()}" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4
    assert lines[2] == ("step 3 | loss 3.2500 | lr 4.00e-03 | gnorm 3.500 | 4.0k tok/s | mfu 13.0% | "
                        "100 ms/step | data 1.5% | mem 0.25 GiB")
    assert lines[3] == "step 3 | val 3.5000"

    # JSONL: every logged metric, plus step and unix time.
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]
    for row, m in zip(rows, first):
        assert row["time"] > 1.6e9
        assert {k: row[k] for k in m} == m
    assert set(rows[3]) == {"step", "time", "val_loss"} and rows[3]["val_loss"] == 3.5

    # W&B offline files, read back from the binary log.
    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    wandb_file = offline / f"run-{run_id}.wandb"
    assert wandb_file.is_file()
    assert (offline / "logs" / "debug.log").is_file()
    # wandb 0.31 writes no files/config.yaml offline (the config is in the .wandb log, read below);
    # its capture of the console lines is test_wandb_captures_the_console_lines_in_a_fresh_process.
    records = read_wandb_records(wandb_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == run_id and run.project == "m6rec" and run.display_name == "exp1"
    config = wandb_config(records)
    assert config["train"]["lr"] == cfg.train.lr and config["model"]["dim"] == cfg.model.dim
    assert config["train"]["run_dir"] == str(run_dir)
    history = wandb_history(records)
    assert sorted(history) == [1, 2, 3]
    for step, m in enumerate(first, start=1):
        assert {k: history[step][k] for k in m} == pytest.approx(m)
    assert history[3]["val_loss"] == 3.5 and "val_loss" not in history[1]  # same step: one W&B row

    # A second logger on the same run directory (resume / requeue) continues the same W&B run.
    again = M.MetricsLogger(run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb)
    for step, m in enumerate(logged_steps(4, 2), start=4):
        again.log(step, m)
    again.close()
    assert (run_dir / "wandb_id").read_text().strip() == run_id
    offline_dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_dirs) == 2 and all(d.name.split("-", 3)[3].startswith(run_id) for d in offline_dirs)
    second = next(d for d in offline_dirs if d != offline)
    records2 = read_wandb_records(second / f"run-{run_id}.wandb")
    assert next(r.run for r in records2 if r.WhichOneof("record_type") == "run").run_id == run_id
    assert sorted(wandb_history(records2)) == [4, 5]
    assert [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 3, 4, 5]

    # The planted API key is nowhere under the test's folder (run dir and W&B's own folders).
    files = [p for p in wandb_env.rglob("*") if p.is_file()]
    assert len(files) > 8
    leaks = [p for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == []


def test_wandb_captures_the_console_lines_in_a_fresh_process(wandb_env):
    """W&B copies the console lines into the run's files/output.log.  In a process of its own:
    wandb 0.31 captures the console of the first run a process starts only (a run after another
    one in the same process, as in the test above when other tests ran first, writes no output.log)."""
    run_dir = wandb_env / "runs" / "console"
    script = ("from m6rec.config import Config\n"
              "from m6rec.train.metrics import MetricsLogger\n"
              "cfg = Config()\n"
              f"cfg.train.run_dir = {str(run_dir)!r}\n"
              "logger = MetricsLogger(cfg.train.run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb)\n"
              "logger.log(1, {'loss': 2.5, 'lr': 0.001})\n"
              "logger.close()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("step 1 "))
    run_id = (run_dir / "wandb_id").read_text().strip()
    (offline,) = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert line in (offline / "files" / "output.log").read_text()


def test_other_ranks_write_nothing(wandb_env, capsys):
    run_dir = wandb_env / "rank1"
    logger = M.MetricsLogger(run_dir, {"a": 1}, rank=1, world_size=2, wandb_cfg=None)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not run_dir.exists()
    assert capsys.readouterr().out == ""
    assert logger.wandb_run is None


def test_wandb_failures_keep_other_sinks(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    logger = M.MetricsLogger(tmp_path, {}, 0, 1, types.SimpleNamespace(mode="offline"))
    logger.log(1, {"loss": 2.0})
    logger.log(2, {"loss": float("nan"), "grad_norm": torch.tensor(0.5)})
    logger.close()
    err = capsys.readouterr().err
    assert err.count("W&B unavailable") == 1
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] == 0.5  # strict JSON: NaN -> null

    # "auto" with credentials but no network: online start fails, the run goes offline.
    modes = []

    class FakeRun:
        step = 0

        def log(self, metrics, step):
            raise RuntimeError("socket closed")

        def finish(self):
            pass

    def fake_init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise TimeoutError("no route to api.wandb.ai")
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    logger = M.MetricsLogger(tmp_path / "b", {}, 0, 1, types.SimpleNamespace(mode="auto"))
    assert modes == ["online", "offline"] and logger.wandb_mode == "offline"
    logger.log(1, {"loss": 1.0})  # log raises inside W&B: warned, W&B dropped, run goes on
    logger.log(2, {"loss": 0.5})
    logger.close()
    err = capsys.readouterr().err
    assert "trying offline" in err and err.count("W&B log failed") == 1
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resumed_steps_skip_wandb_only(tmp_path, monkeypatch, capsys):
    """W&B already holds steps up to 10 (logged before the crash); the re-run steps 9, 10 go to JSONL only."""
    sent = []

    class ResumedRun:
        step = 10

        def log(self, metrics, step):
            sent.append(step)

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: ResumedRun(), run=None,
                                                                    teardown=lambda: None))
    monkeypatch.setenv("WANDB_MODE", "offline")
    with M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks={"jsonl", "wandb"}) as logger:
        for step in (9, 10, 10, 11):
            logger.log(step, {"loss": 1.0})
    assert sent == [10, 10, 11]
    assert capsys.readouterr().err.count("go to metrics.jsonl only") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4


# --------------------------------------------------------------------------
# Resume: each step once in metrics.jsonl and in W&B
# --------------------------------------------------------------------------
def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_resume_sets_aside_rows_after_the_checkpoint(tmp_path, capsys):
    """kill -9 at step 50, last checkpoint 45: steps 46-50 leave metrics.jsonl before they are logged again."""
    with M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks=("jsonl",)) as first:
        for step in range(5, 51, 5):
            first.log(step, {"loss": 10.0 - step / 10})
        first.log(40, {"val_loss": 5.5})
        first._jsonl.write('{"step": 51, "time": 1.0, "lo')  # the line SIGKILL cut
    before = (tmp_path / "metrics.jsonl").read_text()

    # Another rank resuming touches nothing.
    M.MetricsLogger(tmp_path, {}, 1, 2, None, resume_step=45).close()
    assert (tmp_path / "metrics.jsonl").read_text() == before

    t0 = __import__("time").time()
    resumed = M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks=("jsonl",), resume_step=45)
    # Before anything is logged: steps <= 45 only, in their order, the lines unchanged.
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert kept == before.splitlines()[:9] + [before.splitlines()[10]]
    assert [r["step"] for r in jsonl_rows(tmp_path / "metrics.jsonl")] == [5, 10, 15, 20, 25, 30, 35, 40, 45, 40]
    aside = jsonl_rows(tmp_path / "metrics.superseded.jsonl")
    assert [r.get("step") for r in aside] == [50, None]
    assert aside[0]["loss"] == 5.0 and aside[1]["text"] == '{"step": 51, "time": 1.0, "lo'
    for r in aside:
        assert r["superseded"]["resume_step"] == 45 and t0 - 1 <= r["superseded"]["time"] <= t0 + 60
        assert "step 45" in r["superseded"]["reason"] or "cut short" in r["superseded"]["reason"]
    assert resumed.set_aside == aside
    assert not list(tmp_path.glob("*.tmp"))
    assert "resumed at step 45: 2 line(s) of metrics.jsonl (step 50)" in capsys.readouterr().out
    for step in (50, 55):
        resumed.log(step, {"loss": 1.0 + step / 100})
    resumed.close()

    rows = jsonl_rows(tmp_path / "metrics.jsonl")
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) == list(range(5, 56, 5))  # each step once
    # `m6rec plot` reads the cleaned file: the re-run's value of step 50, not the superseded one.
    series = read_metrics(tmp_path / "metrics.jsonl")
    assert series["loss"][0] == list(range(5, 56, 5)) and series["loss"][1][-2:] == [1.5, 1.55]
    assert series["val_loss"] == ([40], [5.5])
    assert plot_run(tmp_path).stat().st_size > 10_000

    # A second crash and resume from 50 appends to the side file; a clean resume moves nothing.
    with M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks=("jsonl",), resume_step=50):
        pass
    assert [r.get("step") for r in jsonl_rows(tmp_path / "metrics.superseded.jsonl")] == [50, None, 55]
    after = (tmp_path / "metrics.jsonl").read_text()
    with M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks=("jsonl",), resume_step=50):
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == after
    assert len(jsonl_rows(tmp_path / "metrics.superseded.jsonl")) == 3


def test_offline_wandb_rewinds_to_the_checkpoint(wandb_env, capsys):
    """Real offline W&B: the resumed run's .wandb records the rewind and holds only the steps after it."""
    run_dir = wandb_env / "runs" / "rewind"
    cfg = Config()
    first = M.MetricsLogger(run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb)
    for step, m in enumerate(logged_steps(1, 5), start=1):  # steps 1..5; the checkpoint was at 3
        first.log(step, m)
    first.close()
    run_id = (run_dir / "wandb_id").read_text().strip()
    (seg1,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")

    again = M.MetricsLogger(run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb, resume_step=3)
    assert again.wandb_mode == "offline" and again.wandb_resume == "rewind"
    rerun = {step: dict(loss=100.0 + step) for step in (4, 5, 6)}
    for step, m in rerun.items():
        again.log(step, m)
    again.close()
    assert f"run id {run_id}, rewound to step 3" in capsys.readouterr().out

    segments = sorted(d for d in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*") if d.is_dir())
    assert len(segments) == 2 and segments[0] == seg1
    records1 = read_wandb_records(seg1 / f"run-{run_id}.wandb")
    assert sorted(wandb_history(records1)) == [1, 2, 3, 4, 5]  # the interrupted run's log is not rewritten
    records2 = read_wandb_records(segments[1] / f"run-{run_id}.wandb")
    run = next(r.run for r in records2 if r.WhichOneof("record_type") == "run")
    # What `wandb sync` turns into a rewind of the server's run (RewindRun) before uploading.
    assert (run.run_id, run.branch_point.run, run.branch_point.metric, run.branch_point.value) == \
           (run_id, run_id, "_step", 3.0)
    assert not run.resume
    history2 = wandb_history(records2)
    assert sorted(history2) == [4, 5, 6] and {s: history2[s]["loss"] for s in history2} == \
           {s: m["loss"] for s, m in rerun.items()}
    # The curve after the rewind: steps up to 3 from the first folder, the rest from the second; each once.
    curve = {s: r["loss"] for s, r in wandb_history(records1).items() if s <= run.branch_point.value}
    curve.update({s: r["loss"] for s, r in history2.items()})
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in jsonl_rows(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in jsonl_rows(run_dir / "metrics.superseded.jsonl")] == [4, 5]

    # A clean stop (nothing logged after the checkpoint) continues with resume="allow", no rewind.
    clean = M.MetricsLogger(run_dir, cfg, rank=0, world_size=1, wandb_cfg=cfg.train.wandb, resume_step=6)
    assert clean.wandb_resume == "allow"
    clean.log(7, {"loss": 1.0})
    clean.close()
    seg3 = sorted(d for d in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*") if d.is_dir())[2]
    records3 = read_wandb_records(seg3 / f"run-{run_id}.wandb")
    run3 = next(r.run for r in records3 if r.WhichOneof("record_type") == "run")
    assert run3.resume and not run3.branch_point.run and sorted(wandb_history(records3)) == [7]


def test_wandb_rewind_needs_an_earlier_offline_folder_and_falls_back_online(tmp_path, monkeypatch, capsys):
    """Offline with no earlier folder of the run: nothing to rewind.  Online, a refused rewind -> resume='allow'."""
    calls = []

    class FakeRun:
        step = 0

        def log(self, metrics, step):
            pass

        def finish(self):
            pass

    def fake_init(mode, **kwargs):
        calls.append((mode, {k: kwargs[k] for k in ("id", "resume", "resume_from") if k in kwargs}))
        if "resume_from" in kwargs and mode == "online":
            raise RuntimeError("failed to rewind run: rewind is not enabled")
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=fake_init, run=None, teardown=lambda: None))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n')
    monkeypatch.setenv("WANDB_MODE", "offline")
    M.MetricsLogger(tmp_path, {}, 0, 1, None, resume_step=1).close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert calls == [("offline", {"id": run_id, "resume": "allow"})]

    calls.clear()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 1.0}\n')
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = M.MetricsLogger(tmp_path, {}, 0, 1, None, resume_step=1)
    logger.close()
    assert calls == [("online", {"id": run_id, "resume_from": f"{run_id}?_step=1"}),
                     ("online", {"id": run_id, "resume": "allow"})]
    assert logger.wandb_mode == "online" and logger.wandb_resume == "allow"
    assert "W&B online start rewound to step 1 failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, configured, netrc_host, expected",
    [
        ({"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}, "online", None, "offline"),  # env wins
        ({"WANDB_MODE": "online"}, "offline", None, "online"),
        ({"WANDB_MODE": "disabled"}, "auto", None, "disabled"),
        ({"WANDB_MODE": "dryrun"}, "auto", None, "offline"),  # W&B's old alias
        ({}, "auto", None, "offline"),  # no key anywhere
        ({"WANDB_API_KEY": FAKE_KEY}, "auto", None, "online"),
        ({}, "auto", "api.wandb.ai", "online"),  # `wandb login` wrote ~/.netrc
        ({}, "auto", "example.org", "offline"),  # a netrc, but not for W&B
        ({"WANDB_BASE_URL": "https://wandb.corp.local"}, "auto", "wandb.corp.local", "online"),
        ({}, "offline", "api.wandb.ai", "offline"),
        ({}, "disabled", None, "disabled"),
    ],
)
def test_wandb_mode_resolution(tmp_path, env, configured, netrc_host, expected):
    env = dict(env, NETRC=str(tmp_path / "netrc"))
    if netrc_host:
        (tmp_path / "netrc").write_text(f"machine {netrc_host}\n  login user\n  password {FAKE_KEY}\n")
    mode, why = M.resolve_wandb_mode(configured, env)
    assert mode == expected, why


def test_scrub_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    out = M.scrub_secrets({"api_key": "x", "tokenizer": {"path": "t.json"},
                           "url": "https://u:hf_abcdefghijklmnop@host/x", "tags": ["hf_abcdefghijklmnop"]})
    assert out == {"api_key": "<redacted>", "tokenizer": {"path": "t.json"},
                   "url": "https://u:<redacted>@host/x", "tags": ["<redacted>"]}


# --------------------------------------------------------------------------
# Peak FLOP/s, MFU, timing
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "gpu, precision, tf32, expected",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989e12),
        ("NVIDIA H100 PCIe", "bf16", False, 756e12),
        ("NVIDIA H100 NVL", "fp16", False, 835e12),
        ("NVIDIA H200", "bf16", False, 989e12),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5e12),
        ("NVIDIA A100-SXM4-80GB", "fp32", True, 156e12),
        ("NVIDIA A10G", "bf16", False, 125e12),  # must not match "A100"
        ("NVIDIA L4", "bf16", False, 121e12),
        ("Tesla V100-SXM2-16GB", "fp16", False, 125e12),
        ("Tesla V100-SXM2-16GB", "bf16", False, 7.0),  # no bf16 tensor cores: measured
        ("Some Future GPU", "bf16", False, 7.0),
    ],
)
def test_peak_flops_table(monkeypatch, gpu, precision, tf32, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high" if tf32 else "highest")
    calls = []
    flops, source = peak.peak_flops(precision, "cuda:0", measure=lambda dtype, dev: calls.append(dtype) or 7.0)
    assert flops == expected, source
    assert ("measured" in source) == (expected == 7.0) and (gpu in source)
    assert calls == ([torch.bfloat16] if expected == 7.0 else [])


def test_peak_flops_configured_and_cpu():
    never = lambda *a: pytest.fail("must not measure")  # noqa: E731
    assert peak.peak_flops("bf16", "cuda", configured=123e12, measure=never) == (123e12, "configured (train.peak_flops)")
    dtypes = []
    flops, source = peak.peak_flops("fp32", "cpu", measure=lambda dtype, dev: dtypes.append(dtype) or 5e10)
    assert flops == 5e10 and dtypes == [torch.float32] and source == "measured float32 matmul peak on cpu"
    peak._measured_peaks.clear()
    first = peak.measured_matmul_flops(torch.float32, "cpu", seconds=0.15)
    assert 1e8 < first < 1e15
    assert peak.measured_matmul_flops(torch.float32, "cpu", seconds=100) == first  # cached: returns at once


def test_mfu_and_step_timer():
    # 2,000 tokens/s/device of a model at 6e9 FLOPs/token on a 312 TFLOP/s GPU.
    assert peak.mfu(2000, 6e9, 312e12) == pytest.approx(12e12 / 312e12)
    with pytest.raises(ValueError):
        peak.mfu(1, 1, 0)

    ticks = [0.0, 0.0, 0.5, 10.0, 14.0, 20.0]  # start, data 0->0.5, paused 10->14, report at 20
    timer = M.StepTimer(clock=lambda: ticks.pop(0) if ticks else 20.0)
    with timer.waiting_for_data():
        pass
    timer.step_done(tokens=4000)
    with timer.paused():
        pass
    timer.step_done(tokens=4000)
    out = timer.interval_metrics(world_size=4, flops_per_token=1e9, peak=1e13)
    # 16 s of counted time (20 - 4 paused), 2 steps, 8000 tokens on this rank.
    assert out == pytest.approx(dict(step_time_ms=8000.0, data_wait_pct=100 * 0.5 / 16,
                                     tokens_per_s_per_device=500.0, tokens_per_s=2000.0,
                                     tflops_per_device=0.5, mfu_pct=5.0))
    assert timer.interval_metrics() == {}  # the interval restarted, no steps yet


def test_memory_and_progress(monkeypatch):
    mem = M.memory_stats("cpu")
    assert 0.001 < mem["memory_gib"] <= mem["memory_peak_gib"] * 1.01
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = M.progress(100, initial=10, desc="train", rank=0)
    assert not bar.disable and bar.n == 10 and bar.mininterval >= 60
    bar.close()
    assert M.progress(100, rank=3).disable


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------
def test_plot(tmp_path, capsys):
    from PIL import Image

    with M.MetricsLogger(tmp_path, {}, 0, 1, None, enabled_sinks=("jsonl",)) as logger:
        for step, m in enumerate(logged_steps(0, 12)):
            logger.log(step, m)
        logger.log(11, {"val_loss": 3.0})
        logger.log(5, {"loss": 9.0})  # a resumed run re-logs step 5: the last value wins
    series = read_metrics(tmp_path / "metrics.jsonl")
    assert series["loss"][0] == list(range(12)) and series["loss"][1][5] == 9.0
    assert series["val_loss"] == ([11], [3.0])

    out = plot_run(tmp_path)
    assert out == tmp_path / "metrics.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1200, 800)
        colors = img.convert("RGB").getcolors(maxcolors=1_000_000)
        assert len(colors) > 50  # curves, text and axes, not a blank canvas

    # Only a loss logged: the other panels say so instead of failing.
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (sparse / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": null}\n{"step": 3, "lo')
    args = types.SimpleNamespace(run_dir=str(sparse), out=str(tmp_path / "x" / "sparse.png"))
    assert plot_main(None, args) == 0 and (tmp_path / "x" / "sparse.png").stat().st_size > 10_000
    assert plot_main(None, types.SimpleNamespace(run_dir=str(tmp_path / "missing"), out=None)) == 1
    assert "not found" in capsys.readouterr().err


def test_docs_list_every_metric(project_root):
    doc = (project_root / "docs" / "wandb.md").read_text()
    assert [name for name in M.METRICS if f"| `{name}` |" not in doc] == []
