"""Architecture configs of the DetailFusion model: typed dataclasses and the JSON files that fill them.

An architecture config says what the network looks like (backbone, GM combiner, DI Q-Former,
compositor); it says nothing about training. Named configs live as JSON files in
``detailfusion/models/configs/`` (``tiny``, ``vit-b-32``), open_clip/timm style, and
:meth:`ModelConfig.to_dict` / :meth:`ModelConfig.from_dict` round-trip through JSON so every
checkpoint carries the exact config it was built from. Loading is strict: an unknown key, a wrong
type or an impossible value is a :class:`~detailfusion.errors.ConfigError` naming where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from detailfusion.config import from_dict, to_dict
from detailfusion.errors import ConfigError
from detailfusion.fsutil import read_json_object

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _check_dropout(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class BackboneConfig:
    """Which open_clip model provides the image and text encoders.

    Exactly one of ``clip_config`` (an inline ``open_clip.CLIP(**clip_config)`` dict: ``embed_dim``,
    ``vision_cfg``, ``text_cfg``) or ``arch`` (any open_clip architecture name, e.g. ``ViT-B-32``)
    is set. ``pretrained`` is an open_clip tag for ``arch`` (``openai``, ``laion2b_s34b_b79k``) or a
    local state-dict file (``.safetensors``, ``.pt``/``.bin``) for either route. ``image_size``
    overrides the architecture's input size (``arch`` only). ``mean``/``std`` default to the
    normalisation of the pretrained tag, or the OpenAI CLIP constants.
    """

    clip_config: dict[str, Any] | None = None
    arch: str | None = None
    pretrained: str | None = None
    image_size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    def validate(self) -> None:
        if (self.clip_config is None) == (self.arch is None):
            raise ValueError(
                "set exactly one of 'clip_config' (inline open_clip config) or 'arch' (open_clip name)"
            )
        if self.clip_config is not None:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in self.clip_config]
            if missing:
                raise ValueError(f"clip_config lacks {missing}")
            if self.image_size is not None:
                raise ValueError(
                    "image_size only applies to 'arch'; set clip_config.vision_cfg.image_size instead"
                )
        if self.image_size is not None:
            _check_positive(image_size=self.image_size)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {len(value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")


@dataclass
class GlobalMatchingConfig:
    """GM branch: CLIP4Cir combiner (ReLU projections to ``proj_dim``, MLP of width ``hidden_dim``)."""

    proj_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.1

    def validate(self) -> None:
        _check_positive(proj_dim=self.proj_dim, hidden_dim=self.hidden_dim)
        _check_dropout("dropout", self.dropout)


@dataclass
class DetailInferenceConfig:
    """DI branch: a BLIP-2 Q-Former (``transformers.Blip2QFormerModel``) with ``num_queries`` queries."""

    num_queries: int = 8
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    cross_attention_frequency: int = 1
    dropout: float = 0.1

    def validate(self) -> None:
        _check_positive(
            num_queries=self.num_queries,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            cross_attention_frequency=self.cross_attention_frequency,
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        _check_dropout("dropout", self.dropout)


@dataclass
class CompositorConfig:
    """AFC: a transformer encoder over [CLS; GM tokens; DI tokens] whose CLS output gates the branches.

    ``gate: scalar`` gives one weight per branch and query; ``per_dim`` one weight per branch, query
    and embedding dimension (the weights still sum to 1 over the two branches).
    """

    width: int = 128
    layers: int = 1
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    gate: Literal["scalar", "per_dim"] = "scalar"

    def validate(self) -> None:
        _check_positive(width=self.width, layers=self.layers, heads=self.heads)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        _check_dropout("dropout", self.dropout)


@dataclass
class ModelConfig:
    """The whole architecture: backbone plus the three DetailFusion modules."""

    backbone: BackboneConfig
    name: str = "custom"
    gm: GlobalMatchingConfig = field(default_factory=GlobalMatchingConfig)
    di: DetailInferenceConfig = field(default_factory=DetailInferenceConfig)
    afc: CompositorConfig = field(default_factory=CompositorConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; :meth:`from_dict` of it gives an equal config."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        """Build and validate a config from a mapping; errors name ``where`` and the bad key."""
        return from_dict(cls, data, where=where)


def list_models() -> list[str]:
    """Names of the architecture configs shipped in ``detailfusion/models/configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def read_config_file(path: str | Path) -> ModelConfig:
    """Load a :class:`ModelConfig` from a JSON file, naming the file in every error."""
    path = Path(path)
    data = read_json_object(path, missing="model config file not found", error=ConfigError)
    data.setdefault("name", path.stem)
    return ModelConfig.from_dict(data, where=str(path))


def get_model_config(config: ModelConfig | dict[str, Any] | str | Path) -> ModelConfig:
    """Resolve a config given as an object, a dict, a shipped config name or a JSON file path."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return ModelConfig.from_dict(config)
    if not isinstance(config, str | Path):
        raise ConfigError(
            f"model config must be a ModelConfig, dict, name or path, got {type(config).__name__}"
        )
    text = str(config)
    if text in list_models():
        return read_config_file(CONFIG_DIR / f"{text}.json")
    if text.endswith(".json") or Path(text).is_file():
        return read_config_file(text)
    raise ConfigError(f"unknown model config '{text}': not a file and not one of {list_models()}")
