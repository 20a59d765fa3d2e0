//! The `sae` command line: `sae train` and `sae eval`. [`run`] takes argv so the cargo
//! binary and the Python console script share one implementation.
//!
//! `sae train` writes sparsify's layout, `OUTPUT/<hookpoint>/cfg.json` + `sae.safetensors`
//! (loadable by sparsify's `SparseCoder.load_many`), with checkpoints in
//! `OUTPUT/checkpoints/<hookpoint>/` so that re-running the same command resumes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::{Args, Parser, Subcommand};
use hooks::activations::{ActivationCache, ActivationSource, ModelActivations, ReadOrder};
use hooks::cli::ModelArgs;
use hooks::data::DataSpec;
use hooks::{HookPoint, Hooks, Model};
use serde::{Deserialize, Serialize};

use crate::train::{train_many, EncoderDtype, SaeOptimizer, StepRecord, TrainOptions};
use crate::{Sae, SaeConfig};

/// Train and evaluate TopK sparse autoencoders (sparsify-compatible files).
#[derive(Parser, Debug)]
#[command(name = "sae", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train one TopK SAE per hook point in a single pass over the activations (streamed from
    /// the model, or read shuffled from a cache); writes OUTPUT/<hookpoint>/cfg.json +
    /// sae.safetensors. Re-running the same command resumes from OUTPUT/checkpoints.
    Train(Box<TrainArgs>),
    /// Evaluate SAEs on a model: FVU, L0, dead latents, explained variance, and the
    /// language-model loss with each SAE spliced into the forward pass (CE loss recovered
    /// against zero-ablation).
    Eval(Box<EvalArgs>),
}

/// Defaults of the model and data options, which training on a cache does not use.
const DEFAULT_DTYPE: &str = "float32";
const DEFAULT_SEQ_LEN: usize = 2048;
const DEFAULT_FORWARD_BATCH: usize = 8;

/// The model (optional for training on a cache).
#[derive(Args, Debug)]
struct ModelOpts {
    /// Model: Pythia short name, hub id, a local folder or a .gguf file.
    #[arg(long, short)]
    model: Option<String>,
    /// Revision: hub branch, tag or commit; for a local folder, its sub-folder of that name.
    #[arg(long)]
    revision: Option<String>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the model: float32, bfloat16 or float16.
    #[arg(long, default_value = DEFAULT_DTYPE)]
    dtype: String,
    /// Use this tokenizer.json instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

impl ModelOpts {
    fn load(&self) -> Result<Option<Model>> {
        let Some(model) = &self.model else {
            return Ok(None);
        };
        let args = ModelArgs {
            model: model.clone(),
            revision: self.revision.clone(),
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            quantized: false,
            tokenizer: self.tokenizer.clone(),
        };
        Ok(Some(args.load()?))
    }
}

#[derive(Args, Debug)]
struct DataOpts {
    /// Text/token data to run the model over (see --format); `sae train` can read
    /// --activations instead.
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Format of the data files (text, text-file, jsonl, parquet, npy, bin).
    #[arg(long)]
    format: Option<String>,
    /// JSON field / parquet column with the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = DEFAULT_SEQ_LEN)]
    seq_len: usize,
    /// Sequences per forward pass of the model.
    #[arg(long, default_value_t = DEFAULT_FORWARD_BATCH)]
    forward_batch: usize,
}

impl DataOpts {
    fn spec(&self) -> DataSpec {
        DataSpec {
            paths: self.data.clone(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            seq_len: self.seq_len,
        }
    }

    /// Streams `points` of `model` over the data, its sequences drawn at random with `seed`
    /// from a pool of the next `shuffle_sequences` (1: in data order; sparsify shuffles its
    /// dataset), leaving out the rows of the first `skip_positions` positions of each
    /// sequence, until at least `max_rows` rows (whole sequences).
    fn stream<'m>(
        &self,
        model: &'m Model,
        points: Vec<HookPoint>,
        max_rows: Option<u64>,
        skip_positions: usize,
        (seed, shuffle_sequences): (u64, usize),
    ) -> Result<ModelActivations<'m>> {
        if self.data.is_empty() {
            bail!("give --data files to run the model over (or --activations for training)");
        }
        if self.seq_len == 0 || self.forward_batch == 0 {
            bail!("--seq-len and --forward-batch must be positive");
        }
        check_skip(skip_positions, self.seq_len)?;
        let mut chunks = self.spec().chunks(model.tokenizer().ok())?;
        if shuffle_sequences > 1 {
            chunks = chunks.shuffled(seed, shuffle_sequences);
        }
        let rows_per_chunk = (self.seq_len - skip_positions) as u64;
        let max_chunks = max_rows.map(|t| t.div_ceil(rows_per_chunk));
        let mut source = ModelActivations::new(
            model,
            chunks,
            points,
            self.forward_batch,
            DType::F32,
            max_chunks,
        )?;
        source.skip_first_positions(skip_positions)?;
        Ok(source)
    }
}

/// `--num-latents`: a positive count (0 is not a stand-in for the default).
fn parse_num_latents(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => {
            Err("must be at least 1 (leave the flag out for d_in x --expansion-factor)".into())
        }
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Refuses to skip every position of `seq_len`-token sequences.
fn check_skip(skip_positions: usize, seq_len: usize) -> Result<()> {
    if skip_positions >= seq_len {
        bail!(
            "--skip-first-positions {skip_positions} leaves nothing of {seq_len}-token sequences"
        );
    }
    Ok(())
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    data: DataOpts,
    /// An activation cache made by `hooks cache` (read shuffled); instead of --model/--data.
    #[arg(long)]
    activations: Option<PathBuf>,
    /// Hook points, comma separated (layers.3,layers.5.mlp; '*' matches any layer). The default
    /// is sparsify's, every layer's output (layers.*); with --finetune every SAE in its folder,
    /// with --activations every cached point.
    #[arg(long)]
    hookpoints: Option<String>,
    /// Output folder: OUTPUT/<hookpoint>/{cfg.json,sae.safetensors}.
    #[arg(long, short)]
    output: PathBuf,
    /// Active latents per token.
    #[arg(long, default_value_t = 32)]
    k: usize,
    /// Latents per input dimension (ignored when --num-latents is given).
    #[arg(long, default_value_t = 32)]
    expansion_factor: usize,
    /// Number of latents (default: d_in x expansion factor).
    #[arg(long, value_parser = parse_num_latents)]
    num_latents: Option<usize>,
    /// Tokens per optimiser step (sparsify: 32 sequences x 2048 tokens).
    #[arg(long, default_value_t = 32 * 2048)]
    batch_size: usize,
    /// Tokens encoded at once within a step (memory: this x num_latents floats).
    #[arg(long, default_value_t = 4096)]
    chunk_tokens: usize,
    /// Peak learning rate (default, as sparsify: 2e-4 / sqrt(num_latents / 2^14) with Adam,
    /// 2e-3 with Muon).
    #[arg(long)]
    lr: Option<f64>,
    /// Decay the number of active latents linearly from min(num_latents, 10 x d_in) to --k
    /// over this many steps (sparsify's experimental --k_decay_steps; 0: off). Recorded in
    /// the checkpoint.
    #[arg(long, default_value_t = 0)]
    k_decay_steps: u64,
    /// Optimiser: adam (sparsify's default), or muon (sparsify's recipe: Muon on the weight
    /// matrices with linear decay and no warm-up, weight decay 0.1; Adam on the biases).
    #[arg(long, value_enum, default_value_t = SaeOptimizer::Adam)]
    optimizer: SaeOptimizer,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 1000)]
    lr_warmup_steps: u64,
    /// Optimiser steps (or give --max-tokens; with --activations the default is the whole cache).
    #[arg(long, conflicts_with = "max_tokens")]
    steps: Option<u64>,
    /// Train on this many tokens (rounded down to whole steps).
    #[arg(long)]
    max_tokens: Option<u64>,
    /// Weight of the AuxK loss (0: off, sparsify's default; Gao et al. use 1/32).
    #[arg(long, default_value_t = 0.0)]
    auxk_alpha: f64,
    /// A latent is dead after this many tokens without firing.
    #[arg(long, default_value_t = 10_000_000)]
    dead_feature_threshold: u64,
    /// Train with the Multi-TopK loss.
    #[arg(long)]
    multi_topk: bool,
    /// Train transcoders (sparsify's --transcode): each hook point must be an MLP output
    /// (layers.N.mlp), predicted from the MLP's input (layers.N.mlp.input); with
    /// --activations the cache needs both (the default hook points are its cached MLPs).
    #[arg(long)]
    transcode: bool,
    /// Add a linear skip connection W_skip [d, d] to the output (sparsify's
    /// --skip_connection; with --transcode, a skip transcoder), trained with the rest. With
    /// --multi-topk the 4k reconstruction includes it too (sparsify 1.3.3's leaves it out).
    #[arg(long)]
    skip_connection: bool,
    /// Train further the SAEs in this folder (DIR/<hookpoint>/, sparsify's layout, as `sae
    /// train` and sparsify write it; sparsify's --finetune), or in a hub repository of them
    /// (EleutherAI/sae-pythia-70m-32k: those --hookpoints names are fetched): their shape and
    /// options come from their cfg.json, and the first step keeps their biases.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["k", "expansion_factor", "num_latents", "multi_topk", "skip_connection"])]
    finetune: Option<PathBuf>,
    /// Hub revision of a --finetune repository (default main).
    #[arg(long, requires = "finetune")]
    sae_revision: Option<String>,
    /// Leave out the first N positions of every sequence (streamed or cached): e.g. 1 keeps
    /// SmolLM2's position-0 "massive activations" out of training. Recorded in the
    /// checkpoint; 0 is sparsify's recipe.
    #[arg(long, default_value_t = 0)]
    skip_first_positions: usize,
    /// Leave out the rows of these token ids, comma separated (sparsify's --exclude_tokens:
    /// e.g. a BOS or end-of-text token whose activations are outliers). Recorded in the
    /// checkpoint; the tokens counted (--max-tokens, --batch-size) are the rows kept.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    exclude_tokens: Vec<u32>,
    /// Precision of the encoder's dense product: bf16 (bf16 inputs, f32 sums, as sparsify's
    /// autocast on a GPU), f32, or auto (bf16 on a CUDA GPU, f32 on the CPU). Parameters,
    /// gradients and optimiser state are f32 either way.
    #[arg(long, default_value = "auto")]
    encoder_dtype: String,
    /// Seed of the shuffle (of a cache's rows, or of the sequences streamed from --data) and
    /// of the SAE initialisation (the i-th hook point's SAE is initialised with seed + i).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Rows held in memory to shuffle a cache.
    #[arg(long, default_value_t = 1 << 17)]
    shuffle_buffer: usize,
    /// Sequences of --data each one is drawn from at random, the next ones in data order (1:
    /// read in data order, as when more data is to be added to an interrupted run).
    #[arg(long, default_value_t = hooks::data::SHUFFLED_SEQUENCES)]
    shuffle_sequences: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelOpts,
    #[command(flatten)]
    data: DataOpts,
    /// Folder of SAEs as `sae train` writes it (OUTPUT/<hookpoint>/cfg.json ...), or a
    /// hub repository of sparsify SAEs (EleutherAI/sae-pythia-70m-32k; without --hookpoints,
    /// every SAE it holds).
    #[arg(long)]
    sae: PathBuf,
    /// Hub revision of a --sae repository (default main).
    #[arg(long)]
    sae_revision: Option<String>,
    /// Hook points to evaluate (default: every SAE in the folder).
    #[arg(long)]
    hookpoints: Option<String>,
    /// Tokens to evaluate, rounded up to whole sequences of --seq-len.
    #[arg(long, default_value_t = 1 << 16)]
    tokens: u64,
    /// Leave the first N positions of every sequence out of the SAE metrics and out of the
    /// splice (the model keeps its own activations there, in the SAE and zero-ablated runs
    /// alike); for SAEs trained with `sae train --skip-first-positions N`.
    #[arg(long, default_value_t = 0)]
    skip_first_positions: usize,
    /// Leave the rows of these token ids, comma separated, out of the SAE metrics and out of
    /// the splice, as --skip-first-positions does for positions; for SAEs trained with
    /// `sae train --exclude-tokens`.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    exclude_tokens: Vec<u32>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
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
        Command::Train(args) => train_command(*args),
        Command::Eval(args) => eval_command(*args).map(|_| ()),
    }
}

/// The hook points of a cache, or those named in `list` (which the cache must have).
fn cache_points(cache: &ActivationCache, list: Option<&str>) -> Result<Vec<(HookPoint, String)>> {
    let cached: Vec<(HookPoint, String)> = cache
        .hook_points()
        .iter()
        .copied()
        .zip(cache.manifest().settings.hook_points.iter().cloned())
        .collect();
    let Some(list) = list else {
        return Ok(cached);
    };
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let point =
            HookPoint::parse(name).with_context(|| format!("unknown hook point '{name}'"))?;
        let found = cached.iter().find(|(p, _)| *p == point).with_context(|| {
            format!(
                "the activation cache has no hook point '{name}' (it has {})",
                cache.manifest().settings.hook_points.join(", ")
            )
        })?;
        if !out.contains(found) {
            out.push(found.clone());
        }
    }
    if out.is_empty() {
        bail!("no hook points given");
    }
    Ok(out)
}

/// The SAE in `dir` to train further on `width`-wide activations (`--finetune`), checked
/// against the run: its width, and whether it is a transcoder as `--transcode` says.
fn pretrained(dir: &Path, width: usize, transcode: bool, device: &Device) -> Result<Sae> {
    let sae = Sae::load(dir, device).with_context(|| format!("--finetune: {}", dir.display()))?;
    if sae.d_in() != width {
        bail!(
            "--finetune: the SAE in {} reads {}-wide activations; this hook point's are {width} wide",
            dir.display(),
            sae.d_in()
        );
    }
    if sae.config().transcode != transcode {
        bail!(
            "--finetune: the SAE in {} is {}; {} --transcode",
            dir.display(),
            if transcode {
                "an autoencoder, not a transcoder"
            } else {
                "a transcoder"
            },
            if transcode { "leave out" } else { "add" }
        );
    }
    Ok(sae)
}

/// Warns of the model and data options that training on an activation cache does not use
/// (the cache fixed them when it was made), where they were given other than their defaults.
fn warn_unused_with_activations(args: &TrainArgs) {
    let (model, data) = (&args.model, &args.data);
    let unused: Vec<String> = [
        (
            model.dtype != DEFAULT_DTYPE,
            format!("--dtype {}", model.dtype),
        ),
        (
            data.seq_len != DEFAULT_SEQ_LEN,
            format!("--seq-len {}", data.seq_len),
        ),
        (
            data.forward_batch != DEFAULT_FORWARD_BATCH,
            format!("--forward-batch {}", data.forward_batch),
        ),
        (data.format.is_some(), "--format".to_string()),
        (
            data.text_field != "text",
            format!("--text-field {}", data.text_field),
        ),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{} not used: training reads --activations, whose sequences, dtype and data were \
             fixed when the cache was made",
            unused.join(", ")
        );
    }
}

/// Width of each hook point's activations; an attention pattern, which has no row per
/// token, is refused.
fn model_widths(model: &Model, points: &[HookPoint]) -> Result<Vec<usize>> {
    points
        .iter()
        .map(|p| Ok(model.config().width(*p)?))
        .collect()
}

fn train_command(mut args: TrainArgs) -> Result<()> {
    if let Some(dir) = &args.finetune {
        crate::hub::check_sae_source(dir).context("--finetune")?;
    }
    if args.activations.is_some() {
        if !args.data.data.is_empty() {
            bail!("give --data (with --model) or --activations, not both");
        }
        warn_unused_with_activations(&args);
    } else if !args.data.data.is_empty() {
        args.data.spec().check()?;
    }
    let model = args.model.load()?;
    if let Some(dir) = &args.finetune {
        // A hub repository of SAEs: fetch those named (every one without --hookpoints), by
        // their folder names (patterns and aliases resolved through the model).
        let named: Option<Vec<String>> = match (&args.hookpoints, &model) {
            (Some(list), Some(model)) => Some(
                model
                    .hook_points_from_list(list)?
                    .into_iter()
                    .map(|p| model.hook_name(p))
                    .collect(),
            ),
            (Some(list), None) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            (None, _) => None,
        };
        args.finetune = Some(crate::hub::sae_root(
            dir,
            args.sae_revision.as_deref(),
            named.as_deref(),
        )?);
    }
    if let (None, Some(dir)) = (&args.hookpoints, &args.finetune) {
        // The SAEs to train further name their hook points.
        args.hookpoints = Some(crate::sae_folder_names(dir)?.join(","));
    }
    let device = match &model {
        Some(model) => model.device().clone(),
        None => hooks::parse_device(&args.model.device)?,
    };
    let (points, names, widths, cache) = match (&args.activations, &model) {
        (Some(dir), _) => {
            let cache = ActivationCache::open(dir)?;
            let mut chosen = cache_points(&cache, args.hookpoints.as_deref())?;
            if args.transcode && args.hookpoints.is_none() {
                chosen.retain(|(p, _)| matches!(p, HookPoint::Mlp(_)));
                if chosen.is_empty() {
                    bail!(
                        "--transcode: the activation cache has no MLP hook point (layers.N.mlp); it has {}",
                        cache.manifest().settings.hook_points.join(", ")
                    );
                }
            }
            let settings = &cache.manifest().settings;
            let widths = chosen
                .iter()
                .map(|(_, name)| {
                    let i = settings.hook_points.iter().position(|n| n == name).unwrap();
                    settings.widths[i]
                })
                .collect();
            let (points, names) = chosen.into_iter().unzip();
            (points, names, widths, Some(cache))
        }
        (None, Some(model)) => {
            let list = match (args.hookpoints.as_deref(), args.transcode) {
                (Some(list), _) => list,
                (None, true) => bail!("give --hookpoints: the MLPs to transcode (layers.3.mlp)"),
                // sparsify's default: the residual stream after every layer.
                (None, false) => "layers.*",
            };
            let points = model.hook_points_from_list(list)?;
            let names = points.iter().map(|p| model.hook_name(*p)).collect();
            let widths = model_widths(model, &points)?;
            (points, names, widths, None)
        }
        (None, None) => bail!("give --model with --data, or --activations"),
    };
    let names: Vec<String> = names;
    let widths: Vec<usize> = widths;
    // Each transcoder's input point (checked here, so a bad point fails before any work).
    let mut streamed = points.clone();
    if args.transcode {
        for (&point, name) in points.iter().zip(&names) {
            let input = crate::train::transcoder_input(point, name)?;
            if let Some(cache) = &cache {
                if !cache.hook_points().contains(&input) {
                    bail!(
                        "--transcode: the activation cache has no '{}' (the input of '{}'); cache both with `hooks cache --hookpoints {},{}`",
                        input,
                        point,
                        input,
                        point
                    );
                }
            }
            if !streamed.contains(&input) {
                streamed.push(input);
            }
        }
    }
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let seq_len = cache
        .as_ref()
        .map_or(args.data.seq_len, |c| c.manifest().settings.data.seq_len);
    if args.batch_size < seq_len {
        // sparsify's --batch_size counts sequences; a value typed in that sense lands here.
        tracing::warn!(
            "--batch-size counts tokens per step (sparsify's counts sequences): {} tokens is less \
             than one sequence of {seq_len}",
            args.batch_size
        );
    }
    let skip = args.skip_first_positions;
    let steps = match (args.steps, args.max_tokens, &cache) {
        (Some(steps), _, _) => steps,
        (None, Some(tokens), _) => tokens / args.batch_size as u64,
        (None, None, Some(_)) if !args.exclude_tokens.is_empty() => {
            bail!("with --exclude-tokens, give --steps or --max-tokens (how many rows the cache keeps is not known before reading it)")
        }
        (None, None, Some(cache)) => {
            let manifest = cache.manifest();
            let seq_len = manifest.settings.data.seq_len;
            check_skip(skip, seq_len)?;
            manifest.chunks * (seq_len - skip) as u64 / args.batch_size as u64
        }
        (None, None, None) => bail!("give --steps or --max-tokens"),
    };
    if steps == 0 {
        bail!(
            "no whole step of --batch-size {} tokens to train on",
            args.batch_size
        );
    }
    let Some(needed) = steps.checked_mul(args.batch_size as u64) else {
        bail!(
            "{steps} steps of --batch-size {} tokens is more tokens than can be counted",
            args.batch_size
        );
    };
    if args.k_decay_steps >= steps {
        tracing::warn!(
            "--k-decay-steps {} is not less than the run's {steps} steps: its last step will \
             not have decayed to --k {}",
            args.k_decay_steps,
            args.k
        );
    }
    let options = TrainOptions {
        steps,
        tokens_per_step: args.batch_size,
        chunk_tokens: args.chunk_tokens,
        lr: args.lr,
        warmup_steps: args.lr_warmup_steps,
        dead_feature_threshold: args.dead_feature_threshold,
        auxk_alpha: args.auxk_alpha,
        checkpoint_every: args.checkpoint_every,
        skip_first_positions: skip,
        encoder_dtype: EncoderDtype::parse(&args.encoder_dtype)?,
        finetune: args.finetune.is_some(),
        exclude_tokens: {
            // One order for the checkpoint's record: `13,0` resumes a run of `0,13`.
            let mut ids = args.exclude_tokens.clone();
            ids.sort_unstable();
            ids.dedup();
            ids
        },
        optimizer: args.optimizer,
        k_decay_steps: args.k_decay_steps,
    };
    // The configuration of a new SAE reading `d`-wide activations.
    let new_config = |d: usize| {
        let mut config = SaeConfig::new(d, args.num_latents.unwrap_or(0), args.k);
        config.expansion_factor = args.expansion_factor;
        config.multi_topk = args.multi_topk;
        config.transcode = args.transcode;
        config.skip_connection = args.skip_connection;
        config
    };
    if device.is_cpu() && args.finetune.is_none() {
        // Encoder and decoder, their gradients and the optimizer's two moments: 8 floats
        // per weight.
        let weights = widths.iter().try_fold(0u64, |sum, &d| {
            sum.checked_add((d as u64).checked_mul(new_config(d).latents() as u64)?)
        });
        hooks::memory::check_fits(
            &format!("training SAEs of d_in {widths:?} with these latents"),
            weights.and_then(|w| w.checked_mul(8 * 4)),
            "lower --expansion-factor or --num-latents",
        )?;
    }
    let mut saes = widths
        .iter()
        .zip(&names)
        .enumerate()
        .map(|(i, (&d, name))| match &args.finetune {
            Some(dir) => pretrained(&dir.join(name), d, args.transcode, &device),
            None => Ok(Sae::new(
                new_config(d),
                args.seed.wrapping_add(i as u64),
                &device,
            )?),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut source: Box<dyn ActivationSource + '_> = match (&cache, &model) {
        (Some(cache), _) => Box::new(cache.reader(
            args.batch_size,
            ReadOrder::Shuffled {
                seed: args.seed,
                buffer_tokens: args.shuffle_buffer,
            },
        )?),
        (None, Some(model)) => {
            // With excluded tokens, how many chunks give `needed` rows is not known ahead.
            let rows = args.exclude_tokens.is_empty().then_some(needed);
            let shuffle = (args.seed, args.shuffle_sequences);
            Box::new(args.data.stream(model, streamed, rows, skip, shuffle)?)
        }
        (None, None) => unreachable!(),
    };
    let checkpoints: Vec<PathBuf> = names
        .iter()
        .map(|n| args.output.join("checkpoints").join(n))
        .collect();
    for (name, dir) in names.iter().zip(&checkpoints) {
        let trained = args.output.join(name).join("cfg.json");
        hooks::checkpoint::check_output_free(&trained, &crate::train::checkpoint_path(dir))?;
        // Made now, so that an output that cannot be written fails before the first step.
        std::fs::create_dir_all(dir).map_err(|e| hooks::Error::io(dir, e))?;
    }
    let bar = hooks::progress::bar(true, Some(steps), "steps");
    let started = std::time::Instant::now();
    let mut clock = hooks::progress::StepClock::new();
    let mut new_steps = 0u64;
    let last = points.len() - 1;
    let histories = train_many(
        &mut saes,
        source.as_mut(),
        &points,
        &options,
        Some(&checkpoints),
        |i, r| {
            if i == 0 {
                new_steps += 1;
            }
            if i == last {
                bar.set_position(r.step);
                clock.step_done();
            }
            bar.set_message(format!("{} FVU {:.4}", names[i], r.fvu));
            if r.step == 1 || r.step % 100 == 0 || r.step == steps {
                tracing::info!(
                    "step {} {}: FVU {:.4} L0 {:.1} dead {:.2}% lr {:.2e}{}",
                    r.step,
                    names[i],
                    r.fvu,
                    r.l0,
                    100.0 * r.dead_fraction,
                    r.lr,
                    r.matrix_lr
                        .map(|m| format!(" (matrices {m:.2e})"))
                        .unwrap_or_default()
                        + &r.k.map(|k| format!(" k {k}")).unwrap_or_default()
                );
            }
        },
    )
    .with_context(|| format!("training SAEs into {}", args.output.display()))?;
    bar.finish_and_clear();
    device.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    let steady = clock.summary(args.batch_size as u64);
    for ((sae, name), (history, ckpt)) in saes
        .iter()
        .zip(&names)
        .zip(histories.iter().zip(&checkpoints))
    {
        sae.save(&args.output.join(name))?;
        hooks::atomic::write_json(&ckpt.join("history.json"), history)?;
    }
    println!(
        "trained {} SAE(s) ({} latents, k {}) for {steps} steps of {} tokens{} -> {}",
        saes.len(),
        saes[0].num_latents(),
        saes[0].k(),
        args.batch_size,
        match skip {
            0 => String::new(),
            n => format!(" (the first {n} positions of each sequence left out)"),
        },
        args.output.display()
    );
    if new_steps > 0 {
        println!(
            "this run: {new_steps} steps in {seconds:.1} s ({:.0} tokens/s)",
            (new_steps * args.batch_size as u64) as f64 / seconds.max(1e-9)
        );
        if let Some(steady) = steady {
            println!("{steady}");
        }
    } else {
        println!(
            "already trained with these settings: nothing to do (the data is not read again to \
             compare it with the training data; delete the output folder to start again)"
        );
    }
    println!(
        "{:>24} {:>8} {:>8} {:>8}",
        "hook point", "FVU", "L0", "dead %"
    );
    for (name, history) in names.iter().zip(&histories) {
        let r: &StepRecord = history.last().expect("at least one step");
        println!(
            "{name:>24} {:>8.4} {:>8.2} {:>8.2}",
            r.fvu,
            r.l0,
            100.0 * r.dead_fraction
        );
    }
    Ok(())
}

/// Evaluation of one SAE spliced into the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaeEval {
    /// Hook point.
    pub hookpoint: String,
    /// Fraction of variance unexplained over all evaluated tokens.
    pub fvu: f64,
    /// `1 − FVU`.
    pub explained_variance: f64,
    /// Mean number of active (positive) latents per token.
    pub l0: f64,
    /// Percentage of latents that never fired on the evaluated tokens.
    pub dead_pct: f64,
    /// Next-token cross-entropy (nats) with the SAE's reconstruction in place.
    pub ce_sae: f64,
    /// Next-token cross-entropy with the hook point zero-ablated.
    pub ce_zero: f64,
    /// `(CE_zero − CE_sae) / (CE_zero − CE_clean)`.
    pub ce_loss_recovered: f64,
}

/// The result of `sae eval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Tokens run through the model (the language-model losses cover all of them).
    pub tokens: u64,
    /// Positions at the start of each sequence left out of the SAE metrics and the splice
    /// (`--skip-first-positions`).
    #[serde(default)]
    pub skip_first_positions: usize,
    /// Token ids whose rows are left out of the SAE metrics and the splice
    /// (`--exclude-tokens`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude_tokens: Vec<u32>,
    /// The model's own next-token cross-entropy (nats).
    pub ce_clean: f64,
    /// One row per SAE.
    pub saes: Vec<SaeEval>,
}

impl EvalReport {
    /// A readable table.
    pub fn table(&self) -> String {
        let mut skipped = match self.skip_first_positions {
            0 => String::new(),
            n => format!(" (SAE metrics and splice from position {n} on)"),
        };
        if !self.exclude_tokens.is_empty() {
            skipped += &format!(" (tokens {:?} left out)", self.exclude_tokens);
        }
        let mut out = format!(
            "{} tokens{skipped}; clean CE {:.4} nats\n{:>24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n",
            self.tokens,
            self.ce_clean,
            "hook point",
            "FVU",
            "EV",
            "L0",
            "dead %",
            "CE sae",
            "CE zero",
            "CE recov"
        );
        for s in &self.saes {
            out += &format!(
                "{:>24} {:>8.4} {:>8.4} {:>8.2} {:>8.2} {:>8.4} {:>8.4} {:>9.4}\n",
                s.hookpoint,
                s.fvu,
                s.explained_variance,
                s.l0,
                s.dead_pct,
                s.ce_sae,
                s.ce_zero,
                s.ce_loss_recovered
            );
        }
        out
    }
}

/// Sum of next-token cross-entropies of `logits [b, s, v]` for `ids [b, s]`, and the count.
fn ce_sum(logits: &Tensor, ids: &Tensor) -> Result<(f64, usize)> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        return Ok((0.0, 0));
    }
    let logits = logits
        .narrow(1, 0, s - 1)?
        .to_dtype(DType::F32)?
        .reshape((b * (s - 1), v))?;
    let targets = ids.narrow(1, 1, s - 1)?.reshape((b * (s - 1), 1))?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + &max)?;
    let picked = logits.gather(&targets.contiguous()?, D::Minus1)?;
    let total = (lse - picked)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((total, b * (s - 1)))
}

#[derive(Default)]
struct Sums {
    l2: f64,
    /// Each column's mean over the first rows, which the variance sums are taken about:
    /// sums about a point near the mean do not cancel when the rows hardly vary.
    shift: Option<Tensor>,
    /// Column sums of the rows less `shift`.
    sum: Vec<f64>,
    /// Sum of the squares of the rows less `shift`.
    sum_sq: f64,
    active: f64,
    fired: Vec<bool>,
    ce_sae: f64,
    ce_zero: f64,
}

fn eval_command(args: EvalArgs) -> Result<EvalReport> {
    if let Some(path) = &args.json {
        hooks::atomic::check_target(path)?;
    }
    const NEEDS_MODEL: &str = "give --model: evaluation runs the model";
    anyhow::ensure!(args.model.model.is_some(), NEEDS_MODEL);
    crate::hub::check_sae_source(&args.sae).context("--sae")?;
    args.data.spec().check()?;
    let model = args.model.load()?.context(NEEDS_MODEL)?;
    let mut args = args;
    let named = match &args.hookpoints {
        Some(list) => Some(model.hook_points_from_list(list)?),
        None => None,
    };
    let names: Option<Vec<String>> = named
        .as_ref()
        .map(|points| points.iter().map(|p| model.hook_name(*p)).collect());
    args.sae = crate::hub::sae_root(&args.sae, args.sae_revision.as_deref(), names.as_deref())?;
    let points = match named {
        Some(points) => points,
        None => {
            let mut found = crate::sae_folder_names(&args.sae)?
                .iter()
                .map(|name| model.hook_point(name))
                .collect::<hooks::Result<Vec<_>>>()?;
            found.sort();
            found
        }
    };
    let saes: Vec<Sae> = points
        .iter()
        .map(|p| {
            let dir = sae_dir(&args.sae, &model, *p);
            Sae::load(&dir, model.device()).with_context(|| format!("loading {}", dir.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    // Each SAE's input point, checked against the model; a transcoder's differs from its own.
    let inputs: Vec<Option<HookPoint>> = saes
        .iter()
        .zip(&points)
        .map(|(sae, &point)| -> Result<Option<HookPoint>> {
            let input = sae.input_point(&model, point).with_context(|| {
                format!(
                    "the SAE for {} in {}",
                    model.hook_name(point),
                    sae_dir(&args.sae, &model, point).display()
                )
            })?;
            Ok((input != point).then_some(input))
        })
        .collect::<Result<_>>()?;
    let skip = args.skip_first_positions;
    check_skip(skip, args.data.seq_len)?;
    let chunks = args.data.spec().chunks(model.tokenizer().ok())?;
    let mut chunks = chunks;
    let max_chunks = args.tokens.div_ceil(args.data.seq_len.max(1) as u64);
    let mut sums: Vec<Sums> = saes
        .iter()
        .map(|s| Sums {
            sum: vec![0.0; s.d_in()],
            fired: vec![false; s.num_latents()],
            ..Sums::default()
        })
        .collect();
    let (mut ce_clean, mut ce_count, mut tokens, mut done_chunks) = (0.0, 0usize, 0u64, 0u64);
    // Rows the SAE metrics cover (positions from `skip` on, tokens not excluded).
    let mut rows_evaluated = 0u64;
    let exclude = &args.exclude_tokens;
    let bar = hooks::progress::bar(true, Some(args.tokens), "tokens");
    while done_chunks < max_chunks {
        let want = (max_chunks - done_chunks).min(args.data.forward_batch.max(1) as u64);
        let batch = chunks.next_chunks(want as usize)?;
        if batch.is_empty() {
            break;
        }
        done_chunks += batch.len() as u64;
        let (b, s) = (batch.len(), batch[0].len());
        let ids = Tensor::from_vec(batch.concat(), (b, s), model.device())?;
        let mut hooks = Hooks::new().capture(points.iter().chain(inputs.iter().flatten()).copied());
        let out = model
            .forward(&ids, &mut hooks)
            .map_err(|e| chunks.locate_token_error(e, b))?;
        let logits = out.logits.context("the model returned no logits")?;
        let (ce, count) = ce_sum(&logits, &ids)?;
        ce_clean += ce;
        ce_count += count;
        tokens += (b * s) as u64;
        // Which rows the SAE covers: `keep` (row indices) and `mask` ([b, s, 1], 1 there).
        let row_kept: Vec<u8> = batch
            .iter()
            .flat_map(|sequence| {
                sequence
                    .iter()
                    .enumerate()
                    .map(|(pos, id)| u8::from(pos >= skip && !exclude.contains(id)))
            })
            .collect();
        let keep: Vec<u32> = (0..b * s)
            .filter(|&r| row_kept[r] == 1)
            .map(|r| r as u32)
            .collect();
        rows_evaluated += keep.len() as u64;
        let keep = Tensor::new(keep.as_slice(), model.device())?;
        let mask = Tensor::from_vec(row_kept, (b, s, 1), model.device())?;
        for (((point, sae), sums), input) in
            points.iter().zip(&saes).zip(sums.iter_mut()).zip(&inputs)
        {
            // The metrics (the splice below runs even when every row is left out: the
            // model's losses cover every token).
            if keep.dim(0)? > 0 {
                let rows = |p: &HookPoint| -> Result<Tensor> {
                    let x = out.captures[p].to_dtype(DType::F32)?;
                    let d = x.dim(2)?;
                    Ok(x.reshape((b * s, d))?.index_select(&keep, 0)?)
                };
                let flat = rows(point)?;
                let fwd = match input {
                    Some(input) => sae.forward_target(&rows(input)?, &flat)?,
                    None => sae.forward(&flat)?,
                };
                sums.l2 += crate::sae::sum_of_squares(&(&flat - &fwd.x_hat)?)?;
                let wide = flat.to_dtype(DType::F64)?;
                let shift = match &sums.shift {
                    Some(shift) => shift.clone(),
                    None => sums.shift.insert(wide.mean_keepdim(0)?).clone(),
                };
                let centred = wide.broadcast_sub(&shift)?;
                let col: Vec<f64> = centred.sum(0)?.to_vec1()?;
                for (acc, v) in sums.sum.iter_mut().zip(col) {
                    *acc += v;
                }
                sums.sum_sq += centred.sqr()?.sum_all()?.to_scalar::<f64>()?;
                let acts: Vec<f32> = fwd.top_acts.flatten_all()?.to_vec1()?;
                let indices: Vec<u32> = fwd.top_indices.flatten_all()?.to_vec1()?;
                for (a, i) in acts.iter().zip(&indices) {
                    if *a > 0.0 {
                        sums.active += 1.0;
                        sums.fired[*i as usize] = true;
                    }
                }
            }
            // The SAE's reconstruction (a transcoder's prediction from the module's input,
            // seen earlier in the same pass) in place of the activations.
            let seen: std::cell::RefCell<Option<Tensor>> = Default::default();
            let mut hooks = Hooks::new();
            if let Some(input) = input {
                hooks = hooks.replace(*input, |x: &Tensor| {
                    *seen.borrow_mut() = Some(x.clone());
                    Ok(None)
                });
            }
            // Rows the SAE does not cover keep the model's own activations.
            let only_kept = |x: &Tensor, replacement: Tensor| -> hooks::Result<Tensor> {
                let replacement = replacement.to_dtype(x.dtype())?;
                Ok(mask.broadcast_as(x.shape())?.where_cond(&replacement, x)?)
            };
            let mut hooks = hooks.replace(*point, |x: &Tensor| {
                let (n, len, d) = x.dims3()?;
                let flat = |t: &Tensor| t.reshape((n * len, d));
                let source = seen.borrow().clone().unwrap_or_else(|| x.clone());
                let recon = sae
                    .forward_target(&flat(&source)?, &flat(x)?)
                    .map_err(|e| hooks::Error::InvalidArgument(format!("SAE: {e}")))?;
                Ok(Some(only_kept(x, recon.x_hat.reshape((n, len, d))?)?))
            });
            let logits = model.forward(&ids, &mut hooks)?.logits.unwrap();
            sums.ce_sae += ce_sum(&logits, &ids)?.0;
            let mut hooks = Hooks::new().replace(*point, |x: &Tensor| {
                Ok(Some(only_kept(x, x.zeros_like()?)?))
            });
            let logits = model.forward(&ids, &mut hooks)?.logits.unwrap();
            sums.ce_zero += ce_sum(&logits, &ids)?.0;
        }
        bar.set_position(tokens);
    }
    bar.finish_and_clear();
    if tokens == 0 || ce_count == 0 {
        bail!("no tokens to evaluate");
    }
    if rows_evaluated == 0 {
        bail!(
            "every one of the {tokens} tokens was left out (--skip-first-positions {skip}, --exclude-tokens {exclude:?}): no rows for the SAE metrics"
        );
    }
    let n = rows_evaluated as f64;
    let cc = ce_count as f64;
    let ce_clean = ce_clean / cc;
    let rows = points
        .iter()
        .zip(&sums)
        .map(|(point, s)| {
            let mean_sq: f64 = s.sum.iter().map(|v| v * v).sum::<f64>() / n;
            let total_variance = s.sum_sq - mean_sq;
            let fvu = s.l2 / total_variance;
            if total_variance.is_nan() || total_variance <= 0.0 {
                tracing::warn!(
                    "{}: the activations do not vary over the {n} rows evaluated (total \
                     variance {total_variance:.3e}), so the FVU ({fvu}) means nothing; \
                     evaluate on more varied data",
                    model.hook_name(*point)
                );
            }
            let (ce_sae, ce_zero) = (s.ce_sae / cc, s.ce_zero / cc);
            let dead = s.fired.iter().filter(|f| !**f).count();
            SaeEval {
                hookpoint: model.hook_name(*point),
                fvu,
                explained_variance: 1.0 - fvu,
                l0: s.active / n,
                dead_pct: 100.0 * dead as f64 / s.fired.len() as f64,
                ce_sae,
                ce_zero,
                ce_loss_recovered: (ce_zero - ce_sae) / (ce_zero - ce_clean),
            }
        })
        .collect();
    let report = EvalReport {
        tokens,
        skip_first_positions: skip,
        exclude_tokens: args.exclude_tokens.clone(),
        ce_clean,
        saes: rows,
    };
    print!("{}", report.table());
    if let Some(path) = &args.json {
        hooks::atomic::write_json(path, &report)?;
        println!("report written to {}", path.display());
    }
    Ok(report)
}

/// The folder of the SAE for `point` under `root`: the model's name for the point, or any
/// alias of it that exists.
fn sae_dir(root: &Path, model: &Model, point: HookPoint) -> PathBuf {
    let canonical = root.join(model.hook_name(point));
    if canonical.is_dir() {
        return canonical;
    }
    let plain = root.join(point.to_string());
    if plain.is_dir() {
        plain
    } else {
        canonical
    }
}
