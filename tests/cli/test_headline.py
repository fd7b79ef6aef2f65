"""`compress model.pt --recipe flap-50` on the inputs users have: a pickled HF Llama, a state dict, no tokenizer at all.

Also: --dtype writes that dtype and reloads, the CLI runs the same `slimc.api.compress` as Python,
and passes that need an LLM (or a tokenizer) refuse before anything runs, in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import slimc
from slimc import api
from slimc.cli.app import app, dispatch
from slimc.compiler.analysis.llm import decoder_layers

from tiny_tokenizer import save_tiny_tokenizer

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def compress(*args):
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


def assert_one_line_error(result, *, contains: str, no_paths=()):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert contains in lines[0], lines[0]
    for p in no_paths:
        assert not Path(p).exists()


def assert_flap50_output(out: Path, dense_params: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["flap"]
    stats = report["passes"][0]["stats"]
    assert abs(stats["sparsity"] - 0.5) < 0.1
    assert report["verification"]["hf"]["ok"]
    reloaded = slimc.load(out)
    assert reloaded.num_parameters() == report["output"]["parameters"] < dense_params
    return report


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", VOCAB)


def test_pickled_hf_llama_with_tokenizer(tmp_path, tokenizer_dir):
    model = tiny_llama()
    torch.save(model, tmp_path / "model.pt")
    out = tmp_path / "out"
    r = compress(tmp_path / "model.pt", "--trust-pickle", "--tokenizer", tokenizer_dir, "--recipe", "flap-50", "-o", out)
    assert r.exit_code == 0, r.output
    assert_flap50_output(out, sum(p.numel() for p in model.parameters()))
    assert (out / "tokenizer.json").is_file()  # the tokenizer given travels with the checkpoint


def test_pickled_llama_without_tokenizer_is_refused_before_any_work(tmp_path, monkeypatch):
    torch.save(tiny_llama(), tmp_path / "model.pt")
    ran = []
    monkeypatch.setattr("slimc.passes.flap.plan_flap", lambda *a, **k: ran.append(1))
    out = tmp_path / "out"
    r = compress(tmp_path / "model.pt", "--trust-pickle", "--recipe", "flap-50", "-o", out)
    assert_one_line_error(r, contains="--tokenizer", no_paths=[out])
    assert "token ids" in r.stderr and not ran


def test_state_dict_with_config_dir_takes_its_tokenizer(tmp_path, tokenizer_dir):
    model = tiny_llama()
    cfg_dir = tmp_path / "cfg"
    model.config.save_pretrained(cfg_dir)
    for f in tokenizer_dir.iterdir():
        (cfg_dir / f.name).write_bytes(f.read_bytes())
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "out"
    r = compress(tmp_path / "weights.pt", "--config", cfg_dir, "--recipe", "flap-50", "-o", out)
    assert r.exit_code == 0, r.output
    assert_flap50_output(out, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("kind", ["pt", "npy", "jsonl"])
def test_token_id_calibration_needs_no_tokenizer(tmp_path, kind):
    model = tiny_llama()
    cfg_dir = tmp_path / "cfg"
    model.config.save_pretrained(cfg_dir)  # no tokenizer anywhere
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    ids = torch.randint(0, VOCAB, (64, 160), generator=torch.Generator().manual_seed(1))
    calib = tmp_path / f"ids.{kind}"
    if kind == "pt":
        torch.save(ids, calib)
    elif kind == "npy":
        np.save(calib, ids.numpy())
    else:
        calib.write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in ids))
    out = tmp_path / "out"
    r = compress(tmp_path / "weights.pt", "--config", cfg_dir, "--calib", calib, "--recipe", "flap-50", "-o", out)
    assert r.exit_code == 0, r.output
    report = assert_flap50_output(out, sum(p.numel() for p in model.parameters()))
    assert report["passes"][0]["stats"]["calibration_tokens"] == 128 * 128  # flap-50: 128 windows of 128


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "cfg")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(torch.full((4, 200), VOCAB + 5), tmp_path / "ids.pt")
    out = tmp_path / "out"
    r = compress(tmp_path / "weights.pt", "--config", tmp_path / "cfg", "--calib", tmp_path / "ids.pt", "--recipe", "flap-50", "-o", out)
    assert_one_line_error(r, contains="outside the model's vocabulary", no_paths=[out])


def test_llm_pass_on_a_cnn_is_one_line(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    torch.save(cnn, tmp_path / "resnet.pt")
    out = tmp_path / "out"
    r = compress(tmp_path / "resnet.pt", "--trust-pickle", "--recipe", "flap-50", "-o", out)
    assert_one_line_error(r, contains="needs a decoder language model", no_paths=[out])


@pytest.mark.parametrize("dtype, st_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_writes_and_reloads_that_dtype(tmp_path, dtype, st_dtype):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    r = compress(tmp_path / "in", "--recipe", "magnitude-20", "--dtype", dtype, "-o", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {st_dtype}
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["dtype"] == dtype and report["input"]["dtype"] == "float32"
    assert report["verification"]["hf"]["max_abs_diff"] == 0.0  # same dtype, same CPU kernels
    reloaded = slimc.load(out)
    assert {p.dtype for p in reloaded.module.parameters()} == {st_dtype}
    assert [v.intermediate_size for v in decoder_layers(reloaded)] == [77, 77]


def test_api_dtype_matches_the_cli(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "in")
    m = slimc.compress(slimc.load(tmp_path / "in"), "identity", dtype=torch.bfloat16)
    assert {p.dtype for p in m.module.parameters()} == {torch.bfloat16}
    slimc.save(m, tmp_path / "out")
    assert {p.dtype for p in slimc.load(tmp_path / "out").module.parameters()} == {torch.bfloat16}


def test_cli_runs_the_api_compress(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "in")
    calls = []
    real = api.compress

    def spy(model, recipe, **kwargs):
        calls.append((recipe.name, kwargs))
        return real(model, recipe, **kwargs)

    monkeypatch.setattr(api, "compress", spy)
    r = compress(tmp_path / "in", "--recipe", "magnitude-20", "--seed", "3", "--dtype", "float32", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    name, kwargs = calls[0]
    assert name == "magnitude-20" and kwargs["seed"] == 3 and kwargs["dtype"] == "float32" and kwargs["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    model = slimc.Model(module=tiny_llama(), config=tiny_llama().config)
    with pytest.raises(slimc.SlimcError, match="CUDA is not available"):
        slimc.compress(model, "identity", device="cuda")
    tiny_llama().save_pretrained(tmp_path / "in")
    r = compress(tmp_path / "in", "--recipe", "identity", "--device", "cuda", "-o", tmp_path / "out")
    assert_one_line_error(r, contains="CUDA is not available", no_paths=[tmp_path / "out"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_api_device_moves_model_and_calibration(tmp_path):
    model = slimc.Model(module=tiny_llama(), config=tiny_llama().config)
    ids = torch.randint(0, VOCAB, (8, 64))
    out = slimc.compress(model, "flap-50", calib=ids, device="cuda")
    assert next(out.module.parameters()).is_cuda


def test_recipe_order_is_checked_before_loading(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\npasses:\n  - nm: {method: magnitude}\n  - magnitude: {sparsity: 0.2}\n")
    r = compress(tmp_path / "missing-model-dir", "--recipe", bad, "-o", tmp_path / "out")  # the model is never read
    assert_one_line_error(r, contains="cannot run after 'nm'")


def test_bfloat16_onnx_is_refused_before_loading(tmp_path):
    out = tmp_path / "out"
    r = compress(tmp_path / "missing-model-dir", "--recipe", "identity", "--dtype", "bfloat16", "--format", "onnx", "-o", out)
    assert_one_line_error(r, contains="bfloat16 cannot be verified", no_paths=[out])


def test_float16_writes_every_format(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    r = compress(tmp_path / "in", "--recipe", "magnitude-20", "--dtype", "float16", "--format", "all", "-o", out)
    assert r.exit_code == 0, r.output
    verification = json.loads((out / "report.json").read_text())["verification"]
    assert all(verification[f]["ok"] for f in ("hf", "onnx", "pt2"))


def test_unwritable_format_is_refused_before_any_pass(tmp_path, monkeypatch):
    cnn = nn.Sequential(nn.Linear(4, 4))
    torch.save(cnn, tmp_path / "net.pt")
    ran = []
    monkeypatch.setattr(api, "compress", lambda *a, **k: ran.append(1))
    out = tmp_path / "out"
    r = compress(tmp_path / "net.pt", "--trust-pickle", "--recipe", "identity", "--format", "hf", "-o", out)
    assert_one_line_error(r, contains="the hf format needs a Hugging Face model", no_paths=[out])
    # a plain module's default format is .pt2, which needs example inputs to export: --data gives them
    r = compress(tmp_path / "net.pt", "--trust-pickle", "--recipe", "identity", "-o", out)
    assert_one_line_error(r, contains="give --data", no_paths=[out])
    assert not ran
