//! Deterministic synthetic weights for any architecture config: each element is a hash of
//! the tensor's name and index, so a model of any size can be rebuilt bit-identically here
//! and in Python (`tests/fixtures/generate.py` implements the same generator) without
//! committing its weights. Used by the golden tests and the benchmarks.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::digest::{mix64, Fnv};
use crate::{Error, Result};

fn fnv1a64(name: &str) -> u64 {
    Fnv::default().bytes(name.as_bytes()).finish()
}

/// The `(center, scale)` of a checkpoint tensor: values are `center + scale * u`, `u` in [-1, 1).
fn center_scale(name: &str, shape: &[usize]) -> (f32, f32) {
    if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.1)
    } else if name.contains("embed_in") || name.contains("embed_tokens") {
        (0.0, 1.0)
    } else {
        let fan_in = *shape.last().unwrap_or(&1);
        (0.0, (1.0 / (fan_in as f64).sqrt()) as f32)
    }
}

/// The elements of tensor `name` with the given shape, in row-major order.
pub fn synthetic_values(name: &str, shape: &[usize]) -> Vec<f32> {
    let (center, scale) = center_scale(name, shape);
    let seed = fnv1a64(name);
    let count: usize = shape.iter().product();
    (0..count as u64)
        .map(|k| element(seed, k, center, scale))
        .collect()
}

/// Element `k` of the tensor whose name hashes to `seed`.
fn element(seed: u64, k: u64, center: f32, scale: f32) -> f32 {
    let z = mix64(seed.wrapping_add((k + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let u = (z >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0;
    // Two roundings, as in the Python generator: no fused multiply-add.
    let scaled = scale * u;
    center + scaled
}

/// Names and shapes of every parameter of a model with this config, in checkpoint naming.
pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut params = Vec::new();
    match config {
        ModelConfig::GptNeox(c) => {
            let (d, f) = (c.hidden_size, c.intermediate_size);
            params.push((
                "gpt_neox.embed_in.weight".to_string(),
                vec![c.vocab_size, d],
            ));
            for i in 0..c.num_layers {
                let p = format!("gpt_neox.layers.{i}");
                for norm in ["input_layernorm", "post_attention_layernorm"] {
                    params.push((format!("{p}.{norm}.weight"), vec![d]));
                    params.push((format!("{p}.{norm}.bias"), vec![d]));
                }
                params.push((
                    format!("{p}.attention.query_key_value.weight"),
                    vec![3 * d, d],
                ));
                params.push((format!("{p}.attention.dense.weight"), vec![d, d]));
                if c.attention_bias {
                    params.push((format!("{p}.attention.query_key_value.bias"), vec![3 * d]));
                    params.push((format!("{p}.attention.dense.bias"), vec![d]));
                }
                params.push((format!("{p}.mlp.dense_h_to_4h.weight"), vec![f, d]));
                params.push((format!("{p}.mlp.dense_h_to_4h.bias"), vec![f]));
                params.push((format!("{p}.mlp.dense_4h_to_h.weight"), vec![d, f]));
                params.push((format!("{p}.mlp.dense_4h_to_h.bias"), vec![d]));
            }
            params.push(("gpt_neox.final_layer_norm.weight".to_string(), vec![d]));
            params.push(("gpt_neox.final_layer_norm.bias".to_string(), vec![d]));
            if !c.tie_word_embeddings {
                params.push(("embed_out.weight".to_string(), vec![c.vocab_size, d]));
            }
        }
        ModelConfig::Llama(c) => {
            let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
            params.push((
                "model.embed_tokens.weight".to_string(),
                vec![c.vocab_size, d],
            ));
            for i in 0..c.num_layers {
                let p = format!("model.layers.{i}");
                params.push((format!("{p}.input_layernorm.weight"), vec![d]));
                params.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
                for (proj, out, inp) in [
                    ("q_proj", c.num_heads * hd, d),
                    ("k_proj", c.num_kv_heads * hd, d),
                    ("v_proj", c.num_kv_heads * hd, d),
                    ("o_proj", d, c.num_heads * hd),
                ] {
                    params.push((format!("{p}.self_attn.{proj}.weight"), vec![out, inp]));
                    if c.attention_projection_bias(proj) {
                        params.push((format!("{p}.self_attn.{proj}.bias"), vec![out]));
                    }
                }
                for (proj, out, inp) in
                    [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)]
                {
                    params.push((format!("{p}.mlp.{proj}.weight"), vec![out, inp]));
                    if c.mlp_bias {
                        params.push((format!("{p}.mlp.{proj}.bias"), vec![out]));
                    }
                }
            }
            params.push(("model.norm.weight".to_string(), vec![d]));
            if !c.tie_word_embeddings {
                params.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
            }
        }
    }
    params
}

/// Writes `model.safetensors` (float32) with synthetic weights for `config` into `dir`.
pub fn write_synthetic_weights(config: &ModelConfig, dir: &Path) -> Result<()> {
    let mut tensors = HashMap::new();
    for (name, shape) in parameter_shapes(config) {
        let values = synthetic_values(&name, &shape);
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::WeightFile {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// Writes a complete model folder into `dir`: `config.json` (from `config`, checked like any
/// config), synthetic `model.safetensors`, and a copy of `tokenizer` as `tokenizer.json`.
pub fn write_synthetic_model(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer: Option<&Path>,
) -> Result<ModelConfig> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    crate::atomic::write_json(&config_path, config)?;
    let parsed = ModelConfig::from_file(&config_path)?;
    write_synthetic_weights(&parsed, dir)?;
    if let Some(tokenizer) = tokenizer {
        let target = dir.join("tokenizer.json");
        std::fs::copy(tokenizer, &target).map_err(|e| Error::io(tokenizer, e))?;
    }
    Ok(parsed)
}

/// The `config.json` of the tiny GPT-NeoX model the tests and examples run: `layers` layers
/// of width 32, 4 heads, MLP width 64, rotary embeddings on half of each head, and Pythia's
/// vocabulary (50,304), so the real Pythia tokenizer fits it.
pub fn tiny_gpt_neox_config(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": layers,
        "num_attention_heads": 4, "intermediate_size": 64, "rotary_pct": 0.5,
        "vocab_size": 50304, "eos_token_id": 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check values printed by `tests/fixtures/generate.py` for the same generator.
    #[test]
    fn matches_python_generator_bits() {
        let cases: [(&str, Vec<usize>, u64, [u32; 4]); 3] = [
            (
                "gpt_neox.embed_in.weight",
                vec![50304, 512],
                0x9710a5101591701e,
                [0xbee8a3c4, 0xbf0fa662, 0xbea83a98, 0x3f713fb8],
            ),
            (
                "embed_out.weight",
                vec![50304, 512],
                0x76dbe77170b07e75,
                [0xbd143eab, 0xbcec4af1, 0x3cf9a30d, 0x3bb4234b],
            ),
            (
                "gpt_neox.layers.0.input_layernorm.weight",
                vec![512],
                0xe8423b7aa58749cf,
                [0x3f6bb5e2, 0x3f86d0b0, 0x3f696d7b, 0x3f6a7bff],
            ),
        ];
        for (name, shape, hash, bits) in cases {
            assert_eq!(fnv1a64(name), hash, "{name}");
            let (center, scale) = center_scale(name, &shape);
            for (k, expected) in bits.iter().enumerate() {
                let value = element(hash, k as u64, center, scale);
                assert_eq!(value.to_bits(), *expected, "{name}[{k}]");
            }
        }
    }
}
