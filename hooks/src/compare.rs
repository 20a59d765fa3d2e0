//! How far apart two tensors are (activations, logits, weights), whatever their devices and
//! float dtypes: the figures parity checks against a reference report.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// `max |a − b|` over all elements, computed in f64 on the CPU (exact for f32 and narrower
/// inputs, so tight tolerances on f64 tensors stay meaningful). The shapes must be equal.
/// NaN wherever either holds NaN, and infinite where one is infinite and the other not, so
/// that a check `max_abs_diff(..) < tolerance` fails on such output; equal infinities
/// (masked logits on both sides) are no difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok(largest(&differences(a, b)?))
}

/// `max |a − b| / max |b|`: the error of `a` relative to the scale of the reference `b`
/// (over its finite values, taken as at least 1e-12, so an all-zero reference gives a large
/// error, not NaN); NaN and infinities as for [`max_abs_diff`].
pub fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = largest(&finite_magnitudes(b)?);
    Ok(max_abs_diff(a, b)? / scale.max(1e-12))
}

/// `mean |a − b| / mean |b|`: the typical error of `a` relative to the reference `b`, for
/// results where a few entries may legitimately stray (bf16 iterations that amplify
/// last-bit differences); `b`'s scale, over its finite values, taken as at least 1e-12. NaN
/// and infinities as for [`max_abs_diff`].
pub fn mean_relative_difference(a: &Tensor, b: &Tensor) -> Result<f64> {
    let diff = differences(a, b)?;
    let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
    let scale = mean(&finite_magnitudes(b)?);
    Ok(mean(&diff) / scale.max(1e-12))
}

/// `|a − b|` element by element: 0 where they are equal (equal infinities included), NaN
/// where either is NaN. The shapes must be equal.
fn differences(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: a.shape().clone(),
            rhs: b.shape().clone(),
            op: "compare",
        }
        .into());
    }
    let (a, b) = (flat_f64(a)?, flat_f64(b)?);
    Ok(a.iter()
        .zip(&b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() })
        .collect())
}

/// The largest value, NaN if any is NaN (candle's `max_all` passes over a NaN after the
/// first element); 0 for none.
fn largest(values: &[f64]) -> f64 {
    values
        .iter()
        .fold(0.0, |m, &v| if v.is_nan() || v > m { v } else { m })
}

/// `|v|` for the finite values of `t`: a reference's scale, which a masked (infinite) entry
/// would otherwise make infinite, and every error relative to it zero.
fn finite_magnitudes(t: &Tensor) -> Result<Vec<f64>> {
    Ok(flat_f64(t)?
        .into_iter()
        .filter(|v| v.is_finite())
        .map(f64::abs)
        .collect())
}

fn flat_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(f64_on_cpu(t)?.flatten_all()?.to_vec1()?)
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
    let (a, b) = (flat_f64(a)?, flat_f64(b)?);
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
        // NaN or an infinity on either side is outside (a relative tolerance of an infinite
        // reference would take anything); equal infinities are not.
        .find(|(_, (x, y))| {
            x != y
                && (!x.is_finite()
                    || !y.is_finite()
                    || (*x - *y).abs() > relative * y.abs() + absolute)
        })
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

    #[test]
    fn nan_and_infinity_are_never_within_a_tolerance() {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let reference = t(&[1.0, 1.0, f32::NEG_INFINITY]);
        let nan = t(&[1.0, f32::NAN, f32::NEG_INFINITY]);
        assert!(max_abs_diff(&nan, &reference).unwrap().is_nan());
        assert!(relative_error(&nan, &reference).unwrap().is_nan());
        assert!(mean_relative_difference(&nan, &reference).unwrap().is_nan());
        assert_eq!(
            first_outside(&nan, &reference, 1.0, 1.0)
                .unwrap()
                .map(|o| o.0),
            Some(1)
        );
        let inf = t(&[1.0, f32::INFINITY, f32::NEG_INFINITY]);
        assert_eq!(max_abs_diff(&inf, &reference).unwrap(), f64::INFINITY);
        assert_eq!(
            first_outside(&inf, &reference, 1.0, 1.0)
                .unwrap()
                .map(|o| o.0),
            Some(1)
        );
        // A finite value where the reference is infinite is outside too, and an infinite
        // entry of the reference does not make its scale infinite.
        let finite = t(&[1.0, 1.0, 0.0]);
        assert_eq!(
            first_outside(&finite, &reference, 1.0, 1.0)
                .unwrap()
                .map(|o| o.0),
            Some(2)
        );
        assert_eq!(relative_error(&finite, &reference).unwrap(), f64::INFINITY);
        let masked = t(&[1.0, 2.0, f32::NEG_INFINITY]);
        assert_eq!(relative_error(&reference, &masked).unwrap(), 0.5);
        // Masked entries on both sides are equal, not NaN.
        assert_eq!(max_abs_diff(&reference, &reference).unwrap(), 0.0);
        assert_eq!(
            first_outside(&reference, &reference, 0.0, 0.0).unwrap(),
            None
        );
    }
}
