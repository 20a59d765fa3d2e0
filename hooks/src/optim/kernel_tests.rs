//! The fused Adam kernel checked without a GPU: NVRTC compiles it, and the same source,
//! built by the C++ compiler with `crate::cuda_kernels::emulation`, runs on the CPU and must
//! give the CPU pass's numbers bit for bit. Without NVRTC or a C++20 compiler these print
//! SKIP and pass, unless `EI_REQUIRE_KERNEL_CHECKS` is set (as in CI).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;
use crate::cuda_kernels::emulation;

#[test]
fn nvrtc_compiles_the_adam_kernel() {
    crate::cuda_kernels::check_compiles(&ADAM_KERNEL, &["adam_f32"]);
}

/// Seeded f32 values in `range`, `[count]`.
fn values(count: usize, range: std::ops::Range<f32>, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..count)
        .map(|_| rng.random_range(range.clone()))
        .collect();
    Tensor::from_vec(v, count, &Device::Cpu).unwrap()
}

/// A parameter, its gradient and Adam state (`[m, v]`, or `[m, v, v_max]`), as after a few
/// steps: moments of both signs and scales, second moments positive, some zero.
fn problem(count: usize, amsgrad: bool, seed: u64) -> (Tensor, Tensor, Vec<Tensor>) {
    let param = values(count, -1.0..1.0, seed);
    let grad = values(count, -3.0..3.0, seed + 1);
    let m = values(count, -0.5..0.5, seed + 2);
    let v = (values(count, -0.2..1.0, seed + 3).relu().unwrap() * 1e-3).unwrap();
    let mut state = vec![m, v];
    if amsgrad {
        state.push((values(count, -0.2..1.0, seed + 4).relu().unwrap() * 2e-3).unwrap());
    }
    (param, grad, state)
}

/// The CPU pass's new parameter and state, leaving `state` as it was (the pass updates the
/// state it is given in place).
fn stepped_on_the_cpu(param: &Tensor, grad: &Tensor, state: &[Tensor]) -> (Tensor, Vec<Tensor>) {
    let state: Vec<Tensor> = state.iter().map(|t| t.copy().unwrap()).collect();
    let param = adam_cpu(param, grad, &state, SCALARS).unwrap().unwrap();
    (param, state)
}

const SCALARS: AdamScalars = AdamScalars {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    bias1: 1.0 - 0.9 * 0.9 * 0.9,
    bias2: 1.0 - 0.999 * 0.999 * 0.999,
    lr: 3e-4,
};

#[test]
fn emulated_adam_kernel_equals_the_cpu_pass_bit_for_bit() {
    let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/optim/emulation/harness.cpp");
    let text = include_str!("emulation/harness.cpp");
    let Some(emulated) =
        emulation::Emulated::build("adam-kernel-emulation", &ADAM_KERNEL, &harness, text)
    else {
        return;
    };
    // 1000 elements: a partial last block; 2 blocks of 256 threads: each thread strides.
    for (count, blocks, amsgrad) in [(1000, 2, false), (777, 4, true), (5, 1, false)] {
        let (param, grad, state) = problem(count, amsgrad, count as u64);
        let (want_param, want_state) = stepped_on_the_cpu(&param, &grad, &state);
        let names = ["param", "grad", "m", "v", "v_max"];
        for (name, t) in names.iter().zip([&param, &grad].into_iter().chain(&state)) {
            emulated.put(&format!("{name}.bin"), t);
        }
        let c = SCALARS;
        let scalars = [
            c.beta1 as f32,
            c.beta2 as f32,
            c.eps as f32,
            c.bias2.sqrt() as f32,
            (c.lr / c.bias1) as f32,
        ];
        let mut args = vec![
            "adam".to_string(),
            count.to_string(),
            u8::from(amsgrad).to_string(),
            blocks.to_string(),
        ];
        args.extend(scalars.iter().map(|s| format!("{s:e}")));
        emulated.run(&args);
        let got = |name: &str| {
            emulated
                .get(&format!("{name}_out.bin"), DType::F32, &[count])
                .to_vec1::<f32>()
                .unwrap()
        };
        let want = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        assert_eq!(
            got("param"),
            want(&want_param),
            "{count} elements: parameter"
        );
        for (name, t) in ["m", "v", "v_max"].iter().zip(&want_state) {
            assert_eq!(got(name), want(t), "{count} elements: {name}");
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda -p eleuther-hooks --lib -- --ignored gpu_"]
fn gpu_adam_kernel_equals_the_cpu_pass_bit_for_bit() {
    let device = Device::new_cuda(0).expect("a CUDA GPU (device 0)");
    for amsgrad in [false, true] {
        let (param, grad, state) = problem(1_000_003, amsgrad, 7);
        let (want_param, want_state) = stepped_on_the_cpu(&param, &grad, &state);
        let gpu = |t: &Tensor| t.to_device(&device).unwrap();
        let gpu_state: Vec<Tensor> = state.iter().map(gpu).collect();
        let (got_param, got_state) =
            launch::adam_cuda(&gpu(&param), &gpu(&grad), &gpu_state, SCALARS)
                .unwrap()
                .expect("the kernel takes f32 CUDA tensors");
        let host = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            host(&got_param),
            host(&want_param),
            "AMSGrad {amsgrad}: parameter"
        );
        for (i, (g, w)) in got_state.iter().zip(&want_state).enumerate() {
            assert_eq!(host(g), host(w), "AMSGrad {amsgrad}: state slot {i}");
        }
    }
}
