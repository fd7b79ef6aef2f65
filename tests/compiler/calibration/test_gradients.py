"""Saliency |theta * df/dtheta| against plain autograd; block angles against a full forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.calibration.gradients import parameter_saliency
from slimc.compiler.calibration.stats import collect_layer_stats, token_angles
from slimc.compiler.model import Model
from slimc.errors import SlimcError


def tiny(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=cfg)


def tokens(n: int = 6, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 50, (n, seq), generator=torch.Generator().manual_seed(1))


NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"]


@pytest.mark.parametrize("objective", ["max_logit", "loss"])
def test_saliency_equals_autograd_of_the_whole_set(objective):
    model = tiny()
    ids = tokens()
    got = parameter_saliency(model, ids, NAMES, objective=objective, batch_size=4)  # two micro-batches: 4 + 2
    m = model.module
    params = dict(m.named_parameters())
    m.zero_grad()
    logits = m(input_ids=ids, use_cache=False).logits
    if objective == "max_logit":
        f = logits.amax(dim=1).mean()  # mean over windows and vocabulary of the max over positions
    else:
        f = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    f.backward()
    for n in NAMES:
        torch.testing.assert_close(got[n], (params[n] * params[n].grad).abs().detach(), rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad or p.grad is not None for p in m.parameters())  # the model's own flags restored
    assert all(p.requires_grad for p in m.parameters())


def test_saliency_leaves_no_gradients_behind_and_refuses_unknown_names():
    model = tiny()
    model.module.zero_grad(set_to_none=True)
    parameter_saliency(model, tokens(2, 6), NAMES[:1])
    assert all(p.grad is None for p in model.module.parameters())
    with pytest.raises(SlimcError, match="no parameter"):
        parameter_saliency(model, tokens(2, 6), ["model.nope.weight"])
    with pytest.raises(SlimcError, match="objective"):
        parameter_saliency(model, tokens(2, 6), NAMES[:1], objective="entropy")


def test_block_angles_match_a_full_forward():
    model = tiny()
    ids = tokens()
    st = collect_layer_stats(model, ids, [], block_angles=True, batch_size=4)
    with torch.no_grad():
        hs = model.module(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    # hidden_states[i] enters layer i; the last entry is after the final norm, so layer L-1 is compared by hand
    assert len(st.block_angle) == 2
    assert math.isclose(st.block_angle[0], float(token_angles(hs[0], hs[1]).mean()), rel_tol=1e-6)
    assert 0.0 < st.block_angle[1] < 1.0


def test_token_angles_clamp_rounding_above_one():
    h = torch.tensor([[1e4, 1e-3, 0.0]])
    assert torch.isfinite(token_angles(h, h * (1 + 1e-7))).all()
    torch.testing.assert_close(token_angles(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])), torch.tensor([1.0], dtype=torch.float64))
