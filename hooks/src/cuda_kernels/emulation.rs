//! Test support: a kernel source built by the C++ compiler with `emulation/cuda_emulation.h`
//! runs on the CPU, one block after another, the threads of a block as fibers. A crate's
//! tests write a small harness (a `main` that includes `emulation/cuda_emulation.h`,
//! `emulation/harness_io.h`, `element_types.cuh` and the kernel source, reads the inputs,
//! launches one kernel through `emulate_launch` and writes the outputs), then compare its
//! outputs with the Rust CPU implementation.
//!
//! Without a C++20 compiler (`c++`, or `$CXX`) the checks print SKIP and pass, unless
//! `EI_REQUIRE_KERNEL_CHECKS` is set, as `scripts/test-all` (CI) does: there they fail.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use half::bf16;

use super::KernelSource;

/// The include path of a harness: `element_types.cuh`, `emulation/cuda_emulation.h` and
/// `emulation/harness_io.h`.
pub const INCLUDE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda_kernels");
const HEADERS: [&str; 3] = [
    super::ELEMENT_TYPES,
    include_str!("emulation/cuda_emulation.h"),
    include_str!("emulation/harness_io.h"),
];

/// Whether a missing NVRTC or C++ compiler fails the kernel checks (`EI_REQUIRE_KERNEL_CHECKS`).
pub fn required() -> bool {
    std::env::var_os("EI_REQUIRE_KERNEL_CHECKS").is_some()
}

/// Reports a missing tool: SKIP (the test passes) or, when [`required`], a failure.
pub fn missing(what: &str) {
    assert!(
        !required(),
        "{what} (EI_REQUIRE_KERNEL_CHECKS is set, so this fails)"
    );
    eprintln!("SKIP CUDA kernel check: {what}");
}

/// Builds the harness `harness_cpp` (which includes the kernel source) into `out_dir`, named
/// after `name` and a hash of `sources` (the kernel source and the harness text) and of the
/// emulation headers, so a changed source is rebuilt and an unchanged one is reused. `None`
/// (after reporting SKIP) without a C++ compiler; panics when the compiler rejects the code.
fn build_harness(
    name: &str,
    harness_cpp: &Path,
    sources: &[&str],
    out_dir: &Path,
) -> Option<PathBuf> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (sources, HEADERS).hash(&mut hasher);
    let path = out_dir.join(format!("{name}-{:016x}", hasher.finish()));
    // One build at a time in a process: the tests that need a harness wait for the first.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _building = BUILDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if path.exists() {
        return Some(path);
    }
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let partial = path.with_extension(format!("partial{}", std::process::id()));
    let output = match Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-I", INCLUDE_DIR, "-o"])
        .arg(&partial)
        .arg(harness_cpp)
        .output()
    {
        Ok(output) => output,
        Err(e) => {
            missing(&format!("cannot run the C++ compiler '{compiler}': {e}"));
            return None;
        }
    };
    // A compiler that runs but rejects the source is a real failure, not a SKIP.
    assert!(
        output.status.success(),
        "{compiler} could not build {}:\n{}",
        harness_cpp.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::rename(&partial, &path)
        .unwrap_or_else(|e| panic!("cannot move the harness to {}: {e}", path.display()));
    Some(path)
}

/// A built harness and a scratch folder for the files it reads and writes.
pub struct Emulated {
    harness: PathBuf,
    dir: tempfile::TempDir,
}

impl Emulated {
    /// The harness `harness_cpp` (whose text is `harness_text`) of `kernels`, built once per
    /// version of the sources next to the running test binary, with a fresh scratch folder;
    /// `None` (after reporting SKIP) without a C++ compiler.
    pub fn build(
        name: &str,
        kernels: &KernelSource,
        harness_cpp: &Path,
        harness_text: &str,
    ) -> Option<Self> {
        let exe = std::env::current_exe().expect("the test binary's path");
        let sources = [kernels.source, harness_text];
        let harness = build_harness(name, harness_cpp, &sources, exe.parent()?)?;
        Some(Emulated {
            harness,
            dir: tempfile::tempdir().expect("cannot create a scratch folder"),
        })
    }

    /// Writes `t` as the raw little-endian input file `name` (f32, bf16, u32 or u8).
    pub fn put(&self, name: &str, t: &Tensor) {
        let t = t.flatten_all().unwrap();
        let bytes: Vec<u8> = match t.dtype() {
            DType::F32 => le_bytes(t.to_vec1::<f32>().unwrap(), f32::to_le_bytes),
            DType::BF16 => le_bytes(t.to_vec1::<bf16>().unwrap(), bf16::to_le_bytes),
            DType::U32 => le_bytes(t.to_vec1::<u32>().unwrap(), u32::to_le_bytes),
            DType::U8 => t.to_vec1::<u8>().unwrap(),
            other => panic!("no emulation input of dtype {other:?}"),
        };
        std::fs::write(self.dir.path().join(name), bytes).unwrap();
    }

    /// Reads the output file `name` as a CPU tensor of `dtype` (f32, bf16 or u32) and `shape`.
    pub fn get(&self, name: &str, dtype: DType, shape: &[usize]) -> Tensor {
        let bytes = std::fs::read(self.dir.path().join(name)).unwrap();
        let cpu = &Device::Cpu;
        match dtype {
            DType::F32 => Tensor::from_vec(from_le(&bytes, f32::from_le_bytes), shape, cpu),
            DType::BF16 => Tensor::from_vec(from_le(&bytes, bf16::from_le_bytes), shape, cpu),
            DType::U32 => Tensor::from_vec(from_le(&bytes, u32::from_le_bytes), shape, cpu),
            other => panic!("no emulation output of dtype {other:?}"),
        }
        .unwrap()
    }

    /// Runs the harness on the scratch folder with `args` (kernel name, then sizes).
    pub fn run(&self, args: &[String]) {
        let output = Command::new(&self.harness)
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "emulated kernel {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// `"f32"` or `"bf16"`: how a harness names the element type of a kernel.
pub fn dtype_name(dtype: DType) -> String {
    match dtype {
        DType::F32 => "f32".into(),
        DType::BF16 => "bf16".into(),
        other => panic!("the kernels take no {other:?}"),
    }
}

fn le_bytes<T, const N: usize>(values: Vec<T>, to: fn(T) -> [u8; N]) -> Vec<u8> {
    values.into_iter().flat_map(to).collect()
}

fn from_le<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|b| from(b.try_into().unwrap()))
        .collect()
}
