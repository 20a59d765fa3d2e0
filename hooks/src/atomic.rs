//! Atomic file writes: write to a temporary file in the same folder, flush it to disk,
//! then rename over the target and sync the folder, so a reader never sees a half-written
//! file and a crash leaves the previous version intact.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::{Error, Result};

const TEMP_MARK: &str = ".tmp-";

/// `.<name>.tmp-<pid>-<host>`: the writer's process and machine, so that the clean-up can
/// tell a writer that is gone from one running on another machine sharing the folder.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}{TEMP_MARK}{}-{}",
        std::process::id(),
        this_host()
    ))
}

/// This machine's host name, in the characters a file name can safely hold.
fn this_host() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::env::var("HOSTNAME"))
            .or_else(|_| std::env::var("COMPUTERNAME"))
            .unwrap_or_default();
        let name: String = name
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.is_empty() {
            "host".into()
        } else {
            name
        }
    })
}

/// The writer a temporary file's name records after [`TEMP_MARK`]: its process id and, for
/// files named since the host was added, its machine.
fn writer_of(tail: &str) -> Option<(u32, Option<&str>)> {
    let (pid, host) = match tail.split_once('-') {
        Some((pid, host)) => (pid, Some(host)),
        None => (tail, None),
    };
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    Some((pid.parse().ok().filter(|_| digits)?, host))
}

/// A temporary file left for this long with no write to it and no lock on it is abandoned:
/// its writer is gone (a live writer holds a lock from just after creating it; this covers
/// the moment between, and clocks of machines sharing a folder that differ a little). One
/// whose writer's process is known to be gone is abandoned at once.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Deletes the temporary files that writers killed mid-write left in `folder` (an activation
/// shard, a checkpoint being written when a job was killed), which would otherwise keep their
/// space for good. Deletes only regular files named as [`write_with`] names them that no
/// writer holds locked (on this machine or another sharing the folder) and that were not
/// written to for 10 seconds or whose writing process is gone, and only those for the files
/// `writes` says the caller writes there (by name). Best effort: what cannot be checked or deleted is left. Returns the bytes
/// freed.
pub fn remove_abandoned_temp_files(folder: &Path, writes: impl Fn(&str) -> bool) -> u64 {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let writer = name
            .strip_prefix('.')
            .and_then(|rest| rest.rsplit_once(TEMP_MARK))
            .filter(|(target, _)| writes(target))
            .and_then(|(_, tail)| writer_of(tail));
        // Checked first: a results folder may hold thousands of other files, not stat'ed.
        let Some((pid, host)) = writer else {
            continue;
        };
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        let idle = metadata
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|idle| idle >= ABANDONED_AFTER);
        // Only a writer of this machine can be known to be gone.
        let writer_gone = host == Some(this_host()) && process_is_gone(pid);
        if !(metadata.is_file() && (idle || writer_gone)) {
            continue;
        }
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        // Deleted while locked, so that no writer can start on it in between.
        if try_lock(&file) && std::fs::remove_file(entry.path()).is_ok() {
            freed += metadata.len();
        }
    }
    freed
}

/// [`remove_abandoned_temp_files`] for one file: what killed writers of `path` left beside
/// it (a checkpoint or an output that can be gigabytes).
pub fn remove_abandoned_temp_files_of(path: &Path) -> u64 {
    let Some(name) = path.file_name() else {
        return 0;
    };
    remove_abandoned_temp_files(folder_of(path), |n| std::ffi::OsStr::new(n) == name)
}

/// Whether no process `pid` runs on this machine (Linux, where `/proc` lists them): then a
/// temporary file it named is abandoned whatever its age, so a job resumed right after a
/// kill does not finish with the killed writer's file left inside its output. False where
/// it cannot be told.
fn process_is_gone(pid: u32) -> bool {
    let proc = Path::new("/proc");
    cfg!(target_os = "linux") && proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

/// Takes an exclusive advisory lock on `file` (held until it is closed), without waiting;
/// false when another open file holds it or locks are not supported.
fn try_lock(file: &std::fs::File) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on an open descriptor that `file` owns for the whole call.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        false
    }
}

/// The file [`lock_folder`] locks in a folder.
pub const LOCK_FILE: &str = ".eleuther-interp.lock";

/// A job's hold on the folder it writes (see [`lock_folder`]), released when dropped or when
/// the process ends, however it ends.
#[derive(Debug)]
pub struct FolderLock {
    _file: std::fs::File,
}

/// Refuses a second run writing into `folder` while one does (the same command started twice,
/// say), instead of letting the two interleave their files: an advisory lock on
/// `folder/.eleuther-interp.lock` (the folder is created if needed), held until the returned
/// value is dropped. Where the file system has no locks, nothing is refused.
pub fn lock_folder(folder: &Path) -> Result<FolderLock> {
    lock_folder_as(folder, LOCK_FILE)
}

/// [`lock_folder`] with another lock file, for runs that share a folder by design but must
/// not run twice over the same part of it (a delphi job's shards).
pub fn lock_folder_as(folder: &Path, lock_file: &str) -> Result<FolderLock> {
    std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
    let path = folder.join(lock_file);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(FolderLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InvalidArgument(format!(
            "{} is being written by another run, which holds {}: wait for it to end or stop \
             it, or use another folder",
            folder.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::debug!("{} cannot be locked ({e}): not locking", path.display());
            Ok(FolderLock { _file: file })
        }
    }
}

/// Writes a file atomically through `write`, which receives a buffered writer to the
/// temporary file (seekable, for formats whose header is known only at the end).
pub fn write_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    stage_with(path, write)?.commit()
}

/// A file written in full to its temporary name, synced, not yet in place: files that must
/// change together (the checkpoints of SAEs trained side by side) are all staged, the slow
/// part, then all committed, renames that take microseconds, so a kill leaves them apart
/// only in that short window. Dropped uncommitted, the temporary file is deleted.
pub struct Staged {
    path: PathBuf,
    /// The temporary file and its handle, which holds the lock that tells
    /// [`remove_abandoned_temp_files`] it is live; `None` once committed.
    tmp: Option<(PathBuf, std::fs::File)>,
}

impl Staged {
    /// Where [`Staged::commit`] puts the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the file into place.
    pub fn commit(mut self) -> Result<()> {
        let (tmp, file) = self.tmp.take().expect("committed once");
        let result = std::fs::rename(&tmp, &self.path);
        drop(file);
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&self.path, e)
        })?;
        sync_folder_of(&self.path);
        Ok(())
    }
}

/// Makes the rename that put `path` in place durable, so that after a power cut files
/// renamed one after the other (a shard, then the progress file that lists it) are not
/// found with only the later one in place. Best effort: some file systems cannot sync a
/// folder, and the file itself is already synced.
pub(crate) fn sync_folder_of(path: &Path) {
    #[cfg(unix)]
    if let Ok(handle) = std::fs::File::open(folder_of(path)) {
        let _ = handle.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes `path`'s new contents through `write` to a temporary file in its folder and
/// syncs it, without putting it in place: see [`Staged`].
pub fn stage_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<Staged> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        // Marks the file as being written for remove_abandoned_temp_files (a writer on another
        // machine sharing the folder included); released when the file is closed.
        try_lock(&file);
        let mut writer = std::io::BufWriter::new(file);
        write(&mut writer)?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file)
    })();
    match result {
        Ok(file) => Ok(Staged {
            path: path.to_path_buf(),
            tmp: Some((tmp, file)),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::io(path, e))
        }
    }
}

/// [`stage_with`] for a writer that takes a file name (a library that saves to a path):
/// `write` gets the temporary file's path and writes it in full.
pub fn stage_by_path(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<Staged> {
    let tmp = temp_path(path);
    stage_with(path, |_| write(&tmp))
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
    let folder = folder_of(path);
    if !folder.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "cannot write {}: the folder {} does not exist",
            path.display(),
            folder.display()
        )));
    }
    Ok(())
}

/// The folder a file is in: `.` for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes bytes to a file atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes))
}

/// Writes a value as pretty JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    stage_json(path, value)?.commit()
}

/// [`write_json`], staged: see [`Staged`].
pub fn stage_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<Staged> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    stage_with(path, |w| w.write_all(text.as_bytes()))
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
    stage_safetensors_with_metadata(path, tensors, metadata)?.commit()
}

/// Writes a folder's weights (safetensors) and the config that describes them (JSON) so
/// that a kill leaves the old pair or the new one, but for the microseconds between two
/// renames: both are staged, then put in place, weights first. Temporary files of
/// either that a killed earlier write left behind are removed first.
pub fn write_weights_and_config<T: serde::Serialize>(
    weights: &Path,
    tensors: &[(String, Vec<Tensor>)],
    config: &Path,
    value: &T,
) -> Result<()> {
    for path in [weights, config] {
        remove_abandoned_temp_files_of(path);
    }
    let staged_weights =
        stage_safetensors_with_metadata(weights, tensors, &std::collections::BTreeMap::new())?;
    let staged_config = stage_json(config, value)?;
    staged_weights.commit()?;
    staged_config.commit()
}

/// [`write_safetensors_with_metadata`], staged: see [`Staged`].
pub fn stage_safetensors_with_metadata(
    path: &Path,
    tensors: &[(String, Vec<Tensor>)],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Staged> {
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
    stage_with(path, |w| {
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

    /// Writes `bytes` to `path` as a file last written two minutes ago: what a killed writer
    /// left.
    pub(crate) fn write_stale(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
        let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(two_minutes_ago).unwrap();
    }

    /// Only temporary files that no writer holds and that were not written to for a while
    /// are deleted.
    #[cfg(unix)]
    #[test]
    fn removes_only_abandoned_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let abandoned = at(".shard-00003.safetensors.tmp-123");
        write_stale(&abandoned, &[0u8; 1000]);
        // Being written: a live writer (here or on another machine) holds its lock.
        write_stale(&at(".a.json.tmp-456"), b"x");
        let writer = std::fs::File::open(at(".a.json.tmp-456")).unwrap();
        assert!(try_lock(&writer));
        // Just created by a live process: its writer may not hold the lock yet.
        let live = temp_path(&at("b.json"));
        std::fs::write(&live, b"x").unwrap();
        // Just created by a process of this machine that has ended (a job killed moments
        // ago), and by one of the same number on another machine sharing the folder.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = at(&format!(".g.json.tmp-{}-{}", child.id(), this_host()));
        let elsewhere = at(&format!(".h.json.tmp-{}-other.machine", child.id()));
        child.wait().unwrap();
        std::fs::write(&dead, b"xy").unwrap();
        std::fs::write(&elsewhere, b"xyz").unwrap();
        // Not named as write_with names its files.
        for name in [
            "c.json.tmp-999",
            ".d.json.tmp-x",
            ".e.json.tmp-",
            "shard-00002.safetensors",
        ] {
            write_stale(&at(name), b"x");
        }
        std::fs::create_dir(at(".f.tmp-5")).unwrap();
        let any = |_: &str| true;
        assert_eq!(
            remove_abandoned_temp_files(dir.path(), |n| n == "b.json"),
            0
        );
        let gone = if cfg!(target_os = "linux") { 2 } else { 0 };
        assert_eq!(remove_abandoned_temp_files(dir.path(), any), 1000 + gone);
        assert!(!abandoned.exists() && live.exists());
        if gone == 0 {
            std::fs::remove_file(&dead).unwrap();
        }
        assert!(elsewhere.exists());
        std::fs::remove_file(&elsewhere).unwrap();
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, 7);
        drop(writer);
        assert_eq!(remove_abandoned_temp_files(dir.path(), any), 1);
        assert_eq!(remove_abandoned_temp_files(&at("none"), any), 0);
    }

    /// A file being written holds the lock that protects it from the clean-up.
    #[cfg(unix)]
    #[test]
    fn a_file_being_written_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_with(&path, |_| {
            let file = std::fs::File::open(temp_path(&path))?;
            assert!(!try_lock(&file));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_locked_folder_refuses_a_second_writer_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("run");
        let held = lock_folder(&folder).unwrap();
        let err = lock_folder(&folder).unwrap_err().to_string();
        assert!(
            err.contains("run is being written by another run, which holds")
                && err.contains(LOCK_FILE),
            "{err}"
        );
        let other = lock_folder_as(&folder, ".other.lock").unwrap();
        drop(held);
        lock_folder(&folder).unwrap();
        assert!(lock_folder_as(&folder, ".other.lock").is_err());
        drop(other);
    }

    #[test]
    fn a_file_written_by_name_is_staged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pt");
        let staged = stage_by_path(&path, |tmp| std::fs::write(tmp, "saved")).unwrap();
        assert!(!path.exists());
        staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "saved");
        let failed = stage_by_path(&path, |_| Err(std::io::Error::other("no torch")));
        assert!(failed.is_err_and(|e| e.to_string().contains("no torch")));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
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

    #[cfg(unix)]
    #[test]
    fn weights_and_config_are_written_as_a_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (weights, config) = (dir.path().join("w.safetensors"), dir.path().join("c.json"));
        // What a killed earlier save left half-written is removed.
        write_stale(&dir.path().join(".w.safetensors.tmp-4321"), &[0; 64]);
        let ones = Tensor::ones(3, DType::F32, &candle_core::Device::Cpu).unwrap();
        write_weights_and_config(&weights, &[("w".into(), vec![ones])], &config, &[3]).unwrap();
        let loaded = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        assert_eq!(loaded["w"].to_vec1::<f32>().unwrap(), [1.0; 3]);
        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(text.replace(char::is_whitespace, ""), "[3]");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // A config that cannot be written leaves the weights as they were too.
        let zeros = Tensor::zeros(3, DType::F32, &candle_core::Device::Cpu).unwrap();
        let nowhere = dir.path().join("missing/c.json");
        write_weights_and_config(&weights, &[("w".into(), vec![zeros])], &nowhere, &[0])
            .unwrap_err();
        let loaded = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        assert_eq!(loaded["w"].to_vec1::<f32>().unwrap(), [1.0; 3]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
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

    #[test]
    fn staged_files_change_only_when_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        write(&a, b"old a").unwrap();
        write(&b, b"old b").unwrap();
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        // Written in full, both still old; then both new.
        let staged_a = stage_with(&a, |w| w.write_all(b"new a")).unwrap();
        let staged_b = stage_with(&b, |w| w.write_all(b"new b")).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(std::fs::read(&b).unwrap(), b"old b");
        assert_eq!(files(), 4, "two temporary files");
        staged_a.commit().unwrap();
        staged_b.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read(&b).unwrap(), b"new b");
        assert_eq!(files(), 2);
        // Dropped without a commit (an error staging the others): nothing changes, no
        // temporary file stays.
        drop(stage_with(&a, |w| w.write_all(b"newer a")).unwrap());
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(files(), 2);
    }
}
