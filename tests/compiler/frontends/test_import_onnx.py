"""ONNX front-end: loading refusals and the lowering of exported models to canonical IR ops."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx, normalize_onnx
from slimc.errors import SlimcError

from onnx_roundtrip import export_onnx, perturb_parameters_

torch.set_num_threads(1)


def _ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(SlimcError, match="not found") as e:
        load_onnx(tmp_path / "nope.onnx")
    assert "\n" not in str(e.value)


def test_random_bytes_are_refused(tmp_path):
    p = tmp_path / "junk.onnx"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SlimcError, match="not (a readable )?(an )?ONNX model") as e:
        load_onnx(p)
    assert "\n" not in str(e.value)


def test_empty_file_is_refused(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(SlimcError, match="ONNX"):
        load_onnx(p)


def _tiny_onnx(path, opset: int, op: str = "Relu", domain: str = "") -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node(op, ["h"], ["y"], name="act", domain=domain)]
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=opsets)
    onnx.save(model, path)


def test_old_opset_is_refused(tmp_path):
    _tiny_onnx(tmp_path / "old.onnx", 11)
    with pytest.raises(SlimcError, match="opset 11.*>= 13"):
        load_onnx(tmp_path / "old.onnx")


def test_unknown_op_becomes_opaque_and_matmul_initializer_is_linear(tmp_path):
    _tiny_onnx(tmp_path / "custom.onnx", 18, op="MyAct", domain="my.domain")
    with pytest.raises(SlimcError, match="op domain 'my.domain'"):  # a file ONNX Runtime could not run is refused
        load_onnx(tmp_path / "custom.onnx")
    # the importer itself lowers any op it has no rule for to opaque
    g = import_onnx(normalize_onnx(ir.load(tmp_path / "custom.onnx")))
    assert _ops(g) == ["linear", "opaque"]
    lin = g.nodes[0]
    assert lin.attrs == {"w_out_axis": 1, "w_in_axis": 0} and lin.inputs[1].param == "w"
    assert g.params["w"].shape == (4, 4) and g.nodes[1].source_op == "my.domain::MyAct"


def test_mlp_gemm_lowers_to_linear(tmp_path):
    net = perturb_parameters_(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)))
    g = import_onnx(load_onnx(export_onnx(net, (torch.randn(2, 6),), tmp_path / "mlp.onnx")))
    assert _ops(g) == ["linear", "unary", "linear"]
    first = g.nodes[0]
    # Gemm(transB=1) keeps torch's [out, in] layout
    assert first.attrs["w_out_axis"] == 0 and first.attrs["w_in_axis"] == 1
    assert first.inputs[1].param == "0.weight" and first.inputs[2].param == "0.bias"
    assert first.module == "0" and first.source_op == "onnx::Gemm"
    assert g.params["0.weight"].shape == (10, 6)
    assert g.inputs[0].shape == (2, 6) and g.outputs[0].shape == (2, 3)
    assert g.nodes[1].inputs[0] is first.outputs[0] and g.nodes[1] in first.outputs[0].users


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.ln = nn.LayerNorm(8)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = self.pool(self.dw(h) + h)
        a, b = h.split([3, 5], dim=1)
        h = torch.cat([b, a], dim=1).flatten(2).transpose(1, 2)  # [B, HW, C]
        return torch.softmax(self.ln(h), dim=-1).sum(1)


def test_cnn_ops_lower_to_canonical_ops(tmp_path):
    net = perturb_parameters_(_Block())
    g = import_onnx(load_onnx(export_onnx(net, (torch.randn(1, 3, 8, 8),), tmp_path / "b.onnx", optimize=False)))
    ops = _ops(g)
    for op in ("conv", "norm", "add", "pool", "split", "concat", "reshape", "permute", "softmax", "reduce"):
        assert op in ops, (op, g.dump())
    assert "opaque" not in ops, g.dump()
    convs = [n for n in g.nodes if n.op == "conv"]
    assert [c.attrs["groups"] for c in convs] == [1, 8]
    bn = next(n for n in g.nodes if n.op == "norm" and n.attrs["kind"] == "batch")
    assert [v.param for v in bn.inputs[1:]] == ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    ln = next(n for n in g.nodes if n.op == "norm" and n.attrs["kind"] == "layer")
    assert ln.attrs["axes"] == [2] and ln.module == "ln"
    split = next(n for n in g.nodes if n.op == "split")
    assert split.attrs["axis"] == 1 and split.attrs["sizes"] == [3, 5]
    red = next(n for n in g.nodes if n.op == "reduce")
    assert red.attrs["fn"] == "sum" and red.attrs["axes"] == [1] and red.attrs["keepdim"] is False


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.m = lm

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def test_llama_lowering_keeps_scopes_and_folds_rmsnorm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    net = _Logits(perturb_parameters_(LlamaForCausalLM(cfg)))
    g = import_onnx(load_onnx(export_onnx(net, (torch.randint(0, 64, (1, 8)),), tmp_path / "l.onnx")))
    norms = [n for n in g.nodes if n.op == "norm"]
    assert len(norms) == 2 * 2 + 1 and all(n.attrs["kind"] == "rms" for n in norms)
    assert norms[0].inputs[1].param == "m.model.layers.0.input_layernorm.weight"
    assert not any(n.source_op == "onnx::Pow" for n in g.nodes)  # folded into the norm nodes
    linears = {n.module: n for n in g.nodes if n.op == "linear"}
    assert len(linears) == 2 * 7 + 1
    q = linears["m.model.layers.1.self_attn.q_proj"]
    assert q.attrs == {"w_out_axis": 1, "w_in_axis": 0} and g.params[q.inputs[1].param].shape == (32, 32)
    k = linears["m.model.layers.1.self_attn.k_proj"]
    assert g.params[k.inputs[1].param].shape == (32, 16)  # 2 KV heads x head_dim 8, stored [in, out]
    assert [n for n in g.nodes if n.op == "embedding"][0].module == "m.model.embed_tokens"
    reshapes = [n.attrs["shape"] for n in g.nodes if n.op == "reshape"]
    assert [1, 8, 4, 8] in reshapes and [1, 8, 2, 8] in reshapes
    assert "opaque" not in _ops(g), g.dump()


def test_shape_reads_do_not_become_opaque(tmp_path):
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).reshape(x.shape[0], -1, 2, 4)

    net = perturb_parameters_(Dyn())
    x = torch.randn(2, 3, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    path = export_onnx(net, (x,), tmp_path / "d.onnx", dynamic_shapes=({0: batch},))
    g = import_onnx(load_onnx(path))
    assert isinstance(g.inputs[0].shape[0], str)  # symbolic batch
    assert "linear" in _ops(g) and "reshape" in _ops(g), g.dump()


def test_matmul_plus_bias_is_one_linear(tmp_path):
    net = perturb_parameters_(nn.Linear(8, 4))
    g = import_onnx(load_onnx(export_onnx(net, (torch.randn(2, 3, 8),), tmp_path / "l.onnx")))
    assert _ops(g) == ["linear"], g.dump()
    lin = g.nodes[0]
    assert lin.inputs[2].param == "bias" and lin.attrs["w_out_axis"] == 1 and lin.outputs[0] is g.outputs[0]


def _rms_graph(path, variant: str) -> None:
    """Hand-written RMSNorm decompositions as other exporters write them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])
    inits = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("w", TensorProto.FLOAT, [4], [0.5, 1.0, 1.5, 2.0]),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1),
        helper.make_node("Add", ["m", "eps"], ["a"]),
        helper.make_node("Sqrt", ["a"], ["s"]),
    ]
    if variant == "div":
        nodes.append(helper.make_node("Div", ["x", "s"], ["n"]))
    else:
        nodes += [helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Mul", ["r", "x"], ["n"])]
    nodes.append(helper.make_node("Mul", ["n", "w"], ["y"]))
    onnx.save(helper.make_model(helper.make_graph(nodes, "rms", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("variant", ["div", "one-over"])
def test_decomposed_rmsnorm_variants_fold_into_norm(tmp_path, variant):
    _rms_graph(tmp_path / "rms.onnx", variant)
    g = import_onnx(load_onnx(tmp_path / "rms.onnx"))
    assert _ops(g) == ["norm"], g.dump()
    norm = g.nodes[0]
    assert norm.attrs["kind"] == "rms" and norm.attrs["axes"] == [2] and norm.inputs[1].param == "w"
    assert norm.outputs[0] is g.outputs[0] and abs(norm.attrs["eps"] - 1e-6) < 1e-12


def test_opset18_groupnorm_with_per_group_scale_is_opaque(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 2.0]), helper.make_tensor("b", TensorProto.FLOAT, [2], [0.0, 1.0])]
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)
    onnx.save(helper.make_model(helper.make_graph([node], "gn", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "gn.onnx")
    assert _ops(import_onnx(load_onnx(tmp_path / "gn.onnx"))) == ["opaque"]


@pytest.mark.parametrize("op, domain, opset, lowered", [
    ("QuickGelu", "com.microsoft", 18, ("unary", "quickgelu")),
    ("Gelu", "com.microsoft", 18, ("unary", "gelu")),
    ("Gelu", "", 20, ("unary", "gelu")),
    ("QuickGelu", "", 18, ("opaque", None)),  # QuickGelu is a com.microsoft contrib op only
    ("Attention", "com.microsoft", 18, ("opaque", None)),  # a contrib op without a rule
    ("Softmax", "com.microsoft", 18, ("opaque", None)),
    ("LpNormalization", "", 18, ("opaque", None)),  # channel-keeping for the surgery, no IR norm kind
])
def test_op_domains_decide_the_lowering(tmp_path, op, domain, opset, lowered):
    _tiny_onnx(tmp_path / "m.onnx", opset, op=op, domain=domain)
    g = import_onnx(load_onnx(tmp_path / "m.onnx"))
    act = g.nodes[1]
    assert (act.op, act.attrs.get("fn")) == lowered, g.dump()
    assert act.source_op == (f"{domain}::{op}" if domain else f"onnx::{op}")


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_keeps_its_axis(tmp_path, op):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3, 4])
    nodes = [helper.make_node(op, ["x"], ["y"], name="default"), helper.make_node(op, ["x"], ["z"], name="one", axis=-2)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, tmp_path / "sm.onnx")
    g = import_onnx(load_onnx(tmp_path / "sm.onnx"))
    assert [(n.op, n.attrs["axis"], n.attrs["log"]) for n in g.nodes] == [("softmax", 2, op == "LogSoftmax"),
                                                                         ("softmax", 1, op == "LogSoftmax")]
