"""The architecture DESIGN.md draws, checked: no module imports a stage above it, and an inference host that loads
a bundle and generates never imports the compiler.

Stages, top to bottom (DESIGN.md, "Import direction, never reversed"):

    llmc (the public face: __init__, cli, backend (+ freeze), openmp)
    bench                          beside the stages, a client of them as a user is
    compiler -> passes -> codegen
    runtime  -> codegen            the runtime never imports compiler/ or passes/
    models                         torch, the checkpoint formats (and llmc.common, for its errors)
    common                         the contract, the targets, the errors: what every stage may import
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Folder -> the package it is installed as (pyproject.toml's package-dir).
PACKAGES = {"llmc": "llmc", "bench": "llmc.bench", "compiler": "llmc.compiler", "passes": "llmc.passes",
            "codegen": "llmc.codegen", "runtime": "llmc.runtime", "models": "llmc.models", "common": "llmc.common"}

# What each stage may import besides itself and llmc.common (which every stage may import; it imports no stage).
ALLOWED = {
    "llmc": {"bench", "compiler", "passes", "codegen", "runtime", "models"},
    "bench": {"llmc", "compiler", "passes", "codegen", "runtime", "models"},
    "compiler": {"passes", "codegen", "models"},
    "passes": {"codegen"},
    "runtime": {"codegen"},
    "codegen": set(),
    "models": set(),
    "common": set(),
}

# Upward imports that stay, each with its reason: (importing module, imported module).
KNOWN_EXCEPTIONS = {
    # The manifest records llmc.__version__. `llmc` is the parent package of every stage, so it is imported before
    # compiler/ is in any case, and its __init__ imports no stage until a public function is called.
    ("llmc.compiler.api", "llmc"),
}


def stage_of(module: str) -> str | None:
    """The stage a module of llmc belongs to (None outside llmc): llmc.compiler.api -> compiler, llmc.cli -> llmc."""
    parts = module.split(".")
    if parts[0] != "llmc":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "llmc"


def source_modules() -> list[tuple[str, Path]]:
    """(module name, file) of every source file of the installed packages."""
    modules = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules.append((".".join([package, *parts]), path))
    return modules


def imported_modules(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in the file, at module level or inside a function."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package the file is in (a package's __init__ is its own)
                base = module.split(".")
                base = base[:len(base) - node.level + is_package]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((name, node.lineno))
    return found


def upward_imports() -> list[str]:
    bad = []
    for module, path in source_modules():
        stage = stage_of(module)
        for imported, line in imported_modules(module, path):
            target = stage_of(imported)
            if target in (None, stage, "common") or target in ALLOWED[stage]:
                continue
            if (module, imported) not in KNOWN_EXCEPTIONS:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({stage}) imports {imported} ({target})")
    return bad


def test_the_tables_cover_every_installed_package():
    """A new stage folder must be placed in the order before its imports are checked."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    assert {folder: package for package, folder in package_dir.items()} == PACKAGES
    assert set(ALLOWED) == set(PACKAGES)
    assert len(source_modules()) > 50  # the walk found the tree


def test_no_module_imports_a_stage_above_it():
    assert upward_imports() == []


def test_the_known_exceptions_are_still_there():
    """An exception that is no longer needed goes from the table, so that it cannot cover a new import."""
    present = {(module, imported) for module, path in source_modules()
               for imported, _ in imported_modules(module, path)}
    assert KNOWN_EXCEPTIONS <= present


def test_relative_imports_resolve_to_their_package():
    """`from .loader import ...` in models/gguf.py, `from .config import ...` in models/__init__.py."""
    assert "llmc.models.loader" in [m for m, _ in imported_modules("llmc.models.gguf", ROOT / "models" / "gguf.py")]
    assert "llmc.models.config" in [m for m, _ in imported_modules("llmc.models", ROOT / "models" / "__init__.py")]


# Loads a bundle and generates in a fresh interpreter, then lists every module of llmc it imported.
LOAD_AND_GENERATE = """
import json, sys
import llmc
engine = llmc.load(sys.argv[1])
out = engine.generate([[1, 2, 3]], max_new_tokens=4)
assert len(out[0]) == 4, out
print(json.dumps(sorted(m for m in sys.modules if m == "llmc" or m.startswith("llmc."))))
"""


@pytest.mark.slow
def test_loading_a_bundle_and_generating_imports_no_compiler(tmp_path):
    import llmc

    bundle = llmc.compile("llmc-tiny", target="cpu", out=tmp_path / "tiny.llmc")
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(bundle)], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "llmc.runtime.engine" in loaded  # the list is the real one
    compiler_side = [m for m in loaded if stage_of(m) in ("compiler", "passes", "bench")]
    assert compiler_side == [], f"an inference host imported {compiler_side}"
