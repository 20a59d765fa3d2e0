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

/// `mean |a − b| / mean |b|`: the typical error of `a` relative to the reference `b`, for
/// results where a few entries may legitimately stray (bf16 iterations that amplify
/// last-bit differences); `b`'s scale taken as at least 1e-12.
pub fn mean_relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    let b = f64_on_cpu(b)?;
    let diff = (f64_on_cpu(a)? - &b)?
        .abs()?
        .mean_all()?
        .to_scalar::<f64>()?;
    let scale = b.abs()?.mean_all()?.to_scalar::<f64>()?;
    Ok(diff / scale.max(1e-12))
}

/// Why `found` cannot take the place of `expected` (another dtype or shape), as "must be F32
/// [4, 4], got F16 [4, 4]"; `None` when it can. For tensors read from a file (a checkpoint)
/// that replace the ones a model, lens or optimiser holds.
pub fn layout_mismatch(expected: &Tensor, found: &Tensor) -> Option<String> {
    (expected.dtype() != found.dtype() || expected.dims() != found.dims()).then(|| {
        format!(
            "must be {:?} {:?}, got {:?} {:?}",
            expected.dtype(),
            expected.dims(),
            found.dtype(),
            found.dims()
        )
    })
}

/// The first element (flat index, `a`'s value, `b`'s value) where `|a − b|` exceeds
/// `relative · |b| + absolute`, or `None` when every element is within it: an element-wise
/// tolerance, for outputs whose small entries matter as much as their large ones.
pub fn first_outside(
    a: &Tensor,
    b: &Tensor,
    relative: f64,
    absolute: f64,
) -> Result<Option<(usize, f64, f64)>> {
    let a: Vec<f64> = f64_on_cpu(a)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = f64_on_cpu(b)?.flatten_all()?.to_vec1()?;
    if a.len() != b.len() {
        return Err(crate::Error::InvalidArgument(format!(
            "cannot compare {} elements with {}",
            a.len(),
            b.len()
        )));
    }
    Ok(a.iter()
        .zip(&b)
        .enumerate()
        .find(|(_, (x, y))| (*x - *y).abs() > relative * y.abs() + absolute)
        .map(|(i, (&x, &y))| (i, x, y)))
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
        assert_eq!(
            first_outside(&a, &b, 0.0, 0.5).unwrap(),
            Some((3, 4.0, 2.0))
        );
        assert_eq!(first_outside(&a, &b, 1.0, 0.5).unwrap(), None);
        assert!(first_outside(
            &a,
            &b.flatten_all().unwrap().narrow(0, 0, 3).unwrap(),
            0.0,
            0.0
        )
        .is_err());
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
