//! What our own CUDA kernels share (the forward pass's fused attention and element-wise
//! steps, Adam, the SAE's TopK and sparse products, the lens's fused loss): compiling a
//! kernel source with NVRTC at run time, launching its entry points on candle's CUDA
//! tensors ([`launch`], with the `cuda` feature), and running the same source on the CPU
//! under emulation in the tests (`emulation`, with the `kernel-emulation` feature that the
//! kernel crates' dev-dependencies turn on).
//!
//! NVRTC needs no GPU, so the CPU test suite compiles every kernel source, and the emulation
//! runs it against the Rust CPU implementations: a syntax, type or logic error in a kernel
//! fails the ordinary test run. Kernel sources are plain CUDA C++ without includes, using
//! block-wide `__syncthreads` and only the warp-level primitives the emulation provides (a
//! lane shuffle, bf16 `mma.sync`, `ldmatrix`), called by every thread of a block alike.

#[cfg(any(test, feature = "kernel-emulation"))]
pub mod emulation;
#[cfg(feature = "cuda")]
pub mod launch;

use crate::{Error, Result};

/// A CUDA C++ source compiled at run time into one module of kernels.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// The module's name, in NVRTC messages and in candle's per-device module cache.
    pub module: &'static str,
    /// The CUDA C++ source.
    pub source: &'static str,
}

/// The element types every kernel source uses (`bf16_bits`, `to_f32`, `from_f32`, ...):
/// compiled ahead of it by NVRTC, included ahead of it by the emulation harnesses.
pub const ELEMENT_TYPES: &str = include_str!("element_types.cuh");

impl KernelSource {
    /// Compiles the source to PTX for a virtual architecture such as `"compute_90"` (or
    /// NVRTC's default when `None`). Needs the NVRTC library, not a GPU.
    pub fn compile_ptx(&self, arch: Option<&'static str>) -> Result<cudarc::nvrtc::Ptx> {
        let options = cudarc::nvrtc::CompileOptions {
            arch,
            name: Some(format!("{}.cu", self.module)),
            ..Default::default()
        };
        let source = format!("{ELEMENT_TYPES}\n{}", self.source);
        cudarc::nvrtc::compile_ptx_with_opts(source, options)
            .map_err(|e| Error::Cuda(format!("NVRTC could not compile {}.cu: {e}", self.module)))
    }
}

/// Runs `f` with cuBLAS allowed to compute f32 products on TF32 tensor cores (f32 inputs
/// rounded to 10 mantissa bits, f32 sums; about 8x the plain f32 rate). candle keeps this as
/// a process-wide switch: it is restored afterwards, and an f32 product run by another
/// thread meanwhile may also use TF32. No effect off CUDA devices.
pub fn with_tf32_products<T>(f: impl FnOnce() -> T) -> T {
    use candle_core::cuda::{gemm_reduced_precision_f32, set_gemm_reduced_precision_f32};
    let before = gemm_reduced_precision_f32();
    set_gemm_reduced_precision_f32(true);
    let out = f();
    set_gemm_reduced_precision_f32(before);
    out
}

/// Whether NVRTC can be loaded (always, with the `cuda` feature, which links it).
pub fn nvrtc_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        true
    }
    #[cfg(not(feature = "cuda"))]
    // SAFETY: only tries to open the library by its usual names.
    unsafe {
        cudarc::nvrtc::sys::is_culib_present()
    }
}

#[cfg(any(test, feature = "kernel-emulation"))]
/// Checks that NVRTC compiles `source` for its default target, compute_80 and compute_90,
/// and that every name in `entry_points` is a kernel of the PTX. For the kernel crates'
/// tests; reports SKIP (see [`emulation::missing`]) when NVRTC is absent.
pub fn check_compiles(source: &KernelSource, entry_points: &[&str]) {
    if !nvrtc_present() {
        emulation::missing("NVRTC (libnvrtc.so.13) not found on the library path");
        return;
    }
    for arch in [None, Some("compute_80"), Some("compute_90")] {
        let ptx = source
            .compile_ptx(arch)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_src();
        for name in entry_points {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "no entry point {name} in the PTX of {} for {arch:?}",
                source.module
            );
        }
    }
}
