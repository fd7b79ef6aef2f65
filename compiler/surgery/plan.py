"""Plans: `{Group: channels to remove}`, checked and turned into per-tensor removals for either surgery."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch

from slimc.compiler.groups import Group, channels
from slimc.errors import SlimcError


def removals(plan: Mapping[Group, Sequence[int]]) -> dict[str, dict[int, torch.Tensor]]:
    """param -> axis -> sorted unique indices to remove, the union over all groups.

    A plan that names an unprunable group, an index outside a group, or leaves a group a kept size
    that is not a multiple of its `multiple_of` is a `SlimcError`.
    """
    acc: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for group, chans in plan.items():
        ch = channels(chans)
        if ch.numel() == 0:
            continue
        if not group.prunable:
            raise SlimcError(f"group {group.name} is not prunable: {group.reason}")
        if int(ch.min()) < 0 or int(ch.max()) >= group.size:
            bad = int(ch.min()) if int(ch.min()) < 0 else int(ch.max())
            raise SlimcError(f"group {group.name} has {group.size} channels; plan asks for index {bad}")
        kept = group.size - ch.numel()
        if group.multiple_of > 1 and kept % group.multiple_of:
            # e.g. grouped_mm's 16-byte strides: the model would no longer run, so refuse before cutting
            raise SlimcError(f"group {group.name} must keep a multiple of {group.multiple_of} of its {group.size} channels; "
                             f"the plan keeps {kept}")
        for s in group.slices:
            acc[s.param][s.axis].append(s.rows(ch))
    return {p: {a: torch.unique(torch.cat(v)) for a, v in axes.items()} for p, axes in acc.items()}
