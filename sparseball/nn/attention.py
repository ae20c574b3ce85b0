"""Attention layers over slot-ordered point features: Native Sparse Attention on the ball tree
(`BallNSA`) and the two baselines a study compares it with, local ball attention
(`BallAttention`, Erwin's flat attention) and exact attention inside each cloud
(`CloudAttention`). All three take `[M, dim]` features in the slot order of the tree they are
given (a `rotated_tree(r)` for data in rotated ordering r) and return the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import sparseball

__all__ = ["BallAttention", "BallNSA", "CloudAttention"]


def _offset_from_block_centre(tree, block_size: int) -> torch.Tensor:
    """`[M, dim]`: each slot's position minus the centre of its aligned `block_size`-block."""
    centre = tree.centers(block_size).repeat_interleave(block_size, dim=0,
                                                        output_size=tree.num_slots)
    return tree.pos - centre


class _PointAttention(nn.Module):
    """What every attention layer here shares: Erwin's relative position encoding
    (`x + Linear(p - centre of the point's ball)`), the q, k, v and output projections."""

    def __init__(self, dim: int, heads: int, *, ball_size: int, pos_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads = {heads}, got {dim}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.ball_size = ball_size
        self.relative_position = nn.Linear(pos_dim, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _check(self, x: torch.Tensor, tree) -> None:
        if torch.compiler.is_compiling():
            return
        if x.ndim != 2 or x.shape != (tree.num_slots, self.dim):
            raise ValueError(f"x must have shape (M, dim) = ({tree.num_slots}, {self.dim}), "
                             f"got {tuple(x.shape)}")
        if tree.ball_size < self.ball_size:
            raise ValueError(f"the tree's ball_size must be >= the layer's ball_size = "
                             f"{self.ball_size}, got {tree.ball_size}")

    def _qkv(self, x: torch.Tensor, tree) -> tuple[torch.Tensor, ...]:
        """q, k, v `[M, H, D]` of features `x` `[M, dim]` with the relative position added."""
        offset = _offset_from_block_centre(tree, self.ball_size)
        x = x + self.relative_position(offset.to(self.relative_position.weight.dtype))
        return self.qkv(x).view(-1, 3, self.heads, self.head_dim).unbind(1)


class BallNSA(_PointAttention):
    """Native Sparse Attention on a ball tree, as Erwin NSA builds it.

    Three branches mixed by per-point gates `sigmoid(Linear(x))`: compressed (queries attend
    to learned summaries of `compress_size`-blocks of their cloud), selected (each group of
    `group_size` neighbouring queries attends to the points of its `top_k` most relevant
    `select_size`-blocks) and local (each point attends to its own `ball_size`-ball). The
    gates start local first (biases -2, -2, +2). Every branch adds the learned distance bias
    `sigma[h] * ||p_i - p_key||` (sigma float32, initialised to `sigma_init`).

    Compression: NSA's learned block summary. Each key (value) of a block gets an encoding of
    its position relative to the block's centre, and a linear map of the block's `c` keys
    flattened, `[c * D] -> [D]`, is added to the block's mean; it starts at zero, so the layer
    starts from mean pooling. One map serves keys and values of every head, which keeps the
    layer within a few percent of `BallAttention`'s parameters (a fair baseline).
    `compression="mean"` keeps the mean only. Padding slots enter neither.

    Args:
        dim (int): feature width, a multiple of `heads`.
        heads (int): attention heads; `dim // heads` is the head dim (>= 16 keeps the kernels
            on full tensor-core tiles).
        ball_size (int): ball of the local branch (powers of two <= the tree's `ball_size`,
            as every size here).
        compress_size (int): block size of the compressed branch.
        select_size (int): size of the blocks the selection branch picks.
        group_size (int): queries that share one selection.
        top_k (int): blocks each group selects.
        compression (str): `"mlp"` (learned, the default) or `"mean"`.
        pos_dim (int): coordinates per point.
        sigma_init (float): initial distance-bias slope of every head (negative: near first).
        backend (str): the `sparseball` backend of every op.
        far_field (str): `"flat"` (NSA: every compressed block of the cloud) or `"tree"` (the
            descent over coarser levels, O(N log N); `select_size` must equal
            `compress_size`): see `sparseball.attention`.
        fanout (int): `far_field="tree"`: children per block.
        top_blocks (int): `far_field="tree"`: the most blocks a cloud has at the top level.
    """

    def __init__(self, dim: int, heads: int, *, ball_size: int = 128, compress_size: int = 32,
                 select_size: int = 64, group_size: int = 64, top_k: int = 8,
                 compression: str = "mlp", pos_dim: int = 3, sigma_init: float = -1.0,
                 backend: str = "auto", far_field: str = "flat", fanout: int = 4,
                 top_blocks: int = 256):
        super().__init__(dim, heads, ball_size=ball_size, pos_dim=pos_dim)
        if compression not in ("mlp", "mean"):
            raise ValueError(f"compression must be 'mlp' or 'mean', got {compression!r}")
        self.compress_size, self.select_size = compress_size, select_size
        self.group_size, self.top_k, self.backend = group_size, top_k, backend
        if far_field not in ("flat", "tree"):
            raise ValueError(f"far_field must be 'flat' or 'tree', got {far_field!r}")
        if far_field == "tree" and select_size != compress_size:
            raise ValueError(f"select_size must equal compress_size = {compress_size} with "
                             f"far_field='tree', got {select_size}")
        self.far_field, self.fanout, self.top_blocks = far_field, fanout, top_blocks
        self.sigma = nn.Parameter(torch.full((heads,), float(sigma_init)))
        self.gate = nn.Linear(dim, 3 * heads)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([-2.0, -2.0, 2.0]).repeat(heads))
        self.compressor = None
        if compression == "mlp":
            self.block_position = nn.Linear(pos_dim, self.head_dim)
            self.compressor = nn.Linear(compress_size * self.head_dim, self.head_dim)
            nn.init.zeros_(self.compressor.weight)
            nn.init.zeros_(self.compressor.bias)

    def forward(self, x: torch.Tensor, tree) -> torch.Tensor:
        """`x` `[M, dim]` in the slot order of `tree` -> `[M, dim]`."""
        self._check(x, tree)
        q, k, v = self._qkv(x, tree)
        gates = torch.sigmoid(self.gate(x).float()).view(-1, self.heads, 3)
        # Keys and values as one tensor of 2H heads: one compress launch and one matmul.
        k_cmp, v_cmp = self._compress(torch.cat([k, v], dim=1), tree).chunk(2, dim=1)
        out = sparseball.attention(
            q, k, v, tree, gates=gates, sigma=self.sigma, ball_size=self.ball_size,
            compress_size=self.compress_size, select_size=self.select_size,
            group_size=self.group_size, top_k=self.top_k, k_cmp=k_cmp, v_cmp=v_cmp,
            backend=self.backend, far_field=self.far_field, fanout=self.fanout,
            top_blocks=self.top_blocks)
        return self.proj(out.reshape(x.shape[0], self.dim))

    def _compress(self, x: torch.Tensor, tree) -> torch.Tensor:
        """Block summaries `[M / c, heads, D]` of keys or values `x` `[M, heads, D]`."""
        c = self.compress_size
        mean = sparseball.ops.compress(x, tree, c, backend=self.backend)
        if self.compressor is None:
            return mean
        offset = _offset_from_block_centre(tree, c)
        offset = self.block_position(offset.to(self.block_position.weight.dtype))
        real = tree.mask.view(-1, 1, 1)
        # `where`: padding slots never act, whatever they hold.
        members = torch.where(real, x + offset[:, None, :].to(x.dtype), 0)
        blocks = members.view(-1, c, x.shape[1], self.head_dim).transpose(1, 2)
        learned = self.compressor(blocks.reshape(*blocks.shape[:2], -1))
        return mean + learned.to(mean.dtype)


class BallAttention(_PointAttention):
    """Local ball attention only (Erwin's flat attention): each point attends to the points
    of its own `ball_size`-ball, with the learned distance bias `sigma`. The NSA ablation."""

    def __init__(self, dim: int, heads: int, *, ball_size: int = 128, pos_dim: int = 3,
                 sigma_init: float = -1.0, backend: str = "auto"):
        super().__init__(dim, heads, ball_size=ball_size, pos_dim=pos_dim)
        self.backend = backend
        self.sigma = nn.Parameter(torch.full((heads,), float(sigma_init)))

    def forward(self, x: torch.Tensor, tree) -> torch.Tensor:
        """`x` `[M, dim]` in the slot order of `tree` -> `[M, dim]`."""
        self._check(x, tree)
        q, k, v = self._qkv(x, tree)
        out = sparseball.ops.ball_attention(q, k, v, tree, self.ball_size, self.sigma,
                                            backend=self.backend)
        return self.proj(out.reshape(x.shape[0], self.dim))


class CloudAttention(_PointAttention):
    """Exact attention of every point to every real point of its cloud, with the same learned
    distance bias `sigma[h] * ||p_i - p_j||` as the other layers: the quadratic upper
    baseline, the attention that NSA approximates.

    PyTorch SDPA with the bias as a dense float mask (its memory-efficient kernel), one call
    per block of at most `bias_elements` query-key pairs per head, so that the bias never
    costs more than that (a 65,536-point cloud takes blocks of 4,096 queries). Padding slots
    get -inf in the mask: they are never keys. `distance_bias=False` drops the bias (and
    `sigma`), which lets SDPA take its flash kernel on clouds without padding.
    """

    def __init__(self, dim: int, heads: int, *, ball_size: int = 128, pos_dim: int = 3,
                 sigma_init: float = -1.0, distance_bias: bool = True,
                 bias_elements: int = 1 << 28):
        super().__init__(dim, heads, ball_size=ball_size, pos_dim=pos_dim)
        self.sigma = (nn.Parameter(torch.full((heads,), float(sigma_init)))
                      if distance_bias else None)
        self.bias_elements = bias_elements

    def forward(self, x: torch.Tensor, tree) -> torch.Tensor:
        """`x` `[M, dim]` in the slot order of `tree` -> `[M, dim]`."""
        self._check(x, tree)
        # [1, H, M, D]: SDPA's fused kernels (flash, memory-efficient) want 4-D inputs; 3-D
        # ones fall back to the math path, which stores every [n, n] score matrix.
        q, k, v = (t.transpose(0, 1)[None] for t in self._qkv(x, tree))
        offsets = tree.offsets_list
        has_padding = tree.num_points < tree.num_slots
        pos = tree.pos.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        outs = []
        for start, end in zip(offsets[:-1], offsets[1:], strict=True):
            if end == start:
                continue
            keys = slice(start, end)
            rows = max(1, self.bias_elements // (self.heads * (end - start)))
            for first in range(start, end, rows):
                queries = slice(first, min(first + rows, end))
                mask = None
                if self.sigma is not None:
                    distance = torch.cdist(pos[queries], pos[keys])
                    mask = (self.sigma.view(-1, 1, 1) * distance)[None].to(q.dtype)
                if has_padding:
                    real = tree.mask[keys].view(1, 1, 1, -1)
                    mask = (real if mask is None
                            else mask.masked_fill(~real, float("-inf")))
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, queries], k[:, :, keys], v[:, :, keys], attn_mask=mask))
        out = torch.cat(outs, dim=2)[0].transpose(0, 1)
        return self.proj(out.reshape(x.shape[0], self.dim))
