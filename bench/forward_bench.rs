//! Times our forward pass for `bench/forward.py`: loads a model (folder or .gguf), runs a fixed batch of
//! random token ids capturing every `layers.{i}`, and prints one JSON line of timings.
//! With `--synthesize CONFIG`, first writes synthetic weights for that config.json into the
//! model folder (the same generator the golden tests use).
//!
//! cargo run --release -p eleuther-hooks --example forward_bench -- MODEL_DIR [--batch 4]
//!     [--seq 512] [--iters 3] [--dtype float32] [--device cpu|cuda] [--synthesize CONFIG_JSON]
//!
//! On a CUDA device each timed pass ends with a device synchronisation, and the JSON line
//! also gives the device memory in use after the runs (`device_mem_used_mib`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use hooks::candle_core::{Device, Tensor};
use hooks::{HookPoint, Hooks, LoadOptions, Model};

#[path = "bench_args.rs"]
mod bench_args;
use bench_args::{arg, peak_rss_mib};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .context("usage: forward_bench MODEL_DIR_OR_GGUF [options]")?,
    );
    let batch: usize = arg(&args, "--batch", "4").parse()?;
    let seq: usize = arg(&args, "--seq", "512").parse()?;
    let iters: usize = arg(&args, "--iters", "3").parse()?;
    let dtype = hooks::parse_dtype(&arg(&args, "--dtype", "float32"))?;
    let device = hooks::parse_device(&arg(&args, "--device", "cpu"))?;
    let synthesize = arg(&args, "--synthesize", "");
    if !synthesize.is_empty() {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&synthesize)?)?;
        hooks::synthetic::write_synthetic_model(&dir, &config, None)?;
        return Ok(());
    }
    let options = LoadOptions {
        dtype,
        device: device.clone(),
        ..LoadOptions::default()
    };
    let model = Model::load(&dir.to_string_lossy(), &options)?;
    let vocab = model.config().vocab_size() as u64;
    // A fixed pseudo-random batch (the same ids bench/forward.py feeds to transformers).
    let ids: Vec<u32> = (0..(batch * seq) as u64)
        .map(|i| ((i * 2654435761 + 12345) % vocab.min(50000)) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    // Every layer's output; with --patterns every attention pattern too.
    let patterns = args.iter().any(|a| a == "--patterns");
    let layers: Vec<HookPoint> = (0..model.config().num_layers())
        .flat_map(|i| {
            let pattern = patterns.then_some(HookPoint::AttentionPattern(i));
            pattern.into_iter().chain([HookPoint::Layer(i)])
        })
        .collect();
    let mut times = Vec::new();
    for _ in 0..iters + 1 {
        let start = Instant::now();
        let mut hooks = Hooks::new().capture(layers.clone());
        let out = model.forward(&ids, &mut hooks)?;
        device.synchronize()?;
        assert_eq!(out.captures.len(), layers.len());
        times.push(start.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\": \"eleuther-interp\", \"batch\": {batch}, \"seq\": {seq}, \"median_s\": {median:.4}, \"tokens_per_s\": {:.1}, \"peak_rss_mib\": {:.0}, \"device_mem_used_mib\": {:.0}}}",
        (batch * seq) as f64 / median,
        peak_rss_mib(),
        device_mem_used_mib(&device)
    );
    Ok(())
}

/// Memory in use on the CUDA device (all processes; 0 on the CPU).
fn device_mem_used_mib(device: &Device) -> f64 {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let _bound = cuda.cuda_stream().context().bind_to_thread();
        if let Ok((free, total)) =
            hooks::candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        {
            return (total - free) as f64 / (1 << 20) as f64;
        }
    }
    let _ = device;
    0.0
}
