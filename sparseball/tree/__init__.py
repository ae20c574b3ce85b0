"""Ball tree construction: `build_tree` validates, picks a builder and wraps its arrays."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from .._checks import check_int, check_power_of_two
from .balltree import BallTree
from .rotations import rotation_matrix

__all__ = ["BallTree", "build_tree", "rotation_matrix", "TREE_BACKENDS"]

TREE_BACKENDS = ("auto", "numba", "cupy")


def build_tree(
    pos: torch.Tensor,
    batch: torch.Tensor | None = None,
    *,
    ball_size: int = 128,
    rotations: int = 0,
    backend: str = "auto",
) -> BallTree:
    """Sort a batch of point clouds into a ball tree of slots.

    Args:
        pos (torch.Tensor): positions of shape `[N, dim]`, float32 or float64, finite.
        batch (torch.Tensor | None): int64 cloud id of each point, shape `[N]`, any order;
            `None` for one cloud. Ids that own no points make empty clouds.
        ball_size (int): P, a power of two >= 2; each cloud of n points gets
            `P * ceil(n / P)` slots.
        rotations (int): how many rotated orderings of the same slots to build as well.
        backend (str): `"numba"` (CPU), `"cupy"` (GPU) or `"auto"` (by the device of `pos`).
            On the GPU, builds of up to 2^18 points whose cloud sizes repeat replay a captured
            CUDA graph from their second build on (`sparseball.tree.cupy_graphs`; set its
            `ENABLED = False` to build eagerly, `clear()` to free the cached graphs).

    Returns:
        BallTree: tensors on the device of `pos`; see docs/contract.md, section 2.
    """
    num_clouds = _check_tree_inputs(pos, batch, ball_size, rotations, backend)
    builder = _resolve_builder(backend, pos.device)
    if builder == "cupy":
        if pos.device.type != "cuda":
            raise ValueError(
                f"backend='cupy' builds on a CUDA device: pos must be a CUDA tensor, got {pos.device}")
        if not _cupy_available():
            raise ValueError(
                "backend='cupy' needs CuPy (pip install cupy-cuda13x), which cannot be imported")
        from .cupy_builder import build_tree_cupy

        return build_tree_cupy(pos, batch, num_clouds, ball_size, rotations)
    from .numba_builder import build_numba

    pos_host = pos.detach().cpu().contiguous().numpy()
    if batch is None:
        batch_host = np.zeros(pos.shape[0], dtype=np.int64)
    else:
        batch_host = batch.detach().cpu().to(torch.int64).contiguous().numpy()
    perm, mask, offsets, rotation_perms = build_numba(
        pos_host, batch_host, num_clouds, ball_size, rotations
    )
    device = pos.device
    return BallTree(
        perm=torch.from_numpy(perm).to(device),
        mask=torch.from_numpy(mask).to(device),
        offsets=torch.from_numpy(offsets).to(device),
        pos=torch.from_numpy(pos_host[perm]).to(device),
        ball_size=ball_size,
        rotation_perms=torch.from_numpy(rotation_perms).to(device),
        offsets_list=tuple(int(o) for o in offsets),
        num_points=pos.shape[0],
    )


def _resolve_builder(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type == "cuda":
            if _cupy_available():
                return "cupy"
            _warn_no_cupy_once()
        return "numba"
    return backend


@functools.cache
def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or CuPy failing to find its CUDA libraries
        return False
    return True


@functools.cache
def _warn_no_cupy_once() -> None:
    warnings.warn(
        "build_tree(backend='auto'): CuPy cannot be imported, so CUDA inputs are built on the "
        "CPU by the Numba builder and copied back (install cupy-cuda13x to build on the GPU)",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_tree_inputs(pos, batch, ball_size, rotations, backend) -> int:
    """Validate `build_tree`'s arguments; return the number of clouds B."""
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"pos must be a torch.Tensor of shape (N, dim), got {type(pos).__name__}")
    if pos.ndim != 2:
        raise ValueError(f"pos must have shape (N, dim), got {tuple(pos.shape)}")
    if pos.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"pos must be float32 or float64, got {pos.dtype}")
    if pos.shape[0] == 0:
        raise ValueError("pos must hold at least one point, got shape (0, dim)")
    if pos.shape[1] == 0:
        raise ValueError(f"pos must have dim >= 1 coordinates, got shape {tuple(pos.shape)}")
    check_power_of_two("ball_size", ball_size)
    if ball_size < 2:
        raise ValueError(f"ball_size must be a power of two >= 2, got {ball_size}")
    check_int("rotations", rotations, minimum=0)
    if not isinstance(backend, str) or backend not in TREE_BACKENDS:
        raise ValueError(f"backend must be one of {TREE_BACKENDS}, got {backend!r}")
    if batch is not None:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"batch must be a torch.Tensor of shape (N,) or None, got {type(batch).__name__}")
        if batch.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"batch must be int64 (or int32) cloud ids, got {batch.dtype}")
        if batch.shape != (pos.shape[0],):
            raise ValueError(
                f"batch must have shape (N,) = ({pos.shape[0]},) to match pos, got {tuple(batch.shape)}"
            )
        if batch.device != pos.device:
            raise ValueError(f"batch must be on the device of pos ({pos.device}), got {batch.device}")
    finite, lowest, highest = _data_summary(pos, batch)
    if not finite:
        bad = int(torch.nonzero(~torch.isfinite(pos.detach()).all(1))[0, 0])
        raise ValueError(f"pos must be finite, got NaN or inf at point {bad}")
    if lowest < 0:
        raise ValueError(f"batch must hold cloud ids >= 0, got {lowest}")
    return highest + 1


def _data_summary(pos: torch.Tensor, batch: torch.Tensor | None) -> tuple[bool, int, int]:
    """(all of pos finite, lowest and highest cloud id; 0, 0 without batch). One host sync on
    a GPU; CPU tensors are read through NumPy views (torch's thread pool start-up costs more
    than the check itself on small batches)."""
    if pos.device.type == "cpu":
        finite = bool(np.isfinite(pos.detach().numpy()).all())
        if batch is None:
            return finite, 0, 0
        ids = batch.numpy()
        return finite, int(ids.min()), int(ids.max())
    stats = [torch.isfinite(pos.detach()).all().to(torch.int64)]
    if batch is not None:
        stats += [x.to(torch.int64) for x in torch.aminmax(batch)]
    values = torch.stack(stats).tolist()
    return bool(values[0]), *(values[1:] if batch is not None else (0, 0))
