//! GPT-NeoX forward pass against golden values from Hugging Face transformers
//! (`tests/fixtures/generate.py`): every hook point, logits, ablations, hook semantics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hooks::candle_core::{DType, Device, Tensor};
use hooks::config::ModelConfig;
use hooks::{HookPoint, Hooks, KvCache, LoadOptions, Model};

mod common;
use common::relative_error;

fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/gpt_neox")
        .join(case)
}

fn expected(dir: &Path) -> HashMap<String, Tensor> {
    hooks::candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn load(dir: &Path, dtype: DType) -> Model {
    let options = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    Model::from_folder(dir, &options).unwrap()
}

/// The trailing positions of `[b, t, v]` logits that a fixture keeps (all, or the last few).
fn last_positions(logits: &Tensor, expected: &Tensor) -> Tensor {
    let keep = expected.dim(1).unwrap();
    let seq = logits.dim(1).unwrap();
    logits.narrow(1, seq - keep, keep).unwrap()
}

const TINY_CASES: [&str; 3] = ["pythia_style", "sequential_full_rotary", "six_heads_odd"];

#[test]
fn tiny_models_match_transformers_at_every_hook_point() {
    for case in TINY_CASES {
        let dir = fixture_dir(case);
        let model = load(&dir, DType::F32);
        common::assert_hook_points_match(&model, &expected(&dir), 1e-4, "logits");
    }
}

#[test]
fn tiny_models_in_bf16_and_f16_stay_close() {
    for case in TINY_CASES {
        let dir = fixture_dir(case);
        let exp = expected(&dir);
        for dtype in [DType::BF16, DType::F16] {
            let model = load(&dir, dtype);
            let logits = model.logits(&exp["input_ids"]).unwrap();
            assert_eq!(logits.dtype(), dtype);
            let err = relative_error(&logits, &exp["logits"]);
            let tolerance = if dtype == DType::BF16 { 5e-2 } else { 1e-2 };
            assert!(err < tolerance, "{case} {dtype:?}: relative error {err}");
        }
    }
}

#[test]
fn edits_match_transformers() {
    for case in TINY_CASES {
        let dir = fixture_dir(case);
        common::assert_edits_match(&load(&dir, DType::F32), &expected(&dir));
    }
}

#[test]
fn replacing_a_hook_with_its_own_value_is_bit_identical() {
    let dir = fixture_dir("pythia_style");
    let model = load(&dir, DType::F32);
    common::assert_self_replacement_changes_no_bit(&model, &expected(&dir)["input_ids"]);
    // Sequences of several attention blocks (the kernel's 64 query rows each).
    let ids: Vec<u32> = (0..2 * 300).map(|i| (i * 37 + 11) % 128).collect();
    let ids = Tensor::from_vec(ids, (2, 300), &Device::Cpu).unwrap();
    common::assert_self_replacement_changes_no_bit(&model, &ids);
    // In bf16 on the CPU too: its kernels round the attention weights a hook sees.
    let bf16 = load(&dir, DType::BF16);
    common::assert_self_replacement_changes_no_bit(&bf16, &ids);
    // A replacement that leaves the pattern as it is changes nothing either.
    let plain = model.logits(&ids).unwrap().flatten_all().unwrap();
    let mut hooks = Hooks::new().replace(HookPoint::AttentionPattern(1), |_| Ok(None));
    let logits = model.forward(&ids, &mut hooks).unwrap().logits.unwrap();
    assert_eq!(
        plain.to_vec1::<f32>().unwrap(),
        logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn stopping_early_gives_the_same_captures_without_logits() {
    let dir = fixture_dir("sequential_full_rotary");
    let model = load(&dir, DType::F32);
    let ids = &expected(&dir)["input_ids"];
    let full = model
        .forward(ids, &mut Hooks::new().capture([HookPoint::Layer(1)]))
        .unwrap();
    let mut early_hooks = Hooks::capture_only([HookPoint::Layer(1), HookPoint::Mlp(0)]);
    assert!(!early_hooks.wants_logits());
    let early = model.forward(ids, &mut early_hooks).unwrap();
    assert!(early.logits.is_none());
    assert_eq!(early.captures.len(), 2);
    let a: Vec<f32> = full.captures[&HookPoint::Layer(1)]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = early.captures[&HookPoint::Layer(1)]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(a == b);
    // Stopping at a pattern (and so at the end of its layer) gives it as a full pass does.
    let exp = expected(&dir);
    let key = "layers.1.attention.pattern";
    let mut hooks = Hooks::capture_only([HookPoint::AttentionPattern(1)]);
    let early = model.forward(ids, &mut hooks).unwrap();
    assert!(early.logits.is_none());
    let pattern = &early.captures[&HookPoint::AttentionPattern(1)];
    assert!(relative_error(pattern, &exp[key]) < 1e-5);
}

#[test]
fn steering_with_a_closure_changes_downstream_only() {
    let dir = fixture_dir("pythia_style");
    let model = load(&dir, DType::F32);
    let exp = expected(&dir);
    let mut calls = 0;
    let mut hooks = Hooks::new()
        .capture([HookPoint::Layer(0), HookPoint::Embed])
        .replace(HookPoint::Layer(0), |x| {
            calls += 1;
            Ok(Some((x * 2.0)?))
        });
    let out = model.forward(&exp["input_ids"], &mut hooks).unwrap();
    drop(hooks);
    assert_eq!(calls, 1);
    // Upstream unchanged, the captured value is the edited one.
    assert!(relative_error(&out.captures[&HookPoint::Embed], &exp["embed"]) < 1e-6);
    let edited = (&exp["layers.0"] * 2.0).unwrap();
    assert!(relative_error(&out.captures[&HookPoint::Layer(0)], &edited) < 1e-4);
    assert!(relative_error(out.logits.as_ref().unwrap(), &exp["logits"]) > 1e-3);
}

#[test]
fn pythia_70m_shape_with_generated_weights_matches_transformers() {
    let fixture = fixture_dir("pythia_70m_shape");
    let config = ModelConfig::from_file(&fixture.join("config.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture.join("config.json"), dir.path().join("config.json")).unwrap();
    hooks::synthetic::write_synthetic_weights(&config, dir.path()).unwrap();
    let model = load(dir.path(), DType::F32);
    let exp = expected(&fixture);
    common::assert_hook_points_match(&model, &exp, 1e-4, "logits.last4");
    let mut hooks = Hooks::new().replace(HookPoint::Mlp(1), |x| Ok(Some(x.zeros_like()?)));
    let logits = model
        .forward(&exp["input_ids"], &mut hooks)
        .unwrap()
        .logits
        .unwrap();
    let expected_logits = &exp["ablate.layers.1.mlp.logits.last4"];
    let err = relative_error(&last_positions(&logits, expected_logits), expected_logits);
    assert!(err < 1e-4, "ablated logits: {err}");
}

/// A config that ties the embeddings decodes with `embed_in` even where the checkpoint also
/// stores an `embed_out`, as transformers ties them.
#[test]
fn tied_embeddings_win_over_a_stored_head() {
    let fixture = fixture_dir("pythia_style");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    config["tie_word_embeddings"] = serde_json::json!(true);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let tied = load(dir.path(), DType::F32);
    let stored =
        hooks::candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let unembedding = tied.unembedding();
    let to_vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(to_vec(&unembedding.weight) == to_vec(&stored["gpt_neox.embed_in.weight"]));
    assert!(to_vec(&unembedding.weight) != to_vec(&stored["embed_out.weight"]));
}

#[test]
fn cached_passes_give_the_whole_pass() {
    for case in TINY_CASES {
        let dir = fixture_dir(case);
        common::assert_cached_passes_match(&load(&dir, DType::F32), &expected(&dir)["input_ids"]);
    }
    // Over several of the attention kernel's 64-row blocks.
    let ids: Vec<u32> = (0..2 * 300).map(|i| (i * 37 + 11) % 128).collect();
    let ids = Tensor::from_vec(ids, (2, 300), &Device::Cpu).unwrap();
    common::assert_cached_passes_match(&load(&fixture_dir("pythia_style"), DType::F32), &ids);
}

#[test]
fn a_cache_that_does_not_fit_is_a_clear_error() {
    let model = load(&fixture_dir("pythia_style"), DType::F32);
    let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
    let mut cache = KvCache::new();
    model
        .forward_cached(&ids, &mut Hooks::new(), &mut cache)
        .unwrap();
    let three = Tensor::new(&[[1u32], [2], [3]], &Device::Cpu).unwrap();
    let err = model
        .forward_cached(&three, &mut Hooks::new(), &mut cache)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds 2 sequences") && err.contains("batch of 3"),
        "{err}"
    );
    let other = load(&fixture_dir("sequential_full_rotary"), DType::F32);
    let err = other
        .forward_cached(&ids.narrow(1, 0, 1).unwrap(), &mut Hooks::new(), &mut cache)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another model"), "{err}");
    let wrong = Tensor::zeros((2, 1, 5), DType::F32, &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().replace_with(HookPoint::Layer(1), wrong);
    let err = model
        .forward_cached(&ids.narrow(1, 0, 1).unwrap(), &mut hooks, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'layers.1' has shape [2, 1, 5]"), "{err}");
    assert_eq!(cache.len(), 3, "a failed pass leaves the cache as it was");
}

#[test]
fn bad_requests_are_clear_errors() {
    let dir = fixture_dir("pythia_style");
    let model = load(&dir, DType::F32);
    let err = model.hook_point("layers.7").unwrap_err().to_string();
    assert!(
        err.contains("'layers.7'") && err.contains("layers.{0..1}"),
        "{err}"
    );
    let err = model.hook_point("layers.0.mlpp").unwrap_err().to_string();
    assert!(err.contains("valid hook points"), "{err}");
    let ids = Tensor::new(&[[1u32, 2, 500]], &Device::Cpu).unwrap();
    let err = model.logits(&ids).unwrap_err().to_string();
    assert!(
        err.contains("token id 500 at position 2") && err.contains("128"),
        "{err}"
    );
    let err = model.forward(
        &ids.narrow(1, 0, 2).unwrap(),
        &mut Hooks::new().capture([HookPoint::Mlp(5)]),
    );
    assert!(err.unwrap_err().to_string().contains("layers.5.mlp"));
    let wrong = Tensor::zeros((1, 1, 3), DType::F32, &Device::Cpu).unwrap();
    let mut hooks = Hooks::new().replace_with(HookPoint::Layer(0), wrong);
    let err = model
        .forward(&ids.narrow(1, 0, 2).unwrap(), &mut hooks)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("replacement at hook point 'layers.0' has shape [1, 1, 3]"),
        "{err}"
    );
}

#[test]
fn broken_model_folders_are_clear_errors() {
    let src = fixture_dir("pythia_style");
    let dir = tempfile::tempdir().unwrap();
    let err = Model::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let err = Model::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json: not valid JSON"), "{err}");

    // A config that disagrees with the weights: the shape error names the tensor.
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        config.replace("\"intermediate_size\": 256", "\"intermediate_size\": 250"),
    )
    .unwrap();
    let err = Model::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dense_h_to_4h.weight") && err.contains("[250, 64]"),
        "{err}"
    );

    // Truncated weights.
    std::fs::write(dir.path().join("config.json"), &config).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        &bytes[..bytes.len() - 1000],
    )
    .unwrap();
    let err = Model::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn unembedding_of_the_last_layer_reproduces_the_logits() {
    // In bf16 too, where the CPU's logits take the packed bf16 product.
    for (case, dtype) in TINY_CASES
        .iter()
        .flat_map(|case| [(case, DType::F32), (case, DType::BF16)])
    {
        let dir = fixture_dir(case);
        let model = load(&dir, dtype);
        let last = HookPoint::Layer(model.config().num_layers() - 1);
        let out = model
            .forward(
                &expected(&dir)["input_ids"],
                &mut Hooks::new().capture([last]),
            )
            .unwrap();
        let logits = model.unembedding().forward(&out.captures[&last]).unwrap();
        let flat = |t: &Tensor| -> Vec<f32> {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert!(
            flat(&logits) == flat(&out.logits.unwrap()),
            "{case} {dtype:?}"
        );
    }
}

#[test]
fn pytorch_pickle_checkpoint_with_legacy_buffers_loads() {
    // pytorch_model.bin written by transformers (tests/fixtures/make_pickle_checkpoint.py).
    let model = load(&fixture_dir("pythia_style_pickle"), DType::F32);
    common::assert_hook_points_match(
        &model,
        &expected(&fixture_dir("pythia_style")),
        1e-4,
        "logits",
    );
}

#[test]
fn sharded_safetensors_with_an_index_load() {
    let src = fixture_dir("pythia_style");
    let tensors =
        hooks::candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", shard + 1);
        let subset: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        hooks::candle_core::safetensors::save(&subset, dir.path().join(&file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let model = load(dir.path(), DType::F32);
    common::assert_hook_points_match(&model, &expected(&src), 1e-4, "logits");
}
