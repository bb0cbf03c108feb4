"""Persistent quantization artifacts: solved weights on disk, keyed by what determines them.

    $LLMCOMPILE_CACHE_DIR/quant/<key[:2]>/<key>.safetensors     (default ~/.cache/llmcompile)

A solved layer (codes, scales, the packed layout its kernel reads, plus small integers such as
the group size, kept in the file's metadata) is written once, atomically (a temporary file
renamed into place), and read memory-mapped by every later process, so a second process with
the same model and recipe calibrates nothing. The key is a SHA-256 of
:func:`artifact_key`'s parts: the weight's bytes, the pass config, for calibrated methods the
whole model's weights and the calibration token ids, the source of the code that computes
and packs them, torch's version and the CPU packing. The folder is capped
(``LLMCOMPILE_CACHE_MAX_GB``, default 20): the least recently used files go first.
``llmcompile cache list|size|clear`` shows and empties it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..core.cache import cache_root

__all__ = ["Entry", "artifact_key", "cache_root", "clear", "describe", "digest", "entries",
           "file_of", "load", "save", "size_bytes", "used"]

log = logging.getLogger("llmcompile")

_SUFFIX = ".safetensors"
#: keys loaded or written by this process (``save_artifacts`` ships them)
used: set[str] = set()


def _folder() -> Path:
    return cache_root() / "quant"


def _max_bytes() -> int:
    return int(float(os.environ.get("LLMCOMPILE_CACHE_MAX_GB", "20")) * 2**30)


# --- keys ------------------------------------------------------------------------------------

#: tensor -> (its version counter, digest): graphs of one model hash each weight once
_digests: WeakIdKeyDictionary = WeakIdKeyDictionary()


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, dtype and shape (remembered while the tensor lives and is
    not written in place)."""
    found = _digests.get(tensor)
    if found is not None and found[0] == tensor._version:
        return found[1]
    h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    value = h.hexdigest()
    _digests[tensor] = (tensor._version, value)
    return value


def artifact_key(parts: Iterable[Any]) -> str:
    """One hex key for the parts (strings, numbers, tuples; their ``repr``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


# --- files -----------------------------------------------------------------------------------

def _path(key: str) -> Path:
    return _folder() / key[:2] / f"{key}{_SUFFIX}"


def file_of(key: str) -> Path:
    """Where the artifact of ``key`` is (or would be) stored."""
    return _path(key)


def load(key: str) -> dict[str, Any] | None:
    """The artifact stored under ``key`` (tensors memory-mapped), or None."""
    path = file_of(key)
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out: dict[str, Any] = {name: _aligned(f.get_tensor(name))
                                   for name in f.keys()}  # noqa: SIM118
            out.update(json.loads((f.metadata() or {}).get("values", "{}")))
    except Exception as e:  # a truncated or foreign file: recompute (and overwrite) it
        log.warning("llmcompile: ignoring unreadable cache file %s (%s)", path, e)
        return None
    os.utime(path)  # recently used: the size cap evicts others first
    used.add(key)
    return out


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself (memory-mapped) where it starts on a 64-byte boundary, else a copy:
    the packed kernels read whole vectors with aligned loads (a file's tensors are aligned to
    8 bytes only)."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def save(key: str, artifact: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    """Store an artifact (tensors and JSON-able values) under ``key``, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in artifact.items()
               if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in artifact.items() if not isinstance(v, torch.Tensor)}
    path = file_of(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"values": json.dumps(values), **(meta or {})})
        os.replace(tmp, path)
        used.add(key)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _enforce_cap()


# --- listing and the cap ---------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    path: Path
    size: int
    used: float  # last use (mtime), seconds since the epoch
    layer: str  # the module path it was solved for (metadata)
    config: str


def _files() -> list[tuple[Path, int, float]]:
    """(path, size, last use) of every stored artifact, most recently used first (no file is
    opened: the size cap runs this after every write)."""
    out = []
    for path in _folder().glob(f"*/*{_SUFFIX}"):
        try:
            stat = path.stat()
        except OSError:
            continue
        out.append((path, stat.st_size, stat.st_mtime))
    return sorted(out, key=lambda f: f[2], reverse=True)


def entries() -> list[Entry]:
    """Every stored artifact with what it was solved for, most recently used first."""
    out = []
    for path, size, used in _files():
        meta = _metadata(path)
        out.append(Entry(path, size, used, meta.get("layer", "?"), meta.get("config", "?")))
    return out


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


def size_bytes() -> int:
    return sum(size for _, size, _ in _files())


def clear() -> int:
    """Delete every stored artifact; how many."""
    found = _files()
    for path, _, _ in found:
        path.unlink(missing_ok=True)
    return len(found)


def _enforce_cap() -> None:
    limit, total = _max_bytes(), 0
    for path, size, _ in _files():
        total += size
        if total > limit:
            path.unlink(missing_ok=True)


def describe(entry: Entry) -> str:
    age = time.time() - entry.used
    return (f"{entry.size / 2**20:8.2f} MiB  {age / 3600:7.1f} h ago  {entry.layer}  "
            f"{entry.config}")
