"""Ball attention: each slot attends to the real slots of its own aligned ball.

Forward: a program owns BLOCK_M query rows of one head and streams the keys of their balls in
BLOCK_N chunks with an online softmax. Small balls share a tile under a block-diagonal mask, so
tiles stay tensor-core sized. Balls of 128 (16-bit, D <= 64) take a kernel whose program owns a
ball for every head instead: the distances, which do not depend on the head, are formed once
for all heads, and the ball's keys are one tile, so its softmax is a plain one. The backward
has the same every-head variant of its one-pass kernel.

Backward: a ball's keys are exactly its own rows, so a program that owns whole balls as a
TILE of rows computes dq, dk and dv of that tile alone, in one pass, without atomics. Balls
larger than the largest register tile (128), balls of 128 at D = 128, and float32 inputs
(whose 3xTF32 operands would overflow shared memory in a one-pass tile) use a two-pass
kernel instead: a program owns a chunk of rows both as keys (dk, dv, streaming its balls'
queries) and as queries (dq, streaming its balls' keys); the softmax row term delta comes from
a kernel before it. The sigma gradient is summed per (tile, head) into a buffer reduced in
torch, which keeps it deterministic.

Half-precision inputs take delta_i = sum_j P_ij dP_ij from recomputed P and dP, not
dO_i . O_i from the rounded output (see `_common.exact_delta_wanted`).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    LOG2E,
    _distance,
    _dot,
    _dot_split,
    _head_tile,
    _logits,
    _online_softmax_finish,
    _online_softmax_step,
    _real_key_rows,
    _real_slots,
    _saved_lse2,
    _scaled_logits,
    attention_bwd_delta,
    block_d,
    dot_modes,
    launch_config,
    new_tensor,
    output_for_backward,
)

# Largest tile (rows) whose backward is done in one pass; larger balls take the two-pass kernel.
MAX_FUSED_TILE = 128


@triton.jit
def _ball_allowed(real, rows, keys, BALL: tl.constexpr, ONE_BALL: tl.constexpr):
    """`[rows, keys]`: which keys a row may attend to: real keys of its own ball. ONE_BALL: the
    tile's rows and keys lie in one ball (tiles no taller than a ball), so every key is in the
    row's ball and only padding is masked, without a compare per logit."""
    if ONE_BALL:
        return real[None, :]
    else:
        return real[None, :] & ((rows[:, None] // BALL) == (keys[None, :] // BALL))


@triton.jit
def _ball_fwd_chunk(q, m_i, l_i, acc, K, V, POS, MASK, rows, rows_ok, keys, keys_ok, h, H,
                    qk_scale, sig, D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SIGMA: tl.constexpr,
                    HAS_PADDING: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                    SPLIT_DOT: tl.constexpr):
    """Fold the key chunk `keys` of head `h` into the rows' streamed softmax (m_i, l_i, acc)."""
    real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
    kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
    k = tl.load(K + kv_offs, mask=kv_ok, other=0.0)
    v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
    s, _ = _logits(q, k, qk_scale, sig, 0.0, POS, rows, rows_ok, POS, keys, keys_ok, DIM, HAS_SIGMA,
                   FP32_DOT, UPCAST_DOT)
    s = tl.where(_ball_allowed(real, rows, keys, BALL, BLOCK_M <= BALL), s, float("-inf"))
    return _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT, UPCAST_DOT, SPLIT_DOT)


@triton.jit
def _ball_attention_fwd_kernel(
    Q, K, V, POS, MASK, SIGMA, O, LSE,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr, KEY_SPAN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    # Logits live in the log2 domain so the softmax uses exp2.
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    # KEY_SPAN = max(BLOCK_M, BALL): the aligned span holding every ball of the tile.
    key0 = (row0 // KEY_SPAN) * KEY_SPAN
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, KEY_SPAN, BLOCK_N):
        keys = key0 + start + tl.arange(0, BLOCK_N)
        keys_ok = keys < M
        m_i, l_i, acc = _ball_fwd_chunk(q, m_i, l_i, acc, K, V, POS, MASK, rows, rows_ok, keys, keys_ok,
                                        h, H, qk_scale, sig, D, DIM, BALL, BLOCK_M, BLOCK_D,
                                        HAS_SIGMA, HAS_PADDING, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    out, lse = _online_softmax_finish(m_i, l_i, acc)
    tl.store(O + q_offs, out.to(O.dtype.element_ty), mask=q_ok)
    tl.store(LSE + rows * H + h, lse, mask=rows_ok)


@triton.jit
def _ball_attention_fwd_heads_kernel(
    Q, K, V, POS, MASK, SIGMA, O, LSE,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr, BLOCK_M: tl.constexpr,
    KEY_SPAN: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLIT_DOT: tl.constexpr,
):
    """A program owns BLOCK_M query rows for every head; their keys, the aligned KEY_SPAN =
    max(BLOCK_M, BALL) slots holding their balls, are one tile, so each head's softmax is a
    plain one, not a streamed one, and the distances between rows and keys, which do not
    depend on the head, are formed once for all H heads instead of once per head (three
    differences, three multiply-adds and a square root per logit, the largest share of the
    per-logit work). The head loop also gives the software pipeline H steps to overlap loads
    with, where a ball of two key chunks gives it two."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    keys = (row0 // KEY_SPAN) * KEY_SPAN + tl.arange(0, KEY_SPAN)
    keys_ok = keys < M
    real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
    allowed = _ball_allowed(real, rows, keys, BALL, BLOCK_M <= BALL)
    dist = 0.0
    if HAS_SIGMA:
        dist = _distance(POS, rows, rows_ok, POS, keys, keys_ok, DIM)
    qk_scale = scale * LOG2E  # logits in the log2 domain, for exp2
    for h in range(H):
        q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
        q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = tl.load(K + kv_offs, mask=kv_ok, other=0.0)
        v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
        sig2 = 0.0
        if HAS_SIGMA:
            sig2 = tl.load(SIGMA + h).to(tl.float32) * LOG2E
        s = _scaled_logits(_dot(q, tl.trans(k), FP32_DOT, UPCAST_DOT), qk_scale, sig2, dist, 0.0,
                           HAS_SIGMA)
        s = tl.where(allowed, s, float("-inf"))
        m = tl.max(s, axis=1)
        # A row with no real key keeps m = -inf; subtracting 0 instead avoids inf - inf.
        p = tl.exp2(s - tl.where(m == float("-inf"), 0.0, m)[:, None])
        acc = _dot_split(p, v, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
        out, lse = _online_softmax_finish(m, tl.sum(p, axis=1), acc)
        tl.store(O + q_offs, out.to(O.dtype.element_ty), mask=q_ok)
        tl.store(LSE + rows * H + h, lse, mask=rows_ok)


@triton.jit
def _ball_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS, sig, qk_scale,
                DIM: tl.constexpr, BALL: tl.constexpr, ONE_BALL: tl.constexpr,
                HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Probabilities [rows, keys] recomputed from the saved lse (log2 domain, `lse2`), and the
    distances when sigma is on (else 0)."""
    s, dist = _logits(q, k, qk_scale, sig * LOG2E, -lse2[:, None], POS, rows, rows_ok, POS, keys, keys_ok,
                      DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
    p = tl.exp2(tl.where(_ball_allowed(real, rows, keys, BALL, ONE_BALL), s, float("-inf")))
    return p, dist


@triton.jit
def _ball_attention_bwd_kernel(
    Q, K, V, O, DO, LSE, POS, MASK, SIGMA, DQ, DK, DV, DSIGMA,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr,
    TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DELTA_MODE: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """DELTA_MODE: how delta_i = sum_j P_ij dP_ij is formed. 0: as dO_i . O_i (O as stored:
    exact for float32, off by the output's rounding for half); 1: from P and dP in the key
    loop (one key chunk only); 2: from P and dP in a first pass over the key chunks."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * TILE
    rows = row0 + tl.arange(0, TILE)
    rows_ok = rows < M
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
    lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
    qk_scale = scale * LOG2E
    sig = 0.0
    dsig = tl.zeros((TILE,), dtype=tl.float32)
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32)
    # The program owns every query of its tile, so it forms delta itself.
    if DELTA_MODE == 0:
        o = tl.load(O + q_offs, mask=q_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    else:
        delta = tl.zeros((TILE,), dtype=tl.float32)
    if DELTA_MODE == 2:
        for start in range(0, TILE, BLOCK_N):
            keys = row0 + start + tl.arange(0, BLOCK_N)
            keys_ok = keys < M
            real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
            kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
            k = _real_key_rows(K, kv_offs, kv_ok, real, HAS_PADDING)
            v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
            p, dist = _ball_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS, sig,
                                  qk_scale, DIM, BALL, TILE <= BALL, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
            dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
            delta += tl.sum(p * dp, axis=1)
    dq = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
    for start in range(0, TILE, BLOCK_N):
        keys = row0 + start + tl.arange(0, BLOCK_N)
        keys_ok = keys < M
        real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = _real_key_rows(K, kv_offs, kv_ok, real, HAS_PADDING)
        v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
        p, dist = _ball_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS, sig,
                              qk_scale, DIM, BALL, TILE <= BALL, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        dq, dsig = _ball_bwd_chunk(p, dist, q, do, k, v, delta, dq, dsig, scale, DK + kv_offs,
                                   DV + kv_offs, kv_ok, DELTA_MODE == 1, HAS_SIGMA, FP32_DOT,
                                   UPCAST_DOT, SPLIT_DOT)
    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)
    if HAS_SIGMA:
        tl.store(DSIGMA + h * tl.num_programs(0) + pid, tl.sum(dsig, axis=0))


@triton.jit
def _ball_bwd_chunk(p, dist, q, do, k, v, delta, dq, dsig, scale, DK_PTRS, DV_PTRS, kv_ok,
                    CHUNK_DELTA: tl.constexpr, HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr,
                    UPCAST_DOT: tl.constexpr, SPLIT_DOT: tl.constexpr):
    """One key chunk of a one-pass backward whose tile owns the chunk's keys (they attend only
    to the tile's rows): store its dk and dv, return dq and the sigma gradient's row sums with
    the chunk added. CHUNK_DELTA: the chunk is every key of the rows, so delta is formed here
    from P and dP (the `delta` passed in is ignored)."""
    dv = _dot_split(tl.trans(p), do, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    tl.store(DV_PTRS, dv.to(DV_PTRS.dtype.element_ty), mask=kv_ok)
    dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
    if CHUNK_DELTA:
        delta = tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])
    dk = _dot_split(tl.trans(ds), q, FP32_DOT, UPCAST_DOT, SPLIT_DOT) * scale
    tl.store(DK_PTRS, dk.to(DK_PTRS.dtype.element_ty), mask=kv_ok)
    dq += _dot_split(ds, k, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    if HAS_SIGMA:
        dsig += tl.sum(ds * dist, axis=1)
    return dq, dsig


@triton.jit
def _ball_attention_bwd_heads_kernel(
    Q, K, V, O, DO, LSE, POS, MASK, SIGMA, DQ, DK, DV, DSIGMA,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr, TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, EXACT_DELTA: tl.constexpr, HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLIT_DOT: tl.constexpr,
):
    """The one-pass backward of a tile of whole balls, one key chunk (its own rows), for every
    head in one program, as the forward's `_ball_attention_fwd_heads_kernel`: the distances
    are formed once for all heads and the head loop is software-pipelined. EXACT_DELTA: delta
    from P and dP (else dO . O from the stored output O)."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    rows_ok = rows < M
    real = _real_slots(MASK, rows, rows_ok, HAS_PADDING)
    allowed = _ball_allowed(real, rows, rows, BALL, TILE <= BALL)
    dist = 0.0
    if HAS_SIGMA:
        dist = _distance(POS, rows, rows_ok, POS, rows, rows_ok, DIM)
    qk_scale = scale * LOG2E
    for h in range(H):
        offs, ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
        q = tl.load(Q + offs, mask=ok, other=0.0)
        k = _real_key_rows(K, offs, ok, real, HAS_PADDING)
        v = _real_key_rows(V, offs, ok, real, HAS_PADDING)
        do = tl.load(DO + offs, mask=ok, other=0.0)
        sig2 = 0.0
        if HAS_SIGMA:
            sig2 = tl.load(SIGMA + h).to(tl.float32) * LOG2E
        shift = -_saved_lse2(LSE, rows, rows_ok, h, H)[:, None]
        s = _scaled_logits(_dot(q, tl.trans(k), FP32_DOT, UPCAST_DOT), qk_scale, sig2, dist, shift,
                           HAS_SIGMA)
        p = tl.exp2(tl.where(allowed, s, float("-inf")))
        delta = tl.zeros((TILE,), dtype=tl.float32)
        if not EXACT_DELTA:
            o = tl.load(O + offs, mask=ok, other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        dq = tl.zeros((TILE, BLOCK_D), dtype=tl.float32)
        dsig = tl.zeros((TILE,), dtype=tl.float32)
        dq, dsig = _ball_bwd_chunk(p, dist, q, do, k, v, delta, dq, dsig, scale, DK + offs, DV + offs,
                                   ok, EXACT_DELTA, HAS_SIGMA, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
        tl.store(DQ + offs, (dq * scale).to(DQ.dtype.element_ty), mask=ok)
        if HAS_SIGMA:
            tl.store(DSIGMA + h * tl.num_programs(0) + pid, tl.sum(dsig, axis=0))


@triton.jit
def _ball_attention_bwd_delta_kernel(
    Q, K, V, DO, LSE, POS, MASK, SIGMA, DELTA,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr, SPAN: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """delta_i = sum_j P_ij dP_ij from recomputed P and dP, for the two-pass backward of half
    inputs (dO_i . O_i would carry the rounding of the stored output)."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * CHUNK
    span0 = (row0 // SPAN) * SPAN
    rows = row0 + tl.arange(0, CHUNK)
    rows_ok = rows < M
    q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
    q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
    do = tl.load(DO + q_offs, mask=q_ok, other=0.0)
    lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32)
    delta = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, SPAN, CHUNK):
        keys = span0 + start + tl.arange(0, CHUNK)
        keys_ok = keys < M
        real = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        k = _real_key_rows(K, kv_offs, kv_ok, real, HAS_PADDING)
        v = _real_key_rows(V, kv_offs, kv_ok, real, HAS_PADDING)
        p, dist = _ball_probs(q, k, rows, rows_ok, keys, keys_ok, real, lse2, POS, sig,
                              qk_scale, DIM, BALL, CHUNK <= BALL, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
        delta += tl.sum(p * dp, axis=1)
    tl.store(DELTA + rows * H + h, delta, mask=rows_ok)


@triton.jit
def _ball_attention_bwd_two_pass_kernel(
    Q, K, V, DO, LSE, DELTA, POS, MASK, SIGMA, DQ, DK, DV, DSIGMA,
    M, H, scale,
    D: tl.constexpr, DIM: tl.constexpr, BALL: tl.constexpr, SPAN: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    pid = tl.program_id(0)
    h = tl.program_id(1)
    row0 = pid.to(tl.int64) * CHUNK
    # SPAN = max(CHUNK, BALL): the aligned rows holding every ball the chunk touches.
    span0 = (row0 // SPAN) * SPAN
    own = row0 + tl.arange(0, CHUNK)
    own_ok = own < M
    own_offs, own_2d = _head_tile(own, own_ok, h, H, D, BLOCK_D)
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32)

    # Pass 1: the chunk's rows as keys; stream the span's queries for dk, dv.
    real = _real_slots(MASK, own, own_ok, HAS_PADDING)
    k = _real_key_rows(K, own_offs, own_2d, real, HAS_PADDING)
    v = _real_key_rows(V, own_offs, own_2d, real, HAS_PADDING)
    dk = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
    for start in range(0, SPAN, CHUNK):
        qrows = span0 + start + tl.arange(0, CHUNK)
        qrows_ok = qrows < M
        q_offs, q_2d = _head_tile(qrows, qrows_ok, h, H, D, BLOCK_D)
        q = tl.load(Q + q_offs, mask=q_2d, other=0.0)
        do = tl.load(DO + q_offs, mask=q_2d, other=0.0)
        delta = tl.load(DELTA + qrows * H + h, mask=qrows_ok, other=0.0)
        lse2 = _saved_lse2(LSE, qrows, qrows_ok, h, H)
        # Transposed logits [keys, queries]: the accumulators are per key.
        st, _ = _logits(k, q, qk_scale, sig * LOG2E, -lse2[None, :], POS, own, own_ok, POS, qrows, qrows_ok,
                        DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        allowed = real[:, None]
        if CHUNK > BALL:  # the chunk holds several balls (else all its rows are one ball)
            allowed = allowed & ((own[:, None] // BALL) == (qrows[None, :] // BALL))
        pt = tl.exp2(tl.where(allowed, st, float("-inf")))
        dv += _dot_split(pt, do, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
        dpt = _dot(v, tl.trans(do), FP32_DOT, UPCAST_DOT)
        dst = pt * (dpt - delta[None, :])
        dk += _dot_split(dst, q, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    tl.store(DK + own_offs, (dk * scale).to(DK.dtype.element_ty), mask=own_2d)
    tl.store(DV + own_offs, dv.to(DV.dtype.element_ty), mask=own_2d)

    # Pass 2: the chunk's rows as queries; stream the span's keys for dq and sigma.
    q = tl.load(Q + own_offs, mask=own_2d, other=0.0)
    do = tl.load(DO + own_offs, mask=own_2d, other=0.0)
    delta = tl.load(DELTA + own * H + h, mask=own_ok, other=0.0)
    lse2 = _saved_lse2(LSE, own, own_ok, h, H)
    dq = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
    dsig = tl.zeros((CHUNK,), dtype=tl.float32)
    for start in range(0, SPAN, CHUNK):
        keys = span0 + start + tl.arange(0, CHUNK)
        keys_ok = keys < M
        kreal = _real_slots(MASK, keys, keys_ok, HAS_PADDING)
        kv_offs, kv_ok = _head_tile(keys, keys_ok, h, H, D, BLOCK_D)
        kk = _real_key_rows(K, kv_offs, kv_ok, kreal, HAS_PADDING)
        vv = _real_key_rows(V, kv_offs, kv_ok, kreal, HAS_PADDING)
        p, dist = _ball_probs(q, kk, own, own_ok, keys, keys_ok, kreal, lse2, POS, sig,
                              qk_scale, DIM, BALL, CHUNK <= BALL, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        dp = _dot(do, tl.trans(vv), FP32_DOT, UPCAST_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot_split(ds, kk, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
        if HAS_SIGMA:
            dsig += tl.sum(ds * dist, axis=1)
    tl.store(DQ + own_offs, (dq * scale).to(DQ.dtype.element_ty), mask=own_2d)
    if HAS_SIGMA:
        tl.store(DSIGMA + h * tl.num_programs(0) + pid, tl.sum(dsig, axis=0))


def _fwd_config(ball_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles and (num_warps, num_stages), picked from sm_90 register/spill reports. Balls up
    to BLOCK_M share a tile under a block-diagonal mask; larger balls are streamed in BLOCK_N
    key chunks. heads_inside: one program per BLOCK_M query rows for every head, their keys one
    tile (`_ball_attention_fwd_heads_kernel`)."""
    if dtype == torch.float32:
        config = dict(block_m=64, block_n=32 if head_dim > 64 else 64, warps=4, stages=1)
    elif head_dim > 64 or ball_size < 128:  # a 128-row tile of small balls masks most of it
        config = dict(block_m=64, block_n=64, warps=8 if head_dim > 64 else 4, stages=2)
    elif ball_size > MAX_FUSED_TILE:  # bench/triton_tune.py on an H100 (2026-11-23), 1M points,
        # ball 128: 3.54 -> 3.12 ms (tiles), -> 2.53 ms (3 stages; triton_tune_h100_second.json)
        config = dict(block_m=128, block_n=64, warps=4, stages=3)
    else:  # bench/triton_tune.py on an H200 (2026-12-01), 1M points, ball 128: the streamed
        # kernel above 2.30 ms, this one 2.12 ms (bench/results/triton_tune_h200_ball_heads.json);
        # 3 stages (160 KiB of shared memory) 2.10 -> 1.82 ms (triton_tune_h200_caps.json)
        config = dict(heads_inside=True, block_m=128, block_n=128, warps=8, stages=3)
    config = launch_config("ball_fwd", {"heads_inside": False, **config})
    if config["heads_inside"] and (max(config["block_m"], ball_size) > MAX_FUSED_TILE
                                   or dtype == torch.float32 or head_dim > 64):
        # Its key tile holds whole balls, for 16-bit inputs up to D = 64: larger tiles and
        # float32's 3xTF32 operands would overflow shared memory and registers.
        config = {**config, "heads_inside": False}
    # A key chunk never reaches past the aligned span of the tile's balls: with tiles no taller
    # than a ball the kernel masks only padding, not other balls' keys (ONE_BALL).
    return {**config, "block_n": min(config["block_n"], max(config["block_m"], ball_size))}


def _bwd_config(ball_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """one_pass, rows (TILE or CHUNK), block_n, warps, stages, heads_inside (a one-pass tile
    of one key chunk for every head in one program, `_ball_attention_bwd_heads_kernel`);
    picked from sm_90 register,
    spill and shared-memory reports of the compiled kernels: float32 (3xTF32 operands take
    twice the shared memory), balls over 128, and balls of 128 at D = 128 (the one-pass tile
    spills heavily) take the two-pass kernel. A one-pass tile must hold whole balls."""
    two_pass = dict(one_pass=False, rows=32 if head_dim > 64 else 64, block_n=0, warps=8, stages=1)
    if dtype == torch.float32 or ball_size > MAX_FUSED_TILE or (ball_size > 64 and head_dim > 64):
        config = two_pass
    elif ball_size <= 64:
        config = dict(one_pass=True, rows=64, block_n=64 if head_dim <= 64 else 32, warps=8,
                      stages=2 if head_dim <= 64 else 1)
    else:  # bench/triton_tune.py on an H100 (2026-11-23), 1M points: 13.8 -> 6.0 ms (block_n 32);
        # for every head in one program on an H200 (2026-12-01): 5.91 -> 5.11 ms, bitwise the
        # same gradients (bench/results/triton_tune_h200_ball_heads.json)
        config = dict(one_pass=True, rows=128, block_n=128, warps=8, stages=2, heads_inside=True)
    config = launch_config("ball_bwd", {"heads_inside": False, **config})
    if config["one_pass"] and config["rows"] < ball_size:
        config = {**two_pass, "heads_inside": False}
    if config["one_pass"]:
        # A tile's keys are its own rows: a longer key chunk would reach the next tile's balls
        # (and store their dk, dv, which that tile's program owns).
        config = {**config, "block_n": min(config["block_n"], config["rows"])}
    if config["heads_inside"] and not (config["one_pass"] and config["block_n"] == config["rows"]):
        config = {**config, "heads_inside": False}  # one key chunk per tile only
    return config


@triton_op("sparseball_triton::ball_attention", mutates_args=())
def ball_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                      mask: torch.Tensor | None, sigma: torch.Tensor | None, ball_size: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    out = new_tensor((M, H, D), q.dtype, q.device)
    lse = new_tensor((M, H), torch.float32, q.device)
    cfg = _fwd_config(ball_size, D, q.dtype)
    block_m, block_n, warps, stages = cfg["block_m"], cfg["block_n"], cfg["warps"], cfg["stages"]
    args = (q, k, v, pos, q if mask is None else mask, q if sigma is None else sigma, out, lse, M,
            H, scale)
    constants = dict(D=D, DIM=pos.shape[1], BALL=ball_size, BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
                     HAS_PADDING=mask is not None, **dot_modes(q.dtype), num_warps=warps,
                     num_stages=stages)
    key_span = max(block_m, ball_size)  # the aligned span holding every ball of a row tile
    if cfg["heads_inside"]:
        wrap_triton(_ball_attention_fwd_heads_kernel)[(triton.cdiv(M, block_m),)](
            *args, BLOCK_M=block_m, KEY_SPAN=key_span, **constants)
    else:
        wrap_triton(_ball_attention_fwd_kernel)[(triton.cdiv(M, block_m), H)](
            *args, KEY_SPAN=key_span, BLOCK_M=block_m, BLOCK_N=block_n, **constants)
    return out, lse


@triton_op("sparseball_triton::ball_attention_bwd", mutates_args=())
def ball_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor | None, lse: torch.Tensor, pos: torch.Tensor,
                          mask: torch.Tensor | None, sigma: torch.Tensor | None, ball_size: int,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    M, H, D = q.shape
    dq = new_tensor((M, H, D), q.dtype, q.device)
    dk = new_tensor((M, H, D), q.dtype, q.device)
    dv = new_tensor((M, H, D), q.dtype, q.device)
    cfg = _bwd_config(ball_size, D, q.dtype)
    one_pass, rows, block_n = cfg["one_pass"], cfg["rows"], cfg["block_n"]
    warps, stages = cfg["warps"], cfg["stages"]
    grid = (triton.cdiv(M, rows), H)
    partial = new_tensor((H, grid[0]), torch.float32, q.device)
    modes = dot_modes(q.dtype)
    exact_delta = out is None  # the forward kept no output: form the exact delta
    sig = q if sigma is None else sigma
    msk = q if mask is None else mask
    common = dict(D=D, DIM=pos.shape[1], BALL=ball_size, BLOCK_D=block_d(D),
                  HAS_SIGMA=sigma is not None, HAS_PADDING=mask is not None, num_warps=warps,
                  num_stages=stages, **modes)
    if cfg["heads_inside"]:
        wrap_triton(_ball_attention_bwd_heads_kernel)[grid[:1]](
            q, k, v, dout if out is None else out, dout, lse, pos, msk, sig, dq, dk, dv, partial,
            M, H, scale, TILE=rows, EXACT_DELTA=exact_delta, **common)
    elif one_pass:
        delta_mode = 0 if not exact_delta else (1 if block_n == rows else 2)
        wrap_triton(_ball_attention_bwd_kernel)[grid](
            q, k, v, dout if out is None else out, dout, lse, pos, msk, sig, dq, dk, dv, partial,
            M, H, scale, TILE=rows, BLOCK_N=block_n, DELTA_MODE=delta_mode, **common)
    else:
        span = max(rows, ball_size)
        if exact_delta:
            delta = new_tensor((M, H), torch.float32, q.device)
            wrap_triton(_ball_attention_bwd_delta_kernel)[grid](
                q, k, v, dout, lse, pos, msk, sig, delta, M, H, scale,
                SPAN=span, CHUNK=rows, **common)
        else:
            delta = attention_bwd_delta(out, dout)
        wrap_triton(_ball_attention_bwd_two_pass_kernel)[grid](
            q, k, v, dout, lse, delta, pos, msk, sig, dq, dk, dv, partial, M, H, scale,
            SPAN=span, CHUNK=rows, **common)
    if sigma is None:
        dsigma = q.new_zeros((0,))
    else:
        dsigma = partial.sum(1).to(sigma.dtype)
    return dq, dk, dv, dsigma


def _ball_setup_context(ctx, inputs, output):
    q, k, v, pos, mask, sigma, ball_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, output_for_backward(out, q.dtype), lse, pos, mask, sigma)
    ctx.ball_size = ball_size
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _ball_backward(ctx, dout, dlse):
    q, k, v, out, lse, pos, mask, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = ball_attention_bwd_op(dout.contiguous(), q, k, v, out, lse, pos, mask,
                                               sigma, ctx.ball_size, ctx.scale)
    return dq, dk, dv, None, None, (dsigma if sigma is not None else None), None, None


ball_attention_op.register_autograd(_ball_backward, setup_context=_ball_setup_context)
