"""The type stubs describe what the package exports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import eleuther_interp as ei


def stub_module() -> ast.Module:
    return ast.parse((Path(inspect.getfile(ei)).parent / "__init__.pyi").read_text())


def test_stub_exports_what_the_package_exports():
    stub_all = next(
        ast.literal_eval(node.value)
        for node in stub_module().body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    assert sorted(stub_all) == sorted(ei.__all__)
    assert all(hasattr(ei, name) for name in ei.__all__)
    defined = {node.name for node in stub_module().body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    assert set(ei.__all__) - {"__version__"} <= defined
