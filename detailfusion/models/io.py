"""Saving and loading DetailFusion models without pickles.

A saved model is a directory with ``config.json`` (format marker, variant name, the full
:class:`ModelConfig`) and ``model.safetensors`` (the state dict). Loading rebuilds the module from
the JSON config and copies the tensors in; nothing is unpickled, so a checkpoint cannot run code.

Weights can also be moved between variants (a stage-2 GM+DI checkpoint into a ``full`` model, a
``gm_only`` model into ``full``...): :func:`load_weights` loads what matches and reports the
missing and unexpected keys; a shape mismatch is always an error.

Same weights give the same bytes (:func:`write_safetensors`), so DVC hashes of two runs that
trained identically are identical.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from detailfusion.errors import ConfigError, DetailFusionError
from detailfusion.fsutil import read_json_object
from detailfusion.models.config import ModelConfig
from detailfusion.models.factory import create_model
from detailfusion.models.model import DetailFusionModel

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "detailfusion-model"
FORMAT_VERSION = 1


@dataclass
class LoadReport:
    """What a non-strict load left out: model keys with no tensor, tensors with no model key."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        return f"missing {_summarise(self.missing)}; unexpected {_summarise(self.unexpected)}"


def _summarise(keys: list[str]) -> str:
    """``3 key(s) [afc.* x2, di.query_tokens]``: long key lists grouped by their module."""
    groups: dict[str, int] = defaultdict(int)
    for key in keys:
        groups[key.split(".")[0]] += 1
    parts = [
        f"{prefix}.* x{n}" if n > 1 else next(k for k in keys if k.split(".")[0] == prefix)
        for prefix, n in groups.items()
    ]
    return f"{len(keys)} key(s) [{', '.join(parts)}]"


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors that share memory: keep one name per tied tensor (aliases map
    the others to it) and copy views that only overlap part of a storage."""
    by_storage: dict[tuple[str, int], list[str]] = defaultdict(list)
    for name, tensor in state.items():
        if tensor.numel():
            by_storage[(str(tensor.device), tensor.untyped_storage().data_ptr())].append(name)
    out = {name: tensor.contiguous() for name, tensor in state.items()}
    aliases: dict[str, str] = {}
    for names in by_storage.values():
        first = state[names[0]]
        for other in names[1:]:
            tensor = state[other]
            same_view = (
                tensor.data_ptr() == first.data_ptr()
                and tensor.shape == first.shape
                and tensor.stride() == first.stride()
            )
            if same_view:
                aliases[other] = names[0]
                del out[other]
            else:
                out[other] = tensor.clone().contiguous()
    return out, aliases


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` with a canonical header: same tensors + metadata, same bytes.

    safetensors keeps the metadata in a Rust ``HashMap``, so its keys come out in a random order
    on every save (two runs writing bit-identical weights gave files with different hashes). The
    header is rewritten in place with the metadata keys sorted; tensors keep the writer's order
    (by offset), so the bytes are those of a writer with a sorted map.
    """
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    canonicalize_safetensors_header(path)
    return path


def canonicalize_safetensors_header(path: str | Path) -> None:
    """Sort the ``__metadata__`` keys of a safetensors file's JSON header, in place.

    The header keeps its length (the same JSON reordered, padded with spaces as the format
    allows), so the tensor data is not rewritten; a header that would grow is refused.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        meta = header.pop("__metadata__", None)
        ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
        ordered.update(header)
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # not seen: the same entries re-serialised compactly are never longer
            raise DetailFusionError(
                f"{path}: cannot rewrite the safetensors header in place ({len(text)} > {size} bytes)"
            )
        fh.seek(8)
        fh.write(text.ljust(size, b" "))


def save_pretrained(model: DetailFusionModel, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    tensors, aliases = _dedupe_shared(state)
    metadata = {"format": FORMAT, "aliases": json.dumps(aliases, sort_keys=True)}
    write_safetensors(tensors, directory / WEIGHTS_FILE, metadata=metadata)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": model.variant.name,
        "model": model.config.to_dict(),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return directory


def read_saved_config(directory: str | Path) -> tuple[ModelConfig, str]:
    """The (config, variant name) a saved model directory was written with."""
    path = Path(directory) / CONFIG_FILE
    meta = read_json_object(path, missing=f"not found (is {directory} a saved DetailFusion model?)", error=ConfigError)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a DetailFusion model config (format must be '{FORMAT}')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported ({FORMAT_VERSION})"
        )
    for key in ("variant", "model"):
        if key not in meta:
            raise ConfigError(f"{path}: missing key '{key}'")
    return ModelConfig.from_dict(meta["model"], where=f"{path}: model"), meta["variant"]


def read_state_dict(source: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a saved model directory or a ``.safetensors`` file, with tied names restored."""
    path = Path(source)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            metadata: dict[str, Any] = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file: {exc}") from exc
    for alias, target in json.loads(metadata.get("aliases", "{}")).items():
        state[alias] = state[target]
    return state


def load_weights(
    model: nn.Module,
    source: str | Path | dict[str, torch.Tensor],
    *,
    strict: bool = False,
    map_location: str | torch.device = "cpu",
) -> LoadReport:
    """Copy a state dict (dict, saved directory or ``.safetensors`` file) into ``model``.

    Non-strict (the default) loads every matching key and returns the missing/unexpected ones
    (logged as a warning when not empty); ``strict=True`` raises a ConfigError listing them. A key
    present on both sides with a different shape always raises.
    """
    where = "state dict" if isinstance(source, dict) else str(source)
    state = source if isinstance(source, dict) else read_state_dict(source, map_location)
    own = model.state_dict()
    mismatched = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if mismatched:
        raise ConfigError(f"{where}: tensor shapes do not match the model: {mismatched}")
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(missing=sorted(result.missing_keys), unexpected=sorted(result.unexpected_keys))
    if strict and not report.clean:
        raise ConfigError(f"{where}: does not match the model: {report}")
    if not report.clean:
        log.warning("%s: partial load, %s", where, report)
    return report


def load_pretrained(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    variant: str | None = None,
) -> DetailFusionModel:
    """Rebuild a saved model from its ``config.json`` and load its weights (no pickles).

    With ``variant`` naming another variant than the saved one, that variant is built and the
    weights load non-strictly; the :class:`LoadReport` is logged and kept as ``model.load_report``.
    The saved variant itself must match exactly.
    """
    config, saved_variant = read_saved_config(directory)
    target_variant = variant or saved_variant
    model = create_model(config, target_variant, load_backbone_weights=False)
    report = load_weights(model, directory, strict=target_variant == saved_variant, map_location=map_location)
    model.load_report = report
    return model.to(map_location)
