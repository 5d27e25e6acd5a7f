"""The DetailFusion model package: configs, variants, backbone adapter, branches, compositor, I/O.

Typical use::

    from detailfusion.models import create_model, list_models, list_variants
    model = create_model("tiny", variant="full")
    out = model.encode_query(model.preprocess_uint8(ref_uint8), model.tokenize(captions))
    t = model.encode_target(model.preprocess_uint8(target_uint8))
    logits = model.similarity(out["query"], t)
"""

import importlib
from typing import TYPE_CHECKING, Any

# Where each public name lives. The submodules load on first use (PEP 562), so reading the variant
# list (params.yaml's model.variant check) does not import torch and open_clip.
_EXPORTS = {
    "backbone": ("ClipBackbone", "get_tokenizer"),
    "branches": ("DetailInferenceBranch", "GlobalMatchingBranch"),
    "compositor": ("AdaptiveFeatureCompositor", "average_fusion", "weighted_fusion"),
    "config": ("BackboneConfig", "CompositorConfig", "DetailInferenceConfig", "GlobalMatchingConfig", "ModelConfig",
               "get_model_config", "list_models", "read_config_file"),
    "factory": ("create_model",),
    "io": ("LoadReport", "load_pretrained", "load_weights", "read_saved_config", "save_pretrained"),
    "model": ("DetailFusionModel",),
    "variants": ("VARIANTS", "ModelVariant", "get_variant", "list_variants"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from detailfusion.models.backbone import ClipBackbone, get_tokenizer
    from detailfusion.models.branches import DetailInferenceBranch, GlobalMatchingBranch
    from detailfusion.models.compositor import AdaptiveFeatureCompositor, average_fusion, weighted_fusion
    from detailfusion.models.config import (
        BackboneConfig,
        CompositorConfig,
        DetailInferenceConfig,
        GlobalMatchingConfig,
        ModelConfig,
        get_model_config,
        list_models,
        read_config_file,
    )
    from detailfusion.models.factory import create_model
    from detailfusion.models.io import (
        LoadReport,
        load_pretrained,
        load_weights,
        read_saved_config,
        save_pretrained,
    )
    from detailfusion.models.model import DetailFusionModel
    from detailfusion.models.variants import VARIANTS, ModelVariant, get_variant, list_variants

__all__ = [
    "VARIANTS",
    "AdaptiveFeatureCompositor",
    "BackboneConfig",
    "ClipBackbone",
    "CompositorConfig",
    "DetailFusionModel",
    "DetailInferenceBranch",
    "DetailInferenceConfig",
    "GlobalMatchingBranch",
    "GlobalMatchingConfig",
    "LoadReport",
    "ModelConfig",
    "ModelVariant",
    "average_fusion",
    "create_model",
    "get_model_config",
    "get_tokenizer",
    "get_variant",
    "list_models",
    "list_variants",
    "load_pretrained",
    "load_weights",
    "read_config_file",
    "read_saved_config",
    "save_pretrained",
    "weighted_fusion",
]
