"""Compression (block means) and compressed attention.

Compressed attention is FlashAttention over the compressed keys of each query's cloud. Clouds
are contiguous slot ranges whose length is a multiple of P, so the key range of a row is
found from the tree's cloud of its aligned P-block. A tile of rows (or of compressed keys)
lies in one cloud when P covers it (SINGLE_CLOUD); otherwise every element is masked by its
own row's range, which costs registers.

Backward is FlashAttention-2 style without atomics: one kernel per query tile for dq (and the
sigma partial sums; for half inputs it first forms the exact delta and stores it), then one
per compressed-key tile for dk_cmp, dv_cmp, streaming the queries of that key's cloud.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

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
    new_tensor,
    output_for_backward,
)


@triton.jit
def _compress_fwd_kernel(X, MASK, OUT, HD, CS: tl.constexpr, BLOCK_HD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    cols_ok = cols < HD
    slots = b * CS + tl.arange(0, CS)
    real = tl.load(MASK + slots) != 0
    x = tl.load(X + slots[:, None] * HD + cols[None, :], mask=real[:, None] & cols_ok[None, :],
                other=0.0).to(tl.float32)
    count = tl.sum(real.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / tl.maximum(count, 1.0)
    tl.store(OUT + b * HD + cols, mean.to(OUT.dtype.element_ty), mask=cols_ok)


@triton.jit
def _compress_bwd_kernel(DOUT, MASK, DX, HD, CS: tl.constexpr, BLOCK_HD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    cols_ok = cols < HD
    slots = b * CS + tl.arange(0, CS)
    real = tl.load(MASK + slots) != 0
    count = tl.sum(real.to(tl.float32), axis=0)
    g = tl.load(DOUT + b * HD + cols, mask=cols_ok, other=0.0).to(tl.float32) / tl.maximum(count, 1.0)
    dx = tl.where(real[:, None], g[None, :], 0.0)
    tl.store(DX + slots[:, None] * HD + cols[None, :], dx.to(DX.dtype.element_ty),
             mask=cols_ok[None, :])


def _compress_grid(M: int, HD: int, compress_size: int) -> tuple[tuple[int, int], int]:
    block_hd = min(triton.next_power_of_2(HD), max(16, 8192 // compress_size))
    return (M // compress_size, triton.cdiv(HD, block_hd)), block_hd


@triton_op("sparseball_triton::compress", mutates_args=())
def compress_op(x: torch.Tensor, mask: torch.Tensor, compress_size: int) -> torch.Tensor:
    M, H, D = x.shape
    out = new_tensor((M // compress_size, H, D), x.dtype, x.device)
    grid, block_hd = _compress_grid(M, H * D, compress_size)
    wrap_triton(_compress_fwd_kernel)[grid](x, mask, out, H * D, CS=compress_size, BLOCK_HD=block_hd)
    return out


@triton_op("sparseball_triton::compress_bwd", mutates_args=())
def compress_bwd_op(dout: torch.Tensor, mask: torch.Tensor, compress_size: int) -> torch.Tensor:
    Mc, H, D = dout.shape
    dx = new_tensor((Mc * compress_size, H, D), dout.dtype, dout.device)
    grid, block_hd = _compress_grid(Mc * compress_size, H * D, compress_size)
    wrap_triton(_compress_bwd_kernel)[grid](dout, mask, dx, H * D, CS=compress_size, BLOCK_HD=block_hd)
    return dx


def _compress_setup_context(ctx, inputs, output):
    _, mask, compress_size = inputs
    ctx.save_for_backward(mask)
    ctx.compress_size = compress_size


def _compress_backward(ctx, dout):
    (mask,) = ctx.saved_tensors
    return compress_bwd_op(dout.contiguous(), mask, ctx.compress_size), None, None


compress_op.register_autograd(_compress_backward, setup_context=_compress_setup_context)


@triton.jit
def _row_key_range(CLOUD_LO, CLOUD_HI, rows, rows_ok, UNIT, CS: tl.constexpr):
    """Per row: compressed-key range [lo, hi) of its cloud; and the union over the tile."""
    unit = rows // UNIT
    lo = tl.load(CLOUD_LO + unit, mask=rows_ok, other=0) // CS
    hi = tl.load(CLOUD_HI + unit, mask=rows_ok, other=0) // CS
    tile_lo = tl.min(tl.where(rows_ok, lo, 9223372036854775807), axis=0)
    tile_hi = tl.max(tl.where(rows_ok, hi, 0), axis=0)
    return lo, hi, tile_lo, tile_hi


@triton.jit
def _compressed_attention_fwd_kernel(
    Q, KC, VC, POS, CENTERS, BLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, O, LSE,
    M, H, UNIT, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SINGLE_CLOUD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    lo, hi, tile_lo, tile_hi = _row_key_range(CLOUD_LO, CLOUD_HI, rows, rows_ok, UNIT, CS)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(tile_lo, tile_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_ok = keys < tile_hi
        real = _real_slots(BLOCK_REAL, keys, keys_ok, HAS_PADDING)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = tl.load(KC + kv_offs, mask=kv_ok, other=0.0)
        v = _real_key_rows(VC, kv_offs, kv_ok, real, HAS_PADDING)
        s, _ = _logits(q, k, qk_scale, sig, 0.0, POS, rows, rows_ok, CENTERS, keys, keys_ok, DIM, HAS_SIGMA,
                       FP32_DOT, UPCAST_DOT)
        allowed = real[None, :]
        if not SINGLE_CLOUD:
            allowed = allowed & (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    out, lse = _online_softmax_finish(m_i, l_i, acc)
    tl.store(O + q_offs, out.to(O.dtype.element_ty), mask=q_ok)
    tl.store(LSE + rows * H + h, lse, mask=rows_ok)


@triton.jit
def _compressed_probs(q, k, rows, rows_ok, keys, keys_ok, lo, hi, real, lse2, POS, CENTERS, sig,
                      qk_scale, DIM: tl.constexpr, SINGLE_CLOUD: tl.constexpr,
                      HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Probabilities [rows, compressed keys] recomputed from the saved lse (log2 domain), and
    the distances when sigma is on (else 0)."""
    s, dist = _logits(q, k, qk_scale, sig * LOG2E, -lse2[:, None], POS, rows, rows_ok, CENTERS, keys, keys_ok,
                      DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
    allowed = real[None, :]
    if not SINGLE_CLOUD:
        allowed = allowed & (keys[None, :] >= lo[:, None]) & (keys[None, :] < hi[:, None])
    p = tl.exp2(tl.where(allowed, s, float("-inf")))
    return p, dist


@triton.jit
def _compressed_attention_bwd_dq_kernel(
    Q, KC, VC, DO, LSE, DELTA, POS, CENTERS, BLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, DQ, DSIGMA,
    M, H, UNIT, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SINGLE_CLOUD: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """EXACT_DELTA: form delta_i = sum_j P_ij dP_ij in the same pass as dq
    (`_dq_exact_delta_step`) and store it for the dk/dv kernel; otherwise DELTA holds
    dO_i . O_i already."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
    lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
    lo, hi, tile_lo, tile_hi = _row_key_range(CLOUD_LO, CLOUD_HI, rows, rows_ok, UNIT, CS)
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
    for start in range(tile_lo, tile_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        keys_ok = keys < tile_hi
        real = _real_slots(BLOCK_REAL, keys, keys_ok, True)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = _real_key_rows(KC, kv_offs, kv_ok, real, True)
        v = _real_key_rows(VC, kv_offs, kv_ok, real, True)
        p, dist = _compressed_probs(q, k, rows, rows_ok, keys, keys_ok, lo, hi, real, lse2,
                                    POS, CENTERS, sig, qk_scale, DIM, SINGLE_CLOUD,
                                    HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
        if EXACT_DELTA:
            dq, pk, delta, dsig, pdist = _dq_exact_delta_step(p, dp, dist, k, dq, pk, delta, dsig, pdist,
                                                              HAS_SIGMA, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
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
def _compressed_attention_bwd_dkv_kernel(
    Q, KC, VC, DO, LSE, DELTA, POS, CENTERS, BLOCK_REAL, CLOUD_LO, CLOUD_HI, SIGMA, DKC, DVC,
    MC, H, UNIT, scale,
    D: tl.constexpr, DIM: tl.constexpr, CS: tl.constexpr, SINGLE_CLOUD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    keys = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    keys_ok = keys < MC
    real = _real_slots(BLOCK_REAL, keys, keys_ok, True)
    kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
    k = _real_key_rows(KC, kv_offs, kv_ok, real, True)
    v = _real_key_rows(VC, kv_offs, kv_ok, real, True)
    # Slot range of each key's cloud: its queries.
    unit = (keys * CS) // UNIT
    lo = tl.load(CLOUD_LO + unit, mask=keys_ok, other=0)
    hi = tl.load(CLOUD_HI + unit, mask=keys_ok, other=0)
    tile_lo = tl.min(tl.where(keys_ok, lo, 9223372036854775807), axis=0)
    tile_hi = tl.max(tl.where(keys_ok, hi, 0), axis=0)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(tile_lo, tile_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rows_ok = rows < tile_hi
        q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
        q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
        do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + rows * H + h, mask=rows_ok, other=0.0)
        lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
        # Transposed logits [keys, queries]: the accumulators are per key.
        st, _ = _logits(k, q, qk_scale, sig, -lse2[None, :], CENTERS, keys, keys_ok, POS, rows, rows_ok, DIM,
                        HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        allowed = real[:, None]
        if not SINGLE_CLOUD:
            allowed = allowed & (rows[None, :] >= lo[:, None]) & (rows[None, :] < hi[:, None])
        pt = tl.exp2(tl.where(allowed, st, float("-inf")))
        dv += _dot_split(pt, do, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
        dpt = _dot(v, tl.trans(do), FP32_DOT, UPCAST_DOT)
        dst = pt * (dpt - delta[None, :])
        dk += _dot_split(dst, q, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    tl.store(DKC + kv_offs, (dk * scale).to(DKC.dtype.element_ty), mask=kv_ok)
    tl.store(DVC + kv_offs, dv.to(DVC.dtype.element_ty), mask=kv_ok)


def _attn_config(head_dim: int, dtype: torch.dtype) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. Half inputs at D <= 64: the best
    of bench/triton_tune.py's sweep on an H100 (2026-11-23, 256k points, compress 64: forward
    45 -> 13 ms, backward 147 -> 58 ms against the earlier (64, 64, 8 warps)); D = 128 and
    float32 from sm_90 register and spill reports of the compiled kernels."""
    if dtype == torch.float32:
        same = (64, 32 if head_dim > 64 else 64, 4, 1)
        config = dict(fwd=same, dq=same, dkv=same)
    elif head_dim > 64:
        config = dict(fwd=(64, 64, 8, 2), dq=(64, 64, 4, 1), dkv=(64, 64, 8, 2))
    else:
        # dq: the one-pass kernel on an H200 (2026-11-30, 256k points): backward 55.8 ms with
        # the two-pass kernel, 50.9 one-pass at 2 stages, 47.8 at 1
        # (bench/results/triton_tune_h200_compressed_dq.json)
        config = dict(fwd=(64, 128, 4, 2), dq=(64, 64, 4, 1), dkv=(64, 64, 4, 2))
    return launch_config("compressed", config)


@triton_op("sparseball_triton::compressed_attention", mutates_args=())
def compressed_attention_op(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                            pos: torch.Tensor, centers: torch.Tensor,
                            block_real: torch.Tensor | None,
                            cloud_lo: torch.Tensor, cloud_hi: torch.Tensor,
                            sigma: torch.Tensor | None, unit: int, compress_size: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    out = new_tensor((M, H, D), q.dtype, q.device)
    lse = new_tensor((M, H), torch.float32, q.device)
    block_m, block_n, warps, stages = _attn_config(D, q.dtype)["fwd"]
    wrap_triton(_compressed_attention_fwd_kernel)[(triton.cdiv(M, block_m), H)](
        q, k_cmp, v_cmp, pos, centers, q if block_real is None else block_real, cloud_lo,
        cloud_hi, q if sigma is None else sigma, out, lse,
        M, H, unit, scale,
        D=D, DIM=pos.shape[1], CS=compress_size, SINGLE_CLOUD=unit % block_m == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
        HAS_PADDING=block_real is not None, **dot_modes(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


@triton_op("sparseball_triton::compressed_attention_bwd", mutates_args=())
def compressed_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
    out: torch.Tensor | None, lse: torch.Tensor, pos: torch.Tensor, centers: torch.Tensor,
    block_real: torch.Tensor, cloud_lo: torch.Tensor, cloud_hi: torch.Tensor,
    sigma: torch.Tensor | None, unit: int, compress_size: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    Mc = k_cmp.shape[0]
    exact_delta = out is None  # the forward kept no output: form the exact delta
    # Exact: the dq kernel forms delta and stores it here for the dk/dv kernel.
    delta = new_tensor((M, H), torch.float32, q.device) if exact_delta else attention_bwd_delta(out, dout)
    dq = new_tensor((M, H, D), q.dtype, q.device)
    dk = new_tensor((Mc, H, D), q.dtype, q.device)
    dv = new_tensor((Mc, H, D), q.dtype, q.device)
    cfg = _attn_config(D, q.dtype)
    dq_m, dq_n, dq_warps, dq_stages = cfg["dq"]
    kv_m, kv_n, kv_warps, kv_stages = cfg["dkv"]
    grid_q = (triton.cdiv(M, dq_m), H)
    partial = new_tensor((H, grid_q[0]), torch.float32, q.device)
    sig = q if sigma is None else sigma
    common = dict(D=D, DIM=pos.shape[1], CS=compress_size, BLOCK_D=block_d(D),
                  HAS_SIGMA=sigma is not None, **dot_modes(q.dtype))
    wrap_triton(_compressed_attention_bwd_dq_kernel)[grid_q](
        q, k_cmp, v_cmp, dout, lse, delta, pos, centers, block_real, cloud_lo, cloud_hi, sig,
        dq, partial, M, H, unit, scale, SINGLE_CLOUD=unit % dq_m == 0, EXACT_DELTA=exact_delta,
        BLOCK_M=dq_m, BLOCK_N=dq_n, num_warps=dq_warps, num_stages=dq_stages, **common)
    wrap_triton(_compressed_attention_bwd_dkv_kernel)[(triton.cdiv(Mc, kv_n), H)](
        q, k_cmp, v_cmp, dout, lse, delta, pos, centers, block_real, cloud_lo, cloud_hi, sig,
        dk, dv, Mc, H, unit, scale, SINGLE_CLOUD=(unit // compress_size) % kv_n == 0,
        BLOCK_M=kv_m, BLOCK_N=kv_n, num_warps=kv_warps, num_stages=kv_stages, **common)
    dsigma = q.new_zeros((0,)) if sigma is None else partial.sum(1).to(sigma.dtype)
    return dq, dk, dv, dsigma


def _compressed_setup_context(ctx, inputs, output):
    q, k_cmp, v_cmp, pos, centers, block_real, cloud_lo, cloud_hi, sigma, unit, cs, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k_cmp, v_cmp, output_for_backward(out, q.dtype), lse, pos, centers,
                          block_real, cloud_lo, cloud_hi, sigma)
    ctx.sizes = (unit, cs, scale)
    ctx.mark_non_differentiable(lse)


def _compressed_backward(ctx, dout, dlse):
    q, k_cmp, v_cmp, out, lse, pos, centers, block_real, cloud_lo, cloud_hi, sigma = ctx.saved_tensors
    if block_real is None:
        # Unlike the forward (and the other ops), the backward kernels measured slower without
        # the mask's loads: at 1M points on an H200 (2026-12-01, same run) the forward went
        # 208 -> 177 ms without them, the backward 773 -> 893 ms. So the backward kernels
        # always load it (they have no variant without), here a mask of ones.
        block_real = torch.ones(k_cmp.shape[0], dtype=torch.uint8, device=k_cmp.device)
    dq, dk, dv, dsigma = compressed_attention_bwd_op(
        dout.contiguous(), q, k_cmp, v_cmp, out, lse, pos, centers, block_real, cloud_lo,
        cloud_hi, sigma, *ctx.sizes)
    return (dq, dk, dv, None, None, None, None, None,
            dsigma if sigma is not None else None, None, None, None)


compressed_attention_op.register_autograd(_compressed_backward, setup_context=_compressed_setup_context)
