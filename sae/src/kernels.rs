//! TopK selection, the encoder and sparse decoding. candle has neither a `topk` nor an
//! embedding-bag, so the CPU path (f32) runs hand-written kernels with rows in parallel:
//! the encoder multiplies one block of tokens at a time into a per-thread buffer and selects
//! each row's top `k` from it right away (the `[N, latents]` pre-activations never exist as
//! a whole), the selection is a single pass with a threshold that rises as candidates come
//! in, and the decode reads only the `k` chosen decoder rows per token. Other devices and
//! dtypes fall back to generic tensor ops: a full `arg_sort` per row (slow; on CUDA candle's
//! bitonic sort fails for rows wider than about 8k latents) and a gather of `[tokens, k, d]`
//! decoder rows. On CUDA devices (the `cuda` feature) the kernels of [`crate::cuda`] come
//! first.
//!
//! Order and ties: latents come out by decreasing activation, equal activations by
//! increasing latent index (deterministic). The generic fallback does not promise an order
//! among ties.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use hooks::cpu::with_f32_slices;
use rayon::prelude::*;

use crate::Result;

/// The `k` largest entries of each row of `pre: [N, n]`: `(values [N, k], indices [N, k]
/// u32)`, by decreasing value.
pub(crate) fn topk(pre: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::topk(pre, None, k, None, false)? {
        return Ok(out);
    }
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
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::combine_rows(acts, indices, w_dec, Some(b_dec))? {
        return Ok(out);
    }
    match decode_cpu(acts, indices, w_dec, b_dec)? {
        Some(out) => Ok(out),
        None => decode_generic(acts, indices, w_dec, b_dec),
    }
}

/// Latents chosen per token: activations `[N, k]` (largest first) and indices `[N, k]` u32.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    pub acts: Tensor,
    pub indices: Tensor,
}

/// What [`encode_select`] picks from each row of `ReLU(xc W_encᵀ + b_enc)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Picks<'a> {
    /// The `k` most active latents.
    pub k: usize,
    /// The `k_aux` most active among the latents marked dead (AuxK), if any.
    pub dead: Option<(&'a [bool], usize)>,
}

/// Encodes `xc: [N, d]` (the encoder's input, `b_dec` already subtracted where it applies)
/// and selects per row what `picks` asks for: `(top k, top k_aux among the dead)`.
/// The dense product runs in `w_enc`'s dtype (see [`encoder_pre`]): a bf16 copy of the
/// encoder weight makes it a bf16 product.
pub(crate) fn encode_select(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<(Selection, Option<Selection>)> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::encode_select(xc, w_enc, b_enc, picks)? {
        return Ok(out);
    }
    if w_enc.dtype() == xc.dtype() {
        if let Some(out) = encode_select_cpu(xc, w_enc, b_enc, picks)? {
            return Ok(out);
        }
    }
    encode_select_generic(xc, w_enc, b_enc, picks)
}

/// `xc W_encᵀ + b_enc` in `w_enc`'s dtype, `xc` and `b_enc` cast to it (bf16: the product's
/// f32 sums rounded to bf16, as under sparsify's bf16 autocast; the pre-activations stay
/// bf16, half the bytes for the TopK to read).
pub(crate) fn encoder_pre(xc: &Tensor, w_enc: &Tensor, b_enc: &Tensor) -> Result<Tensor> {
    Ok(encoder_product(xc, w_enc)?.broadcast_add(&b_enc.to_dtype(w_enc.dtype())?)?)
}

/// `xc W_encᵀ` in `w_enc`'s dtype: [`encoder_pre`] before the bias.
pub(crate) fn encoder_product(xc: &Tensor, w_enc: &Tensor) -> Result<Tensor> {
    Ok(xc.to_dtype(w_enc.dtype())?.matmul(&w_enc.t()?)?)
}

/// The pre-activations `ReLU(xc W_encᵀ + b_enc)` with generic tensor ops.
pub(crate) fn pre_activations(xc: &Tensor, w_enc: &Tensor, b_enc: &Tensor) -> Result<Tensor> {
    Ok(encoder_pre(xc, w_enc, b_enc)?.relu()?)
}

fn encode_select_generic(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<(Selection, Option<Selection>)> {
    // Ranked in f32 (exact for bf16 values) by the CPU's TopK, which breaks ties by the
    // lower index as the GPU's does; the selected activations come back in `xc`'s dtype.
    let pre = encoder_pre(xc, w_enc, b_enc)?
        .relu()?
        .to_dtype(xc.dtype())?;
    let (acts, indices) = topk(&pre, picks.k)?;
    let aux = match picks.dead {
        Some((dead, k_aux)) => {
            let mask: Vec<u8> = dead.iter().map(|&d| u8::from(d)).collect();
            let mask = Tensor::from_vec(mask, dead.len(), pre.device())?
                .broadcast_as(pre.shape())?
                .contiguous()?;
            let excluded = Tensor::full(f32::NEG_INFINITY, pre.shape(), pre.device())?
                .to_dtype(pre.dtype())?;
            let (acts, indices) = topk(&mask.where_cond(&pre, &excluded)?, k_aux)?;
            Some(Selection { acts, indices })
        }
        None => None,
    };
    Ok((Selection { acts, indices }, aux))
}

/// Codes of a ReLU (`threshold` None) or JumpReLU SAE: the latents whose pre-activation
/// `xc W_encᵀ + b_enc` is positive (and above its threshold), as `(acts [N, m], indices
/// [N, m] u32)` by decreasing activation, `m` the largest count of any row (at least 1),
/// shorter rows padded with zero activations at index 0.
pub(crate) fn encode_threshold(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    threshold: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let pre = xc.matmul(&w_enc.t()?)?.broadcast_add(b_enc)?;
    let mut acts = pre.relu()?;
    if let Some(threshold) = threshold {
        let above = pre.broadcast_gt(threshold)?.to_dtype(acts.dtype())?;
        acts = (acts * above)?;
    }
    let dtype = acts.dtype();
    let rows: Vec<Vec<f32>> = acts.to_dtype(DType::F32)?.to_vec2()?;
    let codes: Vec<Vec<(f32, u32)>> = rows
        .iter()
        .map(|row| {
            let mut nonzero: Vec<(f32, u32)> = row
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0)
                .map(|(j, &v)| (v, j as u32))
                .collect();
            nonzero.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            nonzero
        })
        .collect();
    let width = codes.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut values = vec![0f32; rows.len() * width];
    let mut indices = vec![0u32; rows.len() * width];
    for (r, code) in codes.iter().enumerate() {
        for (j, &(v, i)) in code.iter().enumerate() {
            values[r * width + j] = v;
            indices[r * width + j] = i;
        }
    }
    let device = xc.device();
    Ok((
        Tensor::from_vec(values, (rows.len(), width), device)?.to_dtype(dtype)?,
        Tensor::from_vec(indices, (rows.len(), width), device)?,
    ))
}

/// An integer with the order of `f32::total_cmp`.
#[inline]
fn order_key(v: f32) -> i32 {
    let bits = v.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

/// The `k` largest of a stream of `(key, index)` pairs seen in increasing index order, in
/// one pass: candidates collect in a buffer; when it is full it is cut back to its best `k`
/// and the `k`-th key becomes the bar a later entry must clear (strictly: a later entry has
/// a larger index, so it loses a tie).
struct TopSelector {
    k: usize,
    capacity: usize,
    buffer: Vec<(i32, u32)>,
    bar: i64,
}

impl TopSelector {
    fn new(k: usize) -> Self {
        let capacity = 2 * k + 64;
        TopSelector {
            k,
            capacity,
            buffer: Vec::with_capacity(capacity),
            bar: i64::MIN,
        }
    }

    fn reset(&mut self) {
        self.buffer.clear();
        self.bar = i64::MIN;
    }

    #[inline]
    fn offer(&mut self, key: i32, index: u32) {
        if key as i64 > self.bar {
            self.buffer.push((key, index));
            if self.buffer.len() == self.capacity {
                self.cut();
                self.bar = self.buffer[self.k - 1].0 as i64;
            }
        }
    }

    fn cut(&mut self) {
        if self.buffer.len() > self.k {
            self.buffer
                .select_nth_unstable_by(self.k - 1, by_key_then_index);
            self.buffer.truncate(self.k);
        }
    }

    /// The best `k` (fewer if fewer were offered), best first.
    fn finish(&mut self) -> &[(i32, u32)] {
        self.cut();
        self.buffer.sort_unstable_by(by_key_then_index);
        &self.buffer
    }
}

fn by_key_then_index(a: &(i32, u32), b: &(i32, u32)) -> std::cmp::Ordering {
    b.0.cmp(&a.0).then(a.1.cmp(&b.1))
}

thread_local! {
    /// Per-thread pre-activations of one block of tokens, kept between calls so that each
    /// step does not fault in fresh pages.
    static PRE_BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Tokens per encoder block: a block's pre-activations take about 16 MiB (so the weight
/// matrix is streamed once per block, a few times per step), at least 16 tokens.
fn encoder_block(latents: usize) -> usize {
    ((4 << 20) / latents.max(1)).clamp(16, 1024)
}

/// One block's picks: activations and indices of the top `k`, then of the AuxK pick.
type BlockPicks = (Vec<f32>, Vec<u32>, Vec<f32>, Vec<u32>);

fn encode_select_cpu(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<Option<(Selection, Option<Selection>)>> {
    let (rows, d) = xc.dims2()?;
    let n = w_enc.dim(0)?;
    let k = picks.k;
    let k_aux = picks.dead.map_or(0, |(_, k)| k);
    let block = encoder_block(n);
    let out = with_f32_slices(&[xc, w_enc, b_enc], |s| {
        let (xc, w_enc, b_enc) = (s[0], s[1], s[2]);
        let blocks: Vec<BlockPicks> = xc
            .par_chunks(block * d)
            .map(|x| {
                let m = x.len() / d;
                let mut top = TopSelector::new(k);
                let mut aux = TopSelector::new(k_aux.max(1));
                let mut out = (
                    Vec::with_capacity(m * k),
                    Vec::with_capacity(m * k),
                    Vec::with_capacity(m * k_aux),
                    Vec::with_capacity(m * k_aux),
                );
                PRE_BLOCK.with(|pre| {
                    let mut pre = pre.borrow_mut();
                    pre.resize(m * n, 0.0);
                    // SAFETY: `pre` holds m x n floats, `x` m x d and `w_enc` n x d, all
                    // contiguous row-major; the strides below stay inside them.
                    unsafe {
                        gemm::gemm(
                            m,
                            n,
                            d,
                            pre.as_mut_ptr(),
                            1,
                            n as isize,
                            false,
                            x.as_ptr(),
                            1,
                            d as isize,
                            w_enc.as_ptr(),
                            d as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                    for row in pre.chunks_mut(n) {
                        top.reset();
                        for (j, (v, b)) in row.iter_mut().zip(b_enc).enumerate() {
                            *v = (*v + b).max(0.0);
                            top.offer(order_key(*v), j as u32);
                        }
                        for &(_, j) in top.finish() {
                            out.0.push(row[j as usize]);
                            out.1.push(j);
                        }
                        if let Some((dead, _)) = picks.dead {
                            aux.reset();
                            for (j, (v, _)) in row.iter().zip(dead).enumerate().filter(|x| *x.1 .1)
                            {
                                aux.offer(order_key(*v), j as u32);
                            }
                            for &(_, j) in aux.finish() {
                                out.2.push(row[j as usize]);
                                out.3.push(j);
                            }
                        }
                    }
                });
                out
            })
            .collect();
        Ok(blocks)
    })?;
    let Some(blocks) = out else {
        return Ok(None);
    };
    let cpu = &Device::Cpu;
    let (mut acts, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    let (mut aux_acts, mut aux_indices) = (Vec::new(), Vec::new());
    for (a, i, aa, ai) in blocks {
        acts.extend(a);
        indices.extend(i);
        aux_acts.extend(aa);
        aux_indices.extend(ai);
    }
    let main = Selection {
        acts: Tensor::from_vec(acts, (rows, k), cpu)?,
        indices: Tensor::from_vec(indices, (rows, k), cpu)?,
    };
    let aux = match picks.dead {
        Some((_, k_aux)) => Some(Selection {
            acts: Tensor::from_vec(aux_acts, (rows, k_aux), cpu)?,
            indices: Tensor::from_vec(aux_indices, (rows, k_aux), cpu)?,
        }),
        None => None,
    };
    Ok(Some((main, aux)))
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
                || TopSelector::new(k),
                |top, ((values, indices), row)| {
                    top.reset();
                    for (j, &v) in row.iter().enumerate() {
                        top.offer(order_key(v), j as u32);
                    }
                    for ((v, i), &(_, j)) in
                        values.iter_mut().zip(indices.iter_mut()).zip(top.finish())
                    {
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

/// Each row of `w: [n, d]` divided by its norm plus float32 epsilon (sparsify's
/// `set_decoder_norm_to_unit_norm`), in one parallel pass on the CPU in f32.
pub(crate) fn unit_rows(w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::unit_rows(w)? {
        return Ok(out);
    }
    let (n, d) = w.dims2()?;
    let out = with_f32_slices(&[w], |s| {
        let mut out = s[0].to_vec();
        out.par_chunks_mut(d).for_each(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt() + f32::EPSILON;
            row.iter_mut().for_each(|v| *v /= norm);
        });
        Ok(out)
    })?;
    Ok(match out {
        Some(out) => Tensor::from_vec(out, (n, d), &Device::Cpu)?,
        None => {
            let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
            w.broadcast_div(&(norm + f32::EPSILON as f64)?)?
        }
    })
}

/// Each row of `grad: [n, d]` minus its component along the same row of the unit-norm
/// `w_dec` (sparsify's `remove_gradient_parallel_to_decoder_directions`).
pub(crate) fn remove_parallel(grad: &Tensor, w_dec: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::remove_parallel(grad, w_dec)? {
        return Ok(out);
    }
    let (n, d) = grad.dims2()?;
    let out = with_f32_slices(&[grad, w_dec], |s| {
        let mut out = s[0].to_vec();
        out.par_chunks_mut(d)
            .zip(s[1].par_chunks(d))
            .for_each(|(g, w)| {
                let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
                g.iter_mut().zip(w).for_each(|(g, w)| *g -= dot * w);
            });
        Ok(out)
    })?;
    Ok(match out {
        Some(out) => Tensor::from_vec(out, (n, d), &Device::Cpu)?,
        None => {
            let parallel = (grad * w_dec)?.sum_keepdim(1)?;
            (grad - w_dec.broadcast_mul(&parallel)?)?
        }
    })
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

/// What the gradient of a squared error needs from a forward pass (all in one dtype,
/// indices u32): `target` `[N, d]` and `x_hat` the prediction, `xc` the encoder's input,
/// `scale` the factor of `Σ‖x̂ − target‖²` divided by 2 (for the FVU: `2 / total variance`).
pub(crate) struct Backward<'a> {
    pub target: &'a Tensor,
    pub xc: &'a Tensor,
    pub acts: &'a Tensor,
    pub indices: &'a Tensor,
    pub x_hat: &'a Tensor,
    pub w_enc: &'a Tensor,
    pub w_dec: &'a Tensor,
    pub scale: f64,
    /// `x̂` includes `+ b_dec` (not AuxK's decode of the residual).
    pub decoder_bias: bool,
    /// The encoder's input is `x − b_dec` (an autoencoder, not a transcoder).
    pub encoder_bias: bool,
}

/// Gradients `[W_enc, b_enc, W_dec, b_dec]` summed over the terms and chunks of one step.
/// On the CPU in f32 they add up in place in host buffers, allocated once per step.
#[derive(Default)]
pub(crate) enum GradSum {
    /// Nothing added yet.
    #[default]
    Empty,
    /// Host buffers with the `[n, d]` shape of the weights.
    Host {
        grads: [Vec<f32>; 4],
        n: usize,
        d: usize,
    },
    /// Tensors (other devices and dtypes).
    Tensors(Vec<Tensor>),
}

impl GradSum {
    fn add_tensors(&mut self, grads: Vec<Tensor>) -> Result<()> {
        *self = match std::mem::replace(self, GradSum::Empty) {
            GradSum::Empty => GradSum::Tensors(grads),
            GradSum::Tensors(sum) => GradSum::Tensors(
                sum.iter()
                    .zip(&grads)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?,
            ),
            host @ GradSum::Host { .. } => {
                let mut sum = host.into_tensors()?;
                for (s, g) in sum.iter_mut().zip(&grads) {
                    *s = (&*s + g)?;
                }
                GradSum::Tensors(sum)
            }
        };
        Ok(())
    }

    /// The host buffers, allocated (zeroed) on first use; `None` once tensors were added.
    fn host(&mut self, n: usize, d: usize) -> Option<&mut [Vec<f32>; 4]> {
        if let GradSum::Empty = self {
            *self = GradSum::Host {
                grads: [
                    vec![0f32; n * d],
                    vec![0f32; n],
                    vec![0f32; n * d],
                    vec![0f32; d],
                ],
                n,
                d,
            };
        }
        match self {
            GradSum::Host { grads, .. } => Some(grads),
            _ => None,
        }
    }

    /// The sums as tensors, leaving nothing added (`None` when nothing was).
    #[cfg(feature = "cuda")]
    pub(crate) fn take(&mut self) -> Result<Option<Vec<Tensor>>> {
        match std::mem::replace(self, GradSum::Empty) {
            GradSum::Empty => Ok(None),
            sums => sums.into_tensors().map(Some),
        }
    }

    /// The sums as tensors (an error when nothing was added).
    pub(crate) fn into_tensors(self) -> Result<Vec<Tensor>> {
        match self {
            GradSum::Empty => Err(crate::Error::Training("no gradient was computed".into())),
            GradSum::Tensors(t) => Ok(t),
            GradSum::Host { grads, n, d } => {
                let [w_enc, b_enc, w_dec, b_dec] = grads;
                let cpu = &Device::Cpu;
                Ok(vec![
                    Tensor::from_vec(w_enc, (n, d), cpu)?,
                    Tensor::from_vec(b_enc, n, cpu)?,
                    Tensor::from_vec(w_dec, (n, d), cpu)?,
                    Tensor::from_vec(b_dec, d, cpu)?,
                ])
            }
        }
    }
}

/// Adds the gradients of `Σ‖x̂ − target‖² · scale / 2` with respect to `[W_enc, b_enc,
/// W_dec, b_dec]` to `sum`, the selection held fixed. Only the `k` selected latents of each
/// token get encoder and decoder gradient; a selected latent whose activation is 0 (ReLU
/// cut it) passes none to the encoder.
pub(crate) fn backward(b: &Backward, sum: &mut GradSum) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::cuda::backward(b, sum)? {
        return Ok(());
    }
    if backward_cpu(b, sum)? {
        return Ok(());
    }
    sum.add_tensors(backward_generic(b)?)
}

fn backward_cpu(b: &Backward, sum: &mut GradSum) -> Result<bool> {
    if !matches!(b.indices.device(), Device::Cpu)
        || b.indices.dtype() != DType::U32
        || b.w_dec.dtype() != DType::F32
        || matches!(sum, GradSum::Tensors(_))
    {
        return Ok(false);
    }
    let (rows, k) = b.acts.dims2()?;
    let (n, d) = b.w_dec.dims2()?;
    let Some(out) = sum.host(n, d) else {
        return Ok(false);
    };
    let idx: Vec<u32> = b.indices.flatten_all()?.to_vec1()?;
    let scale = b.scale as f32;
    let (decoder_bias, encoder_bias) = (b.decoder_bias, b.encoder_bias);
    let slices = [b.target, b.xc, b.acts, b.x_hat, b.w_enc, b.w_dec];
    let done = with_f32_slices(&slices, |s| {
        let (y, xc, acts, x_hat, w_enc, w_dec) = (s[0], s[1], s[2], s[3], s[4], s[5]);
        // Per token: g = dL/dx̂, ga = dL/d(selected pre-activation), and the token's share
        // of the b_dec gradient: g where x̂ has + b_dec, − Σ_j ga_j W_enc[i_j] where the
        // encoder input has − b_dec.
        let mut g = vec![0f32; rows * d];
        let mut ga = vec![0f32; rows * k];
        let mut r = vec![0f32; rows * d];
        g.par_chunks_mut(d)
            .zip(ga.par_chunks_mut(k))
            .zip(r.par_chunks_mut(d))
            .enumerate()
            .for_each(|(t, ((g, ga), r))| {
                let (yt, ht) = (&y[t * d..(t + 1) * d], &x_hat[t * d..(t + 1) * d]);
                for ((g, &yv), &hv) in g.iter_mut().zip(yt).zip(ht) {
                    *g = scale * (hv - yv);
                }
                if decoder_bias {
                    r.copy_from_slice(g);
                }
                for j in 0..k {
                    if acts[t * k + j] <= 0.0 {
                        continue;
                    }
                    let i = idx[t * k + j] as usize;
                    let wd = &w_dec[i * d..(i + 1) * d];
                    let dot: f32 = g.iter().zip(wd).map(|(a, b)| a * b).sum();
                    ga[j] = dot;
                    if encoder_bias {
                        for (rv, &we) in r.iter_mut().zip(&w_enc[i * d..(i + 1) * d]) {
                            *rv -= dot * we;
                        }
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
        let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] = out;
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
        for row in r.chunks(d) {
            for (o, v) in g_b_dec.iter_mut().zip(row) {
                *o += v;
            }
        }
        Ok(())
    })?;
    Ok(done.is_some())
}

/// The same gradients with generic tensor ops (any device and dtype; materialises
/// `[N, k, d]` tensors).
pub(crate) fn backward_generic(b: &Backward) -> Result<Vec<Tensor>> {
    let (rows, k) = b.acts.dims2()?;
    let (n, d) = b.w_dec.dims2()?;
    let dtype = b.w_dec.dtype();
    let flat = b.indices.flatten_all()?;
    let g = ((b.x_hat - b.target)? * b.scale)?;
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
    let mut g_b_dec = Tensor::zeros(d, dtype, b.w_dec.device())?;
    if b.decoder_bias {
        g_b_dec = (g_b_dec + g.sum(0)?)?;
    }
    if b.encoder_bias {
        let through_encoder = selected(b.w_enc)?
            .broadcast_mul(&ga.unsqueeze(2)?)?
            .sum(1)?;
        g_b_dec = (g_b_dec - through_encoder.sum(0)?)?;
    }
    Ok(vec![g_w_enc, g_b_enc, g_w_dec, g_b_dec])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uniform;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        hooks::compare::max_abs_diff(a, b).unwrap()
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
    fn public_topk_refuses_bad_shapes_and_k() {
        let x = uniform(&[3, 10], 0.0, 1.0, 1);
        for (k, needle) in [(0, "got 0"), (11, "row width 10, got 11")] {
            let err = crate::topk(&x, k).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = crate::topk(&x.flatten_all().unwrap(), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2-D tensor, got shape [30]"), "{err}");
        let (_, indices) = crate::topk(&x, 10).unwrap();
        assert_eq!(indices.dims(), &[3, 10]);
    }

    #[test]
    fn cpu_encoder_matches_the_generic_path() {
        // Several blocks of tokens (the block is 4096 tokens at 1024 latents: use many
        // latents to get small blocks), and the AuxK pick among dead latents.
        let (rows, n, d, k) = (90, 100_000, 8, 7);
        let xc = uniform(&[rows, d], 0.0, 1.0, 5);
        let w_enc = uniform(&[n, d], 0.0, 0.3, 6);
        let b_enc = uniform(&[n], -0.2, 0.3, 7);
        assert!(encoder_block(n) < rows);
        let dead: Vec<bool> = (0..n).map(|i| i % 7 == 3).collect();
        let picks = Picks {
            k,
            dead: Some((&dead, 5)),
        };
        let (top, aux) = encode_select(&xc, &w_enc, &b_enc, picks).unwrap();
        let (top_ref, aux_ref) = encode_select_generic(&xc, &w_enc, &b_enc, picks).unwrap();
        let aux = aux.unwrap();
        let aux_ref = aux_ref.unwrap();
        assert_eq!(
            top.indices.to_vec2::<u32>().unwrap(),
            top_ref.indices.to_vec2::<u32>().unwrap()
        );
        assert!(max_abs_diff(&top.acts, &top_ref.acts) < 1e-5);
        let aux_indices = aux.indices.to_vec2::<u32>().unwrap();
        assert_eq!(aux_indices, aux_ref.indices.to_vec2::<u32>().unwrap());
        assert!(aux_indices.iter().flatten().all(|&i| dead[i as usize]));
        assert!(max_abs_diff(&aux.acts, &aux_ref.acts) < 1e-5);
        // ReLU: a row with every pre-activation negative selects zeros, lowest indices first.
        let negative = (xc.narrow(0, 0, 1).unwrap() * 0.0).unwrap();
        let b_neg = (b_enc.abs().unwrap() * -1.0).unwrap();
        let (top, _) =
            encode_select(&negative, &w_enc, &b_neg, Picks { k: 3, dead: None }).unwrap();
        assert_eq!(top.indices.to_vec2::<u32>().unwrap(), vec![vec![0, 1, 2]]);
        assert_eq!(top.acts.to_vec2::<f32>().unwrap(), vec![vec![0.0; 3]]);
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
