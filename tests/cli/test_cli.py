"""The `compress` command end to end on a tiny Llama saved as a Hugging Face dir."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import slimc
from slimc.cli.app import app, default_output, dispatch
from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.frontends.loaders import load
from slimc.compiler.pipeline.recipes import load_recipe
from slimc.compiler.surgery import apply_plan

ATOL = 1e-4  # fp32 reload tolerance on logits


def tiny_llama(layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def compress(*args: str):
    """Run the CLI in-process, exactly as `compress ARGS` dispatches it."""
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


def logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids, use_cache=False).logits


@pytest.fixture
def tiny_dir(tmp_path):
    m = tiny_llama()
    path = tmp_path / "tiny"
    m.save_pretrained(path)
    return path, m


def assert_user_error(result, *, no_paths=()):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for p in no_paths:
        assert not Path(p).exists()


def test_identity_is_bit_identical(tiny_dir, tmp_path):
    path, ref = tiny_dir
    out = tmp_path / "out"
    r = compress(path, "--recipe", "identity", "-o", out)
    assert r.exit_code == 0, r.output
    ids = torch.randint(0, 128, (2, 9))
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(stock, ids), logits(ref, ids))
    assert torch.equal(logits(slimc.load(out).module, ids), logits(ref, ids))
    report = json.loads((out / "report.json").read_text())
    assert report["passes"] == [{"name": "identity", "modified": False, "seconds": report["passes"][0]["seconds"], "stats": {"params_removed": 0}}]
    assert report["input"]["parameters"] == report["output"]["parameters"]
    assert report["verification"]["hf"]["max_abs_diff"] == 0.0


def test_magnitude_20_all_formats(tiny_dir, tmp_path):
    path, ref = tiny_dir
    out = tmp_path / "mag"
    r = compress(path, "--recipe", "magnitude-20", "-o", out, "--format", "all", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "model.onnx", "model.pt2", "report.json", "report.md", "layer_widths.png"} <= {
        p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert [row["intermediate_size"] for row in report["layers"]] == [77, 77]  # 96 - floor(0.2 * 96)
    assert report["passes"][0]["stats"]["neurons_removed"] == 38
    assert report["verification"]["onnx"]["max_abs_diff"] < 1e-3
    assert report["output"]["parameters"] == report["input"]["parameters"] - 38 * 3 * 64
    # reload both ways; both equal the in-memory result, which we rebuild here independently
    expected = slimc.load(path)
    slimc.PassManager(load_recipe("magnitude-20").build()).run(expected)
    ids = torch.randint(0, 128, (2, 9))
    want = logits(expected.module, ids)
    assert (logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids) - want).abs().max() < ATOL
    assert (logits(load(out).module, ids) - want).abs().max() < ATOL
    md = (out / "report.md").read_text()
    assert "magnitude" in md and "layer_widths.png" in md


def test_set_override_and_default_output(tiny_dir):
    path, _ = tiny_dir
    r = compress(path, "--recipe", "magnitude-20", "--set", "magnitude.sparsity=0.5")
    assert r.exit_code == 0, r.output
    out = path.parent / "tiny-magnitude-20"
    assert out.is_dir() and default_output(str(path), "magnitude-20") == out
    report = json.loads((out / "report.json").read_text())
    assert [row["intermediate_size"] for row in report["layers"]] == [48, 48]
    assert report["recipe"]["passes"] == [{"magnitude": {"sparsity": 0.5}}]


def test_default_output_for_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_output("smollm2", "magnitude-20") == tmp_path / "smollm2-magnitude-20"


def test_per_layer_checkpoint_goes_through_the_cli(tmp_path):
    """A per-layer pruned checkpoint (written by slimc) is compressed again and stays per-layer and exact."""
    from slimc.compiler.emit.save import save
    from slimc.compiler.model import Model

    m = tiny_llama(layers=3)
    views = decoder_layers(m)
    apply_plan(m, {views[0].kv_group: [0], views[2].mlp_neuron: list(range(10))})
    save(Model(module=m, config=m.config), tmp_path / "pruned")
    r = compress(tmp_path / "pruned", "--recipe", "magnitude-20", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "slimc_resized"
    shapes = cfg["slimc_resize"]["shapes"]
    assert [shapes[f"model.layers.{i}.mlp.down_proj.weight"][1] for i in range(3)] == [77, 77, 69]  # 86 - floor(0.2 * 86) = 69
    assert shapes["model.layers.0.self_attn.k_proj.weight"][0] == cfg["base_config"]["head_dim"]  # 1 of 2 KV heads left
    assert "model.layers.1.self_attn.k_proj.weight" not in shapes
    ours = load(tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ids = torch.randint(0, 128, (1, 6))
    assert (logits(remote, ids) - logits(ours.module, ids)).abs().max() < ATOL


def test_pruned_model_saved_with_stale_config_is_refused(tmp_path):
    """save_pretrained of a pruned model writes the old widths: loading must fail loudly, not guess."""
    m = tiny_llama()
    apply_plan(m, {decoder_layers(m)[0].mlp_neuron: [1, 2]})
    m.save_pretrained(tmp_path / "stale")
    out = tmp_path / "o"
    assert_user_error(compress(tmp_path / "stale", "--recipe", "identity", "-o", out), no_paths=[out])


# ------------------------------------------------------------------ errors a user can cause


def test_missing_model(tmp_path):
    out = tmp_path / "o"
    assert_user_error(compress(tmp_path / "nope", "--recipe", "identity", "-o", out), no_paths=[out])


def test_truncated_safetensors(tiny_dir, tmp_path):
    path, _ = tiny_dir
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "o"
    assert_user_error(compress(path, "--recipe", "identity", "-o", out), no_paths=[out])


def test_random_bytes_onnx(tmp_path):
    f = tmp_path / "junk.onnx"
    f.write_bytes(os.urandom(4096))
    out = tmp_path / "o"
    assert_user_error(compress(f, "--recipe", "identity", "-o", out), no_paths=[out])


def test_pickled_pt_without_trust(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), f)
    out = tmp_path / "o"
    r = compress(f, "--recipe", "identity", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "--trust-pickle" in r.stderr


def test_unknown_format(tmp_path):
    f = tmp_path / "model.tflite"
    f.write_bytes(b"\0" * 16)
    out = tmp_path / "o"
    r = compress(f, "--recipe", "identity", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "unknown model format" in r.stderr


def test_unknown_recipe_and_bad_override(tiny_dir, tmp_path):
    path, _ = tiny_dir
    out = tmp_path / "o"
    assert_user_error(compress(path, "--recipe", "nope", "-o", out), no_paths=[out])
    r = compress(path, "--recipe", "magnitude-20", "--set", "magnitude.sparsity=1.5", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "sparsity" in r.stderr


def test_bad_calibration_source_and_device_fail_before_loading(tiny_dir, tmp_path):
    path, _ = tiny_dir
    out = tmp_path / "o"
    r = compress(path, "--recipe", "identity", "--calib", "data.csv", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "calibration" in r.stderr
    r = compress(path, "--recipe", "identity", "--device", "nonsense", "-o", out)
    assert_user_error(r, no_paths=[out])


def test_output_is_input_refused(tiny_dir):
    path, _ = tiny_dir
    before = sorted(p.name for p in path.iterdir())
    r = compress(path, "--recipe", "identity", "-o", path)
    assert_user_error(r)
    assert sorted(p.name for p in path.iterdir()) == before


def test_output_into_unwritable_place(tiny_dir, tmp_path):
    path, _ = tiny_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" / "out"  # the parent is a file: nothing can be created there
    assert_user_error(compress(path, "--recipe", "identity", "-o", out), no_paths=[out])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tiny_dir, tmp_path):
    path, _ = tiny_dir
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_user_error(compress(path, "--recipe", "identity", "-o", ro / "out"))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_failure_during_emission_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import slimc.compiler.emit.save as emit

    path, _ = tiny_dir

    def fail(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(emit, "write_hf", fail)
    out = tmp_path / "o"
    r = compress(path, "--recipe", "identity", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "Permission denied" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directory, no lock file


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(slimc.SlimcError):
        compress(tmp_path / "nope", "--recipe", "identity", "--debug")


# ------------------------------------------------------------------ subcommands


def test_recipes_lists_shipped(tmp_path):
    r = compress("recipes")
    assert r.exit_code == 0
    assert "identity" in r.output and "magnitude-20" in r.output


def test_inspect_json(tiny_dir):
    path, m = tiny_dir
    r = compress("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["parameters"] == sum(p.numel() for p in m.parameters())
    assert info["layers"] == 2 and info["tied_embeddings"] is True
    linear = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96) + 64 * 128
    assert info["flops_per_token"] == 2 * linear
    assert {g["role"] for g in info["groups"]} == {"attention.kv_group", "mlp.neuron"}
    assert info["per_layer"][0] == {"layer": 0, "query_heads": 4, "kv_heads": 2, "group_size": 2, "mlp_neurons": 96}
    table = compress("inspect", path)
    assert table.exit_code == 0 and "flops_per_token" in table.output


def test_export_onnx_alone(tiny_dir, tmp_path):
    path, _ = tiny_dir
    out = tmp_path / "exp"
    r = compress("export", path, "--format", "onnx", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["onnx"]["ok"] and report["passes"] == []
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()


def test_dispatch():
    assert dispatch(["m", "--recipe", "r"]) == ["run", "m", "--recipe", "r"]
    assert dispatch(["inspect", "m"]) == ["inspect", "m"]
    assert dispatch(["--help"]) == ["--help"]


@pytest.mark.slow
def test_smollm2_magnitude_20_end_to_end(tmp_path, monkeypatch):
    """The real model: compress smollm2 --recipe magnitude-20 -o OUT --format all; reload; ONNX parity."""
    out = tmp_path / "smol"
    r = compress("smollm2", "--recipe", "magnitude-20", "-o", out, "--format", "all")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["parameters"] > report["output"]["parameters"]
    assert all(row["intermediate_size"] == 1229 for row in report["layers"])  # 1536 - floor(0.2 * 1536)
    assert report["verification"]["hf"]["max_abs_diff"] < ATOL
    onnx_check = report["verification"]["onnx"]
    # fp32 noise in the pruned SmolLM2's logits reaches ~1e-3 in PyTorch itself (vs float64); ORT must stay within the bound
    assert onnx_check["ok"] and (onnx_check["max_abs_diff"] < 1e-3 or
                                 onnx_check["float64_check"]["onnxruntime_vs_fp64"] <= onnx_check["float64_check"]["bound"])
    assert report["verification"]["pt2"]["ok"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load(out)
    ids = ours.tokenizer("def add(a, b):\n    return a + b", return_tensors="pt")["input_ids"]
    assert (logits(reloaded, ids) - logits(ours.module, ids)).abs().max() < ATOL


def test_inspect_onnx_lists_groups(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    f = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.randn(2, 6),), str(f), dynamo=True, opset_version=18)
    r = compress("inspect", f, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["format"] == "onnx" and info["parameters"] == 6 * 8 + 8 + 8 * 3 + 3
    hidden = [g for g in info["groups"] if g["size"] == 8]
    assert hidden and hidden[0]["prunable"]  # the 8 hidden units between the two layers


def test_export_pt2_of_a_trusted_pickle(tmp_path):
    """A trusted pickled nn.Module without example inputs cannot be exported: a clear error, no OUT."""
    f = tmp_path / "net.pt"
    torch.save(torch.nn.Linear(3, 2), f)
    out = tmp_path / "o"
    r = compress("export", f, "--format", "pt2", "--trust-pickle", "-o", out)
    assert_user_error(r, no_paths=[out])
    assert "example inputs" in r.stderr


def test_onnx_and_pt2_inputs_default_to_their_own_format(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 6)
    torch.onnx.export(net, (x,), str(tmp_path / "mlp.onnx"), dynamo=True, opset_version=18)
    torch.export.save(torch.export.export(net, (x,)), tmp_path / "mlp.pt2")  # static batch 2
    r = compress(tmp_path / "mlp.onnx", "--recipe", "identity")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "mlp-identity" / "model.onnx").is_file()
    r = compress(tmp_path / "mlp.pt2", "--recipe", "identity", "-o", tmp_path / "p", "--format", "onnx,pt2")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["verification"]["onnx"]["max_abs_diff"] < 1e-5 and report["verification"]["pt2"]["max_abs_diff"] == 0
    r = compress(tmp_path / "mlp.onnx", "--recipe", "identity", "--format", "hf", "-o", tmp_path / "h")
    assert_user_error(r, no_paths=[tmp_path / "h"])
