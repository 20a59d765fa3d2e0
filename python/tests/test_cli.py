"""The `hooks` console script and `eleuther_interp.hooks_main`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import eleuther_interp as ei

from conftest import PYTHIA_STYLE, WIKITEXT, wikitext_lines

HOOKS = Path(sys.executable).parent / ("hooks.exe" if os.name == "nt" else "hooks")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HOOKS), *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_help_exits_zero():
    assert HOOKS.exists(), f"console script not installed at {HOOKS}"
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in ["cache", "tokenize", "info", "inspect"]:
        assert command in result.stdout
    version = run("--version")
    assert version.returncode == 0 and ei.__version__ in version.stdout


def test_info_lists_hookpoints():
    result = run("info", "--model", str(PYTHIA_STYLE))
    assert result.returncode == 0, result.stderr
    assert "layers.1.mlp.input" in result.stdout
    assert "  layers.1.attention.pattern      [batch, 4, seq, seq]\n" in result.stdout
    assert "  layers.1.attention.dense.input  [batch, seq, 64]\n" in result.stdout
    assert "  logits                          [batch, seq, 128]\n" in result.stdout
    assert "architecture: gpt_neox" in result.stdout


def test_errors_exit_nonzero_with_message():
    result = run("info", "--model", "/no/such/model")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "/no/such/model" in result.stderr
    bad_args = run("cache", "--bogus")
    assert bad_args.returncode == 2
    assert "--bogus" in bad_args.stderr


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "eleuther_interp", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "inspect" in result.stdout


def test_hooks_main_in_process(capfd):
    assert ei.hooks_main(["info", "--model", str(PYTHIA_STYLE)]) == 0
    out, _ = capfd.readouterr()
    assert "final_norm" in out
    assert ei.hooks_main(["inspect", "/no/such/cache"]) == 1
    _, err = capfd.readouterr()
    assert err.startswith("error: ") and "no such folder" in err
    with pytest.raises(TypeError, match="argv must be a list of arguments, not a string"):
        ei.hooks_main("info")


@pytest.mark.parametrize("main, command", [(ei.hooks_main, "inspect"), (ei.lens_main, "sweep"),
                                           (ei.sae_main, "train"), (ei.delphi_main, "summary")])
def test_help_and_argument_errors_return_in_process(main, command, capfd):
    """`--help`, `--version` and bad arguments give the command line's status back instead
    of ending the interpreter (clap exited the process, which would end a Jupyter kernel)."""
    assert main(["--help"]) == 0
    out, _ = capfd.readouterr()
    assert command in out
    assert main(["--version"]) == 0
    assert ei.__version__ in capfd.readouterr().out
    assert main([command, "--bogus"]) == 2
    err = capfd.readouterr().err
    assert "--bogus" in err and "Usage:" in err


def test_tokenize_writes_what_numpy_loads(tiny_dir, tiny_model, tmp_path, capfd):
    """`hooks tokenize`: an .npy of [sequences, seq_len] uint16 that numpy reads, holding the
    documents each preceded by EOS, encoded as the model's tokenizer encodes them."""
    out = tmp_path / "tokens.npy"
    assert ei.hooks_main(["tokenize", "--model", str(tiny_dir), "--data", str(WIKITEXT), "--seq-len", "128",
                          "--max-tokens", "1000", "--output", str(out)]) == 0
    assert "wrote 896 tokens (7 sequences of 128, uint16)" in capfd.readouterr().out
    tokens = np.load(out)
    assert tokens.shape == (7, 128) and tokens.dtype == np.uint16
    tokenizer = tiny_model.tokenizer
    expected = []
    for line in wikitext_lines(40):
        expected += [tokenizer.eos_id, *tokenizer.encode(line)]
    assert tokens.ravel().tolist() == expected[:896]
