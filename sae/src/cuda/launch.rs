//! Launching the kernels of `kernels.cu` on candle's CUDA tensors. Each function returns
//! `None` when its inputs are not on a CUDA device in a dtype the kernels take (f32, and
//! bf16 for the forward kernels), so the callers in `kernels.rs` fall back to their other
//! paths.

use candle_core::cuda_backend::cudarc::driver::{
    DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};
use half::bf16;
use hooks::cuda_kernels::launch::{
    alloc, alloc_uninit, arg_or_null, config, cuda_device, function, int, optional_view, view,
    with_views, wrap, write_in_place,
};

use super::{backward_with, encode_select_with, Kernels, PicksByLatent, KERNELS, TOPK_MAX_K};
use crate::kernels::{Backward, GradSum, Picks, Selection};
use crate::{Error, Result};

/// Threads per block of the TopK, the sparse and the row kernels (TOPK_THREADS,
/// SPARSE_THREADS and ROW_THREADS in kernels.cu).
const THREADS: u32 = 256;
/// Threads of the one block that scans the pick counts (SCAN_THREADS in kernels.cu).
const SCAN_THREADS: u32 = 256;
/// Threads sharing one dot product in `gated_row_dots_f32` (DOT_LANES).
const DOT_LANES: u32 = 8;

fn launch(builder: &mut LaunchArgs, config: LaunchConfig) -> Result<()> {
    // SAFETY: every caller pushes the arguments of the named kernel in kernels.cu, in order,
    // with buffers of the sizes its comment states, and sizes the grid as it states.
    Ok(unsafe { hooks::cuda_kernels::launch::launch(builder, config) }?)
}

/// The `k` largest entries of each row of `pre: [N, n]` plus `bias: [n]` (added in `pre`'s
/// dtype; of the ReLU when `relu`), among the latents with a nonzero `allowed: [n]` u8 mask
/// when given: `(values [N, k], indices [N, k] u32)` by decreasing value, ties by increasing
/// index.
pub(crate) fn topk(
    pre: &Tensor,
    bias: Option<&Tensor>,
    k: usize,
    allowed: Option<&Tensor>,
    relu: bool,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(device) = cuda_device(pre) else {
        return Ok(None);
    };
    let (rows, n) = pre.dims2()?;
    if k == 0 || k > n || k > TOPK_MAX_K || rows == 0 {
        return Ok(None);
    }
    if bias.is_some_and(|b| b.dtype() != pre.dtype()) {
        return Ok(None);
    }
    for (what, vector) in [("bias", bias), ("allowed-latent mask", allowed)] {
        if let Some(vector) = vector.filter(|v| v.dims() != [n]) {
            return Err(Error::Cuda(format!(
                "topk: the {what} has shape {:?}, expected [{n}] for rows of {n} latents",
                vector.dims()
            )));
        }
    }
    let selection = Selecting {
        pre,
        bias,
        k,
        allowed,
        relu,
    };
    match pre.dtype() {
        DType::F32 => topk_typed::<f32>(&device, &selection, "topk_f32").map(Some),
        DType::BF16 => topk_typed::<bf16>(&device, &selection, "topk_bf16").map(Some),
        _ => Ok(None),
    }
}

/// The arguments of one TopK launch (see [`topk`]).
struct Selecting<'a> {
    pre: &'a Tensor,
    bias: Option<&'a Tensor>,
    k: usize,
    allowed: Option<&'a Tensor>,
    relu: bool,
}

fn topk_typed<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    selecting: &Selecting,
    name: &str,
) -> Result<(Tensor, Tensor)> {
    let Selecting {
        pre,
        bias,
        k,
        allowed,
        relu,
    } = *selecting;
    let (rows, n) = pre.dims2()?;
    let func = function(&KERNELS, device, name)?;
    // SAFETY: the kernel writes all k picks of every row.
    let (mut values, mut indices) = unsafe {
        (
            alloc_uninit::<T>(device, rows * k)?,
            alloc_uninit::<u32>(device, rows * k)?,
        )
    };
    let (n_arg, k_arg, relu_arg) = (int(n, "width")?, int(k, "k")?, i32::from(relu));
    let pre = pre.contiguous()?;
    let (pre_storage, pre_layout) = pre.storage_and_layout();
    let pre_view = view::<T>(&pre_storage, pre_layout)?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_view = optional_view::<T>(&bias_guard)?;
    let mask = allowed
        .map(|m| m.to_dtype(DType::U8)?.contiguous())
        .transpose()?;
    let mask_guard = mask.as_ref().map(|m| m.storage_and_layout());
    let mask_view = optional_view::<u8>(&mask_guard)?;
    let mut builder = func.builder();
    builder.arg(&pre_view);
    arg_or_null(&mut builder, bias_view.as_ref());
    arg_or_null(&mut builder, mask_view.as_ref());
    builder
        .arg(&n_arg)
        .arg(&k_arg)
        .arg(&relu_arg)
        .arg(&mut values)
        .arg(&mut indices);
    launch(&mut builder, config((rows, 1), THREADS)?)?;
    Ok((
        wrap(values, device, (rows, k)),
        wrap(indices, device, (rows, k)),
    ))
}

/// `bias + Σ_j coef[t, j] · rows[indices[t, j]]` for every token `t`: `[N, d]` (the sparse
/// decode with `rows = W_dec`, `bias = b_dec`). All of one float dtype, indices u32.
pub(crate) fn combine_rows(
    coef: &Tensor,
    indices: &Tensor,
    rows: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(rows) else {
        return Ok(None);
    };
    let dtype = rows.dtype();
    if indices.dtype() != DType::U32
        || coef.dtype() != dtype
        || bias.is_some_and(|b| b.dtype() != dtype)
    {
        return Ok(None);
    }
    match dtype {
        DType::F32 => combine_typed::<f32>(&device, coef, indices, rows, bias, "combine_rows_f32"),
        DType::BF16 => {
            combine_typed::<bf16>(&device, coef, indices, rows, bias, "combine_rows_bf16")
        }
        _ => return Ok(None),
    }
    .map(Some)
}

fn combine_typed<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    coef: &Tensor,
    indices: &Tensor,
    rows: &Tensor,
    bias: Option<&Tensor>,
    name: &str,
) -> Result<Tensor> {
    let (tokens, k) = coef.dims2()?;
    let d = rows.dim(1)?;
    let func = function(&KERNELS, device, name)?;
    // SAFETY: one thread per (token, column) writes every element.
    let mut out = unsafe { alloc_uninit::<T>(device, tokens * d) }?;
    let (k_arg, d_arg) = (int(k, "k")?, int(d, "width")?);
    let (coef, indices, rows) = (
        coef.contiguous()?,
        indices.contiguous()?,
        rows.contiguous()?,
    );
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let (coef_s, coef_l) = coef.storage_and_layout();
    let (idx_s, idx_l) = indices.storage_and_layout();
    let (rows_s, rows_l) = rows.storage_and_layout();
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_view = optional_view::<T>(&bias_guard)?;
    let (coef_v, idx_v, rows_v) = (
        view::<T>(&coef_s, coef_l)?,
        view::<u32>(&idx_s, idx_l)?,
        view::<T>(&rows_s, rows_l)?,
    );
    let mut builder = func.builder();
    builder.arg(&coef_v).arg(&idx_v).arg(&rows_v);
    arg_or_null(&mut builder, bias_view.as_ref());
    builder.arg(&k_arg).arg(&d_arg).arg(&mut out);
    let column_blocks = d.div_ceil(THREADS as usize);
    launch(&mut builder, config((tokens, column_blocks), THREADS)?)?;
    Ok(wrap(out, device, (tokens, d)))
}

/// Encodes `xc: [N, d]` on a CUDA device (cuBLAS for the dense product, our TopK for the
/// selections), as `kernels::encode_select` does on the CPU.
pub(crate) fn encode_select(
    xc: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    picks: Picks,
) -> Result<Option<(Selection, Option<Selection>)>> {
    let Some(device) = cuda_device(xc) else {
        return Ok(None);
    };
    let k_max = picks.dead.map_or(picks.k, |(_, k_aux)| k_aux.max(picks.k));
    if !matches!(xc.dtype(), DType::F32 | DType::BF16) || k_max > TOPK_MAX_K {
        return Ok(None);
    }
    encode_select_with(&Launcher(device), xc, w_enc, b_enc, picks).map(Some)
}

/// Adds the gradients `[W_enc, b_enc, W_dec, b_dec]` of `kernels::backward` to `sum` on a
/// CUDA device in f32, the large ones in place (a latent's picks are summed in the order the
/// counting sort's atomics leave them, so the last bits vary by run). `false` when the
/// inputs are not CUDA f32 tensors.
pub(crate) fn backward(b: &Backward, sum: &mut GradSum) -> Result<bool> {
    let Some(device) = cuda_device(b.w_dec) else {
        return Ok(false);
    };
    let f32_inputs = [b.target, b.xc, b.acts, b.x_hat, b.w_enc, b.w_dec];
    if b.indices.dtype() != DType::U32 || f32_inputs.iter().any(|t| t.dtype() != DType::F32) {
        return Ok(false);
    }
    *sum = GradSum::Tensors(backward_with(&Launcher(device), b, sum.take()?)?);
    Ok(true)
}

/// The kernels launched on one CUDA device.
pub(crate) struct Launcher(pub(crate) CudaDevice);

impl Kernels for Launcher {
    fn topk(
        &self,
        pre: &Tensor,
        bias: Option<&Tensor>,
        k: usize,
        allowed: Option<&Tensor>,
        relu: bool,
    ) -> Result<(Tensor, Tensor)> {
        topk(pre, bias, k, allowed, relu)?.ok_or_else(|| unsupported("topk", pre))
    }

    fn sort_by_latent(&self, indices: &Tensor, n: usize) -> Result<PicksByLatent> {
        sort_by_latent(&self.0, indices, n)
    }

    fn gated_row_dots(
        &self,
        picks: &PicksByLatent,
        g: &Tensor,
        rows: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor> {
        gated_row_dots(&self.0, picks, g, rows, gate)
    }

    fn add_rows(
        &self,
        picks: &PicksByLatent,
        coefs: [&Tensor; 2],
        vectors: [&Tensor; 2],
        sums: [Tensor; 2],
    ) -> Result<[Tensor; 2]> {
        add_rows(&self.0, picks, coefs, vectors, &sums)?;
        Ok(sums)
    }

    fn scatter_scalars(&self, coef: &Tensor, indices: &Tensor, sum: Tensor) -> Result<Tensor> {
        scatter_scalars(&self.0, coef, indices, &sum)?;
        Ok(sum)
    }
}

fn unsupported(kernel: &str, t: &Tensor) -> Error {
    Error::Cuda(format!(
        "the {kernel} kernel cannot take a {:?} tensor of shape {:?} on {:?}",
        t.dtype(),
        t.dims(),
        t.device().location()
    ))
}

/// The picks of `indices: [N, k]` grouped by latent (count, scan, place).
fn sort_by_latent(device: &CudaDevice, indices: &Tensor, n: usize) -> Result<PicksByLatent> {
    let (tokens, k) = indices.dims2()?;
    let count = tokens * k;
    let count_arg = count as i64;
    let pick_blocks = config((count.div_ceil(THREADS as usize), 1), THREADS)?;
    let indices = indices.contiguous()?;
    let (idx_s, idx_l) = indices.storage_and_layout();
    let idx_v = view::<u32>(&idx_s, idx_l)?;
    let mut counts = alloc::<u32>(device, n)?;
    let func = function(&KERNELS, device, "count_picks")?;
    let mut builder = func.builder();
    builder.arg(&idx_v).arg(&count_arg).arg(&mut counts);
    launch(&mut builder, pick_blocks)?;
    // SAFETY: scan_counts writes all n + 1 offsets.
    let mut offsets = unsafe { alloc_uninit::<u32>(device, n + 1) }?;
    let func = function(&KERNELS, device, "scan_counts")?;
    let n_arg = int(n, "latent count")?;
    let mut builder = func.builder();
    builder.arg(&counts).arg(&n_arg).arg(&mut offsets);
    launch(&mut builder, config((1, 1), SCAN_THREADS)?)?;
    let mut cursor = alloc::<u32>(device, n)?;
    // SAFETY: place_picks writes every one of the `count` slots (the offsets partition them).
    let mut order = unsafe { alloc_uninit::<u32>(device, count) }?;
    let func = function(&KERNELS, device, "place_picks")?;
    let mut builder = func.builder();
    builder
        .arg(&idx_v)
        .arg(&count_arg)
        .arg(&offsets)
        .arg(&mut cursor)
        .arg(&mut order);
    launch(&mut builder, pick_blocks)?;
    Ok(PicksByLatent {
        offsets: wrap(offsets, device, n + 1),
        order: wrap(order, device, count),
        shape: (tokens, k),
    })
}

/// Checks that `t` is an f32 tensor of `shape`, naming `what` of `kernel` otherwise.
fn check_f32(t: &Tensor, shape: &[usize], what: &str, kernel: &str) -> Result<()> {
    if t.dims() != shape || t.dtype() != DType::F32 {
        return Err(Error::Cuda(format!(
            "{kernel}: the {what} are a {:?} tensor of shape {:?}, expected f32 {shape:?}",
            t.dtype(),
            t.dims()
        )));
    }
    Ok(())
}

/// `out[t, j] = <g[t], rows[indices[t, j]]>` where `gate[t, j] > 0`, else 0: `[N, k]` f32,
/// one block per latent.
fn gated_row_dots(
    device: &CudaDevice,
    picks: &PicksByLatent,
    g: &Tensor,
    rows: &Tensor,
    gate: &Tensor,
) -> Result<Tensor> {
    let (tokens, k) = picks.shape;
    let (n, d) = rows.dims2()?;
    let kernel = "gated_dots_by_latent";
    check_f32(g, &[tokens, d], "input gradients", kernel)?;
    check_f32(rows, &[n, d], "rows", kernel)?;
    check_f32(gate, &[tokens, k], "gates", kernel)?;
    let func = function(&KERNELS, device, kernel)?;
    // SAFETY: every pick belongs to one latent, whose block writes its entry.
    let mut out = unsafe { alloc_uninit::<f32>(device, tokens * k) }?;
    let (k_arg, d_arg) = (int(k, "k")?, int(d, "width")?);
    let (g, rows, gate) = (g.contiguous()?, rows.contiguous()?, gate.contiguous()?);
    let (off_s, off_l) = picks.offsets.storage_and_layout();
    let (ord_s, ord_l) = picks.order.storage_and_layout();
    let (g_s, g_l) = g.storage_and_layout();
    let (rows_s, rows_l) = rows.storage_and_layout();
    let (gate_s, gate_l) = gate.storage_and_layout();
    let mut builder = func.builder();
    let (off_v, ord_v) = (view::<u32>(&off_s, off_l)?, view::<u32>(&ord_s, ord_l)?);
    let (g_v, rows_v, gate_v) = (
        view::<f32>(&g_s, g_l)?,
        view::<f32>(&rows_s, rows_l)?,
        view::<f32>(&gate_s, gate_l)?,
    );
    builder
        .arg(&off_v)
        .arg(&ord_v)
        .arg(&k_arg)
        .arg(&d_arg)
        .arg(&g_v)
        .arg(&rows_v)
        .arg(&gate_v)
        .arg(&mut out);
    debug_assert_eq!(THREADS % DOT_LANES, 0);
    launch(&mut builder, config((n, 1), THREADS)?)?;
    Ok(wrap(out, device, (tokens, k)))
}

/// `sums[m][indices[t, j]] += coefs[m][t, j] · vectors[m][t]` for m = 0, 1, in place in the
/// `[n, d]` f32 sums: one block per latent adds its picks to both rows.
fn add_rows(
    device: &CudaDevice,
    picks: &PicksByLatent,
    coefs: [&Tensor; 2],
    vectors: [&Tensor; 2],
    sums: &[Tensor; 2],
) -> Result<()> {
    let (tokens, k) = picks.shape;
    let (n, d) = sums[0].dims2()?;
    let kernel = "add_rows_by_latent";
    for sum in sums {
        check_sum(sum, &[n, d], kernel)?;
    }
    for coef in coefs {
        check_f32(coef, &[tokens, k], "coefficients", kernel)?;
    }
    for vector in vectors {
        check_f32(vector, &[tokens, d], "vectors", kernel)?;
    }
    let (k_arg, d_arg) = (int(k, "k")?, int(d, "width")?);
    let (off_s, off_l) = picks.offsets.storage_and_layout();
    let (ord_s, ord_l) = picks.order.storage_and_layout();
    let (offsets, order) = (view::<u32>(&off_s, off_l)?, view::<u32>(&ord_s, ord_l)?);
    let func = function(&KERNELS, device, kernel)?;
    let inputs = [coefs[0], vectors[0], coefs[1], vectors[1]];
    with_views::<f32, _, Error>(&inputs, |views| {
        // The rows, in place.
        write_in_place::<f32, Error>(&sums[0], |sum_a| {
            write_in_place::<f32, Error>(&sums[1], |sum_b| {
                let mut builder = func.builder();
                builder
                    .arg(&offsets)
                    .arg(&order)
                    .arg(&k_arg)
                    .arg(&d_arg)
                    .arg(&views[0])
                    .arg(&views[1])
                    .arg(sum_a)
                    .arg(&views[2])
                    .arg(&views[3])
                    .arg(sum_b);
                launch(&mut builder, config((n, 1), THREADS)?)
            })
            .map_err(Error::from)
        })
        .map_err(Error::from)
    })
}

/// `sum[indices[p]] += coef[p]` over all `N · k` picks, in place in the `[n]` f32 `sum`.
fn scatter_scalars(
    device: &CudaDevice,
    coef: &Tensor,
    indices: &Tensor,
    sum: &Tensor,
) -> Result<()> {
    let count = coef.elem_count();
    check_sum(sum, &[sum.dim(0)?], "scatter_scalars")?;
    let func = function(&KERNELS, device, "scatter_scalars_f32")?;
    let count_arg = count as i64;
    let (coef, indices) = (coef.contiguous()?, indices.contiguous()?);
    let (coef_s, coef_l) = coef.storage_and_layout();
    let (idx_s, idx_l) = indices.storage_and_layout();
    let (coef_v, idx_v) = (view::<f32>(&coef_s, coef_l)?, view::<u32>(&idx_s, idx_l)?);
    write_in_place::<f32, Error>(sum, |out| {
        let mut builder = func.builder();
        builder.arg(&coef_v).arg(&idx_v).arg(&count_arg).arg(out);
        launch(
            &mut builder,
            config((count.div_ceil(THREADS as usize), 1), THREADS)?,
        )
    })
    .map_err(Error::from)
}

/// A running sum a scatter kernel adds into: contiguous f32 of `shape`, else an error
/// naming the kernel.
fn check_sum(sum: &Tensor, shape: &[usize], kernel: &str) -> Result<()> {
    if sum.dtype() != DType::F32 || sum.dims() != shape || !sum.is_contiguous() {
        return Err(Error::Cuda(format!(
            "{kernel}: the running sum is a {:?} tensor of shape {:?}, expected contiguous f32 {shape:?}",
            sum.dtype(),
            sum.dims()
        )));
    }
    Ok(())
}

/// Each row of the `[n, d]` f32 `w` scaled to unit norm (`kernels::unit_rows`), or `None`
/// unless `w` is an f32 CUDA tensor.
pub(crate) fn unit_rows(w: &Tensor) -> Result<Option<Tensor>> {
    row_pass("unit_rows_f32", &[w])
}

/// Each row of `grad` minus its component along the same row of the unit-norm `w_dec`
/// (`kernels::remove_parallel`), or `None` unless both are f32 CUDA tensors.
pub(crate) fn remove_parallel(grad: &Tensor, w_dec: &Tensor) -> Result<Option<Tensor>> {
    row_pass("remove_parallel_f32", &[grad, w_dec])
}

/// Runs the row kernel `name` (one block per row) on `inputs`, all `[n, d]`: a fresh
/// `[n, d]` tensor.
fn row_pass(name: &str, inputs: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(device) = cuda_device(inputs[0]) else {
        return Ok(None);
    };
    if inputs
        .iter()
        .any(|t| t.dtype() != DType::F32 || !t.device().same_device(inputs[0].device()))
    {
        return Ok(None);
    }
    let (n, d) = inputs[0].dims2()?;
    if let Some(other) = inputs.iter().find(|t| t.dims() != [n, d]) {
        return Err(Error::Cuda(format!(
            "{name}: inputs of shapes [{n}, {d}] and {:?}",
            other.dims()
        )));
    }
    let func = function(&KERNELS, &device, name)?;
    let d_arg = int(d, "width")?;
    with_views::<f32, _, Error>(inputs, |views| {
        // SAFETY: one block per row writes every element of its row.
        let mut out = unsafe { alloc_uninit::<f32>(&device, n * d) }?;
        let mut builder = func.builder();
        for input in views {
            builder.arg(input);
        }
        builder.arg(&d_arg).arg(&mut out);
        launch(&mut builder, config((n, 1), THREADS)?)?;
        Ok(Some(wrap(out, &device, (n, d))))
    })
}
