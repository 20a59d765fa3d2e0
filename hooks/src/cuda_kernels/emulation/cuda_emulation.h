// Runs CUDA kernels written with block-wide __syncthreads only (as our kernel sources are)
// on the CPU, for the CPU test suite. The blocks of a grid run one after another; the threads
// of a block are fibers (ucontext) on one OS thread, each running until its next __syncthreads, so a
// round over all fibers is one barrier. A kernel's `__shared__` variables become function
// statics, shared by all threads of the running block as on a GPU. Threads that disagree on
// the number of barriers are reported as an error.
#pragma once

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
