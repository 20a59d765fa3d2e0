//! The sparse autoencoder: parameters, encoder, decoder and files, as in sparsify's
//! `SparseCoder` (`sparsify/sparse_coder.py`, PyPI `eai-sparsify` 1.3.3).
//!
//! `encode(x) = TopK_k(ReLU(W_enc (x − b_dec) + b_enc))` (no `− b_dec` for transcoders),
//! `decode(a, i) = Σ_j a_j W_dec[i_j] + b_dec`, plus `x W_skipᵀ` with a skip connection.
//! Files: `cfg.json` (the config fields plus `d_in`) and `sae.safetensors` with
//! `encoder.weight [n, d]`, `encoder.bias [n]`, `W_dec [n, d]`, `b_dec [d]` (and
//! `W_skip [d, d]` with a skip connection), float32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hooks::HookPoint;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::kernels;
use crate::{Error, Result};

/// `cfg.json` of a sparsify sparse coder (`SparseCoderConfig` plus `d_in`), field names and
/// defaults as in sparsify; every field but `d_in` may be missing, unknown fields (such as
/// the `signed` of older releases) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaeConfig {
    /// Activation function: only `"topk"` is supported (sparsify also has `"groupmax"`).
    #[serde(default = "default_activation")]
    pub activation: String,
    /// Latents per input dimension, used when `num_latents` is 0.
    #[serde(default = "default_expansion_factor")]
    pub expansion_factor: usize,
    /// Keep decoder rows at unit norm during training.
    #[serde(default = "default_true")]
    pub normalize_decoder: bool,
    /// Number of latents; 0 means `d_in × expansion_factor`.
    #[serde(default)]
    pub num_latents: usize,
    /// Active latents per token.
    #[serde(default = "default_k")]
    pub k: usize,
    /// Train with the Multi-TopK loss (affects training only).
    #[serde(default)]
    pub multi_topk: bool,
    /// A linear skip connection `W_skip [d, d]`.
    #[serde(default)]
    pub skip_connection: bool,
    /// A transcoder (predicts a module's output from its input): the encoder does not
    /// subtract `b_dec`.
    #[serde(default)]
    pub transcode: bool,
    /// Input width.
    pub d_in: usize,
}

fn default_activation() -> String {
    "topk".into()
}

fn default_expansion_factor() -> usize {
    32
}

fn default_true() -> bool {
    true
}

fn default_k() -> usize {
    32
}

impl SaeConfig {
    /// A TopK autoencoder config with sparsify's defaults, `num_latents` latents and `k`
    /// active ones.
    pub fn new(d_in: usize, num_latents: usize, k: usize) -> Self {
        SaeConfig {
            activation: default_activation(),
            expansion_factor: default_expansion_factor(),
            normalize_decoder: true,
            num_latents,
            k,
            multi_topk: false,
            skip_connection: false,
            transcode: false,
            d_in,
        }
    }

    /// The number of latents (`num_latents`, or `d_in × expansion_factor` when that is 0;
    /// `usize::MAX` when that product overflows, which [`SaeConfig::validate`] refuses).
    pub fn latents(&self) -> usize {
        if self.num_latents > 0 {
            self.num_latents
        } else {
            self.d_in.saturating_mul(self.expansion_factor)
        }
    }

    /// Checks that the config describes an SAE this crate can run.
    pub fn validate(&self) -> Result<()> {
        if self.activation != "topk" {
            return Err(Error::Sae(format!(
                "activation '{}' is not supported (only 'topk')",
                self.activation
            )));
        }
        if self.d_in == 0 || self.latents() == 0 {
            return Err(Error::Sae(format!(
                "d_in ({}) and the number of latents ({}) must be positive",
                self.d_in,
                self.latents()
            )));
        }
        // Latent indices are u32 (as in sparsify's files and the TopK kernels).
        if self.latents() > u32::MAX as usize {
            return Err(Error::Sae(format!(
                "too many latents: {} (num_latents {}, d_in {} x expansion_factor {}); at most {}",
                self.latents(),
                self.num_latents,
                self.d_in,
                self.expansion_factor,
                u32::MAX
            )));
        }
        if self.k == 0 || self.k > self.latents() {
            return Err(Error::Sae(format!(
                "k = {} must be between 1 and the number of latents ({})",
                self.k,
                self.latents()
            )));
        }
        Ok(())
    }
}

/// What [`Sae::forward`] computes.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// The reconstruction (or, for a transcoder, the prediction) `[N, d]`.
    pub x_hat: Tensor,
    /// Activations of the selected latents `[N, k]`, largest first.
    pub top_acts: Tensor,
    /// Their latent indices `[N, k]` (u32).
    pub top_indices: Tensor,
    /// Fraction of variance unexplained over the batch: `Σ‖y − x̂‖² / Σ‖y − mean(y)‖²`.
    pub fvu: f64,
}

/// How latents are chosen from the pre-activations `W_enc (x − b_dec) + b_enc`.
#[derive(Debug, Clone)]
pub enum Activation {
    /// The `k` largest, ReLU'd (sparsify; SAELens `topk`).
    TopK,
    /// Every positive one (SAELens `standard`, ReLU).
    Relu,
    /// Every one above its latent's threshold `[n]` (SAELens `jumprelu`).
    JumpRelu(Tensor),
}

/// A sparse autoencoder (or transcoder) with sparsify's parameters: TopK as sparsify trains
/// them, or a ReLU / JumpReLU one loaded from SAELens for inference.
#[derive(Debug, Clone)]
pub struct Sae {
    config: SaeConfig,
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    w_skip: Option<Tensor>,
    activation: Activation,
    /// The encoder's input is `x − b_dec` (sparsify: all but transcoders; SAELens:
    /// `apply_b_dec_to_input`).
    subtract_b_dec: bool,
}

/// Tensor names in `sae.safetensors`, in the order of [`Sae::parameters`] (`W_skip` last,
/// when the SAE has one).
const NAMES: [&str; 5] = ["encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"];
/// SAELens's weights file.
const SAE_LENS_WEIGHTS: &str = "sae_weights.safetensors";

impl Sae {
    /// A freshly initialised SAE, as sparsify does it: encoder weight from PyTorch's
    /// `nn.Linear` default (uniform in `±1/√d_in`; drawn from a seeded generator, so not
    /// PyTorch's numbers), zero encoder bias, decoder = encoder with unit-norm rows (zeros
    /// for a transcoder), zero `b_dec` (a trainer sets it to the data mean), zero `W_skip`.
    pub fn new(config: SaeConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let (d, n) = (config.d_in, config.latents());
        let bound = 1.0 / (d as f32).sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Refused with an error rather than an abort when memory cannot hold the matrix.
        let mut w: Vec<f32> = Vec::new();
        n.checked_mul(d)
            .and_then(|len| w.try_reserve_exact(len).ok())
            .ok_or_else(|| {
                Error::Sae(format!(
                    "cannot allocate a {n} x {d} encoder ({} GiB in f32)",
                    (n as f64 * d as f64 * 4.0 / (1u64 << 30) as f64).ceil()
                ))
            })?;
        w.extend((0..n * d).map(|_| rng.random_range(-bound..bound)));
        let w_enc = Tensor::from_vec(w, (n, d), device)?;
        let w_dec = if config.transcode {
            w_enc.zeros_like()?
        } else {
            w_enc.clone()
        };
        let w_skip = if config.skip_connection {
            Some(Tensor::zeros((d, d), DType::F32, device)?)
        } else {
            None
        };
        let mut sae = Sae {
            b_enc: Tensor::zeros(n, DType::F32, device)?,
            b_dec: Tensor::zeros(d, DType::F32, device)?,
            activation: Activation::TopK,
            subtract_b_dec: !config.transcode,
            config,
            w_enc,
            w_dec,
            w_skip,
        };
        if sae.config.normalize_decoder && !sae.config.transcode {
            sae.set_decoder_norm_to_unit_norm()?;
        }
        Ok(sae)
    }

    /// The config.
    pub fn config(&self) -> &SaeConfig {
        &self.config
    }

    /// Input width `d`.
    pub fn d_in(&self) -> usize {
        self.config.d_in
    }

    /// The hook point this SAE encodes when it sits at `point` of `model`: `point` itself, or
    /// for a transcoder at `layers.N.mlp` that MLP's input. An error, naming the hook point
    /// in the model's spelling, when a transcoder sits elsewhere or when the model's
    /// activations there are not `d_in` wide (an SAE trained on another model).
    pub fn input_point(&self, model: &hooks::Model, point: HookPoint) -> Result<HookPoint> {
        let input = if self.config.transcode {
            crate::train::transcoder_input(point, &model.hook_name(point))?
        } else {
            point
        };
        let width = model.config().width(input)?;
        if self.d_in() != width {
            return Err(Error::Sae(format!(
                "the SAE reads {}-wide activations, but this model's {} are {width} wide",
                self.d_in(),
                model.hook_name(input)
            )));
        }
        Ok(input)
    }

    /// Number of latents `n`.
    pub fn num_latents(&self) -> usize {
        self.config.latents()
    }

    /// Active latents per token.
    pub fn k(&self) -> usize {
        self.config.k
    }

    /// Changes the number of active latents (e.g. a k schedule); must be in `1..=n`.
    pub fn set_k(&mut self, k: usize) -> Result<()> {
        let mut config = self.config.clone();
        config.k = k;
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Encoder weight `[n, d]` (`encoder.weight`).
    pub fn w_enc(&self) -> &Tensor {
        &self.w_enc
    }

    /// Encoder bias `[n]` (`encoder.bias`).
    pub fn b_enc(&self) -> &Tensor {
        &self.b_enc
    }

    /// Decoder weight `[n, d]`: row `i` is latent `i`'s direction (`W_dec`).
    pub fn w_dec(&self) -> &Tensor {
        &self.w_dec
    }

    /// Decoder bias `[d]` (`b_dec`), also subtracted from the input before encoding.
    pub fn b_dec(&self) -> &Tensor {
        &self.b_dec
    }

    /// How latents are chosen (TopK unless loaded from a SAELens ReLU / JumpReLU SAE).
    pub fn activation(&self) -> &Activation {
        &self.activation
    }

    /// Whether the encoder's input is `x − b_dec` (sparsify: every autoencoder; SAELens:
    /// `apply_b_dec_to_input`).
    pub fn subtracts_b_dec(&self) -> bool {
        self.subtract_b_dec
    }

    /// Skip-connection weight `[d, d]`, if the config has one.
    pub fn w_skip(&self) -> Option<&Tensor> {
        self.w_skip.as_ref()
    }

    /// The trainable parameters `[W_enc, b_enc, W_dec, b_dec]`, then `W_skip` when the SAE
    /// has a skip connection.
    pub fn parameters(&self) -> Vec<Tensor> {
        let mut params = vec![
            self.w_enc.clone(),
            self.b_enc.clone(),
            self.w_dec.clone(),
            self.b_dec.clone(),
        ];
        params.extend(self.w_skip.clone());
        params
    }

    /// The names of [`Sae::parameters`] in sparsify's `sae.safetensors`.
    pub fn parameter_names(&self) -> &'static [&'static str] {
        &NAMES[..4 + usize::from(self.w_skip.is_some())]
    }

    /// Replaces the parameters (same order, shapes and dtype as [`Sae::parameters`]).
    pub fn set_parameters(&mut self, params: Vec<Tensor>) -> Result<()> {
        let current = self.parameters();
        if params.len() != current.len() {
            return Err(Error::Sae(format!(
                "expected {} parameter tensors, got {}",
                current.len(),
                params.len()
            )));
        }
        for ((name, old), new) in self.parameter_names().iter().zip(&current).zip(&params) {
            if let Some(mismatch) = hooks::compare::layout_mismatch(old, new) {
                return Err(Error::Sae(format!("parameter '{name}' {mismatch}")));
            }
        }
        let mut it = params.into_iter();
        self.w_enc = it.next().unwrap();
        self.b_enc = it.next().unwrap();
        self.w_dec = it.next().unwrap();
        self.b_dec = it.next().unwrap();
        self.w_skip = it.next();
        Ok(())
    }

    /// The SAE with every parameter converted to `dtype` (e.g. f64 for gradient checks; the
    /// fast CPU kernels apply to f32 only).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Sae {
            config: self.config.clone(),
            activation: match &self.activation {
                Activation::JumpRelu(t) => Activation::JumpRelu(t.to_dtype(dtype)?),
                other => other.clone(),
            },
            subtract_b_dec: self.subtract_b_dec,
            w_enc: self.w_enc.to_dtype(dtype)?,
            b_enc: self.b_enc.to_dtype(dtype)?,
            w_dec: self.w_dec.to_dtype(dtype)?,
            b_dec: self.b_dec.to_dtype(dtype)?,
            w_skip: self
                .w_skip
                .as_ref()
                .map(|w| w.to_dtype(dtype))
                .transpose()?,
        })
    }

    /// Divides every decoder row by its norm plus float32 epsilon (sparsify's
    /// `set_decoder_norm_to_unit_norm`).
    pub fn set_decoder_norm_to_unit_norm(&mut self) -> Result<()> {
        self.w_dec = kernels::unit_rows(&self.w_dec)?;
        Ok(())
    }

    /// `x: [N, d]` in the parameters' dtype and device, or an error naming the shape.
    pub(crate) fn input(&self, x: &Tensor, what: &str) -> Result<Tensor> {
        match x.dims() {
            [_, d] if *d == self.d_in() => Ok(x
                .to_device(self.w_enc.device())?
                .to_dtype(self.w_enc.dtype())?),
            dims => Err(Error::Sae(format!(
                "{what} must be [tokens, {}], got {dims:?}",
                self.d_in()
            ))),
        }
    }

    /// The encoder's input: `x − b_dec`, or `x` itself for a transcoder.
    pub(crate) fn encoder_input(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.input(x, "input")?;
        Ok(if self.subtract_b_dec {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x
        })
    }

    /// [`Sae::encoder_input`] of `x`, converted once and refused when it holds a NaN or an
    /// infinity: the entry of the public encoders (training checks its batches itself).
    fn checked_encoder_input(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.input(x, "input")?;
        check_finite(&x, "input")?;
        self.encoder_input(&x)
    }

    /// Pre-activations of every latent, `ReLU(W_enc (x − b_dec) + b_enc)`: `[N, n]`.
    pub fn pre_activations(&self, x: &Tensor) -> Result<Tensor> {
        kernels::pre_activations(&self.checked_encoder_input(x)?, &self.w_enc, &self.b_enc)
    }

    /// The `k` most active latents of each token of `x: [N, d]`: `(top_acts [N, k],
    /// top_indices [N, k] u32)`, largest first, ties by lower index. On the CPU in f32 the
    /// `[N, n]` pre-activations are never held whole (see `kernels`). Rows holding a NaN
    /// or an infinity are refused, naming the first.
    ///
    /// A ReLU or JumpReLU SAE (from SAELens) has no fixed `k`: its codes are `[N, m]` with `m`
    /// the most active latents of any row in the batch, rows with fewer padded with zero
    /// activations (which decode to nothing).
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let xc = self.checked_encoder_input(x)?;
        let threshold = match &self.activation {
            Activation::TopK => None,
            Activation::Relu => Some(None),
            Activation::JumpRelu(t) => Some(Some(t)),
        };
        if let Some(threshold) = threshold {
            return kernels::encode_threshold(&xc, &self.w_enc, &self.b_enc, threshold);
        }
        let picks = kernels::Picks {
            k: self.config.k,
            dead: None,
        };
        let (top, _) = kernels::encode_select(&xc, &self.w_enc, &self.b_enc, picks)?;
        Ok((top.acts, top.indices))
    }

    /// `Σ_j top_acts[:, j] · W_dec[top_indices[:, j]] + b_dec`: `[N, d]` (without the skip
    /// connection, like sparsify's `decode`). An index past the SAE's latents is an error.
    pub fn decode(&self, top_acts: &Tensor, top_indices: &Tensor) -> Result<Tensor> {
        // The CPU decoder checks as it reads; a GPU's would read past W_dec.
        if !top_indices.device().is_cpu() && top_indices.elem_count() > 0 {
            let largest = top_indices
                .to_dtype(DType::U32)?
                .max_all()?
                .to_scalar::<u32>()?;
            if largest as usize >= self.num_latents() {
                return Err(kernels::latent_out_of_range(largest, self.num_latents()));
            }
        }
        self.decode_unchecked(top_acts, top_indices)
    }

    /// [`Sae::decode`] of indices known to be in range (training's own selections; on a
    /// GPU they go unchecked).
    pub(crate) fn decode_unchecked(
        &self,
        top_acts: &Tensor,
        top_indices: &Tensor,
    ) -> Result<Tensor> {
        let (rows, k) = top_acts.dims2()?;
        if top_indices.dims() != [rows, k] {
            return Err(Error::Sae(format!(
                "top_acts {:?} and top_indices {:?} must have the same shape",
                top_acts.dims(),
                top_indices.dims()
            )));
        }
        let top_acts = top_acts.to_dtype(self.w_dec.dtype())?;
        let top_indices = top_indices.to_dtype(DType::U32)?;
        if k == 0 {
            return Ok(self.b_dec.unsqueeze(0)?.repeat((rows, 1))?);
        }
        kernels::decode(&top_acts, &top_indices, &self.w_dec, &self.b_dec)
    }

    /// Encodes and decodes `x: [N, d]` and measures the FVU against `x` itself.
    pub fn forward(&self, x: &Tensor) -> Result<ForwardOutput> {
        self.forward_target(x, x)
    }

    /// Encodes and decodes `x` and measures the FVU against `y` (a transcoder's target).
    pub fn forward_target(&self, x: &Tensor, y: &Tensor) -> Result<ForwardOutput> {
        let (top_acts, top_indices) = self.encode(x)?;
        let mut x_hat = self.decode_unchecked(&top_acts, &top_indices)?;
        if let Some(w_skip) = &self.w_skip {
            x_hat = (x_hat + self.input(x, "input")?.matmul(&w_skip.t()?)?)?;
        }
        let y = self.input(y, "target")?;
        if y.dim(0)? != x_hat.dim(0)? {
            return Err(Error::Sae(format!(
                "target has {} rows, input {}",
                y.dim(0)?,
                x_hat.dim(0)?
            )));
        }
        let fvu = fvu(&y, &x_hat)?;
        Ok(ForwardOutput {
            x_hat,
            top_acts,
            top_indices,
            fvu,
        })
    }

    /// Writes `cfg.json` and `sae.safetensors` into `dir` (created if needed), atomically as
    /// a pair (see [`hooks::atomic::write_weights_and_config`]), in sparsify's layout.
    pub fn save(&self, dir: &Path) -> Result<()> {
        if !matches!(self.activation, Activation::TopK)
            || self.subtract_b_dec == self.config.transcode
        {
            return Err(Error::Sae(format!(
                "a {} SAE{} has no sparsify file format (only TopK SAEs that subtract b_dec, and transcoders, do)",
                self.config.activation,
                if self.subtract_b_dec { "" } else { " without apply_b_dec_to_input" }
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| hooks::Error::io(dir, e))?;
        let tensors: Vec<(String, Vec<Tensor>)> = self
            .parameter_names()
            .iter()
            .zip(self.parameters())
            .map(|(name, t)| Ok((name.to_string(), vec![t.to_dtype(DType::F32)?])))
            .collect::<Result<_>>()?;
        hooks::atomic::write_weights_and_config(
            &dir.join("sae.safetensors"),
            &tensors,
            &dir.join("cfg.json"),
            &self.config,
        )?;
        Ok(())
    }

    /// Reads an SAE saved by sparsify's `save_to_disk` (or [`Sae::save`]) from `dir`, or a
    /// SAELens one (`sae_weights.safetensors`, see [`Sae::load_sae_lens`]) when the folder
    /// has that file and no `sae.safetensors`; parameters become float32 on `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::Sae(format!(
                "{} is a file: give the SAE's folder (cfg.json and sae.safetensors)",
                dir.display()
            )));
        }
        if !dir.join("sae.safetensors").exists() && dir.join(SAE_LENS_WEIGHTS).is_file() {
            return Self::load_sae_lens(dir, device);
        }
        let cfg_path = dir.join("cfg.json");
        if !cfg_path.exists() {
            let inner = sae_folders(dir);
            if !inner.is_empty() {
                return Err(Error::Sae(format!(
                    "{} holds a folder per SAE, not one SAE: pick one of {}",
                    dir.display(),
                    inner.join(", ")
                )));
            }
        }
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| hooks::Error::io(&cfg_path, e))?;
        let config: SaeConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Sae(format!("{}: {e}", cfg_path.display())))?;
        config
            .validate()
            .map_err(|e| Error::Sae(format!("{}: {e}", cfg_path.display())))?;
        let path = dir.join("sae.safetensors");
        if !path.is_file() {
            return Err(Error::NotFound(format!("{}: no such file", path.display())));
        }
        let (d, n) = (config.d_in, config.latents());
        let file = WeightFile::open(path, device, format!("cfg.json (d_in {d}, {n} latents)"))?;
        let w_skip = if config.skip_connection {
            Some(file.get(NAMES[4], &[d, d])?)
        } else if file.tensors.contains_key(NAMES[4]) {
            // sparsify refuses it too (a strict load): decoding without it would be wrong.
            return Err(Error::Sae(format!(
                "{}: holds {} but cfg.json has no skip_connection true: set it, or the SAE \
                 decodes without its skip connection",
                file.path.display(),
                NAMES[4]
            )));
        } else {
            None
        };
        Ok(Sae {
            w_enc: file.get(NAMES[0], &[n, d])?,
            b_enc: file.get(NAMES[1], &[n])?,
            w_dec: file.get(NAMES[2], &[n, d])?,
            b_dec: file.get(NAMES[3], &[d])?,
            w_skip,
            activation: Activation::TopK,
            subtract_b_dec: !config.transcode,
            config,
        })
    }

    /// Reads a SAELens SAE folder: `cfg.json` (v6: `architecture` `standard` / `topk` /
    /// `jumprelu` with a top-level `k`; before 6.0: `activation_fn_str` `relu` / `topk` with
    /// `activation_fn_kwargs.k`), `d_in`, `d_sae`, `apply_b_dec_to_input` (default true),
    /// `normalize_activations` (only `none`) and `rescale_acts_by_decoder_norm` (not true), and
    /// `sae_weights.safetensors` with `W_enc [d_in, d_sae]` (stored here transposed, as
    /// sparsify's `encoder.weight`), `b_enc`,
    /// `W_dec [d_sae, d_in]`, `b_dec` and, for JumpReLU, `threshold [d_sae]`. For inference
    /// (encode, decode, `sae eval`); such an SAE cannot be trained or saved in sparsify's
    /// format unless it is a TopK SAE that subtracts `b_dec`.
    pub fn load_sae_lens(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("cfg.json");
        let bad = |m: String| Error::Sae(format!("{}: {m}", cfg_path.display()));
        let text =
            std::fs::read_to_string(&cfg_path).map_err(|e| hooks::Error::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let size = |field: &str| -> Result<usize> {
            cfg[field]
                .as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| {
                    bad(format!(
                        "'{field}' must be a positive integer, got {}",
                        cfg[field]
                    ))
                })
        };
        let (d, n) = (size("d_in")?, size("d_sae")?);
        let architecture = match (
            cfg["architecture"].as_str(),
            cfg["activation_fn_str"].as_str(),
        ) {
            (Some(a), _) => a.to_string(),
            (None, Some("relu")) | (None, None) => "standard".into(),
            (None, Some(f)) => f.to_string(),
        };
        match cfg["normalize_activations"].as_str() {
            None | Some("none") => {}
            Some(other) => {
                return Err(bad(format!(
                    "normalize_activations '{other}' is not supported (only 'none')"
                )))
            }
        }
        if cfg["rescale_acts_by_decoder_norm"].as_bool() == Some(true) {
            // SAELens folds the decoder norms into the weights when it saves for inference.
            return Err(bad(
                "rescale_acts_by_decoder_norm is true: a SAELens training \
                 checkpoint, whose decoder norms are not folded into its weights; save it with \
                 SAELens's save_inference_model and load that"
                    .into(),
            ));
        }
        let subtract_b_dec = cfg["apply_b_dec_to_input"].as_bool().unwrap_or(true);
        let path = dir.join(SAE_LENS_WEIGHTS);
        let file = WeightFile::open(path, device, format!("cfg.json (d_in {d}, d_sae {n})"))?;
        let (activation, k) = match architecture.as_str() {
            "topk" => {
                let k = cfg["k"]
                    .as_u64()
                    .or_else(|| cfg["activation_fn_kwargs"]["k"].as_u64())
                    .ok_or_else(|| bad("a topk SAE needs 'k'".into()))?;
                (Activation::TopK, k as usize)
            }
            "standard" => (Activation::Relu, n),
            "jumprelu" => (Activation::JumpRelu(file.get("threshold", &[n])?), n),
            other => {
                return Err(bad(format!(
                    "SAELens architecture '{other}' is not supported (standard, topk, jumprelu)"
                )))
            }
        };
        let mut config = SaeConfig::new(d, n, k);
        config.activation = match activation {
            Activation::TopK => "topk".into(),
            Activation::Relu => "relu".into(),
            Activation::JumpRelu(_) => "jumprelu".into(),
        };
        if k == 0 || k > n {
            return Err(bad(format!("k = {k} must be between 1 and d_sae ({n})")));
        }
        Ok(Sae {
            w_enc: file.get("W_enc", &[d, n])?.t()?.contiguous()?,
            b_enc: file.get("b_enc", &[n])?,
            w_dec: file.get("W_dec", &[n, d])?,
            b_dec: file.get("b_dec", &[d])?,
            w_skip: None,
            activation,
            subtract_b_dec,
            config,
        })
    }
}

/// The tensors of one safetensors file of SAE weights, taken by name with the shape they must
/// have, as float32; errors name the file, the tensor and what fixes the shape
/// (`shapes_from`, e.g. the cfg.json sizes).
struct WeightFile {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    shapes_from: String,
}

impl WeightFile {
    fn open(path: PathBuf, device: &Device, shapes_from: String) -> Result<Self> {
        let tensors = candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::Sae(format!("{}: {e}", path.display())))?;
        Ok(WeightFile {
            path,
            tensors,
            shapes_from,
        })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::Sae(format!(
                "{}: missing tensor '{name}' (expected shape {shape:?})",
                self.path.display()
            ))
        })?;
        if t.dims() != shape {
            return Err(Error::Sae(format!(
                "{}: tensor '{name}' has shape {:?}, but {} needs {shape:?}",
                self.path.display(),
                t.dims(),
                self.shapes_from
            )));
        }
        hooks::weights::float_parameter(t).map_err(|problem| {
            Error::Sae(format!(
                "{}: tensor '{name}' {problem}",
                self.path.display()
            ))
        })
    }
}

/// Fraction of variance unexplained as sparsify computes it: `Σ (y − ŷ)² / Σ (y − ȳ)²`,
/// sums over tokens and dimensions, `ȳ` the batch mean.
pub fn fvu(y: &Tensor, y_hat: &Tensor) -> Result<f64> {
    Ok(sum_of_squares(&(y - y_hat)?)? / total_variance(y)?)
}

/// `Σ (y − ȳ)²` over tokens and dimensions (the FVU's denominator).
pub(crate) fn total_variance(y: &Tensor) -> Result<f64> {
    sum_of_squares(&y.broadcast_sub(&y.mean_keepdim(0)?)?)
}

/// `Σ t²` over every element of `t: [N, d]`, each row summed in `t`'s dtype and the rows in
/// f64: one float32 sum over a whole batch of a wide layer comes out 0.1-0.6% short (each
/// partial sum grows until the squares it adds lose their low bits).
pub(crate) fn sum_of_squares(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum(candle_core::D::Minus1)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Refuses rows `x: [N, d]` holding a NaN or an infinity, naming the first one. Training
/// stops rather than skipping such rows (they mean a broken model run or cache, and skipping
/// would silently change the tokens counted), and encoding refuses them rather than return
/// codes that look like silence.
pub(crate) fn check_finite(x: &Tensor, what: &str) -> Result<()> {
    let column_sums: Vec<f64> = x.sum(0)?.to_dtype(DType::F64)?.to_vec1()?;
    let Some(column) = column_sums.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let values: Vec<f64> = x
        .narrow(1, column, 1)?
        .squeeze(1)?
        .to_dtype(DType::F64)?
        .to_vec1()?;
    match values.iter().position(|v| !v.is_finite()) {
        Some(row) => Err(Error::Sae(format!(
            "the {what} has a non-finite value ({}) at row {row}, column {column}; clean the activations",
            values[row]
        ))),
        None => Err(Error::Sae(format!(
            "the {what}'s column {column} sums to {} (values too large for the dtype)",
            column_sums[column]
        ))),
    }
}

/// The sub-folders of `dir` that hold an SAE (`<name>/cfg.json`), in natural order
/// (`layers.2` before `layers.10`, as sparsify sorts them): the layout of sparsify's and
/// `sae train`'s output, one folder per hook point. Empty when there are none or `dir`
/// cannot be read.
pub fn sae_folders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("cfg.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by(|a, b| natural_order(a, b));
    names
}

/// [`sae_folders`] of a folder that must hold some: a missing folder, a file, or a folder
/// without SAE folders is an error that names it.
pub fn sae_folder_names(dir: &Path) -> Result<Vec<String>> {
    if dir.is_file() {
        return Err(Error::Sae(format!(
            "{} is a file: give a folder of <hookpoint>/ SAE folders",
            dir.display()
        )));
    }
    std::fs::read_dir(dir).map_err(|e| hooks::Error::io(dir, e))?;
    let names = sae_folders(dir);
    if names.is_empty() {
        return Err(Error::Sae(format!(
            "{} holds no SAE folders (<hookpoint>/cfg.json)",
            dir.display()
        )));
    }
    Ok(names)
}

/// Orders names as people read them: runs of digits by their value (`layers.2` before
/// `layers.10`), the rest character by character.
pub fn natural_order(a: &str, b: &str) -> std::cmp::Ordering {
    /// The next run of digits (as a number, with its text as a tie-break) or character.
    fn next_part(s: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<(u128, String)> {
        let first = *s.peek()?;
        if !first.is_ascii_digit() {
            s.next();
            return Some((u128::MAX, first.to_string()));
        }
        let mut digits = String::new();
        while let Some(c) = s.next_if(char::is_ascii_digit) {
            digits.push(c);
        }
        Some((digits.parse().unwrap_or(u128::MAX - 1), digits))
    }
    let (mut a, mut b) = (a.chars().peekable(), b.chars().peekable());
    loop {
        match (next_part(&mut a), next_part(&mut b)) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => match x.cmp(&y) {
                std::cmp::Ordering::Equal => {}
                other => return other,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform;

    #[test]
    fn names_sort_naturally() {
        let mut names = vec![
            "layers.10",
            "layers.2.mlp",
            "layers.2",
            "embed",
            "layers.1.mlp",
            "layers.02",
        ];
        names.sort_by(|a, b| natural_order(a, b));
        assert_eq!(
            names,
            [
                "embed",
                "layers.1.mlp",
                "layers.02",
                "layers.2",
                "layers.2.mlp",
                "layers.10"
            ]
        );
    }

    #[test]
    fn input_point_is_checked_against_the_model() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let load = |dir: &str| {
            hooks::Model::from_folder(&fixtures.join(dir), &hooks::LoadOptions::default()).unwrap()
        };
        let sae = |d_in: usize, transcode: bool| {
            let config = SaeConfig {
                transcode,
                ..SaeConfig::new(d_in, 64, 4)
            };
            Sae::new(config, 0, &Device::Cpu).unwrap()
        };
        let neox = load("gpt_neox/pythia_style"); // hidden 64
        let err = |sae: Sae, model: &hooks::Model, point| {
            sae.input_point(model, point).unwrap_err().to_string()
        };
        assert_eq!(
            sae(64, false)
                .input_point(&neox, HookPoint::Layer(0))
                .unwrap(),
            HookPoint::Layer(0)
        );
        assert_eq!(
            sae(64, true).input_point(&neox, HookPoint::Mlp(1)).unwrap(),
            HookPoint::MlpInput(1)
        );
        let message = err(sae(32, false), &neox, HookPoint::Layer(0));
        assert!(
            message.contains("reads 32-wide activations, but this model's layers.0 are 64 wide"),
            "{message}"
        );
        let message = err(sae(64, false), &neox, HookPoint::AttentionPattern(0));
        assert!(message.contains("attention pattern"), "{message}");
        // Names in the model's own spelling.
        let llama = load("llama/gqa_head_dim");
        let message = err(sae(64, true), &llama, HookPoint::Attention(1));
        assert!(
            message.contains("must sit at an MLP (layers.N.mlp), not at 'layers.1.self_attn'"),
            "{message}"
        );
        let message = err(sae(32, false), &llama, HookPoint::AttentionHeads(0));
        assert!(
            message.contains("this model's layers.0.self_attn.o_proj.input are 64 wide"),
            "{message}"
        );
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let config: SaeConfig = serde_json::from_str(
            r#"{"k": 16, "signed": false, "d_in": 512, "num_latents": 32768}"#,
        )
        .unwrap();
        assert_eq!(config.activation, "topk");
        assert!(config.normalize_decoder && !config.transcode && !config.multi_topk);
        assert_eq!((config.latents(), config.k), (32768, 16));
        let config: SaeConfig = serde_json::from_str(r#"{"d_in": 8}"#).unwrap();
        assert_eq!((config.latents(), config.k), (256, 32));
        let bad = SaeConfig {
            activation: "groupmax".into(),
            ..SaeConfig::new(8, 64, 4)
        };
        assert!(bad.validate().unwrap_err().to_string().contains("groupmax"));
        assert!(SaeConfig::new(8, 64, 65).validate().is_err());
        assert!(serde_json::from_str::<SaeConfig>(r#"{"k": 4}"#).is_err());
        // Sizes past what indices or memory can hold are errors, not panics or aborts.
        let huge = SaeConfig {
            num_latents: 0,
            expansion_factor: 1 << 60,
            ..SaeConfig::new(16, 0, 4)
        };
        let err = huge.validate().unwrap_err().to_string();
        assert!(err.contains("too many latents"), "{err}");
        let err = Sae::new(SaeConfig::new(1 << 31, 1 << 31, 4), 0, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot allocate a 2147483648 x 2147483648"),
            "{err}"
        );
    }

    #[test]
    fn init_follows_sparsify() {
        let sae = Sae::new(SaeConfig::new(16, 40, 4), 7, &Device::Cpu).unwrap();
        let w: Vec<Vec<f32>> = sae.w_enc().to_vec2().unwrap();
        let dec: Vec<Vec<f32>> = sae.w_dec().to_vec2().unwrap();
        let bound = 0.25f32;
        for (we, wd) in w.iter().zip(&dec) {
            assert!(we.iter().all(|v| v.abs() <= bound));
            let norm = we.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (a, b) in we.iter().zip(wd) {
                assert!((a / norm - b).abs() < 1e-6);
            }
        }
        assert_eq!(
            sae.b_enc().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        assert_eq!(
            sae.b_dec().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0
        );
        // Seeded: same seed, same SAE.
        let again = Sae::new(SaeConfig::new(16, 40, 4), 7, &Device::Cpu).unwrap();
        assert_eq!(again.w_enc().to_vec2::<f32>().unwrap(), w);
    }

    #[test]
    fn forward_is_decode_of_encode_and_f64_agrees() {
        let mut sae = Sae::new(SaeConfig::new(12, 30, 3), 1, &Device::Cpu).unwrap();
        let mut params = sae.parameters();
        params[3] = uniform(&[12], 0.0, 0.8, 1);
        params[1] = uniform(&[30], 0.0, 0.2, 2);
        sae.set_parameters(params).unwrap();
        let x = uniform(&[9, 12], 0.0, 1.7, 3);
        let out = sae.forward(&x).unwrap();
        assert_eq!(out.top_indices.dims(), &[9, 3]);
        let fvu_direct = fvu(&x, &out.x_hat).unwrap();
        assert!((out.fvu - fvu_direct).abs() < 1e-12);
        // The f64 SAE runs the generic tensor path: same selection, same reconstruction.
        let out64 = sae.to_dtype(DType::F64).unwrap().forward(&x).unwrap();
        assert_eq!(
            out64.top_indices.to_vec2::<u32>().unwrap(),
            out.top_indices.to_vec2::<u32>().unwrap()
        );
        let diff = hooks::compare::max_abs_diff(&out64.x_hat, &out.x_hat).unwrap();
        assert!(diff < 1e-5, "{diff}");
        assert!(sae.forward(&x.narrow(1, 0, 11).unwrap()).is_err());
        // Decoding names a latent past the SAE's instead of reading past its decoder, and
        // no latent decodes to the bias.
        let past = Tensor::new(&[[2u32, 30, 1]], &Device::Cpu).unwrap();
        let acts = out.top_acts.narrow(0, 0, 1).unwrap();
        let err = sae.decode(&acts, &past).unwrap_err().to_string();
        assert!(err.contains("latent index 30 is out of range"), "{err}");
        let none = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        let bias = sae
            .decode(&none, &none.to_dtype(DType::U32).unwrap())
            .unwrap();
        let b_dec: Vec<f32> = sae.b_dec().to_vec1().unwrap();
        assert_eq!(bias.to_vec2::<f32>().unwrap(), vec![b_dec.clone(), b_dec]);
    }

    /// Sums of squares over a wide batch are taken per row and then in f64: one f32 sum
    /// over all 50 million squares came out about 0.1% short.
    #[test]
    fn sums_of_squares_keep_their_precision() {
        let x = uniform(&[65_536, 768], -1.0, 1.0, 7);
        let exact: f64 = x
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| (v as f64) * (v as f64))
            .sum();
        let ours = sum_of_squares(&x).unwrap();
        assert!(((ours - exact) / exact).abs() < 1e-6, "{ours} vs {exact}");
    }
}
