"""Training SAEs from Python: `ei.Sae.train` gives exactly the SAE and per-step FVUs of
`sae train` on the same rows and seed; `ei.SaeTrainer` lowers the FVU on planted sparse
data, continues an existing SAE and trains transcoders; bad input raises ValueError with
the Rust message."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import DEFAULT_LOG_LEVEL, WIKITEXT, read_safetensors


def planted(rows: int, seed: int, d: int = 16, atoms: int = 32, active: int = 3) -> np.ndarray:
    """Rows that are a mean plus `active` random unit atoms of a fixed dictionary (seed 0)
    with coefficients in [1, 3), plus a little noise."""
    dictionary = np.random.default_rng(0).normal(size=(atoms, d))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, atoms, size=(rows, active))
    coefs = rng.uniform(1.0, 3.0, size=(rows, active, 1))
    x = 0.5 + (coefs * dictionary[picks]).sum(1) + 0.01 * rng.normal(size=(rows, d))
    return x.astype(np.float32)


@pytest.mark.parametrize("skip", [0, 1])
def test_python_training_equals_sae_train(tiny_dir, tmp_path, skip):
    cache = tmp_path / "cache"
    ei.cache_activations(tiny_dir, ["layers.1"], WIKITEXT, cache, seq_len=64, max_tokens=1024)
    out = tmp_path / "cli"
    status = ei.sae_main(
        ["train", "--activations", str(cache), "--hookpoints", "layers.1", "--output", str(out),
         "--batch-size", "256", "--num-latents", "256", "--k", "4", "--lr", "0.01",
         "--lr-warmup-steps", "1", "--seed", "7", "--shuffle-buffer", "1024", "--multi-topk",
         "--auxk-alpha", "0.03125", "--dead-feature-threshold", "0", "--skip-first-positions", str(skip)]
    )
    assert status == 0
    # The rows in the order `sae train` reads them: the same reader, seed, buffer and skip.
    batches = ei.ActivationCache(cache).batches(
        256, shuffle=True, seed=7, buffer_tokens=1024, skip_first_positions=skip
    )
    rows = np.concatenate([b["layers.1"] for b in batches])
    assert rows.shape == (16 * (64 - skip), 32)
    records = []
    sae = ei.Sae.train(
        rows, batch_size=256, k=4, num_latents=256, lr=0.01, lr_warmup_steps=1, seed=7, multi_topk=True,
        auxk_alpha=1 / 32, dead_feature_threshold=0, callback=records.append,
    )
    assert isinstance(sae, ei.Sae) and sae.cfg["multi_topk"] is True
    history = json.loads((out / "checkpoints" / "layers.1" / "history.json").read_text())
    assert len(records) == len(history) == (4 if skip == 0 else 3)
    for ours, theirs in zip(records, history):
        assert ours == theirs
    if skip == 0:
        assert any(r["auxk_loss"] > 0 for r in records), "some latents died, so AuxK ran"
    sae.save(tmp_path / "py")
    cli = read_safetensors(out / "layers.1" / "sae.safetensors")
    py = read_safetensors(tmp_path / "py" / "sae.safetensors")
    assert sorted(cli) == sorted(py)
    for name in cli:
        np.testing.assert_array_equal(py[name], cli[name], err_msg=name)
    assert json.loads((tmp_path / "py" / "cfg.json").read_text()) == json.loads(
        (out / "layers.1" / "cfg.json").read_text()
    )


def test_trainer_lowers_the_fvu_and_continues_an_sae():
    x = planted(150 * 128, seed=1)
    trainer = ei.SaeTrainer(16, steps=150, k=4, num_latents=64, lr=1e-2, lr_warmup_steps=10, seed=0)
    assert repr(trainer) == "SaeTrainer(d_in=16, num_latents=64, k=4, steps_done=0/150)"
    records = [trainer.step(x[i * 128:(i + 1) * 128]) for i in range(150)]
    assert set(records[0]) == {"step", "fvu", "auxk_loss", "multi_topk_fvu", "l0", "dead_fraction", "lr"}
    assert [r["step"] for r in records] == list(range(1, 151))
    assert records[0]["lr"] == 0.0 and all(r["l0"] <= 4 for r in records)
    first, last = records[0]["fvu"], np.mean([r["fvu"] for r in records[-10:]])
    assert last < 0.4 * first, (first, last)
    assert trainer.steps_done == 150 and 0.0 <= trainer.dead_fraction <= 1.0
    sae = trainer.sae
    assert (sae.d_in, sae.num_latents, sae.k) == (16, 64, 4)
    heldout = planted(2048, seed=2)
    assert sae.forward(heldout)["fvu"] < 0.4 * first
    # The same rows through fit: the same SAE.
    again = ei.SaeTrainer(16, steps=150, k=4, num_latents=64, lr=1e-2, lr_warmup_steps=10, seed=0)
    fitted = again.fit(x, batch_size=128)
    assert fitted == records
    np.testing.assert_array_equal(again.sae.forward(heldout)["x_hat"], sae.forward(heldout)["x_hat"])
    # Training an existing SAE further (its shape comes from it).
    more = ei.SaeTrainer(sae, steps=20, lr=1e-3, lr_warmup_steps=1)
    more.fit(planted(20 * 128, seed=3), batch_size=128)
    assert more.steps_done == 20
    # An existing SAE keeps its biases: a first step at lr 0 leaves it as it was (a new
    # SAE's first step sets b_dec to the batch mean).
    kept = ei.SaeTrainer(sae, steps=5, lr_warmup_steps=2)
    assert kept.step(planted(128, seed=4))["lr"] == 0.0
    np.testing.assert_allclose(kept.sae.forward(heldout)["x_hat"], sae.forward(heldout)["x_hat"], atol=1e-5)
    with pytest.raises(ValueError, match="describe a new SAE"):
        ei.SaeTrainer(sae, steps=20, k=8)


@DEFAULT_LOG_LEVEL
def test_sae_train_warns_of_a_sparsify_batch_size_and_of_ending_in_the_warm_up(tiny_dir, tmp_path, capfd):
    """`--batch-size` counts tokens here and sequences in sparsify, a run shorter than the
    learning-rate warm-up never trains at full rate, and one shorter than --k-decay-steps
    ends before k has decayed: each is said."""
    cache = tmp_path / "cache"
    ei.cache_activations(tiny_dir, ["layers.1"], WIKITEXT, cache, seq_len=64, max_tokens=256)
    capfd.readouterr()
    status = ei.sae_main(
        ["train", "--activations", str(cache), "--output", str(tmp_path / "out"), "--batch-size", "32",
         "--steps", "2", "--num-latents", "64", "--k", "4", "--k-decay-steps", "5"]
    )
    assert status == 0
    err = capfd.readouterr().err
    assert ("--batch-size counts tokens per step (sparsify's counts sequences): "
            "32 tokens is less than one sequence of 64") in err
    assert "the run ends inside its 1000-step learning-rate warm-up (2 steps)" in err
    assert "--k-decay-steps 5 is not less than the run's 2 steps: its last step will not have decayed to --k 4" in err


def test_one_trainer_shared_between_threads():
    """Steps from two threads and reads from a third wait for each other (pyo3 raised
    "Already borrowed" when a call came in during another thread's step)."""
    x = planted(40 * 128, seed=8)
    trainer = ei.SaeTrainer(16, steps=40, k=4, num_latents=64, lr=1e-2, lr_warmup_steps=5, seed=0)
    errors, seen = [], []
    start = threading.Barrier(3)

    def steps(offset):
        start.wait()
        try:
            for i in range(offset, 40, 2):
                trainer.step(x[i * 128:(i + 1) * 128])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reads():
        start.wait()
        try:
            while trainer.steps_done < 40 and not errors:
                seen.append(trainer.steps_done)
                assert trainer.sae.num_latents == 64 and "SaeTrainer(" in repr(trainer)
                assert 0.0 <= trainer.dead_fraction <= 1.0
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=steps, args=(o,), daemon=True) for o in (0, 1)]
    threads.append(threading.Thread(target=reads, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
    assert not errors, errors
    assert trainer.steps_done == 40
    assert seen == sorted(seen), seen  # may be empty: the reads may start after the last step


def test_bf16_encoder_product_trains_as_well_as_f32():
    """`encoder_dtype="bf16"` (the default on a GPU) rounds the encoder product to bf16: a
    different SAE, with about the same FVU as f32 (the CPU's default under "auto")."""
    x = planted(60 * 128, seed=6)
    runs = {dtype: ei.Sae.train(x, batch_size=128, k=4, num_latents=64, lr=1e-2, lr_warmup_steps=5, seed=0,
                                encoder_dtype=dtype) for dtype in ["auto", "f32", "bf16"]}
    heldout = planted(2048, seed=7)
    out = {dtype: sae.forward(heldout) for dtype, sae in runs.items()}
    np.testing.assert_array_equal(out["auto"]["x_hat"], out["f32"]["x_hat"])
    assert not np.array_equal(out["bf16"]["x_hat"], out["f32"]["x_hat"])
    assert abs(out["bf16"]["fvu"] - out["f32"]["fvu"]) < 0.05 * out["f32"]["fvu"], (out["bf16"]["fvu"], out["f32"]["fvu"])


def test_transcoder_takes_its_target():
    x = planted(512, seed=4)
    y = np.tanh(x[:, ::-1]).copy()
    trainer = ei.SaeTrainer(16, steps=4, k=4, num_latents=64, transcode=True, lr_warmup_steps=1, lr=1e-2)
    with pytest.raises(ValueError, match="transcoder learns y from x"):
        trainer.step(x[:128])
    first = trainer.step(x[:128], y[:128])
    # Zero decoder at init: the first prediction is the target's mean, FVU 1.
    assert abs(first["fvu"] - 1.0) < 1e-5
    records = trainer.fit(x[128:], y[128:], batch_size=128)
    assert [r["step"] for r in records] == [2, 3, 4]
    assert trainer.sae.cfg["transcode"] is True
    plain = ei.SaeTrainer(16, steps=4, k=4, num_latents=64)
    with pytest.raises(ValueError, match="y is only for transcoders"):
        plain.step(x[:128], y[:128])


def test_skip_transcoder_learns_a_linear_map_through_w_skip(tmp_path):
    """`skip_connection=True` trains `W_skip` with the rest: on a target that is mostly a
    linear map of the input, the skip transcoder explains far more of it than a plain one,
    and its file carries the trained `W_skip [d, d]`."""
    x = planted(40 * 128, seed=8)
    a = np.random.default_rng(9).normal(size=(16, 16)).astype(np.float32) / 4.0
    y = (x @ a + 0.1 * np.tanh(x[:, ::-1])).astype(np.float32)
    common = dict(batch_size=128, k=4, num_latents=64, transcode=True, lr=1e-2, lr_warmup_steps=5, seed=0)
    skip = ei.Sae.train(x, y, skip_connection=True, **common)
    plain = ei.Sae.train(x, y, **common)
    assert skip.cfg["skip_connection"] is True and plain.cfg["skip_connection"] is False
    heldout = planted(1024, seed=10)
    target = (heldout @ a + 0.1 * np.tanh(heldout[:, ::-1])).astype(np.float32)
    fvu_skip, fvu_plain = skip.forward(heldout, target)["fvu"], plain.forward(heldout, target)["fvu"]
    assert fvu_skip < 0.5 * fvu_plain, (fvu_skip, fvu_plain)
    skip.save(tmp_path / "skip")
    w_skip = read_safetensors(tmp_path / "skip" / "sae.safetensors")["W_skip"]
    assert w_skip.shape == (16, 16) and np.abs(w_skip).max() > 0.05


def test_muon_lowers_the_fvu_on_planted_data():
    """sparsify's Muon recipe (`optimizer="muon"`) trains too; at this toy size it wants a
    larger rate than its default 2e-3 (seen: final FVU 0.10 at lr 3e-2, 0.15 with Adam at
    1e-2, from 0.50)."""
    x = planted(150 * 128, seed=11)
    trainer = ei.SaeTrainer(16, steps=150, k=4, num_latents=64, lr_warmup_steps=10, seed=0,
                            optimizer="muon", lr=3e-2)
    records = trainer.fit(x, batch_size=128)
    first, last = records[0]["fvu"], np.mean([r["fvu"] for r in records[-10:]])
    assert last < 0.3 * first, (first, last)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        ei.SaeTrainer(16, steps=1, optimizer="sgd")


def test_k_decay_is_recorded_per_step():
    """`k_decay_steps`: k falls linearly from min(num_latents, 10 d_in) = 64 to k = 4."""
    x = planted(6 * 128, seed=12)
    trainer = ei.SaeTrainer(16, steps=6, k=4, num_latents=64, k_decay_steps=4, lr=1e-2, lr_warmup_steps=1)
    records = trainer.fit(x, batch_size=128)
    assert [r["k"] for r in records] == [64, 49, 34, 19, 4, 4]
    assert all(r["l0"] <= r["k"] for r in records) and trainer.sae.k == 4


def test_bad_input_raises_value_error_with_the_message():
    x = planted(256, seed=5)
    trainer = ei.SaeTrainer(16, steps=10, k=4, num_latents=64)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 16\], got shape \[256, 15\]"):
        trainer.step(x[:, :15])
    poisoned = x.copy()
    poisoned[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value \(NaN\) at row 3, column 2"):
        trainer.step(poisoned)
    assert trainer.steps_done == 0, "a refused batch changes nothing"
    trainer.step(x)
    with pytest.raises(ValueError, match=r"k = 100 must be between 1 and the number of latents \(64\)"):
        ei.SaeTrainer(16, steps=10, k=100, num_latents=64)
    with pytest.raises(ValueError, match=r"k = 100 must be between 1 and the number of latents \(64\)"):
        ei.Sae.train(x, batch_size=128, k=100, num_latents=64)
    with pytest.raises(ValueError, match="learning rate must be positive"):
        ei.SaeTrainer(16, steps=10, lr=-1.0)
    # 0 is not "the default": that is None.
    with pytest.raises(ValueError, match=r"num_latents must be positive; leave it out \(None\)"):
        ei.SaeTrainer(16, steps=10, num_latents=0)
    with pytest.raises(ValueError, match="unknown encoder dtype 'f16' \\(expected auto, bf16 or f32\\)"):
        ei.SaeTrainer(16, steps=10, encoder_dtype="f16")
    with pytest.raises(ValueError, match="steps, tokens per step and chunk size must be positive"):
        ei.SaeTrainer(16, steps=0)
    with pytest.raises(ValueError, match="x has 256 rows: not enough for one step of 512 rows"):
        ei.Sae.train(x, batch_size=512)
    with pytest.raises(ValueError, match="x has 256 rows: not enough for 3 steps of 128 rows"):
        ei.SaeTrainer(16, steps=3, k=4, num_latents=64).fit(x, batch_size=128, steps=3)
    with pytest.raises(ValueError, match=r"x must have shape \[N, d_in\]"):
        ei.Sae.train(x[0], batch_size=16)
    with pytest.raises(ValueError, match="an int"):
        ei.SaeTrainer("layers.3", steps=3)
    with pytest.raises(ValueError, match="the training batch has no rows"):
        trainer.step(x[:0])
    with pytest.raises(ValueError, match=r"the batch has no variance"):
        trainer.step(np.ones_like(x))
    assert trainer.steps_done == 1
    with pytest.raises(ValueError, match=r"non-finite value \(NaN\) at row 3, column 2"):
        trainer.sae.encode(poisoned)
    with pytest.raises(ValueError, match="too many latents"):
        ei.SaeTrainer(16, steps=3, expansion_factor=2**60)
    with pytest.raises(ValueError, match="cannot allocate a 2147483648 x 2147483648 encoder"):
        ei.SaeTrainer(2**31, steps=3, num_latents=2**31)


def test_fit_callback_can_use_the_trainer(tmp_path):
    x = planted(3 * 128, seed=6)
    trainer = ei.SaeTrainer(16, steps=3, k=4, num_latents=64)
    seen = []

    def checkpoint(record):
        seen.append(trainer.steps_done)
        trainer.sae.save(tmp_path / f"step{record['step']}")

    trainer.fit(x, batch_size=128, callback=checkpoint)
    assert seen == [1, 2, 3]
    saved = ei.Sae.load(tmp_path / "step3")
    for a, b in zip(saved.encode(x), trainer.sae.encode(x)):
        np.testing.assert_array_equal(a, b)
