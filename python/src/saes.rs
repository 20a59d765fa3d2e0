//! The sae crate from Python: `Sae` (load / save sparsify's `cfg.json` + `sae.safetensors`
//! folders, encode, decode, forward, train on arrays), `SaeTrainer` (the `sae train` trainer
//! one batch at a time) and the `sae` command line.
//!
//! Activations cross as float32 numpy arrays `[N, d_in]`, latent indices as int64. The work
//! runs with the GIL released.

use std::path::PathBuf;
use std::sync::Mutex;

use hooks::candle_core::{DType, Device, Tensor};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::convert::{float_array, int64_array, json_to_py, HostArray};
use crate::errors::{to_py_err, IntoPyResult};

/// The Python exception for an SAE error: bad files, configs and arguments -> ValueError (a
/// missing file: FileNotFoundError); training that cannot go on and CUDA kernel failures ->
/// RuntimeError; runtime errors as everywhere else (see `errors`).
pub fn sae_err(error: sae::Error) -> PyErr {
    match error {
        sae::Error::Hooks(e) => to_py_err(e),
        sae::Error::Candle(e) => to_py_err(hooks::Error::from(e)),
        sae::Error::NotFound(m) => PyFileNotFoundError::new_err(m),
        sae::Error::Sae(m) => PyValueError::new_err(m),
        sae::Error::Training(m) | sae::Error::Cuda(m) => PyRuntimeError::new_err(m),
    }
}

trait IntoPySaeResult<T> {
    fn into_py_sae(self) -> PyResult<T>;
}

impl<T> IntoPySaeResult<T> for Result<T, sae::Error> {
    fn into_py_sae(self) -> PyResult<T> {
        self.map_err(sae_err)
    }
}

/// A float32 array `[N, d]` from Python as a CPU tensor.
fn rows_arg(obj: &Bound<'_, PyAny>, d: usize, what: &str) -> PyResult<Tensor> {
    let host = float_array(obj, &format!("{what} is"))?;
    if host.dims.len() != 2 || host.dims[1] != d {
        return Err(PyValueError::new_err(format!(
            "{what} must have shape [N, {d}], got shape {:?}",
            host.dims
        )));
    }
    Tensor::from_vec(host.data, (host.dims[0], d), &Device::Cpu).into_py_result()
}

/// Latent indices `[N, k]` from any integer array, checked against `num_latents`.
fn indices_arg(obj: &Bound<'_, PyAny>, num_latents: usize) -> PyResult<(Vec<u32>, Vec<usize>)> {
    let np = obj.py().import("numpy")?;
    let array = np.call_method1("asarray", (obj,))?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind != "i" && kind != "u" {
        return Err(PyValueError::new_err(format!(
            "top_indices must be integers, got an array of dtype {}",
            array.getattr("dtype")?.str()?
        )));
    }
    let out_of_range = |i: &dyn std::fmt::Display| {
        format!("latent index {i} is out of range: the SAE has {num_latents} latents")
    };
    let array = crate::convert::checked_int64(&array, |i, _| out_of_range(&i))?;
    let array: PyReadonlyArrayDyn<'_, i64> = array.extract()?;
    let dims = array.shape().to_vec();
    let mut out = Vec::with_capacity(array.len());
    for &i in array.as_array().iter() {
        if i < 0 || i as usize >= num_latents {
            return Err(PyValueError::new_err(out_of_range(&i)));
        }
        out.push(i as u32);
    }
    Ok((out, dims))
}

fn host(t: &Tensor) -> PyResult<HostArray> {
    HostArray::from_tensor(t).into_py_result()
}

fn indices_out<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let dims = t.dims().to_vec();
    let data: Vec<i64> = t
        .to_dtype(DType::I64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<i64>())
        .into_py_result()?;
    int64_array(py, data, &dims)
}

/// A TopK sparse autoencoder (Gao et al. 2024) in EleutherAI sparsify's format:
/// ``encode(x) = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))``, ``decode(a, i) = sum_j a_j
/// W_dec[i_j] + b_dec``.
///
/// Load one with :meth:`load` (a folder with ``cfg.json`` + ``sae.safetensors``, written by
/// sparsify or ``sae train``). Activations are float32 ``[N, d_in]`` arrays; latent indices
/// are int64.
#[pyclass(name = "Sae", module = "eleuther_interp", frozen)]
pub struct PySae {
    inner: sae::Sae,
}

#[pymethods]
impl PySae {
    /// Loads an SAE folder (``cfg.json`` + ``sae.safetensors``, sparsify's layout; for a
    /// ``sae train`` output pick the hook point's subfolder, e.g. ``saes/layers.3``), or a
    /// SAELens one (``cfg.json`` + ``sae_weights.safetensors``: topk, standard ReLU or
    /// jumprelu; a ReLU / JumpReLU SAE's codes are padded to the batch's most active row).
    /// ``device`` is where the parameters live (``"cpu"``, ``"cuda:0"``).
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let device = hooks::parse_device(device).into_py_result()?;
        let inner = py.detach(|| sae::Sae::load(&path, &device)).into_py_sae()?;
        Ok(PySae { inner })
    }

    /// Fetches an SAE from a hub repository in sparsify's layout into the shared Hugging Face
    /// cache and loads it: ``Sae.load_from_hub("EleutherAI/sae-pythia-70m-32k",
    /// "layers.3.mlp")``; ``hookpoint=None`` takes a repository of one SAE (its files at the
    /// top). ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply as for models. Unlike
    /// sparsify's, ``device`` and ``revision`` are keyword arguments.
    #[staticmethod]
    #[pyo3(signature = (repo_id, hookpoint = None, *, revision = "main", device = "cpu"))]
    fn load_from_hub(
        py: Python<'_>,
        repo_id: &str,
        hookpoint: Option<&str>,
        revision: &str,
        device: &str,
    ) -> PyResult<Self> {
        let device = hooks::parse_device(device).into_py_result()?;
        let inner = py
            .detach(|| {
                let dir = sae::hub::fetch_one(repo_id, revision, hookpoint)?;
                sae::Sae::load(&dir, &device)
            })
            .into_py_sae()?;
        Ok(PySae { inner })
    }

    /// Every SAE of a folder of ``<hookpoint>/`` SAE folders (``sae train``'s or sparsify's
    /// output) or of a hub repository of them (``owner/name`` where no such folder exists),
    /// as ``{hookpoint: Sae}`` in natural order (``layers.2`` before ``layers.10``, as
    /// sparsify's ``load_many``); ``hookpoints`` picks some (only those are downloaded;
    /// sparsify calls them ``layers``), ``revision`` is a hub repository's.
    #[staticmethod]
    #[pyo3(signature = (path, hookpoints = None, *, revision = None, device = "cpu"))]
    fn load_many<'py>(
        py: Python<'py>,
        path: PathBuf,
        hookpoints: Option<Vec<String>>,
        revision: Option<&str>,
        device: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let device = hooks::parse_device(device).into_py_result()?;
        let loaded = py
            .detach(|| {
                if hookpoints.as_ref().is_some_and(Vec::is_empty) {
                    return Err(sae::Error::Sae(
                        "hookpoints is empty: name some, or pass None for every SAE".into(),
                    ));
                }
                let root = sae::hub::sae_root(&path, revision, hookpoints.as_deref())?;
                let mut names = match hookpoints {
                    Some(names) => names,
                    None => sae::sae_folder_names(&root)?,
                };
                names.sort_by(|a, b| sae::natural_order(a, b));
                names
                    .into_iter()
                    .map(|name| Ok((sae::Sae::load(&root.join(&name), &device)?, name)))
                    .collect::<Result<Vec<_>, sae::Error>>()
            })
            .into_py_sae()?;
        let dict = PyDict::new(py);
        for (inner, name) in loaded {
            dict.set_item(name, PySae { inner })?;
        }
        Ok(dict)
    }

    /// Writes ``cfg.json`` and ``sae.safetensors`` into the folder ``path`` (created if
    /// needed), in sparsify's layout.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save(&path)).into_py_sae()
    }

    /// The config (``cfg.json``) as a dict.
    #[getter]
    fn cfg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(self.inner.config())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        json_to_py(py, &value)
    }

    /// Number of latents.
    #[getter]
    fn num_latents(&self) -> usize {
        self.inner.num_latents()
    }

    /// Input width.
    #[getter]
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }

    /// Active latents per token.
    #[getter]
    fn k(&self) -> usize {
        self.inner.k()
    }

    /// The ``k`` most active latents of each row of ``x`` (``[N, d_in]``):
    /// ``(top_acts float32 [N, k], top_indices int64 [N, k])``, largest first.
    fn encode<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyTuple>> {
        let x = rows_arg(x, self.inner.d_in(), "x")?;
        let (acts, indices) = py
            .detach(|| -> Result<_, sae::Error> {
                let x = x.to_device(self.inner.w_enc().device())?;
                self.inner.encode(&x)
            })
            .into_py_sae()?;
        let acts = host(&acts)?.into_numpy(py)?.into_any();
        let indices = indices_out(py, &indices)?;
        PyTuple::new(py, [acts, indices])
    }

    /// ``sum_j top_acts[:, j] * W_dec[top_indices[:, j]] + b_dec``: ``[N, d_in]`` float32
    /// (without the skip connection, like sparsify's ``decode``).
    fn decode<'py>(
        &self,
        py: Python<'py>,
        top_acts: &Bound<'py, PyAny>,
        top_indices: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let acts = float_array(top_acts, "top_acts is")?;
        let (indices, dims) = indices_arg(top_indices, self.inner.num_latents())?;
        if acts.dims.len() != 2 || acts.dims != dims {
            return Err(PyValueError::new_err(format!(
                "top_acts and top_indices must both have shape [N, k], got {:?} and {dims:?}",
                acts.dims
            )));
        }
        let out = py
            .detach(|| -> Result<_, sae::Error> {
                let device = self.inner.w_dec().device();
                let shape = (dims[0], dims[1]);
                let acts = Tensor::from_vec(acts.data, shape, device)?;
                let indices = Tensor::from_vec(indices, shape, device)?;
                let x_hat = self.inner.decode(&acts, &indices)?;
                Ok(HostArray::from_tensor(&x_hat)?)
            })
            .into_py_sae()?;
        Ok(out.into_numpy(py)?.into_any())
    }

    /// Encodes and decodes ``x`` (``[N, d_in]``): a dict with ``x_hat`` (``[N, d_in]``, with
    /// the skip connection if any), ``top_acts``, ``top_indices`` and ``fvu`` (the fraction
    /// of variance unexplained over the batch, as sparsify computes it) of ``x_hat`` against
    /// ``y`` (``[N, d_in]``; default ``x``). A transcoder's target is the module's output:
    /// ``forward(mlp_input, mlp_output)``, as sparsify's ``forward(x, y)``.
    #[pyo3(signature = (x, y = None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let x = rows_arg(x, self.inner.d_in(), "x")?;
        let y = y.map(|y| rows_arg(y, self.inner.d_in(), "y")).transpose()?;
        let out = py
            .detach(|| -> Result<_, sae::Error> {
                let device = self.inner.w_enc().device();
                let x = x.to_device(device)?;
                match &y {
                    Some(y) => self.inner.forward_target(&x, &y.to_device(device)?),
                    None => self.inner.forward(&x),
                }
            })
            .into_py_sae()?;
        let dict = PyDict::new(py);
        dict.set_item("x_hat", host(&out.x_hat)?.into_numpy(py)?)?;
        dict.set_item("top_acts", host(&out.top_acts)?.into_numpy(py)?)?;
        dict.set_item("top_indices", indices_out(py, &out.top_indices)?)?;
        dict.set_item("fvu", out.fvu)?;
        Ok(dict)
    }

    /// Trains a new SAE with sparsify's recipe (the ``sae train`` trainer, same seed -> same
    /// SAE; ``sae train --seed S`` seeds its i-th hook point's SAE with ``S + i``) on the rows of ``x`` (``[N, d_in]``, used in order; a transcoder also takes its
    /// targets ``y``), ``batch_size`` rows per step, for ``steps`` steps (default: as many
    /// whole batches as ``x`` holds), and returns it. The other arguments are those of
    /// :class:`SaeTrainer`; ``callback(record)`` sees each step's record. Bad arguments
    /// (wrong shapes, NaN, ``k`` larger than the number of latents) raise ``ValueError``.
    #[staticmethod]
    #[pyo3(signature = (x, y = None, *, batch_size = 65536, steps = None, k = 32,
        num_latents = None, expansion_factor = 32, multi_topk = false, transcode = false,
        skip_connection = false, seed = 42, lr = None, lr_warmup_steps = 1000, auxk_alpha = 0.0,
        dead_feature_threshold = 10_000_000, chunk_tokens = 4096, device = "cpu",
        encoder_dtype = "auto", optimizer = "adam", k_decay_steps = 0, callback = None))]
    #[allow(clippy::too_many_arguments)]
    fn train<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: Option<&Bound<'py, PyAny>>,
        batch_size: usize,
        steps: Option<u64>,
        k: usize,
        num_latents: Option<usize>,
        expansion_factor: usize,
        multi_topk: bool,
        transcode: bool,
        skip_connection: bool,
        seed: u64,
        lr: Option<f64>,
        lr_warmup_steps: u64,
        auxk_alpha: f64,
        dead_feature_threshold: u64,
        chunk_tokens: usize,
        device: &str,
        encoder_dtype: &str,
        optimizer: &str,
        k_decay_steps: u64,
        callback: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Self> {
        let x = py.import("numpy")?.call_method1("asarray", (x,))?;
        let shape: Vec<usize> = x.getattr("shape")?.extract()?;
        let [rows, d_in] = shape[..] else {
            return Err(PyValueError::new_err(format!(
                "x must have shape [N, d_in], got shape {shape:?}"
            )));
        };
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be positive"));
        }
        let steps = steps.unwrap_or((rows / batch_size) as u64);
        if steps == 0 {
            return Err(PyValueError::new_err(format!(
                "x has {rows} rows: not enough for one step of {batch_size} rows"
            )));
        }
        let new_sae = NewSae {
            k: Some(k),
            num_latents,
            expansion_factor: Some(expansion_factor),
            multi_topk: Some(multi_topk),
            transcode: Some(transcode),
            skip_connection: Some(skip_connection),
            seed: Some(seed),
        };
        let trainer = PySaeTrainer::create(
            new_sae.build(d_in, device)?,
            false,
            steps,
            lr,
            lr_warmup_steps,
            auxk_alpha,
            dead_feature_threshold,
            chunk_tokens,
            encoder_dtype,
            optimizer,
            k_decay_steps,
        )?;
        trainer.fit(py, &x, y, batch_size, Some(steps), callback)?;
        let inner = trainer.sae(py)?.inner;
        Ok(PySae { inner })
    }

    fn __repr__(&self) -> String {
        format!(
            "Sae(d_in={}, num_latents={}, k={})",
            self.inner.d_in(),
            self.inner.num_latents(),
            self.inner.k()
        )
    }
}

/// Runs the ``sae`` command line in this process (``argv`` with the program name first);
/// see :func:`eleuther_interp.sae_main`.
#[pyfunction]
pub fn run_sae_cli(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    crate::run_command(py, argv, sae::cli::run)
}

/// What a new SAE looks like (`SaeTrainer(d_in, ...)`, `Sae.train`); `None` leaves
/// sparsify's default (k 32, expansion factor 32, seed 42).
struct NewSae {
    k: Option<usize>,
    num_latents: Option<usize>,
    expansion_factor: Option<usize>,
    multi_topk: Option<bool>,
    transcode: Option<bool>,
    skip_connection: Option<bool>,
    seed: Option<u64>,
}

impl NewSae {
    fn given(&self) -> bool {
        self.k.is_some()
            || self.num_latents.is_some()
            || self.expansion_factor.is_some()
            || self.multi_topk.is_some()
            || self.transcode.is_some()
            || self.skip_connection.is_some()
            || self.seed.is_some()
    }

    /// A freshly initialised SAE for `d_in`-wide activations on `device` (as `sae train`
    /// makes it).
    fn build(&self, d_in: usize, device: &str) -> PyResult<sae::Sae> {
        let device = hooks::parse_device(device).into_py_result()?;
        if self.num_latents == Some(0) {
            return Err(PyValueError::new_err(
                "num_latents must be positive; leave it out (None) to get d_in x expansion_factor",
            ));
        }
        let mut config =
            sae::SaeConfig::new(d_in, self.num_latents.unwrap_or(0), self.k.unwrap_or(32));
        config.expansion_factor = self.expansion_factor.unwrap_or(config.expansion_factor);
        config.multi_topk = self.multi_topk.unwrap_or(false);
        config.transcode = self.transcode.unwrap_or(false);
        config.skip_connection = self.skip_connection.unwrap_or(false);
        sae::Sae::new(config, self.seed.unwrap_or(42), &device).into_py_sae()
    }
}

/// A step's record as a dict.
fn record_dict<'py>(py: Python<'py>, r: &sae::train::StepRecord) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("step", r.step)?;
    dict.set_item("fvu", r.fvu)?;
    dict.set_item("auxk_loss", r.auxk_loss)?;
    dict.set_item("multi_topk_fvu", r.multi_topk_fvu)?;
    dict.set_item("l0", r.l0)?;
    dict.set_item("dead_fraction", r.dead_fraction)?;
    dict.set_item("lr", r.lr)?;
    if let Some(matrix_lr) = r.matrix_lr {
        dict.set_item("matrix_lr", matrix_lr)?;
    }
    if let Some(k) = r.k {
        dict.set_item("k", k)?;
    }
    Ok(dict)
}

/// Trains a TopK SAE with sparsify's recipe (the ``sae train`` trainer) on activations you
/// pass as numpy arrays, one batch per :meth:`step`.
///
/// ``sae`` is an :class:`Sae` to train further, or the input width ``d_in`` of a new one,
/// initialised as ``sae train`` does from ``k`` (32), ``num_latents`` (default ``d_in x
/// expansion_factor``, 32), ``multi_topk``, ``transcode``, ``skip_connection`` (a linear
/// ``W_skip`` from input to output, trained with the rest) and ``seed`` (42); those describe
/// a new SAE only. ``steps`` is the planned number of steps (the learning rate warms up over
/// ``lr_warmup_steps``, sparsify's name, and decays linearly to 0 at ``steps``).
/// ``optimizer`` is ``"adam"`` or ``"muon"`` (sparsify's Muon recipe: Muon on the weight
/// matrices without warm-up, Adam on the biases); ``k_decay_steps`` decays the number of active latents from
/// ``min(num_latents, 10 d_in)`` to ``k`` over that many steps (0: off; records then carry
/// ``k``). ``lr`` defaults to ``2e-4 / sqrt(num_latents / 2**14)`` (Adam) or ``2e-3``
/// (Muon); ``auxk_alpha`` weighs the AuxK loss (0: off);
/// ``dead_feature_threshold`` is the number of tokens after which an unselected latent counts
/// as dead; ``chunk_tokens`` bounds memory (tokens encoded at once); ``device`` is where a
/// new SAE lives (an existing one stays where it is); ``encoder_dtype`` is the precision of
/// the encoder's dense product, ``"bf16"`` (bf16 inputs, f32 sums, as sparsify's autocast on
/// a GPU), ``"f32"``, or ``"auto"`` (bf16 on a CUDA GPU, f32 on the CPU). Bad arguments and
/// batches (wrong width, NaN or infinity) raise ``ValueError``; training that cannot go on
/// raises ``RuntimeError``.
///
/// One trainer may be shared between threads: a call waits (GIL released) while another
/// thread's step runs, so a monitoring thread can read ``steps_done`` or ``sae`` mid-training.
#[pyclass(name = "SaeTrainer", module = "eleuther_interp", frozen)]
pub struct PySaeTrainer {
    /// The input width, fixed for the trainer's life (checked without waiting for a step).
    d_in: usize,
    /// Whether the SAE is a transcoder (learns `y` from `x`), fixed too.
    transcode: bool,
    state: Mutex<Training>,
}

/// The SAE being trained and its trainer, changed together by each step.
struct Training {
    sae: sae::Sae,
    trainer: sae::train::Trainer,
}

impl PySaeTrainer {
    /// A trainer for `sae` with these options (refused options raise `ValueError`);
    /// `finetune` when it is already trained (its biases are kept).
    #[allow(clippy::too_many_arguments)]
    fn create(
        sae: sae::Sae,
        finetune: bool,
        steps: u64,
        lr: Option<f64>,
        lr_warmup_steps: u64,
        auxk_alpha: f64,
        dead_feature_threshold: u64,
        chunk_tokens: usize,
        encoder_dtype: &str,
        optimizer: &str,
        k_decay_steps: u64,
    ) -> PyResult<Self> {
        let bad = |e: sae::Error| PyValueError::new_err(e.to_string());
        let options = sae::train::TrainOptions {
            steps,
            // Read only by `train_many`, which gathers batches of this size; `step` takes
            // whatever batch it is given.
            tokens_per_step: chunk_tokens,
            chunk_tokens,
            lr,
            warmup_steps: lr_warmup_steps,
            dead_feature_threshold,
            auxk_alpha,
            checkpoint_every: 0,
            skip_first_positions: 0,
            encoder_dtype: sae::train::EncoderDtype::parse(encoder_dtype).map_err(bad)?,
            finetune,
            exclude_tokens: Vec::new(),
            optimizer: sae::train::SaeOptimizer::parse(optimizer).map_err(bad)?,
            k_decay_steps,
        };
        let trainer = sae::train::Trainer::new(&sae, options).map_err(|e| match e {
            // Options refused before any training: bad arguments.
            sae::Error::Training(m) => PyValueError::new_err(m),
            other => sae_err(other),
        })?;
        Ok(PySaeTrainer {
            d_in: sae.d_in(),
            transcode: sae.config().transcode,
            state: Mutex::new(Training { sae, trainer }),
        })
    }

    /// Runs `f` on the training state once no other thread holds it, with the GIL released
    /// while waiting and running (the thread holding the state may need the GIL to finish).
    fn with_state<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Training) -> R + Send,
    ) -> PyResult<R> {
        py.detach(|| match self.state.lock() {
            Ok(mut state) => Ok(f(&mut state)),
            Err(_) => Err(PyRuntimeError::new_err(
                "a step of this SaeTrainer panicked and may have left it half-updated: make a new one",
            )),
        })
    }

    /// The target of a batch: `y` for a transcoder, `x` itself otherwise.
    fn target(&self, x: &Tensor, y: Option<Tensor>) -> PyResult<Tensor> {
        match (self.transcode, y) {
            (true, Some(y)) => Ok(y),
            (true, None) => Err(PyValueError::new_err(
                "a transcoder learns y from x: give the module's output as y",
            )),
            (false, Some(_)) => Err(PyValueError::new_err(
                "y is only for transcoders (transcode=True); an SAE reconstructs x",
            )),
            (false, None) => Ok(x.clone()),
        }
    }
}

#[pymethods]
impl PySaeTrainer {
    #[new]
    #[pyo3(signature = (sae, *, steps, k = None, num_latents = None, expansion_factor = None,
        multi_topk = None, transcode = None, skip_connection = None, seed = None, lr = None,
        lr_warmup_steps = 1000,
        auxk_alpha = 0.0, dead_feature_threshold = 10_000_000, chunk_tokens = 4096,
        device = "cpu", encoder_dtype = "auto", optimizer = "adam", k_decay_steps = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        sae: &Bound<'_, PyAny>,
        steps: u64,
        k: Option<usize>,
        num_latents: Option<usize>,
        expansion_factor: Option<usize>,
        multi_topk: Option<bool>,
        transcode: Option<bool>,
        skip_connection: Option<bool>,
        seed: Option<u64>,
        lr: Option<f64>,
        lr_warmup_steps: u64,
        auxk_alpha: f64,
        dead_feature_threshold: u64,
        chunk_tokens: usize,
        device: &str,
        encoder_dtype: &str,
        optimizer: &str,
        k_decay_steps: u64,
    ) -> PyResult<Self> {
        let new_sae = NewSae {
            k,
            num_latents,
            expansion_factor,
            multi_topk,
            transcode,
            skip_connection,
            seed,
        };
        let (sae, finetune) = if let Ok(existing) = sae.cast::<PySae>() {
            if new_sae.given() {
                return Err(PyValueError::new_err(
                    "k, num_latents, expansion_factor, multi_topk, transcode, skip_connection and seed describe a new SAE: give them with d_in, not with an existing Sae",
                ));
            }
            (existing.get().inner.clone(), true)
        } else {
            let d_in: usize = sae.extract().map_err(|_| {
                PyValueError::new_err(
                    "SaeTrainer needs an Sae to train or the input width d_in (an int) of a new one",
                )
            })?;
            (new_sae.build(d_in, device)?, false)
        };
        Self::create(
            sae,
            finetune,
            steps,
            lr,
            lr_warmup_steps,
            auxk_alpha,
            dead_feature_threshold,
            chunk_tokens,
            encoder_dtype,
            optimizer,
            k_decay_steps,
        )
    }

    /// One optimiser step on the batch ``x`` (``[N, d_in]``; a transcoder also takes its
    /// target ``y``, ``[N, d_in]``): a dict with ``step``, ``fvu`` (of the batch, before the
    /// update), ``auxk_loss``, ``multi_topk_fvu``, ``l0``, ``dead_fraction`` and ``lr``. On the
    /// first step of a new SAE ``b_dec`` becomes the batch mean, as in sparsify (an existing
    /// :class:`Sae` keeps its biases, as with sparsify's ``--finetune``).
    #[pyo3(signature = (x, y = None))]
    fn step<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let x = rows_arg(x, self.d_in, "x")?;
        let y = y.map(|y| rows_arg(y, self.d_in, "y")).transpose()?;
        let target = self.target(&x, y)?;
        let record = self
            .with_state(py, |state| {
                state.trainer.step_to(&mut state.sae, &x, &target)
            })?
            .into_py_sae()?;
        record_dict(py, &record)
    }

    /// Steps over the rows of ``x`` (and ``y``) in order, ``batch_size`` rows per step, for
    /// ``steps`` steps (default: as many whole batches as ``x`` holds); ``callback(record)``
    /// is called after each. Returns the records (see :meth:`step`). Ctrl-C stops between
    /// steps.
    #[pyo3(signature = (x, y = None, *, batch_size, steps = None, callback = None))]
    fn fit<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        y: Option<&Bound<'py, PyAny>>,
        batch_size: usize,
        steps: Option<u64>,
        callback: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let x = rows_arg(x, self.d_in, "x")?;
        let y = y.map(|y| rows_arg(y, self.d_in, "y")).transpose()?;
        let target = self.target(&x, y)?;
        if target.dim(0).into_py_result()? != x.dim(0).into_py_result()? {
            return Err(PyValueError::new_err(format!(
                "x and y must have the same number of rows, got {} and {}",
                x.dim(0).into_py_result()?,
                target.dim(0).into_py_result()?
            )));
        }
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be positive"));
        }
        let rows = x.dim(0).into_py_result()?;
        let steps = steps.unwrap_or((rows / batch_size) as u64);
        let fits = (steps as usize)
            .checked_mul(batch_size)
            .is_some_and(|needed| needed <= rows);
        if steps == 0 || !fits {
            return Err(PyValueError::new_err(format!(
                "x has {rows} rows: not enough for {} of {batch_size} rows",
                if steps == 0 {
                    "one step".to_string()
                } else {
                    format!("{steps} steps")
                }
            )));
        }
        let mut records = Vec::with_capacity(steps as usize);
        for i in 0..steps as usize {
            let start = i * batch_size;
            // Held for the step only: the callback may use the trainer (save its SAE...).
            let record = self
                .with_state(py, |state| -> Result<_, sae::Error> {
                    let input = x.narrow(0, start, batch_size)?;
                    let target = target.narrow(0, start, batch_size)?;
                    state.trainer.step_to(&mut state.sae, &input, &target)
                })?
                .into_py_sae()?;
            let dict = record_dict(py, &record)?;
            if let Some(callback) = callback {
                callback.call1((dict.clone(),))?;
            }
            records.push(dict);
            py.check_signals()?;
        }
        Ok(records)
    }

    /// A copy of the SAE as trained so far.
    #[getter]
    fn sae(&self, py: Python<'_>) -> PyResult<PySae> {
        self.with_state(py, |state| PySae {
            inner: state.sae.clone(),
        })
    }

    /// Steps taken so far.
    #[getter]
    fn steps_done(&self, py: Python<'_>) -> PyResult<u64> {
        self.with_state(py, |state| state.trainer.steps_done())
    }

    /// Fraction of latents not selected for more than ``dead_feature_threshold`` tokens.
    #[getter]
    fn dead_fraction(&self, py: Python<'_>) -> PyResult<f64> {
        self.with_state(py, |state| state.trainer.dead_fraction())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        self.with_state(py, |state| {
            format!(
                "SaeTrainer(d_in={}, num_latents={}, k={}, steps_done={}/{})",
                state.sae.d_in(),
                state.sae.num_latents(),
                state.sae.k(),
                state.trainer.steps_done(),
                state.trainer.options().steps
            )
        })
    }
}
