"""The public Python API: load -> compress -> save -> load gives the in-memory model's logits."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import slimc


def test_load_compress_save_roundtrip(tmp_path):
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path / "in")
    model = slimc.load(tmp_path / "in")
    before = model.num_parameters()
    model = slimc.compress(model, "magnitude-20", overrides=["magnitude.sparsity=0.25"])
    assert model.num_parameters() == before - 2 * 10 * 3 * 48  # 10 of 40 neurons per layer, 3 weights of 48
    assert [r.name for r in model.history] == ["magnitude"]
    report = slimc.save(model, tmp_path / "out")
    assert report["verification"]["hf"]["ok"]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(slimc.load(tmp_path / "out").module(ids).logits, model.module(ids).logits, rtol=0, atol=1e-5)
