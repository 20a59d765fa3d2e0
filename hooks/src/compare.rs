//! How far apart two tensors are (activations, logits, weights), whatever their devices and
//! float dtypes: the figures parity checks against a reference report.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// `max |a − b|` over all elements, computed in f32 on the CPU. The shapes must be equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let f32_on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
    let diff = (f32_on_cpu(a)? - f32_on_cpu(b)?)?.abs()?.max_all()?;
    Ok(diff.to_scalar::<f32>()?)
}

/// `max |a − b| / max |b|`: the error of `a` relative to the scale of the reference `b`
/// (`b`'s scale taken as at least 1e-12, so an all-zero reference gives a large error, not
/// NaN).
pub fn relative_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    Ok(max_abs_diff(a, b)? / scale.max(1e-12))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_across_dtypes_and_shapes() {
        let a = Tensor::new(&[[1.0f32, -2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1.5f32, -2.0], [3.0, 2.0]], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 2.0);
        assert_eq!(relative_error(&a, &b).unwrap(), 2.0 / 3.0);
        let a16 = a.to_dtype(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&a16, &b).unwrap(), 2.0);
        let zeros = b.zeros_like().unwrap();
        assert!(relative_error(&a, &zeros).unwrap() > 1e12);
        let err = max_abs_diff(&a, &b.flatten_all().unwrap()).unwrap_err();
        assert!(err.to_string().contains("shape mismatch"), "{err}");
    }
}
