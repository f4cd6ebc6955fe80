"""Every third-party module the installed package imports is one of its declared dependencies."""

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTION = {"llama_cpp": "llama-cpp-python"}


def _declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}

    return names(project["dependencies"]), {extra: names(reqs) for extra, reqs in
                                             project.get("optional-dependencies", {}).items()}


def _imports():
    """(distribution, file, at module level) of every absolute non-stdlib import under python/asrkf_gguf."""
    for path in sorted((ROOT / "python" / "asrkf_gguf").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                root = module.split(".")[0]
                if root not in sys.stdlib_module_names:
                    yield DISTRIBUTION.get(root, root).lower(), path.name, id(node) in top


def test_imports_are_declared_dependencies():
    runtime, extras = _declared()
    optional = set().union(*extras.values())
    found = list(_imports())
    assert {"numpy", "cffi", "llama-cpp-python"} <= {dist for dist, _, _ in found}
    for dist, name, at_module_level in found:
        # a module-level import must be installed with the package; a lazy one may come from an extra (plots)
        allowed = runtime if at_module_level else runtime | optional
        assert dist in allowed, f"{name} imports {dist}, which pyproject.toml does not declare" + \
            ("" if at_module_level else " (not even in an extra)")
