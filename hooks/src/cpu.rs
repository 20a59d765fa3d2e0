//! Borrowing tensor data on the CPU, for hand-written kernels that are faster than a chain
//! of generic tensor ops (attention, GELU, the lens loss), and a bfloat16 matrix product
//! ([`bf16`]) for the lens's unembedding products and Muon's orthogonalisation.

use candle_core::{DType, Device, Storage, Tensor};

pub mod bf16;

use crate::Result;

/// Runs `f` on the contiguous f32 data of each tensor when all are f32 on the CPU (making
/// them contiguous first if needed); returns `None` otherwise, so callers can fall back to
/// generic tensor ops.
pub fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<Option<R>> {
    if tensors
        .iter()
        .any(|t| !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let contiguous: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        slices.push(&cpu.as_slice::<f32>()?[start..end]);
    }
    f(&slices).map(Some)
}
