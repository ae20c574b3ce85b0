"""`ErwinNSA`: an Erwin-style point-cloud transformer whose attention is Native Sparse
Attention on the ball tree, with its two baselines (ball-only and full attention) on the same
backbone."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import sparseball
from sparseball.nn import (
    BallAttention,
    BallNSA,
    CloudAttention,
    FourierFeatures,
    LeafMessagePassing,
    SwiGLU,
)

__all__ = ["ErwinNSA", "ATTENTIONS"]

ATTENTIONS = ("nsa", "ball", "full")


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + SwiGLU(norm(x))`."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: float):
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim)
        self.attention = attention
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(mlp_ratio * dim))

    def forward(self, x: torch.Tensor, tree) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), tree)
        return x + self.mlp(self.mlp_norm(x))


class ErwinNSA(nn.Module):
    """Point features and positions -> per-point predictions, through `depth` transformer
    blocks on a ball tree. Even blocks run on the tree's slot order, odd blocks on its rotated
    ordering (`rotations=1`), as Erwin does, so information crosses ball boundaries.

    Defaults (dim 128, 8 heads: head dim 16, the smallest full tensor-core tile of the kernels;
    balls of 128; NSA with compressed blocks of 32, top 8 of 64-blocks for groups of 64) suit
    clouds of thousands to millions of points. Every size must divide `ball_size`.

    Args:
        in_dim (int): input features per point.
        out_dim (int): outputs per point.
        dim (int): width of the residual stream.
        depth (int): transformer blocks.
        heads (int): attention heads (`dim // heads` >= 16 recommended).
        attention (str): `"nsa"` (`BallNSA`), `"ball"` (`BallAttention`, local only) or
            `"full"` (`CloudAttention`, exact inside each cloud): the model and its two
            baselines, whose parameter counts differ by a few percent (the gates and the
            compression MLP of NSA).
        ball_size (int): the tree's ball size and the local attention's ball.
        compress_size (int): block size of the compressed branch.
        select_size (int): size of the blocks the selection branch picks.
        group_size (int): queries that share one selection.
        top_k (int): blocks each group selects.
        compression (str): `"mlp"` (learned block summaries) or `"mean"`.
        pos_dim (int): coordinates per point.
        frequencies (int): Fourier frequencies of the position embedding (0: none).
        position_scale (float): the largest length scale the Fourier features resolve.
        message_passing (bool): one round of messages between nearest neighbours inside each
            16-slot leaf before the blocks.
        mlp_ratio (float): SwiGLU hidden width over `dim`.
        rotate (bool): odd blocks on the rotated ordering.
        checkpoint (bool): recompute each block in the backward pass (activation
            checkpointing: memory of one block instead of `depth`).
        backend (str): the `sparseball` backend of the attention ops.
        far_field (str): nsa: `"flat"` or `"tree"` (`BallNSA`'s global branches).
        fanout (int): nsa with `far_field="tree"`: children per block.
        top_blocks (int): nsa with `far_field="tree"`: the most blocks per cloud at the top.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dim: int = 128, depth: int = 4,
                 heads: int = 8, attention: str = "nsa", ball_size: int = 128,
                 compress_size: int = 32, select_size: int = 64, group_size: int = 64,
                 top_k: int = 8, compression: str = "mlp", pos_dim: int = 3,
                 frequencies: int = 8, position_scale: float = 1.0,
                 message_passing: bool = False, mlp_ratio: float = 3.0, rotate: bool = True,
                 checkpoint: bool = False, backend: str = "auto", far_field: str = "flat",
                 fanout: int = 4, top_blocks: int = 256):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        for name, size in (("compress_size", compress_size), ("select_size", select_size),
                           ("group_size", group_size)):
            if attention == "nsa" and size > ball_size:
                raise ValueError(f"{name} must be <= ball_size = {ball_size}, got {size}")
        self.attention_kind, self.ball_size, self.pos_dim = attention, ball_size, pos_dim
        self.in_dim = in_dim
        self.rotate, self.checkpoint = rotate, checkpoint
        self.fourier = FourierFeatures(pos_dim, frequencies, position_scale) if frequencies else None
        features = in_dim + pos_dim + (self.fourier.out_dim if self.fourier else 0)
        self.embed = nn.Linear(features, dim)
        self.message_passing = (LeafMessagePassing(dim, leaf_size=min(16, ball_size),
                                                   neighbours=min(8, ball_size // 2),
                                                   pos_dim=pos_dim)
                                if message_passing else None)

        def make_attention() -> nn.Module:
            if attention == "nsa":
                return BallNSA(dim, heads, ball_size=ball_size, compress_size=compress_size,
                               select_size=select_size, group_size=group_size, top_k=top_k,
                               compression=compression, pos_dim=pos_dim, backend=backend,
                               far_field=far_field, fanout=fanout, top_blocks=top_blocks)
            if attention == "ball":
                return BallAttention(dim, heads, ball_size=ball_size, pos_dim=pos_dim,
                                     backend=backend)
            return CloudAttention(dim, heads, ball_size=ball_size, pos_dim=pos_dim)

        self.blocks = nn.ModuleList(Block(dim, make_attention(), mlp_ratio) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def build_tree(self, pos: torch.Tensor, batch: torch.Tensor | None = None):
        """The tree `forward` builds when given none: `ball_size` balls, one rotated ordering
        when the model rotates (CuPy on CUDA tensors: no host round trip of the points)."""
        return _build_tree(pos.detach(), batch, self.ball_size, int(self.rotate))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor | None = None,
                tree=None) -> torch.Tensor:
        """Per-point predictions.

        Args:
            x (torch.Tensor): features `[N, in_dim]`.
            pos (torch.Tensor): positions `[N, pos_dim]`.
            batch (torch.Tensor | None): cloud id of each point `[N]` (None: one cloud).
            tree (BallTree | None): a tree of `pos, batch` with ball size `>= ball_size` (and
                a rotated ordering when the model rotates); built here when None.

        Returns:
            torch.Tensor: `[N, out_dim]` in the input's point order.
        """
        if not torch.compiler.is_compiling():
            self._check(x, pos, tree)
        if tree is None:
            tree = self.build_tree(pos, batch)
        features = [x, pos.to(x.dtype)]
        if self.fourier is not None:
            features.append(self.fourier(pos).to(x.dtype))
        # The residual stream stays float32 under autocast (the blocks' half-precision outputs
        # are added to it): RMSNorm then meets its float32 weight (a bfloat16 input misses
        # the fused kernel) and the sums of `depth` blocks keep their digits.
        h = self.embed(tree.to_slots(torch.cat(features, dim=-1))).float()
        if self.message_passing is not None:
            h = self.message_passing(h, tree)
        orderings = [tree, tree.rotated_tree(0)] if self.rotate else [tree]
        current = 0
        for i, block in enumerate(self.blocks):
            wanted = i % len(orderings)
            if wanted != current:
                h = h[tree.rotated(0)] if wanted == 1 else h[tree.unrotated(0)]
                current = wanted
            if self.checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, orderings[wanted], use_reentrant=False)
            else:
                h = block(h, orderings[wanted])
        if current:
            h = h[tree.unrotated(0)]
        return self.head(self.norm(tree.from_slots(h)))

    def _check(self, x, pos, tree) -> None:
        if pos.ndim != 2 or pos.shape[1] != self.pos_dim:
            raise ValueError(f"pos must have shape (N, pos_dim) = (N, {self.pos_dim}), "
                             f"got {tuple(pos.shape)}")
        if x.ndim != 2 or x.shape != (pos.shape[0], self.in_dim):
            raise ValueError(f"x must have shape (N, in_dim) = ({pos.shape[0]}, {self.in_dim}), "
                             f"got {tuple(x.shape)}")
        if tree is not None:
            if tree.num_points != pos.shape[0]:
                raise ValueError(f"tree must be built on the {pos.shape[0]} points of pos, got "
                                 f"a tree of {tree.num_points}")
            if tree.ball_size < self.ball_size:
                raise ValueError(f"tree must have ball_size >= {self.ball_size}, got "
                                 f"{tree.ball_size}")
            if self.rotate and tree.rotations < 1:
                raise ValueError("tree must have a rotated ordering (rotations=1) for a model "
                                 "that rotates")


def _build_tree(pos, batch, ball_size, rotations):
    if torch.compiler.is_compiling():
        # A deliberate graph break under torch.compile: the builder runs CuPy and Numba code
        # that dynamo cannot trace. Its outputs are plain tensors and host ints, so the graphs
        # on either side are the same for every batch of the same sizes (no recompiles).
        # Wrapped here, not by a decorator: `torch.compiler.disable` imports dynamo (and
        # triton), which `import sparseball.models` should not.
        return torch.compiler.disable(sparseball.build_tree)(pos, batch, ball_size=ball_size,
                                                             rotations=rotations)
    return sparseball.build_tree(pos, batch, ball_size=ball_size, rotations=rotations)
