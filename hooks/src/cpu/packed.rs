//! Matrix products against a frozen right-hand matrix packed once, in bf16 ([`super::bf16`])
//! or f32 ([`F32`]).
//!
//! A general product (the `gemm` crate's) repacks both operands on every call. That is cheap
//! next to the arithmetic for thousands of rows, but a model's weights and the unembedding are
//! fixed while their left-hand rows change: at 64 tokens an f32 forward pass spent as many
//! samples repacking its weights as multiplying. Here the right-hand matrix is laid out once in
//! panels of [`PANEL_WIDTH`] columns, which the inner kernels read straight into vector
//! registers, and the left-hand rows are read where they lie. Every output element is summed
//! by one thread in a fixed order, so results do not depend on the thread count.

use rayon::prelude::*;

use super::SharedOut;

/// f32 lanes per vector register.
pub(super) const LANES: usize = 16;
/// Vector registers per row of an output tile.
pub(super) const VECTORS: usize = 4;
/// Output columns per packed panel (one tile's width).
pub(super) const PANEL: usize = LANES * VECTORS;
/// Output columns per packed panel: where [`gemm_columns`] may start.
pub const PANEL_WIDTH: usize = PANEL;
/// Rows per output tile of the vector kernels.
pub(super) const ROWS: usize = 6;
/// Bytes of packed panels (one cache block of each) that a task's row tiles run over in
/// turn: half of a Sapphire Rapids core's L2.
const PANEL_GROUP_BYTES: usize = 1 << 20;

/// How a packed right-hand matrix stores its values and which inner kernels multiply by it.
pub trait Format: Sized + Send + Sync {
    /// An element of the left-hand matrix.
    type Lhs: Copy + Sync;
    /// The inner kernels of this format.
    type Kernel: Copy + std::fmt::Debug + Send + Sync;
    /// A task's state for its kernel (the AMX tile configuration).
    type Thread;
    /// Rows of the reduction axis that one packed value holds (a step).
    const STEP: usize;

    /// The packed value of one column at one step, `at(i)` giving its row `i` of the step.
    fn pack(at: impl Fn(usize) -> f32) -> u32;
    /// Whether this CPU runs `kernel`.
    fn runs_here(kernel: Self::Kernel) -> bool;
    /// Output rows per tile of `kernel`.
    fn tile_rows(kernel: Self::Kernel) -> usize;
    /// Steps of the reduction axis per cache block of `kernel`.
    fn block_steps(kernel: Self::Kernel) -> usize;
    /// The state a task of `kernel` needs.
    fn thread(kernel: Self::Kernel) -> Self::Thread;
    /// Computes one output tile.
    ///
    /// # Safety
    /// `tile.rows` rows of `tile.width` floats at `tile.dst`, `tile.ldc` apart, must be valid
    /// for reads and writes and not accessed by anyone else during the call; the kernel must
    /// run here.
    unsafe fn tile(thread: &Self::Thread, tile: Tile<Self>);
    /// The value of a left-hand element (for the portable kernel).
    fn lhs_value(x: Self::Lhs) -> f32;
    /// Row `i` of a step from its packed value (for the portable kernel).
    fn packed_value(packed: u32, i: usize) -> f32;
}

/// A frozen `[k, n]` matrix packed for [`gemm`]: panels of [`PANEL_WIDTH`] columns, each
/// holding every step of the reduction axis as one packed value per column. Rows and columns
/// are zero-padded to whole steps and panels.
pub struct Packed<F: Format> {
    k: usize,
    n: usize,
    steps: usize,
    data: Vec<u32>,
    format: std::marker::PhantomData<F>,
}

impl<F: Format> Default for Packed<F> {
    fn default() -> Self {
        Packed {
            k: 0,
            n: 0,
            steps: 0,
            data: Vec::new(),
            format: std::marker::PhantomData,
        }
    }
}

impl<F: Format> Packed<F> {
    /// Packs the `[k, n]` matrix whose element `(row, col)` is `at(row, col)`.
    pub fn pack(k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let mut packed = Packed::default();
        packed.repack(k, n, at);
        packed
    }

    /// [`Packed::pack`] into this one's storage (no fresh pages when the size is the same).
    pub fn repack(&mut self, k: usize, n: usize, at: impl Fn(usize, usize) -> f32 + Sync) {
        let steps = k.div_ceil(F::STEP);
        let panels = n.div_ceil(PANEL);
        self.data.resize(panels * steps * PANEL, 0);
        (self.k, self.n, self.steps) = (k, n, steps);
        if self.data.is_empty() {
            return;
        }
        self.data
            .par_chunks_mut(steps * PANEL)
            .enumerate()
            .for_each(|(panel, out)| {
                for (step, lanes) in out.chunks_exact_mut(PANEL).enumerate() {
                    for (lane, slot) in lanes.iter_mut().enumerate() {
                        let col = panel * PANEL + lane;
                        *slot = F::pack(|i| {
                            let row = step * F::STEP + i;
                            if row < k && col < n {
                                at(row, col)
                            } else {
                                0.0
                            }
                        });
                    }
                }
            });
    }

    /// Rows of the matrix (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the matrix (the output width).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The row stride a left-hand matrix needs: `k` rounded up to a whole step.
    pub fn lhs_stride(&self) -> usize {
        F::STEP * self.steps
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// `c[m, n] = a[m, k] · b` with row `i` of `a` at `a[i * lda..]` (`lda` at least
/// [`Packed::lhs_stride`], any pad past `k` zero) and row `i` of `c` at
/// `c[i * ldc..i * ldc + n]`. Work is split over column panels and row blocks with rayon.
pub fn gemm<F: Format>(
    kernel: F::Kernel,
    a: &[F::Lhs],
    lda: usize,
    m: usize,
    b: &Packed<F>,
    c: &mut [f32],
    ldc: usize,
) {
    gemm_columns(kernel, a, lda, m, b, 0..b.n, c, ldc);
}

/// [`gemm`] for the output columns `columns` only, into `c` of that width (row `i` at
/// `c[i * ldc..i * ldc + columns.len()]`): a wide product in slices whose sums fit a small
/// buffer, reading `b` once over all of them. `columns` starts at a multiple of [`PANEL_WIDTH`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_columns<F: Format>(
    kernel: F::Kernel,
    a: &[F::Lhs],
    lda: usize,
    m: usize,
    b: &Packed<F>,
    columns: std::ops::Range<usize>,
    c: &mut [f32],
    ldc: usize,
) {
    let (first, end) = (columns.start, columns.end);
    assert!(F::runs_here(kernel), "{kernel:?} does not run on this CPU");
    assert!(
        first.is_multiple_of(PANEL) && first <= end && end <= b.n,
        "gemm columns {first}..{end} of {}",
        b.n
    );
    let n = end - first;
    assert!(lda >= b.lhs_stride() && ldc >= n, "gemm strides");
    let holds = |len: usize, stride: usize, row: usize| {
        m == 0
            || (m - 1)
                .checked_mul(stride)
                .and_then(|start| start.checked_add(row))
                .is_some_and(|needed| len >= needed)
    };
    assert!(
        holds(a.len(), lda, b.lhs_stride()) && holds(c.len(), ldc, n),
        "gemm operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if b.steps == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    let first_panel = first / PANEL;
    let panels = end.div_ceil(PANEL) - first_panel;
    let tile_rows = F::tile_rows(kernel);
    let tiles = m.div_ceil(tile_rows);
    // The work is `panels x tiles` units, panel by panel, cut into runs of near-equal length,
    // several per thread: a run covers whole panels (each task then reads only its share of
    // the packed matrix) and at either end part of a panel's rows, so that an odd number of
    // panels (9 for a width of 576, 3 for 192) still splits evenly between threads.
    let units = panels * tiles;
    let tasks = (4 * rayon::current_num_threads().max(1)).min(units);
    let out = SharedOut(c.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|task| {
        let thread = F::thread(kernel);
        let block_steps = F::block_steps(kernel);
        let runs = task_runs(task * units / tasks..(task + 1) * units / tasks, tiles);
        for s0 in (0..b.steps).step_by(block_steps) {
            let steps = block_steps.min(b.steps - s0);
            // Panels in groups whose cache block fits in L2, each group's row tiles then run
            // over all of it: the left-hand rows are read once per group where a panel at a
            // time read them once per panel.
            let group = (PANEL_GROUP_BYTES / (4 * steps * PANEL)).max(1);
            for (panel_run, tile_range) in &runs {
                for start in panel_run.clone().step_by(group) {
                    let group = start..(start + group).min(panel_run.end);
                    for tile in tile_range.clone() {
                        let row0 = tile * tile_rows;
                        let rows = tile_rows.min(m - row0);
                        let lhs = &a[row0 * lda + F::STEP * s0..];
                        for panel in group.clone().map(|p| first_panel + p) {
                            let col0 = panel * PANEL;
                            let width = PANEL.min(end - col0);
                            let packed = &b.data[(panel * b.steps + s0) * PANEL..][..steps * PANEL];
                            let tile = Tile {
                                rows,
                                lhs,
                                lda,
                                packed,
                                steps,
                                // SAFETY: the tile (rows row0.., columns col0..col0 + width)
                                // lies inside `c` (checked above).
                                dst: unsafe { out.at(row0 * ldc + col0 - first) },
                                ldc,
                                width,
                                accumulate: s0 > 0,
                            };
                            // SAFETY: the tile is this task's alone; the kernel runs here.
                            unsafe { F::tile(&thread, tile) };
                        }
                    }
                }
            }
        }
    });
}

/// The units `units` (panel `p`'s row tile `t` is unit `p * tiles + t`) as runs of
/// consecutive panels (counted from the first of the product) that share one range of row
/// tiles: a partial panel at either end, whole panels between.
fn task_runs(
    units: std::ops::Range<usize>,
    tiles: usize,
) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let mut runs: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> = Vec::new();
    if units.is_empty() {
        return runs;
    }
    for panel in units.start / tiles..units.end.div_ceil(tiles) {
        let rows = units.start.max(panel * tiles) - panel * tiles
            ..units.end.min((panel + 1) * tiles) - panel * tiles;
        match runs.last_mut() {
            Some((panels, same)) if *same == rows => panels.end = panel + 1,
            _ => runs.push((panel..panel + 1, rows)),
        }
    }
    runs
}

/// One output tile for the inner kernels: `rows` x `width` sums over `steps` steps of the
/// reduction axis, of `lhs` (rows `lda` values apart) and `packed` (a panel's steps), into
/// `dst` (rows `ldc` floats apart), added to what is there when `accumulate`.
pub struct Tile<'a, F: Format> {
    pub(super) rows: usize,
    pub(super) lhs: &'a [F::Lhs],
    pub(super) lda: usize,
    pub(super) packed: &'a [u32],
    pub(super) steps: usize,
    pub(super) dst: *mut f32,
    pub(super) ldc: usize,
    pub(super) width: usize,
    pub(super) accumulate: bool,
}

impl<F: Format> Clone for Tile<'_, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F: Format> Copy for Tile<'_, F> {}

impl<F: Format> Tile<'_, F> {
    /// Panics unless the tile has 1 to `max_rows` rows and 1 to [`PANEL_WIDTH`] columns and
    /// its operands hold what it reads.
    pub(super) fn check(&self, max_rows: usize) {
        assert!((1..=max_rows).contains(&self.rows) && (1..=PANEL).contains(&self.width));
        assert!(
            self.lhs.len() >= (self.rows - 1) * self.lda + F::STEP * self.steps
                && self.packed.len() >= self.steps * PANEL
        );
    }
}

/// The tile for at most [`ROWS`] rows through `R`-row kernel `kernel` (one of 1 to 6 rows).
macro_rules! by_rows {
    ($kernel:ident, $tile:expr) => {
        match $tile.rows {
            1 => $kernel::<1>($tile),
            2 => $kernel::<2>($tile),
            3 => $kernel::<3>($tile),
            4 => $kernel::<4>($tile),
            5 => $kernel::<5>($tile),
            _ => $kernel::<6>($tile),
        }
    };
}
pub(super) use by_rows;

/// A tile in plain Rust, for `R` rows: the values widened to f32, each step's products
/// summed in f32 in the order of its rows.
///
/// # Safety
/// As [`Format::tile`].
pub(super) unsafe fn tile_portable<F: Format, const R: usize>(tile: Tile<F>) {
    let mut acc = [[0f32; PANEL]; R];
    let lanes_by_step = tile.packed.chunks_exact(PANEL).take(tile.steps);
    for (step, lanes) in lanes_by_step.enumerate() {
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let at = r * tile.lda + F::STEP * step;
            for i in 0..F::STEP {
                let a = F::lhs_value(tile.lhs[at + i]);
                for (sum, &b) in acc_row.iter_mut().zip(lanes) {
                    *sum += a * F::packed_value(b, i);
                }
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        // SAFETY: the caller guarantees the tile lies inside the output and is ours.
        let out = std::slice::from_raw_parts_mut(tile.dst.add(r * tile.ldc), tile.width);
        for (o, &s) in out.iter_mut().zip(acc_row) {
            *o = if tile.accumulate { *o + s } else { s };
        }
    }
}

/// Writes (or with `accumulate` adds) `R` rows of four vectors of sums to the first `width`
/// columns of the rows at `dst`, `ldc` floats apart.
///
/// # Safety
/// The CPU must have AVX-512F; the rows must be valid for reads and writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store_sums<const R: usize>(
    acc: &[[std::arch::x86_64::__m512; VECTORS]; R],
    dst: *mut f32,
    ldc: usize,
    width: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    for (r, acc_row) in acc.iter().enumerate() {
        for (v, &sum) in acc_row.iter().enumerate() {
            let col = v * LANES;
            if col >= width {
                break;
            }
            let live = (width - col).min(LANES);
            let mask: __mmask16 = if live == LANES {
                0xffff
            } else {
                (1u16 << live) - 1
            };
            let ptr = dst.add(r * ldc + col);
            let value = if accumulate {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, ptr), sum)
            } else {
                sum
            };
            _mm512_mask_storeu_ps(ptr, mask, value);
        }
    }
}

/// f32 values, one row of the reduction axis per step: `x W^T` of an f32 model's linear
/// layers with the weight packed at load.
pub struct F32;

/// The inner kernels of [`F32`] products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    /// AVX-512F fused multiply-adds.
    Avx512,
    /// Plain Rust over the same packed data.
    Portable,
}

impl F32Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> F32Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return F32Kernel::Avx512;
        }
        F32Kernel::Portable
    }

    /// Whether products through this kernel outrun the `gemm` crate's, which is when a layer
    /// should be packed for it: the AVX-512 kernel does (it repacks nothing, and matched
    /// `gemm`'s microkernel on Sapphire Rapids, the only AVX-512 CPU it was measured on), the
    /// portable one does not.
    pub fn beats_gemm(self) -> bool {
        self == F32Kernel::Avx512
    }
}

impl Format for F32 {
    type Lhs = f32;
    type Kernel = F32Kernel;
    type Thread = F32Kernel;
    const STEP: usize = 1;

    fn pack(at: impl Fn(usize) -> f32) -> u32 {
        at(0).to_bits()
    }

    fn runs_here(kernel: F32Kernel) -> bool {
        kernel == F32Kernel::Portable || F32Kernel::detect() == F32Kernel::Avx512
    }

    fn tile_rows(_: F32Kernel) -> usize {
        ROWS
    }

    fn block_steps(_: F32Kernel) -> usize {
        F32_BLOCK_STEPS
    }

    fn thread(kernel: F32Kernel) -> F32Kernel {
        kernel
    }

    unsafe fn tile(kernel: &F32Kernel, tile: Tile<F32>) {
        tile.check(ROWS);
        match kernel {
            // SAFETY: the kernel runs here (the caller's contract); the slices were bounds-checked above and the
            // tile is the caller's to write.
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => unsafe { by_rows!(tile_f32_avx512, tile) },
            // SAFETY: as above.
            _ => unsafe { by_rows!(tile_f32_portable, tile) },
        }
    }

    fn lhs_value(x: f32) -> f32 {
        x
    }

    fn packed_value(packed: u32, _: usize) -> f32 {
        f32::from_bits(packed)
    }
}

/// Rows of the reduction axis per cache block of the f32 kernels: 256 KiB of a panel, in L2
/// (the kernel prefetches it into L1). On 2 Sapphire Rapids cores, 1,024 beat 512 and 256
/// (2-10% on the forward pass's products at 2,048 rows, more at 64).
const F32_BLOCK_STEPS: usize = 1024;
/// Steps ahead of the one it multiplies that the f32 kernel prefetches its panel (8 beat 4
/// and 16; without it the kernel ran at 75% of `gemm`'s speed).
const PREFETCH_STEPS: usize = 8;

/// [`tile_portable`] for [`F32`].
///
/// # Safety
/// As [`Format::tile`].
unsafe fn tile_f32_portable<const R: usize>(tile: Tile<F32>) {
    tile_portable::<F32, R>(tile)
}

/// An f32 tile with AVX-512F: `R` x 4 accumulator registers, one broadcast left-hand value
/// and four packed vectors per step, the panel prefetched [`PREFETCH_STEPS`] ahead (a
/// prefetch never faults, so running past the panel's end is harmless).
///
/// # Safety
/// The CPU must have AVX-512F; `lhs` and `packed` must hold what [`Tile::check`] checks, and
/// the output tile be as [`Format::tile`] requires.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32_avx512<const R: usize>(tile: Tile<F32>) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
    let a = tile.lhs.as_ptr();
    let mut b = tile.packed.as_ptr().cast::<f32>();
    for step in 0..tile.steps {
        let mut bv = [_mm512_setzero_ps(); VECTORS];
        for (v, slot) in bv.iter_mut().enumerate() {
            *slot = _mm512_loadu_ps(b.add(v * LANES));
        }
        for v in 0..VECTORS {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_STEPS * PANEL + v * LANES).cast());
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(r * tile.lda + step));
            for (sum, &bvec) in acc_row.iter_mut().zip(&bv) {
                *sum = _mm512_fmadd_ps(av, bvec, *sum);
            }
        }
        b = b.add(PANEL);
    }
    store_sums(&acc, tile.dst, tile.ldc, tile.width, tile.accumulate);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn kernels() -> Vec<F32Kernel> {
        [F32Kernel::Portable, F32Kernel::Avx512]
            .into_iter()
            .filter(|&kernel| F32::runs_here(kernel))
            .collect()
    }

    /// Sizes that are not multiples of the tile, the panel or the cache block, a padded
    /// left-hand and output stride; every f32 kernel this CPU has, against f64 sums.
    #[test]
    fn f32_gemm_matches_f64_on_awkward_sizes() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 70),
            (13, 2 * F32_BLOCK_STEPS + 3, 129),
            (6, 64, 64),
            (25, 517, 200),
            (64, F32_BLOCK_STEPS, 192),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let packed = Packed::<F32>::pack(k, n, |row, col| b[row * n + col]);
            assert_eq!(packed.lhs_stride(), k);
            let lda = k + 3;
            let mut padded = vec![f32::NAN; m * lda];
            for i in 0..m {
                padded[i * lda..i * lda + k].copy_from_slice(&a[i * k..(i + 1) * k]);
            }
            let ldc = n + 5;
            for kernel in kernels() {
                let mut c = vec![f32::NAN; m * ldc];
                gemm(kernel, &padded, lda, m, &packed, &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut abs) = (0f64, 0f64);
                        for p in 0..k {
                            let term = a[i * k + p] as f64 * b[p * n + j] as f64;
                            (want, abs) = (want + term, abs + term.abs());
                        }
                        let got = c[i * ldc + j] as f64;
                        // Each product and sum rounds once: k x eps x Σ|terms| bounds it.
                        let tol = (k + 1) as f64 * f32::EPSILON as f64 * abs;
                        assert!(
                            (got - want).abs() <= tol,
                            "{kernel:?} {m}x{k}x{n} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
            }
        }
    }

    /// Every unit of work (a panel's row tile) falls in exactly one task's runs, and only a
    /// run at either end of a task covers part of a panel's rows.
    #[test]
    fn task_runs_cover_each_unit_once() {
        for (panels, tiles, tasks) in [(9, 342, 8), (3, 11, 8), (1, 1, 1), (36, 11, 8), (2, 3, 6)] {
            let units = panels * tiles;
            let mut seen = vec![0; units];
            for task in 0..tasks {
                let runs = task_runs(task * units / tasks..(task + 1) * units / tasks, tiles);
                for (i, (panel_run, rows)) in runs.iter().enumerate() {
                    let inner = i > 0 && i + 1 < runs.len();
                    assert!(
                        !inner || *rows == (0..tiles),
                        "{panels} x {tiles}: {runs:?}"
                    );
                    for unit in panel_run
                        .clone()
                        .flat_map(|p| rows.clone().map(move |t| p * tiles + t))
                    {
                        seen[unit] += 1;
                    }
                }
            }
            assert!(
                seen.iter().all(|&n| n == 1),
                "{panels} x {tiles} in {tasks}"
            );
        }
    }

    /// The same sums, bit for bit, on 1 thread and on 8 (where a single panel is split by
    /// rows between tasks), for both formats and every kernel this CPU has; a slice of the
    /// columns is the same sums as the whole; no reduction axis gives zeros.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        use super::super::bf16::{self, Bf16};
        fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            pool.unwrap().install(f)
        }
        fn same<F: Format>(kernel: F::Kernel, a: &[F::Lhs], m: usize, b: &Packed<F>) {
            let (n, lda) = (b.n(), b.lhs_stride());
            let run = |threads| {
                on_threads(threads, || {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(kernel, a, lda, m, b, &mut c, n);
                    c
                })
            };
            let (one, eight) = (run(1), run(8));
            let what = format!("{kernel:?} {m}x{}x{n}", b.k());
            assert!(
                one.iter()
                    .zip(&eight)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}"
            );
            if n > PANEL {
                let mut part = vec![f32::NAN; m * (n - PANEL)];
                gemm_columns(kernel, a, lda, m, b, PANEL..n, &mut part, n - PANEL);
                let whole = one.chunks(n).flat_map(|row| &row[PANEL..]);
                assert!(
                    part.iter().zip(whole).all(|(x, y)| x == y),
                    "{what}: columns"
                );
            }
        }
        let mut rng = StdRng::seed_from_u64(5);
        for (m, k, n) in [(64, F32_BLOCK_STEPS + 5, 64), (50, 700, 130), (3, 0, 70)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed = Packed::<F32>::pack(k, n, |row, col| b[row * n + col]);
            for kernel in kernels() {
                same(kernel, &a, m, &packed);
            }
            let packed = bf16::PackedB::pack(k, n, |row, col| b[row * n + col]);
            let lda = packed.lhs_stride();
            let mut bits = vec![0u16; m * lda];
            for (row, out) in a.chunks(k.max(1)).zip(bits.chunks_mut(lda.max(1))) {
                bf16::round_to_bf16(row, &mut out[..k]);
            }
            for kernel in [bf16::Kernel::Portable, bf16::Kernel::detect()] {
                same::<Bf16>(kernel, &bits, m, &packed);
            }
            if k == 0 {
                let mut c = vec![f32::NAN; m * n];
                gemm(
                    F32Kernel::Portable,
                    &a,
                    0,
                    m,
                    &Packed::<F32>::pack(0, n, |_, _| 1.0),
                    &mut c,
                    n,
                );
                assert!(c.iter().all(|&x| x == 0.0), "no reduction axis: zeros");
            }
        }
    }
}
