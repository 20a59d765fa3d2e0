//! The lens objective and its gradient, written out by hand: translator
//! `h' = h + h Wᵀ + b`, the model's frozen final norm and unembedding, then forward
//! KL(final ‖ lens) or next-token cross-entropy. Autograd is not needed (and candle's fused
//! norms have no backward); the gradient is checked against finite differences in the tests.

use candle_core::{DType, Tensor, D};
use hooks::{FinalNorm, Unembedding};

use crate::Result;

/// What the lens is trained to predict, for a chunk of `n` tokens.
pub enum Target {
    /// The model's final distribution at the same position (forward KL).
    Distribution {
        /// Log-probabilities `[n, vocab]`.
        log_p: Tensor,
        /// Probabilities `[n, vocab]`.
        p: Tensor,
        /// `Σ_v p log p` per row (the constant part of the KL).
        p_log_p: Vec<f64>,
    },
    /// The model's final distribution as log-probabilities `[n, vocab]` only: on a GPU,
    /// where the fused loss kernel needs nothing else.
    LogProbabilities(Tensor),
    /// Next-token ids `[n]` (u32); rows whose target is `u32::MAX` are ignored.
    NextTokens(Tensor),
}

impl Target {
    /// A KL target from the model's final logits `[n, vocab]` (one fused pass on the CPU, a
    /// fused kernel on a GPU).
    pub fn from_logits(logits: &Tensor) -> Result<Self> {
        if let Some(log_p) = crate::cuda::log_softmax(logits)? {
            return Ok(Target::LogProbabilities(log_p));
        }
        Ok(match crate::kernels::distribution_of_logits(logits)? {
            Some((log_p, p, p_log_p)) => Target::Distribution { log_p, p, p_log_p },
            None => Target::distribution(log_softmax(logits)?)?,
        })
    }

    /// Rows (tokens) the target covers.
    pub fn rows(&self) -> Result<usize> {
        Ok(match self {
            Target::Distribution { p, .. } => p.dim(0)?,
            Target::LogProbabilities(log_p) => log_p.dim(0)?,
            Target::NextTokens(next) => next.dim(0)?,
        })
    }

    /// A KL target from the model's final log-probabilities `[n, vocab]`.
    pub fn distribution(log_p: Tensor) -> Result<Self> {
        let p = log_p.exp()?;
        let p_log_p = weighted(&p, &log_p)?
            .sum(D::Minus1)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        Ok(Target::Distribution { log_p, p, p_log_p })
    }
}

/// Summed loss over the chunk and the gradients of that sum.
pub struct LossAndGrads {
    /// Sum of the per-token losses.
    pub loss: f64,
    /// Number of tokens that contributed.
    pub tokens: usize,
    /// Gradient for `W` `[d, d]`.
    pub weight: Tensor,
    /// Gradient for `b` `[d]`.
    pub bias: Tensor,
}

/// The final norm of `x: [n, d]` returning `(normed, x̂, 1/σ)` for the backward pass.
fn norm_forward(norm: &FinalNorm, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    match norm {
        FinalNorm::Layer { weight, bias, eps } => {
            let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                .sqrt()?
                .recip()?;
            let xhat = centred.broadcast_mul(&rstd)?;
            let normed = xhat.broadcast_mul(weight)?.broadcast_add(bias)?;
            Ok((normed, xhat, rstd))
        }
        FinalNorm::Rms { weight, eps } => {
            let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + *eps)?
                .sqrt()?
                .recip()?;
            let xhat = x.broadcast_mul(&rstd)?;
            Ok((xhat.broadcast_mul(weight)?, xhat, rstd))
        }
    }
}

/// Backward of [`norm_forward`]: from the gradient of the normed output to that of its input.
fn norm_backward(
    norm: &FinalNorm,
    d_normed: &Tensor,
    xhat: &Tensor,
    rstd: &Tensor,
) -> Result<Tensor> {
    let (weight, centre) = match norm {
        FinalNorm::Layer { weight, .. } => (weight, true),
        FinalNorm::Rms { weight, .. } => (weight, false),
    };
    let dxhat = d_normed.broadcast_mul(weight)?;
    let proj = (&dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    let mut dx = (dxhat.clone() - xhat.broadcast_mul(&proj)?)?;
    if centre {
        dx = dx.broadcast_sub(&dxhat.mean_keepdim(D::Minus1)?)?;
    }
    Ok(dx.broadcast_mul(rstd)?)
}

/// `h + h Wᵀ + b` for `h: [n, d]`.
pub fn translate(h: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok((h + h.matmul(&weight.t()?)?)?.broadcast_add(bias)?)
}

/// Loss summed over the chunk `h: [n, d]` (f32) and its gradient for `weight` and `bias`.
pub fn loss_and_grads(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    unembedding: &Unembedding,
    target: &Target,
) -> Result<LossAndGrads> {
    loss_and_grads_through(h, weight, bias, &unembedding.norm, |normed| {
        decode_candle(normed, &unembedding.weight, target)
    })
}

/// [`loss_and_grads`] with the vocabulary-sized part given by `decode`, which maps the
/// normed rows to `(loss sum, rows counted, d loss / d normed)`.
pub(crate) fn loss_and_grads_through(
    h: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    norm: &FinalNorm,
    decode: impl FnOnce(&Tensor) -> Result<(f64, usize, Tensor)>,
) -> Result<LossAndGrads> {
    let translated = translate(h, weight, bias)?;
    let (normed, xhat, rstd) = norm_forward(norm, &translated)?;
    let (loss, tokens, d_normed) = decode(&normed)?;
    let d_translated = norm_backward(norm, &d_normed, &xhat, &rstd)?;
    Ok(LossAndGrads {
        loss,
        tokens,
        weight: d_translated.t()?.matmul(h)?,
        bias: d_translated.sum(0)?,
    })
}

/// The decoding step of [`loss_and_grads`]: logits through the unembedding `[vocab, d]`, the
/// loss, and the gradient back to the normed rows. Both products run in the unembedding's
/// dtype (a bf16 unembedding rounds the normed rows and the logit gradient to bf16 first, as
/// autocast does); the loss and the returned gradient are in the normed rows' dtype.
pub(crate) fn decode_candle(
    normed: &Tensor,
    unembedding: &Tensor,
    target: &Target,
) -> Result<(f64, usize, Tensor)> {
    let (dtype, product_dtype) = (normed.dtype(), unembedding.dtype());
    let logits = normed.to_dtype(product_dtype)?.matmul(&unembedding.t()?)?;
    // On a GPU the fused kernel reads the logits and writes their gradient in the product
    // dtype; elsewhere the loss runs on the logits in the normed rows' dtype.
    let (loss, tokens, d_logits) = match crate::cuda::loss_and_logit_grad(&logits, target)? {
        Some(fused) => fused,
        None => {
            let logits = logits.to_dtype(dtype)?;
            match crate::kernels::loss_and_logit_grad(&logits, target)? {
                Some(fast) => fast,
                None => loss_and_logit_grad(&logits, target)?,
            }
        }
    };
    let d_normed = d_logits.to_dtype(product_dtype)?.matmul(unembedding)?;
    Ok((loss, tokens, d_normed.to_dtype(dtype)?))
}

/// The summed loss over rows of `logits: [n, vocab]`, the number of rows that count, and
/// the gradient of the sum with respect to the logits (`softmax - target`).
pub(crate) fn loss_and_logit_grad(
    logits: &Tensor,
    target: &Target,
) -> Result<(f64, usize, Tensor)> {
    let log_q = log_softmax(logits)?;
    let q = log_q.exp()?;
    let kl = |log_p: &Tensor, p: &Tensor| -> Result<(f64, usize, Tensor)> {
        let kl = weighted(p, &(log_p - &log_q)?)?.sum_all()?;
        Ok((scalar(&kl)?, logits.dim(0)?, (&q - p)?))
    };
    Ok(match target {
        Target::Distribution { log_p, p, .. } => kl(log_p, p)?,
        Target::LogProbabilities(log_p) => kl(log_p, &log_p.exp()?)?,
        Target::NextTokens(next) => {
            let ids: Vec<u32> = next.to_vec1()?;
            let vocab = logits.dim(1)?;
            let mut one_hot = vec![0f32; ids.len() * vocab];
            let mut mask = vec![0f32; ids.len()];
            for (i, &t) in ids.iter().enumerate().filter(|(_, &t)| t != u32::MAX) {
                one_hot[i * vocab + t as usize] = 1.0;
                mask[i] = 1.0;
            }
            let valid = mask.iter().filter(|&&m| m > 0.0).count();
            let device = logits.device();
            let one_hot =
                Tensor::from_vec(one_hot, (ids.len(), vocab), device)?.to_dtype(logits.dtype())?;
            let mask = Tensor::from_vec(mask, (ids.len(), 1), device)?.to_dtype(logits.dtype())?;
            let ce = weighted(&one_hot, &log_q)?.sum_all()?.neg()?;
            (scalar(&ce)?, valid, (q.broadcast_mul(&mask)? - one_hot)?)
        }
    })
}

/// `weight * x` elementwise, where a zero weight gives 0 even against an infinite `x`
/// (`0 log 0 = 0`: a token ruled out by a logit of `-inf` adds nothing), as the fused CPU
/// passes count it.
pub(crate) fn weighted(weight: &Tensor, x: &Tensor) -> Result<Tensor> {
    let product = (weight * x)?;
    Ok(weight
        .ne(0.0)?
        .where_cond(&product, &product.zeros_like()?)?)
}

/// Log-softmax over the last dimension (max-shifted, in the input dtype).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&log_sum)?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn unembedding(layer_norm: bool) -> Unembedding {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f64, 0.7, (11, 6), &dev).unwrap();
        let gamma = (Tensor::randn(0f64, 0.2, 6, &dev).unwrap() + 1.0).unwrap();
        let norm = if layer_norm {
            FinalNorm::Layer {
                weight: gamma,
                bias: Tensor::randn(0f64, 0.2, 6, &dev).unwrap(),
                eps: 1e-5,
            }
        } else {
            FinalNorm::Rms {
                weight: gamma,
                eps: 1e-6,
            }
        };
        Unembedding::new(norm, weight)
    }

    /// Central finite differences in f64 on every parameter.
    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for layer_norm in [true, false] {
            let u = unembedding(layer_norm);
            let h = Tensor::randn(0f64, 1.0, (5, 6), &dev).unwrap();
            let w = Tensor::randn(0f64, 0.3, (6, 6), &dev).unwrap();
            let b = Tensor::randn(0f64, 0.3, 6, &dev).unwrap();
            let log_p = log_softmax(&Tensor::randn(0f64, 2.0, (5, 11), &dev).unwrap()).unwrap();
            let next = Tensor::new(&[3u32, 0, u32::MAX, 10, 7], &dev).unwrap();
            for target in [
                Target::distribution(log_p.clone()).unwrap(),
                Target::NextTokens(next.clone()),
            ] {
                let g = loss_and_grads(&h, &w, &b, &u, &target).unwrap();
                let loss_at =
                    |w: &Tensor, b: &Tensor| loss_and_grads(&h, w, b, &u, &target).unwrap().loss;
                let eps = 1e-6;
                let wv: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
                let gw: Vec<f64> = g.weight.flatten_all().unwrap().to_vec1().unwrap();
                for i in 0..wv.len() {
                    let bump = |delta: f64| {
                        let mut v = wv.clone();
                        v[i] += delta;
                        Tensor::from_vec(v, (6, 6), &dev).unwrap()
                    };
                    let numeric =
                        (loss_at(&bump(eps), &b) - loss_at(&bump(-eps), &b)) / (2.0 * eps);
                    assert!(
                        (numeric - gw[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                        "W[{i}]: {numeric} vs {}",
                        gw[i]
                    );
                }
                let bv: Vec<f64> = b.to_vec1().unwrap();
                let gb: Vec<f64> = g.bias.to_vec1().unwrap();
                for i in 0..bv.len() {
                    let bump = |delta: f64| {
                        let mut v = bv.clone();
                        v[i] += delta;
                        Tensor::from_vec(v, 6, &dev).unwrap()
                    };
                    let numeric =
                        (loss_at(&w, &bump(eps)) - loss_at(&w, &bump(-eps))) / (2.0 * eps);
                    assert!(
                        (numeric - gb[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                        "b[{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_translator_is_the_logit_lens() {
        let h = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu).unwrap();
        let w = Tensor::zeros((6, 6), DType::F64, &Device::Cpu).unwrap();
        let b = Tensor::zeros(6, DType::F64, &Device::Cpu).unwrap();
        let t = translate(&h, &w, &b).unwrap();
        assert_eq!(t.to_vec2::<f64>().unwrap(), h.to_vec2::<f64>().unwrap());
    }
}
