//! One model interface for every architecture: load by name, list hook points, run a
//! forward pass with captures and replacements.

pub(crate) mod cpu_kernels;
mod decoder;
mod flash_attention;
mod generate;
mod gpt_neox;
mod kv_cache;
pub(crate) mod layers;
mod llama;
#[cfg(any(test, feature = "cuda"))]
mod neox_kernels;
mod quantized;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::hooks::{ForwardOutput, Hooks, Tap};
use crate::source::{ModelFiles, ModelSpec};
use crate::weights::{WeightFiles, WeightStore};
use crate::{Error, HookPoint, Result, Tokenizer};

pub use generate::GenerateOptions;
pub use kv_cache::KvCache;
use layers::Loader;

/// Seeded bf16 values in ±`scale`, for the fused kernels' tests.
#[cfg(test)]
pub(crate) fn seeded_bf16(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let count = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Hub revision (branch, tag or commit), e.g. `step1000`; `main` when `None`. For a
    /// local folder: the sub-folder of that name (the hub layout).
    pub revision: Option<String>,
    /// Where the forward pass runs.
    pub device: Device,
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Keep a GGUF file's block-quantized projection weights (Q4_0, Q8_0, K-quants...) as
    /// they are instead of dequantizing them: 3.8x (Q8_0) to 7x (Q4_0, Q4_K) less memory than
    /// f32 for the blocks, more for Q2_K and Q3_K; the products are taken with
    /// 8-bit-quantized activations as llama.cpp does (numbers move slightly; gradients do not
    /// flow through those products). GGUF files, the CPU and f32 only.
    pub quantized: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            revision: None,
            device: Device::Cpu,
            dtype: DType::F32,
            quantized: false,
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda_device(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(ordinal) => cuda_device(ordinal),
            None => Err(Error::InvalidArgument(format!(
                "unknown device '{name}' (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::InvalidArgument(
            "device 'cuda' requested but this build has no CUDA support (rebuild with --features cuda)".into(),
        ));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Parses `float32`/`f32`, `bfloat16`/`bf16`, `float16`/`f16`.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.trim().to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" => Ok(DType::F32),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        "float16" | "f16" | "fp16" | "half" => Ok(DType::F16),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype '{other}' (expected float32, bfloat16 or float16)"
        ))),
    }
}

/// The canonical lower-case name of a compute dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        DType::U8 => "uint8",
        DType::U32 => "uint32",
        DType::I64 => "int64",
        _ => "other",
    }
}

enum Network {
    GptNeox(gpt_neox::GptNeox),
    Llama(llama::Llama),
}

/// A loaded language model with its tokenizer.
pub struct Model {
    network: Network,
    config: ModelConfig,
    tokenizer: Option<Tokenizer>,
    device: Device,
    dtype: DType,
    /// Whether block-quantized weights were kept ([`LoadOptions::quantized`]).
    quantized: bool,
    origin: String,
    revision: Option<String>,
    /// Whether a sequence past the trained context length was already warned about.
    warned_past_context: std::sync::atomic::AtomicBool,
    /// The chat format, read from the model's files when first asked for.
    chat: std::sync::OnceLock<crate::chat_template::ModelChat>,
    /// Whether [`Model::set_tokenizer`] replaced the files' tokenizer.
    tokenizer_replaced: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("origin", &self.origin)
            .field("config", &self.config)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// Buffers that checkpoints of older transformers versions saved beside the weights: the
/// causal mask and the rotary frequencies, which the model computes itself.
const SAVED_BUFFERS: [&str; 3] = [
    ".attention.bias",
    ".attention.masked_bias",
    ".rotary_emb.inv_freq",
];

/// Refuses weights of layers past the config's `layers` (a config.json of a smaller model
/// beside these weights, which would otherwise run truncated) and warns of other tensors the
/// model did not use (but for saved buffers, and the unembedding a `tied` model shares with
/// its embedding).
fn check_unused_weights(
    store: &WeightStore,
    layers: usize,
    tied: bool,
    origin: &str,
) -> Result<()> {
    let unused: Vec<String> = store
        .unused()
        .into_iter()
        .filter(|name| !SAVED_BUFFERS.iter().any(|b| name.ends_with(b)))
        .filter(|name| !(tied && (name == "lm_head.weight" || name == "embed_out.weight")))
        .collect();
    let layer_of = |name: &str| {
        let (_, rest) = name.split_once("layers.")?;
        rest.split('.').next()?.parse::<usize>().ok()
    };
    if let Some(name) = unused
        .iter()
        .find(|n| layer_of(n).is_some_and(|i| i >= layers))
    {
        return Err(Error::InvalidArgument(format!(
            "model '{origin}': the weights ({}) hold layers the config does not, e.g. '{name}', \
             while it has {layers} (num_hidden_layers, or a GGUF file's llama.block_count): is \
             the config from another model?",
            store.description()
        )));
    }
    if !unused.is_empty() {
        let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
        tracing::warn!(
            "{}: {} tensors in the weights are not used by this model: {}{}",
            origin,
            unused.len(),
            shown.join(", "),
            if unused.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(())
}

impl Model {
    /// Loads a model by short name (`pythia-70m`), hub id, folder or `.gguf` path.
    pub fn load(name: &str, options: &LoadOptions) -> Result<Self> {
        let spec = ModelSpec::parse(name, options.revision.as_deref())?;
        let mut files = ModelFiles::resolve(&spec)?;
        if let ModelSpec::Folder(_) = spec {
            // A local revision is the sub-folder `parse` chose: record it as the hub's is.
            files.revision.clone_from(&options.revision);
        }
        Self::from_files(&files, options)
    }

    /// Loads a model from resolved local files.
    pub fn from_files(files: &ModelFiles, options: &LoadOptions) -> Result<Self> {
        if options.quantized {
            let refusal = match (&files.weights, options.dtype) {
                (WeightFiles::Gguf(_), _) if !options.device.is_cpu() => {
                    Some("quantized weights run on the CPU only".to_string())
                }
                (WeightFiles::Gguf(_), DType::F32) => None,
                (WeightFiles::Gguf(_), dtype) => Some(format!(
                    "quantized weights are multiplied with f32 activations, not {dtype:?}"
                )),
                _ => Some("only a GGUF file's weights can stay quantized".to_string()),
            };
            if let Some(message) = refusal {
                return Err(Error::InvalidArgument(format!(
                    "{}: {message}",
                    files.origin
                )));
            }
        }
        let config_path = match (&files.config, &files.weights) {
            (Some(config), _) => config.clone(),
            (None, WeightFiles::Gguf(path)) => {
                let gguf = crate::gguf::read(path, options.dtype, options.quantized)?;
                return Self::build(
                    gguf.config,
                    &gguf.store,
                    gguf.tokenizer,
                    options,
                    files.origin.clone(),
                    files.revision.clone(),
                );
            }
            (None, _) => {
                return Err(Error::ModelNotFound {
                    spec: files.origin.clone(),
                    message: "no config.json".into(),
                })
            }
        };
        let config = ModelConfig::from_file(&config_path)?;
        let store = WeightStore::open(&files.weights)?;
        let tokenizer = match &files.tokenizer {
            Some(path) => Some(Tokenizer::from_file(path, config.eos_token_id())?),
            None => None,
        };
        Self::build(
            config,
            &store,
            tokenizer,
            options,
            files.origin.clone(),
            files.revision.clone(),
        )
        // Either file may be the wrong one: both are named.
        .map_err(|e| match e {
            Error::MissingWeight { .. } | Error::BadWeight { .. } => Error::Config {
                path: config_path.clone(),
                message: format!("does not fit the weights: {e}"),
            },
            other => other,
        })
    }

    /// Assembles a model from a config and weight store (used by every loader).
    fn build(
        config: ModelConfig,
        store: &WeightStore,
        tokenizer: Option<Tokenizer>,
        options: &LoadOptions,
        origin: String,
        revision: Option<String>,
    ) -> Result<Self> {
        let loader = Loader {
            store,
            dtype: options.dtype,
            device: &options.device,
        };
        let network = match &config {
            ModelConfig::GptNeox(c) => Network::GptNeox(gpt_neox::load(c, &loader)?),
            ModelConfig::Llama(c) => Network::Llama(llama::load(c, &loader)?),
        };
        let tied = match &config {
            ModelConfig::GptNeox(c) => c.tie_word_embeddings,
            ModelConfig::Llama(c) => c.tie_word_embeddings,
        };
        check_unused_weights(store, config.num_layers(), tied, &origin)?;
        Ok(Model {
            network,
            config,
            tokenizer,
            device: options.device.clone(),
            dtype: options.dtype,
            quantized: options.quantized,
            origin,
            revision,
            warned_past_context: Default::default(),
            chat: Default::default(),
            tokenizer_replaced: false,
        })
    }

    /// The architecture's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer, or an error when the model had none (a folder without
    /// `tokenizer.json`, or a GGUF file whose tokenizer type is not supported).
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "model '{}' has no usable tokenizer (a folder needs tokenizer.json; a GGUF file needs a 'gpt2' BPE tokenizer)",
                self.origin
            ))
        })
    }

    /// Replaces the tokenizer (e.g. with one from another file).
    pub fn set_tokenizer(&mut self, tokenizer: Tokenizer) {
        let (tokens, vocab) = (tokenizer.vocab_size(), self.config.vocab_size());
        if tokens > vocab {
            // Not refused: text that avoids the extra ids still runs, and the first one met
            // is an error that names it.
            tracing::warn!(
                "the tokenizer has {tokens} tokens, more than the model's vocabulary of {vocab}: \
                 ids past it will be refused; is it this model's tokenizer?"
            );
        }
        self.tokenizer = Some(tokenizer);
        self.tokenizer_replaced = true;
        // The turn-end tokens are the new vocabulary's.
        self.chat = Default::default();
    }

    /// Where the model came from, e.g. `EleutherAI/pythia-70m@step1000` or a folder.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// How the model holds a conversation: its chat template (with its tokenizer) and the
    /// tokens that end a turn, read from the files it was loaded from (a GGUF file's
    /// metadata; a folder's or hub repository's `tokenizer_config.json`,
    /// `chat_template.jinja`, ...) the first time it is asked for. The turn-end tokens include
    /// the config's and the template's end-of-sequence tokens; with a tokenizer given by
    /// [`Model::set_tokenizer`], they are that tokenizer's. An error for a model without a
    /// chat template (a base model, say).
    pub fn chat(&self) -> Result<&crate::chat_template::ModelChat> {
        if let Some(chat) = self.chat.get() {
            return Ok(chat);
        }
        // Where the model came from ([`ModelSpec::origin`]): a path, or `repo@revision`.
        let hub = self.revision.as_deref().and_then(|revision| {
            let repo_id = self.origin.strip_suffix(&format!("@{revision}"))?;
            let local = Path::new(&self.origin).exists();
            (!local).then(|| ModelSpec::Hub {
                repo_id: repo_id.to_string(),
                revision: revision.to_string(),
            })
        });
        let spec = match hub {
            Some(spec) => spec,
            None => ModelSpec::parse(&self.origin, None)?,
        };
        let mut chat = crate::chat_template::ModelChat::of(&spec)?;
        // A tokenizer given in place of the files' own: its end tokens, not the files'.
        if self.tokenizer_replaced {
            let tokenizer = self.tokenizer()?;
            chat.turn_end_ids = crate::chat_template::turn_end_ids(None, tokenizer);
        }
        // The config's end-of-sequence token (as transformers' generate stops at it).
        chat.turn_end_ids.extend(self.config.eos_token_id());
        chat.turn_end_ids.sort_unstable();
        chat.turn_end_ids.dedup();
        Ok(self.chat.get_or_init(|| chat))
    }

    /// The revision loaded: the hub's, or a local folder's sub-folder given as `--revision`.
    pub fn revision(&self) -> Option<&str> {
        self.revision.as_deref()
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the model kept a GGUF file's block-quantized weights
    /// ([`LoadOptions::quantized`]): its activations differ slightly from the f32 model's.
    pub fn quantized(&self) -> bool {
        self.quantized
    }

    /// Every hook point, in forward order.
    pub fn hook_points(&self) -> Vec<HookPoint> {
        HookPoint::all(self.config.num_layers())
    }

    /// The canonical name of a hook point for this architecture.
    pub fn hook_name(&self, point: HookPoint) -> String {
        point.name(self.config.attention_name())
    }

    /// Parses a hook point name (canonical or alias) and checks it exists in this model.
    pub fn hook_point(&self, name: &str) -> Result<HookPoint> {
        HookPoint::parse(name)
            .filter(|p| p.layer().is_none_or(|i| i < self.config.num_layers()))
            .ok_or_else(|| Error::UnknownHookPoint {
                name: name.to_string(),
                valid: self.valid_hook_summary(),
            })
    }

    fn valid_hook_summary(&self) -> String {
        let last = self.config.num_layers() - 1;
        let attn = self.config.attention_name();
        format!(
            "embed, layers.{{0..{last}}}, {}, layers.{{0..{last}}}.mlp, layers.{{0..{last}}}.mlp.input, final_norm, logits \
             (TransformerLens aliases blocks.{{i}}.hook_resid_pre/hook_resid_post/hook_attn_out/hook_mlp_out/attn.hook_z/attn.hook_pattern also work)",
            [HookPoint::Attention(0), HookPoint::AttentionPattern(0), HookPoint::AttentionHeads(0)]
                .map(|p| p.name(attn).replace(".0.", &format!(".{{0..{last}}}.")))
                .join(", "),
        )
    }

    /// Parses a comma-separated list of hook point names; `*` in a name matches any text
    /// within one dot-separated part: anywhere in this model's own names (`layers.*` is
    /// every layer's residual output), and in the layer index of any other spelling
    /// (`blocks.*.hook_resid_post`, `layers.*.attention.pattern` on a Llama model). A name
    /// with `*` elsewhere matches attention patterns only when it ends in `.pattern`, so the
    /// names that select activations to cache or train on (`layers.*.*.*`: the MLP inputs)
    /// keep selecting only per-token points.
    pub fn hook_points_from_list(&self, names: &str) -> Result<Vec<HookPoint>> {
        let mut points = Vec::new();
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name.contains('*') {
                let patterns_named = name.ends_with(".pattern");
                let matched: Vec<HookPoint> = self
                    .hook_points()
                    .into_iter()
                    .filter(|p| p.is_per_token() || patterns_named)
                    .filter(|p| crate::hookpoint::glob_match(name, &self.hook_name(*p)))
                    .chain(self.points_of_any_layer(name))
                    .collect();
                if matched.is_empty() {
                    return Err(Error::UnknownHookPoint {
                        name: name.to_string(),
                        valid: self.valid_hook_summary(),
                    });
                }
                points.extend(matched);
            } else {
                points.push(self.hook_point(name)?);
            }
        }
        points.sort();
        points.dedup();
        if points.is_empty() {
            return Err(Error::InvalidArgument("no hook points given".into()));
        }
        Ok(points)
    }

    /// The points named by `glob` in any spelling when its only `*`s are in the layer index
    /// (`blocks.*.hook_resid_post`): the spelling with each layer's index that matches.
    fn points_of_any_layer(&self, glob: &str) -> Vec<HookPoint> {
        let Some((prefix, rest)) = glob.split_once('.') else {
            return Vec::new();
        };
        let (index, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        if prefix.contains('*') || suffix.contains('*') {
            return Vec::new();
        }
        (0..self.config.num_layers())
            .filter(|i| crate::hookpoint::glob_match(index, &i.to_string()))
            .filter_map(|i| {
                let name = [prefix, &i.to_string(), suffix].join(".");
                self.hook_point(name.trim_end_matches('.')).ok()
            })
            .collect()
    }

    /// Turns token ids (`[seq]` or `[batch, seq]`, any integer dtype) into a checked
    /// `[batch, seq]` u32 tensor on the model's device.
    pub fn prepare_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.prepare_ids_after(ids, 0)
    }

    /// [`Self::prepare_ids`] for tokens at positions `past..`.
    fn prepare_ids_after(&self, ids: &Tensor, past: usize) -> Result<Tensor> {
        let ids = match ids.rank() {
            1 => ids.unsqueeze(0)?,
            2 => ids.clone(),
            r => {
                return Err(Error::InvalidArgument(format!(
                    "token ids must have shape [seq] or [batch, seq], got rank {r} {:?}",
                    ids.dims()
                )))
            }
        };
        if ids.dim(1)? == 0 {
            return Err(Error::InvalidArgument(
                "token ids are empty (sequence length 0)".into(),
            ));
        }
        let positions = past + ids.dim(1)?;
        self.warn_past_context(positions);
        if let Some(window) = self.sliding_window() {
            if positions > window {
                return Err(Error::InvalidArgument(format!(
                    "model '{}' attends within a sliding window of {window} tokens, which this \
                     runtime does not implement: sequences of {positions} tokens would run with \
                     full attention; use at most {window}",
                    self.origin,
                )));
            }
        }
        let flat: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        let vocab_size = self.config.vocab_size();
        if let Some((position, &token)) = flat
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t as usize >= vocab_size)
        {
            return Err(Error::TokenOutOfRange {
                token,
                position,
                vocab_size,
            });
        }
        Ok(ids.to_dtype(DType::U32)?.to_device(&self.device)?)
    }

    /// The most positions a sequence should hold: the config's context length, or its
    /// sliding window when shorter (positions past a window are refused); `None` when the
    /// config states neither.
    pub fn context_len(&self) -> Option<usize> {
        [self.config.max_position_embeddings(), self.sliding_window()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The sliding window a Llama-family config (Mistral's) declares: positions past it are
    /// refused, as this runtime attends over the whole sequence.
    fn sliding_window(&self) -> Option<usize> {
        match &self.config {
            ModelConfig::Llama(crate::config::LlamaConfig { sliding_window, .. }) => {
                *sliding_window
            }
            _ => None,
        }
    }

    /// Warns, once per model, that sequences are longer than the model was trained on: they
    /// run, but activations at the later positions are out of distribution.
    fn warn_past_context(&self, seq_len: usize) {
        use std::sync::atomic::Ordering;
        if let Some(max) = self.config.max_position_embeddings() {
            if seq_len > max && !self.warned_past_context.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "sequences of {seq_len} tokens are longer than {} was trained on \
                     (max_position_embeddings {max}): activations past position {max} are out of distribution",
                    self.origin
                );
            }
        }
    }

    /// Runs token ids (`[seq]` or `[batch, seq]`) with the given captures and replacements.
    /// Captured tensors and logits are `[batch, seq, width]` (attention patterns
    /// `[batch, heads, seq, seq]`), with a batch axis even for `[seq]` ids.
    pub fn forward(&self, ids: &Tensor, hooks: &mut Hooks) -> Result<ForwardOutput> {
        self.run(ids, hooks, None)
    }

    /// [`Self::forward`] of the tokens that follow the positions in `cache`, whose keys and
    /// values stand in for running those positions again; the pass appends its own. `ids`
    /// continue the sequences the cache holds, or all continue one cached sequence (a shared
    /// prompt). Hooks see the new positions only: captures are `[batch, seq, width]`,
    /// patterns `[batch, heads, seq, cache.len() + seq]`, and a replacement edits the new
    /// positions alone. The pass runs through every layer, even when the hooks need less,
    /// so the cache stays whole; a pass that fails leaves the cache as it was. A batch of
    /// different lengths must be right-padded.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        hooks: &mut Hooks,
        cache: &mut KvCache,
    ) -> Result<ForwardOutput> {
        let layers = self.config.num_layers();
        if !(cache.is_empty() || cache.layers() == layers) {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds {} layers, model '{}' has {layers}: it was made by another model",
                cache.layers(),
                self.origin
            )));
        }
        let batch = if ids.rank() == 2 { ids.dim(0)? } else { 1 };
        if let Some(held) = cache.batch().filter(|&held| held != 1 && held != batch) {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds {held} sequences, which a batch of {batch} cannot continue \
                 (a cache of one sequence continues any batch)"
            )));
        }
        let mut extended = cache.clone();
        let out = self.run(ids, hooks, Some(&mut extended))?;
        *cache = extended;
        Ok(out)
    }

    /// Runs `ids` through the network after the positions of `cache`, if any.
    fn run(
        &self,
        ids: &Tensor,
        hooks: &mut Hooks,
        cache: Option<&mut KvCache>,
    ) -> Result<ForwardOutput> {
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let ids = self.prepare_ids_after(ids, past)?;
        for point in hooks.points().collect::<Vec<_>>() {
            if point.layer().is_some_and(|i| i >= self.config.num_layers()) {
                return Err(Error::UnknownHookPoint {
                    name: self.hook_name(point),
                    valid: self.valid_hook_summary(),
                });
            }
        }
        let mut tap = Tap::new(hooks, self.config.attention_name());
        if let (Some(_), Some(last)) = (&cache, self.config.num_layers().checked_sub(1)) {
            tap.run_through(HookPoint::Layer(last));
        }
        let logits = match &self.network {
            Network::GptNeox(net) => net.forward(&ids, &mut tap, cache)?,
            Network::Llama(net) => net.forward(&ids, &mut tap, cache)?,
        };
        Ok(tap.finish(logits))
    }

    /// The model's final norm and unembedding, which turn a residual stream into logits.
    pub fn unembedding(&self) -> crate::Unembedding {
        match &self.network {
            Network::GptNeox(net) => net.unembedding.clone(),
            Network::Llama(net) => net.unembedding.clone(),
        }
    }

    /// The logits `[batch, seq, vocab]` of token ids, with no hooks.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self.forward(ids, &mut Hooks::new())?;
        out.logits
            .ok_or_else(|| Error::InvalidArgument("forward pass stopped before the logits".into()))
    }

    /// Loads a model from a folder path (convenience for tests and examples).
    pub fn from_folder(dir: &Path, options: &LoadOptions) -> Result<Self> {
        Self::from_files(
            &ModelFiles::resolve(&ModelSpec::Folder(dir.to_path_buf()))?,
            options,
        )
    }
}
