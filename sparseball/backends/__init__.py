"""The table of attention backends and how a call picks one.

Each backend declares what it supports; `not_supported_reasons` answers, in sentences, why it
cannot serve a call. `"auto"` takes the first backend of `BACKENDS` (fastest first) with no
reasons. A backend's kernels are imported only when it serves a call, so a missing optional
dependency (triton, cupy) never breaks `import sparseball`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

FLAT_OPS = ("compress", "ball_attention", "compressed_attention", "select_blocks",
            "selection_attention")
FAR_FIELD_OPS = ("far_field_tokens", "far_field_select", "far_field_attention")
OPS = FLAT_OPS + FAR_FIELD_OPS
ENV_VAR = "SPARSEBALL_BACKEND"
_HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """What one backend supports, and where its kernels live.

    Attributes:
        name: the `backend=` string.
        module: the module holding one function per op, imported on first use.
        devices: device types it runs on.
        dtypes: input dtypes it accepts.
        ops: ops it implements.
        requires: Python packages it needs (import names).
        max_head_dim: the largest head dim it accepts (None: any).
        interpreted_devices: further device types it runs on when TRITON_INTERPRET=1 (the
            Triton interpreter runs kernels on the CPU, slowly: for CI without a GPU).
        in_auto: whether `"auto"` may pick it. Off for kernels that have not yet passed their
            GPU tests (bench/gpu.sh) on real hardware: they serve only when asked for by name.
            `"auto"` never picks a backend for an interpreted device (too slow to be a default).
    """

    name: str
    module: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    ops: tuple[str, ...]
    requires: tuple[str, ...] = ()
    max_head_dim: int | None = None
    interpreted_devices: tuple[str, ...] = ()
    in_auto: bool = True

    def not_supported_reasons(self, op: str, device: torch.device, dtype: torch.dtype,
                              head_dim: int, interpreted: bool = True) -> list[str]:
        """Sentences saying why this backend cannot run `op` on these inputs (empty: it can).
        `interpreted=False` leaves out the devices it reaches only through an interpreter."""
        reasons = [f"the {pkg} package is not installed" for pkg in self.requires
                   if not _INSTALLED[pkg]]
        if op not in self.ops:
            reasons.append(f"it does not implement {op} yet")
        devices = self.devices
        if interpreted and os.environ.get("TRITON_INTERPRET") == "1":
            devices = devices + self.interpreted_devices
        if device.type not in devices:
            where = " or ".join(devices)
            if self.interpreted_devices and devices == self.devices:
                where += f" (or {' or '.join(self.interpreted_devices)} with TRITON_INTERPRET=1)"
            reasons.append(f"it needs tensors on {where}, got {device.type}")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"it supports dtypes {names}, got {str(dtype).removeprefix('torch.')}")
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"it supports head dims up to {self.max_head_dim}, got {head_dim}")
        return reasons

    def kernels(self) -> ModuleType:
        # torch.compile cannot trace import_module (a graph break); once imported, the module
        # comes from sys.modules, which it traces.
        module = sys.modules.get(self.module)
        return module if module is not None else importlib.import_module(self.module)


# Fastest first: "auto" takes the first one that can serve a call.
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(
            name="triton",
            module="sparseball.backends.triton.ops",
            devices=("cuda",),
            dtypes=_HALF_AND_SINGLE,
            ops=OPS,
            requires=("triton",),
            max_head_dim=128,
            interpreted_devices=("cpu",),
        ),
        Backend(
            name="cupy",
            module="sparseball.backends.cupy.ops",
            devices=("cuda",),
            dtypes=_HALF_AND_SINGLE,
            ops=FLAT_OPS,
            requires=("cupy",),
            max_head_dim=128,
            # Checked on the CPU only (tests/test_cupy_emu.py), not yet on a GPU.
            in_auto=False,
        ),
        Backend(
            name="torch",
            module="sparseball.backends.torch.ops",
            devices=("cpu", "cuda"),
            dtypes=(torch.float64, *_HALF_AND_SINGLE),
            ops=OPS,
        ),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)
# Looked up once: torch.compile cannot trace importlib.util.find_spec (a graph break), and
# finding a package is a file-system walk on every call otherwise.
_INSTALLED = {pkg: importlib.util.find_spec(pkg) is not None
              for backend in BACKENDS.values() for pkg in backend.requires}

_default = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make `name` the backend that `backend="auto"` means inside the `with` block.

    A default set this way is forced: a call it cannot serve raises instead of falling back.
    Blocks nest (the innermost wins) and are per thread; `$SPARSEBALL_BACKEND` sets the
    default outside any block.

    Args:
        name (str): `"torch"`, `"triton"`, `"cupy"` or `"auto"` (no default: pick per call).
    """
    _check_backend_name("name", name)
    stack = _default.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def default_backend() -> str:
    """The backend `"auto"` stands for: innermost `use_backend`, else $SPARSEBALL_BACKEND."""
    stack = getattr(_default, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(
                f"environment variable {ENV_VAR} must be one of {BACKEND_NAMES}, got {env!r}"
            )
        return env
    return "auto"


def select_backend(op: str, backend: str, reference: torch.Tensor) -> ModuleType:
    """The kernels module that runs `op` for inputs like `reference` (a `[M, H, D]` tensor)."""
    _check_backend_name("backend", backend)
    if backend == "auto":
        backend = default_backend()
    device, dtype, head_dim = reference.device, reference.dtype, reference.shape[-1]
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(op, device, dtype, head_dim)
        if reasons:
            raise ValueError(
                f"backend {backend!r} cannot run {op} on these inputs: " + "; ".join(reasons)
            )
        return BACKENDS[backend].kernels()
    all_reasons = []
    for candidate in BACKENDS.values():
        if not candidate.in_auto:
            continue
        reasons = candidate.not_supported_reasons(op, device, dtype, head_dim, interpreted=False)
        if not reasons:
            return candidate.kernels()
        all_reasons.append(f"{candidate.name}: " + "; ".join(reasons))
    raise ValueError(f"no backend can run {op} on these inputs: " + " | ".join(all_reasons))


def _check_backend_name(arg: str, name: object) -> None:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{arg} must be one of {BACKEND_NAMES}, got {name!r}")
