//! The last step of a model, final norm then unembedding, as a value of its own: lenses
//! decode every layer's residual stream with it.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, TensorId, D};

use crate::cpu::bf16::{Bf16, Kernel};
use crate::cpu::packed::{self, F32Kernel, Format, Packed, F32};
use crate::cpu::{
    is_cpu_bf16, is_cpu_f32, packed_transposed, product_with_transposed, with_f32_slices,
};
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
    /// For bf16 projections on a CPU where the bf16 product beats f32 ones.
    packed_bf16: PackedUnembedding<Bf16>,
    /// For f32 projections on a CPU with AVX-512.
    packed_f32: PackedUnembedding<F32>,
}

/// The unembedding packed for our product on the CPU, made by the first projection that takes
/// it and shared by clones and same-dtype copies (the model's and the lenses'). It is kept
/// with the id of the tensor it was made from, and never used for another: a replaced
/// `weight` goes through another product.
struct PackedUnembedding<F: Format>(Arc<OnceLock<(TensorId, Packed<F>)>>);

impl<F: Format> Clone for PackedUnembedding<F> {
    fn clone(&self) -> Self {
        PackedUnembedding(self.0.clone())
    }
}

impl<F: Format> Default for PackedUnembedding<F> {
    fn default() -> Self {
        PackedUnembedding(Arc::default())
    }
}

impl<F: Format> std::fmt::Debug for PackedUnembedding<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let packed = self.0.get().map(|(_, packed)| packed.bytes());
        f.debug_struct("PackedUnembedding")
            .field("bytes", &packed)
            .finish()
    }
}

impl<F: Format> PackedUnembedding<F> {
    /// The kept packed copy of `weight`, made now if none was kept; `None` when the kept copy
    /// was made from another tensor (a replaced `weight`, in this clone or another that
    /// shares the copy).
    fn of(&self, weight: &Tensor) -> Result<Option<&Packed<F>>> {
        let kept = match self.0.get() {
            Some(kept) => kept,
            None => {
                let packed = packed_transposed(weight)?;
                // Another thread may keep its copy first: the id is checked all the same.
                self.0.get_or_init(|| (weight.id(), packed))
            }
        };
        Ok((kept.0 == weight.id()).then_some(&kept.1))
    }
}

impl Unembedding {
    /// The final norm `norm` and the unembedding matrix `weight` (`[vocab, d]`).
    pub fn new(norm: FinalNorm, weight: Tensor) -> Self {
        Unembedding {
            norm,
            weight,
            packed_bf16: PackedUnembedding::default(),
            packed_f32: PackedUnembedding::default(),
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
        } else if is_cpu_f32(&flat) && is_cpu_f32(&self.weight) {
            let (rows, vocab) = (flat.dim(0)?, self.weight.dim(0)?);
            let mut logits = vec![0f32; rows * vocab];
            with_f32_slices(&[&flat], |s| self.logits_f32_into(s[0], &mut logits))?
                .expect("f32 on the CPU, checked above");
            Tensor::from_vec(logits, (rows, vocab), &candle_core::Device::Cpu)?
        } else {
            flat.matmul(&self.weight.t()?)?
        };
        let mut shape = dims;
        *shape.last_mut().unwrap() = self.weight.dim(0)?;
        Ok(logits.reshape(shape)?)
    }

    /// The logits of f32 rows `normed` (`[n, d]`, already through the final norm) into
    /// `logits` (`[n, vocab]`), for an f32 unembedding on the CPU: on a CPU with AVX-512
    /// through our f32 product with the unembedding packed once (shared by clones), which the
    /// `gemm` crate's product would repack on every call, else through that product.
    pub fn logits_f32_into(&self, normed: &[f32], logits: &mut [f32]) -> Result<()> {
        let (vocab, d) = self.weight.dims2()?;
        let rows = normed.len() / d.max(1);
        if normed.len() != rows * d || logits.len() != rows * vocab {
            return Err(crate::Error::InvalidArgument(format!(
                "logits of {} values into {} through an unembedding of {vocab} x {d}",
                normed.len(),
                logits.len()
            )));
        }
        if d == 0 {
            logits.fill(0.0);
            return Ok(());
        }
        let kernel = F32Kernel::detect();
        if kernel.beats_gemm() && is_cpu_f32(&self.weight) {
            // A replaced weight (rare) takes `gemm` rather than a packing per call.
            if let Some(w) = self.packed_f32.of(&self.weight)? {
                packed::gemm(kernel, normed, d, rows, w, logits, vocab);
                return Ok(());
            }
        }
        with_f32_slices(&[&self.weight], |s| {
            product_with_transposed(logits, normed, s[0], d, false, true);
            Ok(())
        })?
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "f32 logits need an f32 unembedding on the CPU, not {:?} on {:?}",
                self.weight.dtype(),
                self.weight.device()
            ))
        })
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
        // The packed copies are shared: each is used only for the tensor it was made from,
        // and a weight already in `dtype` stays that tensor.
        Ok(Unembedding {
            packed_bf16: self.packed_bf16.clone(),
            packed_f32: self.packed_f32.clone(),
            ..Unembedding::new(norm, self.weight.to_dtype(dtype)?)
        })
    }

    /// The logits of bf16 `rows: [n, d]` on the CPU: with `through_packed` through the bf16
    /// product with the packed unembedding, else as f32 products of the widened values, a
    /// slice of the vocabulary at a time; each logit rounded once to bf16.
    fn project_bf16(&self, rows: &Tensor, through_packed: bool) -> Result<Tensor> {
        let weight = &self.weight;
        if through_packed {
            let kernel = Kernel::detect();
            return match self.packed_bf16.of(weight)? {
                Some(packed) => linear_bf16(kernel, rows, packed, None),
                None => linear_bf16(kernel, rows, &packed_transposed(weight)?, None),
            };
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
        assert!(clone.packed_bf16.0.get().is_some(), "shared by clones");
    }

    /// f32 logits on the CPU against candle's product; on a CPU with AVX-512 through the
    /// unembedding packed once, shared by clones, and not used for a replaced weight.
    /// Buffers of the wrong size are refused.
    #[test]
    fn f32_logits_match_candle_and_the_packed_copy_is_shared() {
        let (vocab, d, rows) = (200, 40, 7);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
        let norm = FinalNorm::Rms {
            weight: randn(&[d]),
            eps: 1e-5,
        };
        let mut unembedding = Unembedding::new(norm, randn(&[vocab, d]));
        let first_weight = unembedding.weight.id();
        let normed = randn(&[1, rows, d]);
        for replaced in [false, true] {
            if replaced {
                unembedding.weight = randn(&[vocab, d]);
            }
            let weight = unembedding.weight.t().unwrap();
            let reference = normed.broadcast_matmul(&weight).unwrap();
            let projected = unembedding.project(&normed).unwrap();
            assert_eq!(projected.dims(), &[1, rows, vocab]);
            let gap = crate::compare::max_abs_diff(&projected, &reference).unwrap();
            assert!(gap < 1e-4, "replaced {replaced}: {gap}");
        }
        let packed = unembedding.packed_f32.0.get().map(|(id, _)| *id);
        if F32Kernel::detect().beats_gemm() {
            let clone = unembedding.clone();
            assert!(clone.packed_f32.0.get().is_some(), "shared by clones");
            assert_eq!(packed, Some(first_weight), "made from the first weight");
            let same = unembedding.to_dtype(DType::F32).unwrap();
            assert_eq!(
                same.packed_f32.0.get().map(|(id, _)| *id),
                packed,
                "shared by a copy in the same dtype"
            );
        } else {
            assert!(packed.is_none(), "packed only for our AVX-512 product");
        }
        let flat: Vec<f32> = normed.flatten_all().unwrap().to_vec1().unwrap();
        let mut short = vec![0f32; rows * vocab - 1];
        let refused = unembedding.logits_f32_into(&flat, &mut short).unwrap_err();
        assert!(refused
            .to_string()
            .contains(&format!("through an unembedding of {vocab} x {d}")));
    }
}
