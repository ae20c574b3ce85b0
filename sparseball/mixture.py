"""`sparseball.attention`: the Native Sparse Attention mixture of the three branches."""

from __future__ import annotations

import torch

from . import ops
from ._checks import check_like, check_qkv, check_tree
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
) -> torch.Tensor:
    """Native Sparse Attention on a ball tree: `g_c * o_cmp + g_s * o_sel + g_l * o_ball`.

    The compressed branch attends to block summaries of the whole cloud, the selection branch
    to the points of the `top_k` blocks its query group finds most relevant there, the ball
    branch to the query's own ball.

    Args:
        q (torch.Tensor): queries `[M, H, D]` in slot order (`tree.to_slots`).
        k (torch.Tensor): keys `[M, H, D]` in slot order.
        v (torch.Tensor): values `[M, H, D]` in slot order.
        tree (BallTree): the tree they are laid out by.
        gates (torch.Tensor | None): `[M, H, 3]` weights of the (compressed, selected, ball)
            branches; `None` weighs each 1/3.
        sigma (torch.Tensor | None): `[H]` distance-bias slope shared by the three branches.
        ball_size (int | None): ball of the local branch, `tree.ball_size` by default.
        compress_size (int | None): block size of compressed keys, `min(32, P)` by default.
        select_size (int | None): size of selectable blocks, `min(64, P)` by default.
        group_size (int | None): queries sharing one selection, `min(64, P)` by default.
        top_k (int): blocks selected per group and head.
        k_cmp (torch.Tensor | None): `[M / compress_size, H, D]` compressed keys (e.g.
            learned); `compress(k)` by default. Given together with `v_cmp`.
        v_cmp (torch.Tensor | None): `[M / compress_size, H, D]` compressed values;
            `compress(v)` by default.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.
        backend (str): `"torch"`, `"triton"`, `"cupy"` or `"auto"`, used by every branch.

    Returns:
        torch.Tensor: `[M, H, D]`.
    """
    check_tree(tree)
    largest = tree.ball_size
    ball_size = largest if ball_size is None else ball_size
    compress_size = min(32, largest) if compress_size is None else compress_size
    select_size = min(64, largest) if select_size is None else select_size
    group_size = min(64, largest) if group_size is None else group_size
    if not torch.compiler.is_compiling():
        if (k_cmp is None) != (v_cmp is None):
            raise ValueError("k_cmp and v_cmp must be given together or not at all")
        check_qkv(q, k, v, tree)
        if gates is not None:
            check_like("gates", gates, q, (*q.shape[:2], 3))

    if k_cmp is None:
        k_cmp = ops.compress(k, tree, compress_size, backend=backend)
        v_cmp = ops.compress(v, tree, compress_size, backend=backend)
    o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, compress_size, sigma, scale,
                                          backend=backend)
    indices = ops.select_blocks(q, k_cmp, lse, tree, compress_size, select_size, group_size,
                                top_k, sigma, scale, backend=backend)
    o_sel = ops.selection_attention(q, k, v, tree, indices, select_size, group_size, sigma,
                                    scale, backend=backend)
    o_ball = ops.ball_attention(q, k, v, tree, ball_size, sigma, scale, backend=backend)
    if gates is None:
        return (o_cmp + o_sel + o_ball) / 3
    return gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_sel + gates[..., 2:3] * o_ball
