"""select_blocks: the top_k most important selection blocks of each query group.

A program per (group, head) streams the compressed keys of the group's cloud in chunks of
whole selection blocks, sums the compressed-attention probabilities of the group's real
queries per selection block, and keeps a running top-k in registers, so the (M x M/c) score
matrix never exists. Candidates are packed into sortable int64 keys
`(importance bits << 31) | (2^31 - 1 - block id)`: importances are >= 0, so their float bits
order like the floats, and equal importances prefer the lower block id, as the contract asks.
A chunk touches the top-k only when one of its keys beats the current k-th; after the first
chunks that is rare, so the merge (repeated max extraction) costs little. That data-dependent
loop keeps the compiler from pipelining the key loop; a straight-line bitonic merge that let it
measured 9% slower on an H100 (bench/triton_sm90.py lists this kernel as unpipelined by choice).
A variant runs one program per group for every head (_select_blocks_heads_kernel), so that the
distance bias between the group's rows and the compressed blocks is computed once, not per head.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    LOG2E,
    _distance,
    _dot,
    _logits,
    _saved_lse2,
    _scaled_logits,
    block_d,
    dot_modes,
    launch_config,
    new_tensor,
)

_ID_BITS = tl.constexpr(2147483647)  # 2^31 - 1: block ids fill the low 31 bits
_NOT_CANDIDATE = tl.constexpr(-4611686018427387904)  # -2^62: below every candidate and placeholder
_UNUSED = tl.constexpr(4611686018427387904)  # 2^62: top-k lanes beyond top_k, never replaced


@triton.jit
def _group_keys(CLOUD_LO, CLOUD_HI, row0, UNIT, EXCL, CS: tl.constexpr):
    """The compressed keys `[lo, hi)` of the cloud of the group starting at slot `row0`, and
    the slots `[excl_lo, excl_hi)` whose selection blocks it may not choose (EXCL > 0: the
    aligned EXCL-block holding the group; else none)."""
    lo = tl.load(CLOUD_LO + row0 // UNIT) // CS
    hi = tl.load(CLOUD_HI + row0 // UNIT) // CS
    excl_lo = row0
    excl_hi = row0
    if EXCL > 0:
        excl_lo = (row0 // EXCL) * EXCL
        excl_hi = excl_lo + EXCL
    return lo, hi, excl_lo, excl_hi


@triton.jit
def _chunk_blocks(start, hi, SBLOCK_REAL, excl_lo, excl_hi, SS: tl.constexpr, R: tl.constexpr,
                  NW: tl.constexpr):
    """The selection blocks `[NW]` of the chunk of compressed keys from `start`, and which of
    them may be chosen (inside the cloud, holding a real slot, not excluded)."""
    blocks = start // R + tl.arange(0, NW)
    blocks_ok = blocks < hi // R
    cand = blocks_ok & (tl.load(SBLOCK_REAL + blocks, mask=blocks_ok, other=0) != 0)
    cand = cand & ~((blocks * SS >= excl_lo) & ((blocks + 1) * SS <= excl_hi))
    return blocks, cand


@triton.jit
def _packed_candidates(colsum, blocks, cand, R: tl.constexpr, NW: tl.constexpr):
    """Sortable int64 candidates `[NW]` from the chunk's probability sums per compressed key."""
    importance = tl.sum(tl.reshape(colsum, (NW, R)), axis=1)
    bits = importance.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(cand, (bits << 31) | (_ID_BITS - blocks), _NOT_CANDIDATE)


@triton.jit
def _topk_insert(top, threshold, packed):
    """Merge a chunk's candidates into the running top-k `top` (its minimum: `threshold`) by
    repeated max extraction; most chunks after the first few do not enter the loop."""
    best = tl.max(packed, axis=0)
    while best > threshold:
        top = tl.where(top == threshold, best, top)
        threshold = tl.min(top, axis=0)
        packed = tl.where(packed == best, _NOT_CANDIDATE, packed)
        best = tl.max(packed, axis=0)
    return top, threshold


@triton.jit
def _topk_placeholders(lanes, TOPK: tl.constexpr):
    """The empty top-k: distinct negative placeholders (so the lane holding the minimum is
    unique) and lanes beyond TOPK that are never replaced."""
    return tl.where(lanes < TOPK, -1 - lanes.to(tl.int64), _UNUSED)


@triton.jit
def _topk_store(top, lanes, OUT, TOPK: tl.constexpr):
    """Write the chosen block ids at OUT[0:TOPK] in ascending order, then -1s."""
    chosen = (top >= 0) & (lanes < TOPK)
    block_ids = _ID_BITS - (top & _ID_BITS)
    # Ascending ids then -1s: each lane's rank among distinct sort values is its output slot.
    order = tl.where(chosen, block_ids, _ID_BITS + 1 + lanes.to(tl.int64))
    rank = tl.sum((order[None, :] < order[:, None]).to(tl.int32), axis=1)
    # Slot j takes the value of the one lane ranked j, gathered here rather than scattered by
    # storing to OUT + rank: a store address computed from loaded data counts, for
    # torch.compile's analysis of what a kernel mutates, as a store into every input that
    # data came from (bench/triton_sm90.py --check).
    value = tl.where(chosen, block_ids, -1)
    slot = tl.sum(tl.where(rank[None, :] == lanes[:, None], value[None, :], 0), axis=1)
    tl.store(OUT + lanes, slot.to(tl.int32), mask=lanes < TOPK)


@triton.jit
def _select_blocks_fwd_kernel(
    Q, KC, LSE, POS, CENTERS, MASK, CBLOCK_REAL, SBLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, OUT,
    H, UNIT, EXCL, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, QROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr, KEYS_AS_ROWS: tl.constexpr,
):
    """One program per (group, head); the group's rows in tiles of QROWS."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    R: tl.constexpr = SS // CS  # compressed blocks per selection block
    NW: tl.constexpr = BLOCK_N // R  # selection blocks per chunk
    row0 = g * GS
    lo, hi, excl_lo, excl_hi = _group_keys(CLOUD_LO, CLOUD_HI, row0, UNIT, EXCL, CS)
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < D
    stride = H * D
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    lanes = tl.arange(0, KP)
    top = _topk_placeholders(lanes, TOPK)
    threshold = tl.min(top, axis=0)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_ok = keys < hi
        kreal = tl.load(CBLOCK_REAL + keys, mask=keys_ok, other=0) != 0
        k = tl.load(KC + keys[:, None] * stride + h * D + dims[None, :],
                    mask=keys_ok[:, None] & dims_ok[None, :], other=0.0)
        colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sub in tl.static_range(0, GS, QROWS):
            r = tl.arange(0, BLOCK_M)
            rows = row0 + sub + r
            rows_ok = r < QROWS
            rreal = tl.load(MASK + rows, mask=rows_ok, other=0) != 0
            q = tl.load(Q + rows[:, None] * stride + h * D + dims[None, :],
                        mask=rows_ok[:, None] & dims_ok[None, :], other=0.0)
            lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
            if KEYS_AS_ROWS:
                # Logits transposed, [keys, rows]: the sum over the group's rows then runs
                # along each key's row of the dot's tile, inside a warp, not across warps.
                st, _ = _logits(k, q, qk_scale, sig, -lse2[None, :], CENTERS, keys, keys_ok, POS, rows,
                                rows_ok, DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
                allowed = kreal[:, None] & rreal[None, :]
                pt = tl.exp2(tl.where(allowed, st, float("-inf")))
                colsum += tl.sum(pt, axis=1)
            else:
                s, _ = _logits(q, k, qk_scale, sig, -lse2[:, None], POS, rows, rows_ok, CENTERS, keys,
                               keys_ok, DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
                allowed = rreal[:, None] & kreal[None, :]
                p = tl.exp2(tl.where(allowed, s, float("-inf")))
                colsum += tl.sum(p, axis=0)
        blocks, cand = _chunk_blocks(start, hi, SBLOCK_REAL, excl_lo, excl_hi, SS, R, NW)
        top, threshold = _topk_insert(top, threshold, _packed_candidates(colsum, blocks, cand, R, NW))
    _topk_store(top, lanes, OUT + (g * H + h) * TOPK, TOPK)


@triton.jit
def _select_blocks_heads_kernel(
    Q, KC, LSE, POS, CENTERS, MASK, CBLOCK_REAL, SBLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, OUT,
    H, UNIT, EXCL, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, HP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """One program per group (GS <= BLOCK_M rows, one tile) for every head: the distances from
    the group's rows to a chunk's compressed-block centers do not depend on the head, so they
    are computed once per chunk and serve all H heads, not once per head (a square root and
    DIM differences per logit; on an H100 this took 7% off the per-head kernel's time at H = 8).
    Logits as [keys, rows], as in the per-head kernel's KEYS_AS_ROWS; the heads' running top-k
    lists are the rows of one `[HP, KP]` tensor."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    g = tl.program_id(0).to(tl.int64)
    R: tl.constexpr = SS // CS
    NW: tl.constexpr = BLOCK_N // R
    row0 = g * GS
    lo, hi, excl_lo, excl_hi = _group_keys(CLOUD_LO, CLOUD_HI, row0, UNIT, EXCL, CS)
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < D
    stride = H * D
    qk_scale = scale * LOG2E
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    rows_ok = r < GS
    rreal = tl.load(MASK + rows, mask=rows_ok, other=0) != 0
    lanes = tl.arange(0, KP)
    heads = tl.arange(0, HP)
    top = tl.where((heads < H)[:, None], _topk_placeholders(lanes, TOPK)[None, :], _UNUSED)
    thresholds = tl.min(top, axis=1)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_ok = keys < hi
        kreal = tl.load(CBLOCK_REAL + keys, mask=keys_ok, other=0) != 0
        allowed = kreal[:, None] & rreal[None, :]
        dist = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if HAS_SIGMA:
            dist = _distance(CENTERS, keys, keys_ok, POS, rows, rows_ok, DIM)
        blocks, cand = _chunk_blocks(start, hi, SBLOCK_REAL, excl_lo, excl_hi, SS, R, NW)
        for h in range(H):
            k = tl.load(KC + keys[:, None] * stride + h * D + dims[None, :],
                        mask=keys_ok[:, None] & dims_ok[None, :], other=0.0)
            q = tl.load(Q + rows[:, None] * stride + h * D + dims[None, :],
                        mask=rows_ok[:, None] & dims_ok[None, :], other=0.0)
            shift = -_saved_lse2(LSE, rows, rows_ok, h, H)[None, :]
            dots = _dot(k, tl.trans(q), FP32_DOT, UPCAST_DOT)
            sig2 = 0.0
            if HAS_SIGMA:
                sig2 = tl.load(SIGMA + h).to(tl.float32) * LOG2E
            st = _scaled_logits(dots, qk_scale, sig2, dist, shift, HAS_SIGMA)
            pt = tl.exp2(tl.where(allowed, st, float("-inf")))
            packed = _packed_candidates(tl.sum(pt, axis=1), blocks, cand, R, NW)
            is_h = heads == h
            threshold = tl.sum(tl.where(is_h, thresholds, 0), axis=0)
            if tl.max(packed, axis=0) > threshold:
                top_h = tl.sum(tl.where(is_h[:, None], top, 0), axis=0)
                top_h, threshold = _topk_insert(top_h, threshold, packed)
                top = tl.where(is_h[:, None], top_h[None, :], top)
                thresholds = tl.where(is_h, threshold, thresholds)
    for h in range(H):
        top_h = tl.sum(tl.where((heads == h)[:, None], top, 0), axis=0)
        _topk_store(top_h, lanes, OUT + (g * H + h) * TOPK, TOPK)


@triton_op("sparseball_triton::select_blocks", mutates_args=())
def select_blocks_op(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, pos: torch.Tensor,
                     centers: torch.Tensor, mask: torch.Tensor, cblock_real: torch.Tensor,
                     sblock_real: torch.Tensor, cloud_lo: torch.Tensor, cloud_hi: torch.Tensor,
                     sigma: torch.Tensor | None, unit: int, compress_size: int, select_size: int,
                     group_size: int, top_k: int, exclude: int, scale: float) -> torch.Tensor:
    M, H, D = q.shape
    out = new_tensor((M // group_size, H, top_k), torch.int32, q.device)
    qrows = min(group_size, 64)
    per_block = select_size // compress_size
    # BLOCK_N compressed keys per chunk: whole selection blocks (a multiple of per_block).
    # keys_as_rows: the transposed logits (see the kernel); measured for 16-bit inputs at
    # D <= 64 only, so the other cases keep the row-major logits. heads_inside: one program
    # per group for every head (_select_blocks_heads_kernel; groups of one row tile only), so
    # the distance bias is computed once for all heads: measured with sigma only.
    if q.dtype == torch.float32 or D > 64:
        default = dict(block_n=64, warps=8, stages=1 if q.dtype == torch.float32 else 2,
                       keys_as_rows=False, heads_inside=False)
    elif sigma is not None:  # bench/triton_tune.py on an H100 (2026-11-23), 256k points:
        # 14.4 -> 13.4 ms (bench/results/triton_tune_h100_heads.json)
        default = dict(block_n=128, warps=4, stages=2, keys_as_rows=True, heads_inside=True)
    else:  # bench/triton_tune.py on an H100 (2026-11-23), 256k points: 28.8 -> 22.3 ms (tiles),
        # -> 14.3 ms (keys as rows; bench/results/triton_tune_h100_second.json)
        default = dict(block_n=128, warps=4, stages=1, keys_as_rows=True, heads_inside=False)
    cfg = launch_config("select_blocks", default)
    args = (q, k_cmp, lse, pos, centers, mask, cblock_real, sblock_real, cloud_lo, cloud_hi,
            q if sigma is None else sigma, out, H, unit, exclude, scale)
    constants = dict(D=D, DIM=pos.shape[1], CS=compress_size, SS=select_size, GS=group_size, TOPK=top_k,
                     KP=max(16, triton.next_power_of_2(top_k)), BLOCK_M=max(qrows, 16),
                     BLOCK_N=max(cfg["block_n"], per_block), BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
                     **dot_modes(q.dtype), num_warps=cfg["warps"], num_stages=cfg["stages"])
    if cfg["heads_inside"] and group_size == qrows:
        wrap_triton(_select_blocks_heads_kernel)[(M // group_size,)](
            *args, HP=triton.next_power_of_2(H), **constants)
    else:
        wrap_triton(_select_blocks_fwd_kernel)[(M // group_size, H)](
            *args, QROWS=qrows, KEYS_AS_ROWS=cfg["keys_as_rows"], **constants)
    return out
