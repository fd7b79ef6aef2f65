"""Groups: the sets of (parameter, axis, indices) that must shrink together.

A `Group` has `size` channels. Channel `c` of the group owns, in every `Slice`, the indices
`slice.index[c]` along `slice.axis` of the named tensor. Removing channels `S` of the group removes
the union of `slice.index[S]` from every slice at once; this is what keeps a model consistent
(an output channel of one layer and the input channel of each consumer, a KV head with its
G query heads, a gated-MLP neuron's gate row, up row and down column ...).

`attrs` lists module attributes that count channels (e.g. `num_heads` drops by G per KV group)
which surgery must update; shapes that can be read from weights (Linear in/out features, conv
channels, norm sizes) are re-derived by surgery itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch


class Role:
    """Stable role labels given by recognisers; passes ask for units by role."""

    KV_GROUP = "attention.kv_group"  # one KV head and the G query heads that read it
    HEAD = "attention.head"  # MHA head (G == 1): same as a KV group of one query head
    MLP_NEURON = "mlp.neuron"  # gated or plain MLP hidden unit
    EXPERT = "moe.expert"  # an MoE expert and its router row
    EXPERT_NEURON = "moe.expert_neuron"
    CONV_CHANNEL = "conv.channel"
    LINEAR_CHANNEL = "linear.channel"
    HIDDEN = "hidden"  # residual-stream width
    UNKNOWN = "unknown"


@dataclass(frozen=True, eq=False)
class Slice:
    """Indices of one tensor owned by each channel of a group: `index[c]` along `axis`."""

    param: str  # parameter or buffer name (torch) / initializer name (ONNX)
    axis: int
    index: torch.Tensor  # int64 [group.size, k]

    def rows(self, channels: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ch = torch.as_tensor(channels, dtype=torch.long)
        return self.index[ch].reshape(-1)


@dataclass(frozen=True)
class AttrUpdate:
    """`module.attr -= per_channel * removed` for a module attribute that counts channels."""

    module: str
    attr: str
    per_channel: int = 1


@dataclass(eq=False)
class Group:
    name: str
    size: int
    slices: list[Slice]
    role: str = Role.UNKNOWN
    layer: int | None = None
    attrs: list[AttrUpdate] = field(default_factory=list)
    prunable: bool = True
    reason: str = ""  # why not prunable
    exact: bool = True  # removing zeroed channels leaves outputs unchanged (False: e.g. softmax over experts)
    inexact_reason: str = ""  # why not exact, when prunable but not exact
    multiple_of: int = 1  # the kept size must stay a multiple of this (e.g. grouped_mm's 16-byte strides)

    def __repr__(self) -> str:
        flag = "" if self.prunable else f", unprunable: {self.reason}"
        return f"Group({self.name!r}, role={self.role}, size={self.size}, slices={len(self.slices)}{flag})"

    def params(self) -> list[str]:
        return sorted({s.param for s in self.slices})

    def numel_per_channel(self, shapes: dict[str, Sequence[int]]) -> int:
        """Elements removed from the model per channel, given each tensor's shape.

        Where two slices of the same tensor overlap (a square weight whose rows and columns are
        both in the group), the intersection is counted once.
        """
        by_param: dict[str, list[Slice]] = {}
        for s in self.slices:
            by_param.setdefault(s.param, []).append(s)
        total = 0
        for name, slices in by_param.items():
            shape = list(shapes[name])
            remaining = list(shape)
            for s in slices:
                remaining[s.axis] -= s.index.shape[1]
            total += _prod(shape) - _prod(remaining)
        return total


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out




def channels(indices: Iterable[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
    return torch.unique(t)


def block_index(size: int, width: int, offset: int = 0, stride: int | None = None) -> torch.Tensor:
    """Channel c owns indices offset + c*stride + [0, width): heads of `width` contiguous rows."""
    stride = width if stride is None else stride
    base = torch.arange(size, dtype=torch.long)[:, None] * stride + offset
    return base + torch.arange(width, dtype=torch.long)[None, :]
