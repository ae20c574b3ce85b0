"""Argument checks shared by the tree and the ops: each error names the argument, the
expectation and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_power_of_two(name: str, value: object, *, maximum: int | None = None,
                       maximum_name: str = "tree.ball_size") -> int:
    check_int(name, value)
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum_name} = {maximum}, got {value}")
    return value


def check_slots(name: str, x: object, tree, rows: int | None = None,
                rows_name: str | None = None) -> None:
    """`x` must be a floating `[M, H, D]` tensor on the tree's device (`[rows, H, D]` when
    given, e.g. one row per compressed block)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (M, H, D), got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (M, H, D), got {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows_name}, H, D) = ({rows}, H, D), "
                         f"got {tuple(x.shape)}")
    if rows is None and x.shape[0] != tree.num_slots:
        raise ValueError(
            f"{name} must have one row per slot: shape (M, H, D) with M = tree.num_slots = "
            f"{tree.num_slots}, got {tuple(x.shape)} (use tree.to_slots to lay points out)"
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} must have H >= 1 heads and D >= 1 dims, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float64, float32, float16 or bfloat16, got {x.dtype}"
        )
    if x.device != tree.device:
        raise ValueError(f"{name} must be on the tree's device {tree.device}, got {x.device}")


def check_like(name: str, x: object, q: torch.Tensor, shape: tuple[int, ...]) -> None:
    """`x` must be a tensor of `shape` with q's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != q.dtype:
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def check_parameter(name: str, x: object, q: torch.Tensor, shape: tuple[int, ...]) -> None:
    """`x` must be a tensor of `shape` on q's device, float32 or q's dtype: a model's
    parameters (sigma, the gate projection) stay float32 while q, k, v run in half precision
    under autocast."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, q.dtype):
        raise TypeError(f"{name} must be float32 or the dtype of q ({q.dtype}), got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")


def check_tree(tree: object) -> None:
    from .tree.balltree import BallTree  # the tree package imports this module

    if not isinstance(tree, BallTree):
        raise TypeError(
            f"tree must be a BallTree from sparseball.build_tree, got {type(tree).__name__}"
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree) -> None:
    check_tree(tree)
    check_slots("q", q, tree)
    check_like("k", k, q, tuple(q.shape))
    check_like("v", v, q, tuple(q.shape))

