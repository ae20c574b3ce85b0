"""Ball-tree builder that runs on the GPU from start to end (CuPy), with a NumPy twin.

The tree is the one of docs/contract.md, section 2, slot for slot: the same as the Numba builder
and `reference/tree.py`. One code path, written against an array module `xp`, builds it:

1. Presort. For every axis, the item ids (input points; for a rotated ordering, the slots)
   sorted by (cloud, coordinate, id), with stable sorts of all D * n keys at once: one for
   float32 inputs (axis, cloud and coordinate fit one 64-bit key, sb_sort_keys_f32), two
   otherwise (by coordinate, then by axis and cloud).
2. Plan, on the host. The shape of the tree (each node's item count, slot range and segment of
   positions) depends on the per-cloud counts only, not on coordinates: the host works it out
   from the counts with a few vectorized NumPy steps per level and uploads it in one copy.
3. Large nodes (more items than one block of the subtree kernel takes), level by level, every
   node of a level at once: the split axis of a node is O(1) (the ends of its segment in each
   axis's sorted array are its min and max), its left items are the first `n_left` of its
   segment in that axis's array; flags mark them and every axis's array is stably partitioned
   inside each segment (a prefix sum of the flags), so all stay sorted inside the children.
   Four kernel launches per level (sb_level_flags, sb_level_count, sb_tile_scan,
   sb_level_scatter).
4. Small nodes: one launch of sb_subtree builds every remaining level, one block per node, in
   shared memory, and writes perm and mask of the real slots.
5. Padding: one launch of sb_fill_padding.
Rotated orderings repeat 1-5 on the slots (sb_rotate computes their rotated positions).

`xp=cupy` runs the CUDA kernels of kernels/balltree.cu (`_KernelOps` with a cupy.RawModule);
`xp=numpy` runs either NumPy equivalents of the kernels (`NumpyOps`: the large-node step at every
level down to single items) or, in the tests, the same CUDA source on the CPU through a thread
emulator (tests/cuda_emu.py), which `_KernelOps` drives exactly as it drives CuPy.

Host syncs of the GPU path: `build_tree`'s input checks read three scalars at once (whether
`pos` is finite, the lowest and highest cloud id), and a batch of several clouds copies its
per-cloud counts to the host, which size everything else (M, the plan) and give
`BallTree.offsets_list`: counted by integer atomics for small builds (`cloud_counts`), from where
each cloud starts in the presorted order for large ones (sb_cloud_starts). Point data never
leaves the device. The plan is cached by the counts, so repeated cloud sizes skip planning and
the upload of the tables; small builds of repeated sizes replay a CUDA graph (cupy_graphs.py).
"""

from __future__ import annotations

import collections
import functools
import pathlib
import warnings

import numpy as np

from .rotations import rotation_matrix

__all__ = [
    "NumpyOps",
    "build_cupy",
    "build_numpy",
    "build_tree_cupy",
    "cuda_sources",
    "plan_tree",
]

KERNEL_DIR = pathlib.Path(__file__).with_name("kernels")
KERNEL_FILE = KERNEL_DIR / "balltree.cu"
# Launch shape of every kernel; passed to the compiler so that the source and this file agree.
BLOCK = 256
ITEMS = 8
# Dynamic shared memory that sb_subtree may use (it adds ~2 KiB of static buffers; 48 KiB is
# what a kernel gets without opting in).
SMEM_BUDGET = 40 * 1024
# sb_subtree runs one block per small node, each building all of its node's levels alone: a
# few large small-nodes leave the GPU idle (16 clouds of 4096 points made 32 blocks of 2048
# items, about 2 ms). The cap on small nodes is lowered, down to MIN_NODE_CAP, until there are
# BLOCKS_PER_SM blocks per multiprocessor; the levels above run as grid-wide launches.
BLOCKS_PER_SM = 2
MIN_NODE_CAP = 128
# Below this many items a build is bound by the host's launches, not by the device (an H100,
# 2026-11-23: 65,536 points took 1.46 ms with the cap lowered to 128, 1.29 ms without), and
# every halving of the cap adds a level of four launches: the cap stays whole.
LOWER_CAP_FROM_ITEMS = 1 << 18


def cuda_sources() -> dict[str, str]:
    """CUDA sources of this builder, {file name: text}; CI compiles each with nvcc."""
    return {KERNEL_FILE.name: KERNEL_FILE.read_text()}


def subtree_smem_bytes(cap: int, dim: int) -> int:
    """Dynamic shared memory of sb_subtree for nodes of at most `cap` items in `dim` axes."""
    return cap * (11 + 2 * dim)


# The plan: node tables from the per-cloud counts alone (host, NumPy).


def _split(n: np.ndarray, size: np.ndarray, ball_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rule (contract, invariant 2): items and slots of the left child, `(K,)` int64 each."""
    if size.min() > ball_size:  # only nodes of b >= 2 balls (the common case of large nodes)
        balls = size // ball_size
        left_balls = balls // 2
        return n * left_balls // balls, left_balls * ball_size
    if size.max() <= ball_size:
        return n // 2, size // 2
    above = size > ball_size
    balls = np.maximum(size // ball_size, 1)
    left_balls = balls // 2
    n_left = np.where(above, n * left_balls // balls, n // 2)
    size_left = np.where(above, left_balls * ball_size, size // 2)
    return n_left, size_left


def plan_tree(counts, starts, slot_starts, ball_size: int, cap: int):
    """Node tables of one build, from per-cloud item counts (host NumPy, a few small vectorized
    steps per level; the tree's shape does not depend on coordinates).

    Args:
        counts, starts, slot_starts: int64 `(B,)`: items of each cloud, its first position in
            the presorted arrays and its first slot.
        ball_size: P.
        cap: nodes of at most `cap` items are left whole to the subtree step.

    Returns:
        (levels, small): `levels` lists, per large-node level, an int64 `(4, K)` table
        (lo, n, n_left, left_before), nodes sorted by lo; `small` is an int64 `(4, K)` table
        (lo, n, slot, size) of the nodes for the subtree step.
    """
    counts = np.asarray(counts, dtype=np.int64)
    keep = counts > 0
    n = counts[keep]
    size = ball_size * ((n + ball_size - 1) // ball_size)
    # Rows: lo (first position), n (items), slot (first slot), size (slots).
    nodes = np.stack([np.asarray(starts, dtype=np.int64)[keep], n,
                      np.asarray(slot_starts, dtype=np.int64)[keep], size])
    levels, small = [], []
    while nodes.shape[1]:
        is_small = nodes[1] <= cap
        if is_small.any():
            small.append(nodes[:, is_small])
            nodes = nodes[:, ~is_small]
            if not nodes.shape[1]:
                break
        lo, n, slot, size = nodes
        n_left, size_left = _split(n, size, ball_size)
        levels.append(np.stack([lo, n, n_left, np.cumsum(n_left) - n_left]))
        # Children in position order (left, right of each node).
        children = np.stack([
            np.stack([lo, n_left, slot, size_left]),
            np.stack([lo + n_left, n - n_left, slot + size_left, size - size_left]),
        ], axis=2).reshape(4, -1)
        if n_left.min() == 0 or (n - n_left).min() == 0:
            # Empty children hold padding only (none occur above P, where every ball keeps
            # >= P/2 items); they need no work.
            children = children[:, children[1] > 0]
        nodes = children
    small_table = np.concatenate(small, axis=1) if small else np.zeros((4, 0), np.int64)
    return levels, np.ascontiguousarray(small_table)


# Kernel sets: the CUDA kernels (CuPy, or the CPU emulator) and their NumPy equivalents.


class NumpyOps:
    """NumPy equivalents of the kernels. Large-node levels run down to single items (cap 1)."""

    xp = np

    def node_cap(self, dim: int, n_items: int) -> int:
        return 1

    def level(self, coords, ids, out, table, work) -> None:
        """One large-node level: ids `(D, n)` -> out `(D, n)`, table `(4, K)`."""
        lo, n, n_left, before = table
        dim, n_items = ids.shape
        rows = np.arange(dim)[:, None]
        with np.errstate(over="ignore"):  # spreads of +-1e308 overflow to inf, as on the GPU
            spread = coords[rows, ids[:, lo + n - 1]] - coords[rows, ids[:, lo]]  # (D, K)
        axis = np.argmax(spread, axis=0)  # first maximum: ties to the lowest axis
        p = np.arange(n_items)
        k = np.searchsorted(lo, p, side="right") - 1
        inside = (k >= 0) & (p < (lo + n)[np.maximum(k, 0)])
        p, k = p[inside], k[inside]
        goes_left = np.zeros(n_items, dtype=np.int64)
        goes_left[ids[axis[k], p]] = p - lo[k] < n_left[k]
        flags = goes_left[ids]
        g = np.cumsum(flags, axis=1) - flags  # left-going items before each position
        r = g[:, p] - before[k]
        dst = np.broadcast_to(np.arange(n_items), (dim, n_items)).copy()
        dst[:, p] = np.where(flags[:, p] == 1, lo[k] + r, lo[k] + n_left[k] + (p - lo[k] - r))
        out[rows, dst] = ids

    def subtree(self, coords, ids, table, ball_size, perm, mask, work) -> None:
        lo, n, slot, size = table
        assert np.all(n == 1), "NumpyOps leaves only single items to the subtree step"
        perm[slot + size - 1] = ids[0, lo]
        mask[slot + size - 1] = 1

    def cloud_starts(self, cloud, order, num_clouds: int):
        """int64 `(B+1,)`: where each cloud's run starts in `order`; see sb_cloud_starts."""
        return np.searchsorted(cloud[order], np.arange(num_clouds + 1, dtype=cloud.dtype))

    def fill_padding(self, perm, mask, ball_size) -> None:
        j = np.flatnonzero(mask == 0)
        c = 2
        while c <= ball_size and j.size:
            last = (j & ~(c - 1)) + c - 1
            hit = mask[last] != 0
            perm[j[hit]] = perm[last[hit]]
            j = j[~hit]
            c *= 2

    def rotate(self, coords, perm, rotation):
        return _rotate_xp(np, coords, perm, rotation)

    def sort_keys_f32(self, pos, cloud, axis_shift):
        """uint64 `(D * n,)` presort keys of float32 `pos` `(n, D)`; see sb_sort_keys_f32."""
        bits = np.ascontiguousarray(pos.T + np.float32(0.0)).view(np.uint32)  # + 0.0: -0.0 -> +0.0
        bits = bits ^ np.where(bits >> np.uint32(31) != 0, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
        axis = np.arange(pos.shape[1], dtype=np.uint64)[:, None] << np.uint64(axis_shift)
        return (axis | (cloud.astype(np.uint64) << np.uint64(32)) | bits.astype(np.uint64)).ravel()


def _rotate_xp(xp, coords, perm, rotation):
    """`(D, M)` float64 rotated slot positions, summed left to right without fused multiply-add
    (separate array operations), -0.0 mapped to +0.0; the same bits as sb_rotate."""
    points = coords[:, perm]
    out = xp.empty_like(points)
    for i in range(points.shape[0]):
        acc = points[0] * float(rotation[i, 0])
        for k in range(1, points.shape[0]):
            acc = acc + points[k] * float(rotation[i, k])
        out[i] = acc + 0.0
    return out


class _KernelOps:
    """Drives the kernels of balltree.cu. `module` is a cupy.RawModule (xp=cupy) or the CPU
    emulator's module (xp=numpy); both take `kernel(grid, block, args, shared_mem=...)`."""

    def __init__(self, xp, module, block: int = BLOCK, items: int = ITEMS, smem_budget: int = SMEM_BUDGET,
                 multiprocessors: int = 0, lower_cap_from: int = LOWER_CAP_FROM_ITEMS):
        self.xp = xp
        self.module = module
        self.multiprocessors = multiprocessors  # 0: do not lower the cap for parallelism
        self.lower_cap_from = lower_cap_from
        self.block = block
        self.tile = block * items
        self.smem_budget = smem_budget
        self._kernels = {}

    def _kernel(self, name):
        if name not in self._kernels:
            self._kernels[name] = self.module.get_function(name)
        return self._kernels[name]

    def block_cap(self, dim: int) -> int:
        """Largest node (items) that sb_subtree takes: a power of two <= the tile whose shared
        memory fits the budget; 1 (single items only) where even 2 items do not fit."""
        cap = self.tile
        while cap >= 2 and subtree_smem_bytes(cap, dim) > self.smem_budget:
            cap //= 2
        return cap if cap >= 2 else 1

    def node_cap(self, dim: int, n_items: int) -> int:
        """The small-node cap of one build of `n_items`: `block_cap`, halved (not below
        MIN_NODE_CAP) until the small nodes give BLOCKS_PER_SM blocks per multiprocessor, for
        builds of at least `lower_cap_from` items (smaller ones are bound by the host)."""
        cap = self.block_cap(dim)
        if n_items < self.lower_cap_from:
            return cap
        while cap > MIN_NODE_CAP and n_items // cap < BLOCKS_PER_SM * self.multiprocessors:
            cap //= 2
        return cap

    def level(self, coords, ids, out, table, work) -> None:
        dim, n_items = ids.shape
        k = table.shape[1]
        ntiles = -(-n_items // self.tile)
        goes_left, pnode, tile_count, tile_offset = (
            work["goes_left"], work["pnode"], work["tile_count"], work["tile_offset"])
        i32 = np.int32
        self._kernel("sb_level_flags")(
            (-(-n_items // self.block),), (self.block,),
            (coords, ids, table, i32(k), i32(dim), i32(n_items), goes_left, pnode))
        self._kernel("sb_level_count")(
            (ntiles, dim), (self.block,), (ids, goes_left, i32(n_items), i32(ntiles), tile_count))
        self._kernel("sb_tile_scan")((dim,), (self.block,), (tile_count, i32(ntiles), tile_offset))
        self._kernel("sb_level_scatter")(
            (ntiles, dim), (self.block,),
            (ids, out, goes_left, pnode, table, i32(k), i32(n_items), i32(ntiles), tile_offset))

    def subtree(self, coords, ids, table, ball_size, perm, mask, work) -> None:
        k = table.shape[1]
        if k == 0:
            return
        dim, n_items = ids.shape
        cap = work["cap"]
        i32 = np.int32
        self._kernel("sb_subtree")(
            (k,), (self.block,),
            (coords, ids, table, i32(k), i32(dim), i32(n_items), i32(cap), i32(ball_size),
             work["local_of"], perm, mask),
            shared_mem=subtree_smem_bytes(cap, dim) if cap >= 2 else 0)

    def cloud_starts(self, cloud, order, num_clouds: int):
        n = order.shape[0]
        starts = self.xp.empty(num_clouds + 1, dtype=self.xp.int64)
        self._kernel("sb_cloud_starts")((-(-(n + 1) // self.block),), (self.block,),
                                        (cloud, order, np.int32(n), np.int32(num_clouds), starts))
        return starts

    def fill_padding(self, perm, mask, ball_size) -> None:
        m = perm.shape[0]
        self._kernel("sb_fill_padding")(
            (-(-m // self.block),), (self.block,), (perm, mask, np.int64(m), np.int32(ball_size)))

    def rotate(self, coords, perm, rotation):
        xp = self.xp
        dim, n_points = coords.shape
        m = perm.shape[0]
        out = xp.empty((dim, m), dtype=xp.float64)
        self._kernel("sb_rotate")(  # rotation: float64 (D, D) on the device
            (-(-m // self.block),), (self.block,),
            (coords, perm, rotation, np.int32(dim), np.int32(n_points), np.int64(m), out))
        return out

    def sort_keys_f32(self, pos, cloud, axis_shift):
        n, dim = pos.shape
        keys = self.xp.empty(dim * n, dtype=self.xp.uint64)
        self._kernel("sb_sort_keys_f32")(
            (-(-(dim * n) // self.block),), (self.block,),
            (pos, cloud, np.int32(dim), np.int32(n), np.int32(axis_shift), keys))
        return keys


_CUPY_OPS: dict[int, _KernelOps] = {}


def _cupy_ops() -> _KernelOps:
    """The CuPy kernel set of the current device (a kernel handle belongs to one device's
    context); RawModule compiles on first use with NVRTC and caches the binary on disk."""
    import cupy

    device = cupy.cuda.Device().id
    if device not in _CUPY_OPS:
        module = cupy.RawModule(
            code=KERNEL_FILE.read_text(),
            options=(f"-DSB_BLOCK={BLOCK}", f"-DSB_ITEMS={ITEMS}"),
        )
        sms = cupy.cuda.Device(device).attributes["MultiProcessorCount"]
        _CUPY_OPS[device] = _KernelOps(cupy, module, multiprocessors=sms)
    return _CUPY_OPS[device]


# The build, written once against `xp`.


def _to_host(xp, a) -> np.ndarray:
    return a.get() if xp is not np else a


@functools.lru_cache(maxsize=256)
def _flat_plan(counts: bytes, starts: bytes, slot_starts: bytes, ball_size: int, cap: int):
    """`plan_tree`'s tables, flattened into one int64 array for one upload, and their shapes.
    Cached by the per-cloud counts (the bytes of the int64 arrays): batches of the same cloud
    sizes, common in training, plan once."""
    levels, small = plan_tree(np.frombuffer(counts, np.int64), np.frombuffer(starts, np.int64),
                              np.frombuffer(slot_starts, np.int64), ball_size, cap)
    flat = np.concatenate([t.ravel() for t in levels] + [small.ravel()])
    flat.flags.writeable = False
    return flat, tuple(t.shape for t in [*levels, small])


# Device tables of cached plans, by (device, stream, plan): read-only, so a repeated plan skips
# its upload. Keyed by stream as well, so a plan is only read on the stream whose copy wrote it.
_DEVICE_PLANS: collections.OrderedDict = collections.OrderedDict()
_DEVICE_PLANS_MAX = 64


def _plan_tables(xp, flat: np.ndarray, shapes, outputs) -> list:
    """The plan's tables as arrays of `xp`: views of one upload of `flat` by `outputs` (cached
    on a GPU unless `outputs` keeps its uploads itself)."""
    key = None
    if xp is not np and outputs.caches_plans:
        key = (xp.cuda.Device().id, xp.cuda.get_current_stream().ptr, id(flat))
        hit = _DEVICE_PLANS.get(key)
        if hit is not None and hit[0] is flat:
            _DEVICE_PLANS.move_to_end(key)
            return hit[1]
    device_flat = outputs.upload(flat)
    tables, at = [], 0
    for shape in shapes:
        size = shape[0] * shape[1]
        tables.append(device_flat[at:at + size].reshape(shape))
        at += size
    if key is not None:
        _DEVICE_PLANS[key] = (flat, tables)  # holding `flat` keeps its id from being reused
        while len(_DEVICE_PLANS) > _DEVICE_PLANS_MAX:
            _DEVICE_PLANS.popitem(last=False)
    return tables


def _argsort(xp, a):
    """Stable argsort (int64 indices). On the GPU through PyTorch's radix sort: CuPy's
    argsort (Thrust) cost ~0.2 ms of host time per call (bench/tree_profile.py, H100 machine),
    and PyTorch's sort is known to work inside a CUDA graph capture (cupy_graphs.py)."""
    if xp is np:
        return np.argsort(a, kind="stable")
    import torch

    return _cupy_view(xp, torch.sort(torch.as_tensor(a, device=f"cuda:{a.device.id}"), stable=True).indices)


def _presort(xp, ops, coords, cloud, num_clouds: int, pos32=None):
    """int32 `(D, n)`: per axis, item ids sorted by (cloud, coordinate, id).

    coords `(D, n)` float64 with -0.0 mapped to +0.0; cloud `(n,)` int64; pos32, when given,
    the float32 input `(n, D)`. Float32 coordinates, cloud and axis fit one uint64 key: one
    stable sort of D * n keys. Otherwise two: all D * n coordinates by value (stable, so ties
    keep item order), then stably by (axis, cloud).
    """
    dim, n = coords.shape
    cloud_bits = (num_clouds - 1).bit_length()
    if pos32 is not None and cloud_bits + (dim - 1).bit_length() <= 31:
        # Bit 63 of the keys is clear (axis and cloud take at most 31 bits above the 32 of the
        # coordinate), so their order as int64 is their order as uint64: torch sorts int64.
        order = _argsort(xp, ops.sort_keys_f32(pos32, cloud, 32 + cloud_bits).view(xp.int64))
    else:
        order = _argsort(xp, coords.ravel())
        group = order // n
        if num_clouds > 1:
            group = group * num_clouds + cloud[order - group * n]
        order = order[_argsort(xp, group)]
    # Sorted by axis first: row d holds flat indices d * n + id.
    ids = xp.empty((dim, n), dtype=xp.int32)
    xp.remainder(order.reshape(dim, n), n, out=ids, casting="unsafe")
    return ids


def _build_levels(xp, ops, coords, ids, counts, starts, slot_starts, ball_size, perm, mask, outputs):
    """Sort `n` items into slots: writes perm (slot -> item id) and mask of their real slots.

    coords `(D, n)` float64; ids `(D, n)` int32 from `_presort` (overwritten); counts, starts,
    slot_starts host int64 `(B,)`; `outputs` uploads the plan.
    """
    dim, n_items = ids.shape
    cap = ops.node_cap(dim, n_items)
    flat, shapes = _flat_plan(np.asarray(counts, np.int64).tobytes(), np.asarray(starts, np.int64).tobytes(),
                              np.asarray(slot_starts, np.int64).tobytes(), ball_size, cap)
    tables = _plan_tables(xp, flat, shapes, outputs)
    work = {"cap": cap}
    if isinstance(ops, _KernelOps):
        ntiles = -(-n_items // ops.tile)
        work.update(
            goes_left=xp.empty(n_items, dtype=xp.uint8),
            pnode=xp.empty(n_items, dtype=xp.int32),
            tile_count=xp.empty(dim * ntiles, dtype=xp.int32),
            tile_offset=xp.empty(dim * ntiles, dtype=xp.int32),
            local_of=xp.empty(n_items, dtype=xp.int32),
        )
    spare = xp.empty_like(ids)
    for table in tables[:-1]:
        ops.level(coords, ids, spare, table, work)
        ids, spare = spare, ids
    ops.subtree(coords, ids, tables[-1], ball_size, perm, mask, work)


class _Outputs:
    """Where `_build` puts its results and its uploads: new arrays of `xp`."""

    caches_plans = True  # whether `_plan_tables` may serve this build's plan from its cache

    def __init__(self, xp):
        self.xp = xp

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def upload(self, host: np.ndarray):
        return self.xp.asarray(host)


class _TorchOutputs(_Outputs):
    """The results allocated as torch tensors on `device` and handed to the kernels as CuPy
    views of them, so the tree needs no DLPack exchange per result: DLPack's Python-side stream
    bookkeeping costs more than the kernels of a small build. `tensor(view)` gives a view's
    tensor back."""

    def __init__(self, cupy, device):
        super().__init__(cupy)
        self.device = device
        self._tensors = {}

    def _keep(self, tensor):
        view = _cupy_view(self.xp, tensor)
        self._tensors[id(view)] = (view, tensor)
        return view

    def _new(self, factory: str, shape, dtype):
        import torch

        dtype = getattr(torch, np.dtype(dtype).name)
        return self._keep(getattr(torch, factory)(shape, dtype=dtype, device=self.device))

    def zeros(self, shape, dtype):
        return self._new("zeros", shape, dtype)

    def empty(self, shape, dtype):
        return self._new("empty", shape, dtype)

    def upload(self, host: np.ndarray):
        import torch

        # non_blocking: a blocking copy would wait for the stream (the presort queued before);
        # from pageable memory the copy is staged at once, so `host` may go right after.
        # torch.from_numpy warns on read-only arrays (the cached plans): those are copied.
        host = host if host.flags.writeable else host.copy()
        return self._keep(torch.from_numpy(host).to(self.device, non_blocking=True))

    def tensor(self, view):
        return self._tensors[id(view)][1]


def _cupy_view(cupy, tensor):
    """A CuPy array over the memory of a contiguous CUDA tensor (which the array keeps alive),
    built from its pointer: cheaper than `cupy.from_dlpack`."""
    shape = tuple(tensor.shape)
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    if tensor.numel() == 0:
        return cupy.empty(shape, dtype=dtype)
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), tensor.numel() * tensor.element_size(), tensor,
                                     tensor.device.index)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0))


def _build(xp, ops, pos, batch, num_clouds: int, ball_size: int, rotations: int, outputs=None,
           counts=None):
    """The build on arrays of `xp`. pos `(N, dim)` float32/float64, batch `(N,)` int64 or None;
    `outputs` allocates the results and makes the uploads (default: `_Outputs(xp)`); `counts`,
    the per-cloud counts (host int64 `(B,)`) where the caller knows them (else one host sync).

    Returns perm int64 `(M,)`, mask uint8 `(M,)`, offsets int64 `(B+1,)`, rotation_perms int64
    `(R, M)` (arrays of `xp`) and offsets on the host (numpy int64 `(B+1,)`).
    """
    outputs = outputs or _Outputs(xp)
    n_points, dim = pos.shape
    if n_points >= 2**31 - 1:
        raise ValueError(f"pos must have fewer than 2**31 - 1 points, got {n_points}")
    coords = xp.empty((dim, n_points), dtype=xp.float64)
    xp.add(pos.T, 0.0, out=coords)  # + 0.0 maps -0.0 to +0.0
    pos32 = xp.ascontiguousarray(pos) if pos.dtype == xp.float32 else None
    if batch is None:
        batch = xp.zeros(n_points, dtype=xp.int64)
    batch = batch.astype(xp.int64, copy=False)
    ids = _presort(xp, ops, coords, batch, num_clouds, pos32)
    if counts is not None:
        counts_h = np.asarray(counts, dtype=np.int64)
    elif num_clouds == 1:
        counts_h = np.array([n_points], dtype=np.int64)
    else:
        # The one host sync: the per-cloud counts size everything that follows. They come from
        # where each cloud starts in the first axis's presorted ids (grouped by cloud): CuPy's
        # bincount syncs twice (its min and max), and atomic counters serialize on a large
        # cloud (16M points: +11 ms on an H100).
        counts_h = np.diff(_to_host(xp, ops.cloud_starts(batch, ids[0], num_clouds)))
    offsets_h = np.zeros(num_clouds + 1, dtype=np.int64)
    offsets_h[1:] = np.cumsum((counts_h + ball_size - 1) // ball_size * ball_size)
    offsets = outputs.upload(offsets_h)
    starts_h = np.cumsum(counts_h) - counts_h
    num_slots = int(offsets_h[-1])

    perm = outputs.empty(num_slots, np.int64)  # every slot is written (subtree, padding)
    mask = outputs.zeros(num_slots, np.uint8)
    _build_levels(xp, ops, coords, ids, counts_h, starts_h, offsets_h[:-1], ball_size, perm, mask, outputs)
    ops.fill_padding(perm, mask, ball_size)

    rotation_perms = outputs.empty((rotations, num_slots), np.int64)
    if rotations:
        slots_h = offsets_h[1:] - offsets_h[:-1]
        slot_cloud = None
        if num_clouds > 1:  # cloud of each slot
            slot_cloud = xp.searchsorted(offsets[1:], xp.arange(num_slots), side="right").astype(xp.int64)
        scratch_mask = xp.empty(num_slots, dtype=xp.uint8)
        for r in range(rotations):
            rotation = outputs.upload(np.ascontiguousarray(rotation_matrix(r, dim), dtype=np.float64))
            rotated = ops.rotate(coords, perm, rotation)
            rids = _presort(xp, ops, rotated, slot_cloud, num_clouds)
            _build_levels(xp, ops, rotated, rids, slots_h, offsets_h[:-1], offsets_h[:-1], ball_size,
                          rotation_perms[r], scratch_mask, outputs)
    return perm, mask, offsets, rotation_perms, offsets_h


def build_numpy(pos, batch, num_clouds: int, ball_size: int, rotations: int, ops=None):
    """The NumPy path: `(perm int64 (M,), mask bool (M,), offsets int64 (B+1,),
    rotation_perms int64 (R, M))`, numpy arrays, the signature of `build_numba`.

    pos `(N, dim)` float32/float64, batch `(N,)` int64 (or None). `ops` picks the kernel set
    (default `NumpyOps()`; the tests pass the CPU emulator of the CUDA kernels).
    """
    pos = np.asarray(pos)
    batch = None if batch is None else np.asarray(batch)
    perm, mask, offsets, rotation_perms, _ = _build(
        np, ops or NumpyOps(), pos, batch, num_clouds, ball_size, rotations)
    return perm, mask.astype(bool), offsets, rotation_perms


def build_cupy(pos, batch, num_clouds: int, ball_size: int, rotations: int):
    """The GPU path on CuPy arrays (current device and stream): `(perm, mask, offsets,
    rotation_perms)` as in `build_numpy`, plus offsets on the host (numpy `(B+1,)`)."""
    import cupy

    perm, mask, offsets, rotation_perms, offsets_h = _build(
        cupy, _cupy_ops(), pos, batch, num_clouds, ball_size, rotations)
    return perm, mask.astype(cupy.bool_), offsets, rotation_perms, offsets_h


def _torch_stream_for_cupy(cupy, torch_stream):
    if hasattr(torch_stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(torch_stream)
    with warnings.catch_warnings():  # ExternalStream is deprecated from CuPy 14 on
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device.index)


def build_tree_cupy(pos, batch, num_clouds: int, ball_size: int, rotations: int):
    """`BallTree` of CUDA tensors built on their device, on PyTorch's current stream.

    Inputs and results are torch tensors that the kernels see through CuPy views, without
    copies; see the module docstring for the host syncs. Builds of up to
    `cupy_graphs.MAX_POINTS` points replay a captured CUDA graph from the second build of the
    same cloud sizes on (sparseball/tree/cupy_graphs.py).
    """
    import torch

    from . import cupy_graphs
    from .balltree import BallTree

    pos = pos.detach().contiguous()
    if batch is not None:
        batch = batch.detach().to(torch.int64).contiguous()
    built, counts = None, None
    if pos.shape[0] <= cupy_graphs.MAX_POINTS:
        counts = cloud_counts(batch, num_clouds, pos.shape[0])
        built = cupy_graphs.replay(pos, batch, num_clouds, ball_size, rotations, counts)
    if built is None:
        built = build_on_current_stream(pos, batch, num_clouds, ball_size, rotations, counts=counts)
    perm, mask, offsets, rotation_perms, offsets_h = built
    return BallTree(
        perm=perm,
        mask=mask,
        offsets=offsets,
        pos=torch.index_select(pos, 0, perm),
        ball_size=ball_size,
        rotation_perms=rotation_perms,
        offsets_list=tuple(int(o) for o in offsets_h),
        num_points=pos.shape[0],
    )


def cloud_counts(batch, num_clouds: int, n_points: int) -> np.ndarray:
    """Host int64 `(B,)` points per cloud of a CUDA `batch` (int64 ids in [0, B), or None): one
    host sync where there are several clouds. Integer atomics: for small builds, where they do
    not serialize (see `_build` for large ones)."""
    if batch is None or num_clouds == 1:
        return np.array([n_points], dtype=np.int64)
    import torch

    counts = torch.zeros(num_clouds, dtype=torch.int64, device=batch.device)
    counts.index_add_(0, batch, torch.ones_like(batch))
    return counts.cpu().numpy()


def build_on_current_stream(pos, batch, num_clouds: int, ball_size: int, rotations: int, outputs=None,
                            counts=None):
    """`_build` on contiguous CUDA tensors pos and batch (int64 or None), on PyTorch's current
    stream; `outputs` a `_TorchOutputs` (default: a new one). Returns torch tensors perm, mask
    (bool), offsets, rotation_perms and offsets on the host (numpy)."""
    import cupy
    import torch

    device = pos.device
    outputs = outputs or _TorchOutputs(cupy, device)
    with cupy.cuda.Device(device.index), _torch_stream_for_cupy(cupy, torch.cuda.current_stream(device)):
        batch_cp = None if batch is None else _cupy_view(cupy, batch)
        perm, mask, offsets, rotation_perms, offsets_h = _build(
            cupy, _cupy_ops(), _cupy_view(cupy, pos), batch_cp, num_clouds, ball_size, rotations, outputs,
            counts)
        return (outputs.tensor(perm), outputs.tensor(mask).view(torch.bool),  # 0/1 bytes
                outputs.tensor(offsets), outputs.tensor(rotation_perms), offsets_h)
