"""select_blocks: the top_k most important selection blocks of each query group.

A program per (group, head) streams the compressed keys of the group's cloud in chunks of
whole selection blocks, sums the compressed-attention probabilities of the group's real
queries per selection block, and keeps a running top-k in registers, so the (M x M/c) score
matrix never exists. Candidates are packed into sortable int64 keys
`(importance bits << 31) | (2^31 - 1 - block id)`: importances are >= 0, so their float bits
order like the floats, and equal importances prefer the lower block id, as the contract asks.
Each chunk's candidates merge into the top-k by bitonic sorts: straight-line code, so the key
loop stays an innermost loop that the compiler software-pipelines (an earlier data-dependent
insertion loop inside it left every chunk's key load unhidden; see `_merge_top`).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    LOG2E,
    _head_tile,
    _logits,
    _saved_lse2,
    block_d,
    dot_modes,
    launch_config,
    new_tensor,
)

_ID_BITS = tl.constexpr(2147483647)  # 2^31 - 1: block ids fill the low 31 bits
_NOT_CANDIDATE = tl.constexpr(-4611686018427387904)  # -2^62: below every candidate (>= 0)


@triton.jit
def _merge_top(top, packed, KP: tl.constexpr, NW: tl.constexpr):
    """The KP largest of `top` (KP keys, descending) and `packed` (NW keys), descending.

    Straight-line code (bitonic sorts of KP or NW lanes), so that the key loop around it has
    no inner loop: the compiler pipelines only innermost loops, and a data-dependent insertion
    loop here had stopped it (sm_90 builds showed no asynchronous copies for the key tiles).
    """
    if NW >= KP:
        best = tl.sort(packed, descending=True)
        # Row 0 of the (NW / KP, KP) view holds the KP largest: each column's maximum.
        best = tl.max(tl.reshape(best, (NW // KP, KP)), axis=0)
    else:
        first = tl.arange(0, KP // NW)[:, None] == 0
        best = tl.reshape(tl.where(first, packed[None, :], _NOT_CANDIDATE), (KP,))
    # Bitonic half-cleaner: `top` descending against `best` ascending, the lane-wise maxima
    # are the KP largest of the two.
    return tl.sort(tl.maximum(top, tl.sort(best)), descending=True)


@triton.jit
def _select_blocks_fwd_kernel(
    Q, KC, LSE, POS, CENTERS, MASK, CBLOCK_REAL, SBLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, OUT,
    H, UNIT, EXCL, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr,
    TOPK: tl.constexpr, KP: tl.constexpr, QROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    R: tl.constexpr = SS // CS  # compressed blocks per selection block
    NW: tl.constexpr = BLOCK_N // R  # selection blocks per chunk
    row0 = g * GS
    lo = tl.load(CLOUD_LO + row0 // UNIT) // CS
    hi = tl.load(CLOUD_HI + row0 // UNIT) // CS
    # Excluded: selection blocks inside the aligned EXCL-block holding the group (0: none).
    excl_lo = row0
    excl_hi = row0
    if EXCL > 0:
        excl_lo = (row0 // EXCL) * EXCL
        excl_hi = excl_lo + EXCL
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    lanes = tl.arange(0, KP)
    top = tl.full((KP,), _NOT_CANDIDATE, tl.int64)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_ok = keys < hi
        kreal = tl.load(CBLOCK_REAL + keys, mask=keys_ok, other=0) != 0
        k_offs, k_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = tl.load(KC + k_offs, mask=k_ok, other=0.0)
        colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sub in tl.static_range(0, GS, QROWS):
            r = tl.arange(0, BLOCK_M)
            rows = row0 + sub + r
            rows_ok = r < QROWS
            rreal = tl.load(MASK + rows, mask=rows_ok, other=0) != 0
            q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
            q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
            lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
            s, _ = _logits(q, k, qk_scale, sig, POS, rows, rows_ok, CENTERS, keys, keys_ok, DIM, HAS_SIGMA,
                           FP32_DOT, UPCAST_DOT)
            allowed = rreal[:, None] & kreal[None, :]
            p = tl.exp2(tl.where(allowed, s - lse2[:, None], float("-inf")))
            colsum += tl.sum(p, axis=0)
        importance = tl.sum(tl.reshape(colsum, (NW, R)), axis=1)
        blocks = start // R + tl.arange(0, NW)
        blocks_ok = blocks < hi // R
        cand = blocks_ok & (tl.load(SBLOCK_REAL + blocks, mask=blocks_ok, other=0) != 0)
        cand = cand & ~((blocks * SS >= excl_lo) & ((blocks + 1) * SS <= excl_hi))
        bits = importance.to(tl.int32, bitcast=True).to(tl.int64)
        packed = tl.where(cand, (bits << 31) | (_ID_BITS - blocks), _NOT_CANDIDATE)
        # After the first chunks few candidates beat the current k-th: merge only then.
        if tl.max(packed, axis=0) > tl.min(top, axis=0):
            top = _merge_top(top, packed, KP, NW)
    chosen = (top >= 0) & (lanes < TOPK)
    block_ids = _ID_BITS - (top & _ID_BITS)
    # Ascending ids then -1s: each lane's rank among distinct sort values is its output slot.
    order = tl.where(chosen, block_ids, _ID_BITS + 1 + lanes.to(tl.int64))
    rank = tl.sum((order[None, :] < order[:, None]).to(tl.int32), axis=1)
    tl.store(OUT + (g * H + h) * TOPK + rank, tl.where(chosen, block_ids, -1).to(tl.int32),
             mask=rank < TOPK)


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
    if q.dtype == torch.float32 or D > 64:
        default = dict(block_n=64, warps=8, stages=1 if q.dtype == torch.float32 else 2)
    else:  # bench/triton_tune.py on an H100 (2026-11-23), 256k points: 28.8 -> 22.3 ms
        default = dict(block_n=128, warps=4, stages=2)
    cfg = launch_config("select_blocks", default)
    wrap_triton(_select_blocks_fwd_kernel)[(M // group_size, H)](
        q, k_cmp, lse, pos, centers, mask, cblock_real, sblock_real, cloud_lo, cloud_hi,
        q if sigma is None else sigma, out,
        H, unit, exclude, scale,
        D=D, DIM=pos.shape[1], CS=compress_size, SS=select_size, GS=group_size,
        TOPK=top_k, KP=max(16, triton.next_power_of_2(top_k)), QROWS=qrows,
        BLOCK_M=max(qrows, 16), BLOCK_N=max(cfg["block_n"], per_block), BLOCK_D=block_d(D),
        HAS_SIGMA=sigma is not None, **dot_modes(q.dtype),
        num_warps=cfg["warps"], num_stages=cfg["stages"],
    )
    return out
