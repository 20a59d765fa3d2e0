// Runs the kernels of ../kernels.cu on the CPU (hooks/src/cuda_kernels/emulation) for the
// Rust tests in ../tests.rs, which compare them with the generic steps.
//   harness DIR bias_gelu ROWS COLS HAS_BIAS BLOCKS           x[, bias] -> out
//   harness DIR qkv_rotary B T HEADS HD ROT HAS_BIAS           qkv[, bias], cos, sin -> q, k, v
//   harness DIR parallel_residual ROWS COLS HAS_BIAS BLOCKS    h, a, m[, a_bias, m_bias] -> out
//   harness DIR layer_norm ROWS COLS                           x, weight, bias -> out (eps 1e-5)
// Files are raw little-endian bf16 arrays. Built with -I hooks/src/cuda_kernels.
#include "emulation/cuda_emulation.h"
#include "emulation/harness_io.h"

#include "element_types.cuh"
#include "../kernels.cu"

int main(int argc, char** argv) {
    return run_harness(argc, argv, [&](const std::string& dir, const std::string& kernel) {
        auto arg = [&](int i) { return int_arg(argc, argv, i); };
        if (kernel == "bias_gelu") {
            const int rows = arg(3), cols = arg(4), has_bias = arg(5);
            const unsigned blocks = arg(6);
            const long long count = (long long)rows * cols;
            auto x = read<bf16_bits>(dir, "x.bin", count);
            std::vector<bf16_bits> bias;
            if (has_bias) {
                bias = read<bf16_bits>(dir, "bias.bin", cols);
            }
            std::vector<bf16_bits> out(count);
            emulate_launch(dim3{blocks, 1, 1}, NEOX_THREADS, [&] {
                bias_gelu_bf16(x.data(), has_bias ? bias.data() : nullptr, cols, count,
                               out.data());
            });
            write(dir, "out.bin", out);
        } else if (kernel == "qkv_rotary") {
            const int b = arg(3), t = arg(4), heads = arg(5), hd = arg(6), rot = arg(7);
            const int has_bias = arg(8);
            const size_t width = (size_t)heads * 3 * hd;
            auto qkv = read<bf16_bits>(dir, "qkv.bin", (size_t)b * t * width);
            std::vector<bf16_bits> bias;
            if (has_bias) {
                bias = read<bf16_bits>(dir, "bias.bin", width);
            }
            auto cos = read<bf16_bits>(dir, "cos.bin", (size_t)t * (rot / 2));
            auto sin = read<bf16_bits>(dir, "sin.bin", (size_t)t * (rot / 2));
            const size_t count = (size_t)b * heads * t * hd;
            std::vector<bf16_bits> q(count), k(count), v(count);
            emulate_launch(dim3{(unsigned)(b * t * heads), 1, 1}, NEOX_THREADS, [&] {
                qkv_rotary_bf16(qkv.data(), has_bias ? bias.data() : nullptr, cos.data(),
                                sin.data(), t, heads, hd, rot, q.data(), k.data(), v.data());
            });
            write(dir, "q.bin", q);
            write(dir, "k.bin", k);
            write(dir, "v.bin", v);
        } else if (kernel == "parallel_residual") {
            const int rows = arg(3), cols = arg(4), has_bias = arg(5);
            const unsigned blocks = arg(6);
            const long long count = (long long)rows * cols;
            auto h = read<bf16_bits>(dir, "h.bin", count);
            auto a = read<bf16_bits>(dir, "a.bin", count);
            auto m = read<bf16_bits>(dir, "m.bin", count);
            std::vector<bf16_bits> a_bias, m_bias;
            if (has_bias) {
                a_bias = read<bf16_bits>(dir, "a_bias.bin", cols);
                m_bias = read<bf16_bits>(dir, "m_bias.bin", cols);
            }
            std::vector<bf16_bits> out(count);
            emulate_launch(dim3{blocks, 1, 1}, NEOX_THREADS, [&] {
                parallel_residual_bf16(h.data(), a.data(), m.data(),
                                       has_bias ? a_bias.data() : nullptr,
                                       has_bias ? m_bias.data() : nullptr, cols, count,
                                       out.data());
            });
            write(dir, "out.bin", out);
        } else if (kernel == "layer_norm") {
            const int rows = arg(3), cols = arg(4);
            const long long count = (long long)rows * cols;
            auto x = read<bf16_bits>(dir, "x.bin", count);
            auto weight = read<bf16_bits>(dir, "weight.bin", cols);
            auto bias = read<bf16_bits>(dir, "bias.bin", cols);
            std::vector<bf16_bits> out(count);
            emulate_launch(dim3{(unsigned)rows, 1, 1}, NEOX_THREADS, [&] {
                layer_norm_bf16(x.data(), weight.data(), bias.data(), cols, 1e-5f, out.data());
            });
            write(dir, "out.bin", out);
        } else {
            throw std::runtime_error("unknown kernel " + kernel);
        }
    });
}
