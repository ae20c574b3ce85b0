"""The CPU ball tree builder (docs/contract.md, section 2), compiled with Numba.

Points are copied once into cloud order as float64 columns `coords[:, t]` next to their input
index `idx[t]`. Every tree node owns a contiguous run of columns. Two split methods share the
work:

- Big nodes are split by an in-place quickselect on the key `(coordinate, index)` (sampled
  pivots, block partitioning) that moves the columns themselves, so each child again owns a
  contiguous run.
- A node that fits in cache (`_LISTED` columns) is sorted once per axis (radix sort), and its
  subtree never compares coordinates again: every node keeps one list of its columns per
  axis, in that axis' order, so its spread along an axis is last minus first, and its split
  takes the first `n_left` of the split axis' list and stably partitions the other lists by
  that choice (branch-free, linear). Lists ping-pong between two buffers level to level;
  nodes of at most 8 columns are finished by sorting networks.

The top levels of big clouds are split level by level, in parallel over all nodes of the
level (a lone root finds its split axis with a parallel reduction). The remaining nodes are
dealt to the threads, each finishing its subtrees depth first: one parallel region for all
lower levels, which keeps batches of small clouds cheap. The rotated orderings run the same
code on the slots.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numba as nb
import numpy as np
from numba import njit, prange

from .rotations import rotation_matrix

# Depth-first stack entries: a node parks its right child while its left one is built, and a
# tree over 2^62 slots is 62 levels deep.
_STACK = 64
# Below this many points a node is not worth a parallel region of its own.
_MIN_GRAIN = 1 << 14
# Nodes this small switch from quickselect to sorted lists (their data then stays in L2).
_LISTED = 1 << 14
# Quickselect: runs this short are insertion sorted; runs this long take a sampled pivot;
# partitions scan blocks of _BLOCK columns.
_SMALL = 16
_SAMPLED = 1024
_BLOCK = 64
# Radix sort: nodes this small are insertion sorted; digits have at most _DIGIT_BITS bits.
_INSERTION = 32
_DIGIT_BITS = 12
# Inputs with this many coordinates are loaded into columns in parallel.
_PARALLEL_LOAD = 1 << 18
# Multiplier of the pivot sampler's linear congruential generator (Knuth's MMIX).
_LCG = 6364136223846793005
_SIGN = -(1 << 63)


def build_numba(
    pos: np.ndarray, batch: np.ndarray, num_clouds: int, ball_size: int, rotations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the ball tree of a batch of clouds on the CPU.

    Args:
        pos: `(N, dim)` float32 or float64 finite positions.
        batch: `(N,)` int64 cloud id of each point, in `[0, num_clouds)`, any order.
        num_clouds: B.
        ball_size: P, a power of two >= 2.
        rotations: R, the number of rotated orderings.

    Returns:
        perm `(M,)` int64, mask `(M,)` bool, offsets `(B + 1,)` int64 and rotation_perms
        `(R, M)` int64, as in `BallTree`.
    """
    pos = np.ascontiguousarray(pos)
    if pos.dtype != np.float32:
        pos = pos.astype(np.float64, copy=False)
    batch = np.ascontiguousarray(batch, dtype=np.int64)
    threads = nb.get_num_threads()
    identity, matrices = _rotation_matrices(rotations, pos.shape[1])
    # Only the loads depend on the dtype of pos: the tree code is compiled once, for float64.
    load = _load_parallel if pos.size >= _PARALLEL_LOAD else _load
    idx, offsets, roots, slot_roots = _layout(batch, num_clouds, ball_size)
    num_slots = int(offsets[-1])
    perm = np.full(num_slots, -1, dtype=np.int64)
    mask = np.empty(num_slots, dtype=np.bool_)
    _tree(load(pos, idx, identity), idx, roots, ball_size, perm, mask, threads)
    rotation_perms = np.empty((rotations, num_slots), dtype=np.int64)
    for r in range(rotations):
        _tree(load(pos, perm, matrices[r]), np.arange(num_slots), slot_roots, ball_size,
              rotation_perms[r], mask[:0], threads)
    return perm, mask, offsets, rotation_perms


@lru_cache(maxsize=64)
def _rotation_matrices(rotations: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 `(0, dim)` (no rotation) and `(R, dim, dim)` (those of the rotated orderings),
    read-only (cached), so that both have the same Numba type."""
    stack = np.empty((rotations, dim, dim))
    for r in range(rotations):
        stack[r] = rotation_matrix(r, dim)
    identity = np.empty((0, dim))
    stack.flags.writeable = identity.flags.writeable = False
    return identity, stack


@njit(cache=True)
def _layout(batch, num_clouds, ball_size):
    """The slot layout of a batch.

    Returns:
        idx: int64 `(N,)` the points in cloud order (their column order), stable.
        offsets: int64 `(B + 1,)` slot offsets of the clouds.
        roots: int64 `(K, 4)` each non-empty cloud as a node of columns (`_roots`).
        slot_roots: the same over slots, for the rotated orderings.
    """
    counts = np.zeros(num_clouds, dtype=np.int64)
    for i in range(batch.shape[0]):
        counts[batch[i]] += 1
    offsets = np.zeros(num_clouds + 1, dtype=np.int64)
    point_start = np.zeros(num_clouds, dtype=np.int64)
    for b in range(num_clouds):
        offsets[b + 1] = offsets[b] + ball_size * ((counts[b] + ball_size - 1) // ball_size)
        if b:
            point_start[b] = point_start[b - 1] + counts[b - 1]
    fill = point_start.copy()
    idx = np.empty(batch.shape[0], dtype=np.int64)
    for i in range(batch.shape[0]):
        idx[fill[batch[i]]] = i
        fill[batch[i]] += 1
    roots = _roots(point_start, counts, offsets)
    slot_roots = _roots(offsets[:-1], offsets[1:] - offsets[:-1], offsets)
    return idx, offsets, roots, slot_roots


@njit(cache=True)
def _roots(point_start, counts, offsets):
    """int64 `(K, 4)`: (first column, columns, first slot, slots) of every non-empty cloud."""
    num_roots = 0
    for b in range(counts.shape[0]):
        num_roots += counts[b] > 0
    roots = np.empty((num_roots, 4), dtype=np.int64)
    k = 0
    for b in range(counts.shape[0]):
        if counts[b]:
            roots[k, 0] = point_start[b]
            roots[k, 1] = counts[b]
            roots[k, 2] = offsets[b]
            roots[k, 3] = offsets[b + 1] - offsets[b]
            k += 1
    return roots


@njit(cache=True)
def _load(pos, src, rotation):
    """float64 `(dim, C)` columns: pos[src[t]], or rotation @ pos[src[t]] for a `(dim, dim)`
    rotation (not `(0, dim)`), summed over k in ascending order."""
    coords = np.empty((pos.shape[1], src.shape[0]))
    _load_range(pos, src, rotation, coords, 0, src.shape[0])
    return coords


@njit(parallel=True, cache=True)
def _load_parallel(pos, src, rotation):
    """`_load`, in parallel chunks."""
    coords = np.empty((pos.shape[1], src.shape[0]))
    chunks = 64
    step = (src.shape[0] + chunks - 1) // chunks
    for c in prange(chunks):
        start = min(c * step, src.shape[0])
        _load_range(pos, src, rotation, coords, start, min(start + step, src.shape[0]))
    return coords


@njit(cache=True)
def _load_range(pos, src, rotation, coords, lo, hi):
    dim = pos.shape[1]
    if rotation.shape[0] == 0:
        for t in range(lo, hi):
            for d in range(dim):
                coords[d, t] = pos[src[t], d]
        return
    for t in range(lo, hi):
        p = src[t]
        for i in range(dim):
            acc = np.float64(pos[p, 0]) * rotation[i, 0]
            for k in range(1, dim):
                acc += np.float64(pos[p, k]) * rotation[i, k]
            coords[i, t] = acc


# Scheduling


@njit(cache=True)
def _tree(coords, idx, roots, ball_size, out, mask, threads):
    """Place the columns of every root node into their slots: out[slot] = idx of the column.

    Args:
        coords: float64 `(dim, C)` points (columns), each root's columns contiguous; permuted
            in place.
        idx: int64 `(C,)` index of each column: the tie-break and the value written to `out`;
            permuted along.
        roots: int64 `(K, 4)` nodes as (first column, columns, first slot, slots).
        ball_size: P.
        out: int64 `(M,)`, -1 on entry; slots left -1 are padding.
        mask: bool `(M,)` to receive `out >= 0`, with padding then filled in `out`; or empty
            (rotated orderings have no padding).
        threads: how many threads share the work.
    """
    total = 0
    for k in range(roots.shape[0]):
        total += roots[k, 1]
    grain = max(total // (4 * threads), _MIN_GRAIN)
    big, tasks = _sift_nodes(roots, grain, roots[:0])
    while big.shape[0]:
        children = np.empty((2 * big.shape[0], 4), dtype=np.int64)
        if big.shape[0] == 1:
            first, rows = big[0, 0], big[0, 1]
            axis = _split_axis_parallel(coords, first, first + rows, threads)
            _split_into(coords, idx, big, 0, axis, ball_size, children)
        else:
            _split_level(coords, idx, big, ball_size, children)
        big, tasks = _sift_nodes(children, grain, tasks)
    _finish_all(coords, idx, tasks, _deal(tasks, threads), ball_size, out, mask, threads)


@njit(cache=True)
def _sift_nodes(nodes, grain, tasks):
    """The nodes above `grain` columns, and `tasks` followed by the other nodes."""
    num_big = 0
    for i in range(nodes.shape[0]):
        num_big += nodes[i, 1] > grain
    big = np.empty((num_big, 4), dtype=np.int64)
    grown = np.empty((tasks.shape[0] + nodes.shape[0] - num_big, 4), dtype=np.int64)
    grown[: tasks.shape[0]] = tasks
    b = 0
    t = tasks.shape[0]
    for i in range(nodes.shape[0]):
        if nodes[i, 1] > grain:
            big[b] = nodes[i]
            b += 1
        else:
            grown[t] = nodes[i]
            t += 1
    return big, grown


@njit(parallel=True, cache=True)
def _split_level(coords, idx, nodes, ball_size, children):
    """Split every node of a level in parallel; node i's children go to rows 2i and 2i + 1."""
    for i in prange(nodes.shape[0]):
        axis = _split_axis(coords, nodes[i, 0], nodes[i, 0] + nodes[i, 1])
        _split_into(coords, idx, nodes, i, axis, ball_size, children)


@njit(cache=True)
def _split_into(coords, idx, nodes, i, axis, ball_size, children):
    first, rows, slot, slots = nodes[i, 0], nodes[i, 1], nodes[i, 2], nodes[i, 3]
    left_rows, left_slots = _split_sizes(rows, slots, ball_size)
    _select(coords, idx, first, first + rows, first + left_rows, axis)
    children[2 * i, 0] = first
    children[2 * i, 1] = left_rows
    children[2 * i, 2] = slot
    children[2 * i, 3] = left_slots
    children[2 * i + 1, 0] = first + left_rows
    children[2 * i + 1, 1] = rows - left_rows
    children[2 * i + 1, 2] = slot + left_slots
    children[2 * i + 1, 3] = slots - left_slots


@njit(cache=True)
def _deal(tasks, threads):
    """int64 `(K,)`: the thread of each task, each to the least loaded thread so far.

    No task is above a quarter of a thread's share (or `_MIN_GRAIN`), so this stays close to
    an even balance without sorting the tasks.
    """
    owner = np.empty(tasks.shape[0], dtype=np.int64)
    load = np.zeros(threads, dtype=np.int64)
    for k in range(tasks.shape[0]):
        t = np.argmin(load)
        owner[k] = t
        load[t] += tasks[k, 1]
    return owner


@njit(parallel=True, cache=True)
def _finish_all(coords, idx, tasks, owner, ball_size, out, mask, threads):
    """Build (and pad) the subtree of every task; thread t takes the tasks with owner t."""
    for t in prange(threads):
        stack = np.empty((_STACK, 6), dtype=np.int64)
        # A thread finishes one listed subtree before it lists another, so its lists and
        # side marks need only `_LISTED` entries, numbered from the listed root's first column.
        lists = np.empty((2, coords.shape[0], _LISTED), dtype=np.int32)
        side = np.empty(_LISTED, dtype=np.uint8)
        blocks = np.empty(2 * ball_size if mask.shape[0] else 0, dtype=np.int64)
        for k in range(tasks.shape[0]):
            if owner[k] == t:
                _finish(coords, idx, lists, side, tasks, k, ball_size, out, stack)
                if mask.shape[0]:
                    _pad(out, mask, tasks[k, 2], tasks[k, 3], ball_size, blocks)


@njit(cache=True)
def _finish(coords, idx, lists, side, tasks, k, ball_size, out, stack):
    """Build the whole subtree of node `tasks[k]` depth first.

    Stack entries are (first column, columns, first slot, slots, state, base); state 0:
    columns not listed yet, state 1 + b: listed in buffer b, the lists holding columns
    minus `base` (the first column of the listed root) at places first - base on.
    """
    for f in range(4):
        stack[0, f] = tasks[k, f]
    stack[0, 4] = 0
    stack[0, 5] = 0
    top = 0
    while top >= 0:
        first, rows, slot, slots = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
        state, base = stack[top, 4], stack[top, 5]
        top -= 1
        if state == 0 and rows > _LISTED:
            axis = _split_axis(coords, first, first + rows)
            left_rows, left_slots = _split_sizes(rows, slots, ball_size)
            _select(coords, idx, first, first + rows, first + left_rows, axis)
            child_state = 0
        else:
            if state == 0:
                for a in range(coords.shape[0]):
                    _sort_columns(coords[a], idx, first, rows, lists[0, a])
                state = 1
                base = first
            buf = state - 1
            lo = first - base
            if rows <= 1 or (rows <= 8 and slots <= ball_size):
                _place_small(coords, idx, lists, buf, base, lo, rows, slot, slots, out)
                continue
            axis = _widest(coords, lists, buf, base, lo, rows)
            left_rows, left_slots = _split_sizes(rows, slots, ball_size)
            _mark(lists, buf, axis, side, lo, rows, left_rows)
            _split_lists(lists, buf, axis, side, lo, rows, left_rows)
            child_state = 2 - buf
        top += 1
        stack[top, 0] = first + left_rows
        stack[top, 1] = rows - left_rows
        stack[top, 2] = slot + left_slots
        stack[top, 3] = slots - left_slots
        stack[top, 4] = child_state
        stack[top, 5] = base
        top += 1
        stack[top, 0] = first
        stack[top, 1] = left_rows
        stack[top, 2] = slot
        stack[top, 3] = left_slots
        stack[top, 4] = child_state
        stack[top, 5] = base


@njit(cache=True)
def _split_sizes(rows, slots, ball_size):
    """(n_left, left slots) of a node: the contract's split rule."""
    if slots <= ball_size:
        return rows // 2, slots // 2
    balls = slots // ball_size
    return rows * (balls // 2) // balls, (balls // 2) * ball_size


# Sorted lists


@njit(cache=True)
def _sort_columns(values, idx, first, rows, out):
    """out[:rows] = columns first:first+rows sorted by (values, idx), minus `first`.

    A stable LSD radix sort on the coordinate's bits, then each run of tied coordinates is
    sorted by index.
    """
    if rows <= _INSERTION:
        for t in range(rows):
            j = t
            while j > 0 and (values[first + out[j - 1]] > values[first + t] or (
                    values[first + out[j - 1]] == values[first + t]
                    and idx[first + out[j - 1]] > idx[first + t])):
                out[j] = out[j - 1]
                j -= 1
            out[j] = t
        return
    keys = np.empty(rows, dtype=np.int64)
    order = np.empty(rows, dtype=out.dtype)
    raw = values[first:first + rows].view(np.int64)
    varying = 0
    for t in range(rows):
        # -0.0 ties with 0.0; then flip so that unsigned integer order is float order.
        s = raw[t] if raw[t] != _SIGN else 0
        keys[t] = (s ^ ((s >> 63) & ~_SIGN)) ^ _SIGN
        order[t] = t
        varying |= keys[t] ^ keys[0]
    # Sort only the bits that vary: float32 inputs leave 29 low bits zero, and a small
    # node's coordinates share their top bits.
    low = 0
    while low < 64 and not (varying >> low) & 1:
        low += 1
    high = 63
    while high > low and not (varying >> high) & 1:
        high -= 1
    width = high - low + 1 if varying else 0
    # Digits of about log2(rows) - 3 bits: buckets stay few next to the keys.
    most = 6
    while most < _DIGIT_BITS and 1 << (most + 3) < rows:
        most += 1
    passes = (width + most - 1) // most
    bits = (width + passes - 1) // passes if passes else 1
    mask = (1 << bits) - 1
    hist = np.zeros((passes, mask + 1), dtype=np.int64)
    for t in range(rows):
        for g in range(passes):
            # Arithmetic shifts smear the sign bit over spare top bits, which keeps the top
            # digit monotonic.
            hist[g, (keys[t] >> (low + bits * g)) & mask] += 1
    keys_b = np.empty(rows, dtype=np.int64)
    order_b = np.empty(rows, dtype=out.dtype)
    for g in range(passes):
        start = 0
        for v in range(mask + 1):
            c = hist[g, v]
            hist[g, v] = start
            start += c
        shift = low + bits * g
        for t in range(rows):
            key = keys[t]
            v = (key >> shift) & mask
            p = hist[g, v]
            hist[g, v] = p + 1
            keys_b[p] = key
            order_b[p] = order[t]
        keys, keys_b = keys_b, keys
        order, order_b = order_b, order
    start = 0
    for t in range(1, rows + 1):
        if t == rows or keys[t] != keys[start]:
            if t - start > 1:
                _sort_by_index(order, idx[first:first + rows], start, t)
            start = t
    out[:rows] = order


@njit(cache=True)
def _sort_by_index(order, idx, lo, hi):
    """Heapsort order[lo:hi] by idx (a run of tied coordinates)."""
    n = hi - lo
    for root in range(n // 2 - 1, -1, -1):
        _sift_down_index(order, idx, lo, root, n)
    for end in range(n - 1, 0, -1):
        order[lo], order[lo + end] = order[lo + end], order[lo]
        _sift_down_index(order, idx, lo, 0, end)


@njit(cache=True)
def _sift_down_index(order, idx, lo, root, n):
    """Restore the max-heap (by idx) of order[lo:lo+n] below heap node `root`."""
    while 2 * root + 1 < n:
        child = 2 * root + 1
        if child + 1 < n and idx[order[lo + child]] < idx[order[lo + child + 1]]:
            child += 1
        if idx[order[lo + root]] >= idx[order[lo + child]]:
            return
        order[lo + root], order[lo + child] = order[lo + child], order[lo + root]
        root = child


@njit(cache=True)
def _widest(coords, lists, buf, base, lo, rows):
    """Axis of largest float64 spread of a listed node (ties: lowest axis)."""
    best = 0
    widest = -1.0
    for a in range(coords.shape[0]):
        spread = (coords[a, base + lists[buf, a, lo + rows - 1]]
                  - coords[a, base + lists[buf, a, lo]])
        better = spread > widest  # selects, not branches (see `_place_pair`)
        best = a if better else best
        widest = spread if better else widest
    return best


@njit(cache=True)
def _mark(lists, buf, axis, side, lo, rows, left_rows):
    """side[p] = 1 for the first `left_rows` columns of the node along `axis`, else 0."""
    for t in range(lo, lo + left_rows):
        side[lists[buf, axis, t]] = 1
    for t in range(lo + left_rows, lo + rows):
        side[lists[buf, axis, t]] = 0


@njit(cache=True)
def _split_lists(lists, buf, axis, side, lo, rows, left_rows):
    """Move a node's lists to the other buffer, each stably partitioned by `side`.

    The split axis' own list is already partitioned (its first `left_rows` are the left
    side): a plain copy. The others go branch-free, each column to the next free place of
    its side.
    """
    dst = 1 - buf
    for t in range(lo, lo + rows):
        lists[dst, axis, t] = lists[buf, axis, t]
    dim = lists.shape[1]
    for k in range(1, dim):
        a = axis + k - dim if axis + k >= dim else axis + k
        left = lo
        right = lo + left_rows
        for t in range(lo, lo + rows):
            p = lists[buf, a, t]
            s = np.int64(side[p])
            lists[dst, a, right + (left - right) * s] = p
            left += s
            right += 1 - s


@njit(cache=True)
def _place_small(coords, idx, lists, buf, base, lo, rows, slot, slots, out):
    """Finish a listed node of at most one column, or at most 8 and at most P slots, without
    moving lists: nodes this small cost more in loop overhead than in work.

    At or below P a split sends floor(n/2) columns left, and none of a lone column above.
    """
    if rows == 0:
        return
    if rows <= 4:
        _place_quad(coords, idx, _column(lists, buf, 0, base, lo, rows, 0),
                    _column(lists, buf, 0, base, lo, rows, 1),
                    _column(lists, buf, 0, base, lo, rows, 2),
                    _column(lists, buf, 0, base, lo, rows, 3), rows, slot, slots, out)
        return
    axis = _widest(coords, lists, buf, base, lo, rows)
    half = slots // 2
    left = rows // 2
    _place_quad(coords, idx, _column(lists, buf, axis, base, lo, left, 0),
                _column(lists, buf, axis, base, lo, left, 1),
                _column(lists, buf, axis, base, lo, left, 2),
                _column(lists, buf, axis, base, lo, left, 3), left, slot, half, out)
    _place_quad(coords, idx, _column(lists, buf, axis, base, lo + left, rows - left, 0),
                _column(lists, buf, axis, base, lo + left, rows - left, 1),
                _column(lists, buf, axis, base, lo + left, rows - left, 2),
                _column(lists, buf, axis, base, lo + left, rows - left, 3), rows - left,
                slot + half, half, out)


@njit(cache=True)
def _column(lists, buf, axis, base, lo, rows, k):
    """The k-th column of a run of `rows` (its last one past the end)."""
    return base + lists[buf, axis, lo + min(k, rows - 1)]


@njit(cache=True)
def _place_quad(coords, idx, c0, c1, c2, c3, rows, slot, slots, out):
    """Place `rows` <= 4 columns (the first `rows` of c0..c3) into `slots` <= P slots from
    `slot`: a sorting network along the split axis, then a pair or a lone column per half."""
    if rows <= 2:
        _place_pair(coords, idx, c0, c1, rows, slot, slots, out)
        return
    best = 0
    widest = -1.0
    for a in range(coords.shape[0]):
        low = min(min(coords[a, c0], coords[a, c1]), min(coords[a, c2], coords[a, c3]))
        high = max(max(coords[a, c0], coords[a, c1]), max(coords[a, c2], coords[a, c3]))
        better = high - low > widest  # c3 repeats c2 for 3 columns
        best = a if better else best
        widest = high - low if better else widest
    half = slots // 2
    if rows == 3:
        a0, a1 = _ordered(coords, idx, best, c0, c1)
        b1, b2 = _ordered(coords, idx, best, a1, c2)
        d0, d1 = _ordered(coords, idx, best, a0, b1)
        _place_pair(coords, idx, d0, d0, 1, slot, half, out)
        _place_pair(coords, idx, d1, b2, 2, slot + half, half, out)
        return
    a0, a1 = _ordered(coords, idx, best, c0, c1)
    a2, a3 = _ordered(coords, idx, best, c2, c3)
    b0, b2 = _ordered(coords, idx, best, a0, a2)
    b1, b3 = _ordered(coords, idx, best, a1, a3)
    e1, e2 = _ordered(coords, idx, best, b1, b2)
    _place_pair(coords, idx, b0, e1, 2, slot, half, out)
    _place_pair(coords, idx, e2, b3, 2, slot + half, half, out)


@njit(cache=True)
def _ordered(coords, idx, axis, p, q):
    """(p, q) in the order (coordinate on `axis`, index), by selects (see `_place_pair`)."""
    flip = (coords[axis, q] < coords[axis, p]) | (
        (coords[axis, q] == coords[axis, p]) & (idx[q] < idx[p]))
    return (q if flip else p), (p if flip else q)


@njit(cache=True)
def _place_pair(coords, idx, p, q, rows, slot, slots, out):
    """Place one column (p) or two (p, q) into `slots` slots from `slot` (at most P)."""
    if rows == 1:
        out[slot + slots - 1] = idx[p]
        return
    best = 0
    widest = -1.0
    for a in range(coords.shape[0]):
        spread = abs(coords[a, p] - coords[a, q])
        better = spread > widest
        best = a if better else best
        widest = spread if better else widest
    # Bitwise, not short-circuit, logic and selects: these outcomes are coin flips, and
    # mispredicted branches cost more than the whole placement.
    low, high = _ordered(coords, idx, best, p, q)
    out[slot + slots // 2 - 1] = idx[low]
    out[slot + slots - 1] = idx[high]


# Quickselect


@njit(cache=True)
def _split_axis(coords, lo, hi):
    """Axis of largest float64 spread of columns lo:hi (ties: lowest axis)."""
    best = 0
    widest = -1.0
    for d in range(coords.shape[0]):
        spread = _spread(coords, d, lo, hi)
        if spread > widest:
            best = d
            widest = spread
    return best


@njit(cache=True)
def _spread(coords, d, lo, hi):
    """max - min of coords[d, lo:hi], four independent lanes so the loop pipelines."""
    low0 = low1 = low2 = low3 = coords[d, lo]
    high0 = high1 = high2 = high3 = low0
    i = lo + 1
    while i + 4 <= hi:
        low0 = min(low0, coords[d, i])
        high0 = max(high0, coords[d, i])
        low1 = min(low1, coords[d, i + 1])
        high1 = max(high1, coords[d, i + 1])
        low2 = min(low2, coords[d, i + 2])
        high2 = max(high2, coords[d, i + 2])
        low3 = min(low3, coords[d, i + 3])
        high3 = max(high3, coords[d, i + 3])
        i += 4
    while i < hi:
        low0 = min(low0, coords[d, i])
        high0 = max(high0, coords[d, i])
        i += 1
    return max(max(high0, high1), max(high2, high3)) - min(min(low0, low1), min(low2, low3))


@njit(parallel=True, cache=True)
def _split_axis_parallel(coords, lo, hi, chunks):
    """`_split_axis` of one big node, its columns cut into `chunks` reduced in parallel."""
    dim = coords.shape[0]
    lower = np.empty((chunks, dim))
    upper = np.empty((chunks, dim))
    step = (hi - lo + chunks - 1) // chunks
    for c in prange(chunks):
        start = min(lo + c * step, hi - 1)
        stop = min(start + step, hi)
        for d in range(dim):
            low = high = coords[d, start]
            for i in range(start + 1, stop):
                low = min(low, coords[d, i])
                high = max(high, coords[d, i])
            lower[c, d] = low
            upper[c, d] = high
    best = 0
    widest = -1.0
    for d in range(dim):
        spread = np.max(upper[:, d]) - np.min(lower[:, d])
        if spread > widest:
            best = d
            widest = spread
    return best


@njit(cache=True)
def _less(coords, idx, a, b, axis):
    """Column a before column b in the total order (coordinate on `axis`, index)."""
    ca = coords[axis, a]
    cb = coords[axis, b]
    return ca < cb or (ca == cb and idx[a] < idx[b])


@njit(cache=True)
def _swap(coords, idx, a, b):
    for d in range(coords.shape[0]):
        coords[d, a], coords[d, b] = coords[d, b], coords[d, a]
    idx[a], idx[b] = idx[b], idx[a]


@njit(cache=True)
def _select(coords, idx, lo, hi, k, axis):
    """Permute columns lo:hi so that lo:k hold the k - lo first ones in the order of `_less`.

    Long runs take as pivot an order statistic of a random sample, aimed a little past k on
    the side of the nearer end of the run: the first pass then halves the run and the next
    one leaves only a sliver around k (about 1.5 passes in all, against about 2.75 for a
    median of three). Pivots only decide the order inside each side, never the sides.
    """
    state = lo * -7046029254386353131 + hi  # any deterministic seed will do
    offsets = np.empty(2 * _BLOCK, dtype=np.int64)
    hi -= 1  # inclusive from here on
    while hi - lo >= _SAMPLED:
        span = hi - lo + 1
        size = int(math.sqrt(span)) | 1
        for t in range(size):
            state = state * _LCG + 1
            _swap(coords, idx, lo + t, lo + t + ((state >> 17) & 0x3FFFFFFFFFFF) % (span - t))
        # The sample places k to about sqrt(size) / 2 ranks; aim two of those past it.
        rank = (k - lo) * size // span
        if k - lo < hi - k:
            rank = min(rank + int(math.sqrt(size)), size - 1)
        else:
            rank = max(rank - int(math.sqrt(size)), 0)
        _select_small(coords, idx, lo, lo + size - 1, lo + rank, axis, state, offsets)
        j = _partition(coords, idx, lo, hi, lo + rank, axis, offsets)
        if j == k:
            return
        if j < k:
            lo = j + 1
        else:
            hi = j - 1
    _select_small(coords, idx, lo, hi, k, axis, state, offsets)


@njit(cache=True)
def _select_small(coords, idx, lo, hi, k, axis, state, offsets):
    """`_select` on the inclusive run lo..hi, with median-of-three pivots.

    Pseudo-random pivots make quadratic inputs unlikely; past a generous round limit the
    rest is heap sorted anyway (n log n bound).
    """
    rounds = 16
    span = hi - lo + 1
    while span:
        rounds += 2
        span >>= 1
    while hi - lo >= _SMALL:
        rounds -= 1
        if rounds < 0:
            _heap_sort(coords, idx, lo, hi + 1, axis)
            return
        span = hi - lo + 1
        state = state * _LCG + 1
        a = lo + ((state >> 17) & 0x3FFFFFFFFFFF) % span
        state = state * _LCG + 1
        b = lo + ((state >> 17) & 0x3FFFFFFFFFFF) % span
        state = state * _LCG + 1
        c = lo + ((state >> 17) & 0x3FFFFFFFFFFF) % span
        if _less(coords, idx, b, a, axis):
            a, b = b, a
        if _less(coords, idx, c, b, axis):
            b = a if _less(coords, idx, c, a, axis) else c
        j = _partition(coords, idx, lo, hi, b, axis, offsets)
        if j == k:
            return
        if j < k:
            lo = j + 1
        else:
            hi = j - 1
    for i in range(lo + 1, hi + 1):
        j = i
        while j > lo and _less(coords, idx, j, j - 1, axis):
            _swap(coords, idx, j, j - 1)
            j -= 1


@njit(cache=True)
def _partition(coords, idx, lo, hi, pivot, axis, offsets):
    """Partition the inclusive run lo..hi around column `pivot`; return its new place.

    Block partitioning (Edelkamp and Weiss' BlockQuicksort): branch-free scans note, per
    block of `_BLOCK` columns from each end, which columns sit on the wrong side, then those
    are swapped in pairs. Random keys make every comparison a coin flip, so this avoids a
    mispredicted branch per column. `offsets` is int64 `(2 * _BLOCK,)` scratch.
    """
    _swap(coords, idx, lo, pivot)
    pivot_c = coords[axis, lo]
    pivot_i = idx[lo]
    left = lo + 1
    right = hi
    num_left = num_right = start_left = start_right = 0
    while right - left + 1 > 2 * _BLOCK:
        if num_left == 0:
            start_left = 0
            for t in range(_BLOCK):
                offsets[num_left] = t
                c = coords[axis, left + t]
                num_left += (c > pivot_c) | ((c == pivot_c) & (idx[left + t] > pivot_i))
        if num_right == 0:
            start_right = 0
            for t in range(_BLOCK):
                offsets[_BLOCK + num_right] = t
                c = coords[axis, right - t]
                num_right += (c < pivot_c) | ((c == pivot_c) & (idx[right - t] < pivot_i))
        num = min(num_left, num_right)
        for t in range(num):
            _swap(coords, idx, left + offsets[start_left + t],
                  right - offsets[_BLOCK + start_right + t])
        num_left -= num
        num_right -= num
        start_left += num
        start_right += num
        # A block moves on once all its misplaced columns are swapped out; the rest of
        # left..right stays unsorted, and a plain Hoare loop finishes it.
        if num_left == 0:
            left += _BLOCK
        if num_right == 0:
            right -= _BLOCK
    i = left
    j = right
    # Keys are distinct, so no other column ties with the pivot.
    while True:
        while i <= j and (coords[axis, i] < pivot_c
                          or (coords[axis, i] == pivot_c and idx[i] < pivot_i)):
            i += 1
        while i <= j and (coords[axis, j] > pivot_c
                          or (coords[axis, j] == pivot_c and idx[j] > pivot_i)):
            j -= 1
        if i >= j:
            break
        _swap(coords, idx, i, j)
        i += 1
        j -= 1
    _swap(coords, idx, lo, j)
    return j


@njit(cache=True)
def _heap_sort(coords, idx, lo, hi, axis):
    """Sort columns lo:hi in the order of `_less` (Numba's own sorts are slow to compile)."""
    n = hi - lo
    for root in range(n // 2 - 1, -1, -1):
        _sift_down(coords, idx, lo, root, n, axis)
    for end in range(n - 1, 0, -1):
        _swap(coords, idx, lo, lo + end)
        _sift_down(coords, idx, lo, 0, end, axis)


@njit(cache=True)
def _sift_down(coords, idx, lo, root, n, axis):
    """Restore the max-heap of columns lo:lo+n below heap node `root`."""
    while 2 * root + 1 < n:
        child = 2 * root + 1
        if child + 1 < n and _less(coords, idx, lo + child, lo + child + 1, axis):
            child += 1
        if not _less(coords, idx, lo + root, lo + child, axis):
            return
        _swap(coords, idx, lo + root, lo + child)
        root = child


# Padding


@njit(cache=True)
def _pad(out, mask, slot, slots, ball_size, blocks):
    """Set mask = out >= 0 on a node's slots, then fill its padding slots (-1) in `out`.

    A padding slot repeats the first real slot of its smallest aligned block holding one.
    The node is an aligned block with a real slot (at most P slots) or a run of P-balls that
    each hold one (contract, invariant 3), so that block lies inside the node.
    """
    unit = min(slots, ball_size)
    for base in range(slot, slot + slots, unit):
        padded = False
        for s in range(base, base + unit):
            mask[s] = out[s] >= 0
            padded |= out[s] < 0
        if not padded:
            continue
        # Heap-ordered blocks of the unit: block 1 is the unit, 2b and 2b + 1 halve block b,
        # block unit + s is slot base + s. `blocks` holds each block's first real slot (or -1),
        # then, top down, that of the smallest enclosing block that has one.
        for s in range(unit):
            blocks[unit + s] = base + s if out[base + s] >= 0 else -1
        for b in range(unit - 1, 0, -1):
            blocks[b] = blocks[2 * b] if blocks[2 * b] >= 0 else blocks[2 * b + 1]
        for b in range(2, 2 * unit):
            if blocks[b] < 0:
                blocks[b] = blocks[b // 2]
        for s in range(unit):
            if out[base + s] < 0:
                out[base + s] = out[blocks[unit + s]]
