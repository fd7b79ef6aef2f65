"""ONNX front-end: read an ONNX file and lower it to the shared graph IR (`compiler.ir`).

    model = load_onnx("net.onnx")      # onnx_ir.Model; refuses missing files, non-ONNX bytes, opset < 13
    graph = import_onnx(model)         # compiler.ir.Graph in the canonical op vocabulary

Every initializer becomes a `graph.params` entry whose `Value.param` is the initializer name, so the
`Slice`s of groups found on this graph name ONNX initializers and `surgery_onnx` can cut them.
Shape inputs (Reshape/Expand/Split/Slice/Squeeze/Unsqueeze, Reduce axes) are read from constants
and become attributes, not inputs: they carry no channels. Ops without a dimension rule become
`opaque`, which blocks pruning of every dim they touch, so an unknown op can never be mis-pruned.
A decomposed RMSNorm (Pow 2 -> ReduceMean -> Add eps -> Sqrt -> Reciprocal -> Mul x -> Mul w), as
the PyTorch exporter writes it, is folded into one `norm` node of kind `rms`.

Lowering (ONNX -> canonical op; the op families and their domains are `compiler.ir.onnx_ops`, which
the surgery reads too): MatMul/Gemm with an initializer -> linear (MatMul: w_out_axis 1,
w_in_axis 0; a following Add of a 1-D initializer becomes its bias); MatMul of activations -> matmul;
Conv/ConvTranspose -> conv; Add/Sub/Mul/Div -> add/sub/mul/div; Where/Max/Min/Equal/... and ORT's
BiasGelu/FastGelu -> elementwise; Relu/Sigmoid/Cast/Pow/... and ORT's Gelu/QuickGelu -> unary;
Softmax/LogSoftmax -> softmax (with its axis);
Reduce*/ArgMax/Global*Pool -> reduce; MaxPool/AveragePool/Resize/Pad -> pool (channel axis kept);
Layer/RMS/Batch/Instance/GroupNormalization and ORT's SkipLayerNormalization -> norm (instance norm is
kind batch with `instance`: per-channel statistics); Reshape/Squeeze/Unsqueeze/Flatten -> reshape;
Transpose -> permute; Concat, Split, Slice (one node per axis), Expand; Gather of a 2-D initializer on
axis 0 -> embedding, else gather; opset-23 Attention with 4-D inputs -> sdpa; LSTM/GRU/RNN -> rnn
(input features = axis 2 of W; kept whole while the ONNX surgery cannot cut W); Shape/Size -> source
(reads sizes only, couples no channel); everything else -> opaque.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from slimc.compiler.ir import onnx_ops as ops
from slimc.compiler.ir.graph import Dim, Graph, Node, Value
from slimc.errors import SlimcError

MIN_OPSET = 13
_CONST_MAX = 1024  # initializers up to this many elements also carry their payload in Value.const



def load_onnx(path: str | Path, *, normalize: bool = True) -> ir.Model:
    """Load an ONNX file (external data included) as an `onnx_ir.Model`.

    With `normalize` (the default) the graph is put in the form the importer and the surgery
    expect, see `normalize_onnx`.
    """
    p = Path(path)
    if not p.is_file():
        raise SlimcError(f"ONNX file not found: {p}; check the path")
    if p.stat().st_size > PROTOBUF_LIMIT:
        raise SlimcError(f"{p} is larger than 2 GB, which a protobuf ONNX file cannot be; save the weights as external data "
                         "(onnx.save(..., save_as_external_data=True)) and give the .onnx beside them")
    try:
        model = ir.load(p)  # external tensors are only referenced here, not read
    except Exception as e:  # noqa: BLE001 — any parse failure means "not an ONNX model"
        raise SlimcError(f"{p} is not a readable ONNX model ({type(e).__name__}); export it again with torch.onnx.export") from None
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or len(model.graph) == 0:
        raise SlimcError(f"{p} is not an ONNX model (no default-domain opset or no nodes); export it again with torch.onnx.export")
    if opset < MIN_OPSET:
        raise SlimcError(f"{p} uses ONNX opset {opset}; slimc needs opset >= {MIN_OPSET}: re-export it (opset_version=18) or upgrade it with onnx.version_converter")
    check_external_data(model, p)
    check_graph(model, p)
    if normalize:
        normalize_onnx(model)
    return model


PROTOBUF_LIMIT = 2**31  # protobuf messages, and so .onnx files without external data, stay below 2 GB
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # ONNX's own and ONNX Runtime's contrib ops


def check_external_data(model: ir.Model, path: Path) -> None:
    """Refuse, before any byte of it is read, external data that is absent, short, or outside the model's directory.

    ONNX's checker and ONNX Runtime refuse such paths too, but only when the data is loaded; slimc
    reads tensors while analysing, so the locations are checked first: relative, without `..`,
    and still inside the directory once symlinks are resolved.
    """
    root = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        loc = str(tensor.location)
        where = f"{path}: initializer '{value.name}' keeps its data in '{loc}'"
        if Path(loc).is_absolute() or loc.startswith(("\\", "/")) or (len(loc) > 2 and loc[1] == ":" and loc[2] in "/\\"):
            raise SlimcError(f"{where}, an absolute path; external data must lie beside the model (a relative path inside "
                             "its directory), so slimc refuses to read it")
        if ".." in Path(loc).parts or ".." in loc.replace("\\", "/").split("/"):
            raise SlimcError(f"{where}, which escapes the model's directory; external data must lie inside it")
        target = root / loc
        resolved = target.resolve()  # symlinks anywhere on the way are followed here
        if root not in resolved.parents:
            raise SlimcError(f"{where}, a symlink that leads outside the model's directory ({resolved}); slimc refuses to read it")
        if not target.is_file():
            raise SlimcError(f"{where}, which does not exist beside the model; copy the data file with the .onnx")
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        if end > target.stat().st_size:
            raise SlimcError(f"{where}: its bytes end at {end} but the file is shorter ({target.stat().st_size} bytes); "
                             "the data file is truncated or belongs to another model")


def check_graph(model: ir.Model, path: Path) -> None:
    """Refuse graphs ONNX Runtime could not run: an input nothing produces, a cycle (a node reading a
    later node's output), an op domain neither ONNX nor ONNX Runtime's default build defines."""
    graph = model.graph
    functions = {f.domain for f in model.functions.values()} if model.functions else set()
    seen: set[int] = set()
    for node in graph:
        if node.domain not in KNOWN_DOMAINS and node.domain not in functions:
            raise SlimcError(f"{path}: node '{node.name}' ({node.op_type}) is in op domain '{node.domain}', which neither ONNX "
                             "nor ONNX Runtime defines; slimc cannot analyse or run it: export the model without custom ops")
        for v in node.inputs:
            if v is None:
                continue
            producer = v.producer()
            if producer is None:
                if not (v.is_graph_input() or v.is_initializer()):
                    raise SlimcError(f"{path}: input '{v.name}' of node '{node.name}' ({node.op_type}) is not produced by any "
                                     "node, graph input or initializer (a missing initializer?); export the model again")
            elif id(producer) not in seen:
                raise SlimcError(f"{path}: node '{node.name}' reads '{v.name}' before it is computed: the graph has a cycle or is "
                                 "not in topological order; export the model again")
        seen.add(id(node))


def normalize_onnx(model: ir.Model) -> ir.Model:
    """Fold shape computations to constants, lift constants to initializers, infer missing shapes.

    An unoptimised export computes Reshape targets and norm parameters at run time; folded, they
    become initializers that groups can name and surgery can rewrite. In place; returns `model`.
    """
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass, ShapeInferencePass
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    RemoveUnusedNodesPass()(model)
    if any(_unknown_dims(v) for n in model.graph for v in n.outputs):
        try:
            ShapeInferencePass()(model)
        except Exception:  # noqa: BLE001 — shapes stay unknown; ops that need them lower to opaque
            pass
    return model


def _unknown_dims(v: ir.Value) -> bool:
    return v.shape is None or any(not isinstance(d, int) and getattr(d, "value", None) is None for d in v.shape)


def onnx_scope(node: ir.Node) -> str:
    """The module path a node came from: the exporter's name scopes, else the node name's prefix."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            names = [s for s in ast.literal_eval(scopes) if s]
        except (ValueError, SyntaxError):
            names = []
        if len(names) >= 2:
            return names[-2]  # the last entry is the op's own name
        if names:
            return names[0]
    name = node.name or ""
    if "/" in name:  # the TorchScript exporter writes "/layer1/conv/Conv"
        return ".".join(s for s in name.split("/")[:-1] if s)
    return ""


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant payload of a value (initializer or Constant node output), or None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and ops.canonical_domain(prod.domain) == ops.DEFAULT:
        for key in ("value", "value_int", "value_ints", "value_float", "value_floats"):
            attr = prod.attributes.get(key)
            if attr is not None:
                v = attr.value
                return v.numpy() if hasattr(v, "numpy") else np.asarray(v)
    return None


def value_shape(value: ir.Value) -> tuple[Dim, ...] | None:
    if value.shape is None:
        return None
    out: list[Dim] = []
    for d in value.shape:
        out.append(d if isinstance(d, int) else (str(d.value) if getattr(d, "value", None) is not None else "?"))
    return tuple(out)


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _ints(node: ir.Node, input_index: int, attr: str) -> list[int] | None:
    """Integer list given as a constant input (new opsets) or as an attribute (old opsets)."""
    if input_index < len(node.inputs) and node.inputs[input_index] is not None:
        arr = const_array(node.inputs[input_index])
        return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]
    v = _attr(node, attr)
    return None if v is None else [int(x) for x in v]


def _is_param(value: ir.Value | None) -> bool:
    return value is not None and value.is_initializer()


class _Lowering:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = Graph()
        self.values: dict[int, Value] = {}
        self.skip: set[int] = set()
        self.n_synth = 0

    def val(self, v: ir.Value | None) -> Value | None:
        if v is None:
            return None
        got = self.values.get(id(v))
        if got is None:
            const = None
            if v.const_value is not None and v.const_value.size <= _CONST_MAX:
                const = v.const_value.numpy()
            got = Value(v.name or f"v{id(v)}", value_shape(v), _dtype_name(v.dtype), const=const)
            if v.is_initializer():
                got.param = v.name
            self.values[id(v)] = got
        return got

    def synth(self, like: Value, shape: tuple[Dim, ...] | None) -> Value:
        self.n_synth += 1
        return Value(f"{like.name}__{self.n_synth}", shape, like.dtype)

    def emit(self, op: str, src: ir.Node, inputs: list[Value | None], outputs: list[Value], **attrs: Any) -> Node:
        node = Node(op, inputs, outputs, attrs, module=onnx_scope(src), source_op=_source_op(src), name=src.name or "")
        for v in inputs:
            if v is not None:
                v.users.append(node)
        for v in outputs:
            v.producer = node
        self.graph.nodes.append(node)
        return node

    def run(self) -> Graph:
        g = self.model.graph
        for init in g.initializers.values():
            self.graph.params[init.name] = self.val(init)
        self.graph.inputs = [self.val(v) for v in g.inputs if not v.is_initializer()]
        rms = _match_rms_norms(g)
        for match in rms.values():
            self.skip.update(match[3])
        self.bias_adds = _match_bias_adds(g)
        self.skip.update(id(add) for add, _ in self.bias_adds.values())
        for node in g:
            if id(node) in self.skip:
                continue
            if id(node) in rms:
                x, w, out, _, eps = rms[id(node)]
                ins = [self.val(x)] + ([self.val(w)] if w is not None else [])
                rank = len(x.shape) if x.shape is not None else 1
                self.emit("norm", node, ins, [self.val(out)], kind="rms", axis=-1, axes=[rank - 1], eps=eps, decomposed=True)
                continue
            self.lower(node)
        self.graph.outputs = [self.val(v) for v in g.outputs]
        return self.graph

    def lower(self, n: ir.Node) -> None:  # noqa: C901 — one branch per ONNX op family
        op = n.op_type
        key = ops.op_key(n.domain, op)
        ins = [self.val(v) for v in n.inputs]
        outs = [self.val(v) for v in n.outputs]
        if key[0] not in ops.DOMAINS:
            self.emit("opaque", n, ins, outs)
            return
        if key[0] == ops.MICROSOFT and key not in ops.MICROSOFT_OPS:
            self.emit("opaque", n, ins, outs)  # fused attention, quantised matmuls, ...: no rule
            return
        if key in ops.BIAS_ACTIVATIONS:
            self.emit("elementwise", n, ins, outs[:1], fn=op.lower())
            return
        if key in ops.SKIP_NORMS:
            self.lower_skip_norm(n, ins, outs)
            return
        if op == "Constant":
            arr = const_array(n.outputs[0])
            for o in outs:
                o.const = arr if arr is not None and arr.size <= _CONST_MAX else None
            return
        if key in ops.MATMULS:
            self.lower_matmul(n, ins, outs)
        elif key in ops.CONVS:
            self.emit("conv", n, ins, outs, groups=int(_attr(n, "group", 1)), transposed=op == "ConvTranspose",
                      strides=_attr(n, "strides"), pads=_attr(n, "pads"), dilations=_attr(n, "dilations"))
        elif key in ops.ARITHMETIC:
            self.emit(op.lower(), n, ins, outs)
        elif key in ops.BROADCAST:
            self.emit("elementwise", n, ins, outs, fn=op.lower())
        elif key in ops.UNARY:
            self.emit("unary", n, ins[:1], outs[:1], fn=op.lower())
        elif key in ops.SOFTMAX:
            axis = int(_attr(n, "axis", ops.SOFTMAX_DEFAULT_AXIS))
            self.emit("softmax", n, ins, outs, axis=_axis(axis, outs[0]), log=op == "LogSoftmax")
        elif key in ops.REDUCE:
            self.lower_reduce(n, ins, outs)
        elif key in ops.POOLS:
            self.lower_pool(n, ins, outs)
        elif key in ops.NORMS and key in ops.KINDS:
            self.lower_norm(n, ins, outs)
        elif key in ops.RESHAPES:
            self.lower_reshape(n, ins, outs)
        elif op == "Transpose":
            perm = _attr(n, "perm")
            if perm is None and ins[0].shape is not None:
                perm = list(reversed(range(len(ins[0].shape))))
            self.emit("permute", n, ins, outs, perm=[int(p) for p in perm] if perm is not None else None)
        elif op == "Concat":
            self.emit("concat", n, ins, outs, axis=_axis(int(_attr(n, "axis")), outs[0]))
        elif op == "Split":
            self.lower_split(n, ins, outs)
        elif op == "Slice":
            self.lower_slice(n, ins, outs)
        elif op == "Expand":
            shape = outs[0].shape or _ints(n, 1, "")
            self.emit("expand", n, ins[:1], outs, shape=list(shape) if shape is not None else None)
        elif op == "Gather":
            axis = int(_attr(n, "axis", 0))
            data = n.inputs[0]
            if _is_param(data) and axis == 0 and data.shape is not None and len(data.shape) == 2:
                self.emit("embedding", n, [ins[0], ins[1]], outs)
            else:
                self.emit("gather", n, ins, outs, axis=axis, axes=[axis])
        elif op == "Attention" and key[0] == ops.DEFAULT:
            self.lower_attention(n, ins, outs)
        elif op in _RECURRENT and key[0] == ops.DEFAULT:
            self.lower_rnn(n, ins, outs)
        elif key in ops.SHAPE_READS:
            # reads sizes only; its 1-D result carries no channel of the input
            self.emit("source", n, [], outs, fn=op.lower(), of=ins[0].name if ins and ins[0] else None)
        else:
            self.emit("opaque", n, ins, outs)

    def lower_matmul(self, n: ir.Node, ins: list, outs: list) -> None:
        b = n.inputs[1]
        if n.op_type == "MatMul":
            if _is_param(b) and b.shape is not None and len(b.shape) == 2:
                bias, out = None, outs
                if id(n) in self.bias_adds:  # MatMul + Add(bias) is one nn.Linear
                    add, bias_value = self.bias_adds[id(n)]
                    bias, out = self.val(bias_value), [self.val(add.outputs[0])]
                self.emit("linear", n, [ins[0], ins[1], bias], out, w_out_axis=1, w_in_axis=0)
            else:
                self.emit("matmul", n, ins, outs)
            return
        trans_a, trans_b = int(_attr(n, "transA", 0)), int(_attr(n, "transB", 0))
        alpha, beta = float(_attr(n, "alpha", 1.0)), float(_attr(n, "beta", 1.0))
        bias = ins[2] if len(ins) > 2 else None
        if _is_param(b) and not trans_a:
            self.emit("linear", n, [ins[0], ins[1], bias], outs, w_out_axis=0 if trans_b else 1,
                      w_in_axis=1 if trans_b else 0, alpha=alpha, beta=beta)
            return
        x = ins[0]
        if trans_a:  # keep the dimension rules honest: transpose, then a plain product (+ bias)
            t = self.synth(x, tuple(reversed(x.shape)) if x.shape else None)
            self.emit("permute", n, [x], [t], perm=[1, 0])
            x = t
        wb = ins[1]
        if trans_b:
            t = self.synth(wb, tuple(reversed(wb.shape)) if wb.shape else None)
            self.emit("permute", n, [wb], [t], perm=[1, 0])
            wb = t
        if bias is None:
            self.emit("matmul", n, [x, wb], outs)
        else:
            mid = self.synth(outs[0], outs[0].shape)
            self.emit("matmul", n, [x, wb], [mid])
            self.emit("add", n, [mid, bias], outs)

    def lower_skip_norm(self, n: ir.Node, ins: list, outs: list) -> None:
        """ORT's SkipLayerNormalization: norm(input + skip (+ bias)); output 3 is that sum."""
        kind = ops.KINDS[ops.op_key(n.domain, n.op_type)]
        x, skip = ins[0], ins[1]
        gamma = ins[2] if len(ins) > 2 else None
        beta = ins[3] if kind == "layer" and len(ins) > 3 else None
        bias = ins[4] if kind == "layer" and len(ins) > 4 else (ins[3] if kind == "rms" and len(ins) > 3 else None)
        total = outs[3] if len(outs) > 3 and outs[3] is not None else self.synth(x, x.shape)
        if bias is not None:
            mid = self.synth(x, x.shape)
            self.emit("add", n, [x, skip], [mid])
            self.emit("add", n, [mid, bias], [total])
        else:
            self.emit("add", n, [x, skip], [total])
        rank = len(x.shape) if x.shape is not None else 1
        self.emit("norm", n, [total, gamma, beta], outs[:1], kind=kind, axis=-1, axes=[rank - 1],
                  eps=float(_attr(n, "epsilon", 1e-5)))
        if any(o is not None and o.users for o in outs[1:3]):
            self.emit("opaque", n, [total], [o for o in outs[1:3] if o is not None])  # mean / inv std: no rule

    def lower_attention(self, n: ir.Node, ins: list, outs: list) -> None:
        """opset-23 Attention with 4-D [B, heads, S, head_dim] inputs is scaled dot-product attention."""
        q, k, v = ins[0], ins[1], ins[2]
        mask = ins[3] if len(ins) > 3 else None
        extra = [v for v in ins[4:] if v is not None]  # past key/value, nonpad lengths
        used_outs = [o for o in n.outputs[1:] if o.uses() or o.is_graph_output()]
        four_d = all(t is not None and t.shape is not None and len(t.shape) == 4 for t in (q, k, v))
        if not four_d or extra or used_outs:
            self.emit("opaque", n, ins, outs)  # packed heads (3-D) or a KV cache: no rule here
            return
        self.emit("sdpa", n, [q, k, v, mask], outs[:1], scale=_attr(n, "scale"), is_causal=bool(_attr(n, "is_causal", 0)),
                  enable_gqa=q.shape[1] != k.shape[1])

    def lower_rnn(self, n: ir.Node, ins: list, outs: list) -> None:
        """LSTM / GRU / RNN (one layer, any direction): an `rnn` node whose input features are axis 2
        of W [directions, gates x hidden, input]. Inputs X, W, R, B, sequence_lens, initial_h,
        initial_c, P are reordered to the rule's [X, states, lengths, W, R, B, P].

        The ONNX surgery has no rule that cuts W along its input axis yet, so the input features are
        kept whole here (`features_fixed`); the batch and time axes carry through all the same."""
        at = lambda i: ins[i] if i < len(ins) else None  # noqa: E731
        x, w, r = at(0), at(1), at(2)
        if x is None or w is None or r is None or not outs or outs[0] is None or x.shape is None:
            self.emit("opaque", n, ins, outs)
            return
        states = [v for v in (at(5), at(6)) if v is not None]
        lens = [v for v in (at(4),) if v is not None]
        weights = [w, r, *[v for v in (at(3), at(7)) if v is not None]]
        direction = str(_attr(n, "direction", "forward"))
        self.emit("rnn", n, [x, *states, *lens, *weights], [o for o in outs if o is not None], kind=n.op_type.lower(),
                  n_states=len(states), n_lens=len(lens), num_layers=1, bidirectional=direction == "bidirectional",
                  batch_first=int(_attr(n, "layout", 0)) == 1, input_weights=[0], weight_in_axis=2,
                  features_fixed="the ONNX surgery cannot cut a recurrent layer's input weights yet, so its input "
                                 "features stay whole")

    def lower_reduce(self, n: ir.Node, ins: list, outs: list) -> None:
        op = n.op_type
        keep = bool(_attr(n, "keepdims", 1))
        rank = len(ins[0].shape) if ins[0].shape is not None else None
        if op in ("ArgMax", "ArgMin"):
            axes = [int(_attr(n, "axis", 0))]
        else:
            axes = _ints(n, 1, "axes")
            if axes is None and len(n.inputs) > 1 and n.inputs[1] is not None:
                self.emit("opaque", n, ins, outs)  # axes computed at run time
                return
            if not axes:
                axes = None if bool(_attr(n, "noop_with_empty_axes", 0)) and axes == [] else list(range(rank or 0))
        if axes is not None and rank is not None:
            axes = sorted(a % rank for a in axes)
        if axes is None:  # noop reduce
            self.emit("unary", n, ins[:1], outs, fn="identity")
            return
        self.emit("reduce", n, ins[:1], outs, fn=ops.KINDS[ops.op_key(n.domain, op)], axes=axes, keepdim=keep)

    def lower_pool(self, n: ir.Node, ins: list, outs: list) -> None:
        kind = ops.KINDS[ops.op_key(n.domain, n.op_type)]
        if kind == "pad":
            pads = _ints(n, 1, "pads")
            axes = _ints(n, 3, "axes")
            x = ins[0]
            rank = len(x.shape) if x.shape is not None else None
            if pads is None or rank is None:
                self.emit("opaque", n, ins, outs)
                return
            axes = list(range(rank)) if axes is None else [a % rank for a in axes]
            padded = {a for i, a in enumerate(axes) if pads[i] or pads[i + len(axes)]}
            if padded & {0, 1}:  # padding the batch or channel axis adds channels: no rule
                self.emit("opaque", n, ins, outs)
                return
        if kind in ("global_avg", "global_max"):
            rank = len(ins[0].shape) if ins[0].shape is not None else 4
            self.emit("reduce", n, ins[:1], outs, fn=kind.split("_")[1], axes=list(range(2, rank)), keepdim=True)
            return
        self.emit("pool", n, ins[:1], outs[:1], kind=kind)

    def lower_norm(self, n: ir.Node, ins: list, outs: list) -> None:
        kind = ops.KINDS[ops.op_key(n.domain, n.op_type)]
        attrs: dict[str, Any] = {"eps": float(_attr(n, "epsilon", 1e-5))}
        if kind == "instance":
            # per-channel statistics and per-channel parameters: the channel rule of batch norm
            kind, attrs["instance"] = "batch", True
        if kind == "group":
            scale = n.inputs[1]
            c = ins[0].shape[1] if ins[0].shape is not None and len(ins[0].shape) > 1 else None
            if scale is not None and scale.shape is not None and c is not None and list(scale.shape) != [c]:
                # opset 18-20 GroupNormalization: one scale per group, which the channel rule cannot hold
                self.emit("opaque", n, ins, outs)
                return
        if kind in ("batch", "group"):
            attrs["axis"] = 1
        else:
            axis = int(_attr(n, "axis", -1))
            rank = len(ins[0].shape) if ins[0].shape is not None else None
            attrs["axis"] = axis
            attrs["axes"] = list(range(axis % rank, rank)) if rank is not None else [axis]
        attrs["kind"] = kind
        if kind == "group":
            attrs["num_groups"] = int(_attr(n, "num_groups"))
        # BatchNormalization's running mean/var ride along as inputs 3 and 4 (per-channel, like weight)
        self.emit("norm", n, ins, outs[:1], **attrs)

    def lower_reshape(self, n: ir.Node, ins: list, outs: list) -> None:
        shape = outs[0].shape
        if shape is None and n.op_type == "Reshape":
            target = _ints(n, 1, "shape")
            src = ins[0].shape
            if target is not None and src is not None:
                shape = tuple(_resolve_reshape(src, target))
        if shape is None:
            self.emit("opaque", n, ins, outs)
            return
        self.emit("reshape", n, ins[:1], outs, shape=list(shape))

    def lower_split(self, n: ir.Node, ins: list, outs: list) -> None:
        x = ins[0]
        axis = int(_attr(n, "axis", 0))
        sizes = _ints(n, 1, "split")
        if sizes is None:
            sizes = [o.shape[axis] if o.shape is not None else None for o in outs]
            if any(s is None for s in sizes) and x.shape is not None and isinstance(x.shape[axis], int):
                k = len(outs)
                step = -(-x.shape[axis] // k)  # ONNX: equal chunks, the last one smaller
                sizes = [min(step, x.shape[axis] - i * step) for i in range(k)]
        rank = len(x.shape) if x.shape is not None else 1
        even = sizes is not None and len(set(sizes)) == 1
        self.emit("split", n, ins[:1], outs, axis=axis % rank, sizes=sizes, even=even)

    def lower_slice(self, n: ir.Node, ins: list, outs: list) -> None:
        starts, ends = _ints(n, 1, "starts"), _ints(n, 2, "ends")
        axes, steps = _ints(n, 3, "axes"), _ints(n, 4, "steps")
        x = ins[0]
        if starts is None or ends is None or x.shape is None:
            self.emit("opaque", n, ins, outs)
            return
        rank = len(x.shape)
        axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
        steps = [1] * len(starts) if steps is None else steps
        cur = x
        shape = list(x.shape)
        for i, (a, s, e, st) in enumerate(zip(axes, starts, ends, steps)):
            last = i == len(axes) - 1
            dim = shape[a]
            if isinstance(dim, int):
                s_, e_, st_ = slice(s, e, st).indices(dim)
                shape[a] = len(range(s_, e_, st_))
                s, e = s_, e_
            out = outs[0] if last else self.synth(outs[0], tuple(shape))
            self.emit("slice", n, [cur], [out], axis=a, start=s, end=e, step=st)
            cur = out


_RECURRENT = ("LSTM", "GRU", "RNN")


def _dtype_name(dtype: ir.DataType | None) -> str | None:
    """torch-style dtype names ("float32", "int64"), as the PyTorch importer writes them."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype.numpy()).name
    except Exception:  # noqa: BLE001 — types numpy cannot name (float8, 4-bit, ...)
        return dtype.name.lower()


def _axis(axis: int, v: Value) -> int:
    """A non-negative axis where the rank is known (the dimension rules compare axes)."""
    return axis % len(v.shape) if v.shape else axis


def _source_op(n: ir.Node) -> str:
    domain = ops.canonical_domain(n.domain)
    return f"{domain}::{n.op_type}" if domain != ops.DEFAULT else f"onnx::{n.op_type}"


def _resolve_reshape(src: tuple[Dim, ...], target: list[int]) -> list[Dim]:
    """ONNX Reshape target with 0 (copy) and -1 (infer) resolved where sizes are known."""
    out: list[Dim] = [src[i] if t == 0 else t for i, t in enumerate(target)]
    if -1 in out:
        known = [d for d in src]
        if all(isinstance(d, int) for d in known) and all(isinstance(d, int) for d in out):
            total = int(np.prod(known))
            rest = int(np.prod([d for d in out if d != -1]))
            out[out.index(-1)] = total // rest if rest else 0
    return out


def _single_user(v: ir.Value, op: str) -> ir.Node | None:
    users = [u for u, _ in v.uses()]
    if len(users) != 1 or users[0].op_type != op or v.is_graph_output():
        return None
    return users[0]


def _other_input(node: ir.Node, v: ir.Value) -> ir.Value | None:
    others = [x for x in node.inputs if x is not v]
    return others[0] if len(others) == 1 else None


def _match_bias_adds(g: ir.Graph) -> dict[int, tuple[ir.Node, ir.Value]]:
    """MatMul(x, W) whose only user adds a 1-D initializer of W's width: id(matmul) -> (add, bias)."""
    found: dict[int, tuple[ir.Node, ir.Value]] = {}
    for mm in g:
        if mm.op_type != "MatMul" or not _is_param(mm.inputs[1]) or mm.inputs[1].shape is None:
            continue
        if len(mm.inputs[1].shape) != 2:
            continue
        add = _single_user(mm.outputs[0], "Add")
        if add is None:
            continue
        b = _other_input(add, mm.outputs[0])
        if _is_param(b) and b.shape is not None and list(b.shape) == [mm.inputs[1].shape[1]]:
            found[id(mm)] = (add, b)
    return found


def _match_rms_norms(g: ir.Graph) -> dict[int, tuple]:
    """Decomposed RMSNorms: id(last node) -> (x, weight | None, output, ids of folded nodes, eps)."""
    found: dict[int, tuple] = {}
    for pw in g:
        if pw.op_type != "Pow" or len(pw.inputs) < 2:
            continue
        expo = const_array(pw.inputs[1])
        if expo is None or expo.size != 1 or float(expo.reshape(-1)[0]) != 2.0:
            continue
        x = pw.inputs[0]
        chain = [pw]
        mean = _single_user(pw.outputs[0], "ReduceMean")
        if mean is None:
            continue
        axes = _ints(mean, 1, "axes")
        if axes != [-1] and not (axes and x.shape is not None and axes == [len(x.shape) - 1]):
            continue
        if not bool(_attr(mean, "keepdims", 1)):
            continue
        chain.append(mean)
        add = _single_user(mean.outputs[0], "Add")
        if add is None:
            continue
        eps_arr = const_array(_other_input(add, mean.outputs[0]))
        if eps_arr is None or eps_arr.size != 1:
            continue
        chain.append(add)
        cur = add.outputs[0]
        sq = _single_user(cur, "Sqrt")
        if sq is None:
            continue
        chain.append(sq)
        users = [u for u, _ in sq.outputs[0].uses()]
        if len(users) != 1 or sq.outputs[0].is_graph_output():
            continue
        step = users[0]
        if step.op_type == "Div" and step.inputs[0] is x and step.inputs[1] is sq.outputs[0]:
            mul = step  # x / sqrt(mean(x^2) + eps)
        else:
            one = const_array(step.inputs[0]) if step.op_type == "Div" else None
            if not (step.op_type == "Reciprocal" or (one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0)):
                continue
            chain.append(step)  # 1 / sqrt(...), then x * that
            cur = step.outputs[0]
            mul = _single_user(cur, "Mul")
            if mul is None or _other_input(mul, cur) is not x:
                continue
        chain.append(mul)
        out, weight = mul.outputs[0], None
        users = [u for u, _ in out.uses()]
        if len(users) == 1 and users[0].op_type == "Mul" and not out.is_graph_output():
            w = _other_input(users[0], out)
            if w is not None and w.is_initializer() and w.shape is not None and len(w.shape) == 1:
                chain.append(users[0])
                out, weight = users[0].outputs[0], w
        last = chain[-1]
        found[id(last)] = (x, weight, out, {id(c) for c in chain[:-1]}, float(eps_arr.reshape(-1)[0]))
    return found


def import_onnx(model: ir.Model) -> Graph:
    """Lower an ONNX model to the shared IR (canonical ops; initializers as params)."""
    if not isinstance(model, ir.Model):
        raise SlimcError("import_onnx expects an onnx_ir.Model; load the file with load_onnx(path)")
    return _Lowering(model).run()


_WITNESS_SIZES = (11, 13, 17, 19, 23, 29, 31, 37, 41, 43)


def witness_shapes(model: ir.Model, sizes: tuple[int, ...] | None = None) -> dict[str, list[int]]:
    """Concrete shapes of every value for one choice of the symbolic input sizes ({} if static).

    With dynamic axes a reshape may merge batch and heads into one run-time size. Surgery tracks
    removed indices on these witness sizes (odd primes, unlikely to meet a channel count) and only
    rewrites constants that encode channels, so the pruned model stays dynamic.
    """
    import onnx

    sizes = sizes or _WITNESS_SIZES
    if not any(not isinstance(d, int) for v in model.graph.inputs if v.shape is not None for d in v.shape):
        return {}
    proto = _structure_proto(model)
    chosen: dict[str, int] = {}
    for inp in proto.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                key = d.dim_param or f"?{len(chosen)}"
                if key not in chosen:
                    chosen[key] = sizes[len(chosen) % len(sizes)]
                d.dim_value = chosen[key]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 — no witness: symbolic axes then cannot be followed
        return {}
    out: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if all(isinstance(d, int) and d > 0 for d in dims):
                out[vi.name] = dims
    for init in inferred.graph.initializer:
        out[init.name] = list(init.dims)
    return out


def _structure_proto(model: ir.Model, keep: int = 4096):
    """The model as a proto with large initializers turned into typed graph inputs (no weight bytes).

    Shape inference needs their shapes, and the values of small (shape) constants only; this keeps
    the proto small (and under protobuf's 2 GB) for large models.
    """
    g = model.graph
    big = [v for v in g.initializers.values() if v.const_value is not None and v.const_value.size > keep]
    inputs = list(g.inputs)
    for v in big:
        g.initializers.pop(v.name)
        g.inputs.append(v)
    try:
        return ir.serde.serialize_model(model)
    finally:
        g.inputs.clear()
        g.inputs.extend(inputs)
        for v in big:
            g.register_initializer(v)

