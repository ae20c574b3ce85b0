"""CUDA sources compile (nvcc, sm_80 and sm_90) and, on the CPU, compute the right thing.

1. Every .cu file under sparseball/ and every kernel string the project exposes (functions
   listed in SOURCE_PROVIDERS) is compiled with `nvcc -arch=sm_80`, `-arch=sm_90` and, where
   this nvcc takes it, `-arch=sm_90a` (skipped without nvcc), so a syntax error or a
   shared-memory overflow never lands.
2. The tree builder's kernels run on the CPU through the thread emulator (tests/cuda_emu.py,
   skipped without g++), driven by the same Python code as on the GPU, and must give the tree
   of the NumPy path slot for slot.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
import re
import shutil
import subprocess

import cuda_emu
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseball.tree import cupy_builder

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90", "sm_90a")
# Functions returning {name: CUDA source} for kernels kept in strings (module:function): the
# CuPy attention kernels are templates, listed with the instantiations to compile.
SOURCE_PROVIDERS = ("sparseball.tree.cupy_builder:cuda_sources",
                    "sparseball.backends.cupy.source:cuda_sources")
# Macros a source is compiled with, by file name (the values its Python launcher passes).
DEFINES = {"balltree.cu": (f"-DSB_BLOCK={cupy_builder.BLOCK}", f"-DSB_ITEMS={cupy_builder.ITEMS}")}


def _sources() -> dict[str, str]:
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "sparseball").rglob("*.cu"))}
    seen = set(sources.values())
    for provider in SOURCE_PROVIDERS:
        module, function = provider.split(":")
        for name, text in getattr(importlib.import_module(module), function)().items():
            if text not in seen:  # files the provider reads are compiled once
                seen.add(text)
                sources[f"{provider}:{name}"] = text
    return sources


SOURCES = _sources()


@functools.cache
def _arch_accepted(arch: str) -> bool:
    """Whether this nvcc compiles for `arch` (sm_90a, the arch-specific Hopper target, is not
    in every release's list)."""
    result = subprocess.run([NVCC, f"-arch={arch}", "-E", "-x", "cu", "-o", os.devnull, os.devnull],
                            capture_output=True, text=True)
    return result.returncode == 0


def _nvcc(name: str, text: str, arch: str, tmp_path: pathlib.Path) -> str:
    src = tmp_path / "source.cu"
    src.write_text(text)
    defines = DEFINES.get(pathlib.Path(name.split(":")[-1]).name, ())
    result = subprocess.run(
        [NVCC, f"-arch={arch}", "-c", "-o", str(tmp_path / "out.o"), "-Xptxas", "-v", *defines, str(src)],
        capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc -arch={arch} failed on {name}:\n{result.stderr}"
    return result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_nvcc_compiles(name, arch, tmp_path):
    if not _arch_accepted(arch):
        pytest.skip(f"this nvcc does not compile for {arch}")
    log = _nvcc(name, SOURCES[name], arch, tmp_path)
    if name.endswith("balltree.cu"):  # the tree kernels are tuned not to spill registers
        assert re.search(r"[1-9]\d* bytes spill", log) is None, f"register spills:\n{log}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_subtree_shared_memory_fits(tmp_path):
    # sb_subtree's static shared memory plus the dynamic share the builder may ask for must fit
    # the 48 KiB a kernel gets without opting in to more.
    log = _nvcc("balltree.cu", cupy_builder.KERNEL_FILE.read_text(), "sm_90", tmp_path)
    block = log[log.index("Function properties for sb_subtree"):]
    static = int(re.search(r"(\d+) bytes smem", block.split("Compiling entry")[0]).group(1))
    assert static + cupy_builder.SMEM_BUDGET <= 48 * 1024


# The kernels on the CPU.

needs_gxx = pytest.mark.skipif(not cuda_emu.available(), reason="g++ not found")
# Small launch shapes keep the emulator quick and make large nodes (> one tile) common.
EMU_SHAPES = ((64, 2), (32, 4))


@pytest.fixture(scope="module", params=EMU_SHAPES, ids=lambda s: f"block{s[0]}x{s[1]}")
def emu_ops(request):
    if not cuda_emu.available():
        pytest.skip("g++ not found")
    block, items = request.param
    module = cuda_emu.EmuModule(cupy_builder.KERNEL_FILE, block=block, items=items)
    return cupy_builder._KernelOps(np, module, block=block, items=items)


@st.composite
def small_inputs(draw):
    ball_size = draw(st.sampled_from([2, 4, 8, 16, 32]))
    dim = draw(st.integers(1, 5))
    num_clouds = draw(st.integers(1, 4))
    sizes = [draw(st.one_of(st.integers(0, 3), st.integers(0, 400),
                            st.integers(0, 12).map(lambda k, p=ball_size: k * p)))
             for _ in range(num_clouds)]
    if sum(sizes) == 0:
        sizes[-1] = 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = rng.permutation(np.repeat(np.arange(num_clouds), sizes))
    kind = draw(st.sampled_from(["grid", "normal", "equal"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if kind == "grid":  # many duplicates and ties
        pos = rng.integers(-2, 3, (batch.size, dim)).astype(dtype)
    elif kind == "normal":
        pos = rng.normal(size=(batch.size, dim)).astype(dtype)
    else:
        pos = np.zeros((batch.size, dim), dtype)
    rotations = draw(st.integers(0, 2))
    return pos, batch, num_clouds, ball_size, rotations


def _assert_same(got, want):
    for name, g, w in zip(("perm", "mask", "offsets", "rotation_perms"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        np.testing.assert_array_equal(g, w, err_msg=name)


@needs_gxx
@given(small_inputs())
def test_emulated_kernels_match_numpy(emu_ops, inputs):
    pos, batch, num_clouds, ball_size, rotations = inputs
    want = cupy_builder.build_numpy(pos, batch, num_clouds, ball_size, rotations)
    got = cupy_builder.build_numpy(pos, batch, num_clouds, ball_size, rotations, ops=emu_ops)
    _assert_same(got, want)


@needs_gxx
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(0, 2**32 - 1))
def test_emulated_cloud_starts(emu_ops, sizes, seed):
    # Where each cloud's run starts in an order grouped by cloud, empty clouds anywhere
    # (first, last, several in a row) included.
    if sum(sizes) == 0:
        sizes[0] = 1
    rng = np.random.default_rng(seed)
    cloud = rng.permutation(np.repeat(np.arange(len(sizes)), sizes)).astype(np.int64)
    order = np.argsort(cloud, kind="stable").astype(np.int32)
    got = emu_ops.cloud_starts(cloud, order, len(sizes))
    want = np.concatenate([[0], np.cumsum(sizes)])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cupy_builder.NumpyOps().cloud_starts(cloud, order, len(sizes)), want)


@needs_gxx
def test_emulated_kernels_full_launch_shape():
    # The launch shape the GPU uses (256 x 8), on nodes larger than a tile (global levels) and on
    # small ones, many clouds, 3-D, with a rotation.
    module = cuda_emu.EmuModule(cupy_builder.KERNEL_FILE, block=cupy_builder.BLOCK, items=cupy_builder.ITEMS)
    ops = cupy_builder._KernelOps(np, module)
    rng = np.random.default_rng(7)
    sizes = [5000, 1, 0, 300, 129]
    batch = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    pos = rng.normal(size=(batch.size, 3)).astype(np.float32)
    want = cupy_builder.build_numpy(pos, batch, len(sizes), 128, 1)
    got = cupy_builder.build_numpy(pos, batch, len(sizes), 128, 1, ops=ops)
    _assert_same(got, want)


@needs_gxx
def test_emulated_kernels_many_axes_small_cap():
    # Nine axes (three packed scans per level) and a tight shared-memory budget (small nodes
    # of at most 16 items), so most levels are large-node levels.
    module = cuda_emu.EmuModule(cupy_builder.KERNEL_FILE, block=32, items=4)
    ops = cupy_builder._KernelOps(np, module, block=32, items=4, smem_budget=16 * (11 + 2 * 9))
    assert ops.block_cap(9) == 16
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 3, 700)
    pos = rng.integers(-3, 4, (700, 9)).astype(np.float64)
    want = cupy_builder.build_numpy(pos, batch, 3, 8, 1)
    got = cupy_builder.build_numpy(pos, batch, 3, 8, 1, ops=ops)
    _assert_same(got, want)


@needs_gxx
def test_emulated_kernels_cap_lowered_for_parallelism():
    # On a GPU the small-node cap drops until every multiprocessor gets blocks: with an H100's
    # 132, 16 clouds of 4096 points would get 128 instead of the block's 2048 (from 2^18 items
    # on; forced here), so most levels run as grid-wide launches. Emulated: the same tree.
    module = cuda_emu.EmuModule(cupy_builder.KERNEL_FILE, block=cupy_builder.BLOCK, items=cupy_builder.ITEMS)
    ops = cupy_builder._KernelOps(np, module, multiprocessors=132)
    assert ops.block_cap(3) == 2048
    assert ops.node_cap(3, 16 * 4096) == 2048  # host-bound: not lowered by default
    assert ops.node_cap(3, 1 << 18) == 512
    assert ops.node_cap(3, 1 << 20) == 2048
    ops.lower_cap_from = 0
    assert ops.node_cap(3, 16 * 4096) == cupy_builder.MIN_NODE_CAP
    rng = np.random.default_rng(11)
    sizes = [4096, 3000, 77, 0, 1500]
    batch = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    pos = rng.normal(size=(batch.size, 3)).astype(np.float32)
    want = cupy_builder.build_numpy(pos, batch, len(sizes), 128, 1)
    got = cupy_builder.build_numpy(pos, batch, len(sizes), 128, 1, ops=ops)
    _assert_same(got, want)
