"""Model loading, forward, run_with_cache and run_with_hooks against the transformers
golden fixture (tests/fixtures/gpt_neox/pythia_style), and the error mapping."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import DEFAULT_LOG_LEVEL, FIXTURES, PYTHIA_STYLE, TINY_CONFIG, TOKENIZER_JSON, max_rel_err

TOL = 1e-4


def test_hookpoints_in_forward_order(golden_model):
    assert golden_model.hookpoints == [
        "embed",
        "layers.0.attention.pattern",
        "layers.0.attention.dense.input",
        "layers.0.attention",
        "layers.0.mlp.input",
        "layers.0.mlp",
        "layers.0",
        "layers.1.attention.pattern",
        "layers.1.attention.dense.input",
        "layers.1.attention",
        "layers.1.mlp.input",
        "layers.1.mlp",
        "layers.1",
        "final_norm",
        "logits",
    ]


def test_config_and_properties(golden_model):
    config = golden_model.config
    assert config["architecture"] == "gpt_neox"
    assert config["hidden_size"] == 64
    assert config["num_layers"] == 2
    assert config["num_heads"] == 4
    assert config["head_dim"] == 16
    assert config["intermediate_size"] == 256
    assert config["vocab_size"] == 128
    assert config["parallel_residual"] is True
    assert golden_model.dtype == "float32"
    assert golden_model.device == "cpu"
    assert golden_model.revision is None
    assert str(PYTHIA_STYLE) in golden_model.origin
    assert "gpt_neox" in repr(golden_model)


def test_forward_matches_golden(golden_model, golden):
    ids = golden["input_ids"]
    logits = golden_model.forward(ids)
    assert logits.dtype == np.float32
    assert logits.shape == (2, 11, 128)
    assert max_rel_err(logits, golden["logits"]) < TOL


def test_forward_one_dim_and_lists(golden_model, golden):
    ids = golden["input_ids"]
    single = golden_model.forward(ids[0])
    assert single.shape == (11, 128)
    np.testing.assert_array_equal(single, golden_model.forward(ids[:1])[0])
    assert max_rel_err(single, golden["logits"][0]) < TOL
    # Lists and other integer dtypes give the same bits.
    np.testing.assert_array_equal(golden_model.forward(ids[0].tolist()), single)
    np.testing.assert_array_equal(golden_model.forward(ids[0].astype(np.uint8)), single)
    batch = golden_model.forward(ids)
    np.testing.assert_array_equal(golden_model.forward(ids.astype(np.int32)), batch)
    np.testing.assert_array_equal(golden_model.forward(ids.tolist()), batch)
    # A non-contiguous view reads the right ids.
    np.testing.assert_array_equal(
        golden_model.forward(np.asfortranarray(ids)), batch
    )


def test_forward_is_deterministic(golden_model, golden):
    ids = golden["input_ids"]
    np.testing.assert_array_equal(golden_model.forward(ids), golden_model.forward(ids))


def test_run_with_cache_matches_golden(golden_model, golden):
    ids = golden["input_ids"]
    names = [k for k in golden if k != "input_ids" and not k.startswith(("ablate.", "edit."))]
    assert "layers.1.mlp.input" in names and "layers.1.attention.pattern" in names
    logits, acts = golden_model.run_with_cache(ids, hookpoints=names)
    assert set(acts) == set(names)
    for name in names:
        assert acts[name].dtype == np.float32
        assert max_rel_err(acts[name], golden[name]) < TOL, name
    np.testing.assert_array_equal(logits, acts["logits"])
    # Captures change no bit of the logits, the attention patterns' included: on the CPU the
    # attention kernel writes out the weights it uses.
    np.testing.assert_array_equal(logits, golden_model.forward(ids))


def test_attention_patterns(golden_model, golden):
    ids = golden["input_ids"]
    _, acts = golden_model.run_with_cache(ids[1], ["blocks.0.attn.hook_pattern", "layers.0.attention.dense.input"])
    pattern = acts["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (4, 11, 11)  # [heads, query, key] for 1-D ids
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(pattern, 1) == 0)
    assert acts["layers.0.attention.dense.input"].shape == (11, 64)
    # Replacing a pattern re-weights the values: each position attending equally to itself
    # and every earlier one, as transformers with that attention function.
    seq = ids.shape[1]
    uniform = np.tril(np.ones((seq, seq))) / np.arange(1, seq + 1)[:, None]
    edited = golden_model.run_with_hooks(ids, {"layers.0.attention.pattern": lambda p: np.broadcast_to(uniform, p.shape)})
    assert max_rel_err(edited, golden["edit.layers.0.attention.pattern.uniform.logits"]) < TOL
    # A fixed array for 1-D ids has no batch axis, as what a callable gets.
    one = golden_model.run_with_hooks(ids[0], {"blocks.0.attn.hook_pattern": np.broadcast_to(uniform, (4, seq, seq))})
    assert max_rel_err(one, golden["edit.layers.0.attention.pattern.uniform.logits"][0]) < TOL
    # `*` names match patterns only when they end in ".pattern".
    assert golden_model.resolve_hookpoints("layers.*.*.*") == ["layers.0.mlp.input", "layers.1.mlp.input"]
    assert golden_model.resolve_hookpoints("layers.*.*.pattern") == [
        "layers.0.attention.pattern", "layers.1.attention.pattern"]
    # Switching head 1 off through the heads' outputs.
    def head1_off(z):
        z[..., 16:32] = 0
        return z

    ablated = golden_model.run_with_hooks(ids, {"blocks.0.attn.hook_z": head1_off})
    assert max_rel_err(ablated, golden["ablate.layers.0.attention.dense.input.head1.logits"]) < TOL


def test_llama_family_configs_show_biases_and_rotary_scaling():
    qwen2 = ei.Model.from_pretrained(FIXTURES / "llama" / "qwen2_bias").config
    assert qwen2["architecture"] == "qwen2"
    assert (qwen2["qkv_bias"], qwen2["attention_bias"], qwen2["rope_theta"]) == (True, False, 1e6)
    assert qwen2["rope_scaling"] is None and qwen2["sliding_window"] is None
    gguf = ei.Model.from_pretrained(FIXTURES / "llama" / "qwen2_bias" / "model.gguf").config
    assert gguf["qkv_bias"] is True and gguf["max_position_embeddings"] == 128
    scaled = ei.Model.from_pretrained(FIXTURES / "llama" / "llama3_rope").config
    assert scaled["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16.0,
    }
    assert scaled["rope_freq_factors"] is None and scaled["qkv_bias"] is False


def test_grouped_query_attention_patterns_have_the_query_heads():
    """A Llama model with 4 query heads sharing 2 key/value heads: its pattern, and a fixed
    replacement of it, are [query heads, seq, seq]; putting back what was captured changes
    nothing."""
    model = ei.Model.from_pretrained(FIXTURES / "llama" / "gqa_tied")
    ids = np.arange(3, 10)
    _, acts = model.run_with_cache(ids, ["layers.0.self_attn.pattern"])
    pattern = acts["layers.0.self_attn.pattern"]
    assert pattern.shape == (4, 7, 7)
    same = model.run_with_hooks(ids, {"layers.0.self_attn.pattern": pattern})
    assert max_rel_err(same, model.forward(ids)) < 1e-5
    with pytest.raises(ValueError, match=r"expected \[4, 7, 7\]"):
        model.run_with_hooks(ids, {"layers.0.self_attn.pattern": pattern[:2]})


def test_run_with_cache_default_is_every_hookpoint_but_the_patterns(golden_model, golden):
    ids = golden["input_ids"][1]
    logits, acts = golden_model.run_with_cache(ids)
    assert list(acts) == [n for n in golden_model.hookpoints if not n.endswith(".pattern")]
    np.testing.assert_array_equal(logits, golden_model.forward(ids))
    assert acts["layers.0"].shape == (11, 64)
    assert acts["logits"] is logits


def test_names_are_kept_as_given(golden_model, golden):
    ids = golden["input_ids"]
    _, acts = golden_model.run_with_cache(
        ids, hookpoints=["blocks.1.hook_resid_post", "layers.1", "embed_in", "blocks.1.hook_resid_pre"]
    )
    assert list(acts) == ["blocks.1.hook_resid_post", "layers.1", "embed_in", "blocks.1.hook_resid_pre"]
    np.testing.assert_array_equal(acts["blocks.1.hook_resid_post"], acts["layers.1"])
    assert max_rel_err(acts["embed_in"], golden["embed"]) < TOL
    assert max_rel_err(acts["blocks.1.hook_resid_pre"], golden["layers.0"]) < TOL
    # A single name may be a plain string; patterns expand to canonical names.
    _, one = golden_model.run_with_cache(ids, "layers.0")
    assert list(one) == ["layers.0"]
    _, many = golden_model.run_with_cache(ids, ["layers.*"])
    assert list(many) == ["layers.0", "layers.1"]
    _, mlps = golden_model.run_with_cache(ids, ["layers.*.mlp"])
    assert list(mlps) == ["layers.0.mlp", "layers.1.mlp"]
    assert golden_model.resolve_hookpoints(["layers.*", "blocks.0.hook_mlp_out", "embed"]) == [
        "embed",
        "layers.0.mlp",
        "layers.0",
        "layers.1",
    ]


def test_stop_early(golden_model, golden):
    ids = golden["input_ids"]
    logits, acts = golden_model.run_with_cache(ids, ["layers.0", "layers.0.mlp"], stop_early=True)
    assert logits is None
    _, full = golden_model.run_with_cache(ids, ["layers.0", "layers.0.mlp"])
    for name in ["layers.0", "layers.0.mlp"]:
        np.testing.assert_array_equal(acts[name], full[name])
    # A hook after the last capture is still called (the pass goes on to it).
    seen = []
    golden_model.run_with_cache(ids, ["layers.0"], stop_early=True, hooks={"layers.1": lambda x: seen.append(x.shape)})
    assert seen == [full["layers.0"].shape]
    with pytest.raises(ValueError, match="at least one hook point"):
        golden_model.run_with_cache(ids, [], stop_early=True)


def zero(x):
    return x * 0


def test_zero_ablation_matches_golden(golden_model, golden):
    ids = golden["input_ids"]
    mlp = golden_model.run_with_hooks(ids, {"layers.1.mlp": zero})
    assert max_rel_err(mlp, golden["ablate.layers.1.mlp.logits"]) < TOL
    attn = golden_model.run_with_hooks(ids, {"layers.0.attention": zero})
    assert max_rel_err(attn, golden["ablate.layers.0.attention.logits"]) < TOL
    # Aliases and fixed arrays do the same.
    alias = golden_model.run_with_hooks(ids, {"blocks.1.hook_mlp_out": lambda x: np.zeros_like(x)})
    np.testing.assert_array_equal(alias, mlp)
    fixed = golden_model.run_with_hooks(ids, {"layers.1.mlp": np.zeros((2, 11, 64))})
    np.testing.assert_array_equal(fixed, mlp)
    assert not np.array_equal(mlp, golden_model.forward(ids))


def test_none_and_identity_hooks_change_nothing(golden_model, golden):
    ids = golden["input_ids"]
    plain = golden_model.forward(ids)
    seen = {}

    def look(x):
        seen["shape"] = x.shape
        seen["dtype"] = x.dtype
        return None

    np.testing.assert_array_equal(golden_model.run_with_hooks(ids, {"layers.0": look}), plain)
    assert seen == {"shape": (2, 11, 64), "dtype": np.float32}
    np.testing.assert_array_equal(golden_model.run_with_hooks(ids, {"layers.0": lambda x: x}), plain)
    np.testing.assert_array_equal(golden_model.run_with_hooks(ids, {"layers.0": None}), plain)
    np.testing.assert_array_equal(golden_model.run_with_hooks(ids, {}), plain)


def test_hook_gets_the_input_layout(golden_model, golden):
    ids = golden["input_ids"][0]
    shapes = []

    def record(x):
        shapes.append(x.shape)

    golden_model.run_with_hooks(ids, {"layers.0.mlp": record, "logits": record})
    assert shapes == [(11, 64), (11, 128)]
    # A 1-D input takes a [seq, width] replacement; the other rows are untouched.
    out = golden_model.run_with_hooks(ids, {"layers.1.mlp": np.zeros((11, 64), np.float32)})
    batch = golden_model.run_with_hooks(golden["input_ids"], {"layers.1.mlp": zero})
    assert max_rel_err(out, batch[0]) < 1e-5


def test_hooks_and_captures_together(golden_model, golden):
    ids = golden["input_ids"]
    logits, acts = golden_model.run_with_cache(
        ids, ["layers.1.mlp", "layers.1"], hooks={"layers.1.mlp": zero}
    )
    assert not acts["layers.1.mlp"].any()
    assert max_rel_err(logits, golden["ablate.layers.1.mlp.logits"]) < TOL
    # Steering: add a vector to the residual stream.
    direction = np.linspace(-1, 1, 64, dtype=np.float32)
    _, steered = golden_model.run_with_cache(
        ids, ["layers.0"], hooks={"layers.0": lambda x: x + direction}
    )
    _, plain = golden_model.run_with_cache(ids, ["layers.0"])
    np.testing.assert_allclose(steered["layers.0"], plain["layers.0"] + direction, rtol=0, atol=1e-6)


def test_hook_errors(golden_model, golden):
    ids = golden["input_ids"]

    def boom(x):
        raise ZeroDivisionError("from the hook")

    with pytest.raises(ZeroDivisionError, match="from the hook"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": boom})
    with pytest.raises(ValueError, match="shape"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": lambda x: x[:, :3]})
    # A misshapen fixed array is named in the user's shapes, without an internal batch axis.
    with pytest.raises(ValueError, match=r"at 'layers.0.mlp' has shape \[3, 4\]; expected \[2, 11, 64\] for token ids of shape \[2, 11\]"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": np.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"has shape \[3, 3\]; expected \[11, 64\] \(1-D ids: no batch axis\) for token ids of shape \[11\]"):
        golden_model.run_with_hooks(ids[0], {"layers.0.mlp": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"has shape \[1, 11, 64\]; expected \[11, 64\] \(1-D ids"):
        golden_model.run_with_hooks(ids[0], {"layers.0.mlp": np.zeros((1, 11, 64))})
    with pytest.raises(ValueError, match=r"expected \[4, 11, 11\]"):
        golden_model.run_with_hooks(ids[0], {"layers.0.attention.pattern": np.zeros((11, 11))})
    with pytest.raises(TypeError, match=r"must be a callable, an array or None, not a scalar \(int\)"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": 5})
    with pytest.raises(TypeError, match=r"not a scalar \(ndarray\)"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": np.array(5.0)})
    # A mask returned by mistake, or text, is not taken for activations.
    with pytest.raises(TypeError, match=r"the hook at 'layers.0.mlp' returned an array of dtype bool; expected floats"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": lambda x: x > 0})
    with pytest.raises(TypeError, match=r"the replacement at 'layers.0.mlp' is an array of dtype <U1"):
        golden_model.run_with_hooks(ids, {"layers.0.mlp": np.full((2, 11, 64), "2")})
    with pytest.raises(ValueError, match="same hook point"):
        golden_model.run_with_hooks(ids, {"layers.0": zero, "blocks.0.hook_resid_post": zero})
    with pytest.raises(TypeError):
        golden_model.run_with_hooks(ids, [("layers.0", zero)])
    # The model still works afterwards.
    assert max_rel_err(golden_model.forward(ids), golden["logits"]) < TOL


def test_unknown_hookpoint_is_value_error(golden_model, golden):
    ids = golden["input_ids"]
    with pytest.raises(ValueError) as info:
        golden_model.run_with_cache(ids, ["layers.7"])
    message = str(info.value)
    assert "unknown hook point 'layers.7'" in message
    assert "layers.{0..1}" in message and "final_norm" in message
    with pytest.raises(ValueError, match="unknown hook point 'resid'"):
        golden_model.run_with_hooks(ids, {"resid": zero})
    # A hook switched off (None) is still named right.
    with pytest.raises(ValueError, match="unknown hook point 'layers.x'"):
        golden_model.run_with_hooks(ids, {"layers.x": None})
    with pytest.raises(ValueError, match="unknown hook point"):
        golden_model.resolve_hookpoints("layers.*.nothing")


def test_bad_ids(golden_model):
    with pytest.raises(ValueError, match="token id 128 at position 3 is out of range for a vocabulary of 128"):
        golden_model.forward([1, 2, 3, 128])
    with pytest.raises(ValueError, match="out of range"):
        golden_model.forward(np.array([[1, -1]]))
    # uint64 ids past int64's range are named by their value, not the wrapped negative one.
    with pytest.raises(ValueError, match="token id 9223372036854775813 at position 1 is out of range"):
        golden_model.forward(np.array([1, 2**63 + 5], np.uint64))
    with pytest.raises(TypeError, match="integers"):
        golden_model.forward(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="empty"):
        golden_model.forward([])
    with pytest.raises(ValueError, match="empty"):
        golden_model.forward(np.zeros((2, 0), np.int64))
    with pytest.raises(ValueError, match="shape"):
        golden_model.forward(np.zeros((1, 2, 3), np.int64))


def test_missing_model_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        ei.Model.from_pretrained(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        ei.Model.from_pretrained(tmp_path / "missing.gguf")


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        ei.Model.from_pretrained(PYTHIA_STYLE, dtype="int3")
    with pytest.raises(ValueError, match="unknown device"):
        ei.Model.from_pretrained(PYTHIA_STYLE, device="tpu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert"}')
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not supported"):
        ei.Model.from_pretrained(bad)


def test_no_tokenizer_is_runtime_error(golden_model):
    with pytest.raises(RuntimeError, match="no usable tokenizer"):
        golden_model.tokenizer
    with pytest.raises(RuntimeError, match="no usable tokenizer"):
        golden_model.tokenize("hello")


def test_half_precision_outputs_are_float32(golden):
    model = ei.Model.from_pretrained(PYTHIA_STYLE, dtype=np.float16)
    assert model.dtype == "float16"
    ids = golden["input_ids"]
    logits, acts = model.run_with_cache(ids, ["layers.1"])
    assert logits.dtype == np.float32 and acts["layers.1"].dtype == np.float32
    assert max_rel_err(logits, golden["logits"]) < 2e-2
    bf16 = ei.Model.from_pretrained(PYTHIA_STYLE, dtype="bfloat16")
    assert max_rel_err(bf16.forward(ids), golden["logits"]) < 5e-2


def test_threads_share_a_model(golden_model, golden):
    ids = golden["input_ids"]
    expected = golden_model.forward(ids)
    results = [None] * 4

    def work(i):
        results[i] = golden_model.run_with_hooks(ids, {"layers.0": lambda x: None})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_docstrings():
    assert "hook point" in ei.Model.__doc__
    for name in ["from_pretrained", "forward", "run_with_cache", "run_with_hooks", "tokenize"]:
        assert getattr(ei.Model, name).__doc__, name
    assert ei.cache_activations.__doc__ and ei.ActivationCache.__doc__
    assert ei.Tokenizer.decode.__doc__


@DEFAULT_LOG_LEVEL
def test_rust_warnings_reach_stderr(tmp_path, capfd):
    """The core's warnings are logged from import on, as on the command line: here, one
    for sequences past the model's trained context (max_position_embeddings)."""
    ei.make_synthetic_model(tmp_path, {**TINY_CONFIG, "max_position_embeddings": 8})
    model = ei.Model.from_pretrained(tmp_path)
    capfd.readouterr()
    model.forward(np.arange(8))
    assert "longer than" not in capfd.readouterr().err
    model.forward(np.arange(12))
    model.forward(np.arange(12))
    err = capfd.readouterr().err
    assert err.count("sequences of 12 tokens are longer than") == 1, err
    assert "max_position_embeddings 8" in err
    # A tokenizer with more tokens than the model's vocabulary is named at load time.
    ei.make_synthetic_model(tmp_path / "small", {**TINY_CONFIG, "vocab_size": 128})
    ei.Model.from_pretrained(tmp_path / "small", tokenizer=TOKENIZER_JSON)
    err = capfd.readouterr().err
    assert "more than the model's vocabulary of 128: ids past it will be refused" in err, err
