//! CPU fast paths for the two forward-pass steps where candle's generic ops leave most of
//! the machine idle: causal attention (blocked, skipping the masked half, one head per
//! thread) and the erf GELU (parallel). Each returns `None` when it does not apply (not f32,
//! not on the CPU), and the caller then uses the generic candle path.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::cpu::with_f32_slices;
use crate::Result;

/// Query rows processed together: the score block (`BLOCK x seq`) stays in cache.
const BLOCK: usize = 64;

/// A raw pointer that threads may share because each writes a disjoint region.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the bare pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Causal softmax attention in f32. `q: [b, heads, t, d]`, `k`/`v`: `[b, kv_heads, t, d]`;
/// returns `[b, t, heads * d]`. Scores are scaled by `1/sqrt(d)`.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    with_f32_slices(&[q, k, v], |s| {
        let (q, k, v) = (s[0], s[1], s[2]);
        let mut out = vec![0f32; b * t * heads * d];
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|bh| {
            let out_base = out_ptr.get();
            let (bi, hi) = (bh / heads, bh % heads);
            let kv = bi * kv_heads + hi / group;
            let qh = &q[(bi * heads + hi) * t * d..][..t * d];
            let kh = &k[kv * t * d..][..t * d];
            let vh = &v[kv * t * d..][..t * d];
            let mut scores = vec![0f32; BLOCK * t];
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let (m, n) = (r1 - r0, r1);
                // scores[m, n] = scale * q[r0..r1] @ k[0..r1]^T
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        qh[r0 * d..].as_ptr(),
                        1,
                        d as isize,
                        kh.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for i in 0..m {
                    let row = &mut scores[i * n..(i + 1) * n];
                    let visible = r0 + i + 1;
                    let max = row[..visible]
                        .iter()
                        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                    let mut sum = 0f32;
                    for x in &mut row[..visible] {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    row[..visible].iter_mut().for_each(|x| *x *= inv);
                    row[visible..].iter_mut().for_each(|x| *x = 0.0);
                }
                // out[b, r0..r1, hi, :] = scores @ v[0..r1]; rows of out are heads*d apart.
                unsafe {
                    let dst = out_base.add((bi * t + r0) * heads * d + hi * d);
                    gemm::gemm(
                        m,
                        d,
                        n,
                        dst,
                        1,
                        (heads * d) as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        vh.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
        Ok(Tensor::from_vec(out, (b, t, heads * d), &Device::Cpu)?)
    })
}

/// `x * (1 + erf(x / sqrt 2)) / 2` elementwise, with candle's own erf, in parallel.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Option<Tensor>> {
    with_f32_slices(&[x], |s| {
        let mut out = vec![0f32; s[0].len()];
        out.par_chunks_mut(1 << 14)
            .zip(s[0].par_chunks(1 << 14))
            .for_each(|(o, i)| {
                for (o, &v) in o.iter_mut().zip(i) {
                    *o = (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2)
                        + 1.0)
                        * 0.5
                        * v;
                }
            });
        Ok(Tensor::from_vec(out, x.shape(), &Device::Cpu)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{causal_attention_generic, causal_mask};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn blocked_attention_matches_generic_path() {
        // Several blocks with a ragged last one, grouped-query heads, odd head size.
        for (t, heads, kv_heads, d) in [(150, 6, 2, 20), (64, 4, 4, 8), (1, 2, 1, 4)] {
            let q = Tensor::randn(0f32, 1., (2, heads, t, d), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1., (2, kv_heads, t, d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1., (2, kv_heads, t, d), &Device::Cpu).unwrap();
            let fast = causal_attention(&q, &k, &v).unwrap().unwrap();
            let mask = causal_mask(t, &Device::Cpu).unwrap();
            let reference = causal_attention_generic(&q, &k, &v, &mask).unwrap();
            assert!(
                max_abs_diff(&fast, &reference) < 1e-5,
                "t={t} heads={heads}"
            );
        }
        let bf16 = Tensor::zeros((1, 1, 2, 2), candle_core::DType::BF16, &Device::Cpu).unwrap();
        assert!(causal_attention(&bf16, &bf16, &bf16).unwrap().is_none());
    }

    #[test]
    fn parallel_gelu_matches_candle() {
        let x = Tensor::randn(0f32, 3., (3, 70_001), &Device::Cpu).unwrap();
        let fast = gelu_erf(&x).unwrap().unwrap();
        assert_eq!(max_abs_diff(&fast, &x.gelu_erf().unwrap()), 0.0);
    }
}
