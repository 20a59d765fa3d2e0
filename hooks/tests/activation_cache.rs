//! The activation cache: streaming producer, sharded writer, resume after a failure,
//! sequential and shuffled readers, and the errors for incomplete or damaged caches.

use std::path::{Path, PathBuf};

use hooks::activations::{
    ActivationBatch, ActivationCache, ActivationSource, CacheOptions, ModelActivations, ReadOrder,
};
use hooks::candle_core::{DType, Device, Tensor};
use hooks::data::DataSpec;
use hooks::{HookPoint, Hooks, LoadOptions, Model};

const SEQ_LEN: usize = 16;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tiny GPT-NeoX with synthetic weights and the real Pythia tokenizer (full vocabulary).
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

/// The first `lines` non-empty lines of WikiText-2 as a text file.
fn wikitext(dir: &Path, lines: usize) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("data/wikitext-2-raw-test.txt")).unwrap();
    let sample: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(lines)
        .collect();
    let path = dir.join("sample.txt");
    std::fs::write(&path, sample.join("\n")).unwrap();
    path
}

const POINTS: [HookPoint; 2] = [HookPoint::Layer(0), HookPoint::Mlp(1)];

fn write_cache(
    model: &Model,
    spec: &DataSpec,
    out: &Path,
    shard_bytes: usize,
) -> hooks::Result<hooks::activations::CacheSummary> {
    write_cache_of_at_most(model, spec, out, shard_bytes, None)
}

/// [`write_cache`] of at most `max_chunks` sequences.
fn write_cache_of_at_most(
    model: &Model,
    spec: &DataSpec,
    out: &Path,
    shard_bytes: usize,
    max_chunks: Option<u64>,
) -> hooks::Result<hooks::activations::CacheSummary> {
    let chunks = spec.chunks(Some(model.tokenizer()?))?;
    let mut source =
        ModelActivations::new(model, chunks, POINTS.to_vec(), 3, DType::F32, max_chunks)?;
    let options = CacheOptions {
        max_shard_bytes: shard_bytes,
        overwrite: false,
        progress: false,
    };
    ActivationCache::write(&mut source, spec, out, &options)
}

/// A file as a killed writer leaves it: last written two minutes ago, unlocked.
fn write_stale(path: &Path) {
    std::fs::write(path, [0u8; 4096]).unwrap();
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
        .unwrap();
}

fn read_all(cache: &ActivationCache, order: ReadOrder) -> ActivationBatch {
    let mut reader = cache.reader(50, order).unwrap();
    let mut batches = Vec::new();
    while let Some(batch) = reader.next_batch().unwrap() {
        assert!(batch.len() <= 50);
        batches.push(batch);
    }
    ActivationBatch::concat(&batches).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

#[test]
fn cache_round_trip_equals_direct_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 40)], SEQ_LEN);
    let out = tmp.path().join("cache");
    let summary = write_cache(&model, &spec, &out, 20_000).unwrap();
    let manifest = &summary.manifest;
    assert!(
        manifest.shards.len() > 2,
        "small shard bound gives several shards"
    );
    assert_eq!(manifest.tokens, manifest.chunks * SEQ_LEN as u64);
    assert_eq!(
        manifest.settings.hook_points,
        vec!["layers.0", "layers.1.mlp"]
    );
    assert!(out.join("manifest.json").is_file() && !out.join("progress.json").exists());

    let cache = ActivationCache::open(&out).unwrap();
    let all = read_all(&cache, ReadOrder::Sequential);
    assert_eq!(all.len() as u64, manifest.tokens);

    // The same chunks through a plain forward pass.
    let chunks: Vec<Vec<u32>> = spec
        .chunks(Some(model.tokenizer().unwrap()))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    assert_eq!(chunks.len() as u64, manifest.chunks);
    assert_eq!(all.tokens, chunks.concat());
    let ids = Tensor::new(chunks, &hooks::candle_core::Device::Cpu).unwrap();
    let out = model
        .forward(&ids, &mut Hooks::new().capture(POINTS))
        .unwrap();
    for point in POINTS {
        let direct = out.captures[&point].reshape((all.len(), 32)).unwrap();
        assert_eq!(rows(&all.activations[&point]), rows(&direct), "{point}");
    }
    // What checkpoints of trainers record of a source names the dtypes, so that a resume
    // in another precision is refused.
    let reader = cache.reader(64, ReadOrder::Sequential).unwrap();
    assert!(
        reader
            .describe()
            .ends_with("read in order (computed in float32, stored in float32)"),
        "{}",
        reader.describe()
    );
    let stream = |dtype| {
        let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
        let model = Model::from_folder(
            tmp.path(),
            &LoadOptions {
                dtype,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        ModelActivations::new(&model, chunks, POINTS.to_vec(), 3, DType::F32, None)
            .unwrap()
            .describe()
    };
    let (f32_stream, bf16_stream) = (stream(DType::F32), stream(DType::BF16));
    assert!(
        f32_stream.ends_with(" tokens (computed in float32)"),
        "{f32_stream}"
    );
    assert!(
        bf16_stream.ends_with(" tokens (computed in bfloat16)"),
        "{bf16_stream}"
    );
}

#[test]
fn a_local_revision_is_recorded_as_a_hub_revision_is() {
    let tmp = tempfile::tempdir().unwrap();
    let series = tmp.path().join("series");
    tiny_model(&series.join("step8"));
    let options = LoadOptions {
        revision: Some("step8".into()),
        ..LoadOptions::default()
    };
    let model = Model::load(series.to_str().unwrap(), &options).unwrap();
    assert_eq!(model.revision(), Some("step8"));
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 10)], SEQ_LEN);
    let summary = write_cache(&model, &spec, &tmp.path().join("cache"), 1 << 20).unwrap();
    assert_eq!(summary.manifest.settings.revision.as_deref(), Some("step8"));
    assert!(summary.manifest.settings.model.ends_with("step8"));
    // Without a revision, a folder has none.
    let plain = Model::load(
        series.join("step8").to_str().unwrap(),
        &LoadOptions::default(),
    );
    assert_eq!(plain.unwrap().revision(), None);
}

/// A Llama whose heads are wider than its residual stream over their count (12 x 4 = 48,
/// hidden 32): the heads' outputs are cached at their own width, and an attention pattern,
/// which has no row per token, is refused before anything is written.
#[test]
fn attention_heads_are_cached_at_their_own_width_and_patterns_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
        "intermediate_size": 64, "vocab_size": 50304, "eos_token_id": 0
    });
    let dir = tmp.path().join("llama");
    let tokenizer = repo().join("data/gpt-neox-20b-tokenizer.json");
    hooks::synthetic::write_synthetic_model(&dir, &config, Some(&tokenizer)).unwrap();
    let model = Model::from_folder(&dir, &LoadOptions::default()).unwrap();
    let heads = model.hook_point("blocks.1.attn.hook_z").unwrap();
    assert_eq!(model.hook_name(heads), "layers.1.self_attn.o_proj.input");
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 10)], SEQ_LEN);
    let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
    let points = vec![HookPoint::Layer(0), heads];
    let mut source = ModelActivations::new(&model, chunks, points, 2, DType::F32, None).unwrap();
    let out = tmp.path().join("cache");
    let options = CacheOptions {
        max_shard_bytes: 1 << 20,
        overwrite: false,
        progress: false,
    };
    let summary = ActivationCache::write(&mut source, &spec, &out, &options).unwrap();
    assert_eq!(summary.manifest.settings.widths, vec![32, 48]);
    let all = read_all(&ActivationCache::open(&out).unwrap(), ReadOrder::Sequential);
    assert_eq!(all.activations[&heads].dims(), &[all.len(), 48]);

    let pattern = model.hook_point("layers.0.self_attn.pattern").unwrap();
    let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
    let err = ModelActivations::new(&model, chunks, vec![pattern], 2, DType::F32, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(
            "'layers.0.self_attn.pattern' is an attention pattern, [batch, heads, seq, seq]"
        ),
        "{err}"
    );
}

#[test]
fn shuffled_reading_is_a_deterministic_permutation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 30)], SEQ_LEN);
    let out = tmp.path().join("cache");
    write_cache(&model, &spec, &out, 10_000).unwrap();
    let cache = ActivationCache::open(&out).unwrap();
    let sequential = read_all(&cache, ReadOrder::Sequential);
    let order = ReadOrder::Shuffled {
        seed: 7,
        buffer_tokens: 200,
    };
    let a = read_all(&cache, order);
    let b = read_all(&cache, order);
    assert_eq!(
        rows(&a.activations[&POINTS[0]]),
        rows(&b.activations[&POINTS[0]])
    );
    assert_ne!(a.tokens, sequential.tokens);
    let key = |batch: &ActivationBatch| {
        let mut r: Vec<(u32, Vec<u32>)> = rows(&batch.activations[&POINTS[1]])
            .into_iter()
            .zip(&batch.tokens)
            .map(|(row, t)| (*t, row.iter().map(|v| v.to_bits()).collect()))
            .collect();
        r.sort();
        r
    };
    assert_eq!(key(&a), key(&sequential), "same rows, same token pairing");
}

#[test]
fn interrupted_job_resumes_to_the_same_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let text = wikitext(tmp.path(), 30);
    let jsonl = tmp.path().join("more.jsonl");
    let good_jsonl = "{\"text\": \"A second file with more text to cache, long enough for a few chunks of tokens.\"}\n".repeat(6);
    // A malformed line at the end makes the first run fail after some shards were written.
    std::fs::write(&jsonl, format!("{good_jsonl}{{broken\n")).unwrap();
    let spec = DataSpec::new(vec![text, jsonl.clone()], SEQ_LEN);
    let out = tmp.path().join("cache");
    let err = write_cache(&model, &spec, &out, 5_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("more.jsonl") && err.contains("not valid JSON"),
        "{err}"
    );
    assert!(
        !out.join("manifest.json").exists(),
        "no manifest for an unfinished cache"
    );
    let err = ActivationCache::open(&out).unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
    let shards_before = std::fs::read_dir(out.join("shards")).unwrap().count();
    assert!(shards_before > 0);
    // A resume does not trust a shard that is gone, or was cut short (a power cut after the
    // rename, before the data reached the disk), which would otherwise end up in the
    // manifest: with nothing before it, the job starts again, and stops at the same line.
    let first = out.join("shards/shard-000000.safetensors");
    let kept = std::fs::read(&first).unwrap();
    let progress_file = out.join("progress.json");
    let progress = std::fs::read_to_string(&progress_file).unwrap();
    let damages: [&dyn Fn(); 2] = [&|| std::fs::remove_file(&first).unwrap(), &|| {
        std::fs::write(&first, &kept[..kept.len() - 4]).unwrap()
    }];
    for damage in damages {
        damage();
        let err = write_cache(&model, &spec, &out, 5_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
        assert_eq!(std::fs::read(&first).unwrap(), kept, "computed again");
        assert_eq!(std::fs::read_to_string(&progress_file).unwrap(), progress);
    }
    // Nor one whose count of chunks done disagrees with its shards (a hand repair).
    let mut edited: serde_json::Value = serde_json::from_str(&progress).unwrap();
    edited["shards"].as_array_mut().unwrap().pop();
    std::fs::write(&progress_file, edited.to_string()).unwrap();
    let err = write_cache(&model, &spec, &out, 5_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("progress.json: records") && err.contains("but its shards hold"),
        "{err}"
    );
    // A damaged shard after good ones (a torn write): the job goes on from those before it
    // (it and those after it computed again), and ends with the same cache as a run never
    // stopped (checked below).
    let listed: serde_json::Value = serde_json::from_str(&progress).unwrap();
    let listed = listed["shards"].as_array().unwrap();
    assert!(listed.len() >= 2, "{listed:?}");
    let damaged = out.join(listed[listed.len() / 2]["file"].as_str().unwrap());
    let bytes = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    // A progress file of an older version, which does not record where the job stood
    // after each shard, cannot go back: it says so, and changes nothing.
    let mut older: serde_json::Value = serde_json::from_str(&progress).unwrap();
    older
        .as_object_mut()
        .unwrap()
        .remove("after_shard")
        .unwrap();
    std::fs::write(&progress_file, older.to_string()).unwrap();
    let err = write_cache(&model, &spec, &out, 5_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be resumed from") && err.contains("written by an older version"),
        "{err}"
    );
    assert!(out
        .join(listed.last().unwrap()["file"].as_str().unwrap())
        .exists());
    std::fs::write(&progress_file, &progress).unwrap();

    // The shard a killed run was writing is deleted on resume (on Unix, where the lock
    // that marks a file being written exists).
    let abandoned = out.join("shards/.shard-000009.safetensors.tmp-4321");
    write_stale(&abandoned);

    std::fs::write(&jsonl, &good_jsonl).unwrap();
    let resumed = write_cache(&model, &spec, &out, 5_000).unwrap();
    assert!(resumed.resumed_chunks > 0);
    let listed_chunks: u64 = listed
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap())
        .sum::<u64>()
        / SEQ_LEN as u64;
    assert!(
        resumed.resumed_chunks < listed_chunks,
        "resumed from before the damaged shard"
    );
    #[cfg(unix)]
    assert!(!abandoned.exists());
    let fresh_dir = tmp.path().join("fresh");
    let fresh = write_cache(&model, &spec, &fresh_dir, 5_000).unwrap();
    assert_eq!(resumed.manifest.tokens, fresh.manifest.tokens);
    assert_eq!(resumed.manifest.chunks, fresh.manifest.chunks);
    // Text bytes do not depend on how the job was split into shards or runs.
    let one_shard = write_cache(&model, &spec, &tmp.path().join("one"), 1 << 30).unwrap();
    assert!(fresh.manifest.shards.len() > 2 && one_shard.manifest.shards.len() == 1);
    assert_eq!(fresh.manifest.text_bytes, one_shard.manifest.text_bytes);
    assert_eq!(resumed.manifest.text_bytes, one_shard.manifest.text_bytes);
    let a = read_all(&ActivationCache::open(&out).unwrap(), ReadOrder::Sequential);
    let b = read_all(
        &ActivationCache::open(&fresh_dir).unwrap(),
        ReadOrder::Sequential,
    );
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(
        rows(&a.activations[&POINTS[0]]),
        rows(&b.activations[&POINTS[0]])
    );

    // Running again does nothing; other settings are refused.
    assert!(
        write_cache(&model, &spec, &out, 5_000)
            .unwrap()
            .already_complete
    );
    let other = DataSpec::new(spec.paths.clone(), SEQ_LEN * 2);
    let err = write_cache(&model, &other, &out, 5_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("other settings (data.seq_len: 16 -> 32)"),
        "{err}"
    );
}

#[test]
fn damaged_caches_and_empty_data_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 10)], SEQ_LEN);
    let out = tmp.path().join("cache");
    write_cache(&model, &spec, &out, 5_000).unwrap();
    let shard = out.join("shards/shard-000001.safetensors");
    let read_error = |cache: &ActivationCache| {
        let mut reader = cache.reader(10_000, ReadOrder::Sequential).unwrap();
        loop {
            match reader.next_batch() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("damaged shard read without error"),
                Err(e) => break e.to_string(),
            }
        }
    };
    // A NaN in a shard is named with its place in the data, not as a row of a batch.
    let bytes = std::fs::read(&shard).unwrap();
    let mut tensors = hooks::candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    let poisoned = tensors["layers.0"].slice_assign(
        &[3..4, 2..3],
        &Tensor::new(&[[f32::NAN]], &Device::Cpu).unwrap(),
    );
    tensors.insert("layers.0".into(), poisoned.unwrap());
    hooks::candle_core::safetensors::save(&tensors, &shard).unwrap();
    let err = read_error(&ActivationCache::open(&out).unwrap());
    assert!(
        err.contains("shard-000001.safetensors: 'layers.0' holds NaN in row 3 (sequence ")
            && err.contains(", position 3)"),
        "{err}"
    );
    // A reader that leaves out the first 4 positions of each sequence never sees it.
    let mut skipping = ActivationCache::open(&out)
        .unwrap()
        .reader(10_000, ReadOrder::Sequential)
        .unwrap();
    skipping.skip_first_positions(4).unwrap();
    while skipping.next_batch().unwrap().is_some() {}
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_error(&ActivationCache::open(&out).unwrap());
    assert!(
        err.contains("shard-000001.safetensors") && err.contains("unreadable shard"),
        "{err}"
    );
    std::fs::remove_file(&shard).unwrap();
    let err = ActivationCache::open(&out).unwrap_err().to_string();
    assert!(
        err.contains("shard shards/shard-000001.safetensors is missing"),
        "{err}"
    );
    // A manifest whose shards leave the folder, or repeat.
    let manifest = out.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    for (edit, expected) in [
        (
            "../../outside.safetensors",
            "shard '../../outside.safetensors' is not a file inside the cache folder",
        ),
        (
            "shards/shard-000000.safetensors",
            "lists shard 'shards/shard-000000.safetensors' twice",
        ),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["shards"][1]["file"] = edit.into();
        std::fs::write(&manifest, json.to_string()).unwrap();
        let err = ActivationCache::open(&out).unwrap_err().to_string();
        assert!(
            err.contains("manifest.json") && err.contains(expected),
            "{err}"
        );
    }
    // A manifest whose widths do not match its hook points.
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["settings"]["widths"].as_array_mut().unwrap().pop();
    std::fs::write(&manifest, json.to_string()).unwrap();
    let err = ActivationCache::open(&out).unwrap_err().to_string();
    assert!(err.contains("hook points but"), "{err}");

    // A model whose activations are NaN is refused while caching, naming the hook point.
    let weights = tmp.path().join("model.safetensors");
    let mut tensors = hooks::candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let bias = "gpt_neox.layers.0.mlp.dense_4h_to_h.bias";
    let nan = tensors[bias].affine(0.0, f64::NAN).unwrap();
    tensors.insert(bias.into(), nan);
    hooks::candle_core::safetensors::save(&tensors, &weights).unwrap();
    let broken = Model::from_folder(tmp.path(), &LoadOptions::default()).unwrap();
    let err = write_cache(&broken, &spec, &tmp.path().join("nan"), 5_000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'layers.0' holds NaN in sequence 0 (stored as float32)"),
        "{err}"
    );

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "just a few words\n").unwrap();
    let err = write_cache(
        &model,
        &DataSpec::new(vec![empty], 4096),
        &tmp.path().join("e"),
        5_000,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no complete chunk of 4096 tokens"), "{err}");
}

#[test]
fn a_stop_request_writes_what_was_computed_and_the_job_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 30)], SEQ_LEN);
    let out = tmp.path().join("cache");
    let options = CacheOptions {
        max_shard_bytes: 1 << 30,
        overwrite: false,
        progress: false,
    };
    let mut seen = Vec::new();
    let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
    let mut source =
        ModelActivations::new(&model, chunks, POINTS.to_vec(), 3, DType::F32, None).unwrap();
    let err = ActivationCache::write_with(&mut source, &spec, &out, &options, |now| {
        seen.push((now.tokens, now.new_tokens, now.shards));
        if seen.len() == 2 {
            return Err(hooks::Error::InvalidArgument("interrupted".into()));
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "interrupted");
    let (three, six) = (3 * SEQ_LEN as u64, 6 * SEQ_LEN as u64);
    assert_eq!(seen, vec![(three, three, 0), (six, six, 0)]);
    assert_eq!(
        std::fs::read_dir(out.join("shards")).unwrap().count(),
        1,
        "the two batches were saved"
    );
    // A second job into the folder while one writes there is refused.
    let held = hooks::atomic::lock_folder(&out).unwrap();
    let err = write_cache(&model, &spec, &out, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is being written by another run"), "{err}");
    drop(held);
    // The data file changed under the job (one word early on): refused, and nothing lost.
    let data = &spec.paths[0];
    let original = std::fs::read_to_string(data).unwrap();
    std::fs::write(data, original.replacen(" the ", " a ", 1)).unwrap();
    let err = write_cache(&model, &spec, &out, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(err.contains("made from other data"), "{err}");
    std::fs::write(data, original).unwrap();
    // Other settings are refused by name.
    let other = DataSpec::new(spec.paths.clone(), SEQ_LEN * 2);
    let err = write_cache(&model, &other, &out, 1 << 30)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unfinished cache made with other settings (data.seq_len: 16 -> 32)"),
        "{err}"
    );
    // A limit, which the settings hold in sequences, is named by its flag too.
    let err = write_cache_of_at_most(&model, &spec, &out, 1 << 30, Some(4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("(max_chunks: null -> 4; max_chunks is --max-tokens over data.seq_len)"),
        "{err}"
    );
    let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
    let mut source =
        ModelActivations::new(&model, chunks, POINTS.to_vec(), 3, DType::F32, None).unwrap();
    let mut seen = Vec::new();
    let resumed = ActivationCache::write_with(&mut source, &spec, &out, &options, |now| {
        seen.push(*now);
        Ok(())
    })
    .unwrap();
    assert_eq!(resumed.resumed_chunks, 6);
    // Counts from the first batch on include what the earlier run cached.
    let first = hooks::activations::CacheProgress {
        tokens: 9 * SEQ_LEN as u64,
        new_tokens: 3 * SEQ_LEN as u64,
        shards: 1,
    };
    assert_eq!(seen[0], first);
    let fresh = write_cache(&model, &spec, &tmp.path().join("fresh"), 1 << 30).unwrap();
    assert_eq!(resumed.manifest.tokens, fresh.manifest.tokens);
}

/// Row `i` of a full read is at position `i % SEQ_LEN`: the rows of a full read whose
/// position is at least `skip`.
fn without_first_positions(all: &ActivationBatch, skip: usize) -> ActivationBatch {
    let keep: Vec<u32> = (0..all.len() as u32)
        .filter(|i| *i as usize % SEQ_LEN >= skip)
        .collect();
    all.select(&keep).unwrap()
}

#[test]
fn readers_and_the_model_stream_skip_the_first_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 30)], SEQ_LEN);
    let out = tmp.path().join("cache");
    write_cache(&model, &spec, &out, 10_000).unwrap();
    let cache = ActivationCache::open(&out).unwrap();
    assert!(cache.manifest().shards.len() > 1);
    let all = read_all(&cache, ReadOrder::Sequential);
    let read_skipping = |order: ReadOrder, skip: usize| {
        let mut reader = cache.reader(50, order).unwrap();
        reader.skip_first_positions(skip).unwrap();
        let mut batches = Vec::new();
        while let Some(batch) = reader.next_batch().unwrap() {
            batches.push(batch);
        }
        ActivationBatch::concat(&batches).unwrap()
    };
    for skip in [1, 3] {
        // Sequential: exactly the rows at positions >= skip, in order.
        let expected = without_first_positions(&all, skip);
        assert_eq!(expected.len(), all.len() / SEQ_LEN * (SEQ_LEN - skip));
        let got = read_skipping(ReadOrder::Sequential, skip);
        assert_eq!(got.tokens, expected.tokens);
        for point in POINTS {
            assert_eq!(
                rows(&got.activations[&point]),
                rows(&expected.activations[&point])
            );
        }
        // Shuffled: the same rows in another order.
        let shuffled = read_skipping(
            ReadOrder::Shuffled {
                seed: 3,
                buffer_tokens: 100,
            },
            skip,
        );
        let key = |batch: &ActivationBatch| {
            let mut r: Vec<Vec<u32>> = rows(&batch.activations[&POINTS[0]])
                .into_iter()
                .map(|row| row.iter().map(|v| v.to_bits()).collect())
                .collect();
            r.sort();
            r
        };
        assert_ne!(shuffled.tokens, expected.tokens);
        assert_eq!(key(&shuffled), key(&expected));
    }
    // Skipping nothing changes nothing.
    let order = ReadOrder::Shuffled {
        seed: 3,
        buffer_tokens: 100,
    };
    let plain = read_all(&cache, order);
    let zero = read_skipping(order, 0);
    assert_eq!(zero.tokens, plain.tokens);
    assert_eq!(
        rows(&zero.activations[&POINTS[1]]),
        rows(&plain.activations[&POINTS[1]])
    );
    // Refusals: nothing left, or too late.
    let mut reader = cache.reader(50, ReadOrder::Sequential).unwrap();
    let err = reader
        .skip_first_positions(SEQ_LEN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("first 16 positions of 16-token"), "{err}");
    reader.next_batch().unwrap();
    let err = reader.skip_first_positions(1).unwrap_err().to_string();
    assert!(err.contains("before reading"), "{err}");

    // The model stream: the same rows as the cache, and skip_tokens counts kept rows.
    let stream = |skip: usize| {
        let chunks = spec.chunks(Some(model.tokenizer().unwrap())).unwrap();
        let mut source =
            ModelActivations::new(&model, chunks, POINTS.to_vec(), 3, DType::F32, None).unwrap();
        source.skip_first_positions(skip).unwrap();
        source
    };
    let mut source = stream(2);
    let mut batches = Vec::new();
    while let Some(batch) = source.next_batch().unwrap() {
        assert_eq!(batch.len(), 3 * (SEQ_LEN - 2));
        batches.push(batch);
    }
    let streamed = ActivationBatch::concat(&batches).unwrap();
    let expected = without_first_positions(&all, 2);
    assert_eq!(streamed.tokens, expected.tokens);
    assert_eq!(
        rows(&streamed.activations[&POINTS[0]]),
        rows(&expected.activations[&POINTS[0]])
    );
    let mut source = stream(2);
    assert_eq!(
        source.skip_tokens(2 * (SEQ_LEN as u64 - 2) + 5).unwrap(),
        28
    );
    let next = source.next_batch().unwrap().unwrap();
    assert_eq!(next.tokens[..], expected.tokens[28..28 + 3 * (SEQ_LEN - 2)]);
    // A stream that skips positions cannot be cached (readers need whole sequences).
    let err = ActivationCache::write(
        &mut stream(1),
        &spec,
        &tmp.path().join("c2"),
        &CacheOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("whole sequences"), "{err}");
}

/// Activations the stored dtype cannot hold are refused before their shard is written,
/// naming the hook point, the sequence (counted over the data) and the dtype; stored in
/// float32, the same activations are cached.
#[test]
fn values_the_stored_dtype_cannot_hold_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("model");
    let tokenizer = tiny_model(&folder).tokenizer().unwrap().clone();
    let spec = DataSpec::new(vec![wikitext(tmp.path(), 40)], SEQ_LEN);
    let chunks: Vec<Vec<u32>> = spec
        .chunks(Some(&tokenizer))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // A token first seen in sequence 3, whose embedding is made too large for float16.
    let first_seen = |t: u32| chunks.iter().position(|c| c.contains(&t));
    let token = chunks[3]
        .iter()
        .copied()
        .find(|&t| first_seen(t) == Some(3))
        .unwrap();
    let weights = folder.join("model.safetensors");
    let mut tensors = hooks::candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let name = "gpt_neox.embed_in.weight";
    let mut embed: Vec<Vec<f32>> = tensors[name].to_vec2().unwrap();
    for v in &mut embed[token as usize] {
        *v *= 1e8;
    }
    tensors.insert(name.into(), Tensor::new(embed, &Device::Cpu).unwrap());
    hooks::candle_core::safetensors::save(&tensors, &weights).unwrap();
    let model = Model::from_folder(&folder, &LoadOptions::default()).unwrap();
    let cache = |dtype: DType, out: &Path| {
        let chunks = spec.chunks(Some(&tokenizer)).unwrap();
        let mut source =
            ModelActivations::new(&model, chunks, vec![HookPoint::Embed], 3, dtype, None).unwrap();
        let options = CacheOptions {
            max_shard_bytes: 1 << 30,
            overwrite: false,
            progress: false,
        };
        ActivationCache::write(&mut source, &spec, out, &options)
    };
    let out = tmp.path().join("f16");
    let message = cache(DType::F16, &out).unwrap_err().to_string();
    assert!(
        message.contains("'embed' holds")
            && message.contains("in sequence 3 (stored as float16)")
            && message.contains("float16 holds up to 65504"),
        "{message}"
    );
    let shards = std::fs::read_dir(out.join("shards")).map_or(0, |d| d.count());
    assert_eq!(shards, 0, "nothing is written");
    let summary = cache(DType::F32, &tmp.path().join("f32")).unwrap();
    assert_eq!(summary.manifest.chunks, chunks.len() as u64);
}
