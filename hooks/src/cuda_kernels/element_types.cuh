// The element types of our CUDA kernels, compiled ahead of each kernel source (by NVRTC,
// and by the emulation harnesses): `float`, and bf16 stored as `unsigned short` and
// converted by hand, so NVRTC needs no include path; and the block-wide sum they share.
#ifndef EI_ELEMENT_TYPES_CUH
#define EI_ELEMENT_TYPES_CUH

typedef unsigned int u32;
typedef unsigned short bf16_bits;
typedef unsigned long long u64;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_bits v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ void from_f32(float v, float* out) { *out = v; }
__device__ __forceinline__ void from_f32(float v, bf16_bits* out) {
    u32 bits = __float_as_uint(v);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        *out = (bf16_bits)((bits >> 16) | 0x40u); // NaN stays NaN
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u); // round to nearest, ties to even
        *out = (bf16_bits)(bits >> 16);
    }
}

// The sum of every thread's `v` over a block of THREADS threads (a power of two), returned
// to all of them.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[THREADS];
    partial[threadIdx.x] = v;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half /= 2) {
        if ((int)threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    const float total = partial[0];
    __syncthreads(); // the next call overwrites `partial`
    return total;
}

#endif
