"""Pipelines built from shipped recipes on a tiny Llama: history, stats, and chaining."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.model import Model
from slimc.compiler.pipeline.passes import PassContext, PassManager
from slimc.compiler.pipeline.recipes import load_recipe


def tiny() -> Model:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config)


def test_identity_then_magnitude_records_history():
    model = tiny()
    passes = load_recipe("identity").build() + load_recipe("magnitude-20").build()
    out = PassManager(passes).run(model, PassContext())
    assert [(r.name, r.modified) for r in out.history] == [("identity", False), ("magnitude", True)]
    assert out.history[1].stats["neurons_removed"] == 2 * 10  # floor(0.2 * 50) per layer
    assert all(r.seconds >= 0 for r in out.history)
    assert [v.intermediate_size for v in decoder_layers(out)] == [40, 40]


def test_magnitude_twice_prunes_the_remainder():
    """Not idempotent by design: each run removes a fraction of what is left, and reports it."""
    model = tiny()
    pm = PassManager(load_recipe("magnitude-20").build())
    pm.run(model, PassContext())
    pm.run(model, PassContext())
    assert [r.stats["neurons_before"] for r in model.history] == [100, 80]
    assert [v.intermediate_size for v in decoder_layers(model)] == [32, 32]


def test_identity_is_idempotent():
    model = tiny()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        before = model.module(input_ids=ids).logits
    pm = PassManager(load_recipe("identity").build())
    for _ in range(2):
        pm.run(model, PassContext())
    with torch.no_grad():
        assert torch.equal(before, model.module(input_ids=ids).logits)
    assert [r.modified for r in model.history] == [False, False]
