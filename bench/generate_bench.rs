//! Times greedy generation for `bench/generate.py`: loads a model through the hook runtime
//! (a GGUF file, dequantised to f32, or with `--quantized` its quantized weights kept), takes the first `--prompt-tokens` tokens of a text file
//! as the prompt and generates `--new-tokens` tokens with [`hooks::Model::generate`] (no stop
//! token), plain and then steered (a vector added to `--steer-layer`'s residual at every step).
//! `--requantize q8_0|q4_0` first writes a copy of the GGUF file whose blocks' projection
//! weights are re-quantized to that type, next to the system's temporary files, and runs that.
//! Prints one JSON line: the model file, the prompt's ids, load time, each run's time and
//! generated ids, peak RSS.
//!
//! cargo run --release -p eleuther-hooks --example generate_bench -- MODEL TEXT_FILE
//!     [--prompt-tokens 128] [--new-tokens 128] [--steer-layer 10] [--steer-scale 96]
//!     [--quantized] [--requantize q8_0|q4_0]

use std::time::Instant;

use anyhow::{bail, Context, Result};
use hooks::candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use hooks::candle_core::{Device, Tensor};
use hooks::{GenerateOptions, HookPoint, Hooks, LoadOptions, Model};

#[path = "bench_args.rs"]
mod bench_args;
use bench_args::{arg, peak_rss_mib};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: generate_bench MODEL TEXT_FILE [options]";
    let model_name = args.get(1).context(usage)?;
    let text_file = args.get(2).context(usage)?;
    let prompt_tokens: usize = arg(&args, "--prompt-tokens", "128").parse()?;
    let new_tokens: usize = arg(&args, "--new-tokens", "128").parse()?;
    let layer: usize = arg(&args, "--steer-layer", "10").parse()?;
    let scale: f64 = arg(&args, "--steer-scale", "96").parse()?;
    let model_name = match arg(&args, "--requantize", "").as_str() {
        "" => model_name.clone(),
        kind => requantized(model_name, kind)?,
    };
    let load = LoadOptions {
        quantized: args.iter().any(|a| a == "--quantized"),
        ..LoadOptions::default()
    };

    let started = Instant::now();
    let model = Model::load(&model_name, &load)?;
    let load_s = started.elapsed().as_secs_f64();
    let text =
        std::fs::read_to_string(text_file).with_context(|| format!("reading {text_file}"))?;
    let mut prompt = model.tokenizer()?.encode(&text)?;
    prompt.truncate(prompt_tokens);
    let options = GenerateOptions {
        max_new_tokens: new_tokens,
        stop_tokens: Some(Vec::new()),
        ..GenerateOptions::default()
    };
    // The steering direction: the first token's embedding, scaled to `scale`.
    let embedded = model.forward(
        &Tensor::new(&prompt[..1], model.device())?,
        &mut Hooks::capture_only([HookPoint::Embed]),
    )?;
    let direction = embedded.captures[&HookPoint::Embed].flatten_all()?;
    let norm = direction.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let vector = (direction * (scale / norm as f64))?;

    // Warm-up: the first pass packs the weights for the CPU's matrix product.
    let warm_up = GenerateOptions {
        max_new_tokens: 2,
        ..options.clone()
    };
    model.generate(&prompt, &mut Hooks::new(), &warm_up)?;

    let mut runs = Vec::new();
    for steered in [false, true] {
        let mut hooks = if steered {
            Hooks::new().replace(HookPoint::Layer(layer), |x| {
                Ok(Some(x.broadcast_add(&vector)?))
            })
        } else {
            Hooks::new()
        };
        let started = Instant::now();
        let ids = model.generate(&prompt, &mut hooks, &options)?;
        let seconds = started.elapsed().as_secs_f64();
        runs.push(serde_json::json!({
            "steered": steered,
            "seconds": seconds,
            "new_tokens": ids.len(),
            "tokens_per_s": ids.len() as f64 / seconds,
            "ids": ids,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "eleuther-interp",
            "model": model_name,
            "quantized": load.quantized,
            "prompt": prompt,
            "load_s": load_s,
            "runs": runs,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}

/// A copy of the GGUF file `source` whose blocks' 2-D weights (not the norms, embedding or
/// output) are re-quantized to `kind`, written once to the temporary folder; its path.
fn requantized(source: &str, kind: &str) -> Result<String> {
    let dtype = match kind {
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        other => bail!("--requantize {other}: expected q8_0 or q4_0"),
    };
    let stem = std::path::Path::new(source)
        .file_stem()
        .context("a GGUF file name")?
        .to_string_lossy();
    let target = std::env::temp_dir().join(format!("{stem}.{kind}.gguf"));
    if target.is_file() {
        return Ok(target.display().to_string());
    }
    let (content, mut reader) = hooks::gguf_header(std::path::Path::new(source))?;
    let mut tensors = Vec::new();
    for (name, info) in &content.tensor_infos {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu)?;
        let projection = name.starts_with("blk.") && info.shape.rank() == 2;
        let tensor = match projection {
            true => QTensor::quantize(&tensor.dequantize(&Device::Cpu)?, dtype)?,
            false => tensor,
        };
        tensors.push((name.clone(), tensor));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let partial = target.with_extension("gguf.partial");
    gguf_file::write(&mut std::fs::File::create(&partial)?, &metadata, &tensors)?;
    std::fs::rename(&partial, &target)?;
    Ok(target.display().to_string())
}
