"""Recipes: an ordered list of typed pass configs plus a lowering target.

A recipe can be given as a :class:`Recipe`, a dict, the name of a shipped preset
(``default``, ...) or the path of a TOML file, and round-trips through dicts and TOML::

    name = "my-recipe"
    target = "inductor"

    [[passes]]
    name = "fuse"
    exclude = ["qkv_*"]

Every mistake (unknown preset, pass or field, a value of the wrong type or out of range) raises
one :class:`RecipeError` naming what is valid, before any graph is compiled.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .rules import RuleSet

__all__ = ["PassConfig", "Recipe", "RecipeError", "TARGETS"]

TARGETS = ("inductor", "onnxruntime", "eager")


class RecipeError(ValueError):
    """A recipe that cannot be honoured; the message says what is valid."""


def _no_registry() -> Mapping[str, type[PassConfig]]:
    raise RecipeError("no pass registry: import llmcompile (or pass registry=)")


#: the passes a recipe may name when none are given; :mod:`llmcompile.registry` sets it (the
#: engine knows no pass: the registry lives above it)
_DEFAULT_REGISTRY = _no_registry


def set_default_registry(registry) -> None:
    """Called once, by :mod:`llmcompile.registry`, with its ``pass_registry`` function."""
    global _DEFAULT_REGISTRY
    _DEFAULT_REGISTRY = registry


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen, typed fields validated on construction.

    Subclasses set ``name`` (the key used in recipes) and ``phase`` (where the pipeline runs
    it), declare typed fields with defaults, and override :meth:`rules` (rule-based passes) or
    :meth:`run` (passes that are more than rules, e.g. calibrated quantization).
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = ""
    #: True for passes that change what the model computes (quantization...): ``verify``
    #: then compares by top-1 agreement instead of a tight tolerance
    lossy: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{self.name}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`RecipeError` for values that are well-typed but invalid."""

    def rules(self) -> RuleSet:
        """The rules this pass applies (rule-based passes)."""
        return RuleSet(self.name)

    def run(self, program, stats) -> None:
        """Rewrite ``program`` in place, recording per-rule statistics in ``stats``."""
        from .rewrite import apply_rules

        apply_rules(program, self.rules(), stats)

    def fingerprint(self) -> str:
        """What identifies this config in cache keys."""
        return repr(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; lists become tuples, ints may become floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where}: {value!r} is not valid; choose one of "
                              f"{', '.join(repr(a) for a in typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(v, item, f"{where}[]") for v in value)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected nothing, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type) and (not isinstance(value, tp) or (
            tp is int and isinstance(value, bool))):
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got "
                          f"{type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class Recipe:
    """Ordered pass configs plus a lowering target. Passes run in pipeline phase order."""

    passes: tuple[PassConfig, ...] = ()
    target: str = "inductor"
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(self.passes))
        for p in self.passes:
            if not isinstance(p, PassConfig):
                raise RecipeError(f"recipe {self.name!r}: {p!r} is not a pass config")
        if self.target not in TARGETS:
            raise RecipeError(f"recipe {self.name!r}: unknown target {self.target!r}; "
                              f"valid targets: {', '.join(TARGETS)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any],
                  registry: Mapping[str, type[PassConfig]] | None = None) -> Recipe:
        """A recipe from a dict; ``registry`` maps pass names to configs (default: every pass
        llmcompile ships, :func:`llmcompile.registry.pass_registry`)."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a table/dict, got {type(data).__name__}")
        unknown = set(data) - {"name", "target", "passes"}
        if unknown:
            raise RecipeError(f"unknown recipe keys {sorted(unknown)}; valid: name, target, "
                              "passes")
        registry = _DEFAULT_REGISTRY() if registry is None else registry
        passes = []
        for i, entry in enumerate(data.get("passes", [])):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise RecipeError(f"passes[{i}] must be a table with a 'name'")
            kind = entry["name"]
            if kind not in registry:
                raise RecipeError(f"unknown pass {kind!r}; valid passes: "
                                  f"{', '.join(sorted(registry))}")
            config_cls = registry[kind]
            fields = {f.name for f in dataclasses.fields(config_cls)}
            extra = set(entry) - fields - {"name"}
            if extra:
                raise RecipeError(f"pass {kind!r} has no option(s) {sorted(extra)}; valid: "
                                  f"{', '.join(sorted(fields)) or '(none)'}")
            passes.append(config_cls(**{k: v for k, v in entry.items() if k != "name"}))
        return cls(tuple(passes), target=data.get("target", "inductor"),
                   name=data.get("name", "custom"))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target,
                "passes": [p.to_dict() for p in self.passes]}

    @classmethod
    def from_toml(cls, source: str | Path,
                  registry: Mapping[str, type[PassConfig]] | None = None) -> Recipe:
        """Load from a TOML file path or a TOML string."""
        text = Path(source).read_text() if looks_like_path(source) else str(source)
        try:
            return cls.from_dict(tomllib.loads(text), registry)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe TOML is malformed: {e}") from None

    def to_toml(self) -> str:
        lines = [f"name = {_toml(self.name)}", f"target = {_toml(self.target)}"]
        for p in self.passes:
            lines += ["", "[[passes]]"]
            lines += [f"{k} = {_toml(v)}" for k, v in p.to_dict().items() if v is not None]
        return "\n".join(lines) + "\n"

    @property
    def lossy(self) -> bool:
        """True when a pass of the recipe changes what the model computes."""
        return any(p.lossy for p in self.passes)

    def fingerprint(self) -> str:
        """Identifies the recipe in cache keys (works for rules given as objects too)."""
        return f"{self.name}|{self.target}|" + "|".join(p.fingerprint() for p in self.passes)


def looks_like_path(source: str | Path) -> bool:
    return isinstance(source, Path) or (
        "\n" not in source and "=" not in source and str(source).endswith(".toml"))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise RecipeError(f"cannot write {value!r} to TOML")
