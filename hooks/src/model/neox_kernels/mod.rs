//! Fused element-wise steps of bf16 GPT-NeoX blocks on CUDA GPUs (`kernels.cu`): the MLP's
//! bias and GELU in one pass, the query/key/value bias, head split and rotary embedding in
//! one, and a parallel-residual block's output biases and residual adds in one (when no
//! hook looks at the attention or MLP output), and LayerNorm with the variance taken of
//! the differences from the mean (candle's kernel cancels for rows far from zero). Each of
//! the first three replaces several of candle's passes
//! over the block's activations: about 1.6 GiB of memory traffic per layer of a pythia-1b
//! forward at batch 8 x 2048. Used unless `EI_FUSED_ELEMENTWISE=0`.
//!
//! Compiled at run time by NVRTC ([`crate::cuda_kernels`]); the CPU test suite compiles the
//! source too and runs it under emulation against the generic steps.

#[cfg(feature = "cuda")]
mod launch;

#[cfg(feature = "cuda")]
pub(crate) use launch::{bias_gelu, enabled_for, layer_norm, parallel_residual, qkv_rotary};

#[cfg(any(test, feature = "cuda"))]
use crate::cuda_kernels::KernelSource;

/// The kernels' CUDA C++ source, compiled by NVRTC at run time.
#[cfg(any(test, feature = "cuda"))]
pub(crate) const KERNELS: KernelSource = KernelSource {
    module: "eleuther_neox_kernels",
    source: include_str!("kernels.cu"),
};

#[cfg(test)]
mod tests;
