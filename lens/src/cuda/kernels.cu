// The lens loss on a GPU, fused: per row of lens logits, the log-sum-exp, the row's loss and
// the logit gradient `softmax - target` in two passes over the row, instead of the dozen
// passes of the generic tensor path (max, subtract, exp, sum, log, subtract, exp, products,
// sums, differences, each reading and writing the whole [tokens, vocab] block). The KL
// target's log-probabilities, made once per chunk of tokens, take two passes too.
//
// One block of LOSS_THREADS threads per row. Pass one reads the row once, keeping a running
// maximum and a sum of exponentials rescaled to it (the "online" softmax), plus the target
// terms; the block merges the threads' partial results in shared memory. Pass two reads the
// row again and writes the gradient. Logits and gradient are f32 or bf16 (the dtype of the
// vocabulary-sized products); everything else is f32.
//
// Plain CUDA C++ with block-wide __syncthreads only, so the CPU test suite also runs this
// file under emulation (hooks/src/cuda_kernels/emulation) against the Rust CPU loss.
// Element types come from hooks/src/cuda_kernels/element_types.cuh, compiled ahead of it.

#define LOSS_THREADS 256

__device__ __forceinline__ float negative_infinity() { return __uint_as_float(0xff800000u); }

// Adds exp(z) to the running (max, sum of exp(x - max)) pair; -inf contributes nothing.
__device__ __forceinline__ void online_add(float z, float* max, float* sum) {
    if (z == negative_infinity()) {
        return;
    }
    if (z > *max) {
        *sum = *sum * expf(*max - z) + 1.0f;
        *max = z;
    } else {
        *sum += expf(z - *max);
    }
}

// Merges the (max, sum) pair of thread `other` into that of thread `tid`.
__device__ __forceinline__ void online_merge(float* row_max, float* row_sum, int tid, int other) {
    const float m = row_max[tid] > row_max[other] ? row_max[tid] : row_max[other];
    if (m == negative_infinity()) {
        return;
    }
    row_sum[tid] =
        row_sum[tid] * expf(row_max[tid] - m) + row_sum[other] * expf(row_max[other] - m);
    row_max[tid] = m;
}

// Tree reduction of the threads' (max, sum) pairs and of two optional per-thread sums
// (`extra_a`, `extra_b`: null when unused). Every thread gets the row's log-sum-exp back;
// slot 0 of each extra array holds its total.
__device__ __forceinline__ float block_log_sum_exp(float* row_max, float* row_sum,
                                                   float* extra_a, float* extra_b, int tid) {
    __syncthreads();
    for (int stride = LOSS_THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            online_merge(row_max, row_sum, tid, tid + stride);
            if (extra_a != 0) {
                extra_a[tid] += extra_a[tid + stride];
            }
            if (extra_b != 0) {
                extra_b[tid] += extra_b[tid + stride];
            }
        }
        __syncthreads();
    }
    const float lse = row_max[0] + logf(row_sum[0]);
    __syncthreads();
    return lse;
}

// The log-sum-exp of one row of `vocab` logits `z`, from one read; every thread of the block
// gets it.
template <typename T>
__device__ float row_log_sum_exp(const T* z, int vocab) {
    __shared__ float row_max[LOSS_THREADS];
    __shared__ float row_sum[LOSS_THREADS];
    const int tid = threadIdx.x;
    float m = negative_infinity(), s = 0.0f;
    for (int j = tid; j < vocab; j += LOSS_THREADS) {
        online_add(to_f32(z[j]), &m, &s);
    }
    row_max[tid] = m;
    row_sum[tid] = s;
    return block_log_sum_exp(row_max, row_sum, 0, 0, tid);
}

// Forward KL(p ‖ q) against the model's final distribution, given as `log_p [rows, vocab]`
// (f32): loss[row] = Σ p (log p − log q) and grad = q − p, with q = softmax(logits).
template <typename T>
__device__ void kl_row(const T* logits, const float* log_p, int vocab, float* loss, T* grad) {
    __shared__ float row_max[LOSS_THREADS];
    __shared__ float row_sum[LOSS_THREADS];
    __shared__ float p_gap[LOSS_THREADS];
    __shared__ float p_mass[LOSS_THREADS];
    const int tid = threadIdx.x;
    const u64 offset = (u64)blockIdx.x * (u64)vocab;
    const T* z = logits + offset;
    const float* lp = log_p + offset;
    float m = negative_infinity(), s = 0.0f, gap = 0.0f, mass = 0.0f;
    for (int j = tid; j < vocab; j += LOSS_THREADS) {
        const float zj = to_f32(z[j]);
        online_add(zj, &m, &s);
        const float pj = expf(lp[j]);
        if (pj > 0.0f) {
            gap += pj * (lp[j] - zj);
            mass += pj;
        }
    }
    row_max[tid] = m;
    row_sum[tid] = s;
    p_gap[tid] = gap;
    p_mass[tid] = mass;
    const float lse = block_log_sum_exp(row_max, row_sum, p_gap, p_mass, tid);
    if (tid == 0) {
        // Σ p (log p − (z − lse)) = Σ p (log p − z) + lse Σ p.
        loss[blockIdx.x] = p_gap[0] + lse * p_mass[0];
    }
    T* g = grad + offset;
    for (int j = tid; j < vocab; j += LOSS_THREADS) {
        from_f32(expf(to_f32(z[j]) - lse) - expf(lp[j]), &g[j]);
    }
}

// Next-token cross-entropy: loss[row] = lse − z[target] and grad = softmax − one_hot(target).
// A row whose target is 0xffffffff is ignored: loss 0, gradient 0. The caller checks that
// every other target is below `vocab`.
template <typename T>
__device__ void ce_row(const T* logits, const u32* targets, int vocab, float* loss, T* grad) {
    const int tid = threadIdx.x;
    const u64 offset = (u64)blockIdx.x * (u64)vocab;
    const T* z = logits + offset;
    T* g = grad + offset;
    const u32 target = targets[blockIdx.x];
    if (target == 0xffffffffu) {
        for (int j = tid; j < vocab; j += LOSS_THREADS) {
            from_f32(0.0f, &g[j]);
        }
        if (tid == 0) {
            loss[blockIdx.x] = 0.0f;
        }
        return;
    }
    const float lse = row_log_sum_exp(z, vocab);
    if (tid == 0) {
        loss[blockIdx.x] = lse - to_f32(z[target]);
    }
    for (int j = tid; j < vocab; j += LOSS_THREADS) {
        const float q = expf(to_f32(z[j]) - lse);
        from_f32((u32)j == target ? q - 1.0f : q, &g[j]);
    }
}

// The model's final distribution as a KL target: log_p = logits − log-sum-exp per row, in
// f32, from one read for the log-sum-exp and one to write.
template <typename T>
__device__ void log_softmax_row(const T* logits, int vocab, float* log_p) {
    const u64 offset = (u64)blockIdx.x * (u64)vocab;
    const T* z = logits + offset;
    const float lse = row_log_sum_exp(z, vocab);
    float* out = log_p + offset;
    for (int j = threadIdx.x; j < vocab; j += LOSS_THREADS) {
        out[j] = to_f32(z[j]) - lse;
    }
}

// Grids: one block per row, LOSS_THREADS threads. `loss` has one f32 per row; `grad` has
// the shape and dtype of `logits`; `log_p` is f32 of the shape of `logits`.
extern "C" __global__ void lens_log_softmax_f32(const float* logits, int vocab, float* log_p) {
    log_softmax_row(logits, vocab, log_p);
}

extern "C" __global__ void lens_log_softmax_bf16(const bf16_bits* logits, int vocab,
                                                 float* log_p) {
    log_softmax_row(logits, vocab, log_p);
}

extern "C" __global__ void lens_kl_f32(const float* logits, const float* log_p, int vocab,
                                       float* loss, float* grad) {
    kl_row(logits, log_p, vocab, loss, grad);
}

extern "C" __global__ void lens_kl_bf16(const bf16_bits* logits, const float* log_p, int vocab,
                                        float* loss, bf16_bits* grad) {
    kl_row(logits, log_p, vocab, loss, grad);
}

extern "C" __global__ void lens_ce_f32(const float* logits, const u32* targets, int vocab,
                                       float* loss, float* grad) {
    ce_row(logits, targets, vocab, loss, grad);
}

extern "C" __global__ void lens_ce_bf16(const bf16_bits* logits, const u32* targets, int vocab,
                                        float* loss, bf16_bits* grad) {
    ce_row(logits, targets, vocab, loss, grad);
}
