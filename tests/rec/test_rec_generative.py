"""Generative next-item recommendation on a real prepared dataset and real (tiny, briefly) trained runs.

One module-level fixture prepares the generic test shop twice (item text, and
item tokens: the ID baseline) and trains the tiny model a few steps on each
with the real engine (ZeRO 2 and ZeRO 0 checkpoints), in this process.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers.generic_data import write_generic_logs
from helpers.runs import prepare_and_train, shard_samples

from m6rec.cli import main as cli_main
from m6rec.data import text as T
from m6rec.data.prompts import ContextBuilder, batches_by_length, collate
from m6rec.model.batch import Batch
from m6rec.rec.evaluate import EvalData, evaluate
from m6rec.rec.generative import GenerativeRecommender, ItemTrie
from m6rec.train.run_dir import load_run


class Setup:
    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.run = load_run(run_dir)
        self.ctx = ContextBuilder(self.run.cfg, self.run.dataset_dir, self.run.tokenizer)
        self.data = EvalData.load(self.run.dataset_dir)
        self.model = self.run.model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    root = write_generic_logs(tmp / "logs")
    text_dir = prepare_and_train(tmp, root, "text", 2)
    token_dir = prepare_and_train(tmp, root, "token", 0, "--data.text.item_repr", "token")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is ~10x faster on a busy 2-core machine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield {"text": Setup(text_dir), "token": Setup(token_dir), "tmp": tmp}
    torch.set_num_threads(threads)


def _teacher_forced(setup, prompt, seq, end_ids, alpha=1.0):
    """The slow way: one full forward of prompt + the item's tokens, length-normalised log-prob with END."""
    ids = torch.tensor(np.concatenate([prompt.ids, seq]))[None]
    n = ids.shape[1]
    prefix = torch.tensor(np.concatenate([prompt.prefix, np.zeros(len(seq), dtype=bool)]))[None]
    kw = {}
    if prompt.image_items:
        kw = {"image_patches": torch.from_numpy(np.stack([setup.ctx.pixels(i) for i in prompt.image_items])),
              "image_positions": torch.tensor([[0, s] for s in prompt.image_starts])}
    with torch.no_grad():
        logits = setup.model(Batch(ids, position_ids=torch.arange(n)[None],
                                   document_ids=torch.zeros(1, n, dtype=torch.long), prefix_mask=prefix, **kw)
                             ).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    L = len(prompt.ids)
    total = sum(float(logp[L - 1 + j, tok]) for j, tok in enumerate(seq))
    total += float(torch.logsumexp(logp[L - 1 + len(seq), end_ids], dim=0))
    return total / (len(seq) + 1) ** alpha


def test_trie_holds_exactly_the_catalog_with_training_ids(runs):
    s = runs["text"]
    rec = GenerativeRecommender(s.model, s.ctx, beam=10)
    enc = s.ctx.enc
    expected = [enc.encode([T.Segment(s.ctx.catalog.item_text[i], True)])[0].tolist() for i in s.ctx.catalog_ids]
    assert rec.trie.sequences() == expected == rec.sequences
    assert sorted(rec.trie.item_node.tolist()) == sorted(set(rec.trie.item_node.tolist()))  # distinct texts here
    assert rec.trie.subtree[0] == len(s.ctx.catalog_ids) == int(rec.trie.items_at.sum())
    leaves = {n for n in range(rec.trie.n_nodes) if rec.trie.child_ptr[n] == rec.trie.child_ptr[n + 1]}
    assert leaves <= set(rec.trie.item_node.tolist())  # every path ends in an item
    # the title ids are the ids the training text carries (segment-wise encoding)
    seq = dict(zip(s.ctx.catalog_ids, expected))
    seen = 0
    for meta, ids, _ in shard_samples(s.run.dataset_dir, "train"):
        text = ids.tolist()
        for item in meta["items"]:
            q = seq[item]
            assert any(text[j:j + len(q)] == q for j in range(len(text) - len(q) + 1)), item
            seen += 1
    assert seen > 100
    # shared prefixes and a text that is a prefix of another are handled
    t = ItemTrie([[1, 2], [1, 2, 3], [1, 4], [1, 2]])
    assert t.sequences() == [[1, 2], [1, 2, 3], [1, 4], [1, 2]]
    assert t.items_of(t.item_node[0]).tolist() == [0, 3] and t.subtree[t.item_node[0]] == 3


def test_prompts_are_the_training_text(runs):
    """The eval prompt equals the prepared valid/test sample up to <|predict|><|item|>, posters included."""
    for name in ("text", "token"):
        s = runs[name]
        item_id = s.run.tokenizer.token_to_id(T.ITEM)
        for split in ("valid", "test"):
            queries = {q.user_id: q for q in s.data.queries(split)}
            n = 0
            for meta, ids, mask in shard_samples(s.run.dataset_dir, split):
                q = queries[meta["user_id"]]
                assert meta["targets"] == [q.target]
                p = s.ctx.for_query(q)
                L = len(p.ids)
                assert p.ids[-1] == item_id and p.ids.tolist() == ids[:L].tolist()
                assert p.prefix.tolist() == ((mask[:L] & T.MASK_CONTEXT) != 0).tolist()
                assert len(p.image_items) * s.ctx.P == int(((mask[:L] & T.MASK_IMAGE) != 0).sum())
                assert p.context_items == meta["items"][:-1]
                n += 1
            assert n == len(queries)
    # the shop's posters do reach the prompts
    s = runs["text"]
    assert any(s.ctx.for_query(q).image_items for q in s.data.queries("test"))


def test_text_rankings_are_catalog_items_without_history(runs):
    s = runs["text"]
    queries = s.data.queries("test")
    catalog = set(s.data.catalog)
    for k in (10, 45):
        rec = GenerativeRecommender(s.model, s.ctx, beam=0)
        rankings = rec.rank(queries, k)
        for q, r in zip(queries, rankings):
            assert len(r) == len(set(r)) == min(k, len(catalog - set(q.history)))
            assert set(r) <= catalog and not set(r) & set(q.history)
    report = evaluate(rec, s.data, queries, [1, 5, 10])  # evaluate() asserts the protocol too
    assert 0 <= report["hr@1"] <= report["hr@10"] <= 1


def test_beam_scores_are_teacher_forced_log_probs(runs):
    s = runs["text"]
    queries = s.data.queries("test")[:5]
    rec = GenerativeRecommender(s.model, s.ctx, beam=8)
    end = torch.tensor(rec.end_ids)
    assert s.run.tokenizer.token_to_id(T.ITEM) in rec.end_ids and s.run.tokenizer.token_to_id(T.EOS) in rec.end_ids
    assert s.run.tokenizer.encode(", rated 4").ids[0] in rec.end_ids
    seq = dict(zip(s.ctx.catalog_ids, rec.sequences))
    beam = rec.rank_with_scores(queries, 5)
    exhaustive = GenerativeRecommender(s.model, s.ctx, beam=len(s.data.catalog)).rank_with_scores(queries, 10)
    for q, got, full in zip(queries, beam, exhaustive):
        p = s.ctx.for_query(q)
        for item, score in got:
            assert score == pytest.approx(_teacher_forced(s, p, seq[item], end), abs=1e-4)
        # a beam as wide as the catalog is exact: the top 10 of every eligible item, scored the slow way
        slow = sorted((_teacher_forced(s, p, seq[i], end) for i in s.data.catalog if i not in p.exclude), reverse=True)
        assert [sc for _, sc in full] == pytest.approx(slow[:10], abs=1e-4)
        assert [sc for _, sc in full] == sorted((sc for _, sc in full), reverse=True)
    # without length normalisation: the item's probability under the model
    q = queries[0]
    p = s.ctx.for_query(q)
    (got,) = GenerativeRecommender(s.model, s.ctx, beam=len(s.data.catalog), length_norm=0.0).rank_with_scores([q], 10)
    slow = sorted((_teacher_forced(s, p, seq[i], end, 0.0) for i in s.data.catalog if i not in p.exclude), reverse=True)
    assert [sc for _, sc in got] == pytest.approx(slow[:10], abs=1e-4)


def test_token_mode_is_the_item_token_softmax(runs):
    s = runs["token"]
    rec = GenerativeRecommender(s.model, s.ctx)
    assert rec.mode == "token"
    queries = s.data.queries("test")[:8]
    ranked = rec.rank_with_scores(queries, 10)
    tok_ids = [s.run.tokenizer.token_to_id(T.item_token(i)) for i in s.ctx.catalog_ids]
    for q, got in zip(queries, ranked):
        p = s.ctx.for_query(q)
        n = len(p.ids)
        kw = {}
        if p.image_items:
            kw = {"image_patches": torch.from_numpy(np.stack([s.ctx.pixels(i) for i in p.image_items])),
                  "image_positions": torch.tensor([[0, st] for st in p.image_starts])}
        with torch.no_grad():
            logits = s.model(Batch(torch.from_numpy(p.ids)[None], position_ids=torch.arange(n)[None],
                                   document_ids=torch.zeros(1, n, dtype=torch.long),
                                   prefix_mask=torch.from_numpy(p.prefix)[None], **kw)).logits[0, -1]
        logp = torch.log_softmax(logits[tok_ids].double(), dim=0).numpy()
        order = [j for j in np.argsort(-logp, kind="stable") if s.ctx.catalog_ids[j] not in set(q.history)][:10]
        assert [i for i, _ in got] == [s.ctx.catalog_ids[j] for j in order]
        assert [sc for _, sc in got] == pytest.approx(logp[order].tolist(), abs=1e-5)


def test_evaluation_targets_never_reach_training_shards(runs):
    s = runs["text"]
    sp = s.data.splits
    for split in ("valid", "test"):
        saved = sp[sp.split == split].set_index("user_id")["item_id"].to_dict()
        qs = s.data.queries(split)
        assert {q.user_id: q.target for q in qs} == saved
    valid_pos = sp[sp.split == "valid"].set_index("user_id")["position"].to_dict()
    test_pos = sp[sp.split == "test"].set_index("user_id")["position"].to_dict()
    n = 0
    for meta, _, _ in shard_samples(s.run.dataset_dir, "train"):
        assert max(meta["positions"]) < valid_pos[meta["user_id"]] < test_pos[meta["user_id"]]
        n += 1
    assert n > 0


def test_eval_command_writes_one_table(runs, tmp_path, capsys):
    out = tmp_path / "eval" / "next_item.json"
    rc = cli_main(["eval", "--ckpt", str(runs["text"].run_dir), "--ckpt", str(runs["token"].run_dir),
                   "--task", "next_item", "--split", "test", "--max-users", "15", "--ks", "1,5,10",
                   "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["results"]] == ["popularity", "m6rec-text (run_text, step00000006)",
                                                   "m6rec-token (run_token, step00000006)"]
    meta = res["meta"]
    assert meta["split"] == "test" and meta["users"] == 15 and meta["models"][0]["checkpoint"] == "step00000006"
    assert meta["dataset"] == str(runs["text"].run.dataset_dir) and meta["task"] == "next_item"
    assert [m["mode"] for m in meta["models"]] == ["text", "token"]
    assert all(r["users"] == 15 and 0 <= r["hr@10"] <= 1 for r in res["results"])
    md = out.with_suffix(".md").read_text()
    assert "| popularity |" in md and "| m6rec-text (run_text, step00000006) |" in md
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| m6rec-token (run_token, step00000006) |" in capsys.readouterr().out
    assert cli_main(["eval", "--ckpt", str(runs["text"].run_dir), "--task", "ctr", "--out", str(out)]) == 2


def _run_with_tags(src, dst, tags):
    """A run directory ``dst`` whose checkpoints ``tags`` are all ``src``'s newest one (linked), newest named last."""
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "config.yaml").write_bytes((src / "config.yaml").read_bytes())
    for tag in tags:
        (dst / "checkpoints" / tag).symlink_to(src / "checkpoints" / "step00000006", target_is_directory=True)
    (dst / "checkpoints" / "latest").write_text(tags[-1])
    return dst


def test_eval_tag_applies_to_every_run(runs, tmp_path, capsys):
    """--tag with several --ckpt ranks each run's tagged checkpoint, not its newest; a run without it is refused."""
    a = _run_with_tags(runs["text"].run_dir, tmp_path / "a", ["step00000003", "step00000006"])
    b = _run_with_tags(runs["token"].run_dir, tmp_path / "b", ["step00000003", "step00000006"])
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--ckpt", str(a), "--ckpt", str(b), "--tag", "step00000003", "--split", "test",
                     "--max-users", "3", "--ks", "1,5", "--out", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert [m["checkpoint"] for m in meta["models"]] == ["step00000003", "step00000003"]
    capsys.readouterr()
    c = _run_with_tags(runs["token"].run_dir, tmp_path / "c", ["step00000006"])
    assert cli_main(["eval", "--ckpt", str(a), "--ckpt", str(c), "--tag", "step00000003", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"m6rec eval: --ckpt {c} --tag step00000003: ") and "not a complete checkpoint" in err
    assert len(err.splitlines()) == 1
    assert cli_main(["eval", "--ckpt", str(a), "--ckpt", str(b), "--tag", "best", "--out", str(out)]) == 2
    assert f"--ckpt {a} --tag best: {a / 'best.json'} missing" in capsys.readouterr().err


def test_export_fp32_and_hf_of_both_checkpoints(runs, tmp_path, capsys):
    """`m6rec export` of the fixture's real checkpoints (ZeRO 2: merged from the optimizer's fp32
    partitions; ZeRO 0: the module itself): the weights the run directory's opener loads, and a
    Llama directory that loads back to the same logits."""
    from safetensors.torch import load_file

    from m6rec.model.hf import load_hf

    for name in ("text", "token"):
        setup = runs[name]
        out = tmp_path / f"{name}.safetensors"
        assert cli_main(["export", "--ckpt", str(setup.run_dir / "checkpoints"), str(out)]) == 0
        assert f"fp32 weights written to {out}" in capsys.readouterr().out
        exported, live = load_file(str(out)), setup.model.state_dict()
        assert exported.keys() == live.keys()
        assert all(torch.equal(exported[k], live[k].float()) for k in live)
    hf_dir = tmp_path / "hf"
    assert cli_main(["export", "--ckpt", str(runs["token"].run_dir / "checkpoints" / "step00000006"), "--to", "hf",
                     str(hf_dir)]) == 0
    back, ids = load_hf(hf_dir), torch.randint(4, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(Batch(ids)).logits, runs["token"].model(Batch(ids)).logits,
                                   atol=1e-4, rtol=0)


def _printed_items(out):
    return [line.split()[1] for line in out.splitlines() if line[:4].strip().rstrip(".").isdigit()]


def test_recommend_command(runs, capsys):
    s = runs["text"]
    user = s.data.queries("test")[0].user_id
    assert cli_main(["recommend", "--ckpt", str(s.run_dir), "--user", user, "--k", "7"]) == 0
    items = _printed_items(capsys.readouterr().out)
    history = set(s.ctx.timeline(user)[0].tolist())
    assert len(items) == len(set(items)) == 7 and not set(items) & history and set(items) <= set(s.data.catalog)

    assert cli_main(["recommend", "--ckpt", str(s.run_dir), "--history",
                     "Product 3; product 7;  My garden hose ", "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "'Product 3' -> item sku-3" in out and "'product 7' -> item sku-7" in out
    assert "'My garden hose' -> not in the catalog" in out
    items = _printed_items(out)
    assert len(items) == len(set(items)) == 5 and not {"sku-3", "sku-7"} & set(items)

    assert cli_main(["recommend", "--ckpt", str(runs["token"].run_dir), "--user", user, "--k", "3"]) == 0
    assert len(_printed_items(capsys.readouterr().out)) == 3
    assert cli_main(["recommend", "--ckpt", str(s.run_dir), "--user", "nobody"]) == 2


def test_free_text_history_prompt(runs):
    s = runs["text"]
    prompt, matched = s.ctx.for_titles("Product 3; PRODUCT 7; My garden hose")
    assert matched == [("Product 3", "sku-3"), ("PRODUCT 7", "sku-7"), ("My garden hose", None)]
    assert prompt.exclude == {"sku-3", "sku-7"}
    text = s.run.tokenizer.decode(prompt.ids.tolist(), skip_special_tokens=False)
    assert s.ctx.catalog.item_text["sku-3"] in text and "<|item|>My garden hose, same day<|predict|><|item|>" in text
    assert text.startswith("<|bos|><|context|><|item|>") and "User:" not in text
    assert prompt.image_items == []  # neither sku-3 nor sku-7 has a poster
    prompt, _ = s.ctx.for_titles("Product 0")
    assert prompt.image_items == ["sku-0"]


def test_batches_by_length_returns_results_in_the_original_order():
    from types import SimpleNamespace

    lengths = [5, 2, 9, 2, 7, 1, 5, 3]
    prompts = [SimpleNamespace(ids=np.zeros(n), name=i) for i, n in enumerate(lengths)]
    batches = batches_by_length(prompts, 3)
    assert [len(b) for _, b in batches] == [3, 3, 2]
    seen = [len(p.ids) for _, b in batches for p in b]
    assert seen == sorted(lengths)  # similar lengths share a batch
    out = [None] * len(prompts)
    for idx, batch in batches:
        assert [prompts[i] for i in idx] == batch
        for i, p in zip(idx, batch):
            out[i] = p.name * 10  # a per-prompt "result"
    assert out == [i * 10 for i in range(len(prompts))]
    assert batches_by_length([], 4) == []


def test_item_marker_labels_only_where_they_end_a_title(runs):
    """item_repr token: the <|item|> after an item is certain, so by default it carries no loss (half the LM
    head on ID-only data); text mode keeps it (it ends a title); the setting can force either way."""
    from m6rec.data.stream import IGNORE_INDEX, PackedStream

    def labels(setup, **kw):
        ds = setup.run.dataset_dir
        st = PackedStream(ds, "train", seq_len=256, batch_size=4, num_workers=1, shuffle=False, policy="pad",
                          world_size=1, rank=0, **kw)
        marker = json.loads((ds / "manifest.json").read_text())["special_tokens"][T.ITEM]
        lab = torch.cat([b["labels"].flatten() for b in st])
        return int((lab == marker).sum()), int((lab != IGNORE_INDEX).sum())

    tok_default, tok_all = labels(runs["token"])
    tok_forced, tok_all_forced = labels(runs["token"], item_marker_loss=True)
    assert tok_default == 0 and tok_forced > 0
    assert tok_all_forced - tok_all == tok_forced  # nothing else changed
    text_default, _ = labels(runs["text"])
    text_off, _ = labels(runs["text"], item_marker_loss=False)
    assert text_default > 0 and text_off == 0
    # the config key reaches the stream
    import dataclasses

    from m6rec.data.loader import StreamLoader
    data = runs["token"].run.cfg.data
    forced = dataclasses.replace(data, output=str(runs["token"].run.dataset_dir),
                                 stream=dataclasses.replace(data.stream, item_marker_loss=True, num_workers=1))
    assert StreamLoader.from_config(forced, world_size=1, rank=0).dataset.unlabelled_id == -1
    assert StreamLoader.from_config(dataclasses.replace(forced, stream=dataclasses.replace(
        forced.stream, item_marker_loss=None)), world_size=1, rank=0).dataset.unlabelled_id >= 0


@pytest.mark.parametrize("attn_impl", ["sdpa", "varlen", "flex"])
def test_padded_static_shapes_rank_the_same(runs, attn_impl):
    """On CUDA ranking batches are padded to fixed shapes (whole batch of rows, lengths a multiple of 128)
    so compiled masks and kernels are not rebuilt for every batch: the padding must change no score.
    CUDA ranks with "sdpa" (a dense mask) or FlexAttention; here both run on the CPU with the same masks."""
    s = runs["token"]
    queries = s.data.queries("test")[:11]
    old = s.model.args.attn_impl
    s.model.args.attn_impl = attn_impl
    try:
        plain = GenerativeRecommender(s.model, s.ctx, batch_size=8)
        padded = GenerativeRecommender(s.model, s.ctx, batch_size=8)
        assert plain.static_shape == {}  # on the CPU nothing is padded by default
        padded.static_shape = dict(rows=8, multiple=128)
        a, b = plain.rank_with_scores(queries, 10), padded.rank_with_scores(queries, 10)
    finally:
        s.model.args.attn_impl = old
    assert [[i for i, _ in r] for r in a] == [[i for i, _ in r] for r in b]
    assert [sc for r in a for _, sc in r] == pytest.approx([sc for r in b for _, sc in r], abs=1e-4)
    batch = collate([s.ctx.for_query(q) for q in queries[:3]], s.ctx, padded.pad_id, "cpu", rows=8, multiple=128)
    assert batch["input_ids"].shape == (8, 128) and batch["lengths"].shape == (3,)
    assert (batch["document_ids"][3:] == -1).all()
