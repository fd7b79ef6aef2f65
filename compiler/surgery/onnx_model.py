"""Structural surgery on ONNX models: remove (or zero) a plan's channels from initializers.

`apply_plan_onnx(model, plan)` uses the same `Slice` semantics as `compiler.surgery.torch_module` (a slice's
`param` is an initializer name). Cutting initializers alone would leave a graph that no longer
runs: Reshape targets, Expand shapes, Split sizes, Slice bounds and Conv/GroupNorm group counts
still encode the old widths. So the removed indices are propagated forward through the graph,
value by value (which indices of which axis of each tensor are gone), and every such constant or
attribute is rewritten from the propagated shapes. A reshape maps removed indices through the
flattened layout, so pruning whole heads shrinks the head axis and pruning a head-dim slice
shrinks the inner axis. A plan that is inconsistent with the graph (a residual add whose other
operand keeps its width, an op with no rule, indices removed along the axis a Softmax normalises
over) raises `SlimcError` naming the node. Which ops propagate indices how (element-wise,
channel-keeping, last-axes norms, softmax, ...) is the shared vocabulary `compiler.ir.onnx_ops`.

`mask_plan_onnx(model, plan)` zeroes the same indices in place. Contract (tested): after
`mask_plan_onnx`, `apply_plan_onnx` leaves ONNX Runtime's outputs unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from slimc.compiler.frontends.import_onnx import const_array, witness_shapes
from slimc.compiler.groups import Group
from slimc.compiler.ir import onnx_ops as ops
from slimc.compiler.surgery.plan import removals
from slimc.errors import SlimcError

Removed = dict[int, np.ndarray]  # axis -> sorted removed indices (old numbering)



def _onnx_removals(model: ir.Model, plan: Mapping[Group, Sequence[int]]) -> dict[str, Removed]:
    inits = model.graph.initializers
    out: dict[str, Removed] = {}
    for name, axes in removals(plan).items():
        if name not in inits:
            raise SlimcError(f"plan names tensor '{name}', which is not an initializer of this ONNX model")
        rank = len(inits[name].shape)
        out[name] = {a % rank: np.asarray(idx, dtype=np.int64) for a, idx in axes.items()}
    return out


def mask_plan_onnx(model: ir.Model, plan: Mapping[Group, Sequence[int]]) -> None:
    """Zero, in place, every initializer index the plan would remove."""
    for name, axes in _onnx_removals(model, plan).items():
        v = model.graph.initializers[name]
        arr = np.array(v.const_value.numpy(), copy=True)
        for axis, idx in axes.items():
            sl = [slice(None)] * arr.ndim
            sl[axis] = idx
            arr[tuple(sl)] = 0
        v.const_value = ir.tensor(arr, name=name)


def apply_plan_onnx(model: ir.Model, plan: Mapping[Group, Sequence[int]]) -> dict[str, int]:
    """Remove the plan's channels from `model` in place and fix every shape that encodes them.

    Returns {"params_removed": elements removed from float initializers,
    "constants_rewritten": shape constants changed, "attributes_updated": group counts changed}.
    """
    removals = _onnx_removals(model, plan)
    return _Surgeon(model, removals).run()


def _float_numel(model: ir.Model) -> int:
    return sum(int(v.const_value.size) for v in model.graph.initializers.values()
               if v.const_value is not None and v.dtype is not None and v.dtype.is_floating_point())


def _dims(v: ir.Value) -> list[Any] | None:
    if v.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in v.shape]


class _Surgeon:
    def __init__(self, model: ir.Model, removals: dict[str, Removed]):
        self.model = model
        self.graph = model.graph
        self.removals = removals
        self.rem: dict[int, Removed] = {}  # id(value) -> removed indices per axis
        self.values: dict[int, ir.Value] = {}
        self.old_shapes: dict[int, list[Any]] = {}
        self.shape_writes: list[tuple[ir.Node, int, np.ndarray]] = []  # (node, input index, new constant)
        self.attr_writes: list[tuple[ir.Node, str, Any]] = []
        self.dyn_writes: list[tuple[ir.Node, int, ir.Node, dict[int, np.ndarray]]] = []
        self.witness = witness_shapes(model)
        self.opset = model.opset_imports.get(ops.DEFAULT, model.opset_imports.get("ai.onnx", 13))

    # -- bookkeeping -------------------------------------------------------------------------
    def get(self, v: ir.Value | None) -> Removed:
        return {} if v is None else self.rem.get(id(v), {})

    def shape(self, v: ir.Value, node: ir.Node) -> list[Any]:
        if id(v) in self.old_shapes:
            return self.old_shapes[id(v)]
        dims = self.witness.get(v.name) or _dims(v)
        if dims is None:
            raise SlimcError(f"ONNX value '{v.name}' (input of node '{node.name}') has no known shape; "
                             "run onnx shape inference on the model first")
        return dims

    def set(self, v: ir.Value, rem: Removed, node: ir.Node) -> None:
        rem = {a: r for a, r in rem.items() if len(r)}
        if not rem:
            return
        dims = self.shape(v, node) if v.shape is not None or v.name in self.witness else None
        if dims is not None:
            for a in rem:
                if not isinstance(dims[a], int):
                    raise SlimcError(f"node '{node.name}': axis {a} of '{v.name}' is dynamic and cannot be pruned")
            self.old_shapes[id(v)] = dims
        self.rem[id(v)] = rem
        self.values[id(v)] = v

    def fail(self, node: ir.Node, why: str) -> SlimcError:
        return SlimcError(f"cannot apply the plan through ONNX node '{node.name}' ({node.op_type}): {why}")

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        before = _float_numel(self.model)
        for name, axes in self.removals.items():
            v = self.graph.initializers[name]
            self.set(v, axes, _FakeNode(name))
        for node in self.graph:
            if any(id(v) in self.rem for v in node.inputs if v is not None):
                self.visit(node)
        self.commit()
        return {
            "params_removed": before - _float_numel(self.model),
            "constants_rewritten": self.n_const,
            "attributes_updated": len(self.attr_writes),
        }

    def visit(self, n: ir.Node) -> None:  # noqa: C901 — one branch per op family
        op = n.op_type
        key = ops.op_key(n.domain, op)
        if key == (ops.DEFAULT, "CastLike"):  # the second input only names a type
            self.elementwise(n, [n.inputs[0]], n.outputs[0])
        elif key in ops.ELEMENTWISE or key in ops.LAST_AXES_NORMS:
            self.elementwise(n, [v for v in n.inputs if v is not None], n.outputs[0])
        elif key in ops.SKIP_NORMS:
            # norm(input + skip + bias) over the last axis; output 3 is the sum, same layout
            self.elementwise(n, [v for v in n.inputs if v is not None], n.outputs[0])
            if len(n.outputs) > 3 and n.outputs[3] is not None:
                self.set(n.outputs[3], dict(self.get(n.outputs[0])), n)
        elif key[0] != ops.DEFAULT:
            raise self.fail(n, f"op domain '{n.domain}' has no shape rule in slimc")
        elif key in ops.SOFTMAX:
            self.softmax(n)
        elif key in ops.CHANNEL_KEEPING:
            self.channel_keeping(n)
        elif op == "MatMul":
            self.matmul(n)
        elif op == "Gemm":
            self.gemm(n)
        elif key in ops.CONVS:
            self.conv(n)
        elif key in ops.GROUP_NORMS:
            self.group_norm(n)
        elif key in ops.RESHAPES:
            self.reshape(n)
        elif op == "Transpose":
            x = n.inputs[0]
            perm = n.attributes["perm"].value if "perm" in n.attributes else list(reversed(range(len(self.shape(x, n)))))
            r = self.get(x)
            self.set(n.outputs[0], {i: r[p] for i, p in enumerate(perm) if p in r}, n)
        elif op == "Concat":
            self.concat(n)
        elif op == "Split":
            self.split(n)
        elif op == "Slice":
            self.slice(n)
        elif op == "Expand":
            self.expand(n)
        elif op == "Gather":
            self.gather(n)
        elif key in ops.REDUCE:
            self.reduce(n)
        elif op == "Attention":
            self.attention(n)
        elif key in ops.SHAPE_READS:
            pass  # reads sizes at run time: right by construction
        else:
            raise self.fail(n, "no shape rule for this op; the plan must not reach it")

    # -- rules -----------------------------------------------------------------------------------
    def elementwise(self, n: ir.Node, ins: list[ir.Value], out: ir.Value) -> None:
        """Broadcasting: every operand that spans a pruned axis must lose the same indices."""
        shapes = [self.shape(v, n) for v in ins]
        rank = max(len(s) for s in shapes)
        acc: Removed = {}
        for v, s in zip(ins, shapes):
            for a, r in self.get(v).items():
                k = a + rank - len(s)
                if k in acc and not np.array_equal(acc[k], r):
                    raise self.fail(n, f"operands lose different indices on axis {k}")
                acc[k] = r
        for k, r in acc.items():
            for v, s in zip(ins, shapes):
                a = k - (rank - len(s))
                if a < 0 or s[a] == 1:
                    continue  # broadcast along k: nothing to cut
                if a not in self.get(v):
                    raise self.fail(n, f"operand '{v.name}' keeps all {s[a]} entries of axis {a} while another operand "
                                    "loses some; add it to the group (or prune its producer too)")
        self.set(out, acc, n)

    def channel_keeping(self, n: ir.Node) -> None:
        x = n.inputs[0]
        r = self.get(x)
        if set(r) - {1}:
            raise self.fail(n, "only the channel axis (1) may shrink through this op")
        if ops.op_key(n.domain, n.op_type) in ops.CHANNEL_NORMS:  # scale, bias, running stats: per channel
            self.check_params(n, n.inputs[1:], r.get(1), 0)
        for o in n.outputs[:1]:
            self.set(o, dict(r), n)

    def softmax(self, n: ir.Node) -> None:
        """Element-wise except along the normalised axis, where any removed entry changes every output."""
        x = n.inputs[0]
        r = self.get(x)
        axis = int(n.attributes["axis"].value) if "axis" in n.attributes else None
        along = sorted(set(r) & set(ops.softmax_axes(axis, len(self.shape(x, n)), self.opset)))
        if along:
            raise self.fail(n, f"the plan removes indices of axis {along[0]} of '{x.name}', the axis this "
                            f"{n.op_type} normalises over; that changes every remaining output, so those "
                            "channels cannot be removed")
        self.set(n.outputs[0], dict(r), n)

    def check_params(self, n: ir.Node, params: Sequence[ir.Value | None], idx: np.ndarray | None, axis: int) -> None:
        for p in params:
            if p is None:
                continue
            got = self.get(p).get(axis)
            if (idx is None) != (got is None) or (idx is not None and not np.array_equal(idx, got)):
                raise self.fail(n, f"per-channel tensor '{p.name}' must lose exactly the channels its input loses")

    def matmul(self, n: ir.Node) -> None:
        a, b = n.inputs[0], n.inputs[1]
        sa, sb = self.shape(a, n), self.shape(b, n)
        if len(sa) < 2 or len(sb) < 2:
            raise self.fail(n, "1-D operands are not supported where the plan reaches")
        ra, rb = self.get(a), self.get(b)
        ka, kb = ra.get(len(sa) - 1), rb.get(len(sb) - 2)
        if (ka is None) != (kb is None) or (ka is not None and not np.array_equal(ka, kb)):
            raise self.fail(n, "the contracted axis must lose the same indices in both operands")
        rank = max(len(sa), len(sb))
        out: Removed = {}
        for s, r in ((sa, ra), (sb, rb)):  # batch axes broadcast
            for ax, idx in r.items():
                if ax < len(s) - 2:
                    out[ax + rank - len(s)] = idx
        if len(sa) - 2 in ra:
            out[rank - 2] = ra[len(sa) - 2]
        if len(sb) - 1 in rb:
            out[rank - 1] = rb[len(sb) - 1]
        self.set(n.outputs[0], out, n)

    def gemm(self, n: ir.Node) -> None:
        ta = int(n.attributes["transA"].value) if "transA" in n.attributes else 0
        tb = int(n.attributes["transB"].value) if "transB" in n.attributes else 0
        a, b = n.inputs[0], n.inputs[1]
        ra, rb = self.get(a), self.get(b)
        ka, kb = ra.get(0 if ta else 1), rb.get(1 if tb else 0)
        if (ka is None) != (kb is None) or (ka is not None and not np.array_equal(ka, kb)):
            raise self.fail(n, "the contracted axis must lose the same indices in both operands")
        out: Removed = {}
        if (1 if ta else 0) in ra:
            out[0] = ra[1 if ta else 0]
        if (0 if tb else 1) in rb:
            out[1] = rb[0 if tb else 1]
        c = n.inputs[2] if len(n.inputs) > 2 else None
        if c is not None:
            sc = self.shape(c, n)
            rc = self.get(c)
            for k, idx in out.items():
                ax = k - (2 - len(sc))
                if ax >= 0 and sc[ax] != 1 and not np.array_equal(rc.get(ax, np.empty(0)), idx):
                    raise self.fail(n, f"bias '{c.name}' must lose the same output columns as the weight")
        self.set(n.outputs[0], out, n)

    def conv(self, n: ir.Node) -> None:
        x, w = n.inputs[0], n.inputs[1]
        bias = n.inputs[2] if len(n.inputs) > 2 else None
        rx, rw = self.get(x), self.get(w)
        sw = self.shape(w, n)
        g = int(n.attributes["group"].value) if "group" in n.attributes else 1
        transposed = n.op_type == "ConvTranspose"
        if set(rx) - {1} or set(rw) - {0, 1}:
            raise self.fail(n, "only channels can be pruned through a convolution")
        cin_removed = rx.get(1)
        if transposed:
            if g != 1:
                raise self.fail(n, "grouped ConvTranspose is not supported")
            out_removed, in_axis = rw.get(1), 0
        else:
            out_removed, in_axis = rw.get(0), 1
        if g == 1:
            w_in = rw.get(in_axis)
            if (w_in is None) != (cin_removed is None) or (w_in is not None and not np.array_equal(w_in, cin_removed)):
                raise self.fail(n, "input channels of the weight and of the input must shrink together")
        else:
            cout = sw[0]
            cin_per_group = sw[1]
            out_per_group = cout // g
            if rw.get(1) is not None:
                raise self.fail(n, "a grouped convolution can only lose whole groups")
            gone = np.unique(out_removed // out_per_group) if out_removed is not None else np.empty(0, np.int64)
            want_out = (gone[:, None] * out_per_group + np.arange(out_per_group)).reshape(-1)
            want_in = (gone[:, None] * cin_per_group + np.arange(cin_per_group)).reshape(-1)
            if out_removed is not None and not np.array_equal(np.sort(out_removed), want_out):
                raise self.fail(n, "a grouped convolution can only lose whole groups of output channels")
            if not np.array_equal(cin_removed if cin_removed is not None else np.empty(0, np.int64), want_in):
                raise self.fail(n, "the input must lose exactly the channels of the removed groups")
            if len(gone):
                self.attr_writes.append((n, "group", g - len(gone)))
        if bias is not None:
            self.check_params(n, [bias], out_removed, 0)
        self.set(n.outputs[0], {} if out_removed is None else {1: out_removed}, n)

    def attention(self, n: ir.Node) -> None:
        """opset-23 Attention on 4-D [B, heads, S, head_dim]: whole heads, GQA groups kept whole."""
        q, k, v = n.inputs[:3]
        sq = self.shape(q, n)
        if len(sq) != 4 or any(x is not None for x in n.inputs[4:]):
            raise self.fail(n, "only 4-D Attention without a KV cache can be pruned")
        rq, rk, rv = self.get(q), self.get(k), self.get(v)
        if set(rq) - {1, 3} or set(rk) - {1, 3} or set(rv) - {1, 3}:
            raise self.fail(n, "only heads and head_dim can shrink through attention")
        if not _same(rq.get(3), rk.get(3)):
            raise self.fail(n, "query and key must lose the same head_dim entries")
        if not _same(rk.get(1), rv.get(1)):
            raise self.fail(n, "key and value must lose the same heads")
        hq, hk = sq[1], self.shape(k, n)[1]
        g = hq // hk
        kv_gone = rk.get(1, np.empty(0, np.int64))
        want_q = (kv_gone[:, None] * g + np.arange(g)).reshape(-1)
        if not _same(rq.get(1), want_q if len(want_q) else None):
            raise self.fail(n, f"query heads must go with their KV head ({g} per KV head)")
        out = {a: idx for a, idx in ((1, rq.get(1)), (3, rv.get(3))) if idx is not None}
        mask = n.inputs[3] if len(n.inputs) > 3 else None
        if mask is not None:
            sm = self.shape(mask, n)
            head_axis = len(sm) - 3
            if head_axis >= 0 and sm[head_axis] != 1 and not _same(self.get(mask).get(head_axis), rq.get(1)):
                raise self.fail(n, f"the attention mask '{mask.name}' has one slice per head and must lose the same heads")
        self.set(n.outputs[0], out, n)

    def group_norm(self, n: ir.Node) -> None:
        x = n.inputs[0]
        rx = self.get(x)
        if set(rx) - {1}:
            raise self.fail(n, "only the channel axis may shrink through GroupNormalization")
        idx = rx.get(1)
        c = self.shape(x, n)[1]
        ng = int(n.attributes["num_groups"].value)
        per = c // ng
        gone = np.unique(idx // per)
        if not np.array_equal(np.sort(idx), (gone[:, None] * per + np.arange(per)).reshape(-1)):
            raise self.fail(n, f"GroupNormalization can only lose whole groups of {per} channels")
        scale = n.inputs[1]
        if scale is not None and self.shape(scale, n)[0] == ng and ng != c:
            self.check_params(n, n.inputs[1:3], gone, 0)  # opset 18: one scale per group
        else:
            self.check_params(n, n.inputs[1:3], idx, 0)
        self.attr_writes.append((n, "num_groups", ng - len(gone)))
        self.set(n.outputs[0], dict(rx), n)

    def reshape(self, n: ir.Node) -> None:
        x, out = n.inputs[0], n.outputs[0]
        sin, sout = self.shape(x, n), self.shape(out, n)
        for a, idx in self.get(x).items():
            if isinstance(sin[a], int) and len(idx) >= sin[a]:
                # an empty tensor has no layout to map the removed axis through (and a -1 in the target is undefined)
                raise self.fail(n, f"the plan removes all {sin[a]} entries of axis {a} of '{x.name}', and an empty tensor "
                                "cannot be reshaped; keep at least one channel of each group")
        rout = _map_reshape(sin, sout, self.get(x))
        if rout is None:
            raise self.fail(n, f"the removed indices of {sin} cannot be expressed in the reshaped layout {sout}")
        self.set(out, rout, n)
        if n.op_type != "Reshape":
            return  # Squeeze/Unsqueeze/Flatten carry no sizes
        new_out = _shrunk(sout, rout)
        target = const_array(n.inputs[1])
        allowzero = int(n.attributes["allowzero"].value) if "allowzero" in n.attributes else 0
        new_in = _shrunk(sin, self.get(x))
        if target is not None:
            t = [int(v) for v in target.reshape(-1)]
            new_t = list(t)
            for k, v in enumerate(t):
                if v == -1:
                    continue
                if v == 0 and not allowzero:
                    if new_in[k] != new_out[k]:
                        new_t[k] = new_out[k]
                    continue
                if isinstance(new_out[k], int):
                    new_t[k] = new_out[k]
            if new_t != t:
                self.shape_writes.append((n, 1, np.asarray(new_t, dtype=target.dtype)))
        else:
            self.rewrite_dynamic(n, 1, sout, new_out)

    def rewrite_dynamic(self, n: ir.Node, idx: int, old: list[Any], new: list[Any]) -> None:
        """A shape computed at run time: rewrite the constant pieces of a Concat that builds it."""
        src = n.inputs[idx]
        prod = src.producer()
        changed = [k for k in range(len(old)) if old[k] != new[k]]
        if not changed:
            return
        if prod is not None and prod.op_type == "Shape" and self.shape_of_shape(prod) == list(new):
            return  # the target is read from a tensor that shrank the same way: right at run time
        if prod is None or prod.op_type != "Concat":
            raise self.fail(n, "the target shape is computed at run time in a form slimc cannot rewrite")
        pieces: dict[int, np.ndarray] = {}
        pos = 0
        for i, piece in enumerate(prod.inputs):
            arr = const_array(piece)
            length = int(arr.size) if arr is not None else int(self.shape(piece, prod)[0])
            hit = [k - pos for k in changed if pos <= k < pos + length]
            if hit:
                if arr is None:
                    # a run-time size read from a pruned tensor is right by itself
                    pass
                else:
                    new_piece = arr.reshape(-1).copy()
                    for h in hit:
                        if new_piece[h] not in (-1, 0):
                            new_piece[h] = new[pos + h]
                    pieces[i] = new_piece.reshape(arr.shape).astype(arr.dtype)
            pos += length
        if pieces:
            self.dyn_writes.append((n, idx, prod, pieces))

    def shape_of_shape(self, shape_node: ir.Node) -> list[Any]:
        """What a Shape node returns once the plan is applied (its start/end attributes honoured)."""
        src = shape_node.inputs[0]
        dims = _shrunk(self.shape(src, shape_node), self.get(src))
        start = int(shape_node.attributes["start"].value) if "start" in shape_node.attributes else 0
        end = int(shape_node.attributes["end"].value) if "end" in shape_node.attributes else len(dims)
        return dims[slice(start, end)]

    def write_dynamic(self) -> None:
        """Turn Concat piece rewrites into constant writes, cloning a Concat whose users disagree."""
        by_prod: dict[int, list[tuple[ir.Node, int, ir.Node, dict[int, np.ndarray]]]] = defaultdict(list)
        for w in self.dyn_writes:
            by_prod[id(w[2])].append(w)
        for writes in by_prod.values():
            prod = writes[0][2]
            out = prod.outputs[0]
            uses = {(id(u), j) for u, j in out.uses()}
            first = writes[0][3]
            agree = all(w[3].keys() == first.keys() and all(np.array_equal(w[3][k], first[k]) for k in first) for w in writes)
            if agree and uses == {(id(w[0]), w[1]) for w in writes}:
                self.shape_writes += [(prod, i, arr) for i, arr in first.items()]
                continue
            for consumer, idx, _, pieces in writes:
                clone = ir.Node(prod.domain, prod.op_type, list(prod.inputs), attributes=list(prod.attributes.values()),
                                name=self.fresh(f"{prod.name}_slimc"))
                clone.outputs[0].name = self.fresh(f"{out.name}_slimc")
                clone.outputs[0].shape, clone.outputs[0].type = out.shape, out.type
                self.graph.insert_before(consumer, clone)
                consumer.replace_input_with(idx, clone.outputs[0])
                self.shape_writes += [(clone, i, arr) for i, arr in pieces.items()]

    def concat(self, n: ir.Node) -> None:
        axis = int(n.attributes["axis"].value)
        ins = [v for v in n.inputs if v is not None]
        shapes = [self.shape(v, n) for v in ins]
        rank = len(shapes[0])
        axis %= rank
        acc: Removed = {}
        along: list[np.ndarray] = []
        off = 0
        for v, s in zip(ins, shapes):
            r = self.get(v)
            if axis in r:
                along.append(r[axis] + off)
            off += s[axis] if isinstance(s[axis], int) else 0
            for a, idx in r.items():
                if a == axis:
                    continue
                if a in acc and not np.array_equal(acc[a], idx):
                    raise self.fail(n, f"inputs lose different indices on axis {a}")
                acc[a] = idx
        for a in acc:
            for v in ins:
                if a not in self.get(v):
                    raise self.fail(n, f"input '{v.name}' keeps axis {a} whole while another input shrinks")
        if along:
            acc[axis] = np.concatenate(along)
        self.set(n.outputs[0], acc, n)

    def split(self, n: ir.Node) -> None:
        x = n.inputs[0]
        s = self.shape(x, n)
        axis = (int(n.attributes["axis"].value) if "axis" in n.attributes else 0) % len(s)
        r = self.get(x)
        sizes = [int(self.shape(o, n)[axis]) for o in n.outputs]
        off = 0
        new_sizes = []
        for o, size in zip(n.outputs, sizes):
            ro = {a: idx for a, idx in r.items() if a != axis}
            if axis in r:
                part = r[axis][(r[axis] >= off) & (r[axis] < off + size)] - off
                if len(part):
                    ro[axis] = part
                new_sizes.append(size - len(part))
            else:
                new_sizes.append(size)
            self.set(o, ro, n)
            off += size
        if new_sizes != sizes:
            if len(n.inputs) > 1 and n.inputs[1] is not None:
                if const_array(n.inputs[1]) is None:
                    raise self.fail(n, "split sizes are computed at run time")
                self.shape_writes.append((n, 1, np.asarray(new_sizes, dtype=np.int64)))
            else:  # num_outputs (equal chunks): give explicit sizes instead
                self.shape_writes.append((n, 1, np.asarray(new_sizes, dtype=np.int64)))
                if "num_outputs" in n.attributes:
                    self.attr_writes.append((n, "num_outputs", None))

    def slice(self, n: ir.Node) -> None:
        x = n.inputs[0]
        s = self.shape(x, n)
        r = self.get(x)
        starts, ends = const_array(n.inputs[1]), const_array(n.inputs[2])
        axes = const_array(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] is not None else None
        steps = const_array(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] is not None else None
        if starts is None or ends is None:
            raise self.fail(n, "slice bounds are computed at run time")
        starts, ends = starts.reshape(-1).astype(np.int64), ends.reshape(-1).astype(np.int64)
        axes = np.arange(len(starts)) if axes is None else axes.reshape(-1) % len(s)
        steps = np.ones(len(starts), np.int64) if steps is None else steps.reshape(-1)
        out = {a: idx for a, idx in r.items() if a not in set(axes.tolist())}
        new_starts, new_ends = starts.copy(), ends.copy()
        for i, a in enumerate(axes.tolist()):
            if a not in r:
                continue
            if steps[i] != 1:
                raise self.fail(n, "a strided slice cannot cross a pruned axis")
            dim = s[a]
            b, e, _ = slice(int(starts[i]), int(ends[i]), 1).indices(dim)
            idx = r[a]
            inside = idx[(idx >= b) & (idx < e)] - b
            if len(inside):
                out[a] = inside
            new_starts[i] = b - int((idx < b).sum())
            end_big = int(ends[i]) >= dim
            new_ends[i] = ends[i] if end_big else e - int((idx < e).sum())
        if not np.array_equal(new_starts, starts):
            self.shape_writes.append((n, 1, new_starts.astype(const_array(n.inputs[1]).dtype)))
        if not np.array_equal(new_ends, ends):
            self.shape_writes.append((n, 2, new_ends.astype(const_array(n.inputs[2]).dtype)))
        self.set(n.outputs[0], out, n)

    def expand(self, n: ir.Node) -> None:
        x, out = n.inputs[0], n.outputs[0]
        sx, so = self.shape(x, n), self.shape(out, n)
        off = len(so) - len(sx)
        rout = {a + off: idx for a, idx in self.get(x).items()}
        self.set(out, rout, n)
        new_out = _shrunk(so, rout)
        target = const_array(n.inputs[1])
        if target is None:
            self.rewrite_dynamic(n, 1, so, new_out)
            return
        t = [int(v) for v in target.reshape(-1)]
        toff = len(t) - len(so)
        new_t = list(t)
        for k in rout:
            if t[k + toff] != 1:
                new_t[k + toff] = new_out[k]
        if new_t != t:
            self.shape_writes.append((n, 1, np.asarray(new_t, dtype=target.dtype)))

    def gather(self, n: ir.Node) -> None:
        data, index = n.inputs[0], n.inputs[1]
        sd = self.shape(data, n)
        axis = (int(n.attributes["axis"].value) if "axis" in n.attributes else 0) % len(sd)
        rd = self.get(data)
        if self.get(index):
            raise self.fail(n, "the gathered indices cannot be pruned")
        si = self.shape(index, n)
        out: Removed = {}
        for a, idx in rd.items():
            if a < axis:
                out[a] = idx
            elif a > axis:
                out[a + len(si) - 1] = idx
            else:
                ids = const_array(index)
                if ids is None:
                    raise self.fail(n, "rows picked at run time cannot be pruned")
                ids = ids.astype(np.int64) % sd[axis]
                if np.isin(ids, idx).any():
                    raise self.fail(n, "the gather reads an index the plan removes")
                keep = np.setdiff1d(np.arange(sd[axis]), idx)
                remap = np.full(sd[axis], -1, np.int64)
                remap[keep] = np.arange(len(keep))
                self.shape_writes.append((n, 1, remap[ids].astype(const_array(index).dtype)))
        self.set(n.outputs[0], out, n)

    def reduce(self, n: ir.Node) -> None:
        x = n.inputs[0]
        s = self.shape(x, n)
        rank = len(s)
        keep = int(n.attributes["keepdims"].value) if "keepdims" in n.attributes else 1
        if n.op_type in ("ArgMax", "ArgMin"):
            axes = [int(n.attributes["axis"].value) if "axis" in n.attributes else 0]
        elif len(n.inputs) > 1 and n.inputs[1] is not None:
            arr = const_array(n.inputs[1])
            if arr is None:
                raise self.fail(n, "reduction axes are computed at run time")
            axes = [int(a) for a in arr.reshape(-1)]
        elif "axes" in n.attributes:
            axes = list(n.attributes["axes"].value)
        else:
            noop = "noop_with_empty_axes" in n.attributes and int(n.attributes["noop_with_empty_axes"].value)
            axes = [] if noop else list(range(rank))
        axes = sorted({a % rank for a in axes})
        out: Removed = {}
        for a, idx in self.get(x).items():
            if a in axes:
                continue  # reduced away; whether that is exact is the grouping's concern
            out[a if keep else a - sum(1 for b in axes if b < a)] = idx
        self.set(n.outputs[0], out, n)

    # -- writing ---------------------------------------------------------------------------------
    def commit(self) -> None:
        for name, axes in self.removals.items():
            v = self.graph.initializers[name]
            arr = v.const_value.numpy()
            for axis, idx in sorted(axes.items()):
                arr = np.delete(arr, idx, axis=axis)
            v.const_value = ir.tensor(np.ascontiguousarray(arr), name=name)
        for key, rem in self.rem.items():
            v = self.values[key]
            if v.shape is not None:
                # declared dims: static ones shrink; symbolic ones (batch x heads) stay symbolic
                dims = list(v.shape)
                for a, idx in rem.items():
                    if isinstance(dims[a], int):
                        dims[a] -= len(idx)
                v.shape = ir.Shape(dims)
        self.write_dynamic()
        self.n_const = self.write_constants()
        if self.dyn_writes:  # shape Concats replaced by per-consumer clones are left without users
            from onnx_ir.passes.common import RemoveUnusedNodesPass

            RemoveUnusedNodesPass()(self.model)
        for node, attr, value in self.attr_writes:
            if value is None:
                node.attributes.pop(attr, None)
            else:
                node.attributes[attr] = ir.AttrInt64(attr, int(value))

    def write_constants(self) -> int:
        """Give each rewritten shape input its new constant; share it where all users agree."""
        by_src: dict[int, list[tuple[ir.Node, int, np.ndarray]]] = defaultdict(list)
        srcs: dict[int, ir.Value | None] = {}
        for node, i, arr in self.shape_writes:
            src = node.inputs[i] if i < len(node.inputs) else None
            by_src[id(src)].append((node, i, arr))
            srcs[id(src)] = src
        count = 0
        for key, writes in by_src.items():
            src = srcs[key]
            unique: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
            for nd, i, arr in writes:  # the same input written twice (two users of one shape tensor)
                prev = unique.get((id(nd), i))
                if prev is not None and not np.array_equal(prev[2], arr):
                    raise SlimcError(f"ONNX node '{nd.name}' input {i} would need two different shapes; "
                                     "this plan prunes layers that share one shape constant differently")
                unique[(id(nd), i)] = (nd, i, arr)
            writes = list(unique.values())
            uses = {(id(u), j) for u, j in src.uses()} if src is not None else set()
            written = {(id(nd), i) for nd, i, _ in writes}
            same = all(np.array_equal(writes[0][2], w[2]) for w in writes)
            if src is not None and src.is_initializer() and same and uses == written and not src.is_graph_input():
                src.const_value = ir.tensor(writes[0][2], name=src.name)
                src.shape = ir.Shape(writes[0][2].shape)
                count += 1
                continue
            for node, i, arr in writes:
                base = src.name if src is not None and src.name else f"{node.name}_in{i}"
                new = ir.Value(name=self.fresh(f"{base}_slimc"), shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                               const_value=ir.tensor(arr))
                self.graph.register_initializer(new)
                if i >= len(node.inputs):
                    node.resize_inputs(i + 1)
                node.replace_input_with(i, new)
                count += 1
            if src is not None and src.is_initializer() and not src.uses() and not src.is_graph_output():
                self.graph.initializers.pop(src.name, None)
        return count

    def fresh(self, base: str) -> str:
        if not hasattr(self, "_taken"):
            self._taken = set(self.graph.initializers) | {v.name for n in self.graph for v in n.outputs}
            self._taken |= {n.name for n in self.graph} | {v.name for v in self.graph.inputs}
        k = 0
        while f"{base}{k}" in self._taken:
            k += 1
        self._taken.add(f"{base}{k}")
        return f"{base}{k}"


class _FakeNode:
    """Stands in for a node in messages about an initializer itself."""

    op_type = "initializer"

    def __init__(self, name: str):
        self.name = name


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Two removal sets are equal (None and empty both mean nothing removed)."""
    a = np.empty(0, np.int64) if a is None else np.sort(a)
    b = np.empty(0, np.int64) if b is None else np.sort(b)
    return np.array_equal(a, b)


def _shrunk(shape: Sequence[Any], rem: Removed) -> list[Any]:
    out = list(shape)
    for a, idx in rem.items():
        out[a] = out[a] - len(idx)
    return out


def _blocks(sin: Sequence[Any], sout: Sequence[Any]) -> list[tuple[list[int], list[int]]] | None:
    """Pair contiguous runs of input and output axes with equal element counts (row-major)."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(sin) or j < len(sout):
        bi: list[int] = []
        bj: list[int] = []
        if i < len(sin) and j < len(sout) and (isinstance(sin[i], str) or isinstance(sout[j], str)):
            if sin[i] != sout[j]:
                return None
            blocks.append(([i], [j]))
            i += 1
            j += 1
            continue
        pi = pj = 1
        if i < len(sin):
            bi.append(i)
            pi = sin[i]
            i += 1
        if j < len(sout):
            bj.append(j)
            pj = sout[j]
            j += 1
        while pi != pj:
            if pi < pj:
                if i >= len(sin) or isinstance(sin[i], str):
                    return None
                bi.append(i)
                pi *= sin[i]
                i += 1
            else:
                if j >= len(sout) or isinstance(sout[j], str):
                    return None
                bj.append(j)
                pj *= sout[j]
                j += 1
        blocks.append((bi, bj))
    return blocks


def _map_reshape(sin: Sequence[Any], sout: Sequence[Any], rin: Removed) -> Removed | None:
    """Removed indices of a reshape's output, or None when they are not whole hyperplanes of one axis."""
    if not rin:
        return {}
    blocks = _blocks(sin, sout)
    if blocks is None:  # symbolic dims in front: try matching from the back
        back = _blocks(list(reversed(sin)), list(reversed(sout)))
        if back is None:
            return None
        blocks = [([len(sin) - 1 - a for a in reversed(bi)], [len(sout) - 1 - b for b in reversed(bj)]) for bi, bj in back]
    out: Removed = {}
    for bi, bj in blocks:
        hit = [a for a in bi if a in rin]
        if not hit:
            continue
        dims_in = [sin[a] for a in bi]
        dims_out = [sout[b] for b in bj]
        removed = np.zeros(dims_in, dtype=bool)
        for a in hit:
            sl = [slice(None)] * len(bi)
            sl[bi.index(a)] = rin[a]
            removed[tuple(sl)] = True
        removed = removed.reshape(dims_out)
        found = False
        for k, b in enumerate(bj):
            others = tuple(x for x in range(len(bj)) if x != k)
            plane = removed.all(axis=others) if others else removed
            if plane.any() and np.array_equal(np.broadcast_to(np.expand_dims(plane, others), removed.shape), removed):
                out[b] = np.nonzero(plane)[0].astype(np.int64)
                found = True
                break
        if not found:
            return None
    return out
