"""The training engine end to end: real DeepSpeed, real launchers, real signals (CPU, gloo).

Every run is the tiny preset on the built-in ml-latest-small for a few steps
(micro-batch 2 x 512 tokens), started the way users start it:

==============  =======================================  ===========================================
run             how                                       proves
==============  =======================================  ===========================================
one             ``python launch/train.py`` (1 rank),      baseline of the equivalence tests; W&B
                stage 0, grad_accum 2, 2 workers          offline + JSONL; a plain process works
zero1           ``torchrun`` 2 ranks, ZeRO 1              same curve as ``one``
zero2           ``deepspeed`` 2 ranks, ZeRO 2             same curve; reference of the resume test
zero3           ``accelerate launch`` 2 ranks, ZeRO 3     same curve; export of ZeRO 3
killed/resumed  ``deepspeed --hostfile --no_ssh`` (as in   bitwise resume, no sample repeated/skipped
                slurm/train.sbatch), SIGKILL after step
                3's checkpoint, then ``--resume auto``
sigterm         ``srun``-style env (SLURM_*), SIGTERM     every rank stops, checkpoints, exits 0
                to rank 1 only
usr1            plain, SIGUSR1; resumed; RUN_DIR/STOP     exit 0, loadable checkpoint, stop file
crash           ``deepspeed``, crash_in_save@4, resume    ``latest`` stays on the last complete save
nan             ``torchrun``, nan_loss on rank 1 only     updates skipped together, stop after K
elastic_21/12   zero2's step 3 -> 1 rank -> 2 ranks       state after each resume = saved; the
                ZeRO 2 (``--resume auto``)                uninterrupted run's samples and losses
elastic_zero    zero2's step 3 -> ZeRO 3 (torchrun) ->    the same through DeepSpeed's universal
                ZeRO 1 (deepspeed), 2 ranks               checkpoint
fresh_adam      zero2's step 3 -> ZeRO 3 with a new       the loss jump the elastic resume avoids
                AdamW (moments zero, step 0)
elastic_z       zero3's step 3 -> 1 rank; a SIGKILL in    ZeRO 3 -> one rank; a killed conversion
                the conversion first                      leaves the checkpoint usable
elastic_13      one's step 3 -> 2 ranks ZeRO 3            a fresh 1-rank run's state into ZeRO 3
==============  =======================================  ===========================================

Every rank writes an exact per-step trace (``M6REC_TRACE=1``: losses as
float.hex, sample keys, a digest of its parameters; see trace.Trace), and
its full state (weights, AdamW moments, steps; gathered) at every save and
right after a resume.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.runs import free_port, jsonl, rank_env, read_trace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 8
COMMON = ["--config", "configs/pretrain/tiny.yaml", "--data.stream.batch_size", "2", "--train.steps", str(STEPS),
          "--train.warmup_steps", "2", "--train.log_every", "1", "--train.eval_every", "4", "--train.eval_batches", "4",
          "--train.save_every", "3", "--train.peak_flops", "1.0e+11"]
TWO_RANKS = ["--data.stream.num_workers", "1"]
ONE_RANK_SAME_BATCH = ["--data.stream.num_workers", "2", "--train.grad_accum", "2"]  # = 2 ranks x 1 worker
# Measured on this 2-core CPU (fp32, 8 steps): worst relative difference of the step losses of
# 2 ranks vs 1 rank was 1.5e-6 (ZeRO 1/2/3 alike); of the validation losses, 2e-6.
LOSS_RTOL = 2e-5


class Run:
    """One training launch: its processes, log and run directory."""

    def __init__(self, name: str, run_dir: Path, launcher: str, args: list[str], env: dict):
        self.name, self.run_dir, self.launcher = name, run_dir, launcher
        self.log = run_dir.parent / f"{run_dir.name}.{launcher}.log"
        port = free_port()
        script = ["launch/train.py", *args, "--train.run_dir", str(run_dir)]
        hostfile = self._hostfile() if launcher == "deepspeed_hostfile" else None
        cmds = {
            "plain": [[sys.executable, *script]],
            "deepspeed": [[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *script]],
            # slurm/train.sbatch's line: a hostfile from launch/hostfile.py, no ssh, this node's ranks.
            "deepspeed_hostfile": [[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                                    "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(port),
                                    *script]],
            "torchrun": [[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), *script]],
            "accelerate": [[str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate_deepspeed.yaml",
                            "--main_process_port", str(port), *script]],
            "srun": [[sys.executable, *script], [sys.executable, *script]],
        }[launcher]
        out = open(self.log, "ab")
        self.procs = []
        for i, cmd in enumerate(cmds):
            e = dict(env)
            if launcher == "srun":  # what srun gives each task (slurm/train.sbatch exports MASTER_*)
                e.update(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2",
                         SLURM_NODEID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            # Own session: a kill of the process group reaches the launcher and every rank.
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        out.close()

    def _hostfile(self) -> Path:
        path = self.run_dir.parent / f"{self.run_dir.name}.hostfile"
        subprocess.run([sys.executable, "launch/hostfile.py", "--slots", "2", "localhost", "-o", str(path)],
                       cwd=ROOT, check=True)
        return path

    def wait(self, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name}: no exit after {timeout} s\n{self.tail()}")
        return max(codes, key=abs)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, sig)  # the session this Run started: launcher and ranks
            except ProcessLookupError:
                pass

    def tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def ok(self, timeout: float = 300) -> "Run":
        rc = self.wait(timeout)
        assert rc == 0, f"{self.name} exited {rc}\n{self.tail()}"
        return self

    def trace(self, rank: int = 0) -> list[dict]:
        return read_trace(self.run_dir, rank)

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def wait_for(cond, timeout: float, what: str, run: Run):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if all(p.poll() is not None for p in run.procs):
            raise AssertionError(f"{run.name} exited before {what}\n{run.tail()}")
        time.sleep(0.05)
    run.kill()
    raise AssertionError(f"{run.name}: timed out waiting for {what}\n{run.tail()}")


def latest(run_dir: Path) -> str | None:
    p = run_dir / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


# --------------------------------------------------------------------------
# Fixtures: prepared data once, each run once
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from m6rec.cli import main

    # DeepSpeed JIT-builds its CPU shared-memory comm op at init_distributed (about 40 s the
    # first time, then cached in ~/.cache/torch_extensions): once here, not in two ranks at once.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    out = tmp_path_factory.mktemp("data") / "tiny"
    assert main(["prepare", "--config", "configs/pretrain/tiny.yaml", "--data.output", str(out)]) == 0
    return out


class Runs:
    """Launch each named run once, on first use."""

    def __init__(self, root: Path, data_dir: Path):
        self.root, self.data, self.done = root, data_dir, {}

    def args(self, *extra) -> list[str]:
        return [*COMMON, "--data.output", str(self.data), *extra]

    def start(self, name: str, launcher: str, extra: list[str], **env) -> Run:
        return Run(name, self.root / name, launcher, self.args(*extra), rank_env(self.root, **env))

    def get(self, name: str) -> Run:
        if name not in self.done:
            spec = {
                "one": ("plain", ["--deepspeed.zero_stage", "0", *ONE_RANK_SAME_BATCH], {"WANDB_MODE": "offline"}),
                "zero1": ("torchrun", ["--deepspeed.zero_stage", "1", *TWO_RANKS], {}),
                "zero2": ("deepspeed", ["--deepspeed.zero_stage", "2", *TWO_RANKS], {}),
                "zero3": ("accelerate", ["--deepspeed.zero_stage", "3", *TWO_RANKS], {}),
            }[name]
            self.done[name] = self.start(name, spec[0], spec[1], **spec[2]).ok()
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), data_dir)


# --------------------------------------------------------------------------
# DeepSpeed's CPU shared-memory buffers do not outlive the run
# --------------------------------------------------------------------------
SHM_PROBE = """
import json, os
import torch
import deepspeed.comm as ds_comm
from m6rec.train.distributed import init_distributed
from m6rec.train.leftovers import shm_buffer_path

rank, world, _ = init_distributed()
t = torch.full((1000,), float(rank + 1))
ds_comm.inference_all_reduce(t)  # DeepSpeed's shm path: it reads every rank's mapped buffer
json.dump({"op": ds_comm.comm.cdb.shm_comm_op is not None, "local_size": os.environ.get("LOCAL_SIZE"),
           "name_left": shm_buffer_path(rank).exists(), "sum": t[0].item()},
          open(os.environ["PROBE_OUT"] + f".{rank}", "w"))
"""


def test_deepspeed_cpu_shm_buffers_are_unlinked(data_dir, tmp_path):
    """Under the ``deepspeed`` launcher (LOCAL_SIZE = world) DeepSpeed's CPU backend gives each
    rank a 69 MB /dev/shm file and never unlinks it: 287 of them (19 GB of RAM) had piled up here
    before init_distributed started removing them.  The names must be gone while the run goes on,
    the shm all-reduce must still work, and nothing may be left after exit."""
    script, out = tmp_path / "probe.py", tmp_path / "probe"
    script.write_text(SHM_PROBE)
    port = free_port()
    proc = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), str(script)],
                          cwd=ROOT, env=rank_env(tmp_path, PROBE_OUT=str(out)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    if not reports[0]["op"]:
        pytest.skip("DeepSpeed's shm comm op did not build here (no compiler): no buffers are made")
    assert [r["local_size"] for r in reports] == ["2", "2"]  # the condition under which DeepSpeed makes them
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    assert not any(r["name_left"] for r in reports), reports
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"))
    assert not left, left


# --------------------------------------------------------------------------
# ZeRO 1/2/3 on 2 ranks = 1 rank with the same global batch
# --------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_ranks_match_one_rank(runs, stage):
    one, two = runs.get("one"), runs.get(f"zero{stage}")
    ref, r0, r1 = one.trace(0), two.trace(0), two.trace(1)
    assert [r["step"] for r in ref] == [r["step"] for r in r0] == [r["step"] for r in r1] == list(range(1, STEPS + 1))
    worst = 0.0
    for a, b, c in zip(ref, r0, r1):
        # The same samples: 1 rank's two micro-batches are rank 0's and rank 1's batches.
        assert a["keys"] == [b["keys"][0], c["keys"][0]], a["step"]
        assert b["loss"] == c["loss"]  # the step loss is the all-reduced one on every rank
        la, lb = float.fromhex(a["loss"]), float.fromhex(b["loss"])
        worst = max(worst, abs(la - lb) / abs(la))
        assert a["lr"] == b["lr"]
    val_one = [r["val_loss"] for r in jsonl(one.run_dir) if "val_loss" in r]
    val_two = [r["val_loss"] for r in jsonl(two.run_dir) if "val_loss" in r]
    assert len(val_one) == len(val_two) == 2
    print(f"ZeRO {stage}: worst relative step-loss difference vs 1 rank {worst:.2e}; val "
          f"{[abs(a - b) / a for a, b in zip(val_one, val_two)]}")
    assert worst < LOSS_RTOL
    assert val_two == pytest.approx(val_one, rel=LOSS_RTOL)
    assert float.fromhex(ref[-1]["loss"]) < float.fromhex(ref[0]["loss"]) - 0.5  # it learns
    assert two.summary()["zero_stage"] == stage and two.summary()["world_size"] == 2


# --------------------------------------------------------------------------
# Bitwise resume after kill -9
# --------------------------------------------------------------------------
def test_bitwise_resume_after_sigkill(runs):
    ref = runs.get("zero2")
    extra = ["--deepspeed.zero_stage", "2", *TWO_RANKS]
    killed = runs.start("killed", "deepspeed_hostfile", extra)
    # SIGKILL the launcher and both ranks as soon as step 3's checkpoint is complete.
    wait_for(lambda: latest(killed.run_dir) == "step00000003", 300, "the checkpoint of step 3", killed)
    killed.kill(signal.SIGKILL)
    assert killed.wait(60) != 0
    assert not (killed.run_dir / "summary.json").exists(), "the run finished before the kill"
    resumed = Run("resumed", killed.run_dir, "deepspeed_hostfile", runs.args(*extra, "--resume", "auto"),
                  rank_env(runs.root)).ok()
    start = resumed.summary()["start_step"]
    assert start in (3, 6) and resumed.summary()["step"] == STEPS
    for rank in (0, 1):
        a, b = ref.trace(rank), resumed.trace(rank)
        assert [r["step"] for r in b] == list(range(1, STEPS + 1))
        for x, y in zip(a, b):  # losses, samples, and this rank's parameters after every step
            assert (x["step"], x["loss"], x["local"], x["keys"], x["params"]) == \
                   (y["step"], y["loss"], y["local"], y["keys"], y["params"])
    from safetensors.torch import load_file

    w_ref = load_file(ref.run_dir / "trace" / "final_weights.safetensors")
    w_res = load_file(resumed.run_dir / "trace" / "final_weights.safetensors")
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    # The stream went on from the checkpoint: every sample of steps 1..8 once, as in the straight run.
    keys = [k for r in resumed.trace(0) + resumed.trace(1) for mb in r["keys"] for row in mb for k in row]
    assert len(keys) == len(set(keys))


def test_model_shape_change_is_refused(runs):
    """Another world size or ZeRO stage resumes (the elastic tests below); another model shape cannot."""
    ref = runs.get("zero2")
    run_dir = runs.root / "one_rank_resume"
    shutil.copytree(ref.run_dir / "checkpoints", run_dir / "checkpoints")
    run = runs.start("one_rank_resume", "plain", ["--deepspeed.zero_stage", "2", "--model.n_layers", "3",
                                                  "--resume", "auto"])
    assert run.wait() == 2
    assert "holds another model shape (n_layers: saved 2, this run 3)" in run.tail(), run.tail()
    assert not list((run_dir / "checkpoints").glob("*universal*"))  # refused before any conversion


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_export_fp32_equals_live_model(runs, stage, tmp_path):
    from safetensors.torch import load_file

    from m6rec.train.export import export

    run = runs.get(f"zero{stage}")
    out = tmp_path / "fp32"
    if stage == 2:  # the command line
        r = subprocess.run([str(BIN / "m6rec"), "export", "--ckpt", str(run.run_dir / "checkpoints"), "--to", "fp32",
                            str(out)], cwd=ROOT, env=rank_env(tmp_path), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    else:  # the function behind it (saves a process start)
        export(run.run_dir / "checkpoints", "fp32", out)
    exported = load_file(out / "model.safetensors")
    live = load_file(run.run_dir / "trace" / "final_weights.safetensors")  # gathered at the end of training
    assert sorted(exported) == sorted(live)
    for k in live:
        assert exported[k].dtype == torch.float32 and torch.equal(exported[k], live[k]), k
    if stage == 3:  # the Hugging Face layout of the same weights
        from m6rec.model.hf import load_hf

        hf = export(run.run_dir / "checkpoints" / f"step{STEPS:08d}", "hf", tmp_path / "hf")
        assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
        sd = load_hf(hf).state_dict()
        assert all(torch.equal(sd[k], live[k]) for k in live)


# --------------------------------------------------------------------------
# Metrics sinks in a real run
# --------------------------------------------------------------------------
def test_wandb_offline_and_jsonl_hold_the_metrics(runs):
    from helpers.wandb_files import read_wandb_records, wandb_config, wandb_history

    run = runs.get("one")
    rows = jsonl(run.run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    expected = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu_pct", "step_time_ms",
                "data_wait_pct", "memory_gib", "tokens_seen", "samples_skipped", "nonfinite_steps", "val_loss"}
    assert expected <= set().union(*rows)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train_rows)  # stage 0 computes it
    trace = {r["step"]: float.fromhex(r["loss"]) for r in run.trace(0)}
    assert all(r["loss"] == trace[r["step"]] for r in train_rows)  # log_every 1: the step's loss

    (offline,) = sorted((run.run_dir / "wandb").glob("offline-run-*"))
    records = read_wandb_records(next(offline.glob("run-*.wandb")))
    history = wandb_history(records)
    assert sorted(history) == list(range(1, STEPS + 1))
    for r in rows:
        for k, v in r.items():
            if k not in ("step", "time") and v is not None:
                assert history[r["step"]][k] == pytest.approx(v), (r["step"], k)
    config = wandb_config(records)
    assert config["train"]["steps"] == STEPS and config["deepspeed"]["zero_stage"] == 0


# --------------------------------------------------------------------------
# Preemption: SIGTERM, SIGUSR1, the STOP file
# --------------------------------------------------------------------------
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(runs, tmp_path):
    run = runs.start("sigterm", "srun", ["--deepspeed.zero_stage", "2", *TWO_RANKS, "--train.steps", "200"])
    wait_for(lambda: len(run.trace(1)) >= 2, 300, "two steps", run)
    # Rank 1 and its DataLoader worker, as Slurm signals every process of a task; rank 0 learns it
    # through the step's all-reduce.
    os.killpg(run.procs[1].pid, signal.SIGTERM)
    assert run.wait(120) == 0, run.tail()
    s = run.summary()
    assert s["stopped_by"] == "signal on another rank" and 2 <= s["step"] < 200
    assert latest(run.run_dir) == f"step{s['step']:08d}" == s["last_checkpoint"]
    meta = json.loads((run.run_dir / "checkpoints" / latest(run.run_dir) / "COMPLETE").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == 2
    from m6rec.train.export import export  # every shard of it reads back

    assert export(run.run_dir / "checkpoints", "fp32", tmp_path / "w.safetensors").stat().st_size > 1e6


def test_sigusr1_plain_process_then_resume_and_stop_file(runs):
    extra = ["--deepspeed.zero_stage", "2", "--train.steps", "200", "--train.save_every", "0"]
    # Time-based saves every 6 ms, that is after every step; keep_last (3) prunes them.
    run = runs.start("usr1", "plain", [*extra, "--train.save_every_minutes", "0.0001"])
    wait_for(lambda: len(run.trace()) >= 2, 300, "two steps", run)
    os.kill(run.procs[0].pid, signal.SIGUSR1)
    assert run.wait(120) == 0, run.tail()
    first = run.summary()
    k = first["step"]
    assert first["stopped_by"] == "signal SIGUSR1" and latest(run.run_dir) == f"step{k:08d}"
    from m6rec.train.checkpoint import complete_tags

    assert complete_tags(run.run_dir / "checkpoints") == [f"step{i:08d}" for i in range(max(1, k - 2), k + 1)]

    again = runs.start("usr1", "plain", [*extra, "--resume", "auto"])
    wait_for(lambda: len(again.trace()) >= k + 1, 300, "a resumed step", again)
    (again.run_dir / "STOP").touch()  # what slurm/train.sbatch does on USR1
    assert again.wait(120) == 0, again.tail()
    second = again.summary()
    assert second["start_step"] == k and second["step"] > k and second["stopped_by"].startswith("stop file")
    assert not (again.run_dir / "STOP").exists()  # consumed once served
    assert latest(run.run_dir) == f"step{second['step']:08d}"
    assert [r["step"] for r in again.trace()] == list(range(1, second["step"] + 1))


# --------------------------------------------------------------------------
# A crash during a save; non-finite losses
# --------------------------------------------------------------------------
def test_crash_in_save_keeps_the_previous_checkpoint(runs):
    extra = ["--deepspeed.zero_stage", "3", *TWO_RANKS, "--train.steps", "6", "--train.save_every", "2",
             "--train.infill_rate", "0.5"]
    run = runs.start("crash", "deepspeed", extra, M6REC_FAULT="crash_in_save@4")
    assert run.wait() != 0
    ck = run.run_dir / "checkpoints"
    assert latest(run.run_dir) == "step00000002"
    assert (ck / "step00000002" / "COMPLETE").is_file()
    assert (ck / "step00000004").is_dir() and not (ck / "step00000004" / "COMPLETE").exists()

    again = runs.start("crash", "deepspeed", [*extra, "--resume", "auto"]).ok()
    s = again.summary()
    assert s["start_step"] == 2 and s["step"] == 6 and latest(run.run_dir) == "step00000006"
    assert (ck / "step00000004" / "COMPLETE").is_file()  # saved again, whole this time
    rows = [r for r in jsonl(run.run_dir) if "infilled_docs" in r]
    assert rows and sum(r["infilled_docs"] for r in rows) > 0  # the infilling objective ran on 2 ranks


def test_nonfinite_loss_skips_updates_then_stops(runs):
    extra = ["--deepspeed.zero_stage", "0", *TWO_RANKS, "--train.save_every", "1", "--train.max_nonfinite", "2"]
    run = runs.start("nan", "torchrun", extra, M6REC_FAULT="nan_loss@2,4,5", M6REC_FAULT_RANK="1")
    assert run.wait() != 0
    assert "the loss was non-finite at 2 consecutive steps (train.max_nonfinite=2)" in run.tail(200), run.tail()
    for rank in (0, 1):  # rank 1's NaN made both ranks skip the same updates
        t = {r["step"]: r for r in run.trace(rank)}
        assert sorted(t) == [1, 2, 3, 4, 5]
        assert [t[s]["skipped"] for s in range(1, 6)] == [False, True, False, True, True]
        assert t[2]["params"] == t[1]["params"] and t[3]["params"] != t[2]["params"]
        assert t[5]["params"] == t[4]["params"] == t[3]["params"]
    # Saves: step 1; step 2's was held back to step 3; nothing after the non-finite steps 4 and 5.
    assert latest(run.run_dir) == "step00000003"
    assert sorted(p.name for p in (run.run_dir / "checkpoints").glob("step*")) == ["step00000001", "step00000003"]
    assert jsonl(run.run_dir)[-1]["nonfinite_steps"] == 3


# --------------------------------------------------------------------------
# Elastic resume: another number of ranks, another ZeRO stage
# --------------------------------------------------------------------------
def _from_checkpoint(runs, name: str, src: Run, tag: str) -> Path:
    """A new run directory holding only ``src``'s checkpoint ``tag`` (as if the job stopped there)."""
    run_dir = runs.root / name
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(src.run_dir / "checkpoints" / tag, run_dir / "checkpoints" / tag)
    (run_dir / "checkpoints" / "latest").write_text(tag)
    return run_dir


def _resumed_weights_equal_saved(run_dir: Path, src: Run, tag: str, tmp: Path) -> float:
    """Worst |difference| of the weights right after a resume and the saved checkpoint's fp32 weights."""
    from safetensors.torch import load_file

    from m6rec.train.export import export

    saved = load_file(export(src.run_dir / "checkpoints" / tag, "fp32", tmp / f"{tag}.safetensors"))
    live = load_file(run_dir / "trace" / f"resumed_{tag}.safetensors")
    assert sorted(saved) == sorted(live)
    return max(float((saved[k] - live[k]).abs().max()) for k in saved)


def _step_keys(trace_by_rank: list[list[dict]], step: int) -> list:
    """Sample keys of a step over all ranks and micro-batches, sorted (the step's multiset)."""
    return sorted(k for t in trace_by_rank for r in t if r["step"] == step for mb in r["keys"] for row in mb
                  for k in row)


def _check_continuation(ref: Run, parts: list[tuple[Run, int, list[int]]]) -> float:
    """Each part (run, world size, its steps) stepped the reference's very samples with its losses."""
    ref_tr = [ref.trace(0), ref.trace(1)]
    worst = 0.0
    ref_loss = {r["step"]: float.fromhex(r["loss"]) for r in ref_tr[0]}
    all_keys = _step_keys(ref_tr, 1) + _step_keys(ref_tr, 2) + _step_keys(ref_tr, 3)
    for run, world, steps in parts:
        tr = [run.trace(r) for r in range(world)]
        loss = {r["step"]: float.fromhex(r["loss"]) for r in tr[0]}
        for s in steps:
            assert _step_keys(tr, s) == _step_keys(ref_tr, s), (run.name, s)
            all_keys += _step_keys(tr, s)
            worst = max(worst, abs(loss[s] - ref_loss[s]) / ref_loss[s])
    # The whole run: the uninterrupted run's multiset of samples, none twice.
    ref_all = sorted(k for s in range(1, STEPS + 1) for k in _step_keys(ref_tr, s))
    assert sorted(all_keys) == ref_all and len(set(all_keys)) == len(all_keys)
    return worst


def test_resume_two_ranks_then_one_then_two(runs, tmp_path):
    """ZeRO 2 on 2 ranks -> 1 rank (runs as stage 0; same global batch) -> 2 ranks ZeRO 2."""
    ref = runs.get("zero2")
    run_dir = _from_checkpoint(runs, "elastic_21", ref, "step00000003")
    one = Run("elastic_21", run_dir, "plain", runs.args("--deepspeed.zero_stage", "2", *ONE_RANK_SAME_BATCH,
                                                      "--resume", "auto"), rank_env(runs.root, M6REC_FAULT="stop_at@6")).ok()
    assert one.summary()["start_step"] == 3 and one.summary()["step"] == 6 and latest(run_dir) == "step00000006"
    assert "converted to DeepSpeed's universal layout in" in one.tail(400)
    d1 = _resumed_weights_equal_saved(run_dir, ref, "step00000003", tmp_path)
    s1 = _state_after_resume_equals_saved(run_dir, ref.run_dir, "step00000003")
    one_tr = read_trace(run_dir, 0)  # before the 2-rank part appends to rank0.jsonl
    two = Run("elastic_12", run_dir, "deepspeed", runs.args("--deepspeed.zero_stage", "2", *TWO_RANKS,
                                                           "--resume", "auto"), rank_env(runs.root)).ok()
    assert two.summary()["start_step"] == 6 and two.summary()["step"] == STEPS
    d2 = _resumed_weights_equal_saved(run_dir, one, "step00000006", tmp_path)
    s2 = _state_after_resume_equals_saved(run_dir, run_dir, "step00000006")

    class Part:  # the 1-rank part's trace as it was before the 2-rank part appended to it
        name = "elastic_21"

        @staticmethod
        def trace(rank):
            return [r for r in one_tr if r["step"] <= 6] if rank == 0 else []

    assert all(len(r["keys"]) == 2 for r in one_tr if 4 <= r["step"] <= 6)  # 2 micro-batches = 2 ranks' batches
    worst = _check_continuation(ref, [(Part, 1, [4, 5, 6]), (two, 2, [7, 8])])
    print(f"2->1->2: weights after resume differ from the saved by <= {max(d1, d2):.2e}, weights and moments "
          f"by <= {max(s1, s2):.2e} (relative); worst relative step-loss difference vs the uninterrupted 2-rank run "
          f"{worst:.2e}")
    assert max(d1, d2) <= 1e-6 and max(s1, s2) <= 1e-6
    assert worst < LOSS_RTOL


def _state_after_resume_equals_saved(resumed_dir: Path, saved_dir: Path, tag: str) -> float:
    """Worst relative difference between the full state (fp32 weights, AdamW moments, gathered)
    right after a resume and the one the saving run held when it wrote ``tag``; the step
    counts must be the tag's (trace.Trace.optimizer_state writes both).  Without ZeRO,
    torch's AdamW counts per parameter and skips one without a gradient (the image
    projection on text-only data keeps an older count); ZeRO keeps one count per group, the
    largest (see docs/training.md), which is what is compared then."""
    from safetensors.torch import load_file

    saved = load_file(saved_dir / "trace" / f"state_saved_{tag}.safetensors")
    live = load_file(resumed_dir / "trace" / f"state_resumed_{tag}.safetensors")
    assert sorted(saved) == sorted(live)
    step = float(int(tag[4:]))
    assert max(saved["step"].tolist()) == max(live["step"].tolist()) == step, (saved["step"], live["step"])
    if len(saved["step"]) == len(live["step"]) == 1:
        assert saved["step"].tolist() == live["step"].tolist() == [step]
    worst = 0.0
    for k in saved:
        if k != "step":
            scale = float(saved[k].abs().max()) or 1.0
            worst = max(worst, float((saved[k] - live[k]).abs().max()) / scale)
    return worst


def _logged_seconds(run: Run) -> tuple:
    """(conversion, load) seconds from the last resume's log lines."""
    import re

    log = run.tail(400)
    conv = re.findall(r"universal layout in ([0-9.]+) s", log)
    load = re.findall(r"\(\w+ load, ([0-9.]+) s\)", log)
    return (float(conv[-1]) if conv else None, float(load[-1]) if load else None)


def _reset_adam(universal: Path) -> None:
    """What a new torch AdamW starts from: moments zero, step 0 -- in a universal folder."""
    for f in (universal / "zero").glob("*/*.pt"):
        if f.stem in ("exp_avg", "exp_avg_sq"):
            d = torch.load(f, weights_only=False)
            torch.save({**d, "param": torch.zeros_like(d["param"])}, f)
        elif f.stem == "step":
            torch.save(torch.zeros_like(torch.load(f, weights_only=False)), f)
    p = universal / "zero" / "optimizer_state.pt"
    sd = torch.load(p, weights_only=False)
    sd["optimizer_state_dict"]["state"][0]["step"] = torch.zeros(())
    torch.save(sd, p)


def test_resume_zero2_then_zero3_then_zero1(runs):
    """2 ranks: ZeRO 2 (the reference run, checkpoint at step 3) -> ZeRO 3 (steps 4-6) -> ZeRO 1
    (steps 7-8), each through ``--resume auto`` and DeepSpeed's universal checkpoint.  Then the
    counterfactual: the same ZeRO 3 resume with a new AdamW (moments zero, step 0) and
    everything else -- weights, samples, learning rate -- identical."""
    from m6rec.train.checkpoint import convert_to_universal

    ref = runs.get("zero2")
    run_dir = _from_checkpoint(runs, "elastic_zero", ref, "step00000003")
    z3 = Run("elastic_zero", run_dir, "torchrun", runs.args("--deepspeed.zero_stage", "3", *TWO_RANKS,
                                                            "--resume", "auto"),
             rank_env(runs.root, M6REC_FAULT="stop_at@6")).ok()
    assert z3.summary()["start_step"] == 3 and z3.summary()["step"] == 6 and z3.summary()["zero_stage"] == 3
    assert "at ZeRO stage 2, this run has 2 at stage 3: converted to DeepSpeed's universal layout in" in z3.tail(400)
    d3 = _state_after_resume_equals_saved(run_dir, ref.run_dir, "step00000003")
    z1 = Run("elastic_zero", run_dir, "deepspeed", runs.args("--deepspeed.zero_stage", "1", *TWO_RANKS,
                                                             "--resume", "auto"), rank_env(runs.root)).ok()
    assert z1.summary()["start_step"] == 6 and z1.summary()["step"] == STEPS and z1.summary()["zero_stage"] == 1
    assert "at ZeRO stage 3, this run has 2 at stage 1: converted to DeepSpeed's universal layout in" in z1.tail(400)
    d1 = _state_after_resume_equals_saved(run_dir, run_dir, "step00000006")
    worst = _check_continuation(ref, [(z3, 2, [4, 5, 6]), (z1, 2, [7, 8])])

    fresh_dir = _from_checkpoint(runs, "fresh_adam", ref, "step00000003")
    _reset_adam(convert_to_universal(fresh_dir / "checkpoints", "step00000003")[0])
    fresh = Run("fresh_adam", fresh_dir, "torchrun", runs.args("--deepspeed.zero_stage", "3", *TWO_RANKS,
                                                               "--resume", "auto"),
                rank_env(runs.root, M6REC_FAULT="stop_at@5")).ok()
    ref_loss = {r["step"]: float.fromhex(r["loss"]) for r in ref.trace(0)}
    fresh_loss = {r["step"]: float.fromhex(r["loss"]) for r in fresh.trace(0)}
    elastic_loss = {r["step"]: float.fromhex(r["loss"]) for r in z3.trace(0)}
    assert _step_keys([fresh.trace(0), fresh.trace(1)], 5) == _step_keys([ref.trace(0), ref.trace(1)], 5)
    jump = (fresh_loss[5] - ref_loss[5]) / ref_loss[5]  # the first loss after the first update
    elastic = (elastic_loss[5] - ref_loss[5]) / ref_loss[5]
    print(f"ZeRO 2->3->1: state after resume differs from the saved by <= {max(d3, d1):.2e} (relative); worst "
          f"relative step-loss difference vs the uninterrupted ZeRO 2 run {worst:.2e}; step 5 after a resume at "
          f"step 3: elastic {elastic:+.2e}, new AdamW {jump:+.2e}; seconds (conversion, load): "
          f"{_logged_seconds(z3)} then {_logged_seconds(z1)}")
    assert max(d3, d1) <= 1e-6
    assert worst < LOSS_RTOL
    assert jump > 1e-3 > LOSS_RTOL > abs(elastic)  # the jump a new optimizer makes, and the resume does not


def test_one_rank_run_to_zero3(runs):
    """A run started on one rank (stage 0: torch's AdamW holds no state for a parameter that
    never had a gradient, here the image projection) -> 2 ranks at ZeRO 3 (DeepSpeed's
    per-parameter API; no conversion)."""
    ref = runs.get("one")
    run_dir = _from_checkpoint(runs, "elastic_13", ref, "step00000003")
    z3 = Run("elastic_13", run_dir, "torchrun", runs.args("--deepspeed.zero_stage", "3", *TWO_RANKS,
                                                          "--resume", "auto"),
             rank_env(runs.root, M6REC_FAULT="stop_at@5")).ok()
    assert z3.summary()["start_step"] == 3 and z3.summary()["step"] == 5
    d = _state_after_resume_equals_saved(run_dir, ref.run_dir, "step00000003")
    ref_loss = {r["step"]: float.fromhex(r["loss"]) for r in ref.trace(0)}
    worst = 0.0
    for s in (4, 5):
        assert _step_keys([z3.trace(0), z3.trace(1)], s) == _step_keys([ref.trace(0)], s)
        loss = next(float.fromhex(r["loss"]) for r in z3.trace(0) if r["step"] == s)
        worst = max(worst, abs(loss - ref_loss[s]) / ref_loss[s])
    print(f"1 rank -> ZeRO 3: state after resume differs from the saved by <= {d:.2e} (relative); worst relative "
          f"step-loss difference vs the uninterrupted 1-rank run {worst:.2e}")
    assert d <= 1e-6 and worst < LOSS_RTOL


def test_zero3_to_one_rank_and_a_killed_conversion_keeps_the_checkpoint(runs):
    """ZeRO 3 on 2 ranks -> one rank (runs as stage 0, same global batch); a SIGKILL while
    converting leaves the original checkpoint usable, and the next try converts and resumes
    with the state the ZeRO 3 run saved."""
    ref = runs.get("zero3")
    run_dir = _from_checkpoint(runs, "elastic_z", ref, "step00000003")
    ck = run_dir / "checkpoints"
    one = runs.args("--deepspeed.zero_stage", "3", *ONE_RANK_SAME_BATCH, "--resume", "auto")
    killed = Run("elastic_z", run_dir, "plain", one, rank_env(runs.root, M6REC_FAULT="kill_in_convert@3"))
    assert killed.wait() != 0
    assert not (ck / "step00000003_universal").exists() and (ck / ".step00000003_universal.tmp").is_dir()
    assert latest(run_dir) == "step00000003" and (ck / "step00000003" / "COMPLETE").is_file()
    again = Run("elastic_z", run_dir, "plain", one, rank_env(runs.root, M6REC_FAULT="stop_at@5")).ok()
    assert again.summary()["start_step"] == 3 and again.summary()["step"] == 5
    assert (ck / "step00000003_universal").is_dir() and not (ck / ".step00000003_universal.tmp").exists()
    d = _state_after_resume_equals_saved(run_dir, ref.run_dir, "step00000003")
    tr = read_trace(run_dir, 0)

    class Part:  # one rank's two micro-batches are the 2-rank run's two batches
        name = "elastic_z"

        @staticmethod
        def trace(rank):
            return tr if rank == 0 else []

    ref_tr = [ref.trace(0), ref.trace(1)]
    ref_loss = {r["step"]: float.fromhex(r["loss"]) for r in ref_tr[0]}
    worst = 0.0
    for s in (4, 5):
        assert _step_keys([Part.trace(0)], s) == _step_keys(ref_tr, s)
        loss = next(float.fromhex(r["loss"]) for r in tr if r["step"] == s)
        worst = max(worst, abs(loss - ref_loss[s]) / ref_loss[s])
    print(f"ZeRO 3 -> 1 rank: state after resume differs from the saved by <= {d:.2e} (relative); worst relative "
          f"step-loss difference vs the uninterrupted ZeRO 3 run {worst:.2e}; seconds (conversion, load) "
          f"{_logged_seconds(again)}")
    assert d <= 1e-6 and worst < LOSS_RTOL
