"""Shared test utilities: backends under test, random trees and inputs, the tolerance rule."""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

import sparseball
import sparseball.backends.torch.ops as torch_ops
from sparseball.tree import BallTree

# Backends under test. Tests call ops through `call`, i.e. the public API forced to one backend;
# every op takes the same positional arguments and tests always pass `sigma` and `scale`.
# CuPy serves CUDA tensors only: test_ops.py runs it where CuPy imports and a GPU is present (its
# CPU-tensor tests skip it; test_cupy_emu.py runs its kernels on the CPU instead).
BACKENDS = ("torch", *(("cupy",) if importlib.util.find_spec("cupy") and torch.cuda.is_available()
                       else ()))

# Where each backend keeps its chunk budget (tests shrink it to exercise chunking).
CHUNK_BUDGETS = {"torch": (torch_ops, "CHUNK_ELEMENTS")}


def call(backend: str, op: str, *args):
    """Run `op` through the public API (validation and dispatch included), forced to `backend`."""
    return getattr(sparseball.ops, op)(*args, backend=backend)


@contextlib.contextmanager
def chunk_budget(backend: str, elements: int | None):
    """Within the block, `backend` chunks its work by `elements` (None: its default)."""
    if elements is None or backend not in CHUNK_BUDGETS:
        yield
        return
    module, name = CHUNK_BUDGETS[backend]
    saved = getattr(module, name)
    setattr(module, name, elements)
    try:
        yield
    finally:
        setattr(module, name, saved)


# Budgets drawn by the tests: one block/row/group per chunk, a few per chunk, the default.
BUDGETS = (1, 300, 5000, None)

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Trees


def random_indices(tree, heads: int, select_size: int, group_size: int, top_k: int, rng):
    """int32 `(M/g, H, top_k)` on the tree's device: per group and head, distinct blocks of the
    group's cloud (with a real slot or not) in random order, with -1 in random places."""
    cloud = tree.slot_cloud.cpu()
    num_groups = tree.num_slots // group_size
    out = np.full((num_groups, heads, top_k), -1)
    block_cloud = cloud[::select_size].numpy()
    for group in range(num_groups):
        blocks = np.flatnonzero(block_cloud == int(cloud[group * group_size]))
        for head in range(heads):
            count = rng.integers(0, min(top_k, blocks.size) + 1)
            places = rng.choice(top_k, size=count, replace=False)
            out[group, head, places] = rng.choice(blocks, size=count, replace=False)
    return torch.from_numpy(out).to(torch.int32).to(tree.device)


def random_tree(cloud_sizes, ball_size: int, dim: int, pos_dtype: torch.dtype,
                rng: np.random.Generator) -> BallTree:
    """A `BallTree` laid out as the contract says, with real slots placed at random.

    A cloud of n points gets `P * ceil(n / P)` slots; n random slots of them are real and hold
    the cloud's points in random order. Each padding slot repeats the first real slot of the
    smallest aligned block that contains it and holds one (every P-block holds one, since all
    but the last P-block of real points would not fill the others). Empty clouds get no slots.
    Real slots are spread at random rather than by the split rule, so blocks without a real slot
    (up to whole P-blocks but one) are common: the ops may not assume any layout.
    """
    P = ball_size
    perm, mask, offsets = [], [], [0]
    first_point = 0
    for n in cloud_sizes:
        slots = P * math.ceil(n / P)
        point = np.full(slots, -1)
        point[rng.choice(slots, size=n, replace=False)] = first_point + rng.permutation(n)
        real = point >= 0
        for j in np.flatnonzero(~real):
            size = 2
            while True:
                start = j // size * size
                hits = np.flatnonzero(real[start:start + size])
                if hits.size:
                    point[j] = point[start + hits[0]]
                    break
                size *= 2
        perm.append(point)
        mask.append(real)
        offsets.append(offsets[-1] + slots)
        first_point += n
    perm_t = torch.from_numpy(np.concatenate(perm)).long()
    positions = torch.from_numpy(rng.normal(size=(first_point, dim))).to(pos_dtype)
    return BallTree(
        perm=perm_t,
        mask=torch.from_numpy(np.concatenate(mask)),
        offsets=torch.tensor(offsets),
        pos=positions[perm_t],
        ball_size=P,
        rotation_perms=torch.empty(0, perm_t.shape[0], dtype=torch.long),
        offsets_list=tuple(offsets),
        num_points=first_point,
    )


def rotated_built_tree(cloud_sizes, ball_size: int, dim: int, pos_dtype: torch.dtype,
                       rng: np.random.Generator) -> BallTree:
    """`tree.rotated_tree(r)` of a tree that `build_tree` (Numba) makes of random points in
    clouds of `cloud_sizes`, for r drawn from its 2 rotated orderings: the layout a model's odd
    layers run on. Its padding sits wherever the rotated split put it (blocks of padding only
    happen), so ops see their real slots in other places than on the unrotated tree."""
    sizes = torch.tensor(cloud_sizes)
    pos = torch.from_numpy(rng.normal(size=(int(sizes.sum()), dim))).to(pos_dtype)
    batch = torch.repeat_interleave(torch.arange(len(cloud_sizes)), sizes)
    tree = sparseball.build_tree(pos, batch, ball_size=ball_size, rotations=2, backend="numba")
    return tree.rotated_tree(int(rng.integers(2)))


def draw_tree(draw, cloud_sizes, ball_size: int, dim: int, pos_dtype: torch.dtype,
              rng: np.random.Generator) -> BallTree:
    """Hypothesis draw of a test layout: `random_tree` (real slots anywhere) or
    `rotated_built_tree` (a real tree's rotated ordering)."""
    make = random_tree if draw(st.booleans(), label="random_layout") else rotated_built_tree
    return make(cloud_sizes, ball_size, dim, pos_dtype, rng)


def powers_of_two(up_to: int):
    """Strategy: a power of two in [1, up_to]."""
    return st.sampled_from([1 << i for i in range(up_to.bit_length()) if 1 << i <= up_to])


# Cloud sizes: the odd ones (1, a power of two minus one, a multiple of nothing) and any.
CLOUD_SIZE = st.one_of(st.sampled_from([1, 7, 63, 111]), st.integers(1, 80))


@dataclass
class Problem:
    """A drawn tree plus the shapes, dtype and random source of one test example."""

    tree: BallTree
    heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float
    with_sigma: bool
    budget: int | None
    generator: torch.Generator
    # float32 or `dtype`: a model keeps sigma float32 while q, k, v run in half precision.
    sigma_dtype: torch.dtype | None = None

    def randn(self, *shape, dtype=None) -> torch.Tensor:
        """Standard normal values (never zero), made exactly representable in the problem's
        dtype, so that the float64 oracle sees exactly what the backend sees."""
        x = torch.randn(*shape, generator=self.generator, dtype=torch.float64)
        return x.to(dtype or self.dtype)

    def slot_tensor(self) -> torch.Tensor:
        return self.randn(self.tree.num_slots, self.heads, self.head_dim)

    def sigma(self) -> torch.Tensor | None:
        """A per-head bias slope in (-1, 1) (or None); negative favours nearby keys."""
        if not self.with_sigma:
            return None
        x = torch.rand(self.heads, generator=self.generator, dtype=torch.float64) * 2 - 1
        return x.to(self.sigma_dtype or self.dtype)


@st.composite
def problems(draw, dtype: torch.dtype, max_cloud_size: int = 130,
             ball_sizes: tuple[int, ...] = (4, 8, 16, 32), max_heads: int = 3) -> Problem:
    P = draw(st.sampled_from(ball_sizes))
    sizes = draw(st.lists(CLOUD_SIZE.filter(lambda n: n <= max_cloud_size), min_size=1,
                          max_size=3))
    if draw(st.booleans()):  # an empty cloud somewhere: offsets repeat, no slots
        sizes.insert(draw(st.integers(0, len(sizes))), 0)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dim = draw(st.integers(1, 3))
    tree = draw_tree(draw, sizes, P, dim, draw(st.sampled_from([torch.float32, torch.float64])),
                     rng)
    heads = draw(st.integers(1, max_heads))
    head_dim = draw(st.sampled_from([1, 2, 3, 5, 8, 16]))
    scale = draw(st.sampled_from([1 / math.sqrt(head_dim), 0.3, 1.7]))
    return Problem(
        tree=tree, heads=heads, head_dim=head_dim, dtype=dtype, scale=scale,
        with_sigma=draw(st.booleans()), budget=draw(st.sampled_from(BUDGETS)),
        generator=torch.Generator().manual_seed(seed),
        sigma_dtype=draw(st.sampled_from([dtype, torch.float32]), label="sigma_dtype"),
    )


def leaves(*tensors):
    """Copies of `tensors` that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def grads(output: torch.Tensor, inputs, grad_output: torch.Tensor):
    """Gradients of `(output * grad_output).sum()` with respect to `inputs` (None stays None)."""
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(output, wanted, grad_output, allow_unused=True))
    return [None if t is None else next(got) for t in inputs]


# The tolerance rule
#
# A backend must compute the contract's value of ITS inputs: the oracle gets the very same
# values (inputs are drawn exactly representable in the low dtype and upcast exactly), so input
# rounding is no error. What is left has two sources:
#   1. the final rounding of each result to the output dtype: at most half an ulp, so
#      |error| <= eps(out dtype) * |exact| covers it with a factor 2 to spare;
#   2. the accumulation in the compute dtype (float32 for half inputs, the input dtype
#      otherwise): sums of n terms in floating point err by about eps * sqrt(n) * (size of the
#      terms) for random rounding. The size of the terms, `magnitude`, comes from the inputs
#      (`attention_magnitudes`), not from the result: a gradient can cancel to ~0 while its
#      terms do not (dq of a query with a single key is exactly 0 in theory, 1e-17 in the
#      oracle). exp turns the absolute error of a logit (eps times its size L) into a relative
#      error of the term, so attention magnitudes carry a factor (1 + L).
#   K = ACCUMULATION_FACTOR absorbs the constants (a few roundings per term, exp and log).
# So |backend - oracle| <= eps(out) * |oracle| + K * eps(compute) * sqrt(n) * magnitude
# elementwise. With half inputs that is a tight test (a kernel that accumulated in half
# precision would miss it by a factor ~2^13); for float32 and float64 it is a test of the
# algorithm up to rounding.

ACCUMULATION_FACTOR = 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def tolerance(expected: torch.Tensor, out_dtype: torch.dtype, reduction: int,
              magnitude: float = 0.0) -> torch.Tensor:
    """Elementwise bound on |backend - oracle| for results of dtype `out_dtype` that sum
    `reduction` terms of size up to `magnitude` (see the rule above; the largest |expected| is
    a floor for it)."""
    expected = expected.detach().double()
    finite = expected[torch.isfinite(expected)]
    if finite.numel():
        magnitude = max(magnitude, float(finite.abs().max()))
    eps_out = torch.finfo(out_dtype).eps
    eps_compute = torch.finfo(compute_dtype(out_dtype)).eps
    return (eps_out * expected.abs()
            + ACCUMULATION_FACTOR * eps_compute * math.sqrt(max(reduction, 1)) * magnitude)


def _norm(x: torch.Tensor) -> float:
    """The largest row norm of `x` over its last dim."""
    return float(x.detach().double().norm(dim=-1).max())


def logit_magnitude(q, k, scale, sigma, distance: float) -> float:
    """A bound on |logit| = |scale q_i . k_j + sigma ||p_i - p_key||| for keys within
    `distance` of the queries: `scale |q| |k| + |sigma| distance` (row norms over D)."""
    slope = float(sigma.detach().double().abs().max()) if sigma is not None else 0.0
    return scale * _norm(q) * _norm(k) + slope * distance


def attention_magnitudes(q, k, v, grad_out, scale, sigma, pos) -> dict[str, float]:
    """Bounds on the size of the terms summed by attention and its backward, by result.

    With `P = softmax(S)`, `dS_ij = P_ij (dO_i . v_j - dO_i . O_i)`, each term of
    `dq_i = scale sum_j dS_ij k_j` is at most `2 scale |dO| |v| |k|` (row norms over D), of
    `dk_j` `2 scale |dO| |v| |q|`, of `dv_j = sum_i P_ij dO_i` `|dO|`, of
    `dsigma = sum_ij dS_ij dist_ij` `2 |dO| |v| max dist`; the output sums `P_ij v_j`, at most
    `|v|`. The logits are at most `L = scale |q| |k| + |sigma| max dist`, and each of these
    bounds gets a factor `(1 + L)` for the error exp makes of the logits' rounding. `pos`: the
    positions of the query and key slots.
    """
    dist = float(torch.cdist(pos.double(), pos.double()).max()) if sigma is not None else 0.0
    logits = logit_magnitude(q, k, scale, sigma, dist)
    dov = 2 * _norm(grad_out) * _norm(v)
    terms = {
        "out": _norm(v),
        "q": dov * scale * _norm(k),
        "k": dov * scale * _norm(q),
        "v": _norm(grad_out),
        "sigma": dov * dist,
    }
    return {"logits": logits, **{name: (1 + logits) * size for name, size in terms.items()}}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, reduction: int, name: str,
                   out_dtype: torch.dtype | None = None, magnitude: float = 0.0,
                   extra: torch.Tensor | None = None):
    """`actual` is within `tolerance` of the oracle's `expected`, plus `extra` (elementwise,
    shaped like `expected`) where a backend rounds more than the rule allows by design (the
    Triton backend's one-dot mode); infinities must agree."""
    out_dtype = out_dtype or actual.dtype
    actual = actual.cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert not torch.isnan(actual).any(), f"{name}: NaN at {torch.nonzero(torch.isnan(actual))[:5]}"
    actual, expected = actual.detach().double(), expected.detach().double()
    infinite = ~torch.isfinite(expected)
    assert torch.equal(actual[infinite], expected[infinite]), f"{name}: infinities differ"
    bound = tolerance(expected, out_dtype, reduction, magnitude)
    if extra is not None:
        bound = bound + extra.detach().double().cpu()
    error = (actual - expected).abs().masked_fill(infinite, 0)
    bad = error > bound
    if bad.any():
        where = torch.nonzero(bad)[:5].tolist()
        worst = float((error / bound.clamp(min=1e-300)).max())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements off the oracle ({out_dtype}, "
            f"reduction {reduction}); worst error/bound {worst:.3g}; first at {where}: "
            f"got {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()}"
        )


def selection_slack(importance: torch.Tensor, reduction: int, logits: float, lse: float,
                    head_dim: int) -> torch.Tensor:
    """Elementwise bound on |float32 - float64| for block importances that a kernel forms as
    float32 sums of `reduction` probabilities exp(logit - lse), logits of size up to `logits`
    (`logit_magnitude`), |lse| up to `lse`, over `head_dim` dims.

    Each probability's relative error is the absolute error of its exponent: the logit's dot
    product over head_dim terms (eps sqrt(D) times their size, by the rule) and a few float32
    roundings of numbers up to logits + lse. The sum of positive terms adds eps sqrt(n)
    relative, and exp's underflow to 0 (flushed subnormals included) up to n times float32's
    smallest normal. K = ACCUMULATION_FACTOR absorbs the constants, as in the rule."""
    eps, tiny = torch.finfo(torch.float32).eps, torch.finfo(torch.float32).tiny
    relative = ACCUMULATION_FACTOR * eps * (math.sqrt(head_dim) * logits + lse
                                            + math.sqrt(reduction))
    return relative * importance.double() + reduction * tiny


def assert_valid_selection(indices, importance, slack, candidate, top_k, mask, group_size,
                           group_ids=None):
    """`indices` `(G, H, top_k)` from select_blocks are a valid top-k of the oracle's block
    `importance` `(G, H, blocks)` within `slack` per block: `top_k` (or all) candidate blocks,
    ascending and distinct, then -1s, none left out that beats a kept one by more than the
    slack. A group without a real query (`mask` the tree's slot mask) finds every block equally
    (un)important: exact ties, which go to the lowest ids. `group_ids`: the groups' ids in the
    tree, for messages, when the tensors hold some groups only (`mask` then their slots)."""
    group_ids = range(indices.shape[0]) if group_ids is None else group_ids.tolist()
    for group in range(indices.shape[0]):
        allowed = torch.nonzero(candidate[group]).flatten()
        for head in range(indices.shape[1]):
            row = indices[group, head].tolist()
            chosen = [b for b in row if b >= 0]
            where = f"group {group_ids[group]} head {head}: {row}"
            assert len(chosen) == min(top_k, allowed.numel()), f"count, {where}"
            assert row[len(chosen):] == [-1] * (top_k - len(chosen)), f"-1 not last, {where}"
            assert chosen == sorted(set(chosen)), f"not ascending and distinct, {where}"
            assert all(candidate[group, b] for b in chosen), f"not a candidate, {where}"
            kept = torch.tensor(chosen, dtype=torch.long)
            rest = allowed[~torch.isin(allowed, kept)]
            if chosen and rest.numel():
                score, margin = importance[group, head], slack[group, head]
                worst_kept = float((score[kept] + margin[kept]).min())
                best_left = float((score[rest] - margin[rest]).max())
                assert worst_kept >= best_left, f"not the top {top_k}, {where}"
    for group in torch.nonzero(~mask.view(-1, group_size).any(1)).flatten().tolist():
        lowest = torch.nonzero(candidate[group]).flatten()[:top_k].tolist()
        for head in range(indices.shape[1]):
            assert indices[group, head, :len(lowest)].tolist() == lowest, \
                f"ties not to lower ids, group {group_ids[group]} head {head}"
