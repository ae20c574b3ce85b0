"""The descent of the tree far field (docs/contract.md, section 3.1), shared by the backends.

`descend` runs the level loop of `far_field_select` for a batch of query groups: the top-k
with its tie rule (a stable sort), the expansion into children, the cut and its compaction.
Only the importance of each frontier block at each level depends on how a backend computes
attention, so it comes in as a function: the torch backend gathers keys and forms the
logits with torch ops, the Triton backend runs a kernel. Plain torch: importing this module
imports no backend's kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# importance(frontier, valid) -> (G, H, W): for the token numbers `frontier` (G, H, W) of each
# group and head (-1: none) and which of them are `valid` (a token with a real slot), the sum
# over the group's real queries of exp(z - lse_F), lse_F the log-sum-exp of the query's logits
# over the valid frontier. Entries that are not valid may hold anything.
Importance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def descend(frontier: torch.Tensor, real: torch.Tensor, levels, top_k: int,
            importance: Importance) -> tuple[torch.Tensor, torch.Tensor]:
    """`far_field_select` for G groups: from the level-L tokens `frontier` `(G, H, W_L)` of
    each group's cloud (-1 after), and `real` bool `(T,)` (tokens with a real slot). Returns
    int32 `selected` `(G, H, top_k)` and `cut` `(G, H, levels.max_cut(top_k))`, ascending,
    then -1."""
    K = top_k
    big = levels.num_tokens
    left = []
    for level in range(levels.top_level, -1, -1):
        valid = (frontier >= 0) & real[frontier.clamp(min=0)]
        score = importance(frontier, valid).masked_fill(~valid, -math.inf)       # (G, H, W)
        # A stable sort keeps equal importances in frontier order, which is ascending token
        # order: ties go to the lower token number.
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :K]
        kept = valid.gather(-1, order)
        expanded = torch.zeros_like(valid).scatter_(-1, order, kept)
        left.append(torch.where(valid & ~expanded, frontier, -1))
        # The expanded tokens in ascending order, -1 after.
        chosen = torch.sort(torch.where(kept, frontier.gather(-1, order), big), dim=-1).values
        chosen = torch.where(chosen < big, chosen, -1)
        if level == 0:
            selected = chosen
            break
        children = levels.children[level - 1]
        local = (chosen - levels.level_start[level]).clamp(min=0)
        frontier = torch.where(chosen[..., None] >= 0, children[local], -1).flatten(2)
    if selected.shape[-1] < K:
        selected = torch.nn.functional.pad(selected, (0, K - selected.shape[-1]), value=-1)
    width = levels.max_cut(K)
    cut = torch.cat(left, dim=-1)
    cut = torch.sort(torch.where(cut >= 0, cut, big), dim=-1).values[..., :width]
    cut = torch.where(cut < big, cut, -1)
    if cut.shape[-1] < width:
        cut = torch.nn.functional.pad(cut, (0, width - cut.shape[-1]), value=-1)
    return selected.to(torch.int32), cut.to(torch.int32)


def top_frontier(levels, group_cloud: torch.Tensor, heads: int) -> torch.Tensor:
    """The first frontier `(G, heads, T_L)`: the level-L tokens of each group's cloud."""
    return levels.top_tokens[group_cloud][:, None, :].expand(-1, heads, -1)


def group_chunks(num_groups: int, heads: int, levels, top_k: int, per_group: int,
                 budget: int) -> list[tuple[int, int]]:
    """Ranges `[g0, g1)` of groups whose descent holds at most about `budget` elements: each
    group holds `heads * widest frontier * per_group` of them."""
    widest = max(levels.max_top, top_k * levels.fanout, 1)
    groups = max(1, budget // (heads * widest * per_group))
    return [(g0, min(num_groups, g0 + groups)) for g0 in range(0, num_groups, groups)]
