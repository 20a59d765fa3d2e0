//! Training a tuned lens with the reference recipe (tuned-lens defaults): forward
//! KL(final ‖ lens), SGD with Nesterov momentum 0.9 at lr 1.0 in the reference's convention
//! (`lr × (1 − momentum)` as the plain SGD step), coupled weight decay 1e-3, global
//! gradient-norm clip 1.0, linear decay to zero over 250 steps of 2^18 tokens, f32 lens and
//! optimiser state. Gradients are accumulated over micro-batches until a step's tokens are in.
//! Checkpoints (lens + optimiser state + history in one safetensors file, written atomically)
//! let an interrupted run resume exactly where it stopped.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use hooks::activations::{ActivationBatch, ActivationSource};
use hooks::optim::{clip_grad_norm, linear_schedule, Optimizer, Optimizers, Rule};
use hooks::{HookPoint, Unembedding};
use serde::{Deserialize, Serialize};

use crate::decode::Decoder;
use crate::loss::Target;
use crate::{lens_input, DecodeDtype, Error, Result, TunedLens};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Forward KL against the model's final distribution at the same position.
    Kl,
    /// Cross-entropy against the next token.
    Ce,
}

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with Nesterov momentum (the reference default).
    Sgd,
    /// Adam with AMSGrad, lr `1e-3 × lr`, warm-up min(1000, 0.2 × steps).
    Adam,
    /// Muon on the translators' matrices and AdamW on their biases, both at lr `0.01 × lr`,
    /// decoupled weight decay, no warm-up (tuned-lens's PR #141, not merged upstream).
    Muon,
}

impl OptimizerKind {
    /// Parses `sgd`, `adam` or `muon`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "sgd" => Ok(OptimizerKind::Sgd),
            "adam" => Ok(OptimizerKind::Adam),
            "muon" => Ok(OptimizerKind::Muon),
            other => Err(Error::Options(format!(
                "unknown optimizer '{other}' (expected sgd, adam or muon)"
            ))),
        }
    }

    /// The weight decay of the optimiser's recipe: 1e-3 (tuned-lens), 1e-2 with Muon (its
    /// PR #141).
    pub fn default_weight_decay(self) -> f64 {
        match self {
            OptimizerKind::Sgd | OptimizerKind::Adam => 1e-3,
            OptimizerKind::Muon => 1e-2,
        }
    }
}

/// Training options; the defaults are the reference recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimiser steps.
    pub steps: u64,
    /// Tokens per optimiser step (gradients are accumulated over micro-batches).
    pub tokens_per_step: usize,
    /// Learning rate in the reference's convention (SGD: the step is `lr × (1 − momentum)`;
    /// Adam: `1e-3 × lr`; Muon: `0.01 × lr`).
    pub lr: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Momentum: SGD's, Muon's, and Adam's (and AdamW's) first beta, as in tuned-lens.
    pub momentum: f64,
    /// Weight decay: coupled with SGD and Adam, decoupled with Muon and its AdamW.
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub clip: f64,
    /// Objective.
    pub loss: LossKind,
    /// Sequence length of the data (cross-entropy needs sequence boundaries).
    pub seq_len: usize,
    /// Tokens decoded at once (bounds memory: about 5 × tokens × vocab floats).
    pub chunk_tokens: usize,
    /// Save a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Precision of the two vocabulary-sized products per layer (lens logits and the
    /// gradient back through them); the rest of training is f32 whatever this is.
    #[serde(default)]
    pub decode_dtype: DecodeDtype,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 250,
            tokens_per_step: 1 << 18,
            lr: 1.0,
            optimizer: OptimizerKind::Sgd,
            momentum: 0.9,
            weight_decay: 1e-3,
            clip: 1.0,
            loss: LossKind::Kl,
            seq_len: 2048,
            chunk_tokens: 512,
            checkpoint_every: 25,
            decode_dtype: DecodeDtype::Auto,
        }
    }
}

impl TrainOptions {
    /// The optimisers of the recipe (PyTorch's rules: SGD, Adam with AMSGrad; with Muon,
    /// AdamW on the biases).
    fn optimizers(&self) -> Result<Optimizers> {
        let adam = |beta1, amsgrad| Rule::Adam {
            beta1,
            beta2: 0.999,
            eps: 1e-8,
            amsgrad,
        };
        Ok(match self.optimizer {
            OptimizerKind::Sgd => {
                let sgd = Rule::Sgd {
                    momentum: self.momentum,
                    nesterov: true,
                };
                Optimizers::single(Optimizer::new(sgd, self.weight_decay))
            }
            OptimizerKind::Adam => {
                Optimizers::single(Optimizer::new(adam(self.momentum, true), self.weight_decay))
            }
            OptimizerKind::Muon => {
                let muon = Rule::Muon {
                    momentum: self.momentum,
                    nesterov: true,
                    ns_steps: 5,
                };
                let adamw = Optimizer::new(adam(self.momentum, false), self.weight_decay)
                    .with_decoupled_weight_decay();
                Optimizers::muon_and(Optimizer::new(muon, self.weight_decay), adamw)?
            }
        })
    }

    /// The tokens a whole run reads (saturating: [`TrainOptions::validate`] refuses more
    /// than a `u64` counts).
    pub fn total_tokens(&self) -> u64 {
        self.steps.saturating_mul(self.tokens_per_step as u64)
    }

    fn base_lr(&self) -> f64 {
        match self.optimizer {
            OptimizerKind::Sgd => self.lr * (1.0 - self.momentum),
            OptimizerKind::Adam => 1e-3 * self.lr,
            OptimizerKind::Muon => 1e-2 * self.lr,
        }
    }

    fn warmup(&self) -> u64 {
        match self.optimizer {
            OptimizerKind::Sgd | OptimizerKind::Muon => 0,
            OptimizerKind::Adam => 1000.min(self.steps / 5),
        }
    }

    /// These options without those that change no result, at their defaults: how often
    /// checkpoints are written, and the tokens taken at once (a memory bound: only the order
    /// in which a step's sums are taken changes). A resumed run must share the recipe.
    pub fn recipe(&self) -> TrainOptions {
        let defaults = TrainOptions::default();
        TrainOptions {
            checkpoint_every: defaults.checkpoint_every,
            chunk_tokens: defaults.chunk_tokens,
            ..self.clone()
        }
    }

    /// Refuses options that cannot train a lens (a negative rate would climb the loss, a
    /// momentum of 1 or more never forgets, a zero clip zeroes every gradient), naming them.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Options(m));
        if self.steps == 0 || self.tokens_per_step == 0 || self.chunk_tokens == 0 {
            return bad("steps, tokens per step and chunk size must be positive".into());
        }
        if self
            .steps
            .checked_mul(self.tokens_per_step as u64)
            .is_none()
        {
            return bad(format!(
                "{} steps x {} tokens per step is more tokens than can be counted",
                self.steps, self.tokens_per_step
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "the learning rate must be positive, got {}",
                self.lr
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return bad(format!(
                "the momentum must be in [0, 1), got {}",
                self.momentum
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "the weight decay must be zero or positive, got {}",
                self.weight_decay
            ));
        }
        if self.clip.is_nan() || self.clip <= 0.0 {
            return bad(format!(
                "the gradient-norm clip must be positive (inf: no clipping), got {}",
                self.clip
            ));
        }
        if self.seq_len == 0 || (self.loss == LossKind::Ce && self.seq_len < 2) {
            return bad(format!(
                "the sequence length must be positive, and at least 2 for cross-entropy training \
                 (the last token of a sequence has no next one), got {}",
                self.seq_len
            ));
        }
        if self.loss == LossKind::Ce && !self.tokens_per_step.is_multiple_of(self.seq_len) {
            return bad(format!(
                "cross-entropy training needs whole sequences per step: tokens per step {} is not a multiple of the sequence length {}",
                self.tokens_per_step, self.seq_len
            ));
        }
        Ok(())
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number, from 1.
    pub step: u64,
    /// Mean loss per token for each translator (nats).
    pub loss: Vec<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Training state saved with each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    options: TrainOptions,
    tokens_consumed: u64,
    history: Vec<StepRecord>,
    /// What the run read ([`ActivationSource::describe`]); absent from older checkpoints.
    #[serde(default)]
    source: String,
    /// The data behind the tokens consumed ([`ActivationSource::data_fingerprint`]).
    #[serde(default)]
    data_fingerprint: Option<String>,
}

/// The hook points a training source must provide: every lens input and the final residual.
pub fn required_hook_points(num_layers: usize) -> Vec<HookPoint> {
    let mut points: Vec<HookPoint> = (0..num_layers).map(lens_input).collect();
    points.push(HookPoint::Layer(num_layers - 1));
    points
}

/// Rows taken from a source in exact counts, carrying the rest of a batch to the next call.
struct Rows<'s> {
    source: &'s mut dyn ActivationSource,
    pending: Option<ActivationBatch>,
    consumed: u64,
}

impl Rows<'_> {
    /// Exactly `n` rows, or `None` (with how many were available) when the data runs out.
    fn take(&mut self, n: usize) -> Result<std::result::Result<ActivationBatch, usize>> {
        let mut parts = Vec::new();
        let mut have = 0;
        while have < n {
            let batch = match self.pending.take() {
                Some(b) => b,
                None => match self.source.next_batch()? {
                    Some(b) => b,
                    None => return Ok(Err(have)),
                },
            };
            let need = n - have;
            if batch.len() > need {
                let head: Vec<u32> = (0..need as u32).collect();
                let tail: Vec<u32> = (need as u32..batch.len() as u32).collect();
                self.pending = Some(batch.select(&tail)?);
                parts.push(batch.select(&head)?);
                have = n;
            } else {
                have += batch.len();
                parts.push(batch);
            }
        }
        self.consumed += n as u64;
        Ok(Ok(if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            ActivationBatch::concat(&parts)?
        }))
    }

    /// Skips `n` rows (cheaply where the source can), to resume.
    fn skip(&mut self, n: u64) -> Result<()> {
        let skipped = self.source.skip_tokens(n)?;
        let mut rest = (n - skipped) as usize;
        while rest > 0 {
            let chunk = rest.min(1 << 16);
            if self.take(chunk)?.is_err() {
                return Err(Error::Training(format!(
                    "cannot resume: the data has fewer than {n} tokens"
                )));
            }
            rest -= chunk;
        }
        self.consumed = n;
        Ok(())
    }
}

/// Trains `lens` on activations from `source` (which must provide
/// [`required_hook_points`]). With `checkpoint_dir`, resumes from a checkpoint there and
/// writes new ones. `on_step` sees every step; an error from it stops training after a
/// checkpoint of that step is written, and is returned. Returns the per-step history
/// (including resumed steps).
pub fn train(
    lens: &mut TunedLens,
    unembedding: &Unembedding,
    source: &mut dyn ActivationSource,
    options: &TrainOptions,
    checkpoint_dir: Option<&Path>,
    mut on_step: impl FnMut(&StepRecord) -> Result<()>,
) -> Result<Vec<StepRecord>> {
    options.validate()?;
    let layers = lens.num_layers();
    let needed = required_hook_points(layers);
    if let Some(missing) = needed.iter().find(|p| !source.hook_points().contains(p)) {
        return Err(Error::Training(format!(
            "the activation source lacks hook point '{missing}' (a lens over {layers} layers needs embed and layers.0..{})",
            layers - 1
        )));
    }
    hooks::activations::check_rows_suffice(source, options.steps, options.tokens_per_step)?;
    // Held to the end: another run into this folder is refused meanwhile.
    let _lock = checkpoint_dir.map(hooks::atomic::lock_folder).transpose()?;
    let unembedding = unembedding.to_dtype(DType::F32)?;
    // No chunk is larger than a step: a large --chunk-tokens must not size the
    // vocabulary-wide buffers beyond what a step can fill.
    let chunk_tokens = options.chunk_tokens.min(options.tokens_per_step);
    let vocab = unembedding.weight.dim(0)?;
    // On a GPU the buffers are in its memory, which the device reports when it runs out.
    if unembedding.weight.device().is_cpu() {
        let what = format!(
            "--chunk-tokens {} ({chunk_tokens} tokens decoded at once, over a vocabulary of {vocab})",
            options.chunk_tokens
        );
        // Logits, their gradient and a rounded copy, in 4 bytes each, and the unembedding
        // packed for the CPU products (one f32 copy, or two in bf16), if not made already.
        let packed = (vocab as u64) * (unembedding.hidden_size()? as u64) * 4;
        let bytes = (chunk_tokens as u64)
            .checked_mul(vocab as u64)
            .and_then(|n| n.checked_mul(3 * 4))
            .and_then(|n| n.checked_add(packed));
        hooks::memory::check_fits(&what, bytes, "lower --chunk-tokens (default 512)")?;
    }
    let mut decoder = Decoder::new(&unembedding, options.decode_dtype, chunk_tokens)?;
    tracing::info!("decoding lenses in {}", decoder.dtype_name());
    let mut optimizer = options.optimizers()?;
    let mut history = Vec::new();
    let mut rows = Rows {
        source,
        pending: None,
        consumed: 0,
    };
    let checkpoint = checkpoint_dir.map(checkpoint_file);
    if let Some(path) = checkpoint.as_ref().filter(|p| p.is_file()) {
        let state = load_checkpoint(path, lens, &mut optimizer, options, &rows.source.describe())?;
        tracing::info!(
            "resuming after step {} ({} tokens)",
            state.history.len(),
            state.tokens_consumed
        );
        rows.skip(state.tokens_consumed)?;
        let now = rows.source.data_fingerprint(state.tokens_consumed);
        hooks::checkpoint::check_checkpoint_data(
            path,
            state.data_fingerprint.as_deref(),
            now.as_deref(),
        )
        .map_err(Error::Training)?;
        history = state.history;
    }

    let final_point = HookPoint::Layer(layers - 1);
    while (history.len() as u64) < options.steps {
        let step = history.len() as u64 + 1;
        let batch = match rows.take(options.tokens_per_step)? {
            Ok(batch) => batch,
            Err(available) => {
                let needed = options.total_tokens();
                return Err(Error::Training(format!(
                    "the data ran out during step {step}: {} tokens were available, {} steps x {} tokens per step need {needed}{}",
                    rows.consumed + available as u64,
                    options.steps,
                    options.tokens_per_step,
                    kept(checkpoint_dir, "last")
                )));
            }
        };
        let next_tokens = next_token_targets(&batch.tokens, options.seq_len);
        let mut grads: Vec<Tensor> = lens
            .parameters()
            .iter()
            .map(|p| p.zeros_like())
            .collect::<candle_core::Result<_>>()?;
        let mut loss_sums = vec![0f64; layers];
        let mut counts = vec![0usize; layers];
        let n = batch.len();
        for start in (0..n).step_by(chunk_tokens) {
            let len = chunk_tokens.min(n - start);
            let rows_of = |p: HookPoint| -> Result<Tensor> {
                Ok(batch.activations[&p]
                    .narrow(0, start, len)?
                    .to_dtype(DType::F32)?)
            };
            let target = match options.loss {
                LossKind::Kl => {
                    Target::from_logits(&decoder.final_logits(&rows_of(final_point)?)?)?
                }
                LossKind::Ce => Target::NextTokens(
                    Tensor::new(&next_tokens[start..start + len], &candle_core::Device::Cpu)?
                        .to_device(unembedding.weight.device())?,
                ),
            };
            for layer in 0..layers {
                let (w, b) = lens.translator(layer);
                let g = decoder.loss_and_grads(&rows_of(lens_input(layer))?, w, b, &target)?;
                if !g.loss.is_finite() {
                    return Err(Error::Training(format!(
                        "non-finite loss at step {step}, layer {layer} (activations or lens diverged){}",
                        kept(checkpoint_dir, "last good")
                    )));
                }
                loss_sums[layer] += g.loss;
                counts[layer] += g.tokens;
                grads[2 * layer] = (&grads[2 * layer] + g.weight)?;
                grads[2 * layer + 1] = (&grads[2 * layer + 1] + g.bias)?;
            }
        }
        let tokens = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
        for g in grads.iter_mut() {
            *g = (&*g / tokens)?;
        }
        let grad_norm = clip_grad_norm(&mut grads, options.clip)?;
        let lr = options.base_lr() * linear_schedule(step - 1, options.warmup(), options.steps);
        let mut params = lens.parameters();
        optimizer.step(&mut params, &grads, lr, lr)?;
        lens.set_parameters(params)?;
        let record = StepRecord {
            step,
            loss: loss_sums
                .iter()
                .zip(&counts)
                .map(|(l, &c)| l / c.max(1) as f64)
                .collect(),
            grad_norm,
            lr,
        };
        let stop = on_step(&record).err();
        history.push(record);
        let due = options.checkpoint_every > 0 && step.is_multiple_of(options.checkpoint_every);
        if let (Some(path), true) = (&checkpoint, due || step == options.steps || stop.is_some()) {
            save_checkpoint(path, lens, &optimizer, options, &rows, &history)?;
        }
        if let Some(error) = stop {
            return Err(error);
        }
    }
    Ok(history)
}

/// `; the {which} checkpoint in DIR is kept` for an error message, when there is one.
fn kept(checkpoint_dir: Option<&Path>, which: &str) -> String {
    checkpoint_dir
        .filter(|d| checkpoint_file(d).is_file())
        .map(|d| format!("; the {which} checkpoint in {} is kept", d.display()))
        .unwrap_or_default()
}

/// Next-token ids for rows laid out as consecutive sequences of `seq_len`; the last position
/// of each sequence gets `u32::MAX` (no target).
fn next_token_targets(tokens: &[u32], seq_len: usize) -> Vec<u32> {
    (0..tokens.len())
        .map(|i| {
            if (i + 1) % seq_len == 0 || i + 1 >= tokens.len() {
                u32::MAX
            } else {
                tokens[i + 1]
            }
        })
        .collect()
}

fn save_checkpoint(
    path: &Path,
    lens: &TunedLens,
    optimizer: &Optimizers,
    options: &TrainOptions,
    rows: &Rows,
    history: &[StepRecord],
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = lens
        .parameters()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (format!("lens.{i}"), t))
        .collect();
    tensors.extend(optimizer.state_tensors());
    let state = State {
        options: options.clone(),
        tokens_consumed: rows.consumed,
        history: history.to_vec(),
        source: rows.source.describe(),
        data_fingerprint: rows.source.data_fingerprint(rows.consumed),
    };
    Ok(hooks::checkpoint::save(path, tensors, &state)?)
}

/// Refuses a checkpoint made with another recipe ([`TrainOptions::recipe`]: how often
/// checkpoints are written and the tokens taken at once may differ), naming what differs.
fn check_recipe(path: &Path, state: &State, options: &TrainOptions) -> Result<()> {
    let (saved, now) = (state.options.recipe(), options.recipe());
    if saved != now {
        return Err(Error::Training(format!(
            "checkpoint {}: was made with other training options ({}); use another output folder or delete the checkpoint",
            path.display(),
            hooks::checkpoint::differences(&saved, &now)
        )));
    }
    Ok(())
}

fn load_checkpoint(
    path: &Path,
    lens: &mut TunedLens,
    optimizer: &mut Optimizers,
    options: &TrainOptions,
    source: &str,
) -> Result<State> {
    let bad = |m: String| Error::Training(format!("checkpoint {}: {m}", path.display()));
    let device = lens.parameters()[0].device().clone();
    let (state, tensors): (State, _) = hooks::checkpoint::load(path, &device)?;
    check_recipe(path, &state, options)?;
    hooks::checkpoint::check_source(&state.source, source).map_err(bad)?;
    let steps = state.history.len() as u64;
    if state.tokens_consumed != steps * options.tokens_per_step as u64 {
        return Err(bad(format!(
            "records {steps} steps of {} tokens but {} tokens consumed: it is damaged; delete it \
             to start again",
            options.tokens_per_step, state.tokens_consumed
        )));
    }
    let params = (0..2 * lens.num_layers())
        .map(|i| {
            tensors
                .get(&format!("lens.{i}"))
                .cloned()
                .ok_or_else(|| bad(format!("missing lens.{i}")))
        })
        .collect::<Result<Vec<_>>>()?;
    lens.set_parameters(params)
        .map_err(|e| bad(e.to_string()))?;
    optimizer
        .restore(steps, &tensors, &lens.parameters())
        .map_err(|e| bad(e.to_string()))?;
    Ok(state)
}

/// Where `lens train` keeps its checkpoint inside an output folder.
pub fn checkpoint_dir(output: &Path) -> PathBuf {
    output.join("training")
}

/// The checkpoint file [`train`] keeps in its checkpoint folder.
pub(crate) fn checkpoint_file(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

/// Makes `output`'s checkpoint folder ([`checkpoint_dir`]) and returns it, refusing an
/// output that holds a lens no checkpoint accounts for (another run's, which training would
/// silently replace).
pub fn prepare_output(output: &Path) -> Result<PathBuf> {
    let dir = checkpoint_dir(output);
    hooks::checkpoint::check_output_free(&output.join("config.json"), &checkpoint_file(&dir))?;
    std::fs::create_dir_all(&dir).map_err(|e| hooks::Error::io(&dir, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_that_cannot_train_are_refused_by_name() {
        let ok = TrainOptions::default();
        ok.validate().unwrap();
        for (options, says) in [
            (
                TrainOptions {
                    lr: -1.0,
                    ..ok.clone()
                },
                "learning rate must be positive, got -1",
            ),
            (
                TrainOptions {
                    lr: f64::NAN,
                    ..ok.clone()
                },
                "learning rate must be positive, got NaN",
            ),
            (
                TrainOptions {
                    momentum: 1.0,
                    ..ok.clone()
                },
                "momentum must be in [0, 1), got 1",
            ),
            (
                TrainOptions {
                    weight_decay: -1e-3,
                    ..ok.clone()
                },
                "weight decay must be zero or positive",
            ),
            (
                TrainOptions {
                    clip: 0.0,
                    ..ok.clone()
                },
                "clip must be positive",
            ),
            (
                TrainOptions {
                    steps: u64::MAX,
                    ..ok.clone()
                },
                "more tokens than can be counted",
            ),
            (
                TrainOptions {
                    seq_len: 0,
                    ..ok.clone()
                },
                "sequence length must be positive",
            ),
            (
                TrainOptions {
                    loss: LossKind::Ce,
                    seq_len: 1,
                    tokens_per_step: 4,
                    ..ok.clone()
                },
                "at least 2 for cross-entropy training",
            ),
        ] {
            let err = options.validate().unwrap_err();
            assert!(
                matches!(err, Error::Options(_)) && err.to_string().contains(says),
                "{err}"
            );
        }
        let no_clip = TrainOptions {
            clip: f64::INFINITY,
            ..ok
        };
        no_clip.validate().unwrap();
    }
}
