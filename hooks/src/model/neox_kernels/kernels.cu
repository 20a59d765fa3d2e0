// The element-wise steps of a bf16 GPT-NeoX block around its matrix products, fused so
// each reads the product's output once and writes its result once (candle's tensor
// operations take a pass per step). Values are computed in f32 and rounded to bf16 once.

#define NEOX_THREADS 128

__device__ __forceinline__ float bias_at(const bf16_bits* bias, long long i) {
    return bias != 0 ? to_f32(bias[i]) : 0.0f;
}

// out = gelu(x + bias), the exact (erf) GELU, for `x: [rows, cols]` (the MLP's first
// product, its bias not yet added) and `bias: [cols]`: the bias pass and the GELU pass of
// the unfused MLP in one. Grid-stride loop over the `count = rows * cols` elements.
extern "C" __global__ void bias_gelu_bf16(const bf16_bits* x, const bf16_bits* bias, int cols,
                                          long long count, bf16_bits* out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += stride) {
        const float v = to_f32(x[i]) + bias_at(bias, i % cols);
        from_f32(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)), &out[i]);
    }
}

// The attention inputs from the fused query/key/value product `qkv: [b, t, heads, 3, hd]`
// (its bias, `[heads * 3 * hd]` or null, not yet added): `q`, `k`, `v: [b, heads, t, hd]`,
// with the rotary embedding (GPT-NeoX's: rotated half-pairs `c` and `c + rot/2`) applied to
// the first `rot` dimensions of each query and key head, from the `[t, rot/2]` tables. The
// bias pass, the three head splits and the rotary passes of the unfused block in one.
// Grid: one block per (token, head), `b * t * heads` blocks of NEOX_THREADS threads.
extern "C" __global__ void qkv_rotary_bf16(const bf16_bits* qkv, const bf16_bits* bias,
                                           const bf16_bits* cos, const bf16_bits* sin, int t,
                                           int heads, int hd, int rot, bf16_bits* q,
                                           bf16_bits* k, bf16_bits* v) {
    const long long token = blockIdx.x / heads; // b * t + position
    const int head = blockIdx.x % heads;
    const int position = (int)(token % t);
    const long long batch = token / t;
    const long long in_row = (token * heads + head) * 3 * hd;
    const long long bias_row = (long long)head * 3 * hd;
    const long long out_row = ((batch * heads + head) * t + position) * hd;
    const int half = rot / 2;
    bf16_bits* outputs[3] = {q, k, v};
    for (int part = 0; part < 3; ++part) {
        const long long in = in_row + (long long)part * hd;
        const long long b_in = bias_row + (long long)part * hd;
        for (int c = threadIdx.x; c < hd; c += NEOX_THREADS) {
            float value = to_f32(qkv[in + c]) + bias_at(bias, b_in + c);
            if (part < 2 && c < rot) {
                const int pair = c < half ? c + half : c - half;
                const float partner = to_f32(qkv[in + pair]) + bias_at(bias, b_in + pair);
                const int f = c < half ? c : c - half;
                const float cs = to_f32(cos[(long long)position * half + f]);
                const float sn = to_f32(sin[(long long)position * half + f]);
                value = c < half ? value * cs - partner * sn : value * cs + partner * sn;
            }
            from_f32(value, &outputs[part][out_row + c]);
        }
    }
}

// out = ((m + m_bias) + (a + a_bias)) + h for `[rows, cols]` activations: a parallel-residual
// block's output from the residual `h` and the attention's and MLP's output products `a`
// and `m` (their biases, `[cols]` or null, not yet added): the two bias passes and the two
// residual adds of the unfused block in one. Grid-stride loop over `count = rows * cols`.
extern "C" __global__ void parallel_residual_bf16(const bf16_bits* h, const bf16_bits* a,
                                                  const bf16_bits* m, const bf16_bits* a_bias,
                                                  const bf16_bits* m_bias, int cols,
                                                  long long count, bf16_bits* out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += stride) {
        const long long c = i % cols;
        const float attention = to_f32(a[i]) + bias_at(a_bias, c);
        const float mlp = to_f32(m[i]) + bias_at(m_bias, c);
        from_f32((mlp + attention) + to_f32(h[i]), &out[i]);
    }
}

// LayerNorm of the rows of `x: [rows, cols]` with `weight` and `bias` (`[cols]`), in f32 with
// each output rounded once: the mean, then the sums of the differences from it and of their
// squares (the corrected two-pass variance, as the CPU kernel has it; candle's
// E[x²] − mean² cancels for rows far from zero, and gives NaN for a constant row).
// Grid: one block per row.
extern "C" __global__ void layer_norm_bf16(const bf16_bits* x, const bf16_bits* weight,
                                           const bf16_bits* bias, int cols, float eps,
                                           bf16_bits* out) {
    const bf16_bits* row = x + (long long)blockIdx.x * cols;
    bf16_bits* out_row = out + (long long)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += NEOX_THREADS) {
        sum += to_f32(row[c]);
    }
    const float first = block_sum<NEOX_THREADS>(sum) / cols;
    float shift = 0.0f;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += NEOX_THREADS) {
        const float difference = to_f32(row[c]) - first;
        shift += difference;
        squares += difference * difference;
    }
    const float correction = block_sum<NEOX_THREADS>(shift) / cols;
    const float variance =
        fmaxf(block_sum<NEOX_THREADS>(squares) / cols - correction * correction, 0.0f);
    const float mean = first + correction;
    const float scale = 1.0f / sqrtf(variance + eps);
    for (int c = threadIdx.x; c < cols; c += NEOX_THREADS) {
        const float normed = (to_f32(row[c]) - mean) * scale;
        from_f32(normed * to_f32(weight[c]) + to_f32(bias[c]), &out_row[c]);
    }
}
