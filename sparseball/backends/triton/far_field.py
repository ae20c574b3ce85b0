"""The tree far field (docs/contract.md, section 3.1): attention to the tokens of each group's
cut, and the importance of a frontier for the descent.

Tokens are rows of `[T, H, D]` tables gathered by number, one row per token, BLOCK_N tokens
per tile; a token's logit adds `log n(u)` (its real-slot count) and the distance bias to its
center, both gathered with it.

Forward and dq: a program owns up to 64 rows of one group (as selection attention tiles them)
and streams the tokens of the group's cut `cut[g, h, :]` (-1: none) with an online softmax.
For half inputs the dq kernel forms the exact delta and stores it for the dk/dv kernel.

dk, dv without float atomics and bitwise deterministic: the cut is inverted into, per (head,
token), the ascending list of groups whose cut holds it (`selection.invert_selection`). A
token high in the tree sits in the cut of most groups of its cloud: one program per token
would leave a few programs walking every group while the others idle, so each list is cut
into chunks of at most CHUNK groups, a program per chunk sums its groups' terms for its one
token (row-vector arithmetic in float32: one key per program leaves nothing for tl.dot) into
a partial row, and a second kernel adds each token's partial rows in chunk order.

The frontier importance (`far_field_select`'s kernel): a program per (group, head) makes two
passes over the frontier's tokens, the log-sum-exp of each query's logits over the valid
frontier, then the sums over the group's real queries of exp(z - lse), in float32. The descent
around it (top-k, children, cut) is torch code shared with the torch backend
(`sparseball.backends.descent`).
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
    _saved_lse2,
    attention_bwd_delta,
    block_d,
    dot_modes,
    launch_config,
    launch_options,
    new_tensor,
    output_for_backward,
)
from .selection import invert_selection


@triton.jit
def _cut_tokens(CUT, K, V, LOG_COUNT, group, h, H, W, start, D: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Tokens `start .. start + BLOCK_N` of the cut of `group` for head `h`: their numbers
    (0 where none), which are in use, their K and V rows (zeros where none: an unused row is
    never loaded) and their log2 counts."""
    cols = start + tl.arange(0, BLOCK_N)
    ids = tl.load(CUT + (group * H + h) * W + cols, mask=cols < W, other=-1).to(tl.int64)
    valid = ids >= 0
    tok = tl.maximum(ids, 0)
    kv_offs, kv_ok = _head_tile(tok, valid, h, H, D, BLOCK_D)
    k = tl.load(K + kv_offs, mask=kv_ok, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_ok, other=0.0)
    logc2 = tl.load(LOG_COUNT + tok, mask=valid, other=0.0) * LOG2E
    return tok, valid, k, v, logc2


@triton.jit
def _far_field_fwd_kernel(
    Q, K, V, POS, CENTERS, LOG_COUNT, CUT, SIGMA, O, LSE,
    M, H, W, scale,
    D: tl.constexpr, DIM: tl.constexpr, GS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
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
    for start in range(0, W, BLOCK_N):
        tok, valid, k, v, logc2 = _cut_tokens(CUT, K, V, LOG_COUNT, group, h, H, W, start, D,
                                              BLOCK_N, BLOCK_D)
        s, _ = _logits(q, k, qk_scale, sig, logc2[None, :], POS, rows, rows_ok, CENTERS, tok,
                       valid, DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32_DOT, UPCAST_DOT, SPLIT_DOT)
    out, lse = _online_softmax_finish(m_i, l_i, acc)
    tl.store(O + q_offs, out.to(O.dtype.element_ty), mask=q_ok)
    tl.store(LSE + rows * H + h, lse, mask=rows_ok)


@triton.jit
def _far_field_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, POS, CENTERS, LOG_COUNT, CUT, SIGMA, DQ, DSIGMA,
    M, H, W, scale,
    D: tl.constexpr, DIM: tl.constexpr, GS: tl.constexpr, ROWS: tl.constexpr,
    EXACT_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SPLIT_DOT: tl.constexpr,
):
    """dq and the sigma gradient's per-program sums; EXACT_DELTA: form delta_i = sum_u P_iu
    dP_iu in the same pass and store it for the dk/dv kernel (else DELTA holds dO_i . O_i)."""
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
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
        dsig = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if EXACT_DELTA:
        delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
        pk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        pdist = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        delta = tl.load(DELTA + rows * H + h, mask=rows_ok, other=0.0)
    for start in range(0, W, BLOCK_N):
        tok, valid, k, v, logc2 = _cut_tokens(CUT, K, V, LOG_COUNT, group, h, H, W, start, D,
                                              BLOCK_N, BLOCK_D)
        s, dist = _logits(q, k, qk_scale, sig, logc2[None, :] - lse2[:, None], POS, rows,
                          rows_ok, CENTERS, tok, valid, DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
        # Rows padding the tile have lse 0: their exp2 could overflow, so they are masked too.
        p = tl.exp2(tl.where(valid[None, :] & rows_ok[:, None], s, float("-inf")))
        dp = _dot(do, tl.trans(v), FP32_DOT, UPCAST_DOT)
        if EXACT_DELTA:
            dq, pk, delta, dsig, pdist = _dq_exact_delta_step(p, dp, dist, k, dq, pk, delta, dsig,
                                                              pdist, HAS_SIGMA, FP32_DOT,
                                                              UPCAST_DOT, SPLIT_DOT)
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
def _far_field_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, POS, CENTERS, LOG_COUNT, SIGMA, ROW_PTR, GROUPS, CHUNK_PTR, OWNER,
    PART_K, PART_V,
    H, T, scale,
    D: tl.constexpr, DIM: tl.constexpr, GS: tl.constexpr, QROWS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SIGMA: tl.constexpr,
):
    """Chunk j of one (head, token)'s ascending group list: the sums of dk and dv over those
    groups' rows, in float32, into partial row j."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    j = tl.program_id(0).to(tl.int64)
    hu = tl.load(OWNER + j)
    if hu < H * T:  # the last programs of the static grid own no chunk
        h = hu // T
        u = hu - h * T
        first = tl.load(ROW_PTR + hu) + (j - tl.load(CHUNK_PTR + hu)) * CHUNK
        last = tl.minimum(first + CHUNK, tl.load(ROW_PTR + hu + 1))
        dims = tl.arange(0, BLOCK_D)
        dims_ok = dims < D
        k = tl.load(K + (u * H + h) * D + dims, mask=dims_ok, other=0.0).to(tl.float32)
        v = tl.load(V + (u * H + h) * D + dims, mask=dims_ok, other=0.0).to(tl.float32)
        logc2 = tl.load(LOG_COUNT + u) * LOG2E
        qk_scale = scale * LOG2E
        sig = 0.0
        if HAS_SIGMA:
            sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
        dk = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # Groups come in ascending order, so the sums have a fixed order: deterministic.
        for e in range(first, last):
            group = tl.load(GROUPS + e).to(tl.int64)
            for sub in tl.static_range(0, GS, QROWS):
                r = tl.arange(0, BLOCK_M)
                rows = group * GS + sub + r
                rows_ok = r < QROWS
                q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
                q = tl.load(Q + q_offs, mask=q_ok, other=0.0).to(tl.float32)
                do = tl.load(DO + q_offs, mask=q_ok, other=0.0).to(tl.float32)
                delta = tl.load(DELTA + rows * H + h, mask=rows_ok, other=0.0)
                lse2 = _saved_lse2(LSE, rows, rows_ok, h, H)
                s = tl.sum(q * k[None, :], axis=1) * qk_scale + (logc2 - lse2)
                if HAS_SIGMA:
                    d2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
                    for c in tl.static_range(DIM):
                        a = tl.load(POS + rows * DIM + c, mask=rows_ok, other=0.0)
                        diff = a - tl.load(CENTERS + u * DIM + c)
                        d2 += diff * diff
                    s += sig * tl.sqrt(d2)
                p = tl.exp2(tl.where(rows_ok, s, float("-inf")))
                dv += tl.sum(p[:, None] * do, axis=0)
                dp = tl.sum(do * v[None, :], axis=1)
                dk += tl.sum((p * (dp - delta))[:, None] * q, axis=0)
        tl.store(PART_K + j * D + dims, dk * scale, mask=dims_ok)
        tl.store(PART_V + j * D + dims, dv, mask=dims_ok)


@triton.jit
def _far_field_bwd_reduce_kernel(PART_K, PART_V, CHUNK_PTR, DK, DV, H, T,
                                 D: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv of BLOCK_U tokens of head h: each token's partial rows added in chunk order."""
    h = tl.program_id(1)
    u = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = u < T
    first = tl.load(CHUNK_PTR + h * T + u, mask=u_ok, other=0)
    count = tl.load(CHUNK_PTR + h * T + u + 1, mask=u_ok, other=0) - first
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < D
    dk = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    for i in range(0, tl.max(count, axis=0)):
        offs = (first + i)[:, None] * D + dims[None, :]
        ok = (i < count)[:, None] & dims_ok[None, :]
        dk += tl.load(PART_K + offs, mask=ok, other=0.0)
        dv += tl.load(PART_V + offs, mask=ok, other=0.0)
    offs, ok = _head_tile(u, u_ok, h, H, D, BLOCK_D)
    tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _frontier_logits(q, K, POS, CENTERS, LOG_COUNT, IDS, rows, rows_ok, h, H, W, start,
                     qk_scale, sig, D: tl.constexpr, DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr,
                     UPCAST_DOT: tl.constexpr):
    """Logits (log2 domain) `[rows, BLOCK_N]` of the frontier tokens `start ..`, -inf where
    none. (The kernel forms the columns it stores to itself: offsets returned by a function
    that takes input pointers count, for torch.compile's analysis, as pointing into them.)"""
    cols = start + tl.arange(0, BLOCK_N)
    cols_ok = cols < W
    ids = tl.load(IDS + cols, mask=cols_ok, other=-1).to(tl.int64)
    valid = ids >= 0
    tok = tl.maximum(ids, 0)
    k_offs, k_ok = _head_tile(tok, valid, h, H, D, BLOCK_D)
    k = tl.load(K + k_offs, mask=k_ok, other=0.0)
    logc2 = tl.load(LOG_COUNT + tok, mask=valid, other=0.0) * LOG2E
    s, _ = _logits(q, k, qk_scale, sig, logc2[None, :], POS, rows, rows_ok, CENTERS, tok, valid,
                   DIM, HAS_SIGMA, FP32_DOT, UPCAST_DOT)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _frontier_importance_kernel(
    Q, K, POS, CENTERS, LOG_COUNT, MASK, IDS, SIGMA, OUT,
    H, W, scale,
    D: tl.constexpr, DIM: tl.constexpr, GS: tl.constexpr, QROWS: tl.constexpr,
    NSUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr, HAS_SIGMA: tl.constexpr, FP32_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, SPLIT_DOT: tl.constexpr,
):
    """One program per (group, head), the group's rows in NSUB tiles of QROWS. ONE_TILE (the
    frontier fits one BLOCK_N tile, as it does below the top level: top_k * fanout tokens):
    each row tile's logits are formed once, for their lse and their probabilities. Else two
    passes over the frontier: the lse of every row tile (kept as the rows of one
    `[NSUB, BLOCK_M]` tensor), then the probabilities' sums, tile by tile."""
    scale = tl.cast(scale, tl.float32)  # inductor passes Python floats as float64
    g = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    ids_row = IDS + (g * H + h) * W
    out_row = OUT + (g * H + h) * W
    qk_scale = scale * LOG2E
    sig = 0.0
    if HAS_SIGMA:
        sig = tl.load(SIGMA + h).to(tl.float32) * LOG2E
    r = tl.arange(0, BLOCK_M)
    if ONE_TILE:
        colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sub in tl.static_range(0, GS, QROWS):
            rows = g * GS + sub + r
            rows_ok = r < QROWS
            real = tl.load(MASK + rows, mask=rows_ok, other=0) != 0
            q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
            q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
            s = _frontier_logits(q, K, POS, CENTERS, LOG_COUNT, ids_row, rows, rows_ok, h, H, W,
                                 0, qk_scale, sig, D, DIM, BLOCK_N, BLOCK_D, HAS_SIGMA,
                                 FP32_DOT, UPCAST_DOT)
            colsum += tl.sum(_frontier_probs(s, tl.max(s, axis=1), real), axis=0)
        cols = tl.arange(0, BLOCK_N)
        tl.store(out_row + cols, colsum, mask=cols < W)
    else:
        tiles = tl.arange(0, NSUB)
        lse_all = tl.zeros((NSUB, BLOCK_M), dtype=tl.float32)
        for sub in tl.static_range(0, GS, QROWS):
            rows = g * GS + sub + r
            rows_ok = r < QROWS
            q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
            q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
            m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for start in range(0, W, BLOCK_N):
                s = _frontier_logits(q, K, POS, CENTERS, LOG_COUNT, ids_row, rows, rows_ok, h, H,
                                     W, start, qk_scale, sig, D, DIM, BLOCK_N, BLOCK_D,
                                     HAS_SIGMA, FP32_DOT, UPCAST_DOT)
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]), axis=1)
                m_i = m_new
            # A row without a valid token forms no probability: any finite lse does.
            lse2 = tl.where(l_i == 0.0, 0.0, m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            lse_all = tl.where((tiles == sub // QROWS)[:, None], lse2[None, :], lse_all)
        for start in range(0, W, BLOCK_N):
            colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for sub in tl.static_range(0, GS, QROWS):
                rows = g * GS + sub + r
                rows_ok = r < QROWS
                real = tl.load(MASK + rows, mask=rows_ok, other=0) != 0
                q_offs, q_ok = _head_tile(rows, rows_ok, h, H, D, BLOCK_D)
                q = tl.load(Q + q_offs, mask=q_ok, other=0.0)
                s = _frontier_logits(q, K, POS, CENTERS, LOG_COUNT, ids_row, rows, rows_ok, h, H,
                                     W, start, qk_scale, sig, D, DIM, BLOCK_N, BLOCK_D,
                                     HAS_SIGMA, FP32_DOT, UPCAST_DOT)
                lse2 = tl.sum(tl.where((tiles == sub // QROWS)[:, None], lse_all, 0.0), axis=0)
                colsum += tl.sum(tl.exp2(tl.where(real[:, None], s - lse2[:, None],
                                                  float("-inf"))), axis=0)
            cols = start + tl.arange(0, BLOCK_N)
            tl.store(out_row + cols, colsum, mask=cols < W)


@triton.jit
def _frontier_probs(s, m, real):
    """exp(z - lse) `[rows, tokens]` of one tile holding a row's whole frontier: logits `s`
    (log2 domain, -inf where no token), their row max `m`; 0 on rows that are not `real`
    (`where` before exp2: a padding query's logits may be anything, even NaN)."""
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp2(s - m_ref[:, None])
    total = tl.sum(e, axis=1)
    inv = 1.0 / tl.where(total == 0.0, 1.0, total)
    return tl.where(real[:, None], e * inv[:, None], 0.0)


# Launch configurations and the ops


def _config(group_size: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles, (num_warps, num_stages) per kernel (`launch_options`), CHUNK, the most groups
    one dk/dv program walks, and the widest frontier the importance kernel takes in one tile
    (`importance_tile`). Not tuned on a GPU yet: selection attention's row tiles, 64-token
    tiles for 16-bit inputs."""
    rows = min(group_size, 64)
    half = dtype != torch.float32
    default = dict(rows=rows, block_m=max(rows, 16), block_n=64 if half else 32, chunk=256,
                   fwd=(4, 2) if half else (4, 1), dq=(4, 2) if half else (8, 1),
                   dkv=(4, 1), importance=(4, 1), importance_tile=128)
    config = launch_config("far_field", default)
    # A program's query rows share one group's cut, whatever an override asks for.
    rows = min(config["rows"], group_size)
    return {**config, "rows": rows, "block_m": max(config["block_m"], rows)}


@triton_op("sparseball_triton::far_field_attention", mutates_args=())
def far_field_attention_op(q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor,
                           pos: torch.Tensor, centers: torch.Tensor, log_count: torch.Tensor,
                           cut: torch.Tensor, sigma: torch.Tensor | None, group_size: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    out = new_tensor((M, H, D), q.dtype, q.device)
    lse = new_tensor((M, H), torch.float32, q.device)
    cfg = _config(group_size, D, q.dtype)
    wrap_triton(_far_field_fwd_kernel)[(M // cfg["rows"], H)](
        q, k_tok, v_tok, pos, centers, log_count, cut, q if sigma is None else sigma, out, lse,
        M, H, cut.shape[2], scale,
        D=D, DIM=pos.shape[1], GS=group_size, ROWS=cfg["rows"], BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"], BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
        **dot_modes(q.dtype), **launch_options(*cfg["fwd"]),
    )
    return out, lse


def plan_chunks(cut: torch.Tensor, num_tokens: int, chunk: int):
    """The dk/dv work list: the cut inverted into ascending groups per (head, token)
    (`row_ptr`, `groups`), each list cut into chunks of at most `chunk` groups; `chunk_ptr`
    `(H * T + 1,)`: the chunks of (h, u) are `chunk_ptr[h * T + u] ..`; `owner` `(bound,)`:
    the (h, u) of each chunk, `H * T` past the last. `bound`, the grid, depends on shapes
    only (torch.compile needs static shapes): at most entries / chunk + one per list."""
    G, H, W = cut.shape
    row_ptr, groups = invert_selection(cut, num_tokens)
    counts = row_ptr[1:] - row_ptr[:-1]
    chunk_ptr = torch.nn.functional.pad(torch.cumsum(triton.cdiv(counts, chunk), 0), (1, 0))
    bound = triton.cdiv(G * H * W, chunk) + min(H * num_tokens, G * H * W)
    place = torch.arange(bound, device=cut.device)
    owner = torch.searchsorted(chunk_ptr, place, right=True) - 1
    return row_ptr, groups, chunk_ptr, owner, bound


@triton_op("sparseball_triton::far_field_attention_bwd", mutates_args=())
def far_field_attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor,
    out: torch.Tensor | None, lse: torch.Tensor, pos: torch.Tensor, centers: torch.Tensor,
    log_count: torch.Tensor, cut: torch.Tensor, sigma: torch.Tensor | None, group_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, H, D = q.shape
    T = k_tok.shape[0]
    W = cut.shape[2]
    exact_delta = out is None  # the forward kept no output: form the exact delta
    delta = new_tensor((M, H), torch.float32, q.device) if exact_delta else attention_bwd_delta(out, dout)
    dq = new_tensor((M, H, D), q.dtype, q.device)
    dk = new_tensor((T, H, D), q.dtype, q.device)
    dv = new_tensor((T, H, D), q.dtype, q.device)
    cfg = _config(group_size, D, q.dtype)
    grid_q = (M // cfg["rows"], H)
    partial = new_tensor((H, grid_q[0]), torch.float32, q.device)
    sig = q if sigma is None else sigma
    wrap_triton(_far_field_bwd_dq_kernel)[grid_q](
        q, k_tok, v_tok, dout, lse, delta, pos, centers, log_count, cut, sig, dq, partial,
        M, H, W, scale,
        D=D, DIM=pos.shape[1], GS=group_size, ROWS=cfg["rows"], EXACT_DELTA=exact_delta,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=block_d(D),
        HAS_SIGMA=sigma is not None, **dot_modes(q.dtype), **launch_options(*cfg["dq"]))
    chunk = cfg["chunk"]
    row_ptr, groups, chunk_ptr, owner, bound = plan_chunks(cut, T, chunk)
    part_k = new_tensor((bound, D), torch.float32, q.device)
    part_v = new_tensor((bound, D), torch.float32, q.device)
    qrows = min(group_size, 64)
    wrap_triton(_far_field_bwd_dkv_kernel)[(bound,)](
        q, k_tok, v_tok, dout, lse, delta, pos, centers, log_count, sig, row_ptr, groups,
        chunk_ptr, owner, part_k, part_v, H, T, scale,
        D=D, DIM=pos.shape[1], GS=group_size, QROWS=qrows, CHUNK=chunk,
        BLOCK_M=max(qrows, 16), BLOCK_D=block_d(D), HAS_SIGMA=sigma is not None,
        **launch_options(*cfg["dkv"]))
    block_u = 16
    wrap_triton(_far_field_bwd_reduce_kernel)[(triton.cdiv(T, block_u), H)](
        part_k, part_v, chunk_ptr, dk, dv, H, T, D=D, BLOCK_U=block_u, BLOCK_D=block_d(D),
        num_warps=2)
    dsigma = q.new_zeros((0,)) if sigma is None else partial.sum(1).to(sigma.dtype)
    return dq, dk, dv, dsigma


def _far_field_setup_context(ctx, inputs, output):
    q, k_tok, v_tok, pos, centers, log_count, cut, sigma, group_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k_tok, v_tok, output_for_backward(out, q.dtype), lse, pos, centers,
                          log_count, cut, sigma)
    ctx.sizes = (group_size, scale)
    ctx.mark_non_differentiable(lse)


def _far_field_backward(ctx, dout, dlse):
    q, k_tok, v_tok, out, lse, pos, centers, log_count, cut, sigma = ctx.saved_tensors
    dq, dk, dv, dsigma = far_field_attention_bwd_op(
        dout.contiguous(), q, k_tok, v_tok, out, lse, pos, centers, log_count, cut, sigma,
        *ctx.sizes)
    return (dq, dk, dv, None, None, None, None, dsigma if sigma is not None else None, None,
            None)


far_field_attention_op.register_autograd(_far_field_backward,
                                         setup_context=_far_field_setup_context)


@triton_op("sparseball_triton::frontier_importance", mutates_args=())
def frontier_importance_op(q: torch.Tensor, k_tok: torch.Tensor, pos: torch.Tensor,
                           centers: torch.Tensor, log_count: torch.Tensor, mask: torch.Tensor,
                           frontier: torch.Tensor, sigma: torch.Tensor | None, group_size: int,
                           scale: float) -> torch.Tensor:
    """float32 `(G, H, W)`: for the token numbers `frontier` (-1: none; each a token with a
    real slot) of the G groups of `q` `(G * group_size, H, D)`, the sum over each group's
    real queries of exp(z - lse_F), lse_F over the row's tokens."""
    M, H, D = q.shape
    G, _, W = frontier.shape
    out = new_tensor((G, H, W), torch.float32, q.device)
    cfg = _config(group_size, D, q.dtype)
    qrows = min(group_size, 64)
    one_tile = W <= cfg["importance_tile"]
    wrap_triton(_frontier_importance_kernel)[(G, H)](
        q, k_tok, pos, centers, log_count, mask, frontier, q if sigma is None else sigma, out,
        H, W, scale,
        D=D, DIM=pos.shape[1], GS=group_size, QROWS=qrows,
        NSUB=triton.next_power_of_2(group_size // qrows), BLOCK_M=max(qrows, 16),
        BLOCK_N=max(16, triton.next_power_of_2(W)) if one_tile else cfg["block_n"],
        BLOCK_D=block_d(D), ONE_TILE=one_tile, HAS_SIGMA=sigma is not None,
        **dot_modes(q.dtype), **launch_options(*cfg["importance"]))
    return out
