"""The activation cache from Python: writing (equal to the `hooks cache` command, equal to
direct forward passes bit for bit), resuming after an interruption, reading back in
sequential and shuffled batches, and its errors."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import DEFAULT_LOG_LEVEL, WIKITEXT, wikitext_lines

SEQ_LEN = 16
BATCH = 3
POINTS = ["layers.0", "layers.1.mlp"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """About 20k tokens of WikiText-2: enough for several 1 MiB shards of the tiny model."""
    path = tmp_path_factory.mktemp("data") / "sample.txt"
    path.write_text("\n".join(wikitext_lines(300)), encoding="utf-8")
    return path


def write(model, sample, out, **kwargs):
    options = dict(seq_len=SEQ_LEN, batch_size=BATCH, shard_mib=1)
    options.update(kwargs)
    return ei.cache_activations(model, POINTS, data=[sample], output=out, **options)


def read_all(cache: ei.ActivationCache, **kwargs) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for batch in cache.batches(500, **kwargs):
        assert len(batch["tokens"]) <= 500
        for key, value in batch.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


@pytest.fixture(scope="module")
def cached(tiny_model, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "acts"
    summary = write(tiny_model, sample, out)
    return out, summary


def test_summary_and_manifest(cached, tiny_dir, sample):
    out, summary = cached
    assert not summary["already_complete"]
    assert summary["shards"] > 2
    assert summary["tokens"] == summary["chunks"] * SEQ_LEN == summary["new_tokens"]
    assert summary["resumed_chunks"] == 0
    assert summary["bytes_written"] == summary["tokens"] * 2 * 32 * 4
    assert summary["tokens_per_second"] > 0
    manifest = summary["manifest"]
    assert manifest["format"] == "eleuther-interp.activations"
    assert manifest["settings"]["hook_points"] == POINTS
    assert manifest["settings"]["widths"] == [32, 32]
    assert manifest["settings"]["dtype"] == "float32"
    assert manifest["settings"]["data"]["paths"] == [str(sample)]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (out / "progress.json").exists()
    cache = ei.ActivationCache(out)
    assert cache.manifest == manifest
    assert cache.hookpoints == POINTS
    assert cache.tokens == summary["tokens"]
    assert "layers.1.mlp" in repr(cache)


def test_cache_equals_direct_forward_bit_for_bit(cached, tiny_model):
    out, summary = cached
    rows = read_all(ei.ActivationCache(out))
    assert set(rows) == {"tokens", *POINTS}
    assert rows["tokens"].dtype == np.int64
    assert rows["layers.0"].dtype == np.float32 and rows["layers.0"].shape == (summary["tokens"], 32)
    chunks = rows["tokens"].reshape(-1, SEQ_LEN)
    # The writer runs BATCH sequences per pass: the same passes from Python give the same bits.
    for start in range(0, len(chunks), BATCH):
        ids = chunks[start : start + BATCH]
        _, acts = tiny_model.run_with_cache(ids, POINTS, stop_early=True)
        lo, hi = start * SEQ_LEN, (start + len(ids)) * SEQ_LEN
        for point in POINTS:
            np.testing.assert_array_equal(rows[point][lo:hi], acts[point].reshape(-1, 32))
    # The tokens are the document stream: EOS, then each line's tokens.
    stream = []
    for line in wikitext_lines(10):
        stream += [0] + tiny_model.tokenize(line).tolist()
    assert rows["tokens"][:100].tolist() == stream[:100]


def test_python_cache_equals_cli_cache(cached, tiny_dir, sample, tmp_path):
    out, _ = cached
    cli_out = tmp_path / "cli"
    status = ei.hooks_main([
        "cache", "--model", str(tiny_dir), "--data", str(sample), "--hookpoints", ",".join(POINTS),
        "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--shard-mib", "1", "--output", str(cli_out),
    ])
    assert status == 0
    assert (cli_out / "manifest.json").read_text() == (out / "manifest.json").read_text()
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == sorted(p.name for p in (cli_out / "shards").iterdir())
    for name in shards:
        assert (out / "shards" / name).read_bytes() == (cli_out / "shards" / name).read_bytes(), name


def test_shuffled_reading(cached):
    out, summary = cached
    cache = ei.ActivationCache(out)
    ordered = read_all(cache)
    shuffled = read_all(cache, shuffle=True, seed=1, buffer_tokens=2000)
    again = read_all(cache, shuffle=True, seed=1, buffer_tokens=2000)
    other = read_all(cache, shuffle=True, seed=2, buffer_tokens=2000)
    for key in ordered:
        np.testing.assert_array_equal(shuffled[key], again[key])
    assert not np.array_equal(shuffled["tokens"], ordered["tokens"])
    assert not np.array_equal(shuffled["tokens"], other["tokens"])
    # Same rows, other order: sort rows by their activations.
    def sort_rows(d):
        order = np.lexsort(d["layers.0"].T[::-1])
        return {k: v[order] for k, v in d.items()}

    a, b = sort_rows(ordered), sort_rows(shuffled)
    for key in ordered:
        np.testing.assert_array_equal(a[key], b[key])
    sizes = [len(b["tokens"]) for b in cache.batches(1000)]
    assert sum(sizes) == summary["tokens"] and all(s == 1000 for s in sizes[:-1])


def test_interrupt_then_resume(tiny_model, sample, cached, tmp_path):
    out = tmp_path / "resumed"
    calls = []

    def stop_after_two(info):
        calls.append(info)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(tiny_model, sample, out, callback=stop_after_two)
    assert calls[0]["tokens"] == BATCH * SEQ_LEN and calls[1]["new_tokens"] == 2 * BATCH * SEQ_LEN
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(RuntimeError, match="incomplete"):
        ei.ActivationCache(out)
    infos: list[dict] = []
    summary = write(tiny_model, sample, out, callback=infos.append)
    assert summary["resumed_chunks"] == 2 * BATCH
    # The counts seen by the callback of the resumed run: tokens in all, new ones, shards.
    assert infos[0]["tokens"] == 3 * BATCH * SEQ_LEN and infos[0]["new_tokens"] == BATCH * SEQ_LEN
    assert infos[-1]["tokens"] == summary["tokens"]
    assert infos[-1]["new_tokens"] == summary["new_tokens"] == summary["tokens"] - 2 * BATCH * SEQ_LEN
    # `shards`: the shards complete once that batch is written (the last, partial one is
    # written after the last batch).
    ends = np.cumsum([shard["tokens"] for shard in summary["manifest"]["shards"]])
    assert [i["shards"] for i in infos[:-1]] == [int((ends <= i["tokens"]).sum()) for i in infos[:-1]]
    assert infos[0]["shards"] == 1 and infos[-1]["shards"] == summary["shards"] - 1
    full = read_all(ei.ActivationCache(cached[0]))
    resumed = read_all(ei.ActivationCache(out))
    assert summary["tokens"] == len(full["tokens"])
    for key in full:
        np.testing.assert_array_equal(resumed[key], full[key])
    again = write(tiny_model, sample, out)
    assert again["already_complete"] and again["new_tokens"] == 0


def test_resume_from_python_with_the_cli(tiny_model, tiny_dir, sample, cached, tmp_path):
    out = tmp_path / "mixed"

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(tiny_model, sample, out, callback=stop)
    status = ei.hooks_main([
        "cache", "--model", str(tiny_dir), "--data", str(sample), "--hookpoints", ",".join(POINTS),
        "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--shard-mib", "1", "--output", str(out),
    ])
    assert status == 0
    full = read_all(ei.ActivationCache(cached[0]))
    mixed = read_all(ei.ActivationCache(out))
    for key in full:
        np.testing.assert_array_equal(mixed[key], full[key])


def test_options(tiny_model, tiny_dir, sample, tmp_path):
    summary = ei.cache_activations(
        str(tiny_dir), "layers.*", data=str(sample), output=tmp_path / "small",
        seq_len=SEQ_LEN, batch_size=4, max_tokens=100, store_dtype="float16",
    )
    assert summary["tokens"] == 96 and summary["chunks"] == 6
    cache = ei.ActivationCache(tmp_path / "small")
    assert cache.hookpoints == ["layers.0", "layers.1"]
    assert cache.manifest["settings"]["dtype"] == "float16"
    rows = read_all(cache)
    assert rows["layers.1"].dtype == np.float32 and rows["layers.1"].shape == (96, 32)
    _, acts = tiny_model.run_with_cache(rows["tokens"].reshape(-1, SEQ_LEN)[:4], ["layers.1"])
    np.testing.assert_array_equal(
        rows["layers.1"][:64], acts["layers.1"].reshape(-1, 32).astype(np.float16).astype(np.float32)
    )
    # Other settings in a complete folder: refused unless overwriting.
    with pytest.raises(RuntimeError, match="other settings"):
        ei.cache_activations(tiny_model, ["layers.0"], data=[sample], output=tmp_path / "small",
                             seq_len=SEQ_LEN, max_tokens=100)
    again = ei.cache_activations(tiny_model, ["layers.0"], data=[sample], output=tmp_path / "small",
                                 seq_len=SEQ_LEN, max_tokens=100, overwrite=True)
    assert again["tokens"] == 96 and ei.ActivationCache(tmp_path / "small").hookpoints == ["layers.0"]


def test_errors(tiny_model, sample, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        ei.cache_activations(tiny_model, POINTS, data=[tmp_path / "missing.txt"], output=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown hook point"):
        ei.cache_activations(tiny_model, ["layers.9"], data=[sample], output=tmp_path / "x")
    with pytest.raises(ValueError, match="'layers.0.attention.pattern' is an attention pattern"):
        ei.cache_activations(tiny_model, ["blocks.0.attn.hook_pattern"], data=[sample],
                             output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="less than one sequence"):
        ei.cache_activations(tiny_model, POINTS, data=[sample], output=tmp_path / "x", max_tokens=10)
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    with pytest.raises(RuntimeError, match="no complete chunk"):
        ei.cache_activations(tiny_model, POINTS, data=[short], output=tmp_path / "y", seq_len=SEQ_LEN)
    with pytest.raises(FileNotFoundError):
        ei.ActivationCache(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="no manifest.json"):
        ei.ActivationCache(tmp_path / "empty")
    with pytest.raises(ValueError, match="positive"):
        ei.cache_activations(tiny_model, POINTS, data=[sample], output=tmp_path / "z", seq_len=0)
    records = tmp_path / "records.jsonl"
    records.write_text('{"body": "a document without the default field"}\n')
    with pytest.raises(Exception, match="no field 'text' \\(use text_field= to pick another\\)"):
        ei.cache_activations(tiny_model, POINTS, data=[records], output=tmp_path / "j", seq_len=SEQ_LEN)


def test_ctrl_c_stops_and_keeps_what_was_computed(tiny_model, tmp_path):
    out = tmp_path / "ctrl-c"
    # SIGINT while Rust runs the job (GIL released, no callback): the writer saves a shard
    # and stops; the folder is an unfinished, resumable cache.
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    # A process started in the background by a shell inherits SIGINT as ignored: install
    # Python's handler explicitly so the test does not depend on how it was launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ei.cache_activations(tiny_model, POINTS, data=[WIKITEXT], output=out, seq_len=SEQ_LEN,
                                 batch_size=BATCH, max_tokens=200_000)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert (out / "progress.json").exists() and not (out / "manifest.json").exists()
    progress = json.loads((out / "progress.json").read_text())
    assert progress["chunks"] > 0 and len(progress["shards"]) == 1


def plant_stale_shard(cache: Path) -> Path:
    """A shard file as a killed writer leaves it: hidden temporary name, idle two minutes."""
    (cache / "shards").mkdir(parents=True)
    stale = cache / "shards" / ".shard-000000.safetensors.tmp-4321"
    stale.write_bytes(b"\0" * 4096)
    two_minutes_ago = time.time() - 120
    os.utime(stale, (two_minutes_ago, two_minutes_ago))
    return stale


@DEFAULT_LOG_LEVEL
def test_a_command_run_from_python_leaves_the_package_log_level(tiny_model, tiny_dir, sample, tmp_path, capfd):
    """A command logs at `info` as on the command line; afterwards the package is back at
    `warn`. Seen through the `info` line of the clean-up of a killed run's shard."""
    stale = plant_stale_shard(tmp_path / "cli")
    capfd.readouterr()
    assert ei.hooks_main(["cache", "--model", str(tiny_dir), "--data", str(sample), "--hookpoints", "layers.0",
                          "--seq-len", "16", "--max-tokens", "64", "--output", str(tmp_path / "cli")]) == 0
    assert "removed 4096 bytes" in capfd.readouterr().err
    assert not stale.exists()
    stale = plant_stale_shard(tmp_path / "python")
    write(tiny_model, sample, tmp_path / "python", max_tokens=64)
    assert "removed 4096 bytes" not in capfd.readouterr().err
    assert not stale.exists()
