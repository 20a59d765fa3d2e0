//! TopK selection and sparse decoding. candle has neither a `topk` nor an embedding-bag, so
//! the CPU path (f32) runs hand-written kernels with rows in parallel: a partial selection
//! (`select_nth_unstable_by`, O(latents) per row) and a decode that reads only the `k`
//! chosen decoder rows per token. Other devices and dtypes fall back to generic tensor ops:
//! a full `arg_sort` per row (slow; on CUDA candle's bitonic sort fails for rows wider than
//! about 8k latents) and a gather of `[tokens, k, d]` decoder rows.
//!
//! Order and ties: latents come out by decreasing activation, equal activations by
//! increasing latent index (deterministic). The generic fallback does not promise an order
//! among ties.

use candle_core::{DType, Device, Tensor};
use hooks::cpu::with_f32_slices;
use rayon::prelude::*;

use crate::Result;

/// The `k` largest entries of each row of `pre: [N, n]`: `(values [N, k], indices [N, k]
/// u32)`, by decreasing value.
pub(crate) fn topk(pre: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    match topk_cpu(pre, k)? {
        Some(out) => Ok(out),
        None => topk_generic(pre, k),
    }
}

/// `Σ_j acts[t, j] · w_dec[indices[t, j]] + b_dec` for every token `t`: `[N, d]`.
pub(crate) fn decode(
    acts: &Tensor,
    indices: &Tensor,
    w_dec: &Tensor,
    b_dec: &Tensor,
) -> Result<Tensor> {
    match decode_cpu(acts, indices, w_dec, b_dec)? {
        Some(out) => Ok(out),
        None => decode_generic(acts, indices, w_dec, b_dec),
    }
}

/// Indices `0..n` of `row` with the `k` largest values first, in order (value descending,
/// then index ascending); `order` is scratch space.
fn select_top(row: &[f32], k: usize, order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..row.len() as u32);
    let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, cmp);
    }
    order[..k].sort_unstable_by(cmp);
}

fn topk_cpu(pre: &Tensor, k: usize) -> Result<Option<(Tensor, Tensor)>> {
    let (rows, n) = pre.dims2()?;
    let out = with_f32_slices(&[pre], |s| {
        let mut values = vec![0f32; rows * k];
        let mut indices = vec![0u32; rows * k];
        values
            .par_chunks_mut(k)
            .zip(indices.par_chunks_mut(k))
            .zip(s[0].par_chunks(n))
            .for_each_init(
                || Vec::with_capacity(n),
                |order, ((values, indices), row)| {
                    select_top(row, k, order);
                    for ((v, i), &j) in values.iter_mut().zip(indices.iter_mut()).zip(&order[..k]) {
                        *v = row[j as usize];
                        *i = j;
                    }
                },
            );
        Ok((values, indices))
    })?;
    let Some((values, indices)) = out else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(values, (rows, k), &Device::Cpu)?,
        Tensor::from_vec(indices, (rows, k), &Device::Cpu)?,
    )))
}

/// The sort-based TopK for any device and dtype.
pub(crate) fn topk_generic(pre: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let indices = pre
        .arg_sort_last_dim(false)?
        .narrow(1, 0, k)?
        .contiguous()?;
    let values = pre.contiguous()?.gather(&indices, 1)?;
    Ok((values, indices))
}

fn decode_cpu(
    acts: &Tensor,
    indices: &Tensor,
    w_dec: &Tensor,
    b_dec: &Tensor,
) -> Result<Option<Tensor>> {
    if !matches!(indices.device(), Device::Cpu) || indices.dtype() != DType::U32 {
        return Ok(None);
    }
    let (rows, k) = acts.dims2()?;
    let d = w_dec.dim(1)?;
    let idx: Vec<u32> = indices.flatten_all()?.to_vec1()?;
    let out = with_f32_slices(&[acts, w_dec, b_dec], |s| {
        let (acts, w_dec, b_dec) = (s[0], s[1], s[2]);
        let mut out = vec![0f32; rows * d];
        out.par_chunks_mut(d)
            .zip(acts.par_chunks(k))
            .zip(idx.par_chunks(k))
            .for_each(|((out, acts), idx)| {
                out.copy_from_slice(b_dec);
                for (&a, &i) in acts.iter().zip(idx) {
                    let row = &w_dec[i as usize * d..(i as usize + 1) * d];
                    for (o, w) in out.iter_mut().zip(row) {
                        *o += a * w;
                    }
                }
            });
        Ok(out)
    })?;
    Ok(match out {
        Some(out) => Some(Tensor::from_vec(out, (rows, d), &Device::Cpu)?),
        None => None,
    })
}

/// The gather-based decode for any device and dtype (materialises `[N, k, d]`).
pub(crate) fn decode_generic(
    acts: &Tensor,
    indices: &Tensor,
    w_dec: &Tensor,
    b_dec: &Tensor,
) -> Result<Tensor> {
    let (rows, k) = acts.dims2()?;
    let d = w_dec.dim(1)?;
    let rows_of = w_dec
        .index_select(&indices.flatten_all()?, 0)?
        .reshape((rows, k, d))?;
    Ok(rows_of
        .broadcast_mul(&acts.unsqueeze(2)?)?
        .sum(1)?
        .broadcast_add(b_dec)?)
}

/// What the FVU gradient needs from a forward pass over `x: [N, d]` (all in one dtype,
/// indices u32): `xc` is the encoder's input (`x − b_dec`), `scale` is `2 / total variance`.
pub(crate) struct Backward<'a> {
    pub x: &'a Tensor,
    pub xc: &'a Tensor,
    pub acts: &'a Tensor,
    pub indices: &'a Tensor,
    pub x_hat: &'a Tensor,
    pub w_enc: &'a Tensor,
    pub w_dec: &'a Tensor,
    pub scale: f64,
}

/// Gradients of `Σ‖x − x̂‖² · scale / 2` with respect to `[W_enc, b_enc, W_dec, b_dec]`,
/// the selection held fixed. Only the `k` selected latents of each token get encoder and
/// decoder gradient; a selected latent whose activation is 0 (ReLU cut it) passes none to
/// the encoder.
pub(crate) fn backward(b: &Backward) -> Result<Vec<Tensor>> {
    match backward_cpu(b)? {
        Some(grads) => Ok(grads),
        None => backward_generic(b),
    }
}

fn backward_cpu(b: &Backward) -> Result<Option<Vec<Tensor>>> {
    if !matches!(b.indices.device(), Device::Cpu) || b.indices.dtype() != DType::U32 {
        return Ok(None);
    }
    let (rows, k) = b.acts.dims2()?;
    let (n, d) = b.w_dec.dims2()?;
    let idx: Vec<u32> = b.indices.flatten_all()?.to_vec1()?;
    let scale = b.scale as f32;
    let slices = [b.x, b.xc, b.acts, b.x_hat, b.w_enc, b.w_dec];
    let out = with_f32_slices(&slices, |s| {
        let (x, xc, acts, x_hat, w_enc, w_dec) = (s[0], s[1], s[2], s[3], s[4], s[5]);
        // Per token: g = dL/dx̂, ga = dL/d(selected pre-activation), and the token's share
        // of the b_dec gradient, g − Σ_j ga_j W_enc[i_j] (b_dec enters x̂ and x − b_dec).
        let mut g = vec![0f32; rows * d];
        let mut ga = vec![0f32; rows * k];
        let mut r = vec![0f32; rows * d];
        g.par_chunks_mut(d)
            .zip(ga.par_chunks_mut(k))
            .zip(r.par_chunks_mut(d))
            .enumerate()
            .for_each(|(t, ((g, ga), r))| {
                let (xt, ht) = (&x[t * d..(t + 1) * d], &x_hat[t * d..(t + 1) * d]);
                for ((g, &xv), &hv) in g.iter_mut().zip(xt).zip(ht) {
                    *g = scale * (hv - xv);
                }
                r.copy_from_slice(g);
                for j in 0..k {
                    if acts[t * k + j] <= 0.0 {
                        continue;
                    }
                    let i = idx[t * k + j] as usize;
                    let wd = &w_dec[i * d..(i + 1) * d];
                    let dot: f32 = g.iter().zip(wd).map(|(a, b)| a * b).sum();
                    ga[j] = dot;
                    for (rv, &we) in r.iter_mut().zip(&w_enc[i * d..(i + 1) * d]) {
                        *rv -= dot * we;
                    }
                }
            });
        // Group the (token, slot) pairs by latent (counting sort, in token order), then
        // accumulate each latent's rows without contention.
        let mut offsets = vec![0usize; n + 1];
        for &i in &idx {
            offsets[i as usize + 1] += 1;
        }
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut cursor = offsets.clone();
        let mut entries = vec![0u32; idx.len()];
        for (p, &i) in idx.iter().enumerate() {
            entries[cursor[i as usize]] = p as u32;
            cursor[i as usize] += 1;
        }
        let mut g_w_enc = vec![0f32; n * d];
        let mut g_b_enc = vec![0f32; n];
        let mut g_w_dec = vec![0f32; n * d];
        g_w_enc
            .par_chunks_mut(d)
            .zip(g_b_enc.par_iter_mut())
            .zip(g_w_dec.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, ((gwe, gbe), gwd))| {
                for &p in &entries[offsets[i]..offsets[i + 1]] {
                    let p = p as usize;
                    let t = p / k;
                    let a = acts[p];
                    for (o, &gv) in gwd.iter_mut().zip(&g[t * d..(t + 1) * d]) {
                        *o += a * gv;
                    }
                    let gat = ga[p];
                    if gat != 0.0 {
                        for (o, &xv) in gwe.iter_mut().zip(&xc[t * d..(t + 1) * d]) {
                            *o += gat * xv;
                        }
                        *gbe += gat;
                    }
                }
            });
        Ok((g_w_enc, g_b_enc, g_w_dec, r))
    })?;
    let Some((g_w_enc, g_b_enc, g_w_dec, r)) = out else {
        return Ok(None);
    };
    let cpu = &Device::Cpu;
    Ok(Some(vec![
        Tensor::from_vec(g_w_enc, (n, d), cpu)?,
        Tensor::from_vec(g_b_enc, n, cpu)?,
        Tensor::from_vec(g_w_dec, (n, d), cpu)?,
        Tensor::from_vec(r, (rows, d), cpu)?.sum(0)?,
    ]))
}

/// The same gradients with generic tensor ops (any device and dtype; materialises
/// `[N, k, d]` tensors).
pub(crate) fn backward_generic(b: &Backward) -> Result<Vec<Tensor>> {
    let (rows, k) = b.acts.dims2()?;
    let (n, d) = b.w_dec.dims2()?;
    let dtype = b.w_dec.dtype();
    let flat = b.indices.flatten_all()?;
    let g = ((b.x_hat - b.x)? * b.scale)?;
    let selected =
        |w: &Tensor| -> Result<Tensor> { Ok(w.index_select(&flat, 0)?.reshape((rows, k, d))?) };
    let live = b.acts.gt(0.0)?.to_dtype(dtype)?;
    let ga = (selected(b.w_dec)?.broadcast_mul(&g.unsqueeze(1)?)?.sum(2)? * live)?;
    let per_slot = |coef: &Tensor, rows_of: &Tensor| -> Result<Tensor> {
        Ok(coef
            .unsqueeze(2)?
            .broadcast_mul(&rows_of.unsqueeze(1)?)?
            .reshape((rows * k, d))?)
    };
    let zeros = Tensor::zeros((n, d), dtype, b.w_dec.device())?;
    let g_w_dec = zeros.index_add(&flat, &per_slot(b.acts, &g)?, 0)?;
    let g_w_enc = zeros.index_add(&flat, &per_slot(&ga, b.xc)?, 0)?;
    let g_b_enc =
        Tensor::zeros(n, dtype, b.w_dec.device())?.index_add(&flat, &ga.flatten_all()?, 0)?;
    let through_encoder = selected(b.w_enc)?
        .broadcast_mul(&ga.unsqueeze(2)?)?
        .sum(1)?;
    let g_b_dec = (g - through_encoder)?.sum(0)?;
    Ok(vec![g_w_enc, g_b_enc, g_w_dec, g_b_dec])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn cpu_topk_is_sorted_breaks_ties_by_index_and_matches_the_sort() {
        let row = [0.5f32, 2.0, 0.0, 2.0, -1.0, 3.0, 0.5, 0.0];
        let pre = Tensor::new(&[row, row.map(|v| -v)], &Device::Cpu).unwrap();
        let (values, indices) = topk(&pre, 4).unwrap();
        assert_eq!(
            indices.to_vec2::<u32>().unwrap(),
            vec![vec![5, 1, 3, 0], vec![4, 2, 7, 0]]
        );
        assert_eq!(
            values.to_vec2::<f32>().unwrap(),
            vec![vec![3.0, 2.0, 2.0, 0.5], vec![1.0, -0.0, -0.0, -0.5]]
        );
        // k = n keeps every entry.
        let (_, all) = topk(&pre, 8).unwrap();
        assert_eq!(
            all.to_vec2::<u32>().unwrap()[0],
            vec![5, 1, 3, 0, 6, 2, 7, 4]
        );

        // Random rows (no ties): same as the generic sort-based path.
        let pre = uniform(&[37, 301], 0.0, 1.0, 1);
        let (v1, i1) = topk(&pre, 11).unwrap();
        let (v2, i2) = topk_generic(&pre, 11).unwrap();
        assert_eq!(i1.to_vec2::<u32>().unwrap(), i2.to_vec2::<u32>().unwrap());
        assert_eq!(max_abs_diff(&v1, &v2), 0.0);
    }

    #[test]
    fn cpu_decode_matches_the_generic_path() {
        let (rows, n, d, k) = (13, 50, 24, 5);
        let w_dec = uniform(&[n, d], 0.0, 1.0, 2);
        let b_dec = uniform(&[d], 0.0, 1.0, 3);
        let pre = uniform(&[rows, n], 0.0, 1.0, 4);
        let (acts, indices) = topk(&pre, k).unwrap();
        let fast = decode(&acts, &indices, &w_dec, &b_dec).unwrap();
        let slow = decode_generic(&acts, &indices, &w_dec, &b_dec).unwrap();
        assert_eq!(fast.dims(), &[rows, d]);
        assert!(max_abs_diff(&fast, &slow) < 1e-5);
    }
}
