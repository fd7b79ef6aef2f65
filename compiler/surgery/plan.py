"""Plans: `{Group: channels to remove}`, checked and turned into per-tensor removals for either surgery."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch

from slimc.compiler.groups import Group, channels
from slimc.errors import SlimcError


def removals(plan: Mapping[Group, Sequence[int]]) -> dict[str, dict[int, torch.Tensor]]:
    """param -> axis -> sorted unique indices to remove, the union over all groups."""
    acc: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for group, chans in plan.items():
        ch = channels(chans)
        if ch.numel() == 0:
            continue
        if not group.prunable:
            raise SlimcError(f"group {group.name} is not prunable: {group.reason}")
        if int(ch.min()) < 0 or int(ch.max()) >= group.size:
            raise SlimcError(f"group {group.name} has {group.size} channels; plan asks for index {int(ch.max())}")
        for s in group.slices:
            acc[s.param][s.axis].append(s.rows(ch))
    return {p: {a: torch.unique(torch.cat(v)) for a, v in axes.items()} for p, axes in acc.items()}
