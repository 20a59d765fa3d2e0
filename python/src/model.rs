//! `eleuther_interp.Model` and `eleuther_interp.Tokenizer`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use hooks::candle_core::{DeviceLocation, Tensor};
use hooks::config::ModelConfig;
use hooks::{Error, HookPoint, Hooks, LoadOptions, Model, Tokenizer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple};
use serde_json::json;

use crate::convert::{float_array, int64_array, json_to_py, token_ids, HostArray, TokenIds};
use crate::errors::IntoPyResult;

/// A tokenizer (Hugging Face ``tokenizers``), as loaded with a model.
///
/// ``encode(text)`` returns token ids without special tokens (the convention of the data
/// pipeline: documents are joined with the end-of-text id explicitly);
/// ``decode(ids)`` keeps special tokens such as ``<|endoftext|>``.
#[pyclass(name = "Tokenizer", module = "eleuther_interp", frozen)]
pub struct PyTokenizer {
    inner: Tokenizer,
}

impl PyTokenizer {
    /// The Rust tokenizer (for the other bindings).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner
    }

    /// The pad id: the tokenizer's padding id, else its end-of-text id, else 0.
    fn pad(&self) -> u32 {
        self.inner
            .inner()
            .get_padding()
            .map(|p| p.pad_id)
            .or(self.inner.eos_id())
            .unwrap_or(0)
    }
}

/// Rows of token ids for decoding: `[n]` gives one row, `[batch, n]` one per sequence.
fn id_rows(obj: &Bound<'_, PyAny>) -> PyResult<(Vec<Vec<u32>>, bool)> {
    let np = obj.py().import("numpy")?;
    let array = np.call_method1("asarray", (obj,))?;
    let ndim: usize = array.getattr("ndim")?.extract()?;
    let size: usize = array.getattr("size")?.extract()?;
    if size == 0 && ndim <= 1 {
        return Ok((vec![Vec::new()], false));
    }
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind != "i" && kind != "u" {
        return Err(PyTypeError::new_err(format!(
            "token ids must be integers, got dtype {}",
            array.getattr("dtype")?.str()?
        )));
    }
    let to_u32 = |row: Vec<i64>| -> PyResult<Vec<u32>> {
        row.into_iter()
            .map(|id| {
                u32::try_from(id)
                    .map_err(|_| PyValueError::new_err(format!("token id {id} is out of range")))
            })
            .collect()
    };
    let array = crate::convert::checked_token_ids(&array)?;
    let list = array.call_method0("tolist")?;
    match ndim {
        // ascontiguousarray makes a 0-d array 1-d.
        0 | 1 => Ok((vec![to_u32(list.extract()?)?], false)),
        2 => {
            let rows: Vec<Vec<i64>> = list.extract()?;
            Ok((rows.into_iter().map(to_u32).collect::<PyResult<_>>()?, true))
        }
        _ => Err(PyValueError::new_err(format!(
            "token ids to decode must be 1-D or 2-D, got {ndim} dimensions"
        ))),
    }
}

#[pymethods]
impl PyTokenizer {
    /// Loads a ``tokenizer.json``; ``eos_id`` overrides the end-of-text id (otherwise
    /// ``<|endoftext|>``, ``</s>``, ... is looked up in the vocabulary).
    #[staticmethod]
    #[pyo3(signature = (path, *, eos_id = None))]
    fn from_file(py: Python<'_>, path: PathBuf, eos_id: Option<u32>) -> PyResult<Self> {
        let inner = py
            .detach(|| Tokenizer::from_file(&path, eos_id))
            .into_py_result()?;
        Ok(PyTokenizer { inner })
    }

    /// Token ids of ``text`` as a list of ints. ``add_special_tokens=True`` adds what the
    /// tokenizer's post-processor adds (e.g. a BOS token); GPT-NeoX's adds nothing.
    #[pyo3(signature = (text, *, add_special_tokens = false))]
    fn encode(&self, py: Python<'_>, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode_with(text, add_special_tokens))
            .into_py_result()
    }

    /// The text of token ids: a 1-D list/array gives a ``str``, a 2-D one a list of ``str``
    /// (one per row). Special tokens are kept unless ``skip_special_tokens=True``.
    #[pyo3(signature = (ids, *, skip_special_tokens = false))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        skip_special_tokens: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (rows, two_dim) = id_rows(ids)?;
        let texts = py
            .detach(|| {
                rows.iter()
                    .map(|row| self.inner.decode_with(row, skip_special_tokens))
                    .collect::<hooks::Result<Vec<String>>>()
            })
            .into_py_result()?;
        if two_dim {
            Ok(PyList::new(py, texts)?.into_any())
        } else {
            Ok(PyString::new(py, &texts[0]).into_any())
        }
    }

    /// The id of a token string (as spelled in the vocabulary, e.g. ``"Ġthe"``), or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.inner().token_to_id(token)
    }

    /// The vocabulary spelling of a token id, or None when out of range.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.inner().id_to_token(id)
    }

    /// The end-of-text token id, or None when unknown.
    #[getter]
    fn eos_id(&self) -> Option<u32> {
        self.inner.eos_id()
    }

    /// The id used to pad batches: the tokenizer's pad id, else the end-of-text id, else 0.
    #[getter]
    fn pad_id(&self) -> u32 {
        self.pad()
    }

    /// Vocabulary size including added tokens (may be smaller than the model's
    /// ``config["vocab_size"]``, which counts padding rows of the embedding).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __len__(&self) -> usize {
        self.inner.vocab_size()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, eos_id={}, pad_id={})",
            self.inner.vocab_size(),
            self.inner
                .eos_id()
                .map_or("None".to_string(), |i| i.to_string()),
            self.pad()
        )
    }
}

/// A language model (Pythia / GPT-NeoX or Llama family) running on candle, with every
/// hook point readable and replaceable.
///
/// Load with :meth:`Model.from_pretrained`. Token ids go in as integer numpy arrays (or
/// lists): ``[seq]`` or ``[batch, seq]``. Everything that comes out is a float32 numpy
/// array (a bfloat16 / float16 model's outputs are widened to float32), ``[seq, width]``
/// for 1-D input and ``[batch, seq, width]`` for 2-D input (attention patterns:
/// ``[heads, seq, seq]`` and ``[batch, heads, seq, seq]``). Hook point names are listed
/// by :attr:`Model.hookpoints`; TransformerLens names (``blocks.3.hook_resid_post``) and
/// Hugging Face module names (``embed_in``, ``final_layer_norm``) work as aliases.
///
/// The forward pass takes no attention mask: the models are causal, so with right padding
/// (what :meth:`tokenize` does) every real token sees only real tokens, and the outputs at
/// padding positions are garbage that the caller must ignore (use the attention mask).
///
/// Calls release the GIL while the model runs, so other Python threads keep going; hook
/// callables are called with the GIL held.
#[pyclass(name = "Model", module = "eleuther_interp", frozen)]
pub struct PyModel {
    inner: Model,
    tokenizer: Option<Py<PyTokenizer>>,
    /// `lens::unembedding_hash` of the model, computed on first use (lens checks).
    unembed_hash: OnceLock<String>,
}

/// What to do at a hook point of `run_with_hooks`.
enum Action {
    /// Call a Python callable with the tensor, use what it returns.
    Call(Py<PyAny>),
    /// Replace with a fixed tensor.
    Fixed(Tensor),
}

/// `hooks` with each action added as a replacement; a callable's exception lands in `slot`.
fn with_actions<'a>(
    mut hooks: Hooks<'a>,
    actions: Vec<(HookPoint, String, Action)>,
    one_dim: bool,
    slot: &'a RefCell<Option<PyErr>>,
) -> Hooks<'a> {
    for (point, name, action) in actions {
        hooks = match action {
            Action::Fixed(value) => hooks.replace_with(point, value),
            Action::Call(callable) => hooks.replace(point, move |x| {
                call_hook(&callable, x, one_dim, &name, slot)
            }),
        };
    }
    hooks
}

/// Converts a Python `str` or sequence of `str` into names.
fn names_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(name) = obj.cast::<PyString>() {
        return Ok(vec![name.to_cow()?.into_owned()]);
    }
    obj.extract::<Vec<String>>()
        .map_err(|_| PyTypeError::new_err("hook points must be a str or a list of str".to_string()))
}

/// A dtype given as a string (`"bfloat16"`) or a numpy dtype / type (`np.float16`).
fn dtype_arg(obj: Option<&Bound<'_, PyAny>>) -> PyResult<String> {
    let Some(obj) = obj else {
        return Ok("float32".into());
    };
    if let Ok(name) = obj.cast::<PyString>() {
        return Ok(name.to_cow()?.into_owned());
    }
    let np = obj.py().import("numpy")?;
    np.call_method1("dtype", (obj,))?.getattr("name")?.extract()
}

/// Names a device the way `hooks::parse_device` reads it.
fn device_name(model: &Model) -> String {
    match model.device().location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The result of one forward pass, on the host, before it becomes numpy arrays.
struct HostOutput {
    logits: Option<HostArray>,
    captures: Vec<(HookPoint, HostArray)>,
}

/// Calls a Python hook callable with the tensor at `point` as a numpy array and reads back
/// the replacement. A Python exception is parked in `slot` and aborts the pass.
fn call_hook(
    callable: &Py<PyAny>,
    x: &Tensor,
    one_dim: bool,
    name: &str,
    slot: &RefCell<Option<PyErr>>,
) -> hooks::Result<Option<Tensor>> {
    let host = HostArray::from_tensor(x)?.squeeze_batch(one_dim);
    let expected = host.dims.clone();
    let result = Python::attach(|py| -> PyResult<Option<HostArray>> {
        let out = callable.bind(py).call1((host.into_numpy(py)?,))?;
        if out.is_none() {
            return Ok(None);
        }
        let out = float_array(&out, &format!("the hook at '{name}' returned"))?;
        if out.dims != expected {
            return Err(PyValueError::new_err(format!(
                "the hook at '{name}' returned an array of shape {:?}; expected {:?} (the shape it was given)",
                out.dims, expected
            )));
        }
        Ok(Some(out))
    });
    match result {
        Ok(None) => Ok(None),
        Ok(Some(out)) => Ok(Some(Tensor::from_vec(out.data, x.dims(), x.device())?)),
        Err(error) => {
            *slot.borrow_mut() = Some(error);
            Err(Error::InvalidArgument(format!(
                "the hook at '{name}' raised an exception"
            )))
        }
    }
}

impl PyModel {
    /// The runtime model.
    pub fn inner(&self) -> &Model {
        &self.inner
    }

    /// The fingerprint of the model's unembedding that lenses record
    /// (`lens::unembedding_hash`), computed once.
    pub fn unembedding_hash(&self) -> lens::Result<&str> {
        if let Some(hash) = self.unembed_hash.get() {
            return Ok(hash);
        }
        let hash = lens::unembedding_hash(&self.inner.unembedding())?;
        Ok(self.unembed_hash.get_or_init(|| hash))
    }

    /// Loads a model (the GIL is released while loading).
    pub fn load(
        py: Python<'_>,
        name: PathBuf,
        revision: Option<String>,
        device: &str,
        dtype: &str,
        quantized: bool,
        tokenizer: Option<PathBuf>,
    ) -> PyResult<Self> {
        let name = name.to_string_lossy().into_owned();
        let model = py
            .detach(|| -> hooks::Result<Model> {
                let options = LoadOptions {
                    revision,
                    device: hooks::parse_device(device)?,
                    dtype: hooks::parse_dtype(dtype)?,
                    quantized,
                };
                let mut model = Model::load(&name, &options)?;
                if let Some(path) = tokenizer {
                    let eos = model.config().eos_token_id();
                    model.set_tokenizer(Tokenizer::from_file(&path, eos)?);
                }
                Ok(model)
            })
            .into_py_result()?;
        let tokenizer = match model.tokenizer() {
            Ok(t) => Some(Py::new(py, PyTokenizer { inner: t.clone() })?),
            Err(_) => None,
        };
        Ok(PyModel {
            inner: model,
            tokenizer,
            unembed_hash: OnceLock::new(),
        })
    }

    /// Resolves hook point names: a plain name (canonical or alias) keeps its spelling as
    /// the key; a name with `*` or `,` expands to the canonical names it matches.
    fn resolve(&self, names: &[String]) -> PyResult<Vec<(String, HookPoint)>> {
        let mut resolved: Vec<(String, HookPoint)> = Vec::new();
        for name in names {
            if name.contains('*') || name.contains(',') {
                for point in self.inner.hook_points_from_list(name).into_py_result()? {
                    resolved.push((self.inner.hook_name(point), point));
                }
            } else {
                let point = self.inner.hook_point(name).into_py_result()?;
                resolved.push((name.clone(), point));
            }
        }
        let mut seen = std::collections::HashSet::new();
        resolved.retain(|(key, _)| seen.insert(key.clone()));
        Ok(resolved)
    }

    /// The shape a fixed replacement at `point` must have, as the user sees it: without
    /// the batch axis for 1-D ids.
    fn replacement_shape(&self, point: HookPoint, ids: &TokenIds) -> PyResult<Vec<usize>> {
        let seq = ids.seq_len();
        let config = self.inner.config();
        let per_sequence = if point.is_per_token() {
            vec![seq, config.width(point).into_py_result()?]
        } else {
            vec![config.num_heads(), seq, seq]
        };
        Ok(if ids.one_dim {
            per_sequence
        } else {
            ids.batched(&per_sequence)
        })
    }

    /// Reads the `hooks` argument of `run_with_hooks` / `run_with_cache` / `generate`: `ids`
    /// are the token ids a fixed replacement array must fit, `None` where only callables are
    /// taken (generation, whose steps differ in shape).
    fn actions(
        &self,
        hooks: Option<&Bound<'_, PyAny>>,
        ids: Option<&TokenIds>,
    ) -> PyResult<Vec<(HookPoint, String, Action)>> {
        let Some(hooks) = hooks.filter(|h| !h.is_none()) else {
            return Ok(Vec::new());
        };
        let hooks = hooks.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err(
                "hooks must be a dict mapping hook point names to callables or arrays",
            )
        })?;
        let mut actions: Vec<(HookPoint, String, Action)> = Vec::new();
        let mut named: HashMap<HookPoint, String> = HashMap::new();
        for (key, value) in hooks.iter() {
            let key: String = key
                .extract()
                .map_err(|_| PyTypeError::new_err("hook point names must be str"))?;
            // Names are checked even for hooks switched off (None), so a typo is not silent.
            let points = self.resolve(std::slice::from_ref(&key))?;
            if value.is_none() {
                continue;
            }
            for (name, point) in points {
                if let Some(other) = named.insert(point, name.clone()) {
                    return Err(PyValueError::new_err(format!(
                        "hooks '{other}' and '{name}' name the same hook point"
                    )));
                }
                let action = if value.is_callable() {
                    Action::Call(value.clone().unbind())
                } else {
                    let Some(ids) = ids else {
                        return Err(PyTypeError::new_err(format!(
                            "generate takes callables as hooks, not arrays: the value at \
                             '{name}' would fit the first step only"
                        )));
                    };
                    let np = value.py().import("numpy")?;
                    if np.call_method1("ndim", (&value,))?.extract::<usize>()? == 0 {
                        return Err(PyTypeError::new_err(format!(
                            "the hook at '{name}' must be a callable, an array or None, not a \
                             scalar ({})",
                            value.get_type().name()?
                        )));
                    }
                    let array = float_array(&value, &format!("the replacement at '{name}' is"))?;
                    let expected = self.replacement_shape(point, ids)?;
                    if array.dims != expected {
                        let unbatched = if ids.one_dim {
                            " (1-D ids: no batch axis)"
                        } else {
                            ""
                        };
                        return Err(PyValueError::new_err(format!(
                            "the replacement array at '{name}' has shape {:?}; expected {:?}{unbatched} \
                             for token ids of shape {:?}",
                            array.dims,
                            expected,
                            ids.user_dims()
                        )));
                    }
                    let dims = if ids.one_dim {
                        ids.batched(&expected)
                    } else {
                        expected
                    };
                    let tensor =
                        Tensor::from_vec(array.data, dims, &hooks::candle_core::Device::Cpu)
                            .into_py_result()?;
                    Action::Fixed(tensor)
                };
                actions.push((point, name, action));
            }
        }
        Ok(actions)
    }

    /// One forward pass: capture `captures`, apply `hooks`, stop early if asked.
    /// Returns the logits (None when stopped early) and the captures keyed as requested.
    fn run<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        captures: &[(String, HookPoint)],
        hooks: Option<&Bound<'py, PyAny>>,
        stop_early: bool,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Bound<'py, PyDict>)> {
        let ids = token_ids(ids)?;
        let actions = self.actions(hooks, Some(&ids))?;
        if stop_early && captures.is_empty() {
            return Err(PyValueError::new_err(
                "stop_early=True needs at least one hook point to capture",
            ));
        }
        let points: Vec<HookPoint> = captures.iter().map(|(_, p)| *p).collect();
        let one_dim = ids.one_dim;
        let tensor = ids.tensor;
        let model = &self.inner;
        let (result, hook_error) = py.detach(move || {
            let slot: RefCell<Option<PyErr>> = RefCell::new(None);
            let result = (|| -> hooks::Result<HostOutput> {
                let hooks = if stop_early {
                    Hooks::capture_only(points.iter().copied())
                } else {
                    Hooks::new().capture(points.iter().copied())
                };
                let mut hooks = with_actions(hooks, actions, one_dim, &slot);
                let out = model.forward(&tensor, &mut hooks)?;
                drop(hooks);
                let logits = match (&out.logits, stop_early) {
                    (Some(logits), false) if !out.captures.contains_key(&HookPoint::Logits) => {
                        Some(HostArray::from_tensor(logits)?.squeeze_batch(one_dim))
                    }
                    _ => None,
                };
                let captures = out
                    .captures
                    .iter()
                    .map(|(point, t)| {
                        Ok((*point, HostArray::from_tensor(t)?.squeeze_batch(one_dim)))
                    })
                    .collect::<hooks::Result<Vec<_>>>()?;
                Ok(HostOutput { logits, captures })
            })();
            (result, slot.into_inner())
        });
        if let Some(error) = hook_error {
            return Err(error);
        }
        let output = result.into_py_result()?;
        let mut arrays: HashMap<HookPoint, Bound<'py, PyAny>> = HashMap::new();
        for (point, host) in output.captures {
            arrays.insert(point, host.into_numpy(py)?.into_any());
        }
        let logits = match output.logits {
            Some(host) => Some(host.into_numpy(py)?.into_any()),
            None if !stop_early => arrays.get(&HookPoint::Logits).cloned(),
            None => None,
        };
        let dict = PyDict::new(py);
        for (key, point) in captures {
            if let Some(array) = arrays.get(point) {
                dict.set_item(key, array)?;
            }
        }
        Ok((logits, dict))
    }

    /// The config as JSON.
    fn config_json(&self) -> serde_json::Value {
        let config = self.inner.config();
        let mut value = json!({
            "architecture": config.model_type(),
            "hidden_size": config.hidden_size(),
            "num_layers": config.num_layers(),
            "vocab_size": config.vocab_size(),
            "eos_token_id": config.eos_token_id(),
        });
        let extra = match config {
            ModelConfig::GptNeox(c) => json!({
                "num_heads": c.num_heads,
                "num_kv_heads": c.num_heads,
                "head_dim": c.head_dim(),
                "intermediate_size": c.intermediate_size,
                "rotary_pct": c.rotary_pct,
                "rotary_dims": c.rotary_dims(),
                "rotary_base": c.rotary_base,
                "layer_norm_eps": c.layer_norm_eps,
                "parallel_residual": c.parallel_residual,
                "attention_bias": c.attention_bias,
                "tie_word_embeddings": c.tie_word_embeddings,
            }),
            ModelConfig::Llama(c) => json!({
                "num_heads": c.num_heads,
                "num_kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim,
                "intermediate_size": c.intermediate_size,
                "rope_theta": c.rope_theta,
                "rope_scaling": c.rope_scaling.map(|s| json!({
                    "rope_type": "llama3",
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                })),
                "rope_freq_factors": c.rope_freq_factors,
                "rms_norm_eps": c.rms_norm_eps,
                "attention_bias": c.attention_bias,
                "qkv_bias": c.qkv_bias(),
                "mlp_bias": c.mlp_bias,
                "tie_word_embeddings": c.tie_word_embeddings,
                "max_position_embeddings": c.max_position_embeddings,
                "sliding_window": c.sliding_window,
            }),
        };
        if let (Some(map), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
            map.extend(extra);
        }
        value
    }
}

#[pymethods]
impl PyModel {
    /// Loads a model.
    ///
    /// ``name`` is a Pythia short name (``"pythia-70m"``, ``"pythia-1b-deduped"``), a
    /// Hugging Face hub id (``"EleutherAI/gpt-neox-20b"``, downloaded into the shared
    /// Hugging Face cache; ``HF_HUB_OFFLINE=1`` never touches the network), a local folder
    /// (``config.json`` + safetensors weights + usually ``tokenizer.json``) or a ``.gguf``
    /// file. ``revision`` picks a hub branch, tag or commit (Pythia checkpoints:
    /// ``"step1000"``), or a local folder's sub-folder (``MODEL/step1000/``, the hub
    /// layout). ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (CUDA needs a build with
    /// the ``cuda`` feature). ``dtype`` is the compute dtype: ``"float32"`` (default),
    /// ``"bfloat16"`` or ``"float16"`` (or a numpy dtype). ``quantized=True`` keeps a GGUF
    /// file's block-quantized projection weights as they are (3.8x (Q8_0) to 7x (Q4_0, Q4_K)
    /// less memory for them; products with 8-bit-quantized activations, as llama.cpp; CPU and
    /// float32 only). ``tokenizer`` is a ``tokenizer.json`` to use instead of the model's own.
    ///
    /// Raises ``FileNotFoundError`` for a model that cannot be found, ``ValueError`` for a
    /// bad config or argument.
    #[staticmethod]
    #[pyo3(signature = (name, *, revision = None, device = "cpu", dtype = None, quantized = false, tokenizer = None))]
    fn from_pretrained(
        py: Python<'_>,
        name: PathBuf,
        revision: Option<String>,
        device: &str,
        dtype: Option<&Bound<'_, PyAny>>,
        quantized: bool,
        tokenizer: Option<PathBuf>,
    ) -> PyResult<Self> {
        let dtype = dtype_arg(dtype)?;
        Self::load(py, name, revision, device, &dtype, quantized, tokenizer)
    }

    /// Every hook point's canonical name, in forward order: ``embed``, then per layer
    /// ``layers.{i}.attention.pattern`` (``self_attn`` for Llama),
    /// ``layers.{i}.attention.dense.input`` (the heads' outputs; ``self_attn.o_proj.input``),
    /// ``layers.{i}.attention``, ``layers.{i}.mlp.input``, ``layers.{i}.mlp``,
    /// ``layers.{i}``, then ``final_norm``, ``logits``.
    #[getter]
    fn hookpoints(&self) -> Vec<String> {
        self.inner
            .hook_points()
            .into_iter()
            .map(|p| self.inner.hook_name(p))
            .collect()
    }

    /// The canonical names of hook point names, aliases or patterns (``"layers.*"``,
    /// ``"layers.*.mlp"``, ``"blocks.3.hook_resid_post"``), in forward order, without
    /// duplicates. Raises ``ValueError`` for a name the model does not have.
    fn resolve_hookpoints(&self, names: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
        let names = names_of(names)?;
        let mut points: Vec<HookPoint> =
            self.resolve(&names)?.into_iter().map(|(_, p)| p).collect();
        points.sort();
        points.dedup();
        Ok(points
            .into_iter()
            .map(|p| self.inner.hook_name(p))
            .collect())
    }

    /// The architecture's hyper-parameters as a dict: ``architecture`` (``"gpt_neox"`` or
    /// ``"llama"``), ``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``,
    /// ``head_dim``, ``intermediate_size``, ``vocab_size``, ``eos_token_id`` and the
    /// architecture's own fields (rotary / norm settings and biases; for Llama-family models
    /// also ``rope_scaling`` (Llama 3.1's, or None), ``rope_freq_factors`` (a GGUF file's
    /// per-frequency divisors, or None), ``qkv_bias`` (Qwen2), ``max_position_embeddings``
    /// and ``sliding_window``).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, &self.config_json())
    }

    /// The model's :class:`Tokenizer`. Raises ``RuntimeError`` when the model has none (a
    /// folder without ``tokenizer.json``; pass ``tokenizer=`` to :meth:`from_pretrained`).
    #[getter]
    fn tokenizer(&self, py: Python<'_>) -> PyResult<Py<PyTokenizer>> {
        match &self.tokenizer {
            Some(t) => Ok(t.clone_ref(py)),
            None => Err(self.inner.tokenizer().err().map_or_else(
                || pyo3::exceptions::PyRuntimeError::new_err("no tokenizer"),
                crate::errors::to_py_err,
            )),
        }
    }

    /// Where the model came from: ``"EleutherAI/pythia-70m@step1000"``, a folder or a file.
    #[getter]
    fn origin(&self) -> &str {
        self.inner.origin()
    }

    /// The revision loaded: the hub's, or a local folder's sub-folder given as ``revision``;
    /// None otherwise.
    #[getter]
    fn revision(&self) -> Option<&str> {
        self.inner.revision()
    }

    /// The compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    #[getter]
    fn dtype(&self) -> &'static str {
        hooks::dtype_name(self.inner.dtype())
    }

    /// Whether the model kept a GGUF file's quantized weights (``quantized=True``).
    #[getter]
    fn quantized(&self) -> bool {
        self.inner.quantized()
    }

    /// The device the model runs on: ``"cpu"`` or ``"cuda:N"``.
    #[getter]
    fn device(&self) -> String {
        device_name(&self.inner)
    }

    /// The conversation ``messages`` (a list of dicts such as ``{"role": "user", "content":
    /// "..."}``, any JSON-like values) written with the model's chat template, as
    /// transformers' ``tokenizer.apply_chat_template`` writes it: its token ids (int64,
    /// nothing added) with ``tokenize=True``, else the text. With
    /// ``add_generation_prompt=True`` it ends with the opening of the assistant's turn. Other
    /// keyword arguments are variables for the template, as in transformers
    /// (``enable_thinking=False``, ``tools=[...]``). The template is read from the model's
    /// files (a GGUF file's metadata; a folder's or hub repository's
    /// ``tokenizer_config.json`` or ``chat_template.jinja``); a model without one, or a
    /// conversation the template refuses, raises ``ValueError`` (``FileNotFoundError`` when a
    /// hub file cannot be fetched). To answer: ``model.generate(ids, stop=model.turn_end_ids)``.
    #[pyo3(signature = (messages, *, add_generation_prompt = false, tokenize = true, **variables))]
    fn apply_chat_template<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        add_generation_prompt: bool,
        tokenize: bool,
        variables: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // As JSON: dicts, lists, strings, numbers, booleans and None, as the template sees them.
        let json = py.import("json")?;
        let as_json = |value: &Bound<'py, PyAny>| -> PyResult<serde_json::Value> {
            let text: String = json.call_method1("dumps", (value,))?.extract()?;
            serde_json::from_str(&text).map_err(|e| PyValueError::new_err(e.to_string()))
        };
        let messages: Vec<serde_json::Value> = match as_json(messages)? {
            serde_json::Value::Array(messages) if messages.iter().all(|m| m.is_object()) => {
                messages
            }
            _ => return Err(PyTypeError::new_err("messages must be a list of dicts")),
        };
        let variables = match variables {
            Some(variables) => serde_json::from_value(as_json(variables.as_any())?)
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
            None => Default::default(),
        };
        let chat = py.detach(|| self.inner.chat()).into_py_result()?;
        let text = chat
            .template
            .render_with(&messages, add_generation_prompt, &variables)
            .map_err(|message| PyValueError::new_err(format!("the chat template: {message}")))?;
        if !tokenize {
            return Ok(PyString::new(py, &text).into_any());
        }
        let tokenizer = self.inner.tokenizer().into_py_result()?;
        let ids = py.detach(|| tokenizer.encode(&text)).into_py_result()?;
        let n = ids.len();
        int64_array(py, ids.into_iter().map(i64::from).collect(), &[n])
    }

    /// The tokens that end the model's turn in a chat (its end-of-text and end-of-turn
    /// tokens, such as ``<|im_end|>`` or ``<|eot_id|>``): ``stop=`` for :meth:`generate` after
    /// :meth:`apply_chat_template`. ``ValueError`` for a model without a chat template.
    #[getter]
    fn turn_end_ids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        let chat = py.detach(|| self.inner.chat()).into_py_result()?;
        Ok(chat.turn_end_ids.clone())
    }

    /// Token ids of text, as int64 numpy arrays (no special tokens are added unless
    /// ``add_special_tokens=True``).
    ///
    /// A ``str`` gives a 1-D array. A list of ``str`` gives, with ``padding=True``
    /// (default), a tuple ``(ids, attention_mask)`` of ``[batch, max_len]`` int64 arrays:
    /// each row right-padded with the tokenizer's pad id (its end-of-text id for GPT-NeoX),
    /// the mask 1 at real tokens and 0 at padding. The forward pass takes no mask: the model
    /// is causal, so real tokens never see the padding to their right, but the outputs at
    /// padding positions are garbage and must be ignored by the caller (e.g.
    /// ``acts[mask.astype(bool)]``). With ``padding=False`` a list of 1-D arrays is returned.
    #[pyo3(signature = (text, *, padding = true, add_special_tokens = false))]
    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
        padding: bool,
        add_special_tokens: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tokenizer = self.inner.tokenizer().into_py_result()?;
        if let Ok(text) = text.cast::<PyString>() {
            let text = text.to_cow()?;
            let text: &str = &text;
            let ids = py
                .detach(|| tokenizer.encode_with(text, add_special_tokens))
                .into_py_result()?;
            let n = ids.len();
            return int64_array(py, ids.into_iter().map(i64::from).collect(), &[n]);
        }
        let texts: Vec<String> = text
            .extract()
            .map_err(|_| PyTypeError::new_err("text must be a str or a list of str"))?;
        let rows = py
            .detach(|| {
                texts
                    .iter()
                    .map(|t| tokenizer.encode_with(t, add_special_tokens))
                    .collect::<hooks::Result<Vec<Vec<u32>>>>()
            })
            .into_py_result()?;
        if !padding {
            let list = PyList::empty(py);
            for row in rows {
                let n = row.len();
                list.append(int64_array(
                    py,
                    row.into_iter().map(i64::from).collect(),
                    &[n],
                )?)?;
            }
            return Ok(list.into_any());
        }
        let pad = match &self.tokenizer {
            Some(t) => t.get().pad(),
            None => 0,
        };
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut mask = Vec::with_capacity(rows.len() * width);
        for row in &rows {
            ids.extend(row.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(i64::from(pad), width - row.len()));
            mask.extend(std::iter::repeat_n(1i64, row.len()));
            mask.extend(std::iter::repeat_n(0i64, width - row.len()));
        }
        let dims = [rows.len(), width];
        let ids = int64_array(py, ids, &dims)?;
        let mask = int64_array(py, mask, &dims)?;
        Ok(PyTuple::new(py, [ids, mask])?.into_any())
    }

    /// The logits of token ids: ``[seq, vocab]`` for 1-D ids, ``[batch, seq, vocab]`` for
    /// 2-D ids, float32. Ids may be any integer numpy array or a (nested) list of ints;
    /// an id outside the vocabulary raises ``ValueError``.
    fn forward<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (logits, _) = self.run(py, ids, &[], None, false)?;
        logits.ok_or_else(|| PyValueError::new_err("the forward pass computed no logits"))
    }

    /// Runs token ids and returns ``(logits, activations)``: ``activations`` maps each
    /// requested hook point to its float32 array (``[seq, width]`` for 1-D ids,
    /// ``[batch, seq, width]`` for 2-D ids; ``width`` is the vocabulary for ``logits``).
    ///
    /// ``hookpoints`` is a name or list of names; ``None`` (default) captures every hook
    /// point except the attention patterns, which must be named (``[heads, seq, seq]`` for
    /// 1-D ids, ``[batch, heads, seq, seq]`` for 2-D ids, per layer; on a GPU in bfloat16 a
    /// layer whose pattern is captured runs its attention unfused). Keys are the
    /// names as given: ``run_with_cache(ids, ["blocks.0.hook_resid_post"])``
    /// returns the key ``"blocks.0.hook_resid_post"``; a pattern with ``*`` (``"layers.*"``)
    /// expands to canonical names (``"layers.0"``, ``"layers.1"``, ...).
    ///
    /// ``stop_early=True`` stops the pass after the last requested hook point and returns
    /// ``(None, activations)`` (no logits are computed unless ``"logits"`` is requested).
    /// ``hooks`` (as in :meth:`run_with_hooks`) edits the pass; captures see the edited
    /// tensors. Every hook is called, even one placed after the last capture (the pass goes
    /// on to it), so a hook that only records what it sees still records.
    #[pyo3(signature = (ids, hookpoints = None, *, stop_early = false, hooks = None))]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        hookpoints: Option<&Bound<'py, PyAny>>,
        stop_early: bool,
        hooks: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Bound<'py, PyDict>)> {
        let captures = match hookpoints {
            Some(names) if !names.is_none() => self.resolve(&names_of(names)?)?,
            _ => self
                .inner
                .hook_points()
                .into_iter()
                .filter(|p| p.is_per_token())
                .map(|p| (self.inner.hook_name(p), p))
                .collect(),
        };
        self.run(py, ids, &captures, hooks, stop_early)
    }

    /// Runs token ids with hook points edited and returns the logits.
    ///
    /// ``hooks`` maps hook point names (aliases and ``*`` patterns work) to:
    ///
    /// - a callable ``f(x) -> array | None``: ``x`` is the float32 numpy array at that point
    ///   (``[seq, width]`` for 1-D ids, ``[batch, seq, width]`` for 2-D ids; an attention
    ///   pattern is ``[heads, seq, seq]`` / ``[batch, heads, seq, seq]``); return the
    ///   replacement (same shape, any float dtype) or ``None`` to leave the tensor as it is.
    ///   ``x`` is a copy: editing it in place has no effect unless it is returned. An
    ///   exception raised by the callable aborts the pass and propagates;
    /// - an array of that shape: a fixed replacement (activation patching);
    /// - ``None``: nothing.
    ///
    /// Example: ``model.run_with_hooks(ids, {"layers.3.mlp": lambda x: x * 0})``
    /// zero-ablates the MLP of layer 3.
    fn run_with_hooks<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
        hooks: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (logits, _) = self.run(py, ids, &[], Some(hooks), false)?;
        logits.ok_or_else(|| PyValueError::new_err("the forward pass computed no logits"))
    }

    /// Continues a prompt token by token (a KV cache keeps the earlier positions) and
    /// returns what was added: the decoded text for a ``str`` prompt (tokenized without
    /// special tokens), the int64 token ids for 1-D ids.
    ///
    /// ``temperature=0`` (default) takes the most likely token; above 0, tokens are drawn
    /// from ``softmax(logits / temperature)`` with ``seed``. Generation stops after
    /// ``max_new_tokens``, after a token of ``stop`` (a list of ids, kept in the output;
    /// ``None``: the tokenizer's end-of-text token) or at the model's context length.
    ///
    /// ``hooks`` maps hook point names to callables, as in :meth:`run_with_hooks`, and is
    /// applied at every step: the first call sees the prompt's positions (``[seq, width]``),
    /// each later one the new token's (``[1, width]``). A steering vector ``v`` at layer 10:
    /// ``model.generate("The capital of France is", 16, hooks={"layers.10": lambda x: x + v})``.
    /// Fixed arrays are refused (they would fit the first step only).
    #[pyo3(signature = (prompt, max_new_tokens = 32, *, hooks = None, temperature = 0.0, seed = 0, stop = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        hooks: Option<&Bound<'py, PyAny>>,
        temperature: f32,
        seed: u64,
        stop: Option<Vec<u32>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let text = prompt.extract::<String>().ok();
        let ids = match &text {
            Some(text) => {
                let tokenizer = self.tokenizer(py)?;
                let ids = tokenizer.get().tokenizer().encode(text).into_py_result()?;
                if ids.is_empty() {
                    return Err(PyValueError::new_err("the prompt makes no tokens"));
                }
                ids
            }
            None => {
                let ids = token_ids(prompt)?;
                if !ids.one_dim {
                    return Err(PyValueError::new_err(format!(
                        "generate takes one prompt: a str or 1-D token ids, got ids of shape {:?}",
                        ids.user_dims()
                    )));
                }
                ids.tensor
                    .flatten_all()
                    .and_then(|t| t.to_dtype(hooks::candle_core::DType::U32))
                    .and_then(|t| t.to_vec1::<u32>())
                    .into_py_result()?
            }
        };
        let actions = self.actions(hooks, None)?;
        let options = hooks::GenerateOptions {
            max_new_tokens,
            temperature,
            seed,
            stop_tokens: stop,
        };
        let model = &self.inner;
        let (result, hook_error) = py.detach(|| {
            let slot: RefCell<Option<PyErr>> = RefCell::new(None);
            let result = {
                let mut hooks = with_actions(Hooks::new(), actions, true, &slot);
                model.generate(&ids, &mut hooks, &options)
            };
            (result, slot.into_inner())
        });
        if let Some(error) = hook_error {
            return Err(error);
        }
        let generated = result.into_py_result()?;
        match text {
            Some(_) => {
                let tokenizer = self.tokenizer(py)?;
                let text = tokenizer
                    .get()
                    .tokenizer()
                    .decode(&generated)
                    .into_py_result()?;
                Ok(text.into_pyobject(py)?.into_any())
            }
            None => {
                let n = generated.len();
                int64_array(py, generated.into_iter().map(i64::from).collect(), &[n])
            }
        }
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "Model(origin='{}', architecture='{}', num_layers={}, hidden_size={}, vocab_size={}, dtype='{}', device='{}')",
            self.inner.origin(),
            c.model_type(),
            c.num_layers(),
            c.hidden_size(),
            c.vocab_size(),
            hooks::dtype_name(self.inner.dtype()),
            device_name(&self.inner)
        )
    }
}
