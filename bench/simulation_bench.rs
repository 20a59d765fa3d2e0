//! Times the simulation scorer for `bench/simulation.py`: loads a GGUF chat model
//! ([`LocalLlm`]), cuts `--excerpts` windows of `--tokens` tokens, evenly spaced, from a text
//! file, has the model simulate one explanation on every window
//! ([`delphi::score::simulate`]: one read request, as in a job), and prints one JSON line:
//! load and scoring times, tokens read, peak RSS and the expected activations. `--dump FILE`
//! first writes the read requests (chat messages, answer pieces, levels), so that the peer runs
//! exactly these prompts.
//!
//! cargo run --release -p eleuther-delphi --example simulation_bench -- GGUF TEXT_FILE
//!     [--excerpts 50] [--tokens 32] [--explanation TEXT] [--dump FILE]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use delphi::llm::local::LocalLlm;
use delphi::prompts::{simulation_answer, simulation_messages, SIMULATION_LEVELS};
use delphi::score::{simulate, Sample};

#[path = "bench_args.rs"]
mod bench_args;
use bench_args::{arg, peak_rss_mib};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: simulation_bench GGUF TEXT_FILE [options]";
    let gguf = PathBuf::from(args.get(1).context(usage)?);
    let text_file = PathBuf::from(args.get(2).context(usage)?);
    let excerpts: usize = arg(&args, "--excerpts", "50").parse()?;
    let tokens: usize = arg(&args, "--tokens", "32").parse()?;
    let explanation = arg(
        &args,
        "--explanation",
        "Names of places: countries, cities, rivers and regions.",
    );
    let dump = arg(&args, "--dump", "");

    let started = Instant::now();
    let llm = LocalLlm::load(&gguf)?;
    let load_s = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&text_file)
        .with_context(|| format!("reading {}", text_file.display()))?;
    let ids = llm.tokenizer().encode(&text)?;
    if excerpts == 0 || tokens == 0 || ids.len() < excerpts * tokens {
        bail!(
            "{} has {} tokens: too few for {excerpts} windows of {tokens}",
            text_file.display(),
            ids.len()
        );
    }
    let stride = ids.len() / excerpts;
    let samples = (0..excerpts)
        .map(|i| {
            let window = &ids[i * stride..i * stride + tokens];
            Ok(Sample {
                tokens: window
                    .iter()
                    .map(|&id| llm.tokenizer().token_text(id))
                    .collect::<hooks::Result<Vec<String>>>()?,
                activations: vec![0.0; tokens],
                activating: false,
                distance: -1,
            })
        })
        .collect::<Result<Vec<Sample>>>()?;
    if !dump.is_empty() {
        let requests: Vec<serde_json::Value> = samples
            .iter()
            .map(|s| {
                serde_json::json!({
                    "messages": simulation_messages(&explanation),
                    "answer": simulation_answer(&s.tokens),
                    "levels": SIMULATION_LEVELS,
                })
            })
            .collect();
        std::fs::write(&dump, serde_json::to_string(&requests)?)?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let score = runtime.block_on(simulate(&llm, &explanation, &samples, 1.0))?;
    let seconds = started.elapsed().as_secs_f64();
    // The usage counts the prompt once per excerpt, as an API bills it; the model ran it once.
    let prompt_len = llm.prompt_ids(&simulation_messages(&explanation))?.len() as u64;
    let through_model = score.usage.prompt_tokens - (excerpts as u64 - 1) * prompt_len;
    let all = score.groups.last().context("no simulation group")?;
    let expected: Vec<&Vec<f64>> = all
        .scored_sequence_simulations
        .iter()
        .map(|s| &s.simulation.expected_activations)
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "impl": "eleuther-interp",
            "excerpts": excerpts,
            "tokens": tokens,
            "load_s": load_s,
            "seconds": seconds,
            "excerpts_per_s": excerpts as f64 / seconds,
            "prompt_tokens": through_model,
            "peak_rss_mib": peak_rss_mib(),
            "expected": expected,
        })
    );
    Ok(())
}
