//! Per-layer evaluation of the logit lens and a tuned lens, as tuned-lens's `eval` reports
//! it: next-token cross-entropy, entropy of the lens distribution and KL(final ‖ lens); the
//! last row is the model's output. Beyond tuned-lens: top-1 agreement with the model's final
//! prediction and each lens's prediction depth (see [`prediction_depth`]). In f32 on the CPU
//! each lens's logits go into one buffer kept for the whole run and every metric of a row
//! comes from a few fused sweeps over it; elsewhere they are tensor ops.

use candle_core::{DType, Tensor, D};
use hooks::activations::ActivationSource;
use hooks::cpu::{is_cpu_f32, with_f32_slices};
use hooks::{HookPoint, Unembedding};
use serde::{Deserialize, Serialize};

use crate::decode::grow;
use crate::kernels::{distribution_of_logits, score_rows, RowScores};
use crate::loss::{log_softmax, weighted};
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
    /// The logit lens's prediction depths (absent from reports written before they were
    /// measured).
    #[serde(default)]
    pub logit_lens_depth: Option<PredictionDepth>,
    /// The tuned lens's prediction depths, when one was given.
    #[serde(default)]
    pub tuned_lens_depth: Option<PredictionDepth>,
}

/// How early a lens settles on the model's prediction: per token, its [`prediction_depth`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictionDepth {
    /// Mean depth over the tokens, in layers (0 ..= L).
    pub mean: f64,
    /// `counts[l]`: tokens of depth `l`, for `l` in `0 ..= L` (`L`: only the model's output
    /// has its top-1 token).
    pub counts: Vec<u64>,
}

/// The prediction depth of one token: the first layer from which the lens's top-1 token is
/// the model's at every later layer, given `agrees[l]` (does layer `l`'s top-1 equal the
/// model's?) for `l` in `0 .. L`; `L` when even the last layer's differs. (Tuned-lens issue
/// #72; the notion is Baldock et al.'s "prediction depth", with lens layers as probes.)
pub fn prediction_depth(agrees: &[bool]) -> usize {
    agrees.iter().rposition(|&a| !a).map_or(0, |last| last + 1)
}

impl PredictionDepth {
    fn new(layers: usize) -> Self {
        PredictionDepth {
            mean: 0.0,
            counts: vec![0; layers + 1],
        }
    }

    /// Counts the tokens of one chunk: `agreement[l][t]` is 1 where layer `l`'s top-1 at
    /// token `t` is the model's.
    fn add(&mut self, agreement: &[Vec<u8>]) {
        let tokens = agreement.first().map_or(0, Vec::len);
        for t in 0..tokens {
            let agrees: Vec<bool> = agreement.iter().map(|layer| layer[t] != 0).collect();
            self.counts[prediction_depth(&agrees)] += 1;
        }
    }

    fn finish(mut self) -> Self {
        let tokens: u64 = self.counts.iter().sum();
        let total: u64 = self
            .counts
            .iter()
            .enumerate()
            .map(|(l, &c)| l as u64 * c)
            .sum();
        self.mean = total as f64 / tokens.max(1) as f64;
        self
    }
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
    /// Adds one chunk's rows; returns, per row, 1 where the lens's top-1 token is the
    /// model's (`final_top`).
    fn add(&mut self, rows: &[RowScores], final_top: &[u32]) -> Vec<u8> {
        for row in rows {
            self.entropy += row.entropy;
            self.kl += row.kl;
            if let Some(ce) = row.ce {
                self.ce += ce;
                self.ce_count += 1;
            }
        }
        self.count += rows.len();
        let agreement: Vec<u8> = rows
            .iter()
            .zip(final_top)
            .map(|(row, &top)| u8::from(row.top == top))
            .collect();
        self.top1 += agreement.iter().map(|&a| f64::from(a)).sum::<f64>();
        agreement
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

/// One chunk's model output, against which each lens's rows are scored.
struct ChunkTarget<'a> {
    /// The next token of each row (`u32::MAX`: none).
    next: &'a [u32],
    /// The model's top-1 token of each row.
    top: Vec<u32>,
    /// The model's final distribution.
    distribution: Distribution,
}

/// The model's final distribution over one chunk, as its scoring path needs it.
enum Distribution {
    /// f32 on the CPU: `p` and `Σ p log p` per row, for the fused pass ([`score_rows`]).
    Fused { p: Tensor, p_log_p: Vec<f64> },
    /// Elsewhere: `log p` and `p`, for tensor ops.
    Tensors { log_p: Tensor, p: Tensor },
}

impl<'a> ChunkTarget<'a> {
    /// The target of the model's final logits `[n, vocab]` (fused scoring when `fused`), and
    /// the scores of the model's own output rows (KL 0, agreement 1).
    fn new(final_logits: &Tensor, next: &'a [u32], fused: bool) -> Result<(Self, Vec<RowScores>)> {
        let (distribution, output) = if fused {
            let (_, p, p_log_p) = distribution_of_logits(final_logits)?.ok_or_else(not_cpu_f32)?;
            let (_, vocab) = final_logits.dims2()?;
            let output = with_f32_slices(&[final_logits, &p], |s| {
                Ok(score_rows(s[0], vocab, s[1], &p_log_p, next))
            })?
            .ok_or_else(not_cpu_f32)?;
            (Distribution::Fused { p, p_log_p }, output)
        } else {
            let log_p = log_softmax(final_logits)?;
            let p = log_p.exp()?;
            let output = tensor_scores(&log_p, &log_p, &p, next)?;
            (Distribution::Tensors { log_p, p }, output)
        };
        let top = output.iter().map(|row| row.top).collect();
        // Against itself the model's KL is 0 (the fused pass leaves rounding noise).
        let output = output
            .into_iter()
            .map(|row| RowScores { kl: 0.0, ..row })
            .collect();
        Ok((
            ChunkTarget {
                next,
                top,
                distribution,
            },
            output,
        ))
    }

    /// The scores of the lens rows `normed: [n, d]` (already through the final norm),
    /// projected through `unembedding`. On the fused path the logits go into `buffer`, kept
    /// from call to call: a fresh vocabulary-sized tensor each time costs page faults.
    fn score(
        &self,
        normed: &Tensor,
        unembedding: &Unembedding,
        buffer: &mut Vec<f32>,
    ) -> Result<Vec<RowScores>> {
        match &self.distribution {
            Distribution::Fused { p, p_log_p } => {
                let n = normed.dim(0)?;
                let vocab = unembedding.vocab_size()?;
                grow(buffer, n * vocab);
                let logits = &mut buffer[..n * vocab];
                let scores = with_f32_slices(&[normed, p], |s| {
                    unembedding.logits_f32_into(s[0], logits)?;
                    Ok(score_rows(logits, vocab, s[1], p_log_p, self.next))
                })?;
                scores.ok_or_else(not_cpu_f32)
            }
            Distribution::Tensors { log_p, p } => {
                let log_q = log_softmax(&unembedding.project(normed)?)?;
                tensor_scores(&log_q, log_p, p, self.next)
            }
        }
    }
}

/// The error of the fused path given tensors that are not f32 on the CPU.
fn not_cpu_f32() -> Error {
    Error::Lens("fused scoring needs f32 logits and rows on the CPU".into())
}

/// [`RowScores`] of the lens log-probabilities `log_q` against the model's `log_p` and `p`
/// (all `[n, vocab]`) by tensor ops: the path off the CPU, and the reference for the fused
/// one.
fn tensor_scores(
    log_q: &Tensor,
    log_p: &Tensor,
    p: &Tensor,
    next: &[u32],
) -> Result<Vec<RowScores>> {
    let per_row =
        |t: Tensor| -> Result<Vec<f64>> { Ok(t.sum(D::Minus1)?.to_dtype(DType::F64)?.to_vec1()?) };
    let entropy = per_row(weighted(&log_q.exp()?, log_q)?.neg()?)?;
    let kl = per_row(weighted(p, &(log_p - log_q)?)?)?;
    let top: Vec<u32> = log_q.argmax(D::Minus1)?.to_vec1()?;
    // The log-probability of each next token (of token 0 where there is none).
    let ids: Vec<u32> = next
        .iter()
        .map(|&t| if t == u32::MAX { 0 } else { t })
        .collect();
    let ids = Tensor::from_vec(ids, (next.len(), 1), log_q.device())?;
    let picked: Vec<f32> = log_q.gather(&ids, D::Minus1)?.flatten_all()?.to_vec1()?;
    Ok((0..next.len())
        .map(|i| RowScores {
            kl: kl[i],
            entropy: entropy[i],
            ce: (next[i] != u32::MAX).then(|| -picked[i] as f64),
            top: top[i],
        })
        .collect())
}

/// Evaluates the logit lens (and `lens`, if given) over up to `max_tokens` rows of `source`,
/// whose rows are consecutive sequences of `seq_len` tokens: per-layer metrics and
/// prediction depths.
pub fn evaluate(
    lens: Option<&TunedLens>,
    unembedding: &Unembedding,
    num_layers: usize,
    source: &mut dyn ActivationSource,
    seq_len: usize,
    max_tokens: u64,
    chunk_tokens: usize,
) -> Result<EvalReport> {
    if chunk_tokens == 0 || seq_len < 2 {
        return Err(Error::Options(format!(
            "the chunk size (--chunk-tokens) must be positive and the sequence length at least 2 \
             (the cross-entropy needs a next token in the sequence), got {chunk_tokens} and {seq_len}"
        )));
    }
    let unembedding = unembedding.to_dtype(DType::F32)?;
    // f32 on the CPU: fused scoring passes over one reused logits buffer.
    let fused = is_cpu_f32(&unembedding.weight);
    let vocab = unembedding.vocab_size()?;
    let mut buffer = Vec::new();
    let final_point = HookPoint::Layer(num_layers - 1);
    let mut logit = vec![Sums::default(); num_layers + 1];
    let mut tuned = vec![Sums::default(); num_layers + 1];
    let (mut logit_depth, mut tuned_depth) = (
        PredictionDepth::new(num_layers),
        PredictionDepth::new(num_layers),
    );
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
        if let Some(at) = next
            .iter()
            .position(|&t| t != u32::MAX && t as usize >= vocab)
        {
            return Err(Error::Lens(format!(
                "token id {} (row {} of a batch) is outside the model's vocabulary of {vocab}",
                next[at],
                at + 1
            )));
        }
        for start in (0..n).step_by(chunk_tokens.max(1)) {
            let len = chunk_tokens.min(n - start);
            let rows = |p: HookPoint| -> Result<Tensor> {
                let t = batch.activations.get(&p).ok_or_else(|| {
                    Error::Lens(format!("the activation source lacks hook point '{p}'"))
                })?;
                Ok(t.narrow(0, start, len)?.to_dtype(DType::F32)?)
            };
            let next = &next[start..start + len];
            let final_logits = unembedding.forward(&rows(final_point)?)?;
            let (target, output) = ChunkTarget::new(&final_logits, next, fused)?;
            let (mut logit_agreement, mut tuned_agreement) = (Vec::new(), Vec::new());
            for layer in 0..num_layers {
                let h = rows(lens_input(layer))?;
                let scores =
                    target.score(&unembedding.normalize(&h)?, &unembedding, &mut buffer)?;
                logit_agreement.push(logit[layer].add(&scores, &target.top));
                if let Some(lens) = lens {
                    let translated = unembedding.normalize(&lens.transform(&h, layer)?)?;
                    let scores = target.score(&translated, &unembedding, &mut buffer)?;
                    tuned_agreement.push(tuned[layer].add(&scores, &target.top));
                }
            }
            logit[num_layers].add(&output, &target.top);
            tuned[num_layers].add(&output, &target.top);
            logit_depth.add(&logit_agreement);
            tuned_depth.add(&tuned_agreement);
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
    let logit_lens: Vec<LayerMetrics> = logit
        .iter()
        .enumerate()
        .map(|(i, s)| s.finish(label(i)))
        .collect();
    // NaN logits would still give an agreement of 1 and a depth of 0: refuse them.
    if let Some(row) = logit_lens
        .iter()
        .find(|m| !(m.kl.is_finite() && m.entropy.is_finite()))
    {
        return Err(Error::Lens(format!(
            "the model's outputs are not finite (logit lens at layer {}: KL {}, entropy {}); check its config and weights",
            row.layer, row.kl, row.entropy
        )));
    }
    Ok(EvalReport {
        tokens,
        nats_to_bits_per_byte: None,
        logit_lens,
        tuned_lens: lens.map(|_| {
            tuned
                .iter()
                .enumerate()
                .map(|(i, s)| s.finish(label(i)))
                .collect()
        }),
        logit_lens_depth: Some(logit_depth.finish()),
        tuned_lens_depth: lens.map(|_| tuned_depth.finish()),
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
        // The tuned lens's columns only when there is one.
        let lenses: &[&str] = match self.tuned_lens {
            Some(_) => &["logit lens", "tuned lens"],
            None => &["logit lens"],
        };
        let columns = format!("{:>8} {:>8} {:>8} {:>6}", "CE", "entropy", "KL", "top1");
        let mut out = format!(
            "{} tokens; CE, entropy and KL in {unit}\n{:>7}",
            self.tokens, "layer"
        );
        lenses.iter().for_each(|_| out += &format!(" | {columns}"));
        out += &format!("\n{:>7}", "");
        lenses
            .iter()
            .for_each(|name| out += &format!(" | {name:^33}"));
        out.push('\n');
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
        let depth = |d: &Option<PredictionDepth>| d.as_ref().map(|d| format!("{:.2}", d.mean));
        if let Some(logit) = depth(&self.logit_lens_depth) {
            out += &format!(
                "prediction depth (mean first layer from which the top-1 token stays the model's): logit lens {logit}{}\n",
                depth(&self.tuned_lens_depth)
                    .map(|t| format!(", tuned lens {t}"))
                    .unwrap_or_default()
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use hooks::FinalNorm;

    use super::*;

    /// The fused CPU scoring against tensor ops, on random logits of an awkward vocabulary,
    /// rows with and without a next token, through one reused buffer that first holds a
    /// larger chunk: the same scores up to f32 rounding, so a wrong transpose, row or
    /// formula would show. The model's own rows score KL 0 either way.
    #[test]
    fn fused_scores_match_tensor_ops() {
        let (n, d, vocab) = (9, 24, 1003);
        let randn =
            |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap();
        let norm = FinalNorm::Rms {
            weight: Tensor::ones(d, DType::F32, &Device::Cpu).unwrap(),
            eps: 1e-6,
        };
        let unembedding = Unembedding::new(norm, randn(&[vocab, d], 0.5));
        // Some tokens ruled out (p = 0) in one row: both count them as 0, not NaN.
        let ruled_out = Tensor::from_vec(
            (0..n * vocab)
                .map(|i| {
                    if i / vocab == 2 && i % 7 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect(),
            (n, vocab),
            &Device::Cpu,
        )
        .unwrap();
        let final_logits = (randn(&[n, vocab], 2.0) + ruled_out).unwrap();
        let next = [3, u32::MAX, 1002, 0, 17, 17, u32::MAX, 5, 999];
        let (fused, fused_output) = ChunkTarget::new(&final_logits, &next, true).unwrap();
        let (tensors, tensor_output) = ChunkTarget::new(&final_logits, &next, false).unwrap();
        assert_eq!(fused.top, tensors.top);
        let mut buffer = vec![f32::NAN; 2 * n * vocab];
        let normed = randn(&[n, d], 1.0);
        let fused_scores = fused.score(&normed, &unembedding, &mut buffer).unwrap();
        let tensor_scores = tensors.score(&normed, &unembedding, &mut buffer).unwrap();
        for (a, b) in [
            (&fused_output, &tensor_output),
            (&fused_scores, &tensor_scores),
        ] {
            assert_eq!(a.len(), n);
            for (x, y) in a.iter().zip(b.iter()) {
                let close = |u: f64, v: f64| (u - v).abs() < 1e-4 * (1.0 + v.abs());
                assert!(
                    close(x.kl, y.kl) && close(x.entropy, y.entropy),
                    "{x:?} vs {y:?}"
                );
                match (x.ce, y.ce) {
                    (Some(u), Some(v)) => assert!(close(u, v), "{x:?} vs {y:?}"),
                    (None, None) => {}
                    _ => panic!("{x:?} vs {y:?}"),
                }
                assert_eq!(x.top, y.top);
            }
        }
        assert!(fused_output.iter().all(|row| row.kl == 0.0));
        assert!(tensor_output.iter().all(|row| row.kl == 0.0));
        assert!(fused_scores
            .iter()
            .all(|row| row.kl > 0.1 && row.entropy > 0.1));
        assert_eq!(
            fused_scores.iter().filter(|row| row.ce.is_none()).count(),
            2
        );
    }

    #[test]
    fn table_has_tuned_lens_columns_only_with_a_tuned_lens() {
        let row = LayerMetrics {
            layer: "0".into(),
            ce: 1.5,
            entropy: 2.0,
            kl: 0.25,
            top1_agreement: 0.5,
        };
        let mut report = EvalReport {
            tokens: 64,
            nats_to_bits_per_byte: None,
            logit_lens: vec![row.clone()],
            tuned_lens: None,
            logit_lens_depth: None,
            tuned_lens_depth: None,
        };
        let lines = |report: &EvalReport| -> Vec<String> {
            report
                .table()
                .lines()
                .map(|l| l.trim_end().to_string())
                .collect()
        };
        let logit_only = lines(&report);
        assert_eq!(logit_only[1], "  layer |       CE  entropy       KL   top1");
        assert_eq!(logit_only[2].trim(), "|            logit lens");
        assert_eq!(logit_only[3], "      0 |   1.5000   2.0000   0.2500  0.500");
        report.tuned_lens = Some(vec![row]);
        let both = lines(&report);
        assert!(both[1].ends_with("top1 |       CE  entropy       KL   top1"));
        assert!(both[2].contains("logit lens") && both[2].contains("tuned lens"));
        assert!(both[3].ends_with("0.500 |   1.5000   2.0000   0.2500  0.500"));
    }

    #[test]
    fn prediction_depth_is_the_first_layer_of_the_final_agreeing_run() {
        assert_eq!(prediction_depth(&[true, true, true]), 0);
        assert_eq!(prediction_depth(&[false, true, true]), 1);
        assert_eq!(prediction_depth(&[true, false, true]), 2);
        assert_eq!(prediction_depth(&[true, true, false]), 3);
        assert_eq!(prediction_depth(&[]), 0);
        let mut depth = PredictionDepth::new(3);
        depth.add(&[vec![1, 0, 1], vec![1, 1, 0], vec![1, 1, 1]]);
        let depth = depth.finish();
        assert_eq!(depth.counts, vec![1, 1, 1, 0]);
        assert!((depth.mean - 1.0).abs() < 1e-12);
    }
}
