//! Borrowing tensor data on the CPU, for hand-written kernels that are faster than a chain
//! of generic tensor ops (attention, GELU, the lens loss), converting between bfloat16 and
//! f32, and a bfloat16 matrix product ([`bf16`]) for the lens's unembedding products, Muon's
//! orthogonalisation and a bf16 model's linear layers.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Storage, Tensor};
use rayon::prelude::*;

pub mod bf16;
pub mod packed;

use crate::{Error, Result};

/// `e^-z` for `z >= 0` within 2 ulp, in branch-free arithmetic the compiler vectorises
/// (libm's `expf` is a call per element), for the softmaxes, GELU and SiLU of the CPU
/// kernels. Where `e^-z` leaves f32's normal range (`z > 87.3`) it is 0, so that a logit of
/// `-inf` has probability 0; NaN stays NaN.
#[inline(always)]
pub fn exp_of_negative(z: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    const LARGEST: f32 = 87.3;
    let beyond = z > LARGEST; // a comparison, so that NaN passes through
    let y = if beyond { -LARGEST } else { -z };
    // `y = n ln 2 + r` with `|r| <= ln 2 / 2`.
    let shifted = y * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts, so that n * LN2_HIGH is exact.
    let r = y - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // e^r by its Taylor series to degree 7.
    let series = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // 2^n from the exponent bits; n is in the low bits of `shifted` (integer arithmetic,
    // where `n as i32` would be a saturating conversion that does not vectorise).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let e = series * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if beyond {
        0.0
    } else {
        e
    }
}

/// Whether `t` is a float32 tensor on the CPU, the kind the hand-written kernels read.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Whether `t` is a bfloat16 tensor on the CPU.
pub fn is_cpu_bf16(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::BF16
}

/// Runs `f` on the contiguous f32 data of each tensor when all are f32 on the CPU (making
/// them contiguous first if needed); returns `None` otherwise, so callers can fall back to
/// generic tensor ops.
pub fn with_f32_slices<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<Option<R>> {
    if !tensors.iter().all(|t| is_cpu_f32(t)) {
        return Ok(None);
    }
    with_cpu_slices(tensors, f)
}

/// [`with_f32_slices`] for bfloat16 tensors on the CPU, their data given as bf16 bits.
pub(crate) fn with_bf16_bits<R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[u16]]) -> Result<R>,
) -> Result<Option<R>> {
    if !tensors.iter().all(|t| is_cpu_bf16(t)) {
        return Ok(None);
    }
    with_cpu_slices(tensors, |s: &[&[half::bf16]]| {
        use half::slice::HalfFloatSliceExt;
        let bits: Vec<&[u16]> = s.iter().map(|s| s.reinterpret_cast()).collect();
        f(&bits)
    })
}

/// `t` (bfloat16 on the CPU) widened to f32, exactly and in parallel; `None` for any other
/// tensor.
pub(crate) fn widened_bf16(t: &Tensor) -> Result<Option<Tensor>> {
    with_bf16_bits(&[t], |s| f32_tensor_map(s[0], t.shape(), bf16::bf16_value))
}

/// An f32 CPU tensor of `shape` holding `f` of each of `values`, in parallel chunks. `f`
/// must be `#[inline(always)]` (or a function that is): it runs compiled for AVX-512 where
/// the CPU has it.
pub(crate) fn f32_tensor_map<T: Copy + Sync>(
    values: &[T],
    shape: &candle_core::Shape,
    f: impl Fn(T) -> f32 + Sync,
) -> Result<Tensor> {
    f32_tensor_from(
        values.len(),
        shape.dims(),
        #[inline(always)]
        |range, out| {
            for (o, &v) in out.iter_mut().zip(&values[range]) {
                *o = f(v);
            }
        },
    )
}

/// An f32 CPU tensor of `shape` whose `len` elements `fill(range, out)` writes, a parallel
/// chunk at a time. `fill` must be `#[inline(always)]`: it runs compiled for AVX-512 where
/// the CPU has it.
pub(crate) fn f32_tensor_from(
    len: usize,
    shape: &[usize],
    fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(filled(len, fill), shape, &Device::Cpu)?)
}

/// `len` values that `fill(range, out)` writes, in parallel chunks compiled for AVX-512 where
/// the CPU has it. The buffer starts as fresh zero pages (zero bits), written once by `fill`.
fn filled<T: Copy + Default + Send>(
    len: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); len];
    out.par_chunks_mut(CONVERSION_CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let start = chunk * CONVERSION_CHUNK;
            with_wide_vectors(
                #[inline(always)]
                || fill(start..start + out.len(), out),
            )
        });
    out
}

/// A bfloat16 CPU tensor of `shape` holding `values` rounded to the nearest bf16 (ties to
/// even), in parallel.
pub(crate) fn bf16_tensor(values: &[f32], shape: &[usize]) -> Result<Tensor> {
    bf16_tensor_from(
        values.len(),
        shape,
        #[inline(always)]
        |range, bits| {
            for (b, &v) in bits.iter_mut().zip(&values[range]) {
                *b = bf16::bf16_bits(v);
            }
        },
    )
}

/// A bfloat16 CPU tensor of `len` values and `shape`, whose bits `fill(range, out)` writes
/// for the elements in `range`, in parallel chunks. `fill` must be `#[inline(always)]`: it
/// runs compiled for AVX-512 where the CPU has it.
pub(crate) fn bf16_tensor_from(
    len: usize,
    shape: &[usize],
    fill: impl Fn(std::ops::Range<usize>, &mut [u16]) + Sync,
) -> Result<Tensor> {
    // As u16 bits: zeroed u16s come as fresh zero pages, which bf16 zeros (not known to be
    // zero bits) would not.
    bf16_tensor_of_bits(filled(len, fill), shape)
}

/// A bfloat16 CPU tensor of `shape` holding `bits`.
pub(crate) fn bf16_tensor_of_bits(bits: Vec<u16>, shape: &[usize]) -> Result<Tensor> {
    use half::vec::HalfBitsVecExt;
    Ok(Tensor::from_vec(
        bits.reinterpret_into::<half::bf16>(),
        shape,
        &Device::Cpu,
    )?)
}

/// A CPU weight `[out, in]` (f32 or bf16, read where it lies) packed in format `F` as the
/// `[in, out]` right-hand matrix of `x W^T`, for [`packed::gemm`].
pub(crate) fn packed_transposed<F: packed::Format>(weight: &Tensor) -> Result<packed::Packed<F>> {
    use packed::Packed;
    let (outer, inner) = weight.dims2()?;
    // Element (row, col) of `W^T` is weight[col * inner + row].
    if let Some(packed) = with_bf16_bits(&[weight], |s| {
        Ok(Packed::pack(inner, outer, |row, col| {
            bf16::bf16_value(s[0][col * inner + row])
        }))
    })? {
        return Ok(packed);
    }
    with_f32_slices(&[weight], |s| {
        Ok(Packed::pack(inner, outer, |row, col| {
            s[0][col * inner + row]
        }))
    })?
    .ok_or_else(|| {
        Error::InvalidArgument(format!(
            "expected an f32 or bf16 weight on the CPU, got {:?} on {:?}",
            weight.dtype(),
            weight.device()
        ))
    })
}

/// `t` (f32 on the CPU) rounded to bfloat16 (see [`bf16_tensor`]).
pub(crate) fn rounded_to_bf16(t: &Tensor) -> Result<Tensor> {
    with_f32_slices(&[t], |s| bf16_tensor(s[0], t.dims()))?.ok_or_else(|| {
        Error::InvalidArgument(format!("expected f32 on the CPU, got {:?}", t.dtype()))
    })
}

/// Elements per parallel task of the dtype conversions and element-wise maps.
const CONVERSION_CHUNK: usize = 1 << 14;

/// Runs `f` on the contiguous data of each tensor, whose dtype the caller has checked is `T`;
/// `None` if one is not on the CPU.
fn with_cpu_slices<T: candle_core::WithDType, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<Option<R>> {
    let contiguous: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        slices.push(&cpu.as_slice::<T>()?[start..end]);
    }
    f(&slices).map(Some)
}

/// `out[m, n] = x[m, d] @ w[n, d]^T` over row-major f32 slices (`out +=` with `accumulate`):
/// activations times a weight stored `[out, in]`, with `gemm` on all of rayon's threads when
/// `parallel`, else on this one. The lengths must agree (`x` and `w` whole rows of `d`).
pub fn product_with_transposed(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    d: usize,
    accumulate: bool,
    parallel: bool,
) {
    assert!(d > 0 && w.len().is_multiple_of(d), "w: rows of {d} floats");
    let n = w.len() / d;
    // Element (row p, column j) of `w^T` is w[j * d + p].
    product_f32(out, x, w, (d, n), (1, d), accumulate, parallel);
}

/// `out[m, n] = x[m, k] @ w[k, n]` over row-major f32 slices (`out +=` with `accumulate`),
/// as [`product_with_transposed`] for a right-hand matrix stored `[k, n]`. The lengths must
/// agree (`x` whole rows of `k`, `w` of `k` rows).
pub fn product(out: &mut [f32], x: &[f32], w: &[f32], k: usize, accumulate: bool, parallel: bool) {
    assert!(k > 0 && w.len().is_multiple_of(k), "w: {k} rows");
    let n = w.len() / k;
    product_f32(out, x, w, (k, n), (n, 1), accumulate, parallel);
}

/// `out[m, n] = x[m, k] @ rhs` with `x` and `out` row-major and the `[k, n]` right-hand matrix
/// `rhs` at element strides `(row, column)`: one of `(n, 1)` and `(1, k)`, so that `rhs`
/// holds exactly its k x n elements.
fn product_f32(
    out: &mut [f32],
    x: &[f32],
    rhs: &[f32],
    (k, n): (usize, usize),
    (row_stride, column_stride): (usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    assert!(k > 0 && x.len().is_multiple_of(k), "x: rows of {k} floats");
    assert!(
        rhs.len() == k * n && [(n, 1), (1, k)].contains(&(row_stride, column_stride)),
        "rhs: {k} x {n} floats, row-major or transposed"
    );
    let m = x.len() / k;
    assert_eq!(out.len(), m * n, "the output holds {m} x {n} floats");
    let threads = rayon::current_num_threads();
    // SAFETY: `out` holds m x n floats and `x` m x k, contiguous row-major, and `rhs` its
    // k x n floats, row-major or transposed (all checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            column_stride as isize,
            row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            if parallel && threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// Runs `work` compiled for AVX-512 where this CPU has it, for element-wise loops: they then
/// take 16 floats per instruction where the crate's baseline x86-64 target takes 4. `work` must
/// be a closure marked `#[inline(always)]`, so that its body is compiled into the AVX-512
/// function. Elsewhere, `work()`.
#[inline(always)]
pub fn with_wide_vectors<R>(work: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: this CPU has AVX-512F, checked just above.
        return unsafe { avx512(work) };
    }
    work()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(work: impl FnOnce() -> R) -> R {
    work()
}

/// The base of an output that parallel tasks write at disjoint places.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint elements of the output, which outlives them.
unsafe impl<T: Send> Send for SharedOut<T> {}
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `offset` places after the base.
    ///
    /// # Safety
    /// `offset` must lie inside the output.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// Runs `f` on the f32 data of `write`, mutably and in place, and of `read`, when every tensor
/// is a float32 CPU tensor and the written ones are contiguous; `None` otherwise, so callers
/// can fall back to ops that make new tensors. In place means that every tensor sharing
/// storage with a written one sees the change: this is for buffers their owner never hands
/// out (optimiser state, gradient sums, a tensor just made). A read or written tensor that
/// shares storage with a written one is an error (its lock would be taken twice).
pub fn with_f32_slices_mut<R>(
    write: &[&Tensor],
    read: &[&Tensor],
    f: impl FnOnce(&mut [&mut [f32]], &[&[f32]]) -> Result<R>,
) -> Result<Option<R>> {
    if !write.iter().chain(read).all(|t| is_cpu_f32(t)) || !write.iter().all(|t| t.is_contiguous())
    {
        return Ok(None);
    }
    for (i, w) in write.iter().enumerate() {
        for other in write[i + 1..].iter().chain(read) {
            w.inplace_op2(other, &AliasProbe).map_err(|_| {
                Error::InvalidArgument(
                    "a tensor to be written in place shares its storage with another operand"
                        .into(),
                )
            })?;
        }
    }
    let mut f = Some(f);
    let mut innermost = |spans: &[(*mut f32, usize)]| -> Result<Option<R>> {
        // SAFETY: each span is the data of a written tensor whose storage an enclosing
        // `Locked` frame holds locked for writing until this returns; the storages are
        // distinct from each other and from the read tensors (probed above), so the
        // slices alias nothing.
        let mut slices: Vec<&mut [f32]> = spans
            .iter()
            .map(|&(ptr, len)| unsafe { std::slice::from_raw_parts_mut(ptr, len) })
            .collect();
        let f = f.take().expect("the innermost frame runs once");
        with_f32_slices(read, |r| f(&mut slices, r))
    };
    lock_for_writing(write, &mut Vec::with_capacity(write.len()), &mut innermost)
}

/// An in-place op that does nothing: candle refuses it when its operand shares the
/// destination's storage, which is the check [`with_f32_slices_mut`] needs.
struct AliasProbe;

impl InplaceOp2 for AliasProbe {
    fn name(&self) -> &'static str {
        "alias-probe"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        Ok(())
    }
}

type Innermost<'a, R> = dyn FnMut(&[(*mut f32, usize)]) -> Result<R> + 'a;

/// Locks `write[0]` for writing, records its data span, recurses on the rest, and runs
/// `innermost` with every span once all are locked.
fn lock_for_writing<R>(
    write: &[&Tensor],
    spans: &mut Vec<(*mut f32, usize)>,
    innermost: &mut Innermost<'_, R>,
) -> Result<R> {
    let Some((first, rest)) = write.split_first() else {
        return innermost(spans);
    };
    let frame = Locked {
        rest,
        spans: RefCell::new(spans),
        innermost: RefCell::new(innermost),
        out: RefCell::new(None),
    };
    first.inplace_op1(&frame)?;
    frame.out.into_inner().unwrap_or_else(|| {
        Err(Error::InvalidArgument(
            "a tensor could not be written".into(),
        ))
    })
}

/// One frame of [`lock_for_writing`], run by candle with the storage locked.
struct Locked<'a, 'b, R> {
    rest: &'a [&'a Tensor],
    spans: RefCell<&'a mut Vec<(*mut f32, usize)>>,
    innermost: RefCell<&'a mut Innermost<'b, R>>,
    out: RefCell<Option<Result<R>>>,
}

impl<R> InplaceOp1 for Locked<'_, '_, R> {
    fn name(&self) -> &'static str {
        "with-f32-slices-mut"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("not a contiguous float32 tensor");
        };
        let data = &mut data[start..end];
        let mut spans = self.spans.borrow_mut();
        spans.push((data.as_mut_ptr(), data.len()));
        let out = lock_for_writing(self.rest, &mut spans, *self.innermost.borrow_mut());
        spans.pop();
        *self.out.borrow_mut() = Some(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_of_negative_is_accurate_and_zero_below_the_normal_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let z = 87.3 * i as f32 / 200_000.0;
            let want = (-z as f64).exp();
            worst = worst.max(((exp_of_negative(z) as f64 - want) / want).abs());
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp_of_negative(0.0), 1.0);
        assert!(exp_of_negative(87.29) > 1e-38);
        assert_eq!(exp_of_negative(87.31), 0.0);
        assert_eq!(exp_of_negative(f32::INFINITY), 0.0);
        assert!(exp_of_negative(f32::NAN).is_nan());
    }

    /// Both f32 products against f64 sums, on non-square shapes, writing and accumulating
    /// onto what the output holds, on all of rayon's threads and on this one.
    #[test]
    fn f32_products_match_f64_sums() {
        let (m, k, n) = (7, 45, 33);
        let fill = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i + 13 * seed) * 7919 % 1009) as f32 / 504.5 - 1.0)
                .collect()
        };
        let (x, w_rows, start) = (fill(m * k, 1), fill(k * n, 2), fill(m * n, 3));
        // The same right-hand matrix stored `[n, k]`.
        let w_transposed: Vec<f32> = (0..n * k).map(|at| w_rows[(at % k) * n + at / k]).collect();
        let want: Vec<f64> = (0..m * n)
            .map(|at| {
                let (i, j) = (at / n, at % n);
                (0..k)
                    .map(|p| x[i * k + p] as f64 * w_rows[p * n + j] as f64)
                    .sum()
            })
            .collect();
        for (accumulate, parallel) in [(false, true), (true, true), (true, false)] {
            for transposed in [false, true] {
                let mut out = start.clone();
                if transposed {
                    product_with_transposed(&mut out, &x, &w_transposed, k, accumulate, parallel);
                } else {
                    product(&mut out, &x, &w_rows, k, accumulate, parallel);
                }
                for (at, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let want = want + if accumulate { start[at] as f64 } else { 0.0 };
                    assert!(
                        (got as f64 - want).abs() < 1e-4,
                        "accumulate {accumulate}, transposed {transposed}, at {at}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn writes_in_place_and_refuses_shared_storage() {
        let cpu = &Device::Cpu;
        let a = Tensor::new(&[1f32, 2., 3.], cpu).unwrap();
        let b = Tensor::new(&[10f32, 20., 30.], cpu).unwrap();
        let c = Tensor::new(&[0.5f32, 0.5, 0.5], cpu).unwrap();
        let alias = a.clone();
        let sum = with_f32_slices_mut(&[&a, &b], &[&c], |w, r| {
            let [a, b] = w else { unreachable!() };
            for ((a, b), c) in a.iter_mut().zip(b.iter_mut()).zip(r[0]) {
                *a += c;
                *b *= c;
            }
            Ok(a.iter().sum::<f32>())
        })
        .unwrap();
        assert_eq!(sum, Some(7.5));
        assert_eq!(alias.to_vec1::<f32>().unwrap(), [1.5, 2.5, 3.5]);
        assert_eq!(b.to_vec1::<f32>().unwrap(), [5., 10., 15.]);

        let refused = |write: &[&Tensor], read: &[&Tensor]| {
            let out = with_f32_slices_mut(write, read, |_, _| Ok(()));
            assert!(
                matches!(&out, Err(Error::InvalidArgument(m)) if m.contains("shares its storage")),
                "{out:?}"
            );
        };
        refused(&[&a], &[&alias]);
        refused(&[&a, &alias], &[]);
        refused(&[&b], &[&c, &b.narrow(0, 1, 1).unwrap()]);

        let strided = Tensor::zeros((2, 2), DType::F32, cpu).unwrap().t().unwrap();
        let f64s = Tensor::zeros(2, DType::F64, cpu).unwrap();
        for (write, read) in [(&strided, &c), (&a, &f64s)] {
            let out = with_f32_slices_mut(&[write], &[read], |_, _| Ok(())).unwrap();
            assert!(out.is_none(), "falls back");
        }
        let err = with_f32_slices_mut(&[&a], &[], |_, _| -> Result<()> {
            Err(Error::InvalidArgument("inner".into()))
        });
        assert!(matches!(err, Err(Error::InvalidArgument(m)) if m == "inner"));
    }
}
