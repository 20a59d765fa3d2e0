"""Tokenization (single and batched with padding) against the tokenizers-library fixture,
decoding, and the padded batch forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, TOKENIZER_JSON

CASES = json.loads((FIXTURES / "tokenizer" / "gpt_neox_20b.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_tokenize_matches_tokenizers_library(tiny_model, case):
    ids = tiny_model.tokenize(case["text"])
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.tolist() == case["ids"]
    assert tiny_model.tokenizer.encode(case["text"]) == case["ids"]
    assert tiny_model.tokenizer.decode(ids) == case["decoded_keep_special"]
    assert tiny_model.tokenizer.decode(case["ids"], skip_special_tokens=True) == case["decoded"]


def test_tokenizer_properties(tiny_model):
    tok = tiny_model.tokenizer
    assert tok is tiny_model.tokenizer or isinstance(tok, ei.Tokenizer)
    assert tok.eos_id == 0
    assert tok.pad_id == 0
    assert tok.vocab_size == len(tok) > 50000
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.token_to_id("no such token!") is None
    assert tok.decode([]) == ""
    assert tok.decode(np.array([[0, 0], [0, 0]])) == ["<|endoftext|><|endoftext|>"] * 2
    assert "eos_id=0" in repr(tok)
    loaded = ei.Tokenizer.from_file(TOKENIZER_JSON)
    assert loaded.encode("Hello world") == tok.encode("Hello world")
    with pytest.raises(FileNotFoundError):
        ei.Tokenizer.from_file("/no/such/tokenizer.json")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="token id 18446744073709551615 at position 2 is out of range"):
        tok.decode(np.array([0, 1, 2**64 - 1, 2**63], np.uint64))
    assert tok.decode(np.array(0)) == "<|endoftext|>"
    with pytest.raises(ValueError, match="token id 1000000 at position 1 is out of range for a vocabulary of"):
        tok.decode([0, 10**6])


def test_batch_tokenize_pads_right(tiny_model):
    texts = ["Hello world", "", "The play Herons was performed in 2001 at the Royal Court Theatre."]
    ids, mask = tiny_model.tokenize(texts)
    rows = [tiny_model.tokenize(t) for t in texts]
    width = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, width)
    assert ids.dtype == mask.dtype == np.int64
    for row, ids_row, mask_row in zip(rows, ids, mask):
        n = len(row)
        assert ids_row[:n].tolist() == row.tolist()
        assert (ids_row[n:] == tiny_model.tokenizer.pad_id).all()
        assert mask_row.tolist() == [1] * n + [0] * (width - n)
    unpadded = tiny_model.tokenize(texts, padding=False)
    assert [r.tolist() for r in unpadded] == [r.tolist() for r in rows]
    empty_ids, empty_mask = tiny_model.tokenize([])
    assert empty_ids.shape == (0, 0) and empty_mask.shape == (0, 0)
    with pytest.raises(TypeError):
        tiny_model.tokenize(42)


def test_padded_batch_matches_single_sequences(tiny_model):
    texts = ["A short one.", "A much longer sentence that needs several more tokens than the first."]
    ids, mask = tiny_model.tokenize(texts)
    logits, acts = tiny_model.run_with_cache(ids, ["layers.1"])
    for i, text in enumerate(texts):
        single = tiny_model.tokenize(text)
        n = len(single)
        assert mask[i].sum() == n
        ref_logits, ref_acts = tiny_model.run_with_cache(single, ["layers.1"])
        # Right padding never reaches the real tokens of a causal model.
        np.testing.assert_allclose(logits[i, :n], ref_logits, rtol=0, atol=1e-4)
        np.testing.assert_allclose(acts["layers.1"][i, :n], ref_acts["layers.1"], rtol=0, atol=1e-5)


def test_add_special_tokens_is_accepted(tiny_model):
    # GPT-NeoX's post-processor adds nothing.
    assert tiny_model.tokenize("Hi", add_special_tokens=True).tolist() == tiny_model.tokenize("Hi").tolist()
