//! Launching the fused GPT-NeoX kernels on candle's CUDA tensors.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor, D};
use half::bf16;

use super::KERNELS;
use crate::cuda_kernels::launch::{
    alloc_uninit, arg_or_null, config, cuda_device, function, int, launch, optional_view, view,
    wrap,
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
    elementwise("bias_gelu_bf16", &[x], &[bias])
}

/// Runs the grid-stride element-wise kernel `name`, whose arguments are the bf16 `inputs`
/// (all of one shape `[.., cols]`), then the `[cols]` `biases` (null when absent), `cols`,
/// the element count and the output (of the inputs' shape); `None` when the inputs are not
/// bf16 CUDA tensors of one shape with fitting biases.
fn elementwise(
    name: &str,
    inputs: &[&Tensor],
    biases: &[Option<&Tensor>],
) -> Result<Option<Tensor>> {
    let first = inputs[0];
    let Some(device) = cuda_device(first).filter(|_| enabled_for(first)) else {
        return Ok(None);
    };
    let cols = first.dim(D::Minus1)?;
    let fits = inputs
        .iter()
        .all(|x| x.dtype() == DType::BF16 && x.dims() == first.dims())
        && biases
            .iter()
            .all(|b| b.is_none_or(|b| b.dtype() == DType::BF16 && b.dims() == [cols]));
    if !fits {
        return Ok(None);
    }
    let count = first.elem_count();
    let inputs = inputs
        .iter()
        .map(|x| x.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let biases = biases
        .iter()
        .map(|b| b.map(Tensor::contiguous).transpose())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let kernel = function(&KERNELS, &device, name)?;
    // SAFETY: the grid-stride loop writes every one of the `count` elements.
    let mut out = unsafe { alloc_uninit::<bf16>(&device, count) }?;
    let guards: Vec<_> = inputs.iter().map(|x| x.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(|(storage, layout)| view::<bf16>(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    let bias_guards: Vec<_> = biases
        .iter()
        .map(|b| b.as_ref().map(|b| b.storage_and_layout()))
        .collect();
    let bias_views = bias_guards
        .iter()
        .map(optional_view::<bf16>)
        .collect::<Result<Vec<_>>>()?;
    let (cols_arg, count_arg) = (int(cols, "width")?, count as i64);
    let mut builder = kernel.builder();
    for input in &views {
        builder.arg(input);
    }
    for bias in &bias_views {
        arg_or_null(&mut builder, bias.as_ref());
    }
    builder.arg(&cols_arg).arg(&count_arg).arg(&mut out);
    let blocks = count.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
    // SAFETY: the kernel's arguments in the order stated above; inputs and output hold
    // `count` elements, each bias `cols` (or is null).
    unsafe { launch(&mut builder, config((blocks, 1), THREADS)?) }?;
    Ok(Some(wrap(out, &device, first.shape().clone())))
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
    let bias_v = optional_view::<bf16>(&bias_guard)?;
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
    arg_or_null(&mut builder, bias_v.as_ref());
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
    elementwise("parallel_residual_bf16", &[h, a, m], &[a_bias, m_bias])
}

/// LayerNorm over the last dimension of bf16 `x: [.., cols]` with bf16 `weight` and `bias`
/// (`[cols]`) on a CUDA GPU, the variance taken of the differences from the mean, or `None`
/// when the kernel does not apply.
pub(crate) fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(x).filter(|_| enabled_for(x)) else {
        return Ok(None);
    };
    let cols = x.dim(D::Minus1)?;
    let fits = |p: &Tensor| p.dtype() == DType::BF16 && p.dims() == [cols];
    if cols == 0 || !fits(weight) || !fits(bias) {
        return Ok(None);
    }
    let rows = x.elem_count() / cols;
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let kernel = function(&KERNELS, &device, "layer_norm_bf16")?;
    // SAFETY: one block per row writes all of its `cols` elements.
    let mut out = unsafe { alloc_uninit::<bf16>(&device, rows * cols) }?;
    let (x_s, x_l) = x.storage_and_layout();
    let (w_s, w_l) = weight.storage_and_layout();
    let (b_s, b_l) = bias.storage_and_layout();
    let (x_v, w_v, b_v) = (
        view::<bf16>(&x_s, x_l)?,
        view::<bf16>(&w_s, w_l)?,
        view::<bf16>(&b_s, b_l)?,
    );
    let (cols_arg, eps_arg) = (int(cols, "width")?, eps as f32);
    let mut builder = kernel.builder();
    builder
        .arg(&x_v)
        .arg(&w_v)
        .arg(&b_v)
        .arg(&cols_arg)
        .arg(&eps_arg)
        .arg(&mut out);
    // SAFETY: layer_norm_bf16's arguments in order, x and out of rows·cols elements, weight
    // and bias of cols; one block of THREADS threads per row.
    unsafe { launch(&mut builder, config((rows, 1), THREADS)?) }?;
    Ok(Some(wrap(out, &device, x.shape().clone())))
}
