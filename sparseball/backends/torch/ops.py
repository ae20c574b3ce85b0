"""The pure-PyTorch backend: every op of docs/contract.md, section 3, on CPU and CUDA.

Inputs arrive validated by `sparseball.ops`. Half-precision inputs (float16, bfloat16) are
computed in float32 and the outputs cast back; float32 and float64 are computed as they come.
Backward is plain autograd.

Memory stays linear in M: no O(M^2) tensor ever exists. Queries are processed in chunks
(whole balls, whole query groups, or query rows of whole clouds) of about `CHUNK_ELEMENTS`
score elements each, and when a gradient is needed each chunk runs under
`torch.utils.checkpoint`, so the backward pass recomputes one chunk's scores at a time instead
of keeping every chunk's alive.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ...tree.levels import sum_children
from ..descent import descend, group_chunks, top_frontier

__all__ = [
    "compress",
    "ball_attention",
    "compressed_attention",
    "select_blocks",
    "selection_attention",
    "far_field_tokens",
    "far_field_select",
    "far_field_attention",
]

# Budget of one chunk, in score elements (query-key pairs times heads, plus the gathered keys
# and values of selection attention). 2^26 float32 scores are 256 MiB, and a chunk holds a few
# tensors of that size while it runs: small on a GPU, large enough that kernels stay busy.
# Tests lower it to exercise the chunking on small inputs.
CHUNK_ELEMENTS = 1 << 26


# The ops


def compress(x: torch.Tensor, tree, compress_size: int) -> torch.Tensor:
    """Mean of `x` `(M, H, D)` over the real slots of each aligned block -> `(M/c, H, D)`."""
    c = compress_size
    real = tree.mask.view(-1, c, 1, 1)
    blocks = x.reshape(-1, c, *x.shape[1:])
    # `where`, not a multiplication by the mask: padding slots may hold anything, even NaN.
    total = torch.where(real, blocks, 0).sum(1, dtype=_compute_dtype(x.dtype))
    count = real.sum(1)
    return (total / count.clamp(min=1)).to(x.dtype)


def ball_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree, ball_size: int,
                   sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Each slot attends to the real slots of its aligned `ball_size`-block.

    `q`, `k`, `v` are `(M, H, D)`; returns `(M, H, D)`.
    """
    b = ball_size
    _, H, D = q.shape
    compute = _compute_dtype(q.dtype)
    blocks = max(1, CHUNK_ELEMENTS // (H * b * (b + 2 * D)))
    rows = blocks * b
    pos = None if sigma is None else tree.pos.to(compute)
    sig = None if sigma is None else sigma.to(compute)
    outs = [
        _run_chunk(_ball_chunk, q_c, k_c, v_c, mask_c, pos_c, sig,
                   ball_size=b, scale=scale, compute=compute)
        for q_c, k_c, v_c, mask_c, pos_c in zip(
            q.split(rows), k.split(rows), v.split(rows), tree.mask.split(rows),
            _split_or_none(pos, rows, len(range(0, q.shape[0], rows))), strict=True)
    ]
    return torch.cat(outs)


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, tree,
                         compress_size: int, sigma: torch.Tensor | None,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot attends to the compressed blocks (with a real slot) of its cloud.

    `q` is `(M, H, D)`, `k_cmp` and `v_cmp` are `(M/c, H, D)`. Returns the output `(M, H, D)` and
    the detached float32 log-sum-exp of the logits `(M, H)`.
    """
    c = compress_size
    _, H, _ = q.shape
    compute = _compute_dtype(q.dtype)
    real_block = tree.mask.view(-1, c).any(1)
    # Keys are shared by every chunk of a cloud: cast and lay them out head-major once, so that
    # their gradient also accumulates in the compute dtype across chunks.
    keys = _head_major(k_cmp, real_block, compute)
    values = _head_major(v_cmp, real_block, compute)
    sig = None if sigma is None else sigma.to(compute)
    pos = None if sigma is None else tree.pos.to(compute)
    centers = None if sigma is None else tree.centers(c).to(compute)
    cloud = tree.slot_cloud
    chunks = _cloud_chunks(tree.offsets_list, H, c, align=1)
    outs, lses = [], []
    for (q0, q1, k0, k1), q_c in zip(chunks, q.split([q1 - q0 for q0, q1, _, _ in chunks]),
                                     strict=True):
        keys_c = slice(k0 // c, k1 // c)
        out, lse = _run_chunk(
            _compressed_chunk, q_c, keys[:, keys_c], values[:, keys_c], sig,
            None if pos is None else pos[q0:q1], None if centers is None else centers[keys_c],
            cloud[q0:q1], cloud[k0:k1:c], real_block[keys_c], scale=scale, compute=compute)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses).detach()


@torch.no_grad()
def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, tree,
                  compress_size: int, select_size: int, group_size: int, top_k: int,
                  sigma: torch.Tensor | None, scale: float,
                  exclude_ball_size: int | None) -> torch.Tensor:
    """The `top_k` most important `select_size`-blocks of each query group's cloud.

    `q` is `(M, H, D)`, `k_cmp` `(M/c, H, D)`, `lse` `(M, H)` float32. Returns int32
    `(M/group_size, H, top_k)`: block ids in ascending order, then -1.
    """
    c, s, g = compress_size, select_size, group_size
    _, H, _ = q.shape
    compute = _compute_dtype(q.dtype)
    real_block = tree.mask.view(-1, c).any(1)
    real_select = tree.mask.view(-1, s).any(1)
    keys = _head_major(k_cmp, real_block, compute)
    sig = None if sigma is None else sigma.to(compute)
    pos = None if sigma is None else tree.pos.to(compute)
    centers = None if sigma is None else tree.centers(c).to(compute)
    cloud = tree.slot_cloud
    # Blocks inside the group's aligned `exclude`-block are covered by the ball branch; a
    # selection block larger than that block is never inside it.
    exclude = None if exclude_ball_size is None else max(exclude_ball_size, g)
    if exclude is not None and s > exclude:
        exclude = None
    device = q.device
    picked = []
    for q0, q1, k0, k1 in _cloud_chunks(tree.offsets_list, H, c, align=g):
        keys_c = slice(k0 // c, k1 // c)
        logits = _compressed_logits(
            q[q0:q1], keys[:, keys_c], sig, None if pos is None else pos[q0:q1],
            None if centers is None else centers[keys_c], scale, compute)
        allowed = (tree.mask[q0:q1, None] & real_block[None, keys_c]
                   & (cloud[q0:q1, None] == cloud[None, k0:k1:c]))
        # `where`: the lse of a padding query may be anything, and it must not count.
        prob = torch.where(allowed, torch.exp(logits - lse[q0:q1].T.to(compute)[:, :, None]), 0)
        importance = (prob.view(H, (q1 - q0) // g, g, -1).sum(2)
                      .view(H, (q1 - q0) // g, (k1 - k0) // s, s // c).sum(3)
                      .transpose(0, 1))                                  # (groups, H, blocks)
        group_start = torch.arange(q0, q1, g, device=device)
        block_start = torch.arange(k0, k1, s, device=device)
        candidate = (real_select[None, k0 // s:k1 // s]
                     & (cloud[q0:q1:g, None] == cloud[None, k0:k1:s]))
        if exclude is not None:
            candidate &= (block_start[None, :] // exclude) != (group_start[:, None] // exclude)
        picked.append(_top_blocks(importance, candidate, top_k, first_block=k0 // s))
    return torch.cat(picked)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree,
                        indices: torch.Tensor, select_size: int, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Each query of group g attends, per head, to the real slots of the blocks `indices[g, h]`.

    `q`, `k`, `v` are `(M, H, D)`, `indices` int32 `(M/group_size, H, top_k)` with -1 for none.
    Returns `(M, H, D)`.
    """
    s, g = select_size, group_size
    _, H, D = q.shape
    top_k = indices.shape[-1]
    compute = _compute_dtype(q.dtype)
    # Every chunk gathers from all of k and v: cast them once, so that the gradients of keys
    # picked by many groups accumulate in the compute dtype rather than in half precision.
    keys, values = k.to(compute), v.to(compute)
    sig = None if sigma is None else sigma.to(compute)
    pos = None if sigma is None else tree.pos.to(compute)
    groups = max(1, CHUNK_ELEMENTS // (H * top_k * s * (g + 2 * D)))
    num_chunks = len(range(0, indices.shape[0], groups))
    outs = [
        _run_chunk(_selection_chunk, q_c, keys, values, idx_c, tree.mask, pos_c, pos, sig,
                   select_size=s, group_size=g, scale=scale, compute=compute)
        for q_c, idx_c, pos_c in zip(q.split(groups * g), indices.split(groups),
                                     _split_or_none(pos, groups * g, num_chunks), strict=True)
    ]
    return torch.cat(outs)


# The tree far field (docs/contract.md, section 3.1)


def far_field_tokens(x_cmp: torch.Tensor, tree, levels) -> torch.Tensor:
    """Tokens of every level `(T, H, D)` from the level-0 ones `x_cmp` `(M/c, H, D)`: each
    level's are the count-weighted means of its children's, formed in the compute dtype."""
    compute = _compute_dtype(x_cmp.dtype)
    count = levels.count.to(compute)
    start = levels.level_start
    level_count = count[:start[1], None, None]
    # `where`: a block without a real slot may hold anything (a learned token), even NaN.
    base = x_cmp.to(compute)
    weighted = torch.where(level_count > 0, base * level_count, 0)
    tokens = [base]
    for level, children in enumerate(levels.children, start=1):
        weighted = sum_children(weighted, children, start[level - 1])
        level_count = count[start[level]:start[level + 1], None, None]
        tokens.append(weighted / level_count.clamp(min=1))
    # One cast at the end: the gradient of x_cmp, reached from every level, sums in `compute`.
    return torch.cat(tokens).to(x_cmp.dtype)


@torch.no_grad()
def far_field_select(q: torch.Tensor, k_tok: torch.Tensor, tree, levels, group_size: int,
                     top_k: int, sigma: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The descent: per query group and head, the `top_k` level-0 blocks it selects and the
    cut of tokens that covers the rest of its cloud.

    `q` is `(M, H, D)`, `k_tok` `(T, H, D)`. Returns int32 `selected` `(M/g, H, top_k)` and
    `cut` `(M/g, H, levels.max_cut(top_k))`, ascending, then -1. Groups run in chunks; each
    chunk descends through every level at once for all its groups and heads.
    """
    g, K = group_size, top_k
    M, H, _ = q.shape
    compute = _compute_dtype(q.dtype)
    tokens = _TokenTable(k_tok, None, levels, sigma, compute)
    group_cloud = tree.slot_cloud[::g]
    selected, cut = [], []
    for g0, g1 in group_chunks(M // g, H, levels, K, g + tree.dim + k_tok.shape[-1],
                               CHUNK_ELEMENTS):
        rows = slice(g0 * g, g1 * g)
        importance = _FrontierImportance(q[rows], tree.mask[rows], tree.pos[rows], tokens, g,
                                         scale)
        sel, left = descend(top_frontier(levels, group_cloud[g0:g1], H), tokens.real, levels,
                            K, importance)
        selected.append(sel)
        cut.append(left)
    return torch.cat(selected), torch.cat(cut)


def far_field_attention(q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, tree,
                        levels, cut: torch.Tensor, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Each query of group g attends, per head, to the tokens `cut[g, h]` (-1: none), with
    the log of each token's real-slot count added to its logit. Returns `(M, H, D)`."""
    g = group_size
    _, H, D = q.shape
    compute = _compute_dtype(q.dtype)
    tokens = _TokenTable(k_tok, v_tok, levels, sigma, compute)
    if cut.shape[-1] == 0:  # no cloud is large enough to leave a cut: one empty column
        cut = torch.full((*cut.shape[:2], 1), -1, dtype=cut.dtype, device=cut.device)
    width = cut.shape[-1]
    groups = max(1, CHUNK_ELEMENTS // (H * width * (g + 2 * D)))
    pos = None if sigma is None else tree.pos.to(compute)
    num_chunks = len(range(0, cut.shape[0], groups))
    outs = [
        _run_chunk(_far_field_chunk, q_c, tokens.keys, tokens.values, idx_c, pos_c, tokens.sigma,
                   tokens.centers, tokens.log_count, group_size=g, scale=scale, compute=compute)
        for q_c, idx_c, pos_c in zip(q.split(groups * g), cut.split(groups),
                                     _split_or_none(pos, groups * g, num_chunks), strict=True)
    ]
    return torch.cat(outs)


class _TokenTable:
    """What the far-field ops gather per token, cast once to the compute dtype: keys, values,
    the log of the real-slot counts (the logit term that makes a token weigh as its points),
    centers and sigma for the distance bias."""

    def __init__(self, k_tok, v_tok, levels, sigma, compute):
        self.keys = k_tok.to(compute)
        self.values = None if v_tok is None else v_tok.to(compute)
        self.log_count = torch.log(levels.count.clamp(min=1).to(compute))
        self.real = levels.count > 0
        self.sigma = None if sigma is None else sigma.to(compute)
        self.centers = None if sigma is None else levels.center.to(compute)

    def logits(self, q_g, q_pos, ids):
        """Logits `(G, H, g, W)` of the scaled queries `q_g` `(G, H, g, D)` for the tokens
        `ids` `(G, H, W)` (valid numbers), with the count and distance terms."""
        heads = torch.arange(ids.shape[1], device=ids.device).view(1, -1, 1)
        logits = q_g @ self.keys[ids, heads].transpose(-1, -2) + self.log_count[ids][:, :, None]
        if self.sigma is not None:
            G, H, g, _ = q_g.shape
            q_pos = q_pos.view(G, 1, g, -1).expand(G, H, g, q_pos.shape[-1])
            logits = logits + self.sigma.view(1, H, 1, 1) * _distance(q_pos, self.centers[ids])
        return logits


class _FrontierImportance:
    """The importance of `descend` for the groups of one chunk, `q` `(G*g, H, D)`: logits of
    the gathered frontier tokens, their log-sum-exp, the probabilities summed over the real
    queries, in the compute dtype."""

    def __init__(self, q, mask, pos, tokens, g, scale):
        rows, H, D = q.shape
        G = rows // g
        self.q_g = (q.to(tokens.keys.dtype) * scale).view(G, g, H, D).transpose(1, 2)
        self.q_pos = pos.to(tokens.keys.dtype)
        self.real_query = mask.view(G, 1, g, 1)
        self.tokens = tokens

    def __call__(self, frontier, valid):
        logits = self.tokens.logits(self.q_g, self.q_pos, frontier.clamp(min=0))
        logits = logits.masked_fill(~valid[:, :, None, :], -math.inf)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        prob = torch.where(valid[:, :, None, :] & self.real_query,
                           torch.exp(logits - lse.masked_fill(lse == -math.inf, 0)), 0)
        return prob.sum(2)                                                      # (G, H, W)


# Chunk bodies: each sees only its own slice of queries, so its memory is bounded by the budget.


def _ball_chunk(q, k, v, mask, pos, sigma, *, ball_size, scale, compute):
    """`q`, `k`, `v` `(n*b, H, D)` of n whole blocks -> output `(n*b, H, D)` in q's dtype."""
    b = ball_size
    rows, H, D = q.shape
    n = rows // b
    real = mask.view(n, b, 1, 1)
    q_b = (q.to(compute) * scale).reshape(n, b, H, D).transpose(1, 2)            # (n, H, b, D)
    k_b = torch.where(real, k.to(compute).reshape(n, b, H, D), 0).transpose(1, 2)
    v_b = torch.where(real, v.to(compute).reshape(n, b, H, D), 0).transpose(1, 2)
    bias = None
    if sigma is not None:
        pos_b = pos.view(n, b, -1)
        bias = sigma.view(1, H, 1, 1) * _distance(pos_b, pos_b)[:, None]
    out, _ = _attend(q_b @ k_b.transpose(-1, -2), bias, mask.view(n, 1, 1, b), v_b)
    return out.transpose(1, 2).reshape(rows, H, D).to(q.dtype)


def _compressed_chunk(q, keys, values, sigma, q_pos, k_pos, q_cloud, k_cloud, real_block, *,
                      scale, compute):
    """Queries `(Mq, H, D)` against head-major keys `(H, Kc, D)` of the clouds they belong to.

    Returns the output `(Mq, H, D)` in q's dtype and the log-sum-exp `(Mq, H)` float32.
    """
    logits = _compressed_logits(q, keys, sigma, q_pos, k_pos, scale, compute)   # (H, Mq, Kc)
    allowed = real_block[None, :] & (q_cloud[:, None] == k_cloud[None, :])
    out, lse = _attend(logits, None, allowed, values)
    return out.transpose(0, 1).to(q.dtype), lse.T.float()


def _selection_chunk(q, keys, values, indices, mask, q_pos, pos, sigma, *, select_size,
                     group_size, scale, compute):
    """Queries `(G*g, H, D)` of G groups against the blocks `indices` `(G, H, top_k)` picked.

    Keys are gathered once per group and head (shared by the group's g queries), as
    `(G, H, top_k * select_size, D)`.
    """
    s, g = select_size, group_size
    rows, H, D = q.shape
    G, _, top_k = indices.shape
    chosen = indices >= 0
    slots = (indices.clamp(min=0).long()[..., None] * s
             + torch.arange(s, device=q.device)).view(G, H, top_k * s)
    is_key = chosen.repeat_interleave(s, dim=-1) & mask[slots]              # (G, H, top_k*s)
    heads = torch.arange(H, device=q.device).view(1, H, 1)
    k_g = torch.where(is_key[..., None], keys[slots, heads], 0)              # (G, H, top_k*s, D)
    v_g = torch.where(is_key[..., None], values[slots, heads], 0)
    q_g = (q.to(compute) * scale).reshape(G, g, H, D).transpose(1, 2)           # (G, H, g, D)
    bias = None
    if sigma is not None:
        q_pos = q_pos.view(G, 1, g, -1).expand(G, H, g, q_pos.shape[-1])
        bias = sigma.view(1, H, 1, 1) * _distance(q_pos, pos[slots])
    out, _ = _attend(q_g @ k_g.transpose(-1, -2), bias, is_key[:, :, None, :], v_g)
    return out.transpose(1, 2).reshape(rows, H, D).to(q.dtype)


def _far_field_chunk(q, keys, values, cut, q_pos, sigma, centers, log_count, *, group_size,
                     scale, compute):
    """Queries `(G*g, H, D)` of G groups against the tokens of their cuts `(G, H, W)`."""
    g = group_size
    rows, H, D = q.shape
    G = rows // g
    valid = cut >= 0
    ids = cut.clamp(min=0).long()
    heads = torch.arange(H, device=q.device).view(1, H, 1)
    k_g = torch.where(valid[..., None], keys[ids, heads], 0)                   # (G, H, W, D)
    v_g = torch.where(valid[..., None], values[ids, heads], 0)
    q_g = (q.to(compute) * scale).reshape(G, g, H, D).transpose(1, 2)        # (G, H, g, D)
    bias = log_count[ids][:, :, None, :]
    if sigma is not None:
        q_pos = q_pos.view(G, 1, g, -1).expand(G, H, g, q_pos.shape[-1])
        bias = bias + sigma.view(1, H, 1, 1) * _distance(q_pos, centers[ids])
    out, _ = _attend(q_g @ k_g.transpose(-1, -2), bias, valid[:, :, None, :], v_g)
    return out.transpose(1, 2).reshape(rows, H, D).to(q.dtype)


# Shared pieces


def _attend(scores, bias, allowed, values):
    """Softmax over the allowed keys, applied to `values`.

    `scores` `(..., Lq, Lk)` (already scaled), `bias` broadcastable to it or None, `allowed` a
    bool mask broadcastable to it, `values` `(..., Lk, D)` (zero where not allowed, so no NaN or
    inf from an unused key reaches the output). Returns the output `(..., Lq, D)` and the
    log-sum-exp `(..., Lq)`; a row without an allowed key gets output 0 and lse -inf, never NaN.
    """
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, -math.inf)
    # The shift only guards exp against overflow; the result does not depend on it, so it
    # needs no gradient. A row without keys is all -inf: shift it by 0 so it stays exp() = 0.
    shift = scores.amax(-1, keepdim=True).detach()
    shift = shift.masked_fill(shift == -math.inf, 0)
    weight = torch.exp(scores - shift)
    total = weight.sum(-1, keepdim=True)
    # A row with keys has total >= 1 (its largest weight is exp(0)); a row without has 0, and
    # clamping makes its output 0 / 1 = 0.
    out = (weight @ values) / total.clamp(min=1)
    lse = (shift + torch.log(total)).squeeze(-1)
    return out, lse


def _compressed_logits(q, keys, sigma, q_pos, k_pos, scale, compute):
    """Scaled logits of queries `(Mq, H, D)` against head-major keys `(H, Kc, D)` plus the
    distance bias -> `(H, Mq, Kc)` in the compute dtype."""
    logits = (q.to(compute) * scale).transpose(0, 1) @ keys.transpose(1, 2)
    if sigma is not None:
        logits = logits + sigma[:, None, None] * _distance(q_pos, k_pos)[None]
    return logits


def _top_blocks(importance, candidate, top_k, first_block):
    """int32 `(G, H, top_k)` ids of the most important candidate blocks, ascending, -1 after.

    `importance` `(G, H, Nb)`, `candidate` bool `(G, Nb)`; ids count from `first_block`.
    """
    G, H, num_blocks = importance.shape
    candidate = candidate[:, None, :].expand(G, H, num_blocks)
    importance = importance.masked_fill(~candidate, -math.inf)
    # A stable sort keeps equal importances in block order: ties go to the lower block id.
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices[..., :top_k]
    kept = candidate.gather(-1, order)
    # Ascending ids, with the empty places (-1) last: sort them as a key past every block.
    ids = torch.sort(torch.where(kept, order, num_blocks), dim=-1).values
    ids = torch.where(ids < num_blocks, ids + first_block, -1).to(torch.int32)
    if ids.shape[-1] < top_k:
        ids = torch.nn.functional.pad(ids, (0, top_k - ids.shape[-1]), value=-1)
    return ids


def _cloud_chunks(offsets, heads, key_block, align):
    """Plan chunks `(q0, q1, k0, k1)`: queries of slots `q0:q1` against the keys of the slots
    `k0:k1`, the whole clouds those queries belong to, with at most about `CHUNK_ELEMENTS`
    scores each (`heads` per query and `key_block`-block of key slots).

    Consecutive small clouds share a chunk (a mask keeps them apart), so a batch of many
    small clouds costs few kernel launches; a large cloud's queries are split into chunks of
    `align`-multiple rows. Runs on the host (`tree.offsets_list`): no device sync.
    """
    clouds = [(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True) if b > a]

    def cost(first, last):
        return (last - first) * heads * ((last - first) // key_block)

    chunks, i = [], 0
    while i < len(clouds):
        start, end = clouds[i]
        if cost(start, end) > CHUNK_ELEMENTS:
            per_row = heads * ((end - start) // key_block)
            rows = max(align, CHUNK_ELEMENTS // per_row // align * align)
            chunks += [(q, min(q + rows, end), start, end) for q in range(start, end, rows)]
            i += 1
            continue
        j = i + 1
        while j < len(clouds) and cost(start, clouds[j][1]) <= CHUNK_ELEMENTS:
            j += 1
        end = clouds[j - 1][1]
        chunks.append((start, end, start, end))
        i = j
    return chunks


def _run_chunk(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, checkpointed when a gradient is needed: backward then recomputes
    the chunk's scores instead of keeping every chunk's scores alive until it runs."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                       for a in args):
        # The chunks draw no random numbers: no RNG state to save and restore.
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return fn(*args, **kwargs)


def _head_major(x, real_block, compute):
    """Compressed keys or values `(M/c, H, D)` -> `(H, M/c, D)` in the compute dtype, zero on
    blocks without a real slot (never keys, whatever they hold)."""
    return torch.where(real_block[:, None, None], x.to(compute), 0).transpose(0, 1).contiguous()


def _split_or_none(x, rows, num_chunks):
    return [None] * num_chunks if x is None else x.split(rows)


def _distance(a, b):
    """Euclidean distances `(..., n, m)` between points `a` `(..., n, dim)` and `b` `(..., m,
    dim)`.

    Summed axis by axis: the matmul form `|a|^2 + |b|^2 - 2 a.b` loses digits on nearby
    points, and `torch.cdist`'s exact mode is a slow generic kernel on CUDA (most of the
    runtime of compressed attention); positions have few axes, so this loop is cheap.
    """
    squared = 0
    for axis in range(a.shape[-1]):
        squared = squared + (a[..., :, None, axis] - b[..., None, :, axis]).square()
    return squared.sqrt()


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
