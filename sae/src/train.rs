//! Training a TopK autoencoder with sparsify's recipe (`sparsify/trainer.py`, optimizer
//! `adam`): loss = FVU of each batch, `Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`; `b_dec` set to the
//! first batch's mean; Adam (PyTorch defaults, no weight decay) at
//! `lr = 2e-4 / √(num_latents / 2^14)` unless given, linear warm-up over 1000 steps then
//! linear decay to zero at the last step (transformers' `get_linear_schedule_with_warmup`,
//! so the first step has lr 0 as in sparsify); decoder rows kept at unit norm (the gradient
//! component parallel to each row is removed before the step, rows are renormalised after
//! it); dead latents = not selected for more than 10M tokens.
//!
//! Gradients are written by hand and touch only the `k` selected latents of each token
//! (see [`fvu_and_grads`]). One deliberate difference from sparsify: its fused encoder
//! backward ignores the ReLU, so a selected latent with pre-activation ≤ 0 (possible only
//! when fewer than `k` are positive) still passes gradient to the encoder; ours passes none
//! (the exact gradient).
//!
//! Checkpoints (SAE, Adam state, dead-latent counters and history in one safetensors file,
//! written atomically) let an interrupted run resume exactly where it stopped.
//!
//! Optional terms, both as in sparsify and off by default: AuxK (`auxk_alpha`) and
//! Multi-TopK (the SAE config's `multi_topk`); see [`fvu_and_grads`].
//!
//! A batch with a NaN or infinite activation stops training with an error naming its row
//! and column (nothing is skipped, and the SAE is left as it was before that step).
//!
//! Transcoders (sparsify's `--transcode`) train the same way on (module input, module
//! output) pairs: see [`Trainer::step_to`] and [`train_many`]. A skip connection
//! (`skip_connection`, sparsify's skip transcoders) is trained with the rest, by the same
//! optimiser as the other weight matrices, as sparsify does.
//!
//! Optimisers: Adam (the default) or sparsify's Muon recipe, see [`SaeOptimizer`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hooks::activations::ActivationSource;
use hooks::optim::{linear_schedule, Optimizer, Optimizers, Rule};
use hooks::HookPoint;
use serde::{Deserialize, Serialize};

use crate::kernels::{backward, encode_select, Backward, GradSum, Picks, Selection};
use crate::sae::check_finite;
use crate::sae::{sum_of_squares, total_variance as batch_variance};
use crate::{Error, Result, Sae, SaeConfig};

/// Training options; the defaults are sparsify's (Adam).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Optimiser steps.
    pub steps: u64,
    /// Tokens per step (sparsify: 32 sequences of 2048).
    pub tokens_per_step: usize,
    /// Tokens encoded at once within a step (bounds memory: the dense pre-activations
    /// take `chunk_tokens × num_latents` floats); gradients are summed over the chunks.
    pub chunk_tokens: usize,
    /// Peak learning rate; `None` means `2e-4 / √(num_latents / 2^14)` with Adam, `2e-3`
    /// with Muon (sparsify's defaults).
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// A latent is dead after this many tokens without being selected.
    pub dead_feature_threshold: u64,
    /// Weight of the AuxK loss (0: off, sparsify's default; Gao et al. use 1/32).
    pub auxk_alpha: f64,
    /// Save a checkpoint every this many steps (0: only at the end), when [`train`] is
    /// given a checkpoint folder.
    pub checkpoint_every: u64,
    /// [`train`] and [`train_many`] leave out the rows at the first this many positions of
    /// every sequence (0: none, sparsify's recipe). Models such as SmolLM2 put "massive
    /// activations" at position 0 that would otherwise dominate the FVU (see
    /// `docs/sae-smollm2.md`). Absent from older checkpoints, which mean 0.
    #[serde(default)]
    pub skip_first_positions: usize,
    /// Precision of the encoder's dense product, the FLOP-heavy step of training. Absent
    /// from older checkpoints, which mean `Auto`.
    #[serde(default)]
    pub encoder_dtype: EncoderDtype,
    /// The SAEs are already trained (sparsify's `--finetune`): the first step keeps their
    /// biases instead of setting `b_dec` (and a transcoder's encoder bias) from the batch.
    /// Absent from older checkpoints, which mean `false`.
    #[serde(default)]
    pub finetune: bool,
    /// [`train`] and [`train_many`] leave out the rows of these token ids (sparsify's
    /// `exclude_tokens`, e.g. a BOS token whose activations are outliers); the tokens counted
    /// are the rows kept. Absent from older checkpoints, which mean none.
    #[serde(default)]
    pub exclude_tokens: Vec<u32>,
    /// The optimiser (sparsify's `--optimizer adam` or `muon`). Absent from older
    /// checkpoints, which mean Adam.
    #[serde(default)]
    pub optimizer: SaeOptimizer,
    /// Steps over which the number of active latents decays linearly from `min(n, 10 d)`
    /// to the SAE's `k` (sparsify's experimental `k_decay_steps`, meant to keep latents
    /// alive early on); 0: `k` throughout. Absent from older checkpoints, which mean 0.
    #[serde(default)]
    pub k_decay_steps: u64,
}

/// How the SAE's parameters are updated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SaeOptimizer {
    /// Adam on every parameter, with the warm-up (sparsify's default).
    #[default]
    Adam,
    /// sparsify's Muon recipe: Muon (momentum 0.95, Nesterov, decoupled weight decay 0.1, 5
    /// Newton-Schulz steps) on the weight matrices with linear decay and no warm-up, Adam on
    /// the biases with the warm-up; both at the same peak learning rate.
    Muon,
}

impl SaeOptimizer {
    /// Parses `adam` or `muon`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "adam" => Ok(SaeOptimizer::Adam),
            "muon" => Ok(SaeOptimizer::Muon),
            other => Err(Error::Training(format!(
                "unknown optimizer '{other}' (expected adam or muon)"
            ))),
        }
    }
}

/// Precision of the encoder's dense product `(x − b_dec) W_encᵀ` in training (`2 d n` FLOP
/// per token, nearly all of a step's); parameters, gradients and optimiser state stay f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderDtype {
    /// bf16 on a CUDA GPU (tensor cores; sparsify's bf16 autocast does the same there), f32
    /// elsewhere.
    #[default]
    Auto,
    /// bf16 inputs with f32 sums, the pre-activations rounded to bf16 (on the CPU through
    /// candle's generic product: correct, and slower than f32).
    Bf16,
    /// The SAE's own dtype (f32) throughout.
    F32,
}

impl EncoderDtype {
    /// Parses `auto`, `bf16` or `f32`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(EncoderDtype::Auto),
            "bf16" => Ok(EncoderDtype::Bf16),
            "f32" => Ok(EncoderDtype::F32),
            other => Err(Error::Training(format!(
                "unknown encoder dtype '{other}' (expected auto, bf16 or f32)"
            ))),
        }
    }

    /// The dtype of the product for an SAE in `dtype` on `device`: bf16, or the SAE's own.
    pub fn product_dtype(self, dtype: DType, device: &Device) -> DType {
        match self {
            EncoderDtype::Auto if device.is_cuda() => DType::BF16,
            EncoderDtype::Bf16 => DType::BF16,
            EncoderDtype::Auto | EncoderDtype::F32 => dtype,
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 1000,
            tokens_per_step: 32 * 2048,
            chunk_tokens: 4096,
            lr: None,
            warmup_steps: 1000,
            dead_feature_threshold: 10_000_000,
            auxk_alpha: 0.0,
            checkpoint_every: 1000,
            skip_first_positions: 0,
            encoder_dtype: EncoderDtype::Auto,
            finetune: false,
            exclude_tokens: Vec::new(),
            optimizer: SaeOptimizer::Adam,
            k_decay_steps: 0,
        }
    }
}

impl TrainOptions {
    /// The peak learning rate for an SAE with `num_latents` latents.
    pub fn peak_lr(&self, num_latents: usize) -> f64 {
        self.lr.unwrap_or_else(|| match self.optimizer {
            SaeOptimizer::Adam => 2e-4 / (num_latents as f64 / (1u64 << 14) as f64).sqrt(),
            // sparsify: Muon's rate does not depend on the number of latents.
            SaeOptimizer::Muon => 2e-3,
        })
    }
}

/// The FVU of a batch and its gradient.
#[derive(Debug, Clone)]
pub struct FvuGrads {
    /// `Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`.
    pub fvu: f64,
    /// Gradients in the order of [`Sae::parameters`]: `[W_enc, b_enc, W_dec, b_dec]`.
    pub grads: Vec<Tensor>,
    /// Activations of the selected latents `[N, k]`.
    pub top_acts: Tensor,
    /// The selected latents `[N, k]` (u32).
    pub top_indices: Tensor,
    /// The AuxK loss before weighting (0 without AuxK or without dead latents).
    pub auxk_loss: f64,
    /// With Multi-TopK: the FVU of the reconstruction from the `4k` most active latents,
    /// and those latents `[N, 4k]` (which sparsify counts as fired).
    pub multi_topk: Option<(f64, Tensor)>,
}

/// What the AuxK objective (Gao et al. 2024, as in sparsify) needs for one batch.
#[derive(Debug, Clone, Copy)]
pub struct AuxK<'a> {
    /// Per latent: whether it is dead (not selected for more than the threshold).
    pub dead: &'a [bool],
    /// Weight of the AuxK loss in the objective (sparsify's `auxk_alpha`).
    pub alpha: f64,
}

/// The FVU of `sae` on `x: [N, d]` and its exact gradient with respect to the parameters
/// (piecewise: the TopK selection is held fixed). With `x̂ = Σ_j a_j W_dec[i_j] + b_dec`,
/// `g = 2 (x̂ − x) / TV` and `ga_j = g · W_dec[i_j]` (0 where `a_j = 0`):
/// `∂W_dec[i_j] += a_j g`, `∂W_enc[i_j] += ga_j (x − b_dec)`, `∂b_enc[i_j] += ga_j`,
/// `∂b_dec = Σ_tokens (g − Σ_j ga_j W_enc[i_j])`. CPU f32 uses a fused kernel (tokens,
/// then latents, in parallel); other devices and dtypes use generic tensor ops. With a skip
/// connection, `x̂` also has `+ W_skip x` (`x` the raw input) and `∂W_skip = Σ_tokens g xᵀ`;
/// the gradients come out as [`Sae::parameters`] lists them.
///
/// `total_variance` is `TV`; `None` computes it from `x`. Pass the whole batch's value when
/// `x` is one chunk of it: the chunks' FVUs and gradients then add up to the batch's
/// (sparsify does the same for its micro-batches).
///
/// With `multi_topk` in the config, the objective also has Gao et al.'s Multi-TopK term
/// `FVU_4k / 8`, the FVU of decoding the `4k` most active latents (sparsify's weighting);
/// its gradient reaches the encoder too (sparsify 1.3.3 drops that part, as for AuxK), and
/// its reconstruction includes the skip connection (sparsify 1.3.3's leaves it out).
///
/// With `auxk`, the gradient is that of `FVU + alpha · AuxK`: `AuxK = s Σ‖ê − e‖² / TV`
/// where `e = x − x̂` is held constant, `ê` decodes (without `b_dec`) the
/// `k_aux = min(d/2, #dead)` most active dead latents and `s = min(#dead / (d/2), 1)`,
/// as in sparsify. Unlike sparsify 1.3.3, whose fused encoder drops the gradient of the
/// pre-activations, the AuxK gradient also reaches the encoder (and `b_dec` through the
/// encoder input), as in OpenAI's implementation: that is what lets dead latents revive.
pub fn fvu_and_grads(
    sae: &Sae,
    x: &Tensor,
    total_variance: Option<f64>,
    auxk: Option<&AuxK>,
) -> Result<FvuGrads> {
    fvu_and_grads_to(sae, x, x, total_variance, auxk)
}

/// [`fvu_and_grads`] for a prediction of `target: [N, d]` from `input: [N, d]` (a
/// transcoder: a module's output from its input). The FVU, its total variance and the AuxK
/// residual are the target's; a transcoder's encoder sees `input` itself (no `− b_dec`), so
/// `b_dec` gets gradient only as the output bias.
pub fn fvu_and_grads_to(
    sae: &Sae,
    input: &Tensor,
    target: &Tensor,
    total_variance: Option<f64>,
    auxk: Option<&AuxK>,
) -> Result<FvuGrads> {
    let mut sums = GradSums::default();
    let weights = ProductWeights::new(sae, sae.w_enc().dtype())?;
    let mut out = accumulate(
        sae,
        input,
        target,
        total_variance,
        auxk,
        &weights,
        &mut sums,
    )?;
    out.grads = sums.tensors()?;
    Ok(out)
}

/// The weights of the dense products (encoder, skip connection) in the products' dtype:
/// the SAE's own, or copies made once per step.
struct ProductWeights {
    encoder: Tensor,
    skip: Option<Tensor>,
}

impl ProductWeights {
    fn new(sae: &Sae, dtype: DType) -> Result<Self> {
        Ok(ProductWeights {
            encoder: sae.w_enc().to_dtype(dtype)?,
            skip: sae.w_skip().map(|w| w.to_dtype(dtype)).transpose()?,
        })
    }
}

/// Gradients summed over the terms and chunks of one step: the SAE's four weights, and the
/// skip connection's (a dense `[d, d]` product per term).
#[derive(Default)]
struct GradSums {
    weights: GradSum,
    skip: Option<Tensor>,
}

impl std::fmt::Debug for GradSums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradSums")
    }
}

impl GradSums {
    /// Adds `∂W_skip = scale (x̂ − y)ᵀ input` for one term, the product in `input`'s dtype.
    fn add_skip(
        &mut self,
        x_hat: &Tensor,
        target: &Tensor,
        input: &Tensor,
        scale: f64,
    ) -> Result<()> {
        let g = ((x_hat - target)? * scale)?.to_dtype(input.dtype())?;
        let grad = g.t()?.matmul(input)?.to_dtype(x_hat.dtype())?;
        self.skip = Some(match self.skip.take() {
            Some(sum) => (sum + grad)?,
            None => grad,
        });
        Ok(())
    }

    /// The sums in the order of [`Sae::parameters`] (sharing host buffers, see
    /// [`GradSum::tensors`]).
    fn tensors(&self) -> Result<Vec<Tensor>> {
        let mut grads = self.weights.tensors()?;
        grads.extend(self.skip.clone());
        Ok(grads)
    }

    /// Back to nothing added, keeping the host buffers.
    fn reset(&mut self) -> Result<()> {
        self.skip = None;
        self.weights.reset()
    }
}

/// [`fvu_and_grads_to`] with the gradients added to `sums` (the returned `grads` is empty),
/// the dense products with `weights`.
fn accumulate(
    sae: &Sae,
    input: &Tensor,
    target: &Tensor,
    total_variance: Option<f64>,
    auxk: Option<&AuxK>,
    weights: &ProductWeights,
    sums: &mut GradSums,
) -> Result<FvuGrads> {
    check_trainable(sae)?;
    let input = sae.input(input, "training input")?;
    let x = sae.input(target, "training target")?;
    if x.dim(0)? != input.dim(0)? {
        return Err(Error::Training(format!(
            "the training target has {} rows, the input {}",
            x.dim(0)?,
            input.dim(0)?
        )));
    }
    let tv = match total_variance {
        Some(tv) => tv,
        None => batch_variance(&x)?,
    };
    if tv.is_nan() || tv <= 0.0 {
        return Err(Error::Sae(format!(
            "the batch has no variance (total variance {tv}); the FVU is undefined"
        )));
    }
    let xc = sae.encoder_input(&input)?;
    let k = sae.k();
    let multi = sae.config().multi_topk;
    let aux_size = match auxk {
        Some(auxk) => auxk_size(sae, auxk.dead)?,
        None => None,
    };
    let picks = Picks {
        k: if multi { 4 * k } else { k },
        dead: auxk.zip(aux_size).map(|(a, (k_aux, _))| (a.dead, k_aux)),
    };
    let (wide, aux_selection) = encode_select(&xc, &weights.encoder, sae.b_enc(), picks)?;
    let (top_acts, top_indices) = if multi {
        (
            wide.acts.narrow(1, 0, k)?.contiguous()?,
            wide.indices.narrow(1, 0, k)?.contiguous()?,
        )
    } else {
        (wide.acts.clone(), wide.indices.clone())
    };
    let encoder_bias = !sae.config().transcode;
    // The skip connection's share of every reconstruction, and the input it is a product of.
    let skip = match &weights.skip {
        Some(w_skip) => {
            let input = input.to_dtype(w_skip.dtype())?;
            let out = input.matmul(&w_skip.t()?)?.to_dtype(x.dtype())?;
            Some((input, out))
        }
        None => None,
    };
    let reconstruct = |acts: &Tensor, indices: &Tensor| -> Result<Tensor> {
        let decoded = sae.decode_unchecked(acts, indices)?;
        Ok(match &skip {
            Some((_, out)) => (decoded + out)?,
            None => decoded,
        })
    };
    let term_backward = |b: &Backward, sums: &mut GradSums| -> Result<()> {
        backward(b, &mut sums.weights)?;
        if let Some((input, _)) = &skip {
            sums.add_skip(b.x_hat, b.target, input, b.scale)?;
        }
        Ok(())
    };
    let x_hat = reconstruct(&top_acts, &top_indices)?;
    let residual = (&x - &x_hat)?;
    let l2 = sum_of_squares(&residual)?;
    let term = |acts, indices, x_hat, scale| Backward {
        target: &x,
        xc: &xc,
        acts,
        indices,
        x_hat,
        w_enc: sae.w_enc(),
        w_dec: sae.w_dec(),
        scale,
        decoder_bias: true,
        encoder_bias,
    };
    term_backward(&term(&top_acts, &top_indices, &x_hat, 2.0 / tv), sums)?;
    let mut multi_topk = None;
    if multi {
        let x_hat = reconstruct(&wide.acts, &wide.indices)?;
        term_backward(
            &term(&wide.acts, &wide.indices, &x_hat, 2.0 / (8.0 * tv)),
            sums,
        )?;
        multi_topk = Some((sum_of_squares(&(&x - &x_hat)?)? / tv, wide.indices));
    }
    let mut auxk_loss = 0.0;
    if let (Some(auxk), Some(selection), Some((_, scale))) = (auxk, &aux_selection, aux_size) {
        auxk_loss = scale
            * auxk_and_grads(
                sae,
                &xc,
                &residual,
                selection,
                scale * auxk.alpha,
                tv,
                &mut sums.weights,
            )?;
    }
    Ok(FvuGrads {
        fvu: l2 / tv,
        grads: Vec::new(),
        top_acts,
        top_indices,
        auxk_loss,
        multi_topk,
    })
}

/// Refuses SAEs this trainer cannot train.
fn check_trainable(sae: &Sae) -> Result<()> {
    let config = sae.config();
    if !matches!(sae.activation(), crate::Activation::TopK)
        || sae.subtracts_b_dec() == config.transcode
    {
        return Err(Error::Training(format!(
            "only TopK SAEs as sparsify makes them can be trained (this one is '{}'{})",
            config.activation,
            if sae.subtracts_b_dec() {
                ""
            } else {
                " without apply_b_dec_to_input"
            }
        )));
    }
    if config.multi_topk && 4 * config.k > config.latents() {
        return Err(Error::Training(format!(
            "Multi-TopK needs 4k = {} latents but the SAE has {}",
            4 * config.k,
            config.latents()
        )));
    }
    Ok(())
}

/// AuxK's selection size and scale for this dead-latent mask: `(k_aux, s)` with
/// `k_aux = min(d/2, #dead)` and `s = min(#dead / (d/2), 1)`; `None` without dead latents.
fn auxk_size(sae: &Sae, dead: &[bool]) -> Result<Option<(usize, f64)>> {
    let n = sae.num_latents();
    if dead.len() != n {
        return Err(Error::Training(format!(
            "the dead-latent mask has {} entries for {n} latents",
            dead.len()
        )));
    }
    let num_dead = dead.iter().filter(|&&d| d).count();
    if num_dead == 0 {
        return Ok(None);
    }
    let half = (sae.d_in() / 2).max(1);
    Ok(Some((
        half.min(num_dead),
        (num_dead as f64 / half as f64).min(1.0),
    )))
}

/// `Σ‖ê − e‖² / TV` for the AuxK `selection` (ê decodes it without `b_dec`, `e` is the
/// main residual, held constant); adds the gradient of `weight` times it to `sum`.
fn auxk_and_grads(
    sae: &Sae,
    xc: &Tensor,
    residual: &Tensor,
    selection: &Selection,
    weight: f64,
    tv: f64,
    sum: &mut GradSum,
) -> Result<f64> {
    let zero = sae.b_dec().zeros_like()?;
    let e_hat = crate::kernels::decode(&selection.acts, &selection.indices, sae.w_dec(), &zero)?;
    backward(
        &Backward {
            target: residual,
            xc,
            acts: &selection.acts,
            indices: &selection.indices,
            x_hat: &e_hat,
            w_enc: sae.w_enc(),
            w_dec: sae.w_dec(),
            scale: 2.0 * weight / tv,
            decoder_bias: false,
            encoder_bias: !sae.config().transcode,
        },
        sum,
    )?;
    Ok(sum_of_squares(&(&e_hat - residual)?)? / tv)
}

/// Removes from each row of `grad` its component along the same (unit-norm) row of
/// `w_dec` (sparsify's `remove_gradient_parallel_to_decoder_directions`).
pub fn remove_parallel_component(grad: &Tensor, w_dec: &Tensor) -> Result<Tensor> {
    crate::kernels::remove_parallel(grad, w_dec)
}

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step number, from 1.
    pub step: u64,
    /// FVU of the step's batch (before the update).
    pub fvu: f64,
    /// Unweighted AuxK loss of the batch (0 when AuxK is off or no latent is dead).
    pub auxk_loss: f64,
    /// FVU of the `4k`-latent reconstruction (0 without Multi-TopK).
    pub multi_topk_fvu: f64,
    /// Mean number of latents with a positive activation per token (at most `k`).
    pub l0: f64,
    /// Fraction of latents not selected for more than the dead-feature threshold.
    pub dead_fraction: f64,
    /// Learning rate used (with Muon, the biases' Adam rate, with the warm-up).
    pub lr: f64,
    /// With Muon, the weight matrices' rate (no warm-up); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_lr: Option<f64>,
    /// With a k decay, the step's number of active latents; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
}

/// Optimiser, schedule and dead-latent state for training one SAE, one batch at a time.
#[derive(Debug)]
pub struct Trainer {
    options: TrainOptions,
    /// Adam over every parameter, or over the biases while Muon updates the matrices.
    optimizers: Optimizers,
    /// The SAE's own `k`, where a k decay ends.
    final_k: usize,
    tokens_since_fired: Vec<u64>,
    steps_done: u64,
    /// Gradient buffers kept from step to step.
    grad_sums: GradSums,
}

impl Trainer {
    /// A trainer for `sae` (checks the options and that the SAE is a TopK autoencoder).
    pub fn new(sae: &Sae, options: TrainOptions) -> Result<Self> {
        check_trainable(sae)?;
        if options.steps == 0 || options.tokens_per_step == 0 || options.chunk_tokens == 0 {
            return Err(Error::Training(
                "steps, tokens per step and chunk size must be positive".into(),
            ));
        }
        if !(options.auxk_alpha >= 0.0 && options.auxk_alpha.is_finite()) {
            return Err(Error::Training(format!(
                "the AuxK weight must be zero or positive, got {}",
                options.auxk_alpha
            )));
        }
        let lr = options.peak_lr(sae.num_latents());
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(Error::Training(format!(
                "the learning rate must be positive, got {lr}"
            )));
        }
        if options.k_decay_steps > 0 {
            let initial = initial_k(sae);
            if sae.config().multi_topk && 4 * initial > sae.num_latents() {
                return Err(Error::Training(format!(
                    "Multi-TopK with a k decay needs 4 x {initial} latents at the start (k from min(n, 10 d) = {initial}), but the SAE has {}",
                    sae.num_latents()
                )));
            }
            if sae.w_enc().device().is_cuda() && initial > crate::GPU_MAX_K {
                return Err(Error::Training(format!(
                    "a k decay starts at min(n, 10 d) = {initial} active latents, more than the {} the GPU's TopK kernel selects; train on the CPU or without --k-decay-steps",
                    crate::GPU_MAX_K
                )));
            }
        }
        let adam = Optimizer::new(
            Rule::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                amsgrad: false,
            },
            0.0,
        );
        let optimizers = match options.optimizer {
            SaeOptimizer::Adam => Optimizers::single(adam),
            SaeOptimizer::Muon => {
                let muon = Rule::Muon {
                    momentum: 0.95,
                    nesterov: true,
                    ns_steps: 5,
                };
                Optimizers::muon_and(Optimizer::new(muon, 0.1), adam)?
            }
        };
        Ok(Trainer {
            options,
            optimizers,
            final_k: sae.k(),
            tokens_since_fired: vec![0; sae.num_latents()],
            steps_done: 0,
            grad_sums: GradSums::default(),
        })
    }

    /// The options.
    pub fn options(&self) -> &TrainOptions {
        &self.options
    }

    /// The number of active latents for the step after `steps_done` steps: with a k decay
    /// over `K` steps, `round(k₀ (1 − s/K) + k s/K)` (ties to even, as Python's `round`)
    /// from `k₀ = min(n, 10 d)`, then `k`. (sparsify lags this by one step: its first two
    /// steps both use `k₀`.)
    pub fn k_at(&self, sae: &Sae, steps_done: u64) -> usize {
        let decay = self.options.k_decay_steps;
        if steps_done >= decay {
            return self.final_k;
        }
        let progress = steps_done as f64 / decay as f64;
        let k = initial_k(sae) as f64 * (1.0 - progress) + self.final_k as f64 * progress;
        k.round_ties_even() as usize
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Per latent, tokens seen since it was last selected.
    pub fn tokens_since_fired(&self) -> &[u64] {
        &self.tokens_since_fired
    }

    /// Fraction of latents not selected for more than the dead-feature threshold.
    pub fn dead_fraction(&self) -> f64 {
        let dead = self
            .tokens_since_fired
            .iter()
            .filter(|&&t| t > self.options.dead_feature_threshold)
            .count();
        dead as f64 / self.tokens_since_fired.len() as f64
    }

    /// One optimiser step on the batch `x: [N, d]` (on the first step, unless the options
    /// say `finetune`, `b_dec` is set to the batch mean first).
    pub fn step(&mut self, sae: &mut Sae, x: &Tensor) -> Result<StepRecord> {
        self.step_to(sae, x, x)
    }

    /// One optimiser step of a transcoder predicting `target` from `input` (both `[N, d]`).
    /// On the first step, as sparsify does, `b_dec` becomes the target's mean and the
    /// encoder bias `−mean(input) W_encᵀ` (pre-activations centred), unless the options say
    /// `finetune`; a transcoder's decoder is not kept at unit norm.
    pub fn step_to(
        &mut self,
        sae: &mut Sae,
        input: &Tensor,
        target: &Tensor,
    ) -> Result<StepRecord> {
        let step = self.steps_done + 1;
        if sae.num_latents() != self.tokens_since_fired.len() {
            return Err(Error::Training(format!(
                "this trainer was made for an SAE with {} latents, not {}",
                self.tokens_since_fired.len(),
                sae.num_latents()
            )));
        }
        let input = sae.input(input, "training batch")?;
        let x = sae.input(target, "training target")?;
        if input.dim(0)? == 0 {
            // An empty step would still advance the schedule and the step count.
            return Err(Error::Sae("the training batch has no rows".into()));
        }
        check_finite(&input, "training batch")?;
        check_finite(&x, "training target")?;
        let decaying = self.options.k_decay_steps > 0;
        if decaying {
            sae.set_k(self.k_at(sae, self.steps_done))?;
        }
        let transcode = sae.config().transcode;
        let unit_decoder = sae.config().normalize_decoder && !transcode;
        if self.steps_done == 0 && !self.options.finetune {
            let mut params = sae.parameters();
            params[3] = x.mean(0)?;
            if transcode {
                params[1] = input
                    .mean_keepdim(0)?
                    .matmul(&sae.w_enc().t()?)?
                    .squeeze(0)?
                    .neg()?;
            }
            sae.set_parameters(params)?;
        }
        // The decoder is normalised after every step; the first step starts from whatever
        // the SAE holds.
        if unit_decoder && self.steps_done == 0 {
            sae.set_decoder_norm_to_unit_norm()?;
        }
        let dead: Vec<bool> = self
            .tokens_since_fired
            .iter()
            .map(|&t| t > self.options.dead_feature_threshold)
            .collect();
        let auxk = AuxK {
            dead: &dead,
            alpha: self.options.auxk_alpha,
        };
        let Batch {
            fvu,
            auxk_loss,
            multi_topk_fvu,
            mut grads,
            fired,
            active,
        } = batch_grads(
            sae,
            &input,
            &x,
            self.options.chunk_tokens,
            (auxk.alpha > 0.0).then_some(&auxk),
            self.options
                .encoder_dtype
                .product_dtype(x.dtype(), x.device()),
            &mut self.grad_sums,
        )?;
        if !fvu.is_finite() {
            return Err(Error::Training(format!(
                "non-finite FVU at step {step} (activations or SAE diverged)"
            )));
        }
        // The gradients are this trainer's own buffers: the projection can overwrite them.
        if unit_decoder && !crate::kernels::remove_parallel_in_place(&grads[2], sae.w_dec())? {
            grads[2] = remove_parallel_component(&grads[2], sae.w_dec())?;
        }
        let peak = self.options.peak_lr(sae.num_latents());
        let lr = peak
            * linear_schedule(
                self.steps_done,
                self.options.warmup_steps,
                self.options.steps,
            );
        let mut params = sae.parameters();
        // Muon's matrices: no warm-up.
        let matrix_lr = peak * linear_schedule(self.steps_done, 0, self.options.steps);
        self.optimizers.step(&mut params, &grads, lr, matrix_lr)?;
        // The optimiser made new parameter tensors: the decoder can be normalised in place.
        let normalised = unit_decoder && crate::kernels::unit_rows_in_place(&params[2])?;
        sae.set_parameters(params)?;
        if unit_decoder && !normalised {
            sae.set_decoder_norm_to_unit_norm()?;
        }

        let tokens = x.dim(0)?;
        for t in self.tokens_since_fired.iter_mut() {
            *t += tokens as u64;
        }
        for i in fired {
            self.tokens_since_fired[i as usize] = 0;
        }
        self.steps_done = step;
        Ok(StepRecord {
            step,
            fvu,
            auxk_loss,
            multi_topk_fvu,
            l0: active / tokens.max(1) as f64,
            dead_fraction: self.dead_fraction(),
            lr,
            matrix_lr: self.optimizers.has_muon().then_some(matrix_lr),
            k: decaying.then(|| sae.k()),
        })
    }
}

/// Where a k decay starts: `min(n, 10 d)` active latents (sparsify's).
fn initial_k(sae: &Sae) -> usize {
    sae.num_latents().min(10 * sae.d_in())
}

/// A whole step's FVU and gradients, summed over chunks.
struct Batch {
    fvu: f64,
    auxk_loss: f64,
    multi_topk_fvu: f64,
    grads: Vec<Tensor>,
    /// Every latent selected for some token (with repeats; the `4k` with Multi-TopK).
    fired: Vec<u32>,
    /// Number of positive activations.
    active: f64,
}

/// The losses and summed gradients of one batch, in chunks of `chunk_tokens`, the sums in
/// `sums` (reset first; the returned gradients share its host buffers).
fn batch_grads(
    sae: &Sae,
    input: &Tensor,
    x: &Tensor,
    chunk_tokens: usize,
    auxk: Option<&AuxK>,
    product: DType,
    sums: &mut GradSums,
) -> Result<Batch> {
    let tv = batch_variance(x)?;
    let n = x.dim(0)?;
    let mut batch = Batch {
        fvu: 0.0,
        auxk_loss: 0.0,
        multi_topk_fvu: 0.0,
        grads: Vec::new(),
        fired: Vec::new(),
        active: 0.0,
    };
    sums.reset()?;
    // Cast once per step, not once per chunk.
    let weights = ProductWeights::new(sae, product)?;
    for start in (0..n).step_by(chunk_tokens) {
        let len = chunk_tokens.min(n - start);
        let (chunk_in, chunk) = (input.narrow(0, start, len)?, x.narrow(0, start, len)?);
        let out = accumulate(sae, &chunk_in, &chunk, Some(tv), auxk, &weights, sums)?;
        batch.fvu += out.fvu;
        batch.auxk_loss += out.auxk_loss;
        let fired = match &out.multi_topk {
            Some((fvu, indices)) => {
                batch.multi_topk_fvu += fvu;
                indices
            }
            None => &out.top_indices,
        };
        batch.fired.extend(fired.flatten_all()?.to_vec1::<u32>()?);
        batch.active += out
            .top_acts
            .gt(0.0)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    batch.grads = sums.tensors()?;
    Ok(batch)
}

/// Rows of some hook points taken from a source in exact counts (the same rows for every
/// point, without those of excluded tokens), carrying the rest of a batch over to the next
/// call.
struct Rows<'s> {
    source: &'s mut dyn ActivationSource,
    points: Vec<HookPoint>,
    /// Token ids whose rows are left out.
    exclude: &'s [u32],
    /// Per point, rows read but not yet taken.
    pending: Vec<Vec<Tensor>>,
    have: usize,
    consumed: u64,
}

impl Rows<'_> {
    /// Exactly `n` rows `[n, d]` per point, or `Err(available)` when the data runs out first.
    fn take(&mut self, n: usize) -> Result<std::result::Result<Vec<Tensor>, usize>> {
        while self.have < n {
            let Some(batch) = self.source.next_batch()? else {
                return Ok(Err(self.have));
            };
            let kept: Vec<u32> = (0..batch.len() as u32)
                .filter(|&i| !self.exclude.contains(&batch.tokens[i as usize]))
                .collect();
            let count = kept.len();
            if count == 0 {
                continue;
            }
            // The rows kept, as an index on the batch's device (when some are left out).
            let index = match batch.activations.values().next() {
                Some(rows) if count < batch.len() => {
                    Some(Tensor::new(kept.as_slice(), rows.device())?)
                }
                _ => None,
            };
            for (point, pending) in self.points.iter().zip(self.pending.iter_mut()) {
                let rows = batch.activations.get(point).ok_or_else(|| {
                    Error::Training(format!("a batch lacks hook point '{point}'"))
                })?;
                pending.push(match &index {
                    Some(index) => rows.index_select(index, 0)?,
                    None => rows.clone(),
                });
            }
            self.have += count;
        }
        let mut taken = Vec::with_capacity(self.points.len());
        for pending in self.pending.iter_mut() {
            let all = Tensor::cat(pending, 0)?;
            *pending = if self.have > n {
                vec![all.narrow(0, n, self.have - n)?]
            } else {
                Vec::new()
            };
            taken.push(all.narrow(0, 0, n)?);
        }
        self.have -= n;
        self.consumed += n as u64;
        Ok(Ok(taken))
    }

    /// Skips `n` rows (cheaply where the source can, unless rows are excluded: then the
    /// source's rows are not the rows counted), to resume.
    fn skip(&mut self, n: u64) -> Result<()> {
        let mut rest = if self.exclude.is_empty() {
            n - self.source.skip_tokens(n)?
        } else {
            n
        };
        while rest > 0 {
            let chunk = rest.min(1 << 16) as usize;
            if self.take(chunk)?.is_err() {
                return Err(Error::Training(format!(
                    "cannot resume: the data has fewer than {n} tokens"
                )));
            }
            rest -= chunk as u64;
        }
        self.consumed = n;
        Ok(())
    }
}

/// Training state saved with each checkpoint (as JSON in the safetensors header).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    options: TrainOptions,
    config: SaeConfig,
    tokens_consumed: u64,
    history: Vec<StepRecord>,
    /// What the run read ([`ActivationSource::describe`]); absent from older checkpoints.
    #[serde(default)]
    source: String,
    /// The data behind the tokens consumed ([`ActivationSource::data_fingerprint`]).
    #[serde(default)]
    data_fingerprint: Option<String>,
}

/// The hook point a transcoder at `target` reads its input from: the MLP's input for
/// `layers.N.mlp` (the only module whose input the hook runtime exposes). The error names
/// `target` as `name` (the model's spelling of it).
pub fn transcoder_input(target: HookPoint, name: &str) -> Result<HookPoint> {
    match target {
        HookPoint::Mlp(i) => Ok(HookPoint::MlpInput(i)),
        _ => Err(Error::Sae(format!(
            "a transcoder maps an MLP's input to its output, so it must sit at an MLP \
             (layers.N.mlp), not at '{name}'"
        ))),
    }
}

/// Where [`train`] keeps its checkpoint inside a checkpoint folder.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

/// Trains `sae` on the activations at `point` from `source` for `options.steps` steps of
/// exactly `options.tokens_per_step` tokens (batches are split and joined as needed;
/// with `options.skip_first_positions`, the source is first told to leave out the rows at
/// the first positions of each sequence, so the tokens counted are the rows kept);
/// `on_step` sees each step's record. With `checkpoint_dir`, resumes from the checkpoint
/// there (SAE, Adam state, dead-latent counters, history; the source is advanced past the
/// tokens already used) and writes one every `checkpoint_every` steps and at the end.
/// Returns the history, resumed steps included.
pub fn train(
    sae: &mut Sae,
    source: &mut dyn ActivationSource,
    point: HookPoint,
    options: &TrainOptions,
    checkpoint_dir: Option<&Path>,
    mut on_step: impl FnMut(&StepRecord),
) -> Result<Vec<StepRecord>> {
    let dirs = checkpoint_dir.map(|d| vec![d.to_path_buf()]);
    let mut histories = train_many(
        std::slice::from_mut(sae),
        source,
        &[point],
        options,
        dirs.as_deref(),
        |_, r| on_step(r),
    )?;
    Ok(histories.pop().unwrap_or_default())
}

/// Trains one SAE per hook point in a single pass over `source`: `saes[i]` on the
/// activations at `points[i]` (a transcoder, `transcode` in its config, predicts the
/// activations at `points[i] = layers.N.mlp` from those at `layers.N.mlp.input`, which the
/// source must have too), every SAE seeing the same tokens at each step (the model runs
/// once for all of them). Otherwise as [`train`]; `checkpoint_dirs` has one folder per SAE,
/// and a resumed run needs every SAE's checkpoint at the same step. `on_step` gets the SAE's
/// index and its record. Returns each SAE's history.
pub fn train_many(
    saes: &mut [Sae],
    source: &mut dyn ActivationSource,
    points: &[HookPoint],
    options: &TrainOptions,
    checkpoint_dirs: Option<&[PathBuf]>,
    mut on_step: impl FnMut(usize, &StepRecord),
) -> Result<Vec<Vec<StepRecord>>> {
    if saes.len() != points.len() || saes.is_empty() {
        return Err(Error::Training(format!(
            "need one SAE per hook point, got {} SAEs for {} hook points",
            saes.len(),
            points.len()
        )));
    }
    if let Some(dirs) = checkpoint_dirs {
        if dirs.len() != saes.len() {
            return Err(Error::Training(format!(
                "need one checkpoint folder per SAE, got {} for {}",
                dirs.len(),
                saes.len()
            )));
        }
    }
    // A transcoder at `layers.N.mlp` reads its input at `layers.N.mlp.input`.
    let inputs = saes
        .iter()
        .zip(points)
        .map(|(sae, &point)| {
            if sae.config().transcode {
                transcoder_input(point, &point.to_string())
            } else {
                Ok(point)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let mut needed: Vec<HookPoint> = Vec::new();
    for point in points.iter().chain(&inputs) {
        if !source.hook_points().contains(point) {
            return Err(Error::Training(format!(
                "the activation source has no hook point '{point}'"
            )));
        }
        if !needed.contains(point) {
            needed.push(*point);
        }
    }
    let slot = |p: &HookPoint| needed.iter().position(|n| n == p).unwrap_or(0);
    let slots: Vec<(usize, usize)> = inputs
        .iter()
        .zip(points)
        .map(|(i, t)| (slot(i), slot(t)))
        .collect();
    let mut trainers = saes
        .iter()
        .map(|sae| Trainer::new(sae, options.clone()))
        .collect::<Result<Vec<_>>>()?;
    source.skip_first_positions(options.skip_first_positions)?;
    hooks::activations::check_rows_suffice(source, options.steps, options.tokens_per_step)?;
    if options.warmup_steps >= options.steps {
        tracing::warn!(
            "the run ends inside its {}-step learning-rate warm-up ({} steps): the learning rate never reaches its peak; give fewer warm-up steps (--lr-warmup-steps)",
            options.warmup_steps,
            options.steps
        );
    }
    let mut rows = Rows {
        source,
        points: needed.clone(),
        exclude: &options.exclude_tokens,
        pending: vec![Vec::new(); needed.len()],
        have: 0,
        consumed: 0,
    };
    let mut histories = vec![Vec::new(); saes.len()];
    // Held to the end: another run into these folders is refused meanwhile.
    let _locks = checkpoint_dirs
        .unwrap_or_default()
        .iter()
        .map(|d| hooks::atomic::lock_folder(d))
        .collect::<hooks::Result<Vec<_>>>()?;
    let checkpoints: Option<Vec<PathBuf>> =
        checkpoint_dirs.map(|dirs| dirs.iter().map(|d| checkpoint_path(d)).collect());
    let resume_from = match &checkpoints {
        Some(paths) if hooks::checkpoint::recover_together(paths)? => Some(paths),
        _ => None,
    };
    if let Some(paths) = resume_from {
        let mut consumed = None;
        let mut fingerprints = Vec::new();
        for (i, path) in paths.iter().enumerate() {
            let source = rows.source.describe();
            let state = load_checkpoint(path, &mut saes[i], &mut trainers[i], &source)?;
            if consumed.is_some_and(|c| c != state.tokens_consumed) {
                return Err(Error::Training(format!(
                    "checkpoint {} is at another step than the others (copied from another \
                     run, or damaged); cannot resume the SAEs together: delete the checkpoints \
                     folder to start again",
                    path.display()
                )));
            }
            consumed = Some(state.tokens_consumed);
            histories[i] = state.history;
            fingerprints.push((path, state.data_fingerprint));
        }
        // A finished run reads nothing more: its data is not read again only to be compared
        // (with excluded tokens, a skip runs the model over every row).
        if trainers[0].steps_done() < options.steps {
            let consumed = consumed.unwrap_or(0);
            rows.skip(consumed)?;
            let now = rows.source.data_fingerprint(consumed);
            for (path, saved) in fingerprints {
                hooks::checkpoint::check_checkpoint_data(path, saved.as_deref(), now.as_deref())
                    .map_err(Error::Training)?;
            }
        }
        rows.consumed = consumed.unwrap_or(0);
    }
    let keep = || {
        checkpoint_dirs
            .filter(|d| d.iter().all(|d| checkpoint_path(d).is_file()))
            .map(|d| {
                let names: Vec<String> = d.iter().map(|d| d.display().to_string()).collect();
                format!("; the last checkpoint in {} is kept", names.join(", "))
            })
            .unwrap_or_default()
    };
    while trainers[0].steps_done() < options.steps {
        let step = trainers[0].steps_done() + 1;
        let xs = match rows.take(options.tokens_per_step)? {
            Ok(xs) => xs,
            Err(available) => {
                return Err(Error::Training(format!(
                    "the data ran out during step {step}: {} tokens were available, {} steps x {} tokens per step need {}{}",
                    rows.consumed + available as u64,
                    options.steps,
                    options.tokens_per_step,
                    options.steps as u128 * options.tokens_per_step as u128,
                    keep()
                )))
            }
        };
        for (i, ((sae, trainer), &(input, target))) in
            saes.iter_mut().zip(&mut trainers).zip(&slots).enumerate()
        {
            let record = trainer
                .step_to(sae, &xs[input], &xs[target])
                .map_err(|e| match e {
                    Error::Training(m) if points.len() > 1 => {
                        Error::Training(format!("hook point '{}': {m}{}", points[i], keep()))
                    }
                    Error::Training(m) => Error::Training(format!("{m}{}", keep())),
                    Error::Sae(m) => Error::Sae(format!(
                        "hook point '{}', step {step}: {m}{}",
                        points[i],
                        keep()
                    )),
                    other => other,
                })?;
            on_step(i, &record);
            histories[i].push(record);
        }
        let due = options.checkpoint_every > 0 && step.is_multiple_of(options.checkpoint_every);
        if let (Some(paths), true) = (&checkpoints, due || step == options.steps) {
            // All written in full first, then all put in place so that a kill leaves one
            // step every SAE has (`.prev` files while they are replaced).
            let staged = paths
                .iter()
                .enumerate()
                .map(|(i, path)| {
                    stage_checkpoint(path, &saes[i], &trainers[i], &rows, &histories[i])
                })
                .collect::<Result<Vec<_>>>()?;
            hooks::checkpoint::commit_together(staged)?;
        }
    }
    Ok(histories)
}

/// Checkpoint names of [`Sae::parameters`] (`sae.w_skip` only with a skip connection).
const PARAMS: [&str; 5] = [
    "sae.w_enc",
    "sae.b_enc",
    "sae.w_dec",
    "sae.b_dec",
    "sae.w_skip",
];

/// Writes the checkpoint of one SAE in full, not yet in place (see `hooks::atomic::Staged`).
fn stage_checkpoint(
    path: &Path,
    sae: &Sae,
    trainer: &Trainer,
    rows: &Rows,
    history: &[StepRecord],
) -> Result<hooks::atomic::Staged> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| hooks::Error::io(dir, e))?;
    }
    let mut tensors: Vec<(String, Tensor)> = PARAMS
        .iter()
        .zip(sae.parameters())
        .map(|(name, t)| (name.to_string(), t))
        .collect();
    tensors.extend(trainer.optimizers.state_tensors());
    let fired: Vec<i64> = trainer
        .tokens_since_fired
        .iter()
        .map(|&t| t as i64)
        .collect();
    let count = fired.len();
    tensors.push((
        "tokens_since_fired".into(),
        Tensor::from_vec(fired, count, &candle_core::Device::Cpu)?,
    ));
    // The config as the run started it: a k decay changes the SAE's `k` on the way.
    let mut config = sae.config().clone();
    config.k = trainer.final_k;
    let state = State {
        options: trainer.options.clone(),
        config,
        tokens_consumed: rows.consumed,
        history: history.to_vec(),
        source: rows.source.describe(),
        data_fingerprint: rows.source.data_fingerprint(rows.consumed),
    };
    Ok(hooks::checkpoint::stage(path, tensors, &state)?)
}

fn load_checkpoint(
    path: &Path,
    sae: &mut Sae,
    trainer: &mut Trainer,
    source: &str,
) -> Result<State> {
    let bad = |m: String| Error::Training(format!("checkpoint {}: {m}", path.display()));
    let (state, tensors): (State, _) =
        hooks::checkpoint::load(path, &sae.w_enc().device().clone())?;
    hooks::checkpoint::check_source(&state.source, source).map_err(bad)?;
    let skip = (
        state.options.skip_first_positions,
        trainer.options.skip_first_positions,
    );
    if skip.0 != skip.1 {
        return Err(bad(format!(
            "was trained skipping the first {} positions of each sequence, this run skips {}; use another folder or delete the checkpoint",
            skip.0, skip.1
        )));
    }
    // How often checkpoints are written, and the tokens taken at once (a memory bound: only
    // the order in which a step's sums are taken changes), may differ.
    let saved = TrainOptions {
        checkpoint_every: trainer.options.checkpoint_every,
        chunk_tokens: trainer.options.chunk_tokens,
        ..state.options.clone()
    };
    if saved != trainer.options || state.config != *sae.config() {
        let changed = hooks::checkpoint::differences(
            &serde_json::json!({"options": saved, "config": state.config}),
            &serde_json::json!({"options": trainer.options, "config": sae.config()}),
        );
        return Err(bad(format!(
            "was made with other training options or another SAE config ({changed}); use another folder or delete the checkpoint"
        )));
    }
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| bad(format!("missing tensor '{name}'")))
    };
    let count = sae.parameters().len();
    let params = PARAMS[..count]
        .iter()
        .map(|n| get(n))
        .collect::<Result<Vec<_>>>()?;
    sae.set_parameters(params).map_err(|e| bad(e.to_string()))?;
    let steps = state.history.len() as u64;
    trainer
        .optimizers
        .restore(steps, &tensors, &sae.parameters())
        .map_err(|e| bad(e.to_string()))?;
    let fired: Vec<i64> = get("tokens_since_fired")?.to_vec1().map_err(|e| {
        bad(format!(
            "tokens_since_fired is not a list of int64 counts: {e}"
        ))
    })?;
    if let Some(negative) = fired.iter().find(|t| **t < 0) {
        return Err(bad(format!(
            "tokens_since_fired holds the negative count {negative}: it is damaged"
        )));
    }
    if fired.len() != sae.num_latents() {
        return Err(bad(format!(
            "tokens_since_fired has {} entries for {} latents",
            fired.len(),
            sae.num_latents()
        )));
    }
    trainer.tokens_since_fired = fired.into_iter().map(|t| t as u64).collect();
    trainer.steps_done = steps;
    // The k of the last step taken, as a run never stopped has it (a finished run takes no
    // step that would set it, and saves the SAE with it).
    if trainer.options.k_decay_steps > 0 && steps > 0 {
        sae.set_k(trainer.k_at(sae, steps - 1))
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform;
    use candle_core::Device;

    /// An SAE with 16 latents (k = 3) and every parameter nonzero, and 5 tokens (so at
    /// least one latent is never selected), in `dtype`.
    fn case(dtype: DType) -> (Sae, Tensor) {
        case_with(SaeConfig::new(6, 16, 3), dtype)
    }

    /// [`case`] for another config of that size (a skip connection gets a nonzero `W_skip`).
    fn case_with(config: SaeConfig, dtype: DType) -> (Sae, Tensor) {
        let mut sae = Sae::new(config, 5, &Device::Cpu).unwrap();
        let mut params = sae.parameters();
        params[1] = uniform(&[16], 0.0, 0.3, 1);
        params[2] = (&params[2] + uniform(&[16, 6], 0.0, 0.5, 2)).unwrap();
        params[3] = uniform(&[6], 0.0, 0.5, 3);
        if let Some(w_skip) = params.get_mut(4) {
            *w_skip = uniform(&[6, 6], 0.0, 0.4, 6);
        }
        sae.set_parameters(params).unwrap();
        let x = uniform(&[5, 6], 0.4, 1.7, 4);
        (sae.to_dtype(dtype).unwrap(), x.to_dtype(dtype).unwrap())
    }

    /// Checks `grads` against central differences of `loss` for every parameter element;
    /// returns how many were checked.
    fn assert_matches_finite_differences(
        sae: &Sae,
        grads: &[Tensor],
        loss: impl Fn(&Sae) -> f64,
    ) -> usize {
        let h = 1e-6;
        let mut checked = 0;
        for (p, grad) in grads.iter().enumerate() {
            let flat: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let values: Vec<f64> = sae.parameters()[p]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (e, &analytic) in flat.iter().enumerate() {
                let at = |delta: f64| {
                    let mut v = values.clone();
                    v[e] += delta;
                    let mut params = sae.parameters();
                    params[p] = Tensor::from_vec(v, params[p].shape(), &Device::Cpu).unwrap();
                    let mut moved = sae.clone();
                    moved.set_parameters(params).unwrap();
                    loss(&moved)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic).abs() < 1e-6 * (1.0 + analytic.abs()),
                    "param {p} element {e}: numeric {numeric} analytic {analytic}"
                );
                checked += 1;
            }
        }
        checked
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (sae, x) = case(DType::F64);
        let base = fvu_and_grads(&sae, &x, None, None).unwrap();
        let indices = base.top_indices.to_vec2::<u32>().unwrap();
        let checked = assert_matches_finite_differences(&sae, &base.grads, |moved| {
            let out = fvu_and_grads(moved, &x, None, None).unwrap();
            // The loss is smooth only while the selection stays put.
            assert_eq!(out.top_indices.to_vec2::<u32>().unwrap(), indices);
            assert!((out.fvu - moved.forward(&x).unwrap().fvu).abs() < 1e-12);
            out.fvu
        });
        assert_eq!(checked, 16 * 6 + 16 + 16 * 6 + 6);
        // With a skip connection `W_skip` gets its gradient too (the FVU is the forward's).
        let mut config = SaeConfig::new(6, 16, 3);
        config.skip_connection = true;
        let (skip, x) = case_with(config, DType::F64);
        let base = fvu_and_grads(&skip, &x, None, None).unwrap();
        let checked = assert_matches_finite_differences(&skip, &base.grads, |moved| {
            let out = fvu_and_grads(moved, &x, None, None).unwrap();
            assert!((out.fvu - moved.forward(&x).unwrap().fvu).abs() < 1e-12);
            out.fvu
        });
        assert_eq!(checked, 16 * 6 + 16 + 16 * 6 + 6 + 6 * 6);
        // Latents never selected get no gradient at all.
        let selected: std::collections::BTreeSet<u32> = indices.iter().flatten().copied().collect();
        let g_w_dec: Vec<Vec<f64>> = base.grads[2].to_vec2().unwrap();
        for (i, row) in g_w_dec.iter().enumerate() {
            if !selected.contains(&(i as u32)) {
                assert!(row.iter().all(|&v| v == 0.0));
            }
        }
        assert!(selected.len() < 16);
    }

    /// A skip transcoder: the encoder sees the input itself, the FVU is the target's,
    /// `b_dec` is only the output bias and `W_skip` maps the input to the output. In f64
    /// (generic path) and f32 (CPU kernels), with AuxK and Multi-TopK on (both
    /// reconstructions include the skip connection).
    #[test]
    fn transcoder_gradient_matches_finite_differences() {
        let mut config = SaeConfig::new(6, 16, 3);
        config.transcode = true;
        config.multi_topk = true;
        config.skip_connection = true;
        let (sae, x) = case_with(config, DType::F64);
        let y = (x.sin().unwrap() * 2.0).unwrap();
        let dead: Vec<bool> = (0..16).map(|i| i % 4 == 0).collect();
        let auxk = AuxK {
            dead: &dead,
            alpha: 0.5,
        };
        let base = fvu_and_grads_to(&sae, &x, &y, None, Some(&auxk)).unwrap();
        let indices = base.top_indices.to_vec2::<u32>().unwrap();
        // AuxK's residual target is held constant: take it from the base point.
        let x_hat = sae.forward_target(&x, &y).unwrap().x_hat;
        let residual = (&y - &x_hat).unwrap();
        let tv = batch_variance(&y).unwrap();
        let checked = assert_matches_finite_differences(&sae, &base.grads, |moved| {
            let out = fvu_and_grads_to(moved, &x, &y, None, None).unwrap();
            assert_eq!(out.top_indices.to_vec2::<u32>().unwrap(), indices);
            let (k_aux, scale) = auxk_size(moved, &dead).unwrap().unwrap();
            let picks = Picks {
                k: 1,
                dead: Some((&dead, k_aux)),
            };
            let (_, selection) = encode_select(&x, moved.w_enc(), moved.b_enc(), picks).unwrap();
            let selection = selection.unwrap();
            let zero = moved.b_dec().zeros_like().unwrap();
            let e_hat =
                crate::kernels::decode(&selection.acts, &selection.indices, moved.w_dec(), &zero)
                    .unwrap();
            let aux = scale * sum_of_squares(&(e_hat - &residual).unwrap()).unwrap() / tv;
            out.fvu + out.multi_topk.unwrap().0 / 8.0 + 0.5 * aux
        });
        assert_eq!(checked, 16 * 6 + 16 + 16 * 6 + 6 + 6 * 6);
        // The CPU kernels in f32 agree.
        let fast = fvu_and_grads_to(
            &sae.to_dtype(DType::F32).unwrap(),
            &x.to_dtype(DType::F32).unwrap(),
            &y.to_dtype(DType::F32).unwrap(),
            None,
            Some(&auxk),
        )
        .unwrap();
        for (a, b) in fast.grads.iter().zip(&base.grads) {
            let diff = hooks::compare::max_abs_diff(a, b).unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }

    #[test]
    fn auxk_gradient_matches_finite_differences() {
        let (sae, x) = case(DType::F64);
        let base = fvu_and_grads(&sae, &x, None, None).unwrap();
        // AuxK's target, the main residual, is a constant.
        let x_hat = sae.decode(&base.top_acts, &base.top_indices).unwrap();
        let residual = (&x - &x_hat).unwrap();
        let tv = batch_variance(&x).unwrap();
        // 5 dead latents (k_aux = d/2 = 3, scale 1) and 2 (k_aux = 2, scale 2/3).
        for dead_latents in [&[0usize, 5, 9, 12, 14][..], &[3, 7]] {
            let mut dead = vec![false; 16];
            for &i in dead_latents {
                dead[i] = true;
            }
            let auxk = AuxK {
                dead: &dead,
                alpha: 0.5,
            };
            let aux = |sae: &Sae| {
                let xc = x.broadcast_sub(sae.b_dec()).unwrap();
                let (k_aux, scale) = auxk_size(sae, &dead).unwrap().unwrap();
                let picks = Picks {
                    k: 1,
                    dead: Some((&dead, k_aux)),
                };
                let (_, selection) = encode_select(&xc, sae.w_enc(), sae.b_enc(), picks).unwrap();
                let mut sum = GradSum::Empty;
                let loss = auxk_and_grads(
                    sae,
                    &xc,
                    &residual,
                    &selection.unwrap(),
                    0.5 * scale,
                    tv,
                    &mut sum,
                )
                .unwrap();
                (scale * loss, sum.tensors().unwrap())
            };
            let (loss, grads) = aux(&sae);
            assert!(loss > 0.0);
            assert_matches_finite_differences(&sae, &grads, |moved| 0.5 * aux(moved).0);
            // The encoder gets AuxK gradient too.
            assert!(
                grads[0]
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );
            // fvu_and_grads adds exactly this term.
            let combined = fvu_and_grads(&sae, &x, None, Some(&auxk)).unwrap();
            assert!((combined.auxk_loss - loss).abs() < 1e-15);
            for ((c, b), a) in combined.grads.iter().zip(&base.grads).zip(&grads) {
                let diff = hooks::compare::max_abs_diff(&(c - b).unwrap(), a).unwrap();
                assert!(diff < 1e-12, "{diff}");
            }
        }
        let none = vec![false; 16];
        let off = AuxK {
            dead: &none,
            alpha: 1.0,
        };
        assert_eq!(
            fvu_and_grads(&sae, &x, None, Some(&off)).unwrap().auxk_loss,
            0.0
        );
    }

    #[test]
    fn multi_topk_gradient_matches_finite_differences() {
        let mut config = SaeConfig::new(6, 16, 3);
        config.multi_topk = true;
        let (sae, x) = case_with(config, DType::F64);
        let out = fvu_and_grads(&sae, &x, None, None).unwrap();
        let (fvu_4k, indices_4k) = out.multi_topk.clone().unwrap();
        assert_eq!(indices_4k.dims(), &[5, 12]);
        assert!(fvu_4k < out.fvu, "more latents reconstruct better");
        let checked = assert_matches_finite_differences(&sae, &out.grads, |moved| {
            let out = fvu_and_grads(moved, &x, None, None).unwrap();
            out.fvu + out.multi_topk.unwrap().0 / 8.0
        });
        assert_eq!(checked, 16 * 6 + 16 + 16 * 6 + 6);
    }

    #[test]
    fn cpu_kernel_matches_generic_gradients() {
        let (sae, x) = case(DType::F32);
        let fast = fvu_and_grads(&sae, &x, None, None).unwrap();
        let slow = fvu_and_grads(
            &sae.to_dtype(DType::F64).unwrap(),
            &x.to_dtype(DType::F64).unwrap(),
            None,
            None,
        )
        .unwrap();
        assert!((fast.fvu - slow.fvu).abs() < 1e-5);
        for (a, b) in fast.grads.iter().zip(&slow.grads) {
            let diff = hooks::compare::max_abs_diff(a, b).unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
        // And the generic path in f32 too.
        let xc = x.broadcast_sub(sae.b_dec()).unwrap();
        let x_hat = sae.decode(&fast.top_acts, &fast.top_indices).unwrap();
        let tv = batch_variance(&x).unwrap();
        let generic = crate::kernels::backward_generic(&Backward {
            target: &x,
            xc: &xc,
            acts: &fast.top_acts,
            indices: &fast.top_indices,
            x_hat: &x_hat,
            w_enc: sae.w_enc(),
            w_dec: sae.w_dec(),
            scale: 2.0 / tv,
            decoder_bias: true,
            encoder_bias: true,
        })
        .unwrap();
        for (a, b) in fast.grads.iter().zip(&generic) {
            let diff = hooks::compare::max_abs_diff(a, b).unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }

    /// The CPU kernels (f32, gradients summed in host buffers) against the generic path
    /// (f64) with every term on: Multi-TopK and AuxK.
    #[test]
    fn cpu_kernels_match_generic_with_auxk_and_multi_topk() {
        let mut config = SaeConfig::new(6, 16, 3);
        config.multi_topk = true;
        let (sae, x) = case_with(config, DType::F32);
        let dead: Vec<bool> = (0..16).map(|i| i % 3 == 1).collect();
        let auxk = AuxK {
            dead: &dead,
            alpha: 0.25,
        };
        let fast = fvu_and_grads(&sae, &x, None, Some(&auxk)).unwrap();
        let slow = fvu_and_grads(
            &sae.to_dtype(DType::F64).unwrap(),
            &x.to_dtype(DType::F64).unwrap(),
            None,
            Some(&auxk),
        )
        .unwrap();
        assert!(fast.auxk_loss > 0.0);
        assert!((fast.auxk_loss - slow.auxk_loss).abs() < 1e-5);
        assert!((fast.multi_topk.unwrap().0 - slow.multi_topk.unwrap().0).abs() < 1e-5);
        for (a, b) in fast.grads.iter().zip(&slow.grads) {
            let diff = hooks::compare::max_abs_diff(a, b).unwrap();
            assert!(diff < 1e-5, "{diff}");
        }
    }

    #[test]
    fn chunks_add_up_to_the_whole_batch() {
        // f32 sums add up in host buffers that the next batch reuses (zeroed); f64 in tensors.
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let (sae, x) = case(dtype);
            let mut sums = GradSums::default();
            let whole = batch_grads(&sae, &x, &x, 5, None, dtype, &mut sums).unwrap();
            let whole_grads: Vec<Tensor> = whole.grads.iter().map(|g| g.copy().unwrap()).collect();
            let chunked = batch_grads(&sae, &x, &x, 2, None, dtype, &mut sums).unwrap();
            assert!((whole.fvu - chunked.fvu).abs() < tolerance);
            assert_eq!(whole.fired, chunked.fired);
            assert_eq!(whole.active, chunked.active);
            for (a, b) in whole_grads.iter().zip(&chunked.grads) {
                let diff = hooks::compare::max_abs_diff(a, b).unwrap();
                assert!(diff < tolerance, "{dtype:?}: {diff}");
            }
        }
        let (sae, x) = case(DType::F64);
        let whole =
            batch_grads(&sae, &x, &x, 5, None, DType::F64, &mut GradSums::default()).unwrap();
        let direct = fvu_and_grads(&sae, &x, None, None).unwrap();
        assert!((direct.fvu - whole.fvu).abs() < 1e-15);
    }

    #[test]
    fn projection_removes_the_radial_component() {
        let (sae, x) = case(DType::F32);
        let g = fvu_and_grads(&sae, &x, None, None).unwrap().grads[2].clone();
        let mut unit = sae.clone();
        unit.set_decoder_norm_to_unit_norm().unwrap();
        let projected = remove_parallel_component(&g, unit.w_dec()).unwrap();
        let radial: Vec<f32> = (projected * unit.w_dec())
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(radial.iter().all(|v| v.abs() < 1e-6), "{radial:?}");
    }

    #[test]
    fn first_step_sets_b_dec_to_the_mean_and_tracks_firing() {
        let (mut sae, x) = case(DType::F32);
        let options = TrainOptions {
            steps: 10,
            tokens_per_step: 5,
            chunk_tokens: 2,
            lr: None,
            warmup_steps: 2,
            dead_feature_threshold: 4,
            auxk_alpha: 0.0,
            checkpoint_every: 0,
            skip_first_positions: 0,
            encoder_dtype: EncoderDtype::F32,
            finetune: false,
            exclude_tokens: Vec::new(),
            optimizer: SaeOptimizer::Adam,
            k_decay_steps: 0,
        };
        let mut trainer = Trainer::new(&sae, options.clone()).unwrap();
        let first = trainer.step(&mut sae, &x).unwrap();
        assert_eq!((first.step, first.lr), (1, 0.0));
        let diff = hooks::compare::max_abs_diff(sae.b_dec(), &x.mean(0).unwrap()).unwrap();
        assert!(diff < 1e-6);
        // lr 0 left the encoder as it was: the same selection as the step's.
        let (_, indices) = sae.encode(&x).unwrap();
        let fired: std::collections::BTreeSet<u32> = indices
            .to_vec2::<u32>()
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        for (i, &t) in trainer.tokens_since_fired().iter().enumerate() {
            assert_eq!(t, if fired.contains(&(i as u32)) { 0 } else { 5 });
        }
        let dead = (16 - fired.len()) as f64 / 16.0;
        assert_eq!((first.dead_fraction, trainer.dead_fraction()), (dead, dead));
        let second = trainer.step(&mut sae, &x).unwrap();
        assert!((second.lr - 0.5 * options.peak_lr(16)).abs() < 1e-15);
        assert_eq!(trainer.steps_done(), 2);
    }

    /// A k decay over 4 steps from min(n, 10 d) = 60 to k = 3, as sparsify's
    /// `get_current_k` computes it (Python's round: 31.5 -> 32), one step earlier; every
    /// step's record carries its k and selects that many latents; the SAE ends at k = 3.
    #[test]
    fn k_decays_linearly_to_the_configured_k() {
        let mut sae = Sae::new(SaeConfig::new(6, 64, 3), 5, &Device::Cpu).unwrap();
        let (_, x) = case(DType::F32);
        let options = TrainOptions {
            steps: 6,
            warmup_steps: 1,
            k_decay_steps: 4,
            ..TrainOptions::default()
        };
        let mut trainer = Trainer::new(&sae, options).unwrap();
        let schedule: Vec<usize> = (0..6).map(|s| trainer.k_at(&sae, s)).collect();
        assert_eq!(schedule, vec![60, 46, 32, 17, 3, 3]);
        for want in schedule {
            let record = trainer.step(&mut sae, &x).unwrap();
            assert_eq!(record.k, Some(want));
            assert!(record.l0 <= want as f64 && record.l0 > 0.0);
        }
        assert_eq!(sae.k(), 3);
        let plain = Trainer::new(&sae, TrainOptions::default()).unwrap();
        let mut again = sae.clone();
        let mut plain = plain;
        assert_eq!(plain.step(&mut again, &x).unwrap().k, None);
        // Multi-TopK needs 4 x 60 latents at the start.
        let mut config = SaeConfig::new(6, 64, 3);
        config.multi_topk = true;
        let multi = Sae::new(config, 0, &Device::Cpu).unwrap();
        let decaying = TrainOptions {
            k_decay_steps: 4,
            ..TrainOptions::default()
        };
        let message = Trainer::new(&multi, decaying).unwrap_err().to_string();
        assert!(message.contains("4 x 60"), "{message}");
    }

    /// `finetune`: the first step (lr 0 in the warm-up) leaves an already trained SAE (unit
    /// decoder rows) or transcoder as it was, where a fresh run sets its biases from the batch.
    #[test]
    fn finetuning_keeps_the_biases_on_the_first_step() {
        for transcode in [false, true] {
            let mut config = SaeConfig::new(6, 16, 3);
            config.transcode = transcode;
            let (mut sae, x) = case_with(config, DType::F32);
            if !transcode {
                sae.set_decoder_norm_to_unit_norm().unwrap();
            }
            let y = (x.sin().unwrap() * 2.0).unwrap();
            let target = if transcode { &y } else { &x };
            let first_step = |finetune: bool| {
                let options = TrainOptions {
                    warmup_steps: 2,
                    finetune,
                    ..TrainOptions::default()
                };
                let mut trained = sae.clone();
                let mut trainer = Trainer::new(&trained, options).unwrap();
                let record = trainer.step_to(&mut trained, &x, target).unwrap();
                assert_eq!(record.lr, 0.0);
                trained
            };
            let kept = first_step(true);
            for (a, b) in kept.parameters().iter().zip(sae.parameters()) {
                assert!(hooks::compare::max_abs_diff(a, &b).unwrap() < 1e-6);
            }
            let fresh = first_step(false);
            let mean = target.mean(0).unwrap();
            assert!(hooks::compare::max_abs_diff(fresh.b_dec(), &mean).unwrap() < 1e-6);
            assert!(hooks::compare::max_abs_diff(sae.b_dec(), &mean).unwrap() > 0.1);
        }
    }

    #[test]
    fn lr_rule_and_refusals() {
        let options = TrainOptions::default();
        assert!((options.peak_lr(1 << 14) - 2e-4).abs() < 1e-15);
        assert!((options.peak_lr(1 << 16) - 1e-4).abs() < 1e-15);
        let mut config = SaeConfig::new(6, 10, 3);
        config.multi_topk = true;
        let sae = Sae::new(config, 0, &Device::Cpu).unwrap();
        let message = Trainer::new(&sae, options.clone()).unwrap_err().to_string();
        assert!(message.contains("4k = 12"), "{message}");
        let mut config = SaeConfig::new(6, 10, 2);
        config.transcode = true;
        let sae = Sae::new(config, 0, &Device::Cpu).unwrap();
        assert!(Trainer::new(&sae, options.clone()).is_ok());
        let message = transcoder_input(HookPoint::Attention(2), "layers.2.self_attn")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("(layers.N.mlp), not at 'layers.2.self_attn'"),
            "{message}"
        );
        assert_eq!(
            transcoder_input(HookPoint::Mlp(2), "layers.2.mlp").unwrap(),
            HookPoint::MlpInput(2)
        );
        let sae = Sae::new(SaeConfig::new(6, 10, 3), 0, &Device::Cpu).unwrap();
        let zero_steps = TrainOptions {
            steps: 0,
            ..options
        };
        assert!(Trainer::new(&sae, zero_steps).is_err());
    }

    #[test]
    fn non_finite_and_empty_batches_are_refused_before_anything_changes() {
        let (mut sae, x) = case(DType::F32);
        let before = sae.parameters();
        let mut trainer = Trainer::new(&sae, TrainOptions::default()).unwrap();
        let mut values: Vec<Vec<f32>> = x.to_vec2().unwrap();
        for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            values[2][4] = bad;
            let poisoned = Tensor::new(values.clone(), &Device::Cpu).unwrap();
            let message = trainer.step(&mut sae, &poisoned).unwrap_err().to_string();
            assert!(
                message.contains(&format!("non-finite value ({shown}) at row 2, column 4")),
                "{message}"
            );
            assert_eq!(trainer.steps_done(), 0);
            for (a, b) in sae.parameters().iter().zip(&before) {
                let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a, b);
            }
        }
        let empty = x.narrow(0, 0, 0).unwrap();
        let message = trainer.step(&mut sae, &empty).unwrap_err().to_string();
        assert!(message.contains("has no rows"), "{message}");
        assert_eq!(trainer.steps_done(), 0);
        // Encoding refuses the same rows rather than return codes that look like silence.
        let message = sae.encode(&poisoned_row(&x)).unwrap_err().to_string();
        assert!(
            message.contains("non-finite value (NaN) at row 2, column 4"),
            "{message}"
        );
        assert!(trainer.step(&mut sae, &x).is_ok());
    }

    fn poisoned_row(x: &Tensor) -> Tensor {
        let mut values: Vec<Vec<f32>> = x.to_vec2().unwrap();
        values[2][4] = f32::NAN;
        Tensor::new(values, &Device::Cpu).unwrap()
    }
}
