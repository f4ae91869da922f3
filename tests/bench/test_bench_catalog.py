"""`m6rec bench catalog` through the command line, shortened with ``--quick`` (timings are not
asserted: a benchmark's numbers live in docs/performance.md), and the rule that skips a cell."""
from __future__ import annotations

import json

import pytest

from m6rec.bench.catalog import _extrapolated_mb, parse_sizes
from m6rec.cli import main
from m6rec.config import ConfigError

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_bench_catalog_measures_every_cell_and_the_zero_3_ranks(tmp_path, capsys):
    out = tmp_path / "catalog.json"
    assert main(["bench", "catalog", "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    cells = {(c["repr"], c["loss"], c["items"]): c for c in r["cells"]}
    assert len(cells) == 10 and {n for *_, n in cells} == {1000, 4000}
    for c in cells.values():
        assert "skipped" not in c, c
        assert c["step_ms"] > 0 and c["serve_ms"] > 0 and c["peak_mb"] > 0 and c["final_loss"] > 0
    # item tokens: a parameter row per item; text vectors: none (the projection only)
    assert cells[("item tokens", "full", 4000)]["params"] - cells[("item tokens", "full", 1000)]["params"] == 3000 * 64
    assert cells[("text vectors", "sampled", 4000)]["params"] == cells[("text vectors", "sampled", 1000)]["params"]
    # semantic IDs: a code vocabulary whatever the catalog; serving is the trie beam, whose trie is built at load
    assert cells[("semantic IDs", "full", 4000)]["params"] == cells[("semantic IDs", "full", 1000)]["params"]
    assert cells[("semantic IDs", "full", 4000)]["catalog_ms"] > 0
    # the sampled loss reads 32 + 1 items per label instead of the whole vocabulary: a smaller first loss
    assert cells[("item tokens", "sampled", 4000)]["final_loss"] < cells[("item tokens", "full", 4000)]["final_loss"]
    (zero,) = r["zero_memory"]  # the sampled item-token model at ZeRO 3 on 2 real ranks
    assert zero["stage"] == 3 and len(zero["peak_mb_per_rank"]) == 2 and zero["step_ms"] > 0
    assert "| item tokens | sampled | 4k |" in capsys.readouterr().out


def test_sizes_and_the_memory_extrapolation_that_skips_a_cell():
    assert parse_sizes("10k, 1M,2500") == [10_000, 1_000_000, 2500]
    with pytest.raises(ConfigError, match="--sizes"):
        parse_sizes("lots")
    assert _extrapolated_mb([{"items": 10, "peak_mb": 100}], 1000) is None
    done = [{"items": 10_000, "peak_mb": 500.0}, {"items": 1_000_000, "peak_mb": 1490.0}]
    assert _extrapolated_mb(done, 10_000_000) == pytest.approx(1490 + 0.001 * 9_000_000)
