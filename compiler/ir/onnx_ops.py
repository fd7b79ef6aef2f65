"""The ONNX op vocabulary: which ONNX ops slimc has a rule for, grouped by what they do to channels.

Both ONNX consumers read this one table: the importer (`compiler.frontends.import_onnx`, which
lowers each family to canonical IR ops) and the structural surgery (`compiler.surgery.onnx_model`,
which propagates removed indices through each family). An op is named by its key
`(domain, op_type)`; the default domain is written "" (`canonical_domain` maps its other spelling
"ai.onnx" to ""), ONNX Runtime's contrib ops are in "com.microsoft". Every key belongs to exactly one
base family; `ELEMENTWISE`, `NORMS` and `CHANNEL_KEEPING` are unions of base families.

"Removed channel" below means an index of one axis of a tensor that a pruning plan deletes.

Element-wise families (their union is `ELEMENTWISE`). Broadcasting: a channel removed from an
input is removed from the output at the same (right-aligned) axis, and every other input that
spans that axis (size > 1) must lose the same indices.
  ARITHMETIC        Add Sub Mul Div                        -> IR add / sub / mul / div
  BROADCAST         Where Max Min Equal ... PRelu           -> IR elementwise (fn = op, lower case)
  UNARY             Relu Sigmoid Cast Pow Clip ...          -> IR unary on the first input; the other
                    inputs (Pow's exponent, Clip's bounds, Dropout's ratio) are scalars or broadcast.
                    Gelu is a default-domain op from opset 20 and also a com.microsoft contrib op;
                    QuickGelu (x * sigmoid(alpha * x)) exists only in com.microsoft.
  BIAS_ACTIVATIONS  com.microsoft FastGelu BiasGelu        -> IR elementwise; input 1 is a
                    per-channel bias of the last axis, which broadcasts like Add's second operand.

  SOFTMAX           Softmax LogSoftmax                     -> IR softmax with its axis. Element-wise
                    along every axis except the one it normalises over (`softmax_axes`): there a
                    removed entry, even a zeroed one (exp(0) = 1), changes every remaining output,
                    so the surgery refuses to remove indices along it.

Channel-keeping families (their union is `CHANNEL_KEEPING`): only the channel axis 1 may shrink,
and the output keeps exactly the input's channel indices.
  POOLS             MaxPool AveragePool LpPool Global*Pool Resize Upsample Pad
                    -> IR pool (kind), the global pools -> IR reduce over the spatial axes.
  CHANNEL_NORMS     BatchNormalization InstanceNormalization (per-channel statistics; scale, bias
                    and running statistics are per-channel and lose the same channels) and
                    LpNormalization (no IR rule: the importer leaves it opaque).

Norm families (`NORMS` is LAST_AXES_NORMS | CHANNEL_NORMS | GROUP_NORMS; `KINDS` gives the IR kind):
  LAST_AXES_NORMS   LayerNormalization SimplifiedLayerNormalization RMSNormalization: normalise over
                    the axes from `axis` to the last; scale and bias broadcast over those axes like
                    element-wise operands, so they lose the same indices as the input.
                    (SimplifiedLayerNormalization is ONNX Runtime's default-domain RMS norm.)
  GROUP_NORMS       GroupNormalization: channel axis 1 only, and only whole groups.
  SKIP_NORMS        com.microsoft SkipLayerNormalization SkipSimplifiedLayerNormalization:
                    norm(input + skip (+ bias)) over the last axis; output 3 is that sum.

Other families:
  REDUCE            Reduce* ArgMax ArgMin: reduced axes disappear (or keep size 1), the others
                    carry their removed channels through (`KINDS`: the IR reduce fn).
  RESHAPES          Reshape Squeeze Unsqueeze Flatten: removed indices map through the row-major layout.
  CONVS             Conv ConvTranspose;   MATMULS  MatMul Gemm.
  SHAPE_READS       Shape Size: read sizes only; the result carries no channel of the input.

Ops with a rule of their own (Transpose, Concat, Split, Slice, Expand, Gather, Constant, CastLike,
opset-23 Attention) are named by op_type where they are handled; anything else has no rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

DEFAULT = ""  # the default (ai.onnx) domain, as ONNX writes it
MICROSOFT = "com.microsoft"  # ONNX Runtime's contrib ops
DEFAULT_ALIASES = frozenset({"", "ai.onnx"})
DOMAINS = frozenset({DEFAULT, MICROSOFT})  # domains whose ops may have a rule

OpKey = tuple[str, str]  # (canonical domain, op_type)

SOFTMAX_DEFAULT_AXIS = -1  # opset >= 13; before that the default was 1 (see softmax_axes)


@dataclass(frozen=True)
class OpSpec:
    family: str
    kind: str | None = None  # the IR kind / fn where the family needs one (reduce fn, pool and norm kind)


_TABLE: dict[OpKey, OpSpec] = {}


def canonical_domain(domain: str | None) -> str:
    """"" for the default domain however it is spelled (None, "", "ai.onnx"); other domains unchanged."""
    return DEFAULT if domain is None or domain in DEFAULT_ALIASES else domain


def op_key(domain: str | None, op_type: str) -> OpKey:
    return canonical_domain(domain), op_type


def _family(name: str, domain: str, ops: Iterable[str] | Mapping[str, str | None]) -> frozenset[OpKey]:
    kinds = ops if isinstance(ops, Mapping) else dict.fromkeys(ops)
    keys = []
    for op, kind in kinds.items():
        key = (domain, op)
        if key in _TABLE:  # one op, one base family: a second listing is a mistake in this file
            raise AssertionError(f"{key} is listed in families '{_TABLE[key].family}' and '{name}'")
        _TABLE[key] = OpSpec(name, kind)
        keys.append(key)
    return frozenset(keys)


ARITHMETIC = _family("arithmetic", DEFAULT, ("Add", "Sub", "Mul", "Div"))
BROADCAST = _family("broadcast", DEFAULT, (
    "Where", "Max", "Min", "Mean", "Sum", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
    "And", "Or", "Xor", "Mod", "BitShift", "PRelu",
))
UNARY = _family("unary", DEFAULT, (
    "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Exp", "Log", "Neg", "Sqrt", "Reciprocal", "Abs", "Cast",
    "CastLike", "Identity", "Softplus", "Softsign", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Mish", "Clip", "Dropout", "IsNaN", "IsInf", "Not", "Sin", "Cos", "Tan", "Floor", "Ceil",
    "Round", "Sign", "ThresholdedRelu", "Pow", "BitwiseNot", "Trilu",
)) | _family("unary", MICROSOFT, ("Gelu", "QuickGelu"))
BIAS_ACTIVATIONS = _family("bias_activation", MICROSOFT, ("FastGelu", "BiasGelu"))
ELEMENTWISE = ARITHMETIC | BROADCAST | UNARY | BIAS_ACTIVATIONS

SOFTMAX = _family("softmax", DEFAULT, ("Softmax", "LogSoftmax"))

POOLS = _family("pool", DEFAULT, {
    "MaxPool": "max", "AveragePool": "avg", "LpPool": "lp", "GlobalAveragePool": "global_avg",
    "GlobalMaxPool": "global_max", "Resize": "resize", "Upsample": "resize", "Pad": "pad",
})
CHANNEL_NORMS = _family("channel_norm", DEFAULT, {
    "BatchNormalization": "batch", "InstanceNormalization": "instance", "LpNormalization": None,
})
CHANNEL_KEEPING = POOLS | CHANNEL_NORMS

LAST_AXES_NORMS = _family("last_axes_norm", DEFAULT, {
    "LayerNormalization": "layer", "SimplifiedLayerNormalization": "rms", "RMSNormalization": "rms",
})
GROUP_NORMS = _family("group_norm", DEFAULT, {"GroupNormalization": "group"})
NORMS = LAST_AXES_NORMS | CHANNEL_NORMS | GROUP_NORMS
SKIP_NORMS = _family("skip_norm", MICROSOFT, {"SkipLayerNormalization": "layer", "SkipSimplifiedLayerNormalization": "rms"})

REDUCE = _family("reduce", DEFAULT, {
    "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod",
    "ReduceL1": "l1", "ReduceL2": "l2", "ReduceSumSquare": "sumsquare", "ReduceLogSum": "logsum",
    "ReduceLogSumExp": "logsumexp", "ArgMax": "argmax", "ArgMin": "argmin",
})
RESHAPES = _family("reshape", DEFAULT, ("Reshape", "Squeeze", "Unsqueeze", "Flatten"))
CONVS = _family("conv", DEFAULT, ("Conv", "ConvTranspose"))
MATMULS = _family("matmul", DEFAULT, ("MatMul", "Gemm"))
SHAPE_READS = _family("shape_read", DEFAULT, ("Shape", "Size"))

TABLE: Mapping[OpKey, OpSpec] = MappingProxyType(_TABLE)
KINDS: Mapping[OpKey, str] = MappingProxyType({k: s.kind for k, s in _TABLE.items() if s.kind is not None})
MICROSOFT_OPS = frozenset(k for k in _TABLE if k[0] == MICROSOFT)  # the contrib ops slimc has a rule for


def family_of(domain: str | None, op_type: str) -> str | None:
    """The base family of an op (e.g. "unary", "softmax"), or None when slimc has no family for it."""
    spec = _TABLE.get(op_key(domain, op_type))
    return None if spec is None else spec.family


def softmax_axes(axis: int | None, rank: int, opset: int) -> tuple[int, ...]:
    """The axes a Softmax/LogSoftmax normalises over (non-negative), given its `axis` attribute or None.

    From opset 13 that is the one axis `axis` (default -1). Before, the input was coerced to 2-D
    at `axis` (default 1) and normalised over all axes from `axis` to the last.
    """
    if opset >= 13:
        return ((SOFTMAX_DEFAULT_AXIS if axis is None else axis) % rank,)
    return tuple(range((1 if axis is None else axis) % rank, rank))
