"""The bench scripts (`python bench/<name>.py`) run only by hand or on a GPU host, so a renamed function they import
would go unnoticed until then: every `from llmc... import name` in them, at any depth, must resolve."""
import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_every_llmc_name_a_bench_script_imports_exists(script):
    imported = [(node.module, alias.name) for node in ast.walk(ast.parse(script.read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmc")
                for alias in node.names]
    missing = [f"{module}.{name}" for module, name in imported
               if not hasattr(importlib.import_module(module), name)
               and importlib.util.find_spec(f"{module}.{name}") is None]
    assert not missing, f"{script.name} imports what does not exist: {missing}"


def test_the_scripts_are_found():
    assert {"report", "run", "probe", "systems", "gpu_sweep", "smollm2"} <= {s.stem for s in SCRIPTS}
