"""ONNX and .pt2 emitters: dynamic batch/sequence, ONNX Runtime parity, failure when outputs differ."""

import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.emit.onnx_export import LLM_ATOL, OPSET, verify_onnx, write_onnx
from slimc.compiler.emit.pt2_export import verify_pt2, write_pt2
from slimc.compiler.emit.save import save
from slimc.compiler.frontends.loaders import load
from slimc.compiler.model import Model
from slimc.compiler.surgery import apply_plan
from slimc.errors import SlimcError


def tiny_model() -> Model:
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    return Model(module=m, config=m.config)


def test_llm_onnx_matches_pytorch_in_ort(tmp_path):
    model = tiny_model()
    views = decoder_layers(model)
    apply_plan(model.module, {views[0].kv_group: [0], views[1].mlp_neuron: list(range(20))})  # per-layer widths
    path = write_onnx(model, tmp_path)
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] >= OPSET
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True]  # batch and sequence are dynamic
    result = verify_onnx(model, path)
    assert result["ok"] and result["max_abs_diff"] < LLM_ATOL
    assert len(result["input_shapes"]) == 3  # the traced shape and two others


def test_float64_check_passes_rounding_noise(tmp_path):
    """A tolerance below fp32 noise sends the check to the float64 run, which accepts ORT's rounding."""
    model = tiny_model()
    path = write_onnx(model, tmp_path)
    result = verify_onnx(model, path, atol=1e-9)
    check = result["float64_check"]
    assert result["ok"] and check["onnxruntime_vs_fp64"] <= check["bound"] < 1e-3
    assert check["max_abs_output"] > 0


def test_onnx_parity_failure_is_reported(tmp_path):
    model = tiny_model()
    path = write_onnx(model, tmp_path)
    with torch.no_grad():
        model.module.lm_head.weight.add_(0.5)  # PyTorch now disagrees with the file
    with pytest.raises(SlimcError, match="differs from PyTorch"):
        verify_onnx(model, path)


def test_generic_module_onnx_and_pt2(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)).eval()
    model = Model(module=net, example_inputs={"input": torch.randn(4, 6)})
    report = save(model, tmp_path / "out", format="onnx,pt2")
    assert report["verification"]["onnx"]["ok"] and report["verification"]["pt2"]["ok"]
    assert report["verification"]["onnx"]["max_abs_diff"] < 1e-5
    again = load(tmp_path / "out" / "model.pt2")
    x = torch.randn(9, 6)
    assert torch.allclose(again.module(x), net(x), atol=1e-6, rtol=0)


def test_llm_pt2_round_trip(tmp_path):
    model = tiny_model()
    path = write_pt2(model, tmp_path)
    assert verify_pt2(model, path)["max_abs_diff"] <= 1e-5
    program = torch.export.load(str(path)).module()
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        ref = model.module(input_ids=ids, use_cache=False).logits
    assert (program(ids) - ref).abs().max() < 1e-5


def test_non_llm_without_example_inputs_is_refused(tmp_path):
    model = Model(module=torch.nn.Linear(3, 3))
    with pytest.raises(SlimcError, match="example inputs"):
        write_onnx(model, tmp_path)


def test_float64_errors_measures_both_sides():
    from slimc.compiler.emit.onnx_export import float64_errors

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).eval()
    samples = [{"input": torch.randn(3, 16)}]
    with torch.no_grad():
        exact = net.double()(samples[0]["input"].double()).numpy()
    net.float()
    runtime, torch32 = float64_errors(net, samples, [exact + 1e-3])
    assert abs(runtime - 1e-3) < 1e-9 and 0 < torch32 < 1e-5
    assert next(net.parameters()).dtype == torch.float32  # converted back
