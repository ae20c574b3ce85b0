"""The levels of the tree far field (docs/contract.md, section 3.1): blocks of `c * f^l` slots
counted from each cloud's first slot, one token per block, numbered level by level.

The layout (how many blocks each cloud has at each level, which token is whose child) depends
only on the cloud sizes, which the tree keeps on the host: it is computed there, with no device
sync, and moved to the device once. The counts and centers depend on the mask and positions
and are reduced on the device, level by level, from level 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class TreeLevels:
    """The far-field levels of one tree for `(compress_size, fanout, top_blocks)`.

    Attributes:
        compress_size (int): c, the slots of a level-0 block.
        fanout (int): f, the children of a block.
        top_blocks (int): the most blocks a cloud may have at the top level L.
        level_start (tuple[int, ...]): `L + 2` token numbers: level l's tokens are
            `level_start[l]:level_start[l + 1]`.
        cloud_blocks (tuple[tuple[int, ...], ...]): per level, the number of blocks of each
            cloud.
        children (tuple[torch.Tensor, ...]): per level l >= 1, int64 `[T_l, f]` token numbers of
            each block's children at level l - 1, -1 where a child does not exist.
        top_tokens (torch.Tensor): int64 `[B, T_L]` the level-L tokens of each cloud, -1 after.
        count (torch.Tensor): int64 `[T]`, the real slots of each block.
        center (torch.Tensor): `[T, dim]` (the tree's position dtype), the mean position of each
            block's real slots (0 for a block without one: never a key).
    """

    compress_size: int
    fanout: int
    top_blocks: int
    level_start: tuple[int, ...]
    cloud_blocks: tuple[tuple[int, ...], ...]
    children: tuple[torch.Tensor, ...]
    top_tokens: torch.Tensor
    count: torch.Tensor
    center: torch.Tensor

    @property
    def top_level(self) -> int:
        """L, the coarsest level."""
        return len(self.level_start) - 2

    @property
    def num_tokens(self) -> int:
        """T, the tokens of all levels."""
        return self.level_start[-1]

    @property
    def max_top(self) -> int:
        """T_L, the largest number of level-L blocks in one cloud."""
        return max(self.cloud_blocks[-1], default=0)

    def max_cut(self, top_k: int) -> int:
        """The widest cut a descent keeping `top_k` blocks per level can leave."""
        return max(0, self.max_top - top_k) + self.top_level * top_k * (self.fanout - 1)


def build_levels(tree, compress_size: int, fanout: int, top_blocks: int) -> TreeLevels:
    """The levels of `tree`; called through `tree.levels(...)`, which caches them."""
    c, f = compress_size, fanout
    sizes = np.diff(np.asarray(tree.offsets_list, dtype=np.int64))
    cloud_blocks = [-(-sizes // c)]  # ceil: a cloud's last block may be short
    while cloud_blocks[-1].max(initial=0) > top_blocks:
        cloud_blocks.append(-(-cloud_blocks[-1] // f))
    level_start = np.cumsum([0] + [int(n.sum()) for n in cloud_blocks])

    device = tree.device
    children = []
    for level in range(1, len(cloud_blocks)):
        fine, coarse = cloud_blocks[level - 1], cloud_blocks[level]
        fine_first = level_start[level - 1] + np.concatenate([[0], np.cumsum(fine)[:-1]])
        # Block j of cloud b has children j*f + t, t < f, that exist in cloud b.
        cloud = np.repeat(np.arange(len(coarse)), coarse)
        j = np.arange(int(coarse.sum())) - np.repeat(np.cumsum(coarse) - coarse, coarse)
        child = j[:, None] * f + np.arange(f)[None, :]
        exists = child < fine[cloud][:, None]
        numbers = np.where(exists, fine_first[cloud][:, None] + child, -1)
        children.append(torch.from_numpy(numbers).to(device))

    top = cloud_blocks[-1]
    top_first = level_start[-2] + np.concatenate([[0], np.cumsum(top)[:-1]])
    width = int(top.max(initial=0))
    places = np.arange(width)[None, :]
    top_tokens = np.where(places < top[:, None], top_first[:, None] + places, -1)

    count, center = _counts_and_centers(tree, c, children, level_start)
    return TreeLevels(
        compress_size=c, fanout=f, top_blocks=top_blocks,
        level_start=tuple(int(x) for x in level_start),
        cloud_blocks=tuple(tuple(int(x) for x in n) for n in cloud_blocks),
        children=tuple(children),
        top_tokens=torch.from_numpy(top_tokens).to(device),
        count=count, center=center,
    )


def _counts_and_centers(tree, c: int, children, level_start) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-slot counts and mean real positions of every token, level 0 up: a parent sums its
    children's counts and position sums (in float64, then rounded once to the tree's dtype)."""
    count = [tree.mask.view(-1, c).sum(1)]
    position_sum = [torch.where(tree.mask.view(-1, c, 1), tree.pos.view(-1, c, tree.dim)
                                .double(), 0).sum(1)]
    for level, numbers in enumerate(children, start=1):
        first = int(level_start[level - 1])
        count.append(sum_children(count[-1], numbers, first))
        position_sum.append(sum_children(position_sum[-1], numbers, first))
    count = torch.cat(count)
    center = torch.cat(position_sum) / count.clamp(min=1)[:, None]
    return count, center.to(tree.pos.dtype)


def sum_children(x: torch.Tensor, numbers: torch.Tensor, first: int) -> torch.Tensor:
    """`x` `[T_(l-1), ...]`, one row per block of level l - 1 (whose first token is `first`),
    summed over each level-l block's children `numbers` `[T_l, f]` (token numbers, -1 none).
    A gather and a sum: deterministic, and differentiable for the tokens' gradients."""
    local = torch.where(numbers >= 0, numbers - first, x.shape[0])
    padded = torch.cat([x, torch.zeros_like(x[:1])])
    return padded[local].sum(1)
