//! The last step of a model, final norm then unembedding, as a value of its own: lenses
//! decode every layer's residual stream with it.

use candle_core::{DType, Tensor, D};

use crate::model::layers::{layer_norm, rms_norm};
use crate::Result;

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
}

impl Unembedding {
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

    /// Logits `[..., vocab]` of already normalised vectors `[..., d]`.
    pub fn project(&self, normed: &Tensor) -> Result<Tensor> {
        let dims = normed.dims().to_vec();
        let d = dims[dims.len() - 1];
        let flat = normed.reshape((normed.elem_count() / d, d))?;
        let logits = flat.matmul(&self.weight.t()?)?;
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
        Ok(Unembedding {
            norm,
            weight: self.weight.to_dtype(dtype)?,
        })
    }
}
