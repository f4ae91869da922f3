"""``m6rec bench {data,model,train,gpu,recommend,catalog} --out FILE.json``: reproducible benchmarks.

One module a benchmark, each with its ``bench_*(cfg, args)`` returning a JSON-able dict; :func:`main`
prints it and writes it to ``--out``.  Results and the exact commands are kept in
docs/performance.md.

* :mod:`~m6rec.bench.common` -- what they share: the machine, timing, peak memory, the Markdown
  table, the synthetic batch, the engine's config and shape, benchmark rank processes;
* :mod:`~m6rec.bench.data` -- preparation and reader throughput, .npy decoding, the data wait;
* :mod:`~m6rec.bench.model` -- the model alone against transformers' Llama (CPU; a GPU's 350m);
* :mod:`~m6rec.bench.train` -- ZeRO scaling, and the entry of ``bench train``'s three parts, with
  :mod:`~m6rec.bench.checkpoint` (checkpoint cost) and :mod:`~m6rec.bench.overhead` (engine overhead,
  host syncs);
* :mod:`~m6rec.bench.gpu` -- the model and the engine side by side on one device;
* :mod:`~m6rec.bench.recommend` -- serving latency after loading;
* :mod:`~m6rec.bench.catalog` -- train step, memory and serving against the catalog's size, per item
  representation and item loss.

The matmul peak they divide by is :func:`m6rec.train.peak.measure_matmul_peak`.  The benchmark
named is the only one imported (as the command line does with its commands), so the rank processes
a benchmark spawns load what that benchmark needs, no more.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# what -> (module, function(cfg, args) -> dict)
BENCHES = {"data": ("m6rec.bench.data", "bench_data"), "model": ("m6rec.bench.model", "bench_model"),
           "train": ("m6rec.bench.train", "bench_train"), "gpu": ("m6rec.bench.gpu", "bench_gpu"),
           "recommend": ("m6rec.bench.recommend", "bench_recommend"),
           "catalog": ("m6rec.bench.catalog", "bench_catalog")}


def main(cfg: Any, args: Any) -> int:
    module, function = BENCHES[args.what]
    result = getattr(importlib.import_module(module), function)(cfg, args)
    text = json.dumps(result, indent=2)
    print(text)
    if getattr(args, "out", None):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return 0
