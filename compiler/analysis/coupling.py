"""Coupled-dimension analysis: the groups of parameter slices that must shrink together.

    graph = import_module(model, {"input_ids": ids})
    groups = find_groups(graph, model)      # list[Group], in the format of compiler/groups.py
    groups = model_groups(slimc_model)      # the same from a slimc Model (torch or ONNX)

Every axis of every tensor becomes a channel atom (`compiler/channel_atoms.py`); every op's rule
(`compiler/dim_rules.py`) unifies, refines or blocks atoms. A group is one final leaf class that
touches a parameter: channel c owns, in every parameter axis of the class, the positions whose
coordinate for that leaf is c. So a KV head owns its k/v rows, the rows of its G query heads
(through repeat_kv's expand/reshape or sdpa's enable_gqa) and the matching o_proj columns; a
gated-MLP neuron owns its gate row, up row and down column; an MoE expert owns axis 0 of the
expert tensors and its router row (through the router's top-k indices, not the example routing).

A group is unprunable (with the reason) when any rule blocked it; prunable but `exact=False`
when removing a zeroed channel still changes outputs (softmax / top-k over experts). Roles come
from what the rules saw (attention heads, norms, embeddings, expert tensors); with the module,
attributes that count channels (num_heads, num_key_value_heads, num_experts, ...) become
`Group.attrs` so surgery keeps the module consistent.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from slimc.compiler.analysis.channel_atoms import Atom, block, find, leaves, positions
from slimc.compiler.analysis.dim_rules import DimState, run_rules
from slimc.compiler.frontends.import_torch import import_module
from slimc.compiler.groups import AttrUpdate, Group, Role, Slice
from slimc.compiler.ir.graph import Graph
from slimc.compiler.model import Model
from slimc.errors import SlimcError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|stages|encoder\.layer)\.(\d+)\.")

# module attributes that count channels of a group: (names, what one channel is worth)
_Q_COUNT = ("num_heads", "num_attention_heads", "n_head", "n_heads", "num_q_heads")
_KV_COUNT = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads_per_partition")
_HEAD_WIDTH = ("all_head_size", "inner_dim", "split_size")
_EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts")


def find_groups(graph: Graph, module: nn.Module | None = None) -> list[Group]:
    """All channel groups of `graph` (from `import_module`), prunable or not (with a reason)."""
    st = run_rules(graph)
    _check_even_splits(st)
    slices: dict[int, list[Slice]] = defaultdict(list)
    roots: dict[int, Atom] = {}
    for name, v in graph.params.items():
        for axis, a in enumerate(st.axes(v)):
            for leaf, index in positions(a).values():
                roots[leaf.id] = leaf
                slices[leaf.id].append(Slice(name, axis, index))
    # the module that reads a tensor names it better than an initializer name (ONNX: val_105)
    owners = {name: next((u.module for u in v.users if u.module), "") or _owner(name) for name, v in graph.params.items()}
    groups: list[Group] = []
    for lid, sl in slices.items():
        leaf = find(roots[lid])
        if leaf.size == 1:
            block(leaf, "a single channel: removing it would leave an empty axis")
        elif leaf.size == 0:
            block(leaf, "an empty axis: no channel to remove")
        groups.append(_make_group(leaf, sl, module, owners, st.producers))
    _name_uniquely(groups)
    return groups


def _check_even_splits(st: DimState) -> None:
    """chunk / equal split: each part must lose the same number of positions per channel."""
    for why, parts in st.even_splits:
        per_part = [{lid: pos.shape[1] for lid, (_, pos) in positions(p).items()} for p in parts]
        for lid in set().union(*per_part):
            if len({c.get(lid, 0) for c in per_part}) > 1:
                for p in parts:
                    for leaf in leaves(p):
                        if leaf.id == lid:
                            block(leaf, f"{why}: equal parts would shrink unequally")


def _layer_of(params: list[str]) -> int | None:
    found = set()
    for p in params:
        m = _LAYER_RE.search(p)
        found.add(int(m.group(1)) if m else None)
    return found.pop() if len(found) == 1 else None


def _owner(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        out.append(xs[0])
    return ".".join(out)


def _role(leaf: Atom, params: list[str]) -> str:
    tags = leaf.tags
    if "attn.head_dim" in tags or "expand" in tags:
        return Role.UNKNOWN
    if "attn.kv_heads" in tags or "attn.q_heads" in tags:
        q, kv = tags.get("attn.q_heads"), tags.get("attn.kv_heads")
        if isinstance(q, int) and isinstance(kv, int) and q > kv:
            return Role.KV_GROUP
        return Role.HEAD
    if "moe.expert" in tags:
        return Role.EXPERT
    if "embedding.dim" in tags or "norm.features" in tags:
        return Role.HIDDEN
    if "moe.ffn_in" in tags or "moe.ffn_out" in tags:
        return Role.EXPERT_NEURON
    if "conv.out" in tags or "conv.groups" in tags or "norm.batch" in tags or "norm.group" in tags:
        return Role.CONV_CHANNEL
    if "linear.out" in tags and "linear.in" in tags and _layer_of(params) is not None:
        return Role.MLP_NEURON
    if "linear.out" in tags or "linear.in" in tags:
        return Role.LINEAR_CHANNEL
    return Role.UNKNOWN


_SUFFIX = {Role.KV_GROUP: "kv_group", Role.HEAD: "head", Role.MLP_NEURON: "neuron", Role.EXPERT: "expert",
           Role.EXPERT_NEURON: "expert_neuron", Role.HIDDEN: "hidden", Role.CONV_CHANNEL: "channel",
           Role.LINEAR_CHANNEL: "channel", Role.UNKNOWN: "dim"}
_TAG_SUFFIX = {"attn.head_dim": "head_dim", "expand": "expanded"}


def _make_group(leaf: Atom, slices: list[Slice], module: nn.Module | None, owner_of: dict[str, str],
                producers: set[tuple[str, int]]) -> Group:
    params = sorted({s.param for s in slices})
    owners = sorted({owner_of.get(p) or _owner(p) for p in params})
    role = _role(leaf, [f"{o}." for o in owners])
    prefix = _common_prefix(owners)
    if role in (Role.KV_GROUP, Role.HEAD, Role.MLP_NEURON, Role.EXPERT, Role.EXPERT_NEURON) and prefix in owners and len(owners) > 1:
        prefix = _owner(prefix)
    elif role in (Role.CONV_CHANNEL, Role.LINEAR_CHANNEL):
        # channels are named after the first layer that produces them (conv/linear output rows)
        made = next((s.param for s in slices if (s.param, s.axis) in producers), None)
        if made is not None:
            prefix = owner_of.get(made) or _owner(made)
    suffix = next((s for t, s in _TAG_SUFFIX.items() if t in leaf.tags), None) if role == Role.UNKNOWN else None
    name = f"{prefix or 'model'}:{suffix or _SUFFIX[role]}"
    # an op without a rule is the reason a user can act on (an import to fix): it comes first
    reasons = sorted(leaf.reasons, key=lambda r: ("no dimension rule" not in r, r))
    g = Group(name, leaf.size, slices, role, _layer_of([f"{o}." for o in owners]))
    if reasons:
        g.prunable = False
        g.reason = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
    if leaf.inexact:
        g.exact = False
        g.inexact_reason = "; ".join(sorted(leaf.inexact)[:3])
    if module is not None and g.prunable:
        g.attrs = _attr_updates(leaf, g, owners, module)
    if role == Role.EXPERT_NEURON:
        # torch's grouped_mm (transformers' default MoE path) needs 16-byte aligned strides
        g.multiple_of = max(1, 16 // _element_size(module, params))
    return g


def _element_size(module: nn.Module | None, params: list[str]) -> int:
    if module is None:
        return 4
    named = dict(module.named_parameters())
    return min((named[p].element_size() for p in params if p in named), default=4)


def _candidate_modules(owners: list[str], module: nn.Module) -> list[tuple[str, nn.Module]]:
    seen: dict[str, nn.Module] = {}
    for o in owners:
        for path in (o, _owner(o)):
            if path in seen:
                continue
            try:
                seen[path] = module.get_submodule(path) if path else module
            except AttributeError:
                continue
    return list(seen.items())


def _counted(leaf: Atom, module: nn.Module) -> list[AttrUpdate]:
    """Updates for module attributes a rule said count this leaf's axis (`dim_rules.count`), e.g.
    PReLU's num_parameters, an LSTM's input_size: each drops by the positions a channel owns there."""
    out = []
    for key, axis in sorted(leaf.tags.items(), key=lambda kv: kv[0]):
        if not key.startswith("count:") or not isinstance(axis, Atom):
            continue
        _, path, attr = key.split(":", 2)
        try:
            mod = module.get_submodule(path)
        except AttributeError:
            continue
        owned = {lid: pos.shape[1] for lid, (_, pos) in positions(axis).items()}
        value = getattr(mod, attr, None)
        if leaf.id in owned and isinstance(value, int) and not isinstance(value, bool) and value == find(axis).size:
            out.append(AttrUpdate(path, attr, owned[leaf.id]))
    return out


def _attr_updates(leaf: Atom, g: Group, owners: list[str], module: nn.Module) -> list[AttrUpdate]:
    out: list[AttrUpdate] = _counted(leaf, module)
    if g.role in (Role.KV_GROUP, Role.HEAD):
        hq = leaf.tags.get("attn.q_heads")
        hk = leaf.tags.get("attn.kv_heads", hq)
        if not isinstance(hq, int) or not isinstance(hk, int) or hk == 0:
            return out
        G = hq // hk
        for path, mod in _candidate_modules(owners, module):
            if isinstance(mod, (nn.Linear, nn.Conv1d)) or type(mod).__name__ == "Conv1D":
                continue
            head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None) or getattr(mod, "head_size", None)
            for attr in _Q_COUNT:
                if getattr(mod, attr, None) == hq and isinstance(getattr(mod, attr), int):
                    out.append(AttrUpdate(path, attr, G))
            for attr in _KV_COUNT:
                if getattr(mod, attr, None) == hk and isinstance(getattr(mod, attr), int):
                    out.append(AttrUpdate(path, attr, 1))
            if isinstance(head_dim, int):
                for attr in _HEAD_WIDTH:
                    if getattr(mod, attr, None) == hq * head_dim and isinstance(getattr(mod, attr), int):
                        out.append(AttrUpdate(path, attr, G * head_dim))
    elif g.role == Role.EXPERT:
        for path, mod in _candidate_modules(owners, module):
            for attr in _EXPERT_COUNT:
                if getattr(mod, attr, None) == g.size and isinstance(getattr(mod, attr), int):
                    out.append(AttrUpdate(path, attr, 1))
    return out


def _name_uniquely(groups: list[Group]) -> None:
    counts = Counter(g.name for g in groups)
    seen: Counter = Counter()
    for g in groups:
        if counts[g.name] > 1:
            seen[g.name] += 1
            g.name = f"{g.name}#{seen[g.name] - 1}"


def model_graph(model: Model, example_inputs: dict[str, Any] | None = None) -> Graph:
    """The IR of a slimc `Model`: ONNX models through the ONNX importer, torch models through
    torch.export with `example_inputs`, else `model.example_inputs`, else (a causal LM) 8 tokens."""
    if model.is_onnx:
        from slimc.compiler.frontends.import_onnx import import_onnx

        return import_onnx(model.onnx)
    inputs = example_inputs or model.example_inputs
    if inputs is None:
        if not model.is_causal_lm:
            raise SlimcError("analysing this model needs example inputs: set Model.example_inputs (forward kwargs)")
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        inputs = {"input_ids": torch.arange(8, dtype=torch.long)[None, :] % vocab}
    return import_module(model.module, inputs)


def model_groups(model: Model, example_inputs: dict[str, Any] | None = None) -> list[Group]:
    """`find_groups` on a slimc `Model` (see `model_graph` for the example inputs used)."""
    return find_groups(model_graph(model, example_inputs), None if model.is_onnx else model.module)


def select(groups: list[Group], role: str | None = None, layer: int | None = None, *, prunable: bool = True) -> list[Group]:
    """Units by role and layer, e.g. `select(groups, Role.KV_GROUP, layer=7)`."""
    return [g for g in groups if (role is None or g.role == role) and (layer is None or g.layer == layer)
            and (g.prunable or not prunable)]


_NO_RULE_RE = re.compile(r"op (\S+) \(([^()]*)\) has no dimension rule")


def why_nothing_prunable(groups: list[Group]) -> str:
    """One line saying why `groups` offer nothing to prune, for reports: no group at all, or every
    group blocked (the ops without a dimension rule first, by how many groups they block, since
    those are what an importer fix or another export would change; else the commonest reasons)."""
    if not groups:
        return "the analysis found no channel group (no parameter axis it could follow)"
    blocked = [g for g in groups if not g.prunable]
    if len(blocked) < len(groups):
        inexact = [g for g in groups if g.prunable and not g.exact]
        if inexact and len(inexact) == len(groups) - len(blocked):
            return (f"every prunable group ({len(inexact)}) is inexact: removing even a zeroed channel changes the "
                    f"output ({inexact[0].inexact_reason})")
        return ""
    no_rule: Counter = Counter()
    other: Counter = Counter()
    for g in blocked:
        ops_here = {m.group(1) for m in _NO_RULE_RE.finditer(g.reason)}
        no_rule.update(ops_here)
        if not ops_here:
            reasons = re.sub(r" \(\+\d+ more\)$", "", g.reason).split("; ")
            other.update(r for r in reasons if not r.startswith(("model input", "model output")))
    head = f"no prunable group: all {len(groups)} groups are blocked"
    if no_rule:
        named = ", ".join(f"{op} ({n} group{'s' if n > 1 else ''})" for op, n in no_rule.most_common(3))
        more = f" and {len(no_rule) - 3} more" if len(no_rule) > 3 else ""
        return f"{head}; ops without a dimension rule: {named}{more}"
    if other:
        return f"{head}; most often: {other.most_common(1)[0][0]}"
    return f"{head} by the model's inputs and outputs (no hidden channel between two layers)"


def prunable_groups(groups: list[Group], *, exact_only: bool = False) -> list[Group]:
    return [g for g in groups if g.prunable and (g.exact or not exact_only)]
