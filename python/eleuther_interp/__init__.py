"""eleuther_interp: run Pythia / GPT-NeoX and Llama-family models (on candle, in Rust) from
Python, read or replace the tensor at any hook point, cache activations over a dataset, and
train, apply and evaluate tuned lenses and the logit lens, and load, apply and train TopK sparse
autoencoders in EleutherAI sparsify's format.

>>> import eleuther_interp as ei
>>> model = ei.Model.from_pretrained("pythia-70m", revision="step1000")
>>> ids = model.tokenize("Hello world")
>>> logits, acts = model.run_with_cache(ids, hookpoints=["layers.3", "layers.3.mlp"])
>>> logits = model.run_with_hooks(ids, {"layers.3.mlp": lambda x: x * 0})
>>> lens = ei.TunedLens.train(model, data=["train.txt"], output="lens/")
>>> lens_logits = lens.forward(acts["layers.3"], 4, model)   # hidden_states[4]
>>> sae = ei.Sae.load("saes/layers.3")        # sparsify's cfg.json + sae.safetensors
>>> top_acts, top_indices = sae.encode(acts["layers.3"].reshape(-1, sae.d_in))

Arrays cross as numpy: token ids in (any integer dtype, or lists), float32 out.
Errors: ``ValueError`` for bad arguments (unknown hook point, token id out of range, bad
config), ``TypeError`` for an argument of the wrong kind, ``FileNotFoundError`` for missing
models and files, ``FileExistsError`` for a file where a folder is to be written,
``RuntimeError`` otherwise.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ._native import (
    ActivationCache,
    CacheBatches,
    LatentCache,
    LatentExamples,
    Llm,
    LogitLens,
    Model,
    PredictionTrajectory,
    Sae,
    SaeTrainer,
    Tokenizer,
    TunedLens,
    __version__,
    cache_activations,
    evaluate_lens,
    explain,
    fetch_smollm2,
    run_cli as _run_cli,
    run_delphi_cli as _run_delphi_cli,
    run_lens_cli as _run_lens_cli,
    run_sae_cli as _run_sae_cli,
    write_synthetic_model as _write_synthetic_model,
    score,
    write_synthetic_weights,
)

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


def _run_main(program: str, run: Callable[[list[str]], int], argv: Optional[Sequence[str]]) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if isinstance(argv, (str, bytes)):
        raise TypeError(f"argv must be a list of arguments, not a string: {argv!r}")
    # The command writes to the process's stdout itself: what Python buffered goes first.
    sys.stdout.flush()
    try:
        return run([program, *[os.fspath(a) for a in argv]])
    except RuntimeError as error:
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr)
        return 1


def hooks_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``hooks`` command line (``hooks cache``, ``hooks tokenize``, ``hooks info``,
    ``hooks inspect``, ``hooks fetch``) in this process and returns its exit status.

    ``argv`` is the argument list without the program name (default ``sys.argv[1:]``).
    An error prints ``error: <message>`` on stderr and returns 1. ``--help`` and
    ``--version`` print and return 0, invalid arguments print the usage error and return 2,
    as a command line exits (the interpreter goes on).

    This is the entry point of the ``hooks`` console script. Called from Python, the work
    runs with the GIL released and cannot be interrupted with Ctrl-C until it returns; use
    :func:`cache_activations` for an interruptible job.
    """
    return _run_main("hooks", _run_cli, argv)


def lens_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``lens`` command line (``lens train``, ``lens eval``, ``lens sweep``, ``lens
    plot``) in this process and returns its exit status.

    ``argv`` is the argument list without the program name (default ``sys.argv[1:]``).
    An error prints ``error: <message>`` on stderr and returns 1. ``--help`` and
    ``--version`` print and return 0, invalid arguments print the usage error and return 2,
    as a command line exits (the interpreter goes on).

    This is the entry point of the ``lens`` console script. Called from Python, the work
    runs with the GIL released and cannot be interrupted with Ctrl-C until it returns; use
    :meth:`TunedLens.train` and :func:`evaluate_lens` for interruptible work.
    """
    return _run_main("lens", _run_lens_cli, argv)


def sae_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``sae`` command line (``sae train``, ``sae eval``) in this process and
    returns its exit status.

    ``argv`` is the argument list without the program name (default ``sys.argv[1:]``).
    An error prints ``error: <message>`` on stderr and returns 1. ``--help`` and
    ``--version`` print and return 0, invalid arguments print the usage error and return 2,
    as a command line exits (the interpreter goes on).

    This is the entry point of the ``sae`` console script. Called from Python, the work runs
    with the GIL released and cannot be interrupted with Ctrl-C until it returns (``sae
    train`` resumes from its last checkpoint when re-run).
    """
    return _run_main("sae", _run_sae_cli, argv)


def make_synthetic_model(
    folder: Union[str, "os.PathLike[str]"],
    config: Mapping[str, Any],
    tokenizer: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> str:
    """Creates a model folder with deterministic synthetic weights and returns its path.

    ``config`` is a Hugging Face ``config.json`` as a dict (``model_type`` ``"gpt_neox"``,
    ``"llama"`` or ``"mistral"`` plus its sizes); ``tokenizer`` is a ``tokenizer.json`` to
    copy in. The weights are those of ``tests/fixtures/generate.py`` (the same for the same
    config), so any model shape can be built without downloading anything: for tests,
    examples and benchmarks. Load it with ``Model.from_pretrained(folder)``.
    """
    import json

    folder = os.fspath(folder)
    _write_synthetic_model(folder, json.dumps(dict(config)), None if tokenizer is None else os.fspath(tokenizer))
    return folder


def delphi_main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``delphi`` command line (``delphi cache``, ``delphi run``, ``delphi summary``)
    in this process and returns its exit status.

    ``argv`` is the argument list without the program name (default ``sys.argv[1:]``).
    An error prints ``error: <message>`` on stderr and returns 1; ``--help`` and ``--version``
    return 0, invalid arguments 2, as for :func:`hooks_main`. This is the entry point of the
    ``delphi`` console script; jobs resume when re-run, so an interrupted one loses
    nothing already written.
    """
    return _run_main("delphi", _run_delphi_cli, argv)

