"""The sampled item loss (train.item_loss: sampled): exact where it should be, corrected where it
samples, and reading only the sampled items' rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m6rec.config import ConfigError
from m6rec.data.negatives import NegativeSampler
from m6rec.model.args import ModelArgs
from m6rec.model.batch import Batch
from m6rec.model.loss import sampled_softmax_loss
from m6rec.model.transformer import IGNORE_INDEX, M6Transformer

TEXT_VOCAB, N_ITEMS = 40, 200


def _model(**kw) -> M6Transformer:
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, ffn_hidden=64, vocab_size=TEXT_VOCAB + N_ITEMS, max_seq_len=64,
                     attention="causal", **kw)
    return M6Transformer(args)


def _item_batch(seed=0, B=3, T=24, item_labels_only=True) -> Batch:
    """Rows of item tokens (and some text tokens), labelled at every next item token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(TEXT_VOCAB, TEXT_VOCAB + N_ITEMS, (B, T), generator=g)
    text = torch.rand(B, T, generator=g) < 0.3
    ids[text] = torch.randint(1, TEXT_VOCAB, (int(text.sum()),), generator=g)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    if item_labels_only:
        labels[labels < TEXT_VOCAB] = IGNORE_INDEX
    return Batch(input_ids=ids, labels=labels)


def test_sampled_loss_over_every_row_equals_the_full_softmax_and_its_gradients():
    """Candidates = the whole vocabulary, no logQ: the target masked among them leaves exactly the full
    softmax, so loss and every gradient match the full item loss."""
    full, sampled = _model(), _model()
    sampled.load_state_dict(full.state_dict())
    sampled.set_item_tokens(TEXT_VOCAB)
    batch = _item_batch()
    out_full = full(batch)
    host = sampled.label_positions(batch)
    assert host.item_label_index.numel() == out_full.n_tokens and host.label_index.numel() == 0
    out_s = sampled(host.replace(item_candidates=torch.arange(TEXT_VOCAB + N_ITEMS)))
    torch.testing.assert_close(out_s.loss, out_full.loss, rtol=1e-5, atol=1e-6)
    out_full.loss.backward()
    out_s.loss.backward()
    for (name, a), b in zip(full.named_parameters(), sampled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_validation_loss_of_a_sampled_model_is_the_exact_full_loss():
    """Without candidates (validation, evaluation) a model whose item tokens are items of their own
    loss still scores the whole vocabulary: the same loss as the plain model, text labels included."""
    full, sampled = _model(), _model()
    sampled.load_state_dict(full.state_dict())
    sampled.set_item_tokens(TEXT_VOCAB)
    batch = _item_batch(item_labels_only=False)
    with torch.no_grad():
        torch.testing.assert_close(sampled(batch).loss, full(batch).loss, rtol=1e-5, atol=1e-6)


def test_sampled_text_labels_score_the_text_vocabulary_only():
    model = _model()
    model.set_item_tokens(TEXT_VOCAB)
    b = _item_batch(item_labels_only=False)
    host = model.label_positions(b)
    text_labels = host.labels.flatten()[host.label_index]
    assert (text_labels < TEXT_VOCAB).all() and host.label_index.numel() > 0
    h = model.hidden_states(b).flatten(0, 1)
    expected = F.cross_entropy(F.linear(h[host.label_index], model.head_weight[:TEXT_VOCAB]), text_labels,
                               reduction="sum")
    no_items = host.replace(item_label_index=host.item_label_index[:0], item_targets=host.item_targets[:0],
                            item_candidates=torch.arange(TEXT_VOCAB, TEXT_VOCAB + 5))
    out = model(no_items)
    torch.testing.assert_close(out.loss * out.n_tokens, expected, rtol=1e-5, atol=1e-5)


def test_only_the_sampled_item_rows_get_a_gradient():
    """Item tokens: the item loss reads the rows of the targets and the candidates only; every other
    item row's gradient is exactly zero (its input embedding aside)."""
    model = _model()
    model.set_item_tokens(TEXT_VOCAB)
    b = _item_batch()
    host = model.label_positions(b)
    candidates = torch.tensor([TEXT_VOCAB + 3, TEXT_VOCAB + 77, TEXT_VOCAB + 150])
    model(host.replace(item_candidates=candidates)).loss.backward()
    touched = torch.cat([candidates, host.item_targets, b.input_ids.flatten()]).unique()
    grad_rows = (model.tok_embeddings.weight.grad.abs().sum(1) > 0).nonzero().flatten()
    assert set(grad_rows.tolist()) <= set(touched.tolist())
    assert set(candidates.tolist()) <= set(grad_rows.tolist())


def test_accidental_hits_are_masked():
    """A candidate equal to the target is left out: the loss equals the one without that candidate."""
    torch.manual_seed(1)
    h, emb = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3, 4])
    with_hits = torch.tensor([1, 5, 2, 6])
    excluded = targets[:, None] == with_hits[None, :]
    loss = sampled_softmax_loss(h, emb[targets], emb[with_hits], excluded)
    expected = 0.0
    for i, t in enumerate(targets.tolist()):
        cands = [c for c in with_hits.tolist() if c != t]
        logits = torch.cat([(h[i] * emb[t]).sum()[None], h[i] @ emb[cands].t()])
        expected += -torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(loss, expected)
    # label smoothing stays finite with masked candidates
    assert torch.isfinite(sampled_softmax_loss(h, emb[targets], emb[with_hits], excluded, smoothing=0.1))


def _learned_distance(correct: bool) -> float:
    """A free logit per item trained with a popularity-skewed sampler (8 negatives of 30 items): the
    total variation distance between its softmax and the data distribution."""
    n = 30
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(n) * 0.7)
    counts = np.maximum(np.round(p * 10_000), 1)
    sampler = NegativeSampler(np.arange(n), counts, negatives=8, sampler="popularity", alpha=1.0, seed=3)
    z = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.01)
    for step in range(2500):
        targets = torch.from_numpy(rng.choice(n, 64, p=p))
        b = sampler.attach(Batch(input_ids=torch.zeros(1, 1, dtype=torch.long), item_targets=targets), step)
        cands = b.item_candidates
        loss = sampled_softmax_loss(torch.ones(64, 1), z[targets][:, None], z[cands][:, None],
                                    targets[:, None] == cands[None, :], b.item_target_logq if correct else None,
                                    b.item_candidate_logq if correct else None) / 64
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 0.5 * float(np.abs(torch.softmax(z.detach(), 0).numpy() - p).sum())


def test_logq_correction_moves_the_learned_distribution_to_the_data():
    """Without the correction the sampled softmax learns p / q-like odds (it over-rates the items
    the sampler rarely draws): measured 0.43 from the data distribution; with it, 0.11 (a sampled
    softmax stays biased for few negatives, so not 0)."""
    corrected, plain = _learned_distance(True), _learned_distance(False)
    assert corrected < 0.16 and plain > 0.3 and corrected < plain / 3, (corrected, plain)


def test_draws_are_seeded_by_step_rank_and_micro_batch():
    s0 = NegativeSampler(np.arange(100, 600), np.ones(500), negatives=64, seed=7, rank=0)
    s1 = NegativeSampler(np.arange(100, 600), np.ones(500), negatives=64, seed=7, rank=1)
    assert np.array_equal(s0.draw(5, 0), s0.draw(5, 0))
    assert not np.array_equal(s0.draw(5, 0), s0.draw(6, 0))
    assert not np.array_equal(s0.draw(5, 0), s0.draw(5, 1))
    assert not np.array_equal(s0.draw(5, 0), s1.draw(5, 0))
    assert s0.draw(5).min() >= 100 and s0.draw(5).max() < 600


def test_popularity_sampler_follows_counts_to_the_power_alpha():
    counts = np.array([1, 4, 16, 64, 0], float)
    s = NegativeSampler(np.arange(5), counts, negatives=5, sampler="popularity", alpha=0.5, seed=0)
    s.negatives = 200_000  # one large draw to measure the frequencies (a run may draw at most the catalog)
    freq = np.bincount(s.draw(0), minlength=5) / 200_000
    q = counts ** 0.5 / (counts ** 0.5).sum()
    np.testing.assert_allclose(freq, q, atol=0.005)
    assert freq[4] == 0  # no training interaction: never a negative


def test_history_hits_mark_candidates_from_the_same_document_before_the_label():
    model = _model()
    model.set_item_tokens(TEXT_VOCAB)
    a, b_, c, d = (TEXT_VOCAB + k for k in (1, 2, 3, 4))
    ids = torch.tensor([[a, b_, c, 5, d, a]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])  # two documents in one packed row
    labels = torch.full((1, 6), IGNORE_INDEX)
    labels[0, :-1] = ids[0, 1:]
    batch = model.label_positions(Batch(input_ids=ids, labels=labels, document_ids=docs))
    sampler = NegativeSampler(np.arange(TEXT_VOCAB, TEXT_VOCAB + N_ITEMS), np.ones(N_ITEMS), negatives=1,
                              mask_history=True, token_start=TEXT_VOCAB)
    cands = np.array([a, b_, c, d])
    hits = sampler.history_hits(batch, cands)
    positions = batch.item_label_index.tolist()  # label at p predicts p + 1
    expect = {0: [a], 1: [a, b_], 3: [], 4: [d]}  # position 2 predicts text; 3 starts document 1
    assert positions == [0, 1, 3, 4]
    for row, p in enumerate(positions):
        assert cands[hits[row]].tolist() == expect[p], p


def test_bad_negative_counts_name_the_key():
    with pytest.raises(ConfigError, match="train.item_negatives"):
        NegativeSampler(np.arange(10), np.ones(10), negatives=0)
    with pytest.raises(ConfigError, match="train.item_negatives.*catalog of 10"):
        NegativeSampler(np.arange(10), np.ones(10), negatives=11)
    with pytest.raises(ConfigError, match="train.negative_sampler"):
        NegativeSampler(np.arange(10), np.zeros(10), negatives=2, sampler="popularity")


def _vector_model(n_items=300, token_ids=None):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, ffn_hidden=64, vocab_size=TEXT_VOCAB, max_seq_len=64,
                     attention="causal", item_vector_dim=16, item_proj="mlp")
    model = M6Transformer(args)
    vectors = F.normalize(torch.randn(n_items, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    model.set_item_catalog(vectors, token_ids)
    return model


def _vector_batch(n_items=300, B=2, T=20):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, TEXT_VOCAB, (B, T), generator=g)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    cols = torch.arange(2, T, 3)
    positions = torch.stack([torch.arange(B).repeat_interleave(len(cols)), cols.repeat(B)], 1)
    rows = torch.randint(0, n_items, (len(positions),), generator=g)
    return Batch(input_ids=ids, labels=labels, item_positions=positions, item_catalog_rows=rows)


def test_vector_mode_sampled_loss_projects_only_the_batch_and_candidate_rows():
    """Text vectors: the sampled step sends the slots', the targets' and the candidates' vectors
    through the projection, never the catalog's; over every row it equals the full catalog loss."""
    model = _vector_model()
    batch = model.label_positions(_vector_batch())
    seen = []
    model.item_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    full = model(batch).loss
    assert max(seen) == 300  # the full loss projects the whole catalog
    seen.clear()
    candidates = torch.tensor([5, 17, 280, 99])
    model(batch.replace(item_candidates=candidates)).loss.backward()
    n_slots, n_targets = batch.item_positions.shape[0], batch.item_targets.numel()
    assert max(seen) <= n_slots + n_targets + len(candidates) < 300
    everything = model(batch.replace(item_candidates=torch.arange(300))).loss
    torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-6)


def test_vector_token_sampled_loss_adds_the_item_token_rows():
    """vector_token: a candidate's embedding is its projected vector plus its item token's row, as in
    the full catalog."""
    token_ids = torch.arange(300) % TEXT_VOCAB
    model = _vector_model(token_ids=token_ids)
    batch = model.label_positions(_vector_batch())
    with torch.no_grad():
        full = model(batch).loss
        everything = model(batch.replace(item_candidates=torch.arange(300))).loss
        served = model.catalog_embeddings()  # no grad: projected in blocks
        torch.testing.assert_close(model.item_embeddings(torch.arange(300)), served)
    torch.testing.assert_close(served, model.catalog_embeddings().detach())  # in training: in one piece
    torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-6)


def test_row_gradients_equal_the_dense_gradient_rows_and_leave_no_table_gradient():
    """model.row_grads: the token table's gradient comes back as (rows, values) -- the same numbers as
    autograd's dense gradient at those rows, zero elsewhere -- and the table gets no .grad at all."""
    from m6rec.model.rows import RowGradients

    dense, rows = _model(), _model()
    rows.load_state_dict(dense.state_dict())
    for m in (dense, rows):
        m.set_item_tokens(TEXT_VOCAB)
    rows.row_grads = RowGradients()
    rows.tok_embeddings.weight.requires_grad_(False)
    batch = dense.label_positions(_item_batch(item_labels_only=False))
    batch = batch.replace(item_candidates=torch.tensor([TEXT_VOCAB + 1, TEXT_VOCAB + 9, TEXT_VOCAB + 100]))
    dense(batch).loss.backward()
    rows(batch).loss.backward()
    assert rows.tok_embeddings.weight.grad is None
    ids, values = rows.row_grads.take()
    full = torch.zeros_like(dense.tok_embeddings.weight)
    full[ids] = values
    torch.testing.assert_close(full, dense.tok_embeddings.weight.grad, rtol=1e-5, atol=1e-8)
    assert ids.numel() < TEXT_VOCAB + N_ITEMS and not rows.row_grads.rows  # taken: the collector is empty
    for (name, a), b in zip(dense.named_parameters(), rows.parameters()):
        if name != "tok_embeddings.weight":
            torch.testing.assert_close(b.grad, a.grad, msg=name)
