"""The CUDA source of the CuPy backend, its kernels' names and their tile shapes.

Kept apart from `ops` (which registers the torch ops) so that CI can list and compile the
kernels without a GPU: `cuda_sources()` gives the source with every instantiation the backend
may launch, for nvcc (tests/test_cuda_sources.py).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

KERNEL_FILE = pathlib.Path(__file__).with_name("kernels") / "attention.cu"

# The kernels' element type by torch dtype name.
ELEMENT_TYPES = {"float32": "float", "float16": "sb_half", "bfloat16": "sb_bf16"}
# Kernels templated on <T, NT, BN, DMAX>, and those on <T, NT>.
ATTENTION_KERNELS = (
    "sb_ball_fwd", "sb_ball_bwd_dq", "sb_ball_bwd_dkv",
    "sb_compressed_fwd", "sb_compressed_bwd_dq", "sb_compressed_bwd_dkv",
    "sb_selection_fwd", "sb_selection_bwd_dq", "sb_selection_bwd_dkv",
    "sb_select_blocks",
)
COMPRESS_KERNELS = ("sb_compress_fwd", "sb_compress_bwd")
MAX_HEAD_DIM = 128
# A shared tile holds BN rows of DMAX floats twice (k and v, or q and dout): BN * DMAX <= 4096
# keeps the pair within 32 KiB of the 48 KiB a block gets without opting in to more.
TILE_FLOATS = 4096
THREADS = 64


@dataclass(frozen=True)
class Tiles:
    """One launch shape: `threads` (NT) rows owned by a block, one per thread; `rows` (BN) rows
    per shared-memory tile of the streamed side; `head_dim` (DMAX) the head dim the kernels are
    compiled for (a power of two, the actual D <= it)."""

    threads: int
    rows: int
    head_dim: int

    def arguments(self) -> str:
        return f"{self.threads}, {self.rows}, {self.head_dim}"


def tiles_for(head_dim: int, threads: int = THREADS, rows: int | None = None) -> Tiles:
    """The launch shape for heads of `head_dim` (<= 128): DMAX the next power of two >= 16."""
    dmax = 16
    while dmax < head_dim:
        dmax *= 2
    return Tiles(threads, rows or min(threads, TILE_FLOATS // dmax), dmax)


def kernel_names(element: str, tiles: Tiles) -> list[str]:
    """The name expressions (`cupy.RawModule(name_expressions=...)`) of every kernel for one
    element type (`ELEMENT_TYPES` value) and launch shape."""
    return ([f"{name}<{element}, {tiles.arguments()}>" for name in ATTENTION_KERNELS]
            + [f"{name}<{element}, {tiles.threads}>" for name in COMPRESS_KERNELS])


def kernel_name(name: str, element: str, tiles: Tiles) -> str:
    if name in COMPRESS_KERNELS:
        return f"{name}<{element}, {tiles.threads}>"
    return f"{name}<{element}, {tiles.arguments()}>"


# What CI compiles with nvcc: every element type, and every DMAX across them (all 12 pairs
# cost a few minutes per architecture; the kernels differ by type only in their conversions).
CHECKED_INSTANCES = (("float", 128), ("sb_half", 64), ("sb_bf16", 16))


def cuda_sources() -> dict[str, str]:
    """{name: CUDA source} for nvcc in CI: attention.cu followed by instantiations of its
    kernels (`CHECKED_INSTANCES` at the GPU's launch shape), taken by address as NVRTC's name
    expressions would."""
    text = KERNEL_FILE.read_text()
    names = [name for element, dmax in CHECKED_INSTANCES
             for name in kernel_names(element, tiles_for(dmax))]
    footer = "\n".join(f"void* sb_instance_{i} = (void*)&{name};" for i, name in enumerate(names))
    return {f"{KERNEL_FILE.name}+instances": text + "\n" + footer + "\n"}
