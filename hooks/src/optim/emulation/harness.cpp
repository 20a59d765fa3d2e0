// Runs the Adam kernel of ../adam.cu on the CPU (hooks/src/cuda_kernels/emulation) for the
// Rust tests in ../kernel_tests.rs, which compare it with optim.rs's CPU pass.
//   harness DIR adam COUNT AMSGRAD BLOCKS BETA1 BETA2 EPS SQRT_BIAS2 STEP_SIZE
//     param, grad, m, v[, v_max] -> param_out, m_out, v_out[, v_max_out]
// Files are raw little-endian f32 arrays. Built with -I hooks/src/cuda_kernels.
#include "emulation/cuda_emulation.h"
#include "emulation/harness_io.h"

#include "element_types.cuh"
#include "../adam.cu"

int main(int argc, char** argv) {
    return run_harness(argc, argv, [&](const std::string& dir, const std::string& kernel) {
        if (argc < 11 || kernel != "adam") {
            throw std::runtime_error(
                "usage: harness DIR adam COUNT AMSGRAD BLOCKS BETA1 BETA2 EPS SQRT_BIAS2 "
                "STEP_SIZE");
        }
        const int count = int_arg(argc, argv, 3), amsgrad = int_arg(argc, argv, 4);
        const unsigned blocks = int_arg(argc, argv, 5);
        float scalars[5];
        for (int i = 0; i < 5; ++i) {
            scalars[i] = std::stof(argv[6 + i]);
        }
        auto param = read<float>(dir, "param.bin", count);
        auto grad = read<float>(dir, "grad.bin", count);
        auto m = read<float>(dir, "m.bin", count);
        auto v = read<float>(dir, "v.bin", count);
        std::vector<float> v_max;
        if (amsgrad) {
            v_max = read<float>(dir, "v_max.bin", count);
        }
        std::vector<float> param_out(count), m_out(count), v_out(count), v_max_out(v_max.size());
        emulate_launch(dim3{blocks, 1, 1}, ADAM_THREADS, [&] {
            adam_f32(param.data(), grad.data(), m.data(), v.data(),
                     amsgrad ? v_max.data() : nullptr, count, scalars[0], scalars[1],
                     scalars[2], scalars[3], scalars[4], param_out.data(), m_out.data(),
                     v_out.data(), amsgrad ? v_max_out.data() : nullptr);
        });
        write(dir, "param_out.bin", param_out);
        write(dir, "m_out.bin", m_out);
        write(dir, "v_out.bin", v_out);
        if (amsgrad) {
            write(dir, "v_max_out.bin", v_max_out);
        }
    });
}
