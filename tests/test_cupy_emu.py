"""The CuPy backend's CUDA kernels on the CPU, through the thread emulator (tests/cuda_emu.py).

The backend's own Python code (sparseball/backends/cupy/ops.py: the public API forced to
"cupy", the torch custom ops, their autograd, the launches) drives the kernels of
kernels/attention.cu compiled with g++: the emulator's modules stand in for cupy.RawModule and
CPU tensors for CUDA ones. Launch shapes are small (8 rows per block, tiles of 4), so a block's
keys span many tiles and blocks cut balls, groups and clouds. Checked, in float32, float16 and
bfloat16: every op's output and every gradient against the float64 oracle under the project's
tolerance rule, padding invariance (NaN included) and cloud isolation (test_ops.py's checks),
head dims up to 128, fake implementations and autograd registrations (`opcheck`), and
`torch.compile(fullgraph=True)` tracing. Launches on a GPU are not checked here (bench/gpu.sh).
With the "ci" profile the file takes about 1.5 minutes on two cores, g++ builds included.
"""

from __future__ import annotations

import dataclasses
import math

import cuda_emu
import numpy as np
import pytest
import torch
from helpers import (
    assert_matches,
    attention_magnitudes,
    grads,
    leaves,
    random_indices,
    random_tree,
)
from hypothesis import given
from hypothesis import strategies as st
from test_ops import (
    check_ball_attention,
    check_clouds_are_isolated,
    check_compress,
    check_compressed_attention,
    check_padding_never_acts,
    check_select_blocks,
    check_selection_attention,
)

import reference.ops as oracle
import sparseball
from sparseball.backends import BACKENDS
from sparseball.backends._layout import block_real, float32_centers, float32_positions, uint8_mask
from sparseball.backends.cupy import ops as cupy_ops
from sparseball.backends.cupy import source

if not cuda_emu.available():
    pytest.skip("g++ not found", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


def _as_arg(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):  # the kernels see the bits
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def emulated_launcher(threads: int, rows: int) -> cupy_ops.Launcher:
    """A `Launcher` running the kernels on the CPU, blocks of `threads`, tiles of `rows`."""
    return cupy_ops.Launcher(
        lambda names: cuda_emu.EmuModule(source.KERNEL_FILE, name_expressions=names), _as_arg,
        tiles=lambda head_dim: source.tiles_for(head_dim, threads, rows))


LAUNCHER = emulated_launcher(8, 4)


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """Within a test, backend "cupy" serves CPU tensors through the emulator."""
    monkeypatch.setattr(cupy_ops, "_launcher", lambda device: LAUNCHER)
    monkeypatch.setitem(BACKENDS, "cupy", dataclasses.replace(BACKENDS["cupy"], devices=("cpu",),
                                                                requires=()))


@dtypes
@given(data=st.data())
def test_compress(dtype, data):
    check_compress("cupy", "cpu", dtype, data)


@dtypes
@given(data=st.data())
def test_ball_attention(dtype, data):
    check_ball_attention("cupy", "cpu", dtype, data)


@dtypes
@given(data=st.data())
def test_compressed_attention(dtype, data):
    check_compressed_attention("cupy", "cpu", dtype, data)


@dtypes
@given(data=st.data())
def test_selection_attention(dtype, data):
    check_selection_attention("cupy", "cpu", dtype, data)


@dtypes
@given(data=st.data())
def test_select_blocks(dtype, data):
    check_select_blocks("cupy", "cpu", dtype, data)


@given(data=st.data())
def test_padding_never_acts(data):
    check_padding_never_acts("cupy", data, DTYPES, max_cloud_size=70)


@given(data=st.data())
def test_clouds_are_isolated(data):
    check_clouds_are_isolated("cupy", data, DTYPES, max_cloud_size=40)


def _every_op(tree, q, k, v, k_cmp, v_cmp, sigma, indices, scale, backend):
    """Outputs of the three attention ops, and the compressed branch's lse."""
    c, s, g = 2, 4, 4
    out_cmp, lse = sparseball.ops.compressed_attention(q, k_cmp, v_cmp, tree, c, sigma, scale,
                                                       backend=backend)
    return {
        "ball": sparseball.ops.ball_attention(q, k, v, tree, 8, sigma, scale, backend=backend),
        "compressed": out_cmp,
        "selection": sparseball.ops.selection_attention(q, k, v, tree, indices, s, g, sigma,
                                                        scale, backend=backend),
    }, lse


@pytest.mark.parametrize(("head_dim", "dtype"), [(24, torch.float16), (40, torch.bfloat16),
                                                 (72, torch.float32), (128, torch.bfloat16)])
def test_large_head_dims(head_dim, dtype):
    """Head dims past 16 (kernels compiled for DMAX 32, 64, 128): outputs and gradients."""
    rng = np.random.default_rng(head_dim)
    tree = random_tree([19, 6], 8, 3, torch.float32, rng)
    M, H = tree.num_slots, 2
    gen = torch.Generator().manual_seed(head_dim)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v, k_cmp, v_cmp = (randn(M, H, head_dim), randn(M, H, head_dim), randn(M, H, head_dim),
                             randn(M // 2, H, head_dim), randn(M // 2, H, head_dim))
    sigma = torch.tensor([0.4, -0.8], dtype=torch.float32)
    indices = random_indices(tree, H, 4, 4, 3, rng)
    scale = 1 / math.sqrt(head_dim)
    inputs = leaves(q, k, v, k_cmp, v_cmp, sigma)
    outs, lse = _every_op(tree, *inputs, indices, scale, "cupy")
    refs = leaves(*[x.double() for x in (q, k, v, k_cmp, v_cmp, sigma)])
    expected, lse_ref = _every_op(tree, *refs, indices, scale, "torch")
    assert_matches(lse, lse_ref, M // 2, "lse", out_dtype=torch.float32,
                   magnitude=attention_magnitudes(q, k_cmp, v_cmp, q, scale, sigma, tree.pos)["logits"])
    for name in outs:
        grad_out = randn(M, H, head_dim)
        key_args = (inputs[3], inputs[4]) if name == "compressed" else (inputs[1], inputs[2])
        key_refs = (refs[3], refs[4]) if name == "compressed" else (refs[1], refs[2])
        got = grads(outs[name], [inputs[0], *key_args, inputs[5]], grad_out)
        want = grads(expected[name], [refs[0], *key_refs, refs[5]], grad_out.double())
        size = attention_magnitudes(q, *(t.detach() for t in key_args), grad_out, scale, sigma,
                                    tree.pos)
        assert_matches(outs[name], expected[name], M, name, magnitude=size["out"])
        for label, a, b in zip(("q", "k", "v", "sigma"), got, want, strict=True):
            assert_matches(a, b, M * M, f"{name} d{label}", magnitude=size[label])


def test_other_launch_shape():
    """Tiles taller than a block's rows (4 threads, tiles of 8): the loaders' strides."""
    launcher = emulated_launcher(4, 8)
    rng = np.random.default_rng(5)
    tree = random_tree([23, 9], 16, 2, torch.float32, rng)
    M, H, D = tree.num_slots, 2, 5
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(M, H, D, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.5, -0.5])
    want = [cupy_ops.ball_attention(q, k, v, tree, 16, sigma, 0.4)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cupy_ops, "_launcher", lambda device: launcher)
        got = [cupy_ops.ball_attention(q, k, v, tree, 16, sigma, 0.4)]
    expected = oracle.ball_attention(q.double(), k.double(), v.double(), tree, 16, sigma.double(),
                                     0.4)
    for a, b in zip(got, want, strict=True):
        assert_matches(a, expected, 16, "ball_attention (4 x 8)")
        assert_matches(b, expected, 16, "ball_attention (8 x 4)")


def test_deterministic():
    """The same inputs give the same bits, outputs and gradients (no atomics)."""
    rng = np.random.default_rng(2)
    tree = random_tree([30, 11], 8, 3, torch.float32, rng)
    M, H, D = tree.num_slots, 2, 8
    gen = torch.Generator().manual_seed(2)
    base = [torch.randn(M, H, D, generator=gen, dtype=torch.bfloat16) for _ in range(3)]
    sigma = torch.tensor([0.5, -0.5])
    indices = random_indices(tree, H, 4, 4, 2, rng)
    runs = []
    for _ in range(2):
        q, k, v, s = leaves(*base, sigma)
        out = (cupy_ops.selection_attention(q, k, v, tree, indices, 4, 4, s, 0.3)
               + cupy_ops.ball_attention(q, k, v, tree, 8, s, 0.3))
        runs.append([out, *grads(out, [q, k, v, s], torch.ones_like(out))])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def _op_samples():
    rng = np.random.default_rng(9)
    tree = random_tree([13, 6], 4, 2, torch.float32, rng)
    M, H, D = tree.num_slots, 2, 3
    gen = torch.Generator().manual_seed(9)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, requires_grad=True)

    q, k, v, kc, vc = randn(M, H, D), randn(M, H, D), randn(M, H, D), randn(M // 2, H, D), randn(M // 2, H, D)
    sigma = torch.tensor([0.3, -0.2], requires_grad=True)
    pos, mask = float32_positions(tree), uint8_mask(tree)
    lo, hi, unit = cupy_ops._cloud_ranges(tree)
    centers, real_blocks = float32_centers(tree, 2), block_real(tree, 2)
    indices = random_indices(tree, H, 4, 4, 2, rng)
    _, lse = cupy_ops.compressed_attention(q, kc, vc, tree, 2, sigma, 0.5)
    return [
        (cupy_ops.compress_op, (k, mask, 2)),
        (cupy_ops.ball_attention_op, (q, k, v, pos, mask, sigma, 4, 0.5)),
        (cupy_ops.ball_attention_op, (q, k, v, pos, mask, None, 4, 0.5)),
        (cupy_ops.compressed_attention_op, (q, kc, vc, pos, centers, real_blocks, lo, hi, sigma, unit,
                                            2, 0.5)),
        (cupy_ops.selection_attention_op, (q, k, v, pos, mask, indices, sigma, 4, 4, 0.5)),
        (cupy_ops.select_blocks_op, (q.detach(), kc.detach(), lse, pos, centers, mask, real_blocks,
                                     block_real(tree, 4), lo, hi, sigma.detach(), unit, 2,
                                     4, 4, 2, 4, 0.5)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    """Schemas, fake implementations and autograd registrations (torch.library.opcheck)."""
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor"))


def test_compile_fullgraph():
    """The mixture traces as one graph (fake implementations, registered autograd)."""
    rng = np.random.default_rng(4)
    tree = random_tree([20, 9], 8, 2, torch.float32, rng)
    M, H, D = tree.num_slots, 2, 4
    gen = torch.Generator().manual_seed(4)
    q, k, v = leaves(*(torch.randn(M, H, D, generator=gen) for _ in range(3)))
    sigma = torch.tensor([0.2, -0.3], requires_grad=True)

    def step(q, k, v, sigma):
        return sparseball.attention(q, k, v, tree, sigma=sigma, compress_size=2, select_size=4,
                                    group_size=4, top_k=2, backend="cupy")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, sigma)
    eager = step(q, k, v, sigma)
    assert torch.equal(out, eager)
    out.sum().backward()
    assert all(t.grad is not None for t in (q, k, v, sigma))
