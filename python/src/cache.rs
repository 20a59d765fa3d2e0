//! The activation cache from Python: `cache_activations` (write) and `ActivationCache`
//! (read back in batches).
//!
//! Writing is one call to `hooks::activations::ActivationCache::write_with`, the writer of
//! the `hooks cache` command, so both produce the same folder (shards, `progress.json`,
//! `manifest.json`) byte for byte and either can resume a job the other started. The GIL is
//! released for the whole job; after every batch the writer calls back, and the callback
//! takes the GIL to check for Ctrl-C and call the user's Python callback. An exception from
//! either stops the job after the batches computed so far are written as a shard, so a
//! re-run resumes after them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use hooks::activations::{
    ActivationCache, ActivationSource, CacheOptions, CacheProgress, CacheReader, CacheSummary,
    ModelActivations, ReadOrder,
};
use hooks::candle_core::Tensor;
use hooks::data::DataSpec;
use hooks::{Error, HookPoint};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::convert::{int64_array, json_to_py, HostArray};
use crate::errors::IntoPyResult;
use crate::model::PyModel;

/// Paths from a `str`, `os.PathLike` or a list of them.
pub fn paths_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PathBuf>> {
    if let Ok(path) = obj.extract::<PathBuf>() {
        return Ok(vec![path]);
    }
    obj.extract::<Vec<PathBuf>>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err("data must be a path or a list of paths")
    })
}

/// A `Model` argument that may also be a name for `Model.from_pretrained` (loaded on the
/// CPU in float32).
pub fn model_arg<'py>(py: Python<'py>, model: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyModel>> {
    match model.cast::<PyModel>() {
        Ok(m) => Ok(m.clone()),
        Err(_) => {
            let name: PathBuf = model.extract().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err("model must be a Model or a model name")
            })?;
            Bound::new(
                py,
                PyModel::load(py, name, None, "cpu", "float32", false, None)?,
            )
        }
    }
}

/// The writer's messages name the command-line flag; from Python the option is a keyword.
fn python_spelling(error: Error) -> Error {
    match error {
        Error::Cache { path, message } => Error::Cache {
            path,
            message: message.replace("pass --overwrite", "pass overwrite=True"),
        },
        Error::Data { path, message } => Error::Data {
            path,
            message: message.replace("use --text-field", "use text_field="),
        },
        other => other,
    }
}

/// Runs a model over a dataset and writes the activations at ``hookpoints`` to the folder
/// ``output``; returns a summary dict.
///
/// ``model`` is a :class:`Model` or a name for :meth:`Model.from_pretrained` (loaded on the
/// CPU in float32). ``hookpoints`` is a list of names or a comma-separated string; aliases
/// and ``*`` patterns (``"layers.*"``) work; the cache stores canonical names in forward
/// order. ``data`` is a path or list of paths: ``.txt`` (one document per non-empty line),
/// ``.jsonl`` / ``.parquet`` (the ``text_field`` column), pre-tokenized ``.npy`` or raw
/// uint16 ``.bin``; ``format`` overrides the extension (``text``, ``text-file``, ``jsonl``,
/// ``parquet``, ``npy``, ``bin``). Documents are joined with the end-of-text token and
/// packed into sequences of ``seq_len`` tokens (a last partial sequence is dropped);
/// ``batch_size`` sequences run per forward pass, each pass stopping after the last hook
/// point. ``max_tokens`` stops after that many tokens (rounded down to whole sequences).
/// ``store_dtype`` is the dtype stored (the CLI's ``--store-dtype``; default: the model's
/// compute dtype).
///
/// The folder holds ``shards/shard-NNNNNN.safetensors`` (``tokens`` and one ``[n, width]``
/// tensor per hook point, each written once its activations reach ``shard_mib`` MiB, in
/// whole forward batches, so it may pass that by up to one batch) and ``manifest.json``, written
/// last. The writer is the one of the ``hooks cache`` command (same files, byte for byte),
/// and the job is resumable either way: re-running with the same settings resumes an
/// interrupted job (Ctrl-C or an exception from ``callback`` first writes what was
/// computed), and returns at once for a complete cache; ``overwrite=True`` starts again.
/// The GIL is released while the job runs, except during ``callback``.
///
/// ``callback(info)`` is called after every batch with a dict (``tokens`` done in all,
/// ``new_tokens`` this run, ``shards`` written (counting the one this batch completes),
/// ``seconds``); raising from it stops the job.
/// ``progress=True`` draws a progress bar on a terminal.
///
/// The summary has ``output``, ``tokens``, ``chunks``, ``shards``, ``new_tokens``,
/// ``resumed_chunks``, ``bytes_written``, ``seconds``, ``tokens_per_second``,
/// ``already_complete`` and ``manifest`` (the manifest as a dict).
#[pyfunction]
#[pyo3(signature = (
    model, hookpoints, data, output, *, seq_len = 2048, batch_size = 8, max_tokens = None,
    store_dtype = None, format = None, text_field = "text", shard_mib = 256, overwrite = false,
    progress = false, callback = None
))]
#[allow(clippy::too_many_arguments)]
pub fn cache_activations<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    hookpoints: &Bound<'py, PyAny>,
    data: &Bound<'py, PyAny>,
    output: PathBuf,
    seq_len: usize,
    batch_size: usize,
    max_tokens: Option<u64>,
    store_dtype: Option<String>,
    format: Option<String>,
    text_field: &str,
    shard_mib: usize,
    overwrite: bool,
    progress: bool,
    callback: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let holder = model_arg(py, model)?;
    let model = holder.get().inner();
    let names: Vec<String> = if let Ok(s) = hookpoints.cast::<PyString>() {
        vec![s.to_cow()?.into_owned()]
    } else {
        hookpoints.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err("hookpoints must be a str or a list of str")
        })?
    };
    let points = model
        .hook_points_from_list(&names.join(","))
        .into_py_result()?;
    if seq_len == 0 {
        return Err(PyValueError::new_err("seq_len must be positive"));
    }
    let max_chunks = match max_tokens {
        None => None,
        Some(tokens) if tokens < seq_len as u64 => {
            return Err(PyValueError::new_err(format!(
                "max_tokens {tokens} is less than one sequence of seq_len {seq_len}"
            )))
        }
        Some(tokens) => Some(tokens / seq_len as u64),
    };
    let store_dtype = match &store_dtype {
        Some(name) => hooks::parse_dtype(name).into_py_result()?,
        None => model.dtype(),
    };
    let spec = DataSpec {
        paths: paths_of(data)?,
        format,
        text_field: text_field.to_string(),
        seq_len,
    };
    let options = CacheOptions {
        max_shard_bytes: shard_mib.clamp(1, usize::MAX >> 20) << 20,
        overwrite,
        progress,
    };
    let callback: Option<Py<PyAny>> = callback.map(|c| c.clone().unbind());

    let started = std::time::Instant::now();

    let (result, stopped) = py.detach(|| {
        let mut stopped: Option<PyErr> = None;
        let mut after_batch = |now: &CacheProgress| -> hooks::Result<()> {
            let outcome = Python::attach(|py| -> PyResult<()> {
                py.check_signals()?;
                if let Some(callback) = &callback {
                    let info = PyDict::new(py);
                    info.set_item("tokens", now.tokens)?;
                    info.set_item("new_tokens", now.new_tokens)?;
                    info.set_item("shards", now.shards)?;
                    info.set_item("seconds", started.elapsed().as_secs_f64())?;
                    callback.bind(py).call1((info,))?;
                }
                Ok(())
            });
            outcome.map_err(|error| {
                stopped = Some(error);
                Error::InvalidArgument("stopped from Python".into())
            })
        };
        let result = (|| -> hooks::Result<CacheSummary> {
            let chunks = spec.chunks(model.tokenizer().ok())?;
            let mut source =
                ModelActivations::new(model, chunks, points, batch_size, store_dtype, max_chunks)?;
            ActivationCache::write_with(&mut source, &spec, &output, &options, &mut after_batch)
        })();
        (result, stopped)
    });
    if let Some(error) = stopped {
        // What was computed is saved (unless writing that failed too: then the error is
        // the writer's, and the folder resumes from its last good shard).
        match result {
            Err(Error::InvalidArgument(m)) if m == "stopped from Python" => return Err(error),
            Err(other) => return Err(crate::errors::to_py_err(other)),
            Ok(_) => return Err(error),
        }
    }
    let summary = result.map_err(python_spelling).into_py_result()?;
    let m = &summary.manifest;
    let dict = PyDict::new(py);
    dict.set_item("output", output)?;
    dict.set_item("tokens", m.tokens)?;
    dict.set_item("chunks", m.chunks)?;
    dict.set_item("shards", m.shards.len())?;
    dict.set_item("new_tokens", summary.new_tokens)?;
    dict.set_item("resumed_chunks", summary.resumed_chunks)?;
    dict.set_item("bytes_written", summary.bytes_written)?;
    dict.set_item("seconds", summary.seconds)?;
    dict.set_item(
        "tokens_per_second",
        summary.new_tokens as f64 / summary.seconds.max(1e-9),
    )?;
    dict.set_item("already_complete", summary.already_complete)?;
    let manifest = serde_json::to_value(m).map_err(|e| PyValueError::new_err(e.to_string()))?;
    dict.set_item("manifest", json_to_py(py, &manifest)?)?;
    Ok(dict)
}

/// A complete activation cache on disk (written by :func:`cache_activations` or the
/// ``hooks cache`` command), read back in batches of token rows.
///
/// ``ActivationCache(path)`` checks the manifest and that every shard exists; an incomplete
/// or damaged cache raises ``RuntimeError`` saying what is wrong (a missing folder:
/// ``FileNotFoundError``).
#[pyclass(name = "ActivationCache", module = "eleuther_interp", frozen)]
pub struct PyActivationCache {
    inner: ActivationCache,
    path: PathBuf,
}

#[pymethods]
impl PyActivationCache {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .detach(|| ActivationCache::open(&path))
            .into_py_result()?;
        Ok(PyActivationCache { inner, path })
    }

    /// The manifest (``manifest.json``) as a dict: ``settings`` (model, hook points,
    /// widths, dtypes, data), ``tokens``, ``chunks``, ``text_bytes``, ``shards``.
    #[getter]
    fn manifest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(self.inner.manifest())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        json_to_py(py, &value)
    }

    /// The cached hook points' canonical names, in forward order.
    #[getter]
    fn hookpoints(&self) -> Vec<String> {
        self.inner.manifest().settings.hook_points.clone()
    }

    /// Number of token rows in the cache.
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.manifest().tokens
    }

    /// The cache folder.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// An iterator of batches of ``batch_tokens`` token rows (the last may be smaller):
    /// each a dict mapping every cached hook point to a float32 ``[n, width]`` array (a
    /// bfloat16 / float16 cache is widened), plus ``"tokens"``: the int64 ``[n]`` token ids.
    ///
    /// In dataset order by default; ``shuffle=True`` reads shards in a random order and
    /// shuffles rows within a buffer of ``buffer_tokens`` rows (default 65536; it bounds
    /// memory), reproducibly for a given ``seed``. ``skip_first_positions=N`` leaves out the
    /// rows at the first ``N`` positions of every sequence (as ``sae train
    /// --skip-first-positions``).
    #[pyo3(signature = (batch_tokens, *, shuffle = false, seed = 0, buffer_tokens = None,
        skip_first_positions = 0))]
    fn batches(
        &self,
        py: Python<'_>,
        batch_tokens: usize,
        shuffle: bool,
        seed: u64,
        buffer_tokens: Option<usize>,
        skip_first_positions: usize,
    ) -> PyResult<CacheBatches> {
        let order = if shuffle {
            ReadOrder::Shuffled {
                seed,
                buffer_tokens: buffer_tokens.unwrap_or(1 << 16),
            }
        } else {
            ReadOrder::Sequential
        };
        let reader = py
            .detach(|| -> hooks::Result<_> {
                let mut reader = self.inner.reader(batch_tokens, order)?;
                reader.skip_first_positions(skip_first_positions)?;
                Ok(reader)
            })
            .into_py_result()?;
        let names = self
            .inner
            .hook_points()
            .iter()
            .copied()
            .zip(self.inner.manifest().settings.hook_points.iter().cloned())
            .collect();
        Ok(CacheBatches { reader, names })
    }

    fn __repr__(&self) -> String {
        let m = self.inner.manifest();
        format!(
            "ActivationCache(path='{}', model='{}', hookpoints={:?}, tokens={}, dtype='{}')",
            self.path.display(),
            m.settings.model,
            m.settings.hook_points,
            m.tokens,
            m.settings.dtype
        )
    }
}

/// Iterator over an :class:`ActivationCache`'s batches (from
/// :meth:`ActivationCache.batches`); yields ``dict[str, numpy.ndarray]``.
#[pyclass(module = "eleuther_interp")]
pub struct CacheBatches {
    reader: CacheReader,
    names: Vec<(HookPoint, String)>,
}

#[pymethods]
impl CacheBatches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        py.check_signals()?;
        let reader = &mut self.reader;
        let names = &self.names;
        type Host = (Vec<i64>, Vec<(String, HostArray)>);
        let batch = py
            .detach(|| -> hooks::Result<Option<Host>> {
                let Some(batch) = reader.next_batch()? else {
                    return Ok(None);
                };
                let mut arrays = Vec::with_capacity(names.len());
                let by_point: BTreeMap<HookPoint, &Tensor> =
                    batch.activations.iter().map(|(p, t)| (*p, t)).collect();
                for (point, name) in names {
                    if let Some(tensor) = by_point.get(point) {
                        arrays.push((name.clone(), HostArray::from_tensor(tensor)?));
                    }
                }
                let tokens = batch.tokens.iter().map(|&t| i64::from(t)).collect();
                Ok(Some((tokens, arrays)))
            })
            .into_py_result()?;
        let Some((tokens, arrays)) = batch else {
            return Ok(None);
        };
        let dict = PyDict::new(py);
        for (name, host) in arrays {
            dict.set_item(name, host.into_numpy(py)?)?;
        }
        let n = tokens.len();
        dict.set_item("tokens", int64_array(py, tokens, &[n])?)?;
        Ok(Some(dict))
    }
}
