"""Retrieval, ranking, option tuning and zero-shot evaluation on a real (tiny, briefly) trained run.

One module fixture prepares the generic test shop (item text, ratings 1-5, posters),
pretrains the tiny model a few steps with the real engine, and fine-tunes it through
the real ``m6rec finetune`` command (DeepSpeed, one rank): retrieval by option tuning
and ranking by full fine-tuning.  A second shop with 20 extra products, prepared with
the first one's tokenizer, is the zero-shot catalog.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.generic_data import generic_cfg, write_generic_logs
from helpers.runs import prepare_and_train
from safetensors.torch import load_file

from m6rec.cli import main as cli_main
from m6rec.config import ConfigError, FinetuneConfig
from m6rec.data import prepare as P
from m6rec.data.prompts import ContextBuilder, collate
from m6rec.model.batch import Batch
from m6rec.model.options import Options
from m6rec.rec.evaluate import EvalData
from m6rec.rec.finetune import (
    Examples,
    Retriever,
    TaskModel,
    answer_ids,
    load_task_run,
    ranking_examples,
    with_options,
)
from m6rec.train.run_dir import load_run

FT = ["--finetune.steps", "4", "--finetune.batch_size", "6", "--finetune.negatives", "8", "--finetune.log_every", "2",
      "--finetune.warmup_steps", "1", "--train.wandb.mode", "disabled"]
# option tuning as first built (options in the input, adapters): the fixture's run and the two-rank test
LEGACY = ["--finetune.option_layers", "input", "--finetune.lora_rank", "0", "--finetune.tune_norms", "false",
          "--finetune.attn_pool", "false"]
LEGACY_FT = dict(option_layers="input", lora_rank=0, tune_norms=False, attn_pool=False)  # with options, adapter_dim


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    root = write_generic_logs(tmp / "logs")
    base = prepare_and_train(tmp, root, "text", 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["finetune", "--ckpt", str(base), *FT, *LEGACY, "--finetune.task", "retrieval",
                         "--finetune.method", "option", "--finetune.options", "2", "--finetune.adapter_dim", "4",
                         "--finetune.run_dir", str(tmp / "ret_option")]) == 0
        assert cli_main(["finetune", "--ckpt", str(base), *FT, "--finetune.task", "ranking",
                         "--finetune.method", "full", "--finetune.run_dir", str(tmp / "rank_full")]) == 0
        # the zero-shot catalog: another shop (20 products more), written with the base run's tokenizer
        root2 = write_generic_logs(tmp / "logs2", n_users=30, n_items=80, seed=1)
        other = generic_cfg(root2, tmp / "ds_other", "--data.tokenizer.path", str(tmp / "ds_text" / "tokenizer.json"))
        P.prepare(other.data, workers=1)
        yield {"tmp": tmp, "base": base, "other": tmp / "ds_other", "root2": root2}
    torch.set_num_threads(threads)


def test_option_tuning_trains_under_one_percent(setup):
    tmp = setup["tmp"]
    meta = json.loads((tmp / "ret_option" / "finetune.json").read_text())
    assert meta["method"] == "option" and meta["steps"] == 4
    weights = load_file(str(tmp / "ret_option" / "weights.safetensors"))
    assert all(k.startswith(("options.", "log_scale", "bias")) for k in weights), sorted(weights)[:5]
    n = sum(v.numel() for v in weights.values())
    assert n == meta["trained_parameters"] and meta["trained_fraction"] <= 0.01 * 1.0001
    # the adapters moved from their zero start; the frozen LM equals the pretrained checkpoint
    assert any(k.endswith("up.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_adapters_start_as_identity(setup):
    run = load_run(setup["base"])
    ft = FinetuneConfig(method="option", options=0, adapter_dim=8)
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    b = collate([ctx.for_user(ctx.catalog_ids and sorted(ctx._timeline)[0])], ctx, 0, "cpu")
    b.pop("lengths")
    with torch.no_grad():
        before = run.model.hidden_states(Batch.of(b))
        model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
        after = model.lm.hidden_states(Batch.of(b))
        assert torch.equal(before, after)  # zero-initialised up-projections: the pretrained model exactly
        model.options.adapters[0].up.weight.fill_(0.1)
        assert not torch.allclose(before, model.lm.hidden_states(Batch.of(b)))


def test_options_are_written_after_bos(setup):
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    p = ctx.for_item(ctx.catalog_ids[0])
    placeholder = run.tokenizer.token_to_id("<|context|>")
    q = with_options(p, 3, placeholder)
    assert q.ids[0] == p.ids[0] and (q.ids[1:4] == placeholder).all() and (q.ids[4:] == p.ids[1:]).all()
    assert q.prefix[1:4].all() and [s + 3 for s in p.image_starts] == q.image_starts
    ft = FinetuneConfig(method="option", options=3, adapter_dim=0)
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    seen = {}
    model.lm.tok_embeddings.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    b = collate([q], ctx, 0, "cpu")
    b.pop("lengths")
    model.embed(b, "item")
    assert torch.equal(seen["x"][0, 1:4], model.options.vectors[1])  # the item tower's options
    assert isinstance(model.options, Options)
    b = collate([p], ctx, 0, "cpu")  # a prompt without the placeholders is refused, not silently overwritten
    b.pop("lengths")
    with pytest.raises(RuntimeError, match="placeholders"):
        model.embed(b, "item")


def test_training_examples_come_from_the_train_split_only(setup):
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    splits = EvalData.load(run.dataset_dir).splits
    train_pos = {(u, int(p)) for u, p in splits.loc[splits["split"] == "train", ["user_id", "position"]].itertuples(index=False)}
    for task in ("retrieval", "ranking"):
        ex = Examples(ctx, task)
        assert ex.pairs and all((u, t) in train_pos for u, t in ex.pairs)
        n = run.cfg.data.max_items
        for u, t in ex.pairs[:50]:
            p, target, rating = ex.prompt(u, t)
            items, _, r = ctx.timeline(u)
            # the prompt holds exactly the items before the target (the last max_items - 1 of them)
            assert target == items[t] and p.context_items == [str(i) for i in items[max(0, t - n + 1):t]]
            assert p.exclude == set(items[:t].tolist()) and rating == r[t]
            if task == "ranking":
                assert rating >= 4 or rating <= 2


def test_option_training_moves_only_options_and_adapters(setup):
    """A few real optimizer steps of option tuning: the LM's weights stay bit-identical."""
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    from m6rec.rec.finetune import _batch

    ft = FinetuneConfig(method="option", batch_size=6, negatives=6, options=2, adapter_dim=4, **LEGACY_FT)
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    opts = {k: v.clone() for k, v in model.trainable().items()}
    opt = torch.optim.AdamW(model.trainable().values(), lr=1e-2)
    for step in range(3):
        b = _batch("retrieval", Examples(ctx, "retrieval"), ctx, model, np.random.default_rng(step), ft, 0, 3, "cpu")
        loss = model(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.lm.state_dict().items())
    assert all(not torch.equal(v, opts[k]) for k, v in model.trainable().items() if k != "bias")  # bias: ranking only


def test_contrastive_loss_learns_a_fixed_batch(setup):
    """Full fine-tuning on one batch: the in-batch softmax loss must fall well below its start."""
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    from m6rec.rec.finetune import _batch

    ft = FinetuneConfig(method="full", batch_size=8, negatives=8, query_pool="mean")
    model = TaskModel(run.model, "retrieval", "full", ft, answer_ids(run.tokenizer))
    torch.manual_seed(0)
    b = _batch("retrieval", Examples(ctx, "retrieval"), ctx, model, np.random.default_rng(0), ft, 0, 3, "cpu")
    opt = torch.optim.AdamW(model.trainable().values(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-10:]) < 0.5 * losses[0], losses  # (a 6-step pretrained model: a bumpy descent)


def test_eval_retrieval_and_recommend_with_the_cached_index(setup, tmp_path, capsys):
    tmp = setup["tmp"]
    out = tmp_path / "ret.json"
    assert cli_main(["eval", "--ckpt", str(tmp / "ret_option"), "--ckpt", str(setup["base"]), "--task", "retrieval",
                     "--baseline", str(setup["base"]), "--split", "test", "--ks", "1,5,10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [r["model"] for r in res["results"]]
    assert names == ["popularity", "retrieval-option (ret_option)", "retrieval (pretrained, not fine-tuned)",
                     "m6rec-text (run_text, step00000006)"]  # the next-item baseline in the same table
    assert [m["task"] for m in res["meta"]["models"]] == ["retrieval", "retrieval", "next_item"]
    assert cli_main(["eval", "--ckpt", str(tmp / "rank_full"), "--task", "ranking", "--baseline", str(setup["base"]),
                     "--out", str(tmp_path / "x.json")]) == 2
    for r in res["results"]:
        assert 0 <= r["hr@1"] <= r["hr@5"] <= r["hr@10"] <= 1 and "hr@10_cold" in r and "cold_targets" in r
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 1000
    cached = list((tmp / "ret_option").glob("item_index-*.safetensors"))
    assert len(cached) == 1  # written by finetune, found by eval (no second key)
    # the ranking holds catalog items only, never the user's history, scores descending
    run = load_task_run(tmp / "ret_option", "retrieval")
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    rec = Retriever(run, ctx)
    fresh = run.embed(ctx, [ctx.for_item(i) for i in ctx.catalog_ids], "item")
    assert torch.allclose(rec.index, fresh, atol=1e-5)  # the cached index is what the towers compute now
    data = EvalData.load(run.dataset_dir)
    qs = data.queries("test")
    ranked = rec.rank_prompts([ctx.for_query(q) for q in qs], len(ctx.catalog_ids))
    for q, r in zip(qs, ranked):
        ids = [i for i, _ in r]
        assert not set(ids) & set(q.history) and set(ids) <= set(ctx.catalog_ids)
        assert len(ids) == len(set(ctx.catalog_ids) - set(q.history))
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True)
    capsys.readouterr()
    user = qs[0].user_id
    assert cli_main(["recommend", "--ckpt", str(tmp / "ret_option"), "--user", user, "--k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "top 5 by retrieval-option" in printed and "Product" in printed
    assert cli_main(["recommend", "--ckpt", str(tmp / "ret_option"), "--history", "Product 3; Product 7"]) == 0
    assert "Product" in capsys.readouterr().out


def test_eval_ranking_reports_auc_and_logloss(setup, tmp_path):
    tmp = setup["tmp"]
    out = tmp_path / "rank.json"
    assert cli_main(["eval", "--ckpt", str(tmp / "rank_full"), "--task", "ranking", "--split", "test",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["model"].split(" ")[0]: r for r in res["results"]}
    assert set(rows) == {"popularity", "constant", "ranking-full"}
    run = load_task_run(tmp / "rank_full", "ranking")
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    ex = ranking_examples(ctx, EvalData.load(run.dataset_dir), "test")
    for q, y in ex:  # labels are the held-out ratings: >= 4 positive, <= 2 negative, 3 left out
        r = ctx.timeline(q.user_id)[2][len(q.history)]
        assert y == int(r >= 4) and (r >= 4 or r <= 2)
    m = rows["ranking-full"]
    assert m["examples"] == len(ex) and 0 <= m["auc"] <= 1 and m["logloss"] > 0
    assert "auc" in out.with_suffix(".md").read_text()
    with pytest.raises(ConfigError, match="fine-tuned for 'ranking'"):
        load_task_run(tmp / "rank_full", "retrieval")
    with pytest.raises(ConfigError, match="--tag step00000002: a fine-tuned run holds one set of weights"):
        load_task_run(tmp / "rank_full", "ranking", tag="step00000002")


def test_zero_shot_on_another_catalog(setup, tmp_path):
    tmp = setup["tmp"]
    out = tmp_path / "zs.json"
    assert cli_main(["eval", "--ckpt", str(tmp / "ret_option"), "--task", "retrieval", "--dataset", str(setup["other"]),
                     "--split", "test", "--ks", "1,10", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["meta"]["zero_shot"] and res["meta"]["catalog_size"] == len(EvalData.load(setup["other"]).catalog)
    # products 60-79 exist only in the new catalog: they are the cold items
    assert res["meta"]["cold_items"] == 20
    assert all("hr@10_cold" in r for r in res["results"])
    # next-item generation on the other catalog works the same way (text mode, trie over the new catalog)
    assert cli_main(["eval", "--ckpt", str(setup["base"]), "--dataset", str(setup["other"]), "--split", "test",
                     "--max-users", "5", "--ks", "1,5", "--out", str(tmp_path / "zs_gen.json")]) == 0
    # a dataset written with another tokenizer is refused, naming the fix
    third = generic_cfg(setup["root2"], tmp_path / "ds_third")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        P.prepare(third.data, workers=1)
    assert cli_main(["eval", "--ckpt", str(tmp / "ret_option"), "--task", "retrieval", "--dataset",
                     str(tmp_path / "ds_third"), "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.slow
def test_finetune_on_two_deepspeed_ranks(setup, tmp_path):
    """`deepspeed --num_gpus 2 launch/finetune.py`: two real ranks (gloo), ZeRO 2, option tuning."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # in-process training earlier in this session set RANK, MASTER_PORT, ...: the launcher sets its own
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    out = tmp_path / "ft2"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           "launch/finetune.py", "--ckpt", str(setup["base"]), *FT, *LEGACY, "--finetune.method", "option",
           "--finetune.options", "2", "--finetune.adapter_dim", "4", "--finetune.run_dir", str(out)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = json.loads((out / "finetune.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    weights = load_file(str(out / "weights.safetensors"))
    assert set(weights) == set(load_file(str(setup["tmp"] / "ret_option" / "weights.safetensors")))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_contrastive_loss_masks_duplicate_targets_only(setup):
    """Two queries with the same target: neither is the other's negative; a different item still is."""
    import math

    run = load_run(setup["base"])
    model = TaskModel(run.model, "retrieval", "full", FinetuneConfig(temperature=1.0), answer_ids(run.tokenizer))
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    model.embed = lambda batch, tower: q if tower == "query" else items
    loss = model(query={}, items={}, positives=torch.tensor([5, 5]), candidates=torch.tensor([5, 5, 7]))
    # each row: its own positive (logit 1), the duplicate masked, item 7 (logit 0)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    unmasked = model(query={}, items={}, positives=torch.tensor([5, 6]), candidates=torch.tensor([5, 6, 7]))
    assert unmasked.item() == pytest.approx(-math.log(math.e / (2 * math.e + 1)), rel=1e-6)


# ---------------------------------------------------------------------------
# Option-tuning variants: deep options, LoRA, norm scales, a low-rank head (docs/option_tuning.md)
# ---------------------------------------------------------------------------
def _one_batch(run, ctx, n_options):
    placeholder = run.tokenizer.token_to_id("<|context|>")
    users = sorted(ctx._timeline)[:3]
    b = collate([with_options(ctx.for_user(u), n_options, placeholder) for u in users], ctx, 0, "cpu")
    b.pop("lengths")
    return b


def test_deep_options_reach_every_layer(setup):
    """option_layers "all": each block after the first sees its own learned vector added at the
    option positions (and only there), per tower; gradients reach every layer's vectors."""
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    n = 3
    ft = FinetuneConfig(method="option", options=n, adapter_dim=0, option_layers="all")
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    L = len(model.lm.layers)
    assert L > 1 and model.options.deep.shape == (2, L - 1, n, model.lm.args.dim)
    seen = {}
    for i, layer in enumerate(model.lm.layers):  # each block's input as its first sublayer reads it
        layer.attention_norm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].detach().clone()))
    b = _one_batch(run, ctx, n)
    with torch.no_grad():
        start_q = model.embed(b, "query")
        zero = dict(seen)
        start_i = model.embed(b, "item")
        model.options.deep[0].normal_(generator=torch.Generator().manual_seed(0))  # the query tower's
        moved_q = model.embed(b, "query")
        moved = dict(seen)
        assert torch.equal(model.embed(b, "item"), start_i)  # the item tower reads deep[1] only
    assert not torch.allclose(moved_q, start_q)
    assert torch.equal(moved[0], zero[0])  # the first block reads the input options only
    d = moved[1] - zero[1]  # block 1: exactly deep[0, 0] added at the option positions, nothing elsewhere
    assert torch.allclose(d[:, 1:1 + n], model.options.deep[0, 0].expand_as(d[:, 1:1 + n]), atol=1e-5)
    assert d[:, 0].abs().max() == 0 and d[:, 1 + n:].abs().max() == 0
    for i in range(1, L):
        assert not torch.allclose(moved[i][:, 1:1 + n], zero[i][:, 1:1 + n])
    model.options.deep.data.zero_()
    model.zero_grad()
    model.embed(b, "query").sum().backward()
    g = model.options.deep.grad
    assert all(g[0, i].abs().sum() > 0 for i in range(L - 1)) and g[1].abs().sum() == 0


def _three_steps(model, ctx, ft, trainable):
    """Three AdamW steps of retrieval fine-tuning on ``trainable`` (seeded batches)."""
    from m6rec.rec.finetune import _batch

    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ex = Examples(ctx, "retrieval")
    for step in range(3):
        loss = model(**_batch("retrieval", ex, ctx, model, np.random.default_rng(step), ft, 0, 3, "cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_norms_and_head_start_as_the_pretrained_model_and_train_alone(setup):
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)

    n = 2
    b = _one_batch(run, ctx, n)
    plain = TaskModel(run.model, "retrieval", "option",
                      FinetuneConfig(method="option", options=n, adapter_dim=0, **LEGACY_FT), answer_ids(run.tokenizer))
    with torch.no_grad():
        ref = plain.embed(b, "query")
    for h in plain.options._hooks:
        h.remove()
    run = load_run(setup["base"])
    ft = FinetuneConfig(method="option", options=n, adapter_dim=0, option_layers="input", lora_rank=2,
                        tune_norms=True, head_rank=3, attn_pool=False, batch_size=6, negatives=6)
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    with torch.no_grad():
        assert torch.allclose(model.embed(b, "query"), ref, atol=1e-6)  # B = 0, U = 0: nothing changed yet
    trainable = model.trainable()
    dim, L = model.lm.args.dim, len(model.lm.layers)
    lora = sum(v.numel() for k, v in trainable.items() if k.startswith("options.lora."))
    a = model.lm.args
    per_layer = sum(i + o for i, o in [(dim, a.n_heads * a.head_dim + 2 * a.kv_heads * a.head_dim),
                                       (a.n_heads * a.head_dim, dim), (dim, 2 * a.ffn_dim), (a.ffn_dim, dim)])
    assert lora == 2 * per_layer * L
    norms = {k for k in trainable if k.startswith("lm.")}
    assert norms == {f"lm.layers.{i}.{s}.weight" for i in range(L) for s in ("attention_norm", "ffn_norm")} | {"lm.norm.weight"}
    assert trainable["options.head_u"].shape == (2, dim, 3)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    start = {k: v.clone() for k, v in trainable.items()}
    _three_steps(model, ctx, ft, trainable)
    after = model.lm.state_dict()
    assert {k for k in after if not torch.equal(after[k], before[k])} == {k[3:] for k in norms}
    assert all(not torch.equal(v, start[k]) for k, v in trainable.items() if k != "bias")


def test_option_variants_at_ml1m_scale_fit_one_percent():
    """The configurations of docs/option_tuning.md on the tiny model with ml1m-text's vocabulary."""
    from m6rec.model.args import ModelArgs
    from m6rec.model.transformer import M6Transformer

    lm = M6Transformer(ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=8192, ffn_hidden=384, max_seq_len=64))
    n_lm = sum(p.numel() for p in lm.parameters())
    default = FinetuneConfig(method="option")  # LoRA 2 on every linear + the norm scales: 9,346 (0.59 %)
    deep = dataclasses.replace(default, options=8, attn_pool=True)  # + 8 options per tower at every layer
    legacy = dataclasses.replace(default, options=8, adapter_dim=8, **LEGACY_FT)  # the first option tuning: 6,146 (0.39 %)
    embed = dataclasses.replace(default, lora_rank=1, embed_lora_rank=1)  # + U W on the token embeddings
    for ft, expect in ((default, 9_346), (deep, 13_698), (legacy, 6_146), (embed, 4_352 + 640 + 2 + 8_320)):
        model = TaskModel(lm, "retrieval", "option", ft, (5, 6))
        n = sum(v.numel() for v in model.trainable().values())
        assert n == expect and n <= 0.01 * n_lm, (ft, n, n_lm)
        for p in lm.parameters():
            p.requires_grad_(True)
        for h in model.options._hooks:
            h.remove()


def test_option_variant_run_saves_and_loads_its_norms(setup, tmp_path):
    out = tmp_path / "ret_deep"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert cli_main(["finetune", "--ckpt", str(setup["base"]), *FT, "--finetune.method", "option",
                         "--finetune.options", "2", "--finetune.adapter_dim", "0", "--finetune.option_layers", "all",
                         "--finetune.lora_rank", "1", "--finetune.tune_norms", "true", "--finetune.head_rank", "2",
                         "--finetune.lr", "0.05", "--finetune.run_dir", str(out)]) == 0
    weights = load_file(str(out / "weights.safetensors"))
    assert {"options.deep", "options.head_u", "lm.norm.weight"} <= set(weights)
    run = load_task_run(out, "retrieval")
    state = dict(run.model.named_parameters())
    for k, v in weights.items():  # every trained tensor, the LM's norm scales included, is what eval uses
        assert torch.equal(state[k].float(), v), k
    base = load_run(setup["base"])
    assert not torch.equal(base.model.norm.weight, run.model.lm.norm.weight)


def test_attention_pooling_starts_as_the_mean_and_learns_weights(setup):
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    b = _one_batch(run, ctx, 2)  # rows of different lengths: padding must not enter the pool
    assert (b["document_ids"] < 0).any()
    ft = FinetuneConfig(method="option", options=2, adapter_dim=0, attn_pool=True)
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    with torch.no_grad():
        mean, _ = model.lm.encode(Batch.of(b), pool="mean")
        assert torch.allclose(model.embed(b, "query"), mean.float(), atol=1e-5)
        model.options.pool_w[0].normal_(std=0.3)
        moved = model.embed(b, "query")
        assert not torch.allclose(moved, mean.float(), atol=1e-3)
        model.set_tower("item")  # the item tower: its own options, its own (still zero) pooling vector
        item_mean, _ = model.lm.encode(Batch.of(b), pool="mean")
        assert torch.allclose(model.embed(b, "item"), item_mean.float(), atol=1e-5)
        model.set_tower("query")
        h = model.lm.hidden_states(Batch.of(b))
        w = model.options.pool_w[0]
        for r in range(h.shape[0]):  # by hand: softmax over the row's own tokens only
            n = int((b["document_ids"][r] >= 0).sum())
            a = torch.softmax(h[r, :n] @ w, 0)
            assert torch.allclose(moved[r], F.normalize((a[:, None] * h[r, :n]).sum(0), dim=0), atol=1e-5)


def test_a_run_written_before_the_variants_loads_as_the_first_variant(setup, tmp_path):
    """config.yaml without option_layers / lora_rank / ...: the run is read as it was trained."""
    import shutil

    import yaml

    src = setup["tmp"] / "ret_option"
    old = tmp_path / "ret_option_old"
    shutil.copytree(src, old, ignore=shutil.ignore_patterns("item_index-*", "wandb"))
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    for k in ("option_layers", "lora_rank", "lora_targets", "tune_norms", "attn_pool", "head_rank"):
        cfg["finetune"].pop(k)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    meta = json.loads((old / "finetune.json").read_text())
    meta["base_run"] = str((src / meta["base_run"]).resolve())
    (old / "finetune.json").write_text(json.dumps(meta))
    run, new = load_task_run(old, "retrieval"), load_task_run(src, "retrieval")
    assert run.model.options.deep is None and not len(run.model.options.lora) and run.model.options.pool_w is None
    assert set(run.model.trainable()) == set(new.model.trainable())


def test_embedding_lora_starts_as_the_pretrained_model_and_trains_alone(setup):
    run = load_run(setup["base"])
    ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)

    b = _one_batch(run, ctx, 0)
    with torch.no_grad():
        ref, _ = run.model.encode(Batch.of(b), pool="mean")
    ft = FinetuneConfig(method="option", lora_rank=0, tune_norms=False, embed_lora_rank=2, batch_size=6, negatives=6)
    model = TaskModel(run.model, "retrieval", "option", ft, answer_ids(run.tokenizer))
    with torch.no_grad():
        assert torch.allclose(model.embed(b, "query"), F.normalize(ref.float(), dim=-1), atol=1e-6)  # W = 0
    trainable = model.trainable()
    V, dim = model.lm.tok_embeddings.weight.shape
    assert {k: tuple(v.shape) for k, v in trainable.items()} == {
        "options.embed_u": (V, 2), "options.embed_w": (2, dim), "log_scale": (1,), "bias": (1,)}
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    _three_steps(model, ctx, ft, trainable)
    assert all(torch.equal(v, before[k]) for k, v in model.lm.state_dict().items())  # the LM stays frozen
    assert model.options.embed_w.abs().sum() > 0
    with torch.no_grad():
        moved = model.embed(b, "query")
    assert not torch.allclose(moved, F.normalize(ref.float(), dim=-1), atol=1e-4)
