//! How lens training decodes through the frozen unembedding: the two vocabulary-sized
//! products per layer (lens logits `normed · W_Uᵀ` and the gradient back `dlogits · W_U`)
//! in f32 through candle, or in bfloat16 through the packed kernel of [`crate::bf16`], as
//! tuned-lens does under bfloat16 autocast. Everything else (translators, norms, softmax,
//! the loss, gradients, optimiser state) stays f32 either way.

use candle_core::{DType, Device, Tensor};
use hooks::cpu::with_f32_slices;
use hooks::Unembedding;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::bf16::{gemm, round_to_bf16, Kernel, PackedB};
use crate::loss::{decode_f32, loss_and_grads_through, LossAndGrads, Target};
use crate::{Error, Result};

/// Precision of the vocabulary-sized products in lens training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeDtype {
    /// bf16 on a CPU with AVX-512 BF16 (about twice as fast there), f32 elsewhere.
    #[default]
    Auto,
    /// bf16 inputs with f32 accumulation (tuned-lens's bfloat16 autocast); CPU only. On a
    /// CPU without AVX-512 BF16 a portable kernel computes the same, more slowly than f32.
    Bf16,
    /// f32 throughout.
    F32,
}

impl DecodeDtype {
    /// Parses `auto`, `bf16` or `f32`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(DecodeDtype::Auto),
            "bf16" => Ok(DecodeDtype::Bf16),
            "f32" => Ok(DecodeDtype::F32),
            other => Err(Error::Training(format!(
                "unknown decode dtype '{other}' (expected auto, bf16 or f32)"
            ))),
        }
    }

    /// The bf16 kernel to use on `device`, or `None` for f32.
    fn kernel(self, device: &Device) -> Result<Option<Kernel>> {
        let cpu = matches!(device, Device::Cpu);
        Ok(match self {
            DecodeDtype::F32 => None,
            DecodeDtype::Auto => {
                Some(Kernel::detect()).filter(|k| cpu && *k == Kernel::Avx512Bf16)
            }
            DecodeDtype::Bf16 if cpu => Some(Kernel::detect()),
            DecodeDtype::Bf16 => {
                return Err(Error::Training(format!(
                    "bf16 decoding is implemented for the CPU only; use decode dtype f32 (or auto) on {device:?}"
                )))
            }
        })
    }
}

/// Decodes lens inputs for training and returns the loss and the translator's gradients;
/// holds the packed unembedding and the reused vocabulary-sized buffers of the bf16 path.
pub(crate) enum Decoder<'u> {
    /// f32 through candle.
    F32(&'u Unembedding),
    /// bf16 through the packed kernel.
    Bf16(&'u Unembedding, Box<Bf16Products>),
}

impl<'u> Decoder<'u> {
    /// A decoder for `unembedding` (f32) in `dtype`, with buffers for `rows` tokens at once.
    pub(crate) fn new(
        unembedding: &'u Unembedding,
        dtype: DecodeDtype,
        rows: usize,
    ) -> Result<Self> {
        Ok(match dtype.kernel(unembedding.weight.device())? {
            None => Decoder::F32(unembedding),
            Some(kernel) => {
                if kernel == Kernel::Portable {
                    tracing::warn!(
                        "this CPU lacks AVX-512 BF16: bf16 decoding runs a portable kernel, slower than f32"
                    );
                }
                Decoder::Bf16(
                    unembedding,
                    Box::new(Bf16Products::new(unembedding, kernel, rows)?),
                )
            }
        })
    }

    /// The summed loss of translator `(weight, bias)` on `h: [n, d]` and its gradients.
    pub(crate) fn loss_and_grads(
        &mut self,
        h: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        target: &Target,
    ) -> Result<LossAndGrads> {
        match self {
            Decoder::F32(u) => loss_and_grads_through(h, weight, bias, &u.norm, |normed| {
                decode_f32(normed, &u.weight, target)
            }),
            Decoder::Bf16(u, products) => {
                loss_and_grads_through(h, weight, bias, &u.norm, |normed| {
                    products.decode(normed, target)
                })
            }
        }
    }

    /// `"bf16"` or `"f32"`, for logs and reports.
    pub(crate) fn dtype_name(&self) -> &'static str {
        match self {
            Decoder::F32(_) => "f32",
            Decoder::Bf16(..) => "bf16",
        }
    }
}

/// The unembedding packed in bf16 for both products, and the buffers they reuse.
pub(crate) struct Bf16Products {
    kernel: Kernel,
    /// `W_Uᵀ`, `[d, vocab]`: normed rows to logits.
    to_logits: PackedB,
    /// `W_U`, `[vocab, d]`: logit gradients back to the normed rows.
    from_logits: PackedB,
    /// Normed rows in bf16, `[rows, d rounded up to a pair]`.
    normed: Vec<u16>,
    /// Logits, then their gradient in place, `[rows, vocab]`.
    logits: Vec<f32>,
    /// The logit gradient in bf16, `[rows, vocab rounded up to a pair]`.
    logit_grad: Vec<u16>,
    /// Gradient for the normed rows, `[rows, d]`.
    normed_grad: Vec<f32>,
}

impl Bf16Products {
    /// Packs `unembedding` (f32 on the CPU) for `kernel`, with buffers for `rows` tokens.
    fn new(unembedding: &Unembedding, kernel: Kernel, rows: usize) -> Result<Self> {
        let (vocab, d) = unembedding.weight.dims2()?;
        let weight = unembedding.weight.to_dtype(DType::F32)?;
        let packed = with_f32_slices(&[&weight], |w| {
            let w = w[0];
            Ok((
                PackedB::pack(d, vocab, |row, col| w[col * d + row]),
                PackedB::pack(vocab, d, |row, col| w[row * d + col]),
            ))
        })?;
        let (to_logits, from_logits) = packed.ok_or_else(|| {
            Error::Training("bf16 decoding needs the unembedding on the CPU".into())
        })?;
        tracing::debug!(
            "bf16 unembedding packed: {} MiB",
            (to_logits.bytes() + from_logits.bytes()) >> 20
        );
        let mut products = Bf16Products {
            kernel,
            to_logits,
            from_logits,
            normed: Vec::new(),
            logits: Vec::new(),
            logit_grad: Vec::new(),
            normed_grad: Vec::new(),
        };
        products.reserve(rows);
        Ok(products)
    }

    /// Grows the buffers to hold `rows` tokens.
    fn reserve(&mut self, rows: usize) {
        fn grow<T: Clone + Default>(buf: &mut Vec<T>, len: usize) {
            if buf.len() < len {
                buf.resize(len, T::default());
            }
        }
        let (d, vocab) = (self.to_logits.k(), self.to_logits.n());
        grow(&mut self.normed, rows * self.to_logits.lhs_stride());
        grow(&mut self.logits, rows * vocab);
        grow(&mut self.logit_grad, rows * self.from_logits.lhs_stride());
        grow(&mut self.normed_grad, rows * d);
    }

    /// `(loss sum, rows counted, d loss / d normed)` for `normed: [n, d]` (f32).
    fn decode(&mut self, normed: &Tensor, target: &Target) -> Result<(f64, usize, Tensor)> {
        let (n, d) = normed.dims2()?;
        let vocab = self.to_logits.n();
        self.reserve(n);
        let (in_stride, grad_stride) = (self.to_logits.lhs_stride(), self.from_logits.lhs_stride());
        let rounded = with_f32_slices(&[normed], |x| {
            for (row, out) in x[0]
                .chunks_exact(d)
                .zip(self.normed.chunks_exact_mut(in_stride))
            {
                round_to_bf16(row, &mut out[..d]);
            }
            Ok(())
        })?;
        if rounded.is_none() {
            return Err(Error::Training(
                "bf16 decoding needs f32 rows on the CPU".into(),
            ));
        }
        let logits = &mut self.logits[..n * vocab];
        gemm(
            self.kernel,
            &self.normed,
            in_stride,
            n,
            &self.to_logits,
            logits,
            vocab,
        );
        let grad_rows = self.logit_grad[..n * grad_stride].par_chunks_mut(grad_stride);
        let (loss, counted) = crate::kernels::loss_and_grad_in_place(
            logits,
            vocab,
            target,
            grad_rows,
            |grad, out| round_to_bf16(grad, &mut out[..vocab]),
        )?
        .ok_or_else(|| Error::Training("bf16 decoding needs an f32 target on the CPU".into()))?;
        let normed_grad = &mut self.normed_grad[..n * d];
        gemm(
            self.kernel,
            &self.logit_grad,
            grad_stride,
            n,
            &self.from_logits,
            normed_grad,
            d,
        );
        Ok((
            loss,
            counted,
            Tensor::from_slice(normed_grad, (n, d), &Device::Cpu)?,
        ))
    }
}
