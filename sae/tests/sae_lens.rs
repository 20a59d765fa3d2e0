//! SAELens SAEs (cfg.json + sae_weights.safetensors; topk, standard ReLU with the pre-6.0
//! config layout and apply_b_dec_to_input false, jumprelu with thresholds) against SAELens's
//! encode/decode maths computed with numpy (tests/fixtures/sae_lens/make_fixture.py); bad
//! configs fail naming the field; such SAEs are refused by the trainer and by the sparsify
//! writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use sae::train::{TrainOptions, Trainer};
use sae::{Activation, Sae};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sae_lens")
        .join(case)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    hooks::compare::max_abs_diff(a, b).unwrap()
}

/// Sparse codes `[N, m]` scattered into dense `[N, n]` activations.
fn dense(acts: &Tensor, indices: &Tensor, n: usize) -> Vec<Vec<f32>> {
    let acts: Vec<Vec<f32>> = acts.to_vec2().unwrap();
    let indices: Vec<Vec<u32>> = indices.to_vec2().unwrap();
    acts.iter()
        .zip(&indices)
        .map(|(a, i)| {
            let mut row = vec![0f32; n];
            for (&v, &j) in a.iter().zip(i) {
                row[j as usize] += v;
            }
            row
        })
        .collect()
}

#[test]
fn sae_lens_files_give_sae_lens_outputs() {
    for (case, k) in [("topk", 5), ("standard", 64), ("jumprelu", 64)] {
        let sae = Sae::load(&fixture(case), &Device::Cpu).unwrap();
        let e: HashMap<String, Tensor> = candle_core::safetensors::load(
            fixture(case).join("expected.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            (sae.d_in(), sae.num_latents(), sae.k()),
            (16, 64, k),
            "{case}"
        );
        assert_eq!(sae.subtracts_b_dec(), case != "standard", "{case}");
        match (case, sae.activation()) {
            ("topk", Activation::TopK)
            | ("standard", Activation::Relu)
            | ("jumprelu", Activation::JumpRelu(_)) => {}
            (case, other) => panic!("{case}: {other:?}"),
        }
        let (acts, indices) = sae.encode(&e["x"]).unwrap();
        if case == "topk" {
            assert_eq!(acts.dims(), &[12, 5]);
        }
        let ours = dense(&acts, &indices, 64);
        let theirs: Vec<Vec<f32>> = e["acts"].to_vec2().unwrap();
        for (r, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            for (j, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() < 1e-5,
                    "{case} row {r} latent {j}: {x} vs {y}"
                );
            }
        }
        // Different counts per row (ReLU, JumpReLU): padding decodes to nothing.
        let x_hat = sae.decode(&acts, &indices).unwrap();
        assert!(max_abs(&x_hat, &e["x_hat"]) < 1e-4, "{case}");
        let out = sae.forward(&e["x"]).unwrap();
        assert!(max_abs(&out.x_hat, &e["x_hat"]) < 1e-4, "{case}");
    }
}

#[test]
fn sae_lens_refusals_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = |case: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = tmp.path().join(format!("{case}-{}", rand_name()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            fixture(case).join("sae_weights.safetensors"),
            dir.join("sae_weights.safetensors"),
        )
        .unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(case).join("cfg.json")).unwrap())
                .unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
        dir
    };
    let err = |dir: &Path| Sae::load(dir, &Device::Cpu).unwrap_err().to_string();
    let m = err(&copy("topk", &|c| {
        c["normalize_activations"] = "layer_norm".into()
    }));
    assert!(
        m.contains("normalize_activations 'layer_norm'") && m.contains("cfg.json"),
        "{m}"
    );
    let m = err(&copy("topk", &|c| {
        c["rescale_acts_by_decoder_norm"] = true.into()
    }));
    assert!(
        m.contains("rescale_acts_by_decoder_norm") && m.contains("save_inference_model"),
        "{m}"
    );
    let m = err(&copy("topk", &|c| c["d_sae"] = 65.into()));
    assert!(m.contains("'W_enc'") && m.contains("[16, 65]"), "{m}");
    let m = err(&copy("topk", &|c| c["architecture"] = "gated".into()));
    assert!(m.contains("'gated'"), "{m}");
    let m = err(&copy("topk", &|c| {
        c.as_object_mut().unwrap().remove("k");
    }));
    assert!(m.contains("'k'"), "{m}");
    let m = err(&tmp.path().join("nope"));
    assert!(m.contains("nope"), "{m}");

    // Inference only: not trainable, not writable as sparsify files.
    let relu = Sae::load(&fixture("standard"), &Device::Cpu).unwrap();
    let m = Trainer::new(&relu, TrainOptions::default())
        .unwrap_err()
        .to_string();
    assert!(m.contains("'relu'"), "{m}");
    let m = relu.save(&tmp.path().join("out")).unwrap_err().to_string();
    assert!(m.contains("relu") && m.contains("sparsify"), "{m}");
    // A SAELens TopK SAE that subtracts b_dec is a sparsify SAE: it trains and round-trips.
    let topk = Sae::load(&fixture("topk"), &Device::Cpu).unwrap();
    assert!(Trainer::new(&topk, TrainOptions::default()).is_ok());
    topk.save(&tmp.path().join("as-sparsify")).unwrap();
    let back = Sae::load(&tmp.path().join("as-sparsify"), &Device::Cpu).unwrap();
    assert_eq!(max_abs(back.w_enc(), topk.w_enc()), 0.0);
}

fn rand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
