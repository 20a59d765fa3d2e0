//! Building blocks shared by the architectures: rotary tables, causal attention, and
//! linear/norm layers (LayerNorm, RMSNorm) built from a weight store.

use candle_core::{DType, Device, Tensor, D};

use super::cpu_kernels::{
    layer_norm_bf16, layer_norm_f32, linear_bf16, linear_packed_f32, rms_norm_bf16, through_f32,
};
use crate::cpu::bf16::{Kernel, PackedB};
use crate::cpu::packed::{F32Kernel, Packed, F32};
use crate::cpu::{is_cpu_bf16, is_cpu_f32};
use crate::weights::WeightStore;
use crate::Result;

/// Loads tensors from a store in one dtype onto one device.
pub(crate) struct Loader<'a> {
    pub store: &'a WeightStore,
    pub dtype: DType,
    pub device: &'a Device,
}

impl Loader<'_> {
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.get(name, shape, self.dtype, self.device)
    }

    /// A `[out, in]` linear layer named `prefix.weight` (and `prefix.bias` when `bias`).
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        // Read after the weight, so that the weight's shape is checked (and named) first.
        let bias = || {
            bias.then(|| self.tensor(&format!("{prefix}.bias"), &[out_dim]))
                .transpose()
        };
        if let Some(weight) = self.store.quantized(&name, &[out_dim, in_dim])? {
            let weight = super::quantized::QuantizedWeight::new(weight);
            return Ok(Linear::Quantized {
                weight,
                bias: bias()?,
            });
        }
        let weight = self.tensor(&name, &[out_dim, in_dim])?;
        let bias = bias()?;
        // Where bf16 products are slower than f32 ones, the layer takes f32 products of the
        // widened values instead (see `forward`).
        if is_cpu_bf16(&weight) && Kernel::detect().beats_f32() {
            return Linear::packed_bf16(&weight, bias);
        }
        if is_cpu_f32(&weight) && F32Kernel::detect().beats_gemm() {
            return Linear::packed_f32(&weight, bias);
        }
        Ok(Linear::Tensors(candle_nn::Linear::new(weight, bias)))
    }

    /// A LayerNorm with weight and bias.
    pub fn layer_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    /// An RMSNorm with a weight and no bias.
    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }
}

/// `x W^T + b` over the last dimension.
pub(crate) enum Linear {
    /// The weight and bias as tensors, for any device and dtype.
    Tensors(candle_nn::Linear),
    /// A bf16 layer on the CPU: the weight packed once for the bf16 product (it is not kept
    /// as a tensor as well), the bias also widened to f32 for the product's sums.
    PackedBf16 {
        weight: PackedB,
        bias: Option<(Tensor, Vec<f32>)>,
    },
    /// An f32 layer on a CPU with AVX-512: the weight packed once for our f32 product (not
    /// kept as a tensor as well), the bias also as values.
    PackedF32 {
        weight: Packed<F32>,
        bias: Option<(Tensor, Vec<f32>)>,
    },
    /// A block-quantized weight (GGUF, [`crate::LoadOptions::quantized`]) multiplied as it is,
    /// with 8-bit-quantized activations (candle's arithmetic, as llama.cpp's).
    Quantized {
        weight: super::quantized::QuantizedWeight,
        bias: Option<Tensor>,
    },
}

/// A layer's bias as given and as f32 values for a packed product's sums.
fn wide_bias(bias: Option<Tensor>) -> Result<Option<(Tensor, Vec<f32>)>> {
    Ok(match bias {
        Some(b) => {
            let wide = b.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            Some((b, wide))
        }
        None => None,
    })
}

impl Linear {
    /// A bf16 CPU layer from its `[out, in]` weight and `[out]` bias.
    pub(crate) fn packed_bf16(weight: &Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let weight = crate::cpu::packed_transposed(weight)?;
        let bias = wide_bias(bias)?;
        Ok(Linear::PackedBf16 { weight, bias })
    }

    /// An f32 CPU layer from its `[out, in]` weight and `[out]` bias.
    pub(crate) fn packed_f32(weight: &Tensor, bias: Option<Tensor>) -> Result<Linear> {
        let weight = crate::cpu::packed_transposed(weight)?;
        let bias = wide_bias(bias)?;
        Ok(Linear::PackedF32 { weight, bias })
    }

    /// Applies the layer to `[..., in]`, as one matrix product over all leading dimensions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let layer = match self {
            Linear::Tensors(layer) => layer,
            Linear::Quantized { .. } => return self.add_bias(self.product(x)?),
            packed => return packed.product_with(x, true),
        };
        if (is_cpu_f32(x) || is_cpu_bf16(x)) && x.rank() >= 2 {
            let (weight, bias) = (layer.weight(), layer.bias());
            if let Some(out) = over_rows(x, |rows| {
                let operands: Vec<&Tensor> = [rows, weight].into_iter().chain(bias).collect();
                // bf16 where its products are slower than f32 ones: the f32 layer on the
                // widened values (the weight widened for this call only), its output
                // rounded once.
                if let Some(out) = through_f32(&operands, |s| {
                    super::cpu_kernels::linear(s[0], s[1], s.get(2).copied())
                })? {
                    return Ok(Some(out));
                }
                super::cpu_kernels::linear(rows, weight, bias)
            })? {
                return Ok(out);
            }
        }
        self.add_bias(self.product(x)?)
    }

    /// `x W^T` without the bias, for a fused kernel that adds it ([`Linear::add_bias`] when
    /// none applies). The fused kernels are CUDA's; on a packed bf16 layer this rounds the
    /// product to bf16 before the bias is added, which [`Linear::forward`] does not.
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::Quantized { weight, .. } = self {
            return weight.product(x);
        }
        if !matches!(self, Linear::Tensors(_)) {
            return self.product_with(x, false);
        }
        let weight = self.weight()?.t()?;
        if x.rank() <= 2 {
            return Ok(x.matmul(&weight)?);
        }
        Ok(over_rows(x, |rows| Ok(Some(rows.matmul(&weight)?)))?.expect("always made"))
    }

    /// A packed layer's product of `x: [..., in]`, its bias added when `with_bias`.
    fn product_with(&self, x: &Tensor, with_bias: bool) -> Result<Tensor> {
        fn bias_values(bias: &Option<(Tensor, Vec<f32>)>, with_bias: bool) -> Option<&[f32]> {
            bias.as_ref()
                .filter(|_| with_bias)
                .map(|(_, wide)| wide.as_slice())
        }
        let out = over_rows(x, |rows| {
            Some(match self {
                Linear::PackedBf16 { weight, bias: b } => {
                    linear_bf16(Kernel::detect(), rows, weight, bias_values(b, with_bias))
                }
                Linear::PackedF32 { weight, bias: b } => {
                    linear_packed_f32(F32Kernel::detect(), rows, weight, bias_values(b, with_bias))
                }
                Linear::Tensors(_) | Linear::Quantized { .. } => {
                    unreachable!("only packed layers come here")
                }
            })
            .transpose()
        })?;
        Ok(out.expect("always made"))
    }

    /// The weight tensor, which a packed or quantized layer does not keep.
    fn weight(&self) -> Result<&Tensor> {
        match self {
            Linear::Tensors(linear) => Ok(linear.weight()),
            _ => Err(crate::Error::InvalidArgument(
                "a packed or quantized layer keeps no weight tensor".into(),
            )),
        }
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Linear::Tensors(linear) => linear.bias(),
            Linear::PackedBf16 { bias, .. } | Linear::PackedF32 { bias, .. } => {
                bias.as_ref().map(|(b, _)| b)
            }
            Linear::Quantized { bias, .. } => bias.as_ref(),
        }
    }

    /// `product + b`.
    pub fn add_bias(&self, product: Tensor) -> Result<Tensor> {
        Ok(match self.bias() {
            Some(bias) => product.broadcast_add(bias)?,
            None => product,
        })
    }
}

/// `f` applied to `x: [..., in]` seen as the rows `[n, in]`, its `[n, out]` result given back
/// the leading dimensions of `x` (`None` when `f` gives none). `x` has rank 2 or more.
fn over_rows(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    let dims = x.dims();
    if dims.is_empty() {
        return Err(crate::Error::InvalidArgument(
            "a linear layer was given a scalar, not rows of values".into(),
        ));
    }
    let (leading, inner) = dims.split_at(dims.len() - 1);
    let Some(out) = f(&x.reshape((leading.iter().product::<usize>(), inner[0]))?)? else {
        return Ok(None);
    };
    let mut shape = dims.to_vec();
    *shape.last_mut().unwrap() = out.dim(1)?;
    Ok(Some(out.reshape(shape)?))
}

/// `a + b` (one shape), on a vectorised CPU path for bf16: a residual addition.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match super::cpu_kernels::add_bf16(a, b)? {
        Some(sum) => Ok(sum),
        None => Ok((a + b)?),
    }
}

/// The exact (erf) GELU, on a parallel CPU path for f32.
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    match super::cpu_kernels::gelu_erf(x)? {
        Some(y) => Ok(y),
        None => Ok(x.gelu_erf()?),
    }
}

/// LayerNorm over the last dimension.
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps as f64)
    }

    pub fn to_final_norm(&self) -> crate::FinalNorm {
        crate::FinalNorm::Layer {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            eps: self.eps as f64,
        }
    }
}

/// LayerNorm over the last dimension with weight and bias.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(out) = layer_norm_bf16(x, weight, bias, eps)? {
        return Ok(out);
    }
    if let Some(out) = layer_norm_f32(x, weight, bias, eps)? {
        return Ok(out);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = super::neox_kernels::layer_norm(x, weight, bias, eps)? {
        return Ok(out);
    }
    layer_norm_generic(x, weight, bias, eps)
}

/// [`layer_norm`] for any device and dtype. candle's kernel takes the variance as
/// `E[x²] − mean²`, which cancels for rows far from zero (a constant row gives NaN): it gets
/// the rows centred, in f32 as PyTorch computes.
fn layer_norm_generic(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let out = candle_nn::ops::layer_norm(
        &centred,
        &weight.to_dtype(DType::F32)?,
        &bias.to_dtype(DType::F32)?,
        eps as f32,
    )?;
    Ok(out.to_dtype(dtype)?)
}

/// RMSNorm over the last dimension, as Hugging Face's `LlamaRMSNorm`: `x * rsqrt(mean(x²) + eps)`
/// in f32, rounded back to the compute dtype, then scaled by the weight.
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }

    pub fn to_final_norm(&self) -> crate::FinalNorm {
        crate::FinalNorm::Rms {
            weight: self.weight.clone(),
            eps: self.eps,
        }
    }
}

/// RMSNorm over the last dimension, computed in f32 and rounded back to the input dtype
/// before the weight is applied (as Hugging Face does).
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(out) = rms_norm_bf16(x, weight, eps)? {
        return Ok(out);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?)
}

/// Where the heads of a projection lie in the last dimension of its output: head `h` is the
/// `head_dim` columns from `h * spacing + offset` (GPT-NeoX interleaves each head's q, k and
/// v, so its spacing is `3 * head_dim`; Llama's separate projections have `head_dim`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeadColumns {
    pub heads: usize,
    pub head_dim: usize,
    pub spacing: usize,
    pub offset: usize,
}

/// Rotary position embedding (non-interleaved, "NeoX" style: the rotated half-pairs are
/// `x[..r/2]` and `x[r/2..r]`), applied to the first `dims` dimensions of each head.
pub(crate) struct Rotary {
    dims: usize,
    inv_freq: Vec<f32>,
}

impl Rotary {
    pub fn new(dims: usize, base: f64) -> Self {
        let inv_freq = (0..dims / 2)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dims as f32))
            .collect();
        Rotary { dims, inv_freq }
    }

    /// The rotary embedding with Llama 3.1's frequency scaling (transformers'
    /// `_compute_llama3_parameters`, in f32 as there).
    pub fn llama3(dims: usize, base: f64, scaling: &crate::config::Llama3RopeScaling) -> Self {
        let mut rotary = Rotary::new(dims, base);
        let old_context = scaling.original_max_position_embeddings as f32;
        let (low, high) = (
            scaling.low_freq_factor as f32,
            scaling.high_freq_factor as f32,
        );
        let factor = scaling.factor as f32;
        let (low_freq_wavelen, high_freq_wavelen) = (old_context / low, old_context / high);
        for f in rotary.inv_freq.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_freq_wavelen {
                *f /= factor;
            } else if wavelen >= high_freq_wavelen {
                let smooth = (old_context / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
        rotary
    }

    /// The rotary embedding with each frequency divided by its factor (`dims / 2` of them,
    /// checked by the loader): llama.cpp's form of a scaling.
    pub fn divided(dims: usize, base: f64, factors: &[f32]) -> Self {
        debug_assert_eq!(factors.len(), dims / 2, "one factor per frequency");
        let mut rotary = Rotary::new(dims, base);
        for (f, factor) in rotary.inv_freq.iter_mut().zip(factors) {
            *f /= factor;
        }
        rotary
    }

    /// The rotated dimensions of each head.
    #[cfg(feature = "cuda")]
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// `cos` and `sin` tables of shape `[seq, dims/2]` for positions `start..start + seq`.
    pub fn tables(
        &self,
        start: usize,
        seq: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.dims / 2;
        let mut angles = Vec::with_capacity(seq * half);
        for pos in start..start + seq {
            angles.extend(self.inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (seq, half), device)?;
        Ok((
            angles.cos()?.to_dtype(dtype)?,
            angles.sin()?.to_dtype(dtype)?,
        ))
    }

    /// The heads `[b, heads, t, head_dim]` of a projection's output `x: [b, t, width]` at
    /// `columns`, rotated when `rotate` (queries and keys; values are not). For f32 on a CPU
    /// this is one pass over `x`, where the generic path copies the heads out, rotates a copy
    /// of their first `dims` and joins the rest back on.
    pub fn heads(
        &self,
        x: &Tensor,
        columns: HeadColumns,
        rotate: bool,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let rotated = if rotate { self.dims } else { 0 };
        match super::cpu_kernels::heads(x, columns, rotated, (cos, sin))? {
            Some(heads) => Ok(heads),
            None => self.heads_generic(x, columns, rotate, (cos, sin)),
        }
    }

    /// [`Rotary::heads`] in generic tensor ops.
    pub fn heads_generic(
        &self,
        x: &Tensor,
        columns: HeadColumns,
        rotate: bool,
        (cos, sin): (&Tensor, &Tensor),
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let heads = x
            .reshape((b, t, columns.heads, columns.spacing))?
            .narrow(D::Minus1, columns.offset, columns.head_dim)?
            .transpose(1, 2)?
            .contiguous()?;
        if rotate {
            self.apply(&heads, cos, sin)
        } else {
            Ok(heads)
        }
    }

    /// Rotates the first `dims` dimensions of `x: [batch, heads, seq, head_dim]`.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.dims == 0 {
            return Ok(x.clone());
        }
        let head_dim = x.dim(D::Minus1)?;
        if self.dims == head_dim {
            return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
        }
        let rotated = x.narrow(D::Minus1, 0, self.dims)?.contiguous()?;
        let rotated = candle_nn::rotary_emb::rope(&rotated, cos, sin)?;
        let rest = x.narrow(D::Minus1, self.dims, head_dim - self.dims)?;
        Ok(Tensor::cat(&[rotated, rest], D::Minus1)?)
    }
}

/// An additive causal mask `[queries, keys]` in f32 for the last `queries` of `keys`
/// positions (the earlier ones are cached): 0 where a query may see the key, -inf after it.
pub(crate) fn causal_mask(queries: usize, keys: usize, device: &Device) -> Result<Tensor> {
    let past = keys.saturating_sub(queries);
    let mask: Vec<f32> = (0..queries)
        .flat_map(|i| (0..keys).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (queries, keys), device)?)
}

/// The additive causal mask of one forward pass, built on first use: the fused attention
/// kernels need none, and building it (`seq²` floats on the host, then a copy to the
/// device) would stall a GPU forward for milliseconds before its first layer.
pub(crate) struct CausalMask {
    queries: usize,
    keys: usize,
    device: Device,
    mask: std::cell::OnceCell<Tensor>,
}

impl CausalMask {
    /// The mask for `queries` new tokens after `keys - queries` cached ones on `device`,
    /// not built yet.
    pub fn new(queries: usize, keys: usize, device: &Device) -> Self {
        CausalMask {
            queries,
            keys,
            device: device.clone(),
            mask: std::cell::OnceCell::new(),
        }
    }

    /// The `[queries, keys]` mask of [`causal_mask`].
    pub fn get(&self) -> Result<&Tensor> {
        if let Some(mask) = self.mask.get() {
            return Ok(mask);
        }
        let mask = causal_mask(self.queries, self.keys, &self.device)?;
        Ok(self.mask.get_or_init(|| mask))
    }
}

/// Causal softmax attention. `q: [b, heads, t, d]`, `k`/`v`: `[b, kv_heads, keys, d]` where
/// `kv_heads` divides `heads` and the queries are the last `t` of the `keys` positions (the
/// earlier ones cached); returns `[b, t, heads * d]`. Scores and softmax in f32.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CausalMask,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(out) = super::flash_attention::causal_attention(q, k, v)? {
        return Ok(out);
    }
    if let Some(out) = super::cpu_kernels::causal_attention(q, k, v)? {
        return Ok(out);
    }
    causal_attention_generic(q, k, v, mask.get()?)
}

/// The attention output and weights `[b, heads, t, keys]`, for a hook on the pattern: on the
/// CPU in f32 or bf16 the kernel's (its output is [`causal_attention`]'s), elsewhere the
/// generic path's. Either way, [`weighted_values`] of that pattern gives the same output bit for bit.
pub(crate) fn causal_attention_with_pattern(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CausalMask,
) -> Result<(Tensor, Tensor)> {
    if let Some(both) = super::cpu_kernels::causal_attention_with_pattern(q, k, v)? {
        return Ok(both);
    }
    let pattern = attention_pattern(q, k, mask.get()?)?;
    Ok((weighted_values_generic(&pattern, v)?, pattern))
}

/// [`causal_attention`] with candle's generic ops (any device and dtype).
pub(crate) fn causal_attention_generic(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    weighted_values_generic(&attention_pattern(q, k, mask)?, v)
}

/// The attention weights `[b, heads, t, keys]` in `q`'s dtype: the causal softmax of the
/// scaled scores, computed in f32. `q: [b, heads, t, d]`, `k: [b, kv_heads, keys, d]`.
pub(crate) fn attention_pattern(q: &Tensor, k: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, heads, _, d) = q.dims4()?;
    let k = repeat_kv(k, heads / k.dim(1)?)?;
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    // A power-of-two scale (head sizes 64, 256, ...) goes on `q` instead of the `[t, t]`
    // scores: bit-identical scores, one pass fewer over them.
    let scale_q = scale.log2().fract() == 0.0;
    let q = q.to_dtype(DType::F32)?;
    let q = if scale_q { q.affine(scale, 0.0)? } else { q };
    let product = || q.matmul(&k.to_dtype(DType::F32)?.t()?);
    // bf16 and f16 values are exact in TF32 (10 mantissa bits), so on a GPU their scores may
    // use TF32 tensor cores with f32 sums: the f32 result, ~8x faster (flash attention also
    // multiplies the half-precision values with f32 sums).
    let scores = if q.device().is_cuda() && matches!(dtype, DType::BF16 | DType::F16) {
        crate::cuda_kernels::with_tf32_products(product)?
    } else {
        product()?
    };
    let scores = if scale_q {
        scores
    } else {
        scores.affine(scale, 0.0)?
    };
    let scores = scores.broadcast_add(mask)?;
    Ok(candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?)
}

/// The heads' outputs `[b, t, heads * d]`: attention weights `pattern: [b, heads, t, keys]`
/// applied to the values `v: [b, kv_heads, keys, d]`.
pub(crate) fn weighted_values(pattern: &Tensor, v: &Tensor) -> Result<Tensor> {
    if let Some(out) = super::cpu_kernels::weighted_values(pattern, v)? {
        return Ok(out);
    }
    weighted_values_generic(pattern, v)
}

/// [`weighted_values`] with candle's generic ops.
pub(crate) fn weighted_values_generic(pattern: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, t, _) = pattern.dims4()?;
    let d = v.dim(3)?;
    let v = repeat_kv(v, heads / v.dim(1)?)?;
    // A replaced pattern may be a strided view (a broadcast, say).
    let out = pattern.contiguous()?.matmul(&v.contiguous()?)?;
    Ok(out.transpose(1, 2)?.reshape((b, t, heads * d))?)
}

/// `[b, kv, t, d]` -> `[b, kv * repeat, t, d]`, each kv head repeated `repeat` times in place.
fn repeat_kv(x: &Tensor, repeat: usize) -> Result<Tensor> {
    if repeat == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, repeat, t, d))?
        .reshape((b, kv * repeat, t, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scaling `q` by a power of two gives the scores, and so the output, of scaling the
    /// scores afterwards, bit for bit (head size 64: scale 1/8); other head sizes keep the
    /// scale on the scores.
    #[test]
    fn power_of_two_scale_on_q_changes_no_bit() {
        for d in [64, 48] {
            let (b, heads, t) = (2, 3, 17);
            let randn = || Tensor::randn(0f32, 1.0, (b, heads, t, d), &Device::Cpu).unwrap();
            let (q, k, v) = (randn(), randn(), randn());
            let mask = causal_mask(t, t, &Device::Cpu).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let reference = probs
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, heads * d))
                .unwrap();
            let out = causal_attention_generic(&q, &k, &v, &mask).unwrap();
            let (out, reference): (Vec<f32>, Vec<f32>) = (
                out.flatten_all().unwrap().to_vec1().unwrap(),
                reference.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert!(out == reference, "head size {d}: the outputs differ");
        }
    }

    /// LayerNorm takes each row's variance from its differences from the mean, on the f32
    /// CPU path and on the generic one (here in float16): a constant row gives the bias, up
    /// to the rounding of its mean (it gave NaN), and f32 rows 300 away from zero match a
    /// float64 reference (they were off by several percent).
    #[test]
    fn layer_norm_keeps_rows_far_from_zero() {
        for d in [64, 512, 2048] {
            let bias: Vec<f32> = (0..d).map(|i| (i % 7) as f32 / 8.0 - 0.375).collect();
            let weight: Vec<f32> = (0..d).map(|i| 1.0 + (i % 5) as f32 / 16.0).collect();
            let offset = Tensor::randn(0f32, 1.0, (3, d), &Device::Cpu).unwrap() + 300.0;
            let mut rows: Vec<f32> = offset.unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for c in [1.7f32, 33.3, 1000.1] {
                rows.extend(std::iter::repeat_n(c, d));
            }
            let n = rows.len() / d;
            let mut expected = Vec::new();
            for row in rows.chunks(d) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                for (i, &v) in row.iter().enumerate() {
                    let normed = (v as f64 - mean) / (var + 1e-5).sqrt();
                    expected.push(normed * weight[i] as f64 + bias[i] as f64);
                }
            }
            // The generic path (any device's) on its own as well.
            type Norm = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;
            let paths: [(DType, Norm); 3] = [
                (DType::F32, layer_norm),
                (DType::F32, layer_norm_generic),
                (DType::F16, layer_norm),
            ];
            for (dtype, norm) in paths {
                let tensor = |values: &[f32], shape: &[usize]| {
                    Tensor::from_slice(values, shape, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let out = norm(
                    &tensor(&rows, &[n, d]),
                    &tensor(&weight, &[d]),
                    &tensor(&bias, &[d]),
                    1e-5,
                )
                .unwrap();
                let out: Vec<f32> = out
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // float16 rounds the rows near 300 by up to 1/8: only its constant rows
                // are compared.
                let rows_checked = if dtype == DType::F16 { 3..n } else { 0..n };
                for row in rows_checked {
                    let tolerance = if row < 3 { 2e-3 } else { 1e-6 };
                    for i in 0..d {
                        let (o, e) = (out[row * d + i] as f64, expected[row * d + i]);
                        assert!(
                            (o - e).abs() <= tolerance * e.abs().max(1.0),
                            "{dtype:?} d {d} row {row} [{i}]: {o} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
