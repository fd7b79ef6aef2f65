"""What a model costs, and what it would cost with some channels of its groups removed: the IR's own
multiply-accumulate (MAC) and parameter counts.

MACs are counted per forward pass at the shapes of the traced example inputs (a digits CNN: one
8x8 image; a causal LM: the tokens it was traced with):

- `linear` (x, W[out, in]): numel(output) x in_features;
- `conv` (x, W[out, in/g, k...]): numel(output) x (in/g x prod k); transposed: numel(input) x (out/g x prod k);
- `grouped_mm` (x[S, in], W[E, in, out]): S x in x out (each routed token meets one expert);
- `matmul` (two activations): numel(output) x the contracted size; `sdpa`: B H Sq Sk (D_qk + D_v).

Symbolic sizes count as 1. Element-wise ops, norms and pooling are not counted (they are a few
percent of a network's MACs and scale with the same widths).

`CostModel` answers "how many MACs (or parameters) are left when group g loses r_g channels", exactly:
a weight-bearing node's cost is its dense cost times, for each axis of its weight that groups cut,
the fraction of that axis's indices left. A convolution whose input and output channels both shrink
to 10% keeps 1% of its MACs (not -80%, which a per-channel sum would say). Activation products
(`matmul`, `sdpa`) have no weight to follow and are kept at their dense cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from slimc.compiler.groups import Group
from slimc.compiler.ir.graph import Graph, Node, Value

COST_KINDS = ("macs", "params")


def _numel(shape: Sequence | None) -> int:
    if shape is None:
        return 0
    return math.prod(d if isinstance(d, int) else 1 for d in shape)


def _size(v: Value | None, axis: int) -> int:
    if v is None or v.shape is None or not v.shape:
        return 1
    d = v.shape[axis]
    return d if isinstance(d, int) else 1


def node_macs(node: Node) -> int:
    """Multiply-accumulates of one IR node at its traced shapes (0 for ops that are not counted)."""
    out = node.outputs[0] if node.outputs else None
    if node.op == "linear":
        w = node.inputs[1]
        return _numel(out.shape) * _size(w, node.attrs.get("w_in_axis", 1))
    if node.op == "conv":
        w = node.inputs[1]
        if w is None or w.shape is None:
            return 0
        per_out = _numel(w.shape) // max(1, _size(w, 0))
        if node.attrs.get("transposed"):
            return _numel(node.inputs[0].shape) * per_out
        return _numel(out.shape) * per_out
    if node.op == "grouped_mm":
        x, w = node.inputs[0], node.inputs[1]
        return _numel(x.shape) * _size(w, -1)
    if node.op == "matmul":
        a = node.inputs[0]
        return _numel(out.shape) * _size(a, -1)
    if node.op == "sdpa":
        q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
        if q is None or q.shape is None or len(q.shape) < 4:
            return 0
        sq_heads = _numel(q.shape[:-1])  # B H Sq
        return sq_heads * _size(k, -2) * (_size(q, -1) + _size(v, -1))
    return 0


def graph_macs(graph: Graph) -> int:
    """Total MACs of one forward pass of `graph`."""
    return sum(node_macs(n) for n in graph.nodes)


def _weight_of(node: Node) -> Value | None:
    if node.op in ("linear", "conv", "grouped_mm") and len(node.inputs) > 1:
        w = node.inputs[1]
        if w is not None and w.param is not None:
            return w
    return None


@dataclass
class _Term:
    """A cost that scales with the kept fraction of some axes of one tensor."""

    cost: int
    axes: dict[int, int]  # axis -> size
    cuts: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # axis -> [(group index, indices per channel)]


class CostModel:
    """MACs or parameters of a model as a function of the channels each group loses.

    `groups` are the analysis' groups (their slices name the tensors); `kind` is `macs` or
    `params`. `cost(removed)` takes a channel count per group (a list in `groups`' order) and
    returns the model's total; `total` is the dense cost. Costs outside every group (tensors no
    group cuts, activation products) are part of the total and never shrink.
    """

    def __init__(self, graph: Graph, groups: Sequence[Group], kind: str = "macs",
                 shapes: Mapping[str, Sequence[int]] | None = None):
        if kind not in COST_KINDS:
            raise ValueError(f"cost kind must be one of {COST_KINDS}, not {kind!r}")
        self.kind, self.groups = kind, list(groups)
        self.terms: list[_Term] = []
        by_param: dict[str, list[_Term]] = {}
        fixed = 0
        if kind == "macs":
            for n in graph.nodes:
                macs = node_macs(n)
                if not macs:
                    continue
                w = _weight_of(n)
                if w is None or w.shape is None:
                    fixed += macs
                    continue
                term = _Term(int(macs), {a: _size(w, a) for a in range(len(w.shape))})
                self.terms.append(term)
                by_param.setdefault(w.param, []).append(term)
        else:
            sizes = dict(shapes) if shapes is not None else {name: v.shape for name, v in graph.params.items()}
            for name, shape in sizes.items():
                if shape is None:
                    continue
                shape = tuple(int(d) if isinstance(d, int) else 1 for d in shape)
                term = _Term(math.prod(shape), dict(enumerate(shape)))
                self.terms.append(term)
                by_param.setdefault(name, []).append(term)
        for gi, g in enumerate(self.groups):
            for s in g.slices:
                for term in by_param.get(s.param, ()):
                    axis = s.axis % max(1, len(term.axes))
                    if axis in term.axes:
                        term.cuts.setdefault(axis, []).append((gi, int(s.index.shape[1])))
        self.fixed = fixed + sum(t.cost for t in self.terms if not t.cuts)
        self.terms = [t for t in self.terms if t.cuts]
        self.terms_of: list[list[int]] = [[] for _ in self.groups]
        for ti, t in enumerate(self.terms):
            for cuts in t.cuts.values():
                for gi, _ in cuts:
                    if ti not in self.terms_of[gi]:
                        self.terms_of[gi].append(ti)
        self.total = self.fixed + sum(t.cost for t in self.terms)

    def term_cost(self, ti: int, removed: Sequence[int]) -> float:
        t = self.terms[ti]
        num, den = t.cost, 1
        for axis, cuts in t.cuts.items():
            size = t.axes[axis]
            num *= max(0, size - sum(removed[gi] * width for gi, width in cuts))
            den *= size
        return num / den if den else 0.0  # integers: exact wherever the dense cost is a multiple of the sizes

    def cost(self, removed: Sequence[int]) -> float:
        """The model's total cost with `removed[i]` channels taken out of group i."""
        return self.fixed + sum(self.term_cost(ti, removed) for ti in range(len(self.terms)))

    def saving(self, removed: Sequence[int], gi: int, n: int = 1) -> float:
        """How much the cost drops when group `gi` loses `n` more channels, from the state `removed`."""
        after = list(removed)
        after[gi] += n
        return sum(self.term_cost(ti, removed) - self.term_cost(ti, after) for ti in self.terms_of[gi])
