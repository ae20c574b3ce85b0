"""The CuPy backend on a GPU (tests marked `gpu`: bench/gpu.sh runs them on a CUDA machine).

test_cupy_emu.py checks the kernels on the CPU through the emulator; here they run through
CuPy on CUDA tensors: every op and gradient on inputs larger than the emulator takes against
the torch backend in float64 (the contract, under the project's tolerance rule), bitwise
determinism of the backward, and `torch.compile(fullgraph=True)` with Inductor. Written before
any GPU run: expect the first run to tell.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import (
    assert_matches,
    assert_valid_selection,
    attention_magnitudes,
    grads,
    leaves,
    random_tree,
    selection_slack,
)

import reference.ops as oracle
import sparseball
import sparseball.backends.torch.ops as torch_ops

if importlib.util.find_spec("cupy") is None:
    pytest.skip("cupy is not installed", allow_module_level=True)

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def _problem(sizes, head_dim, dtype, seed=0, heads=4):
    rng = np.random.default_rng(seed)
    tree = random_tree(sizes, 64, 3, torch.float32, rng).to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    sigma = torch.rand(heads, generator=gen, device=DEVICE) * 2 - 1
    return tree, randn, sigma


def _magnitudes(tree, q, k, v, grad_out, scale, sigma):
    """`attention_magnitudes` with the largest distance bounded by the bounding box."""
    pos = tree.pos.double()
    corners = torch.stack([pos.min(0).values, pos.max(0).values])
    return attention_magnitudes(q, k, v, grad_out, scale, sigma, corners)


@dtypes
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_against_torch_float64(dtype, head_dim):
    tree, randn, sigma = _problem([9000, 2500, 130], head_dim, dtype, seed=head_dim)
    M, H = tree.num_slots, 4
    scale = 1 / math.sqrt(head_dim)
    c, s, g, top_k = 32, 64, 32, 8
    q, k, v, grad_out = (randn(M, H, head_dim) for _ in range(4))
    k_cmp, v_cmp = (torch_ops.compress(x, tree, c) for x in (k, v))
    size = _magnitudes(tree, q, k, v, grad_out, scale, sigma)

    def compare(name, run, tensors, reductions, labels=("out", "q", "k", "v", "sigma")):
        ours = leaves(*tensors)
        out = run("cupy", *ours)
        got = [out, *grads(out, ours, grad_out[:out.shape[0]])]
        exact = leaves(*(t.double() for t in tensors))
        out = run("torch", *exact)
        want = [out, *grads(out, exact, grad_out[:out.shape[0]].double())]
        for label, a, b, n in zip(labels, got, want, reductions, strict=True):
            assert_matches(a, b.cpu(), n, f"{name} {label}", magnitude=size[label])

    compare("compress", lambda b, x: sparseball.ops.compress(x, tree, c, backend=b), [k], [c, c],
            labels=("out", "v"))  # dx = dout / count: at most |dO|, as dv
    compare("ball", lambda b, *x: sparseball.ops.ball_attention(*x[:3], tree, 64, x[3], scale,
                                                                 backend=b),
            [q, k, v, sigma], [64, 64, 64, 64, M * 64])
    compare("compressed", lambda b, *x: sparseball.ops.compressed_attention(
        *x[:3], tree, c, x[3], scale, backend=b)[0], [q, k_cmp, v_cmp, sigma],
        [M // c, M, M, M, M * (M // c)])
    _, lse = sparseball.ops.compressed_attention(q, k_cmp, v_cmp, tree, c, sigma, scale,
                                                 backend="cupy")
    _, lse_exact = torch_ops.compressed_attention(q.double(), k_cmp.double(), v_cmp.double(), tree,
                                                  c, sigma.double(), scale)
    assert_matches(lse, lse_exact.cpu(), M // c, "lse", out_dtype=torch.float32,
                   magnitude=size["logits"])
    indices = sparseball.ops.select_blocks(q, k_cmp, lse_exact, tree, c, s, g, top_k, sigma, scale,
                                           backend="cupy")
    importance = oracle.block_importance(q.double(), k_cmp.double(), lse_exact, tree, c, s, g,
                                         sigma.double(), scale)
    slack = selection_slack(importance, g * s // c, size["logits"], float(lse_exact.abs().max()),
                            head_dim)
    assert_valid_selection(indices.cpu(), importance.cpu(), slack.cpu(),
                           oracle.selection_candidates(tree, s, g, None).cpu(), top_k,
                           tree.mask.cpu(), g)
    compare("selection", lambda b, *x: sparseball.ops.selection_attention(
        *x[:3], tree, indices, s, g, x[3], scale, backend=b), [q, k, v, sigma],
        [top_k * s, top_k * s, M, M, M * top_k * s])


@dtypes
def test_backward_is_deterministic(dtype):
    tree, randn, sigma = _problem([30_000, 700], 64, dtype, seed=3)
    M, H = tree.num_slots, 4
    q, k, v, grad_out = (randn(M, H, 64) for _ in range(4))
    runs = []
    for _ in range(2):
        tensors = leaves(q, k, v, sigma)
        out = sparseball.attention(*tensors[:3], tree, sigma=tensors[3], backend="cupy")
        runs.append([out, *grads(out, tensors, grad_out)])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_compile_fullgraph():
    """torch.compile(sparseball.attention, fullgraph=True) with Inductor: the results of eager
    up to the rounding of the fused mixture arithmetic (float32)."""
    tree, randn, sigma = _problem([20_000, 3000], 32, torch.float32, seed=4)
    M, H = tree.num_slots, 4
    inputs = [randn(M, H, 32) for _ in range(3)] + [sigma]
    grad_out = randn(M, H, 32)

    def run(q, k, v, sigma):
        return sparseball.attention(q, k, v, tree, sigma=sigma, backend="cupy")

    eager_leaves = leaves(*inputs)
    eager = run(*eager_leaves)
    eager_grads = grads(eager, eager_leaves, grad_out)
    torch._dynamo.reset()
    compiled_leaves = leaves(*inputs)
    compiled = torch.compile(run, fullgraph=True)(*compiled_leaves)
    compiled_grads = grads(compiled, compiled_leaves, grad_out)
    for got, want in zip([compiled, *compiled_grads], [eager, *eager_grads], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
