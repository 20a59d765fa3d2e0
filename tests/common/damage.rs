//! Damaging files on purpose, to check that readers refuse them cleanly: the same damage
//! (cut short, bytes overwritten, length fields made huge, JSON numbers changed) for every file
//! format, from fixed seeds (the same file gets the same damage). Shared by the end-to-end
//! tests (`tests/damaged_files.rs`) and delphi's tests.
//!
//! A reader that aborts the process (an allocation failure, say) cannot be caught: rerun the
//! test with `--nocapture`, and the last line printed names the damage it was given.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A deterministic stream of pseudo-random numbers (xorshift64*).
struct Random(u64);

impl Random {
    /// A stream of its own for each seed.
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Values written over binary length and count fields: huge, zero, at and near the 32-bit
/// limits, small.
const FIELD_VALUES: [u64; 6] = [u64::MAX, 1 << 40, 1 << 31, 0, u32::MAX as u64, 7];

/// Numbers written over JSON numbers: zero, negative, huge, fractional, past 64 and 32 bits.
const JSON_NUMBERS: [&str; 8] = [
    "0",
    "-1",
    "1e300",
    "2.5",
    "18446744073709551616",
    "4294967296",
    "100000000000",
    "3",
];

/// Where the JSON header of a safetensors file lies.
fn safetensors_header(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().unwrap()) as usize;
    let fits = len.checked_add(8).is_some_and(|end| end <= bytes.len());
    (bytes.get(8) == Some(&b'{') && fits).then_some(8..8 + len)
}

/// Where the numbers of a JSON text lie: outside strings, or also inside them (a safetensors
/// header's metadata holds JSON written into strings).
fn json_numbers(bytes: &[u8], outside_strings_only: bool) -> Vec<std::ops::Range<usize>> {
    let mut found = Vec::new();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_string && outside_strings_only {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' && outside_strings_only {
            in_string = true;
        } else if c == b'-' || c.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
            {
                i += 1;
            }
            found.push(start..i);
            continue;
        }
        i += 1;
    }
    found
}

/// `count` damaged versions of `bytes`, each with what was done.
fn damaged_versions(bytes: &[u8], count: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    let Some(&first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Vec::new();
    };
    let header = safetensors_header(bytes);
    let json = header.is_none() && (first == b'{' || first == b'[');
    let mut random = Random::new(seed);
    let numbers = match &header {
        None if json => json_numbers(bytes, true),
        None => Vec::new(),
        Some(header) => json_numbers(&bytes[header.clone()], false)
            .into_iter()
            .map(|n| n.start + header.start..n.end + header.start)
            .collect(),
    };
    let kinds = if numbers.is_empty() { 4 } else { 5 };
    (0..count)
        .map(|i| {
            let mut damaged = bytes.to_vec();
            let what = match i % kinds {
                0 => {
                    let keep = random.below(bytes.len());
                    damaged.truncate(keep);
                    format!("cut to {keep} bytes")
                }
                1 => {
                    let at: Vec<usize> = (0..1 + random.below(4))
                        .map(|_| random.below(bytes.len()))
                        .collect();
                    for &p in &at {
                        damaged[p] = random.next() as u8;
                    }
                    format!("bytes at {at:?} overwritten")
                }
                2 | 3 => {
                    let value = FIELD_VALUES[random.below(FIELD_VALUES.len())];
                    let width = if i % kinds == 2 { 8 } else { 4 };
                    // Headers and footers (where formats keep their lengths and counts) half
                    // of the time: the first or the last 64 places.
                    let places = bytes.len().saturating_sub(width) + 1;
                    let at = match random.below(4) {
                        0 => random.below(places.min(64)),
                        1 => places - 1 - random.below(places.min(64)),
                        _ => random.below(places),
                    };
                    let end = (at + width).min(bytes.len());
                    damaged[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
                    format!("{width}-byte {value} written at {at}")
                }
                _ => {
                    let range = numbers[random.below(numbers.len())].clone();
                    let number = JSON_NUMBERS[random.below(JSON_NUMBERS.len())];
                    let what = format!(
                        "number {} at {} made {number}",
                        String::from_utf8_lossy(&bytes[range.clone()]),
                        range.start
                    );
                    damaged.splice(range, number.bytes());
                    if let Some(header) = &header {
                        // The header's new length, so that the file stays readable as far.
                        let len = header.len() + damaged.len() - bytes.len();
                        damaged[..8].copy_from_slice(&(len as u64).to_le_bytes());
                    }
                    what
                }
            };
            (what, damaged)
        })
        .collect()
}

/// Copies folder `from` (recursively) into `to`, hard-linking the files `linked` accepts where
/// the file system allows.
pub fn copy_folder(from: &Path, to: &Path, linked: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_folder(&entry.path(), &target, linked);
        } else if !linked(&entry.path()) || std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Every file under `dir`, relative to it, but for hidden ones (a lock file).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if !path.file_name().unwrap().to_str().unwrap().starts_with('.') {
                let relative = path.strip_prefix(dir).unwrap();
                files.push(relative.to_str().unwrap().to_string());
            }
        }
    }
    files.sort();
    files
}

/// Reads an artefact: `Err` with the message of a refusal.
pub type Read<'a> = &'a dyn Fn(&Path) -> Result<(), String>;

/// Damages `artefact` `count` times (a single file), or each of `files` in it `count` times (a
/// folder), and reads each damaged copy with `read`, which is given the copy (the folder, or
/// the file). Fails on a panic, on a refusal that does not name the damaged file (its path,
/// or the copy's folder and the file's name), and on a file none of whose damage is refused
/// (a file the reader does not read has no place in `files`).
pub fn damage_and_read(artefact: &Path, files: &[String], count: usize, read: Read) {
    damage_copies_and_read(artefact, files, count, false, read)
}

/// [`damage_and_read`] for a large folder that `read` only reads: the files not damaged are
/// hard links to the originals, and the copies lie beside the folder (links cannot cross file
/// systems).
pub fn damage_and_read_linked(artefact: &Path, files: &[String], count: usize, read: Read) {
    damage_copies_and_read(artefact, files, count, true, read)
}

fn damage_copies_and_read(
    artefact: &Path,
    files: &[String],
    count: usize,
    linked: bool,
    read: Read,
) {
    let scratch = match linked {
        true => tempfile::tempdir_in(artefact.parent().unwrap()).unwrap(),
        false => tempfile::tempdir().unwrap(),
    };
    let place_copy = |name: &str| -> PathBuf {
        let copy = scratch.path().join(name);
        if files.is_empty() {
            std::fs::create_dir_all(&copy).unwrap();
            let file = copy.join(artefact.file_name().unwrap());
            std::fs::copy(artefact, &file).unwrap();
            file
        } else {
            copy_folder(artefact, &copy, &|_| linked);
            copy
        }
    };
    // The artefact as it was is read: the refusals below are the damage's.
    let undamaged = place_copy("undamaged");
    read(&undamaged).unwrap_or_else(|e| panic!("the undamaged {}: {e}", artefact.display()));

    let targets: Vec<Option<&str>> = match files {
        [] => vec![None],
        files => files.iter().map(|f| Some(f.as_str())).collect(),
    };
    let (mut read_back, mut refused, mut failures) = (0, 0, Vec::new());
    for (t, file) in targets.into_iter().enumerate() {
        let source = file.map_or(artefact.to_path_buf(), |f| artefact.join(f));
        let bytes = std::fs::read(&source).unwrap();
        let mut refusals = 0;
        for (n, (what, damaged)) in damaged_versions(&bytes, count, 7 + t as u64)
            .into_iter()
            .enumerate()
        {
            let copy = place_copy(&format!("{t}-{n}"));
            let target = file.map_or(copy.clone(), |f| copy.join(f));
            // A new file, never written through a link to the original.
            std::fs::remove_file(&target).unwrap();
            std::fs::write(&target, &damaged).unwrap();
            let what = format!("{} {what}", file.unwrap_or("the file"));
            eprintln!("{}: {what}", artefact.display());
            let named = |message: &str| {
                let name = target.file_name().unwrap().to_str().unwrap();
                message.contains(target.to_str().unwrap())
                    || (message.contains(copy.to_str().unwrap()) && message.contains(name))
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&copy)));
            match outcome {
                Ok(Ok(())) => read_back += 1,
                Ok(Err(message)) if named(&message) => refusals += 1,
                Ok(Err(message)) => failures.push(format!("{what}: unnamed in: {message}")),
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    failures.push(format!("{what}: panicked: {message}"));
                }
            }
            let folder = scratch.path().join(format!("{t}-{n}"));
            std::fs::remove_dir_all(folder).unwrap();
        }
        if refusals == 0 && count > 0 && !bytes.is_empty() {
            let name = file.unwrap_or("the file");
            failures.push(format!("{name}: no damage was refused: is it read at all?"));
        }
        refused += refusals;
    }
    eprintln!(
        "{}: {read_back} damaged copies read, {refused} refused, {} failures",
        artefact.display(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} failures with {} damaged copies of {}:\n{}",
        failures.len(),
        read_back + refused + failures.len(),
        artefact.display(),
        failures.join("\n")
    );
}
