"""The CuPy tree builder (sparseball/tree/cupy_builder.py).

On the CPU (CI): its NumPy path (the same code as on the GPU, with NumPy equivalents of the
kernels) against the oracle `reference/tree.py`, the Numba builder and brute-force checks of the
contract's invariants; the front end's routing. The CUDA kernels themselves are run on the CPU
by tests/test_cuda_sources.py.

On a GPU (`-m gpu`): `build_tree(..., backend="cupy")` on CUDA tensors against
`build_tree(..., backend="numba")` on CPU copies, slot for slot.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparseball
from reference.tree import build_tree_reference
from sparseball.tree import cupy_builder, cupy_graphs

HAS_NUMBA_BUILDER = importlib.util.find_spec("sparseball.tree.numba_builder") is not None
FIELDS = ("perm", "mask", "offsets", "rotation_perms")


# Inputs


def _make_pos(rng, n, dim, kind, dtype):
    if kind == "grid":  # few distinct values: duplicates and ties everywhere
        return rng.integers(-2, 3, (n, dim)).astype(dtype)
    if kind == "equal":
        return np.full((n, dim), 0.5, dtype)
    if kind == "signed_zero":
        return rng.choice(np.array([-0.0, 0.0, 1.0, -1.0]), (n, dim)).astype(dtype)
    if kind == "scaled":  # axes of very different spreads
        return (rng.normal(size=(n, dim)) * (10.0 ** rng.integers(-3, 4, dim))).astype(dtype)
    return rng.normal(size=(n, dim)).astype(dtype)


@st.composite
def tree_inputs(draw, max_clouds=6, max_multiple=6):
    """(pos (N, dim), batch (N,) int64, num_clouds, ball_size, rotations) as numpy arrays."""
    ball_size = draw(st.sampled_from([2, 4, 8, 16, 32, 64]))
    dim = draw(st.integers(1, 4))
    num_clouds = draw(st.integers(1, max_clouds))
    around_multiple = st.tuples(st.integers(0, max_multiple), st.integers(-2, 2)).map(
        lambda t, p=ball_size: max(t[0] * p + t[1], 0))
    size = st.one_of(st.just(0), st.just(1), st.integers(0, max_multiple * ball_size), around_multiple)
    sizes = draw(st.lists(size, min_size=num_clouds, max_size=num_clouds))
    if sum(sizes) == 0:
        sizes[-1] = 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = rng.permutation(np.repeat(np.arange(num_clouds), sizes)).astype(np.int64)
    kind = draw(st.sampled_from(["grid", "normal", "equal", "signed_zero", "scaled"]))
    pos = _make_pos(rng, batch.size, dim, kind, draw(st.sampled_from([np.float32, np.float64])))
    return pos, batch, num_clouds, ball_size, draw(st.integers(0, 2))


def _edge_cases():
    """Named inputs at the corners of the contract."""
    rng = np.random.default_rng(0)
    cases = {
        "one point": (np.zeros((1, 3), np.float32), np.zeros(1, np.int64), 1, 8, 1),
        "exactly one ball": (rng.normal(size=(8, 2)), np.zeros(8, np.int64), 1, 8, 1),
        "one ball plus one": (rng.normal(size=(9, 2)), np.zeros(9, np.int64), 1, 8, 1),
        "one ball minus one": (rng.normal(size=(7, 3)), np.zeros(7, np.int64), 1, 8, 1),
        "ball size 2": (rng.normal(size=(11, 3)), np.zeros(11, np.int64), 1, 2, 2),
        "1-D": (rng.normal(size=(100, 1)), np.zeros(100, np.int64), 1, 4, 2),
        "all equal": (np.ones((50, 3), np.float32), np.zeros(50, np.int64), 1, 4, 1),
        "empty cloud ids": (rng.normal(size=(30, 2)).astype(np.float32),
                            np.repeat(np.array([1, 4, 4, 6]), [10, 5, 5, 10]), 8, 4, 1),
        "one-point clouds": (rng.normal(size=(6, 3)), np.arange(6), 6, 4, 1),
        "huge spreads (inf)": (np.array([[-1e308, 0.0], [1e308, 1.0], [0.0, -1e308], [1.0, 1e308],
                                         [5.0, 5.0]]), np.zeros(5, np.int64), 1, 2, 1),
        "negative float32, many clouds": (
            -np.abs(rng.normal(size=(400, 3))).astype(np.float32), rng.integers(0, 7, 400), 7, 16, 1),
        "odd ball counts": (rng.normal(size=(5 * 4 + 1, 2)), np.zeros(21, np.int64), 1, 4, 1),
        "eight axes": (rng.integers(-1, 2, (300, 8)).astype(np.float64), rng.integers(0, 3, 300), 3, 8, 1),
    }
    return cases


EDGE_CASES = _edge_cases()


# Brute-force checks of the contract's invariants (independent of every builder).


def _check_invariants(pos, batch, num_clouds, ball_size, rotations, perm, mask, offsets, rotation_perms):
    n = batch.size
    counts = np.bincount(batch, minlength=num_clouds)
    sizes = ball_size * ((counts + ball_size - 1) // ball_size)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(sizes)]))
    m = int(offsets[-1])
    assert perm.shape == (m,) and mask.shape == (m,) and rotation_perms.shape == (rotations, m)
    # 1. Every point in exactly one real slot, inside its own cloud's slot range.
    np.testing.assert_array_equal(np.sort(perm[mask]), np.arange(n))
    slot_cloud = np.repeat(np.arange(num_clouds), sizes)
    np.testing.assert_array_equal(batch[perm], slot_cloud)
    # Padding: the first real slot of the smallest aligned block holding one.
    for j in np.flatnonzero(~mask):
        c = 2
        while not mask[j // c * c:j // c * c + c].any():
            c *= 2
        first = j // c * c + np.flatnonzero(mask[j // c * c:j // c * c + c])[0]
        assert perm[j] == perm[first]
    # 3. Padding spread evenly: aligned c-blocks (c <= P) hold >= c/2 real slots when their
    # cloud has at least half its slots real.
    c = 2
    while c <= ball_size:
        real = mask.reshape(-1, c).sum(1)
        block_cloud = slot_cloud[::c]
        dense = (2 * counts >= sizes)[block_cloud]
        assert np.all(real[dense] >= c // 2)
        c *= 2
    # Rotated orderings: permutations of each cloud's own slots.
    for r in range(rotations):
        np.testing.assert_array_equal(slot_cloud[rotation_perms[r]], slot_cloud)
        np.testing.assert_array_equal(np.sort(rotation_perms[r]), np.arange(m))


def _assert_same(got, want):
    for name, g, w in zip(FIELDS, got, want, strict=True):
        g = g.cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        w = w.cpu().numpy() if isinstance(w, torch.Tensor) else np.asarray(w)
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(g, w, err_msg=name)


# CPU: the NumPy path.


@given(tree_inputs())
def test_numpy_path_matches_reference(inputs):
    got = cupy_builder.build_numpy(*inputs)
    _assert_same(got, build_tree_reference(*inputs))
    _check_invariants(*inputs, *got)


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_numpy_path_edge_cases(name):
    inputs = EDGE_CASES[name]
    got = cupy_builder.build_numpy(*inputs)
    _assert_same(got, build_tree_reference(*inputs))
    _check_invariants(*inputs, *got)


@pytest.mark.skipif(not HAS_NUMBA_BUILDER, reason="sparseball.tree.numba_builder not there yet")
@pytest.mark.parametrize("dim, dtype, num_clouds",
                         [(3, np.float32, 1), (2, np.float64, 5), (3, np.float32, 40)])
def test_numpy_path_matches_numba_larger(dim, dtype, num_clouds):
    # Deep trees (many levels above P), with a rotation.
    from sparseball.tree.numba_builder import build_numba

    rng = np.random.default_rng(dim * 100 + num_clouds)
    n = 60_000
    pos = rng.normal(size=(n, dim)).astype(dtype)
    batch = np.sort(rng.integers(0, num_clouds, n)) if num_clouds > 1 else np.zeros(n, np.int64)
    args = (pos, rng.permutation(batch), num_clouds, 32, 1)
    _assert_same(cupy_builder.build_numpy(*args), build_numba(*args))


@given(tree_inputs())
def test_given_counts_build_the_same_tree(inputs):
    # Small GPU builds count their clouds before the presort (cloud_counts, integer atomics)
    # and hand the counts to the build; here on the CPU, against the build that finds them.
    pos, batch, num_clouds, ball_size, rotations = inputs
    counts = cupy_builder.cloud_counts(torch.from_numpy(batch), num_clouds, batch.size)
    np.testing.assert_array_equal(counts, np.bincount(batch, minlength=num_clouds))
    want = cupy_builder._build(np, cupy_builder.NumpyOps(), pos, batch, num_clouds, ball_size, rotations)
    got = cupy_builder._build(np, cupy_builder.NumpyOps(), pos, batch, num_clouds, ball_size, rotations,
                              counts=counts)
    _assert_same(got[:4], want[:4])
    np.testing.assert_array_equal(got[4], want[4])


def test_plan_covers_every_item_once():
    counts = np.array([0, 1, 5, 128, 129, 1000, 4097])
    starts = np.cumsum(counts) - counts
    sizes = 128 * ((counts + 127) // 128)
    slots = np.cumsum(sizes) - sizes
    for cap in (1, 64, 2048):
        levels, small = cupy_builder.plan_tree(counts, starts, slots, 128, cap)
        lo, n, slot, size = small
        assert np.all(n <= cap) and np.all(n >= 1) and np.all(n <= size)
        covered = np.zeros(counts.sum(), int)
        for a, k in zip(lo, n, strict=True):
            covered[a:a + k] += 1
        np.testing.assert_array_equal(covered, 1)
        for table in levels:
            assert np.all(np.diff(table[0]) > 0)  # sorted by first position
            np.testing.assert_array_equal(table[3], np.cumsum(table[2]) - table[2])


def test_resolve_builder_routes(monkeypatch):
    from sparseball import tree as tree_module

    assert tree_module._resolve_builder("auto", torch.device("cpu")) == "numba"
    assert tree_module._resolve_builder("cupy", torch.device("cpu")) == "cupy"
    monkeypatch.setattr(tree_module, "_cupy_available", lambda: True)
    assert tree_module._resolve_builder("auto", torch.device("cuda", 0)) == "cupy"
    monkeypatch.setattr(tree_module, "_cupy_available", lambda: False)
    tree_module._warn_no_cupy_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="CuPy cannot be imported"):
        assert tree_module._resolve_builder("auto", torch.device("cuda", 0)) == "numba"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert tree_module._resolve_builder("auto", torch.device("cuda", 0)) == "numba"


def test_cupy_backend_needs_cuda_tensor():
    with pytest.raises(ValueError, match="backend='cupy'.*CUDA"):
        sparseball.build_tree(torch.randn(10, 3), ball_size=4, backend="cupy")


# GPU: the CuPy builder against the Numba builder (run with `pytest -m gpu`).


def _gpu_vs_numba(pos, batch, num_clouds, ball_size, rotations, *, device="cuda"):
    pos_t = torch.from_numpy(np.ascontiguousarray(pos))
    batch_t = torch.from_numpy(np.asarray(batch, dtype=np.int64))
    # (build_tree counts clouds as batch.max() + 1: trailing empty ids do not exist there.)
    want = sparseball.build_tree(pos_t, batch_t, ball_size=ball_size, rotations=rotations, backend="numba")
    got = sparseball.build_tree(pos_t.to(device), batch_t.to(device), ball_size=ball_size,
                                rotations=rotations, backend="cupy")
    for name in FIELDS:
        assert getattr(got, name).device.type == "cuda", name
    assert got.offsets_list == want.offsets_list
    assert got.num_points == want.num_points
    _assert_same([got.perm, got.mask, got.offsets, got.rotation_perms],
                 [want.perm, want.mask, want.offsets, want.rotation_perms])
    torch.testing.assert_close(got.pos.cpu(), want.pos, rtol=0, atol=0)
    return got


@pytest.mark.gpu
@settings(max_examples=100)
@given(tree_inputs(max_clouds=16, max_multiple=40))
def test_gpu_matches_numba(inputs):
    _gpu_vs_numba(*inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_gpu_edge_cases(name):
    _gpu_vs_numba(*EDGE_CASES[name])


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_large_nodes_and_rotations(dim, dtype):
    # Nodes far larger than one block (many large-node levels), odd ball counts, three rotations.
    rng = np.random.default_rng(dim)
    sizes = [300_001, 1, 0, 70_000, 4096, 4097, 127]
    batch = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    pos = _make_pos(rng, batch.size, dim, "scaled", dtype)
    _gpu_vs_numba(pos, batch, len(sizes), 128, 3)


@pytest.mark.gpu
def test_gpu_many_small_clouds():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 60, 5000)
    batch = rng.permutation(np.repeat(np.arange(sizes.size), sizes))
    pos = rng.integers(-3, 4, (batch.size, 3)).astype(np.float32)
    _gpu_vs_numba(pos, batch, sizes.size, 16, 1)


@pytest.mark.gpu
def test_gpu_duplicates_at_scale():
    rng = np.random.default_rng(2)
    pos = rng.integers(0, 4, (200_000, 3)).astype(np.float32)  # 64 distinct points
    _gpu_vs_numba(pos, rng.integers(0, 3, pos.shape[0]), 3, 64, 2)


@pytest.mark.gpu
def test_gpu_inputs_of_every_form():
    # float64, int32 batch, non-contiguous pos, batch=None, on a side stream, auto routing.
    rng = np.random.default_rng(3)
    pos = torch.from_numpy(rng.normal(size=(5000, 6))).cuda()[:, ::2]
    batch = torch.from_numpy(rng.integers(0, 4, 5000)).cuda()
    want = sparseball.build_tree(pos.cpu(), batch.cpu(), ball_size=32, rotations=1, backend="numba")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = sparseball.build_tree(pos, batch.to(torch.int32), ball_size=32, rotations=1, backend="auto")
    stream.synchronize()
    _assert_same([got.perm, got.mask, got.offsets, got.rotation_perms],
                 [want.perm, want.mask, want.offsets, want.rotation_perms])
    one = sparseball.build_tree(pos, None, ball_size=32, backend="cupy")
    ref = sparseball.build_tree(pos.cpu(), None, ball_size=32, backend="numba")
    _assert_same([one.perm, one.mask, one.offsets, one.rotation_perms],
                 [ref.perm, ref.mask, ref.offsets, ref.rotation_perms])
    assert one.to_slots(pos).shape == (one.num_slots, 3)
    torch.testing.assert_close(one.from_slots(one.to_slots(pos)), pos, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_cupy_arrays_match_numpy_path():
    # build_cupy on CuPy arrays (no torch in between) against the same code on NumPy.
    import cupy

    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        pos = rng.normal(size=(30_000, 3)).astype(dtype)
        batch = rng.integers(0, 5, 30_000)
        want = cupy_builder.build_numpy(pos, batch, 5, 64, 2)
        *got, offsets_host = cupy_builder.build_cupy(cupy.asarray(pos), cupy.asarray(batch), 5, 64, 2)
        _assert_same([g.get() for g in got], want)
        np.testing.assert_array_equal(offsets_host, want[2])


@pytest.mark.gpu
def test_gpu_repeated_builds_are_identical():
    rng = np.random.default_rng(4)
    pos = torch.from_numpy(rng.normal(size=(100_000, 3)).astype(np.float32)).cuda()
    batch = torch.from_numpy(rng.integers(0, 8, 100_000)).cuda()
    first = sparseball.build_tree(pos, batch, ball_size=128, rotations=1, backend="cupy")
    for _ in range(3):
        again = sparseball.build_tree(pos, batch, ball_size=128, rotations=1, backend="cupy")
        _assert_same([again.perm, again.mask, again.offsets, again.rotation_perms],
                     [first.perm, first.mask, first.offsets, first.rotation_perms])


@pytest.fixture
def no_graphs_cached():
    cupy_graphs.clear()
    yield
    cupy_graphs.clear()


def _tree_fields(tree):
    return [tree.perm, tree.mask, tree.offsets, tree.rotation_perms]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, batch_dtype, rotations, ball_size, sizes", [
    (np.float32, torch.int64, 0, 128, [4096] * 16),
    (np.float32, torch.int32, 2, 32, [301, 0, 1, 4000, 77]),
    (np.float64, None, 1, 8, [5000]),
    (np.float64, torch.int64, 1, 64, [20_000, 3, 30_000]),
])
def test_gpu_graph_replays_match_numba(no_graphs_cached, dtype, batch_dtype, rotations, ball_size, sizes):
    # The same cloud sizes four times, new positions and point order each time: the first build
    # runs eagerly, the second captures a graph, the others replay it. Every tree is checked
    # against the Numba builder's after all four (a replay must not overwrite an earlier tree).
    rng = np.random.default_rng(sum(sizes) + rotations)
    built = []
    for step in range(4):
        batch = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
        pos = torch.from_numpy(_make_pos(rng, batch.size, 3, "normal" if step % 2 else "grid", dtype))
        batch_t = None if batch_dtype is None else torch.from_numpy(batch).to(batch_dtype)
        got = sparseball.build_tree(pos.cuda(), None if batch_t is None else batch_t.cuda(),
                                    ball_size=ball_size, rotations=rotations, backend="cupy")
        want = sparseball.build_tree(pos, batch_t, ball_size=ball_size, rotations=rotations, backend="numba")
        built.append((got, want))
        assert len(cupy_graphs._GRAPHS) == int(step >= 1) and not cupy_graphs._FAILED
    for got, want in built:
        _assert_same(_tree_fields(got), _tree_fields(want))
        assert got.offsets_list == want.offsets_list
        torch.testing.assert_close(got.pos.cpu(), want.pos, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_graphs_per_stream_and_switched_off(no_graphs_cached, monkeypatch):
    # One graph per stream (a replay writes the graph's static buffers); ENABLED = False builds
    # eagerly; both give the Numba builder's tree.
    rng = np.random.default_rng(8)
    batch = torch.from_numpy(rng.integers(0, 6, 9000))
    pos = torch.from_numpy(rng.normal(size=(9000, 2)).astype(np.float32))
    want = sparseball.build_tree(pos, batch, ball_size=16, backend="numba")
    streams = [torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in streams:
        with torch.cuda.stream(stream):
            trees = [sparseball.build_tree(pos.cuda(), batch.cuda(), ball_size=16, backend="cupy")
                     for _ in range(3)]
        stream.synchronize()
        for tree in trees:
            _assert_same(_tree_fields(tree), _tree_fields(want))
    assert len(cupy_graphs._GRAPHS) == len(streams)
    monkeypatch.setattr(cupy_graphs, "ENABLED", False)
    cupy_graphs.clear()
    for _ in range(3):
        tree = sparseball.build_tree(pos.cuda(), batch.cuda(), ball_size=16, backend="cupy")
        _assert_same(_tree_fields(tree), _tree_fields(want))
    assert not cupy_graphs._GRAPHS


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_16m_points():
    rng = np.random.default_rng(5)
    n = 16 * 2**20
    pos = rng.normal(size=(n, 3)).astype(np.float32)
    batch = np.zeros(n, np.int64)
    batch[n // 2:] = 1  # two clouds of 8M points, the second one sorted in input order
    _gpu_vs_numba(pos, batch, 2, 128, 1)
