"""The model variants: the full DetailFusion model and the ablations of ``docs/method.md``.

A variant decides which branches are built, how they are fused and which training stages run;
the architecture config (sizes) is orthogonal to it, so every variant works with every config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from detailfusion.errors import ConfigError

Branch = Literal["gm", "di"]
Fusion = Literal["afc", "avg", "gm", "di"]


@dataclass(frozen=True)
class ModelVariant:
    """One registered variant.

    ``branches``: the branches the model builds. ``fusion``: ``afc`` (learned compositor), ``avg``
    (fixed 0.5/0.5), or ``gm``/``di`` (a single branch is the query). ``stage1``: run the detail
    pretraining on IPr2Pr. ``detail_opt``: stage 1 uses the detail-oriented objective (shared patch
    masking and same-original hard negatives); it only matters when ``stage1`` is on.
    """

    name: str
    branches: tuple[Branch, ...]
    fusion: Fusion
    stage1: bool
    detail_opt: bool
    description: str

    def __post_init__(self) -> None:
        if not self.branches or set(self.branches) - {"gm", "di"}:
            raise ValueError(f"variant {self.name}: branches must be a non-empty subset of gm, di")
        needs_both = self.fusion in ("afc", "avg")
        if needs_both and set(self.branches) != {"gm", "di"}:
            raise ValueError(f"variant {self.name}: fusion {self.fusion!r} needs both branches")
        if not needs_both and self.branches != (self.fusion,):
            raise ValueError(f"variant {self.name}: fusion {self.fusion!r} needs exactly that branch")
        if self.stage1 and "di" not in self.branches:
            raise ValueError(f"variant {self.name}: stage 1 pretrains the DI branch, which it does not build")

    @property
    def has_gm(self) -> bool:
        return "gm" in self.branches

    @property
    def has_di(self) -> bool:
        return "di" in self.branches

    @property
    def stages(self) -> tuple[int, ...]:
        """The training stages this variant runs (stage 3 only trains a learned compositor)."""
        return (1,) * self.stage1 + (2,) + (3,) * (self.fusion == "afc")


VARIANTS: dict[str, ModelVariant] = {
    v.name: v
    for v in (
        ModelVariant("full", ("gm", "di"), "afc", True, True, "GM + DI fused by the AFC; all three stages"),
        ModelVariant(
            "no_pretrain",
            ("gm", "di"),
            "afc",
            False,
            True,
            "as full, but stage 1 is skipped (DI starts from the backbone)",
        ),
        ModelVariant(
            "gm_only", ("gm",), "gm", False, False, "only the GM branch (a CLIP4Cir-style baseline)"
        ),
        ModelVariant("di_only", ("di",), "di", True, True, "only the DI branch, pretrained in stage 1"),
        ModelVariant(
            "avg_fusion", ("gm", "di"), "avg", True, True, "GM + DI with a fixed 0.5/0.5 fusion, no AFC"
        ),
        ModelVariant(
            "no_detail_opt",
            ("gm", "di"),
            "afc",
            True,
            False,
            "as full, but stage 1 without masking and hard negatives",
        ),
    )
}


def list_variants() -> list[str]:
    """Names of the registered variants, ``full`` first."""
    return list(VARIANTS)


def get_variant(variant: str | ModelVariant) -> ModelVariant:
    """Look a variant up by name (a :class:`ModelVariant` passes through)."""
    if isinstance(variant, ModelVariant):
        return variant
    if variant not in VARIANTS:
        raise ConfigError(f"unknown model variant '{variant}'; known: {list_variants()}")
    return VARIANTS[variant]
