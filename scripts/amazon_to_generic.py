"""Write an Amazon review set in m6rec's generic format (docs/data.md).  Two source layouts:

* P5 / S3-Rec (``sequential_data.txt``: ``user item1 item2 ...`` in time order), e.g. Amazon Beauty
  for configs/rec/amazon-beauty.yaml.  No item text: each item's title is "item ID" (those presets
  represent items by item tokens only).
* LC-Rec / LETTER JSON (``NAME.inter.json``: ``{user: [item, ...]}`` in time order;
  ``NAME.item.json``: ``{item: {title, description, brand, categories}}``), e.g. Amazon Office for
  configs/rec/amazon-office*.yaml.  The text fields are HTML-unescaped (the files keep entities such
  as ``&amp;``) and whitespace-collapsed; an empty title becomes "item ID".

    python scripts/amazon_to_generic.py ../shared/data/amazon-beauty data/amazon-beauty-generic
    python scripts/amazon_to_generic.py ../shared/data/amazon-office data/amazon-office-generic

interactions.csv: user_id,item_id,timestamp -- the sources have an order only, so each user's
interactions get synthetic increasing timestamps (1, 2, 3, ...; the split and the windows use the
order, and the presets write no times).  items.csv: item_id,title[,brand,categories,description].
The data is not copied into the project: its licence is research use only.
"""
from __future__ import annotations

import csv
import html
import json
import sys
from pathlib import Path

TEXT_FIELDS = ("brand", "categories", "description")


def _clean(text) -> str:
    return " ".join(html.unescape(str(text or "")).split())


def _write_interactions(out: Path, sequences) -> tuple[int, set, int]:
    items: set[int] = set()
    users = rows = 0
    with open(out / "interactions.csv", "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["user_id", "item_id", "timestamp"])
        for user, seq in sequences:
            if not seq:
                continue
            users += 1
            for t, item in enumerate(seq, start=1):
                w.writerow([user, item, t])
                items.add(int(item))
                rows += 1
    return users, items, rows


def _p5_sequences(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                yield parts[0], parts[1:]


def convert(src: Path, out: Path) -> tuple[int, int, int]:
    out.mkdir(parents=True, exist_ok=True)
    inter = sorted(src.glob("*.inter.json"))
    if (src / "sequential_data.txt").is_file():
        users, items, rows = _write_interactions(out, _p5_sequences(src / "sequential_data.txt"))
        meta = {}
    elif len(inter) == 1:
        sequences = json.loads(inter[0].read_text(encoding="utf-8"))
        users, items, rows = _write_interactions(out, sequences.items())
        meta_file = inter[0].with_name(inter[0].name.replace(".inter.json", ".item.json"))
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    else:
        raise SystemExit(f"{src}: neither sequential_data.txt nor exactly one NAME.inter.json")
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["item_id", "title", *TEXT_FIELDS] if meta else ["item_id", "title"])
        for i in sorted(items):
            m = meta.get(str(i))
            if not meta:
                w.writerow([i, f"item {i}"])
            else:
                m = m or {}
                w.writerow([i, _clean(m.get("title")) or f"item {i}", *(_clean(m.get(k)) for k in TEXT_FIELDS)])
    return users, len(items), rows


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/amazon_to_generic.py SRC_DIR OUT_DIR "
                 "(SRC_DIR with sequential_data.txt, or NAME.inter.json + NAME.item.json)")
    u, i, r = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{u} users, {i} items, {r} interactions written to {sys.argv[2]}")
