"""Structural surgery on PyTorch modules: remove (or zero) a plan's channels.

`apply_plan(module, plan)` removes, for every group in `plan`, the listed channels from every
slice of the group, then re-derives the shape attributes of standard modules (Linear, ConvNd,
norms, Embedding) from their new weights and applies the group's `AttrUpdate`s (e.g. `num_heads`).
Tied tensors (an embedding shared with the output head) are replaced in every module that holds
them, so the tie survives.

`mask_plan(module, plan)` zeroes the same indices in place instead. The contract, tested on every
architecture: after `mask_plan`, `apply_plan` leaves the model's outputs unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch import nn

from slimc.compiler.groups import Group, channels
from slimc.compiler.surgery.plan import removals
from slimc.errors import SlimcError


def _owners(module: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_parameter) that holds it (ties included)."""
    out: dict[int, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out[id(p)].append((mod, name, True))
        for name, b in mod._buffers.items():
            if b is not None:
                out[id(b)].append((mod, name, False))
    return out


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(dict(module.named_buffers(remove_duplicate=False)))
    return named


def _resolve(named: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return named[name]
    except KeyError:
        raise SlimcError(f"plan names tensor '{name}', which the model does not have") from None


def mask_plan(module: nn.Module, plan: Mapping[Group, Sequence[int]]) -> None:
    """Zero, in place, every index the plan would remove."""
    named = _named_tensors(module)
    with torch.no_grad():
        for name, axes in removals(plan).items():
            t = _resolve(named, name)
            for axis, idx in axes.items():
                t.index_fill_(axis, idx.to(t.device), 0)


def apply_plan(module: nn.Module, plan: Mapping[Group, Sequence[int]]) -> dict[str, int]:
    """Remove the plan's channels from `module` in place. Returns {"params_removed": n}."""
    named = _named_tensors(module)
    owners = _owners(module)
    before = sum(p.numel() for p in module.parameters())
    # merge removals by tensor identity, so tied names (embedding = lm_head) are cut once
    by_tensor: dict[int, tuple[str, torch.Tensor, dict[int, torch.Tensor]]] = {}
    for name, axes in removals(plan).items():
        t = _resolve(named, name)
        _, _, merged = by_tensor.setdefault(id(t), (name, t, {}))
        for axis, idx in axes.items():
            axis = axis % t.dim()
            merged[axis] = torch.unique(torch.cat([merged[axis], idx])) if axis in merged else idx
    for name, t, axes in by_tensor.values():
        for axis, idx in axes.items():
            if int(idx.max()) >= t.shape[axis]:
                raise SlimcError(f"tensor '{name}' axis {axis} has {t.shape[axis]} entries; plan removes index {int(idx.max())}")
    _refuse_empty(module, plan, by_tensor, owners)
    old_shapes: dict[int, torch.Size | None] = {}
    with torch.no_grad():
        for name, t, axes in by_tensor.values():
            new = t
            for axis, idx in axes.items():
                n = new.shape[axis]
                keep = torch.ones(n, dtype=torch.bool)
                keep[idx] = False
                new = new.index_select(axis, keep.nonzero().squeeze(1).to(new.device))
            new = new.contiguous()
            param = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
            for mod, attr, is_param in owners[id(t)]:
                old_shapes.setdefault(id(mod), _shape_of(mod))
                (mod._parameters if is_param else mod._buffers)[attr] = param
        for mod in module.modules():
            if id(mod) in old_shapes:
                _refresh_module(mod, old_shapes[id(mod)])
        for group, chans in plan.items():
            n = len(channels(chans))
            for upd in group.attrs:
                mod = module.get_submodule(upd.module)
                setattr(mod, upd.attr, getattr(mod, upd.attr) - upd.per_channel * n)
    after = sum(p.numel() for p in module.parameters())
    return {"params_removed": before - after}


def _refuse_empty(module: nn.Module, plan: Mapping[Group, Sequence[int]],
                  by_tensor: dict[int, tuple[str, torch.Tensor, dict[int, torch.Tensor]]],
                  owners: dict[int, list[tuple[nn.Module, str, bool]]]) -> None:
    """Raise SlimcError, before anything is cut, when the plan leaves a module that cannot run empty.

    Removing every channel of a group gives zero-width tensors. `nn.Linear` computes with those
    (no outputs, or only its bias), so an emptied MLP of Linears still runs and equals the masked
    model; a convolution, a norm, transformers' Conv1D or a 3-D expert tensor does not, and a
    counter such as `num_heads` at zero breaks the reshapes that read it. Those plans are refused.
    """
    full = [g.name for g, chans in plan.items() if g.size and len(channels(chans)) == g.size]
    keep = f"keep at least one channel of {', '.join(full)}" if full else "keep at least one channel of each group"
    for group, chans in plan.items():
        n = len(channels(chans))
        for upd in group.attrs:
            mod = module.get_submodule(upd.module)
            if n and getattr(mod, upd.attr) - upd.per_channel * n <= 0:
                raise SlimcError(f"the plan removes every channel of group {group.name}: {upd.module}.{upd.attr} would become "
                                 f"{getattr(mod, upd.attr) - upd.per_channel * n}; {keep}")
    for name, t, axes in by_tensor.values():
        for axis, idx in axes.items():
            if idx.numel() < t.shape[axis]:
                continue
            for mod, _, _ in owners[id(t)]:
                if not isinstance(mod, nn.Linear):
                    raise SlimcError(f"the plan removes all {t.shape[axis]} entries of axis {axis} of '{name}', and a "
                                     f"{type(mod).__name__} cannot run with zero width; {keep}")


def _shape_of(mod: nn.Module) -> torch.Size | None:
    w = mod._parameters.get("weight")
    return None if w is None else w.shape


def _refresh_module(mod: nn.Module, old_weight_shape: torch.Size | None) -> None:
    """Re-derive a standard module's size attributes from its (new) tensors."""
    w = mod._parameters.get("weight")
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.modules.conv._ConvNd):
        old_out = mod.out_channels
        out_per_group = old_out // mod.groups
        if mod.groups > 1 and old_weight_shape is not None and w.shape[1] == old_weight_shape[1]:
            # whole groups removed (depthwise: one channel per group)
            mod.groups = w.shape[0] // out_per_group
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else mod._buffers.get("running_mean")
        mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.LayerNorm) and w is not None:
        mod.normalized_shape = tuple(w.shape)
    elif isinstance(mod, nn.GroupNorm) and w is not None:
        per_group = mod.num_channels // mod.num_groups
        mod.num_channels = w.shape[0]
        mod.num_groups = w.shape[0] // per_group
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = w.shape
    elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and w is not None:
        # transformers' GPT-2 Conv1D: weight [in, out]; forward reshapes by `nf`
        mod.nx, mod.nf = w.shape
