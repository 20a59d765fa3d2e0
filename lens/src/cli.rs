//! The `lens` command line: `lens train`, `lens eval`, `lens sweep` (lenses across training
//! checkpoints) and `lens plot` (prediction trajectories, sweep figures). [`run`] takes argv so the cargo
//! binary and the Python console script share one implementation.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hooks::activations::ReadOrder;
use hooks::cli::ModelArgs;

use crate::eval::evaluate;
use crate::plot::{plot_trajectory, TrajectoryView};
use crate::sweep::{parse_checkpoints, plot_sweep, run_sweep, SweepLens, SweepOptions};
use crate::train::{prepare_output, train, LossKind, OptimizerKind, TrainOptions};
use crate::trajectory::{PredictionTrajectory, Statistic};
use crate::{DecodeDtype, LensData, TunedLens};

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
    /// model's output and top-1 agreement, in bits per byte where the data's
    /// bytes per token are known, else in nats (the JSON report holds nats and the factor).
    Eval(EvalArgs),
    /// Across training checkpoints: for each revision, load the model, train (or load) a
    /// tuned lens, evaluate it and the logit lens on the same tokens, record a prompt's
    /// prediction trajectory; then draw the figures. Finished checkpoints are reused when
    /// the command is run again; each model is released before the next one loads.
    Sweep(SweepArgs),
    /// Draw figures: a prediction trajectory of a text, or the figures of a finished sweep.
    #[command(subcommand)]
    Plot(PlotCommand),
}

#[derive(Subcommand, Debug)]
enum PlotCommand {
    /// The prediction trajectory of a text: rows are layers (embedding at the bottom, the
    /// model's output on top), columns are tokens, each cell shows the lens's top-1 token
    /// coloured by a statistic. Also exports the numbers as JSON / CSV.
    Trajectory(Box<TrajectoryArgs>),
    /// Redraw the figures of a sweep folder (`lens sweep --output`).
    Sweep(PlotSweepArgs),
}

#[derive(Args, Debug)]
struct TrajectoryArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to trace.
    #[arg(long, conflicts_with = "text_file")]
    text: Option<String>,
    /// A file whose whole content is the text.
    #[arg(long)]
    text_file: Option<PathBuf>,
    /// `logit`, a tuned lens folder, or `pretrained` (tuned-lens's lens for the model, from
    /// its hub collection; `pretrained:<model id>` names another; a folder named `pretrained`
    /// is `./pretrained`).
    #[arg(long, default_value = "logit")]
    lens: String,
    /// Show the difference `--lens` minus this lens (as --lens).
    #[arg(long)]
    minus: Option<String>,
    /// Colour statistics (comma separated): entropy, ce, kl, max_prob, rank, or all.
    #[arg(long, default_value = "entropy")]
    statistic: String,
    /// Figure file (.png or .svg); with several statistics `-{statistic}` is added to the name.
    #[arg(long, short)]
    output: PathBuf,
    /// Also write an SVG next to a PNG (or a PNG next to an SVG).
    #[arg(long)]
    both_formats: bool,
    /// Write the trajectory (of --lens) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the trajectory (of --lens) as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Tokens kept per cell in the JSON.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    top_k: usize,
}

#[derive(Args, Debug)]
struct PlotSweepArgs {
    /// The sweep's output folder.
    dir: PathBuf,
    /// Where the figures go (default: DIR/figures).
    #[arg(long)]
    figures: Option<PathBuf>,
    /// Statistics (comma separated): entropy, ce, kl, max_prob, rank, or all.
    #[arg(long, default_value = "ce,kl,entropy")]
    statistic: String,
    /// Most checkpoints shown side by side in trajectory figures.
    #[arg(long, default_value_t = 6)]
    max_panels: usize,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// Model: hub id or Pythia short name (checkpoints are hub revisions), a local folder
    /// holding one sub-folder per revision (MODEL/step1000/config.json ...), or a single
    /// model folder or .gguf file (one checkpoint: give any one revision name).
    #[arg(long, short)]
    model: String,
    /// Revisions: a comma-separated list (step1000,step8000,step143000), `pythia` (all 154
    /// Pythia steps) or `pythia:A-B` (Pythia's checkpoint steps from A to B: 0, 1, 2, 4, ...,
    /// 512, then every 1000).
    #[arg(long)]
    checkpoints: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Use this tokenizer.json instead of each checkpoint's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output folder.
    #[arg(long, short)]
    output: PathBuf,
    /// `logit` (logit lens only), `tuned` (train a tuned lens per checkpoint on
    /// --train-data), or a folder pattern with `{revision}` to load trained lenses.
    #[arg(long, default_value = "tuned")]
    lens: String,
    /// Evaluation data (the same tokens at every checkpoint).
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// Format of the data files (text, text-file, jsonl, parquet, npy, bin).
    #[arg(long)]
    format: Option<String>,
    /// JSON field / parquet column holding the text (of --data and --train-data).
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Tokens to evaluate, rounded up to whole sequences of --seq-len.
    #[arg(long, default_value_t = 1 << 16)]
    tokens: u64,
    /// Lens training data (for --lens tuned; keep it apart from --data).
    #[arg(long, num_args = 1..)]
    train_data: Vec<PathBuf>,
    /// Lens training steps per checkpoint.
    #[arg(long, default_value_t = 250)]
    train_steps: u64,
    /// Lens training tokens per step.
    #[arg(long, default_value_t = 1 << 18)]
    tokens_per_step: usize,
    /// Sequences of --train-data each one is drawn from at random, shuffled with seed 42 (1:
    /// in data order, as sweeps begun before 2026-12-02 read it).
    #[arg(long, default_value_t = hooks::data::SHUFFLED_SEQUENCES)]
    shuffle_sequences: usize,
    /// A prompt whose prediction trajectory is recorded at every checkpoint.
    #[arg(long)]
    prompt: Option<String>,
    /// Statistics to draw (comma separated): entropy, ce, kl, max_prob, rank, or all.
    #[arg(long, default_value = "ce,kl,entropy")]
    statistic: String,
    /// Most checkpoints shown side by side in trajectory figures.
    #[arg(long, default_value_t = 6)]
    max_panels: usize,
    /// Tokens decoded at once.
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
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
    /// Tokens per sequence (default: an activation cache's own, else 2048).
    #[arg(long)]
    seq_len: Option<usize>,
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
    /// Learning rate in the reference's convention (SGD: step = lr x (1 - momentum); Adam: 1e-3 x lr; Muon: 0.01 x lr).
    #[arg(long, default_value_t = 1.0)]
    lr: f64,
    /// Optimiser: sgd (Nesterov), adam (AMSGrad, with a linear warm-up over min(1000,
    /// steps / 5) steps), or muon (Muon on the matrices, AdamW on the biases: tuned-lens's
    /// PR #141).
    #[arg(long, default_value = "sgd")]
    optimizer: String,
    /// Momentum: SGD's and Muon's, and Adam's first beta.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Weight decay, toward the identity translator: coupled (sgd, adam) or decoupled
    /// (muon). Default 1e-3, or 1e-2 with muon.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Objective: kl (against the model's output) or ce (next token).
    #[arg(long, default_value = "kl")]
    loss: String,
    /// Shuffle seed: of a cache's rows, or of the sequences streamed from --data (a cache is
    /// read in order for --loss ce).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Sequences of --data each one is drawn from at random, the next ones in data order (1:
    /// read in data order, as when more data is to be added to an interrupted run).
    #[arg(long, default_value_t = hooks::data::SHUFFLED_SEQUENCES)]
    shuffle_sequences: usize,
    /// Tokens decoded at once (memory is about 5 x this x vocab floats).
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 25)]
    checkpoint_every: u64,
    /// Precision of the lens logits and of the gradient back through them: bf16 (bf16
    /// inputs, f32 sums, as tuned-lens's autocast), f32, or auto (bf16 on a CUDA GPU and on a
    /// CPU whose bf16 products outrun its f32 ones: Intel AMX, AMD's AVX-512 BF16; f32
    /// elsewhere). Lens parameters and optimiser state are f32.
    #[arg(long, default_value = "auto")]
    decode_dtype: String,
}

#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    source: Source,
    /// A tuned lens folder (ours or tuned-lens's params.pt), or `pretrained` (tuned-lens's
    /// lens for the model, from its hub collection; `pretrained:<model id>` names another; a
    /// folder named `pretrained` is `./pretrained`); without it only the logit lens.
    #[arg(long)]
    lens: Option<String>,
    /// Tokens to evaluate, rounded up to whole sequences of --seq-len (to whole batches of
    /// --batch-size sequences with --activations). The default is a quick look; tuned-lens
    /// evaluates on its whole dataset (about 16M tokens in its docs).
    #[arg(long, default_value_t = 1 << 18)]
    tokens: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Tokens decoded at once.
    #[arg(long, default_value_t = 512)]
    chunk_tokens: usize,
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
        Command::Train(args) => train_command(args),
        Command::Eval(args) => eval_command(args),
        Command::Sweep(args) => sweep_command(args),
        Command::Plot(PlotCommand::Trajectory(args)) => trajectory_command(*args),
        Command::Plot(PlotCommand::Sweep(args)) => {
            let figures = args.figures.unwrap_or_else(|| args.dir.join("figures"));
            let written = plot_sweep(
                &args.dir,
                &figures,
                &parse_statistics(&args.statistic)?,
                args.max_panels,
            )?;
            println!("{} figures written to {}", written.len(), figures.display());
            Ok(())
        }
    }
}

impl Source {
    /// The data, with the sequence length an activation cache was made with unless one is
    /// given.
    fn lens_data(&self) -> Result<LensData> {
        let seq_len = match self.seq_len {
            Some(seq_len) => seq_len,
            None => crate::default_seq_len(self.activations.as_deref())?,
        };
        Ok(LensData {
            data: self.data.clone(),
            activations: self.activations.clone(),
            format: self.format.clone(),
            text_field: self.text_field.clone(),
            seq_len,
            batch_size: self.batch_size,
            shuffle_sequences: hooks::data::SHUFFLED_SEQUENCES,
        })
    }
}

fn train_command(args: TrainArgs) -> Result<()> {
    let optimizer = OptimizerKind::parse(&args.optimizer)?;
    let data = LensData {
        shuffle_sequences: args.shuffle_sequences,
        ..args.source.lens_data()?
    };
    data.check()?;
    let model = args.model.load()?;
    let options = TrainOptions {
        steps: args.steps,
        tokens_per_step: args.tokens_per_step,
        lr: args.lr,
        optimizer,
        momentum: args.momentum,
        weight_decay: args
            .weight_decay
            .unwrap_or(optimizer.default_weight_decay()),
        clip: args.clip,
        loss: match args.loss.as_str() {
            "kl" => LossKind::Kl,
            "ce" => LossKind::Ce,
            other => anyhow::bail!("unknown loss '{other}' (expected kl or ce)"),
        },
        seq_len: data.seq_len,
        chunk_tokens: args.chunk_tokens,
        checkpoint_every: args.checkpoint_every,
        decode_dtype: DecodeDtype::parse(&args.decode_dtype)?,
    };
    let order = data.training_order(options.loss, args.seed);
    options.validate()?;
    let needed = options.total_tokens();
    let mut source = data.open(&model, order, Some(needed))?;
    let mut lens = TunedLens::for_model(&model)?;
    let ckpt = prepare_output(&args.output)?;
    let bar = hooks::progress::bar(true, Some(options.steps), "steps");
    let mut clock = hooks::progress::StepClock::new();
    let history = train(
        &mut lens,
        &model.unembedding(),
        source.as_mut(),
        &options,
        Some(&ckpt),
        |r| {
            bar.set_position(r.step);
            clock.step_done();
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
    model.device().synchronize()?;
    let steady = clock.summary(options.tokens_per_step as u64);
    lens.save(&args.output)?;
    hooks::atomic::write_json(&ckpt.join("history.json"), &history)?;
    let (first, last) = (&history[0], &history[history.len() - 1]);
    println!(
        "trained a tuned lens for {} in {} steps -> {}",
        model.origin(),
        history.len(),
        args.output.display()
    );
    if let Some(steady) = steady {
        println!("{steady}");
    }
    println!("loss per layer (nats), step 1 -> step {}:", last.step);
    for (layer, (a, b)) in first.loss.iter().zip(&last.loss).enumerate() {
        println!("  layer {layer:>3}: {a:.4} -> {b:.4}");
    }
    Ok(())
}

fn eval_command(args: EvalArgs) -> Result<()> {
    if let Some(path) = &args.json {
        hooks::atomic::check_target(path)?;
    }
    let data = args.source.lens_data()?;
    data.check()?;
    let model = args.model.load()?;
    let lens = match &args.lens {
        Some(name) => lens_arg(name, &model)?,
        None => None,
    };
    let mut source = data.open(&model, ReadOrder::Sequential, Some(args.tokens))?;
    let layers = model.config().num_layers();
    let start = std::time::Instant::now();
    let mut report = evaluate(
        lens.as_ref(),
        &model.unembedding(),
        layers,
        source.as_mut(),
        data.seq_len,
        args.tokens,
        args.chunk_tokens,
    )?;
    let seconds = start.elapsed().as_secs_f64();
    tracing::info!(
        "evaluated {} tokens in {seconds:.2} s ({:.1} tokens/s, the model's forward passes included)",
        report.tokens,
        report.tokens as f64 / seconds
    );
    report.nats_to_bits_per_byte = data.nats_to_bits_per_byte(&model, report.tokens)?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        hooks::atomic::write_json(path, &report)?;
        println!("report written to {}", path.display());
    }
    Ok(())
}

/// `entropy,ce` -> statistics; `all` -> every one.
fn parse_statistics(list: &str) -> Result<Vec<Statistic>> {
    if list.trim() == "all" {
        return Ok(Statistic::ALL.to_vec());
    }
    let stats = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Statistic::parse)
        .collect::<crate::Result<Vec<_>>>()?;
    anyhow::ensure!(!stats.is_empty(), "no statistic given");
    Ok(stats)
}

/// `logit` -> none, else a tuned lens folder checked against the model.
fn lens_arg(name: &str, model: &hooks::Model) -> Result<Option<TunedLens>> {
    crate::hub::lens_named(name, model).with_context(|| {
        format!("loading the lens '{name}' (expected 'logit', 'pretrained' or a lens folder)")
    })
}

/// `out.png` -> `out-{key}.png` when several figures share one name.
fn with_suffix(path: &std::path::Path, key: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}-{key}{ext}"))
}

fn trajectory_command(args: TrajectoryArgs) -> Result<()> {
    let text = match (&args.text, &args.text_file) {
        (Some(t), None) => t.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        _ => anyhow::bail!("give --text or --text-file"),
    };
    let statistics = parse_statistics(&args.statistic)?;
    let model = args.model.load()?;
    let ids = model.tokenizer()?.encode(&text)?;
    anyhow::ensure!(!ids.is_empty(), "the text has no tokens");
    crate::plot::check_plottable(ids.len())?;
    let lens = lens_arg(&args.lens, &model)?;
    let trajectory = PredictionTrajectory::compute(&model, lens.as_ref(), &ids, args.top_k)?;
    let other = match &args.minus {
        Some(name) => {
            let lens = lens_arg(name, &model)?;
            Some(PredictionTrajectory::compute(
                &model,
                lens.as_ref(),
                &ids,
                args.top_k,
            )?)
        }
        None => None,
    };
    let view = match &other {
        Some(o) => TrajectoryView::Difference(&trajectory, o),
        None => TrajectoryView::Single(&trajectory),
    };
    for &statistic in &statistics {
        let path = if statistics.len() > 1 {
            with_suffix(&args.output, statistic.key())
        } else {
            args.output.clone()
        };
        plot_trajectory(&path, view, statistic)?;
        println!("{}", path.display());
        if args.both_formats {
            let other = match path.extension().and_then(|e| e.to_str()) {
                Some("svg") => path.with_extension("png"),
                _ => path.with_extension("svg"),
            };
            plot_trajectory(&other, view, statistic)?;
            println!("{}", other.display());
        }
    }
    if let Some(path) = &args.json {
        trajectory.write_json(path)?;
        println!("{}", path.display());
    }
    if let Some(path) = &args.csv {
        trajectory.write_csv(path)?;
        println!("{}", path.display());
    }
    Ok(())
}

fn sweep_command(args: SweepArgs) -> Result<()> {
    let statistics = parse_statistics(&args.statistic)?;
    let eval_data = LensData {
        data: args.data.clone(),
        activations: None,
        format: args.format.clone(),
        text_field: args.text_field.clone(),
        seq_len: args.seq_len,
        batch_size: args.batch_size,
        shuffle_sequences: hooks::data::SHUFFLED_SEQUENCES,
    };
    eval_data.check()?;
    let lens = match args.lens.as_str() {
        "logit" => SweepLens::Logit,
        "tuned" => {
            anyhow::ensure!(
                !args.train_data.is_empty(),
                "--lens tuned trains a lens per checkpoint and needs --train-data"
            );
            SweepLens::Train {
                data: LensData {
                    data: args.train_data.clone(),
                    shuffle_sequences: args.shuffle_sequences,
                    ..eval_data.clone()
                },
                options: TrainOptions {
                    steps: args.train_steps,
                    tokens_per_step: args.tokens_per_step,
                    seq_len: args.seq_len,
                    chunk_tokens: args.chunk_tokens,
                    ..TrainOptions::default()
                },
            }
        }
        pattern => {
            anyhow::ensure!(
                pattern.contains("{revision}"),
                "--lens '{pattern}' is not logit, tuned, or a folder pattern with {{revision}}"
            );
            SweepLens::Load(pattern.to_string())
        }
    };
    if let SweepLens::Train { data, .. } = &lens {
        data.check()?;
    }
    let options = SweepOptions {
        model: args.model.clone(),
        checkpoints: parse_checkpoints(&args.checkpoints)?,
        load: hooks::LoadOptions {
            revision: None,
            device: hooks::parse_device(&args.device)?,
            dtype: hooks::parse_dtype(&args.dtype)?,
            ..hooks::LoadOptions::default()
        },
        tokenizer: args.tokenizer.clone(),
        output: args.output.clone(),
        lens,
        eval_data,
        eval_tokens: args.tokens,
        chunk_tokens: args.chunk_tokens,
        prompt: args.prompt.clone(),
        top_k: 5,
    };
    let summary = run_sweep(&options, true)?;
    println!(
        "{} checkpoints of {} evaluated -> {}",
        summary.results.len(),
        summary.name,
        args.output.join("sweep.json").display()
    );
    let figures = args.output.join("figures");
    let written = plot_sweep(&args.output, &figures, &statistics, args.max_panels)?;
    println!("{} figures written to {}", written.len(), figures.display());
    Ok(())
}
