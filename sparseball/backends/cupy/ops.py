"""The CuPy backend's op functions (same signatures as the torch backend's).

They unpack the BallTree into tensors and ints and call the `sparseball_cupy::*` ops, each a
`torch.library.custom_op` with a fake implementation and its own autograd, so
`torch.compile(..., fullgraph=True)` sees one op per call. The ops launch the CUDA C kernels of
kernels/attention.cu (see its header for the layout) through a `Launcher`: on CUDA tensors a
`cupy.RawModule` per element type and launch shape, compiled on first use (NVRTC; CuPy caches
the binary on disk), launched on PyTorch's current stream on the tensors' own memory (no
copies). The tests drive the very same code on CPU tensors with the thread emulator of
tests/cuda_emu.py in place of CuPy (they replace `_launcher`).

Backwards: a dq kernel per query row forms delta_i = sum_j P_ij dP_ij from the recomputed
probabilities (exact for half-precision inputs, whose stored output would carry its rounding),
dq and the sigma gradient's per-block sums (reduced here, in a fixed order); then a dk/dv
kernel per key row streams the queries that attend to it. No float atomics: every result is
bitwise deterministic.
"""

import contextlib
import threading

import numpy as np
import torch

from ...tree import BallTree
from .._layout import (
    block_real,
    float32_centers,
    float32_positions,
    invert_selection,
    tree_cloud_ranges,
    uint8_mask,
)
from . import source
from .source import Tiles, tiles_for

__all__ = [
    "compress",
    "ball_attention",
    "compressed_attention",
    "select_blocks",
    "selection_attention",
]


class Launcher:
    """Launches the kernels of kernels/attention.cu on one device.

    Args:
        module_for: `names -> module` holding those kernels (their name expressions), with
            `get_function(name)`: a `cupy.RawModule` on a GPU, the tests' `EmuModule` on the CPU.
        as_arg: `tensor -> kernel argument` over the tensor's memory.
        stream: a context manager in which launches go to PyTorch's current stream.
        tiles: `head_dim -> Tiles`, the launch shape for heads of that size.
    """

    def __init__(self, module_for, as_arg, stream=contextlib.nullcontext, tiles=tiles_for):
        self.module_for, self.as_arg, self.stream, self.tiles = module_for, as_arg, stream, tiles
        self._modules = {}
        self._lock = threading.Lock()

    def __call__(self, kernel: str, dtype: torch.dtype, tiles: Tiles, grid: tuple[int, int],
                 args, shared_mem: int = 0) -> None:
        if 0 in grid:
            return
        element = source.ELEMENT_TYPES[str(dtype).removeprefix("torch.")]
        args = [self.as_arg(a) if isinstance(a, torch.Tensor) else a for a in args]
        with self.stream():
            self._module(element, tiles).get_function(source.kernel_name(kernel, element, tiles))(
                grid, (tiles.threads,), args, shared_mem=shared_mem)

    def _module(self, element: str, tiles: Tiles):
        key = (element, tiles)
        with self._lock:
            if key not in self._modules:
                self._modules[key] = self.module_for(source.kernel_names(element, tiles))
            return self._modules[key]


_LAUNCHERS: dict[int, Launcher] = {}


def _launcher(device: torch.device) -> Launcher:
    """The launcher of CUDA device `device` (built on first use)."""
    if device.type != "cuda":
        raise ValueError(f"the CuPy backend runs on CUDA tensors, got {device.type}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _LAUNCHERS:
        _LAUNCHERS[index] = _cupy_launcher(index)
    return _LAUNCHERS[index]


def _cupy_launcher(index: int) -> Launcher:
    import cupy

    from ...tree.cupy_builder import _cupy_view, _torch_stream_for_cupy

    code = source.KERNEL_FILE.read_text()

    def module_for(names):
        return cupy.RawModule(code=code, name_expressions=names)

    def as_arg(tensor):
        if tensor.dtype in (torch.float16, torch.bfloat16):  # no NumPy dtype: the kernels see bits
            tensor = tensor.view(torch.int16)
        return _cupy_view(cupy, tensor)

    @contextlib.contextmanager
    def stream():
        with cupy.cuda.Device(index), _torch_stream_for_cupy(cupy, torch.cuda.current_stream(index)):
            yield

    return Launcher(module_for, as_arg, stream)


def _i32(x: int) -> np.int32:
    return np.int32(x)


def _i64(x: int) -> np.int64:
    return np.int64(x)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _attention_args(q, k, v, qpos, kpos, kreal, sigma, scale) -> list:
    """The leading arguments every attention kernel takes (SB_ATTENTION_PARAMS)."""
    M, H, D = q.shape
    return [q, k, v, qpos, kpos, kreal, qpos if sigma is None else sigma, _i64(M), _i64(k.shape[0]),
            _i32(H), _i32(D), _i32(qpos.shape[1]), _i32(sigma is not None), np.float32(scale)]


def _attention(name, q, k, v, qpos, kpos, kreal, sigma, scale, extra):
    """Forward kernel `sb_{name}_fwd`: output `(M, H, D)` and float32 lse `(M, H)`."""
    M, H, D = q.shape
    launch = _launcher(q.device)
    tiles = launch.tiles(D)
    out = torch.empty_like(q)
    lse = torch.empty((M, H), dtype=torch.float32, device=q.device)
    launch(f"sb_{name}_fwd", q.dtype, tiles, (_cdiv(M, tiles.threads), H),
           [*_attention_args(q, k, v, qpos, kpos, kreal, sigma, scale), *extra, out, lse])
    return out, lse


def _attention_backward(name, dout, q, k, v, lse, qpos, kpos, kreal, sigma, scale, dq_extra,
                        dkv_extra):
    """Backward kernels `sb_{name}_bwd_dq` then `sb_{name}_bwd_dkv`: dq, dk, dv and dsigma
    (float32 `(H,)`, or `(0,)` without sigma)."""
    M, H, D = q.shape
    launch = _launcher(q.device)
    tiles = launch.tiles(D)
    args = _attention_args(q, k, v, qpos, kpos, kreal, sigma, scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((M, H), dtype=torch.float32, device=q.device)
    grid = _cdiv(M, tiles.threads)
    partial = torch.empty((H, grid) if sigma is not None else (0,), dtype=torch.float32,
                          device=q.device)
    launch(f"sb_{name}_bwd_dq", q.dtype, tiles, (grid, H),
           [*args, *dq_extra, dout, lse, dq, delta, lse if sigma is None else partial])
    launch(f"sb_{name}_bwd_dkv", q.dtype, tiles, (_cdiv(k.shape[0], tiles.threads), H),
           [*args, *dkv_extra, dout, lse, delta, dk, dv])
    dsigma = partial.sum(1) if sigma is not None else partial
    return dq, dk, dv, dsigma


def _fake_attention(q, *args, **kwargs):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _fake_grads(q, k, v, sigma):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty((0,) if sigma is None else sigma.shape, dtype=torch.float32))


# compress


@torch.library.custom_op("sparseball_cupy::compress", mutates_args=())
def compress_op(x: torch.Tensor, mask: torch.Tensor, compress_size: int) -> torch.Tensor:
    M, H, D = x.shape
    launch = _launcher(x.device)
    tiles = launch.tiles(D)
    out = x.new_empty((M // compress_size, H, D))
    launch("sb_compress_fwd", x.dtype, tiles, (M // compress_size, _cdiv(H * D, tiles.threads)),
           [x, mask, _i64(H * D), _i32(compress_size), out])
    return out


@torch.library.custom_op("sparseball_cupy::compress_bwd", mutates_args=())
def compress_bwd_op(dout: torch.Tensor, mask: torch.Tensor, compress_size: int) -> torch.Tensor:
    Mc, H, D = dout.shape
    launch = _launcher(dout.device)
    tiles = launch.tiles(D)
    dx = dout.new_empty((Mc * compress_size, H, D))
    launch("sb_compress_bwd", dout.dtype, tiles, (Mc, _cdiv(H * D, tiles.threads)),
           [dout, mask, _i64(H * D), _i32(compress_size), dx])
    return dx


@compress_op.register_fake
def _(x, mask, compress_size):
    return x.new_empty((x.shape[0] // compress_size, *x.shape[1:]))


@compress_bwd_op.register_fake
def _(dout, mask, compress_size):
    return dout.new_empty((dout.shape[0] * compress_size, *dout.shape[1:]))


def _compress_setup(ctx, inputs, output):
    _, mask, compress_size = inputs
    ctx.save_for_backward(mask)
    ctx.compress_size = compress_size


def _compress_backward(ctx, dout):
    (mask,) = ctx.saved_tensors
    return compress_bwd_op(dout.contiguous(), mask, ctx.compress_size), None, None


compress_op.register_autograd(_compress_backward, setup_context=_compress_setup)


# ball attention


@torch.library.custom_op("sparseball_cupy::ball_attention", mutates_args=())
def ball_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      mask: torch.Tensor, sigma: torch.Tensor | None, ball_size: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention("ball", q, k, v, pos, pos, mask, sigma, scale, [_i32(ball_size)])


@torch.library.custom_op("sparseball_cupy::ball_attention_bwd", mutates_args=())
def ball_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          lse: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
                          sigma: torch.Tensor | None, ball_size: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    extra = [_i32(ball_size)]
    return _attention_backward("ball", dout, q, k, v, lse, pos, pos, mask, sigma, scale, extra,
                               extra)


ball_attention_op.register_fake(_fake_attention)

@ball_attention_bwd_op.register_fake
def _(dout, q, k, v, lse, pos, mask, sigma, ball_size, scale):
    return _fake_grads(q, k, v, sigma)



def _ball_setup(ctx, inputs, output):
    q, k, v, pos, mask, sigma, ball_size, scale = inputs
    ctx.save_for_backward(q, k, v, output[1], pos, mask, sigma)
    ctx.sizes = (ball_size, scale)
    ctx.mark_non_differentiable(output[1])


def _ball_backward(ctx, dout, dlse):
    q, k, v, lse, pos, mask, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = ball_attention_bwd_op(dout.contiguous(), q, k, v, lse, pos, mask, sigma,
                                               *ctx.sizes)
    return dq, dk, dv, None, None, (dsigma if sigma is not None else None), None, None


ball_attention_op.register_autograd(_ball_backward, setup_context=_ball_setup)


# compressed attention


@torch.library.custom_op("sparseball_cupy::compressed_attention", mutates_args=())
def compressed_attention_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                            pos: torch.Tensor, centers: torch.Tensor, block_real: torch.Tensor,
                            cloud_lo: torch.Tensor, cloud_hi: torch.Tensor,
                            sigma: torch.Tensor | None, unit: int, compress_size: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention("compressed", q, k_cmp, v_cmp, pos, centers, block_real, sigma, scale,
                      [cloud_lo, cloud_hi, _i32(unit), _i32(compress_size)])


@torch.library.custom_op("sparseball_cupy::compressed_attention_bwd", mutates_args=())
def compressed_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    lse: torch.Tensor, pos: torch.Tensor, centers: torch.Tensor, block_real: torch.Tensor,
    cloud_lo: torch.Tensor, cloud_hi: torch.Tensor, sigma: torch.Tensor | None, unit: int,
    compress_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    extra = [cloud_lo, cloud_hi, _i32(unit), _i32(compress_size)]
    return _attention_backward("compressed", dout, q, k_cmp, v_cmp, lse, pos, centers,
                               block_real, sigma, scale, extra, extra)


compressed_attention_op.register_fake(_fake_attention)

@compressed_attention_bwd_op.register_fake
def _(dout, q, k_cmp, v_cmp, lse, pos, centers, block_real, cloud_lo, cloud_hi, sigma, unit,
      compress_size, scale):
    return _fake_grads(q, k_cmp, v_cmp, sigma)



def _compressed_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, pos, centers, block_real, cloud_lo, cloud_hi, sigma, unit, cs, scale = inputs
    ctx.save_for_backward(q, k_cmp, v_cmp, output[1], pos, centers, block_real, cloud_lo,
                          cloud_hi, sigma)
    ctx.sizes = (unit, cs, scale)
    ctx.mark_non_differentiable(output[1])


def _compressed_backward(ctx, dout, dlse):
    q, k_cmp, v_cmp, lse, pos, centers, block_real, cloud_lo, cloud_hi, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = compressed_attention_bwd_op(
        dout.contiguous(), q, k_cmp, v_cmp, lse, pos, centers, block_real, cloud_lo, cloud_hi,
        sigma, *ctx.sizes)
    return (dq, dk, dv, None, None, None, None, None,
            dsigma if sigma is not None else None, None, None, None)


compressed_attention_op.register_autograd(_compressed_backward, setup_context=_compressed_setup)


# selection attention


@torch.library.custom_op("sparseball_cupy::selection_attention", mutates_args=())
def selection_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                           mask: torch.Tensor, indices: torch.Tensor, sigma: torch.Tensor | None,
                           select_size: int, group_size: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    extra = [indices, _i32(indices.shape[2]), _i32(select_size), _i32(group_size)]
    return _attention("selection", q, k, v, pos, pos, mask, sigma, scale, extra)


@torch.library.custom_op("sparseball_cupy::selection_attention_bwd", mutates_args=())
def selection_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
    pos: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, sigma: torch.Tensor | None,
    select_size: int, group_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    row_ptr, groups = invert_selection(indices, q.shape[0] // select_size)
    dq_extra = [indices, _i32(indices.shape[2]), _i32(select_size), _i32(group_size)]
    dkv_extra = [row_ptr, groups, _i32(select_size), _i32(group_size)]
    return _attention_backward("selection", dout, q, k, v, lse, pos, pos, mask, sigma, scale,
                               dq_extra, dkv_extra)


selection_attention_op.register_fake(_fake_attention)

@selection_attention_bwd_op.register_fake
def _(dout, q, k, v, lse, pos, mask, indices, sigma, select_size, group_size, scale):
    return _fake_grads(q, k, v, sigma)



def _selection_setup(ctx, inputs, output):
    q, k, v, pos, mask, indices, sigma, select_size, group_size, scale = inputs
    ctx.save_for_backward(q, k, v, output[1], pos, mask, indices, sigma)
    ctx.sizes = (select_size, group_size, scale)
    ctx.mark_non_differentiable(output[1])


def _selection_backward(ctx, dout, dlse):
    q, k, v, lse, pos, mask, indices, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = selection_attention_bwd_op(dout.contiguous(), q, k, v, lse, pos, mask,
                                                    indices, sigma, *ctx.sizes)
    return (dq, dk, dv, None, None, None, dsigma if sigma is not None else None,
            None, None, None)


selection_attention_op.register_autograd(_selection_backward, setup_context=_selection_setup)


# select_blocks


@torch.library.custom_op("sparseball_cupy::select_blocks", mutates_args=())
def select_blocks_op(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, pos: torch.Tensor,
                     centers: torch.Tensor, mask: torch.Tensor, cblock_real: torch.Tensor,
                     sblock_real: torch.Tensor, cloud_lo: torch.Tensor, cloud_hi: torch.Tensor,
                     sigma: torch.Tensor | None, unit: int, compress_size: int, select_size: int,
                     group_size: int, top_k: int, exclude: int, scale: float) -> torch.Tensor:
    M, H, D = q.shape
    launch = _launcher(q.device)
    tiles = launch.tiles(D)
    out = torch.empty((M // group_size, H, top_k), dtype=torch.int32, device=q.device)
    launch("sb_select_blocks", q.dtype, tiles, (M // group_size, H),
           [q, k_cmp, lse, pos, centers, mask, cblock_real, sblock_real, cloud_lo, cloud_hi,
            pos if sigma is None else sigma, _i32(H), _i32(D), _i32(pos.shape[1]),
            _i32(sigma is not None), np.float32(scale), _i32(unit), _i32(compress_size),
            _i32(select_size), _i32(group_size), _i32(top_k), _i32(exclude), out],
           shared_mem=8 * top_k)
    return out


@select_blocks_op.register_fake
def _(q, k_cmp, lse, pos, centers, mask, cblock_real, sblock_real, cloud_lo, cloud_hi, sigma,
      unit, compress_size, select_size, group_size, top_k, exclude, scale):
    return q.new_empty((q.shape[0] // group_size, q.shape[1], top_k), dtype=torch.int32)


# The op functions: the tree as tensors and ints.


def _cloud_ranges(tree: BallTree) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per aligned P-block (clouds own multiples of P slots): its cloud's slot range; and P."""
    return (*tree_cloud_ranges(tree, tree.ball_size), tree.ball_size)


def _sigma(sigma: torch.Tensor | None) -> torch.Tensor | None:
    # float32 for every input dtype; autograd casts its gradient back to sigma's dtype.
    return None if sigma is None else sigma.to(torch.float32).contiguous()


def compress(x: torch.Tensor, tree: BallTree, compress_size: int) -> torch.Tensor:
    return compress_op(x.contiguous(), uint8_mask(tree), compress_size)


def ball_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                   ball_size: int, sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = ball_attention_op(q.contiguous(), k.contiguous(), v.contiguous(), float32_positions(tree),
                               uint8_mask(tree), _sigma(sigma), ball_size, scale)
    return out


def compressed_attention(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, tree: BallTree,
                         compress_size: int, sigma: torch.Tensor | None,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    cloud_lo, cloud_hi, unit = _cloud_ranges(tree)
    return compressed_attention_op(
        q.contiguous(), k_cmp.contiguous(), v_cmp.contiguous(), float32_positions(tree),
        float32_centers(tree, compress_size), block_real(tree, compress_size), cloud_lo, cloud_hi,
        _sigma(sigma), unit, compress_size, scale)


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree: BallTree,
                        indices: torch.Tensor, select_size: int, group_size: int,
                        sigma: torch.Tensor | None, scale: float) -> torch.Tensor:
    out, _ = selection_attention_op(
        q.contiguous(), k.contiguous(), v.contiguous(), float32_positions(tree), uint8_mask(tree),
        indices.to(torch.int32).contiguous(), _sigma(sigma), select_size, group_size, scale)
    return out


def select_blocks(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, tree: BallTree,
                  compress_size: int, select_size: int, group_size: int, top_k: int,
                  sigma: torch.Tensor | None, scale: float,
                  exclude_ball_size: int | None) -> torch.Tensor:
    cloud_lo, cloud_hi, unit = _cloud_ranges(tree)
    # Blocks inside the group's aligned max(b, group_size)-block are the ball branch's.
    exclude = 0 if exclude_ball_size is None else max(exclude_ball_size, group_size)
    with torch.no_grad():
        return select_blocks_op(
            q.detach().contiguous(), k_cmp.detach().contiguous(), lse.detach().contiguous(),
            float32_positions(tree), float32_centers(tree, compress_size), uint8_mask(tree),
            block_real(tree, compress_size), block_real(tree, select_size), cloud_lo, cloud_hi,
            None if sigma is None else _sigma(sigma.detach()), unit, compress_size, select_size,
            group_size, top_k, exclude, scale)
