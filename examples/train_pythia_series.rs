//! Trains a small GPT-NeoX model (the Pythia architecture, our own size) on WikiText-2 with the
//! real Pythia tokenizer, on the CPU with candle's autograd, and saves checkpoints on Pythia's
//! log-spaced schedule (step0, step1, step2, step4, ..., step512, step1000, step2000, ...) in
//! the hub folder layout: `OUT/stepN/{config.json, model.safetensors, tokenizer.json}`. The
//! result is a real "training over time" series for `lens sweep` when Pythia's own
//! checkpoints cannot be downloaded.
//!
//! ```text
//! cargo run --release -p eleuther-lens --example train_pythia_series -- --output runs/pythia-tiny
//! ```
//!
//! The last `--heldout-lines` non-empty lines of the text are kept out of training and written
//! to `OUT/heldout.txt`; at every saved checkpoint the saved folder is loaded back with the
//! inference runtime (`hooks::Model`) and its loss on those lines is logged in
//! `OUT/training_log.json`, so the series is checked end to end. Re-running the command resumes
//! from `OUT/training.safetensors` (weights, Adam state, step).
//!
//! The forward pass is written with composed candle ops that all have a backward (candle's
//! fused layer norm, softmax and rotary kernels have none); the tests at the bottom check it
//! against `hooks::Model` and its gradients against finite differences.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use clap::Parser;
use hooks::config::{GptNeoxConfig, ModelConfig};
use hooks::data::DataSpec;
use hooks::optim::{clip_grad_norm, Optimizer, Rule};
use hooks::{LoadOptions, Model};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(
    about = "Train a small Pythia-architecture model and save a Pythia-style checkpoint series"
)]
struct Args {
    /// Output folder (one sub-folder per checkpoint).
    #[arg(long, default_value = "runs/pythia-tiny")]
    output: PathBuf,
    /// Training text (one document per non-empty line).
    #[arg(long, default_value = "data/wikitext-2-raw-test.txt")]
    text: PathBuf,
    /// The Pythia tokenizer.
    #[arg(long, default_value = "data/gpt-neox-20b-tokenizer.json")]
    tokenizer: PathBuf,
    /// Last training step; checkpoints are saved at Pythia's steps up to this one.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// Residual width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Peak Adam learning rate.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// Non-empty lines at the end of the text held out for evaluation.
    #[arg(long, default_value_t = 300)]
    heldout_lines: usize,
    /// Held-out sequences whose loss is logged at each checkpoint.
    #[arg(long, default_value_t = 48)]
    heldout_eval: usize,
    /// Seed of the initialisation and the data order.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
}

/// What `OUT/training_log.json` holds per saved checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogEntry {
    step: u64,
    /// Mean training loss over the steps since the previous checkpoint (nats/token).
    train_loss: Option<f64>,
    /// Loss of the saved checkpoint, run by `hooks::Model`, on the held-out lines.
    heldout_loss: f64,
}

/// The resumable training state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: u64,
    log: Vec<LogEntry>,
    losses_since_checkpoint: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    hooks::cli::init_logging();
    let tokenizer = hooks::Tokenizer::from_file(&args.tokenizer, Some(0))?;
    let (train_text, heldout_text) = split_text(&args.text, args.heldout_lines)?;
    std::fs::create_dir_all(&args.output)?;
    let train_path = args.output.join("train.txt");
    let heldout_path = args.output.join("heldout.txt");
    hooks::atomic::write(&train_path, train_text.as_bytes())?;
    hooks::atomic::write(&heldout_path, heldout_text.as_bytes())?;
    let sequences = all_chunks(&train_path, args.seq_len, &tokenizer)?;
    let heldout = all_chunks(&heldout_path, args.seq_len, &tokenizer)?;
    tracing::info!(
        "{} training sequences, {} held-out sequences of {} tokens",
        sequences.len(),
        heldout.len(),
        args.seq_len
    );
    if sequences.len() < args.batch || heldout.is_empty() {
        bail!("not enough text for one batch and one held-out sequence");
    }

    let config_json = config_json(&args);
    let config = match ModelConfig::from_json(&config_json, Path::new("config.json"))? {
        ModelConfig::GptNeox(c) => c,
        ModelConfig::Llama(_) => unreachable!("the config above is GPT-NeoX"),
    };
    let names: Vec<(String, Vec<usize>)> =
        hooks::synthetic::parameter_shapes(&ModelConfig::GptNeox(config.clone()));
    let state_path = args.output.join("training.safetensors");
    let mut optimizer = Optimizer::new(
        Rule::Adam {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            amsgrad: false,
        },
        0.0,
    );
    let (mut params, mut state) = if state_path.is_file() {
        let (state, tensors): (State, _) = hooks::checkpoint::load(&state_path, &Device::Cpu)?;
        let params = names
            .iter()
            .map(|(n, _)| {
                tensors
                    .get(n)
                    .cloned()
                    .with_context(|| format!("{}: no tensor {n}", state_path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        optimizer.restore(
            state.step,
            &tensors,
            "state",
            &params.iter().collect::<Vec<_>>(),
        )?;
        tracing::info!("resuming from step {}", state.step);
        (params, state)
    } else {
        let params = init_params(&names, config.num_layers, args.seed)?;
        let state = State {
            step: 0,
            log: Vec::new(),
            losses_since_checkpoint: Vec::new(),
        };
        (params, state)
    };
    let saves = lens::sweep::pythia_steps(Some(args.steps));
    let model = Gpt::new(&config);
    if state.step == 0 {
        save_checkpoint(&args, &config_json, &names, &params, &heldout, &mut state)?;
        check_against_runtime(&args.output.join("step0"), &model, &params, &heldout[0])?;
        hooks::checkpoint::save(&state_path, named(&names, &params, &optimizer), &state)?;
    }
    let bar = hooks::progress::bar(true, Some(args.steps), "steps");
    bar.set_position(state.step);
    while state.step < args.steps {
        let step = state.step + 1;
        let batch = batch_for_step(&sequences, args.batch, step, args.seed);
        let ids = Tensor::new(batch, &Device::Cpu)?;
        let vars = params
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = model.loss(&tensors, &ids)?;
        let grads = loss.backward()?;
        let mut grads = tensors
            .iter()
            .map(|t| grads.get(t).cloned().map_or_else(|| t.zeros_like(), Ok))
            .collect::<candle_core::Result<Vec<_>>>()?;
        clip_grad_norm(&mut grads, 1.0)?;
        let lr = args.lr * learning_rate_multiplier(step, args.warmup, args.steps);
        optimizer.step(&mut params, &grads, lr)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        if !loss.is_finite() {
            bail!("training loss is {loss} at step {step}");
        }
        state.losses_since_checkpoint.push(loss);
        state.step = step;
        bar.set_position(step);
        bar.set_message(format!("loss {loss:.3}"));
        if saves.contains(&step) {
            save_checkpoint(&args, &config_json, &names, &params, &heldout, &mut state)?;
            hooks::checkpoint::save(&state_path, named(&names, &params, &optimizer), &state)?;
        }
    }
    bar.finish_and_clear();
    println!("step  train loss  held-out loss (nats/token)");
    for e in &state.log {
        let train = e.train_loss.map_or("-".into(), |l| format!("{l:.3}"));
        println!("{:>5}  {train:>10}  {:>13.3}", e.step, e.heldout_loss);
    }
    println!("checkpoints in {}", args.output.display());
    Ok(())
}

/// The non-empty lines of `path`, split into (all but the last `heldout` lines, the rest).
fn split_text(path: &Path, heldout: usize) -> Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= heldout {
        bail!(
            "{} has {} non-empty lines, not more than --heldout-lines {heldout}",
            path.display(),
            lines.len()
        );
    }
    let cut = lines.len() - heldout;
    Ok((
        lines[..cut].join("\n") + "\n",
        lines[cut..].join("\n") + "\n",
    ))
}

/// Every whole sequence of `seq_len` tokens of a text file (documents joined with EOS).
fn all_chunks(path: &Path, seq_len: usize, tokenizer: &hooks::Tokenizer) -> Result<Vec<Vec<u32>>> {
    let mut stream = DataSpec::new(vec![path.to_path_buf()], seq_len).chunks(Some(tokenizer))?;
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next_chunk()? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// A Pythia-style `config.json` of the size in `args` (vocabulary 50304 like Pythia's).
fn config_json(args: &Args) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.hidden,
        "hidden_act": "gelu",
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": args.seq_len,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": true,
        "tie_word_embeddings": false,
        "vocab_size": 50304,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    })
}

/// Pythia's initialisation: normal(0, 0.02) weights, the output projections of every block
/// scaled by `2 / num_layers` ("wang init" in GPT-NeoX), zero biases, unit norm scales.
fn init_params(names: &[(String, Vec<usize>)], layers: usize, seed: u64) -> Result<Vec<Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    names
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with("layernorm.weight")
                || name.ends_with("final_layer_norm.weight")
            {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let fan_in = *shape.last().unwrap() as f64;
                let std = if name.ends_with("attention.dense.weight")
                    || name.ends_with("dense_4h_to_h.weight")
                {
                    2.0 / layers as f64 / fan_in.sqrt()
                } else {
                    0.02
                };
                (0..n).map(|_| (normal(&mut rng) * std) as f32).collect()
            };
            Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)
        })
        .collect()
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u: f64 = rng.random::<f64>().max(1e-300);
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// The sequences of a step: a fixed permutation per epoch, so a resumed run sees the same data.
fn batch_for_step(sequences: &[Vec<u32>], batch: usize, step: u64, seed: u64) -> Vec<Vec<u32>> {
    let per_epoch = (sequences.len() / batch) as u64;
    let epoch = (step - 1) / per_epoch;
    let within = ((step - 1) % per_epoch) as usize;
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9));
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order[within * batch..(within + 1) * batch]
        .iter()
        .map(|&i| sequences[i].clone())
        .collect()
}

/// Warm-up to the peak, then linear decay to 10% of it at the last step.
fn learning_rate_multiplier(step: u64, warmup: u64, total: u64) -> f64 {
    if step <= warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    1.0 - 0.9 * progress.min(1.0)
}

fn named(
    names: &[(String, Vec<usize>)],
    params: &[Tensor],
    opt: &Optimizer,
) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = names
        .iter()
        .zip(params)
        .map(|((n, _), t)| (n.clone(), t.clone()))
        .collect();
    out.extend(opt.state_tensors("state"));
    out
}

/// Writes `OUT/stepN` (config, weights, tokenizer), loads it back with the inference runtime,
/// and logs its held-out loss.
fn save_checkpoint(
    args: &Args,
    config: &serde_json::Value,
    names: &[(String, Vec<usize>)],
    params: &[Tensor],
    heldout: &[Vec<u32>],
    state: &mut State,
) -> Result<()> {
    let dir = args.output.join(format!("step{}", state.step));
    std::fs::create_dir_all(&dir)?;
    hooks::atomic::write_json(&dir.join("config.json"), config)?;
    let tensors: Vec<(String, Vec<Tensor>)> = names
        .iter()
        .zip(params)
        .map(|((n, _), t)| (n.clone(), vec![t.clone()]))
        .collect();
    hooks::atomic::write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    std::fs::copy(&args.tokenizer, dir.join("tokenizer.json"))?;
    let model = Model::from_folder(&dir, &LoadOptions::default())?;
    let heldout_loss = runtime_loss(&model, &heldout[..args.heldout_eval.min(heldout.len())])?;
    let losses = std::mem::take(&mut state.losses_since_checkpoint);
    let train_loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
    tracing::info!(
        "step {}: held-out loss {heldout_loss:.3} nats/token -> {}",
        state.step,
        dir.display()
    );
    state.log.push(LogEntry {
        step: state.step,
        train_loss,
        heldout_loss,
    });
    hooks::atomic::write_json(&args.output.join("training_log.json"), &state.log)?;
    Ok(())
}

/// Mean next-token cross-entropy of `model` (the inference runtime) over `sequences`.
fn runtime_loss(model: &Model, sequences: &[Vec<u32>]) -> Result<f64> {
    let mut total = 0.0;
    for chunk in sequences.chunks(8) {
        let ids = Tensor::new(chunk.to_vec(), &Device::Cpu)?;
        let logits = model.logits(&ids)?;
        total += next_token_loss(&logits, &ids)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
    }
    Ok(total / sequences.len() as f64)
}

/// The training forward must give the runtime's logits on the saved checkpoint.
fn check_against_runtime(dir: &Path, gpt: &Gpt, params: &[Tensor], ids: &[u32]) -> Result<()> {
    let model = Model::from_folder(dir, &LoadOptions::default())?;
    let ids = Tensor::new(vec![ids.to_vec()], &Device::Cpu)?;
    let expected = model.logits(&ids)?;
    let actual = gpt.logits(params, &ids)?;
    let err = hooks::compare::max_abs_diff(&actual, &expected)?;
    let scale = expected.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    if err > 1e-3 * scale.max(1.0) {
        bail!("the training forward differs from hooks::Model by {err} (logit scale {scale})");
    }
    Ok(())
}

/// Mean cross-entropy of `logits: [b, t, vocab]` against the next tokens of `ids: [b, t]`.
fn next_token_loss(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let predictions = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let targets = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    candle_nn::loss::cross_entropy(&predictions, &targets)
}

/// GPT-NeoX written with differentiable candle ops. Parameters are passed in the order of
/// `hooks::synthetic::parameter_shapes` (Hugging Face checkpoint names).
struct Gpt {
    config: GptNeoxConfig,
    /// Tensors per block in `parameter_shapes` order.
    per_block: usize,
}

impl Gpt {
    fn new(config: &GptNeoxConfig) -> Self {
        let per_block = if config.attention_bias { 12 } else { 10 };
        Gpt {
            config: config.clone(),
            per_block,
        }
    }

    fn loss(&self, params: &[Tensor], ids: &Tensor) -> candle_core::Result<Tensor> {
        next_token_loss(&self.logits(params, ids)?, ids)
    }

    /// Logits `[b, t, vocab]` of `ids: [b, t]` (u32).
    fn logits(&self, params: &[Tensor], ids: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let dtype = params[0].dtype();
        let mut h = params[0].index_select(&ids.flatten_all()?, 0)?; // [b*t, d]
        let (cos, sin) = rotary_tables(c.rotary_dims(), c.rotary_base, t, dtype)?;
        let mask = causal_mask(t, dtype)?;
        for layer in 0..c.num_layers {
            let p = &params[1 + layer * self.per_block..1 + (layer + 1) * self.per_block];
            // Order: ln1 w, ln1 b, ln2 w, ln2 b, qkv w, dense w, [qkv b, dense b], mlp...
            let (qkv_b, dense_b, mlp) = if c.attention_bias {
                (Some(&p[6]), Some(&p[7]), &p[8..])
            } else {
                (None, None, &p[6..])
            };
            let x = layer_norm(&h, &p[0], &p[1], c.layer_norm_eps)?;
            let qkv = linear(&x, &p[4], qkv_b)?;
            let attention = self.attention(&qkv, &p[5], dense_b, b, t, &cos, &sin, &mask)?;
            let mlp_in = if c.parallel_residual {
                layer_norm(&h, &p[2], &p[3], c.layer_norm_eps)?
            } else {
                h = (&h + &attention)?;
                layer_norm(&h, &p[2], &p[3], c.layer_norm_eps)?
            };
            // mlp: [h_to_4h w, h_to_4h b, 4h_to_h w, 4h_to_h b]
            let mlp_out = linear(
                &linear(&mlp_in, &mlp[0], Some(&mlp[1]))?.gelu_erf()?,
                &mlp[2],
                Some(&mlp[3]),
            )?;
            h = if c.parallel_residual {
                ((&h + attention)? + mlp_out)?
            } else {
                (&h + mlp_out)?
            };
        }
        let n = 1 + c.num_layers * self.per_block;
        let h = layer_norm(&h, &params[n], &params[n + 1], c.layer_norm_eps)?;
        let unembed = if c.tie_word_embeddings {
            &params[0]
        } else {
            &params[n + 2]
        };
        h.matmul(&unembed.t()?)?.reshape((b, t, c.vocab_size))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Tensor,
        dense: &Tensor,
        dense_b: Option<&Tensor>,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let heads = self.config.num_heads;
        let hd = self.config.head_dim();
        let r = self.config.rotary_dims();
        // Rows of the fused projection are ordered (head, {q, k, v}, head_dim).
        let qkv = qkv.reshape((b, t, heads, 3 * hd))?;
        let part = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * hd, hd)?.transpose(1, 2)
        };
        let q = rotate(&part(0)?, r, cos, sin)?;
        let k = rotate(&part(1)?, r, cos, sin)?;
        let v = part(2)?.contiguous()?;
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? / (hd as f64).sqrt())?
            .broadcast_add(mask)?;
        let max = scores.max_keepdim(D::Minus1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b * t, heads * hd))?;
        linear(&out, dense, dense_b)
    }
}

/// `x Wᵀ + b` for `x: [n, in]`.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// LayerNorm over the last dimension from differentiable ops.
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// NeoX rotary embedding on the first `r` dimensions of `x: [b, heads, t, hd]`.
fn rotate(x: &Tensor, r: usize, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    if r == 0 {
        return x.contiguous();
    }
    let half = r / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(
        &[
            (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?,
            (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?,
        ],
        D::Minus1,
    )?;
    if r == hd {
        return Ok(rotated);
    }
    Tensor::cat(&[rotated, x.narrow(D::Minus1, r, hd - r)?], D::Minus1)
}

/// `cos`, `sin` tables `[t, r/2]`.
fn rotary_tables(
    r: usize,
    base: f64,
    t: usize,
    dtype: DType,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = r / 2;
    let angles: Vec<f64> = (0..t)
        .flat_map(|p| (0..half).map(move |i| p as f64 / base.powf(2.0 * i as f64 / r as f64)))
        .collect();
    let angles = Tensor::from_vec(angles, (t, half), &Device::Cpu)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// Additive causal mask `[t, t]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (t, t), &Device::Cpu)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(parallel: bool) -> (serde_json::Value, GptNeoxConfig) {
        let json = serde_json::json!({
            "model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "rotary_pct": 0.5,
            "vocab_size": 40, "eos_token_id": 0, "use_parallel_residual": parallel,
        });
        let ModelConfig::GptNeox(c) = ModelConfig::from_json(&json, Path::new("c")).unwrap() else {
            unreachable!()
        };
        (json, c)
    }

    /// The differentiable forward equals the inference runtime on a synthetic model.
    #[test]
    fn forward_matches_hooks_model() {
        for parallel in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (json, config) = tiny(parallel);
            hooks::synthetic::write_synthetic_model(dir.path(), &json, None).unwrap();
            let model = Model::from_folder(dir.path(), &LoadOptions::default()).unwrap();
            let params: Vec<Tensor> =
                hooks::synthetic::parameter_shapes(&ModelConfig::GptNeox(config.clone()))
                    .iter()
                    .map(|(n, s)| {
                        Tensor::from_vec(
                            hooks::synthetic::synthetic_values(n, s),
                            s.as_slice(),
                            &Device::Cpu,
                        )
                        .unwrap()
                    })
                    .collect();
            let ids = Tensor::new(
                &[[3u32, 7, 1, 39, 12, 5], [0, 2, 2, 8, 30, 11]],
                &Device::Cpu,
            )
            .unwrap();
            let expected = model.logits(&ids).unwrap();
            let actual = Gpt::new(&config).logits(&params, &ids).unwrap();
            let err = hooks::compare::max_abs_diff(&actual, &expected).unwrap();
            assert!(err < 1e-4, "parallel={parallel}: {err}");
        }
    }

    /// Autograd gradients of the loss equal central finite differences (in f64) for entries of
    /// every kind of parameter.
    #[test]
    fn gradients_match_finite_differences() {
        let (_, config) = tiny(true);
        let names = hooks::synthetic::parameter_shapes(&ModelConfig::GptNeox(config.clone()));
        let params: Vec<Tensor> = init_params(&names, config.num_layers, 7)
            .unwrap()
            .into_iter()
            .zip(&names)
            .map(|(t, (n, s))| {
                // Non-trivial norms and biases, so their gradients are exercised too.
                let jitter = Tensor::from_vec(
                    hooks::synthetic::synthetic_values(n, s),
                    s.as_slice(),
                    &Device::Cpu,
                )
                .unwrap();
                (t + (jitter * 0.1).unwrap())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
            })
            .collect();
        let gpt = Gpt::new(&config);
        let ids = Tensor::new(&[[3u32, 7, 1, 39, 12], [0, 2, 2, 8, 30]], &Device::Cpu).unwrap();
        let vars: Vec<Var> = params
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = gpt.loss(&tensors, &ids).unwrap().backward().unwrap();
        let loss_with = |i: usize, k: usize, delta: f64| -> f64 {
            let mut p = params.clone();
            let mut flat: Vec<f64> = p[i].flatten_all().unwrap().to_vec1().unwrap();
            flat[k] += delta;
            p[i] = Tensor::from_vec(flat, p[i].dims(), &Device::Cpu).unwrap();
            gpt.loss(&p, &ids).unwrap().to_scalar::<f64>().unwrap()
        };
        let mut checked = 0;
        for (i, (name, _)) in names.iter().enumerate() {
            let grad: Vec<f64> = grads
                .get(&tensors[i])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // The embedding row of a token in the batch, else the first entries.
            let ks = if name.contains("embed_in") {
                vec![3 * 16, 7 * 16 + 5]
            } else {
                vec![0, grad.len() - 1]
            };
            for k in ks {
                let h = 1e-5;
                let numeric = (loss_with(i, k, h) - loss_with(i, k, -h)) / (2.0 * h);
                let tol = 1e-6 + 1e-4 * numeric.abs().max(grad[k].abs());
                assert!(
                    (numeric - grad[k]).abs() < tol,
                    "{name}[{k}]: autograd {} vs numeric {numeric}",
                    grad[k]
                );
                checked += 1;
            }
        }
        assert!(checked >= 2 * names.len());
    }
}
