//! The GPU test suite, for a machine with a CUDA GPU and a build with the `cuda` feature:
//!
//! ```sh
//! cargo test --release --features cuda --test gpu -- --ignored
//! ```
//!
//! (`bench/gpu.sh build` compiles it here; `bench/gpu.sh run` runs it on the lent GPU
//! machine together with the GPU benchmarks.) Every test is `#[ignore]`d so that a CUDA build
//! without a GPU still passes `cargo test`. What they check: the forward pass on the GPU
//! against transformers' golden values at every hook point (f32) and in bf16; our TopK
//! kernel against the CPU TopK on rows of 16k-131k latents, with ties; the sparse decode;
//! short SAE and tuned-lens trainings on the GPU against the same runs on the CPU; and a lens
//! evaluation on the GPU against the CPU's.
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hooks::candle_core::{DType, Device, Tensor};
use hooks::{HookPoint, Hooks, LoadOptions, Model};

mod common;
use common::repo;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU (device 0)")
}

/// `max |a - b| / max |b|` over all elements, in f32.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    hooks::compare::relative_error(a, b).unwrap()
}

const FORWARD_CASES: [&str; 7] = [
    "gpt_neox/pythia_style",
    "gpt_neox/sequential_full_rotary",
    "gpt_neox/six_heads_odd",
    "gpt_neox/pythia_70m_shape",
    "llama/gqa_head_dim",
    "llama/gqa_tied",
    "llama/mha_untied",
];

fn fixture(case: &str) -> (Model, HashMap<String, Tensor>, PathBuf) {
    let dir = repo().join("tests/fixtures").join(case);
    let expected =
        hooks::candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let options = LoadOptions {
        device: gpu(),
        ..LoadOptions::default()
    };
    (Model::from_folder(&dir, &options).unwrap(), expected, dir)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_forward_matches_transformers_at_every_hook_point() {
    for case in FORWARD_CASES {
        let (model, expected, _) = fixture(case);
        let ids = expected["input_ids"].to_device(&gpu()).unwrap();
        // Capturing the attention patterns runs attention unfused; without them the
        // attention kernels run.
        let all = model.hook_points();
        let per_token = all.iter().copied().filter(|p| p.is_per_token()).collect();
        for points in [all, per_token] {
            check_hook_points(case, &model, &ids, points, &expected);
        }
    }
}

/// Compares the captures of `points` with a fixture's values, wherever it has them.
fn check_hook_points(
    case: &str,
    model: &Model,
    ids: &Tensor,
    points: Vec<HookPoint>,
    expected: &HashMap<String, Tensor>,
) {
    let out = model
        .forward(ids, &mut Hooks::new().capture(points.clone()))
        .unwrap();
    let mut checked = 0;
    for point in points {
        let name = model.hook_name(point);
        let key = if point == HookPoint::Logits {
            "logits".to_string()
        } else {
            name.clone()
        };
        let Some(want) = expected.get(&key) else {
            continue;
        };
        let mut got = out.captures[&point].clone();
        if point == HookPoint::Logits {
            // Fixtures may keep only the last positions of the logits.
            let (keep, seq) = (want.dim(1).unwrap(), got.dim(1).unwrap());
            got = got.narrow(1, seq - keep, keep).unwrap();
        }
        let err = relative_error(&got, want);
        assert!(err < 2e-4, "{case} {name}: relative error {err}");
        checked += 1;
    }
    assert!(checked > 3, "{case}: only {checked} hook points compared");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_forward_in_bf16_stays_close_to_transformers_and_the_cpu() {
    for case in FORWARD_CASES {
        let (_, expected, dir) = fixture(case);
        let mut logits = Vec::new();
        for device in [gpu(), Device::Cpu] {
            let options = LoadOptions {
                device: device.clone(),
                dtype: DType::BF16,
                ..LoadOptions::default()
            };
            let model = Model::from_folder(&dir, &options).unwrap();
            let ids = expected["input_ids"].to_device(&device).unwrap();
            let out = model.logits(&ids).unwrap();
            assert_eq!(out.dtype(), DType::BF16);
            if device.is_cuda() {
                // Capturing every hook point keeps each block's attention and MLP outputs
                // apart: the path without the fused residual kernel must agree.
                let mut hooks = Hooks::new().capture(model.hook_points());
                let unfused =
                    &model.forward(&ids, &mut hooks).unwrap().captures[&HookPoint::Logits];
                let err = relative_error(unfused, &out);
                assert!(
                    err < 2e-2,
                    "{case}: bf16 GPU with and without captures: {err}"
                );
            }
            logits.push(out);
        }
        let want = &expected["logits"];
        let keep = want.dim(1).unwrap();
        let seq = logits[0].dim(1).unwrap();
        let gpu_logits = logits[0].narrow(1, seq - keep, keep).unwrap();
        let err = relative_error(&gpu_logits, want);
        assert!(err < 5e-2, "{case}: bf16 GPU vs transformers f32: {err}");
        let err = relative_error(&logits[0], &logits[1]);
        assert!(err < 5e-2, "{case}: bf16 GPU vs bf16 CPU: {err}");
    }
}

/// Seeded values rounded to quarters: many exact ties across a row.
fn rows_with_ties(rows: usize, n: usize, seed: u64) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..rows * n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (unit * 64.0).floor() / 4.0 - 8.0
        })
        .collect();
    Tensor::from_vec(values, (rows, n), &Device::Cpu).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_topk_matches_the_cpu_on_wide_rows_with_ties() {
    // Widths around candle's 8k sort limit and up to 131k latents; k up to the kernel's 4096.
    let cases = [
        (37, 16_385, 32),
        (19, 65_543, 128),
        (5, 131_072, 32),
        (3, 131_072, 4096),
        (64, 8_191, 1),
    ];
    for (case, &(rows, n, k)) in cases.iter().enumerate() {
        let x = rows_with_ties(rows, n, case as u64);
        let (values, indices) = sae::topk(&x, k).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            // Quarters in [-8, 8) are exact in bf16, so both dtypes have the same answer.
            let on_gpu = x.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap();
            let (got_values, got_indices) = sae::topk(&on_gpu, k).unwrap();
            assert!(got_indices.device().is_cuda());
            assert_eq!(
                got_indices
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_vec2::<u32>()
                    .unwrap(),
                indices.to_vec2::<u32>().unwrap(),
                "rows {rows} width {n} k {k} {dtype:?}: indices"
            );
            assert_eq!(
                relative_error(&got_values, &values),
                0.0,
                "rows {rows} width {n} k {k} {dtype:?}: values"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sparse_decode_matches_the_cpu() {
    for (d, n, k) in [(768, 24_576, 32), (300, 5_000, 129), (2048, 65_536, 32)] {
        let config = sae::SaeConfig::new(d, n, k);
        let on_cpu = sae::Sae::new(config, 3, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        on_cpu.save(tmp.path()).unwrap();
        let on_gpu = sae::Sae::load(tmp.path(), &gpu()).unwrap();
        let x = (rows_with_ties(50, d, 9) * 0.1).unwrap();
        let (acts, indices) = on_cpu.encode(&x).unwrap();
        let want = on_cpu.decode(&acts, &indices).unwrap();
        let got = on_gpu
            .decode(
                &acts.to_device(&gpu()).unwrap(),
                &indices.to_device(&gpu()).unwrap(),
            )
            .unwrap();
        let err = relative_error(&got, &want);
        assert!(err < 1e-5, "d {d} n {n} k {k}: decode relative error {err}");
        // An index past the SAE's latents is refused, not read past W_dec.
        let past = Tensor::new(&[[n as u32]], &gpu()).unwrap();
        let one = acts.narrow(0, 0, 1).unwrap().narrow(1, 0, 1).unwrap();
        let message = on_gpu
            .decode(&one.to_device(&gpu()).unwrap(), &past)
            .unwrap_err()
            .to_string();
        assert!(message.contains("is out of range"), "{message}");
        // The whole forward pass: selections may differ only where pre-activations tie
        // within rounding, so compare the reconstruction.
        let x_gpu = x.to_device(&gpu()).unwrap();
        let fvu_gpu = on_gpu.forward(&x_gpu).unwrap().fvu;
        let fvu_cpu = on_cpu.forward(&x).unwrap().fvu;
        assert!(
            (fvu_gpu - fvu_cpu).abs() < 1e-4 * fvu_cpu.abs().max(1.0),
            "d {d} n {n} k {k}: FVU {fvu_gpu} on the GPU, {fvu_cpu} on the CPU"
        );
    }
}

/// Every `history.json` under `dir`, parsed.
fn histories(dir: &Path) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "history.json") {
                found.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
    }
    found
}

/// The per-step values of `field` (a number, or the mean of a list) in a history.
fn series(history: &serde_json::Value, field: &str) -> Vec<f64> {
    history
        .as_array()
        .unwrap()
        .iter()
        .map(|step| match &step[field] {
            serde_json::Value::Array(values) => {
                values.iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / values.len() as f64
            }
            v => v.as_f64().unwrap(),
        })
        .collect()
}

/// Runs a training command (`run` with `options` plus the model, data, output and device)
/// on the GPU, then on the CPU, over a small synthetic model and WikiText-2; checks that
/// `field` falls on the GPU and follows the CPU run within `tolerance` (relative) at every step.
fn check_gpu_training_follows_the_cpu(
    run: impl Fn(Vec<String>) -> anyhow::Result<()>,
    options: &str,
    field: &str,
    tolerance: f64,
) {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_folder(tmp.path(), 64, 256);
    let data = repo().join("data/wikitext-2-raw-test.txt");
    let mut runs = Vec::new();
    for device in ["cuda", "cpu"] {
        let out = tmp.path().join(device);
        let mut command: Vec<String> = options.split_whitespace().map(String::from).collect();
        for (flag, path) in [("--model", &model), ("--data", &data), ("--output", &out)] {
            command.extend([flag.to_string(), path.to_string_lossy().into_owned()]);
        }
        command.extend(["--device".to_string(), device.to_string()]);
        run(command).unwrap();
        let found = histories(&out);
        assert_eq!(found.len(), 1, "{device}: one history.json");
        runs.push(series(&found[0], field));
    }
    let (gpu, cpu) = (&runs[0], &runs[1]);
    assert!(
        gpu.last() < gpu.first(),
        "{field} falls on the GPU: {gpu:?}"
    );
    assert_eq!(gpu.len(), cpu.len(), "{field}: step counts");
    for (step, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= tolerance * c.abs().max(1e-3),
            "{field} step {}: {g} on the GPU, {c} on the CPU",
            step + 1
        );
    }
}

/// With the encoder product in f32, and in bf16 (the default on a GPU: cuBLAS there,
/// candle's generic bf16 product on the CPU; near-ties may select other latents); and a skip
/// transcoder of the MLP in f32. Four chunks a step, so the GPU's gradient sums grow in
/// place over chunks.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_sae_training_follows_the_cpu_run() {
    for (what, dtype, tolerance) in [
        ("--hookpoints layers.1", "f32", 2e-3),
        ("--hookpoints layers.1", "bf16", 1e-2),
        (
            "--hookpoints layers.1.mlp --transcode --skip-connection",
            "f32",
            2e-3,
        ),
    ] {
        let options = format!(
            "sae train {what} --seq-len 64 --forward-batch 8 \
             --batch-size 512 --chunk-tokens 128 --steps 8 --k 8 --num-latents 2048 --lr 3e-3 \
             --lr-warmup-steps 2 --encoder-dtype {dtype}"
        );
        check_gpu_training_follows_the_cpu(sae::cli::run, &options, "fvu", tolerance);
    }
}

/// In f32, and in bf16 (the default on a GPU: candle's bf16 matmul there, the packed kernel
/// on the CPU; both bf16 inputs with f32 sums, and the GPU also rounds the logits to bf16, as
/// autocast does).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_lens_training_follows_the_cpu_run() {
    for (dtype, tolerance) in [("f32", 2e-3), ("bf16", 5e-3)] {
        let options = format!(
            "lens train --steps 5 --tokens-per-step 512 --seq-len 64 --batch-size 4 \
             --decode-dtype {dtype}"
        );
        check_gpu_training_follows_the_cpu(lens::cli::run, &options, "loss", tolerance);
    }
}

/// `lens eval` of a tuned lens on the GPU (tensor ops) against the CPU (fused passes over a
/// reused logits buffer): the same per-layer metrics up to f32 rounding and the order of sums.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_lens_eval_matches_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::model_folder(tmp.path(), 64, 256);
    let data = repo().join("data/wikitext-2-raw-test.txt");
    let lens_dir = tmp.path().join("lens");
    let run = |command: String| {
        let mut args: Vec<String> = command.split_whitespace().map(String::from).collect();
        for (flag, path) in [("--model", &model), ("--data", &data)] {
            args.extend([flag.to_string(), path.to_string_lossy().into_owned()]);
        }
        lens::cli::run(args).unwrap();
    };
    run(format!(
        "lens train --steps 3 --tokens-per-step 256 --seq-len 64 --device cpu --output {}",
        lens_dir.display()
    ));
    let mut reports = Vec::new();
    for device in ["cuda", "cpu"] {
        let json = tmp.path().join(format!("eval-{device}.json"));
        run(format!(
            "lens eval --tokens 512 --seq-len 64 --batch-size 4 --chunk-tokens 96 --device {device} --lens {} --json {}",
            lens_dir.display(),
            json.display()
        ));
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        reports.push(report);
    }
    let (gpu, cpu) = (&reports[0], &reports[1]);
    for lens in ["logit_lens", "tuned_lens"] {
        let rows = |r: &serde_json::Value| r[lens].as_array().unwrap().clone();
        assert_eq!(rows(gpu).len(), 4, "{lens}: three layers and the output");
        for (g, c) in rows(gpu).iter().zip(rows(cpu).iter()) {
            let layer = &c["layer"];
            for field in ["ce", "entropy", "kl"] {
                let (g, c) = (g[field].as_f64().unwrap(), c[field].as_f64().unwrap());
                assert!(
                    (g - c).abs() <= 1e-4 * c.abs().max(1.0),
                    "{lens} layer {layer}: {field} {g} on the GPU, {c} on the CPU"
                );
            }
            let field = "top1_agreement";
            let (g, c) = (g[field].as_f64().unwrap(), c[field].as_f64().unwrap());
            assert!(
                (g - c).abs() <= 0.01,
                "{lens} layer {layer}: top-1 agreement {g} on the GPU, {c} on the CPU"
            );
        }
    }
}
