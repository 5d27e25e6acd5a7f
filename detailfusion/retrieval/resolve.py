"""Which model a retrieval job runs: a registry URI (``models:/name@alias``, ``models:/name/3``,
``runs:/<id>/model``) or a local folder, loaded without pickles, with its identity.

The identity (``sha256`` of ``config.json`` + ``model.safetensors``) keys the gallery embedding
cache, so a new model version, or any change of the weights, invalidates it; name, version, run
id and alias go into the run summary and the MLflow run.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detailfusion.errors import DetailFusionError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class ModelNotFound(DetailFusionError):
    """The model URI names nothing loadable."""


@dataclass
class ResolvedModel:
    model: Any  # DetailFusionModel in eval mode
    uri: str
    identity: str  # sha256 of the saved config + weights
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    model_id: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # image_size, target_ratio from the logged model

    def info(self) -> dict[str, Any]:
        return {"uri": self.uri, "name": self.name, "version": self.version, "run_id": self.run_id,
                "model_id": self.model_id, "identity": self.identity, "variant": self.model.variant.name,
                "embed_dim": int(self.model.embed_dim)}


def weights_identity(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(folder / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _weights_folder(root: Path) -> Path | None:
    for cand in (root, root / "artifacts" / "weights", root / "weights"):
        if (cand / CONFIG_FILE).is_file() and (cand / WEIGHTS_FILE).is_file():
            return cand
    return None


def _load(folder: Path, uri: str, **info: Any) -> ResolvedModel:
    from detailfusion.models.io import load_pretrained

    settings: dict[str, Any] = {}
    mlmodel = folder.parent.parent / "MLmodel" if folder.name == "weights" else folder / "MLmodel"
    if mlmodel.is_file():
        meta = (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
        settings = {k: meta[k] for k in ("image_size", "target_ratio") if k in meta}
    model = load_pretrained(folder).eval()
    return ResolvedModel(model, uri, weights_identity(folder), settings=settings, **info)


def resolve_model(uri: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Load the model ``uri`` names; :class:`ModelNotFound` with one clear line when it cannot."""
    if uri.startswith(("models:/", "runs:/")):
        return _resolve_mlflow(uri, tracking_uri)
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise ModelNotFound(f"{uri}: model folder not found")
        folder = _weights_folder(path)
        if folder is None:
            raise ModelNotFound(f"{uri}: not a saved model ({CONFIG_FILE} + {WEIGHTS_FILE}) nor a logged MLflow model")
        return _load(folder, uri, name=path.name)
    raise ModelNotFound(f"{uri}: give a models:/ or runs:/ URI or a local model folder")


def _registry_info(client: Any, uri: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    ref = uri.removeprefix("models:/")
    if ref.startswith("m-"):
        return {"model_id": ref.split("/")[0]}
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, version = ref.split("/", 1)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        from detailfusion.tracking.transport import is_server_error, server_down

        if is_server_error(exc):  # the server is down, not the alias missing
            raise server_down(client.tracking_uri, exc) from None
        what = f"alias @{alias}" if alias else f"version {version}"
        raise ModelNotFound(f"{uri}: registered model {name!r} has no {what} ({exc.error_code})") from None
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id,
            "model_id": getattr(mv, "model_id", None)}


def _resolve_mlflow(uri: str, tracking_uri: str | None) -> ResolvedModel:
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    info: dict[str, Any] = {}
    if uri.startswith("models:/"):
        info = _registry_info(client, uri)
    else:
        info = {"run_id": uri.removeprefix("runs:/").split("/")[0]}
    tmp = Path(tempfile.mkdtemp(prefix="detailfusion-retrieve-model-"))
    try:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except Exception as exc:
            raise ModelNotFound(f"{uri}: cannot download the model: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        folder = _weights_folder(local)
        if folder is None:
            raise ModelNotFound(f"{uri}: the logged model has no weights artifact ({CONFIG_FILE} + {WEIGHTS_FILE})")
        return _load(folder, uri, **info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
