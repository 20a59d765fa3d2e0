"""The lens API: tuned-lens's own lens file applied here gives tuned-lens's outputs and
metrics, the logit lens is the model's own decoding, training lowers the loss and resumes
exactly (also across Python and the `lens` command), and mistakes raise clear errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, PYTHIA_STYLE, TOKENIZER_JSON, WIKITEXT, max_rel_err, read_safetensors

REFERENCE = FIXTURES / "tuned_lens" / "pythia_style"
LENS = Path(sys.executable).parent / ("lens.exe" if os.name == "nt" else "lens")

# A model that trains in seconds (as lens/tests/tuned_lens.rs): 3 layers of width 32 and the
# real Pythia tokenizer, over WikiText-2 in sequences of 64 tokens, 512 tokens per step.
TRAIN_CONFIG = {
    "model_type": "gpt_neox",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "rotary_pct": 0.5,
    "vocab_size": 50304,
    "eos_token_id": 0,
}
SEQ = 64
TRAIN: dict[str, Any] = dict(data=[WIKITEXT], steps=6, tokens_per_step=512, seq_len=SEQ, batch_size=4, chunk_tokens=128)


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """Outputs of tuned-lens 0.2.0 with this lens on the pythia_style model."""
    return read_safetensors(REFERENCE / "expected.safetensors")


@pytest.fixture(scope="module")
def reference_lens() -> ei.TunedLens:
    return ei.TunedLens.load(REFERENCE)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lens-model")
    ei.make_synthetic_model(folder, TRAIN_CONFIG, tokenizer=TOKENIZER_JSON)
    return folder


@pytest.fixture(scope="module")
def train_model(train_dir) -> ei.Model:
    return ei.Model.from_pretrained(train_dir)


@pytest.fixture(scope="module")
def trained(train_model, tmp_path_factory):
    """A lens trained for 6 steps with a checkpoint folder, and the per-step callbacks."""
    out = tmp_path_factory.mktemp("trained") / "lens"
    records: list[dict[str, Any]] = []
    lens = ei.TunedLens.train(train_model, output=out, checkpoint_every=2, callback=records.append, **TRAIN)
    return lens, out, records


def test_reference_lens_file_gives_tuned_lens_outputs(reference_lens, golden_model, expected):
    lens = reference_lens
    assert (lens.num_layers, lens.d_model, len(lens)) == (2, 64, 2)
    assert lens.config["lens_type"] == "linear_tuned_lens"
    assert lens.config["base_model_name_or_path"] == "tests/fixtures/gpt_neox/pythia_style"
    lens.check_model(golden_model)  # tuned-lens's own hash is not checked: no error
    logit_lens = ei.LogitLens(golden_model)
    for i in range(2):
        h = expected[f"hidden.{i}"]
        assert max_rel_err(lens.transform_hidden(h, i), expected[f"transformed.{i}"]) < 1e-5
        assert max_rel_err(lens.forward(h, i, golden_model), expected[f"tuned_logits.{i}"]) < 1e-4
        assert max_rel_err(lens(h, i, golden_model), expected[f"tuned_logits.{i}"]) < 1e-4
        assert max_rel_err(logit_lens.forward(h, i), expected[f"logit_lens_logits.{i}"]) < 1e-4
        assert max_rel_err(logit_lens(h), expected[f"logit_lens_logits.{i}"]) < 1e-4
        # Any leading shape: one row at a time gives the same values.
        row = lens.forward(h.reshape(-1, 64)[3], i, golden_model)
        assert row.shape == (128,)
        np.testing.assert_allclose(row, lens.forward(h, i, golden_model).reshape(-1, 128)[3], rtol=1e-5, atol=1e-5)
    state = lens.state_dict()
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert state["0.weight"].shape == (64, 64) and state["1.bias"].dtype == np.float32


def test_evaluate_lens_matches_tuned_lens_metrics(reference_lens, golden_model, expected, tmp_path):
    # The fixture's two 11-token sequences as a pre-tokenized dataset (rows are sequences).
    ids = tmp_path / "ids.npy"
    np.save(ids, expected["input_ids"].astype(np.int64))
    report = ei.evaluate_lens(golden_model, reference_lens, data=ids, tokens=22, seq_len=11, chunk_tokens=7)
    assert report["tokens"] == 22
    assert report["nats_to_bits_per_byte"] is None  # token ids: no text bytes
    metrics = json.loads((REFERENCE / "metrics.json").read_text())["layers"]
    tuned, logit = report["tuned_lens"], report["logit_lens"]
    assert [row["layer"] for row in tuned] == ["0", "1", "output"]
    for i in range(2):
        m = metrics[str(i)]
        for key, ours in [("tuned_kl", tuned[i]["kl"]), ("tuned_ce", tuned[i]["ce"]),
                          ("tuned_entropy", tuned[i]["entropy"]), ("tuned_top1", tuned[i]["top1_agreement"]),
                          ("logit_kl", logit[i]["kl"]), ("logit_ce", logit[i]["ce"]),
                          ("logit_entropy", logit[i]["entropy"]), ("logit_top1", logit[i]["top1_agreement"])]:
            assert ours == pytest.approx(m[key], rel=1e-4, abs=1e-4), (i, key)
    assert tuned[2]["kl"] == pytest.approx(0, abs=1e-9) and tuned[2]["top1_agreement"] == 1.0
    assert "tuned lens" in report["table"] and "output" in report["table"]
    # Prediction depths: the histograms of the fixture's per-token depths.
    for lens_name in ["tuned", "logit"]:
        per_token = expected[f"{lens_name}_depth"].ravel()
        depth = report[f"{lens_name}_lens_depth"]
        assert depth["counts"] == np.bincount(per_token, minlength=3).tolist(), lens_name
        assert depth["mean"] == pytest.approx(per_token.mean(), abs=1e-12)
    assert "prediction depth" in report["table"]
    only_logit = ei.evaluate_lens(golden_model, data=[ids], tokens=22, seq_len=11)
    assert only_logit["tuned_lens"] is None and only_logit["logit_lens"][0]["kl"] == pytest.approx(logit[0]["kl"])
    assert only_logit["tuned_lens_depth"] is None and only_logit["logit_lens_depth"] == report["logit_lens_depth"]
    # Per token, from each sequence's prediction trajectory.
    for row, sequence in enumerate(expected["input_ids"]):
        for lens, key in [(reference_lens, "tuned_depth"), (None, "logit_depth")]:
            trajectory = ei.PredictionTrajectory.from_lens_and_model(lens, golden_model, sequence, top_k=1)
            depth = trajectory.prediction_depth()
            assert depth.dtype == np.int64 and depth.tolist() == expected[key][row].tolist(), (key, row)


def test_untrained_lens_is_the_logit_lens_and_the_logit_lens_is_the_model(golden_model, expected):
    lens = ei.TunedLens.for_model(golden_model)
    assert lens.config["unembed_hash"].startswith("ei-fnv1a64:")
    assert all(not v.any() for v in lens.state_dict().values())
    logit_lens = ei.LogitLens.from_model(golden_model)
    h = np.random.default_rng(0).normal(size=(3, 5, 64)).astype(np.float32)
    for i in range(2):
        np.testing.assert_array_equal(lens.transform_hidden(h, i), h)
        np.testing.assert_array_equal(lens.forward(h, i, golden_model), logit_lens.forward(h, i))
    # The last layer's output through the logit lens: the model's logits, bit for bit.
    ids = expected["input_ids"]
    logits, acts = golden_model.run_with_cache(ids, ["layers.1"])
    np.testing.assert_array_equal(logit_lens(acts["layers.1"]), logits)
    assert logit_lens.model is not None and "pythia_style" in repr(logit_lens)


def test_save_load_round_trip(reference_lens, golden_model, expected, tmp_path):
    reference_lens.save(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "params.safetensors"]
    again = ei.TunedLens.load(tmp_path / "ours", device="cpu")
    assert again.config == reference_lens.config
    for key, value in reference_lens.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[key], value)
    h = expected["hidden.1"]
    np.testing.assert_array_equal(again.forward(h, 1, golden_model), reference_lens.forward(h, 1, golden_model))
    saved = read_safetensors(tmp_path / "ours" / "params.safetensors")
    np.testing.assert_array_equal(saved["1.weight"], reference_lens.state_dict()["1.weight"])


def test_export_reference(reference_lens, golden_model, tmp_path, monkeypatch):
    try:
        import torch  # noqa: F401
    except ImportError:
        torch = None
    if torch is not None:
        out = tmp_path / "exported"
        ours = ei.TunedLens.for_model(golden_model)
        ours.export_reference(out)
        config = json.loads((out / "config.json").read_text())
        assert config["unembed_hash"] is None and config["d_model"] == 64
        state = torch.load(out / "params.pt")
        assert list(state) == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert state["0.weight"].dtype == torch.float32
        loaded = ei.TunedLens.load(out)
        for key, value in ours.state_dict().items():
            np.testing.assert_array_equal(loaded.state_dict()[key], value)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.pt"]

    # Without PyTorch installed too: a stand-in that pickles what it is given.
    def pickling_save(obj, f):
        with open(f, "wb") as file:
            pickle.dump(dict(obj), file)

    def failing_save(obj, f):
        with open(f, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    stand_in = types.ModuleType("torch")
    stand_in.from_numpy, stand_in.save = np.asarray, pickling_save
    monkeypatch.setitem(sys.modules, "torch", stand_in)
    out = tmp_path / "stand-in"
    reference_lens.export_reference(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.pt"]
    with open(out / "params.pt", "rb") as file:
        saved = pickle.load(file)
    assert list(saved) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    # In tuned-lens's orientation (PyTorch Linear, [out, in]): h + h Wᵀ + b gives what
    # tuned-lens computed with the fixture's lens.
    expected = read_safetensors(REFERENCE / "expected.safetensors")
    for i in range(2):
        h = expected[f"hidden.{i}"]
        w, b = np.asarray(saved[f"{i}.weight"]), np.asarray(saved[f"{i}.bias"])
        assert max_rel_err(h + h @ w.T + b, expected[f"transformed.{i}"]) < 1e-5
    # torch.save failing leaves the folder as it was, and its exception is raised.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    stand_in.save = failing_save
    with pytest.raises(OSError, match="disk full"):
        ei.TunedLens.for_model(golden_model).export_reference(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    with pytest.raises(ImportError, match="needs PyTorch.*pip install torch.*save()"):
        reference_lens.export_reference(tmp_path / "no-torch")
    assert not (tmp_path / "no-torch" / "params.pt").exists()


def test_bad_arguments(reference_lens, golden_model, tiny_model, expected, tmp_path):
    h = expected["hidden.0"]
    config = tmp_path / "config.json"
    config.write_text("{}")
    with pytest.raises(ValueError, match="config.json is a file: give the lens's folder"):
        ei.TunedLens.load(config)
    with pytest.raises(ValueError, match="layer 2 is out of range: the lens has 2 translators"):
        reference_lens.forward(h, 2, golden_model)
    with pytest.raises(ValueError, match="layer -1 is out of range"):
        reference_lens.transform_hidden(h, -1)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 64\]"):
        reference_lens.transform_hidden(np.zeros((2, 32), np.float32), 0)
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 32\]"):
        ei.LogitLens(tiny_model).forward(h)
    # A lens for another model.
    with pytest.raises(ValueError, match="lens is for d_model 64 with 2 layers .* has d_model 32 with 2 layers"):
        reference_lens.forward(h, 0, tiny_model)
    with pytest.raises(ValueError, match="lens is for d_model 64"):
        ei.evaluate_lens(tiny_model, reference_lens, data=[WIKITEXT], tokens=64, seq_len=16)
    # Same shape, other unembedding: caught by the fingerprint of lenses made here.
    other_dir = tmp_path / "other"
    config = json.loads((PYTHIA_STYLE / "config.json").read_text())
    config["vocab_size"] = 96
    ei.make_synthetic_model(other_dir, config)
    other = ei.Model.from_pretrained(other_dir)
    ours = ei.TunedLens.for_model(golden_model)
    ours.check_model(golden_model)
    with pytest.raises(ValueError, match="trained with another unembedding"):
        ours.forward(h, 0, other)
    with pytest.raises(ValueError, match="trained with another unembedding"):
        ours.check_model(other)
    # Missing or wrong lens folders.
    with pytest.raises(FileNotFoundError):
        ei.TunedLens.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((REFERENCE / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no params.safetensors or params.pt"):
        ei.TunedLens.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        ei.TunedLens.train(golden_model, data=[WIKITEXT], optimizer="lbfgs")
    with pytest.raises(ValueError, match="unknown decode dtype 'f16'"):
        ei.TunedLens.train(golden_model, data=[WIKITEXT], decode_dtype="f16")
    with pytest.raises(TypeError, match="data .* or activations"):
        ei.TunedLens.train(golden_model)
    with pytest.raises(TypeError, match="data .* or activations"):
        ei.evaluate_lens(golden_model)


def test_bf16_decoding_tracks_f32(train_model):
    """bf16 lens decoding (tuned-lens's autocast precision) against f32 on the same data."""
    short = {**TRAIN, "steps": 2}
    f32 = ei.TunedLens.train(train_model, decode_dtype="f32", **short).history
    bf16 = ei.TunedLens.train(train_model, decode_dtype="bf16", **short).history
    for a, b in zip(f32, bf16):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=2e-3, atol=1e-5)


def test_training_lowers_the_loss_and_saves(trained, train_model, tmp_path):
    lens, out, records = trained
    assert [r["step"] for r in records] == list(range(1, 7))
    assert lens.history == records
    assert all(len(r["loss"]) == 3 and r["grad_norm"] > 0 and r["lr"] > 0 for r in records)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params.safetensors", "training"]
    assert json.loads((out / "training" / "history.json").read_text()) == records
    loaded = ei.TunedLens.load(out)
    for key, value in lens.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
    assert loaded.config["base_model_name_or_path"] == train_model.origin
    # The training loss (KL to the model's output) per layer, on the same tokens before
    # training (the logit lens: an untrained lens equals it) and after: lower at every layer.
    report = ei.evaluate_lens(train_model, lens, data=[WIKITEXT], tokens=256, seq_len=SEQ, batch_size=4)
    assert report["tokens"] == 256 and report["nats_to_bits_per_byte"] > 0
    for i in range(3):
        assert report["tuned_lens"][i]["kl"] < report["logit_lens"][i]["kl"], (i, report["table"])
    # Calling again with the same output: the finished checkpoint is reused, nothing runs.
    again = ei.TunedLens.train(train_model, output=out, checkpoint_every=2, **TRAIN)
    assert again.history == records


def test_interrupted_training_resumes_exactly_and_the_cli_agrees(trained, train_model, train_dir, tmp_path):
    lens, _, _ = trained
    out = tmp_path / "interrupted"
    seen = []

    def stop_after_three(record):
        seen.append(record["step"])
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ei.TunedLens.train(train_model, output=out, checkpoint_every=1, callback=stop_after_three, **TRAIN)
    assert seen == [1, 2, 3]  # stopped before step 4
    assert (out / "training" / "checkpoint.safetensors").exists()
    assert not (out / "params.safetensors").exists()
    # The `lens` command resumes the Python run and ends where an uninterrupted run ends.
    status = ei.lens_main([
        "train", "--model", str(train_dir), "--data", str(WIKITEXT), "--output", str(out),
        "--steps", "6", "--tokens-per-step", "512", "--seq-len", str(SEQ), "--batch-size", "4",
        "--chunk-tokens", "128", "--checkpoint-every", "1",
    ])
    assert status == 0
    resumed = ei.TunedLens.load(out)
    for key, value in lens.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


def test_training_from_an_activation_cache(train_model, golden_model, tmp_path):
    cache = tmp_path / "acts"
    ei.cache_activations(train_model, ["embed", "layers.*"], data=[WIKITEXT], output=cache,
                         seq_len=SEQ, batch_size=4, max_tokens=512)
    lens = ei.TunedLens.train(train_model, activations=cache, steps=1, tokens_per_step=512, seq_len=SEQ,
                              chunk_tokens=256, optimizer="adam", loss="ce")
    assert len(lens.history) == 1 and lens.num_layers == 3
    assert any(v.any() for v in lens.state_dict().values())
    # tuned-lens's PR #141 recipe: Muon and AdamW at 0.01 x lr, linear decay, no warm-up.
    muon = ei.TunedLens.train(train_model, activations=cache, steps=2, tokens_per_step=256, seq_len=SEQ,
                              chunk_tokens=256, optimizer="muon", lr=2.0)
    assert [r["lr"] for r in muon.history] == pytest.approx([0.02, 0.01])
    assert all(v.any() for v in muon.state_dict().values())
    report = ei.evaluate_lens(train_model, lens, activations=cache, tokens=128, seq_len=SEQ)
    assert report["tokens"] == 128 and report["nats_to_bits_per_byte"] is None
    # Without seq_len, a cache is read in the sequences it was made with (2048 would not fit).
    assert ei.evaluate_lens(train_model, lens, activations=cache, tokens=128) == report
    partial = tmp_path / "partial"
    ei.cache_activations(train_model, ["layers.0"], data=[WIKITEXT], output=partial, seq_len=SEQ, max_tokens=128)
    with pytest.raises(ValueError, match="lacks hook point 'embed'"):
        ei.TunedLens.train(train_model, activations=partial, steps=1, tokens_per_step=64, seq_len=SEQ)
    # Refused before the first step: the cache's size is known.
    with pytest.raises(ValueError, match="the data holds 512 tokens, but 1 steps x 1024 tokens per step need 1024"):
        ei.TunedLens.train(train_model, activations=cache, steps=1, tokens_per_step=1024, seq_len=SEQ)
    # The cache's sequence length and width are checked against the arguments and the model.
    with pytest.raises(ValueError, match=f"holds sequences of {SEQ} tokens, not {2 * SEQ}"):
        ei.evaluate_lens(train_model, lens, activations=cache, tokens=128, seq_len=2 * SEQ)
    with pytest.raises(ValueError, match="holds embed with width 32 .* but this model's width is 64"):
        ei.TunedLens.train(golden_model, activations=cache, steps=1, tokens_per_step=64, seq_len=SEQ)
    with pytest.raises(ValueError, match="learning rate must be positive, got -1"):
        ei.TunedLens.train(train_model, activations=cache, steps=1, tokens_per_step=64, seq_len=SEQ, lr=-1.0)


def test_lens_console_script(golden_model, tmp_path):
    assert LENS.exists(), f"console script not installed at {LENS}"
    result = subprocess.run([str(LENS), "--help"], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "eval" in result.stdout
    bad = subprocess.run([str(LENS), "eval", "--model", str(PYTHIA_STYLE), "--lens", str(tmp_path / "nope"),
                          "--data", str(WIKITEXT)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


def test_ctrl_c_stops_training_between_steps(train_model, tmp_path):
    out = tmp_path / "ctrl-c"
    # SIGINT while Rust runs the steps (GIL released, no callback): noticed before the next step.
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    # A process started in the background by a shell inherits SIGINT as ignored: install
    # Python's handler explicitly so the test does not depend on how it was launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            ei.TunedLens.train(train_model, output=out, checkpoint_every=1, **{**TRAIN, "steps": 30})
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 20
    assert not (out / "params.safetensors").exists()  # stopped, not finished
