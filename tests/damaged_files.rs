//! Damaged files: every file format the toolkit reads (model folders and GGUF files, tokenizers,
//! SAEs, tuned lenses, training checkpoints, activation and latent caches, token arrays, text
//! data, trajectories) is damaged many times over (cut short, bytes overwritten, length fields
//! made huge, JSON numbers changed) and read. Each damaged copy must be read or refused with
//! an error naming it: never a panic.
//!
//! The damage is pseudo-random with fixed seeds, so a failure reproduces. `--nocapture` shows,
//! per artefact, how many damaged copies were read and how many refused.

use std::path::{Path, PathBuf};

mod common;
use common::repo;
#[path = "common/damage.rs"]
mod damage;
use damage::{damage_and_read, files_in};

use hooks::candle_core::{DType, Device, Tensor};

fn message(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The chain of an `anyhow` error (a command's error and its causes).
fn chain(e: anyhow::Error) -> String {
    format!("{e:#}")
}

fn names(files: &[&str]) -> Vec<String> {
    files.iter().map(|f| f.to_string()).collect()
}

/// A model loaded and run over four tokens.
fn load_and_run(path: &Path) -> Result<(), String> {
    let options = hooks::LoadOptions::default();
    let model = hooks::Model::load(path.to_str().unwrap(), &options).map_err(message)?;
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let mut hooks = hooks::Hooks::capture_only([]);
    model.forward(&ids, &mut hooks).map_err(message)?;
    Ok(())
}

fn the_pythia_tokenizer() -> &'static hooks::Tokenizer {
    static TOKENIZER: std::sync::OnceLock<hooks::Tokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = repo().join("data/gpt-neox-20b-tokenizer.json");
        hooks::Tokenizer::from_file(&path, Some(0)).unwrap()
    })
}

/// Every sequence of a data file, tokenized.
fn read_data(path: &Path) -> Result<(), String> {
    let spec = hooks::data::DataSpec::new(vec![path.to_path_buf()], 16);
    for chunk in spec.chunks(Some(the_pythia_tokenizer())).map_err(message)? {
        chunk.map_err(message)?;
    }
    Ok(())
}

/// Runs a command line (`cli` given the arguments after the program name).
fn run(cli: fn(Vec<String>) -> anyhow::Result<()>, args: &[&str]) -> Result<(), String> {
    cli(args.iter().map(|s| s.to_string()).collect()).map_err(chain)
}

fn hooks_cli(args: Vec<String>) -> anyhow::Result<()> {
    hooks::cli::run(std::iter::once("hooks".to_string()).chain(args))
}

fn sae_cli(args: Vec<String>) -> anyhow::Result<()> {
    sae::cli::run(std::iter::once("sae".to_string()).chain(args))
}

fn lens_cli(args: Vec<String>) -> anyhow::Result<()> {
    lens::cli::run(std::iter::once("lens".to_string()).chain(args))
}

fn delphi_cli(args: Vec<String>) -> anyhow::Result<()> {
    delphi::cli::run(std::iter::once("delphi".to_string()).chain(args))
}

/// A tiny model with the Pythia tokenizer and 200 lines of WikiText-2, in a temporary folder.
struct Workspace {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    model: String,
    text: String,
}

impl Workspace {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let model = common::model_folder(&dir, 32, 64);
        let wikitext = std::fs::read_to_string(repo().join("data/wikitext-2-raw-test.txt"));
        let lines: Vec<String> = wikitext
            .unwrap()
            .lines()
            .take(200)
            .map(String::from)
            .collect();
        std::fs::write(dir.join("text.txt"), lines.join("\n")).unwrap();
        Self {
            text: dir.join("text.txt").to_str().unwrap().into(),
            model: model.to_str().unwrap().into(),
            dir,
            _tmp: tmp,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().into()
    }

    /// A command's arguments: the model, `data` in sequences of 16 tokens, then `rest`.
    fn args<'a>(&'a self, command: &'a str, data: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let source = ["--model", &self.model, "--data", data, "--seq-len", "16"];
        [&[command][..], &source, rest].concat()
    }

    /// An activation cache of the model's layers.1 over 20,000 tokens, in three shards.
    fn activation_cache(&self) -> String {
        let out = self.path("activations");
        let wikitext = repo().join("data/wikitext-2-raw-test.txt");
        let rest = [
            "--hookpoints",
            "layers.1",
            "--max-tokens",
            "20000",
            "--batch-size",
            "64",
            "--shard-mib",
            "1",
            "--output",
            &out,
        ];
        let args = self.args("cache", wikitext.to_str().unwrap(), &rest);
        run(hooks_cli, &args).unwrap();
        out
    }
}

#[test]
fn damaged_model_folders() {
    let workspace = Workspace::new();
    let files = names(&["config.json", "model.safetensors"]);
    damage_and_read(Path::new(&workspace.model), &files, 150, &load_and_run);
}

#[test]
fn damaged_gguf_files() {
    let gguf = repo().join("tests/fixtures/llama/qwen2_bias/model.gguf");
    damage_and_read(&gguf, &[], 300, &load_and_run);
}

#[test]
fn damaged_tokenizers() {
    let tokenizer = repo().join("data/gpt-neox-20b-tokenizer.json");
    damage_and_read(&tokenizer, &[], 30, &|path| {
        let tokenizer = hooks::Tokenizer::from_file(path, None).map_err(message)?;
        let ids = tokenizer
            .encode("A damaged file is refused.")
            .map_err(message)?;
        tokenizer.decode(&ids).map_err(message)?;
        Ok(())
    });
}

#[test]
fn damaged_saes() {
    let read = |dir: &Path| {
        let sae = sae::Sae::load(dir, &Device::Cpu).map_err(message)?;
        let x = Tensor::ones((3, sae.d_in()), DType::F32, &Device::Cpu).unwrap();
        sae.forward(&x).map_err(message)?;
        Ok(())
    };
    let sparsify = repo().join("tests/fixtures/sae/tiny");
    damage_and_read(
        &sparsify,
        &names(&["cfg.json", "sae.safetensors"]),
        150,
        &read,
    );
    let sae_lens = repo().join("tests/fixtures/sae_lens/topk");
    let files = names(&["cfg.json", "sae_weights.safetensors"]);
    damage_and_read(&sae_lens, &files, 100, &|dir| {
        sae::Sae::load_sae_lens(dir, &Device::Cpu).map_err(message)?;
        Ok(())
    });
}

#[test]
fn damaged_tuned_lenses() {
    // tuned-lens's own files: a PyTorch pickle of the parameters.
    let lens = repo().join("tests/fixtures/tuned_lens/pythia_style");
    damage_and_read(&lens, &names(&["config.json", "params.pt"]), 150, &|dir| {
        lens::TunedLens::load(dir, &Device::Cpu).map_err(message)?;
        Ok(())
    });
}

#[test]
fn damaged_activation_caches() {
    let workspace = Workspace::new();
    let cache = PathBuf::from(workspace.activation_cache());
    let files = files_in(&cache);
    assert!(files.len() > 3, "{files:?}");
    damage_and_read(&cache, &files, 40, &|dir| {
        use hooks::activations::{ActivationCache, ActivationSource, ReadOrder};
        let cache = ActivationCache::open(dir).map_err(message)?;
        let shuffled = ReadOrder::Shuffled {
            seed: 1,
            buffer_tokens: 100,
        };
        for order in [ReadOrder::Sequential, shuffled] {
            let mut reader = cache.reader(48, order).map_err(message)?;
            while reader.next_batch().map_err(message)?.is_some() {}
        }
        Ok(())
    });
}

#[test]
fn damaged_token_arrays() {
    let workspace = Workspace::new();
    let out = workspace.path("tokens.npy");
    let args = workspace.args(
        "tokenize",
        &workspace.text,
        &["--max-tokens", "512", "--output", &out],
    );
    run(hooks_cli, &args).unwrap();
    damage_and_read(Path::new(&out), &[], 150, &read_data);
}

#[test]
fn damaged_text_data() {
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let workspace = Workspace::new();
    let text = std::fs::read_to_string(&workspace.text).unwrap();
    let lines: Vec<&str> = text.lines().take(60).collect();

    let jsonl = workspace.dir.join("docs.jsonl");
    let records: Vec<String> = lines
        .iter()
        .map(|l| serde_json::json!({"text": l, "n": 1}).to_string())
        .collect();
    std::fs::write(&jsonl, records.join("\n")).unwrap();
    damage_and_read(&jsonl, &[], 100, &read_data);

    // Parquet: a text column (optional, so with definition levels) beside an integer one, in
    // row groups of 25, compressed as datasets on the hub are, and not.
    let schema = "message doc { OPTIONAL BYTE_ARRAY text (UTF8); REQUIRED INT64 id; }";
    let docs: Vec<ByteArray> = lines.iter().map(|l| ByteArray::from(*l)).collect();
    let compressions = [
        Compression::SNAPPY,
        Compression::ZSTD(ZstdLevel::default()),
        Compression::UNCOMPRESSED,
    ];
    for compression in compressions {
        let path = workspace.dir.join("docs.parquet");
        let properties = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_size(25)
            .build();
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = SerializedFileWriter::new(file, schema, Arc::new(properties)).unwrap();
        for group in docs.chunks(25) {
            let mut row_group = writer.next_row_group().unwrap();
            let mut column = row_group.next_column().unwrap().unwrap();
            let defined = vec![1i16; group.len()];
            let texts = column.typed::<ByteArrayType>();
            texts.write_batch(group, Some(&defined), None).unwrap();
            column.close().unwrap();
            let mut column = row_group.next_column().unwrap().unwrap();
            let ids: Vec<i64> = (0..group.len() as i64).collect();
            column
                .typed::<Int64Type>()
                .write_batch(&ids, None, None)
                .unwrap();
            column.close().unwrap();
            row_group.close().unwrap();
        }
        writer.close().unwrap();
        damage_and_read(&path, &[], 150, &read_data);
    }
}

#[test]
fn damaged_latent_caches() {
    let workspace = Workspace::new();
    let saes = workspace.dir.join("saes");
    let sae = sae::Sae::new(sae::SaeConfig::new(32, 16, 4), 5, &Device::Cpu).unwrap();
    sae.save(&saes.join("layers.1")).unwrap();
    let out = workspace.path("latents");
    let rest = [
        "--sae",
        saes.to_str().unwrap(),
        "--hookpoints",
        "layers.1",
        "--max-tokens",
        "512",
        "--batch-size",
        "4",
        "--sequences-per-shard",
        "8",
        "--output",
        &out,
    ];
    let args = workspace.args("cache", &workspace.text, &rest);
    run(delphi_cli, &args).unwrap();
    let files = files_in(Path::new(&out));
    assert!(files.len() > 3, "{files:?}");
    damage_and_read(Path::new(&out), &files, 40, &|dir| {
        let cache = delphi::latents::LatentCache::open(dir).map_err(message)?;
        cache.firings("layers.1", 0..16).map_err(message)?;
        Ok(())
    });
}

/// The same training command, rerun on a finished run's output folder with its checkpoint
/// damaged: a rerun reads the checkpoint to resume.
fn rerun_on_damaged_output(
    cli: fn(Vec<String>) -> anyhow::Result<()>,
    args: &[&str],
    output: &str,
    count: usize,
) {
    run(cli, args).unwrap();
    // The outputs are written again from the checkpoint, which is all a rerun reads.
    let files: Vec<String> = files_in(Path::new(output))
        .into_iter()
        .filter(|f| f.ends_with("checkpoint.safetensors"))
        .collect();
    assert!(!files.is_empty());
    damage_and_read(Path::new(output), &files, count, &|dir| {
        let args: Vec<&str> = args
            .iter()
            .map(|&a| {
                if a == output {
                    dir.to_str().unwrap()
                } else {
                    a
                }
            })
            .collect();
        run(cli, &args)
    });
}

#[test]
fn damaged_sae_training_outputs() {
    let workspace = Workspace::new();
    let cache = workspace.activation_cache();
    let out = workspace.path("sae");
    let args = [
        "train",
        "--activations",
        &cache,
        "--hookpoints",
        "layers.1",
        "--output",
        &out,
        "--steps",
        "4",
        "--batch-size",
        "32",
        "--k",
        "4",
        "--num-latents",
        "16",
        "--lr-warmup-steps",
        "1",
        "--checkpoint-every",
        "2",
    ];
    rerun_on_damaged_output(sae_cli, &args, &out, 30);
}

#[test]
fn damaged_lens_training_outputs() {
    let workspace = Workspace::new();
    let out = workspace.path("lens");
    let rest = [
        "--tokens-per-step",
        "64",
        "--steps",
        "4",
        "--output",
        &out,
        "--checkpoint-every",
        "1",
    ];
    let args = workspace.args("train", &workspace.text, &rest);
    rerun_on_damaged_output(lens_cli, &args, &out, 30);
}

#[test]
fn damaged_trajectories() {
    let workspace = Workspace::new();
    let options = hooks::LoadOptions::default();
    let model = hooks::Model::load(&workspace.model, &options).unwrap();
    let ids = [1, 2, 3, 4, 5];
    let trajectory =
        lens::trajectory::PredictionTrajectory::compute(&model, None, &ids, 3).unwrap();
    let path = workspace.dir.join("trajectory.json");
    trajectory.write_json(&path).unwrap();
    damage_and_read(&path, &[], 150, &|path| {
        use lens::trajectory::PredictionTrajectory;
        let trajectory = PredictionTrajectory::read_json(path).map_err(message)?;
        let _ = trajectory.to_csv();
        Ok(())
    });
}
