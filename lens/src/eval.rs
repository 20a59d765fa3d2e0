//! Per-layer evaluation of the logit lens and a tuned lens, as tuned-lens's `eval` reports
//! it: next-token cross-entropy, entropy of the lens distribution, KL(final ‖ lens), and
//! top-1 agreement with the model's final prediction; the last row is the model's output.

use candle_core::{DType, Tensor, D};
use hooks::activations::ActivationSource;
use hooks::{HookPoint, Unembedding};
use serde::{Deserialize, Serialize};

use crate::loss::log_softmax;
use crate::{lens_input, Error, Result, TunedLens};

/// Mean metrics of one row (a layer, or the model output), in nats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerMetrics {
    /// `0 .. L-1` (the residual entering that layer) or `output`.
    pub layer: String,
    /// Next-token cross-entropy.
    pub ce: f64,
    /// Entropy of the predicted distribution.
    pub entropy: f64,
    /// KL(model final ‖ lens).
    pub kl: f64,
    /// Fraction of positions whose top-1 token equals the model's.
    pub top1_agreement: f64,
}

/// The result of an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Tokens evaluated.
    pub tokens: u64,
    /// Multiply nats by this to get bits per byte (`tokens / bytes / ln 2`), when known.
    pub nats_to_bits_per_byte: Option<f64>,
    /// The logit lens, per layer plus the output row.
    pub logit_lens: Vec<LayerMetrics>,
    /// The tuned lens, per layer plus the output row, when one was given.
    pub tuned_lens: Option<Vec<LayerMetrics>>,
}

#[derive(Default, Clone)]
struct Sums {
    ce: f64,
    ce_count: usize,
    entropy: f64,
    kl: f64,
    top1: f64,
    count: usize,
}

impl Sums {
    fn add(
        &mut self,
        log_q: &Tensor,
        log_p: &Tensor,
        final_top: &Tensor,
        next: &[u32],
    ) -> Result<()> {
        let q = log_q.exp()?;
        self.entropy += scalar(&(&q * log_q)?.sum_all()?.neg()?)?;
        self.kl += scalar(&(log_p.exp()? * (log_p - log_q)?)?.sum_all()?)?;
        let top = log_q.argmax(D::Minus1)?;
        self.top1 += scalar(&top.eq(final_top)?.to_dtype(DType::F32)?.sum_all()?)?;
        self.count += next.len();
        let rows: Vec<Vec<f32>> = log_q.to_vec2()?;
        for (row, &t) in rows.iter().zip(next) {
            if t != u32::MAX {
                self.ce -= row[t as usize] as f64;
                self.ce_count += 1;
            }
        }
        Ok(())
    }

    fn finish(&self, layer: String) -> LayerMetrics {
        let n = self.count.max(1) as f64;
        LayerMetrics {
            layer,
            ce: self.ce / self.ce_count.max(1) as f64,
            entropy: self.entropy / n,
            kl: self.kl / n,
            top1_agreement: self.top1 / n,
        }
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Evaluates the logit lens (and `lens`, if given) over up to `max_tokens` rows of `source`,
/// whose rows are consecutive sequences of `seq_len` tokens.
pub fn evaluate(
    lens: Option<&TunedLens>,
    unembedding: &Unembedding,
    num_layers: usize,
    source: &mut dyn ActivationSource,
    seq_len: usize,
    max_tokens: u64,
    chunk_tokens: usize,
) -> Result<EvalReport> {
    let unembedding = unembedding.to_dtype(DType::F32)?;
    let final_point = HookPoint::Layer(num_layers - 1);
    let mut logit = vec![Sums::default(); num_layers + 1];
    let mut tuned = vec![Sums::default(); num_layers + 1];
    let mut tokens = 0u64;
    while tokens < max_tokens {
        let Some(batch) = source.next_batch()? else {
            break;
        };
        let n = batch.len();
        let next: Vec<u32> = (0..n)
            .map(|i| {
                if (i + 1) % seq_len == 0 || i + 1 >= n {
                    u32::MAX
                } else {
                    batch.tokens[i + 1]
                }
            })
            .collect();
        for start in (0..n).step_by(chunk_tokens.max(1)) {
            let len = chunk_tokens.min(n - start);
            let rows = |p: HookPoint| -> Result<Tensor> {
                let t = batch.activations.get(&p).ok_or_else(|| {
                    Error::Lens(format!("the activation source lacks hook point '{p}'"))
                })?;
                Ok(t.narrow(0, start, len)?.to_dtype(DType::F32)?)
            };
            let log_p = log_softmax(&unembedding.forward(&rows(final_point)?)?)?;
            let final_top = log_p.argmax(D::Minus1)?;
            let next = &next[start..start + len];
            for layer in 0..num_layers {
                let h = rows(lens_input(layer))?;
                logit[layer].add(
                    &log_softmax(&unembedding.forward(&h)?)?,
                    &log_p,
                    &final_top,
                    next,
                )?;
                if let Some(lens) = lens {
                    let log_q = log_softmax(&lens.forward(&h, layer, &unembedding)?)?;
                    tuned[layer].add(&log_q, &log_p, &final_top, next)?;
                }
            }
            logit[num_layers].add(&log_p, &log_p, &final_top, next)?;
            tuned[num_layers].add(&log_p, &log_p, &final_top, next)?;
        }
        tokens += n as u64;
    }
    if tokens == 0 {
        return Err(Error::Lens("no tokens to evaluate".into()));
    }
    let label = |i: usize| {
        if i == num_layers {
            "output".to_string()
        } else {
            i.to_string()
        }
    };
    Ok(EvalReport {
        tokens,
        nats_to_bits_per_byte: None,
        logit_lens: logit
            .iter()
            .enumerate()
            .map(|(i, s)| s.finish(label(i)))
            .collect(),
        tuned_lens: lens.map(|_| {
            tuned
                .iter()
                .enumerate()
                .map(|(i, s)| s.finish(label(i)))
                .collect()
        }),
    })
}

impl EvalReport {
    /// A readable table: one row per layer, logit lens and tuned lens side by side.
    pub fn table(&self) -> String {
        let unit = if self.nats_to_bits_per_byte.is_some() {
            "bits/byte"
        } else {
            "nats"
        };
        let f = self.nats_to_bits_per_byte.unwrap_or(1.0);
        let mut out = format!(
            "{} tokens; CE, entropy and KL in {unit}\n{:>7} | {:>8} {:>8} {:>8} {:>6} | {:>8} {:>8} {:>8} {:>6}\n",
            self.tokens, "layer", "CE", "entropy", "KL", "top1", "CE", "entropy", "KL", "top1"
        );
        out += &format!("{:>7} | {:^33} | {:^33}\n", "", "logit lens", "tuned lens");
        for (i, l) in self.logit_lens.iter().enumerate() {
            out += &format!(
                "{:>7} | {:>8.4} {:>8.4} {:>8.4} {:>6.3}",
                l.layer,
                l.ce * f,
                l.entropy * f,
                l.kl * f,
                l.top1_agreement
            );
            if let Some(t) = self.tuned_lens.as_ref().map(|t| &t[i]) {
                out += &format!(
                    " | {:>8.4} {:>8.4} {:>8.4} {:>6.3}",
                    t.ce * f,
                    t.entropy * f,
                    t.kl * f,
                    t.top1_agreement
                );
            }
            out.push('\n');
        }
        out
    }
}
