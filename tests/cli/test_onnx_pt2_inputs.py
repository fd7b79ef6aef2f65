"""`compress` on the files a user brings from outside slimc: an ONNX export whose weights live in
external data (`torch.onnx.export` puts every tensor of 1 KB or more in `X.onnx.data`), a `.pt2` of a
plain `nn.Module` exported with positional arguments, and a `.pt2` of a causal LM with tied embeddings."""

import json
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import slimc
import slimc.compiler.emit.onnx_export as onnx_export
from slimc.cli.app import app, dispatch
from slimc.compiler.frontends.import_onnx import load_onnx

from onnx_roundtrip import export_onnx, perturb_parameters_


def compress(*args):
    """Run the CLI in-process, exactly as `compress ARGS` dispatches it."""
    return CliRunner().invoke(app, dispatch([str(a) for a in args]), catch_exceptions=False)


class SmallCNN(nn.Module):
    """Two conv + BatchNorm + ReLU blocks, pooled, a linear head; conv2 (18 KB) and fc (1.3 KB) are over
    the exporter's 1 KB external-data threshold."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return perturb_parameters_(SmallCNN()).eval()


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def ort_run(path, x=X) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def external_onnx(tmp_path_factory):
    """A real torch.onnx.export of the CNN: cnn.onnx plus cnn.onnx.data holding the large weights."""
    path = export_onnx(small_cnn(), (X,), tmp_path_factory.mktemp("exported") / "cnn.onnx")
    assert (path.parent / "cnn.onnx.data").is_file()
    external = [v.name for v in ir.load(path).graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert external, "the export must keep some weights in external data for these tests to mean anything"
    return path


def copy_model(path, dest):
    """The .onnx and its data file, copied to a directory of their own (each test may then delete them)."""
    dest.mkdir()
    for p in path.parent.glob(f"{path.name}*"):
        shutil.copy(p, dest / p.name)
    return dest / path.name


def test_onnx_external_data_identity_writes_weights_inline(external_onnx, tmp_path):
    src = copy_model(external_onnx, tmp_path / "in")
    expected = ort_run(src)
    out = tmp_path / "out"
    r = compress(src, "--recipe", "identity", "-o", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.md"]
    check = json.loads((out / "report.json").read_text())["verification"]["onnx"]
    assert check["ok"] and check["weights"] == "inline" and check["data_files"] == []
    for p in src.parent.iterdir():
        p.unlink()  # the output must not lean on the input's data file
    written = load_onnx(out / "model.onnx")
    assert not any(isinstance(v.const_value, ir.ExternalTensor) for v in written.graph.initializers.values())
    np.testing.assert_array_equal(ort_run(out / "model.onnx"), expected)


def test_onnx_external_data_pruned_by_group_magnitude(external_onnx, tmp_path):
    """The pruned model from an external-data input equals the one from the same model stored inline."""
    src = copy_model(external_onnx, tmp_path / "in")
    inline = tmp_path / "inline.onnx"
    ir.save(ir.external_data.load_to_model(ir.load(src)), str(inline))
    outs = {}
    for name, model in (("external", src), ("inline", inline)):
        out = tmp_path / f"out_{name}"
        r = compress(model, "--recipe", "group-magnitude-25", "-o", out)
        assert r.exit_code == 0, r.output
        report = json.loads((out / "report.json").read_text())
        assert report["verification"]["onnx"]["ok"]
        assert report["passes"][0]["stats"]["groups_pruned"] > 0
        assert report["output"]["parameters"] < report["input"]["parameters"]
        outs[name] = ort_run(out / "model.onnx")
    for p in src.parent.iterdir():
        p.unlink()
    assert outs["external"].shape == (2, 10) and np.isfinite(outs["external"]).all()
    np.testing.assert_array_equal(outs["external"], outs["inline"])
    np.testing.assert_array_equal(ort_run(tmp_path / "out_external" / "model.onnx"), outs["inline"])


@pytest.mark.parametrize("recipe", ["identity", "group-magnitude-25"])
def test_onnx_over_inline_limit_writes_external_data_inside_out(external_onnx, tmp_path, monkeypatch, recipe):
    """A model whose weights exceed what protobuf can hold inline (the limit lowered here so that this
    small CNN exceeds it) gets its weights in OUT/model.onnx.data, at a relative location."""
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", onnx_export.GRAPH_ALLOWANCE + 1024)
    src = copy_model(external_onnx, tmp_path / "in")
    out = tmp_path / "out"
    r = compress(src, "--recipe", recipe, "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    check = report["verification"]["onnx"]
    assert check["ok"] and check["weights"] == "external" and check["data_files"] == ["model.onnx.data"]
    assert {"model.onnx", "model.onnx.data"} <= set(report["output"]["files"])
    assert report["output"]["files"]["model.onnx.data"] == (out / "model.onnx.data").stat().st_size > 1024
    locations = {v.const_value.location for v in ir.load(out / "model.onnx").graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    assert locations == {"model.onnx.data"}
    expected = ort_run(out / "model.onnx")
    for p in src.parent.iterdir():
        p.unlink()
    moved = tmp_path / "moved"
    out.rename(moved)  # relative locations: the directory can go anywhere
    load_onnx(moved / "model.onnx")  # the input-side checks of external data accept it
    np.testing.assert_array_equal(ort_run(moved / "model.onnx"), expected)


def export_pt2(module: nn.Module, path, *args, **kwargs):
    torch.export.save(torch.export.export(module, args, kwargs), str(path))
    return path


@pytest.mark.parametrize("recipe", ["identity", "group-magnitude-25"])
def test_pt2_exported_positionally(tmp_path, recipe):
    """`torch.export.export(m, (x,))`, the ordinary call, then `compress` to .pt2 and ONNX."""
    net = small_cnn()
    src = export_pt2(net, tmp_path / "cnn.pt2", X)
    out = tmp_path / "out"
    r = compress(src, "--recipe", recipe, "-o", out, "--format", "pt2,onnx")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["pt2"]["ok"] and report["verification"]["onnx"]["ok"]
    pruned = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        got = pruned(X)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(ort_run(out / "model.onnx"), got.numpy(), atol=1e-5)
    if recipe == "identity":
        with torch.no_grad():
            torch.testing.assert_close(got, net(X), rtol=0, atol=0)
        assert report["output"]["parameters"] == report["input"]["parameters"]
    else:
        assert report["passes"][0]["stats"]["groups_pruned"] > 0
        assert report["output"]["parameters"] < report["input"]["parameters"]


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, bias=None, *, scale=None):
        h = torch.relu(self.a(x)) * (1.0 if scale is None else scale)
        return self.b(h) + (0.0 if bias is None else bias)


@pytest.mark.parametrize("form", ["positional", "keyword", "mixed"])
def test_pt2_takes_inputs_by_name_in_any_export_form(tmp_path, form):
    """A loaded program accepts its inputs by name or position, however it was exported."""
    torch.manual_seed(0)
    net = TwoInputs().eval()
    x, bias, scale = torch.randn(4, 6), torch.randn(4, 3), torch.rand(4, 8) + 0.5
    args, kwargs = {"positional": ((x, bias), {}), "keyword": ((), {"x": x, "bias": bias}),
                    "mixed": ((x,), {"scale": scale})}[form]
    src = export_pt2(net, tmp_path / "net.pt2", *args, **kwargs)
    model = slimc.load(src)
    with torch.no_grad():
        want = net(*args, **kwargs)
        torch.testing.assert_close(model.module(**model.example_inputs), want, rtol=0, atol=0)
        torch.testing.assert_close(model.module(*args, **kwargs), want, rtol=0, atol=0)
    out = tmp_path / "out"
    r = compress(src, "--recipe", "group-magnitude-25", "-o", out, "--format", "pt2")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["verification"]["pt2"]["ok"]


def test_pt2_of_tied_embeddings_counts_them_once(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).eval()
    lm.save_pretrained(tmp_path / "tiny")
    dense = lm.num_parameters()
    out = tmp_path / "out"
    r = compress(tmp_path / "tiny", "--recipe", "identity", "-o", out, "--format", "pt2")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["output"]["parameters"] == dense
    reloaded = slimc.load(out / "model.pt2")
    assert reloaded.num_parameters() == dense
    params = dict(reloaded.module.named_parameters(remove_duplicate=False))
    assert params["lm.lm_head.weight"] is params["lm.model.embed_tokens.weight"]  # one Parameter again, as in the LM
    again = tmp_path / "again"
    r = compress(out / "model.pt2", "--recipe", "identity", "-o", again, "--format", "pt2")
    assert r.exit_code == 0, r.output
    report = json.loads((again / "report.json").read_text())
    assert report["input"]["parameters"] == report["output"]["parameters"] == dense
