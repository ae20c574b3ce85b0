"""Property tests of the attention ops against the float64 oracle (`reference.ops`).

Every op's output and every gradient (q, k, v, k_cmp, v_cmp, sigma) is compared with the
oracle under the tolerance rule of `helpers.tolerance`, for each dtype, on random trees with
odd cloud sizes and random padding, with chunk budgets from one block per chunk to the
default. Padding invariance (with NaN padding too) and cloud isolation are checked to the
last bits; gradients again by `torch.autograd.gradcheck`. A fixture in conftest.py fills
fresh allocations with NaN, so an output element an op forgets to write fails here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    assert_matches,
    assert_valid_selection,
    attention_magnitudes,
    call,
    chunk_budget,
    compute_dtype,
    grads,
    leaves,
    powers_of_two,
    problems,
    random_indices,
    random_tree,
    tolerance,
)
from hypothesis import given
from hypothesis import strategies as st

import reference.ops as oracle
import sparseball
import sparseball.backends.torch.ops as torch_ops

pytestmark = pytest.mark.parametrize("backend", BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# The oracle runs on the CPU; the backend also on CUDA where there is one (`pytest -m gpu`).
devices = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


def _tree_on(device, tree):
    """`tree` on `device`, sharing its CPU-computed block centers: a float32 mean rounds
    differently on another device, and the ops are tested here, not `tree.centers`."""
    moved = tree.to(device)
    for c in (1 << i for i in range(tree.ball_size.bit_length())):
        moved._cache[("centers", c)] = tree.centers(c).to(device)
    return moved


def _to(where, *tensors):
    """`tensors` moved to a device or cast to a dtype (None stays None)."""
    return [None if t is None else t.to(where) for t in tensors]


def _selection_sizes(data, P):
    compress_size = data.draw(powers_of_two(P), label="compress_size")
    select_size = data.draw(powers_of_two(P).filter(lambda s: s >= compress_size),
                            label="select_size")
    group_size = data.draw(powers_of_two(P), label="group_size")
    return compress_size, select_size, group_size


def skip_unsupported(backend, device, dtype=torch.float32):
    """Skip a test of `backend` on inputs it does not serve (CuPy: CPU tensors, float64; its
    kernels are checked on the CPU by test_cupy_emu.py instead)."""
    reasons = sparseball.BACKENDS[backend].not_supported_reasons(
        "ball_attention", torch.device(device), dtype, 16)
    if reasons:
        pytest.skip(f"backend {backend!r}: " + "; ".join(reasons))


def _assert_empty_rows_zero(out, allowed, name):
    """Queries without any key get exactly 0 (`allowed` `(M, H or 1, keys)`)."""
    out = out.detach().cpu()
    empty = ~allowed.any(-1).expand(out.shape[:2])
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), f"{name}: empty rows not 0"


# Outputs and gradients against the oracle


@devices
@dtypes
@given(data=st.data())
def test_compress(backend, device, dtype, data):
    skip_unsupported(backend, device, dtype)
    check_compress(backend, device, dtype, data)


def check_compress(backend, device, dtype, data):
    """`test_compress` for `backend` (also run by test_cupy_emu.py)."""
    problem = data.draw(problems(dtype))
    tree = problem.tree
    c = data.draw(powers_of_two(tree.ball_size), label="compress_size")
    x = problem.slot_tensor()
    grad_out = problem.randn(tree.num_slots // c, problem.heads, problem.head_dim)
    (x_dev,) = leaves(*_to(device, x))
    with chunk_budget(backend, problem.budget):
        out = call(backend, "compress", x_dev, _tree_on(device, tree), c)
        (dx,) = grads(out, [x_dev], grad_out.to(device))
    (x_ref,) = leaves(x.double())
    expected = oracle.compress(x_ref, tree, c)
    (dx_ref,) = grads(expected, [x_ref], grad_out.double())
    assert out.dtype == dtype and out.device.type == device
    assert_matches(out, expected, c, "compress")
    assert_matches(dx, dx_ref, c, "compress dx")


@devices
@dtypes
@given(data=st.data())
def test_ball_attention(backend, device, dtype, data):
    skip_unsupported(backend, device, dtype)
    check_ball_attention(backend, device, dtype, data)


def check_ball_attention(backend, device, dtype, data):
    """`test_ball_attention` for `backend` (also run by test_cupy_emu.py)."""
    problem = data.draw(problems(dtype))
    tree = problem.tree
    b = data.draw(powers_of_two(tree.ball_size), label="ball_size")
    q, k, v, sigma = (problem.slot_tensor(), problem.slot_tensor(), problem.slot_tensor(),
                      problem.sigma())
    grad_out = problem.slot_tensor()
    inputs = leaves(*_to(device, q, k, v, sigma))
    with chunk_budget(backend, problem.budget):
        out = call(backend, "ball_attention", *inputs[:3], _tree_on(device, tree), b, inputs[3],
                   problem.scale)
        got = grads(out, inputs, grad_out.to(device))
    inputs_ref = leaves(*_to(torch.float64, q, k, v, sigma))
    expected = oracle.ball_attention(*inputs_ref[:3], tree, b, inputs_ref[3], problem.scale)
    want = grads(expected, inputs_ref, grad_out.double())
    size = attention_magnitudes(q, k, v, grad_out, problem.scale, sigma, tree.pos)
    assert out.dtype == dtype and out.device.type == device
    assert_matches(out, expected, b, "ball_attention", magnitude=size["out"])
    _assert_empty_rows_zero(out, oracle.ball_key_mask(tree, b)[:, None], "ball_attention")
    for name, grad, grad_ref in zip("qkv", got, want, strict=False):
        assert_matches(grad, grad_ref, b, f"ball_attention d{name}", magnitude=size[name])
    if sigma is not None:
        assert_matches(got[3], want[3], tree.num_slots * b, "ball_attention dsigma",
                       magnitude=size["sigma"])


@devices
@dtypes
@given(data=st.data())
def test_compressed_attention(backend, device, dtype, data):
    skip_unsupported(backend, device, dtype)
    check_compressed_attention(backend, device, dtype, data)


def check_compressed_attention(backend, device, dtype, data):
    """`test_compressed_attention` for `backend` (also run by test_cupy_emu.py)."""
    problem = data.draw(problems(dtype))
    tree = problem.tree
    c = data.draw(powers_of_two(tree.ball_size), label="compress_size")
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    q, k_cmp, v_cmp, sigma = (problem.slot_tensor(), problem.randn(M // c, H, D),
                              problem.randn(M // c, H, D), problem.sigma())
    grad_out = problem.slot_tensor()
    inputs = leaves(*_to(device, q, k_cmp, v_cmp, sigma))
    with chunk_budget(backend, problem.budget):
        out, lse = call(backend, "compressed_attention", *inputs[:3], _tree_on(device, tree), c,
                        inputs[3], problem.scale)
        got = grads(out, inputs, grad_out.to(device))
    inputs_ref = leaves(*_to(torch.float64, q, k_cmp, v_cmp, sigma))
    expected, lse_ref = oracle.compressed_attention(*inputs_ref[:3], tree, c, inputs_ref[3],
                                                    problem.scale)
    want = grads(expected, inputs_ref, grad_out.double())
    size = attention_magnitudes(q, k_cmp, v_cmp, grad_out, problem.scale, sigma, tree.pos)
    assert out.dtype == dtype and out.device.type == device
    assert lse.dtype == torch.float32 and not lse.requires_grad
    keys = M // c  # no cloud has more compressed keys, no compressed key more queries than M
    assert_matches(out, expected, keys, "compressed_attention", magnitude=size["out"])
    assert_matches(lse, lse_ref, keys, "compressed_attention lse", out_dtype=torch.float32,
                   magnitude=size["logits"])
    for name, grad, grad_ref in zip("qkv", got, want, strict=False):
        assert_matches(grad, grad_ref, M, f"compressed_attention d{name}", magnitude=size[name])
    if sigma is not None:
        assert_matches(got[3], want[3], M * keys, "compressed_attention dsigma",
                       magnitude=size["sigma"])


@devices
@dtypes
@given(data=st.data())
def test_selection_attention(backend, device, dtype, data):
    skip_unsupported(backend, device, dtype)
    check_selection_attention(backend, device, dtype, data)


def check_selection_attention(backend, device, dtype, data):
    """`test_selection_attention` for `backend` (also run by test_cupy_emu.py)."""
    problem = data.draw(problems(dtype))
    tree = problem.tree
    _, s, g = _selection_sizes(data, tree.ball_size)
    top_k = data.draw(st.integers(1, 5), label="top_k")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="index seed"))
    indices = random_indices(problem.tree, problem.heads, s, g, top_k, rng)
    q, k, v, sigma = (problem.slot_tensor(), problem.slot_tensor(), problem.slot_tensor(),
                      problem.sigma())
    grad_out = problem.slot_tensor()
    inputs = leaves(*_to(device, q, k, v, sigma))
    with chunk_budget(backend, problem.budget):
        out = call(backend, "selection_attention", *inputs[:3], _tree_on(device, tree),
                   indices.to(device), s, g, inputs[3], problem.scale)
        got = grads(out, inputs, grad_out.to(device))
    inputs_ref = leaves(*_to(torch.float64, q, k, v, sigma))
    expected = oracle.selection_attention(*inputs_ref[:3], tree, indices, s, g, inputs_ref[3],
                                          problem.scale)
    want = grads(expected, inputs_ref, grad_out.double())
    size = attention_magnitudes(q, k, v, grad_out, problem.scale, sigma, tree.pos)
    assert out.dtype == dtype and out.device.type == device
    keys, M = top_k * s, tree.num_slots
    assert_matches(out, expected, keys, "selection_attention", magnitude=size["out"])
    _assert_empty_rows_zero(out, oracle.selection_key_mask(tree, indices, s, g),
                            "selection_attention")
    for name, grad, grad_ref, n in zip("qkv", got, want, (keys, M, M), strict=False):
        assert_matches(grad, grad_ref, n, f"selection_attention d{name}", magnitude=size[name])
    if sigma is not None:
        assert_matches(got[3], want[3], M * keys, "selection_attention dsigma",
                       magnitude=size["sigma"])


@devices
@dtypes
@given(data=st.data())
def test_select_blocks(backend, device, dtype, data):
    """A valid top-k of the oracle's importances; in float64 exactly the oracle's choice."""
    skip_unsupported(backend, device, dtype)
    check_select_blocks(backend, device, dtype, data)


def check_select_blocks(backend, device, dtype, data):
    """`test_select_blocks` for `backend` (also run by test_cupy_emu.py)."""
    problem = data.draw(problems(dtype))
    tree = problem.tree
    P = tree.ball_size
    c, s, g = _selection_sizes(data, P)
    top_k = data.draw(st.integers(1, 6), label="top_k")
    exclude = data.draw(st.none() | powers_of_two(P), label="exclude_ball_size")
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    q, k_cmp, sigma = problem.slot_tensor(), problem.randn(M // c, H, D), problem.sigma()
    _, lse = oracle.compressed_attention(q, k_cmp, problem.randn(M // c, H, D), tree, c, sigma,
                                         problem.scale)
    args = (q, k_cmp, lse, tree, c, s, g, top_k, sigma, problem.scale, exclude)
    with chunk_budget(backend, problem.budget):
        indices = call(backend, "select_blocks", *_to(device, q, k_cmp, lse), _tree_on(device, tree),
                       *args[4:8], *_to(device, sigma), *args[9:])
    assert indices.dtype == torch.int32 and indices.shape == (M // g, H, top_k)
    assert indices.device.type == device
    indices = indices.cpu()
    importance = oracle.block_importance(q, k_cmp, lse, tree, c, s, g, sigma, problem.scale)
    candidate = oracle.selection_candidates(tree, s, g, exclude)
    # Importances are computed in the compute dtype and sum g * s/c terms.
    slack = tolerance(importance, compute_dtype(dtype), g * s // c)
    assert_valid_selection(indices, importance, slack, candidate, top_k, tree.mask, g)
    if dtype == torch.float64:
        assert torch.equal(indices, oracle.select_blocks(*args))


# Padding invariance and cloud isolation (exact)


@dataclass
class Inputs:
    """Inputs of every op; compressed inputs and lse depend on the compress size c."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cmp: Callable[[int], torch.Tensor]
    v_cmp: Callable[[int], torch.Tensor]
    lse: Callable[[int], torch.Tensor]
    sigma: torch.Tensor | None


@dataclass
class Sizes:
    compress: int
    select: int
    group: int
    ball: int
    top_k: int
    exclude: int | None


def _sizes(data, P) -> Sizes:
    c, s, g = _selection_sizes(data, P)
    return Sizes(c, s, g, data.draw(powers_of_two(P), label="ball_size"),
                 data.draw(st.integers(1, 4), label="top_k"),
                 data.draw(st.none() | powers_of_two(P), label="exclude_ball_size"))


def _run_all(problem, x: Inputs, z: Sizes, backend):
    """Every op's output on `x`, by op name."""
    tree, scale = problem.tree, problem.scale
    c, s, g = z.compress, z.select, z.group
    with chunk_budget(backend, problem.budget):
        indices = call(backend, "select_blocks", x.q, x.k_cmp(c), x.lse(c), tree, c, s, g,
                       z.top_k, x.sigma, scale, z.exclude)
        return {
            "compress": call(backend, "compress", x.k, tree, c),
            "ball_attention": call(backend, "ball_attention", x.q, x.k, x.v, tree, z.ball,
                                   x.sigma, scale),
            "compressed_attention": call(backend, "compressed_attention", x.q, x.k_cmp(c),
                                         x.v_cmp(c), tree, c, x.sigma, scale)[0],
            "select_blocks": indices,
            "selection_attention": call(backend, "selection_attention", x.q, x.k, x.v, tree,
                                        indices, s, g, x.sigma, scale),
        }


DIFFERENTIABLE = ("compress", "ball_attention", "compressed_attention", "selection_attention")


def _grads_of_real_outputs(problem, op, x: Inputs, z: Sizes, backend, seed):
    """`{input name: gradient}` of a fixed random loss on the real rows of `op`'s output."""
    tree, scale = problem.tree, problem.scale
    c, s, g = z.compress, z.select, z.group
    with chunk_budget(backend, problem.budget):
        if op == "compress":
            names, tensors = ("x",), leaves(x.k)
            out = call(backend, op, *tensors, tree, c)
        elif op == "ball_attention":
            names, tensors = ("q", "k", "v", "sigma"), leaves(x.q, x.k, x.v, x.sigma)
            out = call(backend, op, *tensors[:3], tree, z.ball, tensors[3], scale)
        elif op == "compressed_attention":
            names = ("q", "k_cmp", "v_cmp", "sigma")
            tensors = leaves(x.q, x.k_cmp(c), x.v_cmp(c), x.sigma)
            out = call(backend, op, *tensors[:3], tree, c, tensors[3], scale)[0]
        else:
            indices = call(backend, "select_blocks", x.q, x.k_cmp(c), x.lse(c), tree, c, s, g,
                           z.top_k, x.sigma, scale, z.exclude)
            names, tensors = ("q", "k", "v", "sigma"), leaves(x.q, x.k, x.v, x.sigma)
            out = call(backend, op, *tensors[:3], tree, indices, s, g, tensors[3], scale)
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        if op != "compress":
            weight = weight * tree.mask.view(-1, 1, 1)
        got = grads(out, tensors, weight)
    return {name: grad for name, grad in zip(names, got, strict=True) if grad is not None}


def _rows(name, tree, c):
    """bool rows of input `name` that are real: slots, or compressed blocks with a real slot."""
    if name in ("k_cmp", "v_cmp"):
        return tree.mask.view(-1, c).any(1)
    return tree.mask


@given(data=st.data())
def test_padding_never_acts(backend, data):
    """Whatever padding slots (and compressed blocks without a real slot) hold, even NaN, the
    outputs of real slots (and all of compress and select_blocks) stay the same bit for bit;
    with finite padding, so do the gradients of real slots, and padding keys get no gradient."""
    skip_unsupported(backend, "cpu")
    check_padding_never_acts(backend, data, DTYPES)


def check_padding_never_acts(backend, data, dtypes, max_cloud_size=130):
    """`test_padding_never_acts` for `backend` on inputs of `dtypes` and clouds of up to
    `max_cloud_size` points (also run by test_triton.py for the Triton backend)."""
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    problem = data.draw(problems(dtype, max_cloud_size=max_cloud_size))
    tree = problem.tree
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    real = tree.mask
    q, k, v = problem.slot_tensor(), problem.slot_tensor(), problem.slot_tensor()
    sigma = problem.sigma()
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    z = _sizes(data, tree.ball_size)

    def inputs(fill):
        """The inputs with every padding row (of slots or of compressed blocks) `fill`ed."""
        def padded(x, keep):
            return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, fill(x.shape).to(x.dtype))

        def k_cmp(c):
            gen = torch.Generator().manual_seed(seed + c)
            x = torch.randn(M // c, H, D, generator=gen, dtype=torch.float64).to(dtype)
            return padded(x, real.view(-1, c).any(1))

        def v_cmp(c):
            return k_cmp(c).flip(-1)

        def lse(c):
            _, out = oracle.compressed_attention(q, k_cmp(c), v_cmp(c), tree, c, sigma,
                                                 problem.scale)
            return padded(out, real)

        return Inputs(padded(q, real), padded(k, real), padded(v, real), k_cmp, v_cmp, lse, sigma)

    plain = inputs(torch.zeros)
    big = inputs(lambda shape: 100 * torch.randn(shape, generator=problem.generator,
                                                 dtype=torch.float64))
    nan = inputs(lambda shape: torch.full(shape, math.nan))
    base = _run_all(problem, plain, z, backend)
    for changed in (big, nan):
        for name, out in _run_all(problem, changed, z, backend).items():
            if name in ("compress", "select_blocks"):
                _assert_same(out, base[name], f"{name} depends on padding")
            else:
                _assert_same(out[real], base[name][real], f"{name} depends on padding")

    for op in DIFFERENTIABLE:
        got = [_grads_of_real_outputs(problem, op, x, z, backend, seed) for x in (plain, big)]
        for name in got[0]:
            if name == "sigma":
                _assert_same(got[0][name], got[1][name], f"{op}: dsigma depends on padding")
                continue
            rows = _rows(name, tree, z.compress)
            for grad in (got[0][name], got[1][name]):
                if name != "q":
                    assert not grad[~rows].any(), f"{op}: padding {name} got a gradient"
            _assert_same(got[0][name][rows], got[1][name][rows],
                         f"{op}: d{name} of real rows depends on padding")


def _assert_same(actual, expected, message):
    """The same result, up to the last bits of the compute dtype: not bit for bit, since CPU
    BLAS (MKL) may round differently from call to call depending on memory alignment. Block
    ids must be equal (a rounding could only flip an exact near-tie: never seen)."""
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), message
        return
    assert torch.isfinite(actual).all(), f"{message}: not finite"
    assert_matches(actual, expected, actual.shape[0], message)


def _nonempty_clouds(tree):
    offsets = tree.offsets_list
    return [b for b in range(tree.num_clouds) if offsets[b] < offsets[b + 1]]


@given(data=st.data())
def test_clouds_are_isolated(backend, data):
    """Changing every other cloud's inputs changes none of one cloud's outputs or gradients."""
    skip_unsupported(backend, "cpu")
    check_clouds_are_isolated(backend, data, DTYPES)


def check_clouds_are_isolated(backend, data, dtypes, max_cloud_size=70):
    """`test_clouds_are_isolated` for `backend` on inputs of `dtypes` and clouds of up to
    `max_cloud_size` points (also run by test_triton.py for the Triton backend)."""
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    problem = data.draw(problems(dtype, max_cloud_size=max_cloud_size).filter(
        lambda p: len(_nonempty_clouds(p.tree)) >= 2))
    tree = problem.tree
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    cloud = data.draw(st.sampled_from(_nonempty_clouds(tree)), label="cloud")
    mine = tree.slot_cloud == cloud
    sigma = problem.sigma()
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    z = _sizes(data, tree.ball_size)
    c = z.compress
    base = [problem.slot_tensor() for _ in range(3)] + [problem.randn(M // c, H, D)
                                                        for _ in range(2)]
    other = [problem.slot_tensor() for _ in range(3)] + [problem.randn(M // c, H, D)
                                                         for _ in range(2)]

    def inputs(changed):
        keep = [mine] * 3 + [mine[::c]] * 2
        q, k, v, k_cmp, v_cmp = (torch.where(m.view(-1, 1, 1), x, y) if changed else x
                                 for x, y, m in zip(base, other, keep, strict=True))

        def lse(size):
            return oracle.compressed_attention(q, k_cmp, v_cmp, tree, size, sigma,
                                               problem.scale)[1]

        return Inputs(q, k, v, lambda size: k_cmp, lambda size: v_cmp, lse, sigma)

    before, after = inputs(False), inputs(True)
    first, last = tree.offsets_list[cloud], tree.offsets_list[cloud + 1]
    outputs = [_run_all(problem, x, z, backend) for x in (before, after)]
    for name in outputs[0]:
        size = {"compress": c, "select_blocks": z.group}.get(name, 1)
        rows = slice(first // size, last // size)
        _assert_same(outputs[0][name][rows], outputs[1][name][rows],
                     f"{name} leaks across clouds")
    for op in DIFFERENTIABLE:
        got = [_grads_of_real_outputs(problem, op, x, z, backend, seed) for x in (before, after)]
        for name in got[0]:
            if name == "sigma":
                continue  # sums over every cloud
            rows = mine[::c] if name in ("k_cmp", "v_cmp") else mine
            _assert_same(got[0][name][rows], got[1][name][rows],
                         f"{op}: d{name} leaks across clouds")


# gradcheck


@pytest.mark.parametrize("budget", [100, None])
def test_gradcheck(backend, budget):
    """Finite differences agree with autograd in float64 for every differentiable op."""
    skip_unsupported(backend, "cpu", torch.float64)
    rng = np.random.default_rng(7)
    tree = random_tree([5, 11], 4, 2, torch.float64, rng)
    gen = torch.Generator().manual_seed(3)
    M, H, D = tree.num_slots, 2, 3

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    q, k, v = rand(M, H, D), rand(M, H, D), rand(M, H, D)
    sigma = torch.tensor([-0.7, 0.4], dtype=torch.float64, requires_grad=True)
    k_cmp, v_cmp = rand(M // 2, H, D), rand(M // 2, H, D)
    # 20 slots: cloud 0 holds select blocks 0-1 (groups 0-1), cloud 1 blocks 2-4 (groups 2-4).
    indices = torch.tensor([[[0, -1], [1, 0]], [[1, 0], [-1, -1]],
                            [[2, 4], [3, -1]], [[4, 3], [2, 3]],
                            [[-1, 3], [2, 4]]], dtype=torch.int32)
    with chunk_budget(backend, budget):
        checks = {
            "compress": (lambda x: call(backend, "compress", x, tree, 2), (k,)),
            "ball_attention": (lambda *a: call(backend, "ball_attention", *a[:3], tree, 4, a[3],
                                               0.6), (q, k, v, sigma)),
            "compressed_attention": (lambda *a: call(backend, "compressed_attention", *a[:3],
                                                     tree, 2, a[3], 0.6)[0],
                                     (q, k_cmp, v_cmp, sigma)),
            "selection_attention": (lambda *a: call(backend, "selection_attention", *a[:3], tree,
                                                    indices, 4, 4, a[3], 0.6), (q, k, v, sigma)),
        }
        for name, (fn, args) in checks.items():
            assert torch.autograd.gradcheck(fn, args), name


# The torch backend's chunk plan


@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
       budget=st.integers(1, 4000), heads=st.integers(1, 3), align_log=st.integers(0, 2))
def test_cloud_chunks_partition_the_slots(backend, sizes, budget, heads, align_log):
    """Chunks cover every slot once, in order; keys are the queries' whole clouds; each chunk
    keeps to the budget unless it is a single `align`-row of a cloud."""
    if backend != "torch":
        pytest.skip("the chunk plan is the torch backend's")
    P, key_block, align = 4, 2, 1 << align_log
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + P * math.ceil(n / P))
    cloud_of = {slot: i for i in range(len(sizes)) for slot in range(offsets[i], offsets[i + 1])}
    with chunk_budget(backend, budget):
        chunks = torch_ops._cloud_chunks(tuple(offsets), heads, key_block, align)
    covered = 0
    for q0, q1, k0, k1 in chunks:
        assert q0 == covered and q1 > q0 and q0 % align == 0
        covered = q1
        clouds = {cloud_of[j] for j in range(q0, q1)}
        assert (k0, k1) == (offsets[min(clouds)], offsets[max(clouds) + 1])
        cost = (q1 - q0) * heads * ((k1 - k0) // key_block)
        assert cost <= budget or (q1 - q0 <= align and len(clouds) == 1)
    assert covered == offsets[-1]
