"""llmcompile's on-disk cache folder (CPU kernel builds, quantized layers, exit heads)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$LLMCOMPILE_CACHE_DIR``, or ``~/.cache/llmcompile``."""
    return Path(os.environ.get("LLMCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "llmcompile")
