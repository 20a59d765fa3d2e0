//! End-to-end tests of the latent cache and of batch jobs against a loopback
//! OpenAI-compatible server with injected faults.

mod common;
#[path = "../../tests/common/damage.rs"]
mod damage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Tensor;
use common::{Fault, TestServer};
use delphi::examples::ExampleConfig;
use delphi::explain::ExplainConfig;
use delphi::job::{run_job, summarize, JobConfig, JobModels, RunOptions, Shard};
use delphi::latents::{write_latent_cache, CacheTarget, Firing, LatentCache, WriteOptions};
use delphi::llm::openai::{OpenAiClient, OpenAiConfig};
use delphi::llm::{
    BoxFuture, ChatRequest, ChatResponse, ContinuationRequest, ContinuationResponse, Llm,
    ReadRequest, ReadResponse,
};
use delphi::score::{
    simulation_correlation, ScoreConfig, ScoredSimulation, Scorer, SurprisalOutput,
};
use hooks::data::DataSpec;
use hooks::{HookPoint, Hooks, LoadOptions, Model};
use sae::{Sae, SaeConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

const SEQ_LEN: usize = 64;

fn tiny_model(dir: &Path) -> Model {
    let config = hooks::synthetic::tiny_gpt_neox_config(2);
    hooks::synthetic::write_synthetic_model(
        dir,
        &config,
        Some(&repo().join("data/gpt-neox-20b-tokenizer.json")),
    )
    .unwrap();
    Model::from_folder(dir, &LoadOptions::default()).unwrap()
}

fn tiny_sae() -> Sae {
    Sae::new(SaeConfig::new(32, 16, 4), 5, &candle_core::Device::Cpu).unwrap()
}

/// Caches `sequences` sequences of WikiText at layers.1 into `dir`.
fn write_cache(model: &Model, sae: &Sae, dir: &Path, sequences: u64, per_shard: usize) -> u64 {
    let wikitext = repo().join("data/wikitext-2-raw-test.txt");
    try_write_cache(
        model,
        sae,
        &wikitext,
        dir,
        &options(Some(sequences), per_shard),
    )
    .unwrap()
}

/// Up to `sequences` sequences in batches of 4, `per_shard` per shard, every token recorded.
fn options(sequences: Option<u64>, per_shard: usize) -> WriteOptions {
    WriteOptions {
        batch_size: 4,
        sequences_per_shard: per_shard,
        max_sequences: sequences,
        progress: false,
        excluded_token: None,
    }
}

/// Caches `data` at layers.1 into `dir`.
fn try_write_cache(
    model: &Model,
    sae: &Sae,
    data: &Path,
    dir: &Path,
    options: &WriteOptions,
) -> delphi::Result<u64> {
    let chunks = DataSpec::new(vec![data.to_path_buf()], SEQ_LEN)
        .chunks(model.tokenizer().ok())
        .unwrap();
    let targets = [CacheTarget {
        name: "layers.1".into(),
        point: HookPoint::Layer(1),
        sae,
    }];
    write_latent_cache(model, chunks, &targets, dir, options)
}

#[test]
fn latent_cache_holds_what_the_sae_computes_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let sae = tiny_sae();
    let dir = tmp.path().join("cache");
    assert_eq!(write_cache(&model, &sae, &dir, 12, 8), 12);
    let cache = LatentCache::open(&dir).unwrap();
    assert_eq!(
        (cache.tokens().sequences(), cache.tokens().seq_len()),
        (12, SEQ_LEN)
    );
    assert_eq!(cache.hookpoints()["layers.1"], Some(16));

    // Direct computation: the same chunks through the model and the SAE.
    let chunks: Vec<Vec<u32>> =
        DataSpec::new(vec![repo().join("data/wikitext-2-raw-test.txt")], SEQ_LEN)
            .chunks(model.tokenizer().ok())
            .unwrap()
            .next_chunks(12)
            .unwrap();
    assert_eq!(cache.tokens().window(0, SEQ_LEN), &chunks[0][..]);
    let ids = Tensor::new(chunks.clone(), model.device()).unwrap();
    let mut hooks = Hooks::capture_only([HookPoint::Layer(1)]);
    let x = model.forward(&ids, &mut hooks).unwrap().captures[&HookPoint::Layer(1)]
        .reshape((12 * SEQ_LEN, 32))
        .unwrap();
    let (acts, indices) = sae.encode(&x).unwrap();
    let (acts, indices) = (
        acts.to_vec2::<f32>().unwrap(),
        indices.to_vec2::<u32>().unwrap(),
    );
    let mut expected: BTreeMap<u32, Vec<Firing>> = BTreeMap::new();
    for (row, (a, i)) in acts.iter().zip(&indices).enumerate() {
        for (&value, &latent) in a.iter().zip(i) {
            if value > delphi::latents::FIRING_THRESHOLD && latent < 10 {
                let value = half::f16::from_f32(value).to_f32();
                expected.entry(latent).or_default().push(Firing {
                    seq: (row / SEQ_LEN) as u32,
                    pos: (row % SEQ_LEN) as u32,
                    value,
                });
            }
        }
    }
    let mut got = cache.firings("layers.1", 0..10).unwrap();
    for firings in expected.values_mut() {
        firings.sort_by_key(|f| (f.seq, f.pos));
    }
    assert!(!expected.is_empty());
    // The cache stores f16; compare with the direct values rounded the same way, allowing
    // the last bit for batch-dependent summation order.
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (latent, want) in &expected {
        let have = got.remove(latent).unwrap();
        assert_eq!(have.len(), want.len(), "latent {latent}");
        for (h, w) in have.iter().zip(want) {
            assert_eq!((h.seq, h.pos), (w.seq, w.pos));
            assert!(
                (h.value - w.value).abs() <= 2e-3 * w.value.abs().max(1.0),
                "{h:?} vs {w:?}"
            );
        }
    }
    // 8 bytes per activation: u16 locations (sequence within the shard) and f16 values.
    let bytes = std::fs::read(dir.join("shards/8_12.safetensors")).unwrap();
    let shard = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        shard.tensor("layers.1.locations").unwrap().dtype(),
        safetensors::Dtype::U16
    );
    assert_eq!(
        shard.tensor("layers.1.activations").unwrap().dtype(),
        safetensors::Dtype::F16
    );
    let message = cache.firings("layers.9", 0..1).unwrap_err().to_string();
    assert!(
        message.contains("layers.9") && message.contains("layers.1"),
        "{message}"
    );

    // Resume: drop the last shard and mark the cache unfinished; a re-run writes only it,
    // giving the same bytes.
    let last = dir.join("shards/8_12.safetensors");
    let original = std::fs::read(&last).unwrap();
    std::fs::remove_file(&last).unwrap();
    std::fs::write(dir.join("config.json"), config_unfinished(&dir)).unwrap();
    let first = std::fs::metadata(dir.join("shards/0_8.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(LatentCache::open(&dir)
        .unwrap_err()
        .to_string()
        .contains("incomplete"));
    assert_eq!(write_cache(&model, &sae, &dir, 12, 8), 12);
    assert_eq!(std::fs::read(&last).unwrap(), original);
    assert_eq!(
        std::fs::metadata(dir.join("shards/0_8.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        first
    );

    // A damaged or missing shard is refused with what to do about it.
    std::fs::write(dir.join("config.json"), config_unfinished(&dir)).unwrap();
    let wikitext = repo().join("data/wikitext-2-raw-test.txt");
    let resume = || {
        try_write_cache(&model, &sae, &wikitext, &dir, &options(Some(12), 8))
            .unwrap_err()
            .to_string()
    };
    let head = dir.join("shards/0_8.safetensors");
    let kept = std::fs::read(&head).unwrap();
    std::fs::write(&head, &kept[..kept.len() / 2]).unwrap();
    let message = resume();
    assert!(
        message.contains("0_8.safetensors")
            && message.contains("delete it and the shards after it"),
        "{message}"
    );
    std::fs::write(&head, &kept).unwrap();
    std::fs::rename(&last, dir.join("shards/9_12.safetensors")).unwrap();
    let message = resume();
    assert!(
        message.contains("9_12.safetensors")
            && message.contains("delete the shards from sequence 8 on"),
        "{message}"
    );
}

/// With the document separator excluded (delphi's `filter_bos`), the cache holds every
/// firing of a full cache except those at that token, and records the exclusion.
#[test]
fn the_separator_token_records_no_firings() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let sae = tiny_sae();
    let wikitext = repo().join("data/wikitext-2-raw-test.txt");
    let eos = model.tokenizer().unwrap().eos_id().unwrap();
    let (all, filtered) = (tmp.path().join("all"), tmp.path().join("filtered"));
    try_write_cache(&model, &sae, &wikitext, &all, &options(Some(8), 8)).unwrap();
    let without_eos = WriteOptions {
        excluded_token: Some(eos),
        ..options(Some(8), 8)
    };
    try_write_cache(&model, &sae, &wikitext, &filtered, &without_eos).unwrap();
    let (all, filtered) = (
        LatentCache::open(&all).unwrap(),
        LatentCache::open(&filtered).unwrap(),
    );
    let tokens = all.tokens();
    let token_at = |f: &Firing| tokens.window(f.seq as u64, SEQ_LEN)[f.pos as usize];
    let full = all.firings("layers.1", 0..16).unwrap();
    let expected: BTreeMap<u32, Vec<Firing>> = full
        .iter()
        .map(|(&latent, firings)| {
            let kept = firings.iter().filter(|f| token_at(f) != eos).copied();
            (latent, kept.collect::<Vec<_>>())
        })
        .filter(|(_, kept)| !kept.is_empty())
        .collect();
    let count = |m: &BTreeMap<u32, Vec<Firing>>| m.values().map(Vec::len).sum::<usize>();
    assert!(
        count(&expected) < count(&full),
        "the data has separators that fire"
    );
    assert_eq!(filtered.firings("layers.1", 0..16).unwrap(), expected);
    // Resuming it with the separator kept is refused, naming the setting.
    let message = try_write_cache(
        &model,
        &sae,
        &wikitext,
        &tmp.path().join("filtered"),
        &options(Some(12), 8),
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("excluded_tokens: [") && message.contains("--keep-bos"),
        "{message}"
    );
    // A cache of an earlier version (no record of excluded tokens) is extended as it was
    // made: every position recorded.
    let old = tmp.path().join("old");
    try_write_cache(&model, &sae, &wikitext, &old, &options(Some(4), 8)).unwrap();
    let config = old.join("config.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    for field in ["excluded_tokens", "sequences"] {
        record.as_object_mut().unwrap().remove(field);
    }
    record["complete"] = false.into();
    std::fs::write(&config, record.to_string()).unwrap();
    try_write_cache(&model, &sae, &wikitext, &old, &without_eos).unwrap();
    let old = LatentCache::open(&old).unwrap();
    assert_eq!(old.firings("layers.1", 0..16).unwrap(), full);
}

/// Activations past float16's range are stored at its largest value, not as infinity
/// (which made score files that could not be read back); an infinity in a damaged shard is
/// refused on reading, naming the shard.
#[test]
fn activations_past_float16_are_kept_at_its_largest() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let mut sae = tiny_sae();
    let mut params = sae.parameters();
    params[0] = (&params[0] * 1e7).unwrap(); // the encoder weight
    sae.set_parameters(params).unwrap();
    let dir = tmp.path().join("cache");
    assert_eq!(write_cache(&model, &sae, &dir, 4, 8), 4);
    let cache = LatentCache::open(&dir).unwrap();
    let firings = cache.firings("layers.1", 0..16).unwrap();
    let values: Vec<f32> = firings.values().flatten().map(|f| f.value).collect();
    assert!(!values.is_empty() && values.iter().all(|v| v.is_finite()));
    assert!(values.contains(&65504.0), "{values:?}");
    // A shard added by hand is not read as more data.
    let shard = dir.join("shards/0_4.safetensors");
    let stray = dir.join("shards/4_8.safetensors");
    std::fs::copy(&shard, &stray).unwrap();
    let message = LatentCache::open(&dir).err().unwrap().to_string();
    assert!(
        message.contains("the shards hold sequences 0..8, but config.json records 4"),
        "{message}"
    );
    std::fs::remove_file(&stray).unwrap();

    // The same shard with an infinity written into it.
    let bytes = std::fs::read(&shard).unwrap();
    let max = half::f16::MAX.to_le_bytes();
    let at = bytes.windows(2).rposition(|w| w == max).unwrap();
    let mut damaged = bytes.clone();
    damaged[at..at + 2].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    std::fs::write(&shard, damaged).unwrap();
    let message = LatentCache::open(&dir)
        .unwrap()
        .firings("layers.1", 0..16)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("0_4.safetensors")
            && message.contains("'layers.1.activations' holds inf at index"),
        "{message}"
    );
    std::fs::write(&shard, &bytes).unwrap();
    // A config.json whose sequence length the shards do not hold.
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&config).unwrap();
    let seq_len = edited["seq_len"].as_u64().unwrap();
    edited["seq_len"] = serde_json::json!(seq_len / 2);
    std::fs::write(dir.join("config.json"), edited.to_string()).unwrap();
    let message = LatentCache::open(&dir).err().unwrap().to_string();
    assert!(
        message.contains(&format!("config.json: records seq_len {}", seq_len / 2)),
        "{message}"
    );
    // A damaged config.json is named, not taken for delphi's layout; nor is a missing one.
    std::fs::write(dir.join("config.json"), "{nope").unwrap();
    let message = LatentCache::open(&dir).err().unwrap().to_string();
    assert!(
        message.contains("config.json: not a latent cache config: key must be a string"),
        "{message}"
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let message = LatentCache::open(&dir).err().unwrap().to_string();
    assert!(
        message.contains("config.json: missing: the folder has our latent cache's shards/"),
        "{message}"
    );
}

/// The cache's config.json marked unfinished, as a killed `delphi cache` leaves it.
fn config_unfinished(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"complete\": true", "\"complete\": false")
}

/// Resuming a cache with other data or another SAE is refused before anything is appended.
#[test]
fn a_cache_is_not_resumed_from_other_data_or_another_sae() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let sae = tiny_sae();
    let dir = tmp.path().join("cache");
    assert_eq!(write_cache(&model, &sae, &dir, 8, 4), 8);
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(
        config.contains("\"saes\"") && config.contains("fnv1a64:"),
        "{config}"
    );
    let shards = || std::fs::read_dir(dir.join("shards")).unwrap().count();
    let write =
        |data: &Path, sae: &Sae| try_write_cache(&model, sae, data, &dir, &options(Some(12), 4));
    let other_text = tmp.path().join("other.txt");
    std::fs::write(
        &other_text,
        "Quite another text, about rivers and hills. ".repeat(400),
    )
    .unwrap();
    let message = write(&other_text, &sae).unwrap_err().to_string();
    assert!(message.contains("other data"), "{message}");
    // The same shape of SAE with other weights.
    let other_sae = Sae::new(SaeConfig::new(32, 16, 4), 6, &candle_core::Device::Cpu).unwrap();
    let wikitext = repo().join("data/wikitext-2-raw-test.txt");
    let message = write(&wikitext, &other_sae).unwrap_err().to_string();
    assert!(
        message.contains("other settings or SAEs (saes.layers.1: \"fnv1a64:"),
        "{message}"
    );
    // The same model computing in another precision.
    let bf16 = LoadOptions {
        dtype: candle_core::DType::BF16,
        ..LoadOptions::default()
    };
    let bf16_model = Model::from_folder(&tmp.path().join("model"), &bf16).unwrap();
    let message = try_write_cache(&bf16_model, &sae, &wikitext, &dir, &options(Some(12), 4))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(r#"(dtype: "float32" -> "bfloat16"; "#),
        "{message}"
    );
    assert_eq!(shards(), 2, "nothing was appended");
    assert!(
        LatentCache::open(&dir).is_ok(),
        "a refused resume leaves the cache usable"
    );
    // A cache of an earlier version, which records no dtype, is taken as it is.
    let config_path = dir.join("config.json");
    let recorded = std::fs::read_to_string(&config_path).unwrap();
    let mut earlier: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    earlier.as_object_mut().unwrap().remove("dtype").unwrap();
    std::fs::write(&config_path, earlier.to_string()).unwrap();
    // The same data and SAE resume.
    assert_eq!(write(&wikitext, &sae).unwrap(), 12);
    assert_eq!(shards(), 3);
    // Data without one whole sequence makes no cache (every latent would be "too rare").
    let few = tmp.path().join("few.txt");
    std::fs::write(&few, "Just a few words.\n").unwrap();
    let empty = tmp.path().join("empty-cache");
    let message = try_write_cache(&model, &sae, &few, &empty, &options(None, 4))
        .unwrap_err()
        .to_string();
    assert!(message.contains("no complete sequence"), "{message}");
    assert!(LatentCache::open(&empty).is_err());
}

/// A cache of an earlier format is named as such, not misread as delphi's layout.
#[test]
fn an_older_cache_format_asks_for_a_new_cache() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("shards")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"format": "eleuther-interp latent cache v1", "model": "m", "seq_len": 8,
            "hookpoints": {"layers.1": 16}, "sequences_per_shard": 4, "complete": true}"#,
    )
    .unwrap();
    let message = LatentCache::open(tmp.path()).unwrap_err().to_string();
    assert!(
        message.contains("v1") && message.contains("delphi cache"),
        "{message}"
    );
}

#[test]
fn reads_delphis_cache_layout() {
    // delphi's layout: latents/<hookpoint>/<start>_<end>.safetensors (end inclusive), u16
    // locations with the latent relative to start, f16 activations, int64 tokens per file.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layers.5");
    std::fs::create_dir_all(&dir).unwrap();
    let tokens: Vec<i64> = (0..2 * 8).collect();
    let write = |start: u32, end: u32, entries: &[(u16, u16, u16, f32)]| {
        let locations: Vec<u8> = entries
            .iter()
            .flat_map(|e| [e.0, e.1, e.2])
            .flat_map(u16::to_le_bytes)
            .collect();
        let acts: Vec<u8> = entries
            .iter()
            .flat_map(|e| half::f16::from_f32(e.3).to_le_bytes())
            .collect();
        let token_bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let views = vec![
            (
                "locations",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::U16,
                    vec![entries.len(), 3],
                    &locations,
                )
                .unwrap(),
            ),
            (
                "activations",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F16,
                    vec![entries.len()],
                    &acts,
                )
                .unwrap(),
            ),
            (
                "tokens",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I64,
                    vec![2, 8],
                    &token_bytes,
                )
                .unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(format!("{start}_{end}.safetensors")), bytes).unwrap();
    };
    write(0, 9, &[(0, 3, 2, 1.5), (1, 7, 9, 0.25)]);
    write(10, 19, &[(1, 0, 0, 2.0), (0, 1, 2, 3.0)]);
    let cache = LatentCache::open(tmp.path()).unwrap();
    assert_eq!(cache.hookpoints()["layers.5"], Some(20));
    assert_eq!(
        (cache.tokens().sequences(), cache.tokens().seq_len()),
        (2, 8)
    );
    let firings = cache.firings("layers.5", 2..13).unwrap();
    assert_eq!(
        firings[&2],
        vec![Firing {
            seq: 0,
            pos: 3,
            value: 1.5
        }]
    );
    assert_eq!(
        firings[&9],
        vec![Firing {
            seq: 1,
            pos: 7,
            value: 0.25
        }]
    );
    assert_eq!(
        firings[&10],
        vec![Firing {
            seq: 1,
            pos: 0,
            value: 2.0
        }]
    );
    assert_eq!(
        firings[&12],
        vec![Firing {
            seq: 0,
            pos: 1,
            value: 3.0
        }]
    );
    assert_eq!(firings.len(), 4);

    // A firing outside the cache's tokens is refused, naming the file; so is one past its
    // file's last latent (the next file's latents would count it twice).
    for (damaged, expected) in [
        (
            (5, 1, 2, 3.0),
            "(sequence 5 + 0, position 1, latent 2 + 10) outside the cache's 2 x 8 tokens or \
             past the file's last latent, 19",
        ),
        (
            (0, 1, 10, 3.0),
            "(sequence 0 + 0, position 1, latent 10 + 10)",
        ),
    ] {
        write(10, 19, &[(1, 0, 0, 2.0), damaged]);
        let message = LatentCache::open(tmp.path())
            .unwrap()
            .firings("layers.5", 0..20)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&format!("10_19.safetensors: holds a firing {expected}")),
            "{message}"
        );
    }

    // Split files that do not tile the latents are refused by name (one used to panic,
    // overlapping ones were merged, firings counted twice).
    let refused = |files: &[(u32, u32)], expected: &str| {
        for entry in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for &(start, end) in files {
            write(start, end, &[]);
        }
        let err = LatentCache::open(tmp.path()).err().unwrap().to_string();
        assert!(err.contains(expected), "{err}");
    };
    refused(
        &[(0, u32::MAX)],
        "0_4294967295.safetensors: latent numbers past 2^32 - 1",
    );
    refused(&[(0, 9), (5, 19)], "5_19.safetensors: names latents 5 to 19: overlaps the split before it (which ends at latent 9)");
    refused(
        &[(0, 9), (12, 19)],
        "12_19.safetensors: names latents 12 to 19: leaves latents 10..12 in no split file",
    );
    refused(
        &[(9, 0)],
        "9_0.safetensors: names latents 9 to 0: the first is after the last",
    );

    // A folder of no split files is refused. Then damaged split files: read, or refused
    // naming the folder; never a panic.
    refused(&[], "is neither our latent cache");
    write(0, 9, &[(0, 3, 2, 1.5), (1, 7, 9, 0.25)]);
    write(10, 19, &[(1, 0, 0, 2.0), (0, 1, 2, 3.0)]);
    let files = damage::files_in(tmp.path());
    damage::damage_and_read(tmp.path(), &files, 100, &|dir| {
        let cache = LatentCache::open(dir).map_err(|e| e.to_string())?;
        cache
            .firings("layers.5", 0..20)
            .map_err(|e| e.to_string())?;
        Ok(())
    });
}

fn job_config() -> JobConfig {
    JobConfig {
        hookpoints: vec!["layers.1".into()],
        latents: 0..8,
        scorers: vec![Scorer::Detection, Scorer::Fuzzing, Scorer::Intruder],
        examples: ExampleConfig {
            example_ctx_len: 16,
            min_examples: 10,
            n_train: 10,
            n_test: 10,
            n_quantiles: 5,
            n_non_activating: 10,
            ..ExampleConfig::default()
        },
        explain: ExplainConfig::default(),
        score: ScoreConfig::default(),
        data: None,
    }
}

fn client(server: &TestServer) -> OpenAiClient {
    let mut config = OpenAiConfig::new(&server.url, "test-model");
    config.timeout = Duration::from_millis(800);
    config.max_retries = 3;
    config.initial_backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(50);
    config.concurrency = 4;
    OpenAiClient::new(config).unwrap()
}

/// All result files under `dir`, relative path -> bytes.
fn results(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in [
        "explanations",
        "scores/detection",
        "scores/fuzz",
        "scores/intruder",
        "scores/simulation",
        "scores/surprisal",
    ] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            out.insert(
                format!("{sub}/{}", path.file_name().unwrap().to_string_lossy()),
                std::fs::read(&path).unwrap(),
            );
        }
    }
    out
}

struct Fixture {
    _tmp: tempfile::TempDir,
    cache: LatentCache,
    tokenizer: hooks::Tokenizer,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let dir = tmp.path().join("cache");
    write_cache(&model, &tiny_sae(), &dir, 16, 8);
    let tokenizer = model.tokenizer().unwrap().clone();
    let root = tmp.path().to_path_buf();
    Fixture {
        cache: LatentCache::open(&dir).unwrap(),
        tokenizer,
        root,
        _tmp: tmp,
    }
}

async fn run(
    f: &Fixture,
    server: &TestServer,
    output: &Path,
    shard: Shard,
) -> delphi::job::RunReport {
    run_with(f, server, output, shard, &job_config()).await
}

async fn run_with(
    f: &Fixture,
    server: &TestServer,
    output: &Path,
    shard: Shard,
    config: &JobConfig,
) -> delphi::job::RunReport {
    try_run(f, server, output, shard, config, false)
        .await
        .unwrap()
}

async fn try_run(
    f: &Fixture,
    server: &TestServer,
    output: &Path,
    shard: Shard,
    config: &JobConfig,
    keep_unreadable: bool,
) -> delphi::Result<delphi::job::RunReport> {
    run_through(f, &client(server), output, shard, config, keep_unreadable).await
}

/// A job whose explainer and scorer is `llm`.
async fn run_through(
    f: &Fixture,
    llm: &dyn Llm,
    output: &Path,
    shard: Shard,
    config: &JobConfig,
    keep_unreadable: bool,
) -> delphi::Result<delphi::job::RunReport> {
    let models = JobModels {
        explainer: llm,
        scorer: llm,
        embedder: None,
    };
    let options = RunOptions {
        output: output.to_path_buf(),
        shard,
        concurrency: 3,
        progress: false,
        keep_unreadable,
    };
    run_job(&f.cache, &f.tokenizer, &models, config, &options).await
}

/// An output folder from before the data settings were recorded (no `data` in its
/// run_config.json) takes a rerun that has them; once recorded, other ones are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_settings_are_compared_once_recorded() {
    let f = fixture();
    let server = TestServer::start().await;
    let out = f.root.join("older");
    run(&f, &server, &out, Shard::ALL).await;
    let with_data = JobConfig {
        data: Some("data.txt, seq_len 16".into()),
        ..job_config()
    };
    delphi::job::check_settings(&out, &with_data).unwrap();
    run_with(&f, &server, &out, Shard::ALL, &with_data).await;
    let other = JobConfig {
        data: Some("other.txt, seq_len 16".into()),
        ..job_config()
    };
    let err = delphi::job::check_settings(&out, &other)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"other settings (data: "data.txt, seq_len 16" -> "other.txt, seq_len 16")"#),
        "{err}"
    );
    // A setting is named by its field.
    let mut more_per_prompt = with_data.clone();
    more_per_prompt.score.examples_per_prompt += 1;
    let err = delphi::job::check_settings(&out, &more_per_prompt)
        .unwrap_err()
        .to_string();
    assert!(err.contains("(score.examples_per_prompt: "), "{err}");
    let mut warmer = with_data.clone();
    warmer.score.temperature = 0.7;
    let err = delphi::job::check_settings(&out, &warmer)
        .unwrap_err()
        .to_string();
    assert!(err.contains("score.temperature: 0.0 -> 0.7)"), "{err}");
}

/// With the server down, the job stops starting latents once the LLM has failed for two
/// latents in a row per concurrent slot (each would otherwise spend its own retries); the
/// latents not tried are errors, so the run fails and a rerun takes them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_llm_stops_the_job_early() {
    let f = fixture();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = OpenAiConfig::new(format!("http://127.0.0.1:{port}/v1"), "test-model");
    config.timeout = Duration::from_millis(500);
    config.max_retries = 0;
    let llm = OpenAiClient::new(config).unwrap();
    let models = JobModels {
        explainer: &llm,
        scorer: &llm,
        embedder: None,
    };
    let options = RunOptions {
        output: f.root.join("down"),
        shard: Shard::ALL,
        concurrency: 1,
        progress: false,
        keep_unreadable: false,
    };
    let report = run_job(&f.cache, &f.tokenizer, &models, &job_config(), &options)
        .await
        .unwrap();
    let (not_tried, failed): (Vec<&String>, Vec<&String>) =
        report.errors.iter().partition(|e| e.contains("not tried"));
    assert_eq!(failed.len(), 2, "{report:?}");
    assert!(!not_tried.is_empty(), "{report:?}");
    assert!(
        not_tried[0].contains("the LLM failed for 2 latents in a row"),
        "{report:?}"
    );
    assert_eq!(report.complete, 0);

    // Refused requests (HTTP 400) are not a server that is down: every latent is tried.
    let server = TestServer::start().await;
    server.inject((0..64).map(|_| Fault::Status(400)));
    let llm = client(&server);
    let models = JobModels {
        explainer: &llm,
        scorer: &llm,
        embedder: None,
    };
    let options = RunOptions {
        output: f.root.join("refused"),
        ..options
    };
    let report = run_job(&f.cache, &f.tokenizer, &models, &job_config(), &options)
        .await
        .unwrap();
    assert!(!report.errors.is_empty(), "{report:?}");
    assert!(
        report.errors.iter().all(|e| !e.contains("not tried")),
        "{report:?}"
    );
}

/// A rerun from another LLM or another cache is refused; a rerun of part of the job keeps
/// the whole job's record (hook points, latents, scorers) in run_config.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reruns_from_other_sources_are_refused_and_partial_reruns_keep_the_record() {
    let f = fixture();
    let server = TestServer::start().await;
    let out = f.root.join("out");
    run(&f, &server, &out, Shard::ALL).await;
    let record = std::fs::read_to_string(out.join("run_config.json")).unwrap();
    assert!(
        record.contains("\"explainer\":\"test-model\"") && record.contains("fnv1a64:"),
        "{record}"
    );

    // Another explainer model behind the same kind of server.
    let mut config = OpenAiConfig::new(&server.url, "other-model");
    config.max_retries = 0;
    let other = OpenAiClient::new(config).unwrap();
    let options = RunOptions {
        output: out.clone(),
        shard: Shard::ALL,
        concurrency: 1,
        progress: false,
        keep_unreadable: false,
    };
    let models = JobModels {
        explainer: &other,
        scorer: &other,
        embedder: None,
    };
    let message = run_job(&f.cache, &f.tokenizer, &models, &job_config(), &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("explainer model") && message.contains("other-model"),
        "{message}"
    );

    // A bigger cache of the same model, SAE and data.
    let model = tiny_model(&f.root.join("model2"));
    let bigger = f.root.join("cache2");
    write_cache(&model, &tiny_sae(), &bigger, 24, 8);
    let bigger = LatentCache::open(&bigger).unwrap();
    let llm = client(&server);
    let models = JobModels {
        explainer: &llm,
        scorer: &llm,
        embedder: None,
    };
    let message = run_job(&bigger, &f.tokenizer, &models, &job_config(), &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("latent cache") && message.contains("24 sequences"),
        "{message}"
    );

    // A narrower rerun on a new server (another port: servers may move) is accepted and
    // leaves the whole job recorded.
    let server = TestServer::start().await;
    let narrow = JobConfig {
        latents: 2..4,
        scorers: vec![Scorer::Detection],
        ..job_config()
    };
    let report = run_with(&f, &server, &out, Shard::ALL, &narrow).await;
    assert!(report.errors.is_empty(), "{report:?}");
    let recorded = delphi::job::read_run_config(&out).unwrap();
    assert_eq!(recorded, job_config());

    // A damaged record is not "delete it and redo" (which would leave the results without
    // one), and is kept as it is.
    let record = std::fs::read(out.join("run_config.json")).unwrap();
    std::fs::write(out.join("run_config.json"), &record[..200]).unwrap();
    let message = try_run(&f, &server, &out, Shard::ALL, &job_config(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("run_config.json: damaged (EOF while parsing")
            && message.contains("restore it from a copy, or move it, explanations/ and scores/")
            && !message.contains("delete it"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(out.join("run_config.json")).unwrap(),
        &record[..200]
    );
    // Following the advice: the record and the results moved aside, the job runs again.
    let aside = tempfile::tempdir().unwrap();
    for name in ["run_config.json", "explanations", "scores"] {
        std::fs::rename(out.join(name), aside.path().join(name)).unwrap();
    }
    let report = run_with(&f, &server, &out, Shard::ALL, &narrow).await;
    assert!(report.errors.is_empty(), "{report:?}");
    // Restoring them (the record that covers them all) is the other way on.
    for name in ["run_config.json", "explanations", "scores"] {
        let _ = std::fs::remove_dir_all(out.join(name));
        let _ = std::fs::remove_file(out.join(name));
        std::fs::rename(aside.path().join(name), out.join(name)).unwrap();
    }
    std::fs::write(out.join("run_config.json"), &record).unwrap();

    // Results without their record are not adopted by a new one.
    std::fs::remove_file(out.join("run_config.json")).unwrap();
    let message = try_run(&f, &server, &out, Shard::ALL, &job_config(), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("run_config.json: missing, but the folder holds results")
            && message.contains("restore run_config.json, or use a new output folder"),
        "{message}"
    );
    assert!(!out.join("run_config.json").exists());
}

/// An explanation cut off at max_tokens and a scorer answer without a 0/1 list are not
/// kept: the latents are reported unfinished and a rerun completes them exactly as a clean
/// run would. `keep_unreadable` writes the unreadable answers as null predictions instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_explanations_and_unreadable_scores_are_retried() {
    let f = fixture();
    let server = TestServer::start().await;
    let clean = f.root.join("clean");
    let report = run(&f, &server, &clean, Shard::ALL).await;
    assert!(
        report.errors.is_empty() && report.complete >= 4,
        "{report:?}"
    );
    let reference = results(&clean);

    let server = TestServer::start().await;
    server.inject([Fault::CutOff, Fault::Prose]);
    let out = f.root.join("faulty");
    let report = run(&f, &server, &out, Shard::ALL).await;
    assert_eq!(
        (report.explanation_failures, report.unreadable_scores),
        (1, 1),
        "{report:?}"
    );
    assert!(report.errors.is_empty(), "{report:?}");
    let partial = results(&out);
    for (name, bytes) in &partial {
        assert_eq!(Some(bytes), reference.get(name), "{name}");
    }
    // One explanation and its two scores, and one detection or fuzzing score, are missing.
    assert_eq!(partial.len() + 4, reference.len());
    let server = TestServer::start().await;
    let report = run(&f, &server, &out, Shard::ALL).await;
    assert_eq!(
        (report.explanation_failures, report.unreadable_scores),
        (0, 0)
    );
    assert_eq!(results(&out), reference);

    let server = TestServer::start().await;
    server.inject([Fault::Prose]);
    let kept = f.root.join("kept");
    let report = try_run(&f, &server, &kept, Shard::ALL, &job_config(), true)
        .await
        .unwrap();
    assert_eq!(report.unreadable_scores, 0, "{report:?}");
    let files = results(&kept);
    assert_eq!(files.len(), reference.len());
    let differing: Vec<&String> = files
        .keys()
        .filter(|name| files[*name] != reference[*name])
        .collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    let records: Vec<delphi::score::ClassifiedSample> =
        serde_json::from_slice(&files[differing[0]]).unwrap();
    let nulls = records.iter().filter(|r| r.prediction.is_none()).count();
    assert!(nulls > 0 && nulls <= ScoreConfig::default().examples_per_prompt);
}

/// A rate-limited request waits at most its timeout, whatever Retry-After says, and frees
/// its request slot while waiting: with one slot, the other request is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_neither_stalls_a_request_nor_holds_its_slot() {
    use delphi::llm::{ChatRequest, Llm, Message};
    let server = TestServer::start().await;
    server.inject([Fault::RateLimited(600)]);
    let mut config = OpenAiConfig::new(&server.url, "test-model");
    config.timeout = Duration::from_millis(800);
    config.concurrency = 1;
    let llm = OpenAiClient::new(config).unwrap();
    let ask = |text: &str| {
        llm.chat(ChatRequest {
            messages: vec![Message::user(text)],
            max_tokens: 5,
            temperature: 0.0,
            top_logprobs: None,
            format: None,
        })
    };
    // A guard against a hang, not a measurement: without the cap this waits 600 s.
    let (a, b) = tokio::time::timeout(Duration::from_secs(120), async {
        futures::join!(ask("first"), ask("second"))
    })
    .await
    .expect("a Retry-After of 600 s stalled the requests");
    assert!(a.is_ok() && b.is_ok());
    let order: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order.len(), 3);
    assert!(order[0] == order[2] && order[0] != order[1], "{order:?}");
}

/// Settings that cannot work are refused before run_config.json is written, so the folder
/// can still be used with good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_before_anything_is_written() {
    let f = fixture();
    let server = TestServer::start().await;
    let out = f.root.join("out");
    let mut cases: Vec<(JobConfig, &str)> = Vec::new();
    let mut c = job_config();
    c.examples.example_ctx_len = 24;
    cases.push((c, "example_ctx_len 24"));
    let mut c = job_config();
    c.examples.n_train = 4;
    cases.push((c, "--n-train"));
    let mut c = job_config();
    c.examples.n_quantiles = 0;
    cases.push((c, "--n-quantiles"));
    let mut c = job_config();
    c.score.examples_per_prompt = 0;
    cases.push((c, "--examples-per-prompt"));
    let mut c = job_config();
    c.latents = 10..20;
    cases.push((c, "layers.1 has 16 latents"));
    let mut c = job_config();
    c.examples.n_non_activating = 0;
    cases.push((c, "--n-non-activating must be at least 1"));
    let mut c = job_config();
    c.examples.n_test = 9;
    cases.push((c, "quantiles (--n-quantiles) 1: it needs at least 2"));
    let mut c = job_config();
    c.scorers.push(Scorer::Simulation);
    cases.push((c, "cannot give: use a local GGUF model (--explainer local)"));
    for (config, expected) in cases {
        let message = try_run(&f, &server, &out, Shard::ALL, &config, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(message.contains(expected), "{message}");
        assert!(!out.exists(), "{message}");
    }
    assert!(server.requests().is_empty());
    let report = run(&f, &server, &out, Shard::ALL).await;
    assert!(
        report.errors.is_empty() && report.complete > 0,
        "{report:?}"
    );
}

/// The server's client for chats, and made-up readings for the simulation scorer: after a
/// piece whose token holds a space the belief is level 9, otherwise level 0.
struct ReadingClient(OpenAiClient);

impl Llm for ReadingClient {
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, delphi::Result<ChatResponse>> {
        self.0.chat(request)
    }
    fn read(&self, request: ReadRequest) -> BoxFuture<'_, delphi::Result<ReadResponse>> {
        Box::pin(async move {
            let level = |piece: &String| {
                let token = piece.rsplit('\n').next().unwrap();
                let mut levels = vec![f32::NEG_INFINITY; request.candidates.len()];
                levels[if token.contains(' ') { 9 } else { 0 }] = 0.0;
                levels
            };
            Ok(ReadResponse {
                logprobs: request
                    .answers
                    .iter()
                    .map(|answer| answer.iter().map(level).collect())
                    .collect(),
                usage: Default::default(),
            })
        })
    }
    /// One log-probability per word: -1 after an explanation, -2 after the placeholder.
    fn continuation_logprobs(
        &self,
        request: ContinuationRequest,
    ) -> BoxFuture<'_, delphi::Result<ContinuationResponse>> {
        Box::pin(async move {
            let placeholder = request
                .prompt
                .contains(delphi::prompts::SURPRISAL_PLACEHOLDER);
            let logprob = if placeholder { -2.0 } else { -1.0 };
            Ok(ContinuationResponse {
                logprobs: request
                    .texts
                    .iter()
                    .map(|text| vec![logprob; text.split_whitespace().count()])
                    .collect(),
                usage: Default::default(),
            })
        })
    }
    fn reads_prompts(&self) -> bool {
        true
    }
    fn name(&self) -> String {
        self.0.name()
    }
    fn model_id(&self) -> String {
        self.0.model_id()
    }
}

/// Runs a job with `scorers` through [`ReadingClient`] into the folder `name`, checking that
/// it completes some latents and fails none; returns the folder, the config and the report.
async fn run_reading_job(
    f: &Fixture,
    server: &TestServer,
    name: &str,
    scorers: Vec<Scorer>,
) -> (PathBuf, JobConfig, delphi::job::RunReport) {
    let out = f.root.join(name);
    let config = JobConfig {
        scorers,
        ..job_config()
    };
    let llm = ReadingClient(client(server));
    let report = run_through(f, &llm, &out, Shard::ALL, &config, false)
        .await
        .unwrap();
    assert!(
        report.errors.is_empty() && report.complete > 0,
        "{report:?}"
    );
    (out, config, report)
}

/// The simulation scorer in a job: one file per explained latent in delphi's shape, and the
/// summary's median correlation is that of the files' groups of all excerpts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulation_scorer_writes_delphis_groups_and_a_median_correlation() {
    let f = fixture();
    let server = TestServer::start().await;
    let scorers = vec![Scorer::Detection, Scorer::Simulation];
    let (out, config, report) = run_reading_job(&f, &server, "simulation", scorers).await;
    let files = results(&out);
    let simulated: Vec<&Vec<u8>> = files
        .iter()
        .filter(|(k, _)| k.starts_with("scores/simulation/"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(simulated.len(), report.complete as usize);
    let mut correlations = Vec::new();
    for bytes in simulated {
        let groups: Vec<ScoredSimulation> = serde_json::from_slice(bytes).unwrap();
        // The group of all excerpts comes last, when there are silent excerpts (the tiny
        // cache has none for a latent that fires almost everywhere).
        let all = groups.last().unwrap();
        let sims = &all.scored_sequence_simulations;
        if all.distance != 0 {
            assert!(groups.iter().all(|g| g.distance > 0));
            continue;
        }
        // Up to 10 activating and 10 silent excerpts, each read at every token.
        assert!(sims.iter().any(|s| s.distance == -1) && sims.len() <= 20);
        for s in sims {
            let expected = &s.simulation.expected_activations;
            assert_eq!(expected.len(), s.simulation.tokens.len());
            for (e, token) in expected.iter().zip(&s.simulation.tokens) {
                assert_eq!(*e, if token.contains(' ') { 10.0 } else { 0.0 });
            }
        }
        let quantile_groups = groups[..groups.len() - 1].iter().map(|g| g.distance);
        assert!(quantile_groups.clone().all(|d| (1..=5).contains(&d)));
        correlations.extend(simulation_correlation(&groups));
    }
    let summary = summarize(&out, &config).unwrap();
    let simulation = &summary.scorers["simulation"];
    assert_eq!(simulation.latents, report.complete);
    assert!(!correlations.is_empty());
    assert_eq!(
        simulation.median_correlation,
        delphi::metrics::median(&correlations)
    );
    assert!(delphi::job::summary_table(&summary).contains("correlation"));
}

/// The surprisal scorer in a job: one file per explained latent in delphi's
/// `SurprisalOutput` shape (surprisal per scorer token, after the placeholder and after the
/// explanation; the activations per subject token), and the summary's median AUC is that of
/// the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_surprisal_scorer_writes_delphis_outputs_and_a_median_auc() {
    let f = fixture();
    let server = TestServer::start().await;
    let scorers = vec![Scorer::Surprisal];
    let (out, config, report) = run_reading_job(&f, &server, "surprisal", scorers).await;
    let files = results(&out);
    let mut aucs = Vec::new();
    let mut scored = 0;
    for (name, bytes) in &files {
        if !name.starts_with("scores/surprisal/") {
            continue;
        }
        scored += 1;
        let outputs: Vec<SurprisalOutput> = serde_json::from_slice(bytes).unwrap();
        assert!(!outputs.is_empty() && outputs.len() <= 20);
        for o in &outputs {
            let words = o.text.split_whitespace().count();
            assert_eq!(o.no_explanation, vec![2.0; words]);
            assert_eq!(o.explanation, vec![1.0; words]);
            assert_eq!(o.activating(), o.distance >= 0, "{o:?}");
        }
        aucs.extend(delphi::score::surprisal_auc(&outputs));
    }
    assert_eq!(scored, report.complete);
    let summary = summarize(&out, &config).unwrap();
    let surprisal = &summary.scorers["surprisal"];
    assert_eq!(surprisal.latents, report.complete);
    assert_eq!(surprisal.median_auc, delphi::metrics::median(&aucs));
    // Every excerpt's surprisal falls by 1 nat: activating and silent ones tie.
    assert!(
        !aucs.is_empty() && aucs.iter().all(|&auc| auc == 0.5),
        "{aucs:?}"
    );

    // A backend that cannot read prompts is refused before the job starts.
    let err = delphi::job::check_scorer_model(&config, &client(&server))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the surprisal scorer reads"), "{err}");
}

/// The intruder scorer alone asks for no explanation; its records hold the server's
/// answers, and the summary's accuracy is theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_intruder_scorer_needs_no_explanation() {
    let f = fixture();
    let server = TestServer::start().await;
    let out = f.root.join("intruder");
    let config = JobConfig {
        scorers: vec![Scorer::Intruder],
        ..job_config()
    };
    let report = run_with(&f, &server, &out, Shard::ALL, &config).await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(server.explainer_requests(), 0);
    let files = results(&out);
    assert_eq!(files.len(), report.complete as usize);
    assert!(files.keys().all(|k| k.starts_with("scores/intruder/")));
    let mut shares = Vec::new();
    for bytes in files.values() {
        let results: Vec<delphi::score::IntruderResult> = serde_json::from_slice(bytes).unwrap();
        // One prompt per silent excerpt (up to 10; the tiny cache may hold fewer, or none
        // for a latent that fires almost everywhere); every answer read, in range, scored.
        assert!(results.len() <= 10, "{}", results.len());
        for r in &results {
            let shown = r.sample.examples.len();
            let p = r.prediction.unwrap();
            assert!(p < shown && r.correct_index < shown);
            assert_eq!(r.correct, p == r.correct_index);
        }
        shares.extend(delphi::score::intruder_accuracy(&results));
    }
    let summary = summarize(&out, &config).unwrap();
    assert_eq!(summary.explained, 0);
    let intruder = &summary.scorers["intruder"];
    assert_eq!(intruder.failed_prompts, Some(0));
    assert!(!shares.is_empty());
    assert_eq!(intruder.median_accuracy, delphi::metrics::median(&shares));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_lose_nothing_and_a_rerun_completes_exactly_the_missing_latents() {
    let f = fixture();
    let server = TestServer::start().await;
    let clean = f.root.join("clean");
    let report = run(&f, &server, &clean, Shard::ALL).await;
    assert!(
        report.errors.is_empty() && report.explanation_failures == 0,
        "{report:?}"
    );
    let explained = report.complete as usize;
    assert!(
        explained >= 4,
        "too few latents fire often enough: {report:?}"
    );
    assert_eq!(report.complete + report.skipped, 8);
    let reference = results(&clean);
    assert_eq!(reference.len(), explained * 4);
    let clean_requests = server.requests().len();

    // Same job with faults: transient ones are retried (500, 429 + Retry-After, timeout,
    // truncated and non-JSON bodies); one answer lacks the explanation marker, and one
    // request fails for good (400).
    let server = TestServer::start().await;
    server.inject([
        Fault::Status(500),
        Fault::RateLimited(1),
        Fault::Delay(Duration::from_secs(3)),
        Fault::Truncated,
        Fault::NotJson,
        // The permanent failure first: the marker fault then waits for the next explainer
        // request, so it always falls on another latent (which still gets its intruder
        // score, needing no explanation).
        Fault::Status(400),
        Fault::NoMarker,
    ]);
    let faulty = f.root.join("faulty");
    let report = run(&f, &server, &faulty, Shard::ALL).await;
    assert_eq!(report.explanation_failures, 1, "{report:?}");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("400"), "{:?}", report.errors);
    let partial = results(&faulty);
    // Whatever was written is identical to the clean run's file.
    for (name, bytes) in &partial {
        assert_eq!(Some(bytes), reference.get(name), "{name}");
    }
    assert!(partial.len() < reference.len());

    // Files a killed run was writing (hidden; delphi's analysis scripts would read them)
    // go with the re-run, which compares the folders whole below.
    #[cfg(unix)]
    for folder in ["explanations", "scores/fuzz"] {
        let path = faulty.join(folder).join(".layers.1_latent9.txt.tmp-4321");
        std::fs::write(&path, b"half").unwrap();
        let two_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(120);
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(two_minutes_ago).unwrap();
    }

    // A re-run against a healthy server completes exactly the missing latents.
    let explanations_before = partial
        .keys()
        .filter(|k| k.starts_with("explanations/"))
        .count();
    let server = TestServer::start().await;
    let report = run(&f, &server, &faulty, Shard::ALL).await;
    assert!(
        report.errors.is_empty() && report.explanation_failures == 0,
        "{report:?}"
    );
    assert_eq!(server.explainer_requests(), explained - explanations_before);
    assert!(server.requests().len() < clean_requests);
    assert_eq!(results(&faulty), reference);

    // Nothing left: a third run sends no request at all.
    let server = TestServer::start().await;
    run(&f, &server, &faulty, Shard::ALL).await;
    assert_eq!(server.requests().len(), 0);

    // An explanation deleted to redo it takes its scores along (they scored the old text).
    let explanation = reference
        .keys()
        .find(|k| k.starts_with("explanations/"))
        .unwrap();
    let name = explanation.trim_start_matches("explanations/");
    std::fs::write(
        faulty.join("scores/detection").join(name),
        b"scored another explanation",
    )
    .unwrap();
    std::fs::remove_file(faulty.join(explanation)).unwrap();
    let server = TestServer::start().await;
    run(&f, &server, &faulty, Shard::ALL).await;
    assert_eq!(server.explainer_requests(), 1);
    assert_eq!(results(&faulty), reference);

    let summary = summarize(&faulty, &job_config()).unwrap();
    assert_eq!(summary.explained as usize, explained);
    assert_eq!(summary.scorers["detection"].latents as usize, explained);
    assert_eq!(summary.scorers["fuzz"].pooled.unwrap().failed, 0);
    let intruder = &summary.scorers["intruder"];
    assert_eq!(intruder.latents as usize, explained);
    assert_eq!(intruder.failed_prompts, Some(0));
    // The medians, recomputed from the score files (delphi's per-sample layout) by hand.
    for (folder, scorer) in [("detection", "detection"), ("fuzz", "fuzz")] {
        let (mut accuracies, mut f1s) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(faulty.join("scores").join(folder)).unwrap() {
            let samples: Vec<serde_json::Value> =
                serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap())
                    .unwrap();
            let count = |activating: bool, predicted: bool| {
                samples
                    .iter()
                    .filter(|s| s["activating"] == activating && s["prediction"] == predicted)
                    .count() as f64
            };
            let (tp, fn_, tn, fp) = (
                count(true, true),
                count(true, false),
                count(false, false),
                count(false, true),
            );
            accuracies.push((tp / (tp + fn_) + tn / (tn + fp)) / 2.0);
            f1s.push(2.0 * tp / (2.0 * tp + fp + fn_));
        }
        let median = |mut v: Vec<f64>| {
            v.retain(|x| x.is_finite());
            v.sort_by(f64::total_cmp);
            let n = v.len();
            assert!(n > 0, "{scorer}: no latent with a defined value");
            (v[(n - 1) / 2] + v[n / 2]) / 2.0
        };
        let summary = &summary.scorers[scorer];
        let close = |a: Option<f64>, b: f64| (a.unwrap() - b).abs() < 1e-12;
        assert!(
            close(summary.median_balanced_accuracy, median(accuracies.clone())),
            "{scorer}: {summary:?} vs {accuracies:?}"
        );
        assert!(
            close(summary.median_f1, median(f1s.clone())),
            "{scorer}: {summary:?} vs {f1s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_merge_into_one_machines_output() {
    let f = fixture();
    let server = TestServer::start().await;
    let whole = f.root.join("whole");
    run(&f, &server, &whole, Shard::ALL).await;
    let split = f.root.join("split");
    // Shards run side by side; a second run of a shard that is running is refused.
    let shard = |index| Shard { index, count: 3 };
    let running =
        hooks::atomic::lock_folder_as(&split, ".eleuther-interp-shard-1-of-3.lock").unwrap();
    let config = job_config();
    let (first, twice, last) = tokio::join!(
        run(&f, &server, &split, shard(0)),
        try_run(&f, &server, &split, shard(1), &config, false),
        run(&f, &server, &split, shard(2)),
    );
    assert!(first.complete > 0 && last.complete > 0);
    let err = twice.unwrap_err().to_string();
    assert!(err.contains("is being written by another run"), "{err}");
    drop(running);
    run(&f, &server, &split, shard(1)).await;
    assert_eq!(results(&split), results(&whole));
    assert!(!results(&whole).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_settings_are_refused_for_an_existing_output() {
    let f = fixture();
    let server = TestServer::start().await;
    let out = f.root.join("out");
    run(&f, &server, &out, Shard::ALL).await;
    let llm = client(&server);
    let models = JobModels {
        explainer: &llm,
        scorer: &llm,
        embedder: None,
    };
    let mut config = job_config();
    config.examples.n_train = 20;
    let options = RunOptions {
        output: out.clone(),
        shard: Shard::ALL,
        concurrency: 1,
        progress: false,
        keep_unreadable: false,
    };
    let message = run_job(&f.cache, &f.tokenizer, &models, &config, &options)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("run_config.json") && message.contains("examples"),
        "{message}"
    );
}

/// A finished job's output with any one of its files damaged (the run's settings, an
/// explanation, a score file): a rerun, which reads what is there to resume, and the summary
/// refuse it naming the file, or redo it; never a panic.
#[test]
fn damaged_results_are_refused_or_redone() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let f = fixture();
    let server = runtime.block_on(TestServer::start());
    let out = f.root.join("job");
    runtime.block_on(run(&f, &server, &out, Shard::ALL));
    let files = damage::files_in(&out);
    assert!(files.len() > 10, "{files:?}");
    damage::damage_and_read(&out, &files, 6, &|dir| {
        let config = job_config();
        let rerun = try_run(&f, &server, dir, Shard::ALL, &config, false);
        let report = runtime.block_on(rerun).map_err(|e| e.to_string())?;
        if !report.errors.is_empty() {
            return Err(report.errors.join("; "));
        }
        summarize(dir, &config).map_err(|e| e.to_string())?;
        Ok(())
    });
}
