// Runs one kernel of ../kernels.cu on the CPU (hooks/src/cuda_kernels/emulation) for the
// Rust tests in ../tests.rs, which write the inputs and compare the outputs with the
// generic lens loss.
//   harness DIR kl DTYPE ROWS VOCAB   logits, log_p -> loss, grad
//   harness DIR ce DTYPE ROWS VOCAB   logits, targets -> loss, grad
//   harness DIR log_softmax DTYPE ROWS VOCAB   logits -> log_p
// Files are raw little-endian arrays: logits and grad f32 or bf16 (u16), log_p and loss f32,
// targets u32. Built with -I hooks/src/cuda_kernels.
#include "emulation/cuda_emulation.h"
#include "emulation/harness_io.h"

#include "element_types.cuh"
#include "../kernels.cu"

// Runs `kernel` over `rows` rows of `vocab` logits of type T against targets of type U.
template <typename T, typename U>
static void run(const std::string& dir, int rows, int vocab, size_t target_count,
                void (*kernel)(const T*, const U*, int, float*, T*)) {
    auto logits = read<T>(dir, "logits.bin", (size_t)rows * vocab);
    auto target = read<U>(dir, "target.bin", target_count);
    std::vector<float> loss(rows);
    std::vector<T> grad((size_t)rows * vocab);
    emulate_launch(dim3{(unsigned)rows, 1, 1}, LOSS_THREADS, [&] {
        kernel(logits.data(), target.data(), vocab, loss.data(), grad.data());
    });
    write(dir, "loss.bin", loss);
    write(dir, "grad.bin", grad);
}

// Runs `kernel` (the target's log-softmax) over `rows` rows of `vocab` logits of type T.
template <typename T>
static void run_log_softmax(const std::string& dir, int rows, int vocab,
                            void (*kernel)(const T*, int, float*)) {
    auto logits = read<T>(dir, "logits.bin", (size_t)rows * vocab);
    std::vector<float> log_p((size_t)rows * vocab);
    emulate_launch(dim3{(unsigned)rows, 1, 1}, LOSS_THREADS,
                   [&] { kernel(logits.data(), vocab, log_p.data()); });
    write(dir, "log_p.bin", log_p);
}

int main(int argc, char** argv) {
    return run_harness(argc, argv, [&](const std::string& dir, const std::string& kernel) {
        if (argc < 6) {
            throw std::runtime_error("usage: harness DIR kl|ce|log_softmax f32|bf16 ROWS VOCAB");
        }
        const std::string& loss = kernel;
        const std::string dtype = argv[3];
        const int rows = int_arg(argc, argv, 4), vocab = int_arg(argc, argv, 5);
        const size_t all = (size_t)rows * vocab;
        if (loss == "kl" && dtype == "f32") {
            run<float, float>(dir, rows, vocab, all, lens_kl_f32);
        } else if (loss == "kl" && dtype == "bf16") {
            run<bf16_bits, float>(dir, rows, vocab, all, lens_kl_bf16);
        } else if (loss == "ce" && dtype == "f32") {
            run<float, u32>(dir, rows, vocab, rows, lens_ce_f32);
        } else if (loss == "ce" && dtype == "bf16") {
            run<bf16_bits, u32>(dir, rows, vocab, rows, lens_ce_bf16);
        } else if (loss == "log_softmax" && dtype == "f32") {
            run_log_softmax<float>(dir, rows, vocab, lens_log_softmax_f32);
        } else if (loss == "log_softmax" && dtype == "bf16") {
            run_log_softmax<bf16_bits>(dir, rows, vocab, lens_log_softmax_bf16);
        } else {
            throw std::runtime_error("unknown kernel " + loss + " " + dtype);
        }
    });
}
