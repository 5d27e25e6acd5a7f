"""All of ``params.yaml`` as one typed object, read and checked once per command.

``params.yaml`` is the only place where a setting's value is written down: the section
dataclasses below have no defaults of their own (a few deliberately-not-params fields such as
:attr:`LoopConfig.device <detailfusion.train.config.LoopConfig>` say so in their docstrings). The
CLI calls :func:`load_config` once, before any data is read, so a bad value anywhere in the file
fails at once with ``params.yaml: <section>.<key>: <problem>``, and hands each stage its typed
section. ``tests/test_params.py`` fails when ``params.yaml`` and these dataclasses disagree on a key.

The section classes live next to the code that uses them, in light modules (no torch, no pandas
stage code), so loading the file stays quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailfusion.config import REPO_PARAMS, from_dict, load_params, repo_default
from detailfusion.data.config import DataSection, PrepareConfig, ValidateConfig
from detailfusion.data.synthetic.config import SynthConfig
from detailfusion.errors import ConfigError
from detailfusion.eval.config import EvaluateConfig
from detailfusion.registry.config import RegistryConfig
from detailfusion.tracking.config import TrackingConfig
from detailfusion.train.config import ModelSection, PretrainConfig, Stage1Config, Stage2Config, Stage3Config


@dataclass
class Params:
    """One field per top-level section of ``params.yaml``, in the file's order."""

    data: DataSection
    synthesize: SynthConfig
    prepare: PrepareConfig
    validate: ValidateConfig
    model: ModelSection
    pretrain_backbone: PretrainConfig
    stage1_detail: Stage1Config
    stage2_branches: Stage2Config
    stage3_fusion: Stage3Config
    evaluate: EvaluateConfig
    tracking: TrackingConfig
    registry: RegistryConfig
    # Where the values came from (the --params path), for error lines; not a section.
    source: str = dataclasses.field(default="params.yaml", compare=False)

    @classmethod
    def sections(cls) -> dict[str, type]:
        """``{section name: dataclass}`` for every section of ``params.yaml``."""
        import typing

        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "source"}

    def section_dict(self, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
        """The named sections as plain dicts (what MLflow logs as run params)."""
        from detailfusion.config import to_dict

        return {name: to_dict(getattr(self, name)) for name in names}

    @property
    def dataset(self) -> str:
        """The data set the pipeline trains and evaluates on (``stage2_branches.dataset``)."""
        return self.stage2_branches.dataset


def params_from_mapping(data: Any, source: str = "params.yaml") -> Params:
    """Check and type a whole params mapping: every section present and known, every value valid."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    sections = Params.sections()
    for name in data:
        if name not in sections:
            raise ConfigError(f"{source}: {name}: unknown section; allowed: {list(sections)}")
    missing = [name for name in sections if name not in data]
    if missing:
        raise ConfigError(f"{source}: missing section(s) {missing}")
    typed = {name: from_dict(cls, data[name], where=f"{source}: {name}") for name, cls in sections.items()}
    return Params(**typed, source=source)


def load_config(path: str | Path = "params.yaml") -> Params:
    """Read ``path`` and check every section (:func:`params_from_mapping`)."""
    return params_from_mapping(load_params(path), str(path))


def repo_section(name: str, **overrides: Any) -> Any:
    """Section ``name`` of the checkout's ``params.yaml`` (:func:`detailfusion.config.repo_default`),
    with ``overrides`` replaced: for tests and scripts that need one section's values without a
    params file of their own."""
    sections = Params.sections()
    if name not in sections:
        raise ConfigError(f"{REPO_PARAMS}: {name}: unknown section; allowed: {list(sections)}")
    return dataclasses.replace(repo_default(sections[name], name), **overrides)
