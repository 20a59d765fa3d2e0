// One Adam step (PyTorch's torch.optim.Adam; any weight decay is already in `grad`) over
// `count` f32 elements, written to fresh buffers, in the arithmetic of optim.rs's CPU pass:
//   m' = b1 m + (1 - b1) g        v' = b2 v + (1 - b2) g g        (AMSGrad: w' = max(w, v'))
//   p' = p - m' / (sqrt(v', or w') / sqrt_bias2 + eps) * step_size
// with sqrt_bias2 = sqrt(1 - b2^t) and step_size = lr / (1 - b1^t). Every operation rounds
// on its own (no fused multiply-adds), so the result is bit-identical to the CPU's. One
// pass: the parameter, gradient and moments are read once and written once, where candle's
// tensor operations take about a dozen passes. `v_max`/`v_max_out` are null without AMSGrad.
// Any grid of ADAM_THREADS-thread blocks (a grid-stride loop).

#define ADAM_THREADS 256

extern "C" __global__ void adam_f32(const float* param, const float* grad, const float* m,
                                    const float* v, const float* v_max, long long count,
                                    float beta1, float beta2, float eps, float sqrt_bias2,
                                    float step_size, float* param_out, float* m_out,
                                    float* v_out, float* v_max_out) {
    const float keep1 = beta1, take1 = __fsub_rn(1.0f, beta1);
    const float keep2 = beta2, take2 = __fsub_rn(1.0f, beta2);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += stride) {
        const float g = grad[i];
        const float m1 = __fadd_rn(__fmul_rn(m[i], keep1), __fmul_rn(g, take1));
        const float v1 = __fadd_rn(__fmul_rn(v[i], keep2), __fmul_rn(__fmul_rn(g, g), take2));
        float second = v1;
        if (v_max != 0) {
            second = fmaxf(v_max[i], v1);
            v_max_out[i] = second;
        }
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(second), sqrt_bias2), eps);
        param_out[i] = __fsub_rn(param[i], __fmul_rn(__fdiv_rn(m1, denom), step_size));
        m_out[i] = m1;
        v_out[i] = v1;
    }
}
