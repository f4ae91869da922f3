"""Write the P5 / S3-Rec Amazon sequences (``sequential_data.txt``: ``user item1 item2 ...`` in time
order) in m6rec's generic format (docs/data.md), for configs/rec/amazon-beauty.yaml:

    python scripts/amazon_to_generic.py ../shared/data/amazon-beauty data/amazon-beauty-generic

interactions.csv: user_id,item_id,timestamp -- the file has an order only, so each user's
interactions get synthetic increasing timestamps (1, 2, 3, ...; the split and the windows use
the order, and the preset writes no times).  items.csv: item_id,title with the title "item ID"
(the data has no titles; the preset represents items by item tokens only).  The data is not
copied into the project: its licence is research use only.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def convert(src: Path, out: Path) -> tuple[int, int, int]:
    out.mkdir(parents=True, exist_ok=True)
    items: set[int] = set()
    users = rows = 0
    with open(src / "sequential_data.txt", encoding="utf-8") as f, \
            open(out / "interactions.csv", "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["user_id", "item_id", "timestamp"])
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            users += 1
            for t, item in enumerate(parts[1:], start=1):
                w.writerow([parts[0], item, t])
                items.add(int(item))
                rows += 1
    with open(out / "items.csv", "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["item_id", "title"])
        for i in sorted(items):
            w.writerow([i, f"item {i}"])
    return users, len(items), rows


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/amazon_to_generic.py SRC_DIR (with sequential_data.txt) OUT_DIR")
    u, i, r = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{u} users, {i} items, {r} interactions written to {sys.argv[2]}")
