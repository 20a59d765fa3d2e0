//! How far apart two tensors are (activations, logits, weights), whatever their devices and
//! float dtypes: the figures parity checks against a reference report.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// `max |a − b|` over all elements, computed in f64 on the CPU (exact for f32 and narrower
/// inputs, so tight tolerances on f64 tensors stay meaningful). The shapes must be equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = (f64_on_cpu(a)? - f64_on_cpu(b)?)?.abs()?.max_all()?;
    Ok(diff.to_scalar::<f64>()?)
}

/// `max |a − b| / max |b|`: the error of `a` relative to the scale of the reference `b`
/// (`b`'s scale taken as at least 1e-12, so an all-zero reference gives a large error, not
/// NaN).
pub fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let b = f64_on_cpu(b)?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(max_abs_diff(a, &b)? / scale.max(1e-12))
}

fn f64_on_cpu(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F64)
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
        // In f64: a difference far below f32's resolution at 1.0 is still seen.
        let c = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let d = (&c + 1e-13).unwrap();
        let tiny = max_abs_diff(&c, &d).unwrap();
        assert!(tiny > 0.0 && tiny < 1e-12, "{tiny}");
        let zeros = b.zeros_like().unwrap();
        assert!(relative_error(&a, &zeros).unwrap() > 1e12);
        let err = max_abs_diff(&a, &b.flatten_all().unwrap()).unwrap_err();
        assert!(err.to_string().contains("shape mismatch"), "{err}");
    }
}
