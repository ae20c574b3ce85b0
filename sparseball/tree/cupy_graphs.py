"""Small CuPy tree builds, captured once into a CUDA graph and replayed.

A build of a few thousand points is bound by the host, not the device: some 40 launches of
CuPy kernels and PyTorch ops, each costing the Python interpreter more than the kernel costs the
GPU (an H100, 16 x 4096 points: 0.3 ms of device work in 1.0 to 1.8 ms of wall time, depending
on the host's CPU). What those launches are, and their arguments, depends only on the shapes and
the per-cloud counts, never on the coordinates. So the second build with the same
(device, stream, shape, dtype, counts, ball_size, rotations) is captured into a CUDA graph over
static input buffers, and every later one copies its input in, replays the graph (one launch)
and clones the graph's outputs. Training on batches of the same cloud sizes hits the graph on
every step; a size seen once runs eagerly, as larger builds always do.

Set `ENABLED = False` to build eagerly always. A capture that fails (for example on a CuPy
version that synchronizes inside one of its ops) warns once for that key, which then builds
eagerly.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import warnings

import numpy as np
import torch

from . import cupy_builder

ENABLED = True
# Largest build replayed from a graph: beyond it the device's work dominates (an H100: 1M
# points take 2.3 ms, mostly kernels), and a graph pins a copy of the input and its work
# buffers (~100 bytes per point) for as long as it is cached.
MAX_POINTS = 1 << 18
MAX_GRAPHS = 8  # cached graphs (least recently used dropped first), each holding its memory
_MAX_SEEN = 256

_GRAPHS: collections.OrderedDict = collections.OrderedDict()  # key -> _Captured
_SEEN: collections.OrderedDict = collections.OrderedDict()  # keys built once, eagerly
_FAILED: set = set()  # keys whose capture failed
# Held from the lookup to the clones: two threads replaying one graph (same stream) must not
# interleave their copies into its static input.
_LOCK = threading.Lock()


class _RecordingOutputs(cupy_builder._TorchOutputs):
    """Results as torch tensors, and every upload (plan tables, offsets, rotation matrices)
    kept by its host bytes, so that a capture of the same build can reuse them: a copy from
    pageable host memory cannot be captured."""

    caches_plans = False  # the graph must own its plan tables: a cache may drop them

    def __init__(self, cupy, device):
        super().__init__(cupy, device)
        self.uploads = {}

    def upload(self, host: np.ndarray):
        view = super().upload(host)
        self.uploads[_host_key(host)] = self.tensor(view)
        return view


class _ReplayOutputs(cupy_builder._TorchOutputs):
    """Results as torch tensors; uploads served from a recording of the same build."""

    caches_plans = False

    def __init__(self, cupy, device, uploads):
        super().__init__(cupy, device)
        self.uploads = uploads

    def upload(self, host: np.ndarray):
        return self._keep(self.uploads[_host_key(host)])


def _host_key(host: np.ndarray):
    return host.dtype.str, host.shape, host.tobytes()


@dataclasses.dataclass
class _Captured:
    """A captured build: its graph, static inputs it reads and static outputs it writes."""

    graph: torch.cuda.CUDAGraph
    pos: torch.Tensor
    batch: torch.Tensor | None
    outputs: tuple  # perm, mask, offsets, rotation_perms (static tensors), offsets on the host
    uploads: dict  # the tensors the graph reads its plan from, kept alive with it

    def replay(self, pos, batch):
        self.pos.copy_(pos)
        if batch is not None:
            self.batch.copy_(batch)
        self.graph.replay()
        *tensors, offsets_h = self.outputs
        return (*(t.clone() for t in tensors), offsets_h)


def replay(pos, batch, num_clouds: int, ball_size: int, rotations: int, counts: np.ndarray):
    """The build's results from a captured graph (capturing it on the second build of its key),
    as `cupy_builder.build_on_current_stream` returns them; None where the build should run
    eagerly: graphs off, too many points, `pos` not on the current device, the first build of
    its key, or a failed capture.

    pos `(N, D)` contiguous CUDA tensor, batch `(N,)` int64 contiguous or None, counts the
    per-cloud counts on the host."""
    if not ENABLED or pos.shape[0] > MAX_POINTS:
        return None
    if pos.device.index != torch.cuda.current_device():  # a graph replays on the current device
        return None
    stream = torch.cuda.current_stream(pos.device)
    key = (pos.device.index, stream.cuda_stream, tuple(pos.shape), pos.dtype, batch is None, num_clouds,
           ball_size, rotations, counts.tobytes())
    with _LOCK:
        return _replay_locked(key, pos, batch, num_clouds, ball_size, rotations, counts)


def _replay_locked(key, pos, batch, num_clouds, ball_size, rotations, counts):
    captured = _GRAPHS.get(key)
    if captured is not None:
        _GRAPHS.move_to_end(key)
    else:
        if key in _FAILED:
            return None
        if key not in _SEEN:
            _SEEN[key] = None
            while len(_SEEN) > _MAX_SEEN:
                _SEEN.popitem(last=False)
            return None
        captured = _capture(key, pos, batch, num_clouds, ball_size, rotations, counts)
        if captured is None:
            return None
    return captured.replay(pos, batch)


def _capture(key, pos, batch, num_clouds, ball_size, rotations, counts):
    import cupy

    device = pos.device
    current = torch.cuda.current_stream(device)
    static_pos = pos.clone()
    static_batch = None if batch is None else batch.clone()
    side = torch.cuda.Stream(device)  # the legacy default stream cannot be captured
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            # A build on the capture stream first: it compiles and loads whatever has not been
            # yet and records the uploads that the capture then reuses.
            recording = _RecordingOutputs(cupy, device)
            cupy_builder.build_on_current_stream(static_pos, static_batch, num_clouds, ball_size, rotations,
                                                 recording, counts)
            graph = torch.cuda.CUDAGraph()
            # CuPy's own allocations inside the capture come from PyTorch's allocator, which
            # keeps them in the graph's private pool (CuPy's pool would hand them out again).
            graph.capture_begin(capture_error_mode="relaxed")
            try:
                with cupy.cuda.using_allocator(_torch_allocator(cupy, device)):
                    outputs = cupy_builder.build_on_current_stream(
                        static_pos, static_batch, num_clouds, ball_size, rotations,
                        _ReplayOutputs(cupy, device, recording.uploads), counts)
            finally:
                graph.capture_end()
    except Exception as error:  # noqa: BLE001 - any failure: build this key eagerly from now on
        _FAILED.add(key)
        warnings.warn(
            f"build_tree(backend='cupy'): capturing a CUDA graph of a {tuple(pos.shape)} build failed "
            f"({type(error).__name__}: {error}); builds of this shape run without a graph",
            RuntimeWarning, stacklevel=6)  # at the caller of build_tree
        return None
    finally:
        current.wait_stream(side)
    captured = _Captured(graph, static_pos, static_batch, outputs, recording.uploads)
    _GRAPHS[key] = captured
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
    return captured


def _torch_allocator(cupy, device):
    """A CuPy allocator that takes its memory from PyTorch's caching allocator (on the current
    stream; inside a capture, the graph's private pool)."""

    def allocate(size: int):
        buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        memory = cupy.cuda.UnownedMemory(buffer.data_ptr(), size, buffer, device.index)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


def clear() -> None:
    """Drop every captured graph (and the memory it holds) and forget the keys seen."""
    with _LOCK:
        _GRAPHS.clear()
        _SEEN.clear()
        _FAILED.clear()
