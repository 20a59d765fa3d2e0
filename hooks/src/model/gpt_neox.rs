//! GPT-NeoX (Pythia) in plain candle, with every hook point visited where it occurs.
//! Weight names and arithmetic follow Hugging Face's `GPTNeoXForCausalLM`.

use candle_core::{Tensor, D};

use super::decoder::{self, AttentionInputs, Decoder};
use super::layers::{causal_attention, gelu_erf, LayerNorm, Linear, Loader, Rotary};
use crate::config::GptNeoxConfig;
use crate::hooks::Tap;
use crate::{HookPoint, Result, Unembedding};

/// GPT-NeoX: the shared decoder with GPT-NeoX blocks.
pub(crate) type GptNeox = Decoder<Block>;

pub(crate) struct Block {
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

/// Loads GPT-NeoX weights (Hugging Face names).
pub(crate) fn load(cfg: &GptNeoxConfig, w: &Loader) -> Result<GptNeox> {
    let d = cfg.hidden_size;
    let embed = w.tensor("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
    let blocks = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("gpt_neox.layers.{i}");
            Ok(Block {
                input_norm: w.layer_norm(&format!("{p}.input_layernorm"), d, cfg.layer_norm_eps)?,
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
        embed.clone()
    } else {
        w.tensor("embed_out.weight", &[cfg.vocab_size, d])?
    };
    let final_norm = w.layer_norm("gpt_neox.final_layer_norm", d, cfg.layer_norm_eps)?;
    Ok(GptNeox {
        embed,
        blocks,
        unembedding: Unembedding {
            norm: final_norm.to_final_norm(),
            weight: unembed,
        },
        rotary: Rotary::new(cfg.rotary_dims(), cfg.rotary_base),
    })
}

impl decoder::Block for Block {
    fn forward(
        &self,
        i: usize,
        h: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let attention = self.attention(&self.input_norm.forward(h)?, inputs)?;
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
}

impl Block {
    fn attention(&self, x: &Tensor, inputs: &AttentionInputs) -> Result<Tensor> {
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
        let q = inputs.rotary.apply(&split(0)?, &inputs.cos, &inputs.sin)?;
        let k = inputs.rotary.apply(&split(1)?, &inputs.cos, &inputs.sin)?;
        let v = split(2)?;
        self.dense
            .forward(&causal_attention(&q, &k, &v, &inputs.mask)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp_out.forward(&gelu_erf(&self.mlp_in.forward(x)?)?)
    }
}
