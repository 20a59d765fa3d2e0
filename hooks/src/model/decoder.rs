//! The skeleton every supported architecture shares: embed, a stack of blocks, final norm,
//! unembedding, with the hook points between them. An architecture supplies only its block.

use std::cell::RefCell;

use candle_core::Tensor;

use super::kv_cache::KvCache;
use super::layers::{
    causal_attention, causal_attention_with_pattern, weighted_values, CausalMask, Rotary,
};
use crate::hooks::Tap;
use crate::{HookPoint, Result, Unembedding};

/// Per-pass inputs every block's attention needs.
pub(crate) struct AttentionInputs<'a> {
    pub rotary: &'a Rotary,
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: CausalMask,
    /// The keys and values of earlier positions, which this pass extends.
    pub cache: Option<RefCell<&'a mut KvCache>>,
}

/// The heads' outputs `[b, t, heads * d]` of block `i`'s causal attention over `q`, `k`,
/// `v` (`[b, heads or kv_heads, t, d]`) and any cached positions before them, visiting its
/// attention pattern and heads' outputs. The pattern is formed only when a hook asks for it;
/// a replaced pattern re-weighs the values.
pub(crate) fn attend(
    i: usize,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    inputs: &AttentionInputs,
    tap: &mut Tap,
) -> Result<Tensor> {
    let extended;
    let (k, v) = match &inputs.cache {
        Some(cache) => {
            extended = cache.borrow_mut().extend(i, k, v)?;
            (&extended.0, &extended.1)
        }
        None => (k, v),
    };
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

/// Embedding, blocks, final norm and unembedding.
pub(crate) struct Decoder<B> {
    pub embed: Tensor,
    pub blocks: Vec<B>,
    pub unembedding: Unembedding,
    pub rotary: Rotary,
}

impl<B: Block> Decoder<B> {
    /// Runs `ids: [batch, seq]` (u32) through the model, after the positions in `cache` when
    /// there is one (which the pass extends); `None` when the tap stopped early.
    pub fn forward(
        &self,
        ids: &Tensor,
        tap: &mut Tap,
        cache: Option<&mut KvCache>,
    ) -> Result<Option<Tensor>> {
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
        let past = cache.as_ref().map_or(0, |cache| cache.len());
        let (cos, sin) = self.rotary.tables(past, seq, h.dtype(), h.device())?;
        let inputs = AttentionInputs {
            rotary: &self.rotary,
            cos,
            sin,
            mask: CausalMask::new(seq, past + seq, h.device()),
            cache: cache.map(RefCell::new),
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
        let logits = tap.visit(HookPoint::Logits, self.unembedding.project(&normed)?)?;
        Ok(Some(logits))
    }
}
