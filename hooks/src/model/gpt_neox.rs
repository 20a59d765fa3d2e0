//! GPT-NeoX (Pythia) in plain candle, with every hook point visited where it occurs.
//! Weight names and arithmetic follow Hugging Face's `GPTNeoXForCausalLM`.

use candle_core::{Tensor, D};

use super::layers::{causal_attention, causal_mask, gelu_erf, LayerNorm, Linear, Loader, Rotary};
use crate::config::GptNeoxConfig;
use crate::hooks::Tap;
use crate::{HookPoint, Result};

pub(crate) struct GptNeox {
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    unembed: Linear,
    rotary: Rotary,
}

struct Block {
    index: usize,
    input_norm: LayerNorm,
    post_attention_norm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
    num_heads: usize,
    head_dim: usize,
    parallel_residual: bool,
}

impl GptNeox {
    pub fn load(cfg: &GptNeoxConfig, w: &Loader) -> Result<Self> {
        let d = cfg.hidden_size;
        let embed = w.tensor("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("gpt_neox.layers.{i}");
                Ok(Block {
                    index: i,
                    input_norm: w.layer_norm(
                        &format!("{p}.input_layernorm"),
                        d,
                        cfg.layer_norm_eps,
                    )?,
                    post_attention_norm: w.layer_norm(
                        &format!("{p}.post_attention_layernorm"),
                        d,
                        cfg.layer_norm_eps,
                    )?,
                    query_key_value: w.linear(
                        &format!("{p}.attention.query_key_value"),
                        d,
                        3 * d,
                        cfg.attention_bias,
                    )?,
                    dense: w.linear(&format!("{p}.attention.dense"), d, d, cfg.attention_bias)?,
                    mlp_in: w.linear(
                        &format!("{p}.mlp.dense_h_to_4h"),
                        d,
                        cfg.intermediate_size,
                        true,
                    )?,
                    mlp_out: w.linear(
                        &format!("{p}.mlp.dense_4h_to_h"),
                        cfg.intermediate_size,
                        d,
                        true,
                    )?,
                    num_heads: cfg.num_heads,
                    head_dim: cfg.head_dim(),
                    parallel_residual: cfg.parallel_residual,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let unembed = if cfg.tie_word_embeddings && !w.store.contains("embed_out.weight") {
            Linear(candle_nn::Linear::new(embed.clone(), None))
        } else {
            w.linear("embed_out", d, cfg.vocab_size, false)?
        };
        Ok(GptNeox {
            embed,
            blocks,
            final_norm: w.layer_norm("gpt_neox.final_layer_norm", d, cfg.layer_norm_eps)?,
            unembed,
            rotary: Rotary::new(cfg.rotary_dims(), cfg.rotary_base),
        })
    }

    /// The final norm and unembedding.
    pub fn unembedding(&self) -> crate::Unembedding {
        crate::Unembedding {
            norm: self.final_norm.to_final_norm(),
            weight: self.unembed.weight().clone(),
        }
    }

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
        let mask = causal_mask(seq, h.device())?;
        for block in &self.blocks {
            h = block.forward(&h, &self.rotary, &cos, &sin, &mask, tap)?;
            if tap.done_after(HookPoint::Layer(block.index)) {
                return Ok(None);
            }
        }
        let normed = tap.visit(HookPoint::FinalNorm, self.final_norm.forward(&h)?)?;
        if tap.done_after(HookPoint::FinalNorm) {
            return Ok(None);
        }
        let logits = tap.visit(HookPoint::Logits, self.unembed.forward(&normed)?)?;
        Ok(Some(logits))
    }
}

impl Block {
    fn forward(
        &self,
        h: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let i = self.index;
        let attention = self.attention(&self.input_norm.forward(h)?, rotary, cos, sin, mask)?;
        let attention = tap.visit(HookPoint::Attention(i), attention)?;
        if self.parallel_residual {
            let mlp_input =
                tap.visit(HookPoint::MlpInput(i), self.post_attention_norm.forward(h)?)?;
            let mlp = tap.visit(HookPoint::Mlp(i), self.mlp(&mlp_input)?)?;
            tap.visit(HookPoint::Layer(i), ((mlp + attention)? + h)?)
        } else {
            let mid = (attention + h)?;
            let mlp_input = tap.visit(
                HookPoint::MlpInput(i),
                self.post_attention_norm.forward(&mid)?,
            )?;
            let mlp = tap.visit(HookPoint::Mlp(i), self.mlp(&mlp_input)?)?;
            tap.visit(HookPoint::Layer(i), (mlp + mid)?)
        }
    }

    fn attention(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        // The fused projection's rows are ordered (head, {q, k, v}, head_dim).
        let qkv = self
            .query_key_value
            .forward(x)?
            .reshape((b, t, self.num_heads, 3 * hd))?;
        let split = |part: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, part * hd, hd)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rotary.apply(&split(0)?, cos, sin)?;
        let k = rotary.apply(&split(1)?, cos, sin)?;
        let v = split(2)?;
        self.dense.forward(&causal_attention(&q, &k, &v, mask)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp_out.forward(&gelu_erf(&self.mlp_in.forward(x)?)?)
    }
}
