//! Launching the fused GPT-NeoX kernels on candle's CUDA tensors.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor, D};
use half::bf16;

use super::KERNELS;
use crate::cuda_kernels::launch::{
    alloc_uninit, config, cuda_device, function, int, launch, view, wrap,
};
use crate::Result;

/// Threads per block (NEOX_THREADS in kernels.cu).
const THREADS: u32 = 128;
/// Blocks of the grid-stride element-wise kernel.
const MAX_BLOCKS: usize = 8192;

/// Whether the fused kernels may take the activations `x`: bf16 on a CUDA device, and not
/// turned off by `EI_FUSED_ELEMENTWISE=0`.
pub(crate) fn enabled_for(x: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == DType::BF16
        && std::env::var("EI_FUSED_ELEMENTWISE").map_or(true, |v| v != "0")
}

/// `gelu_erf(x + bias)` for bf16 `x: [.., cols]` and `bias: [cols]` on a CUDA GPU, or
/// `None` when the kernel does not apply.
pub(crate) fn bias_gelu(x: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(x).filter(|_| enabled_for(x)) else {
        return Ok(None);
    };
    let cols = x.dim(D::Minus1)?;
    if bias.is_some_and(|b| b.dtype() != DType::BF16 || b.dims() != [cols]) {
        return Ok(None);
    }
    let count = x.elem_count();
    let (x, bias) = (x.contiguous()?, bias.map(Tensor::contiguous).transpose()?);
    let kernel = function(&KERNELS, &device, "bias_gelu_bf16")?;
    // SAFETY: the grid-stride loop writes every one of the `count` elements.
    let mut out = unsafe { alloc_uninit::<bf16>(&device, count) }?;
    let (x_s, x_l) = x.storage_and_layout();
    let x_v = view::<bf16>(&x_s, x_l)?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_v = match &bias_guard {
        Some((storage, layout)) => Some(view::<bf16>(storage, layout)?),
        None => None,
    };
    let (cols_arg, count_arg) = (int(cols, "width")?, count as i64);
    let mut builder = kernel.builder();
    builder.arg(&x_v);
    match &bias_v {
        Some(b) => builder.arg(b),
        None => builder.arg(&0u64),
    };
    builder.arg(&cols_arg).arg(&count_arg).arg(&mut out);
    let blocks = count.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    // SAFETY: bias_gelu_bf16's arguments in order; x and out hold `count` elements, the bias
    // `cols` (or is null).
    unsafe { launch(&mut builder, config((blocks, 1), THREADS)?) }?;
    Ok(Some(wrap(out, &device, x.shape().clone())))
}

/// The attention inputs `(q, k, v)`, each `[b, heads, t, hd]`, from the bf16 fused product
/// `qkv: [b, t, heads * 3 * hd]` (bias not yet added; `bias: [heads * 3 * hd]`), with the
/// rotary embedding on the first `rot` dimensions of q and k from the `[t, rot / 2]` bf16
/// tables; `None` when the kernel does not apply.
pub(crate) fn qkv_rotary(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    heads: usize,
    rot: usize,
    (cos, sin): (&Tensor, &Tensor),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(device) = cuda_device(qkv).filter(|_| enabled_for(qkv)) else {
        return Ok(None);
    };
    let (b, t, width) = qkv.dims3()?;
    let hd = width / (3 * heads.max(1));
    let table_fits = |x: &Tensor| x.dtype() == DType::BF16 && x.dims() == [t, rot / 2];
    let fits = heads > 0
        && width == heads * 3 * hd
        && rot.is_multiple_of(2)
        && rot <= hd
        && table_fits(cos)
        && table_fits(sin)
        && bias.is_none_or(|x| x.dtype() == DType::BF16 && x.dims() == [width]);
    if !fits {
        return Ok(None);
    }
    let (qkv, bias) = (qkv.contiguous()?, bias.map(Tensor::contiguous).transpose()?);
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let kernel = function(&KERNELS, &device, "qkv_rotary_bf16")?;
    let count = b * heads * t * hd;
    // SAFETY: one block per (token, head) writes all hd elements of its q, k and v rows.
    let (mut q, mut k, mut v) = unsafe {
        (
            alloc_uninit::<bf16>(&device, count)?,
            alloc_uninit::<bf16>(&device, count)?,
            alloc_uninit::<bf16>(&device, count)?,
        )
    };
    let (qkv_s, qkv_l) = qkv.storage_and_layout();
    let qkv_v = view::<bf16>(&qkv_s, qkv_l)?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_v = match &bias_guard {
        Some((storage, layout)) => Some(view::<bf16>(storage, layout)?),
        None => None,
    };
    let (cos_s, cos_l) = cos.storage_and_layout();
    let (sin_s, sin_l) = sin.storage_and_layout();
    let (cos_v, sin_v) = (view::<bf16>(&cos_s, cos_l)?, view::<bf16>(&sin_s, sin_l)?);
    let sizes = [
        int(t, "sequence length")?,
        int(heads, "head count")?,
        int(hd, "head size")?,
        int(rot, "rotary dimensions")?,
    ];
    let mut builder = kernel.builder();
    builder.arg(&qkv_v);
    match &bias_v {
        Some(x) => builder.arg(x),
        None => builder.arg(&0u64),
    };
    builder.arg(&cos_v).arg(&sin_v);
    for size in &sizes {
        builder.arg(size);
    }
    builder.arg(&mut q).arg(&mut k).arg(&mut v);
    // SAFETY: qkv_rotary_bf16's arguments in order, with qkv of b·t·width elements, the
    // bias of width (or null), tables of t·rot/2 and outputs of b·heads·t·hd; one block of
    // THREADS threads per (token, head).
    unsafe { launch(&mut builder, config((b * t * heads, 1), THREADS)?) }?;
    let shape = (b, heads, t, hd);
    Ok(Some((
        wrap(q, &device, shape),
        wrap(k, &device, shape),
        wrap(v, &device, shape),
    )))
}

/// `h + (a + a_bias) + (m + m_bias)` for bf16 `h`, `a`, `m: [.., cols]` and biases `[cols]`
/// on a CUDA GPU (a parallel-residual block's output), or `None` when the kernel does not
/// apply.
pub(crate) fn parallel_residual(
    h: &Tensor,
    (a, a_bias): (&Tensor, Option<&Tensor>),
    (m, m_bias): (&Tensor, Option<&Tensor>),
) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(h).filter(|_| enabled_for(h)) else {
        return Ok(None);
    };
    let cols = h.dim(D::Minus1)?;
    let bias_fits =
        |b: Option<&Tensor>| b.is_none_or(|b| b.dtype() == DType::BF16 && b.dims() == [cols]);
    let fits = [a, m]
        .iter()
        .all(|x| x.dtype() == DType::BF16 && x.dims() == h.dims())
        && bias_fits(a_bias)
        && bias_fits(m_bias);
    if !fits {
        return Ok(None);
    }
    let count = h.elem_count();
    let (h, a, m) = (h.contiguous()?, a.contiguous()?, m.contiguous()?);
    let a_bias = a_bias.map(Tensor::contiguous).transpose()?;
    let m_bias = m_bias.map(Tensor::contiguous).transpose()?;
    let kernel = function(&KERNELS, &device, "parallel_residual_bf16")?;
    // SAFETY: the grid-stride loop writes every one of the `count` elements.
    let mut out = unsafe { alloc_uninit::<bf16>(&device, count) }?;
    let guards = [&h, &a, &m].map(|x| x.storage_and_layout());
    let views = guards
        .iter()
        .map(|(storage, layout)| view::<bf16>(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    let bias_guards = [&a_bias, &m_bias].map(|b| b.as_ref().map(|b| b.storage_and_layout()));
    let bias_views = bias_guards
        .iter()
        .map(|guard| match guard {
            Some((storage, layout)) => view::<bf16>(storage, layout).map(Some),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let (cols_arg, count_arg) = (int(cols, "width")?, count as i64);
    let mut builder = kernel.builder();
    builder.arg(&views[0]).arg(&views[1]);
    match &bias_views[0] {
        Some(b) => builder.arg(b),
        None => builder.arg(&0u64),
    };
    builder.arg(&views[2]);
    match &bias_views[1] {
        Some(b) => builder.arg(b),
        None => builder.arg(&0u64),
    };
    builder.arg(&cols_arg).arg(&count_arg).arg(&mut out);
    let blocks = count.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    // SAFETY: parallel_residual_bf16's arguments in order; h, a, m and out hold `count`
    // elements, each bias `cols` (or is null).
    unsafe { launch(&mut builder, config((blocks, 1), THREADS)?) }?;
    Ok(Some(wrap(out, &device, h.shape().clone())))
}
