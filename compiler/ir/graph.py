"""The graph IR shared by the PyTorch and ONNX front-ends.

Both importers lower their ops to one *canonical* vocabulary, so the coupled-dimension analysis
(and every structured pass) is written once. A node keeps the op it came from (`source_op`, e.g.
`aten.linear.default` or `onnx::Gemm`) and the module path it belongs to (`module`), so results
map back to `nn.Module`s or ONNX initializers.

Canonical ops (inputs; attrs) — append new ones here with their dimension rule:
  linear     (x, weight, bias?)        w_out_axis, w_in_axis (torch: 0, 1; ONNX MatMul initializer: 1, 0)
  conv       (x, weight, bias?)        groups, transposed, channel axis 1
  matmul     (a, b)                    batched activation x activation product
  add sub mul div  (a, b)              broadcasting element-wise
  unary      (x,)                      fn: relu, silu, gelu, neg, exp, cast, pow, ... (shape-preserving)
  softmax    (x,)                      axis
  reduce     (x,)                      fn, axes, keepdim (max/min with one axis also output indices)
  reshape    (x,)                      shape: output shape (ints; -1 resolved)
  permute    (x,)                      perm
  concat     (xs...)                   axis, stack (torch.stack: a new axis)
  split      (x,) -> several           axis, sizes, even (chunk / equal split_size: sizes follow the input)
  slice      (x,)                      axis, start, end, step (start/end clamped to the axis)
  expand     (x,)                      shape
  norm       (x, weight?, bias?)       kind: layer | rms | batch | group, axis (normalised/channel axis), num_groups;
                                       layer/rms also give `axes` (all normalised axes); batch adds running mean/var inputs
  embedding  (weight, ids)
  sdpa       (q, k, v, mask?)          heads on axis 1, sequence on 2, head_dim on 3; enable_gqa
  gather     (x, index...)             axes (consecutive indexed axes); index values address them
  opaque     (...)                     anything without a rule: blocks pruning of every dim it touches

Added by the PyTorch importer (each has its rule in `compiler/dim_rules.py`):
  elementwise (xs...)                  fn: where, maximum, minimum, eq, lt, masked_fill, ... (broadcasting)
  select     (x,)                      axis, index: one entry of `axis`, the axis is dropped
  repeat     (x,)                      repeats (tile, one per output axis) or axis+repeats (interleave)
  scan       (x,)                      fn (cumsum, ...), axis: keeps the shape, mixes entries along `axis`
  topk       (x,) -> values, indices   axis, k (sort: k == size); indices address `x`'s axis
  histc      (x,)                      bins: counts of index values, one per entry of the addressed axis
  one_hot    (x,)                      num_classes: like histc, a new last axis addressed by x's values
  grouped_mm (x, weight, offsets)      MoE experts: x[S, in] @ weight[E, in, out] per expert; offsets[E]
  source     ()                        a tensor created from nothing (arange, zeros, full): sizes fixed at trace time

Added by the ONNX importer (rules in `compiler/dim_rules.py` too):
  pool       (x,)                      kind: max | avg | lp | resize | pad | ...; channel axis 1 kept
  norm       kind batch with instance=True (InstanceNormalization: per-channel, per-sample statistics)
  linear     alpha, beta (Gemm scaling)
  source     fn: shape | size (Shape / Size of a tensor)
  sdpa       also from ONNX `Attention` (opset 23, 4-D inputs)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

Dim = int | str  # symbolic dims (batch, sequence) are strings


@dataclass(eq=False)
class Value:
    name: str
    shape: tuple[Dim, ...] | None = None
    dtype: str | None = None
    producer: "Node | None" = None
    users: list["Node"] = field(default_factory=list)
    param: str | None = None  # parameter/buffer name (torch) or initializer name (ONNX)
    const: Any = None  # small constant payload (e.g. a shape tensor), when known

    def __repr__(self) -> str:
        tag = f" param={self.param}" if self.param else ""
        return f"%{self.name}{list(self.shape) if self.shape is not None else ''}{tag}"


@dataclass(eq=False)
class Node:
    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    module: str = ""  # module path (torch) or a name scope (ONNX)
    source_op: str = ""
    name: str = ""

    def __repr__(self) -> str:
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self.inputs)
        outs = ", ".join(f"%{v.name}" for v in self.outputs)
        attrs = "".join(f" {k}={v}" for k, v in self.attrs.items())
        return f"{outs} = {self.op}({ins}){attrs}  # {self.source_op} @{self.module}"


@dataclass(eq=False)
class Graph:
    nodes: list[Node] = field(default_factory=list)  # topological order
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    params: dict[str, Value] = field(default_factory=dict)  # name -> value

    def values(self) -> Iterator[Value]:
        seen: set[int] = set()
        for v in [*self.inputs, *self.params.values()]:
            if id(v) not in seen:
                seen.add(id(v))
                yield v
        for n in self.nodes:
            for v in n.outputs:
                if id(v) not in seen:
                    seen.add(id(v))
                    yield v

    def dump(self) -> str:
        lines = [f"graph(inputs={self.inputs}, params={len(self.params)})"]
        lines += [f"  {n!r}" for n in self.nodes]
        lines.append(f"  return {self.outputs}")
        return "\n".join(lines)

    # --- queries -----------------------------------------------------------------------------

    def producer(self, value: Value) -> Node | None:
        return value.producer

    def users(self, value: Value) -> list[Node]:
        return list(value.users)

    def nodes_of(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def param_value(self, name: str) -> Value:
        return self.params[name]

    # --- construction ---------------------------------------------------------------------------

    def add_node(self, node: Node) -> Node:
        """Append `node` (its inputs must already exist) and wire producer/users."""
        self.nodes.append(node)
        for v in node.inputs:
            if v is not None:
                v.users.append(node)
        for v in node.outputs:
            v.producer = node
        return node

    def clone(self) -> "Graph":
        """A structural copy: new Values and Nodes, attrs and constants shared (they are read-only)."""
        vmap: dict[int, Value] = {}

        def cp(v: Value | None) -> Value | None:
            if v is None:
                return None
            if id(v) not in vmap:
                vmap[id(v)] = Value(v.name, v.shape, v.dtype, None, [], v.param, v.const)
            return vmap[id(v)]

        g = Graph(inputs=[cp(v) for v in self.inputs], params={k: cp(v) for k, v in self.params.items()})
        for n in self.nodes:
            g.add_node(Node(n.op, [cp(v) for v in n.inputs], [cp(v) for v in n.outputs], copy.copy(n.attrs), n.module, n.source_op, n.name))
        g.outputs = [cp(v) for v in self.outputs]
        return g

    def verify(self) -> None:
        """Raise ValueError unless nodes are in topological order and producer/users links agree."""
        defined: set[int] = {id(v) for v in self.inputs} | {id(v) for v in self.params.values()}
        for v in [*self.inputs, *self.params.values()]:
            if v.producer is not None:
                raise ValueError(f"graph input/param {v!r} has a producer")
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                if v is None:
                    continue
                if id(v) not in defined:
                    raise ValueError(f"node {i} ({n.op} {n.name}) reads {v!r} before it is defined")
                if sum(u is n for u in v.users) != sum(x is v for x in n.inputs):
                    raise ValueError(f"{v!r} does not list node {i} ({n.name}) among its users")
            for v in n.outputs:
                if v.producer is not n:
                    raise ValueError(f"{v!r} is an output of node {i} ({n.name}) but names another producer")
                if id(v) in defined:
                    raise ValueError(f"{v!r} is defined twice")
                defined.add(id(v))
        nodes = {id(n) for n in self.nodes}
        for v in self.values():
            for u in v.users:
                if id(u) not in nodes:
                    raise ValueError(f"{v!r} lists a user that is not in the graph")
                if not any(x is v for x in u.inputs):
                    raise ValueError(f"{v!r} lists user {u.name} which does not read it")
        for v in self.outputs:
            if id(v) not in defined:
                raise ValueError(f"graph output {v!r} is never defined")
