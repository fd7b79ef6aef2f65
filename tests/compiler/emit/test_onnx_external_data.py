"""The ONNX writer carries the weights: inline under protobuf's limit, else in `model.onnx.data` beside
the file; the in-memory model is left as it was; the verification re-reads the file and compares every
initializer. Also: parameters shared by storage count once."""

import onnx_ir as ir
import pytest
import torch
from torch import nn

import slimc.compiler.emit.onnx_export as onnx_export
from slimc.compiler.emit.onnx_export import save_onnx_model, verify_onnx, verify_weights, write_onnx
from slimc.compiler.frontends.loaders import load
from slimc.compiler.model import Model
from slimc.errors import SlimcError

from onnx_roundtrip import export_onnx, perturb_parameters_


def net() -> nn.Module:
    torch.manual_seed(0)
    return perturb_parameters_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))).eval()


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def external_model(tmp_path):
    """A Model loaded from a torch.onnx.export whose large weights are in its .onnx.data file."""
    (tmp_path / "src").mkdir()
    model = load(export_onnx(net(), (X,), tmp_path / "src" / "net.onnx"))
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.onnx.graph.initializers.values())
    return model


def sources(model: Model) -> dict[str, object]:
    return {n: v.const_value for n, v in model.onnx.graph.initializers.items()}


def test_inline_save_reads_external_weights_and_leaves_the_model_unchanged(external_model, tmp_path):
    before = sources(external_model)
    (tmp_path / "out").mkdir()
    assert save_onnx_model(external_model.onnx, tmp_path / "out" / "model.onnx") == []
    assert sources(external_model) == before  # same tensor objects, still referencing the input's data
    check = verify_weights(external_model.onnx, tmp_path / "out" / "model.onnx")
    assert check == {"weights": "inline", "data_files": [], "initializers": len(before)}


def test_large_model_goes_to_relative_external_data(external_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", onnx_export.GRAPH_ALLOWANCE + 100)
    before = sources(external_model)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "model.onnx"
    assert save_onnx_model(external_model.onnx, path) == ["model.onnx.data"]
    assert sources(external_model) == before
    locations = {v.const_value.location for v in ir.load(path).graph.initializers.values()
                 if isinstance(v.const_value, ir.ExternalTensor)}
    assert locations == {"model.onnx.data"}
    assert verify_weights(external_model.onnx, path)["weights"] == "external"
    # writing the same in-memory model again elsewhere still works: it was not re-pointed at OUT's data
    (tmp_path / "again").mkdir()
    save_onnx_model(external_model.onnx, tmp_path / "again" / "model.onnx")
    assert verify_weights(external_model.onnx, tmp_path / "again" / "model.onnx")["weights"] == "external"


def test_verification_refuses_a_file_whose_weights_differ(external_model, tmp_path):
    write_onnx(external_model, tmp_path)
    name, value = next((n, v) for n, v in external_model.onnx.graph.initializers.items() if v.const_value.size > 100)
    value.const_value = ir.Tensor(value.const_value.numpy() + 1.0, name=name)
    with pytest.raises(SlimcError, match=f"initializer '{name}' differs"):
        verify_onnx(external_model, tmp_path / "model.onnx")


def test_verification_refuses_truncated_external_data(external_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", onnx_export.GRAPH_ALLOWANCE + 100)
    path = write_onnx(external_model, tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    with pytest.raises(SlimcError, match="cannot open"):
        verify_onnx(external_model, path)  # ONNX Runtime notices first
    with pytest.raises(SlimcError, match="truncated"):
        verify_weights(external_model.onnx, path)  # and so does the re-load with the input-side checks


def test_torch_export_over_the_limit_writes_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", onnx_export.GRAPH_ALLOWANCE + 100)
    model = Model(module=net(), example_inputs={"input": X})
    path = write_onnx(model, tmp_path)
    assert (tmp_path / "model.onnx.data").is_file()
    result = verify_onnx(model, path)
    assert result["ok"] and result["weights"] == "external" and result["data_files"] == ["model.onnx.data"]


def test_num_parameters_counts_storage_shared_parameters_once():
    """Two Parameter objects viewing the same memory alike (what torch.export.load gives a tied
    embedding) are one weight; a transposed view of it is not the same view and counts."""
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = nn.Parameter(emb.weight.data)  # same storage, another Parameter
    module = nn.ModuleDict({"emb": emb, "head": head})
    assert len(list(module.parameters())) == 2
    assert Model(module=module).num_parameters() == 40
    head.weight = nn.Parameter(emb.weight.data.t())
    assert Model(module=module).num_parameters() == 80
    with torch.device("meta"):
        meta = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    assert Model(module=meta).num_parameters() == 40  # no storage to compare: each counts
    assert Model(module=net()).num_parameters() == 16 * 32 + 32 + 32 * 4 + 4
