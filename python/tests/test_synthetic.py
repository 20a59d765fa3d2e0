"""A Pythia-70m-shaped model built from Python with synthetic weights (the generator of
tests/fixtures/generate.py) and the real tokenizer, end to end against the transformers
fixture tests/fixtures/gpt_neox/pythia_70m_shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, TOKENIZER_JSON, max_rel_err, read_safetensors

SHAPE = FIXTURES / "gpt_neox" / "pythia_70m_shape"
SENTENCE = "The play Herons was performed in 2001 at the Royal Court Theatre in London."


@pytest.fixture(scope="module")
def pythia_70m_shape(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pythia-70m-shape")
    config = json.loads((SHAPE / "config.json").read_text())
    ei.make_synthetic_model(folder, config, tokenizer=TOKENIZER_JSON)
    return folder, ei.Model.from_pretrained(folder)


def test_generator_check_values(pythia_70m_shape):
    # Read the weights written by write_synthetic_weights back with plain numpy.
    folder, _ = pythia_70m_shape
    weights = read_safetensors(folder / "model.safetensors")
    checks = json.loads((SHAPE / "generator_check.json").read_text())
    assert len(checks) == 4
    for name, check in checks.items():
        first4 = weights[name].reshape(-1)[:4]
        assert [f"0x{b:08x}" for b in first4.view(np.uint32)] == check["first4_bits"], name


def test_end_to_end_matches_transformers(pythia_70m_shape):
    _, model = pythia_70m_shape
    expected = read_safetensors(SHAPE / "expected.safetensors")
    ids = model.tokenize(SENTENCE)
    assert ids.tolist() == expected["input_ids"][0].tolist()
    names = [k for k in expected if k != "input_ids" and ".logits" not in k and not k.startswith("logits")]
    logits, acts = model.run_with_cache(ids, names)
    for name in names:
        assert max_rel_err(acts[name], expected[name][0]) < 1e-4, name
    assert max_rel_err(logits[-4:], expected["logits.last4"][0]) < 1e-4
    for point in ["layers.1.mlp", "layers.0.attention"]:
        ablated = model.run_with_hooks(ids, {point: lambda x: x * 0})
        assert max_rel_err(ablated[-4:], expected[f"ablate.{point}.logits.last4"][0]) < 1e-4, point
