"""The Triton backend against the float64 oracle (`reference.ops`) and the torch backend.

On a machine without CUDA every kernel, forward and backward, runs in the Triton interpreter
(TRITON_INTERPRET=1) on small inputs; the tolerance is the project's rule
(`helpers.tolerance`). Tests marked `gpu` run large inputs in every dtype against the torch
backend, check determinism and `torch.compile(fullgraph=True)`. Outputs of the backend start
as NaN (conftest.py for floats, `_common.POISON` for the int32 selection), so an element a
kernel forgets to write fails.

Kernel paths and what exercises them: float32 inputs take the two-pass ball backward, half
inputs the one-pass one (a single key chunk for balls <= 64, two passes over the chunks for
128) and, for balls over 128, the two-pass kernel with the exact-delta kernel. Clouds of
P >= 64 slots take the single-cloud compressed kernels; smaller P the per-row cloud masks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import (
    assert_matches,
    assert_valid_selection,
    attention_magnitudes,
    draw_tree,
    grads,
    leaves,
    logit_magnitude,
    random_indices,
    random_tree,
    selection_slack,
    tolerance,
)
from helpers import problems as contract_problems
from hypothesis import given, settings
from hypothesis import strategies as st
from test_far_field import (
    check_far_field_attention,
    check_far_field_select,
    check_padding_never_acts_in_the_tree,
    check_tree_mixture,
)
from test_ops import check_clouds_are_isolated, check_padding_never_acts

import reference.ops as oracle
import sparseball
from sparseball import ops
from sparseball.tree import BallTree

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# Without CUDA the kernels must be built as interpreted functions: triton decides that when a
# kernel is decorated, so TRITON_INTERPRET=1 must be set before the kernel modules are
# imported. It is set again around each test only (fixture below): left set for the whole
# session it would make "auto" choose the interpreter for CPU tensors in other test modules.
CUDA = torch.cuda.is_available()
if not CUDA:
    _saved_interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from sparseball.backends.triton import _common
    from sparseball.backends.triton import ops as triton_ops
finally:
    if not CUDA:
        if _saved_interpret is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _saved_interpret

try:
    import sparseball.backends.torch.ops as torch_ops
except ImportError:  # the torch backend lands separately
    torch_ops = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# The interpreter runs a kernel program in Python: a quarter of the profile's examples (5 in
# the "ci" profile), all small.
few = settings(max_examples=settings().max_examples // (1 if CUDA else 4), deadline=None)


@pytest.fixture(autouse=True)
def _interpreter_and_poison(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "POISON", True)


# Problems


class Problem:
    """A random tree and the inputs of every op on it, in one dtype."""

    def __init__(self, tree, heads, head_dim, dtype, scale, with_sigma, seed, device="cpu",
                 sigma_dtype=None):
        self.tree = tree.to(device) if device != "cpu" else tree
        self.heads, self.head_dim, self.dtype, self.scale = heads, head_dim, dtype, scale
        # float32 or `dtype`: a model keeps sigma float32 while q, k, v run in half precision.
        self.sigma_dtype = sigma_dtype or dtype
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sigma_value = self._sigma() if with_sigma else None

    def randn(self, *shape) -> torch.Tensor:
        """Exactly representable in the problem's dtype, so the oracle sees what the backend
        sees."""
        x = torch.randn(*shape, generator=self.generator, dtype=torch.float32, device=self.device)
        return x.to(self.dtype)

    def slots(self) -> torch.Tensor:
        return self.randn(self.tree.num_slots, self.heads, self.head_dim)

    def _sigma(self) -> torch.Tensor:
        x = torch.rand(self.heads, generator=self.generator, device=self.device) * 2 - 1
        return x.to(self.sigma_dtype)


@st.composite
def problems(draw, dtype, ball_sizes=(2, 4, 8, 16), max_cloud=40, max_heads=2):
    P = draw(st.sampled_from(ball_sizes))
    sizes = draw(st.lists(st.integers(1, max_cloud), min_size=1, max_size=3))
    if draw(st.booleans(), label="no_padding"):
        # Clouds that fill their slots: the attention kernels compile without the mask
        # (`ops._padding_mask`), a path of its own.
        sizes = [P * math.ceil(n / P) for n in sizes]
    if draw(st.booleans()):  # an empty cloud: offsets repeat
        sizes.insert(draw(st.integers(0, len(sizes))), 0)
    seed = draw(st.integers(0, 2**31 - 1))
    tree = draw_tree(draw, sizes, P, draw(st.integers(1, 3)),
                     draw(st.sampled_from([torch.float32, torch.float64])),
                     np.random.default_rng(seed))
    head_dim = draw(st.sampled_from([16, 8, 20, 32]))
    scale = draw(st.sampled_from([1 / math.sqrt(head_dim), 0.3]))
    return Problem(tree, draw(st.integers(1, max_heads)), head_dim, dtype, scale,
                   draw(st.booleans()), seed,
                   sigma_dtype=draw(st.sampled_from([dtype, torch.float32]), label="sigma_dtype"))


def fixed_problem(sizes, P, dtype, heads=2, head_dim=16, seed=0, with_sigma=True, device="cpu"):
    tree = random_tree(sizes, P, 3, torch.float32, np.random.default_rng(seed))
    return Problem(tree, heads, head_dim, dtype, 1 / math.sqrt(head_dim), with_sigma, seed,
                   device)


def powers_of_two(up_to):
    return st.sampled_from([1 << i for i in range(up_to.bit_length()) if 1 << i <= up_to])


# Each op against the oracle: output and every gradient


def one_dot_bounds(attend, q, k, v, grad_out, out, scale, pos, key_pos):
    """Elementwise bounds on the error that the one-dot mode (`_common.SPLIT_HALF_PRODUCTS`
    False) adds, beyond the rule, to an op's output and its q, k, v and sigma gradients.
    `attend(q, k, v)`: the op's float64 oracle, `P v` for the op's probabilities P (so
    `attend(q, k, I)` is P itself); `out`: the output the backend stored; `pos`, `key_pos`:
    query and key positions.

    The mode rounds the float32 operand of four products to the 16-bit input dtype: P in
    P @ V and P^T @ dO, dS in dS @ K and dS^T @ Q. Each rounding errs by at most u = one ulp
    relative (the interpreter truncates, GPUs round to nearest), so a product
    sum_j x_j y_j whose x is rounded errs by at most u sum_j |x_j| |y_j|: the worst case,
    not a random walk's sqrt(n), since truncation errs in one direction. And it forms
    delta_i = dO_i . O_i from the stored 16-bit output O, not the exact o, so the dS it
    rounds is dS'_ij = P_ij (dP_ij - dO_i . O_i), off by a known
    shift_ij = P_ij dO_i . (o_i - O_i). Hence, elementwise (|.| of each d):
      out_i   u sum_j P_ij |v_j|           dv_j    u sum_i P_ij |dO_i|
      dq_i    scale (|sum_j shift_ij k_j| + u sum_j |dS'_ij| |k_j|)
      dk_j    scale (|sum_i shift_ij q_i| + u sum_i |dS'_ij| |q_i|)
      dsigma  |sum_ij shift_ij dist_ij|    (sigma's sum takes dS' unrounded)
    The float32 arithmetic around them is the rule's. On test_one_dot_mode's problem the
    whole bound (the rule's and these) is 1.6-3.5% of each tensor's largest value (dsigma's
    2.6-16%, mostly the rule's float32 band), and a correct kernel's error reaches 14-64% of
    it; a kernel that drops a key, swaps two heads, forms delta from another row's output or
    keeps its accumulator in 16 bits is off by more. A uniform 1% error (the output scaled
    by 1.01) is not: it is within the worst case of the mode's own rounding.
    """
    u = torch.finfo(q.dtype).eps
    q, k, v, dout, out = (t.detach().double() for t in (q, k, v, grad_out, out))
    keys, heads = k.shape[:2]
    identity = torch.eye(keys, dtype=torch.float64)[:, None, :].expand(keys, heads, keys)
    prob = attend(q, k, identity).detach()  # (M, H, keys)
    exact = torch.einsum("ihj,jhd->ihd", prob, v)
    dp = torch.einsum("ihd,jhd->ihj", dout, v)
    ds_kernel = prob * (dp - (dout * out).sum(-1, keepdim=True))
    shift = ds_kernel - prob * (dp - (dout * exact).sum(-1, keepdim=True))
    distance = torch.cdist(pos.double(), key_pos.double())
    return {
        "out": u * torch.einsum("ihj,jhd->ihd", prob, v.abs()),
        "v": u * torch.einsum("ihj,ihd->jhd", prob, dout.abs()),
        "q": scale * (torch.einsum("ihj,jhd->ihd", shift, k).abs()
                      + u * torch.einsum("ihj,jhd->ihd", ds_kernel.abs(), k.abs())),
        "k": scale * (torch.einsum("ihj,ihd->jhd", shift, q).abs()
                      + u * torch.einsum("ihj,ihd->jhd", ds_kernel.abs(), q.abs())),
        "sigma": torch.einsum("ihj,ij->h", shift, distance).abs(),
    }


def check_attention(name, problem, run, attend, inputs, key_pos, reductions, one_dot):
    """An attention op of the Triton backend against its oracle, output and every gradient.
    `run(q, k, v, sigma)`: the backend's output; `attend(q, k, v, sigma)`: the oracle's;
    `inputs`: q, k, v (the keys and values: slots or compressed blocks) and sigma;
    `reductions`: the terms summed by the output and the q, k, v and sigma gradients;
    `one_dot`: the backend runs in the one-dot mode (`one_dot_bounds`)."""
    tree = problem.tree
    inputs = leaves(*inputs)
    reference = leaves(*(None if t is None else t.double() for t in inputs))
    q, k, v, sigma = inputs
    grad_out = problem.slots()
    size = attention_magnitudes(q, k, v, grad_out, problem.scale, sigma, tree.pos)
    out = run(*inputs)
    got = grads(out, inputs, grad_out)
    expected = attend(*reference)
    want = grads(expected, reference, grad_out.double())
    assert out.dtype == problem.dtype
    extra = {}
    if one_dot:
        extra = one_dot_bounds(lambda q, k, v: attend(q, k, v, reference[3]), q, k, v, grad_out,
                               out, problem.scale, tree.pos, key_pos)
    for what, actual, wanted, n in zip(("out", "q", "k", "v", "sigma"), [out, *got],
                                       [expected, *want], reductions, strict=True):
        if what != "sigma" or sigma is not None:
            label = name if what == "out" else f"{name} d{what}"
            assert_matches(actual, wanted, n, label, magnitude=size[what], extra=extra.get(what))


def check_ball(problem, ball_size, one_dot=False):
    tree, b, scale = problem.tree, ball_size, problem.scale
    check_attention(
        "ball_attention", problem,
        lambda q, k, v, sigma: ops.ball_attention(q, k, v, tree, b, sigma, scale, backend="triton"),
        lambda q, k, v, sigma: oracle.ball_attention(q, k, v, tree, b, sigma, scale),
        (problem.slots(), problem.slots(), problem.slots(), problem.sigma_value), tree.pos,
        (b, b, b, b, tree.num_slots * b), one_dot)


def check_compressed(problem, c, one_dot=False):
    tree, scale = problem.tree, problem.scale
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    keys = M // c
    q, k_cmp, v_cmp, sigma = inputs = (problem.slots(), problem.randn(keys, H, D),
                                       problem.randn(keys, H, D), problem.sigma_value)
    lse = []

    def run(*inputs):
        out, lse_out = ops.compressed_attention(*inputs[:3], tree, c, inputs[3], scale,
                                                backend="triton")
        lse.append(lse_out)
        return out

    check_attention(
        "compressed_attention", problem, run,
        lambda q, k, v, sigma: oracle.compressed_attention(q, k, v, tree, c, sigma, scale)[0],
        inputs, tree.centers(c), (keys, M, M, M, M * keys), one_dot)
    _, lse_ref = oracle.compressed_attention(
        q.double(), k_cmp.double(), v_cmp.double(), tree, c,
        None if sigma is None else sigma.double(), scale)
    assert lse[0].dtype == torch.float32 and not lse[0].requires_grad
    distance = float(torch.cdist(tree.pos.double(), tree.pos.double()).max())
    assert_matches(lse[0], lse_ref, keys, "compressed_attention lse", out_dtype=torch.float32,
                   magnitude=logit_magnitude(q, k_cmp, scale, sigma, distance))


def check_selection(problem, s, g, top_k, seed, one_dot=False):
    tree, scale = problem.tree, problem.scale
    indices = random_indices(tree, problem.heads, s, g, top_k, np.random.default_rng(seed))
    keys, M = top_k * s, tree.num_slots
    check_attention(
        "selection_attention", problem,
        lambda q, k, v, sigma: ops.selection_attention(q, k, v, tree, indices, s, g, sigma, scale,
                                                       backend="triton"),
        lambda q, k, v, sigma: oracle.selection_attention(q, k, v, tree, indices, s, g, sigma,
                                                          scale),
        (problem.slots(), problem.slots(), problem.slots(), problem.sigma_value), tree.pos,
        (keys, keys, M, M, M * keys), one_dot)


def check_compress(problem, c):
    tree = problem.tree
    (x,) = leaves(problem.slots())
    (x_ref,) = leaves(x.double())
    out = ops.compress(x, tree, c, backend="triton")
    expected = oracle.compress(x_ref, tree, c)
    assert out.dtype == problem.dtype
    assert_matches(out, expected, c, "compress")
    grad_out = problem.randn(*out.shape)
    (dx,) = grads(out, [x], grad_out)
    (dx_ref,) = grads(expected, [x_ref], grad_out.double())
    assert_matches(dx, dx_ref, c, "compress dx")


def check_select_blocks(problem, c, s, g, top_k, exclude):
    tree = problem.tree
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    q, k_cmp, sigma = problem.slots(), problem.randn(M // c, H, D), problem.sigma_value
    _, lse = ops.compressed_attention(q, k_cmp, problem.randn(M // c, H, D), tree, c, sigma,
                                      problem.scale, backend="triton")
    indices = ops.select_blocks(q, k_cmp, lse, tree, c, s, g, top_k, sigma, problem.scale,
                                exclude, backend="triton")
    assert indices.dtype == torch.int32 and indices.shape == (M // g, H, top_k)
    importance = oracle.block_importance(q, k_cmp, lse, tree, c, s, g, sigma, problem.scale)
    candidate = oracle.selection_candidates(tree, s, g, exclude)
    distance = float(torch.cdist(tree.pos.double(), tree.centers(c).double()).max())
    logits = logit_magnitude(q, k_cmp, problem.scale, sigma, distance)
    slack = selection_slack(importance, g * s // c, logits, _largest_lse(lse, tree), D)
    assert_valid_selection(indices.cpu(), importance.cpu(), slack.cpu(), candidate.cpu(), top_k,
                           tree.mask.cpu(), g)
    if torch_ops is not None:  # the check test_large_against_torch_backend makes on the GPU
        theirs = torch_ops.select_blocks(q, k_cmp, lse, tree, c, s, g, top_k, sigma,
                                         problem.scale, exclude)
        check_selection_where_backends_differ(indices, theirs, q, k_cmp, lse, tree, c, s, g,
                                              top_k, sigma, problem.scale, exclude, logits)


def _largest_lse(lse, tree):
    """The largest |lse| of a real query (a padding query's lse may be anything)."""
    real = lse[tree.mask]
    return float(real.abs().max()) if real.numel() else 0.0


def check_selection_where_backends_differ(ours, theirs, q, k_cmp, lse, tree, c, s, g, top_k,
                                          sigma, scale, exclude, logits, samples=4, chunk=4):
    """`ours` (select_blocks' ids) is a valid top-k of the float64 importances, within
    `helpers.selection_slack`, in every group where it differs from `theirs` (another
    backend's ids for the same inputs) and in `samples` random groups besides, so the check
    runs where both agree too. Two backends that round their float32 importances differently
    may order near-ties at the k-th place differently, and a group without a real query sees
    exact ties (all 0, to the lowest ids): a count of agreeing rows is no test, a wrong pick
    among near-ties by more than the slack is. `chunk` groups at a time: the oracle holds
    g x H x M/c float64 probabilities per group."""
    differ = (ours != theirs).flatten(1).any(1)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randperm(differ.numel(), generator=generator)[:samples].to(differ.device)
    differ[sample] = True
    groups = torch.nonzero(differ).flatten()
    candidate = oracle.selection_candidates(tree, s, g, exclude)
    largest_lse = _largest_lse(lse, tree)
    for part in groups.split(chunk):
        importance = oracle.block_importance(q, k_cmp, lse, tree, c, s, g, sigma, scale,
                                             groups=part)
        slack = selection_slack(importance, g * s // c, logits, largest_lse, q.shape[-1])
        mask = tree.mask.view(-1, g)[part].flatten()
        assert_valid_selection(ours[part].cpu(), importance.cpu(), slack.cpu(),
                               candidate[part].cpu(), top_k, mask.cpu(), g, group_ids=part.cpu())


@dtypes
@few
@given(data=st.data())
def test_ball_attention(dtype, data):
    problem = data.draw(problems(dtype))
    layout = data.draw(st.sampled_from(sorted(BALL_LAYOUTS)), label="layout")
    with ball_layout(layout):
        check_ball(problem, data.draw(powers_of_two(problem.tree.ball_size), label="ball_size"))


@dtypes
@few
@given(data=st.data())
def test_ball_attention_long_key_chunks(dtype, data):
    """A key chunk longer than the row tile must still stop at the tile's balls: with tiles no
    taller than a ball the kernel masks only padding, so any key past them would be attended."""
    problem = data.draw(problems(dtype, ball_sizes=(16,)))  # balls as tall as the layout's tiles
    with ball_layout("long_key_chunks"):
        check_ball(problem, 16)


@dtypes
@few
@given(data=st.data())
def test_compressed_attention(dtype, data):
    problem = data.draw(problems(dtype))
    check_compressed(problem, data.draw(powers_of_two(problem.tree.ball_size), label="c"))


@dtypes
@few
@given(data=st.data())
def test_selection_attention(dtype, data):
    problem = data.draw(problems(dtype, ball_sizes=(4, 8, 16), max_cloud=24))
    P = problem.tree.ball_size
    s = data.draw(powers_of_two(P), label="select_size")
    g = data.draw(powers_of_two(P).filter(lambda g: g >= 2), label="group_size")
    check_selection(problem, s, g, data.draw(st.integers(1, 4), label="top_k"),
                    data.draw(st.integers(0, 2**31 - 1), label="index seed"))


@dtypes
@few
@given(data=st.data())
def test_selection_attention_tiles_cut_to_groups(dtype, data):
    """Tiles asked for larger than a query group or a selection block (a launch override) must
    still stop at it: a program's rows share one group's selection, its keys one block."""
    problem = data.draw(problems(dtype, ball_sizes=(4, 8, 16), max_cloud=24))
    P = problem.tree.ball_size
    with launch_override("selection", rows=64, block_m=64, key_rows=64, block_n=64):
        check_selection(problem, data.draw(powers_of_two(P), label="select_size"),
                        data.draw(powers_of_two(P).filter(lambda g: g >= 2), label="group_size"),
                        data.draw(st.integers(1, 4), label="top_k"),
                        data.draw(st.integers(0, 2**31 - 1), label="index seed"))


@dtypes
@few
@given(data=st.data())
def test_compress(dtype, data):
    problem = data.draw(problems(dtype))
    check_compress(problem, data.draw(powers_of_two(problem.tree.ball_size), label="c"))


@contextlib.contextmanager
def launch_override(name, **override):
    """Launch `name`'s kernels with `override` on their configuration (as bench/triton_tune.py
    does), e.g. a variant that is a tuning candidate but not the default."""
    _common.CONFIG_OVERRIDES[name] = override
    try:
        yield
    finally:
        _common.CONFIG_OVERRIDES.pop(name, None)


# The ball kernels (launch overrides of the forward and the backward): one head per program
# (the forward streaming key chunks), the same with key chunks longer than the row tiles (the
# launchers must cut them to the tile's balls), and one program for every head (tiles of 16
# here, as large as the drawn balls, so that several small balls share one under the
# block-diagonal mask).
BALL_LAYOUTS = {
    "per_head": (dict(heads_inside=False), dict(heads_inside=False)),
    "long_key_chunks": (dict(heads_inside=False, block_m=16, block_n=64),
                        dict(heads_inside=False, one_pass=True, rows=16, block_n=64)),
    "heads_inside": (dict(heads_inside=True, block_m=16, warps=4, stages=1),
                     dict(heads_inside=True, one_pass=True, rows=16, block_n=16, warps=4, stages=1)),
}


@contextlib.contextmanager
def ball_layout(name):
    forward, backward = BALL_LAYOUTS[name]
    with launch_override("ball_fwd", **forward), launch_override("ball_bwd", **backward):
        yield


# select_blocks' kernel layouts (launch overrides): row-major logits, transposed logits, and one
# program per group for every head.
SELECT_LAYOUTS = {"rows": dict(keys_as_rows=False, heads_inside=False),
                  "keys_as_rows": dict(keys_as_rows=True, heads_inside=False),
                  "heads_inside": dict(heads_inside=True)}


@few
@given(data=st.data())
def test_padding_never_acts(data):
    """test_ops' padding property for this backend: not even NaN in padding slots (or in
    compressed blocks without a real slot) reaches a real output, and finite padding leaves
    the gradients of real slots as they are. The kernels load no padding key's v (nor its k
    in the backwards)."""
    check_padding_never_acts("triton", data, DTYPES, max_cloud_size=24)  # interpreter time


@few
@given(data=st.data())
def test_clouds_are_isolated(data):
    """test_ops' isolation property for this backend: changing every other cloud's inputs
    changes none of one cloud's outputs or gradients (tiles shared by small clouds mask by
    cloud)."""
    check_clouds_are_isolated("triton", data, DTYPES, max_cloud_size=24)  # interpreter time


@few
@given(data=st.data(), layout=st.sampled_from(sorted(SELECT_LAYOUTS)))
def test_select_blocks(data, layout):
    problem = data.draw(problems(data.draw(st.sampled_from(DTYPES), label="dtype"),
                                 ball_sizes=(4, 8, 16), max_cloud=32))
    P = problem.tree.ball_size
    c = data.draw(powers_of_two(P), label="compress_size")
    s = data.draw(powers_of_two(P).filter(lambda s: s >= c), label="select_size")
    g = data.draw(powers_of_two(P).filter(lambda g: g >= 2), label="group_size")
    exclude = data.draw(st.none() | powers_of_two(P), label="exclude_ball_size")
    with launch_override("select_blocks", **SELECT_LAYOUTS[layout]):
        check_select_blocks(problem, c, s, g, data.draw(st.integers(1, 6), label="top_k"), exclude)


@pytest.mark.parametrize("layout", sorted(SELECT_LAYOUTS))
def test_select_blocks_three_heads(layout):
    # A head count that is not a power of two: heads_inside pads its per-head top-k rows to 4.
    problem = fixed_problem([70, 45, 3], 8, torch.bfloat16, heads=3, head_dim=16, seed=12)
    with launch_override("select_blocks", **SELECT_LAYOUTS[layout]):
        check_select_blocks(problem, 2, 8, 8, 5, 8)
        check_select_blocks(problem, 1, 4, 2, 3, None)


# Sizes the small drawn trees never reach: balls of 128 (one-pass backward over several key
# chunks) and 256 (two-pass backward; for half inputs with the exact-delta kernel), clouds of
# P >= 64 slots (single-cloud compressed kernels), selection blocks and groups of 128 (two
# 64-row chunks), 128 compressed blocks per selection block, top_k > 16 in select_blocks.
# float16 runs the very code of bfloat16.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_large_blocks(dtype):
    problem = fixed_problem([135, 64], 128, dtype, heads=1, head_dim=32, seed=1)
    check_ball(problem, 128)  # the default: every head in one program, for 16-bit inputs
    with ball_layout("per_head"):
        check_ball(problem, 128)
    check_ball(problem, 8)
    check_compressed(problem, 2)
    check_selection(problem, 128, 128, 2, seed=1)
    check_compress(problem, 128)
    for layout in SELECT_LAYOUTS.values():
        with launch_override("select_blocks", **layout):
            check_select_blocks(problem, 1, 128, 64, 3, None)
            check_select_blocks(problem, 4, 4, 128, 20, 128)
    check_ball(fixed_problem([300], 256, dtype, heads=1, head_dim=16, seed=2), 256)


def test_far_points_and_positive_sigma():
    """Logits of thousands (positive sigma, far points): rows padding a tile must not overflow
    into NaN gradients (groups of 2 pad their 16-row tiles)."""
    problem = fixed_problem([40, 30], 8, torch.float32, heads=1, head_dim=16, seed=11)
    tree = problem.tree
    problem.tree = BallTree(perm=tree.perm, mask=tree.mask, offsets=tree.offsets,
                            pos=tree.pos * 300, ball_size=tree.ball_size,
                            rotation_perms=tree.rotation_perms, offsets_list=tree.offsets_list,
                            num_points=tree.num_points)
    problem.sigma_value = torch.tensor([0.5])
    check_ball(problem, 4)
    check_compressed(problem, 2)
    check_selection(problem, 2, 2, 3, seed=12)


def test_one_dot_mode(monkeypatch):
    """SPLIT_HALF_PRODUCTS=False (the usual FlashAttention rounding of P and dS to one half,
    delta from the stored output) still computes the right thing: within the rule plus the
    rounding the mode makes on purpose, bounded from the oracle's probabilities
    (`one_dot_bounds`)."""
    monkeypatch.setattr(_common, "SPLIT_HALF_PRODUCTS", False)
    problem = fixed_problem([40, 70], 16, torch.bfloat16, heads=2, head_dim=16, seed=3)
    check_ball(problem, 16, one_dot=True)
    check_compressed(problem, 4, one_dot=True)
    check_selection(problem, 8, 8, 3, seed=5, one_dot=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_backward_keeps_the_output_only_when_it_reads_it(dtype):
    """Half inputs take the exact-delta backward, which never reads the forward's output, so
    the ops must not keep it alive until the backward (M x H x D each: 3 GiB of the mixture
    at 1M points); float32 forms delta from the output and must keep it."""
    problem = fixed_problem([40, 70], 16, dtype, heads=2, head_dim=16, seed=4)
    tree, scale = problem.tree, problem.scale
    q, k, v = leaves(problem.slots(), problem.slots(), problem.slots())
    k_cmp, v_cmp = leaves(problem.randn(tree.num_slots // 4, 2, 16),
                          problem.randn(tree.num_slots // 4, 2, 16))
    indices = random_indices(problem.tree, problem.heads, 8, 8, 3, np.random.default_rng(4))
    runs = {
        "ball": lambda: ops.ball_attention(q, k, v, tree, 16, None, scale, backend="triton"),
        "compressed": lambda: ops.compressed_attention(q, k_cmp, v_cmp, tree, 4, None, scale,
                                                       backend="triton")[0],
        "selection": lambda: ops.selection_attention(q, k, v, tree, indices, 8, 8, None, scale,
                                                     backend="triton"),
    }
    for name, run in runs.items():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t,
                                                      lambda t: t):
            out = run()
        kept = any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                   for t in saved)
        assert kept == (dtype == torch.float32), name
        out.backward(problem.randn(*out.shape))  # and the backward still runs
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), name


# The tree far field: test_far_field's checks against the float64 oracle, on small drawn trees
# (every kernel program runs in Python under the interpreter: a few examples each, ~1 minute in
# all). The dk/dv kernel's chunks of each token's group list are drawn: one group per chunk,
# two, or the default (one chunk per token on these trees).


def far_field_problem(data, dtype):
    return data.draw(contract_problems(dtype, max_cloud_size=40, ball_sizes=(4, 8, 16),
                                       max_heads=2), label="problem")


def far_field_chunk(data):
    chunk = data.draw(st.sampled_from([1, 2, 256]), label="dkv chunk")
    return launch_override("far_field", chunk=chunk)


@dtypes
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_far_field_attention(dtype, data):
    problem = far_field_problem(data, dtype)
    with far_field_chunk(data):
        check_far_field_attention("triton", problem, data, min_group=2)


@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_far_field_select(data):
    problem = far_field_problem(data, data.draw(st.sampled_from(DTYPES), label="dtype"))
    check_far_field_select("triton", problem, data, min_group=2)


@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_attention_tree_mixture(data):
    problem = far_field_problem(data, torch.float32)
    with far_field_chunk(data):
        check_tree_mixture("triton", problem, data, min_group=2)


@settings(max_examples=2, deadline=None)
@given(data=st.data())
def test_padding_never_acts_in_the_tree_far_field(data):
    check_padding_never_acts_in_the_tree("triton", far_field_problem(data, torch.float32), data,
                                         min_group=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_attention_mixture_matches_torch_backend(dtype):
    """`sparseball.attention` (every op, through the public API) agrees with the torch
    backend, output and gradients, with float32 sigma and gates (as a model under autocast
    keeps them) whatever the dtype of q, k, v. Both backends accumulate in float32 and round
    once to the output dtype: they may differ by that rounding, one ulp of the dtype."""
    if torch_ops is None:
        pytest.skip("the torch backend is not available")
    problem = fixed_problem([50, 20], 16, dtype, heads=2, head_dim=16, seed=7)
    tree = problem.tree
    sigma = torch.tensor([-0.7, 0.3])
    inputs = leaves(problem.slots(), problem.slots(), problem.slots(), sigma,
                    torch.softmax(torch.randn(tree.num_slots, problem.heads, 3), -1))
    grad_out = problem.slots()
    results = []
    for backend in ("triton", "torch"):
        tensors = leaves(*inputs)
        out = sparseball.attention(*tensors[:3], tree, gates=tensors[4], sigma=tensors[3],
                                   top_k=2, compress_size=4, select_size=4, group_size=8,
                                   backend=backend)
        results.append([out, *grads(out, tensors, grad_out)])
    ulp = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    names = ["out", "dq", "dk", "dv", "dsigma", "dgates"]
    for name, got, want in zip(names, *results, strict=True):
        assert got.dtype == (dtype if name in ("out", "dq", "dk", "dv") else torch.float32), name
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got, want, rtol=ulp, atol=ulp * scale, msg=name)


def test_public_dispatch(monkeypatch):
    """The backend table lists every op; on the CPU it serves only under the interpreter."""
    table = sparseball.BACKENDS["triton"]
    assert set(table.ops) == set(sparseball.backends.OPS)
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert table.not_supported_reasons("ball_attention", cpu, torch.float32, 64) == []
    assert table.not_supported_reasons("ball_attention", cpu, torch.float64, 64)
    assert table.not_supported_reasons("ball_attention", cpu, torch.float32, 256)
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = table.not_supported_reasons("ball_attention", cpu, torch.float32, 64)
    assert any("TRITON_INTERPRET=1" in reason for reason in reasons), reasons


@pytest.mark.skipif(CUDA, reason="test_compile_fullgraph runs the real thing on the GPU")
@pytest.mark.parametrize(("sizes", "far_field"), [([50, 20], "flat"), ([48, 16], "flat"),
                                               ([50, 20], "tree")],
                         ids=["padded", "no_padding", "tree"])
def test_compile_traces_fullgraph(sizes, far_field):
    """`torch.compile(sparseball.attention, fullgraph=True)` traces forward and backward into
    one graph of `sparseball_triton` ops: kernels built for a GPU target (no GPU needed to
    trace), the graph compiled with AOT autograd. Running it needs a GPU, so the run fails
    after tracing; what counts is that tracing raised no graph break. Clouds that fill their
    slots pass the ops no mask (None), a graph of its own; the tree far field traces its
    descent (torch ops around one importance kernel per level) into the same graph."""
    script = textwrap.dedent("""
        import os, sys
        import numpy as np, torch, triton
        from triton.backends.compiler import GPUTarget
        sys.path.insert(0, "tests")
        from helpers import random_tree
        import sparseball
        import sparseball.backends.triton.ops  # kernels as JIT functions: no interpreter
        from torch._dynamo.backends.common import aot_autograd

        class Target:  # torch asks the driver which target to analyse the kernels for
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
        triton.runtime.driver._active = Target()
        os.environ["TRITON_INTERPRET"] = "1"  # only so that the table accepts CPU tensors
        graphs = []
        def keep(gm, example_inputs):
            graphs.append(gm)
            return gm
        tree = random_tree(SIZES, 16, 3, torch.float32, np.random.default_rng(0))
        q, k, v = (torch.randn(tree.num_slots, 2, 16, requires_grad=True) for _ in range(3))
        sigma = torch.randn(2, requires_grad=True)
        # The level layout is built on the host, with numpy, and cached with the tree: built
        # inside the traced function it breaks the graph, so it is built before.
        tree.levels(4, 2, 4)
        def f(q, k, v, sigma):
            return sparseball.attention(q, k, v, tree, sigma=sigma, top_k=2, compress_size=4,
                                        select_size=4, group_size=8, backend="triton",
                                        far_field="FAR_FIELD", fanout=2, top_blocks=4)
        compiled = torch.compile(f, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
        try:
            compiled(q, k, v, sigma).sum().backward()
        except torch._dynamo.exc.Unsupported:
            raise
        except Exception as error:  # launching a kernel on the CPU
            print("ran into", type(error).__name__)
        assert len(graphs) == 1, len(graphs)  # one forward graph: no graph break
        launches = graphs[0].code.count("triton_kernel_wrapper_functional(")
        assert launches >= 6, launches  # compress x2, compressed, select, selection, ball
        print("TRACED", launches)
    """).replace("SIZES", repr(sizes)).replace("FAR_FIELD", far_field)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0 and "TRACED" in result.stdout, result.stderr[-4000:]




@pytest.mark.skipif(CUDA, reason="the GPU tests build and run every kernel")
def test_kernels_build_for_sm90():
    """Every kernel the ops launch (bfloat16 and float32 at D = 64, the main tile
    configurations) builds with the real compiler for sm_90, fits its shared memory, and
    every key loop launched with num_stages > 1 is software-pipelined, but for those measured
    faster without (bench/triton_sm90.py --check). The interpreter does not compile, so this
    is what catches compile-time errors and unpipelined loops on CPU CI."""
    nvidia = importlib.util.find_spec("triton.backends.nvidia")
    if nvidia is None or not os.path.exists(
            os.path.join(os.path.dirname(nvidia.origin), "bin", "ptxas")):
        pytest.skip("triton's NVIDIA backend (with its ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "triton_sm90.py")
    result = subprocess.run([sys.executable, script, "--check"], capture_output=True,
                            text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0 and "BUILT" in result.stdout, result.stderr[-4000:]


# GPU: large inputs against the torch backend, determinism, torch.compile


def _gpu_magnitudes(problem, q, k, v, grad_out, sigma):
    """`attention_magnitudes` with the largest distance bounded by the bounding box (no
    M x M distance matrix)."""
    pos = problem.tree.pos.double()
    corners = torch.stack([pos.min(0).values, pos.max(0).values])
    return attention_magnitudes(q, k, v, grad_out, problem.scale, sigma, corners)


def _against_torch_backend(name, got, want, reduction, magnitude):
    """Both backends are within the rule's bound of the exact value (each rounded once to the
    output dtype), so they are within twice that bound of each other."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    out_dtype = got.dtype
    got, want = got.detach().double(), want.detach().double()
    infinite = ~torch.isfinite(want)
    assert torch.equal(got[infinite], want[infinite]), f"{name}: infinities differ"
    bound = 2 * tolerance(want, out_dtype, reduction, magnitude)
    error = (got - want).abs().masked_fill(infinite, 0)
    worst = float((error / bound.clamp(min=1e-300)).max())
    assert worst <= 1, f"{name}: worst error / bound {worst:.3g}"


@pytest.mark.gpu
@dtypes
@settings(max_examples=3, deadline=None)
@given(points=st.integers(1000, 1 << 20), clouds=st.integers(1, 16),
       head_dim=st.sampled_from([16, 32, 64, 128]), seed=st.integers(0, 2**31),
       no_padding=st.booleans())
def test_large_against_torch_backend(dtype, points, clouds, head_dim, seed, no_padding):
    """Every op and every gradient against the torch backend on up to 1M points. Each op gets
    the same inputs on both backends (the torch backend's compressed keys, lse and selection),
    so that a rounding difference upstream does not show up downstream."""
    if torch_ops is None:
        pytest.skip("the torch backend is not available")
    points = min(points, (1 << 26) // head_dim)  # 1M points up to D = 64: both backends fit
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, rng.multinomial(points, np.ones(clouds) / clouds)).tolist()
    if no_padding:  # clouds that fill their slots: the kernels' path without a mask
        sizes = [128 * math.ceil(n / 128) for n in sizes]
    tree = random_tree(sizes, 128, 3, torch.float32, rng)
    problem = Problem(tree, 8, head_dim, dtype, 1 / math.sqrt(head_dim), True, seed,
                      device="cuda")
    tree, scale = problem.tree, problem.scale
    M = tree.num_slots
    c, s, g, top_k = 64, 64, 64, 16
    q, k, v = problem.slots(), problem.slots(), problem.slots()
    sigma = problem.sigma_value
    grad_out = problem.slots()
    size = _gpu_magnitudes(problem, q, k, v, grad_out, sigma)

    def both(run, tensors, names, reductions):
        """Run `run(module, *leaves)` on both backends; compare outputs and gradients."""
        results = []
        for module in (triton_ops, torch_ops):
            inputs = leaves(*tensors)
            out = run(module, *inputs)
            results.append([out, *grads(out, inputs, grad_out[:out.shape[0]])])
        for name, got, want, n in zip(names, *results, reductions, strict=True):
            _against_torch_backend(name, got, want, n, size[name.split("/")[-1]])

    both(lambda m, x: m.compress(x, tree, c), [k], ["compress/out", "compress/v"], [c, c])
    k_cmp, v_cmp = torch_ops.compress(k, tree, c), torch_ops.compress(v, tree, c)
    names = ["compressed/out", "compressed/q", "compressed/k", "compressed/v", "compressed/sigma"]
    both(lambda m, *x: m.compressed_attention(*x[:3], tree, c, x[3], scale)[0],
         [q, k_cmp, v_cmp, sigma], names, [M // c, M, M, M, M * (M // c)])
    _, lse = torch_ops.compressed_attention(q, k_cmp, v_cmp, tree, c, sigma, scale)
    _, lse_triton = triton_ops.compressed_attention(q, k_cmp, v_cmp, tree, c, sigma, scale)
    _against_torch_backend("lse", lse_triton, lse, M // c, size["logits"])

    chosen = torch_ops.select_blocks(q, k_cmp, lse, tree, c, s, g, top_k, sigma, scale, None)
    for layout, override in SELECT_LAYOUTS.items():
        with launch_override("select_blocks", **override):
            ours = triton_ops.select_blocks(q, k_cmp, lse, tree, c, s, g, top_k, sigma, scale, None)
        assert ((ours[..., 1:] > ours[..., :-1]) | (ours[..., 1:] == -1)).all(), layout
        try:
            check_selection_where_backends_differ(ours, chosen, q, k_cmp, lse, tree, c, s, g,
                                                  top_k, sigma, scale, None, size["logits"])
        except AssertionError as error:
            raise AssertionError(f"select_blocks ({layout}): {error}") from error

    names = ["selection/out", "selection/q", "selection/k", "selection/v", "selection/sigma"]
    both(lambda m, *x: m.selection_attention(*x[:3], tree, chosen, s, g, x[3], scale),
         [q, k, v, sigma], names, [top_k * s, top_k * s, M, M, M * top_k * s])
    names = ["ball/out", "ball/q", "ball/k", "ball/v", "ball/sigma"]
    # Both 16-bit forward kernels up to D = 64: query tiles of one head streaming key chunks,
    # and one program per ball for every head. Their tiles are for 16-bit operands: float32
    # and D = 128 keep their own (the override's 3 stages of float32 D = 128 tiles would take
    # 329 KB of shared memory).
    overrides = [{}]
    if dtype != torch.float32 and head_dim <= 64:
        overrides = [dict(heads_inside=False, block_m=128, block_n=64, warps=4, stages=3),
                     dict(heads_inside=True, block_m=128, warps=8, stages=2)]
    for override in overrides:
        with launch_override("ball_fwd", **override):
            both(lambda m, *x: m.ball_attention(*x[:3], tree, 128, x[3], scale),
                 [q, k, v, sigma], names, [128, 128, 128, 128, M * 128])


@pytest.mark.gpu
@dtypes
@settings(max_examples=2, deadline=None)
@given(points=st.integers(20_000, 1 << 19), clouds=st.integers(1, 4),
       head_dim=st.sampled_from([32, 64]), seed=st.integers(0, 2**31))
def test_far_field_large_against_torch_backend(dtype, points, clouds, head_dim, seed):
    """The tree far field on up to 512k points (top_blocks 32: three levels and more) against
    the torch backend: far_field_attention's output and every gradient for the torch
    backend's cut, and the descent's importance kernel on each group's top-level frontier
    (the descent around it is the same code on both backends), within twice
    `helpers.selection_slack` of each other."""
    from sparseball.backends.descent import top_frontier
    from sparseball.backends.triton.far_field import frontier_importance_op

    if torch_ops is None:
        pytest.skip("the torch backend is not available")
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, rng.multinomial(points, np.ones(clouds) / clouds)).tolist()
    tree = random_tree(sizes, 128, 3, torch.float32, rng)
    problem = Problem(tree, 8, head_dim, dtype, 1 / math.sqrt(head_dim), True, seed,
                      device="cuda")
    tree, scale, sigma = problem.tree, problem.scale, problem.sigma_value
    M, H, D = tree.num_slots, problem.heads, head_dim
    c, g, top_k, fanout, top = 64, 64, 16, 4, 32
    levels = tree.levels(c, fanout, top)
    q, k, v, grad_out = problem.slots(), problem.slots(), problem.slots(), problem.slots()
    k_tok = torch_ops.far_field_tokens(torch_ops.compress(k, tree, c), tree, levels)
    v_tok = torch_ops.far_field_tokens(torch_ops.compress(v, tree, c), tree, levels)
    _, cut = torch_ops.far_field_select(q, k_tok, tree, levels, g, top_k, sigma, scale)
    size = _gpu_magnitudes(problem, q, k_tok, v_tok, grad_out, sigma)
    extra = math.log(max(int(levels.count.max()), 1))  # the log-count term of the logits
    factor = (1 + size["logits"] + extra) / (1 + size["logits"])
    size = {name: value * factor for name, value in size.items()}

    results = []
    for module in (triton_ops, torch_ops):
        inputs = leaves(q, k_tok, v_tok, sigma)
        out = module.far_field_attention(*inputs[:3], tree, levels, cut, g, inputs[3], scale)
        results.append([out, *grads(out, inputs, grad_out)])
    W = max(cut.shape[-1], 1)
    for name, got, want, n in zip(["out", "q", "k", "v", "sigma"], *results,
                                  [W, W, M, M, M * W], strict=True):
        _against_torch_backend(f"far_field_attention/{name}", got, want, n, size[name])

    frontier = top_frontier(levels, tree.slot_cloud[::g], H)
    valid = (frontier >= 0) & (levels.count > 0)[frontier.clamp(min=0)]
    ids = torch.where(valid, frontier, -1).to(torch.int32).contiguous()
    ours = frontier_importance_op(
        q, k_tok, tree.pos.float().contiguous(), levels.center.float().contiguous(),
        torch.log(levels.count.clamp(min=1).float()), tree.mask.to(torch.uint8), ids, sigma, g,
        scale)
    table = torch_ops._TokenTable(k_tok, None, levels, sigma, torch.float32)
    theirs = torch_ops._FrontierImportance(q, tree.mask, tree.pos, table, g, scale)(frontier,
                                                                                     valid)
    logits = size["logits"] + extra
    slack = selection_slack(theirs.double(), g, logits, logits + math.log(ids.shape[-1]), D)
    error = (ours.double() - theirs.double()).abs()
    worst = float((error / (2 * slack)).masked_fill(~valid, 0).max())
    assert worst <= 1, f"frontier importance: worst error / bound {worst:.3g}"

    selected, ours_cut = triton_ops.far_field_select(q, k_tok, tree, levels, g, top_k, sigma,
                                                     scale)
    for name, rows in (("selected", selected), ("cut", ours_cut)):
        assert ((rows[..., 1:] > rows[..., :-1]) | (rows[..., 1:] == -1)).all(), name
    # Near-ties may be ordered differently in float32: the cuts agree almost everywhere.
    agree = (ours_cut == cut).all(-1).float().mean()
    assert float(agree) > 0.95, f"cuts agree in {float(agree):.3f} of the rows only"


@pytest.mark.gpu
@dtypes
def test_far_field_backward_is_deterministic(dtype):
    problem = fixed_problem([300_000, 5000], 128, dtype, heads=4, head_dim=64, device="cuda")
    tree = problem.tree
    q, k, v = problem.slots(), problem.slots(), problem.slots()
    sigma = problem.sigma_value
    grad_out = problem.slots()
    runs = []
    for _ in range(2):
        tensors = leaves(q, k, v, sigma)
        out = sparseball.attention(*tensors[:3], tree, sigma=tensors[3], backend="triton",
                                   far_field="tree", top_blocks=64)
        runs.append([out, *grads(out, tensors, grad_out)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


@pytest.mark.gpu
@dtypes
def test_backward_is_deterministic(dtype):
    problem = fixed_problem([300_000, 5000], 128, dtype, heads=4, head_dim=64, device="cuda")
    tree = problem.tree
    q, k, v = problem.slots(), problem.slots(), problem.slots()
    sigma = problem.sigma_value
    grad_out = problem.slots()
    runs = []
    for _ in range(2):
        tensors = leaves(q, k, v, sigma)
        out = sparseball.attention(*tensors[:3], tree, sigma=tensors[3], backend="triton")
        runs.append([out, *grads(out, tensors, grad_out)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def mixture_terms(run, inputs, gates, grad_out):
    """The terms `sparseball.attention` sums, per branch b (compressed, selected, ball): the
    gated output `g_b * o_b` and the branch's share of the q, k, v and sigma gradients for the
    output gradient it is handed, `g_b * dO`; and `sum_d |dO o_b|` (in slot b of the gates'
    shape) for the gates' gradient. `run(q, k, v, sigma, gates)` calls the mixture. One-hot
    gates give each branch's terms exactly: products by 1 and 0 and sums with 0 are exact, and
    a branch handed a zero output gradient contributes exact zeros."""
    terms = {name: [] for name in ("out", "q", "k", "v", "sigma", "gates")}
    for b, one_hot in enumerate(torch.eye(3, dtype=gates.dtype, device=gates.device)):
        tensors = leaves(*inputs)
        branch = run(*tensors, one_hot.expand_as(gates))
        gate = gates[..., b:b + 1].detach()
        for name, grad in zip("qkvs", grads(branch, tensors, gate * grad_out), strict=True):
            terms["sigma" if name == "s" else name].append(grad)
        branch = branch.detach().double()
        terms["out"].append(gate.double() * branch)
        gate_term = torch.zeros(gates.shape, dtype=torch.float64, device=gates.device)
        gate_term[..., b] = (grad_out.double() * branch).abs().sum(-1)
        terms["gates"].append(gate_term)
    return terms


def fused_difference_bound(terms, roundings, dtype, summed=1):
    """Elementwise bound on |a - b| for two evaluations a, b of the sum of `terms` (tensors the
    two share exactly) in `dtype` that round each term at most `roundings` times to nearest
    (a product, a partial sum, the result), in any order and fusion: each is within
    gamma_n sum |terms| of the exact sum, gamma_n = n u / (1 - n u) with u = eps / 2, so they
    are within twice that of each other. `summed` terms of a float32 reduction (a dot product
    over D) add float32's gamma_summed."""
    def gamma(n, u):
        return n * u / (1 - n * u)

    size = sum(t.detach().double().abs() for t in terms)
    u = torch.finfo(dtype).eps / 2
    return 2 * (gamma(roundings, u) + gamma(summed, torch.finfo(torch.float32).eps / 2)) * size


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "sizes", "far_field"),
                         [("triton", [40_000, 3000], "flat"), ("auto", [40_000, 3000], "flat"),
                          ("triton", [40_960, 2944], "flat"), ("triton", [40_000, 3000], "tree")],
                         ids=["triton", "auto", "triton-no_padding", "triton-tree"])
def test_compile_fullgraph(backend, sizes, far_field):
    """torch.compile(sparseball.attention, fullgraph=True): forward and backward, the same
    results as eager up to rounding; "auto" (the default) picks triton for CUDA tensors,
    through the same table. Clouds that fill their slots (multiples of 128 points) pass the
    kernels no mask.

    Both run the same kernels on the same inputs (the kernels are deterministic), so they can
    differ only where Inductor fuses the mixture's torch arithmetic and rounds once where eager
    rounds each step to bfloat16: `g_c o_c + g_s o_s + g_l o_b` (3 products, 2 sums: 3
    roundings per term), each gradient of q, k, v and sigma summed over the 3 branches (2
    roundings; sigma 3: a branch's own float32 reduction of its per-tile sums may be reordered
    and round the other way), the gates' gradient `sum_d dO o_b` (2 roundings and a float32
    sum of D). Each branch's share comes from eager runs with one-hot gates
    (`mixture_terms`), and `fused_difference_bound` bounds each result elementwise: a wrong
    compiled graph (a branch on a stale mask, a kernel reading another buffer) is off by a
    share of a branch, 2% of |g_b o_b| at least. Explicit gates (a model's learned ones) hand
    each branch the exact product `g_b * dO` in eager and compiled alike; with `gates=None`
    Inductor may divide by 3 as a product by 1/3, which differs by an ulp."""
    problem = fixed_problem(sizes, 128, torch.bfloat16, heads=4, head_dim=64, device="cuda")
    tree = problem.tree
    M, H, D = tree.num_slots, problem.heads, problem.head_dim
    gates = torch.softmax(problem.randn(M, H, 3).float(), -1).to(torch.bfloat16)
    inputs = leaves(problem.slots(), problem.slots(), problem.slots(), problem.sigma_value, gates)
    grad_out = problem.slots()

    tree.levels(64, 4, 256)  # built on the host before tracing (numpy breaks the graph)

    def run(q, k, v, sigma, gates):
        return sparseball.attention(q, k, v, tree, gates=gates, sigma=sigma, backend=backend,
                                    far_field=far_field)

    eager_leaves = leaves(*inputs)
    eager = run(*eager_leaves)
    eager_grads = grads(eager, eager_leaves, grad_out)
    torch._dynamo.reset()
    compiled_fn = torch.compile(run, fullgraph=True)
    compiled_leaves = leaves(*inputs)
    compiled = compiled_fn(*compiled_leaves)
    compiled_grads = grads(compiled, compiled_leaves, grad_out)
    terms = mixture_terms(run, inputs[:4], gates, grad_out)
    roundings = {"out": 3, "q": 2, "k": 2, "v": 2, "sigma": 3, "gates": 2}
    names = ["out", "q", "k", "v", "sigma", "gates"]
    for name, got, want in zip(names, [compiled, *compiled_grads], [eager, *eager_grads],
                               strict=True):
        bound = fused_difference_bound(terms[name], roundings[name], torch.bfloat16,
                                       summed=D if name == "gates" else 1)
        error = (got.double() - want.double()).abs()
        bad = ~(error <= bound)  # NaN fails too
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ from eager by more than "
            f"the fused roundings allow; worst error/bound "
            f"{float((error / bound.clamp(min=1e-300)).max()):.3g} at {torch.nonzero(bad)[:5].tolist()}")
