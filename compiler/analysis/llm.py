"""Recogniser for Hugging Face decoder LLMs: per-layer attention and MLP units.

Two ways to the same units:

    for layer in decoder_layers(model):        # Llama-style names only (q/k/v/o_proj, gate/up/down_proj)
        layer.kv_group    # Group, role attention.kv_group: KV head j + its G query heads
        layer.mlp_neuron  # Group, role mlp.neuron: gate row j, up row j, down column j

    for lg in decoder_layer_groups(model, example):   # any decoder family, from the IR
        lg.attention      # prunable, exact attention groups (KV groups / heads), usually one
        lg.mlp            # prunable, exact MLP groups (neurons, MoE expert neurons, a shared expert's neurons)
        lg.whole          # what is left whole and why (a blocked fused QKV, MQA's single KV head, ...)

A KV-group channel owns G*head_dim rows of q_proj (and their bias), head_dim rows of k_proj and
v_proj, and G*head_dim columns of o_proj: the query heads that read a KV head stay with it, so
GQA stays GQA (for MHA, G = 1 and a unit is one head). head_dim is never split, which keeps
RoPE's (i, i + d/2) pairs whole. Sizes are read from the module's current weights, so the view is
right after surgery too (per-layer widths).

`decoder_layer_groups` runs the coupled-dimension analysis (`coupling.find_groups`) on one decoder
layer at a time: the layer is exported with `torch.export` on the hidden states and keyword
arguments it receives in the model (`example`, e.g. from `calibration.layerwise.DecoderStream` on
a few tokens), held at its own path so the groups name the model's tensors. Layers with the same
signature (module types, tensor shapes, scalar attributes) share one export: the groups of the
first are renamed for the others. On SmolLM2-135M that is one export of ~0.1-0.4 s instead of
~20 s for the whole model. Inputs and outputs of the exported layer are blocked, so the residual
width is never offered; a layer whose tensors are shared with another layer is refused.

The Llama-style name path is used for a layer only when it is structurally unambiguous (separate
q/k/v/o and gate/up/down linears whose widths agree, at least two KV heads, no other per-head
tensors) and the IR has confirmed, on one layer of that class in this process, that it gives the
same groups; everything else goes through the IR.

The output projection of a unit group (`output_projection`) is the linear whose *input* channels
the units own, found from the group's slices and the module types: `nn.Linear` weights are
[out, in] (input axis 1), transformers' `Conv1D` weights [in, out] (input axis 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from slimc.compiler.analysis.channel_atoms import find, leaves
from slimc.compiler.analysis.coupling import find_groups
from slimc.compiler.analysis.dim_rules import run_rules
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import AttrUpdate, Group, Role, Slice, block_index
from slimc.compiler.ir.graph import Graph
from slimc.compiler.model import Model
from slimc.errors import SlimcError

ATTN, MLP = "attn", "mlp"

_ATTENTION_ROLES = (Role.KV_GROUP, Role.HEAD)
_MLP_ROLES = (Role.MLP_NEURON, Role.EXPERT_NEURON)


@dataclass
class DecoderLayerView:
    index: int
    prefix: str  # module path of the decoder layer, e.g. "model.layers.3"
    attn: str  # "model.layers.3.self_attn"
    mlp: str  # "model.layers.3.mlp"
    head_dim: int
    group_size: int  # G: query heads per KV head
    num_kv_heads: int
    intermediate_size: int
    kv_group: Group
    mlp_neuron: Group

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group_size


def find_layer_list(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of a decoder's layers, or None when the model has no such list."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        try:
            layers = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return path, layers
    return None


def _layers(module: nn.Module) -> tuple[str, nn.ModuleList]:
    found = find_layer_list(module)
    if found is not None:
        return found
    raise SlimcError("not a decoder LLM slimc recognises: no model.layers list of decoder layers")


def _rows(param: str, size: int, width: int, axis: int, has: bool = True) -> list[Slice]:
    return [Slice(param, axis, block_index(size, width))] if has else []


def _named_view(config: Any, path: str, i: int, layer: nn.Module) -> DecoderLayerView:
    """The Llama-style view of decoder layer `i` (at `path`.i), or a SlimcError saying what is missing."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise SlimcError(f"layer {i}: expected self_attn.{{q,k,v,o}}_proj (Llama-style attention); fused QKV is not supported by this recogniser")
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise SlimcError(f"layer {i}: expected mlp.{{gate,up,down}}_proj (gated MLP)")
    head_dim = int(getattr(attn, "head_dim", 0) or config.head_dim)
    n_kv = attn.k_proj.weight.shape[0] // head_dim
    n_q = attn.q_proj.weight.shape[0] // head_dim
    if n_kv == 0 or n_q % n_kv:
        raise SlimcError(f"layer {i}: {n_q} query heads do not split evenly over {n_kv} KV heads")
    G = n_q // n_kv
    a, m = f"{path}.{i}.self_attn", f"{path}.{i}.mlp"
    kv_slices = [
        *_rows(f"{a}.q_proj.weight", n_kv, G * head_dim, 0),
        *_rows(f"{a}.q_proj.bias", n_kv, G * head_dim, 0, attn.q_proj.bias is not None),
        *_rows(f"{a}.k_proj.weight", n_kv, head_dim, 0),
        *_rows(f"{a}.k_proj.bias", n_kv, head_dim, 0, attn.k_proj.bias is not None),
        *_rows(f"{a}.v_proj.weight", n_kv, head_dim, 0),
        *_rows(f"{a}.v_proj.bias", n_kv, head_dim, 0, attn.v_proj.bias is not None),
        *_rows(f"{a}.o_proj.weight", n_kv, G * head_dim, 1),
    ]
    inter = mlp.down_proj.weight.shape[1]
    mlp_slices = [
        *_rows(f"{m}.gate_proj.weight", inter, 1, 0),
        *_rows(f"{m}.gate_proj.bias", inter, 1, 0, mlp.gate_proj.bias is not None),
        *_rows(f"{m}.up_proj.weight", inter, 1, 0),
        *_rows(f"{m}.up_proj.bias", inter, 1, 0, mlp.up_proj.bias is not None),
        *_rows(f"{m}.down_proj.weight", inter, 1, 1),
    ]
    role = Role.KV_GROUP if G > 1 else Role.HEAD
    return DecoderLayerView(
        index=i,
        prefix=f"{path}.{i}",
        attn=a,
        mlp=m,
        head_dim=head_dim,
        group_size=G,
        num_kv_heads=n_kv,
        intermediate_size=inter,
        kv_group=Group(f"{a}:{'kv_group' if G > 1 else 'head'}", n_kv, kv_slices, role, i),  # named as the analysis names it
        mlp_neuron=Group(f"{m}:neuron", inter, mlp_slices, Role.MLP_NEURON, i),
    )


def decoder_layers(model: Model | nn.Module) -> list[DecoderLayerView]:
    """One view per decoder layer of a Llama-style model (separate q/k/v/o and gate/up/down)."""
    module = model.module if isinstance(model, Model) else model
    config = model.config if isinstance(model, Model) else getattr(module, "config", None)
    path, layers = _layers(module)
    return [_named_view(config, path, i, layer) for i, layer in enumerate(layers)]


def recognised_layers(model: Model | nn.Module) -> list[DecoderLayerView] | None:
    """`decoder_layers`, or None when the model is not a decoder this recogniser knows."""
    try:
        return decoder_layers(model)
    except SlimcError:
        return None


# ---- output projections ---------------------------------------------------------------------------


def linear_axes(mod: nn.Module) -> tuple[int, int] | None:
    """(output axis, input axis) of a linear module's weight, or None for any other module.

    `nn.Linear` (and subclasses such as Falcon's) stores [out, in]; transformers' `Conv1D` (GPT-2,
    GPT-BigCode's MHA) stores [in, out] and computes x @ W + b.
    """
    if isinstance(mod, nn.Linear):
        return 0, 1
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None:
        return 1, 0
    return None


@dataclass(frozen=True)
class Projection:
    """The tensor through which a group's units feed the rest of the layer."""

    module: str  # module path
    param: str  # the weight's name
    in_axis: int  # the weight's input axis (1: nn.Linear, 0: Conv1D)
    index: torch.Tensor  # [units, k]: entries along `in_axis` each unit owns
    observable: bool  # True: a linear whose forward input carries the units' channels on its last axis


def _module_of(module: nn.Module, param: str) -> tuple[str, str, nn.Module | None]:
    path, _, leaf = param.rpartition(".")
    try:
        return path, leaf, module.get_submodule(path) if path else module
    except AttributeError:
        return path, leaf, None


def _slice_owner(module: nn.Module, s: Slice) -> tuple[str, str, nn.Module | None, tuple[int, int] | None]:
    """(module path, parameter leaf name, module, its (out, in) axes when it is a linear) of a slice."""
    path, leaf, mod = _module_of(module, s.param)
    return path, leaf, mod, linear_axes(mod) if mod is not None else None


def output_projection(group: Group, module: nn.Module) -> Projection | None:
    """The linear whose input channels `group` owns (one slice on a weight's input axis), from the
    group's slices and the module types alone.

    A group that owns input columns of exactly one linear gets that linear (observable: its forward
    input is what input statistics and compensation need). Otherwise (MoE experts stored as 3-D
    tensors inside one module, or several consuming linears) the projection is the slice on the
    last axis of a non-linear tensor (per-expert [out, in] matrices), not observable; None when
    there is no such slice either.
    """
    linear_in: list[tuple[str, Slice, int]] = []
    other: list[tuple[str, Slice]] = []
    for s in group.slices:
        path, leaf, mod, axes = _slice_owner(module, s)
        if axes is not None:
            if leaf == "weight" and s.axis == axes[1]:
                linear_in.append((path, s, axes[1]))
        elif mod is not None:
            t = dict(mod.named_parameters(recurse=False)).get(leaf)
            if t is not None and t.dim() >= 2 and s.axis % t.dim() == t.dim() - 1:
                other.append((path, s))
    if len(linear_in) == 1:
        path, s, axis = linear_in[0]
        return Projection(path, s.param, axis, s.index, True)
    if linear_in:
        path, s, axis = linear_in[0]
        return Projection(path, s.param, axis, s.index, False)
    if other:
        path, s = other[0]
        return Projection(path, s.param, s.axis, s.index, False)
    return None


# ---- one layer through the IR ---------------------------------------------------------------------


@dataclass
class WholePart:
    """Part of a decoder layer the units leave whole, and why."""

    kind: str  # ATTN | MLP
    name: str  # the group (or the part) left whole
    role: str
    size: int | None  # its channels, where known
    reason: str


@dataclass
class LayerGroups:
    """The unit groups of one decoder layer."""

    index: int
    prefix: str  # "model.layers.3"
    attention: list[Group] = field(default_factory=list)  # prunable, exact attention groups
    mlp: list[Group] = field(default_factory=list)  # prunable, exact MLP groups
    whole: list[WholePart] = field(default_factory=list)
    query_heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    source: str = "ir"  # "names" | "ir"

    def reason(self, kind: str) -> str:
        return "; ".join(w.reason for w in self.whole if w.kind == kind)


class _LayerHolder(nn.Module):
    """One decoder layer held at its path in the model (`model.layers.3`), so that the exported
    graph, its groups and their attribute updates name the model's own tensors and modules."""

    def __init__(self, path: str, index: int, layer: nn.Module):
        super().__init__()
        cur: nn.Module = self
        for part in path.split("."):
            child = nn.Module()
            cur.add_module(part, child)
            cur = child
        cur.add_module(str(index), layer)
        self.layer_path = f"{path}.{index}"

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        return self.get_submodule(self.layer_path)(hidden_states, **kwargs)


def export_layer(path: str, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Graph, nn.Module]:
    """The IR of decoder layer `index` run as `layer(hidden, **kwargs)`, and the holder it was traced in."""
    holder = _LayerHolder(path, index, layer)
    try:
        graph = import_module(holder, kwargs, (hidden,))
    except SlimcError as exc:
        raise SlimcError(f"layer {index} ({path}.{index}): {exc}") from exc
    return graph, holder


@dataclass(frozen=True)
class AttentionShape:
    """An attention op of the layer graph: heads as the IR sees them."""

    module: str
    query_heads: int
    kv_heads: int  # real KV heads (copies made by repeat_kv's expand not counted)
    head_dim: int
    query_reason: str  # why its query heads cannot be removed ('' when they can)


def _real_heads(a) -> int:
    n = 1
    for leaf in leaves(a) if a is not None and find(a).size > 1 else []:
        if "expand" not in leaf.tags:
            n *= leaf.size
    return n


def attention_shapes(graph: Graph) -> list[AttentionShape]:
    """Every attention op of `graph` (sdpa, or eager attention's probabilities @ values) with its head counts."""
    st = run_rules(graph)
    found: dict[str, AttentionShape] = {}
    for node in graph.nodes:
        if node.op == "sdpa":
            q, k = node.inputs[0], node.inputs[1]
            hd = q.shape[-1]
        elif (node.op == "matmul" and len(node.inputs) >= 2 and all(v is not None and v.param is None and st.rank(v) >= 4 for v in node.inputs[:2])):
            q, k = node.inputs[0], node.inputs[1]  # eager: the last such product (p @ v) of a module wins
            hd = k.shape[-1]
        else:
            continue
        if not all(isinstance(d, int) for d in (*q.shape, *k.shape)):
            continue
        reasons = sorted({r for leaf in leaves(st.ax(q, -3)) for r in leaf.reasons})
        found[node.module] = AttentionShape(node.module, int(q.shape[-3]), _real_heads(st.ax(k, -3)), int(hd), "; ".join(reasons[:2]))
    return list(found.values())


def _neuron_like(g: Group, module: nn.Module) -> bool:
    """A group every slice of which sits on linear weights/biases, owning output rows and one input
    column per channel: an MLP neuron whose linears the rules saw as matmuls (Falcon's `x @ W.T`)."""
    out_side = in_side = False
    for s in g.slices:
        _, leaf, _, axes = _slice_owner(module, s)
        if axes is None:
            return False
        if leaf == "bias" or s.axis == axes[0]:
            out_side = True
        elif leaf == "weight" and s.axis == axes[1] and s.index.shape[1] == 1:
            in_side = True
        else:
            return False
    return out_side and in_side


def _feeds_a_linear(g: Group, module: nn.Module) -> bool:
    """`g` owns input columns of some linear weight."""
    for s in g.slices:
        _, leaf, _, axes = _slice_owner(module, s)
        if axes is not None and leaf == "weight" and s.axis == axes[1]:
            return True
    return False


def _why(g: Group) -> str:
    return g.reason if not g.prunable else g.inexact_reason or "removing it changes the outputs"


def classify_layer(groups: list[Group], shapes: list[AttentionShape], module: nn.Module, path: str, index: int) -> LayerGroups:
    """Sort one layer's groups into attention units, MLP units and what is left whole (with reasons)."""
    prefix = f"{path}.{index}"
    lg = LayerGroups(index, prefix)
    attn_cands = [g for g in groups if g.role in _ATTENTION_ROLES]
    mlp_cands = [g for g in groups if g.role in _MLP_ROLES or (g.role in (Role.UNKNOWN, Role.LINEAR_CHANNEL) and _neuron_like(g, module))]
    for g in attn_cands + mlp_cands:
        g.layer = index
        if g.role not in _MLP_ROLES + _ATTENTION_ROLES:
            g.role = Role.MLP_NEURON  # recognised by its structure (linears the rules saw as matmuls)
    lg.attention = [g for g in attn_cands if g.prunable and g.exact]
    lg.mlp = [g for g in mlp_cands if g.prunable and g.exact]
    if shapes:
        s = shapes[0]
        lg.query_heads, lg.kv_heads, lg.head_dim = s.query_heads, s.kv_heads, s.head_dim
    single_kv = [s for s in shapes if s.kv_heads == 1]
    for s in single_kv:
        lg.whole.append(WholePart(ATTN, f"{s.module}:kv_group", Role.KV_GROUP, 1,
                                  "a single KV head (multi-query attention) is never removed"))
    if not lg.attention:
        if attn_cands:
            g = attn_cands[0]
            lg.whole.append(WholePart(ATTN, g.name, g.role, g.size, f"{g.name} is not removable exactly: {_why(g)}"))
        elif single_kv:
            s = single_kv[0]
            lg.whole.append(WholePart(ATTN, f"{s.module}:head", Role.HEAD, s.query_heads,
                                      f"its {s.query_heads} query heads cannot be removed exactly: {s.query_reason or 'no rule offers them'}"))
        elif shapes:
            s = shapes[0]
            lg.whole.append(WholePart(ATTN, f"{s.module}:head", Role.HEAD, s.query_heads,
                                      f"the analysis offers no removable heads: {s.query_reason or 'no rule offers them'}"))
        else:
            lg.whole.append(WholePart(ATTN, f"{prefix}:attention", Role.UNKNOWN, None, "no attention op was found in this layer"))
    if not lg.mlp:
        if not mlp_cands:  # no neuron survived as one group: say what blocked the linears outside the attention
            attn_paths = tuple(f"{s.module}." for s in shapes if s.module)
            mlp_cands = [g for g in groups if not g.prunable and g.role not in _ATTENTION_ROLES + (Role.HIDDEN,)
                         and not any(sl.param.startswith(attn_paths) for sl in g.slices) and _feeds_a_linear(g, module)]
        if mlp_cands:
            g = mlp_cands[0]
            lg.whole.append(WholePart(MLP, g.name, g.role, g.size, f"{g.name} is not removable exactly: {_why(g)}"))
        else:
            lg.whole.append(WholePart(MLP, f"{prefix}:mlp", Role.UNKNOWN, None, "the analysis found no MLP neurons in this layer"))
    return lg


def analyse_layer(path: str, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> LayerGroups:
    """Export decoder layer `index` and find its units (see the module docstring)."""
    graph, holder = export_layer(path, index, layer, hidden, kwargs)
    groups = find_groups(graph, holder)
    return classify_layer(groups, attention_shapes(graph), holder, path, index)


# ---- layers of the same signature -------------------------------------------------------------------

_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return tuple(v)
    if callable(v) and not isinstance(v, nn.Module):
        return getattr(v, "__qualname__", type(v).__name__)
    return ...  # not part of the signature (configs, tensors: tensors are compared by shape below)


def layer_signature(layer: nn.Module) -> tuple:
    """What decides a layer's graph: module types, tensor shapes and dtypes, scalar attributes
    (layer indices excluded). Two layers with equal signatures have the same groups up to names."""
    sig = []
    for path, mod in layer.named_modules():
        attrs = tuple(sorted((k, _scalar(v)) for k, v in vars(mod).items()
                             if not k.startswith("_") and k != "training" and k not in _INDEX_ATTRS and _scalar(v) is not ...))
        sig.append((path, type(mod).__qualname__, attrs))
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        sig.append((name, tuple(t.shape), str(t.dtype)))
    return tuple(sig)


def _rename(s: str, src: str, dst: str) -> str:
    if s == src or s.startswith((src + ".", src + ":", src + "#")):
        return dst + s[len(src):]
    return s


def _rename_in_text(text: str, src: str, dst: str) -> str:
    """Every module path under `src` named in `text` (a reason) moved under `dst`."""
    return re.sub(rf"(?<![\w.]){re.escape(src)}(?=[.:#)\s]|$)", dst, text)


def _retarget_group(g: Group, src: str, dst: str, index: int) -> Group:
    return replace(
        g, name=_rename(g.name, src, dst), layer=index,
        slices=[Slice(_rename(s.param, src, dst), s.axis, s.index) for s in g.slices],
        attrs=[AttrUpdate(_rename(a.module, src, dst), a.attr, a.per_channel) for a in g.attrs],
    )


def retarget(lg: LayerGroups, path: str, index: int) -> LayerGroups:
    """`lg`'s groups renamed for layer `index` of the same signature."""
    src, dst = lg.prefix, f"{path}.{index}"
    return LayerGroups(
        index, dst,
        [_retarget_group(g, src, dst, index) for g in lg.attention],
        [_retarget_group(g, src, dst, index) for g in lg.mlp],
        [replace(w, name=_rename(w.name, src, dst), reason=_rename_in_text(w.reason, src, dst)) for w in lg.whole],
        lg.query_heads, lg.kv_heads, lg.head_dim, lg.source,
    )


# ---- the name path, where it is safe ---------------------------------------------------------------

_NAMES_CONFIRMED: set[tuple] = set()  # (layer class, attention implementation) whose names the IR confirmed


def _plain_view(config: Any, path: str, i: int, layer: nn.Module) -> DecoderLayerView | None:
    """The Llama-style view of a layer when nothing about it is ambiguous, else None."""
    try:
        v = _named_view(config, path, i, layer)
    except (SlimcError, AttributeError, TypeError, ZeroDivisionError):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    projs = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    if not all(isinstance(p, nn.Linear) for p in projs) or v.num_kv_heads < 2:
        return None  # one KV head (MQA): never a unit; the IR says what can be done
    hd, nq, nkv = v.head_dim, v.num_heads, v.num_kv_heads
    if (attn.q_proj.out_features != nq * hd or attn.k_proj.out_features != nkv * hd or attn.v_proj.out_features != nkv * hd
            or attn.o_proj.in_features != nq * hd):
        return None  # e.g. a q_proj that also computes an output gate
    if not (mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features):
        return None
    known = {f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for w in ("weight", "bias")}
    for name, t in attn.named_parameters():
        if name not in known and not (t.dim() == 1 and t.numel() == hd):  # q_norm / k_norm over head_dim
            return None
    known = {f"{p}.{w}" for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias")}
    if any(name not in known for name, _ in mlp.named_parameters()):
        return None
    return v


def _same_group(a: Group, b: Group) -> bool:
    def key(g: Group) -> set:
        return {(s.param, s.axis, tuple(s.index.reshape(-1).tolist()), tuple(s.index.shape)) for s in g.slices}

    return a.size == b.size and a.role == b.role and not a.attrs and not b.attrs and key(a) == key(b)


def _from_view(v: DecoderLayerView) -> LayerGroups:
    return LayerGroups(v.index, v.prefix, [v.kv_group], [v.mlp_neuron], [], v.num_heads, v.num_kv_heads, v.head_dim, "names")


def _check_unshared(path: str, layers: nn.ModuleList) -> None:
    owner: dict[int, tuple[int, str]] = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters(remove_duplicate=False):
            j, other = owner.setdefault(id(p), (i, name))
            if j != i:
                raise SlimcError(f"decoder layers {j} and {i} share a parameter ({path}.{j}.{other}): "
                                 "their units cannot be found layer by layer")


Example = Callable[[], tuple[torch.Tensor, dict[str, Any]]]


def decoder_layer_groups(model: Model | nn.Module, example: Example | None = None, *, use_names: bool = True) -> list[LayerGroups]:
    """The unit groups of every decoder layer (see the module docstring).

    `example()` gives the hidden states and keyword arguments a decoder layer receives (called at
    most once, and only when a layer needs the IR). `use_names=False` sends every layer through the IR.
    """
    module = model.module if isinstance(model, Model) else model
    config = model.config if isinstance(model, Model) else getattr(module, "config", None)
    path, layers = _layers(module)
    _check_unshared(path, layers)
    impl = getattr(config, "_attn_implementation", None)
    inputs: list[tuple[torch.Tensor, dict[str, Any]]] = []
    by_signature: dict[tuple, LayerGroups] = {}
    out: list[LayerGroups] = []
    for i, layer in enumerate(layers):
        view = _plain_view(config, path, i, layer) if use_names else None
        key = (type(layer), impl)
        if view is not None and key in _NAMES_CONFIRMED:
            out.append(_from_view(view))
            continue
        sig = layer_signature(layer)
        if sig in by_signature:
            out.append(retarget(by_signature[sig], path, i))
            continue
        if example is None:
            raise SlimcError(f"layer {i} ({path}.{i}): finding its units needs example inputs for the layer")
        if not inputs:
            inputs.append(example())
        hidden, kwargs = inputs[0]
        try:
            lg = analyse_layer(path, i, layer, hidden, kwargs)
        except SlimcError:
            if view is None:
                raise
            out.append(_from_view(view))  # a plain Llama layout torch.export cannot trace: its names, as before the IR
            continue
        by_signature[sig] = lg
        if view is not None and len(lg.attention) == 1 and len(lg.mlp) == 1 and not lg.whole \
                and _same_group(lg.attention[0], view.kv_group) and _same_group(lg.mlp[0], view.mlp_neuron):
            _NAMES_CONFIRMED.add(key)
            lg = _from_view(view)
        out.append(lg)
    return out
