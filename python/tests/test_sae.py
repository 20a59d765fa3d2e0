"""`ei.Sae` against eai-sparsify 1.3.3's own outputs (tests/fixtures/sae/tiny, a skip
transcoder), SAELens files against SAELens's maths (tests/fixtures/sae_lens), file round
trips, argument errors, and the `sae` console script (train + eval on a tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, WIKITEXT, max_rel_err, read_safetensors

TINY = FIXTURES / "sae" / "tiny"
SAE = Path(sys.executable).parent / ("sae.exe" if os.name == "nt" else "sae")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return read_safetensors(TINY / "expected.safetensors")


@pytest.fixture(scope="module")
def sae() -> ei.Sae:
    return ei.Sae.load(TINY)


def test_config_and_shapes(sae):
    assert (sae.d_in, sae.num_latents, sae.k) == (48, 192, 8)
    cfg = sae.cfg
    assert cfg["d_in"] == 48 and cfg["num_latents"] == 192 and cfg["k"] == 8
    assert cfg["activation"] == "topk" and cfg["normalize_decoder"] is True
    assert repr(sae) == "Sae(d_in=48, num_latents=192, k=8)"


def test_encode_decode_forward_match_sparsify(sae, expected):
    x = expected["x"]
    top_acts, top_indices = sae.encode(x)
    assert top_acts.dtype == np.float32 and top_indices.dtype == np.int64
    assert top_acts.shape == top_indices.shape == (x.shape[0], 8)
    np.testing.assert_array_equal(top_indices, expected["top_indices"].astype(np.int64))
    assert max_rel_err(top_acts, expected["top_acts"]) < 1e-5
    # Decoding sparsify's own codes.
    decoded = sae.decode(expected["top_acts"], expected["top_indices"])
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    assert max_rel_err(decoded, expected["decoded"]) < 1e-5
    out = sae.forward(x)
    assert set(out) == {"x_hat", "top_acts", "top_indices", "fvu"}
    assert max_rel_err(out["x_hat"], expected["decoded"]) < 1e-5
    np.testing.assert_array_equal(out["top_indices"], top_indices)
    fvu = float(expected["fvu"][0])
    assert abs(out["fvu"] - fvu) < 1e-5 * fvu
    # float64 and list inputs are converted.
    acts64, _ = sae.encode(x.astype(np.float64))
    np.testing.assert_array_equal(acts64, top_acts)


def test_save_round_trip(sae, expected, tmp_path):
    sae.save(tmp_path / "copy")
    assert sorted(os.listdir(tmp_path / "copy")) == ["cfg.json", "sae.safetensors"]
    again = ei.Sae.load(tmp_path / "copy")
    assert again.cfg == sae.cfg
    original = read_safetensors(TINY / "sae.safetensors")
    saved = read_safetensors(tmp_path / "copy" / "sae.safetensors")
    assert sorted(saved) == sorted(original)
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value)
    x = expected["x"]
    np.testing.assert_array_equal(again.forward(x)["x_hat"], sae.forward(x)["x_hat"])


def test_errors(sae, tmp_path):
    with pytest.raises(FileNotFoundError):
        ei.Sae.load(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="cfg.json is a file: give the SAE's folder"):
        ei.Sae.load(TINY / "cfg.json")
    # A folder of SAE folders (what `sae train` writes) names its SAEs.
    sae.save(tmp_path / "run" / "layers.3")
    sae.save(tmp_path / "run" / "layers.5")
    with pytest.raises(ValueError, match="run holds a folder per SAE, not one SAE: pick one of layers.3, layers.5"):
        ei.Sae.load(tmp_path / "run")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileExistsError, match="a-file"):
        sae.save(tmp_path / "a-file")
    with pytest.raises(ValueError, match=r"\[N, 48\]"):
        sae.encode(np.zeros((3, 47), np.float32))
    with pytest.raises(ValueError, match=r"\[N, 48\]"):
        sae.forward(np.zeros(48, np.float32))
    acts = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        sae.decode(acts, np.full((2, 8), 192))
    with pytest.raises(ValueError, match="out of range"):
        sae.decode(acts, np.full((2, 8), -1))
    with pytest.raises(ValueError, match="latent index 18446744073709551615 is out of range: the SAE has 192"):
        sae.decode(acts, np.full((2, 8), 2**64 - 1, np.uint64))
    with pytest.raises(ValueError, match="integers"):
        sae.decode(acts, np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="same shape|shape"):
        sae.decode(acts, np.zeros((2, 7), np.int64))
    # A cfg.json that does not fit the tensors names the file and tensor.
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((TINY / "cfg.json").read_text())
    cfg["d_in"] = 40
    (bad / "cfg.json").write_text(json.dumps(cfg))
    (bad / "sae.safetensors").write_bytes((TINY / "sae.safetensors").read_bytes())
    with pytest.raises(ValueError, match="encoder.weight"):
        ei.Sae.load(bad)


def test_transcoder_forward_matches_sparsify():
    """sparsify's skip transcoder: `forward(x, y)` predicts y from x (no b_dec subtraction,
    W_skip added) and measures the FVU against y."""
    folder = FIXTURES / "sae" / "skip_transcoder"
    e = read_safetensors(folder / "expected.safetensors")
    sae = ei.Sae.load(folder)
    assert sae.cfg["transcode"] is True and sae.cfg["skip_connection"] is True
    out = sae.forward(e["x"], e["y"])
    np.testing.assert_array_equal(out["top_indices"], e["top_indices"].astype(np.int64))
    assert max_rel_err(out["top_acts"], e["top_acts"]) < 1e-5
    assert max_rel_err(out["x_hat"], e["sae_out"]) < 1e-5
    fvu = float(e["fvu"][0])
    assert abs(out["fvu"] - fvu) < 1e-5 * fvu
    # decode has no skip connection, like sparsify's.
    assert max_rel_err(sae.decode(out["top_acts"], out["top_indices"]), e["decoded"]) < 1e-5
    # Without y the FVU is against x itself (sparsify's default y = x).
    x = e["x"].astype(np.float64)
    direct = ((x - e["sae_out"]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(sae.forward(e["x"])["fvu"] - direct) < 1e-4 * direct
    with pytest.raises(ValueError, match=r"y must have shape \[N, 48\]"):
        sae.forward(e["x"], e["y"][:, :40])
    with pytest.raises(ValueError, match="target has 5 rows, input 20"):
        sae.forward(e["x"], e["y"][:5])


@pytest.mark.parametrize("case,k", [("topk", 5), ("standard", 64), ("jumprelu", 64)])
def test_sae_lens_files_match_sae_lens_maths(case, k, tmp_path):
    """SAELens folders (sae_weights.safetensors) load through `ei.Sae.load`; their codes,
    scattered to dense activations, and reconstructions equal SAELens's maths (numpy)."""
    folder = FIXTURES / "sae_lens" / case
    e = read_safetensors(folder / "expected.safetensors")
    sae = ei.Sae.load(folder)
    assert (sae.d_in, sae.num_latents, sae.k) == (16, 64, k)
    assert sae.cfg["activation"] == {"standard": "relu"}.get(case, case)
    acts, indices = sae.encode(e["x"])
    dense = np.zeros((len(acts), 64))
    np.add.at(dense, (np.arange(len(acts))[:, None], indices), acts)
    assert float(np.abs(dense - e["acts"]).max()) < 1e-5
    assert max_rel_err(sae.decode(acts, indices), e["x_hat"]) < 1e-5
    assert max_rel_err(sae.forward(e["x"])["x_hat"], e["x_hat"]) < 1e-5
    if case == "topk":
        # A TopK SAELens SAE that subtracts b_dec is a sparsify SAE: it saves and reloads.
        sae.save(tmp_path / "as-sparsify")
        again = ei.Sae.load(tmp_path / "as-sparsify")
        np.testing.assert_array_equal(again.forward(e["x"])["x_hat"], sae.forward(e["x"])["x_hat"])
    else:
        with pytest.raises(ValueError, match="no sparsify file format"):
            sae.save(tmp_path / "refused")


def run_sae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SAE), *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_console_script_help():
    assert SAE.exists(), f"console script not installed at {SAE}"
    result = run_sae("--help")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "eval" in result.stdout
    train_help = run_sae("train", "--help")
    assert train_help.returncode == 0
    for option in ["--hookpoints", "--activations", "--k", "--expansion-factor", "--batch-size"]:
        assert option in train_help.stdout
    bad = run_sae("train", "--bogus")
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_sae_main_trains_and_evaluates(tiny_dir, tmp_path, capfd):
    out = tmp_path / "saes"
    common = ["--model", str(tiny_dir), "--data", str(WIKITEXT), "--seq-len", "64", "--forward-batch", "4"]
    status = ei.sae_main(
        ["train", *common, "--hookpoints", "layers.1", "--output", str(out), "--batch-size", "256",
         "--steps", "3", "--k", "4", "--expansion-factor", "2", "--lr-warmup-steps", "1"]
    )
    assert status == 0
    sae = ei.Sae.load(out / "layers.1")
    assert (sae.d_in, sae.num_latents, sae.k) == (32, 64, 4)
    report = tmp_path / "eval.json"
    status = ei.sae_main(["eval", *common, "--sae", str(out), "--tokens", "128", "--json", str(report)])
    assert status == 0
    text, _ = capfd.readouterr()
    assert "CE recov" in text
    rows = json.loads(report.read_text())["saes"]
    assert [r["hookpoint"] for r in rows] == ["layers.1"]
    assert 0 < rows[0]["l0"] <= 4
    # Errors: status 1 and a message.
    assert ei.sae_main(["eval", *common, "--sae", str(tmp_path / "none")]) == 1
    _, err = capfd.readouterr()
    assert err.startswith("error: ")
