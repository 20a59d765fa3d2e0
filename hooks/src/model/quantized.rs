//! Products with block-quantized weights (GGUF, [`crate::LoadOptions::quantized`]) on the CPU,
//! split between rayon's threads like every other kernel of the runtime.
//!
//! candle's own quantized product (`QMatMul`) hands its work to a second pool of threads that
//! spin while they wait; beside rayon's (which the rest of the pass uses) the two pools take
//! cores from each other: on 2 cores, SmolLM2 with Q8_0 weights generated 4.4 tokens/s
//! through it, and runs at the f32 rate through this driver (docs/benchmarks.md). The
//! arithmetic is that of candle's plain (not repacked) product: each row of activations is
//! quantized to the weight type's dot-product type ([`GgmlType::VecDotType`], 8-bit as
//! llama.cpp) and multiplied with candle's SIMD dot products. (candle also has repacked,
//! tiled kernels for a few types on some CPUs; they are not used here.)

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{GgmlDType, GgmlType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use rayon::prelude::*;

use crate::Result;

/// Output columns per task: a few KB of weight rows, so that the activation rows streamed
/// past them stay the only traffic.
const COLUMNS_PER_TASK: usize = 16;

/// A `[out, in]` block-quantized weight and the product `x W^T`.
pub(crate) struct QuantizedWeight {
    tensor: std::sync::Arc<QTensor>,
    /// candle's product, for inputs and types this module has no path for.
    fallback: QMatMul,
}

impl QuantizedWeight {
    pub fn new(tensor: std::sync::Arc<QTensor>) -> Self {
        // Kept quantized whatever candle's environment asks (it can dequantize every layer).
        let fallback = QMatMul::QTensor(std::sync::Arc::clone(&tensor));
        Self { tensor, fallback }
    }

    /// `x W^T` for `x: [..., in]` (f32).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (out, k) = self.tensor.shape().dims2()?;
        let fits = x.rank() >= 2 && x.dims().last() == Some(&k);
        if !x.device().is_cpu() || x.dtype() != DType::F32 || !fits {
            // candle's product, or its error for a misshapen input.
            return Ok(self.fallback.forward(&x)?);
        }
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / k.max(1);
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let Some(product) = own_product(&self.tensor, &values, rows, k)? else {
            return Ok(self.fallback.forward(&x)?);
        };
        let mut shape = dims;
        *shape.last_mut().expect("rank >= 2") = out;
        Ok(Tensor::from_vec(product, shape, x.device())?)
    }
}

/// `values` (`[rows, k]`) times the transpose of `tensor` (`[out, k]`), `None` for a type or
/// layout this module has no path for.
fn own_product(
    tensor: &QTensor,
    values: &[f32],
    rows: usize,
    k: usize,
) -> Result<Option<Vec<f32>>> {
    let out = tensor.shape().dims2()?.0;
    let bytes = tensor.data()?;
    Ok(match tensor.dtype() {
        GgmlDType::Q4_0 => rows_times::<BlockQ4_0>(values, rows, k, &bytes, out),
        GgmlDType::Q4_1 => rows_times::<BlockQ4_1>(values, rows, k, &bytes, out),
        GgmlDType::Q5_0 => rows_times::<BlockQ5_0>(values, rows, k, &bytes, out),
        GgmlDType::Q5_1 => rows_times::<BlockQ5_1>(values, rows, k, &bytes, out),
        GgmlDType::Q8_0 => rows_times::<BlockQ8_0>(values, rows, k, &bytes, out),
        GgmlDType::Q2K => rows_times::<BlockQ2K>(values, rows, k, &bytes, out),
        GgmlDType::Q3K => rows_times::<BlockQ3K>(values, rows, k, &bytes, out),
        GgmlDType::Q4K => rows_times::<BlockQ4K>(values, rows, k, &bytes, out),
        GgmlDType::Q5K => rows_times::<BlockQ5K>(values, rows, k, &bytes, out),
        GgmlDType::Q6K => rows_times::<BlockQ6K>(values, rows, k, &bytes, out),
        _ => None,
    })
}

/// `[rows, k]` f32 values times the transpose of `[out, k]` weights stored as blocks of `T`
/// (`bytes`, as candle holds them): `[rows, out]`. `None` when the bytes are not whole,
/// aligned blocks of `T` for that shape (then candle's product takes over).
fn rows_times<T: GgmlType + Sync>(
    values: &[f32],
    rows: usize,
    k: usize,
    bytes: &[u8],
    out: usize,
) -> Option<Vec<f32>> {
    if !k.is_multiple_of(T::BLCK_SIZE) || T::VecDotType::BLCK_SIZE != T::BLCK_SIZE {
        return None;
    }
    let blocks = k / T::BLCK_SIZE;
    let size = std::mem::size_of::<T>();
    if bytes.len() != out * blocks * size
        || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return None;
    }
    // SAFETY: `bytes` borrows candle's CPU storage of this tensor, a `Vec<T>` for the `T` the
    // caller matched on the tensor's type; its length and alignment are checked above, and
    // the block types are plain data (integers and halfs), valid for any bytes.
    let weight: &[T] = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), out * blocks) };
    let activations: Vec<Vec<T::VecDotType>> = values
        .par_chunks(k)
        .map(|row| {
            let mut quantized = vec![T::VecDotType::zeros(); blocks];
            T::VecDotType::from_float(row, &mut quantized);
            quantized
        })
        .collect();
    let column = |c: usize| &weight[c * blocks..(c + 1) * blocks];
    // Each task: every row against COLUMNS_PER_TASK columns, row-major within the task.
    let tasks: Vec<Vec<f32>> = (0..out.div_ceil(COLUMNS_PER_TASK))
        .into_par_iter()
        .map(|task| {
            let columns = task * COLUMNS_PER_TASK..((task + 1) * COLUMNS_PER_TASK).min(out);
            let mut sums = Vec::with_capacity(rows * columns.len());
            for row in &activations {
                let mut c = columns.start;
                while c + 4 <= columns.end {
                    let (a, b, d, e) = T::vec_dot_4(
                        k,
                        column(c),
                        column(c + 1),
                        column(c + 2),
                        column(c + 3),
                        row,
                    );
                    sums.extend([a, b, d, e]);
                    c += 4;
                }
                for c in c..columns.end {
                    sums.push(T::vec_dot(k, column(c), row));
                }
            }
            sums
        })
        .collect();
    let mut product = vec![0f32; rows * out];
    for (task, sums) in tasks.iter().enumerate() {
        let start = task * COLUMNS_PER_TASK;
        let width = sums.len() / rows.max(1);
        for (row, part) in sums.chunks(width.max(1)).enumerate() {
            product[row * out + start..row * out + start + width].copy_from_slice(part);
        }
    }
    Some(product)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same numbers as candle's `QMatMul` (the same quantized arithmetic) for every type
    /// with a dedicated path, at awkward sizes: rows 1, 3 and 7, columns not a multiple of 4
    /// or of a task's 16, batched leading dimensions.
    #[test]
    fn matches_candles_quantized_product() {
        let (out, k) = (37, 512);
        let weight: Vec<f32> = (0..out * k)
            .map(|i| ((i * 7919) % 2003) as f32 / 1000.0 - 1.0)
            .collect();
        let weight = Tensor::from_vec(weight, (out, k), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let tensor = std::sync::Arc::new(QTensor::quantize(&weight, dtype).unwrap());
            let ours = QuantizedWeight::new(std::sync::Arc::clone(&tensor));
            let candle = QMatMul::from_arc(tensor).unwrap();
            for shape in [vec![1, k], vec![3, k], vec![1, 7, k]] {
                let n: usize = shape.iter().product();
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 31) % 97) as f32 / 50.0 - 1.0)
                    .collect();
                let x = Tensor::from_vec(x, shape.as_slice(), &Device::Cpu).unwrap();
                let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    own_product(&ours.tensor, &values, n / k, k)
                        .unwrap()
                        .is_some(),
                    "{dtype:?}: no own path"
                );
                let (a, b) = (ours.product(&x).unwrap(), candle.forward(&x).unwrap());
                assert_eq!(a.dims(), b.dims(), "{dtype:?}");
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let diff = diff.to_scalar::<f32>().unwrap();
                assert!(
                    diff <= 1e-5 * scale,
                    "{dtype:?} {shape:?}: {diff} of {scale}"
                );
            }
            let misshapen = Tensor::zeros((2, k + 1), DType::F32, &Device::Cpu).unwrap();
            assert!(ours.product(&misshapen).is_err(), "{dtype:?}");
        }
    }
}
