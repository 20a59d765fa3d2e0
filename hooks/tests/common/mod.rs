//! Helpers shared by the golden tests.

use hooks::candle_core::Tensor;

/// max |a - b| / max |b|: the error relative to the tensor's scale.
pub fn relative_error(actual: &Tensor, expected: &Tensor) -> f64 {
    hooks::compare::relative_error(actual, expected).unwrap()
}
