//! The activation cache from Python: `cache_activations` (write) and `ActivationCache`
//! (read back in batches).
//!
//! Writing follows `hooks::activations::ActivationCache::write` step by step and produces
//! the same folder (shards, `progress.json`, `manifest.json`), so a job started from
//! Python can be resumed by the `hooks cache` command and the other way round. It is
//! re-implemented here only because the Rust writer runs the whole job in one call with no
//! way to stop between batches: Python needs to check for Ctrl-C (and call a progress
//! callback) after every batch. On an interruption the batches computed so far are written
//! as a shard first, so a re-run resumes after them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hooks::activations::{
    ActivationBatch, ActivationCache, ActivationSource, CacheReader, Manifest, ModelActivations,
    ReadOrder, ShardInfo,
};
use hooks::candle_core::{DType, Device, Tensor};
use hooks::data::DataSpec;
use hooks::{atomic, dtype_name, Error, HookPoint, Model};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::convert::{int64_array, json_to_py, HostArray};
use crate::errors::IntoPyResult;
use crate::model::PyModel;

/// The manifest's `format` (as written by the Rust writer).
const FORMAT: &str = "eleuther-interp.activations";
/// The manifest's `version`.
const VERSION: u32 = 1;

/// `progress.json`: what the Rust writer keeps while a job runs (same fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    settings: Value,
    shards: Vec<ShardInfo>,
    chunks: u64,
    text_bytes: u64,
}

/// Lets a value that is not `Send` cross `Python::detach`, which runs its closure on the
/// calling thread.
struct SameThread<T>(T);

// SAFETY: `Python::detach` runs the closure on the current thread (it only releases the
// GIL around it), so the wrapped value is never used from another thread. The values
// wrapped here hold no Python objects.
unsafe impl<T> Send for SameThread<T> {}

impl<T> SameThread<T> {
    /// The wrapped value. (Closures must call this rather than use `.0`, which a closure
    /// would capture on its own, without the wrapper.)
    fn get(&mut self) -> &mut T {
        &mut self.0
    }
}

fn cache_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Cache {
        path: path.into(),
        message: message.into(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> hooks::Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| cache_error(path, format!("unreadable: {e}")))
}

/// A manifest from JSON parts (checks the settings have the shape the runtime expects).
fn manifest(settings: &Value, progress: &Progress, path: &Path) -> hooks::Result<Manifest> {
    Ok(Manifest {
        format: FORMAT.into(),
        version: VERSION,
        settings: serde_json::from_value(settings.clone())
            .map_err(|e| cache_error(path, format!("internal: bad settings: {e}")))?,
        tokens: progress.shards.iter().map(|s| s.tokens).sum(),
        chunks: progress.chunks,
        text_bytes: progress.text_bytes,
        shards: progress.shards.clone(),
    })
}

/// One caching job.
struct Job<'m> {
    model: &'m Model,
    points: Vec<HookPoint>,
    spec: DataSpec,
    dir: PathBuf,
    store_dtype: DType,
    batch_size: usize,
    max_chunks: Option<u64>,
    max_shard_bytes: usize,
    overwrite: bool,
    progress: bool,
}

/// What a finished job reports.
struct Outcome {
    manifest: Manifest,
    resumed_chunks: u64,
    new_tokens: u64,
    bytes_written: u64,
    seconds: f64,
    already_complete: bool,
}

/// Where a job starts.
enum Start {
    /// The folder already holds a complete cache with these settings.
    Complete(Box<Manifest>),
    /// Start (or resume) with this progress.
    Run(Progress),
}

impl Job<'_> {
    /// The cache settings, exactly as the Rust writer records them.
    fn settings(&self) -> hooks::Result<Value> {
        let model = self.model;
        let value = json!({
            "model": model.origin(),
            "revision": model.revision(),
            "architecture": model.config().model_type(),
            "hook_points": self.points.iter().map(|p| model.hook_name(*p)).collect::<Vec<_>>(),
            "widths": self.points.iter().map(|p| model.config().width(*p)).collect::<Vec<_>>(),
            "compute_dtype": dtype_name(model.dtype()),
            "dtype": dtype_name(self.store_dtype),
            "data": serde_json::to_value(&self.spec).map_err(|e| Error::InvalidArgument(e.to_string()))?,
            "max_chunks": self.max_chunks,
        });
        // Round trip through the runtime's type: the canonical form, checked.
        let empty = Progress {
            settings: value,
            shards: Vec::new(),
            chunks: 0,
            text_bytes: 0,
        };
        let manifest = manifest(&empty.settings, &empty, &self.dir)?;
        serde_json::to_value(&manifest.settings).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Clears the folder when overwriting, finds a complete cache or the progress to resume.
    fn start(&self, settings: &Value) -> hooks::Result<Start> {
        let dir = &self.dir;
        if self.overwrite && dir.exists() {
            for file in ["manifest.json", "progress.json"] {
                let _ = std::fs::remove_file(dir.join(file));
            }
            let _ = std::fs::remove_dir_all(dir.join("shards"));
        }
        let manifest_path = dir.join("manifest.json");
        if manifest_path.exists() {
            let existing: Manifest = read_json(&manifest_path)?;
            if existing.format != FORMAT || existing.version != VERSION {
                return Err(cache_error(
                    &manifest_path,
                    format!(
                        "format '{}' version {} is not {FORMAT} version {VERSION}",
                        existing.format, existing.version
                    ),
                ));
            }
            let same = serde_json::to_value(&existing.settings).ok().as_ref() == Some(settings);
            if !same {
                return Err(cache_error(
                    dir,
                    "already holds a complete cache made with other settings; choose another folder or pass overwrite=True",
                ));
            }
            return Ok(Start::Complete(Box::new(existing)));
        }
        std::fs::create_dir_all(dir.join("shards"))
            .map_err(|e| Error::io(dir.join("shards"), e))?;
        let progress_path = dir.join("progress.json");
        if progress_path.exists() {
            let progress: Progress = read_json(&progress_path)?;
            if &progress.settings != settings {
                return Err(cache_error(
                    dir,
                    "holds an unfinished cache made with other settings (model, hook points, dtype or data differ); choose another folder or pass overwrite=True",
                ));
            }
            return Ok(Start::Run(progress));
        }
        Ok(Start::Run(Progress {
            settings: settings.clone(),
            shards: Vec::new(),
            chunks: 0,
            text_bytes: 0,
        }))
    }

    /// Writes the pending batches as one shard and records it in `progress.json`.
    /// Returns the activation bytes written.
    fn flush(
        &self,
        pending: &mut Vec<ActivationBatch>,
        progress: &mut Progress,
        text_bytes: u64,
    ) -> hooks::Result<u64> {
        if pending.is_empty() {
            return Ok(0);
        }
        let rows: usize = pending.iter().map(ActivationBatch::len).sum();
        let tokens: Vec<u32> = pending
            .iter()
            .flat_map(|b| b.tokens.iter().copied())
            .collect();
        let file = format!("shards/shard-{:06}.safetensors", progress.shards.len());
        let mut tensors = vec![(
            "tokens".to_string(),
            vec![Tensor::new(tokens.as_slice(), &Device::Cpu)?],
        )];
        for point in pending[0].activations.keys() {
            let parts = pending
                .iter()
                .map(|b| b.activations[point].clone())
                .collect();
            tensors.push((self.model.hook_name(*point), parts));
        }
        let shard_bytes: usize = pending.iter().map(ActivationBatch::activation_bytes).sum();
        pending.clear();
        atomic::write_safetensors(&self.dir.join(&file), &tensors)?;
        progress.chunks += rows as u64 / self.spec.seq_len as u64;
        progress.text_bytes = text_bytes;
        progress.shards.push(ShardInfo {
            file,
            tokens: rows as u64,
        });
        atomic::write_json(&self.dir.join("progress.json"), progress)?;
        Ok(shard_bytes as u64)
    }

    /// Runs the job, releasing the GIL for every batch and checking for Ctrl-C (and calling
    /// `callback`) between batches.
    fn run(&self, py: Python<'_>, callback: Option<&Bound<'_, PyAny>>) -> PyResult<Outcome> {
        let started = Instant::now();
        let settings = self.settings().into_py_result()?;
        let mut progress = match py.detach(|| self.start(&settings)).into_py_result()? {
            Start::Complete(manifest) => {
                return Ok(Outcome {
                    manifest: *manifest,
                    resumed_chunks: 0,
                    new_tokens: 0,
                    bytes_written: 0,
                    seconds: 0.0,
                    already_complete: true,
                })
            }
            Start::Run(progress) => progress,
        };
        let tokenizer = self.model.tokenizer().ok();
        let mut source = py
            .detach(|| -> hooks::Result<SameThread<ModelActivations<'_>>> {
                let chunks = self.spec.chunks(tokenizer)?;
                Ok(SameThread(ModelActivations::new(
                    self.model,
                    chunks,
                    self.points.clone(),
                    self.batch_size,
                    self.store_dtype,
                    self.max_chunks,
                )?))
            })
            .into_py_result()?;
        let resumed_chunks = progress.chunks;
        if resumed_chunks > 0 {
            let skipped = py
                .detach(|| source.get().skip_chunks(resumed_chunks))
                .into_py_result()?;
            if skipped != resumed_chunks {
                return Err(crate::errors::to_py_err(cache_error(
                    &self.dir,
                    format!("progress.json records {resumed_chunks} chunks done but the dataset now has only {skipped}"),
                )));
            }
        }
        let skipped_bytes = source.0.chunks().text_bytes();
        let seq_len = self.spec.seq_len as u64;
        let bar = hooks::progress::bar(
            self.progress,
            self.max_chunks.map(|c| c * seq_len),
            "tokens",
        );
        bar.set_position(resumed_chunks * seq_len);

        let mut pending: Vec<ActivationBatch> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut new_tokens = 0u64;
        let mut bytes_written = 0u64;
        loop {
            let next = py.detach(|| source.get().next_batch()).into_py_result()?;
            let Some(batch) = next else { break };
            new_tokens += batch.len() as u64;
            bar.inc(batch.len() as u64);
            pending_bytes += batch.activation_bytes();
            pending.push(batch);
            let text_bytes = progress.text_bytes + source.0.chunks().text_bytes() - skipped_bytes;
            if pending_bytes >= self.max_shard_bytes {
                bytes_written += py
                    .detach(|| self.flush(&mut pending, &mut progress, text_bytes))
                    .into_py_result()?;
                pending_bytes = 0;
            }
            let interrupted = py.check_signals().and_then(|()| match callback {
                Some(callback) => {
                    let info = PyDict::new(py);
                    let done: u64 = progress.chunks * seq_len
                        + pending.iter().map(|b| b.len() as u64).sum::<u64>();
                    info.set_item("tokens", done)?;
                    info.set_item("new_tokens", new_tokens)?;
                    info.set_item("shards", progress.shards.len())?;
                    info.set_item("seconds", started.elapsed().as_secs_f64())?;
                    callback.call1((info,)).map(drop)
                }
                None => Ok(()),
            });
            if let Err(error) = interrupted {
                // Keep what was computed: a re-run resumes after it.
                bar.finish_and_clear();
                py.detach(|| self.flush(&mut pending, &mut progress, text_bytes))
                    .into_py_result()?;
                return Err(error);
            }
        }
        let text_bytes = progress.text_bytes + source.0.chunks().text_bytes() - skipped_bytes;
        bytes_written += py
            .detach(|| self.flush(&mut pending, &mut progress, text_bytes))
            .into_py_result()?;
        bar.finish_and_clear();

        if progress.chunks == 0 {
            return Err(crate::errors::to_py_err(Error::Data {
                path: self.spec.paths.first().cloned().unwrap_or_default(),
                message: format!(
                    "the dataset yields no complete chunk of {} tokens ({} tokens in all)",
                    self.spec.seq_len,
                    source.0.chunks().tokens_read()
                ),
            }));
        }
        let manifest = manifest(&settings, &progress, &self.dir).into_py_result()?;
        atomic::write_json(&self.dir.join("manifest.json"), &manifest).into_py_result()?;
        let _ = std::fs::remove_file(self.dir.join("progress.json"));
        Ok(Outcome {
            manifest,
            resumed_chunks,
            new_tokens,
            bytes_written,
            seconds: started.elapsed().as_secs_f64(),
            already_complete: false,
        })
    }
}

/// Paths from a `str`, `os.PathLike` or a list of them.
fn paths_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<PathBuf>> {
    if let Ok(path) = obj.extract::<PathBuf>() {
        return Ok(vec![path]);
    }
    obj.extract::<Vec<PathBuf>>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err("data must be a path or a list of paths")
    })
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
/// ``dtype`` is the stored dtype (default: the model's compute dtype).
///
/// The folder holds ``shards/shard-NNNNNN.safetensors`` (``tokens`` and one ``[n, width]``
/// tensor per hook point, at most ``shard_mib`` MiB each) and ``manifest.json``, written
/// last. The format is the one of the ``hooks cache`` command, and the job is resumable
/// either way: re-running with the same settings resumes an interrupted job (Ctrl-C or an
/// exception from ``callback`` first writes what was computed), and returns at once for a
/// complete cache; ``overwrite=True`` starts again.
///
/// ``callback(info)`` is called after every batch with a dict (``tokens`` done in all,
/// ``new_tokens`` this run, ``shards``, ``seconds``); raising from it stops the job.
/// ``progress=True`` draws a progress bar on a terminal.
///
/// The summary has ``output``, ``tokens``, ``chunks``, ``shards``, ``new_tokens``,
/// ``resumed_chunks``, ``bytes_written``, ``seconds``, ``tokens_per_second``,
/// ``already_complete`` and ``manifest`` (the manifest as a dict).
#[pyfunction]
#[pyo3(signature = (
    model, hookpoints, data, output, *, seq_len = 2048, batch_size = 8, max_tokens = None,
    dtype = None, format = None, text_field = "text", shard_mib = 256, overwrite = false,
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
    dtype: Option<String>,
    format: Option<String>,
    text_field: &str,
    shard_mib: usize,
    overwrite: bool,
    progress: bool,
    callback: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let holder: Bound<'py, PyModel> = match model.cast::<PyModel>() {
        Ok(m) => m.clone(),
        Err(_) => {
            let name: PathBuf = model.extract().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err("model must be a Model or a model name")
            })?;
            Bound::new(py, PyModel::load(py, name, None, "cpu", "float32", None)?)?
        }
    };
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
    let store_dtype = match &dtype {
        Some(name) => hooks::parse_dtype(name).into_py_result()?,
        None => model.dtype(),
    };
    let spec = DataSpec {
        paths: paths_of(data)?,
        format,
        text_field: text_field.to_string(),
        seq_len,
    };
    let job = Job {
        model,
        points,
        spec,
        dir: output.clone(),
        store_dtype,
        batch_size,
        max_chunks,
        max_shard_bytes: shard_mib.max(1) << 20,
        overwrite,
        progress,
    };
    let outcome = job.run(py, callback)?;
    let m = &outcome.manifest;
    let summary = PyDict::new(py);
    summary.set_item("output", output)?;
    summary.set_item("tokens", m.tokens)?;
    summary.set_item("chunks", m.chunks)?;
    summary.set_item("shards", m.shards.len())?;
    summary.set_item("new_tokens", outcome.new_tokens)?;
    summary.set_item("resumed_chunks", outcome.resumed_chunks)?;
    summary.set_item("bytes_written", outcome.bytes_written)?;
    summary.set_item("seconds", outcome.seconds)?;
    summary.set_item(
        "tokens_per_second",
        outcome.new_tokens as f64 / outcome.seconds.max(1e-9),
    )?;
    summary.set_item("already_complete", outcome.already_complete)?;
    let manifest = serde_json::to_value(m).map_err(|e| PyValueError::new_err(e.to_string()))?;
    summary.set_item("manifest", json_to_py(py, &manifest)?)?;
    Ok(summary)
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
    /// memory), reproducibly for a given ``seed``.
    #[pyo3(signature = (batch_tokens, *, shuffle = false, seed = 0, buffer_tokens = None))]
    fn batches(
        &self,
        py: Python<'_>,
        batch_tokens: usize,
        shuffle: bool,
        seed: u64,
        buffer_tokens: Option<usize>,
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
            .detach(|| self.inner.reader(batch_tokens, order))
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
