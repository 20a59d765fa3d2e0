//! Reading weight tensors by name from safetensors (single or sharded), PyTorch pickles
//! (`pytorch_model.bin`, as many Pythia training checkpoints are) or tensors already in
//! memory (GGUF after dequantisation, or its block-quantized projections kept as they are),
//! with shape and dtype checks that name the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{pickle::PthTensors, DType, Device, Tensor};

use crate::{Error, Result};

/// Where a model's weight tensors live on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    /// One or more `.safetensors` files (shards are listed in index order).
    Safetensors(Vec<PathBuf>),
    /// One or more PyTorch pickle files (`pytorch_model*.bin`).
    Pickle(Vec<PathBuf>),
    /// A GGUF file holding weights, metadata and tokenizer.
    Gguf(PathBuf),
}

impl WeightFiles {
    /// The files, for messages.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            WeightFiles::Safetensors(p) | WeightFiles::Pickle(p) => {
                p.iter().map(PathBuf::as_path).collect()
            }
            WeightFiles::Gguf(p) => vec![p.as_path()],
        }
    }

    fn describe(&self) -> String {
        let paths = self.paths();
        match paths.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} files in {}",
                many.len(),
                many[0].parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }
}

enum Source {
    Safetensors(MmapedSafetensors),
    Pickle(Vec<PthTensors>),
    Memory(HashMap<String, Tensor>),
}

/// Named weight tensors, loaded lazily from their files.
pub struct WeightStore {
    source: Source,
    /// Block-quantized tensors (a GGUF file read with [`crate::LoadOptions::quantized`]),
    /// served by [`WeightStore::quantized`] only.
    quantized: HashMap<String, Arc<QTensor>>,
    description: String,
    /// The names [`WeightStore::get`] was asked for, to find the tensors a model left unused.
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl WeightStore {
    /// Opens weight files, reading only their headers.
    pub fn open(files: &WeightFiles) -> Result<Self> {
        for path in files.paths() {
            if !path.is_file() {
                return Err(Error::WeightFile {
                    path: path.into(),
                    message: crate::error::not_a_file(path).into(),
                });
            }
        }
        let source = match files {
            WeightFiles::Safetensors(paths) => {
                // Validate each file on its own first so an error names the bad shard.
                for path in paths {
                    // SAFETY: the file is only read; the mapping lives as long as the store.
                    unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::WeightFile {
                        path: path.clone(),
                        message: format!("not a readable safetensors file ({})", root_cause(&e)),
                    })?;
                }
                // SAFETY: as above.
                let st =
                    unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::WeightFile {
                        path: paths[0].clone(),
                        message: root_cause(&e),
                    })?;
                Source::Safetensors(st)
            }
            WeightFiles::Pickle(paths) => Source::Pickle(
                paths
                    .iter()
                    .map(|path| {
                        PthTensors::new(path, None).map_err(|e| Error::WeightFile {
                            path: path.clone(),
                            message: format!(
                                "not a readable PyTorch checkpoint ({})",
                                root_cause(&e)
                            ),
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            WeightFiles::Gguf(path) => {
                return Err(Error::WeightFile {
                    path: path.clone(),
                    message: "GGUF weights are read with the GGUF loader".into(),
                })
            }
        };
        Ok(WeightStore {
            source,
            quantized: HashMap::new(),
            description: files.describe(),
            used: Default::default(),
        })
    }

    /// Wraps tensors already in memory; `description` names where they came from.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, description: impl Into<String>) -> Self {
        WeightStore {
            source: Source::Memory(tensors),
            quantized: HashMap::new(),
            description: description.into(),
            used: Default::default(),
        }
    }

    /// Adds block-quantized tensors, which [`WeightStore::quantized`] serves (a linear layer
    /// multiplies them as they are); [`WeightStore::get`] does not see them.
    pub fn with_quantized(mut self, tensors: HashMap<String, Arc<QTensor>>) -> Self {
        self.quantized.extend(tensors);
        self
    }

    /// The block-quantized tensor `name` (`[out, in]`, shape checked), `None` when the store
    /// holds it as a plain tensor or not at all.
    pub fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<Arc<QTensor>>> {
        let Some(tensor) = self.quantized.get(name) else {
            return Ok(None);
        };
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        if tensor.shape().dims() != shape {
            return Err(Error::BadWeight {
                name: name.into(),
                message: format!(
                    "expected shape {shape:?}, found {:?} in {}",
                    tensor.shape().dims(),
                    self.description
                ),
            });
        }
        Ok(Some(Arc::clone(tensor)))
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
            || match &self.source {
                Source::Safetensors(st) => st.get(name).is_ok(),
                Source::Pickle(files) => files.iter().any(|f| f.tensor_infos().contains_key(name)),
                Source::Memory(map) => map.contains_key(name),
            }
    }

    /// Where the tensors come from, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The tensors no [`WeightStore::get`] has asked for, sorted: once a model is built,
    /// what its config left out of it.
    pub fn unused(&self) -> Vec<String> {
        let names: Vec<String> = match &self.source {
            Source::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Source::Pickle(files) => files
                .iter()
                .flat_map(|f| f.tensor_infos().keys().cloned())
                .collect(),
            Source::Memory(map) => map.keys().cloned().collect(),
        };
        let names = names.into_iter().chain(self.quantized.keys().cloned());
        let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let mut unused: Vec<String> = names.filter(|n| !used.contains(n)).collect();
        unused.sort();
        unused.dedup();
        unused
    }

    /// Loads tensor `name`, checks its shape and that it holds floats, and converts it to
    /// `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        let tensor = self.load_raw(name)?;
        if !is_float(tensor.dtype()) {
            return Err(Error::BadWeight {
                name: name.into(),
                message: format!(
                    "expected a floating-point tensor, found dtype {:?} in {}",
                    tensor.dtype(),
                    self.description
                ),
            });
        }
        if tensor.dims() != shape {
            return Err(Error::BadWeight {
                name: name.into(),
                message: format!(
                    "expected shape {shape:?}, found {:?} in {}",
                    tensor.dims(),
                    self.description
                ),
            });
        }
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    fn load_raw(&self, name: &str) -> Result<Tensor> {
        let missing = || Error::MissingWeight {
            name: name.into(),
            files: self.description.clone(),
        };
        let bad = |e: candle_core::Error| Error::BadWeight {
            name: name.into(),
            message: format!(
                "cannot be read from {}: {}",
                self.description,
                root_cause(&e)
            ),
        };
        match &self.source {
            Source::Safetensors(st) => {
                if st.get(name).is_err() {
                    return Err(missing());
                }
                st.load(name, &Device::Cpu).map_err(bad)
            }
            Source::Pickle(files) => {
                for file in files {
                    if let Some(t) = file.get(name).map_err(bad)? {
                        return Ok(t);
                    }
                }
                Err(missing())
            }
            Source::Memory(map) => map.get(name).cloned().ok_or_else(missing),
        }
    }
}

/// Why `t` cannot be a trained parameter (an SAE's or a lens's), if it cannot: a dtype other
/// than a float's (integer bytes read as weights give garbage), or a NaN or infinity, with
/// where the first one is. The parameter as f32 otherwise.
pub fn float_parameter(t: &Tensor) -> std::result::Result<Tensor, String> {
    if !is_float(t.dtype()) {
        return Err(format!("is {:?}, expected a float type", t.dtype()));
    }
    let t = t.to_dtype(DType::F32).map_err(|e| root_cause(&e))?;
    // One value a row: the row found is the flat index.
    let column = t
        .flatten_all()
        .and_then(|v| v.unsqueeze(1))
        .map_err(|e| root_cause(&e))?;
    match crate::activations::first_non_finite(&column, |_| true).map_err(|e| e.to_string())? {
        Some((at, value)) => Err(format!("holds {value} at flat index {at}")),
        None => Ok(t),
    }
}

/// The dtypes of weights: candle's float types that hold trained values.
fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
}

/// The innermost message of a candle error, without its backtrace decoration.
pub(crate) fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join("model.safetensors");
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &path).unwrap();
        path
    }

    #[test]
    fn checks_shape_dtype_and_presence() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let ids = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let path = write_safetensors(dir.path(), &[("w", w), ("ids", ids)]);
        let store = WeightStore::open(&WeightFiles::Safetensors(vec![path])).unwrap();

        let got = store.get("w", &[2, 3], DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let err = store
            .get("w", &[3, 2], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("'w'") && err.contains("[3, 2]") && err.contains("[2, 3]"),
            "{err}"
        );
        let err = store
            .get("ids", &[2], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("floating-point"), "{err}");
        let err = store
            .get("nope", &[1], DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("'nope' is missing"), "{err}");
        // Asked for, even when refused, is used.
        assert!(store.unused().is_empty());
        let store = WeightStore::open(&WeightFiles::Safetensors(vec![dir
            .path()
            .join("model.safetensors")]))
        .unwrap();
        store.get("w", &[2, 3], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(store.unused(), ["ids"]);
    }

    #[test]
    fn truncated_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        let path = write_safetensors(dir.path(), &[("w", w)]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = WeightStore::open(&WeightFiles::Safetensors(vec![path.clone()]))
            .err()
            .unwrap();
        let err = err.to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("not a readable safetensors"),
            "{err}"
        );
    }
}
