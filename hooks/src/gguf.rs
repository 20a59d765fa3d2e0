//! GGUF files (llama.cpp's format) as plain float models: the config from the metadata, every
//! tensor dequantized and renamed to its Hugging Face name, and the tokenizer rebuilt from the
//! metadata. This reproduces what transformers 5.24 builds with
//! `from_pretrained(dir, gguf_file=...)` for `general.architecture = llama` (see
//! `tests/fixtures/README.md`, section E) and `qwen2` (Llama's blocks with q/k/v biases; its
//! Q/K rows are stored unpermuted, as llama.cpp runs it with rotate-half rotary embeddings;
//! checked on the tiny fixture `tests/fixtures/llama/qwen2_bias/model.gguf`): weights are
//! dequantized to f32 (then converted to the compute dtype), nothing stays quantized. Or, with
//! [`crate::LoadOptions::quantized`], the blocks' projection weights stay in their quantized
//! type (see [`read`]).
//!
//! Llama 3.1's rotary scaling: llama.cpp's converter stores it as the tensor
//! `rope_freqs.weight` (one divisor per frequency), read into
//! [`crate::config::LlamaConfig::rope_freq_factors`] and applied as llama.cpp does. Here this
//! reader parts from transformers' GGUF loader, which ignores that tensor and runs such files
//! unscaled; checked instead against transformers on the safetensors and config (with the
//! scaling) of a tiny model, in `hooks/tests/smollm2_gguf.rs`.
//!
//! Tensor types: whatever candle can dequantize (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//! Q2_K..Q6_K); Q4_1, Q8_0 and F32 are checked against transformers by the SmolLM2 test.
//!
//! Tokenizer: only `tokenizer.ggml.model = "gpt2"` (byte-level BPE) is rebuilt. For any other
//! tokenizer type (e.g. sentencepiece `llama`) the model still loads, with a warning, and
//! [`crate::Model::tokenizer`] returns an error; token ids can still be passed in directly.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::config::{LlamaConfig, ModelConfig};
use crate::weights::{root_cause, WeightStore};
use crate::{Error, Result, Tokenizer};

/// A GGUF file turned into what [`crate::Model`] is built from.
pub(crate) struct GgufModel {
    pub config: ModelConfig,
    pub store: WeightStore,
    pub tokenizer: Option<Tokenizer>,
}

/// Reads a Llama- or Qwen2-architecture GGUF file; weights are dequantized and converted to `dtype`,
/// except, when `keep_quantized`, the attention and MLP projection weights stored in a
/// block-quantized type (Q4_0, Q8_0, K-quants...), which are kept as they are (their rows in
/// Hugging Face order) for [`crate::WeightStore::quantized`].
pub(crate) fn read(path: &Path, dtype: DType, keep_quantized: bool) -> Result<GgufModel> {
    let (content, mut reader) = gguf_header(path)?;
    let meta = Metadata {
        content: &content,
        path,
    };
    let architecture = meta.string("general.architecture")?;
    if !GGUF_ARCHITECTURES.contains(&architecture) {
        return Err(meta.error(format!(
            "general.architecture '{architecture}' is not supported (supported: {})",
            GGUF_ARCHITECTURES.join(", ")
        )));
    }
    let mut llama = llama_config(&meta, architecture)?;
    // llama.cpp's converter permutes Q/K rows for the interleaved rotary pairs of `llama`
    // only; `qwen2` keeps Hugging Face's order.
    let permuted = architecture == "llama";
    let mut tensors = std::collections::HashMap::new();
    let mut quantized = std::collections::HashMap::new();
    let names: BTreeMap<_, _> = content.tensor_infos.iter().collect();
    for (name, info) in names {
        if name == ROPE_FREQS {
            llama.rope_freq_factors = Some(rope_freq_factors(&content, &mut reader, &llama, path)?);
            continue;
        }
        let hf = hf_name(name).ok_or_else(|| unknown_tensor(path, name))?;
        let read_error = |e: candle_core::Error| {
            let cause = root_cause(&e);
            let hint = if cause.contains("not supported") {
                "an unsupported tensor type"
            } else {
                "the file is truncated or corrupt"
            };
            Error::WeightFile {
                path: path.into(),
                message: format!(
                    "cannot read tensor '{name}' ({:?} {:?}): {cause} ({hint})",
                    info.ggml_dtype,
                    info.shape.dims(),
                ),
            }
        };
        let stored = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(read_error)?;
        let heads = permuted
            .then(|| permuted_heads(name, llama.num_heads, llama.num_kv_heads))
            .flatten();
        let bad_rows = |e: Error| Error::BadWeight {
            name: hf.clone(),
            message: format!("GGUF tensor '{name}' in {}: {e}", path.display()),
        };
        if keep_quantized && is_projection(&hf) && is_block_quantized(stored.dtype()) {
            let stored = match heads {
                Some(heads) => {
                    unpermute_quantized_rows(&stored, heads, llama.head_dim).map_err(bad_rows)?
                }
                None => stored,
            };
            quantized.insert(hf, std::sync::Arc::new(stored));
            continue;
        }
        let mut tensor = stored.dequantize(&Device::Cpu).map_err(read_error)?;
        if let Some(heads) = heads {
            tensor = unpermute_rows(&tensor, heads, llama.head_dim).map_err(bad_rows)?;
        }
        tensors.insert(hf, tensor.to_dtype(dtype)?);
    }
    let tokenizer = tokenizer(&meta, llama.eos_token_id)?;
    Ok(GgufModel {
        config: ModelConfig::Llama(llama),
        store: WeightStore::from_tensors(tensors, path.display().to_string())
            .with_quantized(quantized),
        tokenizer,
    })
}

/// The tokenizer a GGUF file's metadata describes, read without its tensors: see
/// [`gguf_tokenizer`].
pub(crate) fn read_tokenizer(path: &Path) -> Result<Option<Tokenizer>> {
    gguf_tokenizer(&gguf_header(path)?.0, path)
}

/// The end-of-text id a GGUF file's metadata names, whatever its tokenizer, for a
/// replacement tokenizer to separate documents with, as the model does.
pub(crate) fn read_eos_id(path: &Path) -> Result<Option<u32>> {
    eos_id(&Metadata {
        content: &gguf_header(path)?.0,
        path,
    })
}

fn eos_id(meta: &Metadata<'_>) -> Result<Option<u32>> {
    meta.usize_opt("tokenizer.ggml.eos_token_id")?
        .map(|id| {
            u32::try_from(id)
                .map_err(|_| meta.error(format!("tokenizer.ggml.eos_token_id {id} is too large")))
        })
        .transpose()
}

/// The metadata and tensor index of a GGUF file (not the tensors' data), and the open file
/// to read the tensors from, for every reader of GGUF files in the workspace.
/// Checked as far as the header allows: the alignment, and that every tensor's bytes (from
/// its type and shape) start aligned, lie in the file and overlap no other's, so that a
/// damaged file is an error rather than garbage weights.
pub fn gguf_header(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let bad = |message: String| Error::WeightFile {
        path: path.into(),
        message: format!("not a readable GGUF file: {message}"),
    };
    // candle's reader panics on some damaged headers (an alignment of 0 divides by zero).
    let content = crate::error::without_panicking(|| Content::read(&mut reader))
        .map_err(|panic| bad(format!("its header is damaged ({panic})")))?
        .map_err(|e| Error::WeightFile {
            path: path.into(),
            message: header_error(&e, file_len),
        })?;
    // The integer types candle's reader takes the alignment from (it ignores others).
    let alignment = match content.metadata.get("general.alignment") {
        None => 32,
        Some(
            value @ (Value::U8(_)
            | Value::U16(_)
            | Value::U32(_)
            | Value::I8(_)
            | Value::I16(_)
            | Value::I32(_)),
        ) => integer(value)
            .filter(|a| *a > 0 && a % 8 == 0)
            .ok_or_else(|| {
                bad(format!(
                    "general.alignment {value:?} is not a positive multiple of 8"
                ))
            })? as u64,
        Some(other) => {
            return Err(bad(format!(
                "general.alignment {other:?} is not a 32-bit integer"
            )))
        }
    };
    let mut spans = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let (block, block_bytes) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d));
        let bytes = elements
            .filter(|elements| elements % block == 0)
            .and_then(|elements| (elements / block).checked_mul(block_bytes))
            .map(|b| b as u64);
        let start = content.tensor_data_offset.checked_add(info.offset);
        let (Some(bytes), Some(start)) = (bytes, start) else {
            return Err(bad(format!(
                "tensor '{name}' ({:?} {:?} at offset {}) has no valid size or place",
                info.ggml_dtype,
                info.shape.dims(),
                info.offset
            )));
        };
        if info.offset % alignment != 0 {
            return Err(bad(format!(
                "tensor '{name}' starts at offset {}, not a multiple of the alignment {alignment}",
                info.offset
            )));
        }
        spans.push((start, start.saturating_add(bytes), name));
    }
    spans.sort();
    // Overlaps first: a tensor moved onto another also leaves a gap where it was.
    let pairs = || {
        spans
            .windows(2)
            .map(|pair| (pair[0].1, pair[0].2, pair[1].0, pair[1].2))
    };
    if let Some((_, first, _, second)) = pairs().find(|&(end, _, start, _)| end > start) {
        return Err(bad(format!(
            "tensors '{first}' and '{second}' overlap in the file (their types, shapes and offsets disagree)"
        )));
    }
    // Writers pad each tensor to the alignment and no more (gguf-py, llama.cpp).
    if let Some((end, first, start, second)) =
        pairs().find(|&(end, _, start, _)| start - end >= alignment)
    {
        return Err(bad(format!(
            "{} unused bytes lie between tensors '{first}' and '{second}': a tensor's type or shape disagrees with its data",
            start - end
        )));
    }
    if let Some(&(_, end, name)) = spans.last() {
        if end > file_len {
            return Err(bad(format!(
                "tensor '{name}' ends at byte {end}, past the end of the file ({file_len} bytes): the file is truncated"
            )));
        }
        if file_len - end >= alignment {
            return Err(bad(format!(
                "{} unused bytes follow the last tensor, '{name}': a tensor's type or shape disagrees with its data",
                file_len - end
            )));
        }
    }
    Ok((content, reader))
}

/// The tokenizer described by the `tokenizer.ggml.*` metadata of a GGUF file already read
/// (`path` is for messages), as [`crate::Model::load`] builds it for a `.gguf` model, without
/// touching the tensors: for callers that run the weights themselves (e.g. quantized).
/// `None` (with a warning) when the file has no tokenizer or one of a type other than `gpt2`.
pub fn gguf_tokenizer(content: &Content, path: &Path) -> Result<Option<Tokenizer>> {
    let meta = Metadata { content, path };
    tokenizer(&meta, eos_id(&meta)?)
}

/// A header error, with unknown tensor types spelled out.
fn header_error(e: &candle_core::Error, file_len: u64) -> String {
    let cause = root_cause(e);
    if cause.contains("failed to fill whole buffer") {
        format!(
            "not a readable GGUF file: truncated or damaged, its header runs past the end of the \
             file ({file_len} bytes)"
        )
    } else if cause.contains("unknown dtype for tensor") {
        format!(
            "not a readable GGUF file: {cause} (an unsupported quantization type; supported: \
             F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
        )
    } else {
        format!("not a readable GGUF file: {cause}")
    }
}

fn unknown_tensor(path: &Path, name: &str) -> Error {
    Error::WeightFile {
        path: path.into(),
        message: format!("tensor '{name}' has no place in a Llama model"),
    }
}

/// The Hugging Face name of a GGUF tensor of a Llama model (as transformers maps them).
fn hf_name(gguf: &str) -> Option<String> {
    let (stem, kind) = gguf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let module = match stem {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let part = match part {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{part}")
        }
    };
    Some(format!("{module}.{kind}"))
}

/// The number of heads whose rows llama.cpp's converter permuted, for `attn_q` / `attn_k`.
fn permuted_heads(gguf: &str, num_heads: usize, num_kv_heads: usize) -> Option<usize> {
    let stem = gguf.rsplit_once('.')?.0;
    if stem.ends_with(".attn_q") {
        Some(num_heads)
    } else if stem.ends_with(".attn_k") {
        Some(num_kv_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half order):
/// Hugging Face row `h*hd + t*hd/2 + j` is GGUF row `h*hd + 2j + t`.
fn unpermute_rows(t: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(1);
    if rows != heads * head_dim {
        return Err(Error::InvalidArgument(format!(
            "has {rows} rows, expected {heads} heads x {head_dim} dims = {}",
            heads * head_dim
        )));
    }
    let cols: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The tensor in which llama.cpp's converter stores Llama 3.1's rotary scaling: one divisor
/// per frequency.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The [`ROPE_FREQS`] divisors, checked: `head_dim / 2` positive finite numbers.
fn rope_freq_factors(
    content: &Content,
    reader: &mut BufReader<File>,
    llama: &LlamaConfig,
    path: &Path,
) -> Result<Vec<f32>> {
    let bad = |message: String| Error::WeightFile {
        path: path.into(),
        message: format!("tensor '{ROPE_FREQS}': {message}"),
    };
    let factors: Vec<f32> = content
        .tensor(reader, ROPE_FREQS, &Device::Cpu)
        .and_then(|t| t.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| bad(format!("cannot be read ({})", root_cause(&e))))?;
    if factors.len() != llama.head_dim / 2 {
        return Err(bad(format!(
            "has {} values, expected one per rotary frequency ({})",
            factors.len(),
            llama.head_dim / 2
        )));
    }
    if let Some(bad_value) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
        return Err(bad(format!(
            "holds {bad_value}, expected positive divisors"
        )));
    }
    Ok(factors)
}

/// Whether a Hugging Face tensor name is a block's attention or MLP projection weight.
fn is_projection(hf: &str) -> bool {
    hf.starts_with("model.layers.")
        && [
            "q_proj.weight",
            "k_proj.weight",
            "v_proj.weight",
            "o_proj.weight",
            "gate_proj.weight",
            "up_proj.weight",
            "down_proj.weight",
        ]
        .iter()
        .any(|end| hf.ends_with(end))
}

/// Whether a GGUF tensor type stores blocks of quantized values (not plain floats).
fn is_block_quantized(dtype: GgmlDType) -> bool {
    !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// [`unpermute_rows`] for a block-quantized `[rows, in]` tensor: each row is whole blocks of
/// bytes, moved as they are.
fn unpermute_quantized_rows(t: &QTensor, heads: usize, head_dim: usize) -> Result<QTensor> {
    let rows = t.shape().dims().first().copied().unwrap_or(1);
    let bytes = t.data()?;
    if rows == 0 || bytes.len() % rows != 0 {
        return Err(Error::InvalidArgument(format!(
            "its {} bytes are not {rows} whole rows",
            bytes.len()
        )));
    }
    let row_bytes = bytes.len() / rows;
    let as_rows = Tensor::from_vec(bytes.into_owned(), (rows, row_bytes), &Device::Cpu)?;
    let moved = unpermute_rows(&as_rows, heads, head_dim)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let storage = QStorage::from_data(moved.into(), &Device::Cpu, t.dtype())?;
    Ok(QTensor::new(storage, t.shape().clone())?)
}

/// The `general.architecture` values read, all run as Llama-family models.
pub const GGUF_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// The model config from the `{architecture}.*` metadata, validated like a `config.json`.
fn llama_config(meta: &Metadata, architecture: &str) -> Result<LlamaConfig> {
    let key = |name: &str| format!("{architecture}.{name}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    if heads == 0 {
        return Err(meta.error(format!(
            "{} must be positive, got 0",
            key("attention.head_count")
        )));
    }
    let tensor_dims = |name: &str| {
        meta.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
    };
    let vocab_size = match tensor_dims("token_embd.weight").as_deref() {
        Some(&[vocab, width]) if width == hidden => vocab,
        Some(other) => {
            return Err(meta.error(format!(
                "tensor 'token_embd.weight' has shape {other:?}, expected [vocab, {hidden}]"
            )))
        }
        None => return Err(meta.error("tensor 'token_embd.weight' is missing".into())),
    };

    let kv_heads = meta
        .usize_opt(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    let head_dim = match meta.usize_opt(&key("attention.key_length"))? {
        Some(d) => d,
        None => hidden / heads,
    };
    for key in [key("attention.value_length"), key("rope.dimension_count")] {
        if let Some(d) = meta.usize_opt(&key)? {
            if d != head_dim {
                return Err(meta.error(format!(
                    "{key} = {d} differs from the head dimension {head_dim}; not supported"
                )));
            }
        }
    }
    let scaling_key = key("rope.scaling.type");
    if let Some(scaling) = meta.get(&scaling_key) {
        let scaling = meta.value_string(&scaling_key, scaling)?;
        if scaling != "none" {
            return Err(meta.error(format!(
                "{scaling_key} '{scaling}' is not supported (only none, or Llama 3.1's \
                 scaling given as the tensor rope_freqs.weight)"
            )));
        }
    }
    let has = |name: &str| meta.content.tensor_infos.contains_key(name);
    // Qwen2's q/k/v biases come with its model type (and it has none on o).
    let attention_bias = architecture == "llama" && has("blk.0.attn_q.bias");
    let json = json!({
        "model_type": architecture,
        "hidden_size": hidden,
        "num_hidden_layers": meta.usize(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": meta.usize(&key("feed_forward_length"))?,
        "vocab_size": vocab_size,
        "rope_theta": meta.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0),
        "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        "attention_bias": attention_bias,
        "mlp_bias": has("blk.0.ffn_up.bias"),
        "tie_word_embeddings": !has("output.weight"),
        "eos_token_id": meta.usize_opt("tokenizer.ggml.eos_token_id")?,
        "max_position_embeddings": meta.usize_opt(&key("context_length"))?,
    });
    match ModelConfig::from_json(&json, meta.path)? {
        ModelConfig::Llama(config) => Ok(config),
        other => Err(meta.error(format!(
            "built a '{}' config from {architecture} metadata",
            other.model_type()
        ))),
    }
}

/// Split regexes for `tokenizer.ggml.pre` values, as transformers 5.24 applies them
/// (`GGUF_PRE_TOKENIZER_SPLITS`); other values (e.g. SmolLM2's `smollm`) use the GPT-2 regex
/// of the byte-level pre-tokenizer.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// `tokenizer.ggml.pre` values whose split GPT-2's regex gives: GPT-2's own, and SmolLM's
/// (single digits, where GPT-2 groups them; its vocabulary holds no token of two digits or of
/// a space and a digit, so the tokens come out the same).
fn splits_as_gpt2(pre: &str) -> bool {
    matches!(pre, "gpt-2" | "gpt2" | "default" | "smollm")
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the rest to 256 + n.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let printable = matches!(byte, 0x21..=0x7e | 0xa1..=0xac | 0xae..=0xff);
        let code = if printable {
            byte as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("codes below 512 are valid chars");
    }
    table
}

/// The tokenizer described by `tokenizer.ggml.*`, or `None` (with a warning) when the file has
/// none or one of a type other than `gpt2`. Follows transformers' `byte_level_tokenizer`,
/// `add_gguf_special_tokens` and `set_split_regex`.
fn tokenizer(meta: &Metadata, eos_id: Option<u32>) -> Result<Option<Tokenizer>> {
    let Some(kind) = meta.get("tokenizer.ggml.model") else {
        tracing::warn!(
            "{}: no tokenizer.ggml.model; loading without a tokenizer",
            meta.path.display()
        );
        return Ok(None);
    };
    let kind = meta.value_string("tokenizer.ggml.model", kind)?;
    if kind != "gpt2" {
        tracing::warn!(
            "{}: tokenizer.ggml.model '{kind}' is not supported (only 'gpt2' byte-level BPE); \
             loading without a tokenizer",
            meta.path.display()
        );
        return Ok(None);
    }
    let bad = |message: String| meta.error(format!("tokenizer: {message}"));
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |token: &str| token.chars().all(|c| alphabet.contains(&c));
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| {
            let spelled = if in_alphabet(token) {
                token.to_string()
            } else {
                token.bytes().map(|b| spelling[b as usize]).collect()
            };
            (spelled, id as u32)
        })
        .collect();
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge '{merge}' is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(format!("cannot build BPE: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);

    let pre = match meta.get("tokenizer.ggml.pre") {
        Some(v) => Some(meta.value_string("tokenizer.ggml.pre", v)?),
        None => None,
    };
    if let Some(pre) = pre.filter(|p| split_regex(p).is_none() && !splits_as_gpt2(p)) {
        tracing::warn!(
            "{}: tokenizer.ggml.pre '{pre}' is not one this reader knows; text is split as \
             GPT-2 splits it (as transformers does), which may not be how this model's own \
             tokenizer splits it",
            meta.path.display()
        );
    }
    let pre_tokenizer: PreTokenizerWrapper = match pre.and_then(split_regex) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| bad(format!("bad split regex: {e}")))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into()
        }
        // transformers' `GPT2Tokenizer` ignores `tokenizer.ggml.add_space_prefix`.
        None => ByteLevel::new(false, true, true).into(),
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    inner.with_decoder(Some(ByteLevel::default()));

    let types = match meta.get("tokenizer.ggml.token_type") {
        Some(_) => meta.ints("tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };
    let special_ids: Vec<usize> = [
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
    ]
    .into_iter()
    .filter_map(|key| meta.usize_opt(key).transpose())
    .collect::<Result<_>>()?;
    // CONTROL (3) tokens and the named special tokens are special; USER_DEFINED (4) tokens are
    // plain added tokens. Both are matched whole in text.
    let special: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|&(id, token)| {
            (types.get(id) == Some(&3) || special_ids.contains(&id)) && in_alphabet(token)
        })
        .map(|(_, token)| AddedToken::from(token.to_string(), true))
        .collect();
    inner
        .add_special_tokens(special)
        .map_err(|e| bad(format!("cannot add special tokens: {e}")))?;
    let user_defined: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|&(token, &kind)| kind == 4 && in_alphabet(token))
        .map(|(token, _)| AddedToken::from(token.to_string(), false).normalized(false))
        .collect();
    inner
        .add_tokens(user_defined)
        .map_err(|e| bad(format!("cannot add user-defined tokens: {e}")))?;

    let add_bos = meta
        .bool_opt("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let add_eos = meta
        .bool_opt("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);
    if add_bos || add_eos {
        let bos_id = meta.usize_opt("tokenizer.ggml.bos_token_id")?;
        let eos_id = eos_id.map(|id| id as usize);
        let named = |id: Option<usize>, what: &str| -> Result<(String, u32)> {
            let id = id.ok_or_else(|| bad(format!("add_{what}_token is set but no {what} id")))?;
            let token = tokens
                .get(id)
                .ok_or_else(|| bad(format!("{what} id {id} is beyond the vocabulary")))?;
            Ok((token.to_string(), id as u32))
        };
        // As transformers' `update_post_processor`: `[bos] $A [eos]`, pairs `... [bos] $B [eos]`.
        let bos = add_bos.then(|| named(bos_id, "bos")).transpose()?;
        let eos = add_eos.then(|| named(eos_id, "eos")).transpose()?;
        let piece = |token: &Option<(String, u32)>, seq: u32| {
            token.as_ref().map(|(t, _)| format!("{t}:{seq}"))
        };
        let sequence = |name: &str, seq: u32| {
            [
                piece(&bos, seq),
                Some(format!("${name}:{seq}")),
                piece(&eos, seq),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
        };
        let single = sequence("A", 0);
        let pair = [single.clone(), sequence("B", 1)].concat();
        let template = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| bad(format!("bad template: {e}")))?
            .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
            .build()
            .map_err(|e| bad(format!("bad template: {e}")))?;
        inner.with_post_processor(Some(template));
    }
    Ok(Some(Tokenizer::new(inner, eos_id)))
}

/// Typed access to GGUF metadata with errors that name the key and file.
struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Metadata<'_> {
    fn error(&self, message: String) -> Error {
        Error::Config {
            path: self.path.into(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| self.error(format!("GGUF metadata key '{key}' is missing")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.value_usize(key, self.required(key)?)
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.value_usize(key, v)).transpose()
    }

    fn value_usize(&self, key: &str, value: &Value) -> Result<usize> {
        integer(value)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| {
                self.error(format!(
                    "GGUF metadata '{key}' must be a non-negative integer, got {value:?}"
                ))
            })
    }

    /// A finite number (a NaN or infinity would become `null` in the config built from it,
    /// and then its default).
    fn f64(&self, key: &str) -> Result<f64> {
        let value = self.required(key)?;
        let number = match value {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            other => integer(other).map(|n| n as f64),
        };
        number.filter(|x| x.is_finite()).ok_or_else(|| {
            self.error(format!(
                "GGUF metadata '{key}' must be a finite number, got {value:?}"
            ))
        })
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.f64(key).map(Some),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(format!(
                "GGUF metadata '{key}' must be true or false, got {other:?}"
            ))),
        }
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.value_string(key, self.required(key)?)
    }

    fn value_string<'v>(&self, key: &str, value: &'v Value) -> Result<&'v str> {
        match value {
            Value::String(s) => Ok(s),
            other => Err(self.error(format!(
                "GGUF metadata '{key}' must be a string, got a {:?}",
                other.value_type()
            ))),
        }
    }

    fn array(&self, key: &str) -> Result<&[Value]> {
        match self.required(key)? {
            Value::Array(items) => Ok(items),
            other => Err(self.error(format!(
                "GGUF metadata '{key}' must be an array, got a {:?}",
                other.value_type()
            ))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.array(key)?
            .iter()
            .map(|v| self.value_string(key, v))
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .map(|v| {
                integer(v).ok_or_else(|| {
                    self.error(format!(
                        "GGUF metadata '{key}' must hold integers, got {v:?}"
                    ))
                })
            })
            .collect()
    }
}

/// Any GGUF integer value as i64 (u64 values beyond i64 are rejected).
fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(n) => Some(n as i64),
        Value::I8(n) => Some(n as i64),
        Value::U16(n) => Some(n as i64),
        Value::I16(n) => Some(n as i64),
        Value::U32(n) => Some(n as i64),
        Value::I32(n) => Some(n as i64),
        Value::U64(n) => i64::try_from(n).ok(),
        Value::I64(n) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moving a quantized tensor's rows gives exactly the dequantized tensor's rows moved
    /// (Q8_0 and Q4_1, the types of SmolLM2's file; 3 heads of 8 dims, 64 columns).
    #[test]
    fn quantized_rows_move_as_the_dequantized_rows() {
        let (heads, head_dim, cols) = (3, 8, 64);
        let values: Vec<f32> = (0..heads * head_dim * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let dense = Tensor::from_vec(values, (heads * head_dim, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let stored = QTensor::quantize(&dense, dtype).unwrap();
            let moved = unpermute_quantized_rows(&stored, heads, head_dim).unwrap();
            assert_eq!(moved.dtype(), dtype);
            let expected =
                unpermute_rows(&stored.dequantize(&Device::Cpu).unwrap(), heads, head_dim).unwrap();
            let actual = moved.dequantize(&Device::Cpu).unwrap();
            let diff = (actual - &expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
            // The permutation is not the identity: rows did move.
            let before = stored.dequantize(&Device::Cpu).unwrap();
            let change = (before - expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(change.to_scalar::<f32>().unwrap() > 0.0);
        }
        let ragged = QTensor::quantize(&dense, GgmlDType::Q8_0).unwrap();
        assert!(unpermute_quantized_rows(&ragged, 5, head_dim).is_err());
    }

    /// Pre-tokenizers this reader knows (by their own split or GPT-2's) are not warned of.
    #[test]
    fn known_pre_tokenizers() {
        for pre in ["smollm", "gpt-2", "llama-bpe", "qwen2", "tekken"] {
            assert!(split_regex(pre).is_some() || splits_as_gpt2(pre), "{pre}");
        }
        for pre in ["nonesuch", "deepseek-llm", ""] {
            assert!(split_regex(pre).is_none() && !splits_as_gpt2(pre), "{pre}");
        }
    }

    #[test]
    fn maps_gguf_names_to_hugging_face() {
        for (gguf, hf) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            ("blk.3.attn_q.bias", "model.layers.3.self_attn.q_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
            ),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), Some(hf), "{gguf}");
        }
        for bad in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_qkv.weight",
            "output",
        ] {
            assert_eq!(hf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn unpermutes_rows_like_transformers() {
        // 2 heads of dim 4, one column: GGUF row h*4 + 2j + t holds HF row h*4 + 2t + j.
        let gguf = Tensor::new(
            &[[0f32], [2.], [1.], [3.], [4.], [6.], [5.], [7.]],
            &Device::Cpu,
        )
        .unwrap();
        let hf: Vec<f32> = unpermute_rows(&gguf, 2, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(hf, [0., 1., 2., 3., 4., 5., 6., 7.]);
        let bias = Tensor::new(&[0f32, 2., 1., 3.], &Device::Cpu).unwrap();
        let bias: Vec<f32> = unpermute_rows(&bias, 1, 4).unwrap().to_vec1().unwrap();
        assert_eq!(bias, [0., 1., 2., 3.]);
        assert!(unpermute_rows(&gguf, 3, 4).is_err());
    }

    #[test]
    fn byte_table_matches_gpt2() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[0xad], 'Ń');
    }
}
