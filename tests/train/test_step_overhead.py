"""Issue 10 on the CPU: the default optimizer builds no DeepSpeed op, clips and skips on the
device, DeepSpeed is asked for nothing a rank cannot use, the arch list DeepSpeed's JIT
builder trips on is repaired, and one engine step reads the device back at most once
(counted by the same counter `m6rec bench train` uses)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from m6rec.bench.common import synthetic_batch
from m6rec.bench.overhead import (
    OVERHEAD_MODEL,
    HostSyncCounter,
    bench_overhead,
    device_tensors,
)
from m6rec.config import ConfigError, load_config
from m6rec.model import ModelArgs, build_model
from m6rec.train import distributed as DIST
from m6rec.train import ds_config as DSC
from m6rec.train import optim as OPT
from m6rec.train import step as ST

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(ROOT / "configs").glob("*/*.yaml"), ROOT / "m6rec" / "configs" / "quickstart.yaml"])


def tiny():
    torch.manual_seed(0)
    return build_model(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, ffn_hidden=64, max_seq_len=64))


@pytest.mark.parametrize("preset", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_configs_build_no_deepspeed_op(preset, monkeypatch):
    """On a GPU node every shipped config's optimizer is torch's fused AdamW: no nvcc, no ninja,
    no TORCH_CUDA_ARCH_LIST.  Any DeepSpeed op build (JIT or prebuilt load) fails the test."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    built = []
    monkeypatch.setattr(OpBuilder, "load", lambda self, *a, **k: built.append(self.name))
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, *a, **k: built.append(self.name))
    cfg = load_config(preset)
    assert cfg.train.optimizer == "adamw"
    opt = OPT.build_optimizer(cfg, tiny(), on_gpu=True)
    assert isinstance(opt, OPT.StepOnDevice) and opt.defaults["fused"] and not built
    ds = DSC.deepspeed_config(cfg, 8, on_gpu=True, optimizer_clips=DSC.clips_on_device(cfg, 8))
    assert "optimizer" not in ds and ds["timers"]["throughput"] == {"enabled": False, "synchronized": False}
    if cfg.deepspeed.offload_optimizer:  # torch's AdamW steps the offloaded state: DeepSpeed must allow it
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_deepspeed_jit_optimizers_stay_available_by_name():
    cfg = load_config(None, ["--train.optimizer", "fused_adam"])
    with pytest.raises(ConfigError, match="'train.optimizer': 'fused_adam' is a DeepSpeed CUDA op"):
        OPT.build_optimizer(cfg, tiny(), on_gpu=False)
    cfg = load_config(None, ["--train.optimizer", "cpu_adam", "--deepspeed.zero_stage", "2"])
    with pytest.raises(ConfigError, match="deepspeed.offload_optimizer: true"):
        OPT.build_optimizer(cfg, tiny(), on_gpu=True)
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(None, ["--train.optimizer", "lamb"])


@pytest.mark.parametrize("value,want", [
    ("9.0a", "9.0"),  # what crashed the first GPU launch: int('0a')
    ("8.0;9.0a+PTX", "9.0"),
    (None, "9.0"),
    ("", "9.0"),
    ("8.0;9.0", None),  # parseable: left alone
    ("9.0+PTX 10.0", None),
])
def test_cuda_arch_list_repaired_for_deepspeed_jit(value, want, monkeypatch):
    if value is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    changed = OPT._cuda_arch_list_for_jit(capabilities=[(9, 0), (9, 0)])
    if want is None:
        assert changed is None and os.environ["TORCH_CUDA_ARCH_LIST"] == value
    else:
        assert changed == ((value or "unset"), want) and os.environ["TORCH_CUDA_ARCH_LIST"] == want


def test_step_on_device_equals_clip_then_adamw_and_skips_on_the_flag():
    """Clipping inside the step equals clip_grad_norm_ + fused AdamW; the non-finite flag leaves
    parameters, moments and step counts untouched -- without reading it on the host."""
    torch.manual_seed(0)
    ref_w = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    w = [torch.nn.Parameter(p.detach().clone()) for p in ref_w]
    ref = torch.optim.AdamW([{"params": ref_w[:1], "weight_decay": 0.1}, {"params": ref_w[1:], "weight_decay": 0.0}],
                            lr=0.05, fused=True)
    opt = OPT.StepOnDevice([{"params": w[:1], "weight_decay": 0.1}, {"params": w[1:], "weight_decay": 0.0}],
                         lr=0.05, fused=True)
    opt.clip_norm, opt.measure_norm = 1.0, True
    for step in range(3):
        grads = [torch.randn_like(p) * 5 for p in ref_w]
        for p, q, g in zip(ref_w, w, grads):
            p.grad, q.grad = g.clone(), g.clone()
        want_norm = torch.nn.utils.clip_grad_norm_(ref_w, 1.0)
        ref.step()
        opt.shared_loss = torch.tensor(2.5)
        with HostSyncCounter(device_tensors(torch.nn.ParameterList(w), opt)) as c:
            opt.step()
        assert c.total == 0, c.syncs
        torch.testing.assert_close(opt.grad_norm, want_norm)
        for p, q in zip(ref_w, w):
            torch.testing.assert_close(q, p)
    before = [p.detach().clone() for p in w]
    moments = [opt.state[p]["exp_avg"].clone() for p in w]
    for p in w:
        p.grad = torch.ones_like(p)
    opt.shared_loss = torch.tensor(float("nan"))  # a non-finite loss on some rank
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(w, before))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(w, moments))
    assert all(int(opt.state[p]["step"]) == 3 for p in w)
    opt.shared_loss = torch.tensor(2.5)
    w[0].grad = torch.full_like(w[0], float("inf"))  # a non-finite gradient skips by itself
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(w, before)) and int(opt.state[w[0]]["step"]) == 3


def test_one_rank_asks_deepspeed_for_nothing_it_cannot_use():
    cfg = load_config(ROOT / "configs/pretrain/base.yaml")  # ZeRO 2, overlap_comm, bf16
    one = DSC.deepspeed_config(cfg, 1, on_gpu=True, optimizer_clips=DSC.clips_on_device(cfg, 1))
    assert DSC.effective_zero_stage(cfg, 1) == 0 and one["zero_optimization"]["stage"] == 0
    assert one["zero_optimization"]["overlap_comm"] is False
    assert one["gradient_clipping"] == 0.0 and one["bf16"]["check_grad_overflow"] is False  # StepOnDevice clips
    many = DSC.deepspeed_config(cfg, 8, on_gpu=True, optimizer_clips=DSC.clips_on_device(cfg, 8))
    assert many["zero_optimization"]["stage"] == 2 and many["zero_optimization"]["overlap_comm"] is True
    assert many["gradient_clipping"] == cfg.train.grad_clip  # ZeRO 2 steps partitions: DeepSpeed clips
    off = load_config(ROOT / "configs/deepspeed/zero2_offload.yaml")
    assert DSC.effective_zero_stage(off, 1) == 2  # offload is a memory choice: kept on one rank


def test_counter_counts_device_reads_only():
    """The proxy itself: device-derived reads count, host (loader) math does not."""
    w = torch.nn.Parameter(torch.randn(4))
    host = torch.arange(6)
    with HostSyncCounter([w]) as c:
        (host > 2).sum().item()
        host.tolist()
        y = w * 2
        y.sum().item()
        y.tolist()
        (y > 0).nonzero()
        y[y > 0]
        y.detach().cpu()
    assert dict(c.syncs) == {"item": 1, "tolist": 1, "nonzero": 1, "index(bool)": 1, "cpu": 1}


def test_engine_step_reads_the_device_once(monkeypatch):
    """A real DeepSpeed engine (one rank, gloo; ZeRO 2 configured, run as stage 0): one
    non-logging step of the trainer reads back exactly one thing (the previous step's vector)."""
    import deepspeed
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(DIST.free_port())).items():
        monkeypatch.setenv(k, v)
    if not dist.is_initialized():  # left up: DeepSpeed caches its groups for the process
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, {"deepspeed": {"zero_stage": 2}, "data": {"stream": {"seq_len": 64, "batch_size": 2}},
                             "train": {"grad_clip": 1.0}})
    torch.manual_seed(0)
    model = build_model(ModelArgs(**{**OVERHEAD_MODEL, "n_layers": 4}))
    engine, opt, runner, ds_config = ST.build_engine(cfg, model, 1, torch.device("cpu"))
    assert engine.zero_optimization_stage() == 0 and ds_config["gradient_clipping"] == 0  # StepOnDevice clips
    batch = synthetic_batch(512, 2, 64, seed=0)
    prev = runner.run(0, 1e-3, [batch])
    with HostSyncCounter(device_tensors(engine.module, engine.optimizer) + [prev.host]) as c:
        now = runner.run(1, 1e-3, [batch])
        v = prev.values()
    assert c.total == 1 and dict(c.syncs) == {"tolist": 1}, c.syncs
    assert v["nonfinite"] == 0 and v["tokens"] == 128 and v["loss_sum"] > 0
    assert now.values()["loss_sum"] < v["loss_sum"]  # the same batch again: it learned
    assert runner.grad_norm() > 0


def test_bf16_without_zero_trains_under_autocast_with_fp32_weights(monkeypatch):
    """bf16 at stage 0 (one rank): fp32 weights, bf16 matmuls under torch autocast, one host read."""
    import deepspeed
    import torch.distributed as dist

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(DIST.free_port())).items():
        monkeypatch.setenv(k, v)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_config(None, {"deepspeed": {"zero_stage": 2}, "data": {"stream": {"seq_len": 64, "batch_size": 2}},
                             "train": {"grad_clip": 1.0, "precision": "bf16"}})
    torch.manual_seed(0)
    model = build_model(ModelArgs(**{**OVERHEAD_MODEL, "n_layers": 2}))
    engine, opt, runner, ds_config = ST.build_engine(cfg, model, 1, torch.device("cpu"))
    assert ds_config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not ds_config["bf16"]["enabled"]
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "patch_embed" not in n}
    batch = synthetic_batch(512, 2, 64, seed=0)
    prev = runner.run(0, 1e-3, [batch])
    with HostSyncCounter(device_tensors(engine.module, engine.optimizer) + [prev.host]) as c:
        now = runner.run(1, 1e-3, [batch])
        v = prev.values()
    assert c.total == 1, c.syncs
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    # every weight that had a gradient moved (no posters in this batch: the patch embedding has none)
    assert all(not torch.equal(p, before[n]) for n, p in engine.module.named_parameters() if n in before)
    assert not v["nonfinite"] and not now.values()["nonfinite"] and 5.0 < v["loss_sum"] < 7.5  # ~ln(512)


@pytest.mark.slow
def test_overhead_bench_runs_and_counts_one_read_per_step():
    """`m6rec bench train --only overhead` end to end, shortened (timings are not asserted: a
    benchmark's numbers live in docs/training.md, not in tests)."""
    r = bench_overhead(warmup=1, steps=2)
    assert [x["stage"] for x in r["results"]] == [0, 1, 2, 3]
    for x in r["results"]:
        assert x["host_syncs_per_step"] == 1 and x["host_syncs_per_step_bf16"] == 1, x
        assert x["ran_as_stage"] == 0 and x["engine_overhead_ms"] > 0 and x["plain_overhead_ms"] > 0
        assert x["aten_ops_per_step"] < 1.02 * x["plain_aten_ops_per_step"]
    assert len(r["table"]) == 6
