//! What the model is: architecture hyper-parameters parsed from a Hugging Face `config.json`.
//!
//! Both the old field names of the Pythia hub files (`rotary_pct`, `rotary_emb_base`) and the
//! newer transformers spellings (`partial_rotary_factor`, `rope_theta`, `rope_parameters`) are read.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// The hyper-parameters of a GPT-NeoX (Pythia) model.
#[derive(Debug, Clone, PartialEq)]
pub struct GptNeoxConfig {
    /// Residual stream width.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Rows of the embedding and unembedding matrices.
    pub vocab_size: usize,
    /// Fraction of each head's dimensions that receive rotary embeddings.
    pub rotary_pct: f64,
    /// Rotary base frequency.
    pub rotary_base: f64,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// `h + attn(ln1(h)) + mlp(ln2(h))` when true, sequential blocks otherwise.
    pub parallel_residual: bool,
    /// Whether `query_key_value` and `dense` have biases.
    pub attention_bias: bool,
    /// Whether the unembedding shares the embedding's weights.
    pub tie_word_embeddings: bool,
    /// End-of-text token id, used to separate documents.
    pub eos_token_id: Option<u32>,
    /// The longest context the model was trained on, if the config says.
    pub max_position_embeddings: Option<usize>,
}

impl GptNeoxConfig {
    /// Dimensions per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Number of leading head dimensions that are rotated.
    pub fn rotary_dims(&self) -> usize {
        (self.head_dim() as f64 * self.rotary_pct) as usize
    }
}

/// The hyper-parameters of a Llama-family model (Llama 2/3, Mistral, SmolLM2, Qwen2, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// The architecture's name in caches and reports: `llama` (Mistral's files too, as
    /// before) or `qwen2`.
    pub model_type: &'static str,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Dimensions per head.
    pub head_dim: usize,
    /// SwiGLU hidden width.
    pub intermediate_size: usize,
    /// Rows of the embedding and unembedding matrices.
    pub vocab_size: usize,
    /// Rotary base frequency.
    pub rope_theta: f64,
    /// Llama 3.1's rotary frequency scaling, when the config asks for it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// One divisor per rotary frequency (`head_dim / 2`), the form a GGUF file gives Llama
    /// 3.1's scaling in (its `rope_freqs.weight`, as llama.cpp applies it); used instead of
    /// `rope_scaling`. `None` from a `config.json`.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
    /// Whether the unembedding shares the embedding's weights.
    pub tie_word_embeddings: bool,
    /// End-of-text token id, used to separate documents.
    pub eos_token_id: Option<u32>,
    /// The longest context the model was trained on, if the config says.
    pub max_position_embeddings: Option<usize>,
    /// Mistral's sliding attention window: each position attends to at most this many
    /// (itself included). Not implemented: longer sequences are refused.
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// Whether the q/k/v projections have biases even where `attention_bias` is false: Qwen2's
    /// (biases on q/k/v, none on o).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == "qwen2"
    }

    /// Whether the attention projection `name` (`q_proj`, `k_proj`, `v_proj` or `o_proj`)
    /// has a bias.
    pub fn attention_projection_bias(&self, name: &str) -> bool {
        self.attention_bias || (self.qkv_bias() && name != "o_proj")
    }
}

/// Llama 3.1's scaling of the rotary frequencies (`rope_type: "llama3"`): frequencies whose
/// wavelength exceeds `original_max_position_embeddings / low_freq_factor` are divided by
/// `factor`, those below `... / high_freq_factor` kept, and those between blended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Divisor of the low frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was first trained with.
    pub original_max_position_embeddings: f64,
}

/// A model's architecture and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// GPT-NeoX / Pythia.
    GptNeox(GptNeoxConfig),
    /// Llama family.
    Llama(LlamaConfig),
}

impl ModelConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            message: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&json, path)
    }

    /// Builds a config from parsed JSON; `path` is only used in error messages.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let fields = Fields { json, path };
        let model_type = fields.model_type()?;
        let config = match model_type.as_str() {
            "gpt_neox" => ModelConfig::GptNeox(GptNeoxConfig {
                hidden_size: fields.usize("hidden_size")?,
                num_layers: fields.usize("num_hidden_layers")?,
                num_heads: fields.usize("num_attention_heads")?,
                intermediate_size: fields.usize("intermediate_size")?,
                vocab_size: fields.usize("vocab_size")?,
                rotary_pct: fields.agreed_f64(
                    &[
                        "rotary_pct",
                        "partial_rotary_factor",
                        "rope_parameters.partial_rotary_factor",
                    ],
                    0.25,
                )?,
                rotary_base: fields.agreed_f64(
                    &[
                        "rotary_emb_base",
                        "rope_theta",
                        "rope_parameters.rope_theta",
                    ],
                    10000.0,
                )?,
                layer_norm_eps: fields.agreed_f64(&["layer_norm_eps"], 1e-5)?,
                parallel_residual: fields.bool_or("use_parallel_residual", true)?,
                attention_bias: fields.bool_or("attention_bias", true)?,
                tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
                eos_token_id: fields.token_id("eos_token_id")?,
                max_position_embeddings: fields.context_length(),
            }),
            "llama" | "mistral" | "qwen2" => {
                let hidden_size = fields.usize("hidden_size")?;
                let num_heads = fields.usize("num_attention_heads")?;
                ModelConfig::Llama(LlamaConfig {
                    model_type: if model_type == "qwen2" { "qwen2" } else { "llama" },
                    hidden_size,
                    num_layers: fields.usize("num_hidden_layers")?,
                    num_heads,
                    num_kv_heads: fields.usize_or("num_key_value_heads", num_heads)?,
                    head_dim: fields.usize_or("head_dim", hidden_size / num_heads.max(1))?,
                    intermediate_size: fields.usize("intermediate_size")?,
                    vocab_size: fields.usize("vocab_size")?,
                    rope_theta: fields
                        .agreed_f64(&["rope_theta", "rope_parameters.rope_theta"], 10000.0)?,
                    rope_scaling: fields.llama3_rope_scaling()?,
                    rope_freq_factors: None,
                    rms_norm_eps: fields.agreed_f64(&["rms_norm_eps"], 1e-6)?,
                    // transformers' Qwen2 has biases on q/k/v, never on o, whatever the
                    // config says.
                    attention_bias: model_type != "qwen2"
                        && fields.bool_or("attention_bias", false)?,
                    mlp_bias: fields.bool_or("mlp_bias", false)?,
                    tie_word_embeddings: fields.bool_or("tie_word_embeddings", false)?,
                    eos_token_id: fields.token_id("eos_token_id")?,
                    max_position_embeddings: fields.context_length(),
                    sliding_window: match fields.usize_opt("sliding_window")? {
                        Some(0) => {
                            return Err(fields
                                .error("field 'sliding_window' must be positive, got 0".into()))
                        }
                        // Qwen2 states a window that only applies with use_sliding_window.
                        Some(_) if model_type == "qwen2" && !fields.qwen2_slides()? => None,
                        window => window,
                    },
                })
            }
            other => {
                return Err(fields.error(format!(
                    "model_type '{other}' is not supported (supported: gpt_neox, llama, mistral, qwen2)"
                )))
            }
        };
        fields.check_supported_variant(&model_type)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Number of transformer blocks.
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.num_layers,
            ModelConfig::Llama(c) => c.num_layers,
        }
    }

    /// Number of attention (query) heads.
    pub fn num_heads(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.num_heads,
            ModelConfig::Llama(c) => c.num_heads,
        }
    }

    /// Residual stream width.
    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
        }
    }

    /// Dimensions per attention head: the width of one head's slice of the heads' outputs
    /// (hook point `layers.{i}.attention.dense.input`).
    pub fn head_dim(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.head_dim(),
            ModelConfig::Llama(c) => c.head_dim,
        }
    }

    /// Rows of the unembedding (may exceed the tokenizer's vocabulary: padding columns).
    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::GptNeox(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
        }
    }

    /// End-of-text token id, if the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::GptNeox(c) => c.eos_token_id,
            ModelConfig::Llama(c) => c.eos_token_id,
        }
    }

    /// The longest context the model was trained on, if the config says: longer sequences
    /// run, but the model never saw their later positions.
    pub fn max_position_embeddings(&self) -> Option<usize> {
        match self {
            ModelConfig::GptNeox(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    /// How this architecture spells its attention module in hook point names.
    pub fn attention_name(&self) -> crate::hookpoint::AttentionName {
        match self {
            ModelConfig::GptNeox(_) => crate::hookpoint::AttentionName::Attention,
            ModelConfig::Llama(_) => crate::hookpoint::AttentionName::SelfAttn,
        }
    }

    /// Width of the rows at a hook point; an error for an attention pattern, which has no
    /// rows per token (so it cannot be cached, streamed or given to an SAE).
    pub fn width(&self, point: crate::HookPoint) -> Result<usize> {
        Ok(match point {
            crate::HookPoint::AttentionPattern(_) => {
                return Err(Error::InvalidArgument(format!(
                "hook point '{}' is an attention pattern, [batch, heads, seq, seq], not one row \
                     per token: caches, activation streams and SAEs take per-token hook points \
                     (capture patterns in a forward pass instead)",
                point.name(self.attention_name())
            )))
            }
            crate::HookPoint::Logits => self.vocab_size(),
            crate::HookPoint::AttentionHeads(_) => self.num_heads() * self.head_dim(),
            _ => self.hidden_size(),
        })
    }

    /// The `model_type` string of this architecture.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::GptNeox(_) => "gpt_neox",
            ModelConfig::Llama(c) => c.model_type,
        }
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::Config {
            path: path.into(),
            message,
        };
        let (hidden, heads, layers, vocab) = match self {
            ModelConfig::GptNeox(c) => (c.hidden_size, c.num_heads, c.num_layers, c.vocab_size),
            ModelConfig::Llama(c) => (c.hidden_size, c.num_heads, c.num_layers, c.vocab_size),
        };
        for (name, value) in [
            ("hidden_size", hidden),
            ("num_attention_heads", heads),
            ("num_hidden_layers", layers),
            ("vocab_size", vocab),
        ] {
            if value == 0 {
                return Err(bad(format!("{name} must be positive, got 0")));
            }
        }
        if let Some(eos) = self.eos_token_id().filter(|&id| id as usize >= vocab) {
            return Err(bad(format!(
                "eos_token_id {eos} is not below vocab_size {vocab}"
            )));
        }
        let (eps_name, eps, base_name, base) = match self {
            ModelConfig::GptNeox(c) => (
                "layer_norm_eps",
                c.layer_norm_eps,
                "the rotary base (rotary_emb_base or rope_theta)",
                c.rotary_base,
            ),
            ModelConfig::Llama(c) => ("rms_norm_eps", c.rms_norm_eps, "rope_theta", c.rope_theta),
        };
        // A negative epsilon makes every norm NaN; a base <= 0 makes every rotary angle NaN.
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(bad(format!(
                "{eps_name} must be a finite number >= 0, got {eps}"
            )));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(bad(format!(
                "{base_name} must be a finite number > 0, got {base}"
            )));
        }
        match self {
            ModelConfig::GptNeox(c) => {
                if c.hidden_size % c.num_heads != 0 {
                    return Err(bad(format!(
                        "hidden_size {} is not divisible by num_attention_heads {}",
                        c.hidden_size, c.num_heads
                    )));
                }
                if !(0.0..=1.0).contains(&c.rotary_pct) {
                    return Err(bad(format!("rotary_pct {} is not in [0, 1]", c.rotary_pct)));
                }
                if c.rotary_dims() % 2 != 0 {
                    return Err(bad(format!(
                        "rotary_pct {} gives an odd number of rotary dimensions ({})",
                        c.rotary_pct,
                        c.rotary_dims()
                    )));
                }
            }
            ModelConfig::Llama(c) => {
                if c.num_kv_heads == 0 || c.num_heads % c.num_kv_heads != 0 {
                    return Err(bad(format!(
                        "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                        c.num_heads, c.num_kv_heads
                    )));
                }
                if c.head_dim % 2 != 0 {
                    return Err(bad(format!(
                        "head_dim {} must be even for rotary embeddings",
                        c.head_dim
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Typed access to config fields with errors that name the field and file.
struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn error(&self, message: String) -> Error {
        Error::Config {
            path: self.path.into(),
            message,
        }
    }

    /// Refuses the variants of an architecture this runtime does not implement, which it
    /// would otherwise run as the plain architecture with wrong results: another MLP
    /// activation than the architecture's own, and scaled rotary embeddings (Llama 3.1's
    /// `llama3`, `linear`, `dynamic`, `yarn`...).
    fn check_supported_variant(&self, model_type: &str) -> Result<()> {
        let (activation, scalings) = if model_type == "gpt_neox" {
            ("gelu", &[][..])
        } else {
            ("silu", &["llama3"][..])
        };
        if let Some(act) = self.get("hidden_act") {
            if act.as_str() != Some(activation) {
                return Err(self.error(format!(
                    "hidden_act {act} is not supported for {model_type} (this runtime implements \"{activation}\")"
                )));
            }
        }
        if let Some((_, kind)) = self.rope_scaling() {
            if !scalings.contains(&kind) {
                return Err(self.error(format!(
                    "scaled rotary embeddings of type \"{kind}\" are not supported for {model_type} (supported: default{})",
                    scalings.iter().map(|s| format!(", {s}")).collect::<String>()
                )));
            }
        }
        Ok(())
    }

    /// Whether a Qwen2 config's sliding window applies to some layer: `use_sliding_window`
    /// (default false) and, where the config lists them, a `sliding_attention` layer type
    /// (transformers slides from layer `max_window_layers`, default 28, on).
    fn qwen2_slides(&self) -> Result<bool> {
        if !self.bool_or("use_sliding_window", false)? {
            return Ok(false);
        }
        Ok(match self.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .any(|t| t.as_str() == Some("sliding_attention")),
            // transformers' default max_window_layers is 28.
            None => self.usize_or("max_window_layers", 28)? < self.usize("num_hidden_layers")?,
        })
    }

    /// The rotary scaling object (`rope_scaling`, or transformers 5's `rope_parameters`)
    /// and its type, unless absent or `default`.
    fn rope_scaling(&self) -> Option<(&Value, &str)> {
        ["rope_scaling", "rope_parameters"]
            .into_iter()
            .filter_map(|key| self.get(key))
            .find_map(|v| {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                (kind != "default").then_some((v, kind))
            })
    }

    /// Llama 3.1's scaling, when [`Fields::rope_scaling`] is of type `llama3`.
    fn llama3_rope_scaling(&self) -> Result<Option<Llama3RopeScaling>> {
        let Some((v, "llama3")) = self.rope_scaling() else {
            return Ok(None);
        };
        let number = |key: &str| {
            v.get(key)
                .and_then(Value::as_f64)
                .filter(|x| *x > 0.0)
                .ok_or_else(|| {
                    self.error(format!(
                        "llama3 rotary scaling needs a positive number '{key}', got {}",
                        v.get(key).unwrap_or(&Value::Null)
                    ))
                })
        };
        let scaling = Llama3RopeScaling {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            // transformers falls back on the model's own context length.
            original_max_position_embeddings: match v.get("original_max_position_embeddings") {
                Some(_) => number("original_max_position_embeddings")?,
                None => self
                    .get("max_position_embeddings")
                    .and_then(Value::as_f64)
                    .filter(|x| *x > 0.0)
                    .ok_or_else(|| {
                        self.error(
                            "llama3 rotary scaling needs 'original_max_position_embeddings' (or 'max_position_embeddings')".into(),
                        )
                    })?,
            },
        };
        if scaling.high_freq_factor <= scaling.low_freq_factor {
            return Err(self.error(format!(
                "llama3 rotary scaling needs high_freq_factor ({}) above low_freq_factor ({})",
                scaling.high_freq_factor, scaling.low_freq_factor
            )));
        }
        Ok(Some(scaling))
    }

    /// Looks up a dotted path such as `rope_parameters.rope_theta`.
    fn get(&self, key: &str) -> Option<&Value> {
        key.split('.')
            .try_fold(self.json, |value, part| value.get(part))
            .filter(|v| !v.is_null())
    }

    fn model_type(&self) -> Result<String> {
        if let Some(model_type) = self.get("model_type").and_then(Value::as_str) {
            return Ok(model_type.to_string());
        }
        let architecture = self
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        match architecture {
            "GPTNeoXForCausalLM" => Ok("gpt_neox".into()),
            "LlamaForCausalLM" => Ok("llama".into()),
            "MistralForCausalLM" => Ok("mistral".into()),
            "Qwen2ForCausalLM" => Ok("qwen2".into()),
            _ => {
                Err(self.error("missing field 'model_type' (and no known 'architectures')".into()))
            }
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.get(key) {
            None => Err(self.error(format!("missing field '{key}'"))),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                self.error(format!(
                    "field '{key}' must be a non-negative integer, got {v}"
                ))
            }),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.usize(key).map(Some),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.usize_opt(key)?.unwrap_or(default))
    }

    /// `max_position_embeddings`, which only feeds a warning: a value that is not a positive
    /// integer is ignored rather than refused.
    fn context_length(&self) -> Option<usize> {
        self.get("max_position_embeddings")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .map(|n| n as usize)
    }

    /// The number under whichever of `keys` (spellings of one setting across transformers
    /// versions) the config has, `default` under none; spellings that disagree are an error
    /// naming both, since which one transformers takes depends on its version.
    fn agreed_f64(&self, keys: &[&str], default: f64) -> Result<f64> {
        let mut found: Option<(&str, f64)> = None;
        for key in keys {
            let Some(v) = self.get(key) else { continue };
            let value = v
                .as_f64()
                .ok_or_else(|| self.error(format!("field '{key}' must be a number, got {v}")))?;
            match found {
                Some((first, agreed)) if agreed != value => {
                    return Err(self.error(format!(
                        "fields '{first}' ({agreed}) and '{key}' ({value}) disagree: transformers \
                         versions differ in which they use; keep one"
                    )))
                }
                Some(_) => {}
                None => found = Some((key, value)),
            }
        }
        Ok(found.map_or(default, |(_, value)| value))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("field '{key}' must be true or false, got {v}"))),
        }
    }

    /// A token id that may be given as an integer or a list of integers (the first is used).
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let value = match self.get(key) {
            None => return Ok(None),
            Some(Value::Array(ids)) => match ids.first() {
                None => return Ok(None),
                Some(first) => first,
            },
            Some(v) => v,
        };
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .map(Some)
            .ok_or_else(|| self.error(format!("field '{key}' must be a token id, got {value}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(json: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&json, Path::new("config.json"))
    }

    fn pythia_70m() -> Value {
        json!({
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
            "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
            "intermediate_size": 2048, "hidden_act": "gelu", "rotary_pct": 0.25,
            "rotary_emb_base": 10000, "layer_norm_eps": 1e-5, "use_parallel_residual": true,
            "tie_word_embeddings": false, "vocab_size": 50304, "bos_token_id": 0, "eos_token_id": 0
        })
    }

    #[test]
    fn an_eos_id_past_the_vocabulary_is_refused() {
        let mut config = pythia_70m();
        config["eos_token_id"] = json!(50304);
        let message = parse(config).unwrap_err().to_string();
        assert!(
            message.contains("eos_token_id 50304 is not below vocab_size 50304"),
            "{message}"
        );
    }

    #[test]
    fn reads_pythia_hub_config() {
        let ModelConfig::GptNeox(c) = parse(pythia_70m()).unwrap() else {
            panic!()
        };
        assert_eq!((c.hidden_size, c.num_layers, c.num_heads), (512, 6, 8));
        assert_eq!((c.head_dim(), c.rotary_dims()), (64, 16));
        assert_eq!(c.eos_token_id, Some(0));
        assert_eq!(c.max_position_embeddings, None);
        assert!(c.parallel_residual && c.attention_bias);
        let mut with_length = pythia_70m();
        with_length["max_position_embeddings"] = json!(2048);
        assert_eq!(
            parse(with_length.clone())
                .unwrap()
                .max_position_embeddings(),
            Some(2048)
        );
        // It only feeds a warning: an odd value is ignored, not refused.
        with_length["max_position_embeddings"] = json!("2k");
        assert_eq!(parse(with_length).unwrap().max_position_embeddings(), None);
    }

    /// Variants that would run as the plain architecture with wrong results are refused.
    #[test]
    fn unsupported_activations_and_rope_scaling_are_refused() {
        let mut gelu_fast = pythia_70m();
        gelu_fast["hidden_act"] = json!("gelu_fast");
        let err = parse(gelu_fast).unwrap_err().to_string();
        assert!(
            err.contains("hidden_act \"gelu_fast\" is not supported for gpt_neox"),
            "{err}"
        );
        let mut neox_scaled = pythia_70m();
        neox_scaled["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        let err = parse(neox_scaled).unwrap_err().to_string();
        assert!(
            err.contains("type \"linear\" are not supported for gpt_neox"),
            "{err}"
        );
        // Llama 3.1's scaling is read (Llama-3.2-1B's config.json spelling); others are not.
        let mut llama3 = pythia_70m();
        llama3["model_type"] = json!("llama");
        llama3["hidden_act"] = json!("silu");
        llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let ModelConfig::Llama(c) = parse(llama3.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.rope_scaling.unwrap().original_max_position_embeddings,
            8192.0
        );
        llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0});
        let err = parse(llama3.clone()).unwrap_err().to_string();
        assert!(
            err.contains("needs a positive number 'low_freq_factor'"),
            "{err}"
        );
        // Without original_max_position_embeddings, the model's own length (transformers).
        llama3["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0});
        llama3["max_position_embeddings"] = json!(2048);
        let ModelConfig::Llama(c) = parse(llama3.clone()).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.rope_scaling.unwrap().original_max_position_embeddings,
            2048.0
        );
        llama3.as_object_mut().unwrap().remove("rope_scaling");
        llama3["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e4});
        let err = parse(llama3.clone()).unwrap_err().to_string();
        assert!(
            err.contains("\"yarn\" are not supported for llama (supported: default, llama3)"),
            "{err}"
        );
        llama3["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4});
        parse(llama3).unwrap();
    }

    #[test]
    fn reads_new_rope_parameter_names() {
        let mut j = pythia_70m();
        let obj = j.as_object_mut().unwrap();
        obj.remove("rotary_pct");
        obj.remove("rotary_emb_base");
        obj.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 500.0, "partial_rotary_factor": 1.0}),
        );
        let ModelConfig::GptNeox(c) = parse(j).unwrap() else {
            panic!()
        };
        assert_eq!((c.rotary_pct, c.rotary_base), (1.0, 500.0));
        // Both spellings, agreeing: fine; disagreeing: which one wins depends on the
        // transformers version, so neither is taken.
        let mut both = pythia_70m();
        both["rope_parameters"] = json!({"rope_theta": 10000, "partial_rotary_factor": 0.25});
        parse(both.clone()).unwrap();
        both["rope_parameters"]["partial_rotary_factor"] = json!(1.0);
        let err = parse(both).unwrap_err().to_string();
        assert!(
            err.contains(
                "'rotary_pct' (0.25) and 'rope_parameters.partial_rotary_factor' (1) disagree"
            ),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let mut j = pythia_70m();
        j.as_object_mut().unwrap().remove("hidden_size");
        let err = parse(j).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("'hidden_size'"),
            "{err}"
        );

        let mut j = pythia_70m();
        j["num_attention_heads"] = json!(7);
        let err = parse(j).unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");

        let mut j = pythia_70m();
        j["hidden_size"] = json!("big");
        let err = parse(j).unwrap_err().to_string();
        assert!(
            err.contains("'hidden_size' must be a non-negative integer"),
            "{err}"
        );

        // Values that would make every activation NaN.
        for (key, value, expected) in [
            (
                "layer_norm_eps",
                json!(-1.0),
                "layer_norm_eps must be a finite number >= 0, got -1",
            ),
            (
                "rotary_emb_base",
                json!(0),
                "(rotary_emb_base or rope_theta) must be a finite number > 0, got 0",
            ),
        ] {
            let mut j = pythia_70m();
            j[key] = value;
            let err = parse(j).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }

        let err = parse(json!({"model_type": "bert"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'bert' is not supported"), "{err}");
    }

    #[test]
    fn reads_llama_gqa() {
        let c = parse(json!({
            "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
            "vocab_size": 49152, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true, "eos_token_id": 2
        }))
        .unwrap();
        let ModelConfig::Llama(c) = c else { panic!() };
        assert_eq!((c.head_dim, c.num_kv_heads, c.rope_theta), (64, 3, 1e5));
        assert!(!c.qkv_bias() && !c.attention_bias);
    }

    /// Qwen2.5-0.5B-Instruct's config.json: biases on q/k/v only, and a stated window that
    /// applies only with use_sliding_window (then from layer max_window_layers on).
    #[test]
    fn reads_qwen2_and_its_sliding_window_switch() {
        let mut qwen = json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
            "max_window_layers": 21, "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "sliding_window": 32768, "tie_word_embeddings": true, "use_sliding_window": false,
            "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645
        });
        let window = |json: &Value| match parse(json.clone()).unwrap() {
            ModelConfig::Llama(c) => {
                assert!(c.qkv_bias() && !c.attention_bias && !c.mlp_bias);
                assert_eq!(c.model_type, "qwen2");
                assert_eq!((c.head_dim, c.rope_theta), (64, 1e6));
                c.sliding_window
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(window(&qwen), None);
        qwen["use_sliding_window"] = json!(true);
        assert_eq!(window(&qwen), Some(32768));
        qwen["max_window_layers"] = json!(24);
        assert_eq!(window(&qwen), None);
        qwen["layer_types"] = json!(["full_attention", "sliding_attention"]);
        assert_eq!(window(&qwen), Some(32768));
        // Without max_window_layers transformers slides from layer 28: none of 24.
        qwen.as_object_mut().unwrap().remove("layer_types");
        qwen.as_object_mut().unwrap().remove("max_window_layers");
        assert_eq!(window(&qwen), None);
        // Found by its architectures entry; its attention_bias key is ignored, as there.
        qwen.as_object_mut().unwrap().remove("model_type");
        qwen["attention_bias"] = json!(true);
        assert_eq!(window(&qwen), None);
    }
}
