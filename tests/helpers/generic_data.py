"""A small shop log in the generic format (real JPEGs, one broken), and its prepare settings."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from m6rec.config import load_config


def write_generic_logs(root, n_users=40, n_items=60, seed=0):
    """A small company log in the generic format, with real JPEGs for some items and one broken image."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    items = []
    for i in range(n_items):
        img = None
        if i % 6 == 0:
            img = f"img/{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / img)
        items.append({"item_id": f"sku-{i}", "title": f"Product {i}", "genres": "tools|garden" if i % 2 else "kitchen",
                      "brand": f"Brand{i % 5}", "image": img})
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    items[1]["image"] = "img/broken.jpg"
    pd.DataFrame(items).to_csv(root / "items.csv", index=False)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(4, 30))
        t0 = 1_600_000_000 + int(rng.integers(0, 10**6))
        for k in range(n):
            rows.append({"user_id": f"user.{u}", "item_id": f"sku-{int(rng.integers(0, n_items))}",
                         "timestamp": t0 + k * int(rng.integers(0, 3 * 86400)), "rating": float(rng.integers(1, 6))})
    pd.DataFrame(rows).to_csv(root / "interactions.csv", index=False)
    pd.DataFrame({"user_id": [f"user.{u}" for u in range(n_users)], "tier": ["gold", "silver"] * (n_users // 2)}).to_csv(
        root / "users.csv", index=False)
    return root


def generic_args(root, out, *extra):
    """Dotted overrides for the generated shop logs (also what the CLI gets)."""
    return [
        "--data.name", "shop", "--data.source", "generic", "--data.root", str(root), "--data.output", str(out),
        "--data.generic.items", "items.csv", "--data.generic.users", "users.csv",
        "--data.generic.item_text_fields", "[brand]", "--data.generic.image_field", "image",
        "--data.text.user_fields", "[tier]", "--data.max_items", "8", "--data.stride", "4", "--data.shard_size", "25",
        "--data.tokenizer.vocab_size", "600", "--data.images.size", "32", "--data.images.patch_size", "16", *extra,
    ]


def generic_cfg(root, out, *extra):
    return load_config(None, generic_args(root, out, *extra))
