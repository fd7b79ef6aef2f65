"""The ONNX op vocabulary: one family per op, explicit domains, and the one place op families are listed."""

from __future__ import annotations

import ast
import inspect

import pytest

from slimc.compiler.ir import onnx_ops as ops

MS = ops.MICROSOFT

BASE_FAMILIES = {
    "arithmetic": ops.ARITHMETIC, "broadcast": ops.BROADCAST, "unary": ops.UNARY,
    "bias_activation": ops.BIAS_ACTIVATIONS, "softmax": ops.SOFTMAX, "pool": ops.POOLS,
    "channel_norm": ops.CHANNEL_NORMS, "last_axes_norm": ops.LAST_AXES_NORMS, "group_norm": ops.GROUP_NORMS,
    "skip_norm": ops.SKIP_NORMS, "reduce": ops.REDUCE, "reshape": ops.RESHAPES, "conv": ops.CONVS,
    "matmul": ops.MATMULS, "shape_read": ops.SHAPE_READS,
}

# (domain, op_type) -> the base family it must be in (None: no family, so no rule on either side)
EXPECTED = {
    ("", "Add"): "arithmetic", ("", "Div"): "arithmetic",
    ("", "Where"): "broadcast", ("", "PRelu"): "broadcast", ("", "Max"): "broadcast",
    ("", "Relu"): "unary", ("", "Pow"): "unary", ("", "CastLike"): "unary", ("", "Clip"): "unary",
    ("", "Gelu"): "unary",  # default domain from opset 20
    (MS, "Gelu"): "unary", (MS, "QuickGelu"): "unary",  # ONNX Runtime contrib ops
    ("", "QuickGelu"): None,  # QuickGelu exists only in com.microsoft
    (MS, "FastGelu"): "bias_activation", (MS, "BiasGelu"): "bias_activation",
    ("", "FastGelu"): None, ("", "BiasGelu"): None,
    ("", "Softmax"): "softmax", ("", "LogSoftmax"): "softmax",
    ("", "MaxPool"): "pool", ("", "GlobalAveragePool"): "pool", ("", "Resize"): "pool", ("", "Pad"): "pool",
    ("", "BatchNormalization"): "channel_norm", ("", "InstanceNormalization"): "channel_norm",
    ("", "LpNormalization"): "channel_norm",
    ("", "LayerNormalization"): "last_axes_norm", ("", "SimplifiedLayerNormalization"): "last_axes_norm",
    ("", "RMSNormalization"): "last_axes_norm",
    ("", "GroupNormalization"): "group_norm",
    (MS, "SkipLayerNormalization"): "skip_norm", (MS, "SkipSimplifiedLayerNormalization"): "skip_norm",
    ("", "SkipLayerNormalization"): None,
    ("", "ReduceMean"): "reduce", ("", "ReduceLogSumExp"): "reduce", ("", "ArgMax"): "reduce",
    ("", "Reshape"): "reshape", ("", "Flatten"): "reshape",
    ("", "Conv"): "conv", ("", "ConvTranspose"): "conv", ("", "MatMul"): "matmul", ("", "Gemm"): "matmul",
    ("", "Shape"): "shape_read", ("", "Size"): "shape_read",
    # ops with a rule of their own, and ops with no rule at all
    ("", "Transpose"): None, ("", "Concat"): None, ("", "Gather"): None, ("", "Attention"): None,
    (MS, "Attention"): None, (MS, "Softmax"): None, ("", "TopK"): None,
}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: f"{k[0] or 'onnx'}::{k[1]}")
def test_each_op_is_in_exactly_its_family(key):
    want = EXPECTED[key]
    assert ops.family_of(*key) == want
    assert [name for name, fam in BASE_FAMILIES.items() if key in fam] == ([want] if want else [])


def test_base_families_partition_the_table():
    seen: dict = {}
    for name, fam in BASE_FAMILIES.items():
        for key in fam:
            assert key not in seen, (key, seen.get(key), name)
            seen[key] = name
            assert ops.TABLE[key].family == name
    assert set(seen) == set(ops.TABLE)


def test_union_families():
    assert ops.ELEMENTWISE == ops.ARITHMETIC | ops.BROADCAST | ops.UNARY | ops.BIAS_ACTIVATIONS
    assert ops.CHANNEL_KEEPING == ops.POOLS | ops.CHANNEL_NORMS
    assert ops.NORMS == ops.LAST_AXES_NORMS | ops.CHANNEL_NORMS | ops.GROUP_NORMS
    assert not ops.SOFTMAX & ops.ELEMENTWISE  # not element-wise along its axis


def test_contrib_op_domains():
    assert ops.MICROSOFT_OPS == {(MS, op) for op in ("Gelu", "QuickGelu", "FastGelu", "BiasGelu",
                                                     "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")}
    assert ("", "Gelu") in ops.UNARY and (MS, "Gelu") in ops.UNARY  # both domains define Gelu
    assert all(dom in ops.DOMAINS for dom, _ in ops.TABLE)


def test_every_listed_op_exists_in_its_domain():
    """Each (domain, op_type) of the table is an operator ONNX Runtime registers in that domain."""
    ort_state = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state")
    registered = {(ops.canonical_domain(s.domain), s.name) for s in ort_state.get_all_operator_schema()}
    assert sorted(set(ops.TABLE) - registered) == []


def test_kinds_of_the_families_that_need_one():
    assert ops.KINDS[("", "ReduceSumSquare")] == "sumsquare" and ops.KINDS[("", "ArgMin")] == "argmin"
    assert ops.KINDS[("", "GlobalMaxPool")] == "global_max" and ops.KINDS[("", "Upsample")] == "resize"
    assert ops.KINDS[("", "InstanceNormalization")] == "instance" and ops.KINDS[("", "RMSNormalization")] == "rms"
    assert ops.KINDS[(MS, "SkipSimplifiedLayerNormalization")] == "rms"
    assert ("", "LpNormalization") not in ops.KINDS  # no IR norm kind: the importer leaves it opaque
    for fam in (ops.REDUCE, ops.POOLS, ops.LAST_AXES_NORMS, ops.GROUP_NORMS, ops.SKIP_NORMS):
        assert fam <= set(ops.KINDS)


def test_domain_spellings():
    assert ops.op_key("ai.onnx", "Relu") == ops.op_key("", "Relu") == ops.op_key(None, "Relu") == ("", "Relu")
    assert ops.family_of("ai.onnx", "Softmax") == "softmax"
    assert ops.family_of(MS, "Relu") is None and ops.family_of("my.domain", "Relu") is None


def test_softmax_axes():
    assert ops.softmax_axes(None, 3, 13) == (2,)
    assert ops.softmax_axes(1, 3, 18) == (1,) and ops.softmax_axes(-2, 4, 13) == (2,)
    # before opset 13: coerced to 2-D at `axis` (default 1), normalised over every axis from there on
    assert ops.softmax_axes(None, 4, 11) == (1, 2, 3)
    assert ops.softmax_axes(-1, 4, 11) == (3,)


@pytest.mark.parametrize("module", ["slimc.compiler.frontends.import_onnx", "slimc.compiler.surgery.onnx_model"])
def test_consumers_list_no_op_family_of_their_own(module):
    """No module-level set, frozenset, dict, list or tuple of ONNX op names outside the vocabulary."""
    import importlib

    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    names = {op for _, op in ops.TABLE}
    for stmt in tree.body:
        if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
            continue
        strings = {c.value for c in ast.walk(stmt.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        assert not strings & names, (module, ast.unparse(stmt)[:120])
