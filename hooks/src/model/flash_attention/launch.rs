//! Launching the fused attention kernel on candle's CUDA tensors.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor};
use half::bf16;

use super::{entry_point, scale_log2, KERNELS, ROWS_PER_BLOCK};
use crate::cuda_kernels::launch::{
    alloc_uninit, compute_capability, config, cuda_device, function, int, launch, view, wrap,
};
use crate::Result;

/// Threads per block (ATTENTION_THREADS in attention.cu).
const THREADS: u32 = 128;
/// The most blocks a grid may have along y (one per batch row and head).
const MAX_GRID_Y: usize = 65_535;

/// Causal attention of bf16 `q: [b, heads, t, d]`, `k`/`v: [b, kv_heads, t, d]` on a CUDA
/// GPU of compute capability 8.0 or newer: `[b, t, heads * d]` (bf16), as
/// `layers::causal_attention` computes it. `None` when the kernel does not apply.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(q) else {
        return Ok(None);
    };
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let kv_shape = [b, kv_heads, t, d];
    let applies = [q, k, v].iter().all(|x| x.dtype() == DType::BF16)
        && k.dims() == kv_shape
        && v.dims() == kv_shape
        && t > 0
        && kv_heads > 0
        && heads % kv_heads == 0
        && b * heads <= MAX_GRID_Y
        && compute_capability(&device).is_some_and(|cc| cc >= (8, 0))
        && std::env::var("EI_FLASH_ATTENTION").map_or(true, |v| v != "0");
    let Some(name) = entry_point(d).filter(|_| applies) else {
        return Ok(None);
    };
    // The kernel reads rows in aligned 16-byte pieces: start offsets must be multiples of 8.
    let aligned = |x: &Tensor| -> Result<Tensor> {
        let x = x.contiguous()?;
        if x.layout().start_offset() % 8 == 0 {
            Ok(x)
        } else {
            Ok(x.copy()?)
        }
    };
    let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
    let kernel = function(&KERNELS, &device, name)?;
    // SAFETY: the kernel writes every output element (all t rows of every head, all d).
    let mut out = unsafe { alloc_uninit::<bf16>(&device, b * t * heads * d) }?;
    let (t_arg, heads_arg, kv_arg) = (
        int(t, "sequence length")?,
        int(heads, "head count")?,
        int(kv_heads, "key/value head count")?,
    );
    let scale = scale_log2(d);
    let (q_s, q_l) = q.storage_and_layout();
    let (k_s, k_l) = k.storage_and_layout();
    let (v_s, v_l) = v.storage_and_layout();
    let (q_v, k_v, v_v) = (
        view::<bf16>(&q_s, q_l)?,
        view::<bf16>(&k_s, k_l)?,
        view::<bf16>(&v_s, v_l)?,
    );
    let mut builder = kernel.builder();
    builder
        .arg(&q_v)
        .arg(&k_v)
        .arg(&v_v)
        .arg(&mut out)
        .arg(&t_arg)
        .arg(&heads_arg)
        .arg(&kv_arg)
        .arg(&scale);
    let grid = config((t.div_ceil(ROWS_PER_BLOCK), b * heads), THREADS)?;
    // SAFETY: the arguments of the kernel `name` in attention.cu, in order, with q, k and v
    // of the shapes it states (contiguous) and an output of b·t·heads·d elements; the grid is
    // one block of THREADS threads per 64 query rows of each (batch row, head).
    unsafe { launch(&mut builder, grid) }?;
    Ok(Some(wrap(out, &device, (b, t, heads * d))))
}
