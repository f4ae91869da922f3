"""One training job as two "nodes" on this machine, then resumed on one (issue 12, item 4).

The multi-node recipe of docs/cluster.md without ssh, exactly as users run it on
two machines -- a two-line hostfile from ``launch/hostfile.py`` and one ``deepspeed``
launcher per node::

    python launch/hostfile.py --slots 1 127.0.0.1 127.0.0.2 -o hostfile
    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr 127.0.0.1 --master_port P launch/train.py ...
    deepspeed --hostfile hostfile --no_ssh --node_rank 1 --master_addr 127.0.0.1 --master_port P launch/train.py ...

Each launcher starts one rank (world size 2, one local rank each: LOCAL_SIZE=1, so
DeepSpeed's CPU shared-memory collectives stay off and every collective goes through
gloo's TCP transport, as between two machines).  The job trains ZeRO 2, checkpoints
and exits; then the same recipe with a one-line hostfile (one node, one rank) resumes
it with ``--resume auto`` and the same global batch (grad_accum 2, 2 readers).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.runs import free_port, jsonl, rank_env, read_trace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
NODES = ["127.0.0.1", "127.0.0.2"]  # the node names of the hostfile; --no_ssh only counts them
STEPS, MORE = 4, 2
ARGS = ["--config", "configs/pretrain/tiny.yaml", "--data.stream.batch_size", "2", "--train.warmup_steps", "2",
        "--train.log_every", "1", "--train.eval_every", "4", "--train.eval_batches", "2", "--train.save_every", "2",
        "--train.peak_flops", "1.0e+11", "--deepspeed.zero_stage", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from m6rec.cli import main

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # DeepSpeed JIT-builds its CPU comm op once (cached), not in two launchers at once
    out = tmp_path_factory.mktemp("data") / "tiny"
    assert main(["prepare", "--config", "configs/pretrain/tiny.yaml", "--data.output", str(out)]) == 0
    return out


def _hostfile(path: Path, hosts: list[str]) -> Path:
    subprocess.run([sys.executable, "launch/hostfile.py", "--slots", "1", *hosts, "-o", str(path)], cwd=ROOT,
                   check=True)
    return path


def _launch(hostfile: Path, node_rank: int, port: int, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
           "--master_addr", NODES[0], "--master_port", str(port), "launch/train.py", *args]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 420) -> None:
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                      for log in logs)
    assert codes == [0] * len(procs), f"exit codes {codes}\n{tails}"


def test_two_nodes_train_checkpoint_and_resume_on_one(data_dir, tmp_path):
    run = tmp_path / "run"
    args = [*ARGS, "--data.output", str(data_dir), "--train.run_dir", str(run)]
    env = rank_env(tmp_path)

    # One job, two nodes, one rank each.
    two = _hostfile(tmp_path / "hostfile", NODES)
    assert two.read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    port = free_port()
    logs = [tmp_path / f"node{k}.log" for k in (0, 1)]
    procs = [_launch(two, k, port, [*args, "--train.steps", str(STEPS), "--data.stream.num_workers", "1"], env,
                     logs[k]) for k in (0, 1)]
    _finish(procs, logs)
    for k, log in enumerate(logs):
        text = log.read_text(errors="replace")
        assert f"nnodes=2, num_local_procs=1, node_rank={k}" in text and "dist_world_size=2" in text
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["step"], summary["world_size"], summary["zero_stage"]) == (STEPS, 2, 2)
    t0, t1 = read_trace(run, 0), read_trace(run, 1)
    assert [r["step"] for r in t0] == [r["step"] for r in t1] == list(range(1, STEPS + 1))
    keys = {0: [], 1: []}
    for a, b in zip(t0, t1):
        assert a["loss"] == b["loss"]  # the step's loss, all-reduced between the nodes
        assert a["params"] == b["params"]  # ZeRO 2 keeps the weights whole on both: the same update
        keys[0] += [k for mb in a["keys"] for row in mb for k in row]
        keys[1] += [k for mb in b["keys"] for row in mb for k in row]
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])  # each node read its own samples
    assert float.fromhex(t0[-1]["loss"]) < float.fromhex(t0[0]["loss"])  # it learns
    assert [r["step"] for r in jsonl(run) if "val_loss" in r] == [STEPS]  # validation over both nodes too
    tag = run / "checkpoints" / f"step{STEPS:08d}"
    meta = json.loads((tag / "COMPLETE").read_text())
    assert (meta["world_size"], meta["zero_stage"]) == (2, 2)
    assert sorted(p.name for p in tag.iterdir() if p.name != "COMPLETE") == [
        "m6rec_rank0.pt", "m6rec_rank1.pt", "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # The same job resumed on one node, one rank, the same global batch.
    one = _hostfile(tmp_path / "hostfile1", NODES[:1])
    log1 = tmp_path / "one_node.log"
    _finish([_launch(one, 0, free_port(), [*args, "--train.steps", str(STEPS + MORE), "--data.stream.num_workers",
                                            "2", "--train.grad_accum", "2", "--resume", "auto"], env, log1)], [log1])
    text = log1.read_text(errors="replace")
    assert "nnodes=1, num_local_procs=1, node_rank=0" in text
    assert "converted to DeepSpeed's universal layout in" in text
    assert f"resumed from {tag} at step {STEPS}: written by 2 rank(s) at ZeRO stage 2, continued on 1" in text
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["start_step"], summary["step"], summary["world_size"]) == (STEPS, STEPS + MORE, 1)
    assert [r["step"] for r in jsonl(run) if "loss" in r] == list(range(1, STEPS + MORE + 1))  # each step once

    # The weights right after the load are the two nodes' saved ones.
    from safetensors.torch import load_file

    from m6rec.train.export import export

    saved = load_file(export(tag, "fp32", tmp_path / "saved.safetensors"))
    live = load_file(run / "trace" / f"resumed_step{STEPS:08d}.safetensors")
    assert sorted(saved) == sorted(live)
    worst = max(float((saved[k] - live[k]).abs().max()) for k in saved)
    assert worst <= 1e-6
    # The data went on: the one node's steps took samples neither node had taken.
    resumed = [r for r in read_trace(run, 0) if r["step"] > STEPS]
    assert [len(r["keys"]) for r in resumed] == [2] * MORE  # 2 micro-batches a step: the 2 nodes' batch
    after = [k for r in resumed for mb in r["keys"] for row in mb for k in row]
    assert after
    seen = keys[0] + keys[1] + after
    assert len(seen) == len(set(seen))
    print(f"two nodes: {STEPS} steps, loss {float.fromhex(t0[0]['loss']):.4f} -> {float.fromhex(t0[-1]['loss']):.4f}; "
          f"resumed on one node to step {STEPS + MORE}, weights after the load differ by {worst:.1e}")
