"""`compress eval` on a tiny Hugging Face checkpoint written in the test."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from slimc.cli.app import app

WORDS = "the quick brown fox jumps over a lazy dog and then sleeps under tree".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("eval")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (400,), generator=g))
    (root / "text.txt").write_text(text)
    return root


def test_eval_json_reports_perplexity_params_and_size(checkpoint):
    res = CliRunner().invoke(app, ["eval", str(checkpoint / "model"), "--text", str(checkpoint / "text.txt"),
                                   "--seq-len", "32", "--max-windows", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["windows"] == 5 and out["tokens"] == 160
    # an untrained model over a 14-word vocabulary: perplexity near the vocabulary size, finite
    assert 2.0 < out["perplexity"] < 60.0 and math.isfinite(out["perplexity"])
    assert out["parameters"]["attention_mlp"] == 2 * (64 * 32 + 2 * 32 * 32 + 32 * 64 + 3 * 32 * 48)
    assert out["file_bytes"] > 4 * out["parameters"]["total"] * 0.9


def test_eval_text_summary(checkpoint):
    res = CliRunner().invoke(app, ["eval", str(checkpoint / "model"), "--text", str(checkpoint / "text.txt"), "--seq-len", "64"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "6 windows x 64 tokens" in res.output


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--split", "wikitext"], "unknown split"),
        (["--text", "/nonexistent/t.txt"], "does not exist"),
        (["--text", "X", "--split", "pydoc-heldout"], "not both"),
    ],
)
def test_eval_user_errors_exit_2_with_one_line(checkpoint, extra, match):
    res = CliRunner().invoke(app, ["eval", str(checkpoint / "model"), *extra])
    assert res.exit_code == 2
    assert match in res.output and res.output.count("\n") == 1


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_eval_on_an_exported_dir_matches_the_hf_checkpoint(checkpoint, tmp_path, fmt):
    # `compress export --format onnx|pt2` writes the tokenizer beside the model, and eval (and
    # slimc.load) read the directory: every checkpoint slimc writes can be evaluated
    out = tmp_path / fmt
    res = CliRunner().invoke(app, ["export", str(checkpoint / "model"), "--format", fmt, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "tokenizer.json").is_file() and (out / f"model.{fmt}").is_file()
    args = ["--text", str(checkpoint / "text.txt"), "--seq-len", "32", "--max-windows", "3", "--json"]
    ref = json.loads(CliRunner().invoke(app, ["eval", str(checkpoint / "model"), *args]).output)
    res = CliRunner().invoke(app, ["eval", str(out), *args])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
