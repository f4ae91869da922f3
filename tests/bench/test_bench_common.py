"""What the benchmarks share (m6rec/bench/common.py) and the one matmul-peak measurer they and the
trainer's MFU use (m6rec/train/metrics.py)."""
from __future__ import annotations

import torch

from m6rec.bench.common import format_table, synthetic_batch
from m6rec.model.transformer import M6Transformer
from m6rec.train import peak


def test_format_table_writes_markdown_rows():
    assert format_table(["a", "b c"], [[1, "x"], ["", 2.5]]) == ["| a | b c |", "|---|---|", "| 1 | x |",
                                                                "|  | 2.5 |"]


def test_synthetic_batch_packed_prefix_rows_and_causal_rows():
    b = synthetic_batch(512, 2, 64, seed=3)
    assert b.keys() == {"input_ids", "labels", "position_ids", "document_ids", "prefix_mask"}
    assert torch.equal(b["input_ids"], synthetic_batch(512, 2, 64, seed=3)["input_ids"])  # seeded
    assert int(b["input_ids"].min()) >= 7 and b["document_ids"][0].tolist() == [0] * 32 + [1] * 32
    pos, ids, labels = b["position_ids"][0], b["input_ids"][0], b["labels"][0]
    assert pos.tolist() == list(range(32)) * 2 and b["prefix_mask"][0].tolist() == ([True] * 16 + [False] * 16) * 2
    # the last context token and every target but a document's last predict the next token
    targets = [t for t in range(64) if 15 <= t % 32 < 31]
    assert (labels != -100).nonzero().flatten().tolist() == targets
    assert labels[targets].tolist() == ids[[t + 1 for t in targets]].tolist()
    # nothing the model would drop as visible to the prefix: the labels are what it trains on
    assert torch.equal(M6Transformer._drop_visible_labels(b["labels"], b["document_ids"], b["prefix_mask"]),
                       b["labels"])
    c = synthetic_batch(512, 2, 64, seed=3, causal=True)
    assert c.keys() == {"input_ids", "labels"} and torch.equal(c["input_ids"], b["input_ids"])
    assert torch.equal(c["labels"][:, :-1], c["input_ids"][:, 1:]) and (c["labels"][:, -1] == -100).all()
    assert synthetic_batch(512, 1, 128, doc_len=32)["document_ids"][0].tolist() == [i // 32 for i in range(128)]


def test_matmul_peak_per_size_and_within_a_budget():
    r = peak.measure_matmul_peak(torch.float32, "cpu", sizes=(64, 128), seconds=0.02)
    assert r["dtype"] == "float32" and sorted(r["per_size"]) == ["128", "64"]
    assert r["flops"] == max(r["per_size"].values()) > 0 and r["flops_per_cpu_s"] > 0
    # a budget the first size spends: the larger ones are left out
    state = torch.get_rng_state()
    r = peak.measure_matmul_peak(torch.float32, "cpu", sizes=(256, 4096), seconds=0.05, budget=0.05)
    assert list(r["per_size"]) == ["256"]
    # how many sizes fit depends on the machine's load: none of it reaches torch's global RNG
    assert torch.equal(torch.get_rng_state(), state)
