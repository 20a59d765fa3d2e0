"""Models and SAEs from the Hugging Face hub, through the package's real download code, against
a loopback server that answers as the hub does (``HF_ENDPOINT``): the repository listing at
``/api/models/<repo>/revision/<rev>`` and files at ``/<repo>/resolve/<rev>/<path>`` with the
range requests and headers hf-hub reads. Each test gets an empty ``HF_HOME``."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import FIXTURES, PYTHIA_STYLE, WIKITEXT

TUNED_LENS = FIXTURES / "tuned_lens" / "pythia_style"

# (kind, repo id, revision) -> {path in the repository: bytes}; filled by the fixtures.
REPOS: dict[tuple[str, str, str], dict[str, bytes]] = {}


def add_folder(files: dict[str, bytes], folder: Path, prefix: str = "") -> None:
    """Adds the files of `folder` and its sub-folders under `prefix`."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            files[prefix + path.relative_to(folder).as_posix()] = path.read_bytes()


class _Hub(BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        for (kind, repo, revision), files in REPOS.items():
            top = "" if kind == "models" else f"/{kind}"
            if self.path == f"/api/{kind}/{repo}/revision/{revision}":
                listing = {"sha": commit(repo, revision), "siblings": [{"rfilename": f} for f in files]}
                return self.reply(200, json.dumps(listing).encode())
            prefix = f"{top}/{repo}/resolve/{revision}/"
            if self.path.startswith(prefix) and self.path[len(prefix):] in files:
                return self.send_range(files[self.path[len(prefix):]], commit(repo, revision))
        known = [(f"/api/{kind}/{repo}/", f"{'' if kind == 'models' else '/' + kind}/{repo}/resolve/")
                 for kind, repo, _ in REPOS]
        if any(self.path.startswith(prefix) for prefixes in known for prefix in prefixes):
            return self.reply(404, b'{"error": "Revision or entry not found"}')
        # As the hub answers anonymous requests for a repository it does not show.
        return self.reply(401, b'{"error": "Repository not found"}')

    def send_range(self, body: bytes, sha: str) -> None:
        start, _, end = self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end or len(body) - 1), len(body) - 1)
        self.reply(206, body[start : end + 1], {
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "X-Repo-Commit": sha,
            "Content-Range": f"bytes {start}-{end}/{len(body)}",
        })

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def commit(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


@pytest.fixture(scope="module")
def hub_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def hub(hub_server, tmp_path, monkeypatch):
    """The server as HF_ENDPOINT, an empty HF_HOME, online; the requests it saw."""
    monkeypatch.setenv("HF_ENDPOINT", hub_server)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _Hub.requests.clear()
    return _Hub.requests


@pytest.fixture(scope="module")
def hub_saes(tiny_dir, tmp_path_factory):
    """Two SAEs of the tiny model in sparsify's layout, served as test-org/saes; the tiny
    model as test-org/tiny at revision step8."""
    saes = tmp_path_factory.mktemp("hub-saes")
    rows = np.random.default_rng(0).standard_normal((512, 32)).astype(np.float32)
    for i, hookpoint in enumerate(["layers.0", "layers.1"]):
        ei.Sae.train(rows, batch_size=256, steps=2, k=4, num_latents=16, lr_warmup_steps=1, seed=i).save(
            saes / hookpoint
        )
    add_folder(REPOS.setdefault(("models", "test-org/saes", "main"), {}), saes)
    add_folder(REPOS.setdefault(("models", "test-org/tiny", "step8"), {}), tiny_dir)
    return saes


def same_sae(a: ei.Sae, b: ei.Sae) -> bool:
    x = np.random.default_rng(1).standard_normal((8, a.d_in)).astype(np.float32)
    return a.cfg == b.cfg and np.array_equal(a.forward(x)["x_hat"], b.forward(x)["x_hat"])


def test_a_model_downloads_at_a_revision(hub, hub_saes, tiny_model):
    model = ei.Model.from_pretrained("test-org/tiny", revision="step8")
    ids = tiny_model.tokenize("The hub answers.")
    assert np.array_equal(model.forward(ids), tiny_model.forward(ids))
    assert (model.origin, model.revision) == ("test-org/tiny@step8", "step8")
    assert "/test-org/tiny/resolve/step8/model.safetensors" in hub


def test_saes_load_from_the_hub_as_from_their_folder(hub, hub_saes, monkeypatch):
    local = ei.Sae.load_many(hub_saes)
    assert list(local) == ["layers.0", "layers.1"]

    one = ei.Sae.load_from_hub("test-org/saes", "layers.1")
    assert same_sae(one, local["layers.1"])
    assert not any("layers.0" in r for r in hub), hub

    many = ei.Sae.load_many("test-org/saes")
    assert list(many) == ["layers.0", "layers.1"]
    assert all(same_sae(many[h], local[h]) for h in many)
    assert ei.Sae.load_many("test-org/saes", ["layers.0"]).keys() == {"layers.0"}

    # Offline: what the cache holds loads, a repository's SAEs are those in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear()
    assert same_sae(ei.Sae.load_from_hub("test-org/saes", "layers.0"), local["layers.0"])
    assert list(ei.Sae.load_many("test-org/saes")) == ["layers.0", "layers.1"]
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, and the cache holds none"):
        ei.Sae.load_many("test-org/other-saes")
    assert hub == []
    monkeypatch.delenv("HF_HUB_OFFLINE")

    with pytest.raises(FileNotFoundError, match=r"test-org/absent.*HTTP 401.*HF_TOKEN"):
        ei.Sae.load_from_hub("test-org/absent", "layers.0")
    # A missing relative folder is tried as a repository, and the error says both.
    with pytest.raises(FileNotFoundError, match=r"'saes/run1'.*HTTP 401.*nor is there a local folder .*saes/run1"):
        ei.Sae.load_many("saes/run1")
    with pytest.raises(FileNotFoundError, match=r"'test-org/saes' \(revision 'main'\) has no layers.7/cfg.json"):
        ei.Sae.load_from_hub("test-org/saes", "layers.7")
    with pytest.raises(ValueError, match=r"holds no SAE at its top: name one of its hook points \(layers.0, layers.1\)"):
        ei.Sae.load_from_hub("test-org/saes")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        ei.Sae.load_many(hub_saes / "no-such-folder")
    with pytest.raises(ValueError, match="revision 'v2' applies to hub repositories"):
        ei.Sae.load_many(hub_saes, revision="v2")
    with pytest.raises(ValueError, match="hookpoints is empty"):
        ei.Sae.load_many(hub_saes, [])


def test_load_many_orders_hook_points_naturally(tmp_path):
    rows = np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32)
    sae = ei.Sae.train(rows, batch_size=256, steps=1, k=2, num_latents=8, lr_warmup_steps=1)
    for hookpoint in ["layers.10", "layers.2", "layers.2.mlp", "layers.1"]:
        sae.save(tmp_path / hookpoint)
    assert list(ei.Sae.load_many(tmp_path)) == ["layers.1", "layers.2", "layers.2.mlp", "layers.10"]
    assert list(ei.Sae.load_many(tmp_path, ["layers.10", "layers.2"])) == ["layers.2", "layers.10"]
    with pytest.raises(ValueError, match="is a file: give a folder"):
        ei.Sae.load_many(tmp_path / "layers.1" / "cfg.json")


def test_delphi_and_sae_eval_take_a_hub_repository_of_saes(hub, hub_saes, tiny_dir, tmp_path):
    common = ["--model", str(tiny_dir), "--data", str(WIKITEXT), "--seq-len", "64"]
    caches = {}
    for name, source in [("local", hub_saes), ("hub", "test-org/saes")]:
        caches[name] = tmp_path / name
        status = ei.delphi_main(["cache", *common, "--sae", str(source), "--hookpoints", "layers.1",
                                 "--max-tokens", "256", "--output", str(caches[name])])
        assert status == 0
    local, fetched = (ei.LatentCache(caches[n]) for n in ["local", "hub"])
    for latent in range(16):
        for a, b in zip(local.firings("layers.1", latent), fetched.firings("layers.1", latent)):
            assert np.array_equal(a, b)

    # sae train --finetune trains a repository's SAE further.
    tuned = tmp_path / "tuned"
    status = ei.sae_main(["train", *common, "--finetune", "test-org/saes", "--hookpoints", "layers.1,",
                          "--output", str(tuned), "--batch-size", "128", "--steps", "1",
                          "--lr-warmup-steps", "1"])
    assert status == 0
    assert ei.Sae.load(tuned / "layers.1").cfg == ei.Sae.load(hub_saes / "layers.1").cfg
    # Patterns name the repository's folders as they name a local folder's.
    status = ei.sae_main(["train", *common, "--finetune", "test-org/saes", "--hookpoints", "layers.*",
                          "--output", str(tmp_path / "tuned-all"), "--batch-size", "128", "--steps", "1",
                          "--lr-warmup-steps", "1"])
    assert status == 0
    assert list(ei.Sae.load_many(tmp_path / "tuned-all")) == ["layers.0", "layers.1"]

    # sae eval without --hookpoints evaluates every SAE the repository lists.
    report = tmp_path / "eval.json"
    status = ei.sae_main(["eval", *common, "--sae", "test-org/saes", "--tokens", "128",
                          "--json", str(report)])
    assert status == 0
    assert [s["hookpoint"] for s in json.loads(report.read_text())["saes"]] == ["layers.0", "layers.1"]


@pytest.fixture(scope="module")
def hub_lens(tmp_path_factory):
    """tuned-lens's lens of the pythia_style fixture in a Space laid out as tuned-lens's
    (lens/<model id>/config.json + params.pt), also as test-org/tiny-deduped's; a lens saved
    by us (params.safetensors) as test-org/ours's; the same lens in a model repository
    test-org/lenses; and the pythia_style model as test-org/pythia-style."""
    space = REPOS.setdefault(("spaces", "AlignmentResearch/tuned-lens", "main"), {})
    elsewhere = REPOS.setdefault(("models", "test-org/lenses", "main"), {})
    for name in ["config.json", "params.pt"]:
        for repo, model_id in [(space, "test-org/pythia-style"), (space, "test-org/tiny-deduped"),
                               (elsewhere, "test-org/pythia-style")]:
            repo[f"lens/{model_id}/{name}"] = (TUNED_LENS / name).read_bytes()
    ours = tmp_path_factory.mktemp("our-lens")
    ei.TunedLens.load(TUNED_LENS).save(ours)
    add_folder(space, ours, "lens/test-org/ours/")
    model = REPOS.setdefault(("models", "test-org/pythia-style", "main"), {})
    for name in ["config.json", "model.safetensors"]:
        model[name] = (PYTHIA_STYLE / name).read_bytes()


def test_pretrained_lenses_come_from_tuned_lens_collection(hub, hub_lens, tmp_path):
    model = ei.Model.from_pretrained("test-org/pythia-style")
    lens = ei.TunedLens.from_model_and_pretrained(model)
    expected = ei.TunedLens.load(TUNED_LENS).state_dict()
    assert lens.state_dict().keys() == expected.keys()
    assert all(np.array_equal(lens.state_dict()[k], expected[k]) for k in expected)
    assert "/spaces/AlignmentResearch/tuned-lens/resolve/main/lens/test-org/pythia-style/params.pt" in hub

    # A model from a folder names the lens's model id.
    local = ei.Model.from_pretrained(PYTHIA_STYLE)
    with pytest.raises(ValueError, match="is not from the hub"):
        ei.TunedLens.from_model_and_pretrained(local)
    # Named: by model id, as a folder, from another repository, saved by us (safetensors).
    for named in [
        ei.TunedLens.from_model_and_pretrained(local, "test-org/pythia-style"),
        ei.TunedLens.from_model_and_pretrained(local, str(TUNED_LENS)),
        ei.TunedLens.from_model_and_pretrained(local, "test-org/pythia-style", repo_id="test-org/lenses",
                                               repo_type="model"),
        ei.TunedLens.from_model_and_pretrained(local, "test-org/ours"),
    ]:
        assert np.array_equal(named.state_dict()["1.weight"], expected["1.weight"])
    # A model without a lens: the lenses there are listed, the deduped model's named.
    with pytest.raises(FileNotFoundError, match=(
            r"has no pretrained lens for 'test-org/tiny'; test-org/tiny-deduped \(the model trained "
            r"on the deduplicated Pile\) has one; it has lenses for: test-org/ours, test-org/pythia-style, test-org/tiny-deduped$")):
        ei.TunedLens.from_model_and_pretrained(local, "test-org/tiny")
    with pytest.raises(ValueError, match="repo_type 'bucket' is not space, model or dataset"):
        ei.TunedLens.from_model_and_pretrained(local, "test-org/tiny", repo_type="bucket")
    # A model folder is not a lens folder: its id is looked up.
    with pytest.raises(ValueError, match="is neither a lens folder .* nor a model id"):
        ei.TunedLens.from_model_and_pretrained(local, str(PYTHIA_STYLE))

    # lens eval --lens pretrained reports what the lens folder gives.
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 128, (4, 32), dtype=np.uint16))
    reports = []
    for source in ["pretrained", str(TUNED_LENS)]:
        out = tmp_path / "eval.json"
        status = ei.lens_main(["eval", "--model", "test-org/pythia-style", "--lens", source,
                               "--data", str(ids), "--seq-len", "32", "--tokens", "128",
                               "--json", str(out)])
        assert status == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["tuned_lens"] and reports[0] == reports[1]
