"""Which passes a recipe may name, and the presets shipped with the package.

The one place passes are registered: the engine (``core``) knows no pass, so the registry lives
above it, beside the facade and the backend, and hands itself to ``core.recipe`` once.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path

from .core import recipe as _recipe
from .core.pipeline import UserRules
from .core.recipe import PassConfig, Recipe, RecipeError, looks_like_path

__all__ = ["pass_registry", "presets", "resolve_recipe"]


def pass_registry() -> dict[str, type[PassConfig]]:
    """Every pass a recipe may name."""
    from .passes.early_exit import EarlyExitConfig
    from .passes.fusion import FuseConfig
    from .passes.quantize import QuantizeConfig
    from .passes.sparse_attention import SparseAttentionConfig

    return {c.name: c for c in (FuseConfig, SparseAttentionConfig, QuantizeConfig, EarlyExitConfig,
                                       UserRules)}


_recipe.set_default_registry(pass_registry)


def presets() -> dict[str, Path]:
    """The named recipes shipped with the package: name -> TOML file."""
    folder = importlib.resources.files("llmcompile") / "presets"
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".toml")}


def resolve_recipe(spec: Recipe | Mapping | str | Path | None) -> Recipe:
    """A Recipe from any accepted spelling; None means the ``default`` preset."""
    if spec is None:
        spec = "default"
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return Recipe.from_dict(spec)
    if isinstance(spec, (str, Path)):
        known = presets()
        if str(spec) in known:
            return Recipe.from_toml(known[str(spec)])
        if looks_like_path(spec):
            if not Path(spec).is_file():
                raise RecipeError(f"recipe file {str(spec)!r} does not exist")
            return Recipe.from_toml(spec)
        raise RecipeError(f"unknown recipe preset {str(spec)!r}; presets: "
                          f"{', '.join(sorted(known))} (or a path to a .toml file)")
    raise RecipeError(f"a recipe must be a Recipe, dict, preset name or .toml path, "
                      f"got {type(spec).__name__}")
