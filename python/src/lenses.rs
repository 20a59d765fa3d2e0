//! The lens crate from Python: `TunedLens` (load / save / export, apply, train),
//! `LogitLens`, `evaluate_lens` and `PredictionTrajectory` (per-layer predictions of a text,
//! its statistics and figure), named as in tuned-lens so code ports with few edits.
//!
//! Hidden states cross as float32 numpy arrays `[..., d_model]`. The tuned lens's
//! translators run in float32; decoding (final norm + unembedding) runs in the model's own
//! dtype and device, exactly as the model computes its logits, and comes back as float32.
//! Training and evaluation run with the GIL released; they take it between steps (or
//! batches) only to check for Ctrl-C and call the Python callback.

use std::cell::RefCell;
use std::path::PathBuf;

use hooks::activations::{ActivationBatch, ActivationSource, ReadOrder};
use hooks::candle_core::{Device, Tensor};
use hooks::{HookPoint, Model};
use lens::eval::{evaluate, EvalReport};
use lens::plot::{plot_trajectory, TrajectoryView};
use lens::train::{prepare_output, train, LossKind, OptimizerKind, StepRecord, TrainOptions};
use lens::trajectory::{PredictionTrajectory, Statistic};
use lens::{DecodeDtype, LensData, TunedLens};
use pyo3::exceptions::{
    PyFileNotFoundError, PyImportError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::cache::{model_arg, paths_of};
use crate::convert::{float_array, json_to_py, HostArray};
use crate::errors::{to_py_err, IntoPyResult};
use crate::model::PyModel;

/// The Python exception for a lens error: lens files and lenses that do not fit -> ValueError
/// (a folder without parameters: FileNotFoundError); training that cannot go on ->
/// RuntimeError; runtime errors as everywhere else (see `errors`).
pub fn lens_err(error: lens::Error) -> PyErr {
    match error {
        lens::Error::Hooks(e) => to_py_err(e),
        lens::Error::Candle(e) => to_py_err(hooks::Error::from(e)),
        lens::Error::Lens(m)
            if m.ends_with("no params.safetensors or params.pt")
                || m.contains("has no pretrained lens for") =>
        {
            PyFileNotFoundError::new_err(m)
        }
        lens::Error::Lens(m) | lens::Error::Options(m) => PyValueError::new_err(m),
        lens::Error::Training(m) => PyRuntimeError::new_err(m),
    }
}

trait IntoPyLensResult<T> {
    fn into_py_lens(self) -> PyResult<T>;
}

impl<T, E: Into<lens::Error>> IntoPyLensResult<T> for Result<T, E> {
    fn into_py_lens(self) -> PyResult<T> {
        self.map_err(|e| lens_err(e.into()))
    }
}

/// Hidden states from Python as a float32 host array whose last dimension is `d`.
fn hidden_arg(obj: &Bound<'_, PyAny>, d: usize) -> PyResult<HostArray> {
    let host = float_array(obj, "the hidden states are")?;
    if host.dims.last() != Some(&d) {
        return Err(PyValueError::new_err(format!(
            "hidden states must have shape [..., {d}] (d_model {d}), got shape {:?}",
            host.dims
        )));
    }
    Ok(host)
}

/// A layer index: negative indices are refused with the lens's own message.
fn layer_arg(layer: i64, num_layers: usize) -> PyResult<usize> {
    usize::try_from(layer).map_err(|_| {
        PyValueError::new_err(format!(
            "layer {layer} is out of range: the lens has {num_layers} translators"
        ))
    })
}

/// Logits of residual-stream vectors with the model's final norm and unembedding, in the
/// model's dtype on its device (bit for bit what the model computes), as float32.
fn decode(model: &Model, h: &Tensor) -> hooks::Result<HostArray> {
    let h = h.to_device(model.device())?.to_dtype(model.dtype())?;
    HostArray::from_tensor(&model.unembedding().forward(&h)?)
}

/// A tuned lens (Belrose et al. 2023): one affine translator per layer,
/// ``h + h @ W.T + b``, applied to the residual stream entering that layer (index ``i``
/// reads the model's ``hidden_states[i]``: ``embed`` for 0, ``layers.{i-1}`` after) and
/// decoded with the model's final norm and unembedding.
///
/// Create one with :meth:`for_model` (zero translators: exactly the logit lens),
/// :meth:`load` (ours or tuned-lens's ``params.pt`` folder) or :meth:`train`. The names
/// follow tuned-lens: ``forward(h, idx)`` / ``transform_hidden(h, idx)``, except that
/// ``forward`` takes the model to decode with (a lens does not hold one).
#[pyclass(name = "TunedLens", module = "eleuther_interp", frozen)]
pub struct PyTunedLens {
    inner: TunedLens,
    history: Vec<StepRecord>,
}

impl PyTunedLens {
    /// Raises ValueError (with the lens crate's message) unless this lens fits `model`: same
    /// width, layer count and, for lenses we trained, unembedding. The model's unembedding
    /// fingerprint is computed once per model.
    fn check_fits(&self, model: &PyModel) -> PyResult<()> {
        let m = model.inner();
        let config = &self.inner.config;
        let shape_ok = config.d_model == m.config().hidden_size()
            && config.num_hidden_layers == m.config().num_layers();
        let hash_ok = match config.unembed_hash.as_deref() {
            None => true,
            Some(expected) => {
                // Only fingerprints of our kind are comparable (tuned-lens's differ).
                !expected.starts_with(lens::UNEMBED_HASH_PREFIX)
                    || expected == model.unembedding_hash().into_py_lens()?
            }
        };
        if shape_ok && hash_ok {
            return Ok(());
        }
        self.inner.check_model(m).into_py_lens()
    }
}

#[pymethods]
impl PyTunedLens {
    /// A zero-initialised lens for ``model`` (a :class:`Model`): every translator is the
    /// identity, so it equals the logit lens until trained.
    #[staticmethod]
    fn for_model(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<Self> {
        let holder = model_arg(py, model)?;
        let model = holder.get().inner();
        let inner = py.detach(|| TunedLens::for_model(model)).into_py_lens()?;
        Ok(PyTunedLens {
            inner,
            history: Vec::new(),
        })
    }

    /// tuned-lens's pretrained lens for ``model`` (a :class:`Model` or a model name), fetched
    /// from its hub collection (the Space ``AlignmentResearch/tuned-lens``; Pythia deduped
    /// models, GPT-NeoX-20B, Llama 2 and others) into the shared Hugging Face cache and checked
    /// against the model. As tuned-lens's: ``lens_resource_id`` is a lens folder, or the model
    /// id whose lens to fetch (default: the model's hub id); ``repo_id``, ``repo_type`` and
    /// ``revision`` name another collection (else ``TUNED_LENS_REPO_ID`` /
    /// ``TUNED_LENS_REPO_TYPE``).
    #[staticmethod]
    #[pyo3(signature = (model, lens_resource_id = None, *, repo_id = None, repo_type = None, revision = "main"))]
    fn from_model_and_pretrained(
        py: Python<'_>,
        model: &Bound<'_, PyAny>,
        lens_resource_id: Option<&str>,
        repo_id: Option<String>,
        repo_type: Option<&str>,
        revision: &str,
    ) -> PyResult<Self> {
        let holder = model_arg(py, model)?;
        let model = holder.get().inner();
        let inner = py
            .detach(|| {
                let repo = lens::hub::LensRepo::new(repo_id, repo_type, revision)?;
                lens::hub::load_pretrained(model, lens_resource_id, &repo)
            })
            .into_py_lens()?;
        Ok(PyTunedLens {
            inner,
            history: Vec::new(),
        })
    }

    /// Loads a lens folder: ours (``config.json`` + ``params.safetensors``, written by
    /// :meth:`save` or ``lens train``) or tuned-lens's (``config.json`` + ``params.pt``;
    /// read without PyTorch). ``device`` is where the translators live (``"cpu"``,
    /// ``"cuda:0"``).
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let device = hooks::parse_device(device).into_py_result()?;
        let inner = py
            .detach(|| TunedLens::load(&path, &device))
            .into_py_lens()?;
        Ok(PyTunedLens {
            inner,
            history: Vec::new(),
        })
    }

    /// Writes ``config.json`` and ``params.safetensors`` into the folder ``path`` (created
    /// if needed), the format of ``lens train``; :meth:`load` reads it back.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).into_py_lens()
    }

    /// Writes the lens in tuned-lens's format into the folder ``path``: ``config.json`` and
    /// ``params.pt`` (``torch.save`` of an ordered dict ``{i}.weight`` / ``{i}.bias``,
    /// float32), loadable with ``tuned_lens.TunedLens.from_model_and_pretrained(model,
    /// path)``. Needs PyTorch (``ImportError`` without it). Our unembedding fingerprint is
    /// left out of ``config.json`` (``unembed_hash: null``): tuned-lens computes its own
    /// and would warn about a mismatch.
    fn export_reference(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let torch = py.import("torch").map_err(|e| {
            if e.is_instance_of::<PyImportError>(py) {
                PyImportError::new_err(format!(
                    "export_reference needs PyTorch to write params.pt, and importing torch failed ({e}); install it (pip install torch), or use save(), this package's format, which needs no PyTorch"
                ))
            } else {
                e
            }
        })?;
        let mut config = self.inner.config.clone();
        if config
            .unembed_hash
            .as_deref()
            .is_some_and(|h| h.starts_with(lens::UNEMBED_HASH_PREFIX))
        {
            config.unembed_hash = None;
        }
        std::fs::create_dir_all(&path).map_err(|e| to_py_err(hooks::Error::io(&path, e)))?;
        let state = py.import("collections")?.getattr("OrderedDict")?.call0()?;
        for (name, array) in self.state_dict(py)?.iter() {
            state.set_item(name, torch.call_method1("from_numpy", (array,))?)?;
        }
        let json =
            serde_json::to_string(&config).map_err(|e| PyValueError::new_err(e.to_string()))?;
        // Both files staged, then put in place: a kill leaves the old pair or the new one.
        let (params_path, config_path) = (path.join("params.pt"), path.join("config.json"));
        for file in [&params_path, &config_path] {
            hooks::atomic::remove_abandoned_temp_files_of(file);
        }
        let mut save_error = None;
        let params = hooks::atomic::stage_by_path(&params_path, |tmp| {
            torch.call_method1("save", (&state, tmp)).map_err(|e| {
                let message = e.to_string();
                save_error = Some(e);
                std::io::Error::other(message)
            })?;
            Ok(())
        });
        if let Some(error) = save_error {
            return Err(error);
        }
        let params = params.map_err(to_py_err)?;
        let config = hooks::atomic::stage_with(&config_path, |w| {
            std::io::Write::write_all(w, json.as_bytes())
        })
        .map_err(to_py_err)?;
        params.commit().map_err(to_py_err)?;
        config.commit().map_err(to_py_err)
    }

    /// Lens logits of ``hidden`` (float32 ``[..., d_model]``, the residual stream entering
    /// layer ``layer``: ``hidden_states[layer]``) decoded with ``model``'s final norm and
    /// unembedding: float32 ``[..., vocab]``. Raises ``ValueError`` for a layer out of range,
    /// a wrong width, or a model the lens does not fit.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: i64,
        model: PyRef<'py, PyModel>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = layer_arg(layer, self.inner.num_layers())?;
        let host = hidden_arg(hidden, self.inner.config.d_model)?;
        self.check_fits(&model)?;
        let lens = &self.inner;
        let model = model.inner();
        let out = py
            .detach(|| -> lens::Result<HostArray> {
                let device = lens.parameters()[0].device().clone();
                let h = Tensor::from_vec(host.data, host.dims, &device)?;
                let t = lens.transform(&h, layer)?;
                Ok(decode(model, &t)?)
            })
            .into_py_lens()?;
        Ok(out.into_numpy(py)?.into_any())
    }

    /// Same as :meth:`forward`.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: i64,
        model: PyRef<'py, PyModel>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, hidden, layer, model)
    }

    /// The translated hidden states ``h + h @ W.T + b`` for translator ``layer``: float32,
    /// same shape as ``hidden``.
    fn transform_hidden<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: i64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let layer = layer_arg(layer, self.inner.num_layers())?;
        let host = hidden_arg(hidden, self.inner.config.d_model)?;
        let lens = &self.inner;
        let out = py
            .detach(|| -> lens::Result<HostArray> {
                let device = lens.parameters()[0].device().clone();
                let h = Tensor::from_vec(host.data, host.dims, &device)?;
                Ok(HostArray::from_tensor(&lens.transform(&h, layer)?)?)
            })
            .into_py_lens()?;
        Ok(out.into_numpy(py)?.into_any())
    }

    /// Raises ``ValueError`` unless the lens fits ``model`` (width, layer count, and for
    /// lenses trained here the unembedding's fingerprint).
    fn check_model(&self, model: PyRef<'_, PyModel>) -> PyResult<()> {
        self.check_fits(&model)
    }

    /// The parameters as float32 arrays keyed like tuned-lens's ``layer_translators``
    /// state dict: ``"{i}.weight"`` (``[d, d]``) and ``"{i}.bias"`` (``[d]``).
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let params = py
            .detach(|| {
                self.inner
                    .parameters()
                    .iter()
                    .map(HostArray::from_tensor)
                    .collect::<hooks::Result<Vec<_>>>()
            })
            .into_py_result()?;
        let dict = PyDict::new(py);
        for (i, host) in params.into_iter().enumerate() {
            let name = format!("{}.{}", i / 2, if i % 2 == 0 { "weight" } else { "bias" });
            dict.set_item(name, host.into_numpy(py)?)?;
        }
        Ok(dict)
    }

    /// ``config.json`` as a dict: ``base_model_name_or_path``, ``base_model_revision``,
    /// ``d_model``, ``num_hidden_layers``, ``bias``, ``unembed_hash``, ``lens_type``.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(&self.inner.config)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        json_to_py(py, &value)
    }

    /// Number of translators (the model's layer count).
    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// Residual width.
    #[getter]
    fn d_model(&self) -> usize {
        self.inner.config.d_model
    }

    /// Training history of a lens from :meth:`train`: one dict per step (``step``,
    /// ``loss``: mean loss per layer in nats, ``grad_norm`` before clipping, ``lr``),
    /// including steps resumed from a checkpoint; empty for other lenses.
    #[getter]
    fn history<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for record in &self.history {
            list.append(step_dict(py, record)?)?;
        }
        Ok(list)
    }

    fn __len__(&self) -> usize {
        self.inner.num_layers()
    }

    fn __repr__(&self) -> String {
        let c = &self.inner.config;
        format!(
            "TunedLens(model='{}', d_model={}, num_layers={})",
            c.base_model_name_or_path, c.d_model, c.num_hidden_layers
        )
    }

    /// Trains a tuned lens for ``model`` with the reference recipe (tuned-lens's defaults:
    /// forward KL to the model's output, SGD with Nesterov momentum 0.9 at ``lr`` 1.0 in
    /// tuned-lens's convention, weight decay 1e-3, gradient-norm clip 1.0, linear decay over
    /// ``steps`` of ``tokens_per_step`` tokens) and returns it, with :attr:`history`.
    ///
    /// The activations come from ``data`` (a path or list of paths, read as by
    /// :func:`cache_activations`: packed into sequences of ``seq_len`` tokens, 2048 by
    /// default, ``batch_size`` per forward pass; each sequence drawn at random with ``seed``
    /// from the next ``shuffle_sequences``, 1 for data order) or from ``activations``, a
    /// cache folder with ``embed`` and every ``layers.{i}`` (``seq_len`` defaults to the
    /// cache's; rows shuffled with ``seed``; read in order for ``loss="ce"``, whose
    /// next-token targets need whole sequences). ``optimizer`` is ``"sgd"``,
    /// ``"adam"`` (AMSGrad) or ``"muon"`` (Muon on the translators' matrices and AdamW on
    /// their biases at ``0.01 x lr``, tuned-lens's PR #141); ``weight_decay`` defaults to
    /// 1e-3 (coupled), or 1e-2 (decoupled) with Muon; ``loss`` is ``"kl"`` or ``"ce"`` (next token); ``chunk_tokens`` tokens
    /// are decoded at once (memory is about 5 x that x vocab floats). ``decode_dtype`` is the
    /// precision of the lens logits and of the gradient back through them: ``"bf16"`` (bf16
    /// inputs, f32 sums, as tuned-lens's autocast), ``"f32"``, or ``"auto"`` (bf16 on a CUDA
    /// GPU and on a CPU whose bf16 products outrun its f32 ones: Intel AMX, AMD's AVX-512
    /// BF16; f32 elsewhere); translators and optimiser state
    /// are f32.
    ///
    /// With ``output``, the lens is saved there at the end (as by ``lens train --output``)
    /// and a checkpoint is kept in ``output/training`` every ``checkpoint_every`` steps:
    /// calling ``train`` again with the same arguments resumes from it (so does the ``lens
    /// train`` command).
    ///
    /// ``callback(record)`` is called after every step with the step's dict (see
    /// :attr:`history`). Raising from it, or Ctrl-C, stops training before the next step
    /// and the exception propagates; with ``output``, the last checkpoint is kept. The GIL
    /// is released while steps run. ``progress=True`` draws a progress bar on a terminal.
    #[staticmethod]
    #[pyo3(signature = (
        model, data = None, *, activations = None, output = None, steps = 250,
        tokens_per_step = 262144, lr = 1.0, optimizer = "sgd", loss = "kl", seq_len = None,
        batch_size = 1, chunk_tokens = 512, seed = 42, checkpoint_every = 25, momentum = 0.9,
        weight_decay = None, clip = 1.0, format = None, text_field = "text", progress = false,
        callback = None, decode_dtype = "auto", shuffle_sequences = 1024
    ))]
    #[allow(clippy::too_many_arguments)]
    fn train<'py>(
        py: Python<'py>,
        model: &Bound<'py, PyAny>,
        data: Option<&Bound<'py, PyAny>>,
        activations: Option<PathBuf>,
        output: Option<PathBuf>,
        steps: u64,
        tokens_per_step: usize,
        lr: f64,
        optimizer: &str,
        loss: &str,
        seq_len: Option<usize>,
        batch_size: usize,
        chunk_tokens: usize,
        seed: u64,
        checkpoint_every: u64,
        momentum: f64,
        weight_decay: Option<f64>,
        clip: f64,
        format: Option<String>,
        text_field: &str,
        progress: bool,
        callback: Option<&Bound<'py, PyAny>>,
        decode_dtype: &str,
        shuffle_sequences: usize,
    ) -> PyResult<Self> {
        let holder = model_arg(py, model)?;
        let model = holder.get().inner();
        let optimizer =
            OptimizerKind::parse(optimizer).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let mut source_args =
            SourceArgs::new(data, activations, format, text_field, seq_len, batch_size)?;
        source_args.0.shuffle_sequences = shuffle_sequences;
        let options = TrainOptions {
            steps,
            tokens_per_step,
            lr,
            optimizer,
            momentum,
            weight_decay: weight_decay.unwrap_or(optimizer.default_weight_decay()),
            clip,
            loss: match loss {
                "kl" => LossKind::Kl,
                "ce" => LossKind::Ce,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown loss '{other}' (expected 'kl' or 'ce')"
                    )))
                }
            },
            seq_len: source_args.0.seq_len,
            chunk_tokens,
            checkpoint_every,
            decode_dtype: DecodeDtype::parse(decode_dtype)
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        };
        if steps == 0 || tokens_per_step == 0 || chunk_tokens == 0 || batch_size == 0 {
            return Err(PyValueError::new_err(
                "steps, tokens_per_step, chunk_tokens and batch_size must be positive",
            ));
        }
        let needed = options.total_tokens();
        let order = source_args.0.training_order(options.loss, seed);
        let callback: Option<Py<PyAny>> = callback.map(|c| c.clone().unbind());

        let (result, stopped) = py.detach(|| {
            let stopped: RefCell<Option<PyErr>> = RefCell::new(None);
            let result = (|| -> lens::Result<(TunedLens, Vec<StepRecord>)> {
                let mut source = source_args.0.open(model, order, Some(needed))?;
                let mut lens = TunedLens::for_model(model)?;
                let ckpt = output.as_deref().map(prepare_output).transpose()?;
                let bar = hooks::progress::bar(progress, Some(steps), "steps");
                let history = train(
                    &mut lens,
                    &model.unembedding(),
                    source.as_mut(),
                    &options,
                    ckpt.as_deref(),
                    |record| {
                        bar.set_position(record.step);
                        let outcome = Python::attach(|py| -> PyResult<()> {
                            py.check_signals()?;
                            if let Some(callback) = &callback {
                                callback.bind(py).call1((step_dict(py, record)?,))?;
                            }
                            Ok(())
                        });
                        outcome.map_err(|error| {
                            *stopped.borrow_mut() = Some(error);
                            lens::Error::Training("stopped from Python".into())
                        })
                    },
                )?;
                bar.finish_and_clear();
                if stopped.borrow().is_none() {
                    if let (Some(out), Some(dir)) = (&output, &ckpt) {
                        lens.save(out)?;
                        hooks::atomic::write_json(&dir.join("history.json"), &history)?;
                    }
                }
                Ok((lens, history))
            })();
            (result, stopped.into_inner())
        });
        if let Some(error) = stopped {
            return Err(error);
        }
        let (inner, history) = result.into_py_lens()?;
        Ok(PyTunedLens { inner, history })
    }
}

/// A step record as a dict.
fn step_dict<'py>(py: Python<'py>, record: &StepRecord) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("step", record.step)?;
    dict.set_item("loss", record.loss.clone())?;
    dict.set_item("grad_norm", record.grad_norm)?;
    dict.set_item("lr", record.lr)?;
    Ok(dict)
}

/// Where a lens's activations come from, checked as Python arguments.
struct SourceArgs(LensData);

impl SourceArgs {
    fn new(
        data: Option<&Bound<'_, PyAny>>,
        activations: Option<PathBuf>,
        format: Option<String>,
        text_field: &str,
        seq_len: Option<usize>,
        batch_size: usize,
    ) -> PyResult<Self> {
        let data = match data {
            Some(d) if !d.is_none() => paths_of(d)?,
            _ => Vec::new(),
        };
        match (data.is_empty(), activations.is_some()) {
            (true, false) => {
                return Err(PyTypeError::new_err(
                    "give data (text / token files) or activations (a cache folder)",
                ))
            }
            (false, true) => {
                return Err(PyTypeError::new_err(
                    "give either data or activations, not both",
                ))
            }
            _ => {}
        }
        let seq_len = match seq_len {
            Some(seq_len) => seq_len,
            None => lens::default_seq_len(activations.as_deref()).into_py_lens()?,
        };
        if seq_len == 0 || batch_size == 0 {
            return Err(PyValueError::new_err(
                "seq_len and batch_size must be positive",
            ));
        }
        Ok(SourceArgs(LensData {
            data,
            activations,
            format,
            text_field: text_field.to_string(),
            seq_len,
            batch_size,
            shuffle_sequences: hooks::data::SHUFFLED_SEQUENCES,
        }))
    }
}

/// An activation source that fails when Ctrl-C was pressed, checked before every batch, so
/// a long evaluation can be interrupted.
struct Interruptible<'a, 'm> {
    inner: Box<dyn ActivationSource + Send + 'm>,
    stopped: &'a RefCell<Option<PyErr>>,
}

impl ActivationSource for Interruptible<'_, '_> {
    fn hook_points(&self) -> &[HookPoint] {
        self.inner.hook_points()
    }

    fn next_batch(&mut self) -> hooks::Result<Option<ActivationBatch>> {
        if let Err(error) = Python::attach(|py| py.check_signals()) {
            *self.stopped.borrow_mut() = Some(error);
            return Err(hooks::Error::InvalidArgument("stopped from Python".into()));
        }
        self.inner.next_batch()
    }

    fn skip_tokens(&mut self, tokens: u64) -> hooks::Result<u64> {
        self.inner.skip_tokens(tokens)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Decodes residual-stream vectors with a model's final norm and unembedding: the logit
/// lens (nostalgebraist 2020). ``LogitLens(model)``; ``forward(hidden, layer=None)`` (the
/// layer is accepted for tuned-lens compatibility and ignored) returns float32
/// ``[..., vocab]`` logits, computed as the model computes its own (its dtype and device):
/// the last layer's output gives the model's logits bit for bit.
#[pyclass(name = "LogitLens", module = "eleuther_interp", frozen)]
pub struct PyLogitLens {
    model: Py<PyModel>,
}

#[pymethods]
impl PyLogitLens {
    #[new]
    fn new(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(PyLogitLens {
            model: model_arg(py, model)?.unbind(),
        })
    }

    /// Same as ``LogitLens(model)`` (tuned-lens's spelling).
    #[staticmethod]
    fn from_model(py: Python<'_>, model: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::new(py, model)
    }

    /// Logits of ``hidden`` (float32 ``[..., d_model]``): float32 ``[..., vocab]``.
    #[pyo3(signature = (hidden, layer = None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = layer;
        let model = self.model.get().inner();
        let host = hidden_arg(hidden, model.config().hidden_size())?;
        let out = py
            .detach(|| -> hooks::Result<HostArray> {
                let h = Tensor::from_vec(host.data, host.dims, &Device::Cpu)?;
                decode(model, &h)
            })
            .into_py_result()?;
        Ok(out.into_numpy(py)?.into_any())
    }

    /// Same as :meth:`forward`.
    #[pyo3(signature = (hidden, layer = None))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.forward(py, hidden, layer)
    }

    /// The identity (tuned-lens's ``LogitLens.transform_hidden``): a float32 copy.
    #[pyo3(signature = (hidden, layer = None))]
    fn transform_hidden<'py>(
        &self,
        py: Python<'py>,
        hidden: &Bound<'py, PyAny>,
        layer: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = layer;
        let d = self.model.get().inner().config().hidden_size();
        Ok(hidden_arg(hidden, d)?.into_numpy(py)?.into_any())
    }

    /// The model it decodes with.
    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyModel> {
        self.model.clone_ref(py)
    }

    fn __repr__(&self) -> String {
        format!("LogitLens(model='{}')", self.model.get().inner().origin())
    }
}

/// Evaluates the logit lens, and ``lens`` (a :class:`TunedLens`) if given, on ``model``
/// per layer, as ``lens eval`` does: next-token cross-entropy (``ce``), entropy of the
/// lens's distribution, ``kl`` (KL from the model's output distribution to the lens's) and
/// ``top1_agreement`` with the model's top token, averaged over ``tokens`` tokens, in nats.
///
/// The activations come from ``data`` (paths, packed into ``seq_len``-token sequences,
/// 2048 by default, ``batch_size`` per forward pass) or ``activations`` (a cache folder with
/// ``embed`` and every ``layers.{i}``, read in order, in the cache's sequences). Returns the report as a dict (the JSON of ``lens
/// eval --json``): ``tokens``; ``nats_to_bits_per_byte`` (multiply nats by it for bits per
/// byte of the text: tokens read / text bytes / ln 2; None for a cache); ``logit_lens`` and
/// ``tuned_lens`` (None without a lens): lists with one dict per layer (``layer``: ``"0"``
/// .. ``"L-1"``, the input of that layer) plus a last ``"output"`` row (the model itself);
/// ``logit_lens_depth`` and ``tuned_lens_depth`` (None without a lens): the prediction
/// depths, ``{"mean", "counts"}`` with ``counts[l]`` the tokens whose lens top-1 is the
/// model's from layer ``l`` on (``counts[L]``: only at the output); and ``table``, the text
/// ``lens eval`` prints. ``ValueError`` if the lens does not fit the model. Ctrl-C stops
/// between batches.
#[pyfunction]
#[pyo3(signature = (
    model, lens = None, data = None, *, activations = None, tokens = 262144, seq_len = None,
    batch_size = 1, chunk_tokens = 512, format = None, text_field = "text"
))]
#[allow(clippy::too_many_arguments)]
pub fn evaluate_lens<'py>(
    py: Python<'py>,
    model: &Bound<'py, PyAny>,
    lens: Option<PyRef<'py, PyTunedLens>>,
    data: Option<&Bound<'py, PyAny>>,
    activations: Option<PathBuf>,
    tokens: u64,
    seq_len: Option<usize>,
    batch_size: usize,
    chunk_tokens: usize,
    format: Option<String>,
    text_field: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let holder = model_arg(py, model)?;
    let py_model = holder.get();
    let model = py_model.inner();
    if let Some(lens) = &lens {
        lens.check_fits(py_model)?;
    }
    let source_args = SourceArgs::new(data, activations, format, text_field, seq_len, batch_size)?;
    let seq_len = source_args.0.seq_len;
    if tokens < seq_len as u64 {
        return Err(PyValueError::new_err(format!(
            "tokens {tokens} is less than one sequence of seq_len {seq_len}"
        )));
    }
    if chunk_tokens == 0 {
        return Err(PyValueError::new_err("chunk_tokens must be positive"));
    }
    let tuned = lens.as_ref().map(|l| &l.inner);
    let (result, stopped) = py.detach(|| {
        let stopped: RefCell<Option<PyErr>> = RefCell::new(None);
        let result = (|| -> lens::Result<EvalReport> {
            let data = &source_args.0;
            let inner = data.open(model, ReadOrder::Sequential, Some(tokens))?;
            let mut source = Interruptible {
                inner,
                stopped: &stopped,
            };
            let layers = model.config().num_layers();
            let mut report = evaluate(
                tuned,
                &model.unembedding(),
                layers,
                &mut source,
                seq_len,
                tokens,
                chunk_tokens,
            )?;
            report.nats_to_bits_per_byte = data.nats_to_bits_per_byte(model, report.tokens)?;
            Ok(report)
        })();
        (result, stopped.into_inner())
    });
    if let Some(error) = stopped {
        return Err(error);
    }
    let report = result.into_py_lens()?;
    let value = serde_json::to_value(&report).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let dict = json_to_py(py, &value)?.cast_into::<PyDict>()?;
    dict.set_item("table", report.table())?;
    Ok(dict)
}

/// Runs the ``lens`` command line in this process (``argv`` with the program name first);
/// see :func:`eleuther_interp.lens_main`.
#[pyfunction]
pub fn run_lens_cli(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    crate::run_command(py, argv, lens::cli::run)
}

/// A prediction trajectory (tuned-lens's ``PredictionTrajectory``): what a lens predicts at
/// every layer (rows, ``layers``: ``"0"`` = the embedding, ..., ``"output"`` = the model
/// itself) and every token position of one text (columns), kept as statistics per cell.
///
/// Build one with :meth:`from_lens_and_model` (the logit lens when ``lens`` is None or a
/// :class:`LogitLens`, else a :class:`TunedLens`) or :meth:`load` (a JSON file written by
/// :meth:`save_json` or ``lens plot trajectory --json``). The statistic methods return
/// float32 arrays ``[layers, positions]`` in nats (``max_probability``: a probability;
/// ``rank``: 1 = top), NaN where undefined (the next-token statistics at the last
/// position). :meth:`plot` draws the figure as PNG or SVG.
#[pyclass(name = "PredictionTrajectory", module = "eleuther_interp", frozen)]
pub struct PyPredictionTrajectory {
    inner: PredictionTrajectory,
}

impl PyPredictionTrajectory {
    fn array<'py>(&self, py: Python<'py>, statistic: Statistic) -> PyResult<Bound<'py, PyAny>> {
        values_array(py, &self.inner.values(statistic))
    }
}

/// `[rows][cols]` of optional values as a float32 array with NaN for `None`.
fn values_array<'py>(py: Python<'py>, values: &[Vec<Option<f64>>]) -> PyResult<Bound<'py, PyAny>> {
    let rows = values.len();
    let cols = values.first().map_or(0, Vec::len);
    let data = values
        .iter()
        .flatten()
        .map(|v| v.map_or(f32::NAN, |x| x as f32))
        .collect();
    Ok(HostArray {
        data,
        dims: vec![rows, cols],
    }
    .into_numpy(py)?
    .into_any())
}

fn statistic_arg(name: &str) -> PyResult<Statistic> {
    Statistic::parse(name).map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pymethods]
impl PyPredictionTrajectory {
    /// Runs ``model`` over ``input_ids`` (a 1-D list / array of token ids, or a string,
    /// tokenized with the model's tokenizer) once and decodes every layer with ``lens``
    /// (None or a :class:`LogitLens`: the logit lens; a :class:`TunedLens`), keeping the
    /// ``top_k`` most likely tokens per cell. ``ValueError`` for a lens that does not fit.
    #[staticmethod]
    #[pyo3(signature = (lens, model, input_ids, top_k = 5))]
    fn from_lens_and_model(
        py: Python<'_>,
        lens: Option<&Bound<'_, PyAny>>,
        model: &Bound<'_, PyAny>,
        input_ids: &Bound<'_, PyAny>,
        top_k: usize,
    ) -> PyResult<Self> {
        let holder = model_arg(py, model)?;
        let py_model = holder.get();
        let model = py_model.inner();
        let tuned = match lens {
            None => None,
            Some(l) if l.is_none() || l.cast::<PyLogitLens>().is_ok() => None,
            Some(l) => match l.cast::<PyTunedLens>() {
                Ok(t) => Some(t.clone()),
                Err(_) => {
                    return Err(PyTypeError::new_err(
                        "lens must be None, a LogitLens or a TunedLens",
                    ))
                }
            },
        };
        if let Some(t) = &tuned {
            t.get().check_fits(py_model)?;
        }
        let ids: Vec<u32> = if let Ok(text) = input_ids.extract::<String>() {
            model
                .tokenizer()
                .into_py_result()?
                .encode(&text)
                .into_py_result()?
        } else {
            let ids = crate::convert::token_ids(input_ids)?;
            if !ids.one_dim {
                return Err(PyValueError::new_err(
                    "input_ids must be one sequence (1-D); a trajectory covers one text",
                ));
            }
            let ids = model.prepare_ids(&ids.tensor).into_py_result()?;
            ids.flatten_all()
                .and_then(|t| t.to_vec1::<u32>())
                .map_err(|e| to_py_err(hooks::Error::from(e)))?
        };
        let lens_ref = tuned.as_ref().map(|t| &t.get().inner);
        let inner = py
            .detach(|| PredictionTrajectory::compute(model, lens_ref, &ids, top_k))
            .into_py_lens()?;
        Ok(PyPredictionTrajectory { inner })
    }

    /// Reads a trajectory from a JSON file (``save_json`` / ``lens plot trajectory --json``).
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        Ok(PyPredictionTrajectory {
            inner: PredictionTrajectory::read_json(&path).into_py_lens()?,
        })
    }

    /// Writes the trajectory as JSON (every cell's statistics and top tokens).
    fn save_json(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.write_json(&path)).into_py_lens()
    }

    /// Writes the trajectory as CSV, one row per cell.
    fn save_csv(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.write_csv(&path)).into_py_lens()
    }

    /// The CSV text (see :meth:`save_csv`).
    fn to_csv(&self) -> String {
        self.inner.to_csv()
    }

    /// Entropy of each cell's distribution (nats), ``[layers, positions]``.
    fn entropy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.array(py, Statistic::Entropy)
    }

    /// Cross-entropy against the next input token (nats); NaN at the last position.
    fn cross_entropy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.array(py, Statistic::CrossEntropy)
    }

    /// KL(model output || lens) (nats); 0 on the output row.
    fn forward_kl<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.array(py, Statistic::ForwardKl)
    }

    /// Probability of each cell's top token.
    fn max_probability<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.array(py, Statistic::MaxProbability)
    }

    /// Rank of the next input token (1 = top); NaN at the last position.
    fn rank<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.array(py, Statistic::Rank)
    }

    /// Per position, the prediction depth (int64 ``[positions]``): the first layer from
    /// which the lens's top-1 token is the model's at every later layer (the number of
    /// layers where even the last one's differs).
    fn prediction_depth<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
        let depths: Vec<i64> = self
            .inner
            .prediction_depths()
            .into_iter()
            .map(|d| d as i64)
            .collect();
        numpy::PyArray1::from_vec(py, depths).into_any()
    }

    /// A statistic by name (``entropy``, ``ce``, ``kl``, ``max_prob``, ``rank``), or with
    /// ``minus`` (another trajectory of the same tokens) the difference ``self - minus``.
    #[pyo3(signature = (name, minus = None))]
    fn statistic<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        minus: Option<PyRef<'py, PyPredictionTrajectory>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let statistic = statistic_arg(name)?;
        match minus {
            None => self.array(py, statistic),
            Some(other) => values_array(
                py,
                &self
                    .inner
                    .difference(&other.inner, statistic)
                    .into_py_lens()?,
            ),
        }
    }

    /// Draws the trajectory coloured by ``statistic`` to ``path`` (``.png`` or ``.svg``),
    /// each cell labelled with its top-1 token; with ``minus``, the difference ``self -
    /// minus`` on a diverging scale. Returns the figure's ``(width, height)`` in pixels.
    #[pyo3(signature = (path, statistic = "entropy", minus = None))]
    fn plot(
        &self,
        py: Python<'_>,
        path: PathBuf,
        statistic: &str,
        minus: Option<PyRef<'_, PyPredictionTrajectory>>,
    ) -> PyResult<(u32, u32)> {
        let statistic = statistic_arg(statistic)?;
        let view = match &minus {
            None => TrajectoryView::Single(&self.inner),
            Some(other) => TrajectoryView::Difference(&self.inner, &other.inner),
        };
        py.detach(|| plot_trajectory(&path, view, statistic))
            .into_py_lens()
    }

    /// Row labels, bottom to top: ``"0"`` .. ``"L-1"`` (the residual entering that layer),
    /// ``"output"``.
    #[getter]
    fn layers(&self) -> Vec<String> {
        self.inner.layers.clone()
    }

    /// The input tokens as shown (a leading space as ``␣``, newlines as ``\n``).
    #[getter]
    fn tokens(&self) -> Vec<String> {
        self.inner.tokens.clone()
    }

    /// The input token ids.
    #[getter]
    fn input_ids(&self) -> Vec<u32> {
        self.inner.input_ids.clone()
    }

    /// Each cell's top-1 token, ``[layers][positions]``.
    #[getter]
    fn top1(&self) -> Vec<Vec<String>> {
        self.inner
            .cells
            .iter()
            .map(|row| row.iter().map(|c| c.top_token().to_string()).collect())
            .collect()
    }

    /// Each cell's top-1 token id, ``[layers][positions]``.
    #[getter]
    fn top1_ids(&self) -> Vec<Vec<u32>> {
        self.inner
            .cells
            .iter()
            .map(|row| row.iter().map(|c| c.top_ids[0]).collect())
            .collect()
    }

    /// ``"logit lens"`` or ``"tuned lens"``.
    #[getter]
    fn lens(&self) -> String {
        self.inner.lens.clone()
    }

    /// The model it was computed on.
    #[getter]
    fn model(&self) -> String {
        self.inner.model.clone()
    }

    /// The model's revision, if any.
    #[getter]
    fn revision(&self) -> Option<String> {
        self.inner.revision.clone()
    }

    fn __repr__(&self) -> String {
        format!(
            "PredictionTrajectory({}, {} layers x {} tokens)",
            self.inner.description(),
            self.inner.layers.len(),
            self.inner.tokens.len()
        )
    }
}
