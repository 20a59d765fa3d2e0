//! The kernels checked without a GPU: NVRTC compiles the source, and the same source, built
//! by the C++ compiler with `hooks::cuda_kernels::emulation`, runs on the CPU against the Rust
//! CPU implementations (TopK order and ties, decode, encoder selection, gradients).
//!
//! Without NVRTC (`libnvrtc.so.13` on the library path) or a C++20 compiler (`c++`, or
//! `$CXX`) the tests print SKIP and pass, unless `EI_REQUIRE_KERNEL_CHECKS` is set, as
//! `scripts/test-all` (CI) does after installing NVRTC from PyPI: there they fail instead.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hooks::cuda_kernels::emulation::{self, dtype_name};

use super::*;
use crate::kernels::{self, GradSum};
use crate::uniform;

/// Every kernel the launcher calls.
const ENTRY_POINTS: [&str; 12] = [
    "topk_f32",
    "topk_bf16",
    "combine_rows_f32",
    "combine_rows_bf16",
    "gated_dots_by_latent",
    "count_picks",
    "scan_counts",
    "place_picks",
    "add_rows_by_latent",
    "scatter_scalars_f32",
    "unit_rows_f32",
    "remove_parallel_f32",
];

#[test]
fn nvrtc_compiles_every_kernel() {
    hooks::cuda_kernels::check_compiles(&KERNELS, &ENTRY_POINTS);
}

/// The kernels run on the CPU by the emulation harness, on CPU tensors.
struct Emulated(emulation::Emulated);

impl Emulated {
    /// The harness, built once per version of the sources next to the test binary; `None`
    /// (SKIP) without a C++ compiler.
    fn new() -> Option<Self> {
        let harness = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cuda/emulation/harness.cpp");
        let text = include_str!("emulation/harness.cpp");
        emulation::Emulated::build("sae-kernel-emulation", &KERNELS, &harness, text).map(Emulated)
    }
}

impl std::ops::Deref for Emulated {
    type Target = emulation::Emulated;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Emulated {
    /// `combine_rows_*`: the sparse decode.
    fn combine_rows(
        &self,
        coef: &Tensor,
        indices: &Tensor,
        rows: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (tokens, k) = coef.dims2()?;
        let (n, d) = rows.dims2()?;
        self.put("coef.bin", coef);
        self.put("indices.bin", indices);
        self.put("rows.bin", rows);
        if let Some(bias) = bias {
            self.put("bias.bin", bias);
        }
        let dims = [tokens, k, d, n, usize::from(bias.is_some())];
        let mut args = vec!["combine".into(), dtype_name(rows.dtype())];
        args.extend(dims.iter().map(usize::to_string));
        self.run(&args);
        Ok(self.get("out.bin", rows.dtype(), &[tokens, d]))
    }

    /// `unit_rows_f32` (`w` alone) or `remove_parallel_f32` (`g` given): `[n, d]`.
    fn row_pass(&self, w: &Tensor, g: Option<&Tensor>) -> Tensor {
        let (n, d) = w.dims2().unwrap();
        self.put("w.bin", w);
        let kernel = match g {
            Some(g) => {
                self.put("g.bin", g);
                "remove_parallel"
            }
            None => "unit_rows",
        };
        self.run(&[kernel.to_string(), n.to_string(), d.to_string()]);
        self.get("out.bin", DType::F32, &[n, d])
    }

    /// Writes the picks' grouping for the kernels that read it.
    fn put_picks(&self, picks: &PicksByLatent) {
        self.put("offsets.bin", &picks.offsets);
        self.put("order.bin", &picks.order);
    }
}

impl Kernels for Emulated {
    fn topk(
        &self,
        pre: &Tensor,
        bias: Option<&Tensor>,
        k: usize,
        allowed: Option<&Tensor>,
        relu: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (rows, n) = pre.dims2()?;
        self.put("pre.bin", pre);
        if let Some(mask) = allowed {
            self.put("mask.bin", mask);
        }
        if let Some(bias) = bias {
            self.put("bias.bin", bias);
        }
        let dims = [
            rows,
            n,
            k,
            usize::from(relu),
            usize::from(allowed.is_some()),
            usize::from(bias.is_some()),
        ];
        let mut args = vec!["topk".into(), dtype_name(pre.dtype())];
        args.extend(dims.iter().map(usize::to_string));
        self.run(&args);
        Ok((
            self.get("values.bin", pre.dtype(), &[rows, k]),
            self.get("indices.bin", DType::U32, &[rows, k]),
        ))
    }

    fn sort_by_latent(&self, indices: &Tensor, n: usize) -> Result<PicksByLatent> {
        let (tokens, k) = indices.dims2()?;
        self.put("indices.bin", indices);
        self.run(&["sort".to_string(), (tokens * k).to_string(), n.to_string()]);
        Ok(PicksByLatent {
            offsets: self.get("offsets.bin", DType::U32, &[n + 1]),
            order: self.get("order.bin", DType::U32, &[tokens * k]),
            shape: (tokens, k),
        })
    }

    fn gated_row_dots(
        &self,
        picks: &PicksByLatent,
        g: &Tensor,
        rows: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor> {
        let (tokens, k) = picks.shape;
        let (n, d) = rows.dims2()?;
        self.put_picks(picks);
        for (name, t) in [("g.bin", g), ("rows.bin", rows), ("gate.bin", gate)] {
            self.put(name, t);
        }
        let mut args = vec!["dots".to_string()];
        args.extend([tokens, k, d, n].iter().map(usize::to_string));
        self.run(&args);
        Ok(self.get("out.bin", DType::F32, &[tokens, k]))
    }

    fn add_rows(
        &self,
        picks: &PicksByLatent,
        coefs: [&Tensor; 2],
        vectors: [&Tensor; 2],
        sums: [Tensor; 2],
    ) -> Result<[Tensor; 2]> {
        let (tokens, k) = picks.shape;
        let (n, d) = sums[0].dims2()?;
        self.put_picks(picks);
        for (m, name) in ["a", "b"].iter().enumerate() {
            self.put(&format!("coef_{name}.bin"), coefs[m]);
            self.put(&format!("vectors_{name}.bin"), vectors[m]);
            self.put(&format!("out_{name}.bin"), &sums[m]);
        }
        let mut args = vec!["add_rows".to_string()];
        args.extend([tokens, k, d, n].iter().map(usize::to_string));
        self.run(&args);
        Ok(["a", "b"].map(|name| self.get(&format!("out_{name}.bin"), DType::F32, &[n, d])))
    }

    fn scatter_scalars(&self, coef: &Tensor, indices: &Tensor, sum: Tensor) -> Result<Tensor> {
        let n = sum.dim(0)?;
        self.put("coef.bin", coef);
        self.put("indices.bin", indices);
        self.put("out.bin", &sum);
        let args = vec![
            "scatter_scalars".to_string(),
            coef.elem_count().to_string(),
            n.to_string(),
        ];
        self.run(&args);
        Ok(self.get("out.bin", DType::F32, &[n]))
    }
}

/// Random values rounded to quarters (many exact ties, among them +0), never -0.
fn with_ties(shape: &[usize], seed: u64) -> Tensor {
    let t = uniform(shape, 0.0, 2.0, seed);
    (((t * 4.0).unwrap().round().unwrap() / 4.0).unwrap() + 0.0).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    hooks::compare::relative_error(a, b).unwrap()
}

#[test]
fn emulated_topk_matches_the_cpu_selection_with_ties_relu_and_masks() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    // (rows, width, k, relu, masked): widths not multiples of the 256-thread tile, k above
    // the tile, k equal to the width, many ties.
    // The k-th key's first-pass bin (a quarter octave) holds at most 1024 keys (gathered in
    // one more pass) in the first six cases, more in the last two (all three radix passes):
    // 2.0 is 1/32 of the tie-heavy rows (values in [1.875, 2) round to it).
    let cases = [
        (5, 1000, 7, false, false),
        (4, 3001, 64, true, false),
        (3, 5000, 300, true, true),
        (2, 257, 257, false, false),
        (3, 4000, 50, false, false), // values at bf16 precision: fewer ties
        (3, 20_000, 1, false, false),
        (2, 40_000, 100, true, false),
        (2, 50_000, 40, true, true),
    ];
    for (case, &(rows, n, k, relu, masked)) in cases.iter().enumerate() {
        let seed = 10 + case as u64;
        let pre = match case {
            // Rounded to bf16, so that both dtypes see the same values.
            4 => uniform(&[rows, n], 0.0, 2.0, seed)
                .to_dtype(DType::BF16)
                .and_then(|x| x.to_dtype(DType::F32))
                .unwrap(),
            _ => with_ties(&[rows, n], seed),
        };
        let mask: Vec<u8> = (0..n).map(|j| u8::from(j % 5 != 2)).collect();
        let mask = Tensor::from_vec(mask, n, &Device::Cpu).unwrap();
        let mut reference_input = if relu {
            pre.relu().unwrap()
        } else {
            pre.clone()
        };
        if masked {
            let excluded = Tensor::full(f32::NEG_INFINITY, (rows, n), &Device::Cpu).unwrap();
            let keep = mask.broadcast_as((rows, n)).unwrap();
            reference_input = keep.where_cond(&reference_input, &excluded).unwrap();
        }
        let (values, indices) = kernels::topk(&reference_input, k).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let input = pre.to_dtype(dtype).unwrap(); // quarters in [-2, 2] are exact in bf16
            let allowed = masked.then_some(&mask);
            let (got_values, got_indices) = emulated.topk(&input, None, k, allowed, relu).unwrap();
            assert_eq!(
                got_indices.to_vec2::<u32>().unwrap(),
                indices.to_vec2::<u32>().unwrap(),
                "case {case} {dtype:?}: indices"
            );
            assert_eq!(
                got_values
                    .to_dtype(DType::F32)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
                values.to_vec2::<f32>().unwrap(),
                "case {case} {dtype:?}: values"
            );
        }
    }
}

#[test]
fn emulated_decoder_norm_kernels_match_the_cpu() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    // d = 300 spans two strides of the 256-thread block, d = 40 leaves most threads idle.
    for (n, d) in [(7, 300), (5, 40)] {
        let w = uniform(&[n, d], -0.3, 0.5, n as u64);
        let unit = emulated.row_pass(&w, None);
        let diff = max_rel_diff(&unit, &kernels::unit_rows(&w).unwrap());
        assert!(diff < 1e-6, "unit rows, d {d}: {diff}");
        let g = uniform(&[n, d], -1.0, 1.0, 3 + n as u64);
        let projected = emulated.row_pass(&unit, Some(&g));
        let want = kernels::remove_parallel(&g, &unit).unwrap();
        let diff = max_rel_diff(&projected, &want);
        assert!(diff < 1e-5, "gradient projection, d {d}: {diff}");
    }
}

#[test]
fn emulated_decode_matches_the_cpu_decode() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    // d = 300 spans two column blocks; k = 300 two coefficient tiles.
    for (case, &(tokens, n, d, k)) in [(9, 700, 300, 33), (4, 900, 40, 300)].iter().enumerate() {
        let seed = 20 + 4 * case as u64;
        let pre = uniform(&[tokens, n], 0.0, 1.0, seed);
        let (acts, indices) = kernels::topk(&pre, k).unwrap();
        let w_dec = uniform(&[n, d], 0.0, 1.0, seed + 1);
        let b_dec = uniform(&[d], 0.0, 1.0, seed + 2);
        let reference = kernels::decode(&acts, &indices, &w_dec, &b_dec).unwrap();
        let got = emulated
            .combine_rows(&acts, &indices, &w_dec, Some(&b_dec))
            .unwrap();
        assert!(max_rel_diff(&got, &reference) < 1e-6, "case {case} f32");
        let zero = b_dec.zeros_like().unwrap();
        let unbiased = kernels::decode(&acts, &indices, &w_dec, &zero).unwrap();
        let got = emulated
            .combine_rows(&acts, &indices, &w_dec, None)
            .unwrap();
        assert!(
            max_rel_diff(&got, &unbiased) < 1e-6,
            "case {case} without bias"
        );
        // bf16 storage, f32 accumulation: the reference on the same rounded inputs.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let rounded = |t: &Tensor| bf(t).to_dtype(DType::F32).unwrap();
        let reference = kernels::decode(
            &rounded(&acts),
            &indices,
            &rounded(&w_dec),
            &rounded(&b_dec),
        )
        .unwrap();
        let got = emulated
            .combine_rows(&bf(&acts), &indices, &bf(&w_dec), Some(&bf(&b_dec)))
            .unwrap();
        assert!(max_rel_diff(&got, &reference) < 4e-3, "case {case} bf16");
    }
}

/// A small SAE problem: encoder input, weights, and a dead-latent mask.
struct Problem {
    xc: Tensor,
    target: Tensor,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    dead: Vec<bool>,
}

fn problem(tokens: usize, n: usize, d: usize, seed: u64) -> Problem {
    Problem {
        xc: uniform(&[tokens, d], 0.0, 1.0, seed),
        target: uniform(&[tokens, d], 0.0, 1.0, seed + 1),
        w_enc: uniform(&[n, d], 0.0, 0.5, seed + 2),
        b_enc: uniform(&[n], -0.1, 0.3, seed + 3),
        w_dec: uniform(&[n, d], 0.0, 0.5, seed + 4),
        b_dec: uniform(&[d], 0.0, 0.2, seed + 5),
        dead: (0..n).map(|i| i % 3 == 1).collect(),
    }
}

/// With the dense product in f32 and in bf16 (whose rounded pre-activations tie often: the
/// kernel must break ties by the lower index, as the CPU does).
#[test]
fn emulated_encoder_selection_matches_the_cpu_encoder() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    let p = problem(11, 600, 40, 40);
    let picks = Picks {
        k: 9,
        dead: Some((&p.dead, 20)),
    };
    for product in [DType::F32, DType::BF16] {
        let w_enc = p.w_enc.to_dtype(product).unwrap();
        let (top, aux) = encode_select_with(&emulated, &p.xc, &w_enc, &p.b_enc, picks).unwrap();
        let (top_ref, aux_ref) = kernels::encode_select(&p.xc, &w_enc, &p.b_enc, picks).unwrap();
        let (aux, aux_ref) = (aux.unwrap(), aux_ref.unwrap());
        for (got, want, what) in [(&top, &top_ref, "top k"), (&aux, &aux_ref, "AuxK pick")] {
            assert_eq!(
                got.indices.to_vec2::<u32>().unwrap(),
                want.indices.to_vec2::<u32>().unwrap(),
                "{what} ({product:?}): indices"
            );
            assert!(
                max_rel_diff(&got.acts, &want.acts) < 1e-5,
                "{what} ({product:?}): activations"
            );
        }
    }
}

#[test]
fn emulated_gradients_match_the_cpu_backward() {
    let Some(emulated) = Emulated::new() else {
        return;
    };
    // Widths of one and of five 256-column sweeps of a block; a case where each latent has
    // some 400 picks (more than one 256-pick tile of the row sums).
    for (tokens, n, d) in [(13, 500, 36), (5, 200, 1100), (600, 10, 40)] {
        let p = problem(tokens, n, d, 60);
        let picks = Picks { k: 7, dead: None };
        let (top, _) = kernels::encode_select(&p.xc, &p.w_enc, &p.b_enc, picks).unwrap();
        check_backward(
            &emulated,
            &p,
            &top,
            &Device::Cpu,
            &format!("emulated, d {d}"),
        );
    }
}

/// `backward_with(sparse)` on `device` gives the CPU path's gradients (relative 1e-5) in the
/// three bias settings: both biases (an autoencoder), neither (AuxK's decode of the residual)
/// and the decoder's only (a transcoder); and the three added into one running sum (as a
/// step's chunks and AuxK terms are) give the CPU's sum of the three.
fn check_backward(
    sparse: &impl Kernels,
    p: &Problem,
    top: &Selection,
    device: &Device,
    what: &str,
) {
    let x_hat = kernels::decode(&top.acts, &top.indices, &p.w_dec, &p.b_dec).unwrap();
    let inputs = [
        &p.target,
        &p.xc,
        &top.acts,
        &top.indices,
        &x_hat,
        &p.w_enc,
        &p.w_dec,
    ];
    let moved: Vec<Tensor> = inputs
        .into_iter()
        .map(|t| t.to_device(device).unwrap())
        .collect();
    let compare = |got: &[Tensor], want: &[Tensor], setting: &str| {
        let names = ["W_enc", "b_enc", "W_dec", "b_dec"];
        for (name, (g, w)) in names.iter().zip(got.iter().zip(want)) {
            assert_eq!(g.dims(), w.dims(), "{what} {name}");
            let diff = max_rel_diff(g, w);
            assert!(diff < 1e-5, "{what} {name} ({setting}): {diff}");
        }
    };
    let (mut running_want, mut running_got) = (GradSum::Empty, None);
    for (decoder_bias, encoder_bias) in [(true, true), (false, true), (true, false)] {
        let on_cpu = kernels::Backward {
            target: &p.target,
            xc: &p.xc,
            acts: &top.acts,
            indices: &top.indices,
            x_hat: &x_hat,
            w_enc: &p.w_enc,
            w_dec: &p.w_dec,
            scale: 0.37,
            decoder_bias,
            encoder_bias,
        };
        let on_device = kernels::Backward {
            target: &moved[0],
            xc: &moved[1],
            acts: &moved[2],
            indices: &moved[3],
            x_hat: &moved[4],
            w_enc: &moved[5],
            w_dec: &moved[6],
            ..on_cpu
        };
        let mut sum = GradSum::Empty;
        kernels::backward(&on_cpu, &mut sum).unwrap();
        let got = backward_with(sparse, &on_device, None).unwrap();
        let setting = format!("decoder bias {decoder_bias}, encoder bias {encoder_bias}");
        compare(&got, &sum.tensors().unwrap(), &setting);
        kernels::backward(&on_cpu, &mut running_want).unwrap();
        running_got = Some(backward_with(sparse, &on_device, running_got).unwrap());
    }
    compare(
        &running_got.unwrap(),
        &running_want.tensors().unwrap(),
        "the three settings summed in place",
    );
}

/// Inputs whose encoder products are exact in f32 (multiples of 1/4 times multiples of 1/8,
/// summed over few terms), so the CPU and the GPU see identical pre-activations, ties
/// included, and must select identically.
#[cfg(feature = "cuda")]
fn exact_problem(tokens: usize, n: usize, d: usize, seed: u64) -> Problem {
    let quarters = |shape: &[usize], seed: u64, step: f64| {
        (uniform(shape, 0.0, 2.0, seed) / step)
            .unwrap()
            .round()
            .unwrap()
            .affine(step, 0.0)
            .unwrap()
    };
    let mut p = problem(tokens, n, d, seed);
    p.xc = quarters(&[tokens, d], seed, 0.25);
    p.w_enc = quarters(&[n, d], seed + 2, 0.125);
    p.b_enc = quarters(&[n], seed + 3, 0.5);
    p
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda -p eleuther-sae --lib -- --ignored gpu_"]
fn gpu_kernels_match_the_cpu_implementations() {
    let device = candle_core::Device::new_cuda(0).expect("a CUDA GPU (device 0)");
    let Device::Cuda(cuda) = &device else {
        unreachable!()
    };
    let launcher = launch::Launcher(cuda.clone());
    let gpu = |t: &Tensor| t.to_device(&device).unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    // Wide rows (past candle's ~8k sort limit), an AuxK pick of 1000 among the dead.
    for (tokens, n, d, k) in [(33, 20_011, 24, 32), (7, 131_072, 16, 128)] {
        let p = exact_problem(tokens, n, d, 80 + n as u64);
        let picks = Picks {
            k,
            dead: Some((&p.dead, 1000)),
        };
        let (top, aux) = encode_select_with(
            &launcher,
            &gpu(&p.xc),
            &gpu(&p.w_enc),
            &gpu(&p.b_enc),
            picks,
        )
        .unwrap();
        let (top_ref, aux_ref) = kernels::encode_select(&p.xc, &p.w_enc, &p.b_enc, picks).unwrap();
        for (got, want, what) in [
            (&top, &top_ref, "top k"),
            (&aux.unwrap(), &aux_ref.unwrap(), "AuxK pick"),
        ] {
            assert_eq!(
                cpu(&got.indices).to_vec2::<u32>().unwrap(),
                want.indices.to_vec2::<u32>().unwrap(),
                "width {n}, {what}: indices"
            );
            assert_eq!(
                max_rel_diff(&cpu(&got.acts), &want.acts),
                0.0,
                "width {n}, {what}"
            );
        }
        check_backward(&launcher, &p, &top_ref, &device, &format!("width {n}"));
    }
    // The decoder-norm passes at a real width (one 256-thread block per row of 2048).
    let w = uniform(&[300, 2048], 0.0, 0.5, 90);
    let g = uniform(&[300, 2048], 0.0, 1.0, 91);
    let unit = kernels::unit_rows(&w).unwrap();
    let diff = max_rel_diff(&cpu(&kernels::unit_rows(&gpu(&w)).unwrap()), &unit);
    assert!(diff < 1e-6, "unit rows: {diff}");
    let want = kernels::remove_parallel(&g, &unit).unwrap();
    let got = kernels::remove_parallel(&gpu(&g), &gpu(&unit)).unwrap();
    let diff = max_rel_diff(&cpu(&got), &want);
    assert!(diff < 1e-5, "gradient projection: {diff}");
}
