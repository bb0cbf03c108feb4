"""The fusion rule set (lossless): every fusion rule, and the ``fuse`` pass config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmcompile.recipe import PassConfig, RecipeError
from llmcompile.rules import RuleSet

from . import fuse_attention, fuse_norm

#: order matters within a sweep: attention first, then norms (add + norm after norm)
RULES = RuleSet("fusion", [*fuse_attention.RULES, *fuse_norm.RULES])


@dataclass(frozen=True)
class FuseConfig(PassConfig):
    """Lossless operator fusion. ``include`` / ``exclude`` select rules by name glob."""

    name: ClassVar[str] = "fuse"
    phase: ClassVar[str] = "fuse"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        try:
            RULES.select(self.include, self.exclude)
        except ValueError as e:
            raise RecipeError(f"fuse: {e}") from None

    def rules(self) -> RuleSet:
        return RULES.select(self.include, self.exclude)
