"""Shared helpers: repository paths, a safetensors reader in plain numpy, tiny models."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PYTHIA_STYLE = FIXTURES / "gpt_neox" / "pythia_style"
TOKENIZER_JSON = REPO / "data" / "gpt-neox-20b-tokenizer.json"
WIKITEXT = REPO / "data" / "wikitext-2-raw-test.txt"

# For tests that assert what the package logs by default (warnings from import, info during
# a command): RUST_LOG sets another level for the whole process.
DEFAULT_LOG_LEVEL = pytest.mark.skipif("RUST_LOG" in os.environ, reason="RUST_LOG overrides the log levels it checks")

_DTYPES = {
    "F32": np.float32,
    "F64": np.float64,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "U32": np.uint32,
    "U8": np.uint8,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file: 8-byte little-endian header length, JSON header, data."""
    raw = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return tensors


def max_rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) or 1.0
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


TINY_CONFIG = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "rotary_pct": 0.5,
    "vocab_size": 50304,
    "eos_token_id": 0,
    "use_parallel_residual": True,
}


@pytest.fixture(scope="session")
def golden_model() -> ei.Model:
    """The pythia_style golden fixture (2 layers, hidden 64, vocab 128, no tokenizer)."""
    return ei.Model.from_pretrained(str(PYTHIA_STYLE))


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """The transformers reference outputs of the pythia_style fixture."""
    return read_safetensors(PYTHIA_STYLE / "expected.safetensors")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX (hidden 32, 2 layers) with synthetic weights and the real Pythia
    tokenizer (full 50304-row vocabulary)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    ei.make_synthetic_model(folder, TINY_CONFIG, tokenizer=TOKENIZER_JSON)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_dir) -> ei.Model:
    return ei.Model.from_pretrained(tiny_dir)


def wikitext_lines(n: int) -> list[str]:
    """The first n non-empty lines of WikiText-2 (test split)."""
    lines = []
    with open(WIKITEXT, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                lines.append(line)
                if len(lines) == n:
                    break
    return lines
