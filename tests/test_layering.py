"""The import direction of the package is one-way (README, "Layout"):

    core      -> nothing of llmcompile but _compat
    ops       -> core
    analysis  -> core, ops
    quant     -> core, ops, analysis
    passes    -> core, ops, quant, analysis
    lower     -> core, ops, analysis
    deploy    -> core, ops, analysis, quant, lower
    tools     -> anything; nothing imports tools but cli and the facade (__init__)

(lower and deploy may read analyses and quantization helpers, as DESIGN.md allows: the ONNX
lowering rules classify masks, and export loads the tokenizer it saves beside the file.)

Every ``import`` statement of every module is read (function-level ones too), so a lazy import
cannot hide a wrong direction.
"""

import ast
from pathlib import Path

import pytest

import llmcompile
import llmcompile.passes

PACKAGE = Path(llmcompile.__file__).resolve().parent
PASSES = Path(llmcompile.passes.__file__).resolve().parent

ALLOWED = {
    "core": {"core", "_compat"},
    "ops": {"ops", "core", "_compat"},
    "analysis": {"analysis", "core", "ops", "_compat"},
    "quant": {"quant", "core", "ops", "analysis", "_compat"},
    "passes": {"passes", "core", "ops", "quant", "analysis", "_compat"},
    "lower": {"lower", "core", "ops", "analysis", "_compat"},
    "deploy": {"deploy", "core", "ops", "analysis", "quant", "lower", "_compat"},
}
TOOLS_IMPORTERS = {"tools", "cli", "__init__"}


def _layer(path: Path) -> str:
    """The layer of a module: its first folder under llmcompile/, or its stem at the top."""
    if path.is_relative_to(PASSES):
        return "passes"
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported llmcompile layer) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = ["llmcompile", *path.relative_to(PACKAGE).parts[:-1]] if path.is_relative_to(
        PACKAGE) else ["llmcompile", "passes"]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != "llmcompile":
                continue
            if len(parts) == 1:  # `import llmcompile` / `from llmcompile import x`
                if isinstance(node, ast.ImportFrom):
                    found += [(node.lineno, _top(a.name)) for a in node.names]
                else:
                    found.append((node.lineno, "__init__"))
            else:
                found.append((node.lineno, _top(parts[1])))
    return found


def _top(name: str) -> str:
    return name if (PACKAGE / name).is_dir() or name == "passes" else Path(name).stem


def _modules():
    return sorted([*PACKAGE.rglob("*.py"), *PASSES.rglob("*.py")])


def violations(files=None) -> list[str]:
    out = []
    for path in files or _modules():
        layer = _layer(path)
        for line, target in _imports(path):
            if target == "tools" and layer not in TOOLS_IMPORTERS:
                out.append(f"{path.name}:{line}: {layer} imports tools")
            elif layer in ALLOWED and target not in ALLOWED[layer]:
                out.append(f"{path.name}:{line}: {layer} imports {target}")
    return out


def test_imports_run_one_way():
    assert not violations()


def test_the_check_catches_a_forbidden_import(tmp_path, monkeypatch):
    bad = PACKAGE / "core" / "_layering_probe.py"
    bad.write_text("from ..tools import models\nfrom .. import backend\n")
    try:
        found = violations([bad])
    finally:
        bad.unlink()
    assert found == ["_layering_probe.py:1: core imports tools",
                     "_layering_probe.py:2: core imports backend"]


@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "onnxscript"])
def test_importing_llmcompile_loads_no_onnx_module(module):
    import subprocess
    import sys

    code = f"import sys, llmcompile; assert {module!r} not in sys.modules, 'loaded'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
