//! The skeleton every supported architecture shares: embed, a stack of blocks, final norm,
//! unembedding, with the hook points between them. An architecture supplies only its block.

use std::sync::OnceLock;

use candle_core::Tensor;

use super::cpu_kernels::{linear_bf16, through_f32_one};
use super::layers::{
    causal_attention, causal_attention_with_pattern, weighted_values, CausalMask, Rotary,
};
use crate::cpu::bf16::{Kernel, PackedB};
use crate::cpu::{is_cpu_bf16, packed_transposed};
use crate::hooks::Tap;
use crate::{HookPoint, Result, Unembedding};

/// Per-pass inputs every block's attention needs.
pub(crate) struct AttentionInputs<'a> {
    pub rotary: &'a Rotary,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: CausalMask,
}

/// The heads' outputs `[b, t, heads * d]` of block `i`'s causal attention over `q`, `k`,
/// `v` (`[b, heads or kv_heads, t, d]`), visiting its attention pattern and heads' outputs.
/// The pattern is formed only when a hook asks for it; a replaced pattern re-weighs the values.
pub(crate) fn attend(
    i: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    inputs: &AttentionInputs,
    tap: &mut Tap,
) -> Result<Tensor> {
    let pattern_point = HookPoint::AttentionPattern(i);
    let heads = if tap.touches(pattern_point) {
        let (heads, pattern) = causal_attention_with_pattern(q, k, v, &inputs.mask)?;
        if tap.replaces(pattern_point) {
            // The replacement may return a new pattern or edit this one in place; either
            // way the values are weighed again, by what flows on (the kernel's own pattern
            // gives its output bit for bit). The kernel's is dropped if replaced.
            drop(heads);
            weighted_values(&tap.visit(pattern_point, pattern)?, v)?
        } else {
            tap.visit(pattern_point, pattern)?;
            heads
        }
    } else {
        causal_attention(q, k, v, &inputs.mask)?
    };
    tap.visit(HookPoint::AttentionHeads(i), heads)
}

/// One transformer block of an architecture; it visits its own hook points.
pub(crate) trait Block {
    /// Runs block `index` on the residual `h: [batch, seq, d]`, returning the new residual.
    fn forward(
        &self,
        index: usize,
        h: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor>;
}

/// Rows of a bf16 unembedding widened to f32 at once where the CPU has no bf16 hardware.
const VOCABULARY_SLICE: usize = 8192;

/// Embedding, blocks, final norm and unembedding.
pub(crate) struct Decoder<B> {
    pub embed: Tensor,
    pub blocks: Vec<B>,
    pub unembedding: Unembedding,
    pub rotary: Rotary,
    /// The unembedding packed for the bf16 product, made by the first bf16 pass on a CPU
    /// with bf16 hardware that computes logits.
    pub packed_unembedding: OnceLock<PackedB>,
}

impl<B: Block> Decoder<B> {
    /// Runs `ids: [batch, seq]` (u32) through the model; `None` when the tap stopped early.
    pub fn forward(&self, ids: &Tensor, tap: &mut Tap) -> Result<Option<Tensor>> {
        let (batch, seq) = ids.dims2()?;
        let d = self.embed.dim(1)?;
        let embedded = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((batch, seq, d))?;
        let mut h = tap.visit(HookPoint::Embed, embedded)?;
        if tap.done_after(HookPoint::Embed) {
            return Ok(None);
        }
        let (cos, sin) = self.rotary.tables(seq, h.dtype(), h.device())?;
        let inputs = AttentionInputs {
            rotary: &self.rotary,
            cos,
            sin,
            mask: CausalMask::new(seq, h.device()),
        };
        for (index, block) in self.blocks.iter().enumerate() {
            h = block.forward(index, &h, &inputs, tap)?;
            if tap.done_after(HookPoint::Layer(index)) {
                return Ok(None);
            }
        }
        let normed = tap.visit(HookPoint::FinalNorm, self.unembedding.normalize(&h)?)?;
        if tap.done_after(HookPoint::FinalNorm) {
            return Ok(None);
        }
        let logits = tap.visit(HookPoint::Logits, self.logits(&normed)?)?;
        Ok(Some(logits))
    }

    /// The logits `[b, t, vocab]` of the final norm's output `[b, t, d]`. In bf16 on the CPU
    /// as the model's linear layers: through the bf16 product with the unembedding packed by
    /// the first such pass (kept next to its tensor, which the embedding and the lenses
    /// read), or without bf16 hardware as f32 products of the widened values, a slice of the
    /// vocabulary at a time.
    fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        self.logits_on(normed, Kernel::detect().is_native())
    }

    /// [`Decoder::logits`] as on a CPU with bf16 hardware or, when not `bf16_hardware`,
    /// without.
    fn logits_on(&self, normed: &Tensor, bf16_hardware: bool) -> Result<Tensor> {
        let weight = &self.unembedding.weight;
        if !(is_cpu_bf16(normed) && is_cpu_bf16(weight)) {
            return self.unembedding.project(normed);
        }
        let (vocab, d) = weight.dims2()?;
        let (b, t, _) = normed.dims3()?;
        let rows = normed.reshape((b * t, d))?;
        let logits = if bf16_hardware {
            let packed = match self.packed_unembedding.get() {
                Some(packed) => packed,
                None => {
                    let packed = packed_transposed(weight)?;
                    self.packed_unembedding.get_or_init(|| packed)
                }
            };
            linear_bf16(Kernel::detect(), &rows, packed, None)?
        } else {
            let slices = (0..vocab)
                .step_by(VOCABULARY_SLICE)
                .map(|first| {
                    let slice = weight.narrow(0, first, VOCABULARY_SLICE.min(vocab - first))?;
                    let product = through_f32_one(&[&rows, &slice], |s| {
                        super::cpu_kernels::linear(s[0], s[1], None)
                    })?;
                    Ok(product.expect("bf16 on the CPU"))
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&slices, 1)?
        };
        Ok(logits.reshape((b, t, vocab))?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::FinalNorm;

    struct NoBlock;

    impl Block for NoBlock {
        fn forward(
            &self,
            _: usize,
            h: &Tensor,
            _: &AttentionInputs,
            _: &mut Tap,
        ) -> Result<Tensor> {
            Ok(h.clone())
        }
    }

    /// bf16 logits on the CPU, with and without bf16 hardware (over several slices of the
    /// vocabulary), against the f32 product of the same bf16 values rounded once: at most a
    /// unit apart. The packed unembedding is made once and kept.
    #[test]
    fn bf16_logits_match_the_rounded_f32_product_on_either_path() {
        let (vocab, d, rows) = (VOCABULARY_SLICE + 100, 24, 5);
        let bf16 = |shape: &[usize]| {
            let t = Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
            t.to_dtype(DType::BF16).unwrap()
        };
        let weight = bf16(&[vocab, d]);
        let decoder = Decoder::<NoBlock> {
            embed: weight.clone(),
            blocks: Vec::new(),
            unembedding: Unembedding {
                norm: FinalNorm::Rms {
                    weight: bf16(&[d]),
                    eps: 1e-5,
                },
                weight: weight.clone(),
            },
            rotary: Rotary::new(0, 10_000.0),
            packed_unembedding: OnceLock::new(),
        };
        let normed = bf16(&[1, rows, d]);
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let reference = wide(&normed)
            .broadcast_matmul(&wide(&weight).t().unwrap())
            .unwrap();
        let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
        let paths = if Kernel::detect().is_native() {
            vec![true, false]
        } else {
            vec![false]
        };
        for bf16_hardware in paths {
            let logits = decoder.logits_on(&normed, bf16_hardware).unwrap();
            assert_eq!(logits.dims(), &[1, rows, vocab]);
            assert_eq!(logits.dtype(), DType::BF16);
            let logits: Vec<f32> = wide(&logits).flatten_all().unwrap().to_vec1().unwrap();
            for (i, (got, want)) in logits.iter().zip(&reference).enumerate() {
                let tolerance = (want.abs() / 128.0).max(1e-5);
                assert!(
                    (got - want).abs() <= tolerance,
                    "{bf16_hardware} at {i}: {got} vs {want}"
                );
            }
            assert_eq!(
                decoder.packed_unembedding.get().is_some(),
                Kernel::detect().is_native()
            );
        }
    }
}
