"""The fusion rule set (lossless): every fusion rule, and the ``fuse`` pass config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmcompile.core.recipe import PassConfig, RecipeError
from llmcompile.core.rules import RuleSet
from llmcompile.passes import fuse_attention, fuse_glu, fuse_norm, fuse_projections, fuse_rotary

#: Rules apply in this order within each sweep of the fixed point: attention first (its
#: patterns span the most ops); the norms before add + norm (which matches the fused norm);
#: three-way projections before two-way ones (a Q/K/V triple becomes one GEMM).
RULES = RuleSet("fusion", [
    *fuse_attention.RULES,
    *fuse_norm.RULES,
    *fuse_rotary.RULES,
    *fuse_projections.RULES,
    *fuse_glu.RULES,
])


#: rules that ``unrepeat_kv = false`` turns off: grouped-query attention then takes transformers'
#: repeat_kv copies of K and V (one per query head) instead of the cache's KV heads
UNREPEAT = ("attention_unrepeat_kv*",)


@dataclass(frozen=True)
class FuseConfig(PassConfig):
    """Lossless operator fusion. ``include`` / ``exclude`` select rules by name glob;
    ``unrepeat_kv`` (on by default) keeps the :data:`UNREPEAT` rules."""

    name: ClassVar[str] = "fuse"
    phase: ClassVar[str] = "fuse"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    unrepeat_kv: bool = True

    def validate(self) -> None:
        try:
            RULES.select(self.include, self.exclude)
        except ValueError as e:
            raise RecipeError(f"fuse: {e}") from None

    def rules(self) -> RuleSet:
        off = () if self.unrepeat_kv else UNREPEAT
        return RULES.select(self.include, (*self.exclude, *off))
