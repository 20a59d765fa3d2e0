//! The sae crate from Python: `Sae` (load / save sparsify's `cfg.json` + `sae.safetensors`
//! folders, encode, decode, forward) and the `sae` command line.
//!
//! Activations cross as float32 numpy arrays `[N, d_in]`, latent indices as int64. The work
//! runs with the GIL released.

use std::path::PathBuf;

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
        sae::Error::Sae(m) if m.ends_with("no such file") => PyFileNotFoundError::new_err(m),
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
    let host = float_array(obj)?;
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
    let array = np.call_method1("ascontiguousarray", (array, "int64"))?;
    let array: PyReadonlyArrayDyn<'_, i64> = array.extract()?;
    let dims = array.shape().to_vec();
    let mut out = Vec::with_capacity(array.len());
    for &i in array.as_array().iter() {
        if i < 0 || i as usize >= num_latents {
            return Err(PyValueError::new_err(format!(
                "latent index {i} is out of range: the SAE has {num_latents} latents"
            )));
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
        let acts = float_array(top_acts)?;
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
pub fn run_sae_cli(py: Python<'_>, argv: Vec<String>) -> PyResult<()> {
    py.detach(move || sae::cli::run(argv).map_err(|e| format!("{e:#}")))
        .map_err(PyRuntimeError::new_err)
}
