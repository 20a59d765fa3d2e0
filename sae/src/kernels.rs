//! TopK selection, the encoder and sparse decoding. candle has neither a `topk` nor an
//! embedding-bag, so the CPU path (f32) runs hand-written kernels with rows in parallel:
//! the encoder selects each row's top `k` as its pre-activations come out of the product
//! (the `[N, latents]` pre-activations never exist as a whole), tile by tile in registers
//! on CPUs with AVX-512F ([`fused`]), else one block of tokens at a time through `gemm`;
//! the selection is a single pass with a threshold that rises as candidates come in, and
//! the decode reads only the `k` chosen decoder rows per token. Other devices and
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
use hooks::cpu::{is_cpu_f32, product_with_transposed, with_f32_slices, with_f32_slices_mut};
use rayon::prelude::*;

use crate::{Error, Result};

mod fused;

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

/// The float whose [`order_key`] is `key`.
#[inline]
fn key_value(key: i32) -> f32 {
    f32::from_bits((key ^ (((key >> 31) as u32) >> 1) as i32) as u32)
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

    /// The value a later entry must exceed (by [`order_key`]), `−∞` while any is taken.
    fn threshold(&self) -> f32 {
        i32::try_from(self.bar).map_or(f32::NEG_INFINITY, key_value)
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

/// One row's selections in progress, latents offered in increasing index order: its top
/// `k` and, for AuxK, its top `k_aux` among the dead latents.
struct RowPicks {
    top: TopSelector,
    aux: Option<TopSelector>,
}

impl RowPicks {
    fn new(picks: Picks) -> Self {
        RowPicks {
            top: TopSelector::new(picks.k),
            aux: picks
                .dead
                .filter(|&(_, k_aux)| k_aux > 0)
                .map(|(_, k_aux)| TopSelector::new(k_aux)),
        }
    }

    fn reset(&mut self) {
        self.top.reset();
        if let Some(aux) = &mut self.aux {
            aux.reset();
        }
    }

    /// Offers latent `j0 + l` with value `values[l]` for each bit `l` set in `lanes`, to
    /// the AuxK pick too where it is set in `dead`.
    fn offer_lanes(&mut self, values: &[f32], j0: u32, lanes: u32, dead: Option<u32>) {
        let above = |t: f32| {
            values
                .iter()
                .enumerate()
                .fold(0u32, |mask, (l, &v)| mask | (u32::from(v > t) << l))
        };
        let offer = |selector: &mut TopSelector, mut mask: u32| {
            while mask != 0 {
                let l = mask.trailing_zeros();
                selector.offer(order_key(values[l as usize]), j0 + l);
                mask &= mask - 1;
            }
        };
        let mask = above(self.top.threshold()) & lanes;
        offer(&mut self.top, mask);
        if let (Some(aux), Some(dead)) = (&mut self.aux, dead) {
            let mask = above(aux.threshold()) & dead;
            offer(aux, mask);
        }
    }

    /// Appends the picks, best first, to `out`.
    fn emit(&mut self, out: &mut BlockPicks) {
        for &(key, j) in self.top.finish() {
            out.0.push(key_value(key));
            out.1.push(j);
        }
        if let Some(aux) = &mut self.aux {
            for &(key, j) in aux.finish() {
                out.2.push(key_value(key));
                out.3.push(j);
            }
        }
    }
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

/// The picks of consecutive blocks as those of all their rows, in order.
fn joined(blocks: Vec<BlockPicks>) -> BlockPicks {
    let mut all = BlockPicks::default();
    for (acts, indices, aux_acts, aux_indices) in blocks {
        all.0.extend(acts);
        all.1.extend(indices);
        all.2.extend(aux_acts);
        all.3.extend(aux_indices);
    }
    all
}

/// Latents per word of [`lane_bits`].
const LANES: usize = 32;

/// `flags` as bits: bit `j % 32` of word `j / 32` is `flags[j]`.
fn lane_bits(flags: &[bool]) -> Vec<u32> {
    flags
        .chunks(LANES)
        .map(|c| {
            c.iter()
                .rev()
                .fold(0u32, |bits, &f| (bits << 1) | u32::from(f))
        })
        .collect()
}

/// The lanes of word `w` of [`lane_bits`] that hold one of `n` latents.
fn live_lanes(w: usize, n: usize) -> u32 {
    u32::MAX >> (LANES - (n - w * LANES).min(LANES))
}

/// The selections of one block of rows `x: [m, d]` through `gemm` into a per-thread
/// buffer of pre-activations; `dead` the AuxK candidates as [`lane_bits`].
fn encode_select_block(
    x: &[f32],
    w_enc: &[f32],
    b_enc: &[f32],
    d: usize,
    picks: Picks,
    dead: Option<&[u32]>,
) -> BlockPicks {
    let (m, n) = (x.len() / d, b_enc.len());
    let mut row_picks = RowPicks::new(picks);
    let mut out = BlockPicks::default();
    PRE_BLOCK.with(|pre| {
        let mut pre = pre.borrow_mut();
        pre.resize(m * n, 0.0);
        product_with_transposed(&mut pre, x, w_enc, d, false, false);
        for row in pre.chunks_mut(n) {
            row_picks.reset();
            for (v, b) in row.iter_mut().zip(b_enc) {
                *v = (*v + b).max(0.0);
            }
            for (w, values) in row.chunks(LANES).enumerate() {
                let lanes = live_lanes(w, n);
                let dead = dead.map(|bits| bits[w]);
                row_picks.offer_lanes(values, (w * LANES) as u32, lanes, dead);
            }
            row_picks.emit(&mut out);
        }
    });
    out
}

fn encode_select_cpu(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<Option<(Selection, Option<Selection>)>> {
    let (rows, d) = xc.dims2()?;
    let n = w_enc.dim(0)?;
    let k = picks.k;
    let dead = picks.dead.map(|(dead, _)| lane_bits(dead));
    let dead = dead.as_deref();
    let out = with_f32_slices(&[xc, w_enc, b_enc], |s| {
        let (xc, w_enc, b_enc) = (s[0], s[1], s[2]);
        if fused::usable(rows) {
            return Ok(fused::encode_select(xc, w_enc, b_enc, d, picks, dead));
        }
        Ok(xc
            .par_chunks(encoder_block(n) * d)
            .map(|x| encode_select_block(x, w_enc, b_enc, d, picks, dead))
            .collect())
    })?;
    let Some(blocks) = out else {
        return Ok(None);
    };
    let cpu = &Device::Cpu;
    let (acts, indices, aux_acts, aux_indices) = joined(blocks);
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
/// `set_decoder_norm_to_unit_norm`): a new tensor.
pub(crate) fn unit_rows(w: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::unit_rows(w)? {
        return Ok(out);
    }
    if let Some(out) = on_a_cpu_copy(w, unit_rows_in_place)? {
        return Ok(out);
    }
    let norm = w.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(w.broadcast_div(&(norm + f32::EPSILON as f64)?)?)
}

/// [`unit_rows`] written into `w` itself, in one parallel pass, when it is a contiguous f32
/// CPU tensor (`false` otherwise): only for a tensor nobody else holds.
pub(crate) fn unit_rows_in_place(w: &Tensor) -> Result<bool> {
    let d = w.dims2()?.1;
    let done = with_f32_slices_mut(&[w], &[], |w, _| {
        w[0].par_chunks_mut(d).for_each(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt() + f32::EPSILON;
            row.iter_mut().for_each(|v| *v /= norm);
        });
        Ok(())
    })?;
    Ok(done.is_some())
}

/// Each row of `grad: [n, d]` minus its component along the same row of the unit-norm
/// `w_dec` (sparsify's `remove_gradient_parallel_to_decoder_directions`): a new tensor.
pub(crate) fn remove_parallel(grad: &Tensor, w_dec: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = crate::cuda::remove_parallel(grad, w_dec)? {
        return Ok(out);
    }
    if let Some(out) = on_a_cpu_copy(grad, |g| remove_parallel_in_place(g, w_dec))? {
        return Ok(out);
    }
    let parallel = (grad * w_dec)?.sum_keepdim(1)?;
    Ok((grad - w_dec.broadcast_mul(&parallel)?)?)
}

/// [`remove_parallel`] written into `grad` itself, in one parallel pass, when both are f32
/// CPU tensors and `grad` is contiguous (`false` otherwise): only for a gradient buffer the
/// caller owns.
pub(crate) fn remove_parallel_in_place(grad: &Tensor, w_dec: &Tensor) -> Result<bool> {
    let d = grad.dims2()?.1;
    let done = with_f32_slices_mut(&[grad], &[w_dec], |g, w| {
        g[0].par_chunks_mut(d)
            .zip(w[0].par_chunks(d))
            .for_each(|(g, w)| {
                let dot: f32 = g.iter().zip(w).map(|(a, b)| a * b).sum();
                g.iter_mut().zip(w).for_each(|(g, w)| *g -= dot * w);
            });
        Ok(())
    })?;
    Ok(done.is_some())
}

/// A copy of the f32 CPU tensor `t` with `in_place` applied to it, or `None` (another device
/// or dtype, or `in_place` declined).
fn on_a_cpu_copy(
    t: &Tensor,
    in_place: impl FnOnce(&Tensor) -> Result<bool>,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(t) {
        return Ok(None);
    }
    let out = t.contiguous()?.copy()?;
    Ok(in_place(&out)?.then_some(out))
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

/// The error for a latent index `index` past a decoder of `n` latents.
pub(crate) fn latent_out_of_range(index: u32, n: usize) -> Error {
    Error::Sae(format!(
        "latent index {index} is out of range: the decoder has {n} latents"
    ))
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
    let (n, d) = w_dec.dims2()?;
    let idx: Vec<u32> = indices.flatten_all()?.to_vec1()?;
    if let Some(&i) = idx.iter().find(|&&i| i as usize >= n) {
        return Err(latent_out_of_range(i, n));
    }
    if k == 0 {
        return Ok(None);
    }
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
/// On the CPU in f32 they add up in place in host tensors, which a trainer keeps from step
/// to step ([`GradSum::reset`]): fresh `[n, d]` buffers each step would cost a page fault
/// per 4 KiB.
#[derive(Default)]
pub(crate) enum GradSum {
    /// Nothing added yet.
    #[default]
    Empty,
    /// Host buffers.
    Host(HostSums),
    /// Tensors (other devices and dtypes).
    Tensors(Vec<Tensor>),
}

/// Contiguous f32 CPU tensors with the shapes of the weights, owned by their [`GradSum`],
/// and the scratch buffers of [`backward_cpu`].
pub(crate) struct HostSums {
    grads: [Tensor; 4],
    scratch: [Vec<f32>; 2],
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
            host @ GradSum::Host(_) => {
                let mut sum = host.tensors()?;
                for (s, g) in sum.iter_mut().zip(&grads) {
                    *s = (&*s + g)?;
                }
                GradSum::Tensors(sum)
            }
        };
        Ok(())
    }

    /// The host tensors (zeroed when new) and scratch buffers; `None` once other tensors
    /// were added.
    fn host(&mut self, n: usize, d: usize) -> Result<Option<&mut HostSums>> {
        if let GradSum::Empty = self {
            let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu);
            *self = GradSum::Host(HostSums {
                grads: [zeros(&[n, d])?, zeros(&[n])?, zeros(&[n, d])?, zeros(&[d])?],
                scratch: Default::default(),
            });
        }
        Ok(match self {
            GradSum::Host(host) => Some(host),
            _ => None,
        })
    }

    /// Back to nothing added, keeping host buffers (zeroed in place) for the next step.
    pub(crate) fn reset(&mut self) -> Result<()> {
        if let GradSum::Host(host) = self {
            let grads: Vec<&Tensor> = host.grads.iter().collect();
            let zeroed = with_f32_slices_mut(&grads, &[], |w, _| {
                w.iter_mut()
                    .for_each(|g| g.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0)));
                Ok(())
            })?;
            if zeroed.is_some() {
                return Ok(());
            }
        }
        *self = GradSum::Empty;
        Ok(())
    }

    /// The sums so far as tensors (an error when nothing was added). Host sums share the
    /// buffers, which the next [`GradSum::reset`] zeroes.
    pub(crate) fn tensors(&self) -> Result<Vec<Tensor>> {
        match self {
            GradSum::Empty => Err(crate::Error::Training("no gradient was computed".into())),
            GradSum::Tensors(t) => Ok(t.clone()),
            GradSum::Host(host) => Ok(host.grads.to_vec()),
        }
    }

    /// The sums as tensors, leaving nothing added (`None` when nothing was).
    #[cfg(feature = "cuda")]
    pub(crate) fn take(&mut self) -> Result<Option<Vec<Tensor>>> {
        match std::mem::replace(self, GradSum::Empty) {
            GradSum::Empty => Ok(None),
            sums => sums.tensors().map(Some),
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
    let Some(host) = sum.host(n, d)? else {
        return Ok(false);
    };
    let idx: Vec<u32> = b.indices.flatten_all()?.to_vec1()?;
    let scale = b.scale as f32;
    let (decoder_bias, encoder_bias) = (b.decoder_bias, b.encoder_bias);
    let sums: Vec<&Tensor> = host.grads.iter().collect();
    let reads = [b.target, b.xc, b.acts, b.x_hat, b.w_enc, b.w_dec];
    let done = with_f32_slices_mut(&sums, &reads, |out, s| {
        let (y, xc, acts, x_hat, w_enc, w_dec) = (s[0], s[1], s[2], s[3], s[4], s[5]);
        // Per token: g = dL/dx̂.
        let [g, latent_ga] = &mut host.scratch;
        g.clear();
        g.resize(rows * d, 0.0);
        g.par_chunks_mut(d).enumerate().for_each(|(t, g)| {
            let (yt, ht) = (&y[t * d..(t + 1) * d], &x_hat[t * d..(t + 1) * d]);
            for ((g, &yv), &hv) in g.iter_mut().zip(yt).zip(ht) {
                *g = scale * (hv - yv);
            }
        });
        // Group the (token, slot) pairs by latent (counting sort, in token order), then
        // accumulate each latent's rows without contention, reading its decoder row once.
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
        let [g_w_enc, g_b_enc, g_w_dec, g_b_dec] = out else {
            unreachable!("four sums")
        };
        // Per latent: the sum of its ga = dL/d(selected pre-activation) in this call.
        latent_ga.clear();
        latent_ga.resize(n, 0.0);
        g_w_enc
            .par_chunks_mut(d)
            .zip(g_b_enc.par_iter_mut())
            .zip(g_w_dec.par_chunks_mut(d))
            .zip(latent_ga.par_iter_mut())
            .enumerate()
            .for_each(|(i, (((gwe, gbe), gwd), ga_sum))| {
                let wd = &w_dec[i * d..(i + 1) * d];
                for &p in &entries[offsets[i]..offsets[i + 1]] {
                    let p = p as usize;
                    let t = p / k;
                    let (a, gt) = (acts[p], &g[t * d..(t + 1) * d]);
                    for (o, &gv) in gwd.iter_mut().zip(gt) {
                        *o += a * gv;
                    }
                    if a <= 0.0 {
                        continue;
                    }
                    let ga: f32 = gt.iter().zip(wd).map(|(a, b)| a * b).sum();
                    if ga != 0.0 {
                        for (o, &xv) in gwe.iter_mut().zip(&xc[t * d..(t + 1) * d]) {
                            *o += ga * xv;
                        }
                        *gbe += ga;
                        *ga_sum += ga;
                    }
                }
            });
        // b_dec: Σ_t g_t where x̂ has + b_dec, − Σ_i (Σ ga of latent i) W_enc[i] where the
        // encoder input has − b_dec; the latter in fixed chunks of latents, summed in order,
        // so the result does not depend on the thread count.
        if decoder_bias {
            for row in g.chunks(d) {
                for (o, v) in g_b_dec.iter_mut().zip(row) {
                    *o += v;
                }
            }
        }
        if encoder_bias {
            const LATENTS: usize = 1024;
            let partials: Vec<Vec<f32>> = latent_ga
                .par_chunks(LATENTS)
                .zip(w_enc.par_chunks(LATENTS * d))
                .map(|(ga, w)| {
                    let mut partial = vec![0f32; d];
                    for (&ga, row) in ga.iter().zip(w.chunks(d)) {
                        if ga != 0.0 {
                            for (o, &we) in partial.iter_mut().zip(row) {
                                *o += ga * we;
                            }
                        }
                    }
                    partial
                })
                .collect();
            for partial in partials {
                for (o, v) in g_b_dec.iter_mut().zip(partial) {
                    *o -= v;
                }
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

    /// The fused AVX-512 encoder and the blockwise `gemm` one pick the same latents, ties
    /// by index included: inputs in quarters and eighths make every sum exact in both
    /// summation orders. Awkward sizes: a partial last block and tile of rows, a partial
    /// last panel of latents, AuxK over dead latents.
    #[test]
    fn fused_and_blockwise_encoders_pick_alike() {
        if !fused::usable(usize::MAX) {
            eprintln!("no AVX-512F on this CPU: the fused encoder is not used here");
            return;
        }
        // Uniform in center ± half_width, rounded to multiples of `step`.
        let steps = |shape: &[usize], center: f32, half_width: f32, step: f32, seed: u64| {
            let u = uniform(shape, center / step, half_width / step, seed);
            (u.round().unwrap() * step as f64).unwrap()
        };
        let (rows, n, d) = (203, 1007, 40);
        let xc = steps(&[rows, d], 0.0, 2.0, 0.25, 1);
        let w_enc = steps(&[n, d], 0.0, 1.0, 0.125, 2);
        let b_enc = steps(&[n], -1.0, 2.0, 0.5, 3);
        let dead: Vec<bool> = (0..n).map(|j| j % 5 == 2 || j > 1000).collect();
        let dead_bits = lane_bits(&dead);
        let (x, w, b) = (
            xc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w_enc.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b_enc.to_vec1::<f32>().unwrap(),
        );
        for (k, k_aux) in [(7, 5), (40, 0), (1007, 3)] {
            let picks = Picks {
                k,
                dead: Some((&dead, k_aux)),
            };
            let fused = joined(fused::encode_select(&x, &w, &b, d, picks, Some(&dead_bits)));
            let blockwise = encode_select_block(&x, &w, &b, d, picks, Some(&dead_bits));
            assert_eq!(fused.1.len(), rows * k);
            assert_eq!(fused.3.len(), rows * k_aux);
            assert_eq!(fused, blockwise, "k {k}, k_aux {k_aux}");
            assert!(fused.3.iter().all(|&j| dead[j as usize]));
        }
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
