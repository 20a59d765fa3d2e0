//! The lens loss fused into one CUDA kernel per row (`kernels.cu`): log-sum-exp, the loss
//! and the logit gradient in two passes over the logits, where the generic tensor path
//! makes about a dozen. On a GPU those passes cost several times the two vocabulary-sized
//! bf16 products themselves (docs/benchmarks.md, GPU section).
//!
//! Compiled at run time by NVRTC ([`hooks::cuda_kernels`]); the CPU test suite compiles the
//! source too and runs it under emulation against the generic loss
//! ([`crate::loss::loss_and_logit_grad`]).

#[cfg(feature = "cuda")]
mod launch;

#[cfg(any(test, feature = "cuda"))]
use candle_core::DType;
use candle_core::Tensor;
use hooks::cuda_kernels::KernelSource;

use crate::loss::Target;
#[cfg(any(test, feature = "cuda"))]
use crate::Error;
use crate::Result;

/// The kernels' CUDA C++ source, compiled by NVRTC at run time.
pub const KERNELS: KernelSource = KernelSource {
    module: "eleuther_lens_kernels",
    source: include_str!("kernels.cu"),
};

/// The fused loss of `logits: [n, vocab]` (f32 or bf16) on a CUDA device: `(loss sum, rows
/// counted, d loss / d logits)` with the gradient in the logits' dtype, as
/// [`crate::loss::loss_and_logit_grad`] computes it. `None` off CUDA devices and for other
/// dtypes.
pub(crate) fn loss_and_logit_grad(
    logits: &Tensor,
    target: &Target,
) -> Result<Option<(f64, usize, Tensor)>> {
    #[cfg(feature = "cuda")]
    {
        launch::loss_and_logit_grad(logits, target)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (logits, target);
        Ok(None)
    }
}

/// `log_softmax(logits)` in f32 for `logits: [n, vocab]` (f32 or bf16) on a CUDA device (the
/// KL target); `None` off CUDA devices and for other dtypes.
pub(crate) fn log_softmax(logits: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        launch::log_softmax(logits)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = logits;
        Ok(None)
    }
}

#[cfg(any(test, feature = "cuda"))]
/// The kernels as tensor operations, launched on a CUDA device or (in the tests) run on the
/// CPU under emulation. The losses return `(loss per row [n] f32, gradient)` with the
/// gradient of the logits' shape and dtype.
pub(crate) trait LossKernels {
    /// `log_softmax(logits)` in f32, `[n, vocab]`.
    fn log_softmax(&self, logits: &Tensor) -> Result<Tensor>;
    /// Forward KL from the target's `log_p: [n, vocab]` (f32).
    fn kl(&self, logits: &Tensor, log_p: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Next-token cross-entropy with `targets: [n]` u32, `u32::MAX` for ignored rows.
    fn ce(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)>;
}

#[cfg(any(test, feature = "cuda"))]
/// [`loss_and_logit_grad`] through `kernels`: checks the targets, runs the kernel and sums
/// the per-row losses in f64.
pub(crate) fn loss_and_logit_grad_with(
    kernels: &impl LossKernels,
    logits: &Tensor,
    target: &Target,
) -> Result<(f64, usize, Tensor)> {
    let (n, vocab) = logits.dims2()?;
    let (losses, grad, counted) = match target {
        Target::Distribution { log_p, .. } | Target::LogProbabilities(log_p) => {
            let (losses, grad) = kernels.kl(logits, &log_p.to_dtype(DType::F32)?)?;
            (losses, grad, n)
        }
        Target::NextTokens(next) => {
            let ids: Vec<u32> = next.to_vec1()?;
            if let Some(bad) = ids.iter().find(|&&t| t != u32::MAX && t as usize >= vocab) {
                return Err(Error::Training(format!(
                    "next-token id {bad} is out of range for the unembedding's {vocab} rows"
                )));
            }
            let counted = ids.iter().filter(|&&t| t != u32::MAX).count();
            let (losses, grad) = kernels.ce(logits, &next.to_dtype(DType::U32)?)?;
            (losses, grad, counted)
        }
    };
    let losses: Vec<f32> = losses.to_vec1()?;
    Ok((losses.iter().map(|&l| l as f64).sum(), counted, grad))
}

#[cfg(test)]
mod tests;
