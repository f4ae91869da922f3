"""Training engine pieces that need no process group: the rendered DeepSpeed config,
the schedule, the skippable optimizer, the infilling transform, launcher
environments, checkpoint bookkeeping.  The multi-rank runs are in
test_train_multirank.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from m6rec.config import ConfigError, load_config
from m6rec.data.infill import infill_documents
from m6rec.model.batch import Batch
from m6rec.train import checkpoint as ckpt
from m6rec.train import distributed as DIST
from m6rec.train import ds_config as DSC
from m6rec.train import leftovers as LEFT
from m6rec.train import optim as OPT
from m6rec.train import resume as RES

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs" / "deepspeed").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_rendered_deepspeed_config(preset):
    cfg = load_config(preset, ["--data.stream.batch_size", "4", "--train.grad_accum", "2", "--train.precision", "bf16"])
    ds = DSC.deepspeed_config(cfg, world_size=8, on_gpu=True)
    stage = int(preset.stem[4])
    assert ds["zero_optimization"]["stage"] == stage == cfg.deepspeed.zero_stage
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 64)
    # bf16: DeepSpeed's bf16 mode under ZeRO; torch autocast over fp32 weights without it
    assert ds["bf16"]["enabled"] == (stage > 0) and ("torch_autocast" in ds) == (stage == 0)
    assert not ds["fp16"]["enabled"] and ds["gradient_clipping"] == cfg.train.grad_clip
    assert ("offload_optimizer" in ds["zero_optimization"]) == ("offload" in preset.stem)
    assert "optimizer" not in ds and "scheduler" not in ds  # the engine owns both (one source of truth)
    json.dumps(ds)
    if "offload" in preset.stem:
        with pytest.raises(ConfigError, match="offload_optimizer"):
            DSC.deepspeed_config(cfg, world_size=8, on_gpu=False)
    else:
        assert DSC.deepspeed_config(cfg, 8, on_gpu=False) == ds


def test_fp16_needs_a_gpu_and_pretrain_preset_uses_zero2():
    cfg = load_config(ROOT / "configs/pretrain/tiny.yaml", ["--train.precision", "fp16"])
    assert cfg.deepspeed.zero_stage == 2
    with pytest.raises(ConfigError, match="'train.precision': 'fp16' needs a GPU"):
        DSC.deepspeed_config(cfg, 1, on_gpu=False)
    assert DSC.deepspeed_config(cfg, 1, on_gpu=True)["fp16"]["enabled"]


def test_lr_schedule():
    cfg = load_config(None, ["--train.lr", "1.0e-3", "--train.min_lr", "1.0e-4", "--train.warmup_steps", "4",
                             "--train.steps", "104"])
    lrs = [OPT.lr_at(cfg, s) for s in range(110)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[54] == pytest.approx(5.5e-4) and lrs[104] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4)


def test_skippable_optimizer_moves_nothing():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = OPT.skippable(torch.optim.AdamW)([w], lr=0.1)
    assert isinstance(opt, torch.optim.AdamW) and type(opt).__name__ == "AdamW"
    before = w.detach().clone()
    w.grad = torch.full_like(w, float("nan"))
    opt.skip_update = True
    opt.step()
    assert torch.equal(w, before) and not opt.state  # no moment, no step count
    opt.skip_update = False
    w.grad = torch.ones_like(w)
    opt.step()
    assert not torch.equal(w, before) and opt.state[w]["step"] == 1


SPECIAL = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|context|>": 3, "<|predict|>": 4, "<|item|>": 5, "<|image|>": 6}


def _doc_batch():
    """Row 0: doc 0 = bos ctx item(10 11) predict item(20 21) item(6 6 30) item(40 41 42) eos, doc 1 (truncated), pad."""
    doc0 = [1, 3, 5, 10, 11, 4, 5, 20, 21, 5, 6, 6, 30, 5, 40, 41, 42, 2]
    prefix0 = [True] * 5 + [False] * 13
    doc1 = [1, 3, 5, 50, 4, 5, 60, 61]  # no eos: cut by truncation
    T = 30
    ids = torch.zeros(1, T, dtype=torch.long)
    ids[0, :18], ids[0, 18:26] = torch.tensor(doc0), torch.tensor(doc1)
    doc = torch.full((1, T), -1)
    doc[0, :18], doc[0, 18:26] = 0, 1
    prefix = torch.zeros(1, T, dtype=torch.bool)
    prefix[0, :18], prefix[0, 18:22] = torch.tensor(prefix0), True
    labels = torch.full((1, T), -100)
    labels[0, 5:17] = ids[0, 6:18]
    labels[0, 22:25] = ids[0, 23:26]
    return {"input_ids": ids, "labels": labels, "document_ids": doc, "prefix_mask": prefix,
            "position_ids": torch.zeros(1, T, dtype=torch.long),
            "image_positions": torch.tensor([[0, 10]]), "image_patches": torch.zeros(1, 2, 12)}


def test_infill_documents():
    seen = set()
    for seed in range(40):
        b = _doc_batch()
        before = {k: v.clone() for k, v in b.items()}
        n = infill_documents(b, 1.0, np.random.default_rng(seed), SPECIAL)
        assert n == 1  # doc 1 has no eos: left alone, like the padding
        for k in before:
            assert torch.equal(b[k][0, 18:], before[k][0, 18:]) or k == "image_positions", k
        ids = b["input_ids"][0, :18].tolist()
        # Targets without an image slot: (20 21) or (40 41 42); never the context item or the imaged one.
        if ids[-3:] == [4, 20, 21]:
            assert ids == [1, 3, 5, 10, 11, 4, 5, 5, 6, 6, 30, 5, 40, 41, 42, 4, 20, 21]
            assert b["image_positions"].tolist() == [[0, 8]]  # C moved left by len(item) - 1 = 2
            cut = 15
        else:
            assert ids == [1, 3, 5, 10, 11, 4, 5, 20, 21, 5, 6, 6, 30, 5, 4, 40, 41, 42]
            assert b["image_positions"].tolist() == [[0, 10]]
            cut = 14
        seen.add(cut)
        assert b["prefix_mask"][0, :18].tolist() == [True] * cut + [False] * (18 - cut)
        assert b["labels"][0, :18].tolist() == [-100] * cut + ids[cut + 1:] + [-100]
        assert len(ids) == 18 and b["document_ids"][0, :18].eq(0).all()
    assert seen == {14, 15}
    b = _doc_batch()
    assert infill_documents(b, 0.0, np.random.default_rng(0), SPECIAL) == 0
    assert torch.equal(b["input_ids"], _doc_batch()["input_ids"])


def test_infill_keeps_the_model_loss_on_the_item(tmp_path):
    """The model sees the hole bidirectionally and is scored on the item's text only."""
    from m6rec.model import build_model
    from m6rec.model.args import ModelArgs

    b = _doc_batch()
    infill_documents(b, 1.0, np.random.default_rng(1), SPECIAL)
    b["position_ids"] = torch.where(b["document_ids"] >= 0, torch.arange(30) - torch.tensor(
        [0] * 18 + [18] * 8 + [26] * 4), 0)
    model = build_model(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=32, ffn_hidden=64))
    out = model(Batch.of(b, image_patches=None, image_positions=None))
    n_item = int((b["labels"][0, :18] != -100).sum())
    assert out.n_tokens == n_item + 3 and torch.isfinite(out.loss)  # + doc 1's own targets


def test_launcher_env_from_srun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        DIST.launcher_env()
    monkeypatch.setenv("MASTER_ADDR", "node01")
    env = DIST.launcher_env()
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node01", "MASTER_PORT": "29500"}
    assert DIST.local_world_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's wins
    assert DIST.local_world_size() == 2


def test_fault_spec(monkeypatch):
    monkeypatch.setenv("M6REC_FAULT", "nan_loss@3,4;crash_in_save@6")
    assert ckpt.fault_steps("nan_loss", rank=0) == {3, 4} and ckpt.fault_steps("crash_in_save", rank=1) == {6}
    assert ckpt.fault_steps("nan", rank=0) == set()
    monkeypatch.setenv("M6REC_FAULT_RANK", "1")
    assert ckpt.fault_steps("nan_loss", rank=0) == set() and ckpt.fault_steps("nan_loss", rank=1) == {3, 4}


def test_checkpoint_bookkeeping(tmp_path):
    d = tmp_path / "checkpoints"
    for step, complete in [(10, True), (20, True), (30, False), (40, True), (50, False)]:
        (d / ckpt.tag_for(step)).mkdir(parents=True)
        if complete:
            (d / ckpt.tag_for(step) / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 4}))
    (d / "latest").write_text("step00000050")  # names an incomplete tag: the newest complete one wins
    assert ckpt.latest_complete(d) == "step00000040"
    (d / "latest").write_text("step00000020")
    assert ckpt.latest_complete(d) == "step00000020"  # a complete `latest` is taken as is
    assert ckpt.read_meta(d, "step00000010") == {"step": 10, "world_size": 4}
    (d / "step00000010" / ckpt.COMPLETE).write_text("10\n")  # the old marker format
    (d / "step00000010" / "m6rec_rank0.pt").write_bytes(b"")
    assert ckpt.read_meta(d, "step00000010") == {"step": 10, "world_size": 1}
    ckpt._prune(d, keep_last=2, keep="step00000040")
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step00000020", "step00000040", "step00000050"]

    from m6rec.train.run_dir import resolve_checkpoint

    assert resolve_checkpoint(tmp_path) == (d, "step00000020")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_checkpoint(d / "step00000050")



def test_resume_plan_takes_every_world_size_and_stage(tmp_path):
    """Saved (world, stage) x this run's: every layout resumes; another model shape is refused."""
    from m6rec.model.args import ModelArgs

    cfg = load_config(ROOT / "configs" / "pretrain" / "tiny.yaml")
    margs = ModelArgs.from_config(cfg)
    d = tmp_path / "checkpoints"
    (d / "step00000003").mkdir(parents=True)

    def plan(saved_world, saved_stage, world, stage, **shape):
        meta = {"step": 3, "world_size": saved_world, "zero_stage": saved_stage,
                "model_args": {**margs.to_dict(), **shape}}
        (d / "step00000003" / ckpt.COMPLETE).write_text(json.dumps(meta))
        c = load_config(ROOT / "configs" / "pretrain" / "tiny.yaml", ["--deepspeed.zero_stage", str(stage)])
        return RES.plan_resume(d, "auto", c, world, margs)["mode"]

    assert plan(2, 2, 2, 2) == "same"
    assert plan(2, 2, 2, 3) == plan(2, 3, 2, 1) == plan(2, 3, 3, 3) == plan(4, 1, 3, 2) == "universal"
    assert plan(2, 2, 1, 2) == plan(2, 3, 1, 3) == "to_plain"  # one rank runs as stage 0
    assert plan(1, 0, 2, 3) == "from_plain" and plan(1, 0, 2, 0) == "plain"
    with pytest.raises(ConfigError, match=r"another model shape \(n_layers: saved 3, this run 2\)"):
        plan(2, 2, 2, 3, n_layers=3)
    # found from the models themselves: of two differing settings, the one that changes a shape is
    # named; settings that change no shape resume
    with pytest.raises(ConfigError, match=r"another model shape \(ffn_hidden: saved None, this run 384\)"):
        plan(2, 2, 2, 2, ffn_hidden=None, ffn_multiple_of=512)  # a 512-wide SwiGLU, not 384
    assert plan(2, 2, 2, 2, ffn_hidden=None, ffn_multiple_of=128) == "same"  # the Llama rule gives 384 too
    assert plan(2, 2, 2, 2, resid_dropout=0.3, item_proj_layers=3) == "same"  # no item vectors: no projection


def test_stage3_universal_files_and_own_step_tensors(tmp_path):
    """A ZeRO 3 source's universal files are rewritten as the ZeRO 1/2 loader reads them, and
    after DeepSpeed's ZeRO 3 universal load each sub-group gets its own step tensor."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM, PARAM_SHAPES

    src, zero = tmp_path / "step00000003", tmp_path / "uni" / "zero"
    src.mkdir()
    torch.save({PARAM_SHAPES: [{"w": torch.Size([2, 3])}, {"b": torch.Size([4])}]},
               src / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    for name, n in (("w", 6), ("b", 4)):
        (zero / name).mkdir(parents=True)
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            torch.save(torch.arange(n, dtype=torch.float32), zero / name / f"{key}.pt")
    big = torch.zeros(10)  # rank 0's shard, which ds_to_universal copies in
    torch.save({OPTIMIZER_STATE_DICT: {"state": {0: {"step": torch.tensor(3.0), "exp_avg": big},
                                                  1: {"step": torch.tensor(3.0), "exp_avg": big}},
                                        "param_groups": [{"weight_decay": 0.1}, {"weight_decay": 0.0}]},
                "fp32_flat_groups": [big]}, zero / "optimizer_state.pt")
    ckpt._both_stages_global_state(zero / "optimizer_state.pt")
    ckpt._stage3_files_as_stage12(src, zero)
    w = torch.load(zero / "w" / "exp_avg.pt", weights_only=False)
    assert w[PARAM].shape == (2, 3) and torch.equal(w[PARAM].flatten(), torch.arange(6.0))
    assert float(torch.load(zero / "b" / "step.pt", weights_only=False)) == 3.0
    sd = torch.load(zero / "optimizer_state.pt", weights_only=False)
    assert "fp32_flat_groups" not in sd and sd[OPTIMIZER_STATE_DICT]["state"] == {0: {"step": 3.0}, 1: {"step": 3.0}}
    assert sd["param_groups"][1]["weight_decay"] == 0.0 and "ds_version" in sd

    shared = torch.tensor(3.0)  # what DeepSpeed 0.19.8's stage-3 universal load leaves
    flats = [torch.zeros(2), torch.zeros(3)]
    base = SimpleNamespace(state={f: {"step": shared} for f in flats})
    ckpt.own_step_tensors(SimpleNamespace(optimizer=SimpleNamespace(optimizer=base)))
    a, b = (base.state[f]["step"] for f in flats)
    assert a is not b and float(a) == float(b) == 3.0
    a.add_(1)  # torch's AdamW increments in place, once per sub-group
    assert float(b) == 3.0

@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_pretrain_presets_render(preset):
    cfg = load_config(preset)
    ds = DSC.deepspeed_config(cfg, world_size=8, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
    assert ds["train_batch_size"] == 8 * cfg.data.stream.batch_size * cfg.train.grad_accum
    assert cfg.train.warmup_steps < cfg.train.steps and cfg.train.run_dir.startswith("runs/")


def test_truncation_is_warned_before_training(caplog):
    from m6rec.train.trainer import _warn_truncation

    manifest = {"splits": {"train": {"shards": [{"lengths": [100, 300]}]}, "valid": {"shards": [{"lengths": [280]}]}}}
    with caplog.at_level("WARNING", logger="m6rec.train"):
        _warn_truncation(manifest, 256, rank=0)
    text = caplog.text
    assert "1 of 2 train samples are longer than data.stream.seq_len=256" in text
    assert "1 of 1 valid samples" in text and "validation loss may be NaN" in text
    caplog.clear()
    _warn_truncation(manifest, 512, rank=0)
    assert not caplog.text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resumed_run_logs_each_step_once(tmp_path):
    """A run dies at step 4, after logging it, with its last checkpoint at step 2; ``--resume auto``
    trains steps 3-6.  metrics.jsonl then has each step once (the re-run's rows), the interrupted
    run's rows of steps 3-4 are in metrics.superseded.jsonl, and the resumed W&B folder is a rewind
    to step 2 holding steps 3-6.  The death is M6REC_FAULT=crash_in_save@4 (the processes exit while
    writing step 4's checkpoint, so `latest` stays on step 2): a SIGKILL there, without the race."""
    import os
    import subprocess
    import sys

    from helpers.wandb_files import read_wandb_records, wandb_history

    from m6rec.cli import main

    data = tmp_path / "data"
    assert main(["prepare", "--config", "configs/pretrain/tiny.yaml", "--data.output", str(data)]) == 0
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "M6REC_FAULT_RANK")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               **{v: str(tmp_path / "wandb-home" / v.lower()) for v in
                  ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")})
    cmd = [sys.executable, "launch/train.py", "--config", "configs/pretrain/tiny.yaml", "--data.output", str(data),
           "--data.stream.batch_size", "2", "--data.stream.num_workers", "0", "--train.steps", "6",
           "--train.warmup_steps", "2", "--train.log_every", "1", "--train.eval_every", "0",
           "--train.save_every", "2", "--train.peak_flops", "1.0e+11", "--train.run_dir", str(run_dir)]

    def rows(name: str) -> list[dict]:
        return [json.loads(ln) for ln in (run_dir / name).read_text().splitlines()]

    first = subprocess.run(cmd, cwd=ROOT, env=dict(env, M6REC_FAULT="crash_in_save@4"), capture_output=True,
                           text=True, timeout=240)
    assert first.returncode != 0 and (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000002", \
        first.stdout[-3000:] + first.stderr[-3000:]
    interrupted = rows("metrics.jsonl")
    assert [r["step"] for r in interrupted] == [1, 2, 3, 4]

    again = subprocess.run([*cmd, "--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed at step 2: 2 line(s) of metrics.jsonl (steps 3-4)" in again.stdout
    final = rows("metrics.jsonl")
    assert [r["step"] for r in final] == [1, 2, 3, 4, 5, 6]  # each step once
    assert final[:2] == interrupted[:2] and all(r["time"] > interrupted[-1]["time"] for r in final[2:])
    aside = rows("metrics.superseded.jsonl")
    assert [{k: v for k, v in r.items() if k != "superseded"} for r in aside] == interrupted[2:]
    assert all(r["superseded"]["resume_step"] == 2 for r in aside)

    run_id = (run_dir / "wandb_id").read_text().strip()
    first_w, resumed_w = sorted(d for d in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*") if d.is_dir())
    # W&B writes its .wandb file every 15 s (x_transaction_log_flush_interval): a process that dies
    # sooner leaves it with its 7-byte header only, as here, so the interrupted folder holds some of
    # steps 1-4 or none.  metrics.jsonl has them all.
    assert set(wandb_history(read_wandb_records(first_w / f"run-{run_id}.wandb"))) <= {1, 2, 3, 4}
    records = read_wandb_records(resumed_w / f"run-{run_id}.wandb")
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.branch_point.run, run.branch_point.metric, run.branch_point.value) == (run_id, "_step", 2.0)
    history = wandb_history(records)
    assert sorted(history) == [3, 4, 5, 6]
    assert [history[s]["loss"] for s in (3, 4, 5, 6)] == pytest.approx([r["loss"] for r in final[2:]])


def test_clean_shm_removes_only_unmapped_deepspeed_buffers(capsys):
    """`m6rec clean-shm` on real /dev/shm files: one left by a dead run, one mapped by a live process."""
    import mmap
    import os
    import uuid

    from m6rec.cli import main

    tag = uuid.uuid4().hex[:8]
    stale = Path("/dev/shm") / f"{LEFT.SHM_BUFFER_PREFIX}_{os.getuid()}_127.0.0.1_test{tag}_0"
    live = stale.with_name(stale.name[:-1] + "1")
    for f in (stale, live):
        f.write_bytes(b"\0" * 4096)
    try:
        with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):  # as a running rank holds its buffer
            assert stale in LEFT.stale_shm_buffers() and live not in LEFT.stale_shm_buffers()
            assert main(["clean-shm", "--dry-run"]) == 0
            assert stale.exists() and "would remove" in capsys.readouterr().out
            assert main(["clean-shm"]) == 0
            assert not stale.exists() and live.exists()
            assert "removed" in capsys.readouterr().out
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)


def test_stale_jit_build_locks_are_named_and_cleaned(tmp_path, monkeypatch, capsys):
    """A DeepSpeed JIT build killed mid-way leaves its lock file, and every later run that needs the op
    waits for it silently.  Real lock files in a real TORCH_EXTENSIONS_DIR: one left by a killed build,
    one held open by a live process (as torch holds it while it builds)."""
    import os
    import subprocess
    import sys

    from m6rec.cli import main

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert LEFT.torch_extensions_root() == tmp_path and LEFT.stale_build_locks() == []
    # torch's layouts: <TORCH_EXTENSIONS_DIR>/<op>/lock, <default root>/<python>_<device>/<op>/lock
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    held = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    for f in (stale, held):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"")
    builder = subprocess.Popen([sys.executable, "-c", f"import os, sys, time; fd = os.open({str(held)!r}, os.O_RDONLY); "
                                "print('holding', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "holding"
        assert LEFT.stale_build_locks() == [stale]
        assert LEFT.warn_stale_build_locks() == [stale]
        err = capsys.readouterr().err
        assert str(stale) in err and "deepspeed_shm_comm" in err and "m6rec clean-shm" in err
        assert str(held) not in err
        assert main(["clean-shm", "--dry-run"]) == 0
        assert stale.exists() and f"would remove stale JIT build lock {stale}" in capsys.readouterr().out
        assert main(["clean-shm"]) == 0
        assert not stale.exists() and held.exists()
        assert f"removed stale JIT build lock {stale}" in capsys.readouterr().out
    finally:
        builder.kill()
        builder.wait()
    # once the builder is gone, its lock is a leftover too
    assert LEFT.stale_build_locks() == [held]
    assert os.path.exists(held)


def test_cpu_ranks_start_without_a_compiler_and_one_rank_builds_nothing(tmp_path):
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce at init.  Real processes,
    a fresh TORCH_EXTENSIONS_DIR: one rank builds nothing (no compiler needed, no compile wait); two
    ranks with no C++ compiler (CXX pointing nowhere; before, the build failed and took
    init_distributed down) start, say why the op is off, and all-reduce correctly through gloo."""
    import os
    import subprocess
    import sys

    assert DIST.cpu_comm_op_off_reason({"WORLD_SIZE": "1"}) == "one rank"
    assert DIST.cpu_comm_op_off_reason({"WORLD_SIZE": "2", "CXX": "/nowhere/c++"}) == "no C++ compiler ('/nowhere/c++' not found)"
    if DIST.shutil.which("c++"):
        assert DIST.cpu_comm_op_off_reason({"WORLD_SIZE": "2"}) is None

    script = ("import torch, torch.distributed as dist\n"
              "from m6rec.train.distributed import init_distributed\n"
              "rank, world, _ = init_distributed()\n"
              "x = torch.tensor([float(rank + 1)])\n"
              "dist.all_reduce(x)\n"
              "print('sum', world, x.item(), flush=True)\n"
              "dist.destroy_process_group()\n")  # as m6rec's entry does: gloo aborts at exit otherwise

    def run(world: int, **extra) -> list[subprocess.CompletedProcess]:
        port = str(DIST.free_port())
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       TORCH_EXTENSIONS_DIR=str(tmp_path / f"ext{world}"), OMP_NUM_THREADS="1", **extra)
            procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        return [subprocess.CompletedProcess(p.args, p.wait(timeout=240), *p.communicate()) for p in procs]

    (one,) = run(1)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "sum 1 1.0" in one.stdout
    assert not (tmp_path / "ext1" / DIST.SHM_COMM_OP).exists()  # nothing compiled
    ranks = run(2, CXX=str(tmp_path / "no-such-compiler"))
    for r in ranks:
        assert r.returncode == 0, r.stderr[-2000:]
        assert "sum 2 3.0" in r.stdout
    assert "no C++ compiler" in ranks[0].stderr and "gloo does the all-reduce" in ranks[0].stderr
    assert "no C++ compiler" not in ranks[1].stderr  # said once per machine
    assert not (tmp_path / "ext2" / DIST.SHM_COMM_OP).exists()
