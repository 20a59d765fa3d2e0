//! A fused CPU pass for the lens loss: per row of logits, log-sum-exp, the loss and the
//! logit gradient `softmax - target` in three sweeps over memory, rows in parallel. The
//! generic tensor path ([`crate::loss`]) makes about fifteen sweeps on one thread and
//! dominates training time on the CPU. Returns `None` when it does not apply.

use candle_core::{Device, Tensor};
use hooks::cpu::with_f32_slices;
use rayon::prelude::*;

use crate::loss::Target;
use crate::Result;

/// `(loss sum, rows counted, d loss / d logits)` for `logits: [n, vocab]`.
pub(crate) fn loss_and_logit_grad(
    logits: &Tensor,
    target: &Target,
) -> Result<Option<(f64, usize, Tensor)>> {
    let (n, vocab) = logits.dims2()?;
    let Some(mut grad) = with_f32_slices(&[logits], |s| Ok(s[0].to_vec()))? else {
        return Ok(None);
    };
    let per_row: Option<Vec<(f64, bool)>> = match target {
        Target::Distribution { p, p_log_p, .. } => with_f32_slices(&[p], |p| {
            Ok(grad
                .par_chunks_mut(vocab)
                .zip(p[0].par_chunks(vocab))
                .zip(p_log_p.par_iter())
                .map(|((z, p), &plogp)| {
                    let max = z.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let (mut sum, mut pz) = (0f64, 0f64);
                    for (zj, pj) in z.iter_mut().zip(p) {
                        pz += *pj as f64 * *zj as f64;
                        *zj = (*zj - max).exp();
                        sum += *zj as f64;
                    }
                    let lse = max as f64 + sum.ln();
                    let inv = (1.0 / sum) as f32;
                    for (zj, pj) in z.iter_mut().zip(p) {
                        *zj = *zj * inv - pj;
                    }
                    // KL = Σ p log p − Σ p (z − lse) = Σ p log p − Σ p z + lse.
                    (plogp - pz + lse, true)
                })
                .collect())
        })?,
        Target::NextTokens(next) => {
            let next: Vec<u32> = next.to_vec1()?;
            Some(
                grad.par_chunks_mut(vocab)
                    .zip(next.par_iter())
                    .map(|(z, &t)| {
                        if t == u32::MAX {
                            z.iter_mut().for_each(|x| *x = 0.0);
                            return (0.0, false);
                        }
                        let max = z.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                        let zt = z[t as usize] as f64;
                        let mut sum = 0f64;
                        for zj in z.iter_mut() {
                            *zj = (*zj - max).exp();
                            sum += *zj as f64;
                        }
                        let inv = (1.0 / sum) as f32;
                        z.iter_mut().for_each(|x| *x *= inv);
                        z[t as usize] -= 1.0;
                        (max as f64 + sum.ln() - zt, true)
                    })
                    .collect(),
            )
        }
    };
    let Some(per_row) = per_row else {
        return Ok(None);
    };
    let loss = per_row.iter().map(|(l, _)| l).sum();
    let counted = per_row.iter().filter(|(_, c)| *c).count();
    Ok(Some((
        loss,
        counted,
        Tensor::from_vec(grad, (n, vocab), &Device::Cpu)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{log_softmax, loss_and_logit_grad as generic};

    #[test]
    fn fused_pass_matches_the_tensor_path() {
        let logits = (Tensor::randn(0f32, 3.0, (7, 301), &Device::Cpu).unwrap() + 2.0).unwrap();
        let log_p =
            log_softmax(&Tensor::randn(0f32, 2.0, (7, 301), &Device::Cpu).unwrap()).unwrap();
        let next = Tensor::new(&[3u32, u32::MAX, 300, 0, 17, 17, u32::MAX], &Device::Cpu).unwrap();
        for target in [
            Target::distribution(log_p).unwrap(),
            Target::NextTokens(next),
        ] {
            let (l1, c1, g1) = loss_and_logit_grad(&logits, &target).unwrap().unwrap();
            let (l2, c2, g2) = generic(&logits, &target).unwrap();
            assert_eq!(c1, c2);
            assert!((l1 - l2).abs() < 1e-4 * (1.0 + l2.abs()), "{l1} vs {l2}");
            let diff: f32 = (g1 - g2)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }
}
