//! The keys and values of positions a model has already run, so that a later pass over the
//! next tokens attends to them without running them again.

use candle_core::Tensor;

use crate::{Error, Result};

/// The keys and values every attention layer made for the positions a model has already run
/// ([`crate::Model::forward_cached`]): a prompt shared by many continuations is run once, and
/// generation runs one new token per pass.
///
/// Cloning is cheap (tensors are reference counted): clone a prompt's cache to run several
/// continuations from it. A cache of one sequence serves a pass over a batch of any size (every
/// sequence continues that one prompt); afterwards it holds that batch.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Per layer, its keys and values `[batch, kv_heads, positions, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// An empty cache: the next pass starts at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The positions held: where the next pass's tokens go.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    /// True before the first pass.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sequences held, `None` when empty.
    pub fn batch(&self) -> Option<usize> {
        self.layers.first().map(|(k, _)| k.dims()[0])
    }

    /// The attention layers held (0 when empty).
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `layer`'s keys and values, those held followed by the pass's own `k`, `v`
    /// (`[batch, kv_heads, t, head_dim]`), which are kept for later passes. Layers are
    /// extended in order; held ones of batch 1 are repeated to the pass's batch.
    pub(crate) fn extend(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if layer == self.layers.len() {
            self.layers.push((k.clone(), v.clone()));
            return Ok((k.clone(), v.clone()));
        }
        let (past_k, past_v) = self.layers.get(layer).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "KV cache: layer {layer} extended before layer {}",
                self.layers.len()
            ))
        })?;
        let (b, kv_heads, _, d) = k.dims4()?;
        let (past_b, past_heads, past_len, past_d) = past_k.dims4()?;
        if (past_heads, past_d) != (kv_heads, d) || !(past_b == b || past_b == 1) {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds keys of {past_b} sequences x {past_heads} heads of size \
                 {past_d}, but this pass makes {b} x {kv_heads} of size {d}: was the cache \
                 made by another model, or for another batch?"
            )));
        }
        let joined = |past: &Tensor, new: &Tensor| -> Result<Tensor> {
            let past = if past_b == b {
                past.clone()
            } else {
                past.broadcast_as((b, kv_heads, past_len, d))?
                    .contiguous()?
            };
            Ok(Tensor::cat(&[&past, new], 2)?)
        };
        let joined = (joined(past_k, k)?, joined(past_v, v)?);
        self.layers[layer] = joined.clone();
        Ok(joined)
    }
}
