// Kernels of the CuPy attention backend (sparseball/backends/cupy/ops.py; what they compute is
// docs/contract.md, section 3). Compiled by NVRTC through cupy.RawModule, one module per element
// type and tile shape (`name_expressions`); CI compiles the instantiations with nvcc for sm_80
// and sm_90 and runs them on the CPU through a thread emulator (tests/cuda_emu.py), which is why
// they use only __syncthreads and plain shared memory: no shuffles, no atomics, no PTX. Every
// sum has a fixed order, so results are bitwise deterministic.
//
// SIMT layout (a first version; tensor cores come later). A block of NT threads owns NT rows of
// one head (blockIdx.y): queries in the forwards and dq kernels, keys in the dk/dv kernels, one
// row per thread, held in registers as float (DMAX, the head dim rounded up to a power of two,
// with zeros past D). The other side streams through shared memory in tiles of BN rows, converted
// to float once; every thread of a warp reads the same tile row at once (a broadcast).
// Accumulation is float32 for every element type.
//
// Template parameters: T the element type (float, sb_half, sb_bf16), NT threads per block, BN
// rows per shared tile (BN * DMAX <= 4096 keeps a tile pair within 32 KiB), DMAX.
//
// Padding: a key that is not real (a padding slot, a compressed block without a real slot) is
// never loaded (its tile row reads as zeros) and never gets a logit, so no NaN or inf it holds
// reaches a real output; its dk and dv are 0. The same holds for keys of other clouds and
// blocks a row does not attend to: a row skips them before any arithmetic.
//
// Layouts: q, k, v, out (rows, H, D) row-major; lse, delta (rows, H) float32; positions
// (rows, dim) float32; masks uint8.

#ifndef SB_DYNAMIC_SHARED
#define SB_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

typedef long long sb_i64;

template <class A>
__device__ __forceinline__ A sb_min(A a, A b) { return a < b ? a : b; }
template <class A>
__device__ __forceinline__ A sb_max(A a, A b) { return a < b ? b : a; }

#define SB_INF __uint_as_float(0x7f800000u)

// ---------------------------------------------------------------------------------------------
// Element types. The 16-bit types are converted in software, the same code on the GPU and in
// the emulator (NVRTC needs no cuda_fp16.h / cuda_bf16.h for them): round to nearest even, NaN
// stays NaN, float16 overflow gives inf.

struct sb_half { unsigned short bits; };
struct sb_bf16 { unsigned short bits; };

__device__ __forceinline__ float sb_to_float(float x) { return x; }
__device__ __forceinline__ float sb_to_float(sb_bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
__device__ __forceinline__ float sb_to_float(sb_half x) {
    const unsigned h = x.bits, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0u) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

template <class T>
__device__ __forceinline__ T sb_from_float(float f);

template <>
__device__ __forceinline__ float sb_from_float<float>(float f) { return f; }

template <>
__device__ __forceinline__ sb_bf16 sb_from_float<sb_bf16>(float f) {
    unsigned u = __float_as_uint(f);
    sb_bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = (unsigned short)((u >> 16) | 0x40u);  // a quiet NaN
        return out;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out.bits = (unsigned short)(u >> 16);
    return out;
}

template <>
__device__ __forceinline__ sb_half sb_from_float<sb_half>(float f) {
    const unsigned u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    sb_half out;
    if (a > 0x7f800000u) {
        out.bits = (unsigned short)(sign | 0x7e00u);
    } else if (a >= 0x477ff000u) {  // >= 65520 rounds to inf
        out.bits = (unsigned short)(sign | 0x7c00u);
    } else if (a < 0x38800000u) {  // below 2^-14: a subnormal half, units of 2^-24
        // f * 2^24 is exact; adding and subtracting 1.5 * 2^23 rounds it to an integer, to even.
        const float scaled = __uint_as_float(a) * 16777216.0f;
        const float rounded = (scaled + 12582912.0f) - 12582912.0f;
        out.bits = (unsigned short)(sign | (unsigned)rounded);
    } else {
        unsigned h = (a >> 13) - (112u << 10);
        const unsigned rest = a & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
        out.bits = (unsigned short)(sign | h);
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// Rows and tiles.

// Row `row` of head h of x (rows, H, D) as float, zeros past D (and everywhere unless `ok`).
template <class T, int DMAX>
__device__ __forceinline__ void sb_load_row(float* dst, const T* __restrict__ x, sb_i64 row, int h, int H,
                                            int D, bool ok) {
    const T* p = x + ((ok ? row : 0) * H + h) * D;
#pragma unroll
    for (int d = 0; d < DMAX; ++d) dst[d] = (ok && d < D) ? sb_to_float(p[d]) : 0.f;
}

template <class T, int DMAX>
__device__ __forceinline__ void sb_store_row(T* __restrict__ x, sb_i64 row, int h, int H, int D,
                                             const float* src, float factor) {
    T* p = x + (row * H + h) * D;
#pragma unroll
    for (int d = 0; d < DMAX; ++d)
        if (d < D) p[d] = sb_from_float<T>(src[d] * factor);
}

template <int DMAX>
__device__ __forceinline__ float sb_dot(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int d = 0; d < DMAX; ++d) s += a[d] * b[d];
    return s;
}

template <int DMAX>
__device__ __forceinline__ void sb_axpy(float* y, float a, const float* x) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d) y[d] += a * x[d];
}

template <int DMAX>
__device__ __forceinline__ void sb_zero(float* y) {
#pragma unroll
    for (int d = 0; d < DMAX; ++d) y[d] = 0.f;
}

// Euclidean distance of two float32 points, by coordinate differences (the expanded
// |a|^2 + |b|^2 - 2ab would cancel for nearby points far from the origin).
__device__ __forceinline__ float sb_distance(const float* a, const float* b, int dim) {
    float s = 0.f;
    for (int c = 0; c < dim; ++c) {
        const float d = a[c] - b[c];
        s += d * d;
    }
    return sqrtf(s);
}

// Block-wide: rows [row0, row0 + n) of head h of x into tile (BN, DMAX) as float; rows past n,
// rows that `real` (when given) marks 0 and columns past D read as zeros, without a load.
template <class T, int NT, int BN, int DMAX>
__device__ __forceinline__ void sb_load_tile(float (*tile)[DMAX], const T* __restrict__ x, sb_i64 row0, int n,
                                             int h, int H, int D, const unsigned char* __restrict__ real) {
    for (int e = threadIdx.x; e < BN * DMAX; e += NT) {
        const int r = e / DMAX, d = e % DMAX;
        float value = 0.f;
        if (r < n && d < D && (real == nullptr || real[row0 + r])) value = sb_to_float(x[((row0 + r) * H + h) * D + d]);
        tile[r][d] = value;
    }
}

template <int BN, int DMAX>
struct sb_key_tile {
    float k[BN][DMAX];
    float v[BN][DMAX];
    unsigned char real[BN];
};

template <int BN, int DMAX>
struct sb_query_tile {
    float q[BN][DMAX];
    float dout[BN][DMAX];
    float lse[BN];
    float delta[BN];
};

// Block-wide: the keys [begin, end) of head h in tiles of BN; `visit(t0, n)` runs on every
// thread for the tile of keys t0 .. t0 + n (tile.k, tile.v, tile.real hold them).
template <class T, int NT, int BN, int DMAX, class Visit>
__device__ __forceinline__ void sb_key_tiles(sb_key_tile<BN, DMAX>& tile, const T* __restrict__ k,
                                             const T* __restrict__ v, const unsigned char* __restrict__ real,
                                             sb_i64 begin, sb_i64 end, int h, int H, int D, Visit visit) {
    for (sb_i64 t0 = begin; t0 < end; t0 += BN) {
        const int n = (int)sb_min(end - t0, (sb_i64)BN);
        for (int r = threadIdx.x; r < BN; r += NT) tile.real[r] = r < n && real[t0 + r];
        sb_load_tile<T, NT, BN, DMAX>(tile.k, k, t0, n, h, H, D, real);
        sb_load_tile<T, NT, BN, DMAX>(tile.v, v, t0, n, h, H, D, real);
        __syncthreads();
        visit(t0, n);
        __syncthreads();
    }
}

// Block-wide: the query rows [begin, end) of head h in tiles of BN, with their dout, lse and
// delta; `visit(t0, n)` runs on every thread for each tile.
template <class T, int NT, int BN, int DMAX, class Visit>
__device__ __forceinline__ void sb_query_tiles(sb_query_tile<BN, DMAX>& tile, const T* __restrict__ q,
                                               const T* __restrict__ dout, const float* __restrict__ lse,
                                               const float* __restrict__ delta, sb_i64 begin, sb_i64 end,
                                               int h, int H, int D, Visit visit) {
    for (sb_i64 t0 = begin; t0 < end; t0 += BN) {
        const int n = (int)sb_min(end - t0, (sb_i64)BN);
        for (int r = threadIdx.x; r < BN; r += NT) {
            tile.lse[r] = r < n ? lse[(t0 + r) * H + h] : 0.f;
            tile.delta[r] = r < n ? delta[(t0 + r) * H + h] : 0.f;
        }
        sb_load_tile<T, NT, BN, DMAX>(tile.q, q, t0, n, h, H, D, nullptr);
        sb_load_tile<T, NT, BN, DMAX>(tile.dout, dout, t0, n, h, H, D, nullptr);
        __syncthreads();
        visit(t0, n);
        __syncthreads();
    }
}

// Block-wide: thread 0 writes the sum of every thread's `value`, in thread order, to *out.
template <int NT>
__device__ __forceinline__ void sb_block_sum(float value, float* out) {
    __shared__ float sb_sums[NT];
    sb_sums[threadIdx.x] = value;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < NT; ++i) s += sb_sums[i];
        *out = s;
    }
}

// ---------------------------------------------------------------------------------------------
// The attention skeletons shared by ball, compressed and selection attention. An op supplies
//   ranges(fn): calls fn(begin, end, tag) for each range of keys (forward, dq) or of queries
//               (dk/dv) that its block's rows need, the same calls on every thread;
//   allowed(row, other, tag): whether query `row` and key `other` (or key `row` and query
//               `other` in dk/dv) attend, given the range's tag; keys that are not real are
//               left out before it is asked.

template <class T>
struct sb_attention_args {
    const T* q;
    const T* k;
    const T* v;
    const float* qpos;  // (M, dim): the query slots' positions
    const float* kpos;  // (keys, dim): the key slots' positions, or the compressed blocks' centers
    const unsigned char* kreal;  // (keys,): which keys are real
    const float* sigma;  // (H,) float32, read when has_sigma
    sb_i64 M, keys;
    int H, D, dim, has_sigma;
    float scale;
};

// Logit of a query row against a key row (float), and the distance of their positions (0
// without sigma).
template <int DMAX>
__device__ __forceinline__ float sb_logit(const float* a, const float* b, float scale, int has_sigma, float sig,
                                          const float* pa, const float* pb, int dim, float* dist) {
    const float s = scale * sb_dot<DMAX>(a, b);
    *dist = has_sigma ? sb_distance(pa, pb, dim) : 0.f;
    return has_sigma ? s + sig * *dist : s;
}

// One query row's streamed softmax: running max m, sum l and output acc.
template <int DMAX>
struct sb_softmax {
    float m, l, acc[DMAX];

    __device__ __forceinline__ void init() {
        m = -SB_INF;
        l = 0.f;
        sb_zero<DMAX>(acc);
    }

    __device__ __forceinline__ void add(float s, const float* v) {
        if (s > m) {  // the first key: exp(-inf) = 0 clears l and acc
            const float correction = expf(m - s);
            l *= correction;
#pragma unroll
            for (int d = 0; d < DMAX; ++d) acc[d] *= correction;
            m = s;
        }
        const float p = expf(s - m);
        l += p;
        sb_axpy<DMAX>(acc, p, v);
    }
};

template <class T, int NT, int BN, int DMAX, class Ranges, class Allowed>
__device__ __forceinline__ void sb_attention_fwd(const sb_attention_args<T>& a, T* __restrict__ out,
                                                 float* __restrict__ lse, Ranges ranges, Allowed allowed) {
    __shared__ sb_key_tile<BN, DMAX> tile;
    const int h = blockIdx.y;
    const sb_i64 row = (sb_i64)blockIdx.x * NT + threadIdx.x;
    const bool active = row < a.M;
    const float sig = a.has_sigma ? a.sigma[h] : 0.f;
    const float* qpos = a.qpos + (active ? row : 0) * a.dim;
    float q[DMAX];
    sb_load_row<T, DMAX>(q, a.q, row, h, a.H, a.D, active);
    sb_softmax<DMAX> st;
    st.init();
    ranges([&](sb_i64 begin, sb_i64 end, sb_i64 tag) {
        sb_key_tiles<T, NT, BN, DMAX>(tile, a.k, a.v, a.kreal, begin, end, h, a.H, a.D, [&](sb_i64 t0, int n) {
            if (!active) return;
            for (int j = 0; j < n; ++j) {
                if (!tile.real[j] || !allowed(row, t0 + j, tag)) continue;
                float dist;
                const float s = sb_logit<DMAX>(q, tile.k[j], a.scale, a.has_sigma, sig, qpos,
                                               a.kpos + (t0 + j) * a.dim, a.dim, &dist);
                st.add(s, tile.v[j]);
            }
        });
    });
    if (!active) return;
    // A row with keys has l >= 1 (its largest term is exp(0)); one without gets 0 and -inf.
    const bool empty = st.l == 0.f;
    sb_store_row<T, DMAX>(out, row, h, a.H, a.D, st.acc, empty ? 0.f : 1.f / st.l);
    lse[row * a.H + h] = empty ? -SB_INF : st.m + logf(st.l);
}

// dq, the softmax row term delta_i = sum_j P_ij dP_ij (stored for the dk/dv kernel) and the
// sigma gradient's sum over the block's rows (partial[h, blockIdx.x]). delta is formed from the
// recomputed P and dP in a first pass over the keys, not as dO . O: the stored half-precision
// output would carry its rounding into every gradient.
template <class T, int NT, int BN, int DMAX, class Ranges, class Allowed>
__device__ __forceinline__ void sb_attention_bwd_dq(const sb_attention_args<T>& a, const T* __restrict__ dout,
                                                    const float* __restrict__ lse, T* __restrict__ dq,
                                                    float* __restrict__ delta_out, float* __restrict__ partial,
                                                    Ranges ranges, Allowed allowed) {
    __shared__ sb_key_tile<BN, DMAX> tile;
    const int h = blockIdx.y;
    const sb_i64 row = (sb_i64)blockIdx.x * NT + threadIdx.x;
    const bool active = row < a.M;
    const float sig = a.has_sigma ? a.sigma[h] : 0.f;
    const float* qpos = a.qpos + (active ? row : 0) * a.dim;
    float q[DMAX], dout_row[DMAX], acc[DMAX];
    sb_load_row<T, DMAX>(q, a.q, row, h, a.H, a.D, active);
    sb_load_row<T, DMAX>(dout_row, dout, row, h, a.H, a.D, active);
    sb_zero<DMAX>(acc);
    const float row_lse = active ? lse[row * a.H + h] : 0.f;
    float delta = 0.f, dsig = 0.f;
    for (int pass = 0; pass < 2; ++pass) {
        ranges([&](sb_i64 begin, sb_i64 end, sb_i64 tag) {
            sb_key_tiles<T, NT, BN, DMAX>(tile, a.k, a.v, a.kreal, begin, end, h, a.H, a.D, [&](sb_i64 t0, int n) {
                if (!active) return;
                for (int j = 0; j < n; ++j) {
                    if (!tile.real[j] || !allowed(row, t0 + j, tag)) continue;
                    float dist;
                    const float s = sb_logit<DMAX>(q, tile.k[j], a.scale, a.has_sigma, sig, qpos,
                                                   a.kpos + (t0 + j) * a.dim, a.dim, &dist);
                    const float p = expf(s - row_lse);
                    const float dp = sb_dot<DMAX>(dout_row, tile.v[j]);
                    if (pass == 0) {
                        delta += p * dp;
                    } else {
                        const float ds = p * (dp - delta);
                        sb_axpy<DMAX>(acc, ds, tile.k[j]);
                        dsig += ds * dist;
                    }
                }
            });
        });
    }
    if (active) {
        sb_store_row<T, DMAX>(dq, row, h, a.H, a.D, acc, a.scale);
        delta_out[row * a.H + h] = delta;
    }
    if (a.has_sigma) sb_block_sum<NT>(dsig, partial + (sb_i64)h * gridDim.x + blockIdx.x);
}

// dk and dv: a block owns NT keys and streams the queries that attend to them (no atomics).
template <class T, int NT, int BN, int DMAX, class Ranges, class Allowed>
__device__ __forceinline__ void sb_attention_bwd_dkv(const sb_attention_args<T>& a, const T* __restrict__ dout,
                                                     const float* __restrict__ lse,
                                                     const float* __restrict__ delta, T* __restrict__ dk,
                                                     T* __restrict__ dv, Ranges ranges, Allowed allowed) {
    __shared__ sb_query_tile<BN, DMAX> tile;
    const int h = blockIdx.y;
    const sb_i64 key = (sb_i64)blockIdx.x * NT + threadIdx.x;
    const bool active = key < a.keys;
    const bool real = active && a.kreal[key];
    const float sig = a.has_sigma ? a.sigma[h] : 0.f;
    const float* kpos = a.kpos + (active ? key : 0) * a.dim;
    float k[DMAX], v[DMAX], dk_acc[DMAX], dv_acc[DMAX];
    sb_load_row<T, DMAX>(k, a.k, key, h, a.H, a.D, real);
    sb_load_row<T, DMAX>(v, a.v, key, h, a.H, a.D, real);
    sb_zero<DMAX>(dk_acc);
    sb_zero<DMAX>(dv_acc);
    ranges([&](sb_i64 begin, sb_i64 end, sb_i64 tag) {
        sb_query_tiles<T, NT, BN, DMAX>(tile, a.q, dout, lse, delta, begin, end, h, a.H, a.D, [&](sb_i64 t0, int n) {
            if (!real) return;
            for (int i = 0; i < n; ++i) {
                if (!allowed(key, t0 + i, tag)) continue;
                float dist;
                const float s = sb_logit<DMAX>(tile.q[i], k, a.scale, a.has_sigma, sig,
                                               a.qpos + (t0 + i) * a.dim, kpos, a.dim, &dist);
                const float p = expf(s - tile.lse[i]);
                sb_axpy<DMAX>(dv_acc, p, tile.dout[i]);
                const float ds = p * (sb_dot<DMAX>(v, tile.dout[i]) - tile.delta[i]);
                sb_axpy<DMAX>(dk_acc, ds, tile.q[i]);
            }
        });
    });
    if (!active) return;
    sb_store_row<T, DMAX>(dk, key, h, a.H, a.D, dk_acc, a.scale);
    sb_store_row<T, DMAX>(dv, key, h, a.H, a.D, dv_acc, 1.f);
}

#define SB_ATTENTION_PARAMS                                                                          \
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,                      \
        const float *__restrict__ qpos, const float *__restrict__ kpos,                              \
        const unsigned char *__restrict__ kreal, const float *__restrict__ sigma, sb_i64 M, sb_i64 keys, \
        int H, int D, int dim, int has_sigma, float scale
#define SB_ATTENTION_ARGS {q, k, v, qpos, kpos, kreal, sigma, M, keys, H, D, dim, has_sigma, scale}

// ---------------------------------------------------------------------------------------------
// Ball attention: query i attends to the real slots of its aligned `ball`-block. A block's rows
// (NT of them) and their balls lie in the aligned max(NT, ball) span; keys of another ball than
// a row's are skipped by that row.

struct sb_ball_keys {
    sb_i64 M;
    int ball, span;
    __device__ __forceinline__ sb_ball_keys(sb_i64 M_, int ball_, int nt) : M(M_), ball(ball_), span(sb_max(nt, ball_)) {}
    template <class Fn>
    __device__ __forceinline__ void operator()(sb_i64 first, Fn fn) const {
        const sb_i64 begin = first / span * span;
        fn(begin, sb_min(begin + span, M), (sb_i64)0);
    }
};

template <class T, int NT, int BN, int DMAX>
__global__ void sb_ball_fwd(SB_ATTENTION_PARAMS, int ball, T* __restrict__ out, float* __restrict__ lse) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_ball_keys span(M, ball, NT);
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT;
    sb_attention_fwd<T, NT, BN, DMAX>(
        a, out, lse, [&](auto fn) { span(row0, fn); },
        [&](sb_i64 row, sb_i64 key, sb_i64) { return row / ball == key / ball; });
}

template <class T, int NT, int BN, int DMAX>
__global__ void sb_ball_bwd_dq(SB_ATTENTION_PARAMS, int ball, const T* __restrict__ dout,
                               const float* __restrict__ lse, T* __restrict__ dq, float* __restrict__ delta,
                               float* __restrict__ partial) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_ball_keys span(M, ball, NT);
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT;
    sb_attention_bwd_dq<T, NT, BN, DMAX>(
        a, dout, lse, dq, delta, partial, [&](auto fn) { span(row0, fn); },
        [&](sb_i64 row, sb_i64 key, sb_i64) { return row / ball == key / ball; });
}

template <class T, int NT, int BN, int DMAX>
__global__ void sb_ball_bwd_dkv(SB_ATTENTION_PARAMS, int ball, const T* __restrict__ dout,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                T* __restrict__ dk, T* __restrict__ dv) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_ball_keys span(M, ball, NT);
    const sb_i64 key0 = (sb_i64)blockIdx.x * NT;
    sb_attention_bwd_dkv<T, NT, BN, DMAX>(
        a, dout, lse, delta, dk, dv, [&](auto fn) { span(key0, fn); },
        [&](sb_i64 key, sb_i64 row, sb_i64) { return row / ball == key / ball; });
}

// ---------------------------------------------------------------------------------------------
// Compressed attention: query i attends to the compressed blocks (with a real slot) of its
// cloud. cloud_lo, cloud_hi (M / unit,) int64: the slot range of the cloud of each aligned
// unit-block (clouds own multiples of `unit` slots). A block streams the union of its rows'
// clouds; each row skips the keys of other clouds.

template <class T, int NT, int BN, int DMAX>
__global__ void sb_compressed_fwd(SB_ATTENTION_PARAMS, const sb_i64* __restrict__ cloud_lo,
                                  const sb_i64* __restrict__ cloud_hi, int unit, int compress,
                                  T* __restrict__ out, float* __restrict__ lse) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT, last = sb_min(row0 + NT, M) - 1;
    const sb_i64 row = sb_min(row0 + (sb_i64)threadIdx.x, last);
    const sb_i64 lo = cloud_lo[row / unit] / compress, hi = cloud_hi[row / unit] / compress;
    sb_attention_fwd<T, NT, BN, DMAX>(
        a, out, lse,
        [&](auto fn) { fn(cloud_lo[row0 / unit] / compress, cloud_hi[last / unit] / compress, (sb_i64)0); },
        [&](sb_i64, sb_i64 key, sb_i64) { return key >= lo && key < hi; });
}

template <class T, int NT, int BN, int DMAX>
__global__ void sb_compressed_bwd_dq(SB_ATTENTION_PARAMS, const sb_i64* __restrict__ cloud_lo,
                                     const sb_i64* __restrict__ cloud_hi, int unit, int compress,
                                     const T* __restrict__ dout, const float* __restrict__ lse, T* __restrict__ dq,
                                     float* __restrict__ delta, float* __restrict__ partial) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT, last = sb_min(row0 + NT, M) - 1;
    const sb_i64 row = sb_min(row0 + (sb_i64)threadIdx.x, last);
    const sb_i64 lo = cloud_lo[row / unit] / compress, hi = cloud_hi[row / unit] / compress;
    sb_attention_bwd_dq<T, NT, BN, DMAX>(
        a, dout, lse, dq, delta, partial,
        [&](auto fn) { fn(cloud_lo[row0 / unit] / compress, cloud_hi[last / unit] / compress, (sb_i64)0); },
        [&](sb_i64, sb_i64 key, sb_i64) { return key >= lo && key < hi; });
}

template <class T, int NT, int BN, int DMAX>
__global__ void sb_compressed_bwd_dkv(SB_ATTENTION_PARAMS, const sb_i64* __restrict__ cloud_lo,
                                      const sb_i64* __restrict__ cloud_hi, int unit, int compress,
                                      const T* __restrict__ dout, const float* __restrict__ lse,
                                      const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const sb_i64 key0 = (sb_i64)blockIdx.x * NT, last = sb_min(key0 + NT, keys) - 1;
    const sb_i64 key = sb_min(key0 + (sb_i64)threadIdx.x, last);
    const sb_i64 lo = cloud_lo[key * compress / unit], hi = cloud_hi[key * compress / unit];
    sb_attention_bwd_dkv<T, NT, BN, DMAX>(
        a, dout, lse, delta, dk, dv,
        [&](auto fn) { fn(cloud_lo[key0 * compress / unit], cloud_hi[last * compress / unit], (sb_i64)0); },
        [&](sb_i64, sb_i64 row, sb_i64) { return row >= lo && row < hi; });
}

// ---------------------------------------------------------------------------------------------
// Selection attention: the queries of group g (aligned `group`-blocks) attend, for head h, to
// the real slots of the `select`-blocks indices[g, h, :] (int32, -1: none). A block's rows
// may span several groups: it streams each group's blocks in turn (the range's tag is the
// group), the other groups' rows waiting.

template <class T, int NT, int BN, int DMAX>
__global__ void sb_selection_fwd(SB_ATTENTION_PARAMS, const int* __restrict__ indices, int top_k, int select,
                                 int group, T* __restrict__ out, float* __restrict__ lse) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const int h = blockIdx.y;
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT, last = sb_min(row0 + NT, M) - 1;
    sb_attention_fwd<T, NT, BN, DMAX>(
        a, out, lse,
        [&](auto fn) {
            for (sb_i64 g = row0 / group; g <= last / group; ++g)
                for (int t = 0; t < top_k; ++t) {
                    const sb_i64 block = indices[(g * H + h) * top_k + t];
                    if (block >= 0) fn(block * select, (block + 1) * select, g);
                }
        },
        [&](sb_i64 row, sb_i64, sb_i64 g) { return row / group == g; });
}

template <class T, int NT, int BN, int DMAX>
__global__ void sb_selection_bwd_dq(SB_ATTENTION_PARAMS, const int* __restrict__ indices, int top_k,
                                    int select, int group, const T* __restrict__ dout,
                                    const float* __restrict__ lse, T* __restrict__ dq, float* __restrict__ delta,
                                    float* __restrict__ partial) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const int h = blockIdx.y;
    const sb_i64 row0 = (sb_i64)blockIdx.x * NT, last = sb_min(row0 + NT, M) - 1;
    sb_attention_bwd_dq<T, NT, BN, DMAX>(
        a, dout, lse, dq, delta, partial,
        [&](auto fn) {
            for (sb_i64 g = row0 / group; g <= last / group; ++g)
                for (int t = 0; t < top_k; ++t) {
                    const sb_i64 block = indices[(g * H + h) * top_k + t];
                    if (block >= 0) fn(block * select, (block + 1) * select, g);
                }
        },
        [&](sb_i64 row, sb_i64, sb_i64 g) { return row / group == g; });
}

// dk, dv: the selection inverted (ops.py) into, per (head, select-block), the ascending list of
// groups that chose it: groups[row_ptr[h * blocks + w] : row_ptr[h * blocks + w + 1]]. A block
// of NT keys walks the lists of its select-blocks (the range's tag is the select-block).
template <class T, int NT, int BN, int DMAX>
__global__ void sb_selection_bwd_dkv(SB_ATTENTION_PARAMS, const sb_i64* __restrict__ row_ptr,
                                     const int* __restrict__ groups, int select, int group,
                                     const T* __restrict__ dout, const float* __restrict__ lse,
                                     const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
    const sb_attention_args<T> a = SB_ATTENTION_ARGS;
    const int h = blockIdx.y;
    const sb_i64 blocks = keys / select;
    const sb_i64 key0 = (sb_i64)blockIdx.x * NT, last = sb_min(key0 + NT, keys) - 1;
    sb_attention_bwd_dkv<T, NT, BN, DMAX>(
        a, dout, lse, delta, dk, dv,
        [&](auto fn) {
            for (sb_i64 w = key0 / select; w <= last / select; ++w)
                for (sb_i64 e = row_ptr[h * blocks + w]; e < row_ptr[h * blocks + w + 1]; ++e) {
                    const sb_i64 g = groups[e];
                    fn(g * group, (g + 1) * group, w);
                }
        },
        [&](sb_i64 key, sb_i64, sb_i64 w) { return key / select == w; });
}

// ---------------------------------------------------------------------------------------------
// select_blocks: one block per (group, head). The block streams the compressed keys of the
// group's cloud NT at a time, one per thread; each thread sums exp(logit - lse) over the
// group's real queries (in tiles of BN rows), then thread 0 adds the sums up per select-block in
// key order and keeps a running top-k (dynamic shared memory: top_k floats and top_k ints).
// Select-blocks arrive in ascending id order, so a later block replaces a kept one only when
// strictly more important: ties go to the lower id. exclude > 0: blocks inside the aligned
// exclude-block holding the group are not candidates.

template <class T, int NT, int BN, int DMAX>
__global__ void sb_select_blocks(const T* __restrict__ q, const T* __restrict__ k_cmp,
                                 const float* __restrict__ lse, const float* __restrict__ pos,
                                 const float* __restrict__ centers, const unsigned char* __restrict__ mask,
                                 const unsigned char* __restrict__ cblock_real,
                                 const unsigned char* __restrict__ sblock_real, const sb_i64* __restrict__ cloud_lo,
                                 const sb_i64* __restrict__ cloud_hi, const float* __restrict__ sigma, int H,
                                 int D, int dim, int has_sigma, float scale, int unit, int compress, int select,
                                 int group, int top_k, int exclude, int* __restrict__ out) {
    __shared__ float queries[BN][DMAX];
    __shared__ float query_lse[BN];
    __shared__ unsigned char query_real[BN];
    __shared__ float sums[NT];
    SB_DYNAMIC_SHARED(smem);
    float* top_importance = reinterpret_cast<float*>(smem);
    int* top_id = reinterpret_cast<int*>(smem + sizeof(float) * top_k);
    const int h = blockIdx.y;
    const sb_i64 row0 = (sb_i64)blockIdx.x * group;
    const int per_block = select / compress;  // compressed blocks per select-block
    const sb_i64 lo = cloud_lo[row0 / unit] / compress, hi = cloud_hi[row0 / unit] / compress;
    const sb_i64 excl_lo = exclude > 0 ? row0 / exclude * exclude : 0, excl_hi = exclude > 0 ? excl_lo + exclude : 0;
    const float sig = has_sigma ? sigma[h] : 0.f;
    int count = 0;  // thread 0's state
    float running = 0.f;
    for (sb_i64 chunk = lo; chunk < hi; chunk += NT) {
        const sb_i64 key = chunk + threadIdx.x;
        const bool use = key < hi && cblock_real[key];
        float kr[DMAX];
        sb_load_row<T, DMAX>(kr, k_cmp, key, h, H, D, use);
        const float* kpos = centers + (use ? key : 0) * dim;
        float sum = 0.f;
        for (sb_i64 t0 = row0; t0 < row0 + group; t0 += BN) {
            const int n = (int)sb_min((sb_i64)BN, row0 + group - t0);
            for (int r = threadIdx.x; r < BN; r += NT) {
                query_real[r] = r < n && mask[t0 + r];
                query_lse[r] = query_real[r] ? lse[(t0 + r) * H + h] : 0.f;
            }
            sb_load_tile<T, NT, BN, DMAX>(queries, q, t0, n, h, H, D, mask);
            __syncthreads();
            if (use)
                for (int i = 0; i < n; ++i) {
                    if (!query_real[i]) continue;
                    float dist;
                    const float s = sb_logit<DMAX>(queries[i], kr, scale, has_sigma, sig, pos + (t0 + i) * dim,
                                                   kpos, dim, &dist);
                    sum += expf(s - query_lse[i]);
                }
            __syncthreads();
        }
        sums[threadIdx.x] = sum;
        __syncthreads();
        if (threadIdx.x == 0) {
            const int n = (int)sb_min((sb_i64)NT, hi - chunk);
            for (int j = 0; j < n; ++j) {
                running += sums[j];
                const sb_i64 c = chunk + j;
                if ((c + 1) % per_block != 0) continue;
                const sb_i64 w = c / per_block;
                const float importance = running;
                running = 0.f;
                const bool excluded = exclude > 0 && w * select >= excl_lo && (w + 1) * select <= excl_hi;
                if (!sblock_real[w] || excluded) continue;
                if (count < top_k) {
                    top_importance[count] = importance;
                    top_id[count] = (int)w;
                    ++count;
                    continue;
                }
                int worst = 0;  // the least important kept block; among equals the highest id
                for (int t = 1; t < top_k; ++t)
                    if (top_importance[t] < top_importance[worst] ||
                        (top_importance[t] == top_importance[worst] && top_id[t] > top_id[worst]))
                        worst = t;
                if (importance > top_importance[worst]) {
                    top_importance[worst] = importance;
                    top_id[worst] = (int)w;
                }
            }
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    for (int t = 1; t < count; ++t)  // ids ascending (insertion sort of at most top_k)
        for (int u = t; u > 0 && top_id[u - 1] > top_id[u]; --u) {
            const int id = top_id[u];
            top_id[u] = top_id[u - 1];
            top_id[u - 1] = id;
        }
    int* dst = out + ((sb_i64)blockIdx.x * H + h) * top_k;
    for (int t = 0; t < top_k; ++t) dst[t] = t < count ? top_id[t] : -1;
}

// ---------------------------------------------------------------------------------------------
// compress: the mean over the real slots of each aligned `compress`-block; a thread per
// (block, column of the H * D row), slots summed in order.

template <class T, int NT>
__global__ void sb_compress_fwd(const T* __restrict__ x, const unsigned char* __restrict__ mask,
                                sb_i64 columns, int compress, T* __restrict__ out) {
    const sb_i64 block = blockIdx.x, column = (sb_i64)blockIdx.y * NT + threadIdx.x;
    if (column >= columns) return;
    float sum = 0.f;
    int count = 0;
    for (int r = 0; r < compress; ++r) {
        const sb_i64 slot = block * compress + r;
        if (!mask[slot]) continue;
        sum += sb_to_float(x[slot * columns + column]);
        ++count;
    }
    out[block * columns + column] = sb_from_float<T>(count ? sum / (float)count : 0.f);
}

template <class T, int NT>
__global__ void sb_compress_bwd(const T* __restrict__ dout, const unsigned char* __restrict__ mask,
                                sb_i64 columns, int compress, T* __restrict__ dx) {
    const sb_i64 block = blockIdx.x, column = (sb_i64)blockIdx.y * NT + threadIdx.x;
    if (column >= columns) return;
    int count = 0;
    for (int r = 0; r < compress; ++r) count += mask[block * compress + r] ? 1 : 0;
    const float g = count ? sb_to_float(dout[block * columns + column]) / (float)count : 0.f;
    for (int r = 0; r < compress; ++r) {
        const sb_i64 slot = block * compress + r;
        dx[slot * columns + column] = sb_from_float<T>(mask[slot] ? g : 0.f);
    }
}
