// The SAE's CUDA kernels: row-wise TopK for rows of any width, and the sparse products of
// the decoder and of the backward pass (only the k selected rows per token are touched).
// Compiled at run time by NVRTC. Plain CUDA C++ with block-wide __syncthreads only (no warp
// intrinsics, no headers), so the CPU test suite can also compile this file with a C++
// compiler and a small emulation header and run it against the Rust CPU references.
//
// Element types (hooks/src/cuda_kernels/element_types.cuh, compiled ahead of this file):
// `float` and bf16 as `bf16_bits`. Arithmetic and accumulation are always in f32. Index
// tensors are u32, offsets 64-bit (rows x width may exceed 2^31).

// ---------------------------------------------------------------------------------------
// TopK. One block of TOPK_THREADS threads per row. The k-th largest key is found by a radix
// select over the 32-bit order-preserving keys (passes of 11, 11 and 10 bits, each a
// histogram in shared memory). Usually the first pass already narrows the k-th key to a bin
// of at most TOPK_CANDIDATES keys: then one more pass over the row gathers the keys of the
// bins above it (all picked) and those of its bin (the candidates), and the candidates are
// ranked in shared memory, so the row is read twice. Otherwise the other two radix passes
// run, and a last pass collects the keys above the k-th and, in increasing index order, as
// many keys equal to it as are still needed. A bitonic sort in shared memory puts the k
// picks in order: by decreasing value, ties by increasing index, exactly the order of the
// CPU selection.

#define TOPK_THREADS 256
#define TOPK_MAX_K 4096
#define RADIX_BINS 2048
#define TOPK_CANDIDATES 1024

// An unsigned key with the order of IEEE total order on floats.
__device__ __forceinline__ u32 order_key(float v) {
    u32 bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Inclusive prefix sums of scan[0..TOPK_THREADS) in place (Hillis-Steele); every thread of
// the block calls it after writing its own entry.
__device__ __forceinline__ void block_inclusive_scan(u32* scan, int tid) {
    for (int offset = 1; offset < TOPK_THREADS; offset <<= 1) {
        const u32 add = tid >= offset ? scan[tid - offset] : 0u;
        __syncthreads();
        scan[tid] += add;
        __syncthreads();
    }
}

// Sorts a[0..count) in shared memory, largest first (a bitonic sort over the next power of
// two, padded with zeros, which sort last; `a` must have room for it). Every thread of the
// block calls it.
__device__ void block_sort_descending(u64* a, u32 count, int tid) {
    u32 padded = 1u;
    while (padded < count) {
        padded <<= 1;
    }
    for (u32 i = count + tid; i < padded; i += TOPK_THREADS) {
        a[i] = 0ull;
    }
    __syncthreads();
    for (u32 size = 2; size <= padded; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = tid; i < padded; i += TOPK_THREADS) {
                const u32 partner = i ^ stride;
                if (partner > i) {
                    const u64 x = a[i];
                    const u64 y = a[partner];
                    const bool descending = (i & size) == 0;
                    if (descending ? (x < y) : (x > y)) {
                        a[i] = y;
                        a[partner] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
}

// A pick as one sortable word: the key, then the index inverted, so that among equal keys
// the lower index sorts first in a descending sort.
__device__ __forceinline__ u64 pick_word(u32 key, long long j) {
    return ((u64)key << 32) | (u64)(0xffffffffu - (u32)j);
}

// `v` rounded to the precision of T, as a sum computed in T would be.
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const bf16_bits*) {
    bf16_bits b;
    from_f32(v, &b);
    return to_f32(b);
}

// Entry j of a row: row[j] + bias[j] summed in T's precision (when `bias` is not null), then
// ReLU'd when `relu`.
template <typename T>
__device__ __forceinline__ float value_at(const T* row, const T* bias, long long j, int relu) {
    float v = to_f32(row[j]);
    if (bias != 0) {
        v = round_as(v + to_f32(bias[j]), row);
    }
    if (relu) {
        v = v > 0.0f ? v : 0.0f;
    }
    return v;
}

template <typename T>
__device__ __forceinline__ u32 key_at(const T* row, const T* bias, const unsigned char* allowed,
                                      long long j, int relu) {
    if (allowed != 0 && allowed[j] == 0) {
        return 0u; // below every real key: an excluded latent is never preferred
    }
    return order_key(value_at(row, bias, j, relu));
}

// After the first radix pass, with the k-th key in the bin of top bits `bin_prefix`: every
// key of a bin above it into picks[0..), every key of its bin into candidates[0..), in any
// order (their words sort them); the counts end in *above_count and *candidate_count.
template <typename T>
__device__ void gather_picks(const T* row, const T* bias, const unsigned char* allowed, int n,
                             int relu, u32 bin_prefix, u64* candidates, u64* picks, int tid,
                             u32* above_count, u32* candidate_count) {
    const u32 top_bits = 0xffffffffu << 21; // the first pass's 11 bits
    if (tid == 0) {
        *above_count = 0u;
        *candidate_count = 0u;
    }
    __syncthreads();
    for (long long j = tid; j < n; j += TOPK_THREADS) {
        const u32 key = key_at(row, bias, allowed, j, relu);
        const u32 bin = key & top_bits;
        if (bin > bin_prefix) {
            picks[atomicAdd(above_count, 1u)] = pick_word(key, j);
        } else if (bin == bin_prefix) {
            candidates[atomicAdd(candidate_count, 1u)] = pick_word(key, j);
        }
    }
    __syncthreads();
}

// After all three radix passes, with the k-th key `threshold` exactly, `above` keys above it
// and `ties` of its equals still needed: collects them into picks[0..k), tile by tile in
// index order (a block-wide scan of (above, equal) flags packed in one word gives each pick
// its slot), so the ties taken are those of the lowest indices.
template <typename T>
__device__ void collect_picks(const T* row, const T* bias, const unsigned char* allowed, int n,
                              int relu, u32 threshold, u32 above, u32 ties, u32* scan,
                              u64* picks, int tid) {
    u32 taken_above = 0u;
    u32 taken_ties = 0u;
    for (long long base = 0; base < n; base += TOPK_THREADS) {
        const long long j = base + tid;
        u32 flags = 0u;
        u32 key = 0u;
        if (j < n) {
            key = key_at(row, bias, allowed, j, relu);
            flags = key > threshold ? 1u : (key == threshold ? 0x10000u : 0u);
        }
        scan[tid] = flags;
        __syncthreads();
        block_inclusive_scan(scan, tid);
        const u32 exclusive = scan[tid] - flags;
        const u32 total = scan[TOPK_THREADS - 1];
        if (flags == 1u) {
            picks[taken_above + (exclusive & 0xffffu)] = pick_word(key, j);
        } else if (flags == 0x10000u) {
            const u32 rank = taken_ties + (exclusive >> 16);
            if (rank < ties) {
                picks[above + rank] = pick_word(threshold, j);
            }
        }
        taken_above += total & 0xffffu;
        taken_ties += total >> 16;
        __syncthreads();
    }
}

template <typename T>
__device__ void topk_row(const T* pre, const T* bias, const unsigned char* allowed, int n, int k,
                         int relu, T* out_values, u32* out_indices) {
    // The histogram, then (when the first pass narrows the k-th key to a small bin) that
    // bin's keys.
    union Scratch {
        u32 hist[RADIX_BINS];
        u64 candidates[TOPK_CANDIDATES];
    };
    __shared__ Scratch scratch;
    __shared__ u32 scan[TOPK_THREADS];
    __shared__ u64 picks[TOPK_MAX_K];
    __shared__ u32 s_prefix;
    __shared__ u32 s_need;
    __shared__ u32 s_above;
    __shared__ u32 s_bin_count;
    __shared__ u32 s_gathered_above;
    __shared__ u32 s_gathered_candidates;
    u32* hist = scratch.hist;

    const int tid = threadIdx.x;
    const long long row_index = blockIdx.x;
    const T* row = pre + row_index * (long long)n;
    if (tid == 0) {
        s_prefix = 0u;
        s_need = (u32)k;
        s_above = 0u;
    }
    __syncthreads();

    // Radix select: after the passes, s_prefix is the k-th largest key, s_above the number of
    // keys above it and s_need how many keys equal to it complete the k.
    bool small_bin = false;
    const int shifts[3] = {21, 10, 0};
    const int widths[3] = {11, 11, 10};
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = shifts[pass];
        const u32 bins = 1u << widths[pass];
        const u32 known = (pass == 0) ? 0u : (0xffffffffu << (shift + widths[pass]));
        for (u32 b = tid; b < bins; b += TOPK_THREADS) {
            hist[b] = 0u;
        }
        __syncthreads();
        const u32 prefix = s_prefix;
        for (long long j = tid; j < n; j += TOPK_THREADS) {
            const u32 key = key_at(row, bias, allowed, j, relu);
            if ((key & known) == prefix) {
                atomicAdd(&hist[(key >> shift) & (bins - 1u)], 1u);
            }
        }
        __syncthreads();
        // Each thread sums a run of bins; a suffix scan over the runs (from the top bin down)
        // tells the one thread whose run holds the k-th key.
        const u32 per_thread = bins / TOPK_THREADS;
        const u32 first = bins - (tid + 1) * per_thread; // thread 0 holds the top bins
        u32 run = 0u;
        for (u32 b = 0; b < per_thread; ++b) {
            run += hist[first + b];
        }
        scan[tid] = run;
        __syncthreads();
        block_inclusive_scan(scan, tid);
        const u32 need = s_need;
        const u32 before = scan[tid] - run; // keys in the bins above this thread's run
        __syncthreads();
        if (before < need && scan[tid] >= need) {
            u32 seen = before;
            for (int b = (int)per_thread - 1; b >= 0; --b) {
                const u32 count = hist[first + b];
                if (seen + count >= need) {
                    s_prefix = prefix | ((first + (u32)b) << shift);
                    s_above += seen;
                    s_need = need - seen;
                    s_bin_count = count;
                    break;
                }
                seen += count;
            }
        }
        __syncthreads();
        if (pass == 0 && s_bin_count <= TOPK_CANDIDATES) {
            small_bin = true; // the k-th key's bin is small: gather it instead (below)
            break;
        }
    }
    if (small_bin) {
        gather_picks(row, bias, allowed, n, relu, s_prefix, scratch.candidates, picks, tid,
                     &s_gathered_above, &s_gathered_candidates);
        // The bin's keys ranked as the final order ranks them; the first s_need complete k.
        block_sort_descending(scratch.candidates, s_gathered_candidates, tid);
        for (u32 i = tid; i < s_need; i += TOPK_THREADS) {
            picks[s_above + i] = scratch.candidates[i];
        }
        __syncthreads();
    } else {
        collect_picks(row, bias, allowed, n, relu, s_prefix, s_above, s_need, scan, picks, tid);
    }
    block_sort_descending(picks, (u32)k, tid);
    for (int i = tid; i < k; i += TOPK_THREADS) {
        const u32 index = 0xffffffffu - (u32)(picks[i] & 0xffffffffull);
        from_f32(value_at(row, bias, index, relu), &out_values[row_index * k + i]);
        out_indices[row_index * k + i] = index;
    }
}

// `pre: [rows, n]` (+ `bias: [n]` when not null, the sum in the element type) -> the `k`
// largest of each row (after ReLU when `relu` is 1), among the latents with `allowed[j] != 0`
// when `allowed` is not null. Folding the encoder bias in here saves a pass that would write
// and reread the whole pre-activation block. Grid: rows blocks of TOPK_THREADS. Needs
// 1 <= k <= min(n, TOPK_MAX_K) and k allowed latents per row.
extern "C" __global__ void topk_f32(const float* pre, const float* bias,
                                    const unsigned char* allowed, int n, int k, int relu,
                                    float* out_values, u32* out_indices) {
    topk_row(pre, bias, allowed, n, k, relu, out_values, out_indices);
}

extern "C" __global__ void topk_bf16(const bf16_bits* pre, const bf16_bits* bias,
                                     const unsigned char* allowed, int n, int k, int relu,
                                     bf16_bits* out_values, u32* out_indices) {
    topk_row(pre, bias, allowed, n, k, relu, out_values, out_indices);
}

// ---------------------------------------------------------------------------------------
// Sparse products. `coef: [N, k]` and `indices: [N, k]` name, for each token, k rows of a
// `[n, d]` matrix (the decoder, or the encoder in the backward pass).

#define SPARSE_THREADS 256

// out[t] = bias + sum_j coef[t, j] * rows[indices[t, j]]: the decoder (rows = W_dec, bias =
// b_dec), or the gradient reaching the encoder input (rows = W_enc, no bias). Grid:
// (N, ceil(d / SPARSE_THREADS)); each thread owns one column of one token.
template <typename T>
__device__ void combine_rows(const T* coef, const u32* indices, const T* rows, const T* bias,
                             int k, int d, T* out) {
    __shared__ float s_coef[SPARSE_THREADS];
    __shared__ u32 s_index[SPARSE_THREADS];
    const long long t = blockIdx.x;
    const int c = blockIdx.y * SPARSE_THREADS + threadIdx.x;
    float acc = (bias != 0 && c < d) ? to_f32(bias[c]) : 0.0f;
    for (int j0 = 0; j0 < k; j0 += SPARSE_THREADS) {
        const int j = j0 + threadIdx.x;
        if (j < k) {
            s_coef[threadIdx.x] = to_f32(coef[t * k + j]);
            s_index[threadIdx.x] = indices[t * k + j];
        }
        __syncthreads();
        const int m = (k - j0) < SPARSE_THREADS ? (k - j0) : SPARSE_THREADS;
        if (c < d) {
            for (int q = 0; q < m; ++q) {
                acc += s_coef[q] * to_f32(rows[(long long)s_index[q] * d + c]);
            }
        }
        __syncthreads();
    }
    if (c < d) {
        from_f32(acc, &out[t * d + c]);
    }
}

extern "C" __global__ void combine_rows_f32(const float* coef, const u32* indices,
                                            const float* rows, const float* bias, int k, int d,
                                            float* out) {
    combine_rows(coef, indices, rows, bias, k, d, out);
}

extern "C" __global__ void combine_rows_bf16(const bf16_bits* coef, const u32* indices,
                                             const bf16_bits* rows, const bf16_bits* bias, int k,
                                             int d, bf16_bits* out) {
    combine_rows(coef, indices, rows, bias, k, d, out);
}

// ---------------------------------------------------------------------------------------
// The weight gradients, row by row. A chunk's N * k picks name rows of the two `[n, d]`
// gradient sums (W_dec's: coef = activations, vectors = dL/dx_hat; W_enc's: coef = the
// pre-activation gradient, vectors = the encoder input). Adding each pick with atomics
// would read and write a sum row from memory per pick (the rows are far too many for L2);
// instead the picks are sorted by latent (a counting sort: count_picks, scan_counts,
// place_picks) and add_rows_by_latent reads each touched row once, adds all its picks, and
// writes it once: k N / n times less traffic on the sums (4 at N = 8192, k = 32, n = 65536).
// The same order serves the pre-activation gradient (gated_dots_by_latent), which then reads
// each decoder row once.

#define SCAN_THREADS 256

// counts[indices[p]] += 1 for p < count (`counts: [n]` zeroed). Grid: ceil(count /
// SPARSE_THREADS) blocks of SPARSE_THREADS.
extern "C" __global__ void count_picks(const u32* indices, long long count, u32* counts) {
    const long long p = (long long)blockIdx.x * SPARSE_THREADS + threadIdx.x;
    if (p < count) {
        atomicAdd(&counts[indices[p]], 1u);
    }
}

// offsets[i] = counts[0] + ... + counts[i - 1] for i <= n (`offsets: [n + 1]`): where each
// latent's picks start in the sorted order. Grid: one block of SCAN_THREADS; each thread
// owns a run of consecutive latents.
extern "C" __global__ void scan_counts(const u32* counts, int n, u32* offsets) {
    __shared__ u32 totals[SCAN_THREADS];
    const int tid = threadIdx.x;
    const int run = (n + SCAN_THREADS - 1) / SCAN_THREADS;
    const int first = tid * run;
    const int last = first + run < n ? first + run : n;
    u32 total = 0u;
    for (int i = first; i < last; ++i) {
        total += counts[i];
    }
    totals[tid] = total;
    __syncthreads();
    for (int offset = 1; offset < SCAN_THREADS; offset <<= 1) {
        const u32 add = tid >= offset ? totals[tid - offset] : 0u;
        __syncthreads();
        totals[tid] += add;
        __syncthreads();
    }
    u32 at = totals[tid] - total; // picks of the latents before this run
    for (int i = first; i < last; ++i) {
        offsets[i] = at;
        at += counts[i];
    }
    if (tid == SCAN_THREADS - 1) {
        offsets[n] = totals[SCAN_THREADS - 1];
    }
}

// order[offsets[i] + (the pick's rank among latent i's)] = p for p < count (`cursor: [n]`
// zeroed): the picks grouped by latent, in no particular order within a group. Grid as
// count_picks.
extern "C" __global__ void place_picks(const u32* indices, long long count, const u32* offsets,
                                       u32* cursor, u32* order) {
    const long long p = (long long)blockIdx.x * SPARSE_THREADS + threadIdx.x;
    if (p < count) {
        const u32 latent = indices[p];
        order[offsets[latent] + atomicAdd(&cursor[latent], 1u)] = (u32)p;
    }
}

// For each latent i with picks: sum_a[i] += sum of coef_a[p] * vectors_a[p / k] over its
// picks p, and the same for b; rows without picks are not touched. Grid: n blocks of
// SPARSE_THREADS, one per latent; each thread owns columns of the row.
extern "C" __global__ void add_rows_by_latent(const u32* offsets, const u32* order, int k, int d,
                                              const float* coef_a, const float* vectors_a,
                                              float* sum_a, const float* coef_b,
                                              const float* vectors_b, float* sum_b) {
    __shared__ u32 s_token[SPARSE_THREADS];
    __shared__ float s_a[SPARSE_THREADS];
    __shared__ float s_b[SPARSE_THREADS];
    const long long latent = blockIdx.x;
    const u32 begin = offsets[latent];
    const u32 end = offsets[latent + 1];
    if (begin == end) {
        return;
    }
    const long long row = latent * d;
    for (int c0 = 0; c0 < d; c0 += SPARSE_THREADS) {
        const int c = c0 + threadIdx.x;
        float acc_a = c < d ? sum_a[row + c] : 0.0f;
        float acc_b = c < d ? sum_b[row + c] : 0.0f;
        for (u32 e0 = begin; e0 < end; e0 += SPARSE_THREADS) {
            const u32 e = e0 + threadIdx.x;
            if (e < end) {
                const u32 p = order[e];
                s_token[threadIdx.x] = p / (u32)k;
                s_a[threadIdx.x] = coef_a[p];
                s_b[threadIdx.x] = coef_b[p];
            }
            __syncthreads();
            const u32 m = end - e0 < SPARSE_THREADS ? end - e0 : SPARSE_THREADS;
            if (c < d) {
                for (u32 q = 0; q < m; ++q) {
                    const long long t = (long long)s_token[q] * d + c;
                    acc_a += s_a[q] * vectors_a[t];
                    acc_b += s_b[q] * vectors_b[t];
                }
            }
            __syncthreads();
        }
        if (c < d) {
            sum_a[row + c] = acc_a;
            sum_b[row + c] = acc_b;
        }
    }
}

#define DOT_LANES 8
#define DOT_SLOTS (SPARSE_THREADS / DOT_LANES)

// out[p] = <g[p / k], rows[i]> for every pick p of every latent i (grouped as place_picks
// leaves them) where gate[p] > 0, else 0: the gradient of the selected pre-activations
// (rows = W_dec, gate = the activations, so ReLU-cut picks pass none). Each decoder row is
// read from memory once per chunk, not once per pick. Grid: n blocks of SPARSE_THREADS, one
// per latent; groups of DOT_LANES threads share one dot.
extern "C" __global__ void gated_dots_by_latent(const u32* offsets, const u32* order, int k,
                                                int d, const float* g, const float* rows,
                                                const float* gate, float* out) {
    __shared__ float partial[SPARSE_THREADS];
    const long long latent = blockIdx.x;
    const u32 begin = offsets[latent];
    const u32 end = offsets[latent + 1];
    const int slot = threadIdx.x / DOT_LANES;
    const int lane = threadIdx.x % DOT_LANES;
    const float* row = rows + latent * d;
    for (u32 e0 = begin; e0 < end; e0 += DOT_SLOTS) {
        const u32 e = e0 + slot;
        u32 p = 0u;
        float sum = 0.0f;
        if (e < end) {
            p = order[e];
            if (gate[p] > 0.0f) {
                const float* gt = g + (long long)(p / (u32)k) * d;
                for (int c = lane; c < d; c += DOT_LANES) {
                    sum += gt[c] * row[c];
                }
            }
        }
        partial[threadIdx.x] = sum;
        __syncthreads();
        if (lane == 0 && e < end) {
            float total = 0.0f;
            for (int q = 0; q < DOT_LANES; ++q) {
                total += partial[threadIdx.x + q];
            }
            out[p] = total;
        }
        __syncthreads();
    }
}

// out[indices[p]] += coef[p] for p < count: the encoder-bias gradient. Grid:
// ceil(count / SPARSE_THREADS) blocks of SPARSE_THREADS.
extern "C" __global__ void scatter_scalars_f32(const float* coef, const u32* indices,
                                               long long count, float* out) {
    const long long p = (long long)blockIdx.x * SPARSE_THREADS + threadIdx.x;
    if (p < count && coef[p] != 0.0f) {
        atomicAdd(&out[indices[p]], coef[p]);
    }
}

// ---------------------------------------------------------------------------------------
// The decoder's unit-norm constraint, once per step: one block of ROW_THREADS per row of an
// `[n, d]` f32 matrix, reading its rows once and writing once, where candle's tensor
// operations take five (the norm) and nine (the projection) passes over the matrix.

#define ROW_THREADS 256

// out[r] = w[r] / (|w[r]| + FLT_EPSILON): each decoder row scaled to unit norm.
extern "C" __global__ void unit_rows_f32(const float* w, int d, float* out) {
    const long long start = (long long)blockIdx.x * d;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < d; c += ROW_THREADS) {
        squares += w[start + c] * w[start + c];
    }
    const float norm = sqrtf(block_sum<ROW_THREADS>(squares)) + 1.1920929e-7f;
    for (int c = threadIdx.x; c < d; c += ROW_THREADS) {
        out[start + c] = w[start + c] / norm;
    }
}

// out[r] = g[r] - <g[r], w[r]> w[r]: the decoder gradient without its part along each
// (unit-norm) decoder row, sparsify's remove_gradient_parallel_to_decoder_directions.
extern "C" __global__ void remove_parallel_f32(const float* g, const float* w, int d,
                                               float* out) {
    const long long start = (long long)blockIdx.x * d;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < d; c += ROW_THREADS) {
        dot += g[start + c] * w[start + c];
    }
    dot = block_sum<ROW_THREADS>(dot);
    for (int c = threadIdx.x; c < d; c += ROW_THREADS) {
        out[start + c] = g[start + c] - dot * w[start + c];
    }
}
