"""Tensors that GPU backends derive from a tree's layout (pure torch, no sync), and the
per-tree cache that keeps the conversions their kernels take out of every call."""

from __future__ import annotations

import torch


def cloud_ranges(offsets: torch.Tensor, unit: int, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot range `[lo, hi)` of the cloud holding each aligned `unit`-block, as two int64
    tensors of `num_units`. Clouds own multiples of `unit` slots, so no block straddles two."""
    sizes = (offsets[1:] - offsets[:-1]) // unit
    lo = torch.repeat_interleave(offsets[:-1], sizes, output_size=num_units)
    hi = torch.repeat_interleave(offsets[1:], sizes, output_size=num_units)
    return lo.contiguous(), hi.contiguous()


def invert_selection(indices: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the selection by (head, block): groups `groups[row_ptr[h * num_blocks + w]:
    row_ptr[h * num_blocks + w + 1]]` chose block w for head h, in ascending order."""
    G, H, K = indices.shape
    blocks = indices.to(torch.int64)
    heads = torch.arange(H, device=indices.device).view(1, H, 1)
    key = torch.where(blocks >= 0, heads * num_blocks + blocks, H * num_blocks).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    groups = (order // (H * K)).to(torch.int32)
    bounds = torch.arange(H * num_blocks + 1, device=indices.device)
    row_ptr = torch.searchsorted(sorted_key, bounds)
    return row_ptr, groups


def per_tree(tree, key: tuple, make):
    """`make()`, cached with the tree in eager mode: a model calls several ops per layer on one
    tree, and each small conversion is a kernel launch (eager steps are launch-bound). Under
    torch.compile it is computed in the graph, where inductor fuses it, and not stored."""
    if torch.compiler.is_compiling():
        return make()
    key = ("gpu_layout", *key)
    if key not in tree._cache:
        tree._cache[key] = make()
    return tree._cache[key]


def float32_positions(tree) -> torch.Tensor:
    """Positions for the kernels, which form distances in float32."""
    return per_tree(tree, ("pos",), lambda: tree.pos.to(torch.float32).contiguous())


def uint8_mask(tree) -> torch.Tensor:
    # A copy of M bytes: inductor cannot lower view(dtype) of bool.
    return per_tree(tree, ("mask",), lambda: tree.mask.to(torch.uint8))


def float32_centers(tree, block_size: int) -> torch.Tensor:
    return per_tree(tree, ("centers", block_size),
                    lambda: tree.centers(block_size).to(torch.float32).contiguous())


def block_real(tree, block_size: int) -> torch.Tensor:
    """uint8 `[M / block_size]`: which aligned blocks hold a real slot."""
    return per_tree(tree, ("block_real", block_size),
                    lambda: tree.mask.view(-1, block_size).any(1).to(torch.uint8))


def tree_cloud_ranges(tree, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cloud_ranges` of the tree's aligned `unit`-blocks, cached."""
    return per_tree(tree, ("cloud_ranges", unit),
                    lambda: cloud_ranges(tree.offsets, unit, tree.num_slots // unit))
