//! The fused GPT-NeoX kernels checked without a GPU: NVRTC compiles them, and the same
//! source, built by the C++ compiler with `crate::cuda_kernels::emulation`, runs on the CPU
//! against the generic steps (in f32 on the same bf16 inputs). Without NVRTC or a C++20
//! compiler these print SKIP and pass, unless `EI_REQUIRE_KERNEL_CHECKS` is set (as in CI).

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::cuda_kernels::emulation;
use crate::model::gpt_neox::split_heads;
use crate::model::layers::{gelu_erf, Rotary};
use crate::model::seeded_bf16;

#[test]
fn nvrtc_compiles_every_kernel() {
    let names = [
        "bias_gelu_bf16",
        "qkv_rotary_bf16",
        "parallel_residual_bf16",
        "layer_norm_bf16",
    ];
    crate::cuda_kernels::check_compiles(&KERNELS, &names);
}

fn emulated() -> Option<emulation::Emulated> {
    let harness =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/neox_kernels/emulation/harness.cpp");
    let text = include_str!("emulation/harness.cpp");
    emulation::Emulated::build("neox-kernel-emulation", &KERNELS, &harness, text)
}

fn f32(x: &Tensor) -> Tensor {
    x.to_dtype(DType::F32).unwrap()
}

/// Every element within bf16 rounding of the f32 reference.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    if let Some((i, g, w)) = crate::compare::first_outside(got, want, 8e-3, 1e-3).unwrap() {
        panic!("{what}: element {i} is {g}, expected {w}");
    }
}

#[test]
fn emulated_bias_gelu_matches_the_generic_steps() {
    let Some(emulated) = emulated() else {
        return;
    };
    // 300 columns: rows straddle the 128-thread blocks; 3 blocks: each thread strides.
    for (rows, cols, biased, blocks) in [(7, 300, true, 3), (4, 50, false, 1)] {
        let x = seeded_bf16(&[rows, cols], 4.0, cols as u64);
        let bias = seeded_bf16(&[cols], 1.0, 1 + cols as u64);
        emulated.put("x.bin", &x);
        emulated.put("bias.bin", &bias);
        let sizes = [rows, cols, usize::from(biased), blocks];
        let mut args = vec!["bias_gelu".to_string()];
        args.extend(sizes.iter().map(usize::to_string));
        emulated.run(&args);
        let got = emulated.get("out.bin", DType::BF16, &[rows, cols]);
        let input = if biased {
            f32(&x).broadcast_add(&f32(&bias)).unwrap()
        } else {
            f32(&x)
        };
        let want = gelu_erf(&input).unwrap();
        assert_close(&f32(&got), &want, &format!("{rows}x{cols}, bias {biased}"));
    }
}

#[test]
fn emulated_parallel_residual_matches_the_generic_adds() {
    let Some(emulated) = emulated() else {
        return;
    };
    for (rows, cols, biased, blocks) in [(6, 300, true, 4), (3, 70, false, 1)] {
        let seed = 10 * cols as u64;
        let [h, a, m] = [0, 1, 2].map(|i| seeded_bf16(&[rows, cols], 3.0, seed + i));
        let [a_bias, m_bias] = [3, 4].map(|i| seeded_bf16(&[cols], 1.0, seed + i));
        for (name, x) in [("h.bin", &h), ("a.bin", &a), ("m.bin", &m)] {
            emulated.put(name, x);
        }
        emulated.put("a_bias.bin", &a_bias);
        emulated.put("m_bias.bin", &m_bias);
        let sizes = [rows, cols, usize::from(biased), blocks];
        let mut args = vec!["parallel_residual".to_string()];
        args.extend(sizes.iter().map(usize::to_string));
        emulated.run(&args);
        let got = emulated.get("out.bin", DType::BF16, &[rows, cols]);
        let with_bias = |x: &Tensor, bias: &Tensor| {
            if biased {
                f32(x).broadcast_add(&f32(bias)).unwrap()
            } else {
                f32(x)
            }
        };
        let want = ((with_bias(&m, &m_bias) + with_bias(&a, &a_bias)).unwrap() + f32(&h)).unwrap();
        assert_close(&f32(&got), &want, &format!("{rows}x{cols}, bias {biased}"));
    }
}

/// The f64 LayerNorm of bf16 rows (eps 1e-5), as f32.
fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    let x = x.to_dtype(DType::F64).unwrap();
    let centred = x
        .broadcast_sub(&x.mean_keepdim(candle_core::D::Minus1).unwrap())
        .unwrap();
    let variance = centred
        .sqr()
        .unwrap()
        .mean_keepdim(candle_core::D::Minus1)
        .unwrap();
    let normed = centred
        .broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    let [weight, bias] = [weight, bias].map(|p| p.to_dtype(DType::F64).unwrap());
    f32(&normed
        .broadcast_mul(&weight)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap())
}

/// Rows of bf16 values around 0, rows 300 away from zero, and constant rows (whose output
/// is the bias: candle's one-pass variance gave NaN).
fn layer_norm_rows(rows: usize, cols: usize) -> Tensor {
    let spread = seeded_bf16(&[rows, cols], 2.0, cols as u64);
    let offsets: Vec<f32> = (0..rows)
        .map(|r| [0.0, 300.0, 3000.0 + 1111.0 * r as f32][r % 3])
        .collect();
    let offsets = Tensor::from_vec(offsets, (rows, 1), &Device::Cpu).unwrap();
    let spread = f32(&spread)
        .broadcast_mul(
            &Tensor::from_vec(
                (0..rows)
                    .map(|r| if r % 3 == 2 { 0f32 } else { 1.0 })
                    .collect(),
                (rows, 1),
                &Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    spread
        .broadcast_add(&offsets)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

#[test]
fn emulated_layer_norm_matches_a_float64_reference() {
    let Some(emulated) = emulated() else {
        return;
    };
    // 300 columns: rows straddle the 128-thread blocks; 64: fewer columns than threads;
    // 3000: sums of squares past float32's 24 bits (where a one-pass variance cancels).
    for (rows, cols) in [(6, 300), (3, 64), (9, 3000)] {
        let x = layer_norm_rows(rows, cols);
        let weight = seeded_bf16(&[cols], 1.0, 7);
        let bias = seeded_bf16(&[cols], 0.5, 8);
        emulated.put("x.bin", &x);
        emulated.put("weight.bin", &weight);
        emulated.put("bias.bin", &bias);
        let mut args = vec!["layer_norm".to_string()];
        args.extend([rows, cols].iter().map(usize::to_string));
        emulated.run(&args);
        let got = emulated.get("out.bin", DType::BF16, &[rows, cols]);
        let want = layer_norm_reference(&x, &weight, &bias);
        assert_close(&f32(&got), &want, &format!("LayerNorm {rows}x{cols}"));
    }
}

#[test]
fn emulated_qkv_rotary_matches_the_generic_split_and_rotary() {
    let Some(emulated) = emulated() else {
        return;
    };
    // (b, t, heads, hd, rot): Pythia-70m's partial rotary (16 of 64), pythia-1b's head size
    // (64 of 256, two column passes per 128-thread block), full rotary, none.
    for (b, t, heads, hd, rot, biased) in [
        (2, 5, 3, 64, 16, true),
        (1, 3, 2, 256, 64, true),
        (1, 4, 2, 32, 32, false),
        (1, 2, 1, 64, 0, true),
    ] {
        let width = heads * 3 * hd;
        let seed = (hd + rot) as u64;
        let qkv = seeded_bf16(&[b, t, width], 2.0, seed);
        let bias = seeded_bf16(&[width], 0.5, seed + 1);
        let rotary = Rotary::new(rot, 10_000.0);
        let (cos, sin) = rotary.tables(0, t, DType::BF16, &Device::Cpu).unwrap();
        for (name, x) in [
            ("qkv.bin", &qkv),
            ("bias.bin", &bias),
            ("cos.bin", &cos),
            ("sin.bin", &sin),
        ] {
            emulated.put(name, x);
        }
        let sizes = [b, t, heads, hd, rot, usize::from(biased)];
        let mut args = vec!["qkv_rotary".to_string()];
        args.extend(sizes.iter().map(usize::to_string));
        emulated.run(&args);
        let input = if biased {
            f32(&qkv).broadcast_add(&f32(&bias)).unwrap()
        } else {
            f32(&qkv)
        };
        let (q, k, v) = split_heads(&input, heads, &rotary, (&f32(&cos), &f32(&sin))).unwrap();
        for (name, want) in [("q", q), ("k", k), ("v", v)] {
            let got = emulated.get(&format!("{name}.bin"), DType::BF16, &[b, heads, t, hd]);
            assert_close(
                &f32(&got),
                &want,
                &format!("{name}, head size {hd}, rotary {rot}"),
            );
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda -p eleuther-hooks --lib -- --ignored gpu_"]
fn gpu_fused_steps_match_the_generic_steps() {
    let device = Device::new_cuda(0).expect("a CUDA GPU (device 0)");
    let gpu = |x: &Tensor| x.to_device(&device).unwrap();
    let cpu = |x: &Tensor| f32(&x.to_device(&Device::Cpu).unwrap());
    // Pythia-1b's MLP width and attention shape (8 heads of 256, 64 rotary dimensions).
    let x = seeded_bf16(&[300, 8192], 4.0, 1);
    let bias = seeded_bf16(&[8192], 1.0, 2);
    let got = bias_gelu(&gpu(&x), Some(&gpu(&bias)))
        .unwrap()
        .expect("the kernel applies to bf16 on a GPU");
    let want = gelu_erf(&f32(&x).broadcast_add(&f32(&bias)).unwrap()).unwrap();
    assert_close(&cpu(&got), &want, "bias and GELU");
    let (heads, hd, rot, t) = (8, 256, 64, 300);
    let qkv = seeded_bf16(&[2, t, heads * 3 * hd], 2.0, 3);
    let bias = seeded_bf16(&[heads * 3 * hd], 0.5, 4);
    let rotary = Rotary::new(rot, 10_000.0);
    let (cos, sin) = rotary.tables(0, t, DType::BF16, &Device::Cpu).unwrap();
    let got = qkv_rotary(
        &gpu(&qkv),
        Some(&gpu(&bias)),
        heads,
        rot,
        (&gpu(&cos), &gpu(&sin)),
    )
    .unwrap()
    .expect("the kernel applies to bf16 on a GPU");
    let input = f32(&qkv).broadcast_add(&f32(&bias)).unwrap();
    let want = split_heads(&input, heads, &rotary, (&f32(&cos), &f32(&sin))).unwrap();
    for (name, (g, w)) in
        ["q", "k", "v"]
            .iter()
            .zip([(got.0, want.0), (got.1, want.1), (got.2, want.2)])
    {
        assert_close(&cpu(&g), &w, name);
    }
    let [h, a, m] = [5, 6, 7].map(|seed| seeded_bf16(&[2, t, 2048], 3.0, seed));
    let [a_bias, m_bias] = [8, 9].map(|seed| seeded_bf16(&[2048], 1.0, seed));
    let got = parallel_residual(
        &gpu(&h),
        (&gpu(&a), Some(&gpu(&a_bias))),
        (&gpu(&m), Some(&gpu(&m_bias))),
    )
    .unwrap()
    .expect("the kernel applies to bf16 on a GPU");
    let biased = |x: &Tensor, b: &Tensor| f32(x).broadcast_add(&f32(b)).unwrap();
    let want = ((biased(&m, &m_bias) + biased(&a, &a_bias)).unwrap() + f32(&h)).unwrap();
    assert_close(&cpu(&got), &want, "parallel residual");
    // Pythia-1b's width, rows near and far from zero and constant ones.
    let x = layer_norm_rows(300, 2048);
    let (weight, bias) = (seeded_bf16(&[2048], 1.0, 10), seeded_bf16(&[2048], 0.5, 11));
    let got = layer_norm(&gpu(&x), &gpu(&weight), &gpu(&bias), 1e-5)
        .unwrap()
        .expect("the kernel applies to bf16 on a GPU");
    assert_close(
        &cpu(&got),
        &layer_norm_reference(&x, &weight, &bias),
        "LayerNorm",
    );
}
