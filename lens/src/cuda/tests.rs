//! The fused loss kernels checked without a GPU: NVRTC compiles them, and the same source,
//! built by the C++ compiler with `hooks::cuda_kernels::emulation`, runs on the CPU against
//! the generic tensor loss. Without NVRTC or a C++20 compiler these print SKIP and pass,
//! unless `EI_REQUIRE_KERNEL_CHECKS` is set (as in CI).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hooks::cuda_kernels::emulation::{self, dtype_name};
use rand::{Rng, SeedableRng};

use super::*;
use crate::loss::{log_softmax, loss_and_logit_grad as generic};

#[test]
fn nvrtc_compiles_every_kernel() {
    hooks::cuda_kernels::check_compiles(
        &KERNELS,
        &[
            "lens_kl_f32",
            "lens_kl_bf16",
            "lens_ce_f32",
            "lens_ce_bf16",
            "lens_log_softmax_f32",
            "lens_log_softmax_bf16",
        ],
    );
}

/// The kernels run on the CPU by the emulation harness, on CPU tensors.
struct Emulated(emulation::Emulated);

impl Emulated {
    fn new() -> Option<Self> {
        let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda/emulation/harness.cpp");
        let text = include_str!("emulation/harness.cpp");
        emulation::Emulated::build("lens-kernel-emulation", &KERNELS, &harness, text).map(Emulated)
    }

    fn row_loss(&self, loss: &str, logits: &Tensor, target: &Tensor) -> (Tensor, Tensor) {
        let (rows, vocab) = logits.dims2().unwrap();
        self.0.put("logits.bin", logits);
        self.0.put("target.bin", target);
        let args = [
            loss.into(),
            dtype_name(logits.dtype()),
            rows.to_string(),
            vocab.to_string(),
        ];
        self.0.run(&args);
        (
            self.0.get("loss.bin", DType::F32, &[rows]),
            self.0.get("grad.bin", logits.dtype(), &[rows, vocab]),
        )
    }
}

impl LossKernels for Emulated {
    fn log_softmax(&self, logits: &Tensor) -> Result<Tensor> {
        let (rows, vocab) = logits.dims2()?;
        self.0.put("logits.bin", logits);
        let dtype = dtype_name(logits.dtype());
        self.0.run(&[
            "log_softmax".into(),
            dtype,
            rows.to_string(),
            vocab.to_string(),
        ]);
        Ok(self.0.get("log_p.bin", DType::F32, &[rows, vocab]))
    }

    fn kl(&self, logits: &Tensor, log_p: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.row_loss("kl", logits, log_p))
    }

    fn ce(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.row_loss("ce", logits, targets))
    }
}

/// Seeded logits `[rows, vocab]` spread over ±`scale`.
fn logits(rows: usize, vocab: usize, scale: f32, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * vocab)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(values, (rows, vocab), &Device::Cpu).unwrap()
}

/// Every element of `got` within `relative · |want| + absolute` of `want`.
fn assert_close(got: &Tensor, want: &Tensor, relative: f64, absolute: f64, what: &str) {
    if let Some((i, g, w)) = hooks::compare::first_outside(got, want, relative, absolute).unwrap() {
        panic!("{what}: element {i} is {g}, expected {w}");
    }
}

/// The fused kernels against the generic loss on the same (for bf16: bf16-rounded) logits,
/// for vocabularies that are not multiples of the 256-thread tile, one row of large logits
/// (the max shift matters), KL and cross-entropy with an ignored row.
#[test]
fn emulated_loss_matches_the_generic_loss() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    check_against_generic(&emulated, &Device::Cpu, &[1, 7, 255, 256, 257, 1000, 5003]);
}

/// Runs `kernels` on `device` against the generic loss on the CPU (see the emulated test).
fn check_against_generic(kernels: &impl LossKernels, device: &Device, vocabs: &[usize]) {
    let on = |t: &Tensor| t.to_device(device).unwrap();
    for (case, &vocab) in vocabs.iter().enumerate() {
        let seed = 10 * case as u64;
        let rows = 4;
        let big = logits(1, vocab, 80.0, seed + 1);
        let z = Tensor::cat(&[&logits(rows - 1, vocab, 6.0, seed), &big], 0).unwrap();
        let final_logits = logits(rows, vocab, 4.0, seed + 2);
        let log_p = log_softmax(&final_logits).unwrap();
        // The KL target's log-softmax kernel, from f32 and from bf16 logits.
        for dtype in [DType::F32, DType::BF16] {
            let final_logits = final_logits.to_dtype(dtype).unwrap();
            let got = kernels.log_softmax(&on(&final_logits)).unwrap();
            let want = log_softmax(&final_logits.to_dtype(DType::F32).unwrap()).unwrap();
            let what = format!("vocab {vocab} log_softmax {dtype:?}");
            assert_close(
                &got.to_device(&Device::Cpu).unwrap(),
                &want,
                1e-6,
                1e-5,
                &what,
            );
        }
        let ids = [0, u32::MAX, (vocab - 1) as u32, (vocab / 2) as u32];
        let next = Tensor::new(&ids, &Device::Cpu).unwrap();
        let from_kernel = kernels.log_softmax(&on(&final_logits)).unwrap();
        // (reference target, target for the kernels, name)
        let targets = [
            (
                Target::distribution(log_p.clone()).unwrap(),
                Target::distribution(on(&log_p)).unwrap(),
                "kl",
            ),
            (
                Target::distribution(log_p.clone()).unwrap(),
                Target::LogProbabilities(from_kernel),
                "kl from the log_softmax kernel",
            ),
            (
                Target::NextTokens(next.clone()),
                Target::NextTokens(on(&next)),
                "ce",
            ),
        ];
        for (target, target_on_device, name) in &targets {
            for dtype in [DType::F32, DType::BF16] {
                let what = format!("vocab {vocab} {name} {dtype:?}");
                let z = z.to_dtype(dtype).unwrap();
                let (loss, counted, grad) =
                    loss_and_logit_grad_with(kernels, &on(&z), target_on_device).unwrap();
                let (want_loss, want_counted, want_grad) =
                    generic(&z.to_dtype(DType::F32).unwrap(), target).unwrap();
                assert_eq!(counted, want_counted, "{what}: rows counted");
                assert_eq!(grad.dtype(), dtype, "{what}: gradient dtype");
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs() + 1e-5,
                    "{what}: loss {loss}, expected {want_loss}"
                );
                // f32: summation order only; bf16: the gradient is rounded once.
                let relative = if dtype == DType::F32 { 1e-5 } else { 4e-3 };
                let grad = grad.to_device(&Device::Cpu).unwrap();
                assert_close(
                    &grad,
                    &want_grad,
                    relative,
                    1e-6,
                    &format!("{what}: gradient"),
                );
            }
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda -p eleuther-lens --lib -- --ignored gpu_"]
fn gpu_fused_loss_matches_the_generic_loss() {
    let device = Device::new_cuda(0).expect("a CUDA GPU (device 0)");
    let Device::Cuda(cuda) = &device else {
        unreachable!()
    };
    // Small awkward vocabularies, and those of Pythia (50,304 rows) and SmolLM2 (49,152).
    let vocabs = [1, 257, 5003, 49_152, 50_304];
    check_against_generic(&launch::Launcher(cuda.clone()), &device, &vocabs);
}

/// Target entries with zero probability (`log p = -inf`) add nothing to the KL and leave
/// the gradient `q`; the reference gets a finite stand-in, which the generic path needs.
#[test]
fn emulated_kl_ignores_impossible_target_tokens() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    let (rows, vocab) = (2, 300);
    let z = logits(rows, vocab, 5.0, 3);
    let raw = logits(rows, vocab, 3.0, 4);
    let support = Tensor::from_vec(
        (0..rows * vocab)
            .map(|i| u8::from(i % 3 != 1))
            .collect::<Vec<_>>(),
        (rows, vocab),
        &Device::Cpu,
    )
    .unwrap();
    let masked = |fill: f32| {
        let fill = Tensor::full(fill, (rows, vocab), &Device::Cpu).unwrap();
        log_softmax(&support.where_cond(&raw, &fill).unwrap()).unwrap()
    };
    let target = Target::distribution(masked(f32::NEG_INFINITY)).unwrap();
    let stand_in = Target::distribution(masked(-1e30)).unwrap();
    let (loss, _, grad) = loss_and_logit_grad_with(&emulated, &z, &target).unwrap();
    let (want_loss, _, want_grad) = generic(&z, &stand_in).unwrap();
    assert!(loss.is_finite() && (loss - want_loss).abs() <= 1e-5 * want_loss.abs());
    assert_close(&grad, &want_grad, 1e-5, 1e-6, "gradient");
}

/// Kernels the checks must stop before.
struct NotReached;

impl LossKernels for NotReached {
    fn log_softmax(&self, _: &Tensor) -> Result<Tensor> {
        unreachable!("the log_softmax kernel ran")
    }

    fn kl(&self, _: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
        unreachable!("the kl kernel ran")
    }

    fn ce(&self, _: &Tensor, _: &Tensor) -> Result<(Tensor, Tensor)> {
        unreachable!("the ce kernel ran")
    }
}

#[test]
fn next_token_ids_beyond_the_vocabulary_are_an_error() {
    let z = logits(2, 10, 1.0, 5);
    let next = Target::NextTokens(Tensor::new(&[3u32, 10], &Device::Cpu).unwrap());
    let err = loss_and_logit_grad_with(&NotReached, &z, &next).unwrap_err();
    assert_eq!(
        err.to_string(),
        "next-token id 10 is out of range for the unembedding's 10 rows"
    );
}
