"""Building blocks of point-cloud transformers that are not attention: the feed-forward
SwiGLU, Fourier features of positions, and message passing inside leaf balls."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FourierFeatures", "LeafMessagePassing", "SwiGLU"]


class SwiGLU(nn.Module):
    """`W_out (silu(W_gate x) * W_up x)`, hidden width `hidden` (LLaMA's feed-forward)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


class FourierFeatures(nn.Module):
    """`[..., pos_dim]` positions -> `[..., 2 * pos_dim * frequencies]`: `sin` and `cos` of
    each coordinate times `2 pi 2^f / scale` for f = 0 .. frequencies - 1 (fixed, not learned),
    so features resolve structure from `scale` down to `scale / 2^(frequencies-1)`."""

    def __init__(self, pos_dim: int, frequencies: int, scale: float = 1.0):
        super().__init__()
        self.out_dim = 2 * pos_dim * frequencies
        bands = 2 * math.pi * 2.0 ** torch.arange(frequencies) / scale
        self.register_buffer("bands", bands, persistent=False)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        angles = (pos[..., None].float() * self.bands).flatten(-2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class LeafMessagePassing(nn.Module):
    """One round of messages from each point's `neighbours` nearest real points inside its
    aligned `leaf_size`-block of slots (a small ball of the tree, so no graph library and no
    global neighbour search): `x_i + mean_j MLP(x_i, x_j, p_j - p_i)`.

    Distances and the neighbour choice are dense within a leaf, `[M / leaf, leaf, leaf]`:
    linear in M. Padding slots send no messages; a point with fewer real neighbours in its
    leaf averages over those it has.
    """

    def __init__(self, dim: int, *, leaf_size: int = 16, neighbours: int = 8, pos_dim: int = 3):
        super().__init__()
        if neighbours < 1 or neighbours >= leaf_size:
            raise ValueError(f"neighbours must be in [1, leaf_size) = [1, {leaf_size}), "
                             f"got {neighbours}")
        self.leaf_size, self.neighbours = leaf_size, neighbours
        self.message = nn.Sequential(nn.Linear(2 * dim + pos_dim, dim), nn.GELU(),
                                     nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, tree) -> torch.Tensor:
        """`x` `[M, dim]` in the slot order of `tree` -> `[M, dim]`."""
        leaf, dim = self.leaf_size, x.shape[1]
        pos = tree.pos.float().view(-1, leaf, tree.dim)
        real = tree.mask.view(-1, 1, leaf)
        dist = torch.cdist(pos, pos)
        eye = torch.eye(leaf, dtype=torch.bool, device=x.device)
        dist = dist.masked_fill(~real | eye, math.inf)
        nearest = dist.topk(self.neighbours, dim=-1, largest=False)
        valid = torch.isfinite(nearest.values)                          # [M/leaf, leaf, k]
        index = nearest.indices
        blocks = x.view(-1, leaf, dim)
        sender = torch.gather(blocks[:, None].expand(-1, leaf, -1, -1), 2,
                              index[..., None].expand(-1, -1, -1, dim))  # [M/leaf, leaf, k, dim]
        receiver = blocks[:, :, None].expand_as(sender)
        offset = (torch.gather(pos[:, None].expand(-1, leaf, -1, -1), 2,
                               index[..., None].expand(-1, -1, -1, tree.dim))
                  - pos[:, :, None]).to(x.dtype)
        messages = self.message(torch.cat([receiver, sender, offset], dim=-1))
        messages = torch.where(valid[..., None], messages, 0)
        count = valid.sum(-1, keepdim=True).clamp(min=1)
        return x + (messages.sum(2) / count).reshape(-1, dim).to(x.dtype)
