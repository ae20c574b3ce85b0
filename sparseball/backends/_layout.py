"""Index tensors that GPU backends derive from a tree's layout (pure torch, no sync)."""

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
