"""End-to-end ``m6rec prepare``: real files in, real tar shards out, read back with tar and webdataset."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from helpers.generic_data import generic_args, generic_cfg, write_generic_logs
from PIL import Image

from m6rec.cli import main as cli_main
from m6rec.config import ConfigError, load_config
from m6rec.data import prepare as P
from m6rec.data import text as T
from m6rec.data.loader import StreamLoader
from m6rec.data.split import load_split


def read_all(out):
    """Every sample of every split, read with stock webdataset (no m6rec code)."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {}
    for split, sp in manifest["splits"].items():
        for sh in sp["shards"]:
            path = out / sh["url"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sh["sha256"]
            got = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
            assert len(got) == sh["samples"]
            assert [int(np.load(io.BytesIO(s["ids.npy"])).shape[0]) for s in got] == sh["lengths"]
            for s in got:
                samples[s["__key__"]] = s
    return manifest, samples


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shop")
    root = write_generic_logs(tmp / "logs")
    cfg = generic_cfg(root, tmp / "ds")
    with pytest.warns(UserWarning, match="broken.jpg"):
        P.prepare(cfg.data, workers=1)
    return tmp, root, cfg


def test_prepare_generic_end_to_end(shop):
    tmp, root, cfg = shop
    out = tmp / "ds"
    manifest, samples = read_all(out)
    report = json.loads((out / "prepare_report.json").read_text())
    assert any("broken.jpg" in m for m in report["images_failed"])
    split = load_split(out / "splits.parquet")
    assert manifest["splits"]["valid"]["samples"] == manifest["splits"]["test"]["samples"] == split["user_id"].nunique()
    valid_pos = split[split.split == "valid"].set_index("user_id")["position"]
    images_seen = 0
    for key, s in samples.items():
        meta = json.loads(s["json"])
        ids = np.load(io.BytesIO(s["ids.npy"]), allow_pickle=False)
        mask = np.load(io.BytesIO(s["mask.npy"]), allow_pickle=False)
        assert len(ids) == len(mask) == meta["num_tokens"]
        # the plain text holds the same regions the masks mark
        text = s["txt"].decode()
        assert text.startswith("<|bos|><|context|>") and text.endswith("<|eos|>")
        assert ("User: tier: " in text)
        # no validation or test target ever reaches a training sample
        if meta["split"] == "train":
            assert max(meta["positions"]) < valid_pos[meta["user_id"]], key
        else:
            assert meta["targets"] == meta["items"][-1:]
        # images: exactly one member per item of the window that has a decodable image, never a fake one
        img_members = sorted(k for k in s if k.startswith("img."))
        assert img_members == sorted({T.image_member(i) for i in meta["images"]})  # a repeated item shares one member
        assert "sku-1" not in meta["images"]  # its image is broken: no image at all
        for i in meta["images"]:
            assert int(i.split("-")[1]) % 6 == 0
            with Image.open(io.BytesIO(s[T.image_member(i)])) as im:
                assert im.size == (32, 32)
            images_seen += 1
        assert int(((mask & T.MASK_IMAGE) > 0).sum()) == 4 * len(meta["images"])  # P = (32/16)^2
    assert images_seen > 0
    # plain tar reads the shards too
    listing = subprocess.run(["tar", "tf", str(out / manifest["splits"]["train"]["shards"][0]["url"])],
                             capture_output=True, text=True, check=True).stdout.split()
    assert any(n.endswith(".txt") for n in listing) and any(n.endswith(".ids.npy") for n in listing)
    # the staging directory is gone once the dataset is in place
    assert not (tmp / "ds.staging").exists()


def test_workers_and_parts_give_the_same_samples(shop):
    tmp, root, cfg = shop
    _, one = read_all(tmp / "ds")
    two_cfg = generic_cfg(root, tmp / "ds2")
    with pytest.warns(UserWarning):
        P.prepare(two_cfg.data, workers=2)
    _, two = read_all(tmp / "ds2")
    # cluster style: each part separately (as a job array would), then the merge, through the CLI
    args = generic_args(root, tmp / "ds3")
    with pytest.warns(UserWarning):
        for part in (1, 0, 2):
            assert cli_main(["prepare", "--part", str(part), "--num-parts", "3", *args]) == 0
    assert cli_main(["prepare", "--merge", "--num-parts", "3", *args]) == 0
    _, three = read_all(tmp / "ds3")

    def content(samples):
        return {k: (s["txt"], s["ids.npy"], s["mask.npy"]) for k, s in samples.items()}

    assert content(one) == content(two) == content(three)
    shards = json.loads((tmp / "ds2" / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert {sh["url"].split("-")[1] for sh in shards} == {"p000", "p001"}  # two disjoint shard sets


def test_merge_refuses_missing_part(shop, capsys):
    tmp, root, cfg = shop
    c = generic_cfg(root, tmp / "ds4")
    with pytest.warns(UserWarning):
        P.prepare_part(c.data, 0, 2)
    with pytest.raises(ConfigError, match="part 1 of 2 is missing"):
        P.merge(c.data, 2)
    assert not (tmp / "ds4").exists()


def test_failed_prepare_keeps_the_previous_dataset(shop, monkeypatch):
    tmp, root, cfg = shop
    out = tmp / "ds"
    before = (out / "manifest.json").read_bytes()
    calls = {"n": 0}
    real_write = P._ShardSet.write

    def crash_midway(self, sample, n):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk full")
        return real_write(self, sample, n)

    monkeypatch.setattr(P._ShardSet, "write", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"), pytest.warns(UserWarning):
        P.prepare(cfg.data, workers=1)
    assert (out / "manifest.json").read_bytes() == before
    manifest, samples = read_all(out)  # still complete and consistent
    assert len(samples) == sum(sp["samples"] for sp in manifest["splits"].values())


def test_bad_inputs_name_the_problem(tmp_path, shop):
    _, root, _ = shop
    with pytest.raises(ConfigError, match="data.root"):
        P.prepare(generic_cfg(tmp_path / "nowhere", tmp_path / "o").data)
    with pytest.raises(ConfigError, match="data.tokenizer.path"):
        with pytest.warns(UserWarning):
            P.prepare(generic_cfg(root, tmp_path / "o", "--data.tokenizer.path", str(tmp_path / "none.json")).data)
    with pytest.raises(ConfigError, match="min_rating"):
        P.prepare(generic_cfg(root, tmp_path / "o", "--data.filters.min_rating", "9").data)
    assert not (tmp_path / "o").exists()


def test_existing_tokenizer_is_used(tmp_path, shop):
    tmp, root, _ = shop
    tok_file = tmp / "ds" / "tokenizer.json"
    cfg = generic_cfg(root, tmp_path / "o", "--data.tokenizer.path", str(tok_file), "--data.text.item_repr", "both")
    with pytest.warns(UserWarning):
        m = P.prepare(cfg.data)
    base = json.loads(tok_file.read_text())
    assert m["vocab_size"] == len(base["model"]["vocab"]) + 60  # + one token per catalog item
    _, samples = read_all(tmp_path / "o")
    assert any("<item_sku-3>" in s["txt"].decode() for s in samples.values())


# ----------------------------------------------------------------------------------------------
# Real MovieLens sets
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ml1m_prepared(tmp_path_factory):
    from conftest import shared_data_root

    root = shared_data_root() / "ml-1m-partial"
    if not root.is_dir():
        pytest.skip(f"shared MovieLens data not found at {root} (set M6REC_DATA_ROOT)")
    out = tmp_path_factory.mktemp("real") / "ml-1m-partial"
    cfg = load_config("configs/data/ml-1m-partial.yaml", ["--data.root", str(root), "--data.output", str(out)])
    P.prepare(cfg.data, workers=2)
    return cfg, out


def test_ml1m_partial_real_with_posters(ml1m_prepared):
    cfg, out = ml1m_prepared
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["valid"]["samples"] == m["splits"]["test"]["samples"] == 2999
    with tarfile.open(out / m["splits"]["train"]["shards"][0]["url"]) as tf:
        names = tf.getnames()
        jpgs = [n for n in names if n.endswith(".jpg")]
        txt = tf.extractfile([n for n in names if n.endswith(".txt")][0]).read().decode()
    assert jpgs, "posters travel inside the shards"
    assert "User: age: " in txt and "gender: " in txt and "occupation: " in txt
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["images_found"] == 288 and report["interactions"] == 487650
    # what training consumes: packed rows are >= 95% real tokens
    loader = StreamLoader(out, "train", cfg.data.stream, rank=0, world_size=1, inline_workers=True)
    assert loader.packing_efficiency >= 0.95
    real = total = 0
    for i, batch in zip(range(150), loader):  # the rows of the first blocks, as training reads them
        assert batch["input_ids"].shape == (cfg.data.stream.batch_size, cfg.data.stream.seq_len)
        real += int((batch["document_ids"] >= 0).sum())
        total += batch["document_ids"].numel()
    assert real / total >= 0.95, real / total


@pytest.mark.parametrize("name, users", [("ml-100k", 943), ("ml-latest-small", 610)])
def test_real_small_sets(tmp_path, shared_data, name, users):
    overrides = ["--data.output", str(tmp_path / name)]
    if name == "ml-100k":
        overrides += ["--data.root", str(shared_data / name)]
    cfg = load_config(f"configs/data/{name}.yaml", overrides)
    m = P.prepare(cfg.data)
    assert m["splits"]["test"]["samples"] == users
    _, samples = read_all(tmp_path / name)
    keys = Counter(json.loads(s["json"])["split"] for s in samples.values())
    assert keys["valid"] == keys["test"] == users


def test_prepare_says_on_the_console_what_it_skipped(tmp_path, capsys):
    """Four malformed rows planted in the interactions file, a duplicate row and the shop's broken
    poster: `m6rec prepare` names them on the console (count, why, the first as file:line), not only
    in prepare_report.json."""
    import warnings

    root = write_generic_logs(tmp_path / "logs")
    path = root / "interactions.csv"
    lines = path.read_text().splitlines()
    lines += ["user.1,sku-2,not-a-time,4.0", "user.2,sku-3", "user.3,sku-4,1600000000,five", lines[1],
              "user.4,,1600000000,3.0"]
    path.write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["prepare", *generic_args(root, tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    n = report["malformed_rows"]
    assert n == 4, report["malformed_examples"]
    assert f"skipped {n:,} malformed row(s): {report['malformed_examples'][0]}" in out
    assert "interactions.csv:" in out
    assert f"dropped {report['duplicates_removed']:,} duplicate rows" in out and report["duplicates_removed"] >= 1
    assert "left out 1 image(s) that failed to load" in out and "broken.jpg" in out
