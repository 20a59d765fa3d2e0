//! CPU fast paths for the forward-pass steps where candle's generic ops leave most of the
//! machine idle or take extra passes: a linear layer whose product accumulates onto its bias,
//! causal attention (blocked, skipping the masked half, one head per thread; it can also write
//! out its attention weights, and re-weigh the values by a replaced pattern) and the erf GELU
//! (parallel). Each returns `None` when it does not apply (not f32 or bf16, not on the CPU),
//! and the caller then uses the generic candle path.
//!
//! A bf16 model on the CPU computes each step in f32 from bf16 values and rounds its output to
//! bf16, as PyTorch's CPU kernels do: attention, the rotary heads, the norms and the
//! element-wise steps in one pass each (a replaced attention pattern through
//! [`through_f32`]), its linear layers through the bf16 product ([`linear_bf16`]). candle's
//! own bf16 CPU ops convert element by element and made a bf16 forward pass several times
//! slower than an f32 one. Where the arithmetic is
//! not Hugging Face's step for step: attention scores and the softmax stay in f32 (the
//! weights are rounded to bf16, as there), and the rotary embedding is computed in f32 and
//! rounded once (PyTorch rounds each product and the sum).

use std::cell::Cell;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::layers::HeadColumns;
use crate::cpu::bf16::{self, Kernel, PackedB};
use crate::cpu::packed::{self, F32Kernel, Packed, F32};
use crate::cpu::{
    bf16_tensor, bf16_tensor_from, bf16_tensor_of_bits, exp_of_negative, f32_tensor_from,
    f32_tensor_map, is_cpu_bf16, product_with_transposed, rounded_to_bf16, widened_bf16,
    with_bf16_bits, with_f32_slices, with_wide_vectors, SharedOut,
};
use crate::{Error, Result};

/// Query rows processed together: the score block (`BLOCK x seq`) stays in cache.
const BLOCK: usize = 64;

/// Causal softmax attention, computed in f32 for f32 or bf16 tensors (whose weights are
/// rounded to bf16). `q: [b, heads, t, d]`, `k`/`v`: `[b, kv_heads, keys, d]`, the queries
/// being the last `t` of the `keys` positions; returns `[b, t, heads * d]` in their dtype.
/// Scores are scaled by `1/sqrt(d)`.
pub(crate) fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    Ok(blocked_attention(q, k, v, false)?.map(|(out, _)| out))
}

/// [`causal_attention`] that also returns the attention weights it used,
/// `[b, heads, t, keys]` with zeros where a query may not look: its output is the one
/// [`causal_attention`] gives, bit for bit, so capturing a pattern changes nothing downstream.
pub(crate) fn causal_attention_with_pattern(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    Ok(blocked_attention(q, k, v, true)?
        .map(|(out, pattern)| (out, pattern.expect("kept on request"))))
}

/// One attention operand's data: f32, or bf16 bits widened to f32 a head at a time.
#[derive(Clone, Copy)]
enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Operand<'_> {
    /// The `len` values from `start`, in f32.
    fn values(&self, start: usize, len: usize) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Operand::F32(data) => std::borrow::Cow::Borrowed(&data[start..][..len]),
            Operand::Bf16(bits) => {
                let bits = &bits[start..][..len];
                std::borrow::Cow::Owned(bits.iter().map(|&b| bf16::bf16_value(b)).collect())
            }
        }
    }
}

/// Where [`attend`] writes the heads' outputs `[b, t, heads * d]`: f32, or bf16 rounded from
/// each head's f32 rows.
#[derive(Clone, Copy)]
enum Output {
    F32(SharedOut<f32>),
    Bf16(SharedOut<u16>),
}

/// Causal attention over f32 or bf16 `q`, `k`, `v` (all one dtype), with its weights when
/// `keep_pattern`. In bf16 the weights are rounded to bf16 before they weigh the values, as
/// a bf16 model's pattern is: re-weighing by that pattern then gives the same output.
fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep_pattern: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let (b, heads, t, d) = q.dims4()?;
    let (kv_heads, keys) = (k.dim(1)?, k.dim(2)?);
    let kv_shape = [b, kv_heads, keys, d];
    let grouped = kv_heads > 0 && heads % kv_heads == 0;
    if k.dims() != kv_shape || v.dims() != kv_shape || keys < t || !grouped {
        return Ok(None); // the generic path reports the mismatch
    }
    let shape = AttentionShape {
        b,
        heads,
        kv_heads,
        t,
        keys,
        d,
    };
    let out_shape = [b, t, heads * d];
    let pattern_tensor = |pattern: Vec<f32>, bf16: bool| -> Result<Option<Tensor>> {
        if !keep_pattern {
            return Ok(None);
        }
        let dims = [b, heads, t, keys];
        Ok(Some(if bf16 {
            bf16_tensor(&pattern, &dims)? // already rounded: exact
        } else {
            Tensor::from_vec(pattern, &dims[..], &Device::Cpu)?
        }))
    };
    if let Some(both) = with_f32_slices(&[q, k, v], |s| {
        let mut out = vec![0f32; b * t * heads * d];
        let [q, k, v] = [s[0], s[1], s[2]].map(Operand::F32);
        let output = Output::F32(SharedOut(out.as_mut_ptr()));
        let pattern = attend((q, k, v), shape, keep_pattern, output);
        let out = Tensor::from_vec(out, &out_shape[..], &Device::Cpu)?;
        Ok((out, pattern_tensor(pattern, false)?))
    })? {
        return Ok(Some(both));
    }
    with_bf16_bits(&[q, k, v], |s| {
        let mut out = vec![0u16; b * t * heads * d];
        let [q, k, v] = [s[0], s[1], s[2]].map(Operand::Bf16);
        let output = Output::Bf16(SharedOut(out.as_mut_ptr()));
        let pattern = attend((q, k, v), shape, keep_pattern, output);
        Ok((
            bf16_tensor_of_bits(out, &out_shape)?,
            pattern_tensor(pattern, true)?,
        ))
    })
}

/// The sizes of one attention: `t` queries, the last of `keys` positions, in `heads` heads
/// of size `d` that share `kv_heads` key/value heads, for each of `b` sequences.
#[derive(Clone, Copy)]
struct AttentionShape {
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    keys: usize,
    d: usize,
}

/// [`blocked_attention`]'s work: every head in parallel, its query rows in blocks of
/// [`BLOCK`], into `output`; returns the weights `[b, heads, t, keys]` when `keep_pattern`
/// (else nothing).
fn attend(
    (q, k, v): (Operand, Operand, Operand),
    shape: AttentionShape,
    keep_pattern: bool,
    output: Output,
) -> Vec<f32> {
    let AttentionShape {
        b,
        heads,
        kv_heads,
        t,
        keys,
        d,
    } = shape;
    let past = keys - t;
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let bf16_weights = matches!(output, Output::Bf16(_));
    let mut pattern = vec![
        0f32;
        if keep_pattern {
            b * heads * t * keys
        } else {
            0
        }
    ];
    let pattern_base = SharedOut(pattern.as_mut_ptr());
    (0..b * heads).into_par_iter().for_each(|bh| {
        let kv = bh / heads * kv_heads + bh % heads / group;
        let qh = q.values(bh * t * d, t * d);
        let kh = k.values(kv * keys * d, keys * d);
        let vh = v.values(kv * keys * d, keys * d);
        // A bf16 output's rows are summed here first, `d` apart.
        let mut head_out = vec![0f32; if bf16_weights { t * d } else { 0 }];
        let mut scores = vec![0f32; BLOCK * keys];
        for r0 in (0..t).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(t);
            let (m, n) = (r1 - r0, past + r1);
            // scores[m, n] = scale * q[r0..r1] @ k[0..past + r1]^T
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    qh[r0 * d..].as_ptr(),
                    1,
                    d as isize,
                    kh.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            with_wide_vectors(
                #[inline(always)]
                || {
                    for i in 0..m {
                        let row = &mut scores[i * n..(i + 1) * n];
                        let visible = past + r0 + i + 1;
                        softmax_in_place(&mut row[..visible]);
                        if bf16_weights {
                            for x in &mut row[..visible] {
                                *x = bf16::bf16_value(bf16::bf16_bits(*x));
                            }
                        }
                        row[visible..].iter_mut().for_each(|x| *x = 0.0);
                        if keep_pattern {
                            // SAFETY: row r0 + i of head bh, written by this task only.
                            unsafe {
                                let dst = pattern_base.at((bh * t + r0 + i) * keys);
                                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, n);
                            }
                        }
                    }
                },
            );
            // SAFETY: rows r0..r1 of head bh (in the output, or this task's own buffer),
            // written by this task only.
            unsafe {
                let (dst, stride) = match output {
                    Output::F32(out) => (out.at(head_row(bh, r0, heads, t, d)), heads * d),
                    Output::Bf16(_) => (head_out.as_mut_ptr().add(r0 * d), d),
                };
                weigh_values(&scores[..m * n], m, n, &vh, d, dst, stride)
            };
        }
        if let Output::Bf16(out) = output {
            for (pos, row) in head_out.chunks_exact(d).enumerate() {
                // SAFETY: row `pos` of head bh, inside the output, written by this task only.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out.at(head_row(bh, pos, heads, t, d)), d)
                };
                for (o, &x) in dst.iter_mut().zip(row) {
                    *o = bf16::bf16_bits(x);
                }
            }
        }
    });
    pattern
}

/// Where row `pos` of head `bh` (of `[b * heads]`) starts in a `[b, t, heads * d]` output.
fn head_row(bh: usize, pos: usize, heads: usize, t: usize, d: usize) -> usize {
    (bh / heads * t + pos) * heads * d + bh % heads * d
}

/// `pattern @ v` for every head, `pattern: [b, heads, t, keys]` (any weights, a replaced
/// pattern say), `v: [b, kv_heads, keys, d]`; returns `[b, t, heads * d]`. Rows are taken in
/// the blocks of [`causal_attention`], over the visible keys only where the weights past them
/// are zero, so the kernel's own pattern gives its output bit for bit.
pub(crate) fn weighted_values(pattern: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    if let Some(out) = through_f32(&[pattern, v], |s| weighted_values(s[0], s[1]))? {
        return Ok(Some(out));
    }
    let (b, heads, t, keys) = pattern.dims4()?;
    let (vb, kv_heads, vt, d) = v.dims4()?;
    if keys < t || vt != keys || vb != b || kv_heads == 0 || heads % kv_heads != 0 {
        return Ok(None); // the generic product reports the mismatch
    }
    let (group, past) = (heads / kv_heads, keys - t);
    with_f32_slices(&[pattern, v], |s| {
        let (p, v) = (s[0], s[1]);
        let mut out = vec![0f32; b * t * heads * d];
        let out_base = SharedOut(out.as_mut_ptr());
        (0..b * heads).into_par_iter().for_each(|bh| {
            let kv = bh / heads * kv_heads + bh % heads / group;
            let vh = &v[kv * keys * d..][..keys * d];
            let mut block = vec![0f32; BLOCK * keys];
            for r0 in (0..t).step_by(BLOCK) {
                let r1 = (r0 + BLOCK).min(t);
                let m = r1 - r0;
                let rows = &p[(bh * t + r0) * keys..][..m * keys];
                let causal = rows
                    .chunks(keys)
                    .all(|row| row[past + r1..].iter().all(|&x| x == 0.0));
                let n = if causal { past + r1 } else { keys };
                for (i, row) in rows.chunks(keys).enumerate() {
                    block[i * n..(i + 1) * n].copy_from_slice(&row[..n]);
                }
                // SAFETY: rows r0..r1 of head bh, written by this task only.
                unsafe {
                    let dst = out_base.at(head_row(bh, r0, heads, t, d));
                    weigh_values(&block[..m * n], m, n, vh, d, dst, heads * d)
                };
            }
        });
        Ok(Tensor::from_vec(out, (b, t, heads * d), &Device::Cpu)?)
    })
}

/// `dst[0..m, 0..d] = weights[m, n] @ v[0..n, 0..d]`, the rows of `dst` `stride` floats apart.
///
/// # Safety
/// Those `m` rows of `d` floats at `dst` must be valid for writes and written by no other
/// task meanwhile.
unsafe fn weigh_values(
    weights: &[f32],
    m: usize,
    n: usize,
    v: &[f32],
    d: usize,
    dst: *mut f32,
    stride: usize,
) {
    gemm::gemm(
        m,
        d,
        n,
        dst,
        1,
        stride as isize,
        false,
        weights.as_ptr(),
        1,
        n as isize,
        v.as_ptr(),
        1,
        d as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The heads `[b, heads, t, head_dim]` of `x: [b, t, width]` at `columns`, the first
/// `rotary_dims` of each rotated by the tables `cos`, `sin` (`[t or more, rotary_dims / 2]`).
/// In f32 with the arithmetic of candle's `rope`, so the result is its result bit for bit; in
/// bf16 that f32 arithmetic on the bf16 values, each output rounded once.
pub(crate) fn heads(
    x: &Tensor,
    columns: HeadColumns,
    rotary_dims: usize,
    (cos, sin): (&Tensor, &Tensor),
) -> Result<Option<Tensor>> {
    let (b, t, width) = x.dims3()?;
    let HeadColumns {
        heads,
        head_dim: d,
        spacing,
        offset,
    } = columns;
    let half = rotary_dims / 2;
    let tables_fit = |table: &Tensor| {
        table
            .dims2()
            .is_ok_and(|(rows, cols)| rows >= t && cols == half)
    };
    let fits = width == heads * spacing
        && offset + d <= spacing
        && rotary_dims <= d
        && rotary_dims.is_multiple_of(2)
        && (rotary_dims == 0 || (tables_fit(cos) && tables_fit(sin)));
    if !fits || t == 0 || d == 0 {
        return Ok(None); // the generic path reports what does not fit
    }
    let operands: Vec<&Tensor> = if rotary_dims == 0 {
        vec![x]
    } else {
        vec![x, cos, sin]
    };
    let shape = [b, heads, t, d];
    // Where head `bh`'s row `pos` starts in `x`.
    let source =
        move |bh: usize, pos: usize| (bh / heads * t + pos) * width + bh % heads * spacing + offset;
    if let Some(out) = with_f32_slices(&operands, |s| {
        let mut out = vec![0f32; b * heads * t * d];
        rotate_heads(s, &mut out, (t, d, rotary_dims), source, |x| x, |x| x);
        Ok(Tensor::from_vec(out, &shape, &Device::Cpu)?)
    })? {
        return Ok(Some(out));
    }
    with_bf16_bits(&operands, |s| {
        let mut out = vec![0u16; b * heads * t * d];
        rotate_heads(
            s,
            &mut out,
            (t, d, rotary_dims),
            source,
            bf16::bf16_value,
            bf16::bf16_bits,
        );
        bf16_tensor_of_bits(out, &shape)
    })
}

/// [`heads`] over the data `s` (`x`, then `cos` and `sin` when rotating) of one element type,
/// read as f32 by `load` and written by `store`: `out` holds the heads `[b * heads, t, d]`,
/// row `pos` of head `bh` taken from `x` at `source(bh, pos)`.
fn rotate_heads<T: Copy + Send + Sync>(
    s: &[&[T]],
    out: &mut [T],
    (t, d, rotary_dims): (usize, usize, usize),
    source: impl Fn(usize, usize) -> usize + Sync,
    load: impl Fn(T) -> f32 + Sync,
    store: impl Fn(f32) -> T + Sync,
) {
    let (x, cos, sin) = (s[0], s.get(1), s.get(2));
    let half = rotary_dims / 2;
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, out)| {
        for (pos, dst) in out.chunks_exact_mut(d).enumerate() {
            let src = &x[source(bh, pos)..][..d];
            if let (Some(cos), Some(sin)) = (cos, sin) {
                let (cos, sin) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for i in 0..half {
                    let (x1, x2) = (load(src[i]), load(src[i + half]));
                    let (c, s) = (load(cos[i]), load(sin[i]));
                    dst[i] = store(x1 * c - x2 * s);
                    dst[i + half] = store(x1 * s + x2 * c);
                }
            }
            dst[rotary_dims..].copy_from_slice(&src[rotary_dims..]);
        }
    });
}

/// `x W^T + b` in f32: `x: [rows, in]`, `w: [out, in]`, `b: [out]`. The product accumulates
/// onto rows that start as the bias, so the sum takes no second pass over a second buffer.
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (rows, inner) = x.dims2()?;
    let outer = w.dim(0)?;
    let operands: Vec<&Tensor> = [x, w].into_iter().chain(b).collect();
    with_f32_slices(&operands, |s| {
        let (x, w) = (s[0], s[1]);
        // Fresh zeroed pages, first touched by the threads that fill in the bias.
        let mut out = vec![0f32; rows * outer];
        if let Some(bias) = s.get(2).filter(|_| outer > 0) {
            out.par_chunks_mut(outer)
                .for_each(|row| row.copy_from_slice(bias));
        }
        if inner > 0 {
            product_with_transposed(&mut out, x, w, inner, b.is_some(), true);
        }
        Ok(Tensor::from_vec(out, (rows, outer), &Device::Cpu)?)
    })
}

/// `x W^T + b` for f32 `x: [rows, in]` on the CPU with `W` packed as `[in, out]` once at load
/// (no per-call repacking, which dominated small batches through the `gemm` crate).
pub(crate) fn linear_packed_f32(
    kernel: F32Kernel,
    x: &Tensor,
    weight: &Packed<F32>,
    bias: Option<&[f32]>,
) -> Result<Tensor> {
    let (rows, inner) = x.dims2()?;
    let outer = weight.n();
    check_layer_width(inner, weight.k(), outer, bias)?;
    with_f32_slices(&[x], |s| {
        let mut out = vec![0f32; rows * outer];
        packed::gemm(kernel, s[0], inner, rows, weight, &mut out, outer);
        if let Some(bias) = bias.filter(|_| outer > 0) {
            out.par_chunks_mut(outer).for_each(|row| {
                for (o, b) in row.iter_mut().zip(bias) {
                    *o += b;
                }
            });
        }
        Ok(Tensor::from_vec(out, (rows, outer), &Device::Cpu)?)
    })?
    .ok_or_else(|| {
        Error::InvalidArgument(format!(
            "an f32 layer packed for the CPU was given {:?} on {:?}",
            x.dtype(),
            x.device()
        ))
    })
}

/// Refuses rows of `inner` values (or a bias not of `outer`) for a layer of `k` inputs and
/// `outer` outputs.
fn check_layer_width(inner: usize, k: usize, outer: usize, bias: Option<&[f32]>) -> Result<()> {
    if inner != k {
        return Err(Error::InvalidArgument(format!(
            "a linear layer of {k} inputs and {outer} outputs was given rows of {inner}"
        )));
    }
    match bias.map(<[f32]>::len).filter(|&len| len != outer) {
        Some(len) => Err(Error::InvalidArgument(format!(
            "a linear layer of {k} inputs and {outer} outputs was given a bias of {len}"
        ))),
        None => Ok(()),
    }
}

/// Floats of f32 sums [`linear_bf16`] holds at once per calling thread (16 MiB; more when a
/// single panel of columns over all the rows takes more).
const SUMS_BUFFER: usize = 1 << 22;

thread_local! {
    /// [`linear_bf16`]'s buffer of sums, kept between calls so that a pass does not fault in
    /// fresh pages for every product.
    static SUMS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `x W^T + b` for bf16 `x: [rows, in]` on the CPU, with `W` packed as `[in, out]`
/// ([`PackedB`]) and the bias in f32: bf16 inputs, f32 sums with the bias added, each output
/// rounded once to bf16, as PyTorch's bf16 linear layers on a CPU. Wide outputs are made in
/// slices of columns whose sums fit a fixed buffer; `W` is read once over them.
pub(crate) fn linear_bf16(
    kernel: Kernel,
    x: &Tensor,
    weight: &PackedB,
    bias: Option<&[f32]>,
) -> Result<Tensor> {
    linear_bf16_in_slices(kernel, x, weight, bias, SUMS_BUFFER)
}

/// [`linear_bf16`] with sums of at most about `buffer` floats at once.
fn linear_bf16_in_slices(
    kernel: Kernel,
    x: &Tensor,
    weight: &PackedB,
    bias: Option<&[f32]>,
    buffer: usize,
) -> Result<Tensor> {
    let (rows, inner) = x.dims2()?;
    let outer = weight.n();
    check_layer_width(inner, weight.k(), outer, bias)?;
    with_bf16_bits(&[x], |s| {
        let stride = weight.lhs_stride();
        let padded: Vec<u16>;
        let lhs = if stride == inner {
            s[0]
        } else {
            // An odd width: each row gets the zero pad value the packed pairs expect.
            padded = s[0]
                .chunks(inner.max(1))
                .flat_map(|row| row.iter().copied().chain([0]))
                .collect();
            &padded
        };
        // u16 zeros come as fresh zero pages (bf16 zeros would be written by a memset).
        let mut out = vec![0u16; rows * outer];
        let tensor = |out: Vec<u16>| bf16_tensor_of_bits(out, &[rows, outer]);
        if rows == 0 || outer == 0 {
            return tensor(out);
        }
        let width = outer.min((buffer / rows / bf16::PANEL_WIDTH).max(1) * bf16::PANEL_WIDTH);
        // Taken out of the thread's slot, not borrowed: a nested call (rayon may run another
        // pass's product on this thread while it waits) then gets a buffer of its own.
        let mut sums = SUMS.take();
        sums.resize(rows * width, 0.0);
        for first in (0..outer).step_by(width) {
            let columns = first..(first + width).min(outer);
            let n = columns.len();
            bf16::gemm_columns(kernel, lhs, stride, rows, weight, columns, &mut sums, n);
            out.par_chunks_mut(outer)
                .zip(sums.par_chunks(n))
                .for_each(|(out, sums)| {
                    let out = &mut out[first..first + n];
                    with_wide_vectors(
                        #[inline(always)]
                        || match bias {
                            Some(bias) => {
                                for ((o, &s), &b) in out.iter_mut().zip(sums).zip(&bias[first..]) {
                                    *o = bf16::bf16_bits(s + b);
                                }
                            }
                            None => {
                                for (o, &s) in out.iter_mut().zip(sums) {
                                    *o = bf16::bf16_bits(s);
                                }
                            }
                        },
                    )
                });
        }
        if sums.len() <= SUMS_BUFFER {
            SUMS.set(sums); // a larger one (very many rows) is not kept
        }
        tensor(out)
    })?
    .ok_or_else(|| Error::InvalidArgument(format!("expected bf16 on the CPU, got {:?}", x.dtype())))
}

/// `a + b` for bf16 tensors of one shape on the CPU, summed in f32 and rounded once (as
/// candle's generic add, which converts element by element without vector instructions).
pub(crate) fn add_bf16(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    zip_bf16(
        a,
        b,
        #[inline(always)]
        |x, y| bf16::bf16_bits(x + y),
    )
}

/// `op` on the f32 values of the elements of two bf16 tensors of one shape on the CPU, its
/// results bf16 bits, in one parallel pass. `None` unless both are bf16 on the CPU and of one
/// shape. `op` must be `#[inline(always)]`: it runs compiled for AVX-512 where the CPU has it.
fn zip_bf16(a: &Tensor, b: &Tensor, op: impl Fn(f32, f32) -> u16 + Sync) -> Result<Option<Tensor>> {
    if a.shape() != b.shape() {
        return Ok(None);
    }
    with_bf16_bits(&[a, b], |s| {
        let (x, y) = (s[0], s[1]);
        bf16_tensor_from(
            x.len(),
            a.dims(),
            #[inline(always)]
            |range, out| {
                for ((o, &x), &y) in out.iter_mut().zip(&x[range.clone()]).zip(&y[range]) {
                    *o = op(bf16::bf16_value(x), bf16::bf16_value(y));
                }
            },
        )
    })
}

/// Runs `kernel`, one of this module's f32 kernels, on bf16 CPU tensors: each input widened
/// to f32 and the output rounded back to bf16. `None` unless every input is bf16 on the CPU,
/// or when the kernel does not apply.
pub(crate) fn through_f32(
    inputs: &[&Tensor],
    kernel: impl FnOnce(&[&Tensor]) -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    if !inputs.iter().all(|t| is_cpu_bf16(t)) {
        return Ok(None);
    }
    let wide = inputs
        .iter()
        .map(|t| Ok(widened_bf16(t)?.expect("bf16 on the CPU, checked above")))
        .collect::<Result<Vec<_>>>()?;
    let wide: Vec<&Tensor> = wide.iter().collect();
    kernel(&wide)?.map(|out| rounded_to_bf16(&out)).transpose()
}

/// `x * (1 + erf(x / sqrt 2)) / 2` elementwise, in parallel, with [`erf`]: within 1.8e-7 of the
/// exact GELU relative to `max(1, |x|)` (the test measures it over [-12, 12] and the tails).
pub(crate) fn gelu_erf(x: &Tensor) -> Result<Option<Tensor>> {
    if let Some(out) = with_bf16_bits(&[x], |s| {
        bf16_tensor_from(
            s[0].len(),
            x.dims(),
            #[inline(always)]
            |range, out| {
                for (o, &bits) in out.iter_mut().zip(&s[0][range]) {
                    let v = bf16::bf16_value(bits);
                    *o =
                        bf16::bf16_bits((erf(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v);
                }
            },
        )
    })? {
        return Ok(Some(out));
    }
    with_f32_slices(&[x], |s| {
        f32_tensor_map(
            s[0],
            x.shape(),
            #[inline(always)]
            |v| (erf(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v,
        )
    })
}

/// `silu(gate) * up` for f32 or bf16 tensors of one shape on the CPU (a gated MLP's hidden
/// activations) in one parallel pass, where candle's generic ops take two (and run in a
/// thread pool of their own). In bf16 each step is in f32 and rounded to bf16 as PyTorch
/// does: the SiLU, then the product. `None` for other tensors.
pub(crate) fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if gate.shape() != up.shape() {
        return Ok(None);
    }
    if let Some(gated) = zip_bf16(
        gate,
        up,
        #[inline(always)]
        |g, u| bf16::bf16_bits(bf16::bf16_value(bf16::bf16_bits(silu(g))) * u),
    )? {
        return Ok(Some(gated));
    }
    with_f32_slices(&[gate, up], |s| {
        let (g, u) = (s[0], s[1]);
        f32_tensor_from(
            g.len(),
            gate.dims(),
            #[inline(always)]
            |range, out| {
                for ((o, &g), &u) in out.iter_mut().zip(&g[range.clone()]).zip(&u[range]) {
                    *o = silu(g) * u;
                }
            },
        )
    })
}

/// `x * sigmoid(x)`, with [`exp_of_negative`] of `|x|` (no overflow at either end).
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_of_negative(x.abs());
    let sigmoid = if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    x * sigmoid
}

/// RMSNorm of the rows of bf16 `x: [..., d]` on the CPU with a bf16 `weight: [d]`, as
/// Hugging Face computes it in bf16: `x * rsqrt(mean(x²) + eps)` in f32, rounded to bf16, then
/// times the weight, rounded again.
pub(crate) fn rms_norm_bf16(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    normalize_rows_bf16(
        x,
        &[weight],
        #[inline(always)]
        |row, params, out| {
            let mean = lane_sum(row, |v| v * v) / row.len() as f32;
            let scale = 1.0 / (mean + eps as f32).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(row).zip(params[0]) {
                let normed = bf16::bf16_value(bf16::bf16_bits(v * scale));
                *o = bf16::bf16_bits(normed * bf16::bf16_value(w));
            }
        },
    )
}

/// LayerNorm of the rows of bf16 `x: [..., d]` on the CPU with bf16 `weight` and `bias`
/// (`[d]`): mean and variance (of the differences from the mean) in f32, each output rounded
/// once, as PyTorch's bf16 `layer_norm`.
pub(crate) fn layer_norm_bf16(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    normalize_rows_bf16(
        x,
        &[weight, bias],
        #[inline(always)]
        |row, params, out| {
            let (mean, scale) = mean_and_scale(row, eps as f32);
            for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(params[0]).zip(params[1]) {
                let (w, b) = (bf16::bf16_value(w), bf16::bf16_value(b));
                *o = bf16::bf16_bits((v - mean) * scale * w + b);
            }
        },
    )
}

/// LayerNorm of the rows of f32 `x: [..., d]` on the CPU with f32 `weight` and `bias`
/// (`[d]`), in parallel, with the variance of the differences from the mean as PyTorch takes
/// it: candle's kernel takes `E[x²] − mean²`, which cancels for rows far from zero (a
/// constant row came out NaN). `None` for other tensors.
pub(crate) fn layer_norm_f32(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let d = weight.elem_count();
    if x.dims().last() != Some(&d) || weight.dims() != [d] || bias.dims() != [d] || d == 0 {
        return Ok(None);
    }
    with_f32_slices(&[x, weight, bias], |s| {
        let mut out = vec![0f32; s[0].len()];
        out.par_chunks_mut(d)
            .zip(s[0].par_chunks(d))
            .for_each(|(out, row)| {
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        let (mean, scale) = mean_and_scale(row, eps as f32);
                        for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(s[1]).zip(s[2]) {
                            *o = (v - mean) * scale * w + b;
                        }
                    },
                )
            });
        Ok(Tensor::from_vec(out, x.dims(), &Device::Cpu)?)
    })
}

/// A row's mean and `1 / sqrt(variance + eps)`, the variance taken of the differences from
/// the mean, as PyTorch's LayerNorm does. The corrected two-pass form: the differences from
/// the first mean also sum to that mean's rounding error, which is taken out of both (in a
/// row far from zero, 1/sqrt(eps) would magnify it: a constant row would not give the bias).
#[inline(always)]
fn mean_and_scale(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let first = lane_sum(row, |v| v) / d;
    let correction = lane_sum(row, |v| v - first) / d;
    let squares = lane_sum(row, |v| (v - first) * (v - first)) / d;
    let variance = (squares - correction * correction).max(0.0);
    (first + correction, 1.0 / (variance + eps).sqrt())
}

/// Runs `normalize(row, params, out)` on every row of bf16 `x: [..., d]` on the CPU, in
/// parallel: `row` holds the row's values widened to f32, `params` the bits of the bf16
/// `[d]` tensors `params`, and `out` takes the row's output bits. `None` unless all are bf16
/// on the CPU and the rows have the parameters' length. `normalize` must be
/// `#[inline(always)]`: it runs compiled for AVX-512 where the CPU has it.
fn normalize_rows_bf16(
    x: &Tensor,
    params: &[&Tensor],
    normalize: impl Fn(&[f32], &[&[u16]], &mut [u16]) + Sync,
) -> Result<Option<Tensor>> {
    let d = params[0].elem_count();
    let fits = x.dims().last() == Some(&d) && params.iter().all(|p| p.dims() == [d]);
    if !fits || d == 0 {
        return Ok(None);
    }
    let operands: Vec<&Tensor> = [x].into_iter().chain(params.iter().copied()).collect();
    with_bf16_bits(&operands, |s| {
        let mut out = vec![0u16; s[0].len()];
        out.par_chunks_mut(d).zip(s[0].par_chunks(d)).for_each_init(
            || vec![0f32; d],
            |row, (out, bits)| {
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        for (r, &b) in row.iter_mut().zip(bits) {
                            *r = bf16::bf16_value(b);
                        }
                        normalize(row, &s[1..], out)
                    },
                )
            },
        );
        bf16_tensor_of_bits(out, x.dims())
    })
}

/// The sum of `f(v)` over `values`, taken in 16 independent lanes that the compiler
/// vectorises (a single running sum cannot be reordered).
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (sum, &v) in lanes.iter_mut().zip(chunk) {
            *sum += f(v);
        }
    }
    for (sum, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *sum += f(v);
    }
    lanes.iter().sum()
}

/// erf(x) within 1.5e-7 plus f32 rounding: Abramowitz and Stegun's formula 7.1.26 (as
/// PyTorch's CPU GELU has it), in plain arithmetic that the compiler vectorises, where libm's
/// `erff` is a call per element (it took a tenth of a Pythia forward pass).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_of_negative(a * a)).copysign(x)
}

/// The softmax of `row`, in place. The maximum, the exponentials and their sum are taken in
/// independent lanes that the compiler vectorises (a single running sum or maximum cannot be
/// reordered, and libm's `expf` is a call per element). A NaN in the row makes every weight NaN.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    const LANES: usize = 16;
    let larger = |a: f32, x: f32| if x > a { x } else { a }; // ignores NaN, like f32::max
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in maxima.iter_mut().zip(chunk) {
            *m = larger(*m, x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxima)
        .fold(f32::NEG_INFINITY, |a, &x| larger(a, x));
    row.iter_mut().for_each(|x| *x = exp_of_negative(max - *x));
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, &x) in sums.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    let inv = 1.0 / (sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>());
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::cpu::packed::F32Kernel;
    use crate::model::layers::{attention_pattern, causal_attention_generic, causal_mask, Linear};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::compare::max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn blocked_attention_matches_generic_path() {
        // Several blocks with a ragged last one, grouped-query heads, odd head size; queries
        // after cached positions (`keys > t`), one new token among them.
        for (t, keys, heads, kv_heads, d) in [
            (150, 150, 6, 2, 20),
            (64, 64, 4, 4, 8),
            (1, 1, 2, 1, 4),
            (700, 700, 2, 1, 64),
            (70, 133, 6, 2, 20),
            (1, 90, 4, 2, 8),
        ] {
            let q = Tensor::randn(0f32, 1., (2, heads, t, d), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1., (2, kv_heads, keys, d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1., (2, kv_heads, keys, d), &Device::Cpu).unwrap();
            let fast = causal_attention(&q, &k, &v).unwrap().unwrap();
            let mask = causal_mask(t, keys, &Device::Cpu).unwrap();
            let reference = causal_attention_generic(&q, &k, &v, &mask).unwrap();
            assert!(
                max_abs_diff(&fast, &reference) < 1e-5,
                "t={t} heads={heads}"
            );

            // The kept pattern is the generic one, and keeping it changes no bit of the
            // output; the output re-made from it is bit-identical too.
            let (out, pattern) = causal_attention_with_pattern(&q, &k, &v).unwrap().unwrap();
            let generic_pattern = attention_pattern(&q, &k, &mask).unwrap();
            assert!(max_abs_diff(&pattern, &generic_pattern) < 1e-6, "t={t}");
            assert_eq!(max_abs_diff(&out, &fast), 0.0, "t={t}");
            let remade = weighted_values(&pattern, &v).unwrap().unwrap();
            assert_eq!(max_abs_diff(&remade, &fast), 0.0, "t={t}");
        }
        let f16 = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F16, &Device::Cpu).unwrap();
        assert!(causal_attention(&f16, &f16, &f16).unwrap().is_none());
        assert!(causal_attention_with_pattern(&f16, &f16, &f16)
            .unwrap()
            .is_none());
        assert!(weighted_values(&f16, &f16).unwrap().is_none());
    }

    /// bf16 values of a standard normal sample.
    fn bf16_randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// Asserts that `got` (bf16) is within `ulps` bf16 units in the last place of `want`
    /// (any float dtype), measured at `want`'s magnitude, or `floor` absolutely.
    fn assert_bf16_close(got: &Tensor, want: &Tensor, ulps: f32, floor: f32, what: &str) {
        assert_eq!(got.dtype(), DType::BF16, "{what}");
        assert_eq!(got.dims(), want.dims(), "{what}");
        let f32s = |t: &Tensor| -> Vec<f32> {
            let t = t.to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        for (i, (g, w)) in f32s(got).into_iter().zip(f32s(want)).enumerate() {
            let tolerance = (ulps * w.abs() / 128.0).max(floor);
            assert!((g - w).abs() <= tolerance, "{what} at {i}: {g} vs {w}");
        }
    }

    /// A bf16 model's attention: the bf16 kernel (f32 inside, weights rounded to bf16) against
    /// candle's generic bf16 ops, and the pattern it keeps re-making its output exactly.
    #[test]
    fn bf16_attention_matches_generic_path() {
        for (t, heads, kv_heads, d) in [(150, 6, 2, 20), (1, 2, 1, 4), (130, 2, 1, 64)] {
            let q = bf16_randn(&[2, heads, t, d]);
            let (k, v) = (
                bf16_randn(&[2, kv_heads, t, d]),
                bf16_randn(&[2, kv_heads, t, d]),
            );
            let fast = causal_attention(&q, &k, &v).unwrap().unwrap();
            let mask = causal_mask(t, t, &Device::Cpu).unwrap();
            let reference = causal_attention_generic(&q, &k, &v, &mask).unwrap();
            assert_bf16_close(&fast, &reference, 2.0, 2e-2, &format!("t={t}"));

            let (out, pattern) = causal_attention_with_pattern(&q, &k, &v).unwrap().unwrap();
            let generic_pattern = attention_pattern(&q, &k, &mask).unwrap();
            assert_bf16_close(&pattern, &generic_pattern, 1.0, 1e-6, &format!("t={t}"));
            assert_eq!(max_abs_diff(&out, &fast), 0.0, "t={t}");
            let remade = weighted_values(&pattern, &v).unwrap().unwrap();
            assert_eq!(max_abs_diff(&remade, &fast), 0.0, "t={t}");
        }
    }

    /// bf16 linear layers against the f32 product of the same bf16 values, rounded once: at
    /// most one unit apart (the sums' order differs). Odd and even widths, outputs made in
    /// one slice and in several, with and without a bias.
    #[test]
    fn bf16_linear_matches_rounded_f32_product() {
        for (rows, inner, outer) in [(1, 7, 5), (70, 33, 200), (64, 256, 300)] {
            let x = bf16_randn(&[rows, inner]);
            let w = bf16_randn(&[outer, inner]);
            let b = bf16_randn(&[outer]);
            let Linear::PackedBf16 { weight, bias } =
                Linear::packed_bf16(&w, Some(b.clone())).unwrap()
            else {
                panic!("a bf16 CPU layer is packed");
            };
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let product = wide(&x).matmul(&wide(&w).t().unwrap()).unwrap();
            let with_bias = product.broadcast_add(&wide(&b)).unwrap();
            let bias = bias.as_ref().map(|(_, wide)| wide.as_slice());
            for kernel in [Kernel::Portable, Kernel::detect()] {
                for buffer in [SUMS_BUFFER, 2 * rows * bf16::PANEL_WIDTH] {
                    let what = format!("{rows} x {inner} x {outer}, {kernel:?}, {buffer}");
                    let plain = linear_bf16_in_slices(kernel, &x, &weight, None, buffer);
                    assert_bf16_close(&plain.unwrap(), &product, 1.0, 1e-5, &what);
                    let biased = linear_bf16_in_slices(kernel, &x, &weight, bias, buffer);
                    assert_bf16_close(&biased.unwrap(), &with_bias, 1.0, 1e-5, &what);
                }
            }
            // Unpacked (where bf16 products are slower than f32 ones): the f32 layer on the
            // widened values, rounded once.
            let unpacked = Linear::Tensors(candle_nn::Linear::new(w.clone(), Some(b.clone())));
            let what = format!("{rows} x {inner} x {outer} unpacked");
            assert_bf16_close(&unpacked.forward(&x).unwrap(), &with_bias, 1.0, 1e-5, &what);
            if inner == 7 {
                // No rows; a bias of the wrong length.
                let none = linear_bf16(Kernel::Portable, &bf16_randn(&[0, inner]), &weight, bias);
                assert_eq!(none.unwrap().dims(), &[0, outer]);
                let short = linear_bf16(Kernel::Portable, &x, &weight, Some(&[0.0; 2]));
                assert!(short
                    .unwrap_err()
                    .to_string()
                    .contains("7 inputs and 5 outputs was given a bias of 2"));
            }
            let wrong = linear_bf16(
                Kernel::Portable,
                &bf16_randn(&[2, inner + 1]),
                &weight,
                None,
            );
            assert!(wrong
                .unwrap_err()
                .to_string()
                .contains(&format!("rows of {}", inner + 1)));
        }
    }

    /// f32 layers packed at load, through every f32 kernel this CPU has, against candle's
    /// product: with and without the bias, over leading dimensions, with no rows; rows of the
    /// wrong width and weights of neither f32 nor bf16 are refused.
    #[test]
    fn packed_f32_linear_matches_candle() {
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
        for (rows, inner, outer) in [(1, 7, 5), (70, 300, 200), (64, 768, 130)] {
            let (x, w, b) = (
                randn(&[rows, inner]),
                randn(&[outer, inner]),
                randn(&[outer]),
            );
            let layer = Linear::packed_f32(&w, Some(b.clone())).unwrap();
            let Linear::PackedF32 { weight, bias } = &layer else {
                panic!("an f32 layer packed for the CPU");
            };
            let product = x.matmul(&w.t().unwrap()).unwrap();
            let with_bias = product.broadcast_add(&b).unwrap();
            let tolerance = 1e-5 * (inner as f64).sqrt();
            let bias = bias.as_ref().map(|(_, wide)| wide.as_slice());
            for kernel in [F32Kernel::Portable, F32Kernel::detect()] {
                let what = format!("{rows} x {inner} x {outer}, {kernel:?}");
                let plain = linear_packed_f32(kernel, &x, weight, None).unwrap();
                assert!(max_abs_diff(&plain, &product) < tolerance, "{what}");
                let biased = linear_packed_f32(kernel, &x, weight, bias).unwrap();
                assert!(max_abs_diff(&biased, &with_bias) < tolerance, "{what}");
            }
            let batched = x.reshape((1, rows, inner)).unwrap();
            let forward = layer.forward(&batched).unwrap();
            assert_eq!(forward.dims(), &[1, rows, outer]);
            let forward = forward.reshape((rows, outer)).unwrap();
            assert!(max_abs_diff(&forward, &with_bias) < tolerance);
            let product_only = layer.product(&x).unwrap();
            assert!(max_abs_diff(&product_only, &product) < tolerance);
            let none = layer.forward(&randn(&[0, inner])).unwrap();
            assert_eq!(none.dims(), &[0, outer]);
            let wrong = layer
                .forward(&randn(&[2, inner + 1]))
                .unwrap_err()
                .to_string();
            assert!(
                wrong.contains(&format!(
                    "{inner} inputs and {outer} outputs was given rows of {}",
                    inner + 1
                )),
                "{wrong}"
            );
        }
        // A bf16 weight packs as its exact f32 values; other dtypes are refused by name.
        let weight = randn(&[5, 3]).to_dtype(DType::BF16).unwrap();
        let x = randn(&[2, 3]);
        let from_bf16 = Linear::packed_f32(&weight, None).unwrap();
        let from_f32 = Linear::packed_f32(&weight.to_dtype(DType::F32).unwrap(), None).unwrap();
        let (a, b) = (
            from_bf16.forward(&x).unwrap(),
            from_f32.forward(&x).unwrap(),
        );
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        let u32_weight = Tensor::ones((3, 2), DType::U32, &Device::Cpu).unwrap();
        let Err(refused) = Linear::packed_f32(&u32_weight, None) else {
            panic!("a u32 weight is not packed");
        };
        assert!(refused
            .to_string()
            .contains("expected an f32 or bf16 weight on the CPU, got U32"));
    }

    /// The bf16 elementwise kernels and RMSNorm against the same steps in f32 with the same
    /// roundings (candle's generic ops for the sum, which is bit for bit).
    #[test]
    fn bf16_elementwise_kernels_and_rms_norm_match_f32_steps() {
        let (x, y) = (bf16_randn(&[3, 50, 37]), bf16_randn(&[3, 50, 37]));
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let round = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let sum = add_bf16(&x, &y).unwrap().unwrap();
        assert_eq!(max_abs_diff(&sum, &(&x + &y).unwrap()), 0.0);
        assert!(add_bf16(&x, &y.narrow(2, 0, 36).unwrap())
            .unwrap()
            .is_none());

        let gelu = gelu_erf(&x).unwrap().unwrap();
        assert_bf16_close(&gelu, &wide(&x).gelu_erf().unwrap(), 1.0, 1e-6, "gelu");

        let silu = round(wide(&x).silu().unwrap());
        let gated = round((wide(&silu) * wide(&y)).unwrap());
        let fast = silu_mul(&x, &y).unwrap().unwrap();
        assert_bf16_close(&fast, &wide(&gated), 1.0, 1e-6, "silu(gate) * up");
        // In f32, against candle's two ops, over wide values.
        let (xf, yf) = (wide(&x), wide(&y));
        let spread = (&xf * 8.0).unwrap();
        let want = (spread.silu().unwrap() * &yf).unwrap();
        let got = silu_mul(&spread, &yf).unwrap().unwrap();
        let relative = max_abs_diff(&got, &want) / max_abs_diff(&want, &want.zeros_like().unwrap());
        assert!(relative < 1e-6, "f32 silu(gate) * up: {relative}");
        assert!(silu_mul(&xf, &yf.narrow(2, 0, 36).unwrap())
            .unwrap()
            .is_none());

        let weight = bf16_randn(&[37]);
        let eps = 1e-5;
        let xf = wide(&x);
        let inv_rms = (xf.sqr().unwrap().mean_keepdim(2).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let normed = round(xf.broadcast_mul(&inv_rms).unwrap());
        let reference = round(wide(&normed).broadcast_mul(&wide(&weight)).unwrap());
        let fast = rms_norm_bf16(&x, &weight, eps).unwrap().unwrap();
        assert_bf16_close(&fast, &wide(&reference), 1.0, 1e-6, "rms norm");
        // Only the mean's order of summation differs, which rarely moves a rounding: nearly
        // all are bit for bit (rounding once instead of twice would move about a quarter).
        let equal = (fast.to_dtype(DType::F32).unwrap())
            .eq(&wide(&reference))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            equal > 0.99,
            "rms norm: {equal} of the values are bit for bit"
        );

        // LayerNorm: candle's f32 one on the widened values, rounded once.
        let (weight, bias) = (bf16_randn(&[37]), bf16_randn(&[37]));
        let reference = candle_nn::ops::layer_norm(&xf, &wide(&weight), &wide(&bias), 1e-5);
        let fast = layer_norm_bf16(&x, &weight, &bias, 1e-5).unwrap().unwrap();
        assert_bf16_close(&fast, &reference.unwrap(), 1.0, 1e-5, "layer norm");
        let short = bias.narrow(0, 0, 36).unwrap();
        assert!(layer_norm_bf16(&x, &weight, &short, 1e-5)
            .unwrap()
            .is_none());
    }

    #[test]
    fn weighted_values_match_generic_product_for_any_pattern() {
        // Weights above the diagonal in some rows only (an edited pattern), a strided view,
        // grouped-query heads.
        let (b, heads, kv_heads, t, d) = (2, 4, 2, 150, 12);
        let pattern = Tensor::rand(0f32, 1., (b, heads, t, t), &Device::Cpu).unwrap();
        let causal = pattern
            .broadcast_mul(&causal_mask(t, t, &Device::Cpu).unwrap().exp().unwrap())
            .unwrap();
        let v = Tensor::randn(0f32, 1., (b, kv_heads, t, d), &Device::Cpu).unwrap();
        let some_rows_full = Tensor::cat(
            &[
                causal.narrow(2, 0, 100).unwrap(),
                pattern.narrow(2, 100, 50).unwrap(),
            ],
            2,
        )
        .unwrap();
        let strided = pattern.transpose(2, 3).unwrap();
        for weights in [causal, some_rows_full, pattern, strided] {
            let fast = weighted_values(&weights, &v).unwrap().unwrap();
            let reference = crate::model::layers::weighted_values_generic(&weights, &v).unwrap();
            assert!(max_abs_diff(&fast, &reference) < 1e-4);
        }
    }

    #[test]
    fn softmax_matches_f64_and_propagates_nan() {
        // Lengths around the lane width; scores spread wide enough that some underflow.
        for len in [1, 15, 16, 17, 33, 300] {
            for spread in [1f32, 30.0, 200.0] {
                let scores: Vec<f32> = (0..len)
                    .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * spread)
                    .collect();
                let mut row = scores.clone();
                softmax_in_place(&mut row);
                // Exact from the f32 differences the kernel exponentiates.
                let max = scores.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let weight = |x: f32| (-((max - x) as f64)).exp();
                let sum: f64 = scores.iter().map(|&x| weight(x)).sum();
                for (&x, &y) in scores.iter().zip(&row) {
                    let exact = weight(x) / sum;
                    assert!(
                        (y as f64 - exact).abs() < 1e-6 * exact.max(1e-30) + 1e-37,
                        "len {len} spread {spread}: {y} vs {exact}"
                    );
                }
            }
        }
        let mut row = vec![0.5f32; 20];
        row[17] = f32::NAN;
        softmax_in_place(&mut row);
        assert!(row.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn heads_are_the_generic_ones_bit_for_bit() {
        // GPT-NeoX's interleaved q/k/v with a partial rotation, Llama's full rotation, values
        // (no rotation), and tables longer than the sequence.
        use crate::model::layers::Rotary;
        let (b, t, heads, d) = (2, 37, 3, 20);
        let x = Tensor::randn(0f32, 1., (b, t, heads * 3 * d), &Device::Cpu).unwrap();
        for (rotary_dims, spacing, offset, rotate) in [
            (6, 3 * d, 0, true),
            (6, 3 * d, d, true),
            (6, 3 * d, 2 * d, false),
            (d, d, 0, true),
            (d, 3 * d, d, true),
        ] {
            let rotary = Rotary::new(rotary_dims, 10_000.0);
            let tables = rotary.tables(0, t + 5, candle_core::DType::F32, &Device::Cpu);
            let (cos, sin) = tables.unwrap();
            let x = x.narrow(2, 0, heads * spacing).unwrap();
            let columns = HeadColumns {
                heads,
                head_dim: d,
                spacing,
                offset,
            };
            let fast = rotary.heads(&x, columns, rotate, (&cos, &sin)).unwrap();
            let reference = rotary
                .heads_generic(&x, columns, rotate, (&cos, &sin))
                .unwrap();
            assert_eq!(fast.dims(), &[b, heads, t, d]);
            assert_eq!(
                max_abs_diff(&fast, &reference),
                0.0,
                "{rotary_dims} dims at {offset} of {spacing}"
            );
        }
        let f16 = Tensor::zeros((1, 2, 4), candle_core::DType::F16, &Device::Cpu).unwrap();
        let columns = HeadColumns {
            heads: 1,
            head_dim: 4,
            spacing: 4,
            offset: 0,
        };
        let no_tables = Tensor::zeros((2, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(super::heads(&f16, columns, 0, (&no_tables, &no_tables))
            .unwrap()
            .is_none());
    }

    /// In bf16 the heads are rotated in f32 from the bf16 values and rounded once: the
    /// generic f32 path on the widened values, rounded, bit for bit (candle's bf16 `rope`
    /// rounds each step instead).
    #[test]
    fn bf16_heads_are_the_rounded_f32_ones() {
        use crate::model::layers::Rotary;
        let (t, heads, d) = (37, 3, 20);
        let x = bf16_randn(&[2, t, heads * 3 * d]);
        let rotary = Rotary::new(6, 10_000.0);
        let (cos, sin) = rotary.tables(0, t, DType::BF16, &Device::Cpu).unwrap();
        for (offset, rotate) in [(0, true), (2 * d, false)] {
            let columns = HeadColumns {
                heads,
                head_dim: d,
                spacing: 3 * d,
                offset,
            };
            let fast = rotary.heads(&x, columns, rotate, (&cos, &sin)).unwrap();
            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let generic = rotary
                .heads_generic(&wide(&x), columns, rotate, (&wide(&cos), &wide(&sin)))
                .unwrap();
            assert_eq!(fast.dtype(), DType::BF16);
            let rounded = generic.to_dtype(DType::BF16).unwrap();
            assert_eq!(max_abs_diff(&fast, &rounded), 0.0, "rotate {rotate}");
        }
    }

    #[test]
    fn linear_matches_product_plus_bias() {
        // One row, a ragged width, a transposed (strided) input; with and without a bias.
        for (rows, inner, outer) in [(1, 7, 5), (130, 48, 97), (64, 256, 300)] {
            let x = Tensor::randn(0f32, 1., (inner, rows), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            let w = Tensor::randn(0f32, 1., (outer, inner), &Device::Cpu).unwrap();
            let b = Tensor::randn(0f32, 1., outer, &Device::Cpu).unwrap();
            let product = x.matmul(&w.t().unwrap()).unwrap();
            let plain = linear(&x, &w, None).unwrap().unwrap();
            assert!(
                max_abs_diff(&plain, &product) < 1e-4,
                "{rows} x {inner} x {outer}"
            );
            let biased = linear(&x, &w, Some(&b)).unwrap().unwrap();
            let reference = product.broadcast_add(&b).unwrap();
            assert!(
                max_abs_diff(&biased, &reference) < 1e-4,
                "{rows} x {inner} x {outer}"
            );
        }
        let bf16 = Tensor::zeros((2, 2), DType::BF16, &Device::Cpu).unwrap();
        assert!(linear(&bf16, &bf16, None).unwrap().is_none());
    }

    #[test]
    fn parallel_gelu_is_within_3e7_of_the_exact_one() {
        // A dense sweep of [-12, 12] and the tails, in f64 through candle's erf.
        let mut xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([
            1e-30,
            -1e-30,
            0.0,
            -0.0,
            30.0,
            -30.0,
            1e6,
            -1e6,
            f32::MAX,
            f32::MIN_POSITIVE,
        ]);
        let n = xs.len();
        let fast = gelu_erf(&Tensor::from_vec(xs.clone(), n, &Device::Cpu).unwrap())
            .unwrap()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut worst = 0f64;
        for (&x, &y) in xs.iter().zip(&fast) {
            let x64 = x as f64;
            let exact = x64 * (1.0 + candle_core::cpu::erf::erf_f64(x64 / 2f64.sqrt())) / 2.0;
            worst = worst.max((y as f64 - exact).abs() / x64.abs().max(1.0));
        }
        assert!(
            worst < 3e-7,
            "worst error relative to max(1, |x|): {worst:e}"
        );
        let special =
            Tensor::new(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY], &Device::Cpu).unwrap();
        let special = gelu_erf(&special)
            .unwrap()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(special[0].is_nan() && special[1] == f32::INFINITY && special[2].is_nan());
    }
}
