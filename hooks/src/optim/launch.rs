//! The Adam update of `adam.cu` launched on candle's CUDA tensors.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::{DType, Tensor};

use super::{AdamScalars, ADAM_KERNEL};
use crate::cuda_kernels::launch::{
    alloc_uninit, arg_or_null, config, cuda_device, function, with_views, wrap,
};
use crate::Result;

/// Threads per block (ADAM_THREADS in adam.cu).
const THREADS: u32 = 256;
/// Blocks per launch: enough to fill any current GPU; the kernel strides over the rest.
const MAX_BLOCKS: usize = 4096;

/// [`super::adam_cpu`] on a CUDA device: one kernel pass, into fresh tensors. `None` unless
/// the parameter, its gradient and its state are float32 tensors on one CUDA device.
pub(super) fn adam_cuda(
    param: &Tensor,
    grad: &Tensor,
    state: &[Tensor],
    c: AdamScalars,
) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    let Some(device) = cuda_device(param) else {
        return Ok(None);
    };
    let tensors: Vec<&Tensor> = [param, grad].into_iter().chain(state).collect();
    if tensors
        .iter()
        .any(|t| t.dtype() != DType::F32 || !t.device().same_device(param.device()))
    {
        return Ok(None);
    }
    let count = param.elem_count();
    let amsgrad = state.len() == 3;
    let outputs = with_views::<f32, _, crate::Error>(&tensors, |inputs| {
        // SAFETY: the kernel writes every element of each output (its loop covers `count`).
        let mut outputs = (0..tensors.len() - 1)
            .map(|_| unsafe { alloc_uninit::<f32>(&device, count) })
            .collect::<Result<Vec<_>>>()?;
        let func = function(&ADAM_KERNEL, &device, "adam_f32")?;
        let (b1, b2, eps) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32);
        let (sqrt_bias2, step_size) = (c.bias2.sqrt() as f32, (c.lr / c.bias1) as f32);
        let count_arg = count as i64;
        let mut builder = func.builder();
        for input in &inputs[..4] {
            builder.arg(input);
        }
        arg_or_null(&mut builder, inputs.get(4));
        builder
            .arg(&count_arg)
            .arg(&b1)
            .arg(&b2)
            .arg(&eps)
            .arg(&sqrt_bias2)
            .arg(&step_size);
        for output in outputs.iter_mut() {
            builder.arg(output);
        }
        if !amsgrad {
            builder.arg(&0u64);
        }
        let blocks = count.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS);
        // SAFETY: the arguments are adam_f32's, in order; every buffer holds `count` floats.
        unsafe {
            crate::cuda_kernels::launch::launch(&mut builder, config((blocks, 1), THREADS)?)
        }?;
        Ok(outputs)
    })?;
    let shape = param.shape();
    let mut tensors = outputs
        .into_iter()
        .map(|slice| wrap(slice, &device, shape.clone()));
    let new_param = tensors.next().expect("the kernel writes the parameter");
    Ok(Some((new_param, tensors.collect())))
}
