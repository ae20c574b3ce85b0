"""Helpers shared by the Triton kernels: tile sizes, output allocation, jit building blocks."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# tl.constexpr so that kernels may read them as globals.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Tests set this so every output starts as NaN (or -7 for integers): an element a kernel
# forgets to write then fails the comparison instead of passing by luck.
POISON = False


# Each op picks its launch configuration (tiles, num_warps, num_stages) in a config function
# that passes its choice through `launch_config`; bench/triton_tune.py sweeps the candidates
# by putting entries here, keyed by the config's name ("ball_fwd", "selection", ...).
CONFIG_OVERRIDES: dict[str, dict] = {}


def launch_config(name: str, default: dict) -> dict:
    """`default`, with the entries a benchmark sweep put in CONFIG_OVERRIDES[name]."""
    override = CONFIG_OVERRIDES.get(name)
    return {**default, **override} if override else default


def launch_options(warps: int, stages: int, maxnreg: int | None = None) -> dict:
    """A launch's num_warps and num_stages, and `maxnreg`, a cap on registers per thread, where
    a configuration gives one: more programs per SM at the price of spills. Passed only when
    set (torch.compile's codegen of user kernels keeps num_warps and num_stages, not maxnreg)."""
    options = dict(num_warps=warps, num_stages=stages)
    return options if maxnreg is None else {**options, "maxnreg": maxnreg}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON:
        fill = math.nan if dtype.is_floating_point else -7
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def block_d(head_dim: int) -> int:
    """Head dims are padded (by masked loads, not copies) to a power of two >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


# Half-precision inputs: products with an operand computed in float32 (probabilities P and
# their gradients dS) split it into two half-precision parts, hi + lo, and run two tensor-core
# dots. Rounding P to one half (the usual FlashAttention way) errs by 2^-9 relative for
# bfloat16, ~7x over the project's tolerance rule (tests/helpers.py); the split errs by
# 2^-15 (bfloat16, truncated hi: see `_dot_split`) or 2^-22 (float16). It costs one more dot
# for P @ V, dS @ K, dS^T @ Q and P^T @ dO. Benchmarks may set
# this False to measure the one-dot way.
SPLIT_HALF_PRODUCTS = True


def exact_delta_wanted(dtype: torch.dtype) -> bool:
    """Whether the backward forms delta_i = sum_j P_ij dP_ij from recomputed P and dP rather
    than as dO_i . O_i: the stored half-precision O carries a rounding of 2^-9 relative, which
    dq, dk and dsigma inherit (the usual FlashAttention way, ~3x over the project's tolerance
    rule). It costs recomputing Q K^T and dO V^T once more in the backward."""
    return dtype != torch.float32 and SPLIT_HALF_PRODUCTS


def output_for_backward(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """What an attention op keeps of its output for the backward: the output when the backward
    forms delta as dO . O, else None (the backward then forms the exact delta, see
    `exact_delta_wanted`). Not keeping it frees M x H x D per op between forward and backward:
    3 GiB for the mixture at 1M points, H=8, D=64, bfloat16."""
    return None if exact_delta_wanted(dtype) else out


def dot_modes(dtype: torch.dtype) -> dict[str, bool]:
    """The constexprs FP32 / UPCAST / SPLIT of `_dot` and `_dot_split` for inputs of `dtype`.

    FP32: float32 inputs use 3xTF32 products on tensor cores: plain tf32 would lose 3 decimal
    digits against the torch backend, and IEEE float32 dots spill registers massively.
    UPCAST: the CPU interpreter multiplies bfloat16 operands wrongly (triton 3.9), so there
    half-precision dots run in float32 on operands already rounded to the input dtype, which
    gives what the tensor cores give.
    """
    return dict(FP32_DOT=dtype == torch.float32, UPCAST_DOT=interpreting(),
                SPLIT_DOT=SPLIT_HALF_PRODUCTS)


@triton.jit
def _dot(a, b, FP32: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b for operands in the input dtype, accumulated in float32."""
    if FP32 or UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_split(a, b, FP32: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b for a float32 `a` (probabilities, their gradients) and `b` in the input dtype."""
    if FP32:
        return _dot(a, b, FP32, UPCAST)
    elif SPLIT and b.dtype == tl.bfloat16:
        # hi: `a` truncated to bfloat16 by clearing its low 16 bits, one integer op, where
        # rounding takes a conversion there and one back; lo = a - hi is then exact, and
        # rounding it errs by 2^-15 relative to `a`.
        hi32 = (a.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return _dot(hi32.to(b.dtype), b, FP32, UPCAST) + _dot((a - hi32).to(b.dtype), b, FP32, UPCAST)
    else:
        hi = a.to(b.dtype)
        out = _dot(hi, b, FP32, UPCAST)
        if SPLIT:
            lo = (a - hi.to(tl.float32)).to(b.dtype)
            out += _dot(lo, b, FP32, UPCAST)
        return out


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
                         SPLIT_DOT: tl.constexpr):
    """Fold one key chunk into a streaming softmax: logits `s` `[rows, keys]` (log2 domain,
    -inf where a key is not allowed) and values `v` `[keys, D]` update the running row max
    `m_i`, sum `l_i` and output `acc`; returns the three."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with no key so far keeps m = -inf; subtracting 0 instead avoids inf - inf.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot_split(p, v, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    return m_new, l_i, acc


@triton.jit
def _online_softmax_finish(m_i, l_i, acc):
    """The streamed softmax's output `[rows, D]` and natural-log lse `[rows]`; a row that saw
    no key gets output 0 and lse -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    # One reciprocal per row and a multiply per element: a division per element costs more.
    return acc * (1.0 / l_safe)[:, None], lse


@triton.jit
def _dq_exact_delta_step(p, dp, dist, k, dq, pk, delta, dsig, pdist, HAS_SIGMA: tl.constexpr,
                         FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLIT_DOT: tl.constexpr):
    """One key chunk of a dq kernel that forms the exact delta_i = sum_j P_ij dP_ij in the same
    pass: with dS = P (dP - delta), dq = sum_j P dP k_j - delta sum_j P k_j and the sigma
    gradient sum_j P dP dist_j - delta sum_j P dist_j, so the pass sums P dP and P against k
    (`dq`, `pk`) and the distances (`dsig`, `pdist`; scalars without sigma) next to delta, and
    `_dq_exact_delta_finish` subtracts. The logits, distances and exp2, the per-logit work
    that bounds these kernels, are then formed once per key instead of in a delta pass and
    again in a dq pass, for two more tensor-core dots."""
    pdp = p * dp
    delta += tl.sum(pdp, axis=1)
    dq += _dot_split(pdp, k, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    pk += _dot_split(p, k, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    if HAS_SIGMA:
        dsig += tl.sum(pdp * dist, axis=1)
        pdist += tl.sum(p * dist, axis=1)
    return dq, pk, delta, dsig, pdist


@triton.jit
def _dq_exact_delta_finish(dq, pk, delta, dsig, pdist, HAS_SIGMA: tl.constexpr):
    """dq (unscaled) and the sigma gradient's row sums from `_dq_exact_delta_step`'s sums."""
    dq -= delta[:, None] * pk
    if HAS_SIGMA:
        dsig -= delta * pdist
    return dq, dsig


@triton.jit
def _distance(pos_a, rows, rows_ok, pos_b, cols, cols_ok, DIM: tl.constexpr):
    """Euclidean distances `[len(rows), len(cols)]` between float32 points `pos_a[rows]` and
    `pos_b[cols]` (both `[*, DIM]`), by coordinate differences: ||a||^2 + ||b||^2 - 2ab would
    cancel for nearby points far from the origin."""
    d2 = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for c in tl.static_range(DIM):
        a = tl.load(pos_a + rows * DIM + c, mask=rows_ok, other=0.0)
        b = tl.load(pos_b + cols * DIM + c, mask=cols_ok, other=0.0)
        diff = a[:, None] - b[None, :]
        d2 += diff * diff
    return tl.sqrt(d2)


@triton.jit
def _head_tile(rows, rows_ok, h, H, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets and mask of the `[len(rows), BLOCK_D]` tile of head `h` in a `[M, H, D]`
    tensor; the mask pads head dims to BLOCK_D."""
    dims = tl.arange(0, BLOCK_D)
    return rows[:, None] * (H * D) + h * D + dims[None, :], rows_ok[:, None] & (dims < D)[None, :]


@triton.jit
def _real_slots(MASK, slots, slots_ok, HAS_PADDING: tl.constexpr):
    """Which of `slots` are real (a padding slot, or an empty block for the compressed keys, is
    not): MASK's bytes; or, in a layout without padding (HAS_PADDING false, MASK unused), the
    slots in range, with no load. On an H200 the masked loads cost a padding-free 1M-point
    cloud 20% of the ball forward and 14% of the selection forward (the key tile's loads wait
    for the mask's), which such a layout need not pay."""
    if HAS_PADDING:
        return tl.load(MASK + slots, mask=slots_ok, other=0) != 0
    else:
        return slots_ok


@triton.jit
def _real_key_rows(X, offs, ok, real, HAS_PADDING: tl.constexpr):
    """The tile of X (K or V) at `offs`, `ok` (from `_head_tile`), with the rows of keys that
    are not `real` (padding slots, empty blocks) read as zeros: they are never loaded, so not
    even a NaN or inf there reaches a real output, as 0 * NaN would through P @ V (DESIGN:
    outputs of real slots never depend on what padding slots hold). Forwards need it for V
    only: a padding key's logit is replaced by -inf before any arithmetic could spread a NaN
    from K, and V, used after the softmax, hides the wait for `real`, where K, used first,
    would not. Backwards need it for K too (dQ = dS @ K) and for V (dP = dO @ V^T). The
    offsets come in rather than out: offsets returned by a function that takes X would count,
    for torch.compile's analysis of what a kernel mutates, as pointing into X when a kernel
    stores dk, dv through them."""
    if HAS_PADDING:
        return tl.load(X + offs, mask=ok & real[:, None], other=0.0)
    else:  # every row in range is real (`real` is their `ok`)
        return tl.load(X + offs, mask=ok, other=0.0)


@triton.jit
def _saved_lse2(LSE, rows, rows_ok, h, H):
    """The forward's lse `[M, H]` of `rows` for head `h`, in the log2 domain. Rows that saw no
    key (lse -inf) get 0: their logits are all -inf, so p = exp2(-inf - 0) = 0 where -inf
    would give -inf - -inf = NaN."""
    lse = tl.load(LSE + rows * H + h, mask=rows_ok, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E)


@triton.jit
def _logits(a, b, qk_scale, sig2, shift, POS_A, rows, rows_ok, POS_B, cols, cols_ok, DIM: tl.constexpr,
            HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Attention logits `[rows, cols]` in the log2 domain: `a @ b^T * qk_scale` (the scale times
    log2 e) plus `sig2` (sigma times log2 e) times the distances from POS_A[rows] to
    POS_B[cols] when sigma is on, plus `shift` (0.0, or minus the saved lse for a backward's
    exp2: folded in here it costs no instruction of its own, one fused multiply-add forms
    each term); and those distances (0.0 without sigma), for the sigma gradient. Every
    forward and backward kernel forms its logits here (one sharing distances across heads,
    through `_scaled_logits`)."""
    dots = _dot(a, tl.trans(b), FP32_DOT, UPCAST_DOT)
    dist = 0.0
    if HAS_SIGMA:
        dist = _distance(POS_A, rows, rows_ok, POS_B, cols, cols_ok, DIM)
    return _scaled_logits(dots, qk_scale, sig2, dist, shift, HAS_SIGMA), dist


@triton.jit
def _scaled_logits(dots, qk_scale, sig2, dist, shift, HAS_SIGMA: tl.constexpr):
    """`dots * qk_scale + sig2 * dist + shift` as fused multiply-adds (`_logits`' last step, for
    kernels that compute the distances once for several heads)."""
    if HAS_SIGMA:
        return dots * qk_scale + (sig2 * dist + shift)
    else:
        return dots * qk_scale + shift


@triton.jit
def _attention_bwd_delta_kernel(O, DO, DELTA, M, H, D: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """delta[i, h] = sum_d o[i, h, d] * do[i, h, d] in float32, the softmax backward's
    row term; computed once here for kernels that need it for rows they do not own."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows < M)[:, None] & (dims < D)[None, :]
    offs = rows[:, None] * (H * D) + h * D + dims[None, :]
    o = tl.load(O + offs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + rows * H + h, tl.sum(o * do, axis=1), mask=rows < M)


def attention_bwd_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    M, H, D = out.shape
    delta = new_tensor((M, H), torch.float32, out.device)
    block_m = 64
    wrap_triton(_attention_bwd_delta_kernel)[(triton.cdiv(M, block_m), H)](
        out, dout, delta, M, H, D=D, BLOCK_M=block_m, BLOCK_D=block_d(D))
    return delta
