"""The `BallTree`: slot layout of a batch of point clouds, stored as flat tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._checks import check_int, check_power_of_two
from .levels import TreeLevels, build_levels


@dataclass(frozen=True, eq=False)
class BallTree:
    """Points of a batch of clouds reordered into slots; see docs/contract.md, section 2.

    Attributes:
        perm (torch.Tensor): int64 `[M]`, slot -> index of its point in the input.
        mask (torch.Tensor): bool `[M]`, True on exactly one slot per input point.
        offsets (torch.Tensor): int64 `[B + 1]`, slots of cloud b are `offsets[b]:offsets[b+1]`.
        pos (torch.Tensor): `[M, dim]` positions in slot order, dtype of the input.
        ball_size (int): P, the largest block size any op on this tree may use.
        rotation_perms (torch.Tensor): int64 `[R, M]`, slot orderings of the rotated trees.
        offsets_list (tuple[int, ...]): `offsets` on the host, so that ops can size their work
            without a device sync.
        num_points (int): N, the number of input points (real slots).
        ordering (int | None): None for the tree `build_tree` returns; r for the tree of its
            rotated ordering r (`rotated_tree(r)`), which has no further orderings.
    """

    perm: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    pos: torch.Tensor
    ball_size: int
    rotation_perms: torch.Tensor
    offsets_list: tuple[int, ...]
    num_points: int
    ordering: int | None = None
    # Derived tensors (slot_cloud, centers per block size, rotated trees), computed once per tree.
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_slots(self) -> int:
        """M, the number of slots (real and padding)."""
        return self.perm.shape[0]

    @property
    def num_clouds(self) -> int:
        """B, the number of clouds: `batch.max() + 1` (1 without `batch`), empty ones included."""
        return len(self.offsets_list) - 1

    @property
    def rotations(self) -> int:
        """R, the number of rotated orderings."""
        return self.rotation_perms.shape[0]

    @property
    def device(self) -> torch.device:
        """The device of every tensor of the tree."""
        return self.perm.device

    @property
    def dim(self) -> int:
        """The number of coordinates of each position."""
        return self.pos.shape[1]

    @property
    def slot_cloud(self) -> torch.Tensor:
        """int64 `[M]`: the cloud id of each slot."""
        if "slot_cloud" not in self._cache:
            sizes = self.offsets[1:] - self.offsets[:-1]
            ids = torch.arange(self.num_clouds, device=self.device)
            self._cache["slot_cloud"] = torch.repeat_interleave(ids, sizes,
                                                                output_size=self.num_slots)
        return self._cache["slot_cloud"]

    def to_slots(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, ...]` point data -> `[M, ...]` slot data; padding slots repeat their real point."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[0] != self.num_points:
            raise ValueError(
                f"x must have shape (N, ...) with N = tree.num_points = {self.num_points}, "
                f"got {tuple(x.shape)}"
            )
        return x[self.perm.to(x.device)]

    def from_slots(self, y: torch.Tensor) -> torch.Tensor:
        """`[M, ...]` slot data -> `[N, ...]` point data, taken from each point's real slot."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.ndim < 1 or y.shape[0] != self.num_slots:
            raise ValueError(
                f"y must have shape (M, ...) with M = tree.num_slots = {self.num_slots}, "
                f"got {tuple(y.shape)}"
            )
        return y[self.point_slot.to(y.device)]

    @property
    def point_slot(self) -> torch.Tensor:
        """int64 `[N]`: the real slot of each input point (the inverse of `perm` on real slots).

        Formed by a max-scatter rather than boolean indexing: no host sync (a training step
        calls `from_slots` every time) and nothing torch.compile must break its graph for."""
        if "point_slot" not in self._cache:
            slots = torch.arange(self.num_slots, device=self.device)
            real_slot = torch.where(self.mask, slots, -1)
            point_slot = torch.full((self.num_points,), -1, dtype=torch.int64, device=self.device)
            self._cache["point_slot"] = point_slot.scatter_reduce_(0, self.perm, real_slot, "amax")
        return self._cache["point_slot"]

    def centers(self, block_size: int) -> torch.Tensor:
        """`[M / block_size, dim]`: mean position of the real slots of each aligned block.

        A block without a real slot gets the mean of all its slots (padding repeats real
        points, so this is still a point of the cloud's hull); such blocks are never keys.
        """
        check_power_of_two("block_size", block_size, maximum=self.ball_size)
        if ("centers", block_size) not in self._cache:
            pos = self.pos.view(-1, block_size, self.dim)
            weight = self.mask.view(-1, block_size, 1).to(pos.dtype)
            count = weight.sum(1)
            real_mean = (pos * weight).sum(1) / count.clamp(min=1)
            self._cache[("centers", block_size)] = torch.where(count > 0, real_mean, pos.mean(1))
        return self._cache[("centers", block_size)]

    def levels(self, compress_size: int, fanout: int = 4, top_blocks: int = 256) -> TreeLevels:
        """The levels of the tree far field (docs/contract.md, section 3.1): blocks of
        `compress_size * fanout^l` slots from each cloud's start, up to the first level where no
        cloud has more than `top_blocks`; their layout, real-slot counts and centers.

        Computed once per argument triple, from the host's `offsets_list` (no device sync), and
        cached with the tree.
        """
        check_power_of_two("compress_size", compress_size, maximum=self.ball_size)
        check_power_of_two("fanout", fanout)
        if fanout < 2:
            raise ValueError(f"fanout must be a power of two >= 2, got {fanout}")
        check_int("top_blocks", top_blocks, minimum=1)
        key = ("levels", compress_size, fanout, top_blocks)
        if key not in self._cache:
            self._cache[key] = build_levels(self, compress_size, fanout, top_blocks)
        return self._cache[key]

    def rotated(self, r: int) -> torch.Tensor:
        """int64 `[M]`: `x[tree.rotated(r)]` puts slot-ordered data into rotated ordering r."""
        self._check_ordering(r)
        return self.rotation_perms[r]

    def unrotated(self, r: int) -> torch.Tensor:
        """int64 `[M]`, the inverse of `rotated(r)`: `y[tree.unrotated(r)]` puts data of
        rotated ordering r back into slot order."""
        self._check_ordering(r)
        if ("unrotated", r) not in self._cache:
            order = self.rotation_perms[r]
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.shape[0], device=order.device)
            self._cache[("unrotated", r)] = inverse
        return self._cache[("unrotated", r)]

    def rotated_tree(self, r: int) -> BallTree:
        """The tree of rotated ordering r over the same slots: same slot count, offsets, ball
        size and padding slots, with `perm`, `mask`, `pos` and `centers(c)` in ordering r.

        Every op called with it on data in ordering r (`x[tree.rotated(r)]`) is right, and
        `tree.rotated_tree(r).to_slots(x)` equals `tree.to_slots(x)[tree.rotated(r)]`. No
        rebuild: the fields are gathered once and cached with this tree.
        """
        order = self.rotated(r)
        if ("rotated_tree", r) not in self._cache:
            self._cache[("rotated_tree", r)] = BallTree(
                perm=self.perm[order],
                mask=self.mask[order],
                offsets=self.offsets,
                pos=self.pos[order],
                ball_size=self.ball_size,
                rotation_perms=self.rotation_perms[:0],
                offsets_list=self.offsets_list,
                num_points=self.num_points,
                ordering=r,
            )
        return self._cache[("rotated_tree", r)]

    def _check_ordering(self, r: object) -> None:
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"r must be an int, got {type(r).__name__}")
        if self.ordering is not None:
            raise ValueError(
                f"this is the tree of rotated ordering {self.ordering}, which has no orderings of "
                "its own: call rotated, unrotated or rotated_tree on the tree build_tree returned"
            )
        if not 0 <= r < self.rotations:
            raise ValueError(
                f"r must be in [0, tree.rotations) = [0, {self.rotations}), got {r} "
                "(build the tree with rotations=R to get R rotated orderings)"
            )

    def to(self, device: torch.device | str) -> BallTree:
        """The same tree with its tensors on `device`."""
        return BallTree(
            perm=self.perm.to(device),
            mask=self.mask.to(device),
            offsets=self.offsets.to(device),
            pos=self.pos.to(device),
            ball_size=self.ball_size,
            rotation_perms=self.rotation_perms.to(device),
            offsets_list=self.offsets_list,
            num_points=self.num_points,
            ordering=self.ordering,
        )

    def __repr__(self) -> str:
        return (
            f"BallTree(num_points={self.num_points}, num_slots={self.num_slots}, "
            f"num_clouds={self.num_clouds}, dim={self.dim}, ball_size={self.ball_size}, "
            f"rotations={self.rotations}, "
            + ("" if self.ordering is None else f"ordering={self.ordering}, ")
            + f"device={self.device})"
        )

