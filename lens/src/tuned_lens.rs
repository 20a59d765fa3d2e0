//! The tuned lens: one affine translator per layer, `h + W h + b`, applied to the residual
//! stream entering that layer and decoded with the model's own final norm and unembedding.
//! Zero-initialised, so an untrained tuned lens is exactly the logit lens.
//!
//! Files: our format is `config.json` + `params.safetensors`; the reference format
//! (tuned-lens's `config.json` + `params.pt`, keys `{i}.weight`, `{i}.bias`) is read too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hooks::{HookPoint, Model, Unembedding};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `config.json` of a lens, with the reference implementation's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LensConfig {
    /// The model the lens was trained on.
    #[serde(default)]
    pub base_model_name_or_path: String,
    /// Its revision, if any.
    #[serde(default)]
    pub base_model_revision: Option<String>,
    /// Residual width.
    pub d_model: usize,
    /// Number of translators (one per layer).
    pub num_hidden_layers: usize,
    /// Whether translators have a bias (always true for lenses we train).
    #[serde(default = "default_true")]
    pub bias: bool,
    /// Fingerprint of the unembedding the lens was trained with (ours: `ei-fnv1a64:...`).
    #[serde(default)]
    pub unembed_hash: Option<String>,
    /// Always `linear_tuned_lens`.
    #[serde(default = "default_lens_type")]
    pub lens_type: String,
}

fn default_true() -> bool {
    true
}

fn default_lens_type() -> String {
    "linear_tuned_lens".into()
}

/// A tuned lens: translator weights `[d, d]` and biases `[d]` per layer, in f32.
#[derive(Debug, Clone)]
pub struct TunedLens {
    /// The lens's description.
    pub config: LensConfig,
    weights: Vec<Tensor>,
    biases: Vec<Tensor>,
}

/// A model's hub id or path without the `@revision` a hub model's origin ends with: tuned-lens
/// records the revision apart (`base_model_revision`).
fn name_without_revision<'a>(origin: &'a str, revision: Option<&str>) -> &'a str {
    revision
        .and_then(|r| origin.strip_suffix(r)?.strip_suffix('@'))
        .unwrap_or(origin)
}

/// The hook point whose tensor translator `layer` reads: the residual entering that layer.
pub fn lens_input(layer: usize) -> HookPoint {
    match layer {
        0 => HookPoint::Embed,
        i => HookPoint::Layer(i - 1),
    }
}

impl TunedLens {
    /// A zero-initialised lens (equal to the logit lens) for `model`.
    pub fn for_model(model: &Model) -> Result<Self> {
        let d = model.config().hidden_size();
        let layers = model.config().num_layers();
        let config = LensConfig {
            base_model_name_or_path: name_without_revision(model.origin(), model.revision())
                .to_string(),
            base_model_revision: model.revision().map(str::to_string),
            d_model: d,
            num_hidden_layers: layers,
            bias: true,
            unembed_hash: Some(unembedding_hash(&model.unembedding())?),
            lens_type: default_lens_type(),
        };
        Self::zeros(config, model.device())
    }

    /// A zero-initialised lens with the given config.
    pub fn zeros(config: LensConfig, device: &Device) -> Result<Self> {
        let d = config.d_model;
        let weights = (0..config.num_hidden_layers)
            .map(|_| Tensor::zeros((d, d), DType::F32, device))
            .collect::<candle_core::Result<_>>()?;
        let biases = (0..config.num_hidden_layers)
            .map(|_| Tensor::zeros(d, DType::F32, device))
            .collect::<candle_core::Result<_>>()?;
        Ok(TunedLens {
            config,
            weights,
            biases,
        })
    }

    /// Number of translators.
    pub fn num_layers(&self) -> usize {
        self.weights.len()
    }

    /// Translator `layer`'s `(W, b)`.
    pub fn translator(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.weights[layer], &self.biases[layer])
    }

    /// All parameters, `[W_0, b_0, W_1, b_1, ...]`.
    pub fn parameters(&self) -> Vec<Tensor> {
        self.weights
            .iter()
            .zip(&self.biases)
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }

    /// Replaces all parameters (same order, shapes and dtype as [`TunedLens::parameters`]).
    pub fn set_parameters(&mut self, params: Vec<Tensor>) -> Result<()> {
        if params.len() != 2 * self.num_layers() {
            return Err(Error::Lens(format!(
                "expected {} parameter tensors, got {}",
                2 * self.num_layers(),
                params.len()
            )));
        }
        for (i, (old, new)) in self.parameters().iter().zip(&params).enumerate() {
            if let Some(mismatch) = hooks::compare::layout_mismatch(old, new) {
                return Err(Error::Lens(format!(
                    "parameter {i} (the {} of layer {}) {mismatch}",
                    if i % 2 == 0 { "weight" } else { "bias" },
                    i / 2
                )));
            }
        }
        let mut it = params.into_iter();
        for layer in 0..self.num_layers() {
            self.weights[layer] = it.next().unwrap();
            self.biases[layer] = it.next().unwrap();
        }
        Ok(())
    }

    /// `h + h Wᵀ + b` for `h: [..., d]`, in f32.
    pub fn transform(&self, h: &Tensor, layer: usize) -> Result<Tensor> {
        self.check_layer(layer)?;
        let dims = h.dims().to_vec();
        let d = self.config.d_model;
        let flat = h.to_dtype(DType::F32)?.reshape((h.elem_count() / d, d))?;
        let out = crate::loss::translate(&flat, &self.weights[layer], &self.biases[layer])?;
        Ok(out.reshape(dims)?)
    }

    /// Lens logits of `h: [..., d]` at `layer` (decoded with `unembedding`, in f32).
    pub fn forward(&self, h: &Tensor, layer: usize, unembedding: &Unembedding) -> Result<Tensor> {
        Ok(unembedding.forward(&self.transform(h, layer)?)?)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.num_layers() {
            return Err(Error::Lens(format!(
                "layer {layer} is out of range: the lens has {} translators",
                self.num_layers()
            )));
        }
        Ok(())
    }

    /// Checks that this lens fits `model`: same width, layer count and unembedding.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        let (d, layers) = (model.config().hidden_size(), model.config().num_layers());
        if self.config.d_model != d || self.config.num_hidden_layers != layers {
            return Err(Error::Lens(format!(
                "lens is for d_model {} with {} layers (trained on '{}'), but model '{}' has d_model {d} with {layers} layers",
                self.config.d_model, self.config.num_hidden_layers, self.config.base_model_name_or_path, model.origin()
            )));
        }
        let ours = self
            .config
            .unembed_hash
            .as_deref()
            .filter(|h| h.starts_with(UNEMBED_HASH_PREFIX));
        if ours.is_none() {
            // tuned-lens's own fingerprint covers numpy's printout of the matrix.
            tracing::info!(
                "the lens records no unembedding fingerprint of ours (trained with tuned-lens?): \
                 only its width and layer count are checked against the model"
            );
        }
        if let Some(expected) = ours {
            let unembedding = model.unembedding();
            let actual = unembedding_hash(&unembedding)?;
            if actual != expected && legacy_unembedding_hash(&unembedding)? != expected {
                return Err(Error::Lens(format!(
                    "lens was trained with another unembedding (trained on '{}'; hash {expected}, this model's {actual})",
                    self.config.base_model_name_or_path
                )));
            }
        }
        Ok(())
    }

    /// Writes `config.json` and `params.safetensors` into `dir` (atomically, as a pair: see
    /// [`hooks::atomic::write_weights_and_config`]).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| hooks::Error::io(dir, e))?;
        let mut tensors = Vec::new();
        for layer in 0..self.num_layers() {
            tensors.push((format!("{layer}.weight"), vec![self.weights[layer].clone()]));
            tensors.push((format!("{layer}.bias"), vec![self.biases[layer].clone()]));
        }
        hooks::atomic::write_weights_and_config(
            &dir.join("params.safetensors"),
            &tensors,
            &dir.join("config.json"),
            &self.config,
        )?;
        Ok(())
    }

    /// Reads a lens from `dir`: ours (`params.safetensors`) or the reference format (`params.pt`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if dir.is_file() {
            return Err(Error::Lens(format!(
                "{} is a file: give the lens's folder (config.json and params.safetensors or params.pt)",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| hooks::Error::io(&config_path, e))?;
        let mut config: LensConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Lens(format!("{}: {e}", config_path.display())))?;
        if config.lens_type != default_lens_type() {
            return Err(Error::Lens(format!(
                "{}: lens_type '{}' is not supported (only {})",
                config_path.display(),
                config.lens_type,
                default_lens_type()
            )));
        }
        let (params, tensors): (PathBuf, HashMap<String, Tensor>) =
            if dir.join("params.safetensors").is_file() {
                let path = dir.join("params.safetensors");
                let tensors = candle_core::safetensors::load(&path, device)
                    .map_err(|e| Error::Lens(format!("{}: {e}", path.display())))?;
                (path, tensors)
            } else if dir.join("params.pt").is_file() {
                let path = dir.join("params.pt");
                let tensors = candle_core::pickle::read_all(&path)
                    .map_err(|e| {
                        Error::Lens(format!(
                            "{}: not a readable PyTorch file: {e}",
                            path.display()
                        ))
                    })?
                    .into_iter()
                    .collect();
                (path, tensors)
            } else {
                return Err(Error::Lens(format!(
                    "{}: no params.safetensors or params.pt",
                    dir.display()
                )));
            };
        // Checked against the file before anything is allocated: config.json's sizes alone
        // could ask for any amount of memory.
        // Translators 0..n: a gap shows up below as a missing tensor.
        let in_file = tensors
            .keys()
            .filter(|name| {
                name.strip_suffix(".weight")
                    .is_some_and(|i| i.parse::<usize>().is_ok())
            })
            .count();
        if in_file != config.num_hidden_layers {
            return Err(Error::Lens(format!(
                "{} says num_hidden_layers {}, but {} holds {in_file} translators",
                config_path.display(),
                config.num_hidden_layers,
                params.display()
            )));
        }
        let d = config.d_model;
        let get = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.get(&name).ok_or_else(|| {
                Error::Lens(format!("{}: missing tensor '{name}'", params.display()))
            })?;
            if t.dims() != shape {
                return Err(Error::Lens(format!(
                    "{}: tensor '{name}' has shape {:?}, config.json says {shape:?}",
                    params.display(),
                    t.dims()
                )));
            }
            let t = hooks::weights::float_parameter(t).map_err(|problem| {
                Error::Lens(format!("{}: tensor '{name}' {problem}", params.display()))
            })?;
            Ok(t.to_device(device)?)
        };
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for layer in 0..in_file {
            weights.push(get(format!("{layer}.weight"), &[d, d])?);
            let bias = format!("{layer}.bias");
            biases.push(match (config.bias, tensors.contains_key(&bias)) {
                (true, _) => get(bias, &[d])?,
                (false, false) => Tensor::zeros(d, DType::F32, device)?,
                (false, true) => {
                    return Err(Error::Lens(format!(
                        "{} says bias false, but {} holds '{bias}'",
                        config_path.display(),
                        params.display()
                    )))
                }
            });
        }
        // Zero biases stand for absent ones, and are saved as biases.
        config.bias = true;
        Ok(TunedLens {
            config,
            weights,
            biases,
        })
    }
}

/// The prefix of our unembedding fingerprints in `config.json` (`unembed_hash`).
pub const UNEMBED_HASH_PREFIX: &str = "ei-fnv1a64:";

/// A fingerprint of an unembedding that survives dtype changes: FNV-1a over the bf16
/// rounding (to nearest even, as candle converts) of its first and last 4096 values and its
/// shape. (Not the reference's hash, which covers numpy's printed summary of the matrix.)
pub fn unembedding_hash(unembedding: &Unembedding) -> Result<String> {
    fingerprint(unembedding, |v| half::bf16::from_f32(v).to_bits())
}

/// The fingerprint of lenses trained before 2026-12-02, still accepted from their files: it
/// rounded ties away from zero, so for a model stored in float16 (Pythia) it changed with the
/// dtype the model was loaded in, and such a lens fits only a model loaded in the dtype it
/// was trained in (as before). Equal to [`unembedding_hash`] wherever no value is a tie.
fn legacy_unembedding_hash(unembedding: &Unembedding) -> Result<String> {
    // Wrapping: a NaN's bits may overflow (only finite values' roundings matter).
    fingerprint(unembedding, |v| {
        (v.to_bits().wrapping_add(0x8000) >> 16) as u16
    })
}

fn fingerprint(unembedding: &Unembedding, bf16_bits: impl Fn(f32) -> u16) -> Result<String> {
    let w = unembedding.weight.flatten_all()?.to_dtype(DType::F32)?;
    let n = w.elem_count();
    let take = n.min(4096);
    let mut values: Vec<f32> = w.narrow(0, 0, take)?.to_vec1()?;
    values.extend(w.narrow(0, n - take, take)?.to_vec1::<f32>()?);
    let mut h = hooks::digest::Fnv::default();
    for dim in unembedding.weight.dims() {
        h = h.bytes(&(*dim as u64).to_le_bytes());
    }
    for v in values {
        h = h.bytes(&u32::from(bf16_bits(v)).to_le_bytes());
    }
    Ok(format!("{UNEMBED_HASH_PREFIX}{:016x}", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_model_name_leaves_the_revision_apart() {
        let cases = [
            (
                "EleutherAI/pythia-1b@step1000",
                Some("step1000"),
                "EleutherAI/pythia-1b",
            ),
            (
                "EleutherAI/pythia-1b@main",
                Some("main"),
                "EleutherAI/pythia-1b",
            ),
            // A local folder's revision is a sub-folder: its path has no '@revision'.
            (
                "runs/model/step1000",
                Some("step1000"),
                "runs/model/step1000",
            ),
            ("runs/a@b", None, "runs/a@b"),
        ];
        for (origin, revision, name) in cases {
            assert_eq!(name_without_revision(origin, revision), name, "{origin}");
        }
    }

    #[test]
    fn unembedding_hash_survives_dtype_changes_and_takes_any_bits() {
        let norm = hooks::FinalNorm::Rms {
            weight: Tensor::ones(4, DType::F32, &Device::Cpu).unwrap(),
            eps: 1e-6,
        };
        let mut values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) / 7.0).collect();
        // Halfway between two bf16 values (float16 weights have many): to the even one.
        values[0] = 1.003_906_2; // 0x3F808000
        values[1] = -2.007_812_5; // 0xC0008000
        let weight = Tensor::from_vec(values.clone(), (6, 4), &Device::Cpu).unwrap();
        let hash = |weight: Tensor| unembedding_hash(&Unembedding::new(norm.clone(), weight));
        let f32_hash = hash(weight.clone()).unwrap();
        assert_eq!(
            hash(weight.to_dtype(DType::BF16).unwrap()).unwrap(),
            f32_hash
        );
        assert_eq!(
            hash(weight.to_dtype(DType::F16).unwrap()).unwrap(),
            f32_hash
        );
        // The all-ones NaN (a 0xFF fill) used to overflow the rounding.
        let mut damaged = values;
        damaged[3] = f32::from_bits(u32::MAX);
        let damaged = Tensor::from_vec(damaged, (6, 4), &Device::Cpu).unwrap();
        assert_ne!(hash(damaged).unwrap(), f32_hash);
    }

    /// Pythia's weights are float16, a model loaded in float32 and in bfloat16 has the same
    /// fingerprint, and a lens whose file records the fingerprint of before 2026-12-02 (which
    /// differs for such a model) still fits it.
    #[test]
    fn float16_weights_keep_their_fingerprint_and_old_lenses_fit() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt_neox/pythia_style");
        let tmp = tempfile::tempdir().unwrap();
        let tensors =
            candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let f16: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (name, t.to_dtype(DType::F16).unwrap()))
            .collect();
        candle_core::safetensors::save(&f16, tmp.path().join("model.safetensors")).unwrap();
        std::fs::copy(fixture.join("config.json"), tmp.path().join("config.json")).unwrap();
        let load = |dtype| {
            let options = hooks::LoadOptions {
                dtype,
                ..Default::default()
            };
            Model::from_folder(tmp.path(), &options).unwrap()
        };
        let model = load(DType::F32);
        let hash = unembedding_hash(&model.unembedding()).unwrap();
        assert_eq!(
            unembedding_hash(&load(DType::BF16).unembedding()).unwrap(),
            hash
        );
        let legacy = legacy_unembedding_hash(&model.unembedding()).unwrap();
        assert_ne!(legacy, hash, "the fixture should hold ties");
        let mut lens = TunedLens::for_model(&model).unwrap();
        lens.config.unembed_hash = Some(legacy);
        lens.check_model(&model).unwrap();
        lens.config.unembed_hash = Some(format!("{UNEMBED_HASH_PREFIX}{:016x}", 0));
        assert!(lens.check_model(&model).is_err());
    }
}
