"""Perplexity over non-overlapping windows and the held-out pydoc split."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.calibration.evaluation import eval_windows, heldout_tokens, parameter_counts, perplexity
from slimc.compiler.calibration.sources import pydoc_split
from slimc.compiler.model import Model
from slimc.errors import SlimcError


class ByteTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True, return_attention_mask: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


class Uniform(nn.Module):
    """Predicts every token of a vocabulary with the same probability: perplexity = vocab size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return (torch.zeros(*input_ids.shape, self.vocab) + self.w,)


def tiny_llama() -> Model:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Model(module=LlamaForCausalLM(cfg).eval(), config=cfg)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    ppl = perplexity(Model(module=Uniform(50)), torch.randint(0, 50, (300,)), seq_len=64)
    assert ppl == pytest.approx(50.0, rel=1e-6)  # float32 log-softmax


def test_perplexity_matches_a_hand_computation():
    model = tiny_llama()
    stream = torch.randint(0, 97, (200,), generator=torch.Generator().manual_seed(1))
    seq = 32
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(3):  # max_windows=3, non-overlapping from the start
            ids = stream[i * seq : (i + 1) * seq][None]
            logits = model.module(input_ids=ids).logits
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            n += seq - 1
    got = perplexity(model, stream, seq_len=seq, max_windows=3, batch_size=2)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_windows_do_not_overlap_and_drop_the_tail():
    w = eval_windows(torch.arange(100), 30, None)
    assert w.shape == (3, 30)
    assert torch.equal(w.reshape(-1), torch.arange(90))
    assert eval_windows(torch.arange(100), 30, 2).shape == (2, 30)


@pytest.mark.parametrize("seq_len, max_windows, match", [(1, None, "at least 2"), (200, None, "fewer than one window"), (10, 0, ">= 1")])
def test_bad_window_arguments(seq_len, max_windows, match):
    with pytest.raises(SlimcError, match=match):
        eval_windows(torch.arange(100), seq_len, max_windows)


def test_heldout_is_the_second_half_of_pydoc():
    tok = ByteTokenizer()
    ev = heldout_tokens(tok)
    cal = pydoc_split(tok, "calibration")
    assert ev.numel() - cal.numel() in (0, 1)
    assert not torch.equal(ev[:100], cal[:100])
    with pytest.raises(SlimcError, match="tokenizer"):
        heldout_tokens(None)


def test_parameter_counts_of_a_llama():
    model = tiny_llama()
    counts = parameter_counts(model)
    # per layer: q 64x32 (4 heads x 16), k and v 32x32 (2 KV heads), o 32x64; gate/up/down 48x32
    attn = 64 * 32 + 32 * 32 + 32 * 32 + 32 * 64
    mlp = 3 * 32 * 48
    assert counts["attention_mlp"] == 2 * (attn + mlp)
    assert counts["decoder_layers"] == 2 * (attn + mlp + 2 * 32)
    assert counts["total"] == model.num_parameters()
