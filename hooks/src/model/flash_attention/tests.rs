//! The fused attention checked without a GPU: NVRTC compiles it, and the same source, built
//! by the C++ compiler with `crate::cuda_kernels::emulation` (tensor-core products and lane
//! shuffles emulated as PTX lays out their operands), runs on the CPU against the generic
//! attention. Without NVRTC or a C++20 compiler these print SKIP and pass, unless
//! `EI_REQUIRE_KERNEL_CHECKS` is set (as in CI).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::cuda_kernels::emulation;
use crate::model::layers::{causal_attention_generic, causal_mask};

#[test]
fn nvrtc_compiles_every_kernel() {
    let names: Vec<&str> = [64, 128, 256]
        .iter()
        .filter_map(|&d| entry_point(d))
        .collect();
    crate::cuda_kernels::check_compiles(&KERNELS, &names);
}

/// The kernel run on the CPU by the emulation harness.
struct Emulated(emulation::Emulated);

impl Emulated {
    fn new() -> Option<Self> {
        let harness = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/model/flash_attention/emulation/harness.cpp");
        let text = include_str!("emulation/harness.cpp");
        emulation::Emulated::build("attention-kernel-emulation", &KERNELS, &harness, text)
            .map(Emulated)
    }

    /// `[b, t, heads * d]` bf16 from bf16 `q: [b, heads, t, d]`, `k`/`v: [b, kv_heads, t, d]`.
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, heads, t, d) = q.dims4().unwrap();
        let kv_heads = k.dim(1).unwrap();
        for (name, x) in [("q.bin", q), ("k.bin", k), ("v.bin", v)] {
            self.0.put(name, x);
        }
        let sizes = [d, b, heads, kv_heads, t];
        let mut args = vec!["attention".to_string()];
        args.extend(sizes.iter().map(usize::to_string));
        args.push(format!("{:e}", scale_log2(d)));
        self.0.run(&args);
        self.0.get("out.bin", DType::BF16, &[b, t, heads * d])
    }
}

/// Seeded bf16 values in ±`scale`, `[b, heads, t, d]`.
fn bf16_input(shape: (usize, usize, usize, usize), scale: f32, seed: u64) -> Tensor {
    crate::model::seeded_bf16(&[shape.0, shape.1, shape.2, shape.3], scale, seed)
}

/// The generic attention in f32 on the same bf16 inputs: `[b, t, heads * d]`.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let t = q.dim(2).unwrap();
    let mask = causal_mask(t, t, &Device::Cpu).unwrap();
    causal_attention_generic(&f32(q), &f32(k), &f32(v), &mask).unwrap()
}

/// Every element within bf16 rounding (a few parts in a thousand of the output's scale) of
/// the f32 reference.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    if let Some((i, g, w)) = crate::compare::first_outside(got, want, 1e-2, 4e-3).unwrap() {
        panic!("{what}: element {i} is {g}, expected {w}");
    }
}

/// Head sizes 64, 128 and 256; sequence lengths below, at and across the 64-row blocks and
/// the key tiles; grouped-query heads; large scores (the running maximum matters).
#[test]
fn emulated_attention_matches_the_generic_attention() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    // (batch, heads, kv_heads, t, d, score scale)
    let cases = [
        (1, 2, 2, 1, 64, 1.0),
        (2, 4, 2, 100, 64, 1.0),
        (1, 2, 1, 64, 64, 4.0),
        (1, 2, 2, 130, 128, 1.0),
        (1, 1, 1, 70, 256, 2.0),
    ];
    for (case, &(b, heads, kv_heads, t, d, scale)) in cases.iter().enumerate() {
        let seed = 100 * case as u64;
        let q = bf16_input((b, heads, t, d), scale, seed);
        let k = bf16_input((b, kv_heads, t, d), scale, seed + 1);
        let v = bf16_input((b, kv_heads, t, d), 1.0, seed + 2);
        let got = emulated.attention(&q, &k, &v);
        let what = format!("case {case}: b {b}, heads {heads}/{kv_heads}, t {t}, d {d}");
        assert_close(&got, &reference(&q, &k, &v), &what);
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda -p eleuther-hooks --lib -- --ignored gpu_"]
fn gpu_flash_attention_matches_the_generic_attention() {
    let device = Device::new_cuda(0).expect("a CUDA GPU (device 0)");
    // Pythia-160m/410m (d 64), a Llama-style grouped-query shape (d 128), pythia-1b (d 256).
    for (case, &(b, heads, kv_heads, t, d)) in [
        (2, 12, 12, 2048, 64),
        (1, 32, 8, 1000, 128),
        (1, 8, 8, 2048, 256),
    ]
    .iter()
    .enumerate()
    {
        let seed = 200 * case as u64;
        let q = bf16_input((b, heads, t, d), 1.0, seed);
        let k = bf16_input((b, kv_heads, t, d), 1.0, seed + 1);
        let v = bf16_input((b, kv_heads, t, d), 1.0, seed + 2);
        let on = |x: &Tensor| x.to_device(&device).unwrap();
        let got = causal_attention(&on(&q), &on(&k), &on(&v))
            .unwrap()
            .expect("the fused kernel applies (bf16, compute capability 8.0+)")
            .to_device(&Device::Cpu)
            .unwrap();
        assert_close(
            &got,
            &reference(&q, &k, &v),
            &format!("case {case}: d {d}, t {t}"),
        );
    }
}
