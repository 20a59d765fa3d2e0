//! Pre-tokenized token arrays: NumPy `.npy` (1-D or 2-D integer arrays) and raw
//! little-endian `uint16` `.bin` files as Pythia's own training data ships, read memory-mapped;
//! and the `[sequences, seq_len]` `.npy` files `hooks tokenize` writes.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::ChunkStream;
use crate::{Error, Result};

/// Integer element types a token array may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Element {
    U16,
    U32,
    I32,
    I64,
    U64,
}

impl Element {
    fn size(self) -> usize {
        match self {
            Element::U16 => 2,
            Element::U32 | Element::I32 => 4,
            Element::I64 | Element::U64 => 8,
        }
    }
}

/// A read-only view of token ids stored in a file.
pub struct TokenArray {
    path: PathBuf,
    map: Mmap,
    offset: usize,
    element: Element,
    len: usize,
    /// Row length of a 2-D array (its rows are read one after another, as one stream of
    /// tokens), `None` for 1-D.
    pub row_len: Option<usize>,
}

fn data_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Data {
        path: path.into(),
        message: message.into(),
    }
}

impl TokenArray {
    /// Opens a `.npy` file (`uint16/32/64` or `int32/64`, C order, 1-D or 2-D).
    pub fn open_npy(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let bad = |m: &str| data_error(path, format!("not a supported .npy token array: {m}"));
        if map.len() < 10 || &map[..6] != b"\x93NUMPY" {
            return Err(bad("missing the \\x93NUMPY magic"));
        }
        let (header_len, header_start) = match map[6] {
            1 => (u16::from_le_bytes([map[8], map[9]]) as usize, 10),
            2 | 3 if map.len() >= 12 => (
                u32::from_le_bytes([map[8], map[9], map[10], map[11]]) as usize,
                12,
            ),
            v => return Err(bad(&format!("unknown format version {v}"))),
        };
        let header = map
            .get(header_start..header_start + header_len)
            .ok_or_else(|| bad("header is truncated"))?;
        let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
        let descr = dict_value(header, "descr").ok_or_else(|| bad("no 'descr' in header"))?;
        let descr = descr
            .strip_prefix('\'')
            .and_then(|d| d.split('\'').next())
            .ok_or_else(|| bad("'descr' is not a quoted string"))?;
        let element = match descr {
            "<u2" => Element::U16,
            "<u4" => Element::U32,
            "<i4" => Element::I32,
            "<i8" => Element::I64,
            "<u8" => Element::U64,
            other => {
                return Err(bad(&format!(
                    "dtype {other} (expected <u2, <u4, <i4, <i8 or <u8)"
                )))
            }
        };
        if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
            return Err(bad("Fortran-ordered arrays are not supported"));
        }
        let shape = dict_value(header, "shape").ok_or_else(|| bad("no 'shape' in header"))?;
        let dims: Vec<usize> = shape
            .trim_start_matches('(')
            .split(')')
            .next()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| bad(&format!("bad shape {shape}"))))
            .collect::<Result<_>>()?;
        let (len, row_len) = match dims.as_slice() {
            [n] => (*n, None),
            [rows, cols] => (
                rows.checked_mul(*cols)
                    .ok_or_else(|| bad(&format!("shape {dims:?} is too large for any file")))?,
                Some(*cols),
            ),
            _ => {
                return Err(bad(&format!(
                    "expected a 1-D or 2-D array, got shape {dims:?}"
                )))
            }
        };
        Self::checked(
            path.into(),
            map,
            header_start + header_len,
            element,
            len,
            row_len,
        )
    }

    /// Opens a headerless little-endian `uint16` token file.
    pub fn open_bin(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        if map.len() % 2 != 0 {
            return Err(data_error(
                path,
                "raw .bin token file must hold uint16 values (odd byte count)",
            ));
        }
        let len = map.len() / 2;
        Self::checked(path.into(), map, 0, Element::U16, len, None)
    }

    fn checked(
        path: PathBuf,
        map: Mmap,
        offset: usize,
        element: Element,
        len: usize,
        row_len: Option<usize>,
    ) -> Result<Self> {
        let needed = len
            .checked_mul(element.size())
            .and_then(|bytes| bytes.checked_add(offset));
        if needed.is_none_or(|needed| needed > map.len()) {
            let needed = needed.map_or("more than 2^64".into(), |n| n.to_string());
            return Err(data_error(
                &path,
                format!("truncated: header promises {len} tokens ({needed} bytes) but the file has {} bytes", map.len()),
            ));
        }
        Ok(TokenArray {
            path,
            map,
            offset,
            element,
            len,
            row_len,
        })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens `start..start + count` (clamped to the end), checked to fit in u32.
    pub fn read(&self, start: usize, count: usize) -> Result<Vec<u32>> {
        let end = (start + count).min(self.len);
        let size = self.element.size();
        let bytes = &self.map[self.offset + start * size..self.offset + end * size];
        bytes
            .chunks_exact(size)
            .enumerate()
            .map(|(i, b)| {
                let value: i128 = match self.element {
                    Element::U16 => u16::from_le_bytes([b[0], b[1]]) as i128,
                    Element::U32 => u32::from_le_bytes(b.try_into().unwrap()) as i128,
                    Element::I32 => i32::from_le_bytes(b.try_into().unwrap()) as i128,
                    Element::I64 => i64::from_le_bytes(b.try_into().unwrap()) as i128,
                    Element::U64 => u64::from_le_bytes(b.try_into().unwrap()) as i128,
                };
                u32::try_from(value).map_err(|_| {
                    data_error(
                        &self.path,
                        format!(
                            "token {value} at index {} is not a valid token id",
                            start + i
                        ),
                    )
                })
            })
            .collect()
    }
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping; the file is not expected to change while it is read.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// The raw text after `'key':` in a NumPy header dict, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// The bytes before the data of a version 1.0 `.npy` file holding a C-ordered array of
/// `descr` (e.g. `<u2`) and `shape` (NumPy's spelling, e.g. `(2, 3)` or `(4,)`), padded with
/// spaces to a multiple of 64 bytes and to at least `min_len`.
fn npy_header(descr: &str, shape: &str, min_len: usize) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    const PREFIX: usize = 10; // magic, version, header length
    while !(PREFIX + dict.len() + 1).is_multiple_of(64) || PREFIX + dict.len() + 1 < min_len {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((dict.len() as u16).to_le_bytes());
    out.extend(dict.as_bytes());
    out
}

/// What [`write_npy`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileSummary {
    /// Rows: sequences of `seq_len` tokens.
    pub sequences: u64,
    /// Tokens per row.
    pub seq_len: usize,
    /// The NumPy dtype of the ids: `uint16`, or `uint32` for vocabularies over 65,536 tokens.
    pub dtype: &'static str,
}

/// Room for the header of any `[rows, seq_len]` shape, so that the one written first (rows
/// unknown) is overwritten in place at the end.
const WRITTEN_HEADER_LEN: usize = 128;

/// Writes the next chunks of `chunks` (up to `max_chunks`, else all) to `path` as a 2-D
/// `.npy` array `[sequences, seq_len]`, atomically, streaming: what [`TokenArray::open_npy`]
/// and `numpy.load` read back, and every command's `--data` takes without tokenizing again.
/// Ids are `uint16` when the vocabulary (`vocab_size` ids) fits, else `uint32`.
/// `after_chunk` is told the number of sequences written so far (progress).
pub fn write_npy(
    path: &Path,
    chunks: &mut ChunkStream,
    max_chunks: Option<u64>,
    vocab_size: usize,
    mut after_chunk: impl FnMut(u64),
) -> Result<TokenFileSummary> {
    let seq_len = chunks.seq_len();
    let element = if vocab_size <= 1 << 16 {
        Element::U16
    } else {
        Element::U32
    };
    let (descr, dtype) = match element {
        Element::U16 => ("<u2", "uint16"),
        _ => ("<u4", "uint32"),
    };
    let header = |rows: u64| npy_header(descr, &format!("({rows}, {seq_len})"), WRITTEN_HEADER_LEN);
    let data = chunks.spec().paths.first().cloned().unwrap_or_default();
    let mut sequences = 0u64;
    // An error of the data or the tokenizer, kept while the writer is told only to stop.
    let mut failure = None;
    let written = crate::atomic::write_with(path, |w| {
        w.write_all(&header(0))?;
        let mut bytes = Vec::with_capacity(seq_len * element.size());
        while max_chunks.is_none_or(|max| sequences < max) {
            let chunk = match chunks.next_chunk() {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(std::io::Error::other(failure.insert(e).to_string())),
            };
            bytes.clear();
            for (position, &id) in chunk.iter().enumerate() {
                match element {
                    Element::U16 => match u16::try_from(id) {
                        Ok(id) => bytes.extend(id.to_le_bytes()),
                        Err(_) => {
                            let e = data_error(
                                &data,
                                format!(
                                    "token id {id} at position {position} of sequence {sequences} \
                                     does not fit the uint16 of {} (for a vocabulary of {vocab_size})",
                                    path.display()
                                ),
                            );
                            return Err(std::io::Error::other(failure.insert(e).to_string()));
                        }
                    },
                    _ => bytes.extend(id.to_le_bytes()),
                }
            }
            w.write_all(&bytes)?;
            sequences += 1;
            after_chunk(sequences);
        }
        if sequences == 0 {
            let e = data_error(
                &data,
                format!(
                    "the data yields no complete sequence of {seq_len} tokens ({} tokens in all); \
                     nothing written",
                    chunks.tokens_read()
                ),
            );
            return Err(std::io::Error::other(failure.insert(e).to_string()));
        }
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&header(sequences))
    });
    match (failure, written) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(TokenFileSummary {
            sequences,
            seq_len,
            dtype,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut out = npy_header(descr, shape, 0);
        out.extend(data);
        out
    }

    #[test]
    fn reads_npy_and_bin() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<u8> = [5u16, 0, 65535, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let path = dir.path().join("a.npy");
        std::fs::write(&path, npy("<u2", "(2, 2)", &values)).unwrap();
        let a = TokenArray::open_npy(&path).unwrap();
        assert_eq!((a.len(), a.row_len), (4, Some(2)));
        assert_eq!(a.read(1, 10).unwrap(), vec![0, 65535, 7]);

        let path = dir.path().join("b.bin");
        std::fs::write(&path, &values).unwrap();
        assert_eq!(
            TokenArray::open_bin(&path).unwrap().read(0, 4).unwrap(),
            vec![5, 0, 65535, 7]
        );

        let i64s: Vec<u8> = [3i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = dir.path().join("c.npy");
        std::fs::write(&path, npy("<i8", "(2,)", &i64s)).unwrap();
        let err = TokenArray::open_npy(&path)
            .unwrap()
            .read(0, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token -1 at index 1"), "{err}");
    }

    /// `hooks tokenize`'s writer: the chunks of the data as `[sequences, seq_len]`, read back
    /// whole by the reader; the dtype follows the vocabulary; bad data leaves no file.
    #[test]
    fn writes_chunks_as_a_2d_array() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<u32> = vec![5, 0, 65535, 7, 1, 2, 3, 4, 9, 8, 6];
        let input = dir.path().join("in.npy");
        let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&input, npy("<u4", "(11,)", &bytes)).unwrap();
        let chunks = |seq_len| {
            crate::data::DataSpec::new(vec![input.clone()], seq_len)
                .chunks(None)
                .unwrap()
        };
        let out = dir.path().join("out.npy");
        let mut seen = Vec::new();
        let summary = write_npy(&out, &mut chunks(3), None, 65536, |n| seen.push(n)).unwrap();
        assert_eq!(
            summary,
            TokenFileSummary {
                sequences: 3,
                seq_len: 3,
                dtype: "uint16"
            }
        );
        assert_eq!(seen, [1, 2, 3]);
        let file = std::fs::read(&out).unwrap();
        assert_eq!(file.len(), WRITTEN_HEADER_LEN + 9 * 2);
        assert_eq!(
            &file[..WRITTEN_HEADER_LEN],
            npy_header("<u2", "(3, 3)", 128)
        );
        let back = TokenArray::open_npy(&out).unwrap();
        assert_eq!((back.len(), back.row_len), (9, Some(3)));
        assert_eq!(back.read(0, 9).unwrap(), ids[..9]);

        // At most `max_chunks`; uint32 past 65,536 ids.
        let summary = write_npy(&out, &mut chunks(2), Some(4), 65537, |_| ()).unwrap();
        assert_eq!((summary.sequences, summary.dtype), (4, "uint32"));
        assert_eq!(
            TokenArray::open_npy(&out).unwrap().read(0, 99).unwrap(),
            ids[..8]
        );

        // An id that does not fit uint16, and data too short for one sequence: errors that
        // name the data, and no file.
        let out = dir.path().join("none.npy");
        let wide: Vec<u8> = [1u32, 2, 3, 4, 70000, 5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&input, npy("<u4", "(6,)", &wide)).unwrap();
        let message = write_npy(&out, &mut chunks(2), None, 1000, |_| ())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("in.npy")
                && message
                    .contains("token id 70000 at position 0 of sequence 2 does not fit the uint16"),
            "{message}"
        );
        let message = write_npy(&out, &mut chunks(12), None, 65536, |_| ())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("in.npy")
                && message.contains("no complete sequence of 12 tokens (6 tokens in all)"),
            "{message}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.npy");
        std::fs::write(&path, npy("<u2", "(100,)", &[0, 0])).unwrap();
        let err = TokenArray::open_npy(&path).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&path, npy("<f4", "(1,)", &[0, 0, 0, 0])).unwrap();
        let err = TokenArray::open_npy(&path).err().unwrap().to_string();
        assert!(err.contains("dtype <f4"), "{err}");
        std::fs::write(&path, b"hello").unwrap();
        assert!(TokenArray::open_npy(&path).is_err());
        // Shapes whose byte counts overflow (used to panic, or wrap and read past the end).
        for (descr, shape, expected) in [
            ("<u2", "(18446744073709551615,)", "(more than 2^64 bytes)"),
            ("<u8", "(2305843009213693952,)", "(more than 2^64 bytes)"),
            (
                "<u2",
                "(4611686018427387904, 4)",
                "is too large for any file",
            ),
        ] {
            std::fs::write(&path, npy(descr, shape, &[0; 8])).unwrap();
            let err = TokenArray::open_npy(&path).err().unwrap().to_string();
            assert!(err.contains("t.npy") && err.contains(expected), "{err}");
        }
    }
}
