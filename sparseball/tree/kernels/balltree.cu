// Kernels of the CuPy ball-tree builder (sparseball/tree/cupy_builder.py; the tree is defined in
// docs/contract.md, section 2). Compiled by NVRTC through cupy.RawModule; CI compiles this file
// with nvcc for sm_80 and sm_90 and runs it on the CPU through a thread emulator
// (tests/cuda_emu.py), which is why only __syncthreads, __syncwarp and plain shared memory are
// used (no shuffles, no atomics) and why SB_DYNAMIC_SHARED wraps `extern __shared__`.
//
// Data layout, shared by every kernel:
//   "items" are the points being sorted (input points, or the slots of a rotated ordering);
//   coords (D, n_items) float64, axis-major, -0.0 already mapped to +0.0;
//   ids    (D, n_items) int32: for each axis, the item ids grouped by tree node (segment of
//          positions) and, inside a node, sorted by (coordinate along that axis, item id).
//   Node tables are int64 (4, K) arrays, row-major, nodes sorted by their first position `lo`.

#ifndef SB_BLOCK
#define SB_BLOCK 256  // threads per block of every kernel (a multiple of 32)
#endif
#ifndef SB_ITEMS
#define SB_ITEMS 8  // positions per thread in the tile kernels and in sb_subtree
#endif
#define SB_TILE (SB_BLOCK * SB_ITEMS)
#define SB_WARPS (SB_BLOCK / 32)

#ifndef SB_DYNAMIC_SHARED
#define SB_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

typedef long long sb_i64;
typedef unsigned long long sb_u64;

// Exclusive prefix sum over the block of one value per thread; `*total` gets the block's sum.
// Every thread of the block must call it (it synchronizes); it ends with a barrier so that it
// can be called again at once. Values are summed as 64-bit words: sb_subtree packs four 16-bit
// counters into one word (no counter exceeds 65535, so no carry crosses a field).
__device__ __forceinline__ sb_u64 sb_block_exclusive_scan(sb_u64 value, sb_u64* total) {
    __shared__ sb_u64 sb_scan_buf[SB_BLOCK];
    __shared__ sb_u64 sb_warp_total[SB_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    sb_scan_buf[tid] = value;
    __syncwarp();
    for (int d = 1; d < 32; d <<= 1) {  // Kogge-Stone inside each warp
        const sb_u64 t = lane >= d ? sb_scan_buf[tid - d] : 0;
        __syncwarp();
        sb_scan_buf[tid] += t;
        __syncwarp();
    }
    const sb_u64 inclusive = sb_scan_buf[tid];
    if (lane == 31) sb_warp_total[warp] = inclusive;
    __syncthreads();
    sb_u64 before = 0, all = 0;  // SB_WARPS is small: every thread adds the warp totals itself
    for (int w = 0; w < SB_WARPS; ++w) {
        const sb_u64 x = sb_warp_total[w];
        if (w < warp) before += x;
        all += x;
    }
    *total = all;
    __syncthreads();
    return before + inclusive - value;
}

// Split rule (contract, invariant 2) of a node of `size` slots holding `n` real items: how many
// items and slots go to the left child.
__device__ __forceinline__ void sb_split(int n, int size, int ball_size, int* n_left, int* size_left) {
    if (size > ball_size) {  // b balls: floor(b/2) balls and floor(n * floor(b/2) / b) items left
        const int b = size / ball_size, b_left = b >> 1;
        *n_left = (int)(((sb_i64)n * b_left) / b);
        *size_left = b_left * ball_size;
    } else {  // 2c slots, c <= P/2: floor(n/2) items left
        *n_left = n >> 1;
        *size_left = size >> 1;
    }
}

// ---------------------------------------------------------------------------------------------
// One level of the large nodes (more items than fit one block), in four launches:
// sb_level_flags, sb_level_count, sb_tile_scan, sb_level_scatter.
// nodes (4, K): lo, n, n_left, left_before (sum of n_left over the nodes before it).
// Positions outside every node of the table (nodes already handed to sb_subtree) pass through.

// One thread per position p: finds p's node, the node's split axis (largest max - min spread,
// ties to the lowest axis; max and min are the ends of the node's segment in each axis's sorted
// array) and marks the item at p of that axis's array as going left or right.
// Items of pass-through positions are marked "right" (0) so that they count for nothing.
extern "C" __global__ void sb_level_flags(const double* __restrict__ coords, const int* __restrict__ ids,
                                          const sb_i64* __restrict__ nodes, int K, int D, int n_items,
                                          unsigned char* __restrict__ goes_left, int* __restrict__ pnode) {
    const sb_i64 p = (sb_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= n_items) return;
    int a = 0, b = K;  // last node with lo <= p
    while (a < b) {
        const int mid = (a + b) >> 1;
        if (nodes[mid] <= p) a = mid + 1; else b = mid;
    }
    const int k = a - 1;
    if (k < 0 || p >= nodes[k] + nodes[K + k]) {
        goes_left[ids[p]] = 0;  // every axis's array holds the same items at pass-through positions
        pnode[p] = -1;
        return;
    }
    const sb_i64 lo = nodes[k], last = lo + nodes[K + k] - 1;
    int axis = 0;
    double best = -1.0;
    for (int d = 0; d < D; ++d) {
        const sb_i64 row = (sb_i64)d * n_items;
        const double spread = coords[row + ids[row + last]] - coords[row + ids[row + lo]];
        if (spread > best) { best = spread; axis = d; }
    }
    goes_left[ids[(sb_i64)axis * n_items + p]] = (p - lo) < nodes[2 * K + k] ? 1 : 0;
    pnode[p] = k;
}

// Grid (ntiles, D): the number of left-going items in each tile of SB_TILE positions.
extern "C" __global__ void sb_level_count(const int* __restrict__ ids, const unsigned char* __restrict__ goes_left,
                                          int n_items, int ntiles, int* __restrict__ tile_count) {
    const int tile = blockIdx.x, d = blockIdx.y;
    const int* row = ids + (sb_i64)d * n_items;
    int count = 0;
    for (int j = 0; j < SB_ITEMS; ++j) {  // striped: coalesced, and order does not matter here
        const sb_i64 p = (sb_i64)tile * SB_TILE + (sb_i64)j * SB_BLOCK + threadIdx.x;
        if (p < n_items) count += goes_left[row[p]];
    }
    sb_u64 total;
    sb_block_exclusive_scan((sb_u64)count, &total);
    if (threadIdx.x == 0) tile_count[(sb_i64)d * ntiles + tile] = (int)total;
}

// Grid (D,): exclusive prefix sum of the tile counts of each axis.
extern "C" __global__ void sb_tile_scan(const int* __restrict__ tile_count, int ntiles, int* __restrict__ tile_offset) {
    const sb_i64 row = (sb_i64)blockIdx.x * ntiles;
    sb_u64 carry = 0;
    for (int base = 0; base < ntiles; base += SB_BLOCK) {
        const int t = base + threadIdx.x;
        const sb_u64 value = t < ntiles ? (sb_u64)tile_count[row + t] : 0;
        sb_u64 total;
        const sb_u64 before = sb_block_exclusive_scan(value, &total);
        if (t < ntiles) tile_offset[row + t] = (int)(carry + before);
        carry += total;
    }
}

// Grid (ntiles, D): stable partition of every node's segment of every axis's array: items going
// left first, each side keeping its order (so the arrays stay sorted inside the children).
// g = left-going items before position p in this axis's array; g - left_before = those of p's
// own node.
extern "C" __global__ void sb_level_scatter(const int* __restrict__ ids_in, int* __restrict__ ids_out,
                                            const unsigned char* __restrict__ goes_left,
                                            const int* __restrict__ pnode, const sb_i64* __restrict__ nodes,
                                            int K, int n_items, int ntiles, const int* __restrict__ tile_offset) {
    const int tile = blockIdx.x, d = blockIdx.y;
    const sb_i64 row = (sb_i64)d * n_items;
    const sb_i64 first = (sb_i64)tile * SB_TILE + (sb_i64)threadIdx.x * SB_ITEMS;  // blocked
    int item[SB_ITEMS];
    unsigned char flag[SB_ITEMS];
    int count = 0;
    for (int j = 0; j < SB_ITEMS; ++j) {
        const sb_i64 p = first + j;
        item[j] = p < n_items ? ids_in[row + p] : 0;
        flag[j] = p < n_items ? goes_left[item[j]] : 0;
        count += flag[j];
    }
    sb_u64 total;
    sb_i64 g = (sb_i64)tile_offset[(sb_i64)d * ntiles + tile] + (sb_i64)sb_block_exclusive_scan((sb_u64)count, &total);
    for (int j = 0; j < SB_ITEMS; ++j) {
        const sb_i64 p = first + j;
        if (p >= n_items) break;
        const int k = pnode[p];
        sb_i64 dst = p;
        if (k >= 0) {
            const sb_i64 lo = nodes[k], n_left = nodes[2 * K + k], r = g - nodes[3 * K + k];
            dst = flag[j] ? lo + r : lo + n_left + (p - lo - r);
        }
        ids_out[row + dst] = item[j];
        g += flag[j];
    }
}

// ---------------------------------------------------------------------------------------------
// Whole subtrees of small nodes: one block per node of at most `cap` items (cap <= SB_TILE,
// a power of two) builds every level below it in shared memory and writes perm and mask of
// its real slots. nodes (4, K): lo, n, slot (first slot), size (slot count).
// Dynamic shared memory: cap * (11 + 2 * D) bytes.
//
// Positions are owned in blocked order, i = tid * SB_ITEMS + j; each thread keeps the node
// (segment lo, item count n, slot offset, slot count) of each of its positions in registers,
// so a level needs no node table: a position's next node is the child that covers it.
extern "C" __global__ void sb_subtree(const double* __restrict__ coords, const int* __restrict__ ids,
                                      const sb_i64* __restrict__ nodes, int K, int D, int n_items, int cap,
                                      int ball_size, int* __restrict__ local_of, sb_i64* __restrict__ perm,
                                      unsigned char* __restrict__ mask) {
    const int node = blockIdx.x, tid = threadIdx.x;
    const sb_i64 lo0 = nodes[node], slot0 = nodes[2 * K + node];
    const int n = (int)nodes[K + node], size0 = (int)nodes[3 * K + node];
    if (n == 1) {  // one item: the last slot of the node (each left child gets floor(1/2) = 0)
        if (tid == 0) {
            perm[slot0 + size0 - 1] = ids[lo0];
            mask[slot0 + size0 - 1] = 1;
        }
        return;
    }
    SB_DYNAMIC_SHARED(smem);
    int* gid = (int*)smem;                                                  // local -> item id
    int* left_before = gid + cap;                                           // per segment start
    unsigned short* loc = (unsigned short*)(left_before + cap);             // (D, cap) local ids
    unsigned short* axis_of = loc + (sb_i64)D * cap;                        // per segment start
    unsigned char* flag = (unsigned char*)(axis_of + cap);                  // per local id

    // Local id of an item = its position in axis 0's array; local_of (global, one entry per
    // item, each block touching only its own) maps item ids back to local ids.
    for (int i = tid; i < n; i += SB_BLOCK) {
        const int g = ids[lo0 + i];
        gid[i] = g;
        local_of[g] = i;
        loc[i] = (unsigned short)i;
    }
    __syncthreads();
    for (int d = 1; d < D; ++d)
        for (int i = tid; i < n; i += SB_BLOCK)
            loc[(sb_i64)d * cap + i] = (unsigned short)local_of[ids[(sb_i64)d * n_items + lo0 + i]];
    __syncthreads();

    int s_lo[SB_ITEMS], s_n[SB_ITEMS], s_slot[SB_ITEMS], s_size[SB_ITEMS];
    for (int j = 0; j < SB_ITEMS; ++j) {
        s_lo[j] = 0;
        s_n[j] = tid * SB_ITEMS + j < n ? n : 0;  // n < 2 marks a finished (or absent) position
        s_slot[j] = 0;
        s_size[j] = size0;
    }
    int levels = 0;  // depth of the subtree: until the largest node has one slot
    for (int s = size0; s > 1; ++levels) s = s > ball_size ? ((s / ball_size + 1) >> 1) * ball_size : s >> 1;

    for (int level = 0; level < levels; ++level) {
        // 1. The split axis of each live node, by the thread owning its first position.
        for (int j = 0; j < SB_ITEMS; ++j) {
            const int i = tid * SB_ITEMS + j;
            if (s_n[j] >= 2 && i == s_lo[j]) {
                int axis = 0;
                double best = -1.0;
                for (int d = 0; d < D; ++d) {
                    const unsigned short* l = loc + (sb_i64)d * cap;
                    const double* c = coords + (sb_i64)d * n_items;
                    const double spread = c[gid[l[i + s_n[j] - 1]]] - c[gid[l[i]]];
                    if (spread > best) { best = spread; axis = d; }
                }
                axis_of[i] = (unsigned short)axis;
            }
        }
        __syncthreads();
        // 2. Mark the first n_left items of each live node along its axis as going left.
        for (int j = 0; j < SB_ITEMS; ++j) {
            if (s_n[j] < 2) continue;
            const int i = tid * SB_ITEMS + j;
            int n_left, size_left;
            sb_split(s_n[j], s_size[j], ball_size, &n_left, &size_left);
            flag[loc[(sb_i64)axis_of[s_lo[j]] * cap + i]] = (i - s_lo[j]) < n_left ? 1 : 0;
        }
        __syncthreads();
        // 3. Stable partition of each live node's segment in every axis's array, four axes per
        //    block-wide scan (16-bit counters packed into one 64-bit word).
        for (int d0 = 0; d0 < D; d0 += 4) {
            sb_u64 packed[SB_ITEMS];
            sb_u64 count = 0;
            for (int j = 0; j < SB_ITEMS; ++j) {
                const int i = tid * SB_ITEMS + j;
                sb_u64 v = 0;
                if (s_n[j] >= 2)
                    for (int q = 0; q < 4 && d0 + q < D; ++q)
                        v |= (sb_u64)flag[loc[(sb_i64)(d0 + q) * cap + i]] << (16 * q);
                packed[j] = v;
                count += v;
            }
            sb_u64 total;
            const sb_u64 before = sb_block_exclusive_scan(count, &total);
            if (d0 == 0) {  // left-going items before each live node (the same in every axis)
                sb_u64 e = before;
                for (int j = 0; j < SB_ITEMS; ++j) {
                    const int i = tid * SB_ITEMS + j;
                    if (s_n[j] >= 2 && i == s_lo[j]) left_before[i] = (int)(e & 0xffff);
                    e += packed[j];
                }
                __syncthreads();
            }
            for (int q = 0; q < 4 && d0 + q < D; ++q) {
                unsigned short* l = loc + (sb_i64)(d0 + q) * cap;
                unsigned short value[SB_ITEMS];
                int dst[SB_ITEMS];
                sb_u64 e = before;
                for (int j = 0; j < SB_ITEMS; ++j) {
                    const int i = tid * SB_ITEMS + j;
                    value[j] = i < n ? l[i] : 0;
                    dst[j] = i;
                    if (s_n[j] >= 2) {
                        int n_left, size_left;
                        sb_split(s_n[j], s_size[j], ball_size, &n_left, &size_left);
                        const int lo = s_lo[j];
                        const int r = (int)((e >> (16 * q)) & 0xffff) - left_before[lo];
                        const int goes = (int)((packed[j] >> (16 * q)) & 1);
                        dst[j] = goes ? lo + r : lo + n_left + (i - lo - r);
                    }
                    e += packed[j];
                }
                __syncthreads();
                for (int j = 0; j < SB_ITEMS; ++j)
                    if (tid * SB_ITEMS + j < n) l[dst[j]] = value[j];
            }
            __syncthreads();
        }
        // 4. Each position moves to the child covering it; a child with one item is a finished
        //    leaf-to-be: its item takes the child's last slot (the padding kernel fills the rest).
        for (int j = 0; j < SB_ITEMS; ++j) {
            if (s_n[j] < 2) continue;
            const int i = tid * SB_ITEMS + j;
            int n_left, size_left;
            sb_split(s_n[j], s_size[j], ball_size, &n_left, &size_left);
            if (i - s_lo[j] < n_left) {
                s_n[j] = n_left;
                s_size[j] = size_left;
            } else {
                s_lo[j] += n_left;
                s_n[j] -= n_left;
                s_slot[j] += size_left;
                s_size[j] -= size_left;
            }
            if (s_n[j] == 1) {
                const sb_i64 slot = slot0 + s_slot[j] + s_size[j] - 1;
                perm[slot] = gid[loc[i]];
                mask[slot] = 1;
                s_n[j] = 0;
            }
        }
        // The next level's first writes (axis_of, flag, left_before) come after reads that
        // every thread finished before the barriers above; step 1 reads loc, settled above.
    }
}

// ---------------------------------------------------------------------------------------------
// Presort keys of float32 inputs, one thread per (axis, point): keys (D, n) uint64 =
// axis << axis_shift | cloud << 32 | order-preserving bits of the coordinate, so that one
// stable sort of all D * n keys orders every axis by (cloud, coordinate, point index).
// pos (n, D) row-major float32; -0.0 is keyed as +0.0 (they compare equal).
extern "C" __global__ void sb_sort_keys_f32(const float* __restrict__ pos, const sb_i64* __restrict__ cloud,
                                            int D, int n, int axis_shift, sb_u64* __restrict__ keys) {
    const sb_i64 t = (sb_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (sb_i64)D * n) return;
    const int d = (int)(t / n);
    const sb_i64 i = t - (sb_i64)d * n;
    unsigned int bits = __float_as_uint(pos[i * D + d]);
    if (bits == 0x80000000u) bits = 0u;
    bits ^= (bits >> 31) ? 0xFFFFFFFFu : 0x80000000u;  // negatives reversed, below positives
    keys[t] = ((sb_u64)d << axis_shift) | ((sb_u64)cloud[i] << 32) | (sb_u64)bits;
}

// One thread per position p of `order` (the presorted ids of one axis, grouped by cloud in
// increasing cloud id) and one more: starts[c] = the first position of cloud c; a cloud without
// points starts where the next one does; starts[num_clouds] = n. Thread p writes the starts of
// the clouds after its predecessor's cloud up to its own, so each entry is written once.
extern "C" __global__ void sb_cloud_starts(const sb_i64* __restrict__ cloud, const int* __restrict__ order,
                                           int n, int num_clouds, sb_i64* __restrict__ starts) {
    const sb_i64 p = (sb_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p > n) return;
    const sb_i64 here = p < n ? cloud[order[p]] : (sb_i64)num_clouds;
    const sb_i64 before = p > 0 ? cloud[order[p - 1]] : -1;
    for (sb_i64 c = before + 1; c <= here; ++c) starts[c] = p;
}

// ---------------------------------------------------------------------------------------------
// One thread per slot: a padding slot repeats the first real slot of the smallest aligned block
// that holds one. That block holds exactly one real item and it sits at the block's last slot
// (the split rule sends a lone item right at every level), so it is the first block, going up
// from 2 slots, whose last slot is real. Blocks of at most P slots suffice: every P-ball of a
// cloud holds a real item.
extern "C" __global__ void sb_fill_padding(sb_i64* __restrict__ perm, const unsigned char* __restrict__ mask,
                                           sb_i64 num_slots, int ball_size) {
    const sb_i64 j = (sb_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= num_slots || mask[j]) return;
    for (sb_i64 c = 2; c <= ball_size; c <<= 1) {
        const sb_i64 last = (j & ~(c - 1)) + c - 1;
        if (mask[last]) {
            perm[j] = perm[last];
            return;
        }
    }
}

// One thread per slot j: rotated coordinates of the slot's point, out[i, j] =
// sum_k coords[k, perm[j]] * rotation[i, k], added left to right in float64 with every product
// and sum rounded (no fused multiply-add: the numpy path must give the same bits), then -0.0
// mapped to +0.0. rotation (D, D) row-major; out (D, num_slots).
extern "C" __global__ void sb_rotate(const double* __restrict__ coords, const sb_i64* __restrict__ perm,
                                     const double* __restrict__ rotation, int D, int n_points,
                                     sb_i64 num_slots, double* __restrict__ out) {
    const sb_i64 j = (sb_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= num_slots) return;
    const sb_i64 src = perm[j];
    for (int i = 0; i < D; ++i) {
        double acc = __dmul_rn(coords[src], rotation[i * D]);
        for (int k = 1; k < D; ++k)
            acc = __dadd_rn(acc, __dmul_rn(coords[(sb_i64)k * n_points + src], rotation[i * D + k]));
        out[(sb_i64)i * num_slots + j] = __dadd_rn(acc, 0.0);
    }
}
