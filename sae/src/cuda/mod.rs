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
pub(crate) use launch::{backward, combine_rows, encode_select, topk};

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
pub const TOPK_MAX_K: usize = 4096;

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
    /// `<g[t], rows[indices[t, j]]>` where `gate[t, j] > 0`, else 0: `[N, k]` f32.
    fn gated_row_dots(
        &self,
        g: &Tensor,
        indices: &Tensor,
        rows: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor>;
    /// `Σ coef[t, j] · vectors[t]` into row `indices[t, j]` of a zero `[n, d]` f32 tensor.
    fn scatter_rows(
        &self,
        coef: &Tensor,
        indices: &Tensor,
        vectors: &Tensor,
        n: usize,
    ) -> Result<Tensor>;
    /// `Σ coef[t, j]` into entry `indices[t, j]` of a zero `[n]` f32 tensor.
    fn scatter_scalars(&self, coef: &Tensor, indices: &Tensor, n: usize) -> Result<Tensor>;
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

/// The gradients `[W_enc, b_enc, W_dec, b_dec]` of `kernels::backward` (f32) from the sparse
/// kernels: only the `k` selected rows per token are read or written.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn backward_with(kernels: &impl Kernels, b: &Backward) -> Result<Vec<Tensor>> {
    let (n, d) = b.w_dec.dims2()?;
    let g = ((b.x_hat - b.target)? * b.scale)?.contiguous()?;
    let ga = kernels.gated_row_dots(&g, b.indices, b.w_dec, b.acts)?;
    let g_w_dec = kernels.scatter_rows(b.acts, b.indices, &g, n)?;
    let g_w_enc = kernels.scatter_rows(&ga, b.indices, b.xc, n)?;
    let g_b_enc = kernels.scatter_scalars(&ga, b.indices, n)?;
    let mut g_b_dec = Tensor::zeros(d, DType::F32, b.w_dec.device())?;
    if b.decoder_bias {
        g_b_dec = (g_b_dec + g.sum(0)?)?;
    }
    if b.encoder_bias {
        // Σ_t Σ_j ga[t, j] W_enc[i_tj] = (the b_enc gradient) · W_enc.
        let through_encoder = g_b_enc.unsqueeze(0)?.matmul(b.w_enc)?.squeeze(0)?;
        g_b_dec = (g_b_dec - through_encoder)?;
    }
    Ok(vec![g_w_enc, g_b_enc, g_w_dec, g_b_dec])
}

#[cfg(test)]
mod tests;
