//! Helpers shared by the golden tests.

use hooks::candle_core::{DType, Tensor};

/// max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let actual = actual.to_dtype(DType::F32).unwrap();
    assert_eq!(actual.dims(), expected.dims());
    let diff = (&actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}
