//! Fused CPU passes over rows of logits, rows in parallel and each row's loops compiled for
//! AVX-512 where the CPU has it: for training, log-sum-exp, the loss and the logit gradient
//! `softmax - target` in three sweeps over memory (the generic tensor path, [`crate::loss`],
//! makes about fifteen sweeps on one thread and dominated training time on the CPU); for
//! evaluation, every metric of a lens row in a few read-only sweeps while the row is in cache
//! ([`score_rows`]). The training passes return `None` when they do not apply.

use candle_core::{Device, Tensor};
use hooks::cpu::{exp_of_negative, with_f32_slices, with_wide_vectors};
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
    let rows = rayon::iter::repeat_n((), n);
    let Some((loss, counted)) = loss_and_grad_in_place(&mut grad, vocab, target, rows, |_, _| {})?
    else {
        return Ok(None);
    };
    Ok(Some((
        loss,
        counted,
        Tensor::from_vec(grad, (n, vocab), &Device::Cpu)?,
    )))
}

/// Replaces each row of `logits` (`[n, vocab]`, row-major) by the gradient of its loss
/// (`softmax - target`) and returns `(loss sum, rows counted)`. Each finished gradient row is
/// handed to `finish` with the matching item of `outputs` (`n` of them), while it is still
/// in cache. `None` when the target is not f32 on the CPU.
pub(crate) fn loss_and_grad_in_place<O: Send>(
    logits: &mut [f32],
    vocab: usize,
    target: &Target,
    outputs: impl IndexedParallelIterator<Item = O>,
    finish: impl Fn(&[f32], O) + Sync + Send,
) -> Result<Option<(f64, usize)>> {
    let per_row: Option<Vec<(f64, bool)>> = match target {
        Target::Distribution { p, p_log_p, .. } => with_f32_slices(&[p], |p| {
            Ok(logits
                .par_chunks_mut(vocab)
                .zip(p[0].par_chunks(vocab))
                .zip(p_log_p.par_iter())
                .zip(outputs)
                .map(|(((z, p), &plogp), out)| {
                    with_wide_vectors(
                        #[inline(always)]
                        || {
                            let max = max_f32(z);
                            let pz = dot_f64(p, z);
                            let sum = exp_shifted_in_place(z, max);
                            let lse = max as f64 + sum.ln();
                            let inv = (1.0 / sum) as f32;
                            for (zj, pj) in z.iter_mut().zip(p) {
                                *zj = *zj * inv - pj;
                            }
                            finish(z, out);
                            (kl_divergence(plogp, pz, lse), true)
                        },
                    )
                })
                .collect())
        })?,
        // Made on a GPU only, where this CPU pass does not run.
        Target::LogProbabilities(_) => None,
        Target::NextTokens(next) => {
            let next: Vec<u32> = next.to_vec1()?;
            Some(
                logits
                    .par_chunks_mut(vocab)
                    .zip(next.par_iter())
                    .zip(outputs)
                    .map(|((z, &t), out)| {
                        with_wide_vectors(
                            #[inline(always)]
                            || {
                                if t == u32::MAX {
                                    z.iter_mut().for_each(|x| *x = 0.0);
                                    finish(z, out);
                                    return (0.0, false);
                                }
                                let max = max_f32(z);
                                let zt = z[t as usize] as f64;
                                let sum = exp_shifted_in_place(z, max);
                                let inv = (1.0 / sum) as f32;
                                z.iter_mut().for_each(|x| *x *= inv);
                                z[t as usize] -= 1.0;
                                finish(z, out);
                                (max as f64 + sum.ln() - zt, true)
                            },
                        )
                    })
                    .collect(),
            )
        }
    };
    Ok(per_row.map(|per_row| {
        (
            per_row.iter().map(|(l, _)| l).sum(),
            per_row.iter().filter(|(_, c)| *c).count(),
        )
    }))
}

/// The model's final distribution for a KL target from its logits `[n, vocab]`:
/// `(log p, p, Σ p log p per row)`, rows in parallel; `None` unless f32 on the CPU.
pub(crate) fn distribution_of_logits(
    logits: &Tensor,
) -> Result<Option<(Tensor, Tensor, Vec<f64>)>> {
    let (n, vocab) = logits.dims2()?;
    let Some(mut log_p) = with_f32_slices(&[logits], |s| Ok(s[0].to_vec()))? else {
        return Ok(None);
    };
    let mut p = vec![0f32; n * vocab];
    let p_log_p: Vec<f64> = log_p
        .par_chunks_mut(vocab)
        .zip(p.par_chunks_mut(vocab))
        .map(|(z, p)| {
            with_wide_vectors(
                #[inline(always)]
                || {
                    let max = max_f32(z);
                    p.copy_from_slice(z);
                    let lse = (max as f64 + exp_shifted_in_place(p, max).ln()) as f32;
                    z.iter_mut().for_each(|x| *x -= lse);
                    for (pj, &lj) in p.iter_mut().zip(z.iter()) {
                        *pj = exp_of_negative(-lj);
                    }
                    dot_f64(p, z)
                },
            )
        })
        .collect();
    let device = Device::Cpu;
    Ok(Some((
        Tensor::from_vec(log_p, (n, vocab), &device)?,
        Tensor::from_vec(p, (n, vocab), &device)?,
        p_log_p,
    )))
}

/// How one row of lens logits scores: against the model's final distribution `p` and the
/// next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowScores {
    /// KL(p ‖ lens).
    pub kl: f64,
    /// Entropy of the lens distribution.
    pub entropy: f64,
    /// Cross-entropy of the next token, `None` where the row has none.
    pub ce: Option<f64>,
    /// The lens's top-1 token (the first of equal largest logits).
    pub top: u32,
}

/// Scores each row of `logits: [n, vocab]` against the row of `p` (the model's final
/// probabilities, `Σ p log p` in `p_log_p`) and the next token in `next` (`u32::MAX`: none),
/// rows in parallel; the logits are only read, a row at a time while it is in cache.
pub(crate) fn score_rows(
    logits: &[f32],
    vocab: usize,
    p: &[f32],
    p_log_p: &[f64],
    next: &[u32],
) -> Vec<RowScores> {
    logits
        .par_chunks(vocab)
        .zip(p.par_chunks(vocab))
        .zip(p_log_p.par_iter())
        .zip(next.par_iter())
        .map(|(((z, p), &plogp), &t)| {
            with_wide_vectors(
                #[inline(always)]
                || {
                    let max = max_f32(z);
                    let top = z.iter().position(|&x| x == max).unwrap_or(0) as u32;
                    let (sum, shifted_sum) = exp_sums(z, max);
                    // log q = z - lse with lse = max + ln Σ e^(z - max).
                    let lse = max as f64 + sum.ln();
                    RowScores {
                        kl: kl_divergence(plogp, dot_f64(p, z), lse),
                        // H = −Σ q log q = ln Σ e^(z − max) − Σ q (z − max).
                        entropy: sum.ln() - shifted_sum / sum,
                        ce: z.get(t as usize).map(|&zt| lse - zt as f64),
                        top,
                    }
                },
            )
        })
        .collect()
}

/// KL(p ‖ q) of one row from `Σ p log p`, `Σ p z` and the log-sum-exp of the logits `z`:
/// `Σ p (log p − (z − lse))`, as `Σ p = 1`. The training loss and the evaluation's KL.
#[inline(always)]
fn kl_divergence(p_log_p: f64, p_dot_z: f64, lse: f64) -> f64 {
    p_log_p - p_dot_z + lse
}

/// Lanes of the fixed-order partial sums below (lets the compiler use vector registers
/// while every run adds in the same order).
const LANES: usize = 16;

/// The largest element (NaN ignored), `-inf` for an empty row.
#[inline(always)]
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

/// `Σ a b` accumulated in f64, where `a` holds probabilities: a term with `a = 0` counts as
/// 0 even against an infinite `b` (`0 log 0 = 0`: a token the model or lens rules out with a
/// logit of `-inf` adds nothing).
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    #[inline(always)]
    fn term(x: f32, y: f32) -> f64 {
        if x == 0.0 {
            0.0
        } else {
            x as f64 * y as f64
        }
    }
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| term(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += term(x, y);
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// Replaces each `x` by `exp(x - shift)` and returns their sum (in f64).
#[inline(always)]
fn exp_shifted_in_place(xs: &mut [f32], shift: f32) -> f64 {
    for x in xs.iter_mut() {
        *x = exp_of_negative(shift - *x);
    }
    let mut acc = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for c in chunks {
        for (s, &x) in acc.iter_mut().zip(c) {
            *s += x as f64;
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// `(Σ e^(x − shift), Σ e^(x − shift) (x − shift))` over `xs`, in f64 (an `x` of `-inf`
/// adds 0 to both).
#[inline(always)]
fn exp_sums(xs: &[f32], shift: f32) -> (f64, f64) {
    #[inline(always)]
    fn terms(x: f32, shift: f32) -> (f64, f64) {
        let shifted = x - shift;
        let e = exp_of_negative(-shifted);
        (e as f64, if e == 0.0 { 0.0 } else { (e * shifted) as f64 })
    }
    let (mut sums, mut weighted) = ([0f64; LANES], [0f64; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for ((s, w), &x) in sums.iter_mut().zip(weighted.iter_mut()).zip(c) {
            let (e, ew) = terms(x, shift);
            *s += e;
            *w += ew;
        }
    }
    rest.iter().fold(
        (sums.iter().sum::<f64>(), weighted.iter().sum::<f64>()),
        |(s, w), &x| {
            let (e, ew) = terms(x, shift);
            (s + e, w + ew)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::{log_softmax, loss_and_logit_grad as generic};

    #[test]
    fn target_matches_the_tensor_path() {
        let logits = Tensor::randn(0f32, 3.0, (5, 1003), &Device::Cpu).unwrap();
        let (log_p, p, p_log_p) = distribution_of_logits(&logits).unwrap().unwrap();
        let want = Target::distribution(log_softmax(&logits).unwrap()).unwrap();
        let Target::Distribution {
            log_p: l2,
            p: p2,
            p_log_p: e2,
        } = want
        else {
            unreachable!()
        };
        let diff = |a: &Tensor, b: &Tensor| hooks::compare::max_abs_diff(a, b).unwrap();
        assert!(diff(&log_p, &l2) < 1e-5, "log p");
        assert!(diff(&p, &p2) < 1e-6, "p");
        for (a, b) in p_log_p.iter().zip(&e2) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Logits of `-inf` (tokens ruled out) add nothing: the model's distribution gives them
    /// p = 0 with a finite `Σ p log p`, and a row scores and trains as the same row without
    /// those columns.
    #[test]
    fn ruled_out_tokens_add_nothing() {
        let vocab = 37;
        let keep: Vec<u32> = (0..vocab as u32)
            .filter(|i| ![0, 5, 36].contains(i))
            .collect();
        let kept = Tensor::new(keep.as_slice(), &Device::Cpu).unwrap();
        let rule_out = |t: Tensor| {
            let mut rows: Vec<Vec<f32>> = t.to_vec2().unwrap();
            for row in &mut rows {
                for (i, x) in row.iter_mut().enumerate() {
                    if !keep.contains(&(i as u32)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            Tensor::new(rows, &Device::Cpu).unwrap()
        };
        let final_logits = rule_out(Tensor::randn(0f32, 3.0, (2, vocab), &Device::Cpu).unwrap());
        let lens_logits = rule_out(Tensor::randn(0f32, 3.0, (2, vocab), &Device::Cpu).unwrap());
        let scored = |final_logits: &Tensor, lens_logits: &Tensor, next: &[u32]| {
            let (log_p, p, p_log_p) = distribution_of_logits(final_logits).unwrap().unwrap();
            let width = p.dim(1).unwrap();
            let lens: Vec<f32> = lens_logits.flatten_all().unwrap().to_vec1().unwrap();
            let p_flat: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
            let rows = score_rows(&lens, width, &p_flat, &p_log_p, next);
            let target = Target::Distribution { log_p, p, p_log_p };
            let (loss, _, _) = loss_and_logit_grad(lens_logits, &target).unwrap().unwrap();
            (rows, target, loss)
        };
        let (all, target, loss_all) = scored(&final_logits, &lens_logits, &[1, 7]);
        let Target::Distribution { p, p_log_p, .. } = &target else {
            unreachable!()
        };
        let p: Vec<Vec<f32>> = p.to_vec2().unwrap();
        assert!(p
            .iter()
            .all(|row| [0, 5, 36].iter().all(|&i| row[i] == 0.0)));
        assert!(p_log_p.iter().all(|x| x.is_finite()));
        let narrow = |t: &Tensor| t.index_select(&kept, 1).unwrap();
        let (some, _, loss_some) = scored(&narrow(&final_logits), &narrow(&lens_logits), &[0, 5]);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
        for (a, b) in all.iter().zip(&some) {
            assert!(
                close(a.kl, b.kl) && close(a.entropy, b.entropy),
                "{a:?} vs {b:?}"
            );
            assert!(close(a.ce.unwrap(), b.ce.unwrap()), "{a:?} vs {b:?}");
            assert_eq!(a.top, keep[b.top as usize]);
        }
        assert!(close(loss_all, loss_some), "{loss_all} vs {loss_some}");
    }

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
            let diff = hooks::compare::max_abs_diff(&g1, &g2).unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }
}
