"""The public attention ops: validate the call, pick a backend, run its kernel.

Semantics are fixed by docs/contract.md, section 3; `reference/ops.py` is the same in code.
All tensors are in slot order (`tree.to_slots`), shaped `[M, H, D]` with M = tree.num_slots.
`sigma` may be float32 or q's dtype (a model keeps it float32 under autocast): the bias is formed
in float32 for half-precision q, k, v, and sigma's gradient comes back in sigma's own dtype.
Every op also takes a keyword-only `backend`: `"torch"`, `"triton"`, `"cupy"` or `"auto"` (the
default: the innermost `use_backend`, else $SPARSEBALL_BACKEND, else the fastest backend that
can serve the call).
"""

from __future__ import annotations

import math

import torch

from ._checks import (
    check_int,
    check_like,
    check_parameter,
    check_power_of_two,
    check_qkv,
    check_slots,
    check_tree,
)
from .backends import select_backend
from .tree import BallTree

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


def compress(x: torch.Tensor, tree: BallTree, compress_size: int, *,
             backend: str = "auto") -> torch.Tensor:
    """Mean of `x` over the real slots of each aligned `compress_size`-block.

    Args:
        x (torch.Tensor): slot data of shape `[M, H, D]`.
        tree (BallTree): the tree `x` is laid out by.
        compress_size (int): block size c, a power of two <= `tree.ball_size`.

    Returns:
        torch.Tensor: `[M / c, H, D]`; zeros for blocks without a real slot.
    """
    if not torch.compiler.is_compiling():
        check_tree(tree)
        check_slots("x", x, tree)
        check_power_of_two("compress_size", compress_size, maximum=tree.ball_size)
    return select_backend("compress", backend, x).compress(x, tree, compress_size)


def ball_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                   ball_size: int, sigma: torch.Tensor | None = None,
                   scale: float | None = None, *, backend: str = "auto") -> torch.Tensor:
    """Each slot attends to the real slots of its own aligned `ball_size`-block.

    Args:
        q (torch.Tensor): queries `[M, H, D]` in slot order.
        k (torch.Tensor): keys `[M, H, D]` in slot order.
        v (torch.Tensor): values `[M, H, D]` in slot order.
        tree (BallTree): the tree they are laid out by.
        ball_size (int): a power of two <= `tree.ball_size`.
        sigma (torch.Tensor | None): `[H]`, adds `sigma[h] * ||p_i - p_j||` to each logit.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.

    Returns:
        torch.Tensor: `[M, H, D]`.
    """
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v, tree)
        check_power_of_two("ball_size", ball_size, maximum=tree.ball_size)
        _check_sigma(sigma, q)
    kernels = select_backend("ball_attention", backend, q)
    return kernels.ball_attention(q, k, v, tree, ball_size, sigma, _scale(scale, q))


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                         tree: BallTree, compress_size: int, sigma: torch.Tensor | None = None,
                         scale: float | None = None, *,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot attends to every compressed block (with a real slot) of its cloud.

    Args:
        q (torch.Tensor): `[M, H, D]` queries in slot order.
        k_cmp (torch.Tensor): `[M / compress_size, H, D]` compressed keys.
        v_cmp (torch.Tensor): `[M / compress_size, H, D]` compressed values.
        tree (BallTree): the tree q is laid out by.
        compress_size (int): a power of two <= `tree.ball_size`.
        sigma (torch.Tensor | None): `[H]`, bias `sigma[h] * ||p_i - tree.centers(c)[u]||`.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.

    Returns:
        torch.Tensor: the output, `[M, H, D]`.
        torch.Tensor: float32 `[M, H]`, the log-sum-exp of each query's logits (no gradient;
            it feeds `select_blocks`).
    """
    if not torch.compiler.is_compiling():
        check_tree(tree)
        check_slots("q", q, tree)
        check_power_of_two("compress_size", compress_size, maximum=tree.ball_size)
        _check_compressed(k_cmp, v_cmp, q, tree, compress_size)
        _check_sigma(sigma, q)
    kernels = select_backend("compressed_attention", backend, q)
    return kernels.compressed_attention(q, k_cmp, v_cmp, tree, compress_size, sigma,
                                        _scale(scale, q))


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, tree: BallTree,
                  compress_size: int, select_size: int, group_size: int, top_k: int,
                  sigma: torch.Tensor | None = None, scale: float | None = None,
                  exclude_ball_size: int | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """The `top_k` most important `select_size`-blocks of each query group's cloud.

    Importance of block w for a group: the sum, over the group's real queries and the
    compressed blocks inside w, of the compressed-attention probabilities.

    Args:
        q (torch.Tensor): `[M, H, D]` queries in slot order.
        k_cmp (torch.Tensor): `[M / compress_size, H, D]` compressed keys.
        lse (torch.Tensor): `[M, H]` float32 log-sum-exp from `compressed_attention`.
        tree (BallTree): the tree q is laid out by.
        compress_size (int): size of the compressed blocks.
        select_size (int): size of the selectable blocks, a multiple of `compress_size`.
        group_size (int): queries of an aligned `group_size`-block share one selection.
        top_k (int): how many blocks each group keeps, >= 1.
        sigma (torch.Tensor | None): `[H]`, the distance bias of compressed attention.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.
        exclude_ball_size (int | None): leave out the blocks inside the group's own
            aligned `max(exclude_ball_size, group_size)`-block.

    Returns:
        torch.Tensor: int32 `[M / group_size, H, top_k]`, block ids in ascending order,
            then -1 where the cloud has fewer than `top_k` candidates.
    """
    if not torch.compiler.is_compiling():
        check_tree(tree)
        check_slots("q", q, tree)
        check_power_of_two("compress_size", compress_size, maximum=tree.ball_size)
        _check_selection_sizes(tree, select_size, group_size, compress_size)
        check_int("top_k", top_k, minimum=1)
        if exclude_ball_size is not None:
            check_power_of_two("exclude_ball_size", exclude_ball_size, maximum=tree.ball_size)
        _check_compressed(k_cmp, None, q, tree, compress_size)
        _check_lse(lse, q)
        _check_sigma(sigma, q)
    kernels = select_backend("select_blocks", backend, q)
    return kernels.select_blocks(q, k_cmp, lse, tree, compress_size, select_size, group_size,
                                 top_k, sigma, _scale(scale, q), exclude_ball_size)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                        indices: torch.Tensor, select_size: int, group_size: int,
                        sigma: torch.Tensor | None = None, scale: float | None = None, *,
                        backend: str = "auto") -> torch.Tensor:
    """Each query attends to the real slots of the blocks its group selected.

    Args:
        q (torch.Tensor): queries `[M, H, D]` in slot order.
        k (torch.Tensor): keys `[M, H, D]` in slot order.
        v (torch.Tensor): values `[M, H, D]` in slot order.
        tree (BallTree): the tree they are laid out by.
        indices (torch.Tensor): int32 `[M / group_size, H, top_k]` ids of `select_size`-blocks
            (as from `select_blocks`): distinct per row, in the group's cloud, -1 for none.
        select_size (int): size of the selected blocks.
        group_size (int): queries of an aligned `group_size`-block share one selection.
        sigma (torch.Tensor | None): `[H]`, adds `sigma[h] * ||p_i - p_j||` to each logit.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.

    Returns:
        torch.Tensor: `[M, H, D]`.
    """
    if not torch.compiler.is_compiling():
        check_qkv(q, k, v, tree)
        _check_selection_sizes(tree, select_size, group_size)
        _check_indices(indices, q, tree, select_size, group_size)
        _check_sigma(sigma, q)
    kernels = select_backend("selection_attention", backend, q)
    return kernels.selection_attention(q, k, v, tree, indices, select_size, group_size, sigma,
                                       _scale(scale, q))


# The tree far field (docs/contract.md, section 3.1)


def far_field_tokens(x_cmp: torch.Tensor, tree: BallTree, compress_size: int, fanout: int = 4,
                     top_blocks: int = 256, *, backend: str = "auto") -> torch.Tensor:
    """The tokens of every far-field level, built from the level-0 ones.

    Args:
        x_cmp (torch.Tensor): `[M / compress_size, H, D]` level-0 tokens: `compress(x)`, or
            learned.
        tree (BallTree): the tree they summarise.
        compress_size (int): c, the slots of a level-0 block.
        fanout (int): f, the children of a block, a power of two >= 2.
        top_blocks (int): the levels stop at the first where no cloud has more blocks.

    Returns:
        torch.Tensor: `[T, H, D]` with `T = tree.levels(c, f, top_blocks).num_tokens`: level 0
            is `x_cmp`, a block above the count-weighted mean of its children (0 without a
            real slot).
    """
    levels = None
    if not torch.compiler.is_compiling():
        check_tree(tree)
        levels = tree.levels(compress_size, fanout, top_blocks)
        if not isinstance(x_cmp, torch.Tensor):
            raise TypeError(f"x_cmp must be a torch.Tensor, got {type(x_cmp).__name__}")
        check_slots("x_cmp", x_cmp, tree, rows=tree.num_slots // compress_size,
                    rows_name="M / compress_size")
    levels = levels or tree.levels(compress_size, fanout, top_blocks)
    kernels = select_backend("far_field_tokens", backend, x_cmp)
    return kernels.far_field_tokens(x_cmp, tree, levels)


def far_field_select(q: torch.Tensor, k_tok: torch.Tensor, tree: BallTree, compress_size: int,
                     group_size: int, top_k: int, fanout: int = 4, top_blocks: int = 256,
                     sigma: torch.Tensor | None = None, scale: float | None = None, *,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The descent of the tree far field: per query group and head, from the top level down,
    expand the `top_k` blocks of largest probability mass and leave the others in the cut.

    Args:
        q (torch.Tensor): `[M, H, D]` queries in slot order.
        k_tok (torch.Tensor): `[T, H, D]` key tokens of every level (`far_field_tokens`).
        tree (BallTree): the tree q is laid out by.
        compress_size (int): c, the slots of a level-0 block (and of a selected block).
        group_size (int): queries of an aligned `group_size`-block share one descent.
        top_k (int): blocks expanded per level, and selected at level 0.
        fanout (int): f, the children of a block.
        top_blocks (int): the most blocks a cloud has at the top level.
        sigma (torch.Tensor | None): `[H]`, adds `sigma[h] * ||p_i - center(u)||` to each logit.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.

    Returns:
        torch.Tensor: int32 `[M / group_size, H, top_k]`, the selected level-0 block ids
            (ids of `compress_size`-blocks) in ascending order, then -1.
        torch.Tensor: int32 `[M / group_size, H, levels.max_cut(top_k)]`, the token numbers of
            the cut in ascending order, then -1.
    """
    if not torch.compiler.is_compiling():
        check_tree(tree)
        check_slots("q", q, tree)
        levels = tree.levels(compress_size, fanout, top_blocks)
        check_power_of_two("group_size", group_size, maximum=tree.ball_size)
        check_int("top_k", top_k, minimum=1)
        check_like("k_tok", k_tok, q, (levels.num_tokens, *q.shape[1:]))
        _check_sigma(sigma, q)
    levels = tree.levels(compress_size, fanout, top_blocks)
    kernels = select_backend("far_field_select", backend, q)
    return kernels.far_field_select(q, k_tok, tree, levels, group_size, top_k, sigma,
                                    _scale(scale, q))


def far_field_attention(q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor,
                        tree: BallTree, cut: torch.Tensor, compress_size: int, group_size: int,
                        fanout: int = 4, top_blocks: int = 256,
                        sigma: torch.Tensor | None = None, scale: float | None = None, *,
                        backend: str = "auto") -> torch.Tensor:
    """Each query attends, per head, to the tokens of its group's cut, each token's logit
    raised by the log of its real-slot count (a token weighs as the points it stands for).

    Args:
        q (torch.Tensor): `[M, H, D]` queries in slot order.
        k_tok (torch.Tensor): `[T, H, D]` key tokens (`far_field_tokens`).
        v_tok (torch.Tensor): `[T, H, D]` value tokens.
        tree (BallTree): the tree q is laid out by.
        cut (torch.Tensor): int32 `[M / group_size, H, W]` token numbers (as from
            `far_field_select`): distinct per row, of tokens with a real slot in the group's
            cloud, -1 for none.
        compress_size (int): c, the slots of a level-0 block.
        group_size (int): queries of an aligned `group_size`-block share one cut.
        fanout (int): f, the children of a block.
        top_blocks (int): the most blocks a cloud has at the top level.
        sigma (torch.Tensor | None): `[H]`, adds `sigma[h] * ||p_i - center(u)||` to each logit.
        scale (float | None): logit scale, `1 / sqrt(D)` by default.

    Returns:
        torch.Tensor: `[M, H, D]`; 0 for a query whose cut is empty.
    """
    if not torch.compiler.is_compiling():
        check_tree(tree)
        check_slots("q", q, tree)
        levels = tree.levels(compress_size, fanout, top_blocks)
        check_power_of_two("group_size", group_size, maximum=tree.ball_size)
        check_like("k_tok", k_tok, q, (levels.num_tokens, *q.shape[1:]))
        check_like("v_tok", v_tok, q, (levels.num_tokens, *q.shape[1:]))
        _check_cut(cut, q, tree, levels, group_size)
        _check_sigma(sigma, q)
    levels = tree.levels(compress_size, fanout, top_blocks)
    kernels = select_backend("far_field_attention", backend, q)
    return kernels.far_field_attention(q, k_tok, v_tok, tree, levels, cut, group_size, sigma,
                                       _scale(scale, q))


def _scale(scale: float | None, q: torch.Tensor) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_compressed(k_cmp: torch.Tensor, v_cmp: torch.Tensor | None, q: torch.Tensor,
                      tree: BallTree, compress_size: int) -> None:
    shape = (tree.num_slots // compress_size, *q.shape[1:])
    check_like("k_cmp", k_cmp, q, shape)
    if v_cmp is not None:
        check_like("v_cmp", v_cmp, q, shape)


def _check_sigma(sigma: torch.Tensor | None, q: torch.Tensor) -> None:
    if sigma is not None:
        check_parameter("sigma", sigma, q, (q.shape[1],))


def _check_lse(lse: object, q: torch.Tensor) -> None:
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != tuple(q.shape[:2]):
        raise ValueError(f"lse must have shape (M, H) = {tuple(q.shape[:2])}, got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 (as compressed_attention returns it), got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse must be on the device of q ({q.device}), got {lse.device}")


def _check_selection_sizes(tree: BallTree, select_size: int, group_size: int,
                           compress_size: int | None = None) -> None:
    check_power_of_two("select_size", select_size, maximum=tree.ball_size)
    check_power_of_two("group_size", group_size, maximum=tree.ball_size)
    if compress_size is not None and select_size % compress_size:
        raise ValueError(
            f"select_size must be a multiple of compress_size = {compress_size}, got {select_size}"
        )


def _check_indices(indices: object, q: torch.Tensor, tree: BallTree, select_size: int,
                   group_size: int) -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 block ids (as select_blocks returns), got {indices.dtype}")
    num_groups = tree.num_slots // group_size
    if indices.ndim != 3 or tuple(indices.shape[:2]) != (num_groups, q.shape[1]) or indices.shape[2] < 1:
        raise ValueError(
            f"indices must have shape (M / group_size, H, top_k) = ({num_groups}, {q.shape[1]}, "
            f"top_k >= 1), got {tuple(indices.shape)}"
        )
    if indices.device != q.device:
        raise ValueError(f"indices must be on the device of q ({q.device}), got {indices.device}")
    num_blocks = tree.num_slots // select_size
    valid = indices >= 0
    block_cloud = tree.slot_cloud[::select_size]
    group_cloud = tree.slot_cloud[::group_size]
    other_cloud = valid & (block_cloud[indices.clamp(0, num_blocks - 1).long()]
                           != group_cloud[:, None, None])
    ordered = indices.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    problems = torch.stack([
        (indices < -1).any() | (indices >= num_blocks).any(),
        other_cloud.any(),
        repeated.any(),
    ]).tolist()  # one device sync for all three checks
    if problems[0]:
        raise ValueError(
            f"indices must be block ids in [0, M / select_size) = [0, {num_blocks}) or -1, got "
            f"values in [{int(indices.min())}, {int(indices.max())}]"
        )
    if problems[1]:
        raise ValueError("indices must select blocks of the group's own cloud")
    if problems[2]:
        raise ValueError("indices must not repeat a block within one row (group, head)")


def _check_cut(cut: object, q: torch.Tensor, tree: BallTree, levels, group_size: int) -> None:
    if not isinstance(cut, torch.Tensor):
        raise TypeError(f"cut must be a torch.Tensor, got {type(cut).__name__}")
    if cut.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cut must be int32 token numbers (as far_field_select returns), got {cut.dtype}")
    num_groups = tree.num_slots // group_size
    if cut.ndim != 3 or tuple(cut.shape[:2]) != (num_groups, q.shape[1]):
        raise ValueError(f"cut must have shape (M / group_size, H, W) = ({num_groups}, "
                         f"{q.shape[1]}, W), got {tuple(cut.shape)}")
    if cut.device != q.device:
        raise ValueError(f"cut must be on the device of q ({q.device}), got {cut.device}")
    if cut.numel() == 0:
        return
    T = levels.num_tokens
    token_cloud = torch.repeat_interleave(
        torch.cat([torch.arange(len(n), device=q.device) for n in levels.cloud_blocks]),
        torch.tensor([b for n in levels.cloud_blocks for b in n], device=q.device),
        output_size=T)
    group_cloud = tree.slot_cloud[::group_size]
    other_cloud = (cut >= 0) & (token_cloud[cut.clamp(0, T - 1).long()] != group_cloud[:, None, None])
    empty = (cut >= 0) & (levels.count[cut.clamp(0, T - 1).long()] == 0)
    ordered = cut.sort(dim=-1).values
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
    problems = torch.stack([(cut < -1).any() | (cut >= T).any(), other_cloud.any(),
                            repeated.any(), empty.any()]).tolist()  # one device sync for all
    if problems[0]:
        raise ValueError(f"cut must hold token numbers in [0, T) = [0, {T}) or -1, got values in "
                         f"[{int(cut.min())}, {int(cut.max())}]")
    if problems[1]:
        raise ValueError("cut must hold tokens of the group's own cloud")
    if problems[2]:
        raise ValueError("cut must not repeat a token within one row (group, head)")
    if problems[3]:
        raise ValueError("cut must hold tokens with a real slot (tree.levels(...).count > 0), "
                         "as far_field_select leaves them")
