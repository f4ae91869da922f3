"""Semantic IDs (``data.text.item_repr: semantic_id``): each item as a short tuple of codes.

An item's vector -- its cached text vector (``data.semantic_ids.source: text``, the bank of
:mod:`m6rec.data.vectors`) or the item-token embedding of a trained m6rec run on the same catalog
(``source: run:RUN_DIR``, collaborative codes for ID-only data) -- is quantised residually:

* ``rq_kmeans`` (OneRec, GRID): k-means with ``codebook_size`` centroids on the vectors, then
  k-means again on what the first centroid left over, ``levels`` times;
* ``rq_vae`` (TIGER): a small autoencoder whose latent is quantised by ``levels`` residual
  codebooks (initialised by ``rq_kmeans`` of the latent), trained to reconstruct the vectors.

Items whose ``levels`` codes are the same are told apart by one more code that numbers them in
catalog order (0 for an item alone), so every item has ``levels + 1`` codes and no two items
share all of them.  Each code is a token of its own per position (``<sid_L_C>``,
:func:`m6rec.data.text.code_token`): ``(levels + 1) * codebook_size`` tokens whatever the catalog
size, shared by every item.  Similar items share prefixes; a held-out (cold) item gets its codes
from its text like any other.

The codes are cached beside the item vectors as ``semantic_ids.safetensors`` (``codes`` int32
``[N, levels + 1]`` in ``items.parquet`` row order, ``centroids`` float32 ``[levels, K, d]`` in
the vectors' space -- the nearest centroids give a new item's codes), with the settings and the
sha256 of the vectors and item ids in the metadata: other vectors or settings build them again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from m6rec.config import ConfigError, DataConfig, SemanticIdConfig
from m6rec.data import text as T

log = logging.getLogger(__name__)

SID_FILE = "semantic_ids.safetensors"
_BLOCK = 1 << 16  # rows per distance block: [65536, K] float32 stays small at any catalog size


def code_vocabulary(cfg: SemanticIdConfig) -> list[str]:
    """Every code token, level by level (the tokenizer gets all of them)."""
    return [T.code_token(level, c) for level in range(cfg.levels + 1) for c in range(cfg.codebook_size)]


# ---------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------
def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each row's nearest centroid and the squared distance to it, in blocks of rows."""
    c2 = (centroids * centroids).sum(1)
    idx = torch.empty(len(x), dtype=torch.int64)
    dist = torch.empty(len(x), dtype=x.dtype)
    for a in range(0, len(x), _BLOCK):
        xb = x[a:a + _BLOCK]
        d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ centroids.T + c2
        dist[a:a + _BLOCK], idx[a:a + _BLOCK] = d.min(1)
    return idx, dist.clamp_min(0)


def kmeans(x: torch.Tensor, k: int, iterations: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: ``(centroids [k, d], assignment [n])``.  A cluster left
    empty takes the point farthest from its centroid, so every code is used while there are at least
    ``k`` distinct points."""
    n = len(x)
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: each next seed drawn with probability ~ squared distance
        total = float(d2.sum())
        pick = int(torch.multinomial(d2 / total, 1, generator=gen)) if total > 0 else \
            int(torch.randint(n, (1,), generator=gen))
        centroids.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    c = torch.stack(centroids)
    for _ in range(iterations):
        assign, dist = nearest(x, c)
        counts = torch.bincount(assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = torch.argsort(dist, descending=True, stable=True)[:len(empty)]
            assign[far] = empty[:len(far)]
            counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), c)
        if torch.equal(new, c):
            break
        c = new
    # the codes are the nearest centroids, as quantize() finds them for a new item
    return c, nearest(x, c)[0]


def rq_kmeans(x: np.ndarray, levels: int, k: int, iterations: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Residual k-means: ``(codes [N, levels], centroids [levels, k, d])``."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    codes, books = [], []
    for _ in range(levels):
        c, a = kmeans(r, k, iterations, gen)
        codes.append(a)
        books.append(c)
        r -= c[a]
    return torch.stack(codes, 1).numpy().astype(np.int64), torch.stack(books).numpy()


def quantize(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The ``levels`` codes of new vectors in a vector space the centroids were built in."""
    r = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    out = []
    for c in torch.from_numpy(centroids):
        a, _ = nearest(r, c)
        out.append(a)
        r -= c[a]
    return torch.stack(out, 1).numpy().astype(np.int64)


class _RQVAE(torch.nn.Module):
    """TIGER's residual-quantised autoencoder, small: an MLP encoder to a latent, ``levels`` residual
    codebooks (straight-through gradients, commitment loss), an MLP decoder back to the vector."""

    def __init__(self, d: int, latent: int, levels: int, k: int):
        super().__init__()
        h = max(2 * latent, 64)
        self.enc = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, latent))
        self.dec = torch.nn.Sequential(torch.nn.Linear(latent, h), torch.nn.ReLU(), torch.nn.Linear(h, d))
        self.books = torch.nn.Parameter(torch.zeros(levels, k, latent))

    def quantise(self, z: torch.Tensor):
        r, q_sum, codes, commit = z, torch.zeros_like(z), [], z.new_zeros(())
        for book in self.books:
            a, _ = nearest(r.detach(), book.detach())
            q = book[a]
            commit = commit + ((r.detach() - q) ** 2).mean() + 0.25 * ((r - q.detach()) ** 2).mean()
            q_sum = q_sum + q
            codes.append(a)
            r = r - q.detach()
        return torch.stack(codes, 1), q_sum, commit

    def forward(self, x: torch.Tensor):
        z = self.enc(x)
        codes, q, commit = self.quantise(z)
        z_q = z + (q - z).detach()  # straight through to the encoder, the codebooks learn by `commit`
        return codes, ((self.dec(z_q) - x) ** 2).mean() + commit


def rq_vae(x: np.ndarray, levels: int, k: int, epochs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """TIGER-style codes: ``(codes [N, levels], centroids [levels, k, d])``.  The codebooks live in
    the autoencoder's latent space; the centroids returned are in the vectors' space (per level, the
    mean residual of the items holding each code), which is what :func:`quantize` reads for a new item."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    model = _RQVAE(xt.shape[1], 32, levels, k)
    with torch.no_grad():  # codebooks start as residual k-means of the initial latent (no dead codes)
        _, books = rq_kmeans(model.enc(xt).numpy(), levels, k, 10, seed)
        model.books.copy_(torch.from_numpy(books))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = min(1024, len(xt))
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            _, loss = model(xt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        codes = model.quantise(model.enc(xt))[0]
    return codes.numpy().astype(np.int64), _mean_centroids(x, codes.numpy(), k)


def _mean_centroids(x: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """Per level, the mean residual (in the vectors' space) of the items holding each code."""
    r = np.array(x, dtype=np.float64)
    books = []
    for level in range(codes.shape[1]):
        sums = np.zeros((k, r.shape[1]))
        np.add.at(sums, codes[:, level], r)
        counts = np.bincount(codes[:, level], minlength=k)[:, None]
        c = sums / np.maximum(counts, 1)
        books.append(c)
        r -= c[codes[:, level]]
    return np.stack(books).astype(np.float32)


def number_collisions(codes: np.ndarray, k: int, key: str = "data.semantic_ids.codebook_size") -> np.ndarray:
    """Append the code that numbers the items sharing all ``levels`` codes (catalog order, 0 first):
    ``[N, levels + 1]``, every row distinct.  More than ``k`` items on one prefix cannot be numbered."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if counts.max(initial=0) > k:
        raise ConfigError(f"config key '{key}': {int(counts.max())} items share the same "
                          f"{codes.shape[1]} codes, more than the {k} codes of the final level that tell them "
                          "apart; raise data.semantic_ids.codebook_size or data.semantic_ids.levels")
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    digit = np.empty(len(codes), dtype=np.int64)
    digit[order] = np.arange(len(codes)) - np.repeat(starts, counts)
    return np.concatenate([codes, digit[:, None]], axis=1)


def residual_final_level(x: np.ndarray, codes: np.ndarray, centroids: np.ndarray, k: int, iterations: int,
                         seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The final level as one more residual quantisation whose codes are distinct among the items that
    share the ``levels`` codes before it: k-means of what the levels left over, each item the nearest
    centroid no earlier member of its group took (greedily, closest pair first).  The final code then
    says something about the item (the same code is a similar remainder in every group), where
    :func:`number_collisions` only counts.  Returns ``([N, levels + 1] codes, [levels + 1, k, d])``."""
    r = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).clone()
    for level, c in enumerate(torch.from_numpy(centroids)):
        r -= c[torch.from_numpy(codes[:, level])]
    c, final = kmeans(r, k, iterations, torch.Generator().manual_seed(seed + 1))
    final = final.numpy().astype(np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if counts.max(initial=0) > k:
        number_collisions(codes, k)  # the error naming the key
    for g in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse == g)
        d = torch.cdist(r[members], c).numpy().astype(np.float64)
        for _ in range(len(members)):
            i, j = np.unravel_index(np.argmin(d), d.shape)
            final[members[i]] = j
            d[i, :] = np.inf
            d[:, j] = np.inf
    return np.concatenate([codes, final[:, None]], axis=1), np.concatenate([centroids, c.numpy()[None]])


def diagnostics(codes: np.ndarray, k: int) -> dict:
    """What ``prepare_report.json`` and the console show: the share of each level's codes in use,
    the share of items whose ``levels`` codes some other item also has (before numbering), and the
    largest such group."""
    levels = codes.shape[1] - 1
    base = codes[:, :levels]
    _, inverse, counts = np.unique(base, axis=0, return_inverse=True, return_counts=True)
    shared = counts[inverse.reshape(-1)] > 1
    usage = [round(len(np.unique(base[:, level])) / k, 4) for level in range(levels)]
    return {"codebook_usage": usage, "collision_rate": round(float(shared.mean()), 4),
            "largest_shared_prefix": int(counts.max()), "final_level_codes_used": int(codes[:, levels].max()) + 1}


# ---------------------------------------------------------------------------
# Building and caching
# ---------------------------------------------------------------------------
@dataclass
class SemanticIds:
    item_ids: list
    codes: np.ndarray  # [N, levels + 1]
    centroids: np.ndarray  # [levels, K, d]
    report: dict

    def tokens(self) -> dict:
        """item_id -> its code tokens (what :func:`m6rec.data.text.window_segments` writes)."""
        return {i: [T.code_token(level, int(c)) for level, c in enumerate(row)]
                for i, row in zip(self.item_ids, self.codes)}


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes() if isinstance(a, np.ndarray) else str(a).encode())
        h.update(b"\x00")
    return h.hexdigest()


def build_codes(x: np.ndarray, cfg: SemanticIdConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(codes [N, levels + 1], centroids)`` of vectors ``x`` under ``cfg`` (deterministic); the
    centroids have ``levels + 1`` rows when the final level is a residual one."""
    method = rq_kmeans if cfg.method == "rq_kmeans" else rq_vae
    codes, centroids = method(x, cfg.levels, cfg.codebook_size, cfg.iterations, cfg.seed)
    if cfg.collisions == "residual":
        return residual_final_level(x, codes, centroids, cfg.codebook_size, cfg.iterations, cfg.seed)
    return number_collisions(codes, cfg.codebook_size), centroids


def ensure_codes(cfg: DataConfig, item_ids: Sequence[str], x: np.ndarray, what: str, write_dir: str | Path,
                 reuse: Sequence[str | Path] = ()) -> SemanticIds:
    """The semantic IDs of the catalog ``item_ids`` with vectors ``x`` (``what``: where they came from),
    from ``write_dir``'s cache (or one of ``reuse``'s: a dataset prepared before) when it was built
    from the same vectors, items and settings; else built and cached in ``write_dir``."""
    sid = cfg.semantic_ids
    if sid.codebook_size ** (sid.levels + 1) < len(item_ids):
        raise ConfigError(f"config key 'data.semantic_ids.codebook_size': {sid.levels} levels and a final code, "
                          f"{sid.codebook_size} codes each, name at most {sid.codebook_size ** (sid.levels + 1):,} items; "
                          f"the catalog has {len(item_ids):,} (raise data.semantic_ids.codebook_size or levels)")
    write_dir, reuse = Path(write_dir), [Path(r) for r in reuse]
    write_dir.mkdir(parents=True, exist_ok=True)
    settings = json.dumps(asdict(sid), sort_keys=True)
    key = {"settings": settings, "vectors_sha256": _sha(x), "items_sha256": _sha("\x00".join(map(str, item_ids)))}
    for d in [write_dir, *reuse]:
        path = d / SID_FILE
        if path.is_file():
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            if all(meta.get(k) == v for k, v in key.items()):
                t = load_file(str(path))
                ids = SemanticIds(list(item_ids), t["codes"].astype(np.int64), t["centroids"], json.loads(meta["report"]))
                if d != write_dir:
                    _save(write_dir, ids, key)
                return ids
    log.info("building semantic IDs of %d items: %s, %s", len(item_ids), sid.method, what)
    codes, centroids = build_codes(x, sid)
    report = {"source": what, "method": sid.method, "collisions": sid.collisions, "levels": sid.levels,
              "codebook_size": sid.codebook_size, "items": len(item_ids), **diagnostics(codes, sid.codebook_size)}
    ids = SemanticIds(list(item_ids), codes, centroids, report)
    _save(write_dir, ids, key)
    return ids


def _save(root: Path, ids: SemanticIds, key: dict) -> None:
    path = root / SID_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # job-array parts may write it at once
    save_file({"codes": ids.codes.astype(np.int32), "centroids": ids.centroids.astype(np.float32)}, str(tmp),
              metadata={**key, "report": json.dumps(ids.report)})
    os.replace(tmp, path)


def load(dataset_dir: str | Path) -> SemanticIds:
    """A prepared dataset's semantic IDs (rows in ``items.parquet`` order)."""
    d = Path(dataset_dir)
    path = d / SID_FILE
    if not path.is_file():
        raise ConfigError(f"{d}: no {SID_FILE}; prepare the dataset with data.text.item_repr semantic_id")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    t = load_file(str(path))
    item_ids = pd.read_parquet(d / "items.parquet", columns=["item_id"])["item_id"].astype(str).tolist()
    if len(item_ids) != len(t["codes"]):
        raise ConfigError(f"{path}: {len(t['codes'])} items' codes for a catalog of {len(item_ids)}; prepare again")
    return SemanticIds(item_ids, t["codes"].astype(np.int64), t["centroids"], json.loads(meta.get("report", "{}")))


def summary_lines(report: dict) -> list[str]:
    """The console's account of the codes (``m6rec prepare``)."""
    usage = ", ".join(f"{u:.0%}" for u in report["codebook_usage"])
    return [f"semantic IDs: {report['method']} on {report['source']}, {report['levels']} levels x "
            f"{report['codebook_size']} codes + 1 level that tells apart the items sharing them "
            f"({report.get('collisions', 'number')})",
            f"  codebook usage per level: {usage}; items sharing all {report['levels']} codes with another: "
            f"{report['collision_rate']:.1%}; largest such group: {report['largest_shared_prefix']}"]
