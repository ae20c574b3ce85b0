"""The float64 oracle of the attention ops: docs/contract.md, section 3, in the plainest code.

Every op builds an explicit boolean matrix of which key each query may use and evaluates the
contract's formula on all (query, key) pairs at once, in float64. It is dense, O(M^2), and
meant for small inputs only. Gradients come from plain autograd, so tests get the oracle's
gradients by calling `backward`. Inputs must be finite (padding invariance is a property
of the backends, tested there).

The functions take the arguments of `sparseball.backends.torch.ops` (`scale` a float, `sigma`
None or `(H,)`) and return float64 (`select_blocks`: int32 ids; `compressed_attention`'s lse:
float32 as the contract says).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "compress",
    "ball_attention",
    "compressed_attention",
    "select_blocks",
    "selection_attention",
    "ball_key_mask",
    "compressed_key_mask",
    "selection_key_mask",
    "block_importance",
    "selection_candidates",
]


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def _slots(tree) -> torch.Tensor:
    return torch.arange(tree.num_slots, device=tree.device)


def _block_has_real_slot(tree, size: int) -> torch.Tensor:
    """bool `(M/size,)`: which aligned `size`-blocks hold a real slot."""
    return tree.mask.reshape(-1, size).any(1)


# Key sets


def ball_key_mask(tree, ball_size: int) -> torch.Tensor:
    """bool `(M, M)`: query slot i may use key slot j (same aligned ball, j real)."""
    slot = _slots(tree)
    same_ball = (slot[:, None] // ball_size) == (slot[None, :] // ball_size)
    return same_ball & tree.mask[None, :]


def compressed_key_mask(tree, compress_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """bool `(M, M/c)`: query slot i may use compressed block u (same cloud, u has a real slot);
    only the query slots `rows` (int64) when given."""
    query_cloud = tree.slot_cloud if rows is None else tree.slot_cloud[rows]
    block_cloud = tree.slot_cloud[::compress_size]
    same_cloud = query_cloud[:, None] == block_cloud[None, :]
    return same_cloud & _block_has_real_slot(tree, compress_size)[None, :]


def selection_key_mask(tree, indices: torch.Tensor, select_size: int,
                       group_size: int) -> torch.Tensor:
    """bool `(M, H, M)`: query i may use key slot j for head h (j real, j's block selected by
    i's group for head h)."""
    num_groups, heads, _ = indices.shape
    num_blocks = tree.num_slots // select_size
    selected = torch.zeros(num_groups, heads, num_blocks, dtype=torch.bool, device=tree.device)
    for group in range(num_groups):
        for head in range(heads):
            for block in indices[group, head].tolist():
                if block >= 0:
                    selected[group, head, block] = True
    slot = _slots(tree)
    per_query = selected[slot // group_size]                       # (M, H, blocks)
    per_key = per_query[:, :, slot // select_size]                 # (M, H, M)
    return per_key & tree.mask[None, None, :]


# Dense attention


def _logits(q, k, q_pos, k_pos, sigma, scale) -> torch.Tensor:
    """float64 `(Mq, H, Mk)`: `scale * q_i . k_j + sigma[h] * ||p_i - p_j||`."""
    logits = scale * torch.einsum("ihd,jhd->ihj", _f64(q), _f64(k))
    if sigma is not None:
        distance = (_f64(q_pos)[:, None, :] - _f64(k_pos)[None, :, :]).norm(dim=-1)
        logits = logits + _f64(sigma)[None, :, None] * distance[:, None, :]
    return logits


def _attention(logits: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor):
    """Softmax of `logits` `(Mq, H, Mk)` over the `allowed` keys, applied to `v` `(Mk, H, D)`.

    Returns the output `(Mq, H, D)` and the log-sum-exp `(Mq, H)`; a query without keys gets
    output 0 and lse -inf.
    """
    allowed = allowed.expand_as(logits)
    has_key = allowed.any(-1)
    logits = torch.where(allowed, logits, -math.inf)
    shift = torch.where(has_key, logits.amax(-1), 0).detach()
    weight = torch.where(allowed, torch.exp(logits - shift[..., None]), 0)
    total = weight.sum(-1)
    out = torch.einsum("ihj,jhd->ihd", weight, _f64(v)) / torch.where(has_key, total, 1)[..., None]
    lse = shift + torch.log(total)
    return out, lse


# The ops


def compress(x: torch.Tensor, tree, compress_size: int) -> torch.Tensor:
    """`(M/c, H, D)`: the mean of `x` over the real slots of each aligned block (0 if none)."""
    slot = _slots(tree)
    blocks = torch.arange(tree.num_slots // compress_size, device=tree.device)
    member = (slot[None, :] // compress_size == blocks[:, None]) & tree.mask[None, :]
    total = torch.einsum("uj,jhd->uhd", _f64(member), _f64(x))
    count = member.sum(1)
    return total / count.clamp(min=1)[:, None, None]


def ball_attention(q, k, v, tree, ball_size, sigma, scale) -> torch.Tensor:
    """`(M, H, D)`: each slot attends to the real slots of its aligned `ball_size`-block."""
    logits = _logits(q, k, tree.pos, tree.pos, sigma, scale)
    out, _ = _attention(logits, ball_key_mask(tree, ball_size)[:, None, :], v)
    return out


def compressed_attention(q, k_cmp, v_cmp, tree, compress_size, sigma, scale):
    """Output `(M, H, D)` and float32 lse `(M, H)` (no gradient): each slot attends to the
    compressed blocks (with a real slot) of its cloud."""
    logits = _logits(q, k_cmp, tree.pos, tree.centers(compress_size), sigma, scale)
    out, lse = _attention(logits, compressed_key_mask(tree, compress_size)[:, None, :], v_cmp)
    return out, lse.detach().float()


def selection_attention(q, k, v, tree, indices, select_size, group_size, sigma, scale):
    """`(M, H, D)`: each query attends, per head, to the real slots of its group's blocks."""
    logits = _logits(q, k, tree.pos, tree.pos, sigma, scale)
    allowed = selection_key_mask(tree, indices, select_size, group_size)
    out, _ = _attention(logits, allowed, v)
    return out


@torch.no_grad()
def block_importance(q, k_cmp, lse, tree, compress_size, select_size, group_size, sigma,
                     scale, groups: torch.Tensor | None = None) -> torch.Tensor:
    """float64 `(M/group_size, H, M/select_size)`: importance of each selection block for each
    group, `sum over real queries i of the group, over compressed blocks u inside the block
    with a real slot (and in i's cloud), of exp(logit(i, u) - lse[i])`. Only for the group ids
    `groups` (int64), in their order, when given: a large tree a few groups at a time."""
    c, s, g = compress_size, select_size, group_size
    if groups is None:
        groups = torch.arange(tree.num_slots // g, device=tree.device)
    rows = (groups[:, None] * g + torch.arange(g, device=tree.device)).flatten()
    logits = _logits(q[rows], k_cmp, tree.pos[rows], tree.centers(c), sigma, scale)
    allowed = compressed_key_mask(tree, c, rows)[:, None, :] & tree.mask[rows, None, None]
    prob = torch.where(allowed, torch.exp(logits - _f64(lse[rows])[:, :, None]), 0)
    # A group is g consecutive slots and a selection block s/c consecutive compressed blocks.
    heads = prob.shape[1]
    return prob.view(len(groups), g, heads, tree.num_slots // s, s // c).sum((1, 4))


def selection_candidates(tree, select_size, group_size, exclude_ball_size) -> torch.Tensor:
    """bool `(M/group_size, M/select_size)`: the blocks group g may select (its cloud's blocks
    with a real slot, minus those inside the group's aligned `max(exclude_ball_size,
    group_size)`-block)."""
    s, g = select_size, group_size
    block_start = torch.arange(0, tree.num_slots, s, device=tree.device)
    group_start = torch.arange(0, tree.num_slots, g, device=tree.device)
    cloud = tree.slot_cloud
    candidate = (cloud[group_start][:, None] == cloud[block_start][None, :]) \
        & _block_has_real_slot(tree, s)[None, :]
    if exclude_ball_size is not None:
        e = max(exclude_ball_size, g)
        # Block [start, start + s) lies inside the aligned e-block of the group when both
        # ends fall in it; a block larger than e never does.
        inside = ((block_start[None, :] // e == group_start[:, None] // e)
                  & ((block_start[None, :] + s - 1) // e == group_start[:, None] // e))
        candidate &= ~inside
    return candidate


@torch.no_grad()
def select_blocks(q, k_cmp, lse, tree, compress_size, select_size, group_size, top_k, sigma,
                  scale, exclude_ball_size) -> torch.Tensor:
    """int32 `(M/group_size, H, top_k)`: per group and head the `top_k` candidates of largest
    importance (ties to the lower id), ascending, then -1."""
    importance = block_importance(q, k_cmp, lse, tree, compress_size, select_size, group_size,
                                  sigma, scale)
    candidate = selection_candidates(tree, select_size, group_size, exclude_ball_size)
    num_groups, heads, _ = importance.shape
    out = torch.full((num_groups, heads, top_k), -1, dtype=torch.int32)
    for group in range(num_groups):
        blocks = torch.nonzero(candidate[group]).flatten().tolist()
        for head in range(heads):
            score = importance[group, head].tolist()
            best = sorted(blocks, key=lambda w, score=score: (-score[w], w))[:top_k]
            for place, block in enumerate(sorted(best)):
                out[group, head, place] = block
    return out.to(tree.device)
