"""A portable warm start: everything a process compiled, in one folder for another machine.

    llmcompile.generate(model, ids, "int4")          # compiles, calibrates: minutes, once
    llmcompile.save_artifacts("warm/")               # torch's caches + our artifacts
    # ... on another machine of the same kind (same CPU flags, torch, llmcompile):
    llmcompile.load_artifacts("warm/")               # before compiling anything
    llmcompile.generate(model, ids, "int4")          # cache hits: seconds

The folder holds torch's "mega-cache" (``torch.compiler.save_cache_artifacts``: Inductor's FX
graphs, AOTAutograd entries, the C++ they built) for the graphs compiled in this process, the
quantization artifacts this process loaded or solved (:mod:`llmcompile.quant.store`), and the
CPU kernels' build for this machine. Loading copies them into ``$LLMCOMPILE_CACHE_DIR`` and
torch's cache folders, where the usual keys find them; anything that does not match the new
machine (another torch, other CPU flags) is simply not found, and is compiled again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..ops import kernels
from ..quant import store

__all__ = ["load_artifacts", "save_artifacts"]

_TORCH_BLOB = "torch_cache_artifacts.bin"
_MANIFEST = "llmcompile_artifacts.json"


def save_artifacts(path: str | Path) -> dict[str, int]:
    """Write this process's compile and quantization artifacts to the folder ``path``;
    returns what was written (counts and bytes)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    found = torch.compiler.save_cache_artifacts()
    torch_bytes = 0
    if found is not None:
        blob, _info = found
        (folder / _TORCH_BLOB).write_bytes(blob)
        torch_bytes = len(blob)
    quant = 0
    for key in sorted(store.used):
        source = store.file_of(key)
        if source.exists():
            target = folder / "quant" / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            quant += 1
    kernel_files = 0
    build = kernels.build_folder()
    if kernels.available() and build.exists():
        shutil.copytree(build, folder / "kernels" / build.name, dirs_exist_ok=True)
        kernel_files = sum(1 for p in build.rglob("*") if p.is_file())
    summary = {"torch_cache_bytes": torch_bytes, "quant_layers": quant,
               "kernel_files": kernel_files, "torch": torch.__version__}
    (folder / _MANIFEST).write_text(json.dumps(summary, indent=1))
    return summary


def load_artifacts(path: str | Path) -> dict[str, int]:
    """Make a folder written by :func:`save_artifacts` this process's warm caches (call it
    before compiling); returns what was loaded."""
    folder = Path(path)
    manifest = folder / _MANIFEST
    if not manifest.exists():
        raise FileNotFoundError(f"{folder} has no {_MANIFEST}: not written by "
                                "llmcompile.save_artifacts")
    summary = json.loads(manifest.read_text())
    if summary.get("torch") != torch.__version__:
        raise ValueError(f"artifacts in {folder} were made with torch {summary.get('torch')}, "
                         f"this is torch {torch.__version__}: they would not be used")
    blob = folder / _TORCH_BLOB
    if blob.exists():
        torch.compiler.load_cache_artifacts(blob.read_bytes())
    root = store.cache_root()
    quant = 0
    for source in sorted((folder / "quant").glob("*/*")):
        target = root / "quant" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        quant += 1
    if (folder / "kernels").exists():
        shutil.copytree(folder / "kernels", root / "kernels", dirs_exist_ok=True)
    return {"torch_cache_bytes": blob.stat().st_size if blob.exists() else 0,
            "quant_layers": quant}
