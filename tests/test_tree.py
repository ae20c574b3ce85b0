"""The ball tree (docs/contract.md, section 2): invariants 1-5 checked directly on the trees
`sparseball.build_tree` builds, slot-for-slot equality with `reference/tree.py`, the rotated
orderings, the `BallTree` methods and the argument errors.

Hypothesis draws the structure of a batch (dim, P, cloud sizes, point layout) and a seed for
its coordinates; the profile (SPARSEBALL_HYPOTHESIS) is loaded in conftest.py.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseball
from reference.tree import build_tree_reference
from sparseball.tree import numba_builder, rotation_matrix

BALL_SIZES = (2, 4, 8, 16, 32, 64)
LAYOUTS = ("random", "duplicates", "collinear", "identical", "grid", "signed zeros")


# Inputs


@st.composite
def batches(draw, max_points=320):
    """(pos `(N, dim)`, batch `(N,)` unsorted with unused ids, P) as numpy arrays."""
    ball_size = draw(st.sampled_from(BALL_SIZES))
    dim = draw(st.integers(1, 4))
    sizes = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(("empty", "one", "below", "multiple", "odd")))
        if kind == "empty":
            sizes.append(0)
        elif kind == "one":
            sizes.append(1)
        elif kind == "below":
            sizes.append(draw(st.integers(1, max(1, ball_size - 1))))
        elif kind == "multiple":
            k = draw(st.integers(1, max(1, 4 * 16 // ball_size)))
            sizes.append(max(1, k * ball_size + draw(st.integers(-1, 1))))
        else:
            sizes.append(2 * draw(st.integers(0, 60)) + 1)
    while sum(sizes) > max_points:
        sizes[int(np.argmax(sizes))] //= 2
    if sizes[-1] == 0:  # the last id must be used: B = batch.max() + 1
        sizes[-1] = 1
    return _points(sizes, dim, draw(st.sampled_from(LAYOUTS)),
                   draw(st.sampled_from((np.float32, np.float64))),
                   draw(st.sampled_from((0.0, 1e6, -3e5))),
                   draw(st.integers(0, 2**32 - 1))) + (ball_size,)


def _points(sizes, dim, layout, dtype, offset, seed):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    if layout == "random":
        pos = rng.normal(size=(n, dim)) * rng.uniform(0.1, 10, size=dim)
    elif layout == "duplicates":
        pos = rng.normal(size=(max(1, n // 4), dim))[rng.integers(0, max(1, n // 4), n)]
    elif layout == "collinear":
        pos = rng.normal(size=(n, 1)) * rng.normal(size=(1, dim)) + rng.normal(size=(1, dim))
    elif layout == "identical":
        pos = np.repeat(rng.normal(size=(1, dim)), n, axis=0)
    elif layout == "grid":
        pos = rng.integers(-3, 4, size=(n, dim)).astype(np.float64)
    else:  # -0.0 and 0.0 tie
        pos = rng.choice(np.array([-0.0, 0.0, 1.0]), size=(n, dim))
    batch = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    if offset:  # adding 0.0 would turn -0.0 into 0.0
        pos = pos + offset
    return pos.astype(dtype), batch


def _build(pos, batch, ball_size, rotations=0, backend="numba"):
    return sparseball.build_tree(torch.from_numpy(pos), torch.from_numpy(batch),
                                 ball_size=ball_size, rotations=rotations, backend=backend)


# Direct checks of the contract


def check_layout(tree, pos, batch, ball_size):
    """Invariant 1, the cloud ranges and the padding rule."""
    perm, mask, offsets = tree.perm.numpy(), tree.mask.numpy(), tree.offsets.numpy()
    counts = np.bincount(batch, minlength=tree.num_clouds)
    assert tree.num_clouds == batch.max() + 1
    assert tree.num_points == len(batch) and tree.ball_size == ball_size
    np.testing.assert_array_equal(np.diff(offsets), ball_size * -(-counts // ball_size))
    assert offsets[0] == 0 and offsets[-1] == tree.num_slots == len(perm) == len(mask)
    assert tree.offsets_list == tuple(offsets.tolist())
    # Exactly one real slot per point, and every slot of cloud b holds a point of cloud b.
    np.testing.assert_array_equal(np.sort(perm[mask]), np.arange(len(batch)))
    slot_cloud = tree.slot_cloud.numpy()
    np.testing.assert_array_equal(slot_cloud, np.repeat(np.arange(tree.num_clouds), np.diff(offsets)))
    np.testing.assert_array_equal(batch[perm], slot_cloud)
    np.testing.assert_array_equal(tree.pos.numpy(), pos[perm])
    assert tree.pos.dtype == torch.from_numpy(pos).dtype
    # A padding slot repeats the first real slot of its smallest aligned block holding one.
    for slot in np.flatnonzero(~mask):
        block = 2
        while not mask[slot - slot % block: slot - slot % block + block].any():
            block *= 2
        start = slot - slot % block
        first_real = start + np.flatnonzero(mask[start:start + block])[0]
        assert perm[slot] == perm[first_real], (slot, block)


def check_split_rule(coords, ids, real, offsets, ball_size):
    """Invariant 2 at every node of every cloud.

    coords: float64 `(M, dim)` position of each place; ids `(M,)` the tie-break of each place;
    real `(M,)` which places hold real points.
    """
    for b in range(len(offsets) - 1):
        nodes = [(int(offsets[b]), int(offsets[b + 1] - offsets[b]))]
        while nodes:
            start, size = nodes.pop()
            here = slice(start, start + size)
            n = int(real[here].sum())
            if size <= 1:
                assert n <= size
                continue
            points, keys = coords[here][real[here]], ids[here][real[here]]
            # The spread in float64; argmax takes the first (lowest) axis among ties.
            axis = int(np.argmax(points.max(0) - points.min(0))) if n >= 2 else 0
            if size <= ball_size:
                left_size, n_left = size // 2, n // 2
            else:
                balls = size // ball_size
                left_size, n_left = balls // 2 * ball_size, n * (balls // 2) // balls
            left = real[here].copy()
            left[left_size:] = False
            assert int(left.sum()) == n_left, (start, size, n, n_left)
            if 0 < n_left < n:
                side = left[real[here]]
                last_left = max(zip(points[side, axis], keys[side], strict=True))
                first_right = min(zip(points[~side, axis], keys[~side], strict=True))
                assert last_left < first_right, (start, size, axis)
            nodes += [(start, left_size), (start + left_size, size - left_size)]


def check_padding_spread(tree):
    """Invariant 3: aligned c-blocks hold >= c/2 real slots in clouds at least half real."""
    mask, offsets = tree.mask.numpy(), tree.offsets.numpy()
    for b in range(tree.num_clouds):
        cloud = mask[offsets[b]:offsets[b + 1]]
        if 2 * cloud.sum() < len(cloud):
            continue
        block = 2
        while block <= min(len(cloud), tree.ball_size):
            assert (cloud.reshape(-1, block).sum(1) >= block // 2).all(), (b, block)
            block *= 2


def rotated_coords(tree, pos, r):
    """float64 `(M, dim)`: slot positions rotated by ordering r's matrix (ascending-k sums)."""
    slot_pos = pos.astype(np.float64)[tree.perm.numpy()]
    rotation = rotation_matrix(r, pos.shape[1])
    out = slot_pos[:, :1] * rotation[:, 0]
    for k in range(1, pos.shape[1]):
        out = out + slot_pos[:, k:k + 1] * rotation[:, k]
    return out


def check_rotations(tree, pos):
    """Each ordering permutes every cloud's slots and follows the split rule on its slots."""
    offsets = tree.offsets.numpy()
    for r in range(tree.rotations):
        order = tree.rotated(r).numpy()
        assert order.dtype == np.int64
        for b in range(tree.num_clouds):
            np.testing.assert_array_equal(np.sort(order[offsets[b]:offsets[b + 1]]),
                                          np.arange(offsets[b], offsets[b + 1]))
        check_split_rule(rotated_coords(tree, pos, r)[order], order, np.ones(len(order), bool),
                         offsets, tree.ball_size)


def check_tree(tree, pos, batch, ball_size):
    check_layout(tree, pos, batch, ball_size)
    mask = tree.mask.numpy()
    check_split_rule(pos.astype(np.float64)[tree.perm.numpy()], tree.perm.numpy(), mask,
                     tree.offsets.numpy(), ball_size)
    check_padding_spread(tree)
    check_rotations(tree, pos)


def assert_same_as_reference(tree, pos, batch, ball_size, rotations):
    expected = build_tree_reference(pos, batch, int(batch.max()) + 1, ball_size, rotations)
    got = (tree.perm, tree.mask, tree.offsets, tree.rotation_perms)
    names = ("perm", "mask", "offsets", "rotation_perms")
    for name, want, have in zip(names, expected, got, strict=True):
        assert have.dtype == torch.from_numpy(want).dtype, name
        np.testing.assert_array_equal(have.numpy(), want, err_msg=name)


# Property tests


@given(batches(), st.integers(0, 2))
def test_invariants_and_reference(data, rotations):
    pos, batch, ball_size = data
    tree = _build(pos, batch, ball_size, rotations)
    check_tree(tree, pos, batch, ball_size)
    assert_same_as_reference(tree, pos, batch, ball_size, rotations)


@given(batches(max_points=200))
def test_deterministic(data):
    pos, batch, ball_size = data
    first = _build(pos, batch, ball_size, rotations=1)
    again = _build(pos, batch, ball_size, rotations=1)
    for name in ("perm", "mask", "offsets", "rotation_perms"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


@given(batches(max_points=200), st.integers(0, 2**32 - 1))
def test_input_order(data, seed):
    """Permuting the points keeps the slot layout and what each cloud holds; with distinct
    coordinates (no ties to break by index) it keeps the tree slot for slot."""
    pos, batch, ball_size = data
    shuffle = np.random.default_rng(seed).permutation(len(batch))
    tree = _build(pos, batch, ball_size)
    moved = _build(pos[shuffle], batch[shuffle], ball_size)
    assert torch.equal(tree.mask, moved.mask) and torch.equal(tree.offsets, moved.offsets)
    for b in range(tree.num_clouds):
        lo, hi = tree.offsets_list[b], tree.offsets_list[b + 1]
        real = tree.mask[lo:hi].numpy()
        np.testing.assert_array_equal(np.unique(tree.pos[lo:hi].numpy()[real], axis=0),
                                      np.unique(moved.pos[lo:hi].numpy()[real], axis=0))

    distinct = np.random.default_rng(seed).normal(size=pos.shape)
    tree = _build(distinct, batch, ball_size, rotations=1)
    moved = _build(distinct[shuffle], batch[shuffle], ball_size, rotations=1)
    np.testing.assert_array_equal(shuffle[moved.perm.numpy()], tree.perm.numpy())
    assert torch.equal(tree.rotation_perms, moved.rotation_perms)


@given(st.integers(1, 10), st.integers(1, 4), st.sampled_from(BALL_SIZES + (128, 1024)),
       st.integers(0, 2**32 - 1))
def test_matches_erwin_on_powers_of_two(log_n, dim, ball_size, seed):
    """Invariant 5: on one cloud of n = 2^j distinct points, the aligned blocks of every level
    hold the same points as balltree-erwin's."""
    from balltree import build_balltree

    n = 1 << log_n
    pos = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, dim)))
    erwin_idx, erwin_mask = build_balltree(pos, torch.zeros(n, dtype=torch.long))
    assert erwin_idx.shape == (n,) and bool(erwin_mask.all())
    tree = sparseball.build_tree(pos, ball_size=ball_size, backend="numba")
    scale = tree.num_slots // n  # P / n slots per point when n < P
    real = tree.mask.numpy()
    for level in range(log_n):
        blocks = n >> level
        ours = tree.perm.numpy().reshape(-1, blocks * scale)
        ours_real = real.reshape(-1, blocks * scale)
        theirs = erwin_idx.numpy().reshape(-1, blocks)
        for mine, mine_real, other in zip(ours, ours_real, theirs, strict=True):
            np.testing.assert_array_equal(np.sort(mine[mine_real]), np.sort(other))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_rotations_differ(dim):
    """Rotated orderings keep each cloud's slots; for dim >= 2 every r gives its own ordering,
    for dim = 1 (rotations are the identity) every ordering is the slot order itself."""
    pos, batch = _points([300, 0, 517], dim, "random", np.float32, 0.0, seed=dim)
    tree = _build(pos, batch, 16, rotations=4)
    check_rotations(tree, pos)
    orders = [tree.rotated(r).numpy() for r in range(4)]
    for r in range(4):
        if dim == 1:
            np.testing.assert_array_equal(orders[r], np.arange(tree.num_slots))
        for s in range(r):
            assert (dim == 1) == np.array_equal(orders[r], orders[s])


@pytest.mark.parametrize(("sizes", "dim", "layout", "dtype", "threads"), [
    ([70000], 3, "grid", np.float32, 1),
    ([23000, 0, 19001], 2, "random", np.float64, None),
    ([37000], 2, "identical", np.float32, None),
])
def test_large_against_reference(sizes, dim, layout, dtype, threads):
    """Clouds past the Numba builder's thresholds: level-by-level splits of big nodes, and
    (one thread, so that the subtrees dealt out are big) quickselect inside a subtree."""
    pos, batch = _points(sizes, dim, layout, dtype, 0.0, seed=len(sizes))
    default = numba.get_num_threads()
    numba.set_num_threads(threads or default)
    try:
        tree = _build(pos, batch, 16, rotations=1)
    finally:
        numba.set_num_threads(default)
    check_layout(tree, pos, batch, 16)
    assert_same_as_reference(tree, pos, batch, 16, 1)


@pytest.mark.slow
def test_huge_against_reference():
    pos, batch = _points([150000, 3, 180000], 3, "duplicates", np.float32, 1e6, seed=7)
    tree = _build(pos, batch, 128, rotations=1)
    check_layout(tree, pos, batch, 128)
    assert_same_as_reference(tree, pos, batch, 128, 1)


def test_thread_count_does_not_matter():
    pos, batch = _points([50000, 700, 3000], 3, "random", np.float32, 0.0, seed=3)
    threads = numba.get_num_threads()
    trees = []
    try:
        for count in sorted({1, threads}):
            numba.set_num_threads(count)
            trees.append(_build(pos, batch, 32, rotations=1))
    finally:
        numba.set_num_threads(threads)
    for tree in trees[1:]:
        assert torch.equal(tree.perm, trees[0].perm)
        assert torch.equal(tree.rotation_perms, trees[0].rotation_perms)


def test_auto_backend_is_numba():
    pos, batch = _points([100, 37], 3, "random", np.float64, 0.0, seed=1)
    auto = _build(pos, batch, 8, rotations=1, backend="auto")
    numba_tree = _build(pos, batch, 8, rotations=1)
    assert torch.equal(auto.perm, numba_tree.perm)
    assert torch.equal(auto.rotation_perms, numba_tree.rotation_perms)


def test_quickselect_fallback_sorts():
    """The heap sort that bounds a quickselect with unlucky pivots orders by (coordinate, index)."""
    rng = np.random.default_rng(0)
    coords = np.ascontiguousarray(rng.integers(0, 5, size=(2, 300)).astype(np.float64))
    idx = rng.permutation(300).astype(np.int64)
    numba_builder._heap_sort(coords, idx, 10, 290, 1)
    keys = list(zip(coords[1, 10:290], idx[10:290], strict=True))
    assert keys == sorted(keys)


# BallTree methods


def test_slots_round_trip():
    pos, batch = _points([13, 0, 40], 2, "random", np.float32, 0.0, seed=5)
    tree = _build(pos, batch, 8)
    x = torch.randn(len(batch), 3, 2, dtype=torch.float64)
    slots = tree.to_slots(x)
    assert slots.shape == (tree.num_slots, 3, 2)
    torch.testing.assert_close(slots, x[tree.perm], rtol=0, atol=0)
    torch.testing.assert_close(tree.from_slots(slots), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^x must have shape \(N, \.\.\.\) with N = tree.num_points"):
        tree.to_slots(x[1:])
    with pytest.raises(ValueError, match=r"^y must have shape \(M, \.\.\.\) with M = tree.num_slots"):
        tree.from_slots(slots[1:])
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got ndarray"):
        tree.to_slots(x.numpy())


def test_centers():
    # One point with P = 8: blocks of 2 and 4 slots with no real slot at all.
    pos, batch = _points([1, 21], 3, "random", np.float64, 0.0, seed=9)
    tree = _build(pos, batch, 8)
    slot_pos, real = tree.pos.numpy(), tree.mask.numpy()
    for block in (1, 2, 4, 8):
        got = tree.centers(block).numpy()
        assert got.shape == (tree.num_slots // block, 3)
        for j in range(tree.num_slots // block):
            here = slice(j * block, (j + 1) * block)
            want = slot_pos[here][real[here]].mean(0) if real[here].any() else slot_pos[here].mean(0)
            np.testing.assert_allclose(got[j], want, rtol=1e-12)
    assert not real[:2].any()  # the all-padding block is there
    with pytest.raises(ValueError, match="^block_size must be <= tree.ball_size = 8, got 16"):
        tree.centers(16)
    with pytest.raises(ValueError, match="^block_size must be a power of two, got 3"):
        tree.centers(3)


def test_rotated_errors():
    pos, batch = _points([20], 2, "random", np.float32, 0.0, seed=2)
    tree = _build(pos, batch, 4, rotations=2)
    assert tree.rotations == 2
    with pytest.raises(ValueError, match=r"^r must be in \[0, tree.rotations\) = \[0, 2\), got 2"):
        tree.rotated(2)
    with pytest.raises(ValueError, match=r"^r must be in \[0, tree.rotations\) = \[0, 2\), got -1"):
        tree.rotated(-1)
    with pytest.raises(TypeError, match="^r must be an int, got float"):
        tree.rotated(1.0)
    with pytest.raises(ValueError, match=r"^r must be in \[0, tree.rotations\) = \[0, 0\), got 0"):
        _build(pos, batch, 4).rotated(0)


@given(batches(max_points=200), st.integers(1, 3))
def test_rotated_tree(data, rotations):
    """`rotated_tree(r)` is the tree of ordering r over the same slots: its fields are the
    slot-ordered ones permuted by `rotated(r)`, `to_slots` / `from_slots` follow, `unrotated(r)`
    inverts the ordering, and each point has one real slot in its cloud's range (invariant 1;
    where padding sits is the rotated split's business, `check_rotations`)."""
    pos, batch, ball_size = data
    tree = _build(pos, batch, ball_size, rotations)
    x = torch.randn(len(batch), 2, dtype=torch.float64)
    for r in range(rotations):
        order = tree.rotated(r)
        rotated = tree.rotated_tree(r)
        assert rotated is tree.rotated_tree(r)  # cached
        assert rotated.ordering == r and rotated.rotations == 0
        for name in ("perm", "mask", "pos"):
            assert torch.equal(getattr(rotated, name), getattr(tree, name)[order]), name
        assert torch.equal(rotated.offsets, tree.offsets)
        assert rotated.offsets_list == tree.offsets_list
        assert (rotated.num_points, rotated.ball_size) == (tree.num_points, tree.ball_size)
        perm, mask = rotated.perm.numpy(), rotated.mask.numpy()
        np.testing.assert_array_equal(np.sort(perm[mask]), np.arange(len(batch)))
        np.testing.assert_array_equal(batch[perm], rotated.slot_cloud.numpy())
        assert torch.equal(rotated.to_slots(x), tree.to_slots(x)[order])
        assert torch.equal(rotated.from_slots(rotated.to_slots(x)), x)
        assert torch.equal(tree.to_slots(x)[order][tree.unrotated(r)], tree.to_slots(x))
        slot_pos, real = rotated.pos.double(), rotated.mask
        for block in (1 << i for i in range(ball_size.bit_length())):
            blocks = slot_pos.view(-1, block, slot_pos.shape[1])
            weight = real.view(-1, block, 1).double()
            count = weight.sum(1)
            want = torch.where(count > 0, (blocks * weight).sum(1) / count.clamp(min=1),
                               blocks.mean(1))
            torch.testing.assert_close(rotated.centers(block), want.to(rotated.pos.dtype))


def test_rotated_tree_errors():
    pos, batch = _points([37], 3, "random", np.float32, 0.0, seed=4)
    tree = _build(pos, batch, 8, rotations=1)
    rotated = tree.rotated_tree(0)
    # The example: the ordering moves padding, so ops must read the rotated mask.
    assert not torch.equal(rotated.mask, tree.mask)
    assert "ordering=0" in repr(rotated)
    for method in (rotated.rotated, rotated.unrotated, rotated.rotated_tree):
        with pytest.raises(ValueError, match="tree of rotated ordering 0"):
            method(0)
    with pytest.raises(ValueError, match=r"r must be in \[0, tree.rotations\)"):
        tree.rotated_tree(1)
    with pytest.raises(TypeError, match="r must be an int"):
        tree.unrotated(0.0)
    moved = rotated.to("cpu")
    assert moved.ordering == 0 and torch.equal(moved.mask, rotated.mask)


# Argument errors


def _error_cases():
    pos = torch.randn(10, 3)
    batch = torch.zeros(10, dtype=torch.long)
    nan = pos.clone()
    nan[3, 1] = math.nan
    inf = pos.clone()
    inf[0, 0] = math.inf
    # Each pattern names the argument and what its check expects (from the message's start).
    return [
        (TypeError, r"pos must be a torch.Tensor of shape \(N, dim\), got ndarray",
         (pos.numpy(),), {}),
        (ValueError, r"pos must have shape \(N, dim\), got \(3,\)", (pos[0],), {}),
        (ValueError, r"pos must have shape \(N, dim\), got \(1, 10, 3\)", (pos[None],), {}),
        (TypeError, "pos must be float32 or float64, got torch.float16", (pos.half(),), {}),
        (TypeError, "pos must be float32 or float64, got torch.int64", (pos.long(),), {}),
        (ValueError, "pos must be finite, got NaN or inf at point 3", (nan,), {}),
        (ValueError, "pos must be finite, got NaN or inf at point 0", (inf,), {}),
        (ValueError, "pos must hold at least one point", (pos[:0],), {}),
        (ValueError, "pos must have dim >= 1 coordinates", (pos[:, :0],), {}),
        (ValueError, r"batch must have shape \(N,\) = \(10,\) to match pos, got \(9,\)",
         (pos, batch[1:]), {}),
        (ValueError, r"batch must have shape \(N,\) = \(10,\) to match pos, got \(10, 1\)",
         (pos, batch[:, None]), {}),
        (TypeError, r"batch must be int64 \(or int32\) cloud ids, got torch.float32",
         (pos, batch.float()), {}),
        (TypeError, r"batch must be a torch.Tensor of shape \(N,\) or None, got ndarray",
         (pos, batch.numpy()), {}),
        (ValueError, "batch must hold cloud ids >= 0, got -1", (pos, batch - 1), {}),
        (ValueError, r"batch must be on the device of pos \(cpu\), got meta",
         (pos, batch.to("meta")), {}),
        (ValueError, "ball_size must be a power of two, got 3", (pos,), {"ball_size": 3}),
        (ValueError, "ball_size must be a power of two >= 2, got 1", (pos,), {"ball_size": 1}),
        (ValueError, "ball_size must be a power of two, got 0", (pos,), {"ball_size": 0}),
        (TypeError, "ball_size must be an int, got float", (pos,), {"ball_size": 8.0}),
        (ValueError, "rotations must be >= 0, got -1", (pos,), {"rotations": -1}),
        (TypeError, "rotations must be an int, got float", (pos,), {"rotations": 1.0}),
        (ValueError, r"backend must be one of \('auto', 'numba', 'cupy'\), got 'torch'", (pos,),
         {"backend": "torch"}),
        (ValueError, "backend='cupy' builds on a CUDA device: pos must be a CUDA tensor, got cpu",
         (pos,), {"backend": "cupy"}),
    ]


@pytest.mark.parametrize(("error", "message", "args", "kwargs"), _error_cases())
def test_bad_arguments(error, message, args, kwargs):
    with pytest.raises(error, match=f"^{message}"):
        sparseball.build_tree(*args, **kwargs)
