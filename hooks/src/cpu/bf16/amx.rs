//! Intel AMX tiles for the bf16 product. Xeons from Sapphire Rapids on multiply a 16 x 32 bf16
//! tile by a 32 x 16 one into 16 x 16 f32 sums in one instruction (`tdpbf16ps`), several times
//! the AVX-512 BF16 rate; PyTorch's bf16 products use them (through oneDNN) on these CPUs.
//!
//! The packed right-hand matrix of [`super::PackedB`] is already in the layout AMX reads (bf16
//! pairs of the reduction axis side by side per column), so a tile of 16 pairs x 16 columns is
//! a strided load from a panel. Linux hands the tile registers to a process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once. `EI_AMX=0` in the environment turns the
//! tiles off: the bf16 kernel is then AVX-512 BF16, which on Intel loses to f32 products, so
//! only an explicit bf16 request (`lens train --decode-dtype bf16`) still takes it.

use std::arch::asm;
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::PANEL;

/// Output rows per [`block`]: two tiles of 16.
pub(super) const ROWS: usize = 32;
/// Pairs of the reduction axis per tile.
pub(super) const PAIRS: usize = 16;
/// Bytes per tile row (every tile here is 16 rows of 64 bytes).
const TILE_ROW_BYTES: usize = 64;

/// Whether this CPU has AMX with bf16 products, Linux lets this process use the tiles, and
/// `EI_AMX` is not `0`.
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("EI_AMX").is_ok_and(|v| v.trim() == "0") {
            return false;
        }
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU (an `unsafe` call before Rust 1.87).
        #[allow(unused_unsafe)]
        let features = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        let has_amx = features & (1 << 22) != 0 && features & (1 << 24) != 0;
        if has_amx && !request_tile_data() {
            tracing::warn!("Linux refused this process the AMX tiles: no AMX bf16 products");
            return false;
        }
        has_amx
    })
}

/// Asks Linux for the tile data state (without it the first tile instruction faults).
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, then per tile its bytes per row and its rows.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// The eight tile registers of this thread, configured as 16 rows of 64 bytes each (tiles
/// 0-3 hold sums, 4-5 left-hand rows, 6-7 packed pairs); released when dropped. Tile state
/// belongs to a thread, so this is neither `Send` nor `Sync`.
pub(super) struct Tiles(PhantomData<*const ()>);

impl Tiles {
    /// Configures this thread's tiles.
    ///
    /// # Safety
    /// [`available`] must have returned true.
    pub(super) unsafe fn configure() -> Tiles {
        // Palette 1 has eight tiles; the entries past them must stay zero.
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        config.bytes_per_row[..8].fill(TILE_ROW_BYTES as u16);
        config.rows[..8].fill(16);
        // SAFETY: the CPU has AMX and the process may use it (the caller's promise); the
        // configuration is 64 bytes, aligned, with valid shapes for all eight tiles.
        unsafe { asm!("ldtilecfg [{0}]", in(reg) &config, options(nostack, readonly)) };
        Tiles(PhantomData)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: the tiles were configured on this thread (`Tiles` cannot leave it).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `dst[32, 64] = lhs[32, 2 pairs] · panel[pairs, 64]`, added to `dst` when `accumulate`:
/// one packed panel's whole width over `pairs` (a multiple of [`PAIRS`]) pairs, in two halves
/// of 2 x 2 tiles of 16 x 16 sums.
///
/// # Safety
/// `_tiles` configured on this thread; `lhs` readable for 32 rows of `2 * pairs` bf16 values
/// at a stride of `lda`; `panel` readable for `pairs * PANEL` packed pairs; `dst` writable
/// (and readable when `accumulate`) for 32 rows of [`PANEL`] floats at a stride of `ldc`,
/// and touched by no one else during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn block(
    _tiles: &Tiles,
    lhs: *const u16,
    lda: usize,
    panel: *const u32,
    pairs: usize,
    dst: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    assert!(
        pairs.is_multiple_of(PAIRS),
        "AMX blocks take whole tiles of pairs"
    );
    let (lhs_stride, panel_stride, dst_stride) = (2 * lda, 4 * PANEL, 4 * ldc);
    for half in 0..2 {
        let col0 = half * 32;
        let sums = [
            dst.add(col0),
            dst.add(col0 + 16),
            dst.add(16 * ldc + col0),
            dst.add(16 * ldc + col0 + 16),
        ];
        // SAFETY (all blocks): every address below lies inside the regions the caller
        // vouches for; each tile load or store reads or writes 16 rows of 64 bytes.
        if accumulate {
            asm!(
                "tileloadd tmm0, [{0} + {s}*1]",
                "tileloadd tmm1, [{1} + {s}*1]",
                "tileloadd tmm2, [{2} + {s}*1]",
                "tileloadd tmm3, [{3} + {s}*1]",
                in(reg) sums[0], in(reg) sums[1], in(reg) sums[2], in(reg) sums[3],
                s = in(reg) dst_stride,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for pair in (0..pairs).step_by(PAIRS) {
            let top = lhs.add(2 * pair);
            let bottom = top.add(16 * lda);
            let left = panel.add(pair * PANEL + col0);
            let right = left.add(16);
            asm!(
                "tileloadd tmm4, [{top} + {ls}*1]",
                "tileloadd tmm6, [{left} + {ps}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{right} + {ps}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{bottom} + {ls}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                top = in(reg) top,
                bottom = in(reg) bottom,
                left = in(reg) left,
                right = in(reg) right,
                ls = in(reg) lhs_stride,
                ps = in(reg) panel_stride,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{0} + {s}*1], tmm0",
            "tilestored [{1} + {s}*1], tmm1",
            "tilestored [{2} + {s}*1], tmm2",
            "tilestored [{3} + {s}*1], tmm3",
            in(reg) sums[0], in(reg) sums[1], in(reg) sums[2], in(reg) sums[3],
            s = in(reg) dst_stride,
            options(nostack),
        );
    }
}
