//! The `hooks` command line end to end, in-process: a model folder and real text in, an
//! activation cache out; re-running is a no-op; errors are clear; `lens eval` reads the
//! cache.

use std::path::{Path, PathBuf};

mod common;
use common::repo;

/// The tiny model of these tests.
fn model_folder(dir: &Path) -> PathBuf {
    common::model_folder(dir, 32, 64)
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    hooks::cli::run(std::iter::once("hooks").chain(args.iter().copied()))
}

#[test]
fn cache_command_writes_a_complete_cache_of_real_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let out = tmp.path().join("cache");
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let args = [
        "cache",
        "--model",
        model.to_str().unwrap(),
        "--hookpoints",
        "layers.*,blocks.1.hook_mlp_out",
        "--data",
        text.to_str().unwrap(),
        "--seq-len",
        "64",
        "--max-tokens",
        "1000",
        "--batch-size",
        "4",
        "--shard-mib",
        "1",
        "--output",
        out.to_str().unwrap(),
    ];
    run(&args).unwrap();
    let cache = hooks::activations::ActivationCache::open(&out).unwrap();
    let manifest = cache.manifest();
    assert_eq!(
        manifest.tokens,
        15 * 64,
        "1000 tokens round down to 15 sequences of 64"
    );
    assert_eq!(
        manifest.settings.hook_points,
        vec!["layers.0", "layers.1.mlp", "layers.1", "layers.2"]
    );
    let modified = std::fs::metadata(out.join("manifest.json"))
        .unwrap()
        .modified()
        .unwrap();
    run(&args).unwrap();
    assert_eq!(
        std::fs::metadata(out.join("manifest.json"))
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );
    run(&["inspect", out.to_str().unwrap()]).unwrap();
    run(&["info", "--model", model.to_str().unwrap()]).unwrap();

    // `inspect` checks the manifest's arithmetic and every shard's header.
    let inspect = || {
        format!(
            "{:#}",
            run(&["inspect", out.to_str().unwrap()]).unwrap_err()
        )
    };
    let manifest_text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    let edited = manifest_text.replacen("\"tokens\": 960,", "\"tokens\": 99999,", 1);
    assert_ne!(edited, manifest_text);
    std::fs::write(out.join("manifest.json"), edited).unwrap();
    let message = inspect();
    assert!(
        message.contains("manifest.json disagrees with itself: tokens 99999, its shards' tokens sum to 960, and 15 sequences of 64 make 960"),
        "{message}"
    );
    // A shard that does not hold what the manifest says: found by `inspect` from its header,
    // and by a reader when it loads it.
    let narrower =
        manifest_text.replacen("\"widths\": [\n      32,", "\"widths\": [\n      31,", 1);
    assert_ne!(narrower, manifest_text);
    std::fs::write(out.join("manifest.json"), narrower).unwrap();
    let expected = "tensor 'layers.0' is F32 [960, 32], but manifest.json says [960, 31] F32";
    let message = inspect();
    assert!(message.contains(expected), "{message}");
    let cache = hooks::activations::ActivationCache::open(&out).unwrap();
    let mut reader = cache
        .reader(64, hooks::activations::ReadOrder::Sequential)
        .unwrap();
    use hooks::activations::ActivationSource;
    let message = format!("{:#}", reader.next_batch().unwrap_err());
    assert!(message.contains(expected), "{message}");
    std::fs::write(out.join("manifest.json"), &manifest_text).unwrap();
    let shard = out.join(&manifest.shards[0].file);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
    let message = inspect();
    assert!(
        message.contains("shard-000000.safetensors: unreadable shard"),
        "{message}"
    );
}

/// `hooks tokenize` writes the sequences every command cuts from text: a cache of its
/// `.npy` holds the tokens of a cache of the text. Its output is not replaced unasked.
#[test]
fn tokenize_command_writes_the_sequences_commands_read() {
    use hooks::activations::ActivationCache;
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let text = path(&repo().join("data/wikitext-2-raw-test.txt"));
    let tokens = tmp.path().join("tokens.npy");
    let tokenize = ["tokenize", "--model", &path(&model), "--data", &text];
    let limits = ["--seq-len", "64", "--max-tokens", "1000"];
    run(&[&tokenize[..], &limits, &["-o", &path(&tokens)]].concat()).unwrap();
    let array = hooks::data::TokenArray::open_npy(&tokens).unwrap();
    assert_eq!((array.len(), array.row_len), (15 * 64, Some(64)));

    let cache_of = |data: &str, name: &str| {
        let out = tmp.path().join(name);
        let args = [
            "cache",
            "--model",
            &path(&model),
            "--hookpoints",
            "layers.1",
        ];
        run(&[&args[..], &["--data", data], &limits, &["-o", &path(&out)]].concat()).unwrap();
        ActivationCache::open(&out)
            .unwrap()
            .tokens_fingerprint()
            .unwrap()
    };
    assert_eq!(
        cache_of(&text, "from-text"),
        cache_of(&path(&tokens), "from-npy")
    );

    let tokens_path = path(&tokens);
    let none = path(&tmp.path().join("none.npy"));
    let no_length = ["--seq-len", "0", "--max-tokens", "1000", "-o", &none];
    let message = run(&[&tokenize[..], &no_length].concat())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("sequence length must be positive"),
        "{message}"
    );
    let again = [&tokenize[..], &["-o", &tokens_path]].concat();
    let message = run(&again).unwrap_err().to_string();
    assert!(
        message.ends_with("tokens.npy exists; pass --overwrite to replace it"),
        "{message}"
    );
    // What a killed run left half-written is removed.
    let abandoned = tmp.path().join(".tokens.npy.tmp-4321");
    std::fs::write(&abandoned, [0u8; 64]).unwrap();
    let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    std::fs::File::options()
        .write(true)
        .open(&abandoned)
        .unwrap()
        .set_modified(two_minutes_ago)
        .unwrap();
    run(&[&again[..], &["--overwrite"]].concat()).unwrap();
    #[cfg(unix)]
    assert!(!abandoned.exists());
    let whole = hooks::data::TokenArray::open_npy(&tokens).unwrap();
    assert_eq!(
        (whole.len(), whole.row_len),
        (140 * 2048, Some(2048)),
        "all of the WikiText-2 test split, in sequences of the default 2048"
    );
}

#[test]
fn a_cache_rebuilt_from_other_text_has_another_fingerprint() {
    use hooks::activations::{ActivationCache, ActivationSource, ReadOrder};
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let text = std::fs::read_to_string(repo().join("data/wikitext-2-raw-test.txt")).unwrap();
    let (data, cache) = (tmp.path().join("data.txt"), tmp.path().join("cache"));
    let path = |p: &Path| p.to_str().unwrap().to_string();
    // The cache rebuilt in place, same settings, from what is now in data.txt; the
    // fingerprint training checkpoints record for it, read shuffled after `rows` rows.
    let rebuild_with = |contents: &str, rows: u64| {
        std::fs::write(&data, contents).unwrap();
        let args = [
            "cache",
            "--model",
            &path(&model),
            "--hookpoints",
            "layers.1",
        ];
        let rest = [
            "--data",
            &path(&data),
            "--seq-len",
            "64",
            "--max-tokens",
            "512",
        ];
        run(&[
            &args[..],
            &rest,
            &["--output", &path(&cache), "--overwrite"],
        ]
        .concat())
        .unwrap();
        let order = ReadOrder::Shuffled {
            seed: 1,
            buffer_tokens: 256,
        };
        let reader = ActivationCache::open(&cache)
            .unwrap()
            .reader(64, order)
            .unwrap();
        reader.data_fingerprint(rows).unwrap()
    };
    let first = rebuild_with(&text, 0);
    assert!(
        first.ends_with("(FNV-1a of the 512 tokens of the activation cache)"),
        "{first}"
    );
    // --overwrite replaces the cache's shards, not other files put in its folders.
    let notes = cache.join("shards/notes.txt");
    std::fs::write(&notes, "mine").unwrap();
    let stray_shard = cache.join("shards/shard-000099.safetensors");
    std::fs::write(&stray_shard, "").unwrap();
    // The same text gives the same fingerprint, whatever rows were read.
    assert_eq!(rebuild_with(&text, 128), first);
    assert_ne!(rebuild_with(&text[text.len() / 2..], 0), first);
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "mine");
    assert!(!stray_shard.exists());
}

#[test]
fn lens_eval_reads_a_cache_in_the_sequences_it_was_made_with() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let cache = tmp.path().join("cache");
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let cache_args = [
        "cache",
        "--model",
        &path(&model),
        "--hookpoints",
        "embed,layers.*",
    ];
    let data_args = [
        "--data",
        &path(&text),
        "--seq-len",
        "64",
        "--max-tokens",
        "256",
    ];
    run(&[&cache_args[..], &data_args, &["--output", &path(&cache)]].concat()).unwrap();
    let report = tmp.path().join("report.json");
    let eval = |extra: &[&str]| {
        let args = [
            "eval",
            "--model",
            &path(&model),
            "--activations",
            &path(&cache),
        ];
        let rest = ["--tokens", "128", "--json", &path(&report)];
        lens::cli::run(
            std::iter::once("lens").chain([&args[..], &rest, extra].concat().iter().copied()),
        )
        .map_err(|e| format!("{e:#}"))
    };
    // No --seq-len: the cache's 64, not the 2048 default for text.
    eval(&[]).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["tokens"], 128);
    // The same tokens run through the model give the same metrics: the cache's rows line
    // up with their next-token targets.
    let from_text = tmp.path().join("from-text.json");
    lens::cli::run([
        "lens",
        "eval",
        "--model",
        &path(&model),
        "--data",
        &path(&text),
        "--seq-len",
        "64",
        "--tokens",
        "128",
        "--json",
        &path(&from_text),
    ])
    .unwrap();
    let text_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&from_text).unwrap()).unwrap();
    let metrics = |j: &serde_json::Value| -> Vec<f64> {
        let mut values = Vec::new();
        for layer in j["logit_lens"].as_array().unwrap() {
            for (_, v) in layer.as_object().unwrap() {
                values.extend(v.as_f64());
            }
        }
        values
    };
    let (cached, direct) = (metrics(&json), metrics(&text_json));
    assert!(!cached.is_empty() && cached.len() == direct.len());
    for (a, b) in cached.iter().zip(&direct) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{cached:?} vs {direct:?}"
        );
    }
    assert_eq!(json["logit_lens_depth"], text_json["logit_lens_depth"]);
    let message = eval(&["--seq-len", "32"]).unwrap_err();
    assert!(
        message.contains("holds sequences of 64 tokens, not 32"),
        "{message}"
    );

    // A model of the same shape but a vocabulary of 128: the cache's token ids, its
    // next-token targets, do not fit its logits (this panicked, indexing past them).
    let small = tmp.path().join("small-vocab");
    let config = serde_json::json!({
        "model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 128, "eos_token_id": 0
    });
    hooks::synthetic::write_synthetic_model(&small, &config, None).unwrap();
    let args = [
        "eval",
        "--model",
        &path(&small),
        "--activations",
        &path(&cache),
    ];
    let message = lens::cli::run(std::iter::once("lens").chain(args))
        .map(|_| String::new())
        .unwrap_or_else(|e| format!("{e:#}"));
    assert!(
        message.contains("shard-000000.safetensors: token id ")
            && message.contains("(sequence 0 of the cache, position ")
            && message.contains("is out of range for the model's vocabulary of 128"),
        "{message}"
    );
}

#[test]
fn cache_command_errors_name_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let text = repo().join("data/wikitext-2-raw-test.txt");
    let out = tmp.path().join("cache");
    let base = |hookpoints: &'static str| {
        vec![
            "cache".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--hookpoints".into(),
            hookpoints.into(),
            "--data".into(),
            text.display().to_string(),
            "--seq-len".into(),
            "64".into(),
            "--max-tokens".into(),
            "256".into(),
            "--output".into(),
            out.display().to_string(),
        ]
    };
    let run_owned =
        |args: Vec<String>| hooks::cli::run(std::iter::once("hooks".to_string()).chain(args));
    let err = format!("{:#}", run_owned(base("layers.9")).unwrap_err());
    assert!(
        err.contains("unknown hook point 'layers.9'") && err.contains("layers.{0..2}"),
        "{err}"
    );
    let err = format!("{:#}", run_owned(base("nothing.*")).unwrap_err());
    assert!(err.contains("'nothing.*'"), "{err}");
    let mut args = base("layers.0");
    args[6] = tmp.path().join("missing.txt").display().to_string();
    let err = format!("{:#}", run_owned(args).unwrap_err());
    assert!(err.contains("missing.txt: file not found"), "{err}");
    let mut args = base("layers.0");
    args[2] = tmp.path().join("no-model").display().to_string();
    let err = format!("{:#}", run_owned(args).unwrap_err());
    assert!(err.contains("no-model"), "{err}");
    // Data that yields no tokens fails without leaving an empty cache folder behind.
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let mut args = base("layers.0");
    args[6] = empty.display().to_string();
    let err = format!("{:#}", run_owned(args).unwrap_err());
    assert!(err.contains("empty.txt"), "{err}");
    assert!(!out.exists(), "{} was left behind", out.display());
    // An id past the model's vocabulary is named by file and sequence, not by its place in
    // one forward batch (here the second row of the second, of sequences 2 and 3).
    let ids = tmp.path().join("ids.bin");
    let mut tokens = [7u16; 48];
    tokens[3 * 8 + 5] = 60000;
    std::fs::write(
        &ids,
        tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let mut args = base("layers.0");
    args[6] = ids.display().to_string();
    args[8] = "8".into();
    args.extend(["--batch-size".into(), "2".into()]);
    let err = format!("{:#}", run_owned(args).unwrap_err());
    assert!(
        err.contains("ids.bin: token id 60000 at position 5 of sequence 3 (the data packed into 8-token sequences, counted from 0) is out of range for the model's vocabulary of 50304"),
        "{err}"
    );
}

/// `generate --chat` needs a chat template (a base model's folder has none) and `--system`
/// needs `--chat`; both are clear errors.
#[test]
fn chat_generation_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_folder(tmp.path());
    let model = model.to_str().unwrap();
    let err = run(&["generate", "--model", model, "--chat", "--prompt", "Hi"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("has no chat template"),
        "{err:#}"
    );
    let err = run(&[
        "generate",
        "--model",
        model,
        "--system",
        "Be brief.",
        "--prompt",
        "Hi",
    ])
    .unwrap_err();
    assert!(format!("{err:#}").contains("--chat"), "{err:#}");
}
