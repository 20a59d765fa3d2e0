//! A bfloat16 matrix product on the CPU (bf16 inputs, f32 sums), first written for decoding
//! through the frozen unembedding, also used by Muon's Newton-Schulz iterations.
//!
//! Lens training spends most of its time in two vocabulary-sized products per layer: the lens
//! logits `normed · W_Uᵀ` and the gradient back through them `dlogits · W_U`. tuned-lens runs
//! them under bfloat16 autocast (bf16 inputs, f32 accumulation). With AVX-512 BF16
//! (`vdpbf16ps`, two bf16 products summed into each f32 lane) that is twice the f32 FMA rate
//! on AMD's Zen 4 but half of it on Intel, and several times it on Intel's AMX tiles: callers
//! take this module's product where [`Kernel::beats_f32`]. It computes as autocast does: the
//! frozen right-hand matrix is packed once into bf16 pairs along the reduction axis
//! ([`PackedB`]), the left-hand rows are rounded to bf16 per call, and [`gemm`] accumulates
//! in f32. On CPUs with Intel AMX (Sapphire Rapids and later Xeons) the same packed data
//! feeds the tile unit ([`amx`]). CPUs without AVX-512 BF16 get a portable kernel over the
//! same packed data (same rounding of the inputs, slower). The blocking and threading are
//! [`super::packed`]'s, shared with the f32 product.

use std::sync::OnceLock;

use super::packed::{by_rows, tile_portable, Format, Packed, Tile, LANES, PANEL, ROWS, VECTORS};
pub use super::packed::{gemm, gemm_columns, PANEL_WIDTH};

#[cfg(target_arch = "x86_64")]
mod amx;

/// Pairs of the reduction axis per cache block (vector kernels).
const BLOCK_PAIRS: usize = 256;

/// Rounds `x` to the nearest bfloat16 (ties to even), as bits; NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bfloat16 bits.
#[inline(always)]
pub fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Rounds `src` to bf16 into `dst` (the same length).
pub fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_bits(s);
    }
}

/// A frozen `[k, n]` matrix in bf16, packed for [`gemm`]: each step of a panel holds, for a
/// pair of rows `(2p, 2p + 1)`, the two values of each column side by side (the operand
/// layout of `vdpbf16ps` and AMX).
pub type PackedB = Packed<Bf16>;

/// bf16 values in pairs of rows of the reduction axis, multiplied by bf16 left-hand rows
/// (their bits) into f32 sums.
pub struct Bf16;

impl Format for Bf16 {
    type Lhs = u16;
    type Kernel = Kernel;
    type Thread = ThreadTiles;
    const STEP: usize = 2;

    fn pack(at: impl Fn(usize) -> f32) -> u32 {
        bf16_bits(at(0)) as u32 | ((bf16_bits(at(1)) as u32) << 16)
    }

    fn runs_here(kernel: Kernel) -> bool {
        kernel.runs_here()
    }

    fn tile_rows(kernel: Kernel) -> usize {
        kernel.rows()
    }

    fn block_steps(kernel: Kernel) -> usize {
        kernel.block_pairs()
    }

    fn thread(kernel: Kernel) -> ThreadTiles {
        ThreadTiles::new(kernel)
    }

    unsafe fn tile(thread: &ThreadTiles, tile: Tile<Bf16>) {
        // SAFETY: the caller's contract is this function's.
        unsafe { tile_kernel(thread, tile) }
    }

    fn lhs_value(bits: u16) -> f32 {
        bf16_value(bits)
    }

    fn packed_value(packed: u32, i: usize) -> f32 {
        bf16_value((packed >> (16 * i)) as u16)
    }
}

/// Which inner kernel [`gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`tdpbf16ps`) for whole blocks of 32 rows x 64 columns x 16 pairs,
    /// AVX-512 BF16 for what is left at the edges.
    Amx,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// Plain Rust over the same packed data: bf16 inputs, f32 products and sums.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
        {
            return if amx::available() {
                Kernel::Amx
            } else {
                Kernel::Avx512Bf16
            };
        }
        Kernel::Portable
    }

    /// Whether bf16 products through this kernel outrun f32 products on this CPU, which is
    /// when a model or a lens should take them. AMX does (several times over). AVX-512 BF16
    /// does on AMD (on a Zen 4 EPYC, lens decoding ran 1.9x faster in bf16 than through
    /// candle's f32 products, before f32 decoding kept its buffers) but not on Intel, where
    /// `vdpbf16ps` issues every other cycle, half the f32 FMA rate (83 against 173 GFLOP/s on
    /// one Sapphire Rapids core whose hypervisor hides AMX). The portable kernel never does.
    pub fn beats_f32(self) -> bool {
        match self {
            Kernel::Amx => true,
            Kernel::Avx512Bf16 => cpu_is_amd(),
            Kernel::Portable => false,
        }
    }

    /// Whether this CPU can run this kernel.
    pub fn runs_here(self) -> bool {
        match (self, Kernel::detect()) {
            (Kernel::Portable, _) | (_, Kernel::Amx) => true,
            (Kernel::Avx512Bf16, detected) => detected == Kernel::Avx512Bf16,
            (Kernel::Amx, _) => false,
        }
    }

    /// Pairs of the reduction axis per cache block: AMX, which reloads its sums from memory
    /// at each block, gains from longer ones (measured on the lens's products).
    fn block_pairs(self) -> usize {
        match self {
            Kernel::Amx => 4 * BLOCK_PAIRS,
            _ => BLOCK_PAIRS,
        }
    }

    /// Output rows per tile.
    fn rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => amx::ROWS,
            _ => ROWS,
        }
    }
}

/// Whether this is an AMD (or Hygon) CPU, by the CPUID vendor string.
fn cpu_is_amd() -> bool {
    static AMD: OnceLock<bool> = OnceLock::new();
    *AMD.get_or_init(|| matches!(&cpu_vendor(), b"AuthenticAMD" | b"HygonGenuine"))
}

/// The CPUID vendor string (`GenuineIntel`, `AuthenticAMD`, ...); zeros off x86-64.
fn cpu_vendor() -> [u8; 12] {
    let mut vendor = [0u8; 12];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU (an `unsafe` call before Rust 1.87).
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        for (chunk, word) in vendor
            .chunks_exact_mut(4)
            .zip([leaf.ebx, leaf.edx, leaf.ecx])
        {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
    }
    vendor
}

/// A [`gemm`] task's kernel, with this thread's AMX tiles configured when it uses them.
pub struct ThreadTiles {
    kernel: Kernel,
    #[cfg(target_arch = "x86_64")]
    amx: Option<amx::Tiles>,
}

impl ThreadTiles {
    /// Tiles for `kernel` (none unless it is AMX and runs on this CPU).
    fn new(kernel: Kernel) -> Self {
        ThreadTiles {
            kernel,
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AMX is available where `Kernel::Amx` runs.
            amx: (kernel == Kernel::Amx && kernel.runs_here())
                .then(|| unsafe { amx::Tiles::configure() }),
        }
    }
}

/// One output tile of `rows` (≤ the kernel's rows) x `width` (≤ [`PANEL`]), bounds-checked
/// once by the path it takes. With AMX, a whole tile's pairs in multiples of 16 go through the
/// tiles and the rest (the remaining pairs, a narrower or shorter tile) through AVX-512 BF16.
///
/// # Safety
/// `rows` rows of `width` floats at `dst`, `dst + ldc`, ... must be valid for reads and writes and
/// not accessed by anyone else during the call.
unsafe fn tile_kernel(tiles: &ThreadTiles, tile: Tile<Bf16>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(amx_tiles) = &tiles.amx {
        tile.check(amx::ROWS);
        let whole = if tile.rows == amx::ROWS && tile.width == PANEL {
            tile.steps - tile.steps % amx::PAIRS
        } else {
            0
        };
        if whole > 0 {
            // SAFETY: 32 rows of `2 * whole` values and `whole` packed pairs were checked
            // above; the tile is the caller's, a whole panel wide.
            amx::block(
                amx_tiles,
                tile.lhs.as_ptr(),
                tile.lda,
                tile.packed.as_ptr(),
                whole,
                tile.dst,
                tile.ldc,
                tile.accumulate,
            );
        }
        if whole < tile.steps {
            for row0 in (0..tile.rows).step_by(ROWS) {
                // SAFETY: rows `row0..` of the tile, the pairs after `whole`; in bounds as
                // checked above. AMX CPUs have AVX-512 BF16 (`Kernel::runs_here`).
                let rest = Tile {
                    rows: ROWS.min(tile.rows - row0),
                    lhs: &tile.lhs[row0 * tile.lda + 2 * whole..],
                    packed: &tile.packed[whole * PANEL..],
                    steps: tile.steps - whole,
                    dst: tile.dst.add(row0 * tile.ldc),
                    accumulate: tile.accumulate || whole > 0,
                    ..tile
                };
                vector_tile(Kernel::Avx512Bf16, rest);
            }
        }
        return;
    }
    vector_tile(tiles.kernel, tile)
}

/// [`tile_kernel`] for at most [`ROWS`] rows through vector registers: AVX-512 BF16, or the
/// portable kernel for any other `kernel`.
///
/// # Safety
/// As [`tile_kernel`].
unsafe fn vector_tile(kernel: Kernel, tile: Tile<Bf16>) {
    tile.check(ROWS);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `gemm` checked that the CPU has the features; the slices were
        // bounds-checked above and the tile is the caller's to write.
        Kernel::Avx512Bf16 => unsafe { by_rows!(tile_avx512, tile) },
        // SAFETY: as above, without the CPU features.
        _ => unsafe { by_rows!(tile_bf16_portable, tile) },
    }
}

/// [`tile_portable`] for [`Bf16`].
///
/// # Safety
/// As [`tile_kernel`].
unsafe fn tile_bf16_portable<const R: usize>(tile: Tile<Bf16>) {
    tile_portable::<Bf16, R>(tile)
}

/// [`tile_kernel`] with `vdpbf16ps`: `R` x 4 accumulator registers, one broadcast pair of
/// the left-hand row and four packed vectors per step.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 BF16; `lhs`, `packed` and the output tile must be
/// in bounds as [`tile_kernel`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_avx512<const R: usize>(tile: Tile<Bf16>) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
    let a = tile.lhs.as_ptr();
    let mut b = tile.packed.as_ptr();
    for pair in 0..tile.steps {
        let mut bv = [_mm512_setzero_ps(); VECTORS];
        for (v, slot) in bv.iter_mut().enumerate() {
            *slot = _mm512_castsi512_ps(_mm512_loadu_si512(b.add(v * LANES).cast()));
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let pair_bits = a
                .add(r * tile.lda + 2 * pair)
                .cast::<u32>()
                .read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair_bits as i32));
            for (sum, &bvec) in acc_row.iter_mut().zip(&bv) {
                *sum = _mm512_dpbf16_ps(*sum, av, std::mem::transmute::<__m512, __m512bh>(bvec));
            }
        }
        b = b.add(PANEL);
    }
    super::packed::store_sums(&acc, tile.dst, tile.ldc, tile.width, tile.accumulate);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// `a · b` in f64 from the bf16-rounded inputs (the product the kernels approximate)
    /// and `|a| · |b|` (which bounds the rounding error of a sum).
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let round = |x: f32| bf16_value(bf16_bits(x)) as f64;
        let (mut c, mut abs) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for p in 0..k {
                let x = round(a[i * k + p]);
                for j in 0..n {
                    let term = x * round(b[p * n + j]);
                    c[i * n + j] += term;
                    abs[i * n + j] += term.abs();
                }
            }
        }
        (c, abs)
    }

    fn kernels() -> Vec<Kernel> {
        [Kernel::Portable, Kernel::Avx512Bf16, Kernel::Amx]
            .into_iter()
            .filter(|kernel| kernel.runs_here())
            .collect()
    }

    /// Sizes that are not multiples of the tile, the panel or the cache block, an odd
    /// reduction length, a padded output stride; every kernel this CPU has, against f64.
    #[test]
    fn gemm_matches_f64_on_awkward_sizes() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 70),
            (13, 2 * BLOCK_PAIRS + 3, 129),
            (6, 64, 64),
            (25, 517, 200),
            // AMX blocks (32 rows, 64 columns, 16 pairs) with every kind of edge: rows past
            // the last whole block, a narrower last panel, pairs past the last 16 in a cache
            // block and in the last one.
            (70, 2 * (Kernel::Amx.block_pairs() + 53) + 1, 200),
            (64, 2 * Kernel::Amx.block_pairs(), 128),
            // Whole tiles whose only cache block ends past the last 16 pairs: the vector
            // kernel adds the rest onto what the tiles summed.
            (64, 201, 128),
            (33, 75, 130),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let packed = PackedB::pack(k, n, |row, col| b[row * n + col]);
            let lda = packed.lhs_stride() + 2;
            let mut a16 = vec![0u16; m * lda];
            for i in 0..m {
                round_to_bf16(&a[i * k..(i + 1) * k], &mut a16[i * lda..i * lda + k]);
            }
            let (want, abs) = reference(&a, &b, m, k, n);
            let ldc = n + 5;
            for kernel in kernels() {
                let mut c = vec![f32::NAN; m * ldc];
                gemm(kernel, &a16, lda, m, &packed, &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (c[i * ldc + j] as f64, want[i * n + j]);
                        // Products of bf16 values are exact in f32; summing k of them in
                        // f32 errs by at most k x eps x Σ|terms|.
                        let tol = k as f64 * f32::EPSILON as f64 * abs[i * n + j];
                        assert!(
                            (got - want).abs() <= tol,
                            "{kernel:?} {m}x{k}x{n} at ({i}, {j}): {got} vs {want}"
                        );
                    }
                    // The padding between rows is left alone.
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|x| x.is_nan()));
                }
                // Slices of the columns (from the second panel on, one panel in the middle)
                // into rows wider than the slice: the same sums, bit for bit, and the rest
                // of each row left alone.
                for columns in [PANEL..n, PANEL..(2 * PANEL).min(n)] {
                    if columns.is_empty() {
                        continue;
                    }
                    let (width, stride) = (columns.len(), columns.len() + 3);
                    let mut part = vec![f32::NAN; m * stride];
                    let what = format!("{kernel:?} {m}x{k}x{n}: columns {columns:?}");
                    gemm_columns(
                        kernel,
                        &a16,
                        lda,
                        m,
                        &packed,
                        columns.clone(),
                        &mut part,
                        stride,
                    );
                    for i in 0..m {
                        let whole = &c[i * ldc + columns.start..i * ldc + columns.end];
                        let row = &part[i * stride..(i + 1) * stride];
                        assert!(row[..width] == *whole, "{what}, row {i}");
                        assert!(row[width..].iter().all(|x| x.is_nan()), "{what}, row {i}");
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "gemm columns 10..64 of 70")]
    fn column_slices_start_at_a_panel() {
        let packed = PackedB::pack(4, 70, |row, col| (row + col) as f32);
        let a = vec![0u16; 4];
        let mut c = vec![0f32; 64];
        gemm_columns(Kernel::Portable, &a, 4, 1, &packed, 10..64, &mut c, 54);
    }

    /// bf16 products beat f32 through AMX, never through the portable kernel, and through
    /// AVX-512 BF16 on AMD only; the vendor is read as 12 printable characters.
    #[test]
    fn bf16_beats_f32_by_kernel_and_vendor() {
        assert!(Kernel::Amx.beats_f32() && !Kernel::Portable.beats_f32());
        assert_eq!(Kernel::Avx512Bf16.beats_f32(), cpu_is_amd());
        #[cfg(target_arch = "x86_64")]
        {
            let vendor = cpu_vendor();
            assert!(vendor.iter().all(|c| c.is_ascii_graphic()), "{vendor:?}");
            eprintln!("vendor {}", String::from_utf8_lossy(&vendor));
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: rounds up.
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7f80);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
        assert_eq!(bf16_bits(f32::MAX), 0x7f80, "overflow rounds to infinity");
    }
}
