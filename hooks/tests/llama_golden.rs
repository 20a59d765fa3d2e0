//! Llama forward pass against golden values from Hugging Face transformers
//! (`tests/fixtures/generate.py`, section D): every hook point, logits, ablations, dtypes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hooks::candle_core::{DType, Device, Tensor};
use hooks::config::ModelConfig;
use hooks::{HookPoint, Hooks, LoadOptions, Model};

mod common;
use common::relative_error;

/// The last one has Llama 3.1's scaled rotary embedding.
const CASES: [&str; 4] = ["gqa_tied", "mha_untied", "gqa_head_dim", "llama3_rope"];

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/llama")
        .join(case)
}

fn expected(case: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir(case).join("expected.safetensors");
    hooks::candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn load(case: &str, dtype: DType) -> Model {
    let options = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    Model::from_folder(&fixture_dir(case), &options).unwrap()
}

fn logits_with(model: &Model, ids: &Tensor, hooks: &mut Hooks) -> Tensor {
    model.forward(ids, hooks).unwrap().logits.unwrap()
}

#[test]
fn tiny_llamas_match_transformers_at_every_hook_point() {
    for case in CASES {
        let model = load(case, DType::F32);
        assert!(matches!(model.config(), ModelConfig::Llama(_)));
        let exp = expected(case);
        let mut worst = (0f64, String::new());
        for points in common::all_then_per_token_points(&model) {
            let mut hooks = Hooks::new().capture(points.clone());
            let out = model.forward(&exp["input_ids"], &mut hooks).unwrap();
            for point in points {
                let name = model.hook_name(point);
                let err = relative_error(&out.captures[&point], &exp[&name]);
                assert!(err < 1e-4, "{case} {name}: relative error {err}");
                if err >= worst.0 {
                    worst = (err, name);
                }
            }
        }
        println!(
            "{case}: worst relative error {:.2e} at {}",
            worst.0, worst.1
        );
    }
}

#[test]
fn hook_names_use_self_attn() {
    let model = load("gqa_tied", DType::F32);
    assert_eq!(
        model.hook_name(HookPoint::Attention(1)),
        "layers.1.self_attn"
    );
    assert_eq!(
        model.hook_point("layers.1.self_attn").unwrap(),
        HookPoint::Attention(1)
    );
    assert_eq!(
        model.hook_point("blocks.0.hook_mlp_out").unwrap(),
        HookPoint::Mlp(0)
    );
    for (name, point) in [
        ("layers.1.attn.pattern", HookPoint::AttentionPattern(1)),
        ("layers.1.attn.o_proj.input", HookPoint::AttentionHeads(1)),
        ("blocks.1.attn.hook_z", HookPoint::AttentionHeads(1)),
        ("layers.1.self_attn.o_proj", HookPoint::Attention(1)),
    ] {
        assert_eq!(model.hook_point(name).unwrap(), point, "{name}");
    }
    assert!(model.hook_point("layers.1.self_attn.dense.input").is_err());
    // `*` names match patterns only when they end in `.pattern`.
    let from_list = |names: &str| model.hook_points_from_list(names).unwrap();
    assert_eq!(
        from_list("layers.*.*.*"),
        [HookPoint::MlpInput(0), HookPoint::MlpInput(1)]
    );
    assert_eq!(
        from_list("layers.*.*.pattern"),
        [
            HookPoint::AttentionPattern(0),
            HookPoint::AttentionPattern(1)
        ]
    );
    let err = model.hook_point("layers.2").unwrap_err().to_string();
    assert!(err.contains("layers.{0..1}.self_attn"), "{err}");
    assert!(err.contains("layers.{0..1}.self_attn.pattern"), "{err}");
}

#[test]
fn tiny_llamas_in_bf16_and_f16_stay_close() {
    for case in CASES {
        let exp = expected(case);
        for dtype in [DType::BF16, DType::F16] {
            let model = load(case, dtype);
            let logits = model.logits(&exp["input_ids"]).unwrap();
            assert_eq!(logits.dtype(), dtype);
            let err = relative_error(&logits, &exp["logits"]);
            let tolerance = if dtype == DType::BF16 { 5e-2 } else { 1e-2 };
            println!("{case} {dtype:?}: logits relative error {err:.2e}");
            assert!(err < tolerance, "{case} {dtype:?}: relative error {err}");
        }
    }
}

#[test]
fn zero_ablation_matches_transformers() {
    for case in CASES {
        let model = load(case, DType::F32);
        let exp = expected(case);
        for (point, key) in [
            (HookPoint::Mlp(1), "ablate.layers.1.mlp.logits"),
            (HookPoint::Attention(0), "ablate.layers.0.self_attn.logits"),
        ] {
            let mut hooks = Hooks::new().replace(point, |x| Ok(Some(x.zeros_like()?)));
            let logits = logits_with(&model, &exp["input_ids"], &mut hooks);
            let err = relative_error(&logits, &exp[key]);
            println!("{case} {key}: relative error {err:.2e}");
            assert!(err < 1e-4, "{case} {key}: {err}");
            assert!(
                relative_error(&logits, &exp["logits"]) > 1e-3,
                "{case}: ablation changed nothing"
            );
        }
    }
}

/// Switching one head off through the heads' outputs (the output projection's input), as
/// transformers does with a pre-hook on `o_proj`.
#[test]
fn head_ablation_matches_transformers() {
    for case in CASES {
        let model = load(case, DType::F32);
        let exp = expected(case);
        let head_dim = model.config().head_dim();
        let key = "ablate.layers.0.self_attn.o_proj.input.head1.logits";
        let mut hooks = Hooks::new().replace(HookPoint::AttentionHeads(0), |x| {
            Ok(Some(common::zero_head(x, 1, head_dim)?))
        });
        let logits = logits_with(&model, &exp["input_ids"], &mut hooks);
        let err = relative_error(&logits, &exp[key]);
        println!("{case} {key}: relative error {err:.2e}");
        assert!(err < 1e-4, "{case} {key}: {err}");
        assert!(
            relative_error(&logits, &exp["logits"]) > 1e-3,
            "{case}: switching the head off changed nothing"
        );
    }
}

/// Layer 0's attention weights replaced by a uniform causal pattern, as transformers does
/// with a registered attention function; capturing the pattern alone leaves the logits as
/// they are (it switches layer 0 from the fused attention kernel to the explicit one).
#[test]
fn attention_pattern_edit_matches_transformers() {
    for case in CASES {
        let model = load(case, DType::F32);
        let exp = expected(case);
        let logits = |hooks: &mut Hooks| logits_with(&model, &exp["input_ids"], hooks);
        let key = "edit.layers.0.self_attn.pattern.uniform.logits";
        let edited = logits(
            &mut Hooks::new().replace(HookPoint::AttentionPattern(0), |p| {
                Ok(Some(common::uniform_causal_pattern(p)?))
            }),
        );
        let err = relative_error(&edited, &exp[key]);
        println!("{case} {key}: relative error {err:.2e}");
        assert!(err < 1e-4, "{case} {key}: {err}");
        assert!(
            relative_error(&edited, &exp["logits"]) > 1e-3,
            "{case}: no change"
        );
        let captured = logits(&mut Hooks::new().capture([HookPoint::AttentionPattern(0)]));
        assert!(relative_error(&captured, &exp["logits"]) < 1e-5, "{case}");
    }
}

#[test]
fn replacing_a_hook_with_its_own_value_is_bit_identical() {
    let model = load("gqa_head_dim", DType::F32);
    common::assert_self_replacement_changes_no_bit(&model, &expected("gqa_head_dim")["input_ids"]);
}

#[test]
fn stopping_early_gives_the_same_captures_without_logits() {
    let model = load("mha_untied", DType::F32);
    let ids = &expected("mha_untied")["input_ids"];
    let full = model
        .forward(ids, &mut Hooks::new().capture([HookPoint::Layer(1)]))
        .unwrap();
    let mut hooks = Hooks::capture_only([HookPoint::Layer(1), HookPoint::MlpInput(0)]);
    let early = model.forward(ids, &mut hooks).unwrap();
    assert!(early.logits.is_none());
    assert_eq!(early.captures.len(), 2);
    let flat = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    assert!(
        flat(&full.captures[&HookPoint::Layer(1)]) == flat(&early.captures[&HookPoint::Layer(1)])
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_the_tensor() {
    let src = fixture_dir("gqa_tied");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4"),
    )
    .unwrap();
    let err = Model::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[64, 64]"),
        "{err}"
    );
}
