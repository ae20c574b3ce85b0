"""The Triton backend's op functions (same signatures as the torch backend's).

They unpack the BallTree into tensors and ints and call the `sparseball_triton::*` ops, which
carry their own autograd, so `torch.compile(..., fullgraph=True)` sees one op per call.
"""

from __future__ import annotations

import math

import torch

from ...tree import BallTree
from .._layout import cloud_ranges
from .ball import ball_attention_op
from .compressed import compress_op, compressed_attention_op
from .select import select_blocks_op
from .selection import selection_attention_op


def _pos(tree: BallTree) -> torch.Tensor:
    # Distances are formed in float32 inside the kernels.
    return tree.pos.to(torch.float32).contiguous()


def _mask(tree: BallTree) -> torch.Tensor:
    return tree.mask.to(torch.uint8)  # a copy of M bytes: inductor cannot lower view(dtype) of bool


def _has_padding(tree: BallTree) -> bool:
    """Whether any slot is padding; without (N = M: each cloud fills its slots, as clouds of
    multiples of the ball size do) the attention kernels get no mask and compile without its
    loads (`_common._real_slots`)."""
    return tree.num_points < tree.num_slots


def _padding_mask(tree: BallTree) -> torch.Tensor | None:
    """The mask for the attention kernels, or None when no slot is padding."""
    return _mask(tree) if _has_padding(tree) else None


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
    lo, hi = cloud_ranges(tree.offsets, unit, tree.num_slots // unit)
    return lo, hi, unit


def _block_real(tree: BallTree, block_size: int) -> torch.Tensor:
    return tree.mask.view(-1, block_size).any(1).to(torch.uint8)


def _nonempty_blocks(tree: BallTree, block_size: int) -> torch.Tensor | None:
    """`_block_real` for the compressed-attention kernels, or None when no slot is padding
    (then no block is empty)."""
    return _block_real(tree, block_size) if _has_padding(tree) else None


def compress(x: torch.Tensor, tree: BallTree, compress_size: int) -> torch.Tensor:
    return compress_op(x.contiguous(), _mask(tree), compress_size)


def ball_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                   ball_size: int, sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = ball_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), _pos(tree),
                               _padding_mask(tree), _sigma(sigma), ball_size, scale)
    return out


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, tree: BallTree,
                         compress_size: int, sigma: torch.Tensor | None,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    cloud_lo, cloud_hi, unit = _cloud_ranges(tree)
    return compressed_attention_op(
        q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), _pos(tree),
        tree.centers(compress_size).to(torch.float32).contiguous(),
        _nonempty_blocks(tree, compress_size), cloud_lo, cloud_hi, _sigma(sigma), unit,
        compress_size, scale)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                        indices: torch.Tensor, select_size: int, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = selection_attention_op(
        q.contiguous(), k.contiguous(), v.contiguous(), _pos(tree), _padding_mask(tree),
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
            _pos(tree), tree.centers(compress_size).to(torch.float32).contiguous(), _mask(tree),
            _block_real(tree, compress_size), _block_real(tree, select_size), cloud_lo, cloud_hi,
            None if sigma is None else sigma.detach().contiguous(), unit, compress_size,
            select_size, group_size, top_k, exclude, scale)
