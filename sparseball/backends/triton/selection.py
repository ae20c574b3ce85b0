"""Selection attention: the queries of a group attend to the key blocks the group selected.

Forward and dq: a program owns up to 64 rows of one group (padded to 16 for tl.dot, so tiles
stay tensor-core sized even with one head) and streams its selected blocks with an online
softmax.

dk, dv without float atomics and bitwise deterministic: the selection is inverted into, per
(key block, head), the ascending list of groups that chose it (a CSR built with a stable sort
and searchsorted), and a program per (key chunk, head) walks that list, recomputing the
probabilities from the saved lse. The dq kernel runs first; for half inputs it forms the exact
delta and stores it for the dk/dv kernel.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._layout import invert_selection
from ._common import (
    LOG2E,
    _dot,
    _dot_split,
    _dq_exact_delta_finish,
    _dq_exact_delta_step,
    _head_tile,
    _logits,
    _online_softmax_finish,
    _online_softmax_step,
    _real_key_rows,
    _real_slots,
    _saved_lse2,
    attention_bwd_delta,
    block_d,
    dot_modes,
    launch_config,
    launch_options,
    new_tensor,
    output_for_backward,
)


@triton.jit
def _selection_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS, sig, qk_scale,
                     DIM: tl.constexpr, HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr,
                     UPCAST_DOT: tl.constexpr):
    """Probabilities [rows, keys of one selected block] recomputed from the saved lse (log2
    domain), and the distances when sigma is on (else 0)."""
    s, dist = _logits(q, k, qk_scale, sig * LOG2E, -lse2[:, None], POS, rows, rows_ok, POS, keys, keys_ok,
                      DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
    # Rows padding the tile (small groups) have lse 0: exp2 of their logits could overflow
    # and turn the sigma partial sums into NaN, so they are masked too.
    allowed = real[None, :] & rows_ok[:, None]
    p = tl.exp2(tl.where(allowed, s, float("-inf")))
    return p, dist


@triton.jit
def _selected_keys(IDX, MASK, K, V, group, h, H, TOPK, t, sub: tl.constexpr, SS: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   REAL_K: tl.constexpr, HAS_PADDING: tl.constexpr):
    """Keys `sub .. sub + BLOCK_N` of the `t`-th block group `group` selected for head `h`:
    their slots, which are in use, which are real, and their K and V tiles (V, and K where
    REAL_K, as `_real_key_rows`). A -1 (no block) is masked rather than branched on, so the
    loops stay straight-line code the compiler can software-pipeline."""
    blk = tl.load(IDX + (group * H + h) * TOPK + t).to(tl.int64)
    kk = sub + tl.arange(0, BLOCK_N)
    keys = tl.maximum(blk, 0) * SS + kk
    keys_ok = kk < tl.where(blk >= 0, SS, 0)  # the keys of a block in use
    real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
    kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
    if REAL_K:
        k = _real_key_rows(K, kv_offs, kv_ok, real, HAS_PADDING)
    else:
        k = tl.load(K + kv_offs, mask=kv_ok, other=0.0)
    v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
    return keys, keys_ok, real, k, v


@triton.jit
def _selection_attention_fwd_kernel(
    Q, K, V, POS, MASK, IDX, SIGMA, O, LSE,
    M, H, TOPK, scale,
    D: tl.constexpr, DIM: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * ROWS
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    rows_ok = (r < ROWS) & (rows < M)
    group = row0 // GS
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(TOPK):
        for sub in tl.static_range(0, SS, BLOCK_N):
            keys, keys_ok, real, k, v = _selected_keys(IDX, MASK, K, V, group, h, H, TOPK, t, sub,
                                                       SS, D, BLOCK_N, BLOCK_D, False,
                                                       HAS_PADDING)
            s, _ = _logits(q, k, qk_scale, sig, 0.0, POS, rows, rows_ok, POS, keys, keys_ok, DIM, HAS_SIGMA,
                           FP32_DOT, UPCAST_DOT)
            s = tl.where(real[None, :], s, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    out, lse = _online_softmax_finish(m_i, l_i, acc)
    tl.store(O + q_offs, out.to(O.dtype.element_ty), mask=q_ok)
    tl.store(LSE + rows * H + h, lse, mask=rows_ok)


@triton.jit
def _selection_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, POS, MASK, IDX, SIGMA, DQ, DSIGMA,
    M, H, TOPK, scale,
    D: tl.constexpr, DIM: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr, ROWS: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """EXACT_DELTA: form delta_i = sum_j P_ij dP_ij in the same pass as dq and store it for the
    dk/dv kernel; otherwise DELTA holds dO_i . O_i already."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * ROWS
    r = tl.arange(0, BLOCK_M)
    rows = row0 + r
    rows_ok = (r < ROWS) & (rows < M)
    group = row0 // GS
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
    lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
    qk_scale = scale * LOG2E
    sig = 0.0
    dsig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32)
        dsig = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if EXACT_DELTA:
        delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        pdist = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        delta = tl.load(DELTA + rows * H + h, mask=rows_ok, other=0.0)
    for t in range(TOPK):
        for sub in tl.static_range(0, SS, BLOCK_N):
            keys, keys_ok, real, k, v = _selected_keys(IDX, MASK, K, V, group, h, H, TOPK, t, sub,
                                                       SS, D, BLOCK_N, BLOCK_D, True,
                                                       HAS_PADDING)
            p, dist = _selection_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS,
                                       sig, qk_scale, DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
            dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
            if EXACT_DELTA:
                dq, pk, delta, dsig, pdist = _dq_exact_delta_step(p, dp, dist, k, dq, pk, delta, dsig, pdist,
                                                                  HAS_SIGMA, FP32_DOT, UPCAST_DOT,
                                                                  SPLIT_DOT)
            else:
                ds = p * (dp - delta[:, None])
                dq += _dot_split(ds, k, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
                if HAS_SIGMA:
                    dsig += tl.sum(ds * dist, axis=1)
    if EXACT_DELTA:
        dq, dsig = _dq_exact_delta_finish(dq, pk, delta, dsig, pdist, HAS_SIGMA)
        tl.store(DELTA + rows * H + h, delta, mask=rows_ok)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)
    if HAS_SIGMA:
        tl.store(DSIGMA + h * tl.num_programs(0) + pid, tl.sum(dsig, axis=0))


@triton.jit
def _selection_attention_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, POS, MASK, SIGMA, ROW_PTR, GROUPS, DK, DV,
    M, H, NB, scale,
    D: tl.constexpr, DIM: tl.constexpr, SS: tl.constexpr, GS: tl.constexpr,
    KROWS: tl.constexpr, QROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    key0 = pid.to(tl.int64) * KROWS
    kr = tl.arange(0, BLOCK_N)
    keys = key0 + kr
    keys_ok = (kr < KROWS) & (keys < M)
    real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
    kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
    k = _real_key_rows(K, kv_offs, kv_ok, real, HAS_PADDING)
    v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
    blk = key0 // SS
    first = tl.load(ROW_PTR + h * NB + blk)
    last = tl.load(ROW_PTR + h * NB + blk + 1)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # Groups come in ascending order, so the sums below have a fixed order: deterministic.
    for e in range(first, last):
        group = tl.load(GROUPS + e).to(tl.int64)
        for sub in tl.static_range(0, GS, QROWS):
            r = tl.arange(0, BLOCK_M)
            rows = group * GS + sub + r
            rows_ok = r < QROWS
            q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
            q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
            do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
            delta = tl.load(DELTA + rows * H + h, mask=rows_ok, other=0.0)
            lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
            # Transposed logits [keys, queries]: the accumulators are per key.
            st, _ = _logits(k, q, qk_scale, sig, -lse2[None, :], POS, keys, keys_ok, POS, rows, rows_ok, DIM,
                            HAS_SIGMA, FP32_DOT, UPCAST_DOT)
            allowed = real[:, None] & rows_ok[None, :]
            pt = tl.exp2(tl.where(allowed, st, float("-inf")))
            dv += _dot_split(pt, do, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
            dpt = _dot(v, tl.trans(do), FP32_DOT, UPCAST_DOT)
            dst = pt * (dpt - delta[None, :])
            dk += _dot_split(dst, q, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    tl.store(DK + kv_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_ok)


def _config(select_size: int, group_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and (num_warps, num_stages[, maxnreg]) per kernel (`launch_options`), picked from
    sm_90 register and spill reports of the compiled kernels."""
    rows = min(group_size, 64)
    key_rows = min(select_size, 64)
    tiles = dict(rows=rows, block_m=max(rows, 16), key_rows=key_rows, block_n=max(key_rows, 16))
    if dtype == torch.float32:
        launch = dict(fwd=(8 if head_dim > 64 else 4, 1), dq=(8 if head_dim > 64 else 4, 1), dkv=(8, 1))
    elif head_dim > 64:
        launch = dict(fwd=(8, 2), dq=(8, 2), dkv=(8, 2))
    else:  # bench/triton_tune.py on an H100 (2026-11-23), 1M points: fwd+bwd 130 -> ~90 ms;
        # on an H200 (2026-11-30) dq with 2 stages: 86.1 -> 83.7 ms; still the best for the
        # one-pass dq kernel (69.5 ms; bench/results/triton_tune_h200_onepass.json). The
        # forward capped at 168 registers (three programs per SM, not two): 15.85 -> 14.68 ms
        # on an H200 (2026-12-01, bench/results/triton_tune_h200_caps.json). Under
        # torch.compile inductor drops the cap (its launcher keeps warps and stages only).
        launch = dict(fwd=(4, 3, 168), dq=(4, 2), dkv=(4, 2))
    config = launch_config("selection", {**tiles, **launch})
    # A program's query rows share one group's selection and its key rows lie in one block,
    # whatever an override asks for: tiles are cut to them (and blocks hold their tiles).
    rows, key_rows = min(config["rows"], group_size), min(config["key_rows"], select_size)
    return {**config, "rows": rows, "key_rows": key_rows,
            "block_m": max(config["block_m"], rows), "block_n": max(config["block_n"], key_rows)}


@triton_op("sparseball_triton::selection_attention", mutates_args=())
def selection_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                           mask: torch.Tensor | None, indices: torch.Tensor,
                           sigma: torch.Tensor | None,
                           select_size: int, group_size: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    out = new_tensor((M, H, D), q.dtype, q.device)
    lse = new_tensor((M, H), torch.float32, q.device)
    cfg = _config(select_size, group_size, D, q.dtype)
    wrap_triton(_selection_attention_fwd_kernel)[(M // cfg["rows"], H)](
        q, k, v, pos, q if mask is None else mask, indices, q if sigma is None else sigma, out, lse,
        M, H, indices.shape[2], scale,
        D=D, DIM=pos.shape[1], SS=select_size, GS=group_size, ROWS=cfg["rows"],
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=block_d(D),
        HAS_SIGMA=sigma is not None, HAS_PADDING=mask is not None, **dot_modes(q.dtype),
        **launch_options(*cfg["fwd"]),
    )
    return out, lse


@triton_op("sparseball_triton::selection_attention_bwd", mutates_args=())
def selection_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor | None, lse: torch.Tensor, pos: torch.Tensor,
    mask: torch.Tensor | None, indices: torch.Tensor, sigma: torch.Tensor | None,
    select_size: int, group_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    exact_delta = out is None  # the forward kept no output: form the exact delta
    # Exact: the dq kernel forms delta and stores it here for the dk/dv kernel.
    delta = new_tensor((M, H), torch.float32, q.device) if exact_delta else attention_bwd_delta(out, dout)
    dq = new_tensor((M, H, D), q.dtype, q.device)
    dk = new_tensor((M, H, D), q.dtype, q.device)
    dv = new_tensor((M, H, D), q.dtype, q.device)
    cfg = _config(select_size, group_size, D, q.dtype)
    grid_q = (M // cfg["rows"], H)
    partial = new_tensor((H, grid_q[0]), torch.float32, q.device)
    sig = q if sigma is None else sigma
    msk = q if mask is None else mask
    common = dict(D=D, DIM=pos.shape[1], SS=select_size, GS=group_size, BLOCK_M=cfg["block_m"],
                  BLOCK_N=cfg["block_n"], BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
                  HAS_PADDING=mask is not None, **dot_modes(q.dtype))
    wrap_triton(_selection_attention_bwd_dq_kernel)[grid_q](
        q, k, v, dout, lse, delta, pos, msk, indices, sig, dq, partial,
        M, H, indices.shape[2], scale, ROWS=cfg["rows"], EXACT_DELTA=exact_delta,
        **launch_options(*cfg["dq"]), **common)
    num_blocks = M // select_size
    row_ptr, groups = invert_selection(indices, num_blocks)
    wrap_triton(_selection_attention_bwd_dkv_kernel)[(M // cfg["key_rows"], H)](
        q, k, v, dout, lse, delta, pos, msk, sig, row_ptr, groups, dk, dv,
        M, H, num_blocks, scale, KROWS=cfg["key_rows"], QROWS=cfg["rows"],
        **launch_options(*cfg["dkv"]), **common)
    dsigma = q.new_zeros((0,)) if sigma is None else partial.sum(1).to(sigma.dtype)
    return dq, dk, dv, dsigma


def _selection_setup_context(ctx, inputs, output):
    q, k, v, pos, mask, indices, sigma, select_size, group_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, output_for_backward(out, q.dtype), lse, pos, mask, indices,
                          sigma)
    ctx.sizes = (select_size, group_size, scale)
    ctx.mark_non_differentiable(lse)


def _selection_backward(ctx, dout, dlse):
    q, k, v, out, lse, pos, mask, indices, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = selection_attention_bwd_op(
        dout.contiguous(), q, k, v, out, lse, pos, mask, indices, sigma, *ctx.sizes)
    return (dq, dk, dv, None, None, None, dsigma if sigma is not None else None,
            None, None, None)


selection_attention_op.register_autograd(_selection_backward, setup_context=_selection_setup_context)
