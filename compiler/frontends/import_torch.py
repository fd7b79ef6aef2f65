"""PyTorch front-end: `torch.export` a module and lower its ATen graph to the canonical IR.

    graph = import_module(model, {"input_ids": ids})      # Hugging Face: use_cache=False is added

The export is non-strict with static shapes (the analysis needs sizes, not symbols). Each node
keeps its module path (the innermost `nn_module_stack` entry) and its ATen op as `source_op`;
parameters and buffers become `Graph.params` keyed by their `named_parameters()` name, so a tied
weight (embedding = lm_head) is one value. ATen ops without a lowering become `opaque`, which the
analysis treats as blocking every dimension they touch: nothing is guessed element-wise.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import torch
from torch import nn

from slimc.compiler.ir.graph import Graph, Node, Value
from slimc.errors import SlimcError

# ATen op name (overload packet) -> canonical lowering. Kept as data so the vocabulary is visible.
UNARY = {
    "relu", "relu_", "silu", "silu_", "gelu", "gelu_", "tanh", "sigmoid", "neg", "exp", "rsqrt", "sqrt", "abs",
    "log", "sin", "cos", "erf", "reciprocal", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "relu6",
    "hardtanh", "hardtanh_", "clamp", "clamp_min", "clamp_max", "leaky_relu", "elu", "mish", "softplus", "to",
    "_to_copy", "clone", "contiguous", "dropout", "dropout_", "alpha_dropout", "feature_dropout", "detach", "alias",
    "lift_fresh_copy", "type_as", "float", "bitwise_not", "logical_not", "sign", "floor", "ceil", "round",
    "square", "pow", "sigmoid_", "tanh_", "native_dropout", "gelu_tanh", "lift_fresh", "_assert_async",
    "trunc", "isnan", "isinf", "logit", "exp2", "log1p", "expm1", "fill_", "zero_", "ones_like", "zeros_like",
    "full_like", "empty_like", "rand_like", "randn_like", "nan_to_num", "clamp_", "floor_divide", "remainder",
    "fmod", "bitwise_and", "bitwise_or", "bitwise_xor", "logical_and", "logical_or", "logical_xor", "minimum",
    "maximum", "where", "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt", "ge", "__and__", "__or__",
    "__xor__", "atan2", "lerp", "addcmul", "addcdiv", "copy", "copy_", "rsub", "add_", "mul_", "div_", "sub_",
    # activations, their in-place forms too (nn.LeakyReLU(inplace=True) and the like export these)
    "leaky_relu_", "elu_", "mish_", "selu", "selu_", "celu", "celu_", "relu6_", "softplus_", "rrelu", "rrelu_",
    "threshold", "threshold_", "hardshrink", "softshrink", "log_sigmoid", "sgn",
}
ARITH = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "rsub": "sub", "mul": "mul", "mul_": "mul",
         "div": "div", "div_": "div", "true_divide": "div"}
REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "std_mean", "logsumexp",
          "linalg_vector_norm", "norm", "any", "all", "argmax", "argmin", "count_nonzero", "nansum", "nanmean"}
RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "unsqueeze_", "squeeze",
           "squeeze_", "view_as", "reshape_as", "expand_as_view", "_reshape_alias", "view_copy", "ravel"}
PERMUTE = {"permute", "transpose", "transpose_", "t", "swapaxes", "swapdims", "movedim", "numpy_T", "mT",
           "permute_copy", "transpose_copy"}
SOURCE = {"arange", "zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor",
          "tensor", "rand", "randn", "randint", "linspace", "eye", "empty_strided", "zeros_like_source"}
NO_OUTPUT = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
             "_assert_async", "_print", "set_", "_functional_assert_async", "_functional_sym_constrain_range"}
POOL = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d",
        "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices",
        "upsample_nearest1d", "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest3d",
        "_upsample_nearest_exact2d", "upsample_bicubic2d", "pad", "constant_pad_nd", "reflection_pad2d",
        "replication_pad2d", "pixel_shuffle", "_adaptive_avg_pool2d", "interpolate", "upsample_linear1d"}


def import_module(
    module: nn.Module,
    example_kwargs: dict[str, Any] | None = None,
    example_args: tuple = (),
    *,
    strict: bool = False,
) -> Graph:
    """Export `module` with the example inputs and lower it to the canonical IR."""
    kwargs = dict(example_kwargs or {})
    try:
        sig = inspect.signature(module.forward)
        if "use_cache" in sig.parameters and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a KV cache is an output we cannot export statically
    except (TypeError, ValueError):
        pass
    example_args, kwargs = exported_call_form(module, tuple(example_args), kwargs) or (tuple(example_args), kwargs)
    # structure, not training behaviour: trace in eval mode (BatchNorm running stats, no dropout)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, example_args, kwargs, strict=strict)
    except SlimcError:
        raise
    except Exception as exc:  # export failures are about the user's model: say what to try
        raise SlimcError(
            f"torch.export could not trace {type(module).__name__} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
            "pass example inputs the forward accepts (keyword arguments for Hugging Face models), "
            "or export it yourself and use import_exported()"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    return import_exported(ep, module)


def exported_call_form(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Inputs rearranged into the form an unlifted exported program (`ExportedProgram.module()`, e.g.
    a loaded .pt2) was exported with: its first n inputs positionally, the rest by keyword. Such a
    module refuses any other form ("kwarg keyword mismatch"), also when torch.export traces it again;
    slimc passes example inputs by name. None when `module` is no such program or the inputs do not
    bind to its forward (torch's own check then says why)."""
    spec = getattr(module, "_in_spec", None)
    if not isinstance(module, torch.fx.GraphModule) or spec is None or spec.num_children != 2:
        return None
    positional = (spec.children() if hasattr(spec, "children") else spec.children_specs)[0].num_children
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    names = list(signature.parameters)
    return (tuple(bound[n] for n in names[:positional] if n in bound),
            {n: bound[n] for n in names[positional:] if n in bound})


def import_exported(ep: torch.export.ExportedProgram, module: nn.Module | None = None) -> Graph:
    """Lower an `ExportedProgram`; with `module`, parameter names are its `named_parameters()` names."""
    return _Lowering(ep, module).run()


def _shape(val: Any) -> tuple | None:
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    out = []
    for d in shape:
        try:
            out.append(int(d))
        except (TypeError, ValueError):  # an unbacked / symbolic size stays a string
            out.append(str(d))
    return tuple(out)


def _dtype(val: Any) -> str | None:
    dt = getattr(val, "dtype", None)
    return None if dt is None else str(dt).replace("torch.", "")


def bind_args(target: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map an ATen call's positional and keyword arguments to schema names (defaults filled in)."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        out = {f"arg{i}": a for i, a in enumerate(args)}
        out.update(kwargs)
        return out
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def _norm_axis(axis: int, rank: int) -> int:
    return axis % rank if rank else 0


class _Lowering:
    def __init__(self, ep: torch.export.ExportedProgram, module: nn.Module | None):
        self.ep = ep
        self.module = module
        self.graph = Graph()
        self.env: dict[Any, Any] = {}  # fx node -> Value | list[Value] | python constant
        self.counter = 0
        self.canonical = self._canonical_names()

    # --- names -----------------------------------------------------------------------------------

    def _canonical_names(self) -> dict[str, str]:
        """Export FQN -> the first name `named_parameters()`/`named_buffers()` gives that tensor."""
        if self.module is None:
            return {}
        first: dict[int, str] = {}
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            first.setdefault(id(t), name)
        out = {}
        for name, t in [*self.module.named_parameters(remove_duplicate=False), *self.module.named_buffers(remove_duplicate=False)]:
            out[name] = first.get(id(t), name)
        return out

    def _param_value(self, fqn: str, val: Any) -> Value:
        name = self.canonical.get(fqn, fqn)
        v = self.graph.params.get(name)
        if v is None:
            v = Value(name, _shape(val), _dtype(val), param=name)
            self.graph.params[name] = v
        return v

    def _new_value(self, fx_node: torch.fx.Node, val: Any, suffix: str = "") -> Value:
        return Value(fx_node.name + suffix, _shape(val), _dtype(val))

    # --- walk -----------------------------------------------------------------------------------

    def run(self) -> Graph:
        sig = self.ep.graph_signature
        to_param = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        consts = dict(sig.inputs_to_lifted_tensor_constants)
        for node in self.ep.graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if node.name in to_param:
                self.env[node] = self._param_value(to_param[node.name], val)
            elif node.name in consts:
                t = self.ep.constants.get(consts[node.name])
                self.env[node] = Value(node.name, _shape(val), _dtype(val), const=t)
            elif isinstance(val, torch.Tensor):
                v = self._new_value(node, val)
                self.graph.inputs.append(v)
                self.env[node] = v
            else:
                self.env[node] = val  # a python scalar / bool input, e.g. use_cache
        self._lower_body(self.ep.graph_module, self.ep.graph)
        return self.graph

    def _lower_body(self, gm: torch.fx.GraphModule, fx_graph: torch.fx.Graph) -> list[Any] | None:
        outputs = None
        for node in fx_graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                self.env[node] = getattr(gm, node.target)
            elif node.op == "call_function":
                self._call(gm, node)
            elif node.op == "output":
                outputs = node.args[0]
                if gm is self.ep.graph_module:
                    flat = torch.utils._pytree.tree_leaves(self._arg(outputs))
                    self.graph.outputs = [v for v in flat if isinstance(v, Value)]
        return outputs

    def _arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return self.env.get(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg(x) for k, x in a.items()}
        return a

    def _call(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            src = self._arg(node.args[0])
            self.env[node] = src[node.args[1]] if isinstance(src, (list, tuple)) else None
            return
        name = getattr(target, "__name__", str(target))
        if name in ("wrap_with_set_grad_enabled", "wrap_with_autocast"):
            self._inline(gm, node)
            return
        if not isinstance(target, torch._ops.OpOverload):
            if isinstance(node.meta.get("val"), torch.Tensor) or isinstance(node.meta.get("val"), (list, tuple)):
                self._emit_opaque(node, str(target))
            else:
                self.env[node] = None  # symbolic-int arithmetic (sym_size, operator.mul on sizes)
            return
        packet = target._opname
        ns = target.namespace
        source_op = f"{ns}.{packet}.{target._overloadname}"
        bound = bind_args(target, node.args, node.kwargs)
        val = node.meta.get("val")
        if packet in NO_OUTPUT or val is None and not isinstance(val, (list, tuple)):
            self.env[node] = None
            return
        lower = _LOWERINGS.get(packet) if ns == "aten" else _CUSTOM.get(f"{ns}.{packet}")
        spec = None
        if lower is not None:
            spec = lower(self, node, bound)
        if spec is None:
            self._emit_opaque(node, source_op)
            return
        op, inputs, attrs = spec
        self._emit(node, op, inputs, attrs, source_op)

    def _inline(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        """Higher-order ops that only switch grad/autocast: lower their body in place."""
        name = getattr(node.target, "__name__", "")
        sub_idx = 1 if name == "wrap_with_set_grad_enabled" else 4
        sub = self._arg(node.args[sub_idx]) if len(node.args) > sub_idx else None
        if not isinstance(sub, torch.fx.GraphModule):
            sub = next((self._arg(a) for a in node.args if isinstance(self._arg(a), torch.fx.GraphModule)), None)
            if sub is None:
                self._emit_opaque(node, name)
                return
        sub_args = node.args[sub_idx + 1 :]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, a in zip(placeholders, sub_args):
            self.env[ph] = self._arg(a)
        out = self._lower_body(sub, sub.graph)
        self.env[node] = self._arg(out) if out is not None else None

    # --- emission -------------------------------------------------------------------------------

    def _module_path(self, node: torch.fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        # export prefixes sub-paths with "L['self']." in strict mode; keep the plain attribute path
        return path.replace("L['self'].", "").replace("L__self__.", "")

    def _outputs_for(self, node: torch.fx.Node) -> list[Value]:
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            return [self._new_value(node, v, f".{i}") for i, v in enumerate(val)]
        return [self._new_value(node, val)]

    def _emit(self, node: torch.fx.Node, op: str, inputs: list, attrs: dict, source_op: str) -> Node:
        outs = self._outputs_for(node)
        n = Node(op, [v if isinstance(v, Value) else None for v in inputs], outs, attrs, self._module_path(node), source_op, node.name)
        self.graph.add_node(n)
        val = node.meta.get("val")
        self.env[node] = outs if isinstance(val, (list, tuple)) else outs[0]
        return n

    def _emit_opaque(self, node: torch.fx.Node, source_op: str) -> None:
        flat = torch.utils._pytree.tree_leaves(self._arg((node.args, node.kwargs)))
        inputs = [v for v in flat if isinstance(v, Value)]
        self._emit(node, "opaque", inputs, {}, source_op)

    def tensor(self, a: Any) -> Value | None:
        v = self._arg(a)
        return v if isinstance(v, Value) else None

    def rank(self, v: Value | None) -> int:
        return len(v.shape) if v is not None and v.shape is not None else 0


# --- lowerings: (lowering, fx node, bound args) -> (canonical op, inputs, attrs) or None (opaque) ---

Spec = tuple[str, list, dict] | None


def _out_shape(node: torch.fx.Node) -> tuple | None:
    return _shape(node.meta.get("val"))


def _linear(L: _Lowering, node, b) -> Spec:
    return "linear", [L.tensor(b["input"]), L.tensor(b["weight"]), L.tensor(b.get("bias"))], {"w_out_axis": 0, "w_in_axis": 1}


def _addmm(L: _Lowering, node, b) -> Spec:
    # GPT-2 Conv1D: addmm(bias, x, W[in, out])
    if b.get("beta", 1) != 1 or b.get("alpha", 1) != 1:
        return None
    return "linear", [L.tensor(b["mat1"]), L.tensor(b["mat2"]), L.tensor(b["self"])], {"w_out_axis": 1, "w_in_axis": 0}


def _matmul(L: _Lowering, node, b) -> Spec:
    a = b.get("self", b.get("input"))
    m = b.get("other", b.get("mat2"))
    return "matmul", [L.tensor(a), L.tensor(m)], {}


def _conv(L: _Lowering, node, b) -> Spec:
    transposed = bool(b.get("transposed", False)) or "transpose" in node.target._opname
    return "conv", [L.tensor(b["input"]), L.tensor(b["weight"]), L.tensor(b.get("bias"))], {
        "groups": int(b.get("groups") or 1), "transposed": transposed}


def _arith(L: _Lowering, node, b) -> Spec:
    op = ARITH[node.target._opname]
    ins = [L.tensor(b.get("self")), L.tensor(b.get("other"))]
    if node.target._opname == "rsub":
        ins = ins[::-1]
    return op, [v for v in ins if v is not None], {}


def _elementwise(L: _Lowering, node, b) -> Spec:
    ins = [v for v in torch.utils._pytree.tree_leaves(L._arg((node.args, node.kwargs))) if isinstance(v, Value)]
    shapes = [v.shape for v in ins]
    out = _out_shape(node)
    if len(ins) == 1 and shapes[0] == out:
        return "unary", ins, {"fn": node.target._opname}
    return "elementwise", ins, {"fn": node.target._opname}


def _softmax(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    return "softmax", [x], {"axis": _norm_axis(int(b["dim"]), L.rank(x))}


def _reduce(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    r = L.rank(x)
    dims = b.get("dim")
    if dims is None:
        dims = list(range(r))
    elif isinstance(dims, int):
        dims = [dims]
    keep = bool(b.get("keepdim", False))
    return "reduce", [x], {"fn": node.target._opname, "axes": sorted(_norm_axis(int(d), r) for d in dims), "keepdim": keep}


def _reshape(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    return "reshape", [x], {"shape": _out_shape(node)}


def _permute(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    r = L.rank(x)
    name = node.target._opname
    perm = list(range(r))
    if name in ("permute", "permute_copy"):
        perm = [_norm_axis(int(d), r) for d in b["dims"]]
    elif name in ("transpose", "transpose_", "swapaxes", "swapdims", "transpose_copy"):
        keys = [k for k in b if k not in ("self", "input")]
        d0, d1 = (_norm_axis(int(b[keys[0]]), r), _norm_axis(int(b[keys[1]]), r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    elif name in ("t", "numpy_T", "mT"):
        if r >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
    elif name == "movedim":
        src = b["source"] if isinstance(b["source"], (list, tuple)) else [b["source"]]
        dst = b["destination"] if isinstance(b["destination"], (list, tuple)) else [b["destination"]]
        src = [_norm_axis(int(s), r) for s in src]
        dst = [_norm_axis(int(d), r) for d in dst]
        rest = [i for i in range(r) if i not in src]
        perm = [None] * r
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    return "permute", [x], {"perm": perm}


def _cat(L: _Lowering, node, b) -> Spec:
    xs = [L.tensor(t) for t in b["tensors"]]
    out = _out_shape(node)
    r = len(out)
    axis = _norm_axis(int(b.get("dim", 0)), r)
    stack = node.target._opname == "stack"
    return "concat", xs, {"axis": axis, "stack": stack}


def _split(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    r = L.rank(x)
    axis = _norm_axis(int(b.get("dim", 0)), r)
    sizes = [s[axis] for s in (_shape(v) for v in node.meta["val"])]
    name = node.target._opname
    even = name == "chunk" or (name in ("split", "unsafe_split") and isinstance(b.get("split_size"), int)
                               and len(set(sizes)) == 1)
    if name == "unbind":
        return "split", [x], {"axis": axis, "sizes": sizes, "even": True, "squeeze": True}
    return "split", [x], {"axis": axis, "sizes": sizes, "even": even, "squeeze": False}


def _slice(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    r = L.rank(x)
    axis = _norm_axis(int(b.get("dim", 0)), r)
    n = x.shape[axis]
    name = node.target._opname
    if name == "narrow":
        start, length = int(b["start"]), int(b["length"])
        start = start % n
        return "slice", [x], {"axis": axis, "start": start, "end": start + length, "step": 1}
    start = b.get("start")
    end = b.get("end")
    step = int(b.get("step") or 1)
    start = 0 if start is None else int(start)
    end = n if end is None else int(end)
    start = max(0, min(n, start + n if start < 0 else start))
    end = max(0, min(n, end + n if end < 0 else end))
    return "slice", [x], {"axis": axis, "start": start, "end": max(end, start), "step": step}


def _select(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    r = L.rank(x)
    axis = _norm_axis(int(b["dim"]), r)
    return "select", [x], {"axis": axis, "index": int(b["index"]) % x.shape[axis]}


def _expand(L: _Lowering, node, b) -> Spec:
    return "expand", [L.tensor(b.get("self", b.get("input")))], {"shape": _out_shape(node)}


def _repeat(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    name = node.target._opname
    if name == "repeat":
        return "repeat", [x], {"repeats": [int(r) for r in b["repeats"]], "interleave": False}
    rep = b.get("repeats")
    if not isinstance(rep, int) or b.get("dim") is None:
        return None  # tensor repeats: data-dependent
    return "repeat", [x], {"axis": _norm_axis(int(b["dim"]), L.rank(x)), "repeats": int(rep), "interleave": True}


def _layer_norm(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["input"])
    k = len(b["normalized_shape"])
    return "norm", [x, L.tensor(b.get("weight")), L.tensor(b.get("bias"))], {
        "kind": "layer", "axes": list(range(L.rank(x) - k, L.rank(x)))}


def _rms_norm(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["input"])
    k = len(b["normalized_shape"])
    return "norm", [x, L.tensor(b.get("weight"))], {"kind": "rms", "axes": list(range(L.rank(x) - k, L.rank(x)))}


def _group_norm(L: _Lowering, node, b) -> Spec:
    return "norm", [L.tensor(b["input"]), L.tensor(b.get("weight")), L.tensor(b.get("bias"))], {
        "kind": "group", "axis": 1, "num_groups": int(b["num_groups"])}


def _batch_norm(L: _Lowering, node, b) -> Spec:
    training = bool(b.get("training", False))
    if training:
        return None  # batch statistics mix examples; import the model in eval mode
    ins = [L.tensor(b["input"]), L.tensor(b.get("weight")), L.tensor(b.get("bias")),
           L.tensor(b.get("running_mean")), L.tensor(b.get("running_var"))]
    return "norm", ins, {"kind": "batch", "axis": 1}


def _instance_norm(L: _Lowering, node, b) -> Spec:
    """Per-(example, channel) statistics over the spatial axes, or the running ones (eval, tracked)."""
    ins = [L.tensor(b["input"]), L.tensor(b.get("weight")), L.tensor(b.get("bias")),
           L.tensor(b.get("running_mean")), L.tensor(b.get("running_var"))]
    return "norm", ins, {"kind": "batch", "axis": 1, "instance": bool(b.get("use_input_stats", True))}


def _prelu(L: _Lowering, node, b) -> Spec:
    return "prelu", [L.tensor(b["self"]), L.tensor(b["weight"])], {}


def _rnn(L: _Lowering, node, b) -> Spec:
    """aten.lstm / gru / rnn_tanh / rnn_relu (the `.input` overload, a dense batch): one `rnn` node.

    Inputs: x, the initial states (h0, and c0 for an LSTM), then the flat weights in PyTorch's order
    (per layer, per direction: w_ih, w_hh, [b_ih, b_hh], [w_hr])."""
    if node.target._overloadname != "input":
        return None  # the packed-sequence overloads (`.data`) carry batch sizes as data: no rule
    hx = b["hx"]
    states = [L.tensor(h) for h in (hx if isinstance(hx, (list, tuple)) else [hx])]
    params = [L.tensor(p) for p in b["params"]]
    if any(v is None for v in [*states, *params]):
        return None
    dirs = 2 if b["bidirectional"] else 1
    cells = int(b["num_layers"]) * dirs
    if len(params) % cells:
        return None
    per_cell = len(params) // cells
    return "rnn", [L.tensor(b["input"]), *states, *params], {
        "kind": node.target._opname, "n_states": len(states), "num_layers": int(b["num_layers"]),
        "bidirectional": bool(b["bidirectional"]), "batch_first": bool(b["batch_first"]),
        "has_biases": bool(b["has_biases"]), "input_weights": [d * per_cell for d in range(dirs)], "weight_in_axis": 1}


def _embedding(L: _Lowering, node, b) -> Spec:
    return "embedding", [L.tensor(b["weight"]), L.tensor(b["indices"])], {}


def _sdpa(L: _Lowering, node, b) -> Spec:
    return "sdpa", [L.tensor(b["query"]), L.tensor(b["key"]), L.tensor(b["value"]), L.tensor(b.get("attn_mask"))], {
        "enable_gqa": bool(b.get("enable_gqa", False)), "scale": b.get("scale"), "is_causal": bool(b.get("is_causal"))}


def _index(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["self"])
    idx = b["indices"]
    axes = [i for i, t in enumerate(idx) if t is not None]
    vals = [L.tensor(idx[i]) for i in axes]
    if not axes or axes != list(range(axes[0], axes[0] + len(axes))) or any(v is None for v in vals):
        return None
    return "gather", [x, *vals], {"axes": axes}


def _index_select(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["self"])
    return "gather", [x, L.tensor(b["index"])], {"axes": [_norm_axis(int(b["dim"]), L.rank(x))]}


def _scan(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["self"])
    return "scan", [x], {"fn": node.target._opname, "axis": _norm_axis(int(b["dim"]), L.rank(x))}


def _topk(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b["self"])
    r = L.rank(x)
    axis = _norm_axis(int(b.get("dim", -1) if b.get("dim") is not None else -1), r)
    k = int(b["k"]) if "k" in b and b["k"] is not None else x.shape[axis]
    return "topk", [x], {"axis": axis, "k": k, "fn": node.target._opname}


def _histc(L: _Lowering, node, b) -> Spec:
    return "histc", [L.tensor(b["self"])], {"bins": int(b["bins"])}


def _one_hot(L: _Lowering, node, b) -> Spec:
    return "one_hot", [L.tensor(b["self"])], {"num_classes": _out_shape(node)[-1]}


def _source(L: _Lowering, node, b) -> Spec:
    return "source", [], {"fn": node.target._opname}


def _pool(L: _Lowering, node, b) -> Spec:
    x = L.tensor(b.get("self", b.get("input")))
    return "pool", [x], {"fn": node.target._opname}


def _grouped_mm(L: _Lowering, node, b) -> Spec:
    vals = [L.tensor(a) for a in node.args]
    return "grouped_mm", vals[:3], {}


_LOWERINGS: dict[str, Callable[[_Lowering, torch.fx.Node, dict], Spec]] = {
    "linear": _linear, "addmm": _addmm, "matmul": _matmul, "mm": _matmul, "bmm": _matmul,
    "conv1d": _conv, "conv2d": _conv, "conv3d": _conv, "convolution": _conv, "_convolution": _conv,
    "conv_transpose1d": _conv, "conv_transpose2d": _conv, "conv_transpose3d": _conv,
    "softmax": _softmax, "_softmax": _softmax, "log_softmax": _softmax, "_log_softmax": _softmax,
    "cat": _cat, "concat": _cat, "stack": _cat,
    "split": _split, "split_with_sizes": _split, "chunk": _split, "unbind": _split, "unsafe_split": _split,
    "slice": _slice, "narrow": _slice, "select": _select,
    "expand": _expand, "expand_copy": _expand, "repeat": _repeat, "repeat_interleave": _repeat,
    "layer_norm": _layer_norm, "native_layer_norm": _layer_norm, "rms_norm": _rms_norm,
    "group_norm": _group_norm, "native_group_norm": None,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _batch_norm, "instance_norm": _instance_norm,
    "prelu": _prelu, "_prelu_kernel": _elementwise, "lstm": _rnn, "gru": _rnn, "rnn_tanh": _rnn, "rnn_relu": _rnn,
    "embedding": _embedding, "scaled_dot_product_attention": _sdpa,
    "index": _index, "index_select": _index_select,
    "cumsum": _scan, "cumprod": _scan, "topk": _topk, "sort": _topk, "histc": _histc, "one_hot": _one_hot,
}
_LOWERINGS = {k: v for k, v in _LOWERINGS.items() if v is not None}
for _n in ARITH:
    _LOWERINGS.setdefault(_n, _arith)
for _n in UNARY:
    _LOWERINGS.setdefault(_n, _elementwise)
for _n in REDUCE:
    _LOWERINGS.setdefault(_n, _reduce)
for _n in RESHAPE:
    _LOWERINGS.setdefault(_n, _reshape)
for _n in PERMUTE:
    _LOWERINGS.setdefault(_n, _permute)
for _n in SOURCE:
    _LOWERINGS.setdefault(_n, _source)
for _n in POOL:
    _LOWERINGS.setdefault(_n, _pool)

_CUSTOM: dict[str, Callable[[_Lowering, torch.fx.Node, dict], Spec]] = {
    "transformers.grouped_mm_fallback": _grouped_mm,
}
