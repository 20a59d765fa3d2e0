//! The encoder's dense product and its TopK selection fused, for x86-64 CPUs with AVX-512F.
//!
//! The product is ~all of an SAE training step on the CPU (`2 d n` FLOP per token). Here the
//! encoder matrix is packed once per call into panels of [`PANEL`] latents laid out
//! dimension-major, a block of tokens into groups of [`ROWS`] rows, and each `ROWS x PANEL`
//! tile of pre-activations is summed in 24 vector registers, biased, cut at zero and
//! filtered right away against each row's selection bar: the pre-activations never reach
//! memory, and a latent costs the selection one comparison unless it beats the bar. Each
//! pre-activation is one FMA chain over the input dimensions in order.

use std::sync::{Mutex, TryLockError};

use rayon::prelude::*;

use super::{live_lanes, BlockPicks, Picks, RowPicks, LANES};

/// Latents per panel: two 16-float vectors, one word of [`super::lane_bits`].
const PANEL: usize = LANES;
/// Token rows per tile: with two vectors per row, 24 of the 32 vector registers.
const ROWS: usize = 12;
/// Token rows per block (one task): the block's packed rows (`d` x 4 B each) and one panel
/// stay in a core's L2 cache while every panel streams past them.
const BLOCK_ROWS: usize = 16 * ROWS;
/// Fewer rows than this go through the generic product: packing the whole encoder matrix
/// would cost more than it saves.
const MIN_ROWS: usize = 4 * ROWS;

/// The packed encoder, kept between calls so that repacking reuses its pages (it keeps the
/// size of the largest encoder seen).
static PACKED: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// Whether this CPU runs the fused kernel and `rows` tokens are worth it.
pub(super) fn usable(rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        rows >= MIN_ROWS && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = rows;
        false
    }
}

/// The selections of `ReLU(xc W_encᵀ + b_enc)` for the rows of `xc: [rows, d]`, one
/// [`BlockPicks`] per block of rows in order; `dead` the AuxK candidates as
/// [`super::lane_bits`]. Call only when [`usable`].
pub(super) fn encode_select(
    xc: &[f32],
    w_enc: &[f32],
    b_enc: &[f32],
    d: usize,
    picks: Picks,
    dead: Option<&[u32]>,
) -> Vec<BlockPicks> {
    let n = b_enc.len();
    let panels = n.div_ceil(PANEL);
    let mut bias = b_enc.to_vec();
    bias.resize(panels * PANEL, 0.0);
    // An encoder running at the same time packs into a buffer of its own.
    let mut guard = match PACKED.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    let mut own = Vec::new();
    let packed = guard.as_deref_mut().unwrap_or(&mut own);
    pack(w_enc, n, d, packed);
    let packed = &*packed;
    xc.par_chunks(BLOCK_ROWS * d)
        .map(|x| {
            let m = x.len() / d;
            let groups = pack_rows(x, m, d);
            let mut rows: Vec<RowPicks> = (0..m).map(|_| RowPicks::new(picks)).collect();
            let mut tile = [0f32; ROWS * PANEL];
            for (p, panel) in packed.chunks_exact(d * PANEL).enumerate() {
                let j0 = p * PANEL;
                let lanes = live_lanes(p, n);
                let dead = dead.map(|bits| bits[p]);
                for (g, xg) in groups.chunks_exact(d * ROWS).enumerate() {
                    // SAFETY: `usable` checked the CPU; the slices have the lengths the
                    // kernel reads (`d` steps of ROWS and PANEL floats, PANEL of bias).
                    unsafe { tile_avx512(xg, panel, &bias[j0..j0 + PANEL], &mut tile) };
                    let r0 = g * ROWS;
                    for (row, values) in rows[r0..].iter_mut().zip(tile.chunks_exact(PANEL)) {
                        row.offer_lanes(values, j0 as u32, lanes, dead);
                    }
                }
            }
            let mut out = BlockPicks::default();
            for row in &mut rows {
                row.emit(&mut out);
            }
            out
        })
        .collect()
}

/// Packs `w: [n, d]` into `out` as panels of [`PANEL`] latents: panel `p` holds
/// `W[PANEL p + l][i]` at `[p][i][l]`, zero past `n`.
fn pack(w: &[f32], n: usize, d: usize, out: &mut Vec<f32>) {
    let panels = n.div_ceil(PANEL);
    out.resize(panels * d * PANEL, 0.0);
    out.par_chunks_mut(d * PANEL)
        .enumerate()
        .for_each(|(p, panel)| {
            for l in 0..PANEL {
                let j = p * PANEL + l;
                let row = (j < n).then(|| &w[j * d..(j + 1) * d]);
                for i in 0..d {
                    panel[i * PANEL + l] = row.map_or(0.0, |row| row[i]);
                }
            }
        });
}

/// The `m` rows of `x: [m, d]` as groups of [`ROWS`]: group `g` holds `x[ROWS g + r][i]` at
/// `[g][i][r]`, zero past `m`.
fn pack_rows(x: &[f32], m: usize, d: usize) -> Vec<f32> {
    let groups = m.div_ceil(ROWS);
    let mut out = vec![0f32; groups * d * ROWS];
    for (g, group) in out.chunks_exact_mut(d * ROWS).enumerate() {
        for r in 0..ROWS.min(m - g * ROWS) {
            let row = &x[(g * ROWS + r) * d..][..d];
            for (i, &v) in row.iter().enumerate() {
                group[i * ROWS + r] = v;
            }
        }
    }
    out
}

/// One tile: `out[r][l] = max(Σ_i rows[i][r] · panel[i][l] + bias[l], 0)` for the
/// [`ROWS`] x [`PANEL`] tile, the sum one FMA chain over `i` in order.
///
/// # Safety
/// The CPU must have AVX-512F; `rows` must hold `d` x ROWS floats, `panel` `d` x PANEL and
/// `bias` PANEL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(rows: &[f32], panel: &[f32], bias: &[f32], out: &mut [f32; ROWS * PANEL]) {
    use std::arch::x86_64::*;
    let d = panel.len() / PANEL;
    debug_assert!(rows.len() == d * ROWS && bias.len() == PANEL);
    let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
    let (mut x, mut w) = (rows.as_ptr(), panel.as_ptr());
    for _ in 0..d {
        let w0 = _mm512_loadu_ps(w);
        let w1 = _mm512_loadu_ps(w.add(16));
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(r));
            acc[0] = _mm512_fmadd_ps(xv, w0, acc[0]);
            acc[1] = _mm512_fmadd_ps(xv, w1, acc[1]);
        }
        x = x.add(ROWS);
        w = w.add(PANEL);
    }
    let (b0, b1) = (
        _mm512_loadu_ps(bias.as_ptr()),
        _mm512_loadu_ps(bias.as_ptr().add(16)),
    );
    let zero = _mm512_setzero_ps();
    for (r, acc) in acc.iter().enumerate() {
        // max(v, 0) gives 0 for a NaN v, as f32::max does.
        let at = out.as_mut_ptr().add(r * PANEL);
        _mm512_storeu_ps(at, _mm512_max_ps(_mm512_add_ps(acc[0], b0), zero));
        _mm512_storeu_ps(at.add(16), _mm512_max_ps(_mm512_add_ps(acc[1], b1), zero));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx512(_: &[f32], _: &[f32], _: &[f32], _: &mut [f32; ROWS * PANEL]) {
    unreachable!("`usable` is false off x86-64")
}
