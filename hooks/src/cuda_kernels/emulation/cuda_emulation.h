// Runs our CUDA kernels (block-wide __syncthreads, plus the warp-level primitives below) on
// the CPU, for the CPU test suite. The blocks of a grid run one after another; the threads of
// a block are fibers (ucontext) on one OS thread, each running until its next barrier, so a
// round over all fibers is one barrier. A kernel's `__shared__` variables become function
// statics, shared by all threads of the running block as on a GPU. Threads that disagree on
// the number of barriers are reported as an error.
//
// Warp-level primitives (`lane_xor`, `mma_bf16_16816`, `ldmatrix_x4[_trans]`) exchange
// values through per-thread slots between two block-wide barriers, so every thread of the
// block must call them alike.
#pragma once

#define EI_CUDA_EMULATION 1

#include <ucontext.h>

#include <math.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace emulation {
struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
};
inline ucontext_t scheduler;
inline Fiber* running = nullptr;
inline std::function<void()> body;

inline void fiber_main() {
    body();
    running->done = true;
    swapcontext(&running->context, &scheduler);
}
}  // namespace emulation

inline void __syncthreads() {
    swapcontext(&emulation::running->context, &emulation::scheduler);
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// IEEE round-to-nearest arithmetic that CUDA never contracts into a fused multiply-add
// (the host compiler does not contract these calls either).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

struct alignas(16) float4 {
    float x, y, z, w;
};

namespace emulation {
inline float lane_slots[1024];
inline unsigned mma_a_slots[1024][4];
inline unsigned mma_b_slots[1024][2];
inline const unsigned short* row_slots[1024];

inline float bf16_value(unsigned bits) {
    const unsigned widened = (bits & 0xffffu) << 16;
    float f;
    std::memcpy(&f, &widened, sizeof f);
    return f;
}
}  // namespace emulation

// The value `v` of lane (lane ^ mask) of the calling thread's warp (`__shfl_xor_sync`).
inline float lane_xor(float v, int mask) {
    using namespace emulation;
    lane_slots[threadIdx.x] = v;
    __syncthreads();
    const float other = lane_slots[threadIdx.x ^ (unsigned)mask];
    __syncthreads();
    return other;
}

// PTX `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` for the calling thread's warp:
// c += A B, with A (16 x 16), B (16 x 8) and C (16 x 8) spread over the lanes as PTX's
// "matrix fragments for mma.m16n8k16 with floating point type" says (groupID = lane / 4,
// threadID_in_group = lane % 4; lower-indexed element in the low half of a register).
inline void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    using namespace emulation;
    const unsigned tid = threadIdx.x, base = tid & ~31u;
    std::memcpy(mma_a_slots[tid], a, sizeof mma_a_slots[tid]);
    std::memcpy(mma_b_slots[tid], b, sizeof mma_b_slots[tid]);
    __syncthreads();
    float A[16][16], B[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane / 4, t = lane % 4;
        const unsigned* ra = mma_a_slots[base + lane];
        const unsigned* rb = mma_b_slots[base + lane];
        const unsigned rows[4] = {g, g + 8, g, g + 8};
        const unsigned cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int r = 0; r < 4; ++r) {
            A[rows[r]][cols[r]] = bf16_value(ra[r]);
            A[rows[r]][cols[r] + 1] = bf16_value(ra[r] >> 16);
        }
        for (int r = 0; r < 2; ++r) {
            B[2 * t + 8 * r][g] = bf16_value(rb[r]);
            B[2 * t + 8 * r + 1][g] = bf16_value(rb[r] >> 16);
        }
    }
    const unsigned lane = tid % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float sum = c[i];
        for (int k = 0; k < 16; ++k) {
            sum += A[row][k] * B[k][col];
        }
        c[i] = sum;
    }
    __syncthreads();
}

// PTX `ldmatrix.sync.aligned.m8n8.x4[.trans].b16` for the calling thread's warp: lanes 8 i
// to 8 i + 7 give the rows of 8x8 matrix i; register i of lane l gets row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 (transposed: rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4),
// the lower-indexed element in the low half.
inline void emulated_ldmatrix_x4(unsigned* r, const unsigned short* row, bool transposed) {
    using namespace emulation;
    const unsigned tid = threadIdx.x, base = tid & ~31u, lane = tid % 32;
    row_slots[tid] = row;
    __syncthreads();
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned short* const* rows = &row_slots[base + 8 * i];
        unsigned low, high;
        if (transposed) {
            low = rows[2 * (lane % 4)][lane / 4];
            high = rows[2 * (lane % 4) + 1][lane / 4];
        } else {
            low = rows[lane / 4][2 * (lane % 4)];
            high = rows[lane / 4][2 * (lane % 4) + 1];
        }
        r[i] = low | (high << 16);
    }
    __syncthreads();
}

inline void ldmatrix_x4(unsigned* r, const unsigned short* row) {
    emulated_ldmatrix_x4(r, row, false);
}

inline void ldmatrix_x4_trans(unsigned* r, const unsigned short* row) {
    emulated_ldmatrix_x4(r, row, true);
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    T old = *address;
    *address = old + value;
    return old;
}

// Runs `kernel()` (a lambda calling the kernel with its arguments) over a grid of
// `grid.x * grid.y` blocks of `threads` threads.
template <typename Kernel>
void emulate_launch(dim3 grid, unsigned threads, Kernel kernel) {
    using namespace emulation;
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    body = kernel;
    std::vector<Fiber> fibers(threads);
    for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3{bx, by, 0};
            for (auto& fiber : fibers) {
                fiber.done = false;
                fiber.stack.resize(256 * 1024);
                getcontext(&fiber.context);
                fiber.context.uc_stack.ss_sp = fiber.stack.data();
                fiber.context.uc_stack.ss_size = fiber.stack.size();
                fiber.context.uc_link = nullptr;
                makecontext(&fiber.context, fiber_main, 0);
            }
            for (;;) {
                unsigned finished = 0;
                for (unsigned t = 0; t < threads; ++t) {
                    running = &fibers[t];
                    threadIdx = dim3{t, 0, 0};
                    swapcontext(&scheduler, &fibers[t].context);
                    finished += fibers[t].done ? 1 : 0;
                }
                if (finished == threads) {
                    break;
                }
                if (finished != 0) {
                    std::fprintf(stderr, "threads of block (%u, %u) disagree on __syncthreads\n",
                                 bx, by);
                    std::exit(3);
                }
            }
        }
    }
}
