//! Times greedy generation for `bench/generate.py`: loads a model through the hook runtime
//! (a GGUF file, dequantised to f32), takes the first `--prompt-tokens` tokens of a text file
//! as the prompt and generates `--new-tokens` tokens with [`hooks::Model::generate`] (no stop
//! token), plain and then steered (a vector added to `--steer-layer`'s residual at every step).
//! Prints one JSON line: the prompt's ids, load time, each run's time and generated ids, peak
//! RSS.
//!
//! cargo run --release -p eleuther-hooks --example generate_bench -- MODEL TEXT_FILE
//!     [--prompt-tokens 128] [--new-tokens 128] [--steer-layer 10] [--steer-scale 96]

use std::time::Instant;

use anyhow::{Context, Result};
use hooks::candle_core::Tensor;
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

    let started = Instant::now();
    let model = Model::load(model_name, &LoadOptions::default())?;
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
            "prompt": prompt,
            "load_s": load_s,
            "runs": runs,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
