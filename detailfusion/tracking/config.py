"""The ``tracking:`` section of ``params.yaml`` and where the MLflow store lives.

The default store is a SQLite file at the repository root. DVC runs experiments in temporary
copies of the repository (``dvc exp run --temp``, queued experiments under ``.dvc/tmp/exps``),
so a relative store path is resolved against the *real* repository root, never the working
directory; every run then lands in the one store. ``MLFLOW_TRACKING_URI`` overrides the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from detailfusion.errors import ConfigError

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DVC_ROOT_ENV = "DVC_ROOT"


@dataclass
class TrackingConfig:
    """How stages talk to MLflow (``params.yaml`` section ``tracking``)."""

    enabled: bool
    # Relative paths (sqlite:///mlflow.db, plain paths) resolve against the repository root.
    tracking_uri: str
    # Artifact root of experiments this code creates in a local (non-HTTP) store; a server
    # decides its own artifact location.
    artifact_location: str
    experiment: str
    # MLflow retries a failing request itself (detailfusion.tracking.transport): up to `retries`
    # times, waiting about 0, 2*backoff_s, 4*backoff_s... (whole seconds), timeout_s per attempt.
    retries: int
    backoff_s: float
    timeout_s: float
    system_metrics: bool
    system_metrics_interval_s: float
    # Per-step metrics are sent in batches of this many values (and at the end of the stage).
    metrics_batch: int
    # What could not be logged when the server stayed down (relative to the working directory,
    # so a DVC stage writes it next to its other metrics).
    offline_record: str

    def validate(self) -> None:
        if not 0 <= self.retries <= 10:
            raise ValueError("retries must be within 0..10 (MLflow's limit)")
        if not 0 <= self.backoff_s <= 120 or self.timeout_s <= 0:
            raise ValueError("backoff_s must be within 0..120 (MLflow's limit) and timeout_s > 0")
        if self.metrics_batch < 1 or self.metrics_batch > 1000:
            raise ValueError("metrics_batch must be within 1..1000 (MLflow's log_batch limit)")
        if "{dataset}" not in self.experiment:
            raise ValueError(f"experiment must contain '{{dataset}}', got {self.experiment!r}")

    def experiment_name(self, dataset: str) -> str:
        return self.experiment.format(dataset=dataset)


def find_repo_root(start: str | Path | None = None) -> Path:
    """The DVC repository root: ``$DVC_ROOT`` when DVC runs us, else the nearest ``dvc.yaml`` above.

    DVC sets ``DVC_ROOT`` to the parent repository even inside experiment temp dirs. Without it,
    a ``dvc.yaml`` found inside ``<root>/.dvc/tmp/exps/<tmp>`` is an experiment copy, so the
    search continues above its ``.dvc`` folder. Falls back to the start directory.
    """
    env_root = os.environ.get(DVC_ROOT_ENV)
    if env_root and (Path(env_root) / "dvc.yaml").is_file():
        return Path(env_root).resolve()
    here = Path(start or Path.cwd()).resolve()
    found: Path | None = None
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            found = folder
            break
    if found is None:
        return here
    parts = found.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            outer = Path(*parts[:i])
            if (outer / "dvc.yaml").is_file():
                return outer
    return found


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def resolve_tracking_uri(cfg: TrackingConfig, repo_root: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``cfg.tracking_uri`` with relative paths made absolute."""
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return absolutize_uri(cfg.tracking_uri, repo_root or find_repo_root())


def absolutize_uri(uri: str, root: Path) -> str:
    """Make the path of a local store URI (sqlite, file, plain path) absolute under ``root``."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path or path == ":memory:":
            raise ConfigError(f"tracking.tracking_uri {uri!r}: needs a database file path")
        return uri if path.startswith("/") else f"sqlite:///{(root / path).resolve()}"
    if uri.startswith("file:"):
        path = uri[len("file:") :].removeprefix("//")
        return uri if path.startswith("/") else (root / path).resolve().as_uri()
    if _SCHEME.match(uri):
        return uri
    return str((root / uri).resolve())


def is_local_store(uri: str) -> bool:
    """Stores this process writes itself (no server deciding artifact locations)."""
    return not uri.startswith(("http://", "https://", "databricks"))


def local_artifact_location(cfg: TrackingConfig, repo_root: Path) -> str:
    """Artifact root for experiments created in a local store, absolute so temp dirs do not own it."""
    loc = cfg.artifact_location
    if _SCHEME.match(loc) and not loc.startswith("file:"):
        return loc
    return Path(absolutize_uri(loc, repo_root).removeprefix("file://")).as_uri()
