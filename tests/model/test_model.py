"""The model: shapes, masks against slow references, packing, prefix semantics,
images, gradients, bf16, checkpointing and meta construction (CPU, fp32, tiny)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m6rec.model import ModelArgs, build_model
from m6rec.model import masks as masks_mod
from m6rec.model import transformer as tr
from m6rec.model.batch import Batch
from m6rec.model.decode import KVCache, decode
from m6rec.model.loss import linear_cross_entropy
from m6rec.model.masks import bidirectional_region, build_attention_mask

IMG = 3  # placeholder token id of an image slot in these tests
V = 64


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_hidden=64, max_seq_len=128,
                image_size=8, patch_size=4, attention="prefix", attn_impl="sdpa")
    base.update(kw)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = build_model(tiny_args(**kw))
    m.eval()
    return m


# ---------------------------------------------------------------------------
# Slow references, written the obvious way
# ---------------------------------------------------------------------------
def ref_region(doc: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    B, T = doc.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        seen_unmarked, cur = False, None
        for t in range(T):
            if doc[b, t] != cur:
                cur, seen_unmarked = doc[b, t], False
            if not prefix[b, t]:
                seen_unmarked = True
            out[b, t] = bool(prefix[b, t]) and not seen_unmarked and doc[b, t] >= 0
    return out


def ref_allowed(doc: torch.Tensor, region) -> torch.Tensor:
    B, T = doc.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                same = doc[b, q] == doc[b, k]
                bid = region is not None and bool(region[b, q]) and bool(region[b, k])
                out[b, 0, q, k] = bool(same) and (k <= q or bid)
    return out


def slow_attention(q, k, v, allowed):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def random_layout(B=2, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    doc = torch.full((B, T), -1, dtype=torch.long)
    prefix = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        t, d = 0, 0
        while t < T - 3:
            n = int(torch.randint(2, 9, (1,), generator=g))
            n = min(n, T - 3 - t)
            doc[b, t:t + n] = d
            ctx = int(torch.randint(0, n + 1, (1,), generator=g))
            prefix[b, t:t + ctx] = True
            if n > 3 and torch.rand(1, generator=g) < 0.3:  # a stray marked token after a target
                prefix[b, t + n - 1] = True
            t, d = t + n, d + 1
    return doc, prefix


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bidirectional_region_matches_reference(seed):
    doc, prefix = random_layout(seed=seed)
    assert torch.equal(bidirectional_region(doc, prefix), ref_region(doc, prefix))


CASES = {
    "causal": dict(docs=False, prefix=False),
    "prefix": dict(docs=False, prefix=True),
    "docs+causal": dict(docs=True, prefix=False),
    "docs+prefix": dict(docs=True, prefix=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_mask_against_slow_reference(case):
    B, T, H, Hkv, Q = 2, 24, 4, 2, 8
    doc, prefix = random_layout(B, T, seed=3)
    use_docs, use_prefix = CASES[case]["docs"], CASES[case]["prefix"]
    doc_arg = doc if use_docs else None
    ref_doc = doc if use_docs else torch.zeros_like(doc)
    region = ref_region(ref_doc, prefix) if use_prefix else None
    allowed = ref_allowed(ref_doc, region)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, T, Q), torch.randn(B, Hkv, T, Q), torch.randn(B, Hkv, T, Q)
    want = slow_attention(q, k, v, allowed)
    for impl in ("sdpa", "varlen", "flex"):
        m = build_attention_mask(T, document_ids=doc_arg, prefix_mask=prefix if use_prefix else None,
                                 attention="prefix", impl=impl)
        if case == "causal":
            assert m.kind == "causal"
        else:
            assert m.kind == {"sdpa": "dense", "varlen": "varlen", "flex": "flex"}[impl]
            if impl == "sdpa":
                assert torch.equal(m.dense, allowed)
        with torch.no_grad():  # FlexAttention has no CPU backward in torch 2.13
            got = masks_mod.attend(q, k, v, m)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_mask_backward_matches_reference(impl):
    B, T, H, Q = 2, 24, 4, 8
    doc, prefix = random_layout(B, T, seed=4)
    m = build_attention_mask(T, document_ids=doc, prefix_mask=prefix, impl=impl)
    allowed = ref_allowed(doc, ref_region(doc, prefix))
    torch.manual_seed(0)
    base = [torch.randn(B, H, T, Q) for _ in range(3)]
    a = [x.clone().requires_grad_() for x in base]
    b = [x.clone().requires_grad_() for x in base]
    g = torch.randn(B, H, T, Q)
    (masks_mod.attend(*a, m) * g).sum().backward()
    (slow_attention(*b, allowed) * g).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)


def test_attention_causal_setting_ignores_prefix():
    doc, prefix = random_layout(seed=5)
    m = build_attention_mask(doc.shape[1], document_ids=doc, prefix_mask=prefix, attention="causal", impl="sdpa")
    assert torch.equal(m.dense, ref_allowed(doc, None))


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------
def make_doc(n, ctx, seed, image_at=None, P=4, patch_dim=48):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (n,), generator=g)
    images = []
    if image_at is not None:
        ids[image_at:image_at + P] = IMG
        images.append((image_at, torch.rand(P, patch_dim, generator=g)))
    prefix = torch.zeros(n, dtype=torch.bool)
    prefix[:ctx] = True
    loss = ~prefix
    if image_at is not None:
        loss[image_at:image_at + P] = False
    return dict(ids=ids, prefix=prefix, loss=loss, images=images)


def pack(docs, T=None, B_rows=None):
    """Pack documents into one row of length T (padding with doc -1)."""
    n_total = sum(len(d["ids"]) for d in docs)
    T = T or n_total
    batch = dict(
        input_ids=torch.zeros(1, T, dtype=torch.long), labels=torch.full((1, T), -100, dtype=torch.long),
        position_ids=torch.zeros(1, T, dtype=torch.long), document_ids=torch.full((1, T), -1, dtype=torch.long),
        prefix_mask=torch.zeros(1, T, dtype=torch.bool),
    )
    patches, positions, t = [], [], 0
    for i, d in enumerate(docs):
        n = len(d["ids"])
        batch["input_ids"][0, t:t + n] = d["ids"]
        batch["position_ids"][0, t:t + n] = torch.arange(n)
        batch["document_ids"][0, t:t + n] = i
        batch["prefix_mask"][0, t:t + n] = d["prefix"]
        for j in range(n - 1):
            if d["loss"][j + 1]:
                batch["labels"][0, t + j] = d["ids"][j + 1]
        for s, px in d["images"]:
            patches.append(px)
            positions.append([0, t + s])
        t += n
    if patches:
        batch["image_patches"] = torch.stack(patches)
        batch["image_positions"] = torch.tensor(positions)
    return batch


def docs3():
    return [make_doc(14, 8, 1, image_at=2), make_doc(9, 4, 2), make_doc(11, 6, 3, image_at=0)]


def test_shapes_and_dtypes():
    m = tiny_model()
    batch = pack(docs3(), T=40)
    out = m(Batch.of({k: v for k, v in batch.items() if k != "labels"}))
    assert out.logits.shape == (1, 40, V) and out.logits.dtype == torch.float32 and out.loss is None
    out = m(Batch.of(batch), return_hidden=True)
    assert out.logits is None and out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.hidden.shape == (1, 40, 32)
    assert int(out.n_tokens) == int((batch["labels"] != -100).sum())
    emb, index = m.encode(Batch.of({k: v for k, v in batch.items() if k != "labels"}))
    assert emb.shape == (3, 32) and index.tolist() == [[0, 0], [0, 1], [0, 2]]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    scores, index = m.score_yes_no(Batch.of(batch).replace(labels=None), 5, 6)
    assert scores.shape == (3,) and scores.dtype == torch.float32


def test_loss_equals_logits_cross_entropy():
    m = tiny_model()
    batch = pack(docs3(), T=40)
    out = m(Batch.of(batch), return_logits=True)
    sel = batch["labels"] != -100
    want = F.cross_entropy(out.logits[sel], batch["labels"][sel])
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(m(Batch.of(batch)).loss, want)


def test_whole_model_matches_slow_attention(monkeypatch):
    m = tiny_model()
    batch = pack(docs3(), T=40)
    with torch.no_grad():
        fused = m(Batch.of(batch), return_logits=True).logits

    def slow(q, k, v, mask, dropout_p=0.0):  # attend's signature; no dropout in this model
        assert dropout_p == 0.0
        T = q.shape[2]
        allowed = mask.dense if mask.kind == "dense" else torch.ones(T, T, dtype=torch.bool).tril()
        return slow_attention(q, k, v, allowed)

    monkeypatch.setattr(tr, "attend", slow)
    with torch.no_grad():
        ref = m(Batch.of(batch), return_logits=True).logits
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["flex", "varlen", "auto"])
def test_other_kernels_match_the_sdpa_path(impl):
    m = tiny_model()
    batch = pack(docs3(), T=40)
    with torch.no_grad():
        a = m(Batch.of(batch), return_logits=True).logits
        m.args.attn_impl = impl
        b = m(Batch.of(batch), return_logits=True).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
@pytest.mark.parametrize("attention", ["prefix", "causal"])
def test_packed_equals_each_document_alone(attention, impl):
    m = tiny_model(attention=attention, attn_impl=impl)
    docs = docs3()
    packed = pack(docs, T=40)
    with torch.no_grad():
        out = m(Batch.of(packed), return_logits=True)
    t = 0
    for d in docs:
        n = len(d["ids"])
        alone = pack([d])
        with torch.no_grad():
            one = m(Batch.of(alone), return_logits=True)
        torch.testing.assert_close(out.logits[:, t:t + n], one.logits, atol=1e-5, rtol=1e-5)
        t += n
    assert torch.isfinite(out.logits).all()  # padding rows produce no NaN


def test_plain_causal_path_equals_single_document():
    m = tiny_model(attention="causal")
    ids = torch.randint(4, V, (2, 16))
    with torch.no_grad():
        a = m(Batch(ids)).logits
        b = m(Batch(ids, document_ids=torch.zeros_like(ids))).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_prefix_is_bidirectional_and_targets_causal():
    m = tiny_model()
    d = make_doc(16, 8, 7)
    batch = pack([d])
    with torch.no_grad():
        base = m(Batch.of(batch), return_hidden=True).hidden

        def changed(pos):
            b = {k: v.clone() for k, v in batch.items()}
            b["input_ids"][0, pos] = (b["input_ids"][0, pos] + 1 - 4) % (V - 4) + 4
            return m(Batch.of(b), return_hidden=True).hidden

        later_ctx = changed(6)  # a later context token...
        assert (later_ctx[0, 0] - base[0, 0]).abs().max() > 1e-4  # ...changes an earlier context position
        later_tgt = changed(12)  # a later target token...
        torch.testing.assert_close(later_tgt[0, :12], base[0, :12], atol=0, rtol=0)  # ...changes nothing before it
        assert (later_tgt[0, 12:] - base[0, 12:]).abs().max() > 1e-4
    # with attention: causal the context is causal too
    mc = tiny_model(attention="causal")
    with torch.no_grad():
        a = mc(Batch.of(batch), return_hidden=True).hidden
        b = {k: v.clone() for k, v in batch.items()}
        b["input_ids"][0, 6] = 5 if b["input_ids"][0, 6] != 5 else 6
        c = mc(Batch.of(b), return_hidden=True).hidden
    torch.testing.assert_close(a[0, :6], c[0, :6], atol=0, rtol=0)


def test_labels_inside_the_bidirectional_region_are_ignored():
    m = tiny_model()
    d = make_doc(12, 6, 8)
    batch = pack([d])
    batch["labels"][0, :11] = batch["input_ids"][0, 1:]  # loss everywhere, even inside the region
    out = m(Batch.of(batch))
    # positions 0..4 can read their next token: dropped; position 5 predicts the first target: kept
    assert int(out.n_tokens) == 11 - 5


def test_image_tokens_change_the_title_loss():
    m = tiny_model()
    d = make_doc(16, 2, 9, image_at=2)  # poster in the context, title (targets) after it
    d["loss"][:] = False
    d["loss"][6:] = True
    batch = pack([d])
    with torch.no_grad():
        base = m(Batch.of(batch)).loss
        other = dict(batch, image_patches=torch.rand_like(batch["image_patches"]))
        assert abs(float(m(Batch.of(other)).loss) - float(base)) > 1e-5
        # the patch embeddings replace the placeholder: its token id does not matter
        swapped = dict(batch, input_ids=batch["input_ids"].clone())
        swapped["input_ids"][0, 2:6] = 7
        torch.testing.assert_close(m(Batch.of(swapped)).loss, base)
        no_image = {k: v for k, v in batch.items() if not k.startswith("image_")}
        assert abs(float(m(Batch.of(no_image)).loss) - float(base)) > 1e-5


@pytest.mark.parametrize("tie,impl", [(True, "sdpa"), (False, "varlen")])
def test_gradients_reach_every_parameter(tie, impl):
    m = tiny_model(tie_embeddings=tie, n_kv_heads=None, attn_impl=impl)
    m.train()
    batch = pack(docs3(), T=40)
    m(Batch.of(batch)).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_bf16_autocast_forward_backward(impl):
    m = tiny_model(attn_impl=impl)
    m.train()
    batch = pack(docs3(), T=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(Batch.of(batch), return_logits=True)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_bf16_weights_forward():
    m = tiny_model(attn_impl="varlen").to(torch.bfloat16)
    batch = pack(docs3(), T=40)
    out = m(Batch.of(batch))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_activation_checkpointing_gives_same_loss_and_grads():
    batch = pack(docs3(), T=40)
    grads = []
    for ckpt in (False, True):
        m = tiny_model(activation_checkpointing=ckpt)
        m.train()
        loss = m(Batch.of(batch)).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n in grads[0][1]:
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], atol=1e-6, rtol=1e-5)


def test_meta_construction_then_materialise():
    args = tiny_args()
    meta = build_model(args, meta=True)
    assert all(p.is_meta for p in meta.parameters())
    real = build_model(args)
    assert meta.num_params() == real.num_params()
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    with torch.no_grad():
        assert torch.isfinite(meta(Batch(torch.randint(0, V, (1, 8)))).logits).all()


def test_init_is_scaled():
    m = build_model(tiny_args(dim=256, n_layers=8, n_heads=4, ffn_hidden=512))
    std = m.layers[0].attention.wqkv.weight.std().item()
    out_std = m.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(out_std - 0.02 / math.sqrt(16)) < 0.001


def test_untied_head_and_no_images():
    m = tiny_model(tie_embeddings=False)
    assert m.output is not None and m.head_weight is m.output.weight
    ids = torch.randint(4, V, (2, 10))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    out = m(Batch(ids, labels=labels))
    assert torch.isfinite(out.loss) and int(out.n_tokens) == 18


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_compile_blocks_matches_eager(impl):
    # aot_eager: Dynamo + AOTAutograd capture of the block, without inductor's C++ build (~40 s on 2 cores)
    torch._dynamo.reset()
    m = tiny_model(attn_impl=impl)
    batch = pack(docs3(), T=40)
    with torch.no_grad():
        want = m(Batch.of(batch), return_logits=True).logits
    tr.apply_compile(m, backend="aot_eager")
    with torch.no_grad():
        got = m(Batch.of(batch), return_logits=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    m.train()
    m(Batch.of(batch)).loss.backward()
    assert all(p.grad is not None for p in m.layers.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,smoothing", [(3, 0.0), (7, 0.0), (1000, 0.0), (7, 0.1), (1000, 0.3)])
def test_chunked_linear_cross_entropy_matches_full_logits(dtype, chunk, smoothing):
    """Loss and both gradients of the chunked head equal F.cross_entropy over full fp32 logits,
    with and without label smoothing."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(50, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, 50, (20,), generator=g)
    got = linear_cross_entropy(h, w, y, chunk=chunk, smoothing=smoothing) / 20
    (got * 3.0).backward()  # a non-unit upstream gradient reaches both inputs
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy((h @ w.t()).float(), y, label_smoothing=smoothing)
    (want * 3.0).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gh.float(), h.grad.float(), **tol)
    torch.testing.assert_close(gw.float(), w.grad.float(), **tol)
    with torch.no_grad():  # the no-grad path (evaluation) gives the same sum
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=chunk, smoothing=smoothing) / 20,
                                   want, **tol)


def test_label_smoothing_applies_in_training_mode_only():
    """model.label_smoothing changes the training loss (the plain CE plus eps times the mean
    over classes) and leaves the evaluation loss -- validation, selection -- the plain one."""
    torch.manual_seed(0)
    plain = build_model(tiny_args(vocab_size=40))
    smooth = build_model(tiny_args(vocab_size=40, label_smoothing=0.2))
    smooth.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 40, (2, 16))
    labels = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        plain.eval(), smooth.eval()
        assert torch.equal(plain(Batch(ids, labels=labels)).loss, smooth(Batch(ids, labels=labels)).loss)
        plain.train(), smooth.train()
        nll = plain(Batch(ids, labels=labels)).loss
        logits = plain(Batch(ids)).logits.float()
        uniform = (torch.logsumexp(logits, -1) - logits.mean(-1)).mean()
        torch.testing.assert_close(smooth(Batch(ids, labels=labels)).loss, 0.8 * nll + 0.2 * uniform)


def test_host_label_index_and_mask_give_the_same_loss_and_grads():
    """What the trainer passes (labels, label_index and the mask built from the host copy)
    equals what the model finds by itself."""
    m = tiny_model(attn_impl="varlen")
    batch = pack(docs3(), T=40)
    ref = m(Batch.of(batch)).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    found = m.label_positions(Batch.of(batch))
    labels, index = found.labels, found.label_index
    mask = m.attention_mask(40, batch["document_ids"], batch["prefix_mask"], torch.device("cpu"),
                            host_document_ids=batch["document_ids"], host_prefix_mask=batch["prefix_mask"])
    assert mask.kind == "varlen"
    out = m(Batch.of(batch, labels=labels, label_index=index, attention_mask=mask))
    assert int(out.n_tokens) == index.numel() == int((labels != -100).sum())
    torch.testing.assert_close(out.loss, ref)
    out.loss.backward()
    for p, g in zip(m.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g)

def test_model_args_are_the_config_fields_plus_image_geometry():
    from dataclasses import fields, replace

    from m6rec.config import ModelConfig, load_config

    cfg = load_config(None, ["--model.dim", "64", "--model.n_kv_heads", "2", "--model.attn_impl", "sdpa",
                             "--data.images.size", "32"])
    args = ModelArgs.from_config(cfg)
    names = [f.name for f in fields(ModelConfig)]
    assert [f.name for f in fields(ModelArgs)] == names + ["image_size", "patch_size", "image_channels"]
    assert all(getattr(args, n) == getattr(cfg.model, n) for n in names) and args.image_size == 32
    assert ModelArgs.from_dict(args.to_dict()) == args
    # checkpoints store these dicts: one from an older version (a key since retired, keys added since missing)
    # still loads, the missing keys at their defaults
    old = {k: v for k, v in args.to_dict().items() if k not in ("attn_impl", "image_channels")}
    assert ModelArgs.from_dict({**old, "retired_key": 1}) == replace(args, attn_impl="auto")
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelArgs.from_config(cfg, n_kv_heads=3)


# ---------------------------------------------------------------------------
# Incremental decoding (KV cache): teacher forcing equivalence
# ---------------------------------------------------------------------------
def lm_logits(m, h):
    return F.linear(h, m.head_weight)


@pytest.mark.parametrize("n_kv_heads", [2, None])  # grouped-query and multi-head
@pytest.mark.parametrize("first", [1, 5, 12])  # token by token; a 5-token prompt then tokens; all at once
def test_decode_causal_equals_teacher_forcing(first, n_kv_heads):
    m = tiny_model(attention="causal", n_kv_heads=n_kv_heads)
    ids = torch.randint(4, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m(Batch(ids)).logits
        cache = KVCache.empty(m)
        got = [lm_logits(m, decode(m, Batch(ids[:, :first]), cache))]
        t = first
        for n in (1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1):  # also a chunk of 3 after the cache is filled
            if t < 12:
                got.append(lm_logits(m, decode(m, Batch(ids[:, t:t + n]), cache)))
                t += n
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [2, None])
@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_decode_prefix_prompt_then_causal_tokens(impl, n_kv_heads):
    """A bidirectional context (with a poster) prefilled at once, then the targets one by one,
    equals one forward pass of the whole document."""
    m = tiny_model(attention="prefix", attn_impl=impl, n_kv_heads=n_kv_heads)
    d = make_doc(16, 8, 7, image_at=2)
    full = pack([d])
    with torch.no_grad():
        want = m(Batch.of({k: v for k, v in full.items() if k != "labels"})).logits
        cache = KVCache.empty(m)
        h = decode(m, Batch(full["input_ids"][:, :8], document_ids=full["document_ids"][:, :8],
                            prefix_mask=full["prefix_mask"][:, :8], image_patches=full["image_patches"],
                            image_positions=full["image_positions"]), cache)
        got = [lm_logits(m, h)]
        for t in range(8, 16):
            got.append(lm_logits(m, decode(m, Batch(full["input_ids"][:, t:t + 1]), cache)))
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_decode_right_padded_prompts(impl):
    """Prompts of different lengths, right-padded in one batch: each continues at its own
    position and never reads the padding."""
    m = tiny_model(attention="prefix", attn_impl=impl)
    docs = [make_doc(10, 6, 1), make_doc(7, 4, 2)]
    more = torch.randint(4, V, (2, 3), generator=torch.Generator().manual_seed(4))
    L = 10
    ids = torch.zeros(2, L, dtype=torch.long)
    doc = torch.full((2, L), -1)
    prefix = torch.zeros(2, L, dtype=torch.bool)
    for b, d in enumerate(docs):
        n = len(d["ids"])
        ids[b, :n], doc[b, :n], prefix[b, :n] = d["ids"], 0, d["prefix"]
    lengths = torch.tensor([10, 7])
    pos = torch.where(doc >= 0, torch.arange(L), 0)
    with torch.no_grad():
        cache = KVCache.empty(m)
        h = decode(m, Batch(ids, position_ids=pos, document_ids=doc, prefix_mask=prefix), cache)
        got = [[lm_logits(m, h[b, :lengths[b]])] for b in range(2)]
        for t in range(3):
            step = lm_logits(m, decode(m, Batch(more[:, t:t + 1], position_ids=(lengths + t)[:, None]), cache))
            for b in range(2):
                got[b].append(step[b])
        for b, d in enumerate(docs):
            alone = torch.cat([d["ids"], more[b]])[None]
            want = m(Batch(alone, document_ids=torch.zeros_like(alone),
                           prefix_mask=torch.cat([d["prefix"], torch.zeros(3, dtype=torch.bool)])[None])).logits[0]
            torch.testing.assert_close(torch.cat(got[b]), want, atol=1e-5, rtol=1e-5)


def test_decode_tree_of_continuations_in_one_row():
    """Two continuations of one prompt decoded side by side in one cache row (as beam search
    does): with a mask that lets each read the prompt and its own tokens, each equals
    teacher forcing of prompt + its tokens."""
    m = tiny_model(attention="prefix")
    d = make_doc(9, 5, 5)
    branches = torch.randint(4, V, (2, 3), generator=torch.Generator().manual_seed(6))  # [branch, step]
    with torch.no_grad():
        cache = KVCache.empty(m)
        decode(m, Batch(d["ids"][None], document_ids=torch.zeros(1, 9, dtype=torch.long), prefix_mask=d["prefix"][None]),
               cache)
        reads = cache.readable[:, None, :].expand(1, 2, 9)  # what each branch's next token reads
        got = []
        for t in range(3):
            reads = torch.cat([reads, torch.eye(2, dtype=torch.bool)[None]], dim=2)
            h = decode(m, Batch(branches[None, :, t], position_ids=torch.full((1, 2), 9 + t)), cache, attn_mask=reads)
            got.append(lm_logits(m, h)[0])  # [branch, V]
        for b in range(2):
            ids = torch.cat([d["ids"], branches[b]])[None]
            want = m(Batch(ids, document_ids=torch.zeros_like(ids),
                           prefix_mask=torch.cat([d["prefix"], torch.zeros(3, dtype=torch.bool)])[None])).logits[0, 9:]
            torch.testing.assert_close(torch.stack([g[b] for g in got]), want, atol=1e-5, rtol=1e-5)


def test_chunked_linear_cross_entropy_under_bf16_autocast():
    """fp32 master weights, bf16 autocast (what bf16 training at ZeRO stage 0 runs): the chunked
    head computes in bf16 and returns fp32 gradients close to autocast's own unfused head."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(24, 16, generator=g).requires_grad_()
    w = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 40, (24,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, y, chunk=5) / 24
    got.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy((h @ w.t()).float(), y)
    want.backward()
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh, h.grad, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(gw, w.grad, rtol=3e-2, atol=3e-3)


# ---------------------------------------------------------------------------
# Dropout (model.embed_dropout / attn_dropout / resid_dropout): training mode only
@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
@pytest.mark.parametrize("which", ["embed_dropout", "attn_dropout", "resid_dropout"])
def test_dropout_is_off_in_eval_and_changes_training_outputs(which, impl):
    batch = pack(docs3(), T=40)
    plain = tiny_model(seed=3, attn_impl=impl)
    drop = tiny_model(seed=3, attn_impl=impl, **{which: 0.3})
    drop.load_state_dict(plain.state_dict())
    # eval mode: exactly the model without dropout, and deterministic
    want = plain(Batch.of(batch), return_logits=True)
    got = drop(Batch.of(batch), return_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    # training mode: outputs change and differ between two passes; gradients still flow
    drop.train()
    torch.manual_seed(0)
    a = drop(Batch.of(batch), return_logits=True)
    torch.manual_seed(1)
    b = drop(Batch.of(batch), return_logits=True)
    assert not torch.allclose(a.logits, want.logits) and not torch.allclose(a.logits, b.logits)
    a.loss.backward()
    assert all(p.grad is not None for n, p in drop.named_parameters() if not n.startswith("patch_embed"))
    # training mode without dropout: the same numbers as eval mode
    plain.train()
    torch.testing.assert_close(plain(Batch.of(batch), return_logits=True).logits, want.logits)


def test_attention_dropout_avoids_flex_in_training():
    m = tiny_model(attn_impl="flex", attn_dropout=0.1)
    doc = torch.zeros(1, 8, dtype=torch.long)
    assert m.attention_mask(8, doc, None, torch.device("cpu")).kind == "flex"  # eval: unchanged
    m.train()
    assert m.attention_mask(8, doc, None, torch.device("cpu")).kind == "varlen"


def test_item_projection_width_and_depth():
    """model.item_proj_hidden / item_proj_layers: the MLP's shape is what the config says, every layer gets a
    gradient, and the deeper stack starts close to its one-hidden-layer part (residual layers start small)."""
    from m6rec.model.transformer import ItemProjection

    torch.manual_seed(0)
    v = F.normalize(torch.randn(50, 24), dim=-1)
    shallow = ItemProjection(ModelArgs(dim=32, n_heads=4, item_vector_dim=24, item_proj_hidden=96))
    deep = ItemProjection(ModelArgs(dim=32, n_heads=4, item_vector_dim=24, item_proj_hidden=96, item_proj_layers=3))
    for p in (shallow, deep):
        p.reset_parameters(0.02)
    assert shallow.w1.weight.shape == (96, 24) and shallow.w2.weight.shape == (32, 96) and len(shallow.hidden) == 0
    assert len(deep.hidden) == 2 and deep.hidden[0][1].weight.shape == (96, 96)
    deep.w1.load_state_dict(shallow.w1.state_dict())
    deep.w2.load_state_dict(shallow.w2.state_dict())
    a, b = shallow(v), deep(v)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.2, rel
    b.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deep.parameters())
    # the default width is 4 x dim
    assert ItemProjection(ModelArgs(dim=32, n_heads=4, item_vector_dim=24)).w1.out_features == 128



def test_cuda_inference_uses_a_dense_mask_and_training_flex():
    """"auto" on CUDA: FlexAttention for training (one shape, compiled once); SDPA with a boolean mask
    under no_grad, where every ranking batch has a new shape and Flex would compile for each one.
    Only the choice is checked here (the tensors stay on the CPU); the masks' values are checked above."""
    doc, prefix = random_layout(2, 24, seed=6)
    with torch.no_grad():
        m = build_attention_mask(24, document_ids=doc, prefix_mask=prefix, impl="auto", device="cuda")
        assert m.kind == "dense" and torch.equal(m.dense, ref_allowed(doc, ref_region(doc, prefix)))
        big = masks_mod.DENSE_INFERENCE_MAX
        masks_mod.DENSE_INFERENCE_MAX = 2 * 24 * 24 - 1  # above the bound: Flex again
        try:
            assert build_attention_mask(24, document_ids=doc, prefix_mask=prefix, impl="auto",
                                        device="cuda").kind == "flex"
        finally:
            masks_mod.DENSE_INFERENCE_MAX = big
    assert build_attention_mask(24, document_ids=doc, prefix_mask=prefix, impl="auto", device="cuda").kind == "flex"
    with torch.no_grad():  # the CPU keeps its own choice
        assert build_attention_mask(24, document_ids=doc, prefix_mask=prefix, impl="auto").kind == "varlen"
