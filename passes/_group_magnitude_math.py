"""Group magnitude scores (pure tensor maths, no model).

Channel c of a group owns, in every slice, the indices `slice.index[c]` along `slice.axis` of a
tensor. Its score is the L2 norm of every weight it owns, over all the tensors of the group:

    s_c = sqrt( sum_slices || T_slice[..., index[c], ...] ||^2 )

(Torch-Pruning's GroupMagnitudeImportance with p = 2 and a sum over the group; SPA's group-level
transfer of a per-weight criterion.) Where a square tensor's rows and columns are both in the group
the intersection is counted twice; that only reweights channels of the same group evenly.
"""

from __future__ import annotations

from typing import Mapping

import torch

from slimc.compiler.groups import Group


def group_channel_norms(group: Group, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[group.size] float64 L2 norm of all the weights each channel of `group` owns."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for s in group.slices:
        t = tensors[s.param].detach().to(torch.float64)
        axis = s.axis % t.dim()
        picked = t.index_select(axis, s.index.reshape(-1).to(t.device)).movedim(axis, 0)
        total += picked.reshape(group.size, -1).pow(2).sum(1).cpu()
    return total.sqrt()
