//! Atomic file writes: write to a temporary file in the same folder, flush it to disk,
//! then rename over the target, so a reader never sees a half-written file and a crash
//! leaves the previous version intact.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::{Error, Result};

const TEMP_MARK: &str = ".tmp-";

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TEMP_MARK}{}", std::process::id()))
}

/// Deletes the temporary files that writers killed mid-write left in `folder` (a file being
/// written when a job was killed: an activation shard, a checkpoint), which would otherwise
/// take their space for good. Only files named as [`write_with`] names them, by a process
/// that is no longer running, are deleted. Returns the bytes freed; a missing folder frees 0.
pub fn remove_abandoned_temp_files(folder: &Path) -> Result<u64> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(folder, e)),
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let writer = name
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(TEMP_MARK))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if let Some(pid) = writer {
            if pid != std::process::id() && !process_is_running(pid) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
                freed += size;
            }
        }
    }
    Ok(freed)
}

/// Whether a process with this id exists (or may exist: assumed so where it can't be told).
fn process_is_running(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // Signal 0 checks existence only; EPERM means it exists under another user.
        // SAFETY: kill with signal 0 sends nothing.
        let status = unsafe { libc::kill(pid, 0) };
        status == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Writes a file atomically through `write`, which receives a buffered writer.
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut writer = std::io::BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Checks, before a long job, that the file it writes at the end can be written there: its
/// folder exists and it is not itself a folder (otherwise the job's work would be lost to
/// a late error).
pub fn check_target(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is a folder; give a file name",
            path.display()
        )));
    }
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !folder.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "cannot write {}: the folder {} does not exist",
            path.display(),
            folder.display()
        )));
    }
    Ok(())
}

/// Writes bytes to a file atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes a value as pretty JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write(path, text.as_bytes())
}

/// Writes named tensors as a safetensors file atomically, streaming each tensor's bytes from
/// its storage (no serialised copy in memory). Each entry may be given in several parts that
/// are concatenated along dimension 0 (e.g. the batches that make up one shard).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<Tensor>)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, &std::collections::BTreeMap::new())
}

/// [`write_safetensors`] with string metadata in the header (`__metadata__`), e.g. the
/// training state that must change together with a checkpoint's tensors.
pub fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(String, Vec<Tensor>)],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, parts) in tensors {
        let first = parts.first().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "tensor '{name}' for {} has no parts",
                path.display()
            ))
        })?;
        let mut shape = first.dims().to_vec();
        shape[0] = parts
            .iter()
            .map(|p| p.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        let bytes = shape.iter().product::<usize>() * first.dtype().size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": safetensors_dtype(first.dtype())?,
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut header =
        serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    write_with(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, parts) in tensors {
            for part in parts {
                with_bytes(part, |bytes| w.write_all(bytes))?;
            }
        }
        Ok(())
    })
}

fn safetensors_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::U8 => "U8",
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot store dtype {other:?}"
            )))
        }
    })
}

/// Calls `f` with the raw little-endian bytes of a tensor (moved to the CPU and made
/// contiguous first if needed).
fn with_bytes(
    tensor: &Tensor,
    f: impl FnOnce(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let to_io = |e: candle_core::Error| std::io::Error::other(e.to_string());
    let tensor = tensor.to_device(&candle_core::Device::Cpu).map_err(to_io)?;
    let tensor = tensor.contiguous().map_err(to_io)?;
    let (storage, layout) = tensor.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(std::io::Error::other("tensor is not on the CPU"));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| std::io::Error::other("tensor is not contiguous"))?;
    fn bytes_of<T>(values: &[T]) -> &[u8] {
        // SAFETY: plain-old-data numeric slices reinterpreted as bytes, same lifetime.
        unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        }
    }
    use candle_core::CpuStorage as C;
    match cpu {
        C::F32(v) => f(bytes_of(&v[start..end])),
        C::F16(v) => f(bytes_of(&v[start..end])),
        C::BF16(v) => f(bytes_of(&v[start..end])),
        C::F64(v) => f(bytes_of(&v[start..end])),
        C::U32(v) => f(bytes_of(&v[start..end])),
        C::I64(v) => f(bytes_of(&v[start..end])),
        C::U8(v) => f(bytes_of(&v[start..end])),
        _ => Err(std::io::Error::other(format!(
            "cannot store dtype {:?}",
            tensor.dtype()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The id of a process that has ended: a writer that was killed.
    #[cfg(unix)]
    pub(crate) fn ended_process_id() -> u32 {
        let mut ended = std::process::Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        ended.id()
    }

    /// Only temporary files of writers that are gone are deleted.
    #[cfg(unix)]
    #[test]
    fn removes_the_temp_files_of_killed_writers_only() {
        let dir = tempfile::tempdir().unwrap();
        let abandoned = format!(".shard-00003.safetensors.tmp-{}", ended_process_id());
        let kept = [
            format!(".a.json.tmp-{}", std::process::id()), // this process: being written
            ".b.json.tmp-1".to_string(),                   // a running process (init)
            "c.json.tmp-999999".to_string(),               // not named as write_with names
            ".d.json.tmp-x".to_string(),
            "shard-00002.safetensors".to_string(),
        ];
        std::fs::write(dir.path().join(&abandoned), vec![0u8; 1000]).unwrap();
        for name in &kept {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_abandoned_temp_files(dir.path()).unwrap(), 1000);
        assert!(!dir.path().join(&abandoned).exists());
        for name in &kept {
            assert!(dir.path().join(name).exists(), "{name}");
        }
        assert_eq!(
            remove_abandoned_temp_files(&dir.path().join("none")).unwrap(),
            0
        );
    }

    #[test]
    fn replaces_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write(&path, b"one").unwrap();
        write_json(&path, &vec![1, 2]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path)
                .unwrap()
                .replace(char::is_whitespace, ""),
            "[1,2]"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // What a long job checks before it starts.
        check_target(&path).unwrap();
        check_target(Path::new("report.json")).unwrap();
        let err = check_target(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let err = check_target(&dir.path().join("missing/a.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing does not exist"), "{err}");
    }

    #[test]
    fn streamed_safetensors_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let dev = candle_core::Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let b = Tensor::arange(6f32, 10., &dev)
            .unwrap()
            .reshape((2, 2))
            .unwrap();
        let ids = Tensor::new(&[7u32, 8, 9], &dev).unwrap();
        let half = a.to_dtype(DType::BF16).unwrap().t().unwrap();
        write_safetensors(
            &path,
            &[
                ("x".into(), vec![a.clone(), b]),
                ("ids".into(), vec![ids]),
                ("h".into(), vec![half]),
            ],
        )
        .unwrap();
        let loaded = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(
            loaded["x"].to_vec2::<f32>().unwrap(),
            vec![
                vec![0., 1.],
                vec![2., 3.],
                vec![4., 5.],
                vec![6., 7.],
                vec![8., 9.]
            ]
        );
        assert_eq!(loaded["ids"].to_vec1::<u32>().unwrap(), vec![7, 8, 9]);
        let h = loaded["h"].to_dtype(DType::F32).unwrap();
        assert_eq!(
            h.to_vec2::<f32>().unwrap(),
            a.t().unwrap().to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write(&path, b"old").unwrap();
        let err = write_with(&path, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(err.to_string().contains("a.txt") && err.to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
