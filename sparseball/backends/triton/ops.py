"""The Triton backend's op functions (same signatures as the torch backend's).

They unpack the BallTree into tensors and ints and call the `sparseball_triton::*` ops, which
carry their own autograd, so `torch.compile(..., fullgraph=True)` sees one op per call.
`far_field_tokens` is the torch backend's (gathers and sums, no kernel); `far_field_select` runs
the shared descent (`sparseball.backends.descent`) with a kernel for each level's importance.
"""

from __future__ import annotations

import math

import torch

from ...tree import BallTree
from .._layout import (
    block_real,
    float32_centers,
    float32_positions,
    per_tree,
    tree_cloud_ranges,
    uint8_mask,
)
from ..descent import descend, group_chunks, top_frontier
from ..torch.ops import far_field_tokens  # a few gathers and sums per level: no kernel
from .ball import ball_attention_op
from .compressed import compress_op, compressed_attention_op
from .far_field import far_field_attention_op, frontier_importance_op
from .select import select_blocks_op
from .selection import selection_attention_op

__all__ = ["compress", "ball_attention", "compressed_attention", "select_blocks",
           "selection_attention", "far_field_tokens", "far_field_select", "far_field_attention"]


def _has_padding(tree: BallTree) -> bool:
    """Whether any slot is padding; without (N = M: each cloud fills its slots, as clouds of
    multiples of the ball size do) the attention kernels get no mask and compile without its
    loads (`_common._real_slots`)."""
    return tree.num_points < tree.num_slots


def _padding_mask(tree: BallTree) -> torch.Tensor | None:
    """The mask for the attention kernels, or None when no slot is padding."""
    return uint8_mask(tree) if _has_padding(tree) else None


def _sigma(sigma: torch.Tensor | None) -> torch.Tensor | None:
    return None if sigma is None else sigma.contiguous()


def _cloud_unit(tree: BallTree) -> int:
    """The largest block size that no cloud boundary cuts: the gcd of the offsets (a multiple
    of the ball size; the whole layout for one cloud). Kernels whose tiles fit in it skip the
    per-element cloud masks."""
    return math.gcd(*tree.offsets_list) or tree.ball_size


def _cloud_ranges(tree: BallTree) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per `_cloud_unit` block: the slot range of its cloud; and the unit."""
    unit = _cloud_unit(tree)
    return (*tree_cloud_ranges(tree, unit), unit)


def _nonempty_blocks(tree: BallTree, block_size: int) -> torch.Tensor | None:
    """`block_real` for the compressed-attention kernels, or None when no slot is padding
    (then no block is empty)."""
    return block_real(tree, block_size) if _has_padding(tree) else None


def compress(x: torch.Tensor, tree: BallTree, compress_size: int) -> torch.Tensor:
    return compress_op(x.contiguous(), uint8_mask(tree), compress_size)


def ball_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                   ball_size: int, sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = ball_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), float32_positions(tree),
                               _padding_mask(tree), _sigma(sigma), ball_size, scale)
    return out


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, tree: BallTree,
                         compress_size: int, sigma: torch.Tensor | None,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    cloud_lo, cloud_hi, unit = _cloud_ranges(tree)
    return compressed_attention_op(
        q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), float32_positions(tree),
        float32_centers(tree, compress_size),
        _nonempty_blocks(tree, compress_size), cloud_lo, cloud_hi, _sigma(sigma), unit,
        compress_size, scale)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                        indices: torch.Tensor, select_size: int, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = selection_attention_op(
        q.contiguous(), k.contiguous(), v.contiguous(), float32_positions(tree), _padding_mask(tree),
        indices.to(torch.int32).contiguous(), _sigma(sigma), select_size, group_size, scale)
    return out


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, tree: BallTree,
                  compress_size: int, select_size: int, group_size: int, top_k: int,
                  sigma: torch.Tensor | None, scale: float,
                  exclude_ball_size: int | None) -> torch.Tensor:
    cloud_lo, cloud_hi, unit = _cloud_ranges(tree)
    exclude = 0 if exclude_ball_size is None else max(exclude_ball_size, group_size)
    with torch.no_grad():
        return select_blocks_op(
            q.detach().contiguous(), k_cmp.detach().contiguous(), lse.detach().contiguous(),
            float32_positions(tree), float32_centers(tree, compress_size), uint8_mask(tree),
            block_real(tree, compress_size), block_real(tree, select_size), cloud_lo, cloud_hi,
            None if sigma is None else sigma.detach().contiguous(), unit, compress_size,
            select_size, group_size, top_k, exclude, scale)


# The tree far field (docs/contract.md, section 3.1)

# The descent of far_field_select runs in chunks of groups holding about this many frontier
# entries (groups x heads x widest frontier): its torch ops (sorts, gathers) keep a few int64
# and float32 tensors of that size alive, ~2 GiB at 2^26.
SELECT_CHUNK_ELEMENTS = 1 << 26


def _token_terms(tree: BallTree, levels) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 token centers `[T, dim]` and the logits' log counts `[T]` (log 1 = 0 for a
    token without a real slot)."""
    key = ("tokens", levels.compress_size, levels.fanout, levels.top_blocks)
    return per_tree(tree, key, lambda: (
        levels.center.to(torch.float32).contiguous(),
        torch.log(levels.count.clamp(min=1).to(torch.float32))))


def far_field_select(q: torch.Tensor, k_tok: torch.Tensor, tree: BallTree, levels,
                     group_size: int, top_k: int, sigma: torch.Tensor | None,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = group_size
    M, H, _ = q.shape
    with torch.no_grad():
        q, k_tok = q.detach().contiguous(), k_tok.detach().contiguous()
        sig = None if sigma is None else sigma.detach().contiguous()
        pos, mask = float32_positions(tree), uint8_mask(tree)
        centers, log_count = _token_terms(tree, levels)
        real = levels.count > 0
        group_cloud = tree.slot_cloud[::g]
        selected, cut = [], []
        for g0, g1 in group_chunks(M // g, H, levels, top_k, 1, SELECT_CHUNK_ELEMENTS):
            rows = slice(g0 * g, g1 * g)

            def importance(frontier, valid, rows=rows):
                ids = torch.where(valid, frontier, -1).to(torch.int32).contiguous()
                return frontier_importance_op(q[rows], k_tok, pos[rows], centers, log_count,
                                              mask[rows], ids, sig, g, scale)

            sel, left = descend(top_frontier(levels, group_cloud[g0:g1], H), real, levels,
                                top_k, importance)
            selected.append(sel)
            cut.append(left)
        return torch.cat(selected), torch.cat(cut)


def far_field_attention(q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor,
                        tree: BallTree, levels, cut: torch.Tensor, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    if cut.shape[-1] == 0:  # no cloud is large enough to leave a cut: one empty column
        cut = torch.full((*cut.shape[:2], 1), -1, dtype=torch.int32, device=cut.device)
    centers, log_count = _token_terms(tree, levels)
    out, _ = far_field_attention_op(
        q.contiguous(), k_tok.contiguous(), v_tok.contiguous(), float32_positions(tree), centers, log_count,
        cut.to(torch.int32).contiguous(), _sigma(sigma), group_size, scale)
    return out
