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
  reduce     (x,)                      fn, axes, keepdim
  reshape    (x,)                      shape: output shape (ints; -1 resolved)
  permute    (x,)                      perm
  concat     (xs...)                   axis
  split      (x,) -> several           axis, sizes
  slice      (x,)                      axis, start, end, step
  expand     (x,)                      shape
  norm       (x, weight?, bias?)       kind: layer | rms | batch | group, axis (normalised/channel axis), num_groups
  embedding  (weight, ids)
  sdpa       (q, k, v, mask?)          heads on axis 1, sequence on 2, head_dim on 3; enable_gqa
  gather     (x, index)                axis
  opaque     (...)                     anything without a rule: blocks pruning of every dim it touches
"""

from __future__ import annotations

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
