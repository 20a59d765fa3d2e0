//! The `lens` command line: `lens train` and `lens eval`. [`run`] takes argv so the cargo
//! binary and the Python console script share one implementation.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hooks::activations::ReadOrder;
use hooks::cli::ModelArgs;

use crate::eval::evaluate;
use crate::train::{checkpoint_dir, train, LossKind, OptimizerKind, TrainOptions};
use crate::{LensData, TunedLens};

/// Train and evaluate tuned lenses and the logit lens.
#[derive(Parser, Debug)]
#[command(name = "lens", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a tuned lens (one affine translator per layer) with the reference recipe; writes
    /// OUTPUT/config.json + params.safetensors. Re-running the same command resumes from the
    /// checkpoint in OUTPUT/training.
    Train(TrainArgs),
    /// Evaluate the logit lens (and a tuned lens) per layer: cross-entropy, entropy, KL to the
    /// model's output and top-1 agreement, in nats and bits per byte.
    Eval(EvalArgs),
}

#[derive(Args, Debug)]
struct Source {
    /// Text/token data to run the model over (see --format); or use --activations.
    #[arg(long, num_args = 1.., conflicts_with = "activations")]
    data: Vec<PathBuf>,
    /// An activation cache made by `hooks cache` with embed and every layers.{i}.
    #[arg(long)]
    activations: Option<PathBuf>,
    /// Format of the data files (text, text-file, jsonl, parquet, npy, bin).
    #[arg(long)]
    format: Option<String>,
    /// JSON field / parquet column with the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Sequences per forward pass of the model.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: Source,
    /// Output folder for the lens.
    #[arg(long, short)]
    output: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 250)]
    steps: u64,
    /// Tokens per step (gradient accumulation when larger than a batch).
    #[arg(long, default_value_t = 1 << 18)]
    tokens_per_step: usize,
    /// Learning rate in the reference's convention (SGD: step = lr x (1 - momentum); Adam: 1e-3 x lr).
    #[arg(long, default_value_t = 1.0)]
    lr: f64,
    /// Optimiser: sgd (Nesterov) or adam (AMSGrad).
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay (coupled, toward the identity translator).
    #[arg(long, default_value_t = 1e-3)]
    weight_decay: f64,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Objective: kl (against the model's output) or ce (next token).
    #[arg(long, default_value = "kl")]
    loss: String,
    /// Shuffle seed when reading an activation cache.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Tokens decoded at once (memory is about 5 x this x vocab floats).
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
    /// Checkpoint every N steps.
    #[arg(long, default_value_t = 25)]
    checkpoint_every: u64,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: Source,
    /// A tuned lens folder (ours or tuned-lens's params.pt); without it only the logit lens.
    #[arg(long)]
    lens: Option<PathBuf>,
    /// Tokens to evaluate.
    #[arg(long, default_value_t = 1 << 18)]
    tokens: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tokens decoded at once.
    #[arg(long, default_value_t = 256)]
    chunk_tokens: usize,
}

/// Parses argv (program name first) and runs the command.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    hooks::cli::init_logging();
    match cli.command {
        Command::Train(args) => train_command(args),
        Command::Eval(args) => eval_command(args),
    }
}

impl Source {
    fn lens_data(&self) -> LensData {
        LensData {
            data: self.data.clone(),
            activations: self.activations.clone(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            seq_len: self.seq_len,
            batch_size: self.batch_size,
        }
    }
}

fn train_command(args: TrainArgs) -> Result<()> {
    let model = args.model.load()?;
    let options = TrainOptions {
        steps: args.steps,
        tokens_per_step: args.tokens_per_step,
        lr: args.lr,
        optimizer: match args.optimizer.as_str() {
            "sgd" => OptimizerKind::Sgd,
            "adam" => OptimizerKind::Adam,
            other => anyhow::bail!("unknown optimizer '{other}' (expected sgd or adam)"),
        },
        momentum: args.momentum,
        weight_decay: args.weight_decay,
        clip: args.clip,
        loss: match args.loss.as_str() {
            "kl" => LossKind::Kl,
            "ce" => LossKind::Ce,
            other => anyhow::bail!("unknown loss '{other}' (expected kl or ce)"),
        },
        seq_len: args.source.seq_len,
        chunk_tokens: args.chunk_tokens,
        checkpoint_every: args.checkpoint_every,
    };
    // Shuffled rows would break the sequences next-token targets need.
    let order = match options.loss {
        LossKind::Kl => ReadOrder::Shuffled {
            seed: args.seed,
            buffer_tokens: 1 << 16,
        },
        LossKind::Ce => ReadOrder::Sequential,
    };
    let needed = options.steps * options.tokens_per_step as u64;
    let mut source = args.source.lens_data().open(&model, order, Some(needed))?;
    let mut lens = TunedLens::for_model(&model)?;
    let ckpt = checkpoint_dir(&args.output);
    std::fs::create_dir_all(&ckpt).with_context(|| format!("creating {}", ckpt.display()))?;
    let bar = hooks::progress::bar(true, Some(options.steps), "steps");
    let history = train(
        &mut lens,
        &model.unembedding(),
        source.as_mut(),
        &options,
        Some(&ckpt),
        |r| {
            bar.set_position(r.step);
            let mean = r.loss.iter().sum::<f64>() / r.loss.len() as f64;
            bar.set_message(format!("mean loss {mean:.4}"));
            if r.step == 1 || r.step % 10 == 0 {
                tracing::info!(
                    "step {} mean loss {mean:.4} grad norm {:.3} lr {:.4}",
                    r.step,
                    r.grad_norm,
                    r.lr
                );
            }
            Ok(())
        },
    )
    .with_context(|| format!("training a tuned lens for {}", model.origin()))?;
    bar.finish_and_clear();
    lens.save(&args.output)?;
    hooks::atomic::write_json(&ckpt.join("history.json"), &history)?;
    let (first, last) = (&history[0], &history[history.len() - 1]);
    println!(
        "trained a tuned lens for {} in {} steps -> {}",
        model.origin(),
        history.len(),
        args.output.display()
    );
    println!("loss per layer (nats), step 1 -> step {}:", last.step);
    for (layer, (a, b)) in first.loss.iter().zip(&last.loss).enumerate() {
        println!("  layer {layer:>3}: {a:.4} -> {b:.4}");
    }
    Ok(())
}

fn eval_command(args: EvalArgs) -> Result<()> {
    let model = args.model.load()?;
    let lens = match &args.lens {
        Some(dir) => {
            let lens = TunedLens::load(dir, model.device())?;
            lens.check_model(&model)?;
            Some(lens)
        }
        None => None,
    };
    let data = args.source.lens_data();
    let mut source = data.open(&model, ReadOrder::Sequential, Some(args.tokens))?;
    let layers = model.config().num_layers();
    let mut report = evaluate(
        lens.as_ref(),
        &model.unembedding(),
        layers,
        source.as_mut(),
        args.source.seq_len,
        args.tokens,
        args.chunk_tokens,
    )?;
    report.nats_to_bits_per_byte = data.nats_to_bits_per_byte(&model, report.tokens)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        hooks::atomic::write_json(path, &report)?;
        println!("report written to {}", path.display());
    }
    Ok(())
}
