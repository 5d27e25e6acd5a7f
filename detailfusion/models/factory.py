"""``create_model``: one entry point from an architecture config and a variant name to a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detailfusion.models.config import ModelConfig, get_model_config
from detailfusion.models.model import DetailFusionModel
from detailfusion.models.variants import ModelVariant, get_variant


def create_model(
    config: ModelConfig | dict[str, Any] | str | Path,
    variant: str | ModelVariant = "full",
    *,
    load_backbone_weights: bool = True,
) -> DetailFusionModel:
    """Build a :class:`DetailFusionModel`.

    ``config``: a :class:`ModelConfig`, a dict, a shipped config name (:func:`list_models`) or a JSON
    file path. ``variant``: a name from :func:`list_variants`. ``load_backbone_weights=False`` skips
    the backbone's pretrained tag/checkpoint (used when a full checkpoint will overwrite it anyway).
    Unknown configs or variants raise :class:`~detailfusion.errors.ConfigError` naming them.
    """
    resolved_variant = get_variant(variant)
    return DetailFusionModel(
        get_model_config(config), resolved_variant, load_backbone_weights=load_backbone_weights
    )
