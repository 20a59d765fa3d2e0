//! The last step of a model, final norm then unembedding, as a value of its own: lenses
//! decode every layer's residual stream with it.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, TensorId, D};

use crate::cpu::bf16::{Kernel, PackedB};
use crate::cpu::{is_cpu_bf16, packed_transposed};
use crate::model::cpu_kernels::{linear, linear_bf16, through_f32};
use crate::model::layers::{layer_norm, rms_norm};
use crate::Result;

/// Rows of a bf16 unembedding widened to f32 at once where bf16 products are slower than
/// f32 ones on this CPU ([`Kernel::beats_f32`]).
const VOCABULARY_SLICE: usize = 8192;

/// The model's final normalisation.
#[derive(Debug, Clone)]
pub enum FinalNorm {
    /// LayerNorm with weight and bias (GPT-NeoX).
    Layer {
        /// Scale `[d]`.
        weight: Tensor,
        /// Shift `[d]`.
        bias: Tensor,
        /// Epsilon.
        eps: f64,
    },
    /// RMSNorm with weight (Llama family).
    Rms {
        /// Scale `[d]`.
        weight: Tensor,
        /// Epsilon.
        eps: f64,
    },
}

/// Final norm plus unembedding matrix (`[vocab, d]`), frozen.
#[derive(Debug, Clone)]
pub struct Unembedding {
    /// The final norm.
    pub norm: FinalNorm,
    /// The unembedding matrix, `[vocab, d]`.
    pub weight: Tensor,
    packed: PackedUnembedding,
}

/// The unembedding packed for the bf16 product on the CPU, made by the first bf16 projection
/// on a CPU where that product beats f32 ones, and shared by clones (the model's and the
/// lenses'). It is kept with the id of the tensor it was made from: a replaced `weight` is
/// packed afresh.
#[derive(Clone, Default)]
struct PackedUnembedding(Arc<OnceLock<(TensorId, PackedB)>>);

impl std::fmt::Debug for PackedUnembedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.get().map(|(_, packed)| packed.bytes());
        f.debug_struct("PackedUnembedding")
            .field("bytes", &packed)
            .finish()
    }
}

impl Unembedding {
    /// The final norm `norm` and the unembedding matrix `weight` (`[vocab, d]`).
    pub fn new(norm: FinalNorm, weight: Tensor) -> Self {
        Unembedding {
            norm,
            weight,
            packed: PackedUnembedding::default(),
        }
    }

    /// The final norm of `h: [..., d]`, exactly as the model computes it.
    pub fn normalize(&self, h: &Tensor) -> Result<Tensor> {
        match &self.norm {
            FinalNorm::Layer { weight, bias, eps } => layer_norm(h, weight, bias, *eps),
            FinalNorm::Rms { weight, eps } => rms_norm(h, weight, *eps),
        }
    }

    /// Logits `[..., vocab]` of residual-stream vectors `h: [..., d]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.project(&self.normalize(h)?)
    }

    /// Logits `[..., vocab]` of already normalised vectors `[..., d]`. In bf16 on the CPU as
    /// a bf16 model's linear layers: bf16 products with f32 sums, each logit rounded once.
    pub fn project(&self, normed: &Tensor) -> Result<Tensor> {
        let dims = normed.dims().to_vec();
        let d = dims[dims.len() - 1];
        let flat = normed.reshape((normed.elem_count() / d, d))?;
        let logits = if is_cpu_bf16(&flat) && is_cpu_bf16(&self.weight) {
            self.project_bf16(&flat, Kernel::detect().beats_f32())?
        } else {
            flat.matmul(&self.weight.t()?)?
        };
        let mut shape = dims;
        *shape.last_mut().unwrap() = self.weight.dim(0)?;
        Ok(logits.reshape(shape)?)
    }

    /// Residual width.
    pub fn hidden_size(&self) -> Result<usize> {
        Ok(self.weight.dim(D::Minus1)?)
    }

    /// Vocabulary size (rows of the unembedding).
    pub fn vocab_size(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    /// A copy in another dtype (lens training keeps everything in f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let norm = match &self.norm {
            FinalNorm::Layer { weight, bias, eps } => FinalNorm::Layer {
                weight: weight.to_dtype(dtype)?,
                bias: bias.to_dtype(dtype)?,
                eps: *eps,
            },
            FinalNorm::Rms { weight, eps } => FinalNorm::Rms {
                weight: weight.to_dtype(dtype)?,
                eps: *eps,
            },
        };
        Ok(Unembedding::new(norm, self.weight.to_dtype(dtype)?))
    }

    /// The logits of bf16 `rows: [n, d]` on the CPU: with `through_packed` through the bf16
    /// product with the packed unembedding, else as f32 products of the widened values, a
    /// slice of the vocabulary at a time; each logit rounded once to bf16.
    fn project_bf16(&self, rows: &Tensor, through_packed: bool) -> Result<Tensor> {
        let weight = &self.weight;
        if through_packed {
            let fresh;
            let packed = match self.packed.0.get() {
                Some((id, packed)) if *id == weight.id() => packed,
                Some(_) => {
                    fresh = packed_transposed(weight)?;
                    &fresh
                }
                None => {
                    let packed = packed_transposed(weight)?;
                    &self.packed.0.get_or_init(|| (weight.id(), packed)).1
                }
            };
            return linear_bf16(Kernel::detect(), rows, packed, None);
        }
        let vocab = weight.dim(0)?;
        let slices = (0..vocab)
            .step_by(VOCABULARY_SLICE)
            .map(|first| {
                let slice = weight.narrow(0, first, VOCABULARY_SLICE.min(vocab - first))?;
                let product = through_f32(&[rows, &slice], |s| linear(s[0], s[1], None))?;
                Ok(product.expect("bf16 on the CPU"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&slices, 1)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// bf16 logits on the CPU, through the packed product and through f32 (over several
    /// slices of the vocabulary), against the f32 product of the same bf16 values rounded
    /// once: at most a unit apart. The packed unembedding is made once, shared by clones,
    /// and not used for a replaced weight.
    #[test]
    fn bf16_logits_match_the_rounded_f32_product_on_either_path() {
        let (vocab, d, rows) = (VOCABULARY_SLICE + 100, 24, 5);
        let bf16 = |shape: &[usize]| {
            let t = Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
            t.to_dtype(DType::BF16).unwrap()
        };
        let norm = FinalNorm::Rms {
            weight: bf16(&[d]),
            eps: 1e-5,
        };
        let mut unembedding = Unembedding::new(norm, bf16(&[vocab, d]));
        let normed = bf16(&[1, rows, d]);
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        for replaced in [false, true] {
            if replaced {
                unembedding.weight = bf16(&[vocab, d]);
            }
            let weight = wide(&unembedding.weight).t().unwrap();
            let reference = wide(&normed).broadcast_matmul(&weight).unwrap();
            let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
            for through_packed in [true, false] {
                let rows = normed.reshape((rows, d)).unwrap();
                let logits = unembedding.project_bf16(&rows, through_packed).unwrap();
                assert_eq!(logits.dims(), &[rows.dim(0).unwrap(), vocab]);
                assert_eq!(logits.dtype(), DType::BF16);
                let logits: Vec<f32> = wide(&logits).flatten_all().unwrap().to_vec1().unwrap();
                for (i, (got, want)) in logits.iter().zip(&reference).enumerate() {
                    let tolerance = (want.abs() / 128.0).max(1e-5);
                    let what = format!("replaced {replaced}, packed {through_packed}");
                    assert!(
                        (got - want).abs() <= tolerance,
                        "{what} at {i}: {got} vs {want}"
                    );
                }
            }
            // project() takes the path of this CPU, with the same answer.
            let projected = unembedding.project(&normed).unwrap();
            assert_eq!(projected.dims(), &[1, rows, vocab]);
        }
        let clone = unembedding.clone();
        assert!(clone.packed.0.get().is_some(), "shared by clones");
    }
}
