"""scripts/amazon_to_generic.py: both Amazon layouts (P5 sequences; LC-Rec JSON with item text) into the
generic format, read back through `m6rec prepare` (and, where ../shared holds it, the real Office set)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from m6rec.config import load_config
from m6rec.data import prepare as P

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("amazon_to_generic", ROOT / "scripts" / "amazon_to_generic.py")
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)


def _prepare(generic: Path, out: Path, fields: list):
    cfg = load_config(None, {"data": {
        "source": "generic", "root": str(generic), "output": str(out), "max_items": 10, "stride": 5,
        "generic": {"item_text_fields": fields}, "tokenizer": {"vocab_size": 300},
        "text": {"item_repr": "token", "images": False, "time_unit": "none", "rating_template": "",
                 "profile_template": "", "user_fields": []}}})
    return P.prepare(cfg.data)


def test_lcrec_json_with_item_text_is_unescaped_and_ordered(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    inter = {str(u): [(u + k) % 7 for k in range(5)] for u in range(6)}
    items = {str(i): {"title": f"AT&amp;T phone {i}", "brand": "Brand &quot;X&quot;", "categories": "Office, Phones",
                      "description": "  two   spaces &lt;b&gt;"} for i in range(7)}
    items["3"]["title"] = ""  # the real file has three empty titles
    (src / "Office.inter.json").write_text(json.dumps(inter))
    (src / "Office.item.json").write_text(json.dumps(items))
    users, n_items, rows = conv.convert(src, tmp_path / "generic")
    assert (users, n_items, rows) == (6, 7, 30)
    it = pd.read_csv(tmp_path / "generic" / "items.csv")
    row = it.set_index("item_id").loc[0]
    assert row["title"] == "AT&T phone 0" and row["brand"] == 'Brand "X"' and row["description"] == "two spaces <b>"
    assert it.set_index("item_id").loc[3, "title"] == "item 3"
    inter_csv = pd.read_csv(tmp_path / "generic" / "interactions.csv")
    assert inter_csv[inter_csv.user_id == 2]["item_id"].tolist() == inter["2"]  # the order, as timestamps 1..n
    assert inter_csv[inter_csv.user_id == 2]["timestamp"].tolist() == [1, 2, 3, 4, 5]
    m = _prepare(tmp_path / "generic", tmp_path / "ds", ["brand", "categories"])
    assert m["splits"]["test"]["samples"] == 6
    text = pd.read_parquet(tmp_path / "ds" / "items.parquet").set_index("item_id").loc["0", "text"]
    assert text == 'AT&T phone 0; brand: Brand "X"; categories: Office, Phones'


def test_p5_sequences_still_convert(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "sequential_data.txt").write_text("1 10 11 12 13\n2 11 12 14\n")
    assert conv.convert(src, tmp_path / "generic") == (2, 5, 7)
    assert pd.read_csv(tmp_path / "generic" / "items.csv")["title"].tolist()[0] == "item 10"


def test_the_real_office_set_converts_to_its_published_counts(tmp_path, shared_data):
    root = shared_data / "amazon-office"
    if not (root / "Office.inter.json").is_file():
        pytest.skip(f"Amazon Office not found at {root} (set M6REC_DATA_ROOT)")
    assert conv.convert(root, tmp_path / "generic") == (4905, 2420, 53258)
    it = pd.read_csv(tmp_path / "generic" / "items.csv", keep_default_na=False)
    assert not it["title"].str.contains("&amp;").any() and (it["title"] != "").all()
