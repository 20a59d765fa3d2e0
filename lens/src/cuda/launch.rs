//! Launching the fused loss kernels of `kernels.cu` on candle's CUDA tensors.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Tensor};
use half::bf16;
use hooks::cuda_kernels::launch::{alloc_uninit, config, cuda_device, function, int, view, wrap};

use super::{loss_and_logit_grad_with, LossKernels, KERNELS};
use crate::loss::Target;
use crate::{Error, Result};

/// Threads per block (LOSS_THREADS in kernels.cu).
const THREADS: u32 = 256;

/// [`super::loss_and_logit_grad`] on a CUDA device.
pub(super) fn loss_and_logit_grad(
    logits: &Tensor,
    target: &Target,
) -> Result<Option<(f64, usize, Tensor)>> {
    launcher_for(logits)?
        .map(|launcher| loss_and_logit_grad_with(&launcher, logits, target))
        .transpose()
}

/// [`super::log_softmax`] on a CUDA device.
pub(super) fn log_softmax(logits: &Tensor) -> Result<Option<Tensor>> {
    launcher_for(logits)?
        .map(|launcher| launcher.log_softmax(logits))
        .transpose()
}

/// The kernels on the device of `logits`, when they take them: non-empty f32 or bf16 rows
/// on a CUDA device.
fn launcher_for(logits: &Tensor) -> Result<Option<Launcher>> {
    let takes = matches!(logits.dtype(), DType::F32 | DType::BF16) && logits.dim(0)? > 0;
    Ok(cuda_device(logits).filter(|_| takes).map(Launcher))
}

/// The kernels launched on one CUDA device.
pub(super) struct Launcher(pub(super) CudaDevice);

impl LossKernels for Launcher {
    fn log_softmax(&self, logits: &Tensor) -> Result<Tensor> {
        match logits.dtype() {
            DType::BF16 => log_softmax_typed::<bf16>(&self.0, "lens_log_softmax_bf16", logits),
            _ => log_softmax_typed::<f32>(&self.0, "lens_log_softmax_f32", logits),
        }
    }

    fn kl(&self, logits: &Tensor, log_p: &Tensor) -> Result<(Tensor, Tensor)> {
        match logits.dtype() {
            DType::BF16 => row_loss::<bf16, f32>(&self.0, "lens_kl_bf16", logits, log_p),
            _ => row_loss::<f32, f32>(&self.0, "lens_kl_f32", logits, log_p),
        }
    }

    fn ce(&self, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
        match logits.dtype() {
            DType::BF16 => row_loss::<bf16, u32>(&self.0, "lens_ce_bf16", logits, targets),
            _ => row_loss::<f32, u32>(&self.0, "lens_ce_f32", logits, targets),
        }
    }
}

/// Launches `name(logits, target, vocab, loss, grad)`: one block per row of `logits`
/// (elements `T`), whose target is `target` (elements `U`: log-probabilities or ids).
fn row_loss<T, U>(
    device: &CudaDevice,
    name: &str,
    logits: &Tensor,
    target: &Tensor,
) -> Result<(Tensor, Tensor)>
where
    T: CudaDType + DeviceRepr + ValidAsZeroBits,
    U: CudaDType + DeviceRepr,
{
    let (rows, vocab) = logits.dims2()?;
    // log-probabilities of the logits' shape, or one id per row.
    let expected: &[usize] = if target.dtype() == DType::U32 {
        &[rows]
    } else {
        &[rows, vocab]
    };
    if target.dims() != expected {
        return Err(Error::Training(format!(
            "{name}: the target has shape {:?}, expected {expected:?} for logits [{rows}, {vocab}]",
            target.dims()
        )));
    }
    let kernel = function(&KERNELS, device, name)?;
    // SAFETY: the kernel writes every row's loss and every gradient element.
    let (mut loss, mut grad) = unsafe {
        (
            alloc_uninit::<f32>(device, rows)?,
            alloc_uninit::<T>(device, rows * vocab)?,
        )
    };
    let vocab_arg = int(vocab, "vocabulary size")?;
    let (logits, target) = (logits.contiguous()?, target.contiguous()?);
    let (logits_s, logits_l) = logits.storage_and_layout();
    let (target_s, target_l) = target.storage_and_layout();
    let (logits_v, target_v) = (
        view::<T>(&logits_s, logits_l)?,
        view::<U>(&target_s, target_l)?,
    );
    let mut builder = kernel.builder();
    builder
        .arg(&logits_v)
        .arg(&target_v)
        .arg(&vocab_arg)
        .arg(&mut loss)
        .arg(&mut grad);
    // SAFETY: the arguments of `name` in kernels.cu, in order: `rows × vocab` logits, a
    // target of `rows × vocab` log-probabilities or `rows` ids, `rows` losses and a
    // `rows × vocab` gradient; one block of THREADS threads per row.
    unsafe { hooks::cuda_kernels::launch::launch(&mut builder, config((rows, 1), THREADS)?) }?;
    Ok((wrap(loss, device, rows), wrap(grad, device, (rows, vocab))))
}

/// Launches `name(logits, vocab, log_p)`: one block per row of `logits` (elements `T`).
fn log_softmax_typed<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    name: &str,
    logits: &Tensor,
) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    let kernel = function(&KERNELS, device, name)?;
    // SAFETY: the kernel writes every element.
    let mut log_p = unsafe { alloc_uninit::<f32>(device, rows * vocab) }?;
    let vocab_arg = int(vocab, "vocabulary size")?;
    let logits = logits.contiguous()?;
    let (logits_s, logits_l) = logits.storage_and_layout();
    let logits_v = view::<T>(&logits_s, logits_l)?;
    let mut builder = kernel.builder();
    builder.arg(&logits_v).arg(&vocab_arg).arg(&mut log_p);
    // SAFETY: the arguments of `name` in kernels.cu, in order: `rows × vocab` logits and a
    // `rows × vocab` f32 output; one block of THREADS threads per row.
    unsafe { hooks::cuda_kernels::launch::launch(&mut builder, config((rows, 1), THREADS)?) }?;
    Ok(wrap(log_p, device, (rows, vocab)))
}
