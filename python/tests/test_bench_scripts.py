"""The benchmark scripts under bench/ run as `python bench/X.py`, which puts bench/ first on
sys.path: a script named like a standard-library module would then be imported in its place
by everything that imports that module (a bench/tokenize.py once broke `import torch` in every
benchmark). Not a benchmark itself: no timing here."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_no_bench_script_shadows_a_standard_module():
    scripts = sorted(BENCH.glob("*.py"))
    assert scripts, f"no scripts found in {BENCH}"
    shadowing = [p.name for p in scripts if p.stem in sys.stdlib_module_names]
    assert not shadowing, f"rename these bench scripts, they shadow standard modules: {shadowing}"
