//! Memory-mapped pre-tokenized token arrays: NumPy `.npy` (1-D or 2-D integer arrays) and raw
//! little-endian `uint16` `.bin` files as Pythia's own training data ships.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

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
    /// Row length for 2-D arrays (each row already one chunk), `None` for 1-D.
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
            [rows, cols] => (rows * cols, Some(*cols)),
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
        let needed = offset + len * element.size();
        if map.len() < needed {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
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
    }
}
