//! Times a scorer that reads prompt log-probabilities, for `bench/reading.py`: loads a GGUF
//! chat model ([`LocalLlm`]), cuts `--excerpts` windows of `--tokens` tokens, evenly spaced,
//! from a text file, and scores one explanation on every window with `--scorer`: `simulation`
//! ([`delphi::score::simulate`]: one read request, as in a job) or `surprisal`
//! ([`delphi::score::surprisal`]: two continuation requests, placeholder and explanation).
//! Prints one JSON line: load and scoring times, tokens through the model, peak RSS and the
//! numbers to compare (per window: expected activations, or the surprisal per token after
//! the placeholder then after the explanation). `--dump FILE` first writes the requests, so
//! that the peer runs exactly these prompts.
//!
//! cargo run --release -p eleuther-delphi --example reading_bench -- GGUF TEXT_FILE
//!     [--scorer simulation] [--excerpts 50] [--tokens 32] [--explanation TEXT] [--dump FILE]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use delphi::llm::local::LocalLlm;
use delphi::prompts::{
    simulation_answer, simulation_messages, surprisal_prompt, SIMULATION_LEVELS,
    SURPRISAL_PLACEHOLDER,
};
use delphi::score::{simulate, surprisal, Sample};

#[path = "bench_args.rs"]
mod bench_args;
use bench_args::{arg, peak_rss_mib};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: reading_bench GGUF TEXT_FILE [options]";
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
    let scorer = arg(&args, "--scorer", "simulation");
    if scorer != "simulation" && scorer != "surprisal" {
        bail!("--scorer must be simulation or surprisal, not {scorer}");
    }

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
    let texts: Vec<String> = samples.iter().map(|s| s.tokens.concat()).collect();
    if !dump.is_empty() {
        let requests = if scorer == "simulation" {
            samples
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "messages": simulation_messages(&explanation),
                        "answer": simulation_answer(&s.tokens),
                        "levels": SIMULATION_LEVELS,
                    })
                })
                .collect()
        } else {
            [SURPRISAL_PLACEHOLDER, explanation.as_str()]
                .iter()
                .map(|d| serde_json::json!({ "prompt": surprisal_prompt(d), "texts": texts }))
                .collect::<Vec<serde_json::Value>>()
        };
        std::fs::write(&dump, serde_json::to_string(&requests)?)?;
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    // The usage counts a prompt once per excerpt, as an API bills it; the model ran it once.
    let (compared, usage, cached) = if scorer == "simulation" {
        let score = runtime.block_on(simulate(&llm, &explanation, &samples, 1.0))?;
        let all = score.groups.last().context("no simulation group")?;
        let expected: Vec<Vec<f64>> = all
            .scored_sequence_simulations
            .iter()
            .map(|s| s.simulation.expected_activations.clone())
            .collect();
        let prompt = llm.prompt_ids(&simulation_messages(&explanation))?.len();
        (serde_json::json!(expected), score.usage, prompt)
    } else {
        let score = runtime.block_on(surprisal(&llm, &explanation, &samples))?;
        let surprisals: Vec<[&Vec<f64>; 2]> = score
            .outputs
            .iter()
            .map(|o| [&o.no_explanation, &o.explanation])
            .collect();
        // Each prompt but its last token is cached once; that token is read with each text.
        let cached = [SURPRISAL_PLACEHOLDER, explanation.as_str()]
            .iter()
            .map(|d| Ok(llm.tokenizer().encode(&surprisal_prompt(d))?.len() - 1))
            .sum::<Result<usize>>()?;
        (serde_json::json!(surprisals), score.usage, cached)
    };
    let seconds = started.elapsed().as_secs_f64();
    let through_model = usage.prompt_tokens - (excerpts as u64 - 1) * cached as u64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "eleuther-interp",
            "scorer": scorer,
            "excerpts": excerpts,
            "tokens": tokens,
            "load_s": load_s,
            "seconds": seconds,
            "excerpts_per_s": excerpts as f64 / seconds,
            "prompt_tokens": through_model,
            "peak_rss_mib": peak_rss_mib(),
            "compared": compared,
        })
    );
    Ok(())
}
