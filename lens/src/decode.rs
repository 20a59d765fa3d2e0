//! How lens training decodes through the frozen unembedding: the two vocabulary-sized
//! products per layer (lens logits `normed · W_Uᵀ` and the gradient back `dlogits · W_U`)
//! in f32 (on the CPU into buffers kept from chunk to chunk, elsewhere through candle), or in
//! bfloat16 as tuned-lens does under bfloat16 autocast: on the CPU through the packed kernel
//! of [`hooks::cpu::bf16`], on a GPU through candle's bf16 matmul.
//! Everything else (translators, norms, softmax, the loss, gradients, optimiser state) stays
//! f32 either way.

use candle_core::{DType, Device, Tensor};
use hooks::cpu::{product, with_f32_slices};
use hooks::Unembedding;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::loss::{decode_candle, loss_and_grads_through, LossAndGrads, Target};
use crate::{Error, Result};
use hooks::cpu::bf16::{gemm, round_to_bf16, Kernel, PackedB};

/// Precision of the vocabulary-sized products in lens training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeDtype {
    /// bf16 where it is the faster choice: on a CUDA GPU, and on a CPU whose bf16 products
    /// outrun its f32 ones (Intel AMX; AVX-512 BF16 on AMD); f32 elsewhere.
    #[default]
    Auto,
    /// bf16 inputs with f32 accumulation (tuned-lens's bfloat16 autocast). On a CPU without
    /// fast bf16 products this is slower than f32 (a portable kernel where the CPU lacks
    /// AVX-512 BF16).
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
            other => Err(Error::Options(format!(
                "unknown decode dtype '{other}' (expected auto, bf16 or f32)"
            ))),
        }
    }

    /// Whether to decode in bf16 on `device`.
    fn is_bf16_on(self, device: &Device) -> bool {
        match self {
            DecodeDtype::F32 => false,
            DecodeDtype::Bf16 => true,
            DecodeDtype::Auto => {
                device.is_cuda() || (device.is_cpu() && Kernel::detect().beats_f32())
            }
        }
    }
}

/// Decodes lens inputs for training and returns the loss and the translator's gradients;
/// holds the unembedding in the decoding precision (and, on the CPU, the reused
/// vocabulary-sized buffers and in bf16 the packed copy).
pub(crate) enum Decoder<'u> {
    /// Through candle's matmul, with the unembedding weight in the decoding dtype (the
    /// model's f32 tensor, or a bf16 copy on a GPU).
    Candle(&'u Unembedding, Tensor),
    /// f32 on the CPU, into reused buffers.
    F32(&'u Unembedding, F32Products),
    /// bf16 on the CPU, through the packed kernel.
    Packed(&'u Unembedding, Box<Bf16Products>),
}

impl<'u> Decoder<'u> {
    /// A decoder for `unembedding` (f32) in `dtype`, with buffers for `rows` tokens at once.
    pub(crate) fn new(
        unembedding: &'u Unembedding,
        dtype: DecodeDtype,
        rows: usize,
    ) -> Result<Self> {
        let device = unembedding.weight.device();
        if !dtype.is_bf16_on(device) {
            return Ok(if hooks::cpu::is_cpu_f32(&unembedding.weight) {
                let (vocab, d) = unembedding.weight.dims2()?;
                let mut products = F32Products::default();
                products.reserve(rows, vocab, d);
                Decoder::F32(unembedding, products)
            } else {
                Decoder::Candle(unembedding, unembedding.weight.clone())
            });
        }
        if !device.is_cpu() {
            let weight = unembedding.weight.to_dtype(DType::BF16)?;
            return Ok(Decoder::Candle(unembedding, weight));
        }
        let kernel = Kernel::detect();
        if !kernel.beats_f32() {
            tracing::warn!(
                "bf16 products ({kernel:?} kernel) are slower than f32 ones on this CPU: \
                 bf16 decoding is slower than `--decode-dtype f32` here"
            );
        }
        Ok(Decoder::Packed(
            unembedding,
            Box::new(Bf16Products::new(unembedding, kernel, rows)?),
        ))
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
            Decoder::Candle(u, unembedding) => {
                loss_and_grads_through(h, weight, bias, &u.norm, |normed| {
                    decode_candle(normed, unembedding, target)
                })
            }
            Decoder::F32(u, products) => {
                loss_and_grads_through(h, weight, bias, &u.norm, |normed| {
                    products.decode(normed, u, target)
                })
            }
            Decoder::Packed(u, products) => {
                loss_and_grads_through(h, weight, bias, &u.norm, |normed| {
                    products.decode(normed, target)
                })
            }
        }
    }

    /// The model's final logits `[n, vocab]` (f32) for a KL target from its final residual
    /// rows `h: [n, d]`. When decoding in bf16 on a GPU, the product runs on TF32 tensor
    /// cores (about 8x plain f32, which takes some 6 ms per 4096-token chunk at pythia-160m):
    /// inputs keep 10 mantissa bits, which moves the loss far less than bf16's 8 would (see
    /// the tests).
    pub(crate) fn final_logits(&self, h: &Tensor) -> Result<Tensor> {
        let u = self.unembedding();
        match self {
            Decoder::Candle(_, weight) if weight.dtype() == DType::BF16 => {
                hooks::cuda_kernels::with_tf32_products(|| Ok(u.forward(h)?))
            }
            _ => Ok(u.forward(h)?),
        }
    }

    fn unembedding(&self) -> &Unembedding {
        match self {
            Decoder::Candle(u, _) | Decoder::F32(u, _) | Decoder::Packed(u, _) => u,
        }
    }

    /// `"bf16"` or `"f32"`, for logs and reports.
    pub(crate) fn dtype_name(&self) -> &'static str {
        match self {
            Decoder::Candle(_, weight) if weight.dtype() == DType::BF16 => "bf16",
            Decoder::Candle(..) | Decoder::F32(..) => "f32",
            Decoder::Packed(..) => "bf16",
        }
    }
}

/// Grows `buf` to at least `len` items (buffers kept from chunk to chunk only grow).
pub(crate) fn grow<T: Clone + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}

/// An error unless `target` has a row for each of the chunk's `n` rows (the CPU decoders
/// pair them row by row).
fn check_target_rows(target: &Target, n: usize) -> Result<()> {
    let rows = target.rows()?;
    if rows != n {
        return Err(Error::Training(format!(
            "a chunk of {n} rows has a target of {rows} rows"
        )));
    }
    Ok(())
}

/// The buffers that f32 decoding on the CPU reuses from chunk to chunk: fresh
/// vocabulary-sized tensors would cost a copy and page faults each time.
#[derive(Default)]
pub(crate) struct F32Products {
    /// Logits, then their gradient in place, `[rows, vocab]`.
    logits: Vec<f32>,
    /// Gradient for the normed rows, `[rows, d]`.
    normed_grad: Vec<f32>,
}

impl F32Products {
    /// Grows the buffers to hold `rows` tokens.
    fn reserve(&mut self, rows: usize, vocab: usize, d: usize) {
        grow(&mut self.logits, rows * vocab);
        grow(&mut self.normed_grad, rows * d);
    }

    /// `(loss sum, rows counted, d loss / d normed)` for `normed: [n, d]` through
    /// `unembedding` (`[vocab, d]`), both f32 on the CPU.
    fn decode(
        &mut self,
        normed: &Tensor,
        unembedding: &Unembedding,
        target: &Target,
    ) -> Result<(f64, usize, Tensor)> {
        let ((n, d), vocab) = (normed.dims2()?, unembedding.vocab_size()?);
        check_target_rows(target, n)?;
        if n == 0 {
            return Ok((0.0, 0, Tensor::zeros((0, d), DType::F32, &Device::Cpu)?));
        }
        self.reserve(n, vocab, d);
        let (logits, normed_grad) = (
            &mut self.logits[..n * vocab],
            &mut self.normed_grad[..n * d],
        );
        let not_f32 =
            || Error::Training("f32 decoding on the CPU needs f32 rows and unembedding".into());
        // The logits in a scope of their own: `logits_f32_into` reads the weight's storage too.
        with_f32_slices(&[normed], |s| unembedding.logits_f32_into(s[0], logits))?
            .ok_or_else(not_f32)?;
        let outcome = with_f32_slices(&[&unembedding.weight], |s| {
            let weight = s[0];
            let rows = rayon::iter::repeat_n((), n);
            let loss =
                crate::kernels::loss_and_grad_in_place(logits, vocab, target, rows, |_, _| {});
            if let Ok(Some(_)) = loss {
                product(normed_grad, logits, weight, vocab, false, true);
            }
            Ok(loss)
        })?;
        let (loss, counted) = outcome
            .ok_or_else(not_f32)??
            .ok_or_else(|| Error::Training("f32 decoding needs an f32 target on the CPU".into()))?;
        let grad = Tensor::from_slice(&self.normed_grad[..n * d], (n, d), &Device::Cpu)?;
        Ok((loss, counted, grad))
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
        let (d, vocab) = (self.to_logits.k(), self.to_logits.n());
        grow(&mut self.normed, rows * self.to_logits.lhs_stride());
        grow(&mut self.logits, rows * vocab);
        grow(&mut self.logit_grad, rows * self.from_logits.lhs_stride());
        grow(&mut self.normed_grad, rows * d);
    }

    /// `(loss sum, rows counted, d loss / d normed)` for `normed: [n, d]` (f32).
    fn decode(&mut self, normed: &Tensor, target: &Target) -> Result<(f64, usize, Tensor)> {
        let (n, d) = normed.dims2()?;
        check_target_rows(target, n)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use hooks::compare::relative_error;
    use hooks::FinalNorm;

    /// Normal random values of standard deviation `std`, `shape`.
    fn randn(shape: &[usize], std: f32) -> Tensor {
        Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()
    }

    /// The GPU's bf16 path (candle's bf16 matmul, run here on the CPU) against the CPU's
    /// packed kernel, on random rows of awkward sizes: the same bf16 products, so the loss and
    /// the translator gradients agree up to the bf16 rounding of the logits that candle's
    /// matmul returns (as autocast does; the packed kernel keeps them f32). Seen: loss 1.4e-4
    /// and gradients 1.0e-2 apart (relative), against 1.1e-4 and 1.2e-2 from f32 decoding; a
    /// wrong transpose or dtype would be off by O(1).
    #[test]
    fn candle_bf16_decoding_matches_the_packed_kernel() {
        let (n, d, vocab) = (37, 48, 1003);
        let norm = FinalNorm::Layer {
            weight: (randn(&[d], 0.1) + 1.0).unwrap(),
            bias: randn(&[d], 0.1),
            eps: 1e-5,
        };
        let unembedding = Unembedding::new(norm, randn(&[vocab, d], 0.3));
        let target = Target::from_logits(&randn(&[n, vocab], 2.0)).unwrap();
        let (h, weight, bias) = (randn(&[n, d], 1.0), randn(&[d, d], 0.05), randn(&[d], 0.05));
        let run =
            |mut decoder: Decoder| decoder.loss_and_grads(&h, &weight, &bias, &target).unwrap();
        let bf16_weight = unembedding.weight.to_dtype(DType::BF16).unwrap();
        let candle = run(Decoder::Candle(&unembedding, bf16_weight));
        let products = Bf16Products::new(&unembedding, Kernel::detect(), n).unwrap();
        let packed = run(Decoder::Packed(&unembedding, Box::new(products)));
        let f32 = run(Decoder::Candle(&unembedding, unembedding.weight.clone()));
        let report = |a: &LossAndGrads, b: &LossAndGrads| {
            (
                (a.loss - b.loss).abs() / b.loss,
                relative_error(&a.weight, &b.weight).unwrap(),
                relative_error(&a.bias, &b.bias).unwrap(),
            )
        };
        let (loss, weight_grad, bias_grad) = report(&candle, &packed);
        eprintln!(
            "candle bf16 vs packed: loss {loss:.2e}, grads {weight_grad:.2e} {bias_grad:.2e}"
        );
        eprintln!("candle bf16 vs f32: {:?}", report(&candle, &f32));
        eprintln!("packed vs f32: {:?}", report(&packed, &f32));
        assert!(candle.tokens == n && packed.tokens == n);
        assert!(loss < 1e-3, "loss differs by {loss:.2e}");
        assert!(
            weight_grad < 3e-2 && bias_grad < 3e-2,
            "gradients differ by {weight_grad:.2e}, {bias_grad:.2e}"
        );
        assert!(report(&candle, &f32).1 > 0.0, "the candle path ran in bf16");
    }

    /// f32 decoding on the CPU into reused buffers against candle's f32 path, for a KL and
    /// a next-token target (with an ignored row), over chunks of falling then rising size
    /// through one decoder: the same products, so the losses and gradients agree to f32
    /// rounding, and an empty chunk gives nothing. A target of the wrong length is refused.
    #[test]
    fn reused_f32_buffers_match_candle_decoding() {
        let (d, vocab) = (40, 1003);
        let norm = FinalNorm::Layer {
            weight: (randn(&[d], 0.1) + 1.0).unwrap(),
            bias: randn(&[d], 0.1),
            eps: 1e-5,
        };
        let unembedding = Unembedding::new(norm, randn(&[vocab, d], 0.3));
        let (weight, bias) = (randn(&[d, d], 0.05), randn(&[d], 0.05));
        let mut reused = Decoder::new(&unembedding, DecodeDtype::F32, 8).unwrap();
        assert!(matches!(reused, Decoder::F32(..)));
        for (n, next_tokens) in [(37, false), (5, true), (64, false), (0, false)] {
            let h = randn(&[n, d], 1.0);
            let target = if next_tokens {
                let ids: Vec<u32> = (0..n as u32)
                    .map(|i| {
                        if i == 2 {
                            u32::MAX
                        } else {
                            i * 97 % vocab as u32
                        }
                    })
                    .collect();
                Target::NextTokens(Tensor::new(ids, &Device::Cpu).unwrap())
            } else {
                Target::from_logits(&randn(&[n, vocab], 2.0)).unwrap()
            };
            let got = reused.loss_and_grads(&h, &weight, &bias, &target).unwrap();
            if n == 5 {
                // A target for another number of rows is refused by both CPU decoders.
                let longer = randn(&[n + 1, d], 1.0);
                let products = Bf16Products::new(&unembedding, Kernel::detect(), n).unwrap();
                let mut packed = Decoder::Packed(&unembedding, Box::new(products));
                for decoder in [&mut reused, &mut packed] {
                    let refused = decoder.loss_and_grads(&longer, &weight, &bias, &target);
                    let message = refused.err().expect("refused").to_string();
                    assert!(message.contains("6 rows has a target of 5"), "{message}");
                }
            }
            let mut candle = Decoder::Candle(&unembedding, unembedding.weight.clone());
            let want = candle.loss_and_grads(&h, &weight, &bias, &target).unwrap();
            let counted = if next_tokens { n - 1 } else { n };
            assert_eq!((got.tokens, want.tokens), (counted, counted));
            if n == 0 {
                assert_eq!(got.loss, 0.0);
                continue;
            }
            let loss_gap = (got.loss - want.loss).abs() / want.loss.abs();
            let weight_gap = relative_error(&got.weight, &want.weight).unwrap();
            let bias_gap = relative_error(&got.bias, &want.bias).unwrap();
            assert!(
                loss_gap < 1e-5 && weight_gap < 1e-4 && bias_gap < 1e-4,
                "{n} rows: loss {loss_gap:.1e}, gradients {weight_gap:.1e} {bias_gap:.1e}"
            );
        }
    }

    /// `x` with its f32 mantissa rounded to TF32's 10 bits (to nearest, ties away from
    /// zero, as the tensor cores' conversion does).
    fn round_to_tf32(x: &Tensor) -> Tensor {
        let values: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let rounded: Vec<f32> = values
            .iter()
            .map(|v| f32::from_bits((v.to_bits() + 0x1000) & !0x1fff))
            .collect();
        Tensor::from_vec(rounded, x.shape(), &Device::Cpu).unwrap()
    }

    /// A GPU decoding in bf16 makes the KL target's logits on TF32 tensor cores
    /// (`final_logits`); emulated here by rounding both inputs to TF32. Against the f32
    /// target, the lens loss moves by under 0.5% even for a nearly exact lens. Seen: 5.9e-4
    /// at a KL of 0.005 nats per token and 7.4e-5 at 0.4, where bf16 inputs moved it by 2.2%
    /// and 6.9e-4.
    #[test]
    fn tf32_final_logits_move_the_kl_target_little() {
        let (n, d, vocab) = (64, 48, 1003);
        let norm = FinalNorm::Rms {
            weight: (randn(&[d], 0.1) + 1.0).unwrap(),
            eps: 1e-6,
        };
        let unembedding = Unembedding::new(norm, randn(&[vocab, d], 0.5));
        let h = randn(&[n, d], 1.0);
        let normed = unembedding.normalize(&h).unwrap();
        let logits_from = |normed: &Tensor, weight: &Tensor| {
            Target::from_logits(&normed.matmul(&weight.t().unwrap()).unwrap()).unwrap()
        };
        let exact = logits_from(&normed, &unembedding.weight);
        let tf32 = logits_from(&round_to_tf32(&normed), &round_to_tf32(&unembedding.weight));
        let bf16 = |x: &Tensor| {
            x.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let bf16 = logits_from(&bf16(&normed), &bf16(&unembedding.weight));
        // A nearly exact lens and a rough one.
        for noise in [0.03, 0.3] {
            let lens_h = (&h + randn(&[n, d], noise)).unwrap();
            let (weight, bias) = (randn(&[d, d], 0.002), randn(&[d], 0.002));
            let loss = |target: &Target| {
                let mut decoder = Decoder::Candle(&unembedding, unembedding.weight.clone());
                let g = decoder.loss_and_grads(&lens_h, &weight, &bias, target);
                g.unwrap().loss / n as f64
            };
            let (with_exact, with_tf32, with_bf16) = (loss(&exact), loss(&tf32), loss(&bf16));
            let moved = (with_tf32 - with_exact).abs() / with_exact;
            eprintln!(
                "KL per token: {with_exact:.5} with the f32 target, {with_tf32:.5} with TF32 \
                 ({moved:.1e}), {with_bf16:.5} with bf16"
            );
            assert!(
                moved < 5e-3,
                "the TF32 target moved the loss by {moved:.2e}"
            );
        }
    }
}
