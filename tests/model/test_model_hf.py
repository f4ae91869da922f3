"""Hugging Face Llama interop: a tiny random Llama built offline goes in and
comes back out with the same logits (fp32, 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch

from m6rec.model import ModelArgs, build_model
from m6rec.model.batch import Batch
from m6rec.model.hf import PATCH_FILE, export_hf, load_hf

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(tmp_path, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights of every size and sign, norms not all ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / f"llama-{'tied' if tie else 'untied'}"
    model.save_pretrained(d)
    return model, d


def llama_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tie", [True, False])
def test_import_then_export_round_trip(tmp_path, tie):
    llama, d = tiny_llama(tmp_path, tie)
    ids = torch.randint(0, 97, (2, 20))
    want = llama_logits(llama, ids)

    ours = load_hf(d).eval()
    assert ours.args.tie_embeddings == tie and ours.args.kv_heads == 2 and ours.args.rope_theta == 500000.0
    with torch.no_grad():
        got = ours(Batch(ids)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    out = export_hf(ours, None, tmp_path / "export", tokenizer_path=None)
    back = LlamaForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(llama_logits(back, ids), want, atol=1e-4, rtol=0)
    for name, p in llama.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], p, atol=0, rtol=0)


def test_init_from_hf_in_the_config(tmp_path):
    llama, d = tiny_llama(tmp_path, tie=True, seed=1)
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=97, ffn_hidden=80,
                     rope_theta=500000.0, attention="causal", init_from=f"hf:{d}")
    ours = build_model(args).eval()
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(Batch(ids)).logits, llama_logits(llama, ids), atol=1e-4, rtol=0)
    bad = ModelArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=97, ffn_hidden=80, init_from=f"hf:{d}")
    with pytest.raises(ValueError, match="n_layers"):
        build_model(bad)


def test_export_keeps_patch_weights_and_m6rec_settings(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, ffn_hidden=64, image_size=8, patch_size=4,
                     attention="prefix", tie_embeddings=False)
    m = build_model(args).eval()
    out = export_hf(m, args, tmp_path / "e")
    assert (out / PATCH_FILE).is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    back = load_hf(out).eval()
    assert back.args.attention == "prefix" and back.args.image_size == 8 and back.args.patch_size == 4
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)
    ids = torch.full((1, 10), 5)
    patches, pos = torch.rand(1, 4, 48), torch.tensor([[0, 2]])
    with torch.no_grad():
        torch.testing.assert_close(back(Batch(ids, image_patches=patches, image_positions=pos)).logits,
                                   m(Batch(ids, image_patches=patches, image_positions=pos)).logits)


def test_export_writes_a_loadable_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["Toy Story (1995) rated 5", "Heat (1995) rated 4"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|image|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    m = build_model(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.get_vocab_size(), ffn_hidden=64))
    out = export_hf(m, None, tmp_path / "e", tokenizer_path=tmp_path / "tokenizer.json")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok("Toy Story")["input_ids"] == tok.encode("Toy Story").ids


def test_unsupported_llama_is_refused(tmp_path):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, attention_bias=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="attention_bias"):
        load_hf(tmp_path / "b")


def test_export_keeps_the_item_text_vector_projection(tmp_path):
    """item_repr vector*: the projection of the cached text vectors travels in the m6rec side file (it was
    silently dropped before, and such an export could not be loaded back)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=50, ffn_hidden=64, item_vector_dim=24,
                     item_proj_layers=2)
    m = build_model(args).eval()
    back = load_hf(export_hf(m, args, tmp_path / "e")).eval()
    assert back.args.item_vector_dim == 24 and back.args.item_proj_layers == 2
    for k, v in m.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)
    bank = torch.nn.functional.normalize(torch.randn(7, 24), dim=-1)
    m.set_item_catalog(bank)
    back.set_item_catalog(bank)
    torch.testing.assert_close(back.catalog_embeddings(), m.catalog_embeddings(), atol=0, rtol=0)
