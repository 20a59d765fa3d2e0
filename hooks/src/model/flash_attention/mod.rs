//! Fused causal attention for bf16 models on CUDA GPUs (`attention.cu`): the `[t, t]` scores
//! stay on chip, on bf16 tensor cores with f32 sums. Used by the forward pass on GPUs of
//! compute capability 8.0 or newer for head sizes 64, 128 and 256 (Pythia, SmolLM2 and the
//! Llama family), unless `EI_FLASH_ATTENTION=0`; other cases take the generic path.
//!
//! Compiled at run time by NVRTC ([`crate::cuda_kernels`]); the CPU test suite compiles the
//! source too and runs it under emulation against the generic attention.

#[cfg(feature = "cuda")]
mod launch;

#[cfg(feature = "cuda")]
pub(crate) use launch::causal_attention;

#[cfg(any(test, feature = "cuda"))]
use crate::cuda_kernels::KernelSource;

/// The kernel's CUDA C++ source, compiled by NVRTC at run time.
#[cfg(any(test, feature = "cuda"))]
pub(crate) const KERNELS: KernelSource = KernelSource {
    module: "eleuther_attention_kernels",
    source: include_str!("attention.cu"),
};

/// Query rows per block (ATTENTION_ROWS in attention.cu).
#[cfg(feature = "cuda")]
const ROWS_PER_BLOCK: usize = 64;

/// The kernel for a head size, if there is one.
#[cfg(any(test, feature = "cuda"))]
fn entry_point(head_size: usize) -> Option<&'static str> {
    match head_size {
        64 => Some("causal_attention_bf16_d64"),
        128 => Some("causal_attention_bf16_d128"),
        256 => Some("causal_attention_bf16_d256"),
        _ => None,
    }
}

/// The kernel's score scale in log2 units: `log2(e) / sqrt(head size)`.
#[cfg(any(test, feature = "cuda"))]
fn scale_log2(head_size: usize) -> f32 {
    (std::f64::consts::LOG2_E / (head_size as f64).sqrt()) as f32
}

#[cfg(test)]
mod tests;
