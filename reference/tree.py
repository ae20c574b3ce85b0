"""The tree oracle: docs/contract.md section 2 as plain recursion over numpy arrays.

Slow and obvious on purpose; every builder must match it slot for slot.
"""

from __future__ import annotations

import numpy as np

from sparseball.tree.rotations import rotation_matrix


def build_tree_reference(
    pos: np.ndarray, batch: np.ndarray, num_clouds: int, ball_size: int, rotations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the ball tree of a batch of clouds by the contract's split rule.

    Args:
        pos: `(N, dim)` float32 or float64 positions.
        batch: `(N,)` int64 cloud id of each point, in `[0, num_clouds)`, any order.
        num_clouds: B.
        ball_size: P, a power of two >= 2.
        rotations: R, the number of rotated orderings.

    Returns:
        perm `(M,)` int64, mask `(M,)` bool, offsets `(B + 1,)` int64 and rotation_perms
        `(R, M)` int64, as in `BallTree`.
    """
    pos64 = np.asarray(pos, dtype=np.float64)
    batch = np.asarray(batch, dtype=np.int64)
    counts = np.bincount(batch, minlength=num_clouds)
    sizes = ball_size * ((counts + ball_size - 1) // ball_size)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    num_slots = int(offsets[-1])

    perm = np.full(num_slots, -1, dtype=np.int64)
    for b in range(num_clouds):
        points = np.flatnonzero(batch == b)
        _split(pos64, points, int(offsets[b]), int(sizes[b]), ball_size, perm)
    mask = perm >= 0
    _fill_padding(perm, mask, ball_size)

    rotation_perms = np.empty((rotations, num_slots), dtype=np.int64)
    slot_pos = pos64[perm]
    for r in range(rotations):
        rotated = _rotate(slot_pos, rotation_matrix(r, pos64.shape[1]))
        for b in range(num_clouds):
            slots = np.arange(offsets[b], offsets[b + 1])
            _split(rotated, slots, int(offsets[b]), int(sizes[b]), ball_size, rotation_perms[r])
    return perm, mask, offsets, rotation_perms


def _split(pos: np.ndarray, points: np.ndarray, start: int, size: int, ball_size: int,
           out: np.ndarray) -> None:
    """Place `points` (indices into `pos`) into the `size` slots from `start` of `out`."""
    if size <= 1:  # a cloud without points has no slots; a one-slot node holds <= 1 point
        if len(points) == 1:
            out[start] = points[0]
        return
    coords = pos[points]
    axis = 0
    if len(points) >= 2:
        spread = coords.max(axis=0) - coords.min(axis=0)
        axis = int(np.argmax(spread))  # the first maximum: ties go to the lowest axis
    order = points[np.lexsort((points, coords[:, axis]))]
    if size <= ball_size:
        left_size, num_left = size // 2, len(points) // 2
    else:
        balls = size // ball_size
        left_size = (balls // 2) * ball_size
        num_left = len(points) * (balls // 2) // balls
    _split(pos, order[:num_left], start, left_size, ball_size, out)
    _split(pos, order[num_left:], start + left_size, size - left_size, ball_size, out)


def _fill_padding(perm: np.ndarray, mask: np.ndarray, ball_size: int) -> None:
    """Each padding slot repeats the first real slot of its smallest aligned block holding one."""
    for slot in np.flatnonzero(~mask):
        block = 2
        while True:
            start = slot - slot % block
            real = np.flatnonzero(mask[start:start + block])
            if len(real):
                perm[slot] = perm[start + real[0]]
                break
            block *= 2


def _rotate(pos: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """`pos @ rotation.T`, summed over k in ascending order without fused multiply-adds.

    Spelled out so that every builder can reproduce the rounding bit for bit (a BLAS matmul
    may reorder the sum or fuse it).
    """
    out = pos[:, :1] * rotation[:, 0]
    for k in range(1, pos.shape[1]):
        out = out + pos[:, k:k + 1] * rotation[:, k]
    return out
