"""The float64 oracle of the tree far field: docs/contract.md, section 3.1, in the plainest code.

Independent of `sparseball.tree.levels`: tokens are listed as slot ranges straight from the
contract's definition, a token's children are the tokens of the level below whose ranges lie
inside its own, and the descent is a loop over groups and heads. Small inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ops import _attention, _f64

__all__ = ["Token", "tokens_of", "far_field_tokens", "far_field_select", "far_field_attention",
           "frontier_importance"]


@dataclass(frozen=True)
class Token:
    level: int
    cloud: int
    start: int  # slot range [start, end)
    end: int


def tokens_of(tree, compress_size: int, fanout: int, top_blocks: int) -> list[Token]:
    """Every token, numbered as the contract says: level by level, then cloud, then j."""
    offsets = tree.offsets_list
    levels, level = [], 0
    while True:
        size = compress_size * fanout**level
        blocks = [Token(level, b, start, min(start + size, offsets[b + 1]))
                  for b in range(len(offsets) - 1)
                  for start in range(offsets[b], offsets[b + 1], size)]
        levels.append(blocks)
        per_cloud = [sum(1 for t in blocks if t.cloud == b) for b in range(len(offsets) - 1)]
        if max(per_cloud, default=0) <= top_blocks:
            return [t for blocks in levels for t in blocks]
        level += 1


def _members(tree, tokens: list[Token]) -> torch.Tensor:
    """bool `(T, M)`: the real slots of each token."""
    slot = torch.arange(tree.num_slots)
    start = torch.tensor([t.start for t in tokens])[:, None]
    end = torch.tensor([t.end for t in tokens])[:, None]
    return (slot[None, :] >= start) & (slot[None, :] < end) & tree.mask.cpu()[None, :]


def counts_and_centers(tree, tokens: list[Token]) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 `(T,)` real slots and `(T, dim)` mean real position (0 if none), computed in
    float64 and rounded to the tree's position dtype (returned as float64)."""
    member = _members(tree, tokens)
    count = member.sum(1)
    center = (member.double() @ _f64(tree.pos.cpu())) / count.clamp(min=1)[:, None]
    # Rounded once to the positions' dtype, as the tree keeps its centers.
    return count, center.to(tree.pos.dtype).double()


def _children(tokens: list[Token], u: int) -> list[int]:
    parent = tokens[u]
    return [w for w, t in enumerate(tokens) if t.level == parent.level - 1
            and t.cloud == parent.cloud and parent.start <= t.start and t.end <= parent.end]


def far_field_tokens(x_cmp, tree, compress_size, fanout, top_blocks) -> torch.Tensor:
    """float64 `(T, H, D)`: level 0 is `x_cmp` as given; a token above is the count-weighted
    mean of the level-0 tokens inside it (0 without a real slot)."""
    tokens = tokens_of(tree, compress_size, fanout, top_blocks)
    count, _ = counts_and_centers(tree, tokens)
    base = [w for w, t in enumerate(tokens) if t.level == 0]
    inside = torch.tensor([[tokens[w].cloud == t.cloud and t.start <= tokens[w].start
                            and tokens[w].end <= t.end for w in base] for t in tokens])
    weight = inside.double() * count[base].double()[None, :]
    total = torch.einsum("uw,whd->uhd", weight, _f64(x_cmp))
    above = total[len(base):] / count[len(base):].clamp(min=1).double()[:, None, None]
    return torch.cat([_f64(x_cmp), above])


def _logits(q, k_tok, tree, center, count, sigma, scale) -> torch.Tensor:
    """float64 `(M, H, T)`: `z(i, u) = scale q_i . k(u) + sigma[h] ||p_i - center(u)|| +
    log n(u)`."""
    logits = scale * torch.einsum("ihd,uhd->ihu", _f64(q), _f64(k_tok))
    if sigma is not None:
        distance = (_f64(tree.pos.cpu())[:, None, :] - center[None, :, :]).norm(dim=-1)
        logits = logits + _f64(sigma)[None, :, None] * distance[:, None, :]
    return logits + torch.log(count.double().clamp(min=1))[None, None, :]


def frontier_importance(z: torch.Tensor, real_query: torch.Tensor) -> torch.Tensor:
    """float64 `(F,)`: importance of each frontier token given the logits `z` `(g, F)` of the
    group's queries, summed over the real ones (`real_query` bool `(g,)`)."""
    prob = torch.exp(z - torch.logsumexp(z, dim=1, keepdim=True))
    return prob[real_query].sum(0)


@torch.no_grad()
def far_field_select(q, k_tok, tree, compress_size, fanout, top_blocks, group_size, top_k,
                     sigma, scale):
    """int32 `selected` `(M/g, H, top_k)` and `cut` `(M/g, H, max_cut)`, as the contract's
    descent defines them, and the list of frontiers (for tests)."""
    tokens = tokens_of(tree, compress_size, fanout, top_blocks)
    count, center = counts_and_centers(tree, tokens)
    logits = _logits(q, k_tok, tree, center, count, sigma, scale)
    top = max(t.level for t in tokens)
    f, K = fanout, top_k
    top_per_cloud = max(sum(1 for t in tokens if t.level == top and t.cloud == b)
                        for b in range(tree.num_clouds))
    max_cut = max(0, top_per_cloud - K) + top * K * (f - 1)
    num_groups, heads = tree.num_slots // group_size, q.shape[1]
    selected = torch.full((num_groups, heads, K), -1, dtype=torch.int32)
    cut = torch.full((num_groups, heads, max_cut), -1, dtype=torch.int32)
    mask = tree.mask.cpu()
    slot_cloud = tree.slot_cloud.cpu()
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        cloud = int(slot_cloud[g * group_size])
        for h in range(heads):
            frontier = [u for u, t in enumerate(tokens)
                        if t.level == top and t.cloud == cloud and count[u] > 0]
            left = []
            for level in range(top, -1, -1):
                importance = frontier_importance(logits[rows, h][:, frontier], mask[rows])
                ranked = sorted(range(len(frontier)),
                                key=lambda a, imp=importance: (-float(imp[a]), frontier[a]))
                expanded = sorted(frontier[a] for a in ranked[:K])
                left += [u for u in frontier if u not in expanded]
                if level > 0:
                    frontier = sorted(w for u in expanded for w in _children(tokens, u)
                                      if count[w] > 0)
            selected[g, h, :len(expanded)] = torch.tensor(expanded, dtype=torch.int32)
            cut[g, h, :len(left)] = torch.tensor(sorted(left), dtype=torch.int32)
    return selected.to(tree.device), cut.to(tree.device)


def far_field_attention(q, k_tok, v_tok, tree, compress_size, fanout, top_blocks, cut,
                        group_size, sigma, scale) -> torch.Tensor:
    """float64 `(M, H, D)`: every query of group g attends, per head, to the tokens `cut[g, h]`
    with logits `z(i, u)`."""
    tokens = tokens_of(tree, compress_size, fanout, top_blocks)
    count, center = counts_and_centers(tree, tokens)
    logits = _logits(q, k_tok, tree, center, count, sigma, scale)
    cut = cut.cpu().long()
    allowed = torch.zeros(cut.shape[0], cut.shape[1], len(tokens) + 1, dtype=torch.bool)
    allowed.scatter_(2, torch.where(cut >= 0, cut, len(tokens)), True)
    allowed = allowed[..., :-1].repeat_interleave(group_size, dim=0)          # (M, H, T)
    out, _ = _attention(logits, allowed, v_tok)
    return out
