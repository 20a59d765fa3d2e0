//! The SAE's own CUDA kernels (`kernels.cu`): TopK over rows of any width (candle has no
//! TopK, and its CUDA sort fails on rows wider than about 8k latents), the sparse decode and
//! the sparse products of the backward pass, which touch only the `k` selected rows per token.
//!
//! The source is compiled at run time by NVRTC ([`hooks::cuda_kernels`]). The CPU test
//! suite compiles it too, and runs it on the CPU under emulation (`emulation/harness.cpp`)
//! against the Rust CPU implementations: a syntax, type or logic error fails the ordinary
//! test run. With the `cuda` feature, the SAE's tensor operations on a CUDA device go
//! through these kernels.

#[cfg(feature = "cuda")]
pub(crate) mod launch;

#[cfg(feature = "cuda")]
pub(crate) use launch::{backward, combine_rows, encode_select, remove_parallel, topk, unit_rows};

#[cfg(any(test, feature = "cuda"))]
use crate::kernels::{encoder_product, Backward, Picks, Selection};
#[cfg(any(test, feature = "cuda"))]
use crate::Result;
#[cfg(any(test, feature = "cuda"))]
use candle_core::{DType, Tensor};
use hooks::cuda_kernels::KernelSource;

/// The kernels' CUDA C++ source, compiled by NVRTC at run time.
pub const KERNELS: KernelSource = KernelSource {
    module: "eleuther_sae_kernels",
    source: include_str!("kernels.cu"),
};

/// The largest `k` the TopK kernel selects per row (its picks sort in shared memory).
pub const TOPK_MAX_K: usize = crate::GPU_MAX_K;

/// The kernels as tensor operations: launched on a CUDA device, or (in the tests) run on
/// the CPU under emulation. Shapes: `pre [N, n]`, `coef`/`indices`/`gate [N, k]` (indices
/// u32), `rows [n, d]`, `g`/`vectors [N, d]`. (The sparse decode, `combine_rows_*`, needs
/// no composition: `kernels::decode` launches it directly.)
#[cfg(any(test, feature = "cuda"))]
pub(crate) trait Kernels {
    /// The `k` largest of each row of `pre + bias` (`bias: [n]` of `pre`'s dtype, added in
    /// that dtype; of its ReLU when `relu`) among the `allowed` latents: `(values [N, k],
    /// indices [N, k])`, by decreasing value, ties by increasing index.
    fn topk(
        &self,
        pre: &Tensor,
        bias: Option<&Tensor>,
        k: usize,
        allowed: Option<&Tensor>,
        relu: bool,
    ) -> Result<(Tensor, Tensor)>;
    /// The picks of `indices: [N, k]` grouped by latent, for the kernels below.
    fn sort_by_latent(&self, indices: &Tensor, n: usize) -> Result<PicksByLatent>;
    /// `<g[t], rows[indices[t, j]]>` where `gate[t, j] > 0`, else 0: `[N, k]` f32.
    fn gated_row_dots(
        &self,
        picks: &PicksByLatent,
        g: &Tensor,
        rows: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor>;
    /// `sums` (two `[n, d]` f32 tensors) with `coefs[m][t, j] · vectors[m][t]` added to
    /// row `indices[t, j]` of `sums[m]` for every pick: a step's W_dec and W_enc gradient
    /// sums grow in place over its chunks, each touched row read and written once per chunk.
    fn add_rows(
        &self,
        picks: &PicksByLatent,
        coefs: [&Tensor; 2],
        vectors: [&Tensor; 2],
        sums: [Tensor; 2],
    ) -> Result<[Tensor; 2]>;
    /// `sum` (`[n]` f32) with `coef[t, j]` added to its entry `indices[t, j]`.
    fn scatter_scalars(&self, coef: &Tensor, indices: &Tensor, sum: Tensor) -> Result<Tensor>;
}

/// A chunk's picks `indices: [N, k]` grouped by latent (a counting sort): latent `i`'s are
/// `order[offsets[i]..offsets[i + 1]]`, each the flat index `t k + j` of a pick (u32
/// tensors, `offsets: [n + 1]`, `order: [N k]`), in no particular order within a latent.
#[cfg(any(test, feature = "cuda"))]
pub(crate) struct PicksByLatent {
    pub offsets: Tensor,
    pub order: Tensor,
    /// Tokens `N` and picks per token `k`.
    pub shape: (usize, usize),
}

/// `kernels::encode_select` with `kernels`: the dense pre-activations, then TopK with the
/// ReLU folded in, and the AuxK pick among the dead latents through the kernel's mask.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn encode_select_with(
    kernels: &impl Kernels,
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<(Selection, Option<Selection>)> {
    // The TopK reads the product in `w_enc`'s dtype (bf16: half the bytes) and adds the bias
    // itself, as `encoder_pre` would (saving a pass over the product); the selected
    // activations come back in `xc`'s dtype.
    let pre = encoder_product(xc, w_enc)?;
    let bias = b_enc.to_dtype(w_enc.dtype())?;
    let in_dtype = |(acts, indices): (Tensor, Tensor)| -> Result<(Tensor, Tensor)> {
        Ok((acts.to_dtype(xc.dtype())?, indices))
    };
    let (acts, indices) = in_dtype(kernels.topk(&pre, Some(&bias), picks.k, None, true)?)?;
    let aux = match picks.dead {
        Some((dead, k_aux)) => {
            let mask: Vec<u8> = dead.iter().map(|&d| u8::from(d)).collect();
            let mask = Tensor::from_vec(mask, dead.len(), xc.device())?;
            let (acts, indices) =
                in_dtype(kernels.topk(&pre, Some(&bias), k_aux, Some(&mask), true)?)?;
            Some(Selection { acts, indices })
        }
        None => None,
    };
    Ok((Selection { acts, indices }, aux))
}

/// `sum` (the gradients `[W_enc, b_enc, W_dec, b_dec]` so far, f32, or `None` for zeros)
/// plus those of `kernels::backward`, from the sparse kernels: only the `k` selected rows
/// per token are read or written.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn backward_with(
    kernels: &impl Kernels,
    b: &Backward,
    sum: Option<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let (n, d) = b.w_dec.dims2()?;
    let device = b.w_dec.device();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, device);
    let [w_enc_sum, b_enc_sum, w_dec_sum, b_dec_sum]: [Tensor; 4] = match sum {
        Some(sum) => sum.try_into().map_err(|sum: Vec<Tensor>| {
            crate::Error::Training(format!("expected 4 gradient sums, got {}", sum.len()))
        })?,
        None => [zeros(&[n, d])?, zeros(&[n])?, zeros(&[n, d])?, zeros(&[d])?],
    };
    let g = ((b.x_hat - b.target)? * b.scale)?.contiguous()?;
    let picks = kernels.sort_by_latent(b.indices, n)?;
    let ga = kernels.gated_row_dots(&picks, &g, b.w_dec, b.acts)?;
    let [w_dec_sum, w_enc_sum] =
        kernels.add_rows(&picks, [b.acts, &ga], [&g, b.xc], [w_dec_sum, w_enc_sum])?;
    // This chunk's alone: the decoder bias's gradient needs it.
    let g_b_enc = kernels.scatter_scalars(&ga, b.indices, zeros(&[n])?)?;
    let mut b_dec_sum = b_dec_sum;
    if b.decoder_bias {
        b_dec_sum = (b_dec_sum + g.sum(0)?)?;
    }
    if b.encoder_bias {
        // Σ_t Σ_j ga[t, j] W_enc[i_tj] = (the b_enc gradient) · W_enc.
        let through_encoder = g_b_enc.unsqueeze(0)?.matmul(b.w_enc)?.squeeze(0)?;
        b_dec_sum = (b_dec_sum - through_encoder)?;
    }
    Ok(vec![
        w_enc_sum,
        (b_enc_sum + g_b_enc)?,
        w_dec_sum,
        b_dec_sum,
    ])
}

#[cfg(test)]
mod tests;
