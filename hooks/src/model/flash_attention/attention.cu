// Causal attention for bf16 models on a GPU, fused (the "flash attention" scheme): each
// block takes 64 query rows of one head and walks the key/value rows up to the diagonal in
// tiles, keeping a running softmax per row, so the [t, t] scores never reach memory. The
// unfused path writes and rereads them about five times (product, scale, mask, softmax,
// cast), which at pythia-1b's 8 x 2048 tokens is most of the forward pass's memory traffic.
//
// Products run on bf16 tensor cores with f32 sums (mma.sync m16n8k16, sm_80 and newer); the
// softmax and the output accumulate in f32 and the output is rounded to bf16 once.
//
// Four warps per block, 16 query rows each. Per key tile, a warp computes its 16 x COLS
// scores S = Q Kᵀ, rescales its running maximum, sum and output, turns exp2(S - max) into
// bf16 operands in registers (the accumulator layout of one product is the operand layout of
// the next) and adds P V to its output. Queries, then keys, then values pass through shared
// memory, rows padded by 8 elements so the ldmatrix row reads of a warp hit distinct banks.
//
// Loops over the per-thread arrays are unrolled so the arrays live in registers.
//
// Plain CUDA C++ with __syncthreads and three warp-level primitives (mma, ldmatrix and a
// lane shuffle), each called by every thread of the block alike, so the CPU test suite runs
// this file under emulation (hooks/src/cuda_kernels/emulation) against the generic
// attention. Element types come from hooks/src/cuda_kernels/element_types.cuh, compiled
// ahead of it.

#define ATTENTION_WARPS 4
#define ATTENTION_THREADS (ATTENTION_WARPS * 32)
#define ATTENTION_ROWS (ATTENTION_WARPS * 16)
#define ROW_PAD 8

#ifndef EI_CUDA_EMULATION
// c += a b for one 16 x 8 x 16 tile: a (16 x 16, row-major) and b (16 x 8, column-major) in
// bf16 pairs, c in f32, each spread over the warp's lanes as PTX's m16n8k16 layout says.
__device__ __forceinline__ void mma_bf16_16816(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ float lane_xor(float v, int mask) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Four 8x8 bf16 matrices from shared memory, one register each: lanes 8 i to 8 i + 7 give
// the addresses of matrix i's rows (16-byte aligned); lane l receives row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1, the layout of the mma operands.
__device__ __forceinline__ void ldmatrix_x4(u32* r, const bf16_bits* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "l"(row));
}

// As ldmatrix_x4, each matrix transposed: lane l receives rows 2 (l % 4) and 2 (l % 4) + 1
// of column l / 4.
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const bf16_bits* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "l"(row));
}
#endif

// Two bf16 values (the first in the low half) as one operand register.
__device__ __forceinline__ u32 pack_bf16(float low, float high) {
    bf16_bits l, h;
    from_f32(low, &l);
    from_f32(high, &h);
    return (u32)l | ((u32)h << 16);
}

__device__ __forceinline__ float negative_infinity() { return __uint_as_float(0xff800000u); }

// Copies `rows` rows of D bf16 from `src` (row stride D) into `dst` (row stride D + ROW_PAD)
// in 16-byte pieces; rows at or past `valid` are zero.
template <int D>
__device__ __forceinline__ void load_tile(bf16_bits* dst, const bf16_bits* src, int rows,
                                          int valid) {
    const int pieces = D / 8;
    for (int i = threadIdx.x; i < rows * pieces; i += ATTENTION_THREADS) {
        const int row = i / pieces, col = (i % pieces) * 8;
        uint4 value = {0u, 0u, 0u, 0u};
        if (row < valid) {
            value = *(const uint4*)(src + (u64)row * D + col);
        }
        *(uint4*)(dst + row * (D + ROW_PAD) + col) = value;
    }
}

// One block: query rows [q0, q0 + 64) of head `head` of batch row `batch`. Inputs
// q [batch, heads, t, D], k and v [batch, kv_heads, t, D]; output [batch, t, heads, D].
// `scale_log2` is the score scale times log2(e). COLS keys per tile.
template <int D, int COLS>
__device__ void attention_block(const bf16_bits* q, const bf16_bits* k, const bf16_bits* v,
                                bf16_bits* out, int t, int heads, int kv_heads,
                                float scale_log2) {
    // uint4 storage: the tiles are written in aligned 16-byte pieces.
    __shared__ uint4 q_pieces[ATTENTION_ROWS * (D + ROW_PAD) / 8];
    __shared__ uint4 kv_pieces[COLS * (D + ROW_PAD) / 8];
    bf16_bits* q_tile = (bf16_bits*)q_pieces;
    bf16_bits* kv_tile = (bf16_bits*)kv_pieces;
    const int stride = D + ROW_PAD;
    const int q0 = blockIdx.x * ATTENTION_ROWS;
    const int head = blockIdx.y % heads, batch = blockIdx.y / heads;
    const int kv_head = head / (heads / kv_heads);
    const bf16_bits* q_head = q + ((u64)(batch * heads + head) * t + q0) * D;
    const bf16_bits* k_head = k + (u64)(batch * kv_heads + kv_head) * t * D;
    const bf16_bits* v_head = v + (u64)(batch * kv_heads + kv_head) * t * D;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int group = lane / 4, member = lane % 4;
    const int r0 = warp * 16;
    // This thread's two query rows (the accumulator rows `group` and `group + 8`).
    const int rows[2] = {q0 + r0 + group, q0 + r0 + group + 8};

    float o[D / 8][4];
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    }
    float row_max[2] = {negative_infinity(), negative_infinity()};
    float row_sum[2] = {0.0f, 0.0f};

    load_tile<D>(q_tile, q_head, ATTENTION_ROWS, t - q0);
    const int last_key = (q0 + ATTENTION_ROWS < t ? q0 + ATTENTION_ROWS : t) - 1;
    for (int k0 = 0; k0 <= last_key; k0 += COLS) {
        __syncthreads();
        load_tile<D>(kv_tile, k_head + (u64)k0 * D, COLS, t - k0);
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows and the tile's COLS keys.
        float s[COLS / 8][4];
        #pragma unroll
        for (int n = 0; n < COLS / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        }
        // Operands through ldmatrix, four 8x8 matrices a lane-quarter each: this lane
        // addresses row `lane % 8` of matrix `lane / 8`.
        const int quarter = lane / 8, quarter_row = lane % 8;
        #pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            // Q rows r0 + [0, 8) and + [8, 16), at columns kk and kk + 8: the A operand.
            u32 a[4];
            const int q_row = r0 + quarter_row + 8 * (quarter % 2);
            ldmatrix_x4(a, q_tile + q_row * stride + kk + 8 * (quarter / 2));
            #pragma unroll
            for (int n = 0; n < COLS / 8; n += 2) {
                // Keys of blocks n and n + 1, at columns kk and kk + 8: two B operands.
                u32 b[4];
                const int key = (n + quarter / 2) * 8 + quarter_row;
                ldmatrix_x4(b, kv_tile + key * stride + kk + 8 * (quarter % 2));
                mma_bf16_16816(s[n], a, b);
                mma_bf16_16816(s[n + 1], a, b + 2);
            }
        }

        // Scale to log2 units, mask keys after the query (and past t), update the running
        // maximum of each row over the four lanes that share it.
        float tile_max[2] = {negative_infinity(), negative_infinity()};
        #pragma unroll
        for (int n = 0; n < COLS / 8; ++n) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int key = k0 + n * 8 + 2 * member + (i & 1);
                const int row = rows[i / 2];
                const bool hidden = key > row || key >= t;
                const float x = hidden ? negative_infinity() : s[n][i] * scale_log2;
                s[n][i] = x;
                tile_max[i / 2] = x > tile_max[i / 2] ? x : tile_max[i / 2];
            }
        }
        float rescale[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = tile_max[r];
            const float m1 = lane_xor(m, 1);
            m = m1 > m ? m1 : m;
            const float m2 = lane_xor(m, 2);
            m = m2 > m ? m2 : m;
            const float new_max = m > row_max[r] ? m : row_max[r];
            // A row with no visible key yet (only rows past t) keeps zeros.
            rescale[r] = new_max == negative_infinity() ? 1.0f : exp2f(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= rescale[r];
        }
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                o[n][i] *= rescale[i / 2];
            }
        }
        // P = exp2(S - max) as bf16 operands: keys [16 j, 16 j + 16) are accumulator
        // columns n = 2 j and 2 j + 1.
        u32 p[COLS / 16][4];
        #pragma unroll
        for (int j = 0; j < COLS / 16; ++j) {
            float e[2][4];
            #pragma unroll
            for (int h = 0; h < 2; ++h) {
                #pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float m = row_max[i / 2];
                    const float x = s[2 * j + h][i];
                    e[h][i] = x == negative_infinity() ? 0.0f : exp2f(x - m);
                    row_sum[i / 2] += e[h][i];
                }
            }
            p[j][0] = pack_bf16(e[0][0], e[0][1]);
            p[j][1] = pack_bf16(e[0][2], e[0][3]);
            p[j][2] = pack_bf16(e[1][0], e[1][1]);
            p[j][3] = pack_bf16(e[1][2], e[1][3]);
        }

        // O += P V.
        __syncthreads();
        load_tile<D>(kv_tile, v_head + (u64)k0 * D, COLS, t - k0);
        __syncthreads();
        #pragma unroll
        for (int j = 0; j < COLS / 16; ++j) {
            #pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                // Keys 16 j + [0, 8) and + [8, 16) of output columns n and n + 1, transposed:
                // two B operands.
                u32 b[4];
                const int key = j * 16 + quarter_row + 8 * (quarter % 2);
                ldmatrix_x4_trans(b, kv_tile + key * stride + (n + quarter / 2) * 8);
                mma_bf16_16816(o[n], p[j], b);
                mma_bf16_16816(o[n + 1], p[j], b + 2);
            }
        }
    }

    // Each row's sum is spread over its four lanes.
    float inverse[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        float total = row_sum[r];
        total += lane_xor(total, 1);
        total += lane_xor(total, 2);
        inverse[r] = total > 0.0f ? 1.0f / total : 0.0f;
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= t) {
            continue;
        }
        bf16_bits* out_row = out + ((u64)(batch * t + rows[r]) * heads + head) * D;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            *(u32*)(out_row + n * 8 + 2 * member) =
                pack_bf16(o[n][2 * r] * inverse[r], o[n][2 * r + 1] * inverse[r]);
        }
    }
}

// Grid: (ceil(t / 64), batch * heads) blocks of ATTENTION_THREADS threads. One entry point per
// head size; keys per tile chosen so the two tiles fit the 48 KiB of static shared memory.
extern "C" __global__ void causal_attention_bf16_d64(const bf16_bits* q, const bf16_bits* k,
                                                     const bf16_bits* v, bf16_bits* out, int t,
                                                     int heads, int kv_heads, float scale_log2) {
    attention_block<64, 64>(q, k, v, out, t, heads, kv_heads, scale_log2);
}

extern "C" __global__ void causal_attention_bf16_d128(const bf16_bits* q, const bf16_bits* k,
                                                      const bf16_bits* v, bf16_bits* out, int t,
                                                      int heads, int kv_heads, float scale_log2) {
    attention_block<128, 64>(q, k, v, out, t, heads, kv_heads, scale_log2);
}

extern "C" __global__ void causal_attention_bf16_d256(const bf16_bits* q, const bf16_bits* k,
                                                      const bf16_bits* v, bf16_bits* out, int t,
                                                      int heads, int kv_heads, float scale_log2) {
    attention_block<256, 16>(q, k, v, out, t, heads, kv_heads, scale_log2);
}
