//! Muon on the CPU: the momentum, the Newton-Schulz orthogonalisation and the update in a
//! few passes over buffers that the optimiser keeps from step to step ([`Workspace`]), with
//! the same arithmetic as the tensor-op path (which makes about a dozen fresh `[n, d]`
//! tensors per step, each paid in page faults on the SAE's matrices).

use rayon::prelude::*;

use candle_core::Tensor;

use super::NS_COEFFICIENTS;
use crate::cpu::bf16::{bf16_bits as bits, bf16_value as value, gemm, Kernel, PackedB};
use crate::cpu::{product, product_with_transposed, SharedOut};
use crate::Result;

/// Rows of a matrix handled together when it is read or written transposed, so the lines
/// of the other side are reused from cache.
const TRANSPOSE_ROWS: usize = 64;

/// Buffers of [`Workspace::newton_schulz`] and of the Muon step, kept between steps.
#[derive(Default)]
pub struct Workspace {
    /// The update direction (f32, the parameter's shape).
    direction: Vec<f32>,
    /// `X`, `[r, k]` with `r ≤ k`, as bf16 bits.
    x: Vec<u16>,
    /// `Xᵀ` packed as the right-hand side of `X Xᵀ`.
    transposed: PackedB,
    /// `X` packed as the right-hand side of `B X`.
    packed: PackedB,
    /// The Gram matrix packed as the right-hand side of `(c A) A`.
    gram: PackedB,
    /// Where bf16 products are slower than f32 ones: a product's right-hand side (`X` or the
    /// Gram matrix) and its left-hand side, widened to f32.
    wide: [Vec<f32>; 2],
    /// The f32 sums of `B X`.
    sums: Vec<f32>,
    /// The `[rows, cols]` shape of the last matrix orthogonalised.
    shape: (usize, usize),
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("muon::Workspace")
    }
}

/// One Muon step's settings for one matrix.
pub(super) struct MuonScalars {
    pub momentum: f64,
    pub nesterov: bool,
    pub ns_steps: usize,
    pub lr: f64,
    /// Decoupled: the parameter shrinks by `lr × weight_decay` first.
    pub weight_decay: f64,
    /// The update's scale, `0.2 √max(rows, cols)`.
    pub scale: f64,
}

/// One Muon step of `param` on the CPU in f32 with the [`Workspace`]'s buffers: the momentum
/// `buffer` updated in place and the new parameter returned; `None` unless all three are
/// f32 CPU tensors (the buffer contiguous).
pub(super) fn step_cpu(
    workspace: &mut Workspace,
    param: &Tensor,
    grad: &Tensor,
    buffer: &Tensor,
    c: &MuonScalars,
) -> Result<Option<Tensor>> {
    let shape = param.dims2()?;
    crate::cpu::with_f32_slices_mut(&[buffer], &[param, grad], |buffer, read| {
        let new = workspace.step(read[0], read[1], buffer[0], shape, c);
        Ok(Tensor::from_vec(new, shape, param.device())?)
    })
}

/// One Muon step with candle's tensor operations (any device and dtype): `buffer` replaced
/// by the new momentum, the new parameter returned.
pub(super) fn step_tensor_ops(
    param: &Tensor,
    grad: &Tensor,
    buffer: &mut Tensor,
    c: &MuonScalars,
) -> Result<Tensor> {
    let param = if c.weight_decay != 0.0 {
        (param * (1.0 - c.lr * c.weight_decay))?
    } else {
        param.clone()
    };
    let buf = ((&*buffer * c.momentum)? + (grad * (1.0 - c.momentum))?)?;
    let direction = if c.nesterov {
        ((grad * (1.0 - c.momentum))? + (&buf * c.momentum)?)?
    } else {
        buf.clone()
    };
    *buffer = buf;
    let update = super::newton_schulz(&direction, c.ns_steps)?.to_dtype(param.dtype())?;
    Ok((param - (update * (c.lr * c.scale))?)?)
}

/// `v · by` as candle's `Tensor * f64` computes it (`affine`: `v · by + 0`).
#[inline]
fn times(v: f32, by: f32) -> f32 {
    v * by + 0.0
}

impl Workspace {
    /// One Muon step of the `[rows, cols]` f32 matrix `param` with gradient `grad`: updates
    /// the momentum `buffer` in place and returns the new parameter, bit for bit what
    /// [`step_tensor_ops`] computes.
    fn step(
        &mut self,
        param: &[f32],
        grad: &[f32],
        buffer: &mut [f32],
        (rows, cols): (usize, usize),
        c: &MuonScalars,
    ) -> Vec<f32> {
        // The scalars rounded to f32 as candle rounds them.
        let (m, rest) = (c.momentum as f32, (1.0 - c.momentum) as f32);
        let decay = (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32);
        let step = (c.lr * c.scale) as f32;
        self.direction.resize(param.len(), 0.0);
        buffer
            .par_iter_mut()
            .zip(self.direction.par_iter_mut())
            .zip(grad)
            .for_each(|((buf, dir), &g)| {
                *buf = times(*buf, m) + times(g, rest);
                *dir = if c.nesterov {
                    times(g, rest) + times(*buf, m)
                } else {
                    *buf
                };
            });
        let direction = std::mem::take(&mut self.direction);
        self.newton_schulz(&direction, rows, cols, c.ns_steps);
        self.direction = direction;
        let mut out = vec![0f32; param.len()];
        out.par_chunks_mut(TRANSPOSE_ROWS * cols)
            .zip(param.par_chunks(TRANSPOSE_ROWS * cols))
            .enumerate()
            .for_each(|(chunk, (out, param))| {
                let i0 = chunk * TRANSPOSE_ROWS;
                for (at, (o, &p)) in out.iter_mut().zip(param).enumerate() {
                    let update = self.result(i0 + at / cols, at % cols);
                    let p = decay.map_or(p, |decay| times(p, decay));
                    *o = p - times(update, step);
                }
            });
        out
    }

    /// Element `(i, j)` of the last orthogonalised matrix.
    #[inline]
    pub(super) fn result(&self, i: usize, j: usize) -> f32 {
        let (rows, cols) = self.shape;
        value(if rows > cols {
            self.x[j * rows + i]
        } else {
            self.x[i * cols + j]
        })
    }

    /// [`super::newton_schulz`] of the `[rows, cols]` f32 matrix `g`, read back with
    /// [`Workspace::result`].
    pub(super) fn newton_schulz(&mut self, g: &[f32], rows: usize, cols: usize, steps: usize) {
        // The packed bf16 kernel where it beats f32 products on this CPU.
        let packed_kernel = Some(Kernel::detect()).filter(|kernel| kernel.beats_f32());
        self.newton_schulz_through(packed_kernel, g, rows, cols, steps);
    }

    /// [`Workspace::newton_schulz`] with its products through `packed_kernel` when given,
    /// else as f32 products of the widened bf16 values.
    fn newton_schulz_through(
        &mut self,
        packed_kernel: Option<Kernel>,
        g: &[f32],
        rows: usize,
        cols: usize,
        steps: usize,
    ) {
        self.shape = (rows, cols);
        let (a, b, c) = NS_COEFFICIENTS;
        let (a, b, c) = (a as f32, b as f32, c as f32);
        let tall = rows > cols;
        // X is [r, k] with r <= k.
        let (r, k) = if tall { (cols, rows) } else { (rows, cols) };
        self.x.resize(r * k, 0);
        if tall {
            // x[j][i] = g[i][j], a band of rows of g at a time (each band writes its own
            // columns of x).
            let x = SharedOut(self.x.as_mut_ptr());
            g.par_chunks(TRANSPOSE_ROWS * cols)
                .enumerate()
                .for_each(|(chunk, band)| {
                    let i0 = chunk * TRANSPOSE_ROWS;
                    for (at, &v) in band.iter().enumerate() {
                        let (i, j) = (i0 + at / cols, at % cols);
                        // SAFETY: j < r and i < k, so the element is inside x; bands write
                        // disjoint columns of it.
                        unsafe { *x.at(j * k + i) = bits(v) };
                    }
                });
        } else {
            self.x
                .par_iter_mut()
                .zip(g)
                .for_each(|(x, &v)| *x = bits(v));
        }
        let square_sum: f64 = self.x.par_iter().map(|&v| (value(v) as f64).powi(2)).sum();
        let norm = value(bits(square_sum.sqrt() as f32));
        let denominator = value(bits(norm + 1e-7));
        self.x
            .par_iter_mut()
            .for_each(|v| *v = bits(value(*v) / denominator));
        let mut small = Vec::new();
        for _ in 0..steps {
            let Workspace {
                x,
                transposed,
                packed,
                gram: gram_packed,
                wide,
                sums,
                ..
            } = self;
            product_bf16(
                packed_kernel,
                x,
                r,
                x,
                (k, r),
                true,
                transposed,
                wide,
                &mut small,
            );
            let gram: Vec<u16> = small.par_iter().map(|&v| bits(v)).collect();
            let scaled: Vec<u16> = gram.par_iter().map(|&v| bits(value(v) * c)).collect();
            product_bf16(
                packed_kernel,
                &scaled,
                r,
                &gram,
                (r, r),
                false,
                gram_packed,
                wide,
                &mut small,
            );
            let poly: Vec<u16> = gram
                .par_iter()
                .zip(&small)
                .map(|(&g1, &g2)| bits(value(bits(value(g1) * b)) + value(bits(g2))))
                .collect();
            product_bf16(
                packed_kernel,
                &poly,
                r,
                x,
                (r, k),
                false,
                packed,
                wide,
                sums,
            );
            x.par_iter_mut()
                .zip(&*sums)
                .for_each(|(v, &m)| *v = bits(value(bits(value(*v) * a)) + value(bits(m))));
        }
    }
}

/// `out[m, n] = lhs[m, inner] · rhs` over bf16 bits with f32 sums, `rhs` stored `[inner, n]`
/// (`[n, inner]` when `rhs_transposed`). Through `packed_kernel` when given (packing `rhs`
/// into `packed`), else as f32 products of the values widened into `wide` (right-hand side
/// first; `X Xᵀ` widens `X` once): the same products, summed in another order.
#[allow(clippy::too_many_arguments)]
fn product_bf16(
    packed_kernel: Option<Kernel>,
    lhs: &[u16],
    m: usize,
    rhs: &[u16],
    (inner, n): (usize, usize),
    rhs_transposed: bool,
    packed: &mut PackedB,
    wide: &mut [Vec<f32>; 2],
    out: &mut Vec<f32>,
) {
    debug_assert!(lhs.len() == m * inner && rhs.len() == inner * n);
    out.resize(m * n, 0.0);
    if inner == 0 {
        out.fill(0.0);
        return;
    }
    let Some(kernel) = packed_kernel else {
        let widen = |bits: &[u16], wide: &mut Vec<f32>| {
            wide.clear();
            wide.par_extend(bits.par_iter().map(|&v| value(v)));
        };
        let [wide_rhs, wide_lhs] = wide;
        widen(rhs, wide_rhs);
        let wide_lhs = if std::ptr::eq(lhs, rhs) {
            &*wide_rhs
        } else {
            widen(lhs, wide_lhs);
            &*wide_lhs
        };
        if rhs_transposed {
            product_with_transposed(out, wide_lhs, wide_rhs, inner, false, true);
        } else {
            product(out, wide_lhs, wide_rhs, inner, false, true);
        }
        return;
    };
    if rhs_transposed {
        packed.repack(inner, n, |kk, j| value(rhs[j * inner + kk]));
    } else {
        packed.repack(inner, n, |kk, j| value(rhs[kk * n + j]));
    }
    let lda = packed.lhs_stride();
    if lda == inner {
        gemm(kernel, lhs, lda, m, packed, out, n);
    } else {
        let padded: Vec<u16> = (0..m * lda)
            .map(|at| {
                let (row, col) = (at / lda, at % lda);
                if col < inner {
                    lhs[row * inner + col]
                } else {
                    0
                }
            })
            .collect();
        gemm(kernel, &padded, lda, m, packed, out, n);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn matrix(rows: usize, cols: usize, seed: usize) -> Tensor {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + 17 * seed) * 7919 % 1009) as f32 / 504.5 - 1.0) * 0.3)
            .collect();
        Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Both ways of a Newton-Schulz product (each packed kernel this CPU runs, and f32
    /// products of the widened values), plain and with a transposed right-hand side, against
    /// f64 sums of the same bf16 values, on awkward sizes (an odd reduction length; 45 rows:
    /// one AMX block and an edge).
    #[test]
    fn bf16_products_match_f64_either_way() {
        let (m, inner, n) = (45, 37, 70);
        let bf16 = |len: usize, seed: usize| -> Vec<u16> {
            (0..len)
                .map(|i| bits((((i + 31 * seed) * 7919 % 1009) as f32 / 504.5 - 1.0) * 0.7))
                .collect()
        };
        let (lhs, rhs) = (bf16(m * inner, 1), bf16(inner * n, 2));
        for rhs_transposed in [false, true] {
            let at = |kk: usize, j: usize| {
                value(if rhs_transposed {
                    rhs[j * inner + kk]
                } else {
                    rhs[kk * n + j]
                }) as f64
            };
            let want: Vec<f64> = (0..m * n)
                .map(|o| {
                    let (i, j) = (o / n, o % n);
                    (0..inner)
                        .map(|kk| value(lhs[i * inner + kk]) as f64 * at(kk, j))
                        .sum()
                })
                .collect();
            for packed_kernel in [None, Some(Kernel::Portable), Some(Kernel::detect())] {
                let (mut packed, mut wide, mut out) =
                    (PackedB::default(), Default::default(), vec![]);
                let shape = (inner, n);
                product_bf16(
                    packed_kernel,
                    &lhs,
                    m,
                    &rhs,
                    shape,
                    rhs_transposed,
                    &mut packed,
                    &mut wide,
                    &mut out,
                );
                assert_eq!(out.len(), want.len());
                for (o, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{packed_kernel:?}, transposed {rhs_transposed}, at {o}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Newton-Schulz with its products through each packed kernel this CPU runs and as f32
    /// products, wide and tall: the same result but for the order of f32 sums, which five
    /// steps of bf16 rounding could amplify (seen: none, the results are equal here).
    #[test]
    fn newton_schulz_agrees_through_packed_and_f32_products() {
        for (rows, cols) in [(45, 100), (100, 45)] {
            let g = values(&matrix(rows, cols, 3));
            let run = |packed_kernel: Option<Kernel>| {
                let mut workspace = Workspace::default();
                workspace.newton_schulz_through(packed_kernel, &g, rows, cols, 5);
                let out: Vec<f32> = (0..rows * cols)
                    .map(|at| workspace.result(at / cols, at % cols))
                    .collect();
                Tensor::from_vec(out, (rows, cols), &Device::Cpu).unwrap()
            };
            let f32_products = run(None);
            for kernel in [Kernel::Portable, Kernel::detect()] {
                let packed = run(Some(kernel));
                let gap = crate::compare::mean_relative_difference(&packed, &f32_products);
                let gap = gap.unwrap();
                eprintln!("[{rows}, {cols}] {kernel:?}: {gap:.1e}");
                assert!(gap < 1e-2, "[{rows}, {cols}] {kernel:?}: {gap:.1e}");
            }
        }
    }

    /// Three steps of the CPU pass equal three of the tensor operations bit for bit
    /// (momentum and parameter), wide and tall, with and without Nesterov and weight decay.
    #[test]
    fn cpu_pass_equals_the_tensor_operations() {
        for (rows, cols, nesterov, weight_decay) in [
            (37, 70, true, 0.1),
            (90, 33, false, 0.0),
            (130, 129, true, 0.0),
        ] {
            let c = MuonScalars {
                momentum: 0.95,
                nesterov,
                ns_steps: 5,
                lr: 0.02,
                weight_decay,
                scale: 0.2 * (rows.max(cols) as f64).sqrt(),
            };
            let mut workspace = Workspace::default();
            let (mut fast, mut slow) = (matrix(rows, cols, 1), matrix(rows, cols, 1));
            let fast_buffer = Tensor::zeros((rows, cols), candle_core::DType::F32, &Device::Cpu);
            let (fast_buffer, mut slow_buffer) = (fast_buffer.unwrap(), fast.zeros_like().unwrap());
            for step in 0..3 {
                let grad = matrix(rows, cols, 10 + step);
                fast = step_cpu(&mut workspace, &fast, &grad, &fast_buffer, &c)
                    .unwrap()
                    .expect("f32 on the CPU");
                slow = step_tensor_ops(&slow, &grad, &mut slow_buffer, &c).unwrap();
                let case = format!("[{rows}, {cols}] step {step}");
                assert_eq!(
                    values(&fast_buffer),
                    values(&slow_buffer),
                    "{case}: momentum"
                );
                assert_eq!(values(&fast), values(&slow), "{case}: parameter");
                assert!(
                    values(&fast) != values(&matrix(rows, cols, 1)),
                    "{case}: moved"
                );
            }
        }
    }
}
