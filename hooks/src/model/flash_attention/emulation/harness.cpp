// Runs the attention kernel of ../attention.cu on the CPU (hooks/src/cuda_kernels/emulation)
// for the Rust tests in ../tests.rs, which compare its output with the generic attention.
//   harness DIR attention D BATCH HEADS KV_HEADS T SCALE_LOG2   q, k, v -> out
// Files are raw little-endian bf16 arrays: q [BATCH, HEADS, T, D], k and v
// [BATCH, KV_HEADS, T, D], out [BATCH, T, HEADS, D]. Built with -I hooks/src/cuda_kernels.
#include "emulation/cuda_emulation.h"
#include "emulation/harness_io.h"

#include "element_types.cuh"
#include "../attention.cu"

int main(int argc, char** argv) {
    return run_harness(argc, argv, [&](const std::string& dir, const std::string& kernel) {
        if (argc < 9 || kernel != "attention") {
            throw std::runtime_error(
                "usage: harness DIR attention D BATCH HEADS KV_HEADS T SCALE_LOG2");
        }
        const int d = int_arg(argc, argv, 3), batch = int_arg(argc, argv, 4);
        const int heads = int_arg(argc, argv, 5), kv_heads = int_arg(argc, argv, 6);
        const int t = int_arg(argc, argv, 7);
        const float scale_log2 = std::stof(argv[8]);
        auto q = read<bf16_bits>(dir, "q.bin", (size_t)batch * heads * t * d);
        auto k = read<bf16_bits>(dir, "k.bin", (size_t)batch * kv_heads * t * d);
        auto v = read<bf16_bits>(dir, "v.bin", (size_t)batch * kv_heads * t * d);
        std::vector<bf16_bits> out((size_t)batch * t * heads * d);
        auto attention = d == 64    ? causal_attention_bf16_d64
                         : d == 128 ? causal_attention_bf16_d128
                         : d == 256 ? causal_attention_bf16_d256
                                    : nullptr;
        if (attention == nullptr) {
            throw std::runtime_error("no kernel for head size " + std::to_string(d));
        }
        const unsigned row_blocks = (t + ATTENTION_ROWS - 1) / ATTENTION_ROWS;
        emulate_launch(dim3{row_blocks, (unsigned)(batch * heads), 1}, ATTENTION_THREADS, [&] {
            attention(q.data(), k.data(), v.data(), out.data(), t, heads, kv_heads, scale_log2);
        });
        write(dir, "out.bin", out);
    });
}
