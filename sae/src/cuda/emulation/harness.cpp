// Runs one kernel of ../kernels.cu on the CPU (see cuda_emulation.h) for the Rust tests in
// ../tests.rs, which write the inputs and compare the outputs with the CPU implementations.
//   harness DIR topk DTYPE ROWS N K RELU MASKED BIASED  pre[, mask][, bias] -> values, indices
//   harness DIR combine DTYPE TOKENS K D N HAS_BIAS  coef, indices, rows[, bias] -> out
//   harness DIR sort COUNT N                          indices -> offsets, order
//   harness DIR dots TOKENS K D N                     offsets, order, g, rows, gate -> out
//   harness DIR add_rows TOKENS K D N                 offsets, order, coef_a, vectors_a,
//                                                     out_a, coef_b, vectors_b, out_b
//                                                     -> out_a, out_b
//   harness DIR scatter_scalars COUNT N               coef, indices, out -> out
//   harness DIR unit_rows N D                         w -> out
//   harness DIR remove_parallel N D                   g, w -> out
// (add_rows and scatter_scalars add into the sums that out*.bin hold).
// Files are raw little-endian arrays: f32, bf16 (u16), u32 indices, u8 mask. Built with
// -I hooks/src/cuda_kernels.
#include "emulation/cuda_emulation.h"
#include "emulation/harness_io.h"

#include "element_types.cuh"
#include "../kernels.cu"

template <typename T>
static void run_topk(const std::string& dir, int rows, int n, int k, int relu, int masked,
                     int biased,
                     void (*kernel)(const T*, const T*, const unsigned char*, int, int, int, T*,
                                    u32*)) {
    auto pre = read<T>(dir, "pre.bin", (size_t)rows * n);
    std::vector<unsigned char> mask;
    if (masked) {
        mask = read<unsigned char>(dir, "mask.bin", n);
    }
    std::vector<T> bias;
    if (biased) {
        bias = read<T>(dir, "bias.bin", n);
    }
    std::vector<T> values((size_t)rows * k);
    std::vector<u32> indices((size_t)rows * k);
    emulate_launch(dim3{(unsigned)rows, 1, 1}, TOPK_THREADS, [&] {
        kernel(pre.data(), biased ? bias.data() : nullptr, masked ? mask.data() : nullptr, n, k,
               relu, values.data(), indices.data());
    });
    write(dir, "values.bin", values);
    write(dir, "indices.bin", indices);
}

template <typename T>
static void run_combine(const std::string& dir, int tokens, int k, int d, int n, int has_bias,
                        void (*kernel)(const T*, const u32*, const T*, const T*, int, int, T*)) {
    auto coef = read<T>(dir, "coef.bin", (size_t)tokens * k);
    auto indices = read<u32>(dir, "indices.bin", (size_t)tokens * k);
    auto rows = read<T>(dir, "rows.bin", (size_t)n * d);
    std::vector<T> bias;
    if (has_bias) {
        bias = read<T>(dir, "bias.bin", d);
    }
    std::vector<T> out((size_t)tokens * d);
    unsigned column_blocks = (d + SPARSE_THREADS - 1) / SPARSE_THREADS;
    emulate_launch(dim3{(unsigned)tokens, column_blocks, 1}, SPARSE_THREADS, [&] {
        kernel(coef.data(), indices.data(), rows.data(), has_bias ? bias.data() : nullptr, k, d,
               out.data());
    });
    write(dir, "out.bin", out);
}

int main(int argc, char** argv) {
    return run_harness(argc, argv, [&](const std::string& dir, const std::string& kernel) {
        auto arg = [&](int i) { return int_arg(argc, argv, i); };
        if (kernel == "topk") {
            const std::string dtype = argv[3];
            if (dtype == "f32") {
                run_topk<float>(dir, arg(4), arg(5), arg(6), arg(7), arg(8), arg(9), topk_f32);
            } else {
                run_topk<bf16_bits>(dir, arg(4), arg(5), arg(6), arg(7), arg(8), arg(9),
                                    topk_bf16);
            }
        } else if (kernel == "combine") {
            const std::string dtype = argv[3];
            if (dtype == "f32") {
                run_combine<float>(dir, arg(4), arg(5), arg(6), arg(7), arg(8), combine_rows_f32);
            } else {
                run_combine<bf16_bits>(dir, arg(4), arg(5), arg(6), arg(7), arg(8),
                                       combine_rows_bf16);
            }
        } else if (kernel == "sort") {
            // The launcher's sequence: count, scan, place.
            const long long count = arg(3);
            const int n = arg(4);
            auto indices = read<u32>(dir, "indices.bin", count);
            std::vector<u32> counts(n), offsets(n + 1), cursor(n), order(count);
            const unsigned blocks = (unsigned)((count + SPARSE_THREADS - 1) / SPARSE_THREADS);
            emulate_launch(dim3{blocks, 1, 1}, SPARSE_THREADS,
                           [&] { count_picks(indices.data(), count, counts.data()); });
            emulate_launch(dim3{1, 1, 1}, SCAN_THREADS,
                           [&] { scan_counts(counts.data(), n, offsets.data()); });
            emulate_launch(dim3{blocks, 1, 1}, SPARSE_THREADS, [&] {
                place_picks(indices.data(), count, offsets.data(), cursor.data(), order.data());
            });
            write(dir, "offsets.bin", offsets);
            write(dir, "order.bin", order);
        } else if (kernel == "dots") {
            int tokens = arg(3), k = arg(4), d = arg(5), n = arg(6);
            auto offsets = read<u32>(dir, "offsets.bin", n + 1);
            auto order = read<u32>(dir, "order.bin", (size_t)tokens * k);
            auto g = read<float>(dir, "g.bin", (size_t)tokens * d);
            auto rows = read<float>(dir, "rows.bin", (size_t)n * d);
            auto gate = read<float>(dir, "gate.bin", (size_t)tokens * k);
            std::vector<float> out((size_t)tokens * k);
            emulate_launch(dim3{(unsigned)n, 1, 1}, SPARSE_THREADS, [&] {
                gated_dots_by_latent(offsets.data(), order.data(), k, d, g.data(), rows.data(),
                                     gate.data(), out.data());
            });
            write(dir, "out.bin", out);
        } else if (kernel == "add_rows") {
            int tokens = arg(3), k = arg(4), d = arg(5), n = arg(6);
            const size_t count = (size_t)tokens * k;
            auto offsets = read<u32>(dir, "offsets.bin", n + 1);
            auto order = read<u32>(dir, "order.bin", count);
            auto coef_a = read<float>(dir, "coef_a.bin", count);
            auto coef_b = read<float>(dir, "coef_b.bin", count);
            auto vectors_a = read<float>(dir, "vectors_a.bin", (size_t)tokens * d);
            auto vectors_b = read<float>(dir, "vectors_b.bin", (size_t)tokens * d);
            auto out_a = read<float>(dir, "out_a.bin", (size_t)n * d);
            auto out_b = read<float>(dir, "out_b.bin", (size_t)n * d);
            emulate_launch(dim3{(unsigned)n, 1, 1}, SPARSE_THREADS, [&] {
                add_rows_by_latent(offsets.data(), order.data(), k, d, coef_a.data(),
                                   vectors_a.data(), out_a.data(), coef_b.data(),
                                   vectors_b.data(), out_b.data());
            });
            write(dir, "out_a.bin", out_a);
            write(dir, "out_b.bin", out_b);
        } else if (kernel == "scatter_scalars") {
            int count = arg(3), n = arg(4);
            auto coef = read<float>(dir, "coef.bin", count);
            auto indices = read<u32>(dir, "indices.bin", count);
            auto out = read<float>(dir, "out.bin", n);
            unsigned blocks = (count + SPARSE_THREADS - 1) / SPARSE_THREADS;
            emulate_launch(dim3{blocks, 1, 1}, SPARSE_THREADS, [&] {
                scatter_scalars_f32(coef.data(), indices.data(), count, out.data());
            });
            write(dir, "out.bin", out);
        } else if (kernel == "unit_rows" || kernel == "remove_parallel") {
            int n = arg(3), d = arg(4);
            auto w = read<float>(dir, "w.bin", (size_t)n * d);
            std::vector<float> g, out((size_t)n * d);
            if (kernel == "remove_parallel") {
                g = read<float>(dir, "g.bin", (size_t)n * d);
            }
            emulate_launch(dim3{(unsigned)n, 1, 1}, ROW_THREADS, [&] {
                if (kernel == "unit_rows") {
                    unit_rows_f32(w.data(), d, out.data());
                } else {
                    remove_parallel_f32(g.data(), w.data(), d, out.data());
                }
            });
            write(dir, "out.bin", out);
        } else {
            throw std::runtime_error("unknown kernel " + kernel);
        }
    });
}
