//! Llama family (Llama 2/3, Mistral, SmolLM2, ...) in plain candle, with every hook point
//! visited where it occurs. Weight names and arithmetic follow Hugging Face's
//! `LlamaForCausalLM`: pre-norm blocks with RMSNorm, grouped-query attention with rotate-half
//! rotary embeddings over the whole head, and a SwiGLU MLP.

use candle_core::Tensor;

use super::cpu_kernels::silu_mul;
use super::decoder::{self, AttentionInputs, Decoder};
use super::layers::{add, HeadColumns, Linear, Loader, RmsNorm, Rotary};
use crate::config::LlamaConfig;
use crate::hooks::Tap;
use crate::{HookPoint, Result, Unembedding};

/// Llama: the shared decoder with Llama blocks.
pub(crate) type Llama = Decoder<Block>;

pub(crate) struct Block {
    input_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

/// Loads Llama-family weights (Hugging Face names).
pub(crate) fn load(cfg: &LlamaConfig, w: &Loader) -> Result<Llama> {
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let embed = w.tensor("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
    let blocks = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            let attn = |name: &str, in_dim, out_dim| {
                let bias = cfg.attention_projection_bias(name);
                w.linear(&format!("{p}.self_attn.{name}"), in_dim, out_dim, bias)
            };
            let mlp = |name: &str, in_dim, out_dim| {
                w.linear(&format!("{p}.mlp.{name}"), in_dim, out_dim, cfg.mlp_bias)
            };
            Ok(Block {
                input_norm: w.rms_norm(&format!("{p}.input_layernorm"), d, cfg.rms_norm_eps)?,
                post_attention_norm: w.rms_norm(
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    cfg.rms_norm_eps,
                )?,
                q_proj: attn("q_proj", d, q_dim)?,
                k_proj: attn("k_proj", d, kv_dim)?,
                v_proj: attn("v_proj", d, kv_dim)?,
                o_proj: attn("o_proj", q_dim, d)?,
                gate_proj: mlp("gate_proj", d, f)?,
                up_proj: mlp("up_proj", d, f)?,
                down_proj: mlp("down_proj", f, d)?,
                num_heads: cfg.num_heads,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: hd,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let has_head = w.store.contains("lm_head.weight");
    if !cfg.tie_word_embeddings && !has_head {
        tracing::warn!(
            "config says the embeddings are not tied but there is no lm_head.weight; \
                 using the embedding as the unembedding"
        );
    }
    // Hugging Face ties the head to the embedding whenever the config says so, even if a
    // checkpoint also stores `lm_head.weight`.
    let unembed = if cfg.tie_word_embeddings || !has_head {
        embed.clone()
    } else {
        w.tensor("lm_head.weight", &[cfg.vocab_size, d])?
    };
    let final_norm = w.rms_norm("model.norm", d, cfg.rms_norm_eps)?;
    Ok(Llama {
        embed,
        blocks,
        unembedding: Unembedding::new(final_norm.to_final_norm(), unembed),
        rotary: match (&cfg.rope_freq_factors, &cfg.rope_scaling) {
            (Some(factors), _) => Rotary::divided(hd, cfg.rope_theta, factors),
            (None, Some(scaling)) => Rotary::llama3(hd, cfg.rope_theta, scaling),
            (None, None) => Rotary::new(hd, cfg.rope_theta),
        },
    })
}

impl decoder::Block for Block {
    /// `h + attn(norm1(h))`, then `+ mlp(norm2(...))`, in Hugging Face's addition order.
    fn forward(
        &self,
        i: usize,
        h: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let attention = self.attention(i, &self.input_norm.forward(h)?, inputs, tap)?;
        let attention = tap.visit(HookPoint::Attention(i), attention)?;
        let mid = add(h, &attention)?;
        let mlp_input = tap.visit(
            HookPoint::MlpInput(i),
            self.post_attention_norm.forward(&mid)?,
        )?;
        let mlp = tap.visit(HookPoint::Mlp(i), self.mlp(&mlp_input)?)?;
        tap.visit(HookPoint::Layer(i), add(&mid, &mlp)?)
    }
}

impl Block {
    /// The attention's output, visiting the pattern and the heads' outputs (the output
    /// projection's input).
    fn attention(
        &self,
        i: usize,
        x: &Tensor,
        inputs: &AttentionInputs,
        tap: &mut Tap,
    ) -> Result<Tensor> {
        let heads = |proj: &Linear, heads: usize, rotate: bool| {
            let columns = HeadColumns {
                heads,
                head_dim: self.head_dim,
                spacing: self.head_dim,
                offset: 0,
            };
            let tables = (&inputs.cos, &inputs.sin);
            inputs
                .rotary
                .heads(&proj.forward(x)?, columns, rotate, tables)
        };
        let q = heads(&self.q_proj, self.num_heads, true)?;
        let k = heads(&self.k_proj, self.num_kv_heads, true)?;
        let v = heads(&self.v_proj, self.num_kv_heads, false)?;
        self.o_proj
            .forward(&decoder::attend(i, (&q, &k, &v), inputs, tap)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.gate_proj.forward(x)?, self.up_proj.forward(x)?);
        let gated = match silu_mul(&gate, &up)? {
            Some(gated) => gated,
            None => (gate.silu()? * up)?,
        };
        self.down_proj.forward(&gated)
    }
}
