//! Times our matrix products for `bench/products.py`: for each shape `MxKxN`, the bf16 product
//! (`hooks::cpu::bf16::gemm`: bf16 inputs, f32 sums, the right-hand matrix packed once), the
//! f32 product of the same values through the `gemm` crate (`hooks::cpu::product_with_transposed`:
//! the right-hand matrix stored `[N, K]`, as a linear layer's weight) and through our packed
//! f32 product (`hooks::cpu::packed::gemm`, the weight packed once, as an f32 model's layers
//! on a CPU with AVX-512), best of `--reps` calls each, one JSON line per shape.
//!
//! cargo run --release -p eleuther-hooks --example products_bench -- 2048x768x2304 ...
//!     [--reps 5] [--kernel auto|amx|avx512bf16|portable]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use hooks::cpu::bf16::{self, Kernel, PackedB};
use hooks::cpu::packed::{self, F32Kernel, Packed, F32};
use hooks::cpu::product_with_transposed;

/// Seconds of the fastest of `reps` calls of `call` (after one untimed call).
fn best_of(reps: usize, mut call: impl FnMut()) -> f64 {
    call();
    (0..reps)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut shapes, mut reps, mut kernel) = (Vec::new(), 5, Kernel::detect());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => reps = args.next().context("--reps takes a count")?.parse()?,
            "--kernel" => {
                kernel = match args.next().as_deref() {
                    Some("auto") => Kernel::detect(),
                    Some("amx") => Kernel::Amx,
                    Some("avx512bf16") => Kernel::Avx512Bf16,
                    Some("portable") => Kernel::Portable,
                    other => {
                        bail!("--kernel takes auto, amx, avx512bf16 or portable, not {other:?}")
                    }
                }
            }
            shape => {
                let dims: Vec<usize> = shape
                    .split('x')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("shape '{shape}' is not MxKxN"))?;
                let [m, k, n] = dims[..] else {
                    bail!("shape '{shape}' is not MxKxN");
                };
                shapes.push((m, k, n));
            }
        }
    }
    if !kernel.runs_here() {
        bail!("the {kernel:?} kernel does not run on this CPU");
    }
    for (m, k, n) in shapes {
        // Values exactly representable in bf16, so both products see the same inputs.
        let value =
            |i: usize| bf16::bf16_value(bf16::bf16_bits(((i * 7919) % 1009) as f32 / 1009.0 - 0.5));
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i + 17)).collect();
        let packed = PackedB::pack(k, n, |row, col| w[col * k + row]);
        let lda = packed.lhs_stride();
        let mut a_bits = vec![0u16; m * lda];
        for (row, bits) in a.chunks(k).zip(a_bits.chunks_mut(lda)) {
            bf16::round_to_bf16(row, &mut bits[..k]);
        }
        let mut c = vec![0f32; m * n];
        let bf16_s = best_of(reps, || {
            bf16::gemm(kernel, &a_bits, lda, m, &packed, &mut c, n)
        });
        let checksum_bf16: f64 = c.iter().map(|&v| v as f64).sum();
        let f32_s = best_of(reps, || {
            product_with_transposed(&mut c, &a, &w, k, false, true)
        });
        let checksum_f32: f64 = c.iter().map(|&v| v as f64).sum();
        let f32_kernel = F32Kernel::detect();
        let packed_f32 = Packed::<F32>::pack(k, n, |row, col| w[col * k + row]);
        let packed_f32_s = best_of(reps, || {
            packed::gemm(f32_kernel, &a, k, m, &packed_f32, &mut c, n)
        });
        let checksum_packed: f64 = c.iter().map(|&v| v as f64).sum();
        let flop = 2.0 * (m * k * n) as f64;
        println!(
            "{}",
            serde_json::json!({
                "shape": format!("{m}x{k}x{n}"),
                "kernel": format!("{kernel:?}"),
                "beats_f32": kernel.beats_f32(),
                "threads": rayon::current_num_threads(),
                "bf16_gflops": flop / bf16_s / 1e9,
                "f32_gflops": flop / f32_s / 1e9,
                "packed_f32_kernel": format!("{f32_kernel:?}"),
                "packed_f32_gflops": flop / packed_f32_s / 1e9,
                "packed_f32_relative_checksum_gap":
                    (checksum_packed - checksum_f32).abs() / checksum_f32.abs().max(1.0),
                "relative_checksum_gap":
                    (checksum_bf16 - checksum_f32).abs() / checksum_f32.abs().max(1.0),
            })
        );
    }
    Ok(())
}
