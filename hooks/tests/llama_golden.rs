//! Llama forward pass against golden values from Hugging Face transformers
//! (`tests/fixtures/generate.py`, section D): every hook point, logits, ablations, dtypes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hooks::candle_core::{DType, Device, Tensor};
use hooks::config::ModelConfig;
use hooks::{HookPoint, Hooks, LoadOptions, Model};

mod common;
use common::relative_error;

/// `llama3_rope` has Llama 3.1's scaled rotary embedding; `qwen2_bias` is a Qwen2 model
/// (biases on q/k/v, rotary base 1e6).
const CASES: [&str; 5] = [
    "gqa_tied",
    "mha_untied",
    "gqa_head_dim",
    "llama3_rope",
    "qwen2_bias",
];

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

/// A folder holding fixture `case`'s weights, and its config.json parsed: edit it and load
/// it with [`load_with_config`].
fn weights_of(case: &str) -> (tempfile::TempDir, serde_json::Value) {
    let src = fixture_dir(case);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    (dir, serde_json::from_str(&config).unwrap())
}

/// Writes `config` beside the weights in `dir` and loads the model.
fn load_with_config(dir: &Path, config: &serde_json::Value) -> hooks::Result<Model> {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    Model::from_folder(dir, &LoadOptions::default())
}

#[test]
fn tiny_llamas_match_transformers_at_every_hook_point() {
    for case in CASES {
        let model = load(case, DType::F32);
        assert!(matches!(model.config(), ModelConfig::Llama(_)));
        let (err, name) = common::assert_hook_points_match(&model, &expected(case), 1e-4, "logits");
        println!("{case}: worst relative error {err:.2e} at {name}");
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
    // Other spellings take `*` in the layer index.
    assert_eq!(
        from_list("layers.*.attention.pattern, blocks.*.hook_resid_pre"),
        [
            HookPoint::Embed,
            HookPoint::AttentionPattern(0),
            HookPoint::Layer(0),
            HookPoint::AttentionPattern(1)
        ]
    );
    assert_eq!(
        from_list("blocks.1*.attn.hook_z"),
        [HookPoint::AttentionHeads(1)]
    );
    assert!(model
        .hook_points_from_list("blocks.*.hook_nothing")
        .is_err());
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
fn edits_match_transformers() {
    for case in CASES {
        common::assert_edits_match(&load(case, DType::F32), &expected(case));
    }
}

#[test]
fn cached_passes_give_the_whole_pass() {
    for case in CASES {
        common::assert_cached_passes_match(&load(case, DType::F32), &expected(case)["input_ids"]);
    }
}

#[test]
fn replacing_a_hook_with_its_own_value_is_bit_identical() {
    for dtype in [DType::F32, DType::BF16] {
        let model = load("gqa_head_dim", dtype);
        let ids = &expected("gqa_head_dim")["input_ids"];
        common::assert_self_replacement_changes_no_bit(&model, ids);
    }
}

#[test]
fn a_misshapen_replacement_is_named_in_the_llama_spelling() {
    let model = load("gqa_head_dim", DType::F32);
    let wrong = Tensor::zeros((1, 1, 3), DType::F32, &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().replace_with(HookPoint::AttentionHeads(0), wrong);
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let err = model.forward(&ids, &mut hooks).unwrap_err().to_string();
    assert!(
        err.contains(
            "replacement at hook point 'layers.0.self_attn.o_proj.input' has shape [1, 1, 3]"
        ),
        "{err}"
    );
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
    let (dir, mut config) = weights_of("gqa_tied");
    assert_eq!(config["num_key_value_heads"], 2);
    config["num_key_value_heads"] = 4.into();
    let err = load_with_config(dir.path(), &config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[64, 64]"),
        "{err}"
    );
}

/// Mistral's sliding window is not implemented: a sequence longer than the window, which
/// would silently get full attention, is refused; one that fits runs as plain Llama does.
#[test]
fn sequences_past_a_sliding_window_are_refused() {
    let (dir, mut config) = weights_of("gqa_tied");
    config["model_type"] = "mistral".into();
    let mut with_window = |window: serde_json::Value| {
        config["sliding_window"] = window;
        load_with_config(dir.path(), &config)
    };
    let plain = load("gqa_tied", DType::F32);
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let logits = |model: &Model, ids: &Tensor| {
        let out = model.forward(ids, &mut Hooks::new()).unwrap();
        out.logits
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mistral = with_window(4.into()).unwrap();
    let message = mistral
        .forward(&ids, &mut Hooks::new())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("sliding window of 4 tokens") && message.ends_with("use at most 4"),
        "{message}"
    );
    let fits = ids.narrow(1, 0, 4).unwrap();
    assert_eq!(logits(&mistral, &fits), logits(&plain, &fits));
    // Generation stops at the window's end instead of failing there.
    let options = hooks::GenerateOptions {
        max_new_tokens: 10,
        stop_tokens: Some(Vec::new()),
        ..Default::default()
    };
    let generated = mistral
        .generate(&[1, 2], &mut Hooks::new(), &options)
        .unwrap();
    assert_eq!(
        generated.len(),
        3,
        "positions 2 and 3 run, the token after them is kept"
    );
    // null (Mistral v0.2 on) is no window; 0 is refused.
    assert_eq!(
        logits(&with_window(serde_json::Value::Null).unwrap(), &ids),
        logits(&plain, &ids)
    );
    let message = with_window(0.into()).unwrap_err().to_string();
    assert!(
        message.contains("field 'sliding_window' must be positive, got 0"),
        "{message}"
    );
}

/// A config.json with fewer layers than its weights (copied from a smaller model) is
/// refused rather than run as a truncated model.
#[test]
fn weights_of_layers_past_the_config_are_refused() {
    let (dir, mut config) = weights_of("gqa_tied");
    let layers = config["num_hidden_layers"].as_u64().unwrap();
    config["num_hidden_layers"] = (layers - 1).into();
    let message = load_with_config(dir.path(), &config)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&format!(
            "hold layers the config does not, e.g. 'model.layers.{}.",
            layers - 1
        )) && message.contains(&format!("while it has {} (num_hidden_layers", layers - 1)),
        "{message}"
    );
}
