"""Second moments H = E[x x^T] of the inputs of linear and convolution layers, from calibration batches.

`input_hessians(module, layers, batches)` runs `module` on every batch (eval mode, no gradients) with a
forward pre-hook on each named layer and accumulates, in float64:

- `nn.Linear` (or any module whose weight is [out, in] and whose input's last axis is `in`): x over
  every leading position (batch, tokens), H [in, in];
- `nn.Conv1d/2d/3d` with groups == 1: the unfolded input patches (`torch.nn.functional.unfold` with the
  layer's kernel, stride, padding and dilation; 1-D and 3-D via reshapes are not supported and are
  skipped), channel-major columns [cin * prod(kernel)], so input channel c owns the columns
  c*k .. (c+1)*k - 1, matching `weight.reshape(out, -1)`.

H is the mean over all rows seen (a sum and a count, so batches of any size combine exactly).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn


def _rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str):
            return None
        cols = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [B * L, cin * kh * kw]
    if isinstance(layer, nn.Linear) or (hasattr(layer, "weight") and getattr(layer, "weight") is not None
                                        and layer.weight.dim() == 2 and x.shape[-1] == layer.weight.shape[1]):
        return x.reshape(-1, x.shape[-1])
    return None


def _forward(module: nn.Module, batch: Any, call: Callable[[nn.Module, Any], Any] | None) -> None:
    """Run `module` on one calibration batch: `call(module, batch)`, else `module(**batch)` for a dict and
    `module(batch[0])` for a tuple or list."""
    if call is not None:
        call(module, batch)
    elif isinstance(batch, Mapping):
        module(**batch)
    else:
        module(batch[0] if isinstance(batch, (tuple, list)) else batch)


def input_hessians(module: nn.Module, layers: Iterable[str], batches: Iterable[Any],
                   call: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """{layer path: H} for the named sub-modules of `module` over `batches` (each passed to `call(module, batch)`,
    by default `module(batch[0])` for tuples and `module(**batch)` for dicts). Layers of a kind not
    supported (see the module docstring) are left out of the result."""
    subs = dict(module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    skipped: set[str] = set()
    handles = []

    def hook_for(name: str, layer: nn.Module):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            rows = _rows(layer, x.detach())
            if rows is None:
                skipped.add(name)
                return
            rows = rows.to(torch.float64)
            gram = rows.T @ rows
            sums[name] = gram if name not in sums else sums[name] + gram
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return hook

    for name in layers:
        if name in subs:
            handles.append(subs[name].register_forward_pre_hook(hook_for(name, subs[name]), with_kwargs=True))
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _forward(module, batch, call)
    finally:
        for h in handles:
            h.remove()
        module.train(was)
    return {n: sums[n] / counts[n] for n in sums if n not in skipped and counts.get(n)}


class _Captured(Exception):
    """Raised by a capturing hook to end a forward pass once the layer's input is recorded."""


def paired_input_moments(reference: nn.Module, model: nn.Module, layer: str, batches: Iterable[Any],
                         call: Callable[[nn.Module, Any], Any] | None = None, bias: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(H, C) for refitting `layer` of `model` to reproduce `reference`'s same layer: H = E[x' x'^T] of the layer's
    input in `model` and C = E[x' x^T] with x the reference's input on the same batch (rows as in `input_hessians`).
    With `bias`, a constant 1 is appended to both (the refit then also sets the layer's bias). None when the
    layer is of a kind not supported."""
    ref_layer, layer_mod = dict(reference.named_modules()).get(layer), dict(model.named_modules()).get(layer)
    if ref_layer is None or layer_mod is None:
        return None
    seen: dict[str, torch.Tensor | None] = {}

    def grab(key: str, mod: nn.Module):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[key] = _rows(mod, x.detach())
            raise _Captured  # what follows the layer is not needed: stop the forward here
        return hook

    h1 = ref_layer.register_forward_pre_hook(grab("ref", ref_layer), with_kwargs=True)
    h2 = layer_mod.register_forward_pre_hook(grab("new", layer_mod), with_kwargs=True)
    H = C = None
    n = 0
    modes = (reference.training, model.training)
    reference.eval()
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                for net in (reference, model):
                    try:
                        _forward(net, batch, call)
                    except _Captured:
                        pass
                x, xp = seen.get("ref"), seen.get("new")
                if x is None or xp is None:
                    return None
                x, xp = x.to(torch.float64), xp.to(torch.float64)
                if bias:
                    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
                    x, xp = torch.cat([x, ones], 1), torch.cat([xp, ones], 1)
                H = xp.T @ xp if H is None else H + xp.T @ xp
                C = xp.T @ x if C is None else C + xp.T @ x
                n += x.shape[0]
    finally:
        h1.remove()
        h2.remove()
        reference.train(modes[0])
        model.train(modes[1])
    return (H / n, C / n) if n else None
