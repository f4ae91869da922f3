"""``m6rec bench gpu``: the model and the engine side by side on one device (scripts/gpu_check.sh).

On a CUDA device, at the ``350m`` shape (4 x 2048 tokens, bf16), one process measures:

* the bf16 matmul peak (8192^3), beside the card's datasheet peak (``KNOWN_PEAK_FLOPS``);
* the model's own forward+backward: m6rec eager / blocks compiled, causal rows and
  packed prefix rows (FlexAttention), and transformers' ``LlamaForCausalLM`` of the
  same shape and weights (eager, layers compiled);
* the engine: DeepSpeed initialised exactly as ``m6rec train`` does it
  (:func:`~m6rec.train.optim.build_optimizer`, :func:`deepspeed_config`,
  :class:`TrainStep`, which also reads each step's numbers one step late as the
  trainer does) on the same packed prefix rows, for each ZeRO stage;

and prints one table: ms/step, tokens/s, MFU against the measured and the datasheet
peak, and the engine's share of the compiled model's tokens/s.  ``--tiny`` (and any
run without CUDA) does the same with a tiny model in fp32 on the CPU: what CI runs.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from m6rec.bench.common import (
    MODEL_PRESETS,
    STAGES,
    bench_config,
    format_table,
    synthetic_batch,
    time_steps,
)
from m6rec.bench.model import llama_twin
from m6rec.config import load_config
from m6rec.model import apply_compile, build_model
from m6rec.model.args import ModelArgs
from m6rec.model.info import flops_per_token
from m6rec.train.distributed import init_distributed
from m6rec.train.ds_config import effective_zero_stage
from m6rec.train.peak import measure_matmul_peak, peak_flops
from m6rec.train.step import build_engine, prepare_inputs

# The packed rows of the model benchmark: 4 documents of 512 tokens a row, the first half context.
DOC_LEN = 512


def bench_gpu(cfg: Any, args: Any) -> dict[str, Any]:
    result = run(tiny=getattr(args, "tiny", False))
    print("\n".join(result["table"]))
    return result


def run(tiny: bool = False, steps: int = 10, warmup: int = 3, stages=STAGES) -> dict[str, Any]:
    import deepspeed  # heavy: DeepSpeed (its version in the result)

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available() and not tiny
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world, device = init_distributed()
    if not cuda:
        device = torch.device("cpu")
    precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        margs = ModelArgs.from_config(load_config(MODEL_PRESETS / "350m.yaml"), max_seq_len=2048,
                                      activation_checkpointing=False, compile=False)
        B, T, doc_len = 4, 2048, DOC_LEN
    else:
        margs = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, ffn_hidden=128, max_seq_len=128)
        B, T, doc_len = 2, 128, 32
    fpt = flops_per_token(margs, T)["total"]
    measured = measure_matmul_peak(dtype, "cuda" if cuda else "cpu", sizes=(8192,) if cuda else (512,), seconds=1.0)
    spec, spec_source = peak_flops(precision, device, measure=lambda *a: float("nan"))
    out: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0) if cuda else "cpu", tiny=not cuda, precision=precision,
        torch=torch.__version__, deepspeed=deepspeed.__version__, shape=[B, T], model_args=margs.to_dict(),
        flops_per_token=fpt, measured_peak_flops=measured["flops"], spec_peak_flops=spec,
        spec_source=spec_source if spec == spec else "unknown card: no datasheet peak", rows=[])
    batches = {"causal": synthetic_batch(margs.vocab_size, B, T, causal=True),
               "packed_prefix": synthetic_batch(margs.vocab_size, B, T, doc_len=doc_len)}

    def add(name: str, seconds: float, **extra) -> None:
        tps = B * T / seconds
        row = dict(name=name, ms_per_step=1e3 * seconds, tokens_per_s=tps,
                   mfu_measured=tps * fpt / measured["flops"], **extra)
        if spec == spec:
            row["mfu_spec"] = tps * fpt / spec
        out["rows"].append(row)
        print(f"  {name}: {1e3 * seconds:.1f} ms/step, {tps / 1e3:.1f} k tokens/s", flush=True)

    def model_step(model, forward):
        """One forward + backward of ``model``; ``forward(model)`` returns its output (m6rec's
        takes a Batch, transformers' Llama keyword tensors)."""
        def step():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                loss = forward(model).loss
            loss.backward()
        return step

    # --- the model alone: forward + backward --------------------------------------------
    torch.manual_seed(0)
    eager = build_model(margs, device=device).train()
    compiled = apply_compile(build_model(margs, device=device).train())
    compiled.load_state_dict(eager.state_dict())
    for name, model in (("m6rec eager", eager), ("m6rec blocks compiled", compiled)):
        for kind, b in batches.items():
            inputs, _ = prepare_inputs(model, b, device)
            try:
                add(f"{name}, {kind}", time_steps(model_step(model, lambda m, b=inputs: m(b)), warmup, steps, cuda),
                    kind="model")
            except Exception as e:  # one failing row must not lose the others
                out["rows"].append(dict(name=f"{name}, {kind}", error=f"{type(e).__name__}: {e}"))
    try:
        llama = llama_twin(eager).to(device)
        hf_batch = {k: v.to(device) for k, v in batches["causal"].items()}
        hf_forward = lambda m: m(**hf_batch)  # noqa: E731
        add("HF Llama eager, causal", time_steps(model_step(llama, hf_forward), warmup, steps, cuda), kind="model")
        for layer in llama.model.layers:
            layer.compile(dynamic=False)
        add("HF Llama layers compiled, causal", time_steps(model_step(llama, hf_forward), warmup, steps, cuda),
            kind="model")
        del llama
    except Exception as e:
        out["rows"].append(dict(name="HF Llama", error=f"{type(e).__name__}: {e}"))
    del eager, compiled
    if cuda:
        torch.cuda.empty_cache()

    # --- the engine: what m6rec train runs, on the same packed prefix rows ----------------
    for stage in stages:
        cfg = bench_config(stage, T, B, precision=precision)
        try:
            torch.manual_seed(0)
            engine_args = ModelArgs.from_dict({**margs.to_dict(), "compile": cuda})  # GPU presets compile
            model = build_model(engine_args, device=device)
            engine, opt, runner, _ = build_engine(cfg, model, world, device)
            pending = [None]
            i = [0]

            def engine_step():
                queued = runner.run(i[0], 1e-4, [batches["packed_prefix"]])
                if pending[0] is not None:
                    pending[0].values()  # the trainer reads each step one step late
                pending[0] = queued
                i[0] += 1

            t = time.perf_counter()
            engine_step()
            first_s = time.perf_counter() - t
            seconds = time_steps(engine_step, warmup, steps, cuda)
            add(f"m6rec engine, ZeRO {stage}" + (f" (runs as {effective_zero_stage(cfg, world)} on one rank)"
                                                 if effective_zero_stage(cfg, world) != stage else ""),
                seconds, kind="engine", stage=stage, first_step_s=first_s, compile=engine_args.compile)
            del engine, opt, model, runner, pending
        except Exception as e:
            out["rows"].append(dict(name=f"m6rec engine, ZeRO {stage}", error=f"{type(e).__name__}: {e}"))
        if cuda:
            torch.cuda.empty_cache()
    # the engine against the model alone as it runs it: blocks compiled on CUDA, eager on the CPU
    ref_name = "m6rec blocks compiled, packed_prefix" if cuda else "m6rec eager, packed_prefix"
    ref = next((r for r in out["rows"] if r.get("name") == ref_name and "tokens_per_s" in r), None)
    out["engine_reference"] = ref_name
    for r in out["rows"]:
        if ref and r.get("kind") == "engine":
            r["of_compiled_model"] = r["tokens_per_s"] / ref["tokens_per_s"]
    out["table"] = gpu_table(out)
    out["wall_s"] = time.perf_counter() - t0
    if dist.is_initialized():
        dist.barrier()
    return out


def gpu_table(result: dict) -> list[str]:
    spec = result["spec_peak_flops"]
    head = (f"{result['device']}, {result['precision']}, {result['shape'][0]} x {result['shape'][1]} tokens; "
            f"measured matmul peak {result['measured_peak_flops'] / 1e12:.1f} TFLOP/s"
            + (f", datasheet {spec / 1e12:.0f} TFLOP/s" if spec == spec else ""))
    rows = []
    for r in result["rows"]:
        if "error" in r:
            rows.append([r["name"], f"error: {r['error'][:80]}", "", "", "", ""])
            continue
        rows.append([r["name"], f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s'] / 1e3:.1f} k",
                     f"{100 * r['mfu_measured']:.1f} %", f"{100 * r['mfu_spec']:.1f} %" if "mfu_spec" in r else "—",
                     f"{100 * r['of_compiled_model']:.0f} %" if "of_compiled_model" in r else ""])
    return [head, "", *format_table(["run", "ms/step", "tokens/s", "MFU vs measured", "MFU vs datasheet",
                                     f"of {result.get('engine_reference', 'the model')}"], rows)]


if __name__ == "__main__":
    import sys

    print(json.dumps(run(tiny="--tiny" in sys.argv), indent=1))
