"""ei.PredictionTrajectory: statistics equal a direct numpy computation from the lens's
logits, exports and figures are valid, and the `lens plot` / `lens sweep` commands write
their files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import TINY_CONFIG, TOKENIZER_JSON, WIKITEXT

TEXT = "The river flows north into the lake"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def png_size(path: Path) -> tuple[int, int]:
    raw = Path(path).read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_statistics_equal_direct_computation(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    t = ei.PredictionTrajectory.from_lens_and_model(None, tiny_model, ids, top_k=4)
    assert t.layers == ["0", "1", "output"]
    assert t.lens == "logit lens" and t.input_ids == list(ids)
    assert t.tokens[1] == "␣river"
    logits, acts = tiny_model.run_with_cache(ids, hookpoints=["embed", "layers.0"])
    logit_lens = ei.LogitLens(tiny_model)
    rows = [log_softmax(logit_lens(acts["embed"])), log_softmax(logit_lens(acts["layers.0"])), log_softmax(logits)]
    final = rows[-1]
    for layer, log_q in enumerate(rows):
        q = np.exp(log_q)
        np.testing.assert_allclose(t.entropy()[layer], -(q * log_q).sum(-1), rtol=1e-4, atol=1e-5)
        kl = (np.exp(final) * (final - log_q)).sum(-1)
        np.testing.assert_allclose(t.forward_kl()[layer], kl, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(t.max_probability()[layer], q.max(-1), rtol=1e-4)
        assert t.top1_ids[layer] == list(log_q.argmax(-1))
        targets = np.asarray(ids[1:])
        target_lq = log_q[np.arange(len(targets)), targets]
        np.testing.assert_allclose(t.cross_entropy()[layer][:-1], -target_lq, rtol=1e-4)
        lower = 1 + (log_q[:-1] > target_lq[:, None] + 1e-5).sum(-1)
        upper = 1 + (log_q[:-1] > target_lq[:, None] - 1e-5).sum(-1)
        rank = t.rank()[layer][:-1]
        assert np.all((lower <= rank) & (rank <= upper)), (layer, rank, lower, upper)
        assert np.isnan(t.cross_entropy()[layer][-1]) and np.isnan(t.rank()[layer][-1])
    np.testing.assert_allclose(t.statistic("kl"), t.forward_kl())
    # An untrained tuned lens is the logit lens; a text gives the same trajectory as its ids.
    zero = ei.PredictionTrajectory.from_lens_and_model(ei.TunedLens.for_model(tiny_model), tiny_model, TEXT)
    assert zero.lens == "tuned lens" and zero.top1 == t.top1
    np.testing.assert_allclose(zero.entropy(), t.entropy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zero.statistic("entropy", minus=t), 0.0, atol=1e-5)


def test_exports_plots_and_errors(tiny_model, tmp_path):
    t = ei.PredictionTrajectory.from_lens_and_model(ei.LogitLens(tiny_model), tiny_model, TEXT)
    t.save_json(tmp_path / "t.json")
    back = ei.PredictionTrajectory.load(tmp_path / "t.json")
    assert back.top1 == t.top1 and np.array_equal(back.entropy(), t.entropy())
    assert json.loads((tmp_path / "t.json").read_text())["layers"][-1] == "output"
    t.save_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * len(t.tokens) and lines[0].startswith("layer,position,token")
    size = t.plot(tmp_path / "t.png", statistic="rank")
    assert png_size(tmp_path / "t.png") == size
    svg = (tmp_path / "t.svg")
    t.plot(svg, "ce", minus=back)
    assert svg.read_text().lstrip().startswith("<svg")
    with pytest.raises(ValueError, match="unknown statistic 'nope'"):
        t.plot(tmp_path / "x.png", "nope")
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        t.plot(tmp_path / "x.gif")
    with pytest.raises(ValueError, match="1-D"):
        ei.PredictionTrajectory.from_lens_and_model(None, tiny_model, [[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="LogitLens or a TunedLens"):
        ei.PredictionTrajectory.from_lens_and_model("logit", tiny_model, [1, 2])
    short = ei.PredictionTrajectory.from_lens_and_model(None, tiny_model, [1, 2])
    with pytest.raises(ValueError, match="different inputs"):
        t.statistic("entropy", minus=short)


def test_plot_and_sweep_commands(tiny_dir, tmp_path):
    out = tmp_path / "traj.png"
    assert ei.lens_main(["plot", "trajectory", "-m", str(tiny_dir), "--text", TEXT, "--statistic", "entropy,kl",
                         "-o", str(out), "--both-formats", "--json", str(tmp_path / "t.json")]) == 0
    for name in ["traj-entropy.png", "traj-entropy.svg", "traj-kl.png", "traj-kl.svg", "t.json"]:
        assert (tmp_path / name).is_file(), name
    # Two local checkpoints in the hub layout (the same weights here), logit lens only.
    series = tmp_path / "series"
    for rev in ["step0", "step1"]:
        ei.make_synthetic_model(series / rev, TINY_CONFIG, tokenizer=TOKENIZER_JSON)
    sweep = tmp_path / "sweep"
    args = ["sweep", "-m", str(series), "--checkpoints", "step0,step1", "--lens", "logit", "--data", str(WIKITEXT),
            "--seq-len", "32", "--tokens", "64", "--prompt", TEXT, "--statistic", "ce", "-o", str(sweep)]
    assert ei.lens_main(args) == 0
    summary = json.loads((sweep / "sweep.json").read_text())
    assert [r["revision"] for r in summary["results"]] == ["step0", "step1"]
    for name in ["heatmap-logit-ce.png", "curves-logit-ce.svg", "trajectories-logit-ce.png"]:
        assert (sweep / "figures" / name).is_file(), name
    assert png_size(sweep / "figures" / "trajectories-logit-ce.png")[0] > png_size(tmp_path / "traj-kl.png")[0]
    assert ei.lens_main(["sweep", "-m", str(series), "--checkpoints", "pythia:5-1", "--data", str(WIKITEXT),
                         "-o", str(sweep)]) == 1
