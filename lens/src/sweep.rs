//! Lenses across training checkpoints: visit each revision of a model (Pythia's log-spaced
//! schedule or a list), get a lens for it (train, load, or the logit lens alone), evaluate
//! every checkpoint on the same tokens and record one prompt's prediction trajectory, then
//! draw the figures. Each finished checkpoint leaves `OUT/<revision>/result.json`, so an
//! interrupted sweep resumes with the next checkpoint; a lens being trained resumes from its
//! own training checkpoint.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hooks::activations::{ActivationSource, ReadOrder};
use hooks::{LoadOptions, Model};
use indicatif::{MultiProgress, ProgressBar};
use serde::{Deserialize, Serialize};

use crate::eval::{evaluate, EvalReport, LayerMetrics, PredictionDepth};
use crate::plot::{self, CheckpointGrid};
use crate::train::{checkpoint_dir, checkpoint_file, prepare_output, train, TrainOptions};
use crate::trajectory::{PredictionTrajectory, Statistic};
use crate::{Error, LensData, Result, TunedLens};

/// Pythia's checkpoint steps (154 of them): 0, 1, 2, 4, ..., 512, then every 1000 up to
/// 143000; only those up to `max` when given.
pub fn pythia_steps(max: Option<u64>) -> Vec<u64> {
    let mut steps = vec![0];
    steps.extend((0..10).map(|i| 1u64 << i));
    steps.extend((1..=143).map(|k| k * 1000));
    steps.retain(|s| max.is_none_or(|m| *s <= m));
    steps
}

/// Parses a checkpoint list: revisions separated by commas (`step1000,step8000,main`), or
/// `pythia` (all of Pythia's 154 steps), or `pythia:A-B` (Pythia's steps from A to B).
pub fn parse_checkpoints(spec: &str) -> Result<Vec<String>> {
    let spec = spec.trim();
    let range = match spec {
        "pythia" => Some((0, u64::MAX)),
        s => s
            .strip_prefix("pythia:")
            .map(|r| -> Result<(u64, u64)> {
                let bad = || {
                    Error::Lens(format!(
                        "checkpoint range '{spec}' is not pythia:A-B (e.g. pythia:0-1000)"
                    ))
                };
                let (a, b) = r.split_once('-').ok_or_else(bad)?;
                let number = |x: &str| {
                    x.trim()
                        .trim_start_matches("step")
                        .parse::<u64>()
                        .map_err(|_| bad())
                };
                let (a, b) = (number(a)?, number(b)?);
                if a > b {
                    return Err(bad());
                }
                Ok((a, b))
            })
            .transpose()?,
    };
    let revisions: Vec<String> = match range {
        Some((a, b)) => pythia_steps(Some(b))
            .into_iter()
            .filter(|s| *s >= a)
            .map(|s| format!("step{s}"))
            .collect(),
        None => spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    };
    if revisions.is_empty() {
        return Err(Error::Lens(format!("no checkpoints in '{spec}'")));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = revisions.iter().find(|r| !seen.insert(*r)) {
        return Err(Error::Lens(format!(
            "checkpoint '{dup}' is listed twice in '{spec}'"
        )));
    }
    Ok(revisions)
}

/// How the sweep gets a lens at each checkpoint (the logit lens is always evaluated too).
#[derive(Debug, Clone)]
pub enum SweepLens {
    /// Only the logit lens.
    Logit,
    /// Train a tuned lens per checkpoint on `data` with `options` (resumable per checkpoint).
    Train {
        /// Training data (keep it apart from the evaluation tokens).
        data: LensData,
        /// Training recipe.
        options: TrainOptions,
    },
    /// Load a tuned lens per checkpoint from this folder pattern, `{revision}` replaced.
    Load(String),
}

/// Everything an across-checkpoint sweep needs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Model: hub id / short name (checkpoints are hub revisions) or a local folder with one
    /// sub-folder per revision (`MODEL/step1000/config.json`, the hub layout), or a single
    /// model folder / GGUF file with one checkpoint.
    pub model: String,
    /// Revisions in training order.
    pub checkpoints: Vec<String>,
    /// Device and dtype.
    pub load: LoadOptions,
    /// A tokenizer.json to use instead of each checkpoint's own.
    pub tokenizer: Option<PathBuf>,
    /// Output folder: one sub-folder per checkpoint, `sweep.json` and the figures.
    pub output: PathBuf,
    /// Which lens to evaluate beside the logit lens.
    pub lens: SweepLens,
    /// Evaluation data: the same tokens at every checkpoint.
    pub eval_data: LensData,
    /// Tokens to evaluate.
    pub eval_tokens: u64,
    /// Tokens decoded at once.
    pub chunk_tokens: usize,
    /// A prompt whose prediction trajectory is recorded at every checkpoint.
    pub prompt: Option<String>,
    /// Tokens kept per trajectory cell.
    pub top_k: usize,
}

/// What the sweep recorded at one checkpoint (`OUT/<revision>/result.json`, written last, so
/// its presence marks the checkpoint done).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointResult {
    /// The revision.
    pub revision: String,
    /// Where the model came from.
    pub origin: String,
    /// Per-layer evaluation of the logit lens (and the tuned lens).
    pub eval: EvalReport,
    /// Seconds this checkpoint took.
    pub seconds: f64,
    /// The sweep settings that made it ([`sweep_settings`]; null in older files): a re-run
    /// with other settings does not reuse it.
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// The settings that shape a checkpoint's result: dtype, evaluation data and budget, prompt,
/// and how the tuned lens is made (not how many tokens are decoded at once, nor how often its
/// training is checkpointed).
fn sweep_settings(options: &SweepOptions) -> serde_json::Value {
    let data = |d: &LensData| {
        serde_json::json!({
            "paths": d.data, "activations": d.activations, "format": d.format,
            "text_field": d.text_field, "seq_len": d.seq_len,
        })
    };
    let lens = match &options.lens {
        SweepLens::Logit => serde_json::json!("logit"),
        SweepLens::Train { data: d, options } => {
            serde_json::json!({"train": data(d), "options": options.recipe()})
        }
        SweepLens::Load(pattern) => serde_json::json!({ "load": pattern }),
    };
    serde_json::json!({
        "model": options.model, "tokenizer": options.tokenizer, "eval_data": data(&options.eval_data),
        "eval_tokens": options.eval_tokens,
        "prompt": options.prompt, "top_k": options.top_k, "lens": lens,
        "dtype": hooks::dtype_name(options.load.dtype),
    })
}

/// Whether a checkpoint's recorded `saved` settings are this run's `now` ([`sweep_settings`]),
/// as far as they go: settings from before a field was recorded (the dtype) do not hold it,
/// and those from before [`TrainOptions::recipe`] hold the chunk size and checkpoint
/// interval that they now leave out.
fn same_settings(saved: &serde_json::Value, now: &serde_json::Value) -> (bool, serde_json::Value) {
    let mut saved = saved.clone();
    if let Some(options) = saved.pointer_mut("/lens/options") {
        if let Ok(recorded) = serde_json::from_value::<TrainOptions>(options.clone()) {
            *options = serde_json::json!(recorded.recipe());
        }
    }
    if let Some(fields) = saved.as_object_mut() {
        fields
            .entry("dtype")
            .or_insert_with(|| now["dtype"].clone());
    }
    (saved == *now, saved)
}

/// `sweep.json`: the sweep's settings and every checkpoint's result, in training order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepSummary {
    /// The model as given.
    pub model: String,
    /// Short model name for titles.
    pub name: String,
    /// `logit` or `tuned`.
    pub lens: String,
    /// Results in checkpoint order.
    pub results: Vec<CheckpointResult>,
    /// The prompt whose trajectories were recorded, if any.
    pub prompt: Option<String>,
}

/// The folder of one checkpoint's files.
pub fn checkpoint_folder(output: &Path, revision: &str) -> PathBuf {
    output.join(sanitize(revision))
}

fn sanitize(revision: &str) -> String {
    revision
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The file of a recorded trajectory: `OUT/<revision>/trajectory-{logit,tuned}.json`.
pub fn trajectory_file(output: &Path, revision: &str, tuned: bool) -> PathBuf {
    checkpoint_folder(output, revision).join(if tuned {
        "trajectory-tuned.json"
    } else {
        "trajectory-logit.json"
    })
}

/// A short name for titles: the last path component, without `.gguf`.
pub fn short_name(model: &str) -> String {
    let name = Path::new(model)
        .file_name()
        .map_or(model.to_string(), |n| n.to_string_lossy().into_owned());
    name.trim_end_matches(".gguf").to_string()
}

/// Checks, before any checkpoint runs, that a local `model` folder serves every revision:
/// it is a model folder itself (every checkpoint is that model) or holds
/// `model/<revision>/config.json` for each. Hub ids and GGUF files pass.
pub fn check_local_checkpoints(model: &str, revisions: &[String]) -> Result<()> {
    let path = Path::new(model);
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(());
    }
    let missing: Vec<String> = revisions
        .iter()
        .filter(|r| !path.join(r).join("config.json").is_file())
        .map(|r| path.join(r).display().to_string())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 5;
    let more = match missing.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Err(Error::Lens(format!(
        "{model} is neither a model folder (no config.json) nor a folder holding every \
         checkpoint: missing {}{more} (each needs a config.json)",
        missing[..missing.len().min(SHOWN)].join(", ")
    )))
}

/// Loads checkpoint `revision` of `model`: `model/revision` when that is a model folder,
/// else `model` at hub revision `revision` (a lone model folder or GGUF file ignores it; a
/// local folder without this checkpoint is an error, see [`check_local_checkpoints`]).
pub fn load_checkpoint(
    model: &str,
    revision: &str,
    load: &LoadOptions,
    tokenizer: Option<&Path>,
) -> Result<Model> {
    check_local_checkpoints(model, std::slice::from_ref(&revision.to_string()))?;
    let path = Path::new(model);
    let has_checkpoint = path.join(revision).join("config.json").is_file();
    // A lone local model is every checkpoint; a checkpoint folder is found by `Model::load`,
    // as a local revision always is.
    let lone = path.exists() && !has_checkpoint;
    let options = LoadOptions {
        revision: (!lone).then(|| revision.to_string()),
        ..load.clone()
    };
    let mut loaded = Model::load(model, &options)?;
    if let Some(path) = tokenizer {
        loaded.set_tokenizer(hooks::Tokenizer::from_file(
            path,
            loaded.config().eos_token_id(),
        )?);
    }
    Ok(loaded)
}

/// Counts the tokens a source yields on a progress bar.
struct Counted<'a, 'm> {
    inner: Box<dyn ActivationSource + Send + 'm>,
    bar: &'a ProgressBar,
}

impl ActivationSource for Counted<'_, '_> {
    fn hook_points(&self) -> &[hooks::HookPoint] {
        self.inner.hook_points()
    }

    fn next_batch(&mut self) -> hooks::Result<Option<hooks::activations::ActivationBatch>> {
        let batch = self.inner.next_batch()?;
        if let Some(b) = &batch {
            self.bar.inc(b.len() as u64);
        }
        Ok(batch)
    }

    fn skip_tokens(&mut self, tokens: u64) -> hooks::Result<u64> {
        self.inner.skip_tokens(tokens)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Runs the sweep: for each checkpoint not yet done, loads the model, gets its lens (trains,
/// loads, or only the logit lens), evaluates on the same tokens, records the prompt's
/// trajectories, writes `result.json`, and releases the model before the next checkpoint.
/// Finished checkpoints are read back, not recomputed. Writes and returns `sweep.json`.
/// `progress` draws bars (per checkpoint, per training step, per evaluated token) on a
/// terminal.
pub fn run_sweep(options: &SweepOptions, progress: bool) -> Result<SweepSummary> {
    if options.checkpoints.is_empty() {
        return Err(Error::Lens("no checkpoints to sweep".into()));
    }
    let mut folders = std::collections::HashMap::new();
    for revision in &options.checkpoints {
        if let Some(other) = folders.insert(sanitize(revision), revision) {
            return Err(Error::Lens(format!(
                "checkpoints '{other}' and '{revision}' would share the folder {}",
                checkpoint_folder(&options.output, revision).display()
            )));
        }
    }
    // A finished checkpoint is read back, not loaded: its folder may be gone.
    let to_load: Vec<String> = options
        .checkpoints
        .iter()
        .filter(|r| {
            !checkpoint_folder(&options.output, r)
                .join("result.json")
                .is_file()
        })
        .cloned()
        .collect();
    check_local_checkpoints(&options.model, &to_load)?;
    if options.eval_tokens < options.eval_data.seq_len as u64 {
        return Err(Error::Lens(format!(
            "evaluation tokens {} is less than one sequence of {}",
            options.eval_tokens, options.eval_data.seq_len
        )));
    }
    // Found now, not once the first checkpoint is trained and evaluated.
    if let SweepLens::Train { options, .. } = &options.lens {
        options.validate()?;
    }
    if options
        .prompt
        .as_deref()
        .is_some_and(|p| p.trim().is_empty())
    {
        return Err(Error::Lens("the prompt (--prompt) is empty".into()));
    }
    // Held to the end: another sweep into this folder is refused meanwhile.
    let _lock = hooks::atomic::lock_folder(&options.output)?;
    let multi = MultiProgress::new();
    if !progress || !std::io::stderr().is_terminal() {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let outer = multi.add(hooks::progress::bar(
        progress,
        Some(options.checkpoints.len() as u64),
        "checkpoints",
    ));
    let mut results = Vec::with_capacity(options.checkpoints.len());
    for revision in &options.checkpoints {
        outer.set_message(revision.clone());
        let folder = checkpoint_folder(&options.output, revision);
        let done = folder.join("result.json");
        let result = if done.is_file() {
            let result = read_json::<CheckpointResult>(&done).map_err(|e| {
                Error::Lens(format!(
                    "{e}; delete {} to compute that checkpoint again",
                    folder.display()
                ))
            })?;
            let now = sweep_settings(options);
            let (same, saved) = same_settings(&result.settings, &now);
            if result.revision != *revision {
                return Err(Error::Lens(format!(
                    "{} holds the results of checkpoint '{}', not '{revision}'; use another output folder",
                    done.display(),
                    result.revision
                )));
            }
            if !result.settings.is_null() && !same {
                return Err(Error::Lens(format!(
                    "{} was made with other settings ({}); use another output folder or delete {} (the lens trained there too)",
                    done.display(),
                    hooks::checkpoint::differences(&saved, &now),
                    folder.display()
                )));
            }
            note(
                &multi,
                format!("{revision}: already done, reusing {}", done.display()),
            );
            result
        } else {
            let result = sweep_checkpoint(options, revision, &multi, progress)?;
            note(
                &multi,
                format!(
                    "{revision}: done in {:.0} s (output CE {:.3} nats)",
                    result.seconds,
                    result.eval.logit_lens.last().map_or(f64::NAN, |m| m.ce)
                ),
            );
            result
        };
        results.push(result);
        outer.inc(1);
    }
    outer.finish_and_clear();
    let summary = SweepSummary {
        model: options.model.clone(),
        name: short_name(&options.model),
        lens: match options.lens {
            SweepLens::Logit => "logit",
            _ => "tuned",
        }
        .into(),
        results,
        prompt: options.prompt.clone(),
    };
    hooks::atomic::write_json(&options.output.join("sweep.json"), &summary)?;
    Ok(summary)
}

/// A progress line: above the bars on a terminal, else a log line.
fn note(multi: &MultiProgress, message: String) {
    if multi.is_hidden() {
        tracing::info!("{message}");
    } else {
        let _ = multi.println(message);
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| hooks::Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Lens(format!("{}: {e}", path.display())))
}

/// Reads `sweep.json` from a sweep's output folder.
pub fn read_summary(output: &Path) -> Result<SweepSummary> {
    read_json(&output.join("sweep.json"))
}

fn sweep_checkpoint(
    options: &SweepOptions,
    revision: &str,
    multi: &MultiProgress,
    progress: bool,
) -> Result<CheckpointResult> {
    let start = std::time::Instant::now();
    let folder = checkpoint_folder(&options.output, revision);
    std::fs::create_dir_all(&folder).map_err(|e| hooks::Error::io(&folder, e))?;
    // The model lives in this scope only: it is dropped before the next checkpoint loads.
    let model = load_checkpoint(
        &options.model,
        revision,
        &options.load,
        options.tokenizer.as_deref(),
    )?;
    let lens = match &options.lens {
        SweepLens::Logit => None,
        SweepLens::Load(pattern) => {
            let dir = PathBuf::from(pattern.replace("{revision}", revision));
            let lens = TunedLens::load(&dir, model.device())?;
            lens.check_model(&model)?;
            Some(lens)
        }
        SweepLens::Train {
            data,
            options: train_options,
        } => Some(train_for_checkpoint(
            &model,
            &folder.join("lens"),
            data,
            train_options,
            multi,
            progress,
        )?),
    };
    let bar = multi.add(hooks::progress::bar(
        progress,
        Some(options.eval_tokens),
        "eval tokens",
    ));
    let source =
        options
            .eval_data
            .open(&model, ReadOrder::Sequential, Some(options.eval_tokens))?;
    let mut counted = Counted {
        inner: source,
        bar: &bar,
    };
    let mut eval = evaluate(
        lens.as_ref(),
        &model.unembedding(),
        model.config().num_layers(),
        &mut counted,
        options.eval_data.seq_len,
        options.eval_tokens,
        options.chunk_tokens,
    )?;
    drop(counted);
    bar.finish_and_clear();
    multi.remove(&bar);
    eval.nats_to_bits_per_byte = options
        .eval_data
        .nats_to_bits_per_byte(&model, eval.tokens)?;
    hooks::atomic::write_json(&folder.join("eval.json"), &eval)?;
    if let Some(prompt) = &options.prompt {
        let ids = model.tokenizer()?.encode(prompt)?;
        for tuned in [false, true] {
            let lens = if tuned {
                match &lens {
                    Some(l) => Some(l),
                    None => continue,
                }
            } else {
                None
            };
            let mut t = PredictionTrajectory::compute(&model, lens, &ids, options.top_k)?;
            t.model = short_name(&options.model);
            t.revision = Some(revision.to_string());
            t.write_json(&trajectory_file(&options.output, revision, tuned))?;
        }
    }
    let result = CheckpointResult {
        revision: revision.to_string(),
        origin: model.origin().to_string(),
        eval,
        seconds: start.elapsed().as_secs_f64(),
        settings: sweep_settings(options),
    };
    drop(model);
    hooks::atomic::write_json(&folder.join("result.json"), &result)?;
    Ok(result)
}

/// Trains (or resumes) the tuned lens of one checkpoint in `dir`. A lens trained whole
/// before goes through its training checkpoint, which checks it against this recipe, source
/// and data (reading the data's tokens again, but running no step); one whose checkpoint was
/// deleted is reused as it is, with a warning.
fn train_for_checkpoint(
    model: &Model,
    dir: &Path,
    data: &LensData,
    options: &TrainOptions,
    multi: &MultiProgress,
    progress: bool,
) -> Result<TunedLens> {
    // config.json is written after the parameters: a lens is whole once it is there.
    let whole = dir.join("config.json").is_file() && dir.join("params.safetensors").is_file();
    if whole && !checkpoint_file(&checkpoint_dir(dir)).is_file() {
        tracing::warn!(
            "reusing the lens in {} as it is: its training checkpoint is gone, so its recipe and data cannot be checked",
            dir.display()
        );
        let lens = TunedLens::load(dir, model.device())?;
        lens.check_model(model)?;
        return Ok(lens);
    }
    let ckpt = prepare_output(dir)?;
    let needed = options.total_tokens();
    // Shuffled with `lens train`'s default seed (tuned-lens's).
    let order = data.training_order(options.loss, 42);
    let mut source = data.open(model, order, Some(needed))?;
    let mut lens = TunedLens::for_model(model)?;
    let bar = multi.add(hooks::progress::bar(
        progress,
        Some(options.steps),
        "lens steps",
    ));
    let mut stepped = false;
    let history = train(
        &mut lens,
        &model.unembedding(),
        source.as_mut(),
        options,
        Some(&ckpt),
        |r| {
            stepped = true;
            bar.set_position(r.step);
            let mean = r.loss.iter().sum::<f64>() / r.loss.len() as f64;
            bar.set_message(format!("mean KL {mean:.3}"));
            Ok(())
        },
    )
    .map_err(|e| match whole {
        // Deleting only the checkpoint would leave the lens to be reused unchecked.
        true => Error::Lens(format!(
            "{e} (for this checkpoint's lens, delete {} to train it again)",
            dir.display()
        )),
        false => e,
    })?;
    bar.finish_and_clear();
    multi.remove(&bar);
    // A whole lens that took no step is its checkpoint's last one: it stays as it is.
    let trained = !whole || stepped;
    if trained {
        lens.save(dir)?;
    }
    let history_file = ckpt.join("history.json");
    if trained || !history_file.is_file() {
        hooks::atomic::write_json(&history_file, &history)?;
    }
    Ok(lens)
}

/// The per-layer values of a statistic across checkpoints, for the heatmap and curves
/// (`tuned`: the tuned lens's rows, else the logit lens's).
pub fn checkpoint_grid(
    summary: &SweepSummary,
    statistic: Statistic,
    tuned: bool,
) -> Result<CheckpointGrid> {
    let pick = |m: &LayerMetrics| -> Result<f64> {
        Ok(match statistic {
            Statistic::Entropy => m.entropy,
            Statistic::CrossEntropy => m.ce,
            Statistic::ForwardKl => m.kl,
            other => {
                return Err(Error::Lens(format!(
                    "the evaluation has no '{}' per layer (use ce, kl or entropy)",
                    other.key()
                )))
            }
        })
    };
    let rows_of = |r: &CheckpointResult| -> Result<Vec<LayerMetrics>> {
        if tuned {
            r.eval.tuned_lens.clone().ok_or_else(|| {
                Error::Lens(format!(
                    "checkpoint {} has no tuned-lens evaluation",
                    r.revision
                ))
            })
        } else {
            Ok(r.eval.logit_lens.clone())
        }
    };
    let first = summary
        .results
        .first()
        .ok_or_else(|| Error::Lens("the sweep has no results".into()))?;
    let layers: Vec<String> = rows_of(first)?.iter().map(|m| m.layer.clone()).collect();
    let mut values = vec![Vec::with_capacity(summary.results.len()); layers.len()];
    for r in &summary.results {
        let rows = rows_of(r)?;
        if rows.len() != layers.len() {
            return Err(Error::Lens(format!(
                "checkpoint {} has {} layers, the first has {}",
                r.revision,
                rows.len(),
                layers.len()
            )));
        }
        for (l, m) in rows.iter().enumerate() {
            values[l].push(Some(pick(m)?));
        }
    }
    let tokens = first.eval.tokens;
    Ok(CheckpointGrid {
        title: format!(
            "{}: {} per layer {} ({}, {tokens} evaluation tokens)",
            summary.name,
            statistic_short(statistic),
            match summary.results.as_slice() {
                [only] => format!("at {}", only.revision),
                _ => "across training".to_string(),
            },
            if tuned { "tuned lens" } else { "logit lens" }
        ),
        checkpoints: summary.results.iter().map(|r| r.revision.clone()).collect(),
        layers,
        values,
        label: format!("mean {}", statistic.label()),
    })
}

/// The distribution of prediction depths at each checkpoint of a sweep: rows are depths
/// (`0 .. L-1`, then `output`: only the model's own output has its top-1 token), values the
/// share of evaluation tokens of that depth; each checkpoint's name carries its mean depth.
pub fn depth_grid(summary: &SweepSummary, tuned: bool) -> Result<CheckpointGrid> {
    let lens_name = if tuned { "tuned lens" } else { "logit lens" };
    let depth_of = |r: &CheckpointResult| -> Result<PredictionDepth> {
        let depth = if tuned {
            &r.eval.tuned_lens_depth
        } else {
            &r.eval.logit_lens_depth
        };
        depth.clone().ok_or_else(|| {
            Error::Lens(format!(
                "checkpoint {} has no {lens_name} prediction depths (evaluated before they were measured)",
                r.revision
            ))
        })
    };
    let first = summary
        .results
        .first()
        .ok_or_else(|| Error::Lens("the sweep has no results".into()))?;
    let layers: Vec<String> = first
        .eval
        .logit_lens
        .iter()
        .map(|m| m.layer.clone())
        .collect();
    let mut values = vec![Vec::with_capacity(summary.results.len()); layers.len()];
    let mut checkpoints = Vec::with_capacity(summary.results.len());
    for r in &summary.results {
        let depth = depth_of(r)?;
        if depth.counts.len() != layers.len() {
            return Err(Error::Lens(format!(
                "checkpoint {} has {} depths, the first has {}",
                r.revision,
                depth.counts.len(),
                layers.len()
            )));
        }
        let tokens = depth.counts.iter().sum::<u64>().max(1) as f64;
        for (row, &count) in values.iter_mut().zip(&depth.counts) {
            row.push(Some(count as f64 / tokens));
        }
        checkpoints.push(format!("{} (mean {:.2})", r.revision, depth.mean));
    }
    Ok(CheckpointGrid {
        title: format!(
            "{}: prediction depth {} ({lens_name}, {} evaluation tokens)",
            summary.name,
            match summary.results.as_slice() {
                [only] => format!("at {}", only.revision),
                _ => "across training".to_string(),
            },
            first.eval.tokens
        ),
        checkpoints,
        layers,
        values,
        label: "share of tokens whose top-1 stays the model's from this layer on".into(),
    })
}

fn statistic_short(statistic: Statistic) -> &'static str {
    match statistic {
        Statistic::Entropy => "entropy",
        Statistic::CrossEntropy => "cross-entropy",
        Statistic::ForwardKl => "KL to the output",
        Statistic::MaxProbability => "top-1 probability",
        Statistic::Rank => "target rank",
    }
}

/// The figures of a finished sweep, PNG and SVG, into `figures` (created): for each lens and
/// statistic a layer x checkpoint heatmap and per-layer curves, and, when a prompt was
/// recorded, its trajectories side by side (for each statistic in `statistics`; at most
/// `max_panels` checkpoints, evenly spaced, including the first and last, or the last alone
/// when it is 1); for each lens, the distribution of prediction depths at each checkpoint
/// (when measured). Returns the files written.
pub fn plot_sweep(
    output: &Path,
    figures: &Path,
    statistics: &[Statistic],
    max_panels: usize,
) -> Result<Vec<PathBuf>> {
    let summary = read_summary(output)?;
    std::fs::create_dir_all(figures).map_err(|e| hooks::Error::io(figures, e))?;
    let mut written = Vec::new();
    let lenses: &[bool] = if summary.lens == "tuned" {
        &[false, true]
    } else {
        &[false]
    };
    for &tuned in lenses {
        let lens_key = if tuned { "tuned" } else { "logit" };
        if let Ok(grid) = depth_grid(&summary, tuned) {
            for ext in ["png", "svg"] {
                let path = figures.join(format!("depth-{lens_key}.{ext}"));
                plot::plot_layer_curves(&path, &grid)?;
                written.push(path);
            }
        }
        for &statistic in statistics {
            if let Ok(grid) = checkpoint_grid(&summary, statistic, tuned) {
                for ext in ["png", "svg"] {
                    let heat =
                        figures.join(format!("heatmap-{lens_key}-{}.{ext}", statistic.key()));
                    plot::plot_checkpoint_heatmap(&heat, &grid, statistic)?;
                    let curves =
                        figures.join(format!("curves-{lens_key}-{}.{ext}", statistic.key()));
                    plot::plot_layer_curves(&curves, &grid)?;
                    written.extend([heat, curves]);
                }
            }
            if summary.prompt.is_none() {
                continue;
            }
            let picked = spaced(summary.results.len(), max_panels.max(1));
            let trajectories = picked
                .iter()
                .map(|&i| {
                    let rev = &summary.results[i].revision;
                    Ok((
                        rev.clone(),
                        PredictionTrajectory::read_json(&trajectory_file(output, rev, tuned))?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let tokens = trajectories.first().map_or(0, |(_, t)| t.input_ids.len());
            if let Err(too_long) = plot::check_plottable(tokens) {
                // The other figures are still drawn; the trajectories stay in their JSON.
                tracing::warn!("no trajectory figures: {too_long}");
                continue;
            }
            let title = format!(
                "{}: prediction trajectory across training ({}), colour: {}",
                summary.name,
                if tuned { "tuned lens" } else { "logit lens" },
                statistic.label()
            );
            for ext in ["png", "svg"] {
                let path =
                    figures.join(format!("trajectories-{lens_key}-{}.{ext}", statistic.key()));
                plot::plot_trajectories(&path, &title, &trajectories, statistic)?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// Up to `k` indices of `0..n`, evenly spaced, first and last included (the last alone
/// when `k` is 1: the trained model).
fn spaced(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    if k == 1 {
        return vec![n - 1];
    }
    let mut picked: Vec<usize> = (0..k)
        .map(|i| ((i as f64) * (n - 1) as f64 / (k - 1).max(1) as f64).round() as usize)
        .collect();
    picked.dedup();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_are_spaced_with_both_ends() {
        assert_eq!(spaced(5, 3), vec![0, 2, 4]);
        assert_eq!(spaced(5, 1), vec![4]);
        assert_eq!(spaced(2, 6), vec![0, 1]);
    }

    /// A result recorded with another chunk size or checkpoint interval, or before the dtype
    /// was recorded, is reused; one with another dtype or recipe is not.
    #[test]
    fn recorded_settings_compare_without_chunking_or_later_fields() {
        let settings = |dtype: Option<&str>, options: TrainOptions| {
            let mut value = serde_json::json!({"lens": {"options": options}, "top_k": 5});
            if let Some(dtype) = dtype {
                value["dtype"] = serde_json::json!(dtype);
            }
            value
        };
        let now = settings(Some("float32"), TrainOptions::default().recipe());
        let chunked = TrainOptions {
            chunk_tokens: 64,
            checkpoint_every: 3,
            ..TrainOptions::default()
        };
        assert!(same_settings(&settings(None, chunked.clone()), &now).0);
        assert!(same_settings(&settings(Some("float32"), chunked), &now).0);
        let (same, saved) =
            same_settings(&settings(Some("bfloat16"), TrainOptions::default()), &now);
        assert!(!same);
        assert!(hooks::checkpoint::differences(&saved, &now).contains("dtype"));
        let longer = TrainOptions {
            steps: 7,
            ..TrainOptions::default()
        };
        assert!(!same_settings(&settings(Some("float32"), longer), &now).0);
    }
}
