//! GPT-NeoX (Pythia) in plain candle, with every hook point visited where it occurs.
//! Weight names and arithmetic follow Hugging Face's `GPTNeoXForCausalLM`.

use candle_core::{Tensor, D};

use super::decoder::{self, AttentionInputs, Decoder};
use super::layers::{add, gelu_erf, HeadColumns, LayerNorm, Linear, Loader, Rotary};
#[cfg(feature = "cuda")]
use super::neox_kernels;
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
                parallel_residual: cfg.parallel_residual,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Hugging Face ties the head to the embedding whenever the config says so, even if a
    // checkpoint also stores `embed_out.weight`.
    let unembed = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        w.tensor("embed_out.weight", &[cfg.vocab_size, d])?
    };
    let final_norm = w.layer_norm("gpt_neox.final_layer_norm", d, cfg.layer_norm_eps)?;
    Ok(GptNeox {
        embed,
        blocks,
        unembedding: Unembedding::new(final_norm.to_final_norm(), unembed),
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
        let normed = self.input_norm.forward(h)?;
        #[cfg(feature = "cuda")]
        if self.parallel_residual
            && neox_kernels::enabled_for(h)
            && !tap.touches(HookPoint::Attention(i))
            && !tap.touches(HookPoint::Mlp(i))
        {
            return self.fused_parallel_forward(i, h, &normed, inputs, tap);
        }
        let heads = self.attention_heads(i, &normed, inputs, tap)?;
        let attention = tap.visit(HookPoint::Attention(i), self.dense.forward(&heads)?)?;
        if self.parallel_residual {
            let mlp_input =
                tap.visit(HookPoint::MlpInput(i), self.post_attention_norm.forward(h)?)?;
            let mlp = tap.visit(HookPoint::Mlp(i), self.mlp(&mlp_input)?)?;
            tap.visit(HookPoint::Layer(i), add(&add(&mlp, &attention)?, h)?)
        } else {
            let mid = add(&attention, h)?;
            let mlp_input = tap.visit(
                HookPoint::MlpInput(i),
                self.post_attention_norm.forward(&mid)?,
            )?;
            let mlp = tap.visit(HookPoint::Mlp(i), self.mlp(&mlp_input)?)?;
            tap.visit(HookPoint::Layer(i), add(&mlp, &mid)?)
        }
    }
}

impl Block {
    /// The heads' attention output `[b, t, d]`, before the output projection (hook points:
    /// the pattern and the heads' outputs).
    fn attention_heads(
        &self,
        i: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let (q, k, v) = self.queries_keys_values(x, inputs)?;
        decoder::attend(i, (&q, &k, &v), inputs, tap)
    }

    /// A parallel-residual block on a GPU in bf16 when no hook looks at its attention or MLP
    /// output: the two output products' biases and the residual adds in one kernel.
    #[cfg(feature = "cuda")]
    fn fused_parallel_forward(
        &self,
        i: usize,
        h: &Tensor,
        normed: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let attention = self
            .dense
            .product(&self.attention_heads(i, normed, inputs, tap)?)?;
        let mlp_input = tap.visit(HookPoint::MlpInput(i), self.post_attention_norm.forward(h)?)?;
        let mlp = self.mlp_out.product(&self.mlp_hidden(&mlp_input)?)?;
        let out = match neox_kernels::parallel_residual(
            h,
            (&attention, self.dense.bias()),
            (&mlp, self.mlp_out.bias()),
        )? {
            Some(out) => out,
            None => ((self.mlp_out.add_bias(mlp)? + self.dense.add_bias(attention)?)? + h)?,
        };
        tap.visit(HookPoint::Layer(i), out)
    }

    /// The attention inputs `(q, k, v)`, each `[b, heads, t, head_dim]`, the rotary
    /// embedding applied to q and k: one fused kernel for bf16 on a GPU.
    fn queries_keys_values(
        &self,
        x: &Tensor,
        inputs: &AttentionInputs,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let projection = &self.query_key_value;
        let tables = (&inputs.cos, &inputs.sin);
        #[cfg(feature = "cuda")]
        if neox_kernels::enabled_for(x) {
            let product = projection.product(x)?;
            let (heads, rot) = (self.num_heads, inputs.rotary.dims());
            if let Some(qkv) =
                neox_kernels::qkv_rotary(&product, projection.bias(), heads, rot, tables)?
            {
                return Ok(qkv);
            }
            let qkv = projection.add_bias(product)?;
            return split_heads(&qkv, self.num_heads, inputs.rotary, tables);
        }
        split_heads(
            &projection.forward(x)?,
            self.num_heads,
            inputs.rotary,
            tables,
        )
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.mlp_out.forward(&self.mlp_hidden(x)?)
    }

    /// The MLP's hidden activations `gelu(x W_in^T + b_in)`: one fused kernel for the bias
    /// and GELU in bf16 on a GPU.
    fn mlp_hidden(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if neox_kernels::enabled_for(x) {
            let product = self.mlp_in.product(x)?;
            return match neox_kernels::bias_gelu(&product, self.mlp_in.bias())? {
                Some(hidden) => Ok(hidden),
                None => gelu_erf(&self.mlp_in.add_bias(product)?),
            };
        }
        gelu_erf(&self.mlp_in.forward(x)?)
    }
}

/// The attention inputs `(q, k, v)`, each `[b, heads, t, head_dim]`, from the fused
/// projection `qkv: [b, t, heads * 3 * head_dim]` (bias added; its rows are ordered (head,
/// {q, k, v}, head_dim)), with the rotary embedding applied to q and k.
pub(crate) fn split_heads(
    qkv: &Tensor,
    heads: usize,
    rotary: &Rotary,
    tables: (&Tensor, &Tensor),
) -> Result<(Tensor, Tensor, Tensor)> {
    let head_dim = qkv.dim(D::Minus1)? / (3 * heads);
    let part = |index: usize, rotate: bool| {
        let columns = HeadColumns {
            heads,
            head_dim,
            spacing: 3 * head_dim,
            offset: index * head_dim,
        };
        rotary.heads(qkv, columns, rotate, tables)
    };
    Ok((part(0, true)?, part(1, true)?, part(2, false)?))
}
