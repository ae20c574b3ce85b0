"""`sparseball.attention`: the Native Sparse Attention mixture of the three branches."""

from __future__ import annotations

import torch

from . import ops
from ._checks import check_int, check_parameter, check_power_of_two, check_qkv, check_tree
from .backends import select_backend
from .tree import BallTree


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree: BallTree,
    *,
    gates: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    ball_size: int | None = None,
    compress_size: int | None = None,
    select_size: int | None = None,
    group_size: int | None = None,
    top_k: int = 16,
    k_cmp: torch.Tensor | None = None,
    v_cmp: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    far_field: str = "flat",
    fanout: int = 4,
    top_blocks: int = 256,
) -> torch.Tensor:
    """Native Sparse Attention on a ball tree: `g_c * o_cmp + g_s * o_sel + g_l * o_ball`.

    The compressed branch attends to block summaries of the whole cloud, the selection branch
    to the points of the `top_k` blocks its query group finds most relevant there, the ball
    branch to the query's own ball.

    With `far_field="tree"` the two global branches descend the tree instead (contract,
    section 3.1): from coarse levels down, each group expands its `top_k` most relevant blocks;
    it attends to those of level 0 at full resolution (selection branch) and to the blocks it
    left unexpanded as compressed tokens (compressed branch), O(N log N) in all.

    The arguments are checked once, here; the branches then run their backend's kernels
    directly, so a training step pays for no second validation and no host sync (the block
    ids come from `select_blocks` itself and are not checked again).

    Args:
        q (torch.Tensor): queries `[M, H, D]` in slot order (`tree.to_slots`).
        k (torch.Tensor): keys `[M, H, D]` in slot order.
        v (torch.Tensor): values `[M, H, D]` in slot order.
        tree (BallTree): the tree they are laid out by (or `tree.rotated_tree(r)` for data in
            rotated ordering r).
        gates (torch.Tensor | None): `[M, H, 3]` weights of the (compressed, selected, ball)
            branches, float32 or q's dtype; `None` weighs each 1/3. The mixture is formed in
            float32 when the gates are float32.
        sigma (torch.Tensor | None): `[H]` distance-bias slope shared by the three branches,
            float32 or q's dtype.
        ball_size (int | None): ball of the local branch, `tree.ball_size` by default.
        compress_size (int | None): block size of compressed keys, `min(32, P)` by default
            (`far_field="tree"`: `select_size`, else `min(64, P)`).
        select_size (int | None): size of selectable blocks, `min(64, P)` by default
            (`far_field="tree"`: equal to `compress_size`, its default).
        group_size (int | None): queries sharing one selection, `min(64, P)` by default.
        top_k (int): blocks selected per group and head.
        k_cmp (torch.Tensor | None): `[M / compress_size, H, D]` compressed keys (e.g.
            learned); `compress(k)` by default. Given together with `v_cmp`.
        v_cmp (torch.Tensor | None): `[M / compress_size, H, D]` compressed values;
            `compress(v)` by default.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.
        backend (str): `"torch"`, `"triton"`, `"cupy"` or `"auto"`, used by every branch.
        far_field (str): `"flat"` (NSA: every compressed block of the cloud) or `"tree"`.
        fanout (int): `far_field="tree"`: the children of a block, a power of two >= 2.
        top_blocks (int): `far_field="tree"`: the most blocks a cloud has at the top level.

    Returns:
        torch.Tensor: `[M, H, D]` in q's dtype.
    """
    check_tree(tree)
    if far_field not in ("flat", "tree"):
        raise ValueError(f'far_field must be "flat" or "tree", got {far_field!r}')
    largest = tree.ball_size
    ball_size = largest if ball_size is None else ball_size
    if far_field == "tree":
        # One block size plays both roles: level-0 tokens and selectable blocks.
        if compress_size is None:
            compress_size = min(64, largest) if select_size is None else select_size
        select_size = compress_size if select_size is None else select_size
    compress_size = min(32, largest) if compress_size is None else compress_size
    select_size = min(64, largest) if select_size is None else select_size
    group_size = min(64, largest) if group_size is None else group_size
    if not torch.compiler.is_compiling():
        if far_field == "tree" and select_size != compress_size:
            raise ValueError(f'select_size must equal compress_size = {compress_size} with '
                             f'far_field="tree" (level-0 blocks are both), got {select_size}')
        _check_arguments(q, k, v, tree, gates, sigma, ball_size, compress_size, select_size,
                         group_size, top_k, k_cmp, v_cmp)
        if far_field == "tree":
            tree.levels(compress_size, fanout, top_blocks)  # checks fanout and top_blocks
    scale = ops._scale(scale, q)

    def kernels(op: str):
        return select_backend(op, backend, q)

    if k_cmp is None:
        compress = kernels("compress").compress
        k_cmp = compress(k, tree, compress_size)
        v_cmp = compress(v, tree, compress_size)
    if far_field == "tree":
        levels = tree.levels(compress_size, fanout, top_blocks)
        build = kernels("far_field_tokens").far_field_tokens
        k_tok, v_tok = build(k_cmp, tree, levels), build(v_cmp, tree, levels)
        indices, cut = kernels("far_field_select").far_field_select(
            q, k_tok, tree, levels, group_size, top_k, sigma, scale)
        o_cmp = kernels("far_field_attention").far_field_attention(
            q, k_tok, v_tok, tree, levels, cut, group_size, sigma, scale)
    else:
        o_cmp, lse = kernels("compressed_attention").compressed_attention(
            q, k_cmp, v_cmp, tree, compress_size, sigma, scale)
        indices = kernels("select_blocks").select_blocks(
            q, k_cmp, lse, tree, compress_size, select_size, group_size, top_k, sigma, scale,
            None)
    o_sel = kernels("selection_attention").selection_attention(
        q, k, v, tree, indices, select_size, group_size, sigma, scale)
    o_ball = kernels("ball_attention").ball_attention(q, k, v, tree, ball_size, sigma, scale)
    if gates is None:
        return (o_cmp + o_sel + o_ball) / 3
    mixed = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_ball
    return mixed.to(q.dtype)


def _check_arguments(q, k, v, tree, gates, sigma, ball_size, compress_size, select_size,
                     group_size, top_k, k_cmp, v_cmp) -> None:
    """Everything the branches' public ops would check, once."""
    check_qkv(q, k, v, tree)
    check_power_of_two("ball_size", ball_size, maximum=tree.ball_size)
    check_power_of_two("compress_size", compress_size, maximum=tree.ball_size)
    ops._check_selection_sizes(tree, select_size, group_size, compress_size)
    check_int("top_k", top_k, minimum=1)
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("k_cmp and v_cmp must be given together or not at all")
    if k_cmp is not None:
        ops._check_compressed(k_cmp, v_cmp, q, tree, compress_size)
    ops._check_sigma(sigma, q)
    if gates is not None:
        check_parameter("gates", gates, q, (*q.shape[:2], 3))
