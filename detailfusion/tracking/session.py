"""One client to one MLflow store, and the one place where a lasting failure turns it offline.

:meth:`TrackingSession.call` sends a client call (MLflow retries it under the policy of
:mod:`detailfusion.tracking.transport`). A rejected request propagates; a store that is still
unavailable after the retries turns the session offline for good and raises
:class:`TrackingOffline`, which callers catch to record instead of send (the stage run's offline
record, the ablation suite's "not logged" result, ``tracking replay``'s one-line error).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from detailfusion.tracking.config import (
    TrackingConfig,
    find_repo_root,
    is_local_store,
    local_artifact_location,
    resolve_tracking_uri,
)
from detailfusion.tracking.transport import configure_http, is_server_error, short_error

log = logging.getLogger(__name__)

T = TypeVar("T")

PIPELINE_RUN_ENV = "DETAILFUSION_PIPELINE_RUN_ID"
TAG_PIPELINE_KEY = "detailfusion.pipeline_key"
TAG_RUN_KIND = "detailfusion.run_kind"
TAG_STAGE = "detailfusion.stage"
MLFLOW_PARENT = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC_GREATER_TAG = "mlflow.experiment.primaryMetric.greaterIsBetter"

_INVALID_KEY_CHARS = re.compile(r"[^\w\-. /:]")


class TrackingOffline(Exception):
    """The store is unavailable (now or since an earlier call): record instead of sending."""


def mlflow_key(name: str) -> str:
    """A metric/param key MLflow accepts: ``R@1`` -> ``R_at_1``; other invalid characters -> ``_``.

    The evaluation metrics use ``@`` (``Rsub@1``), which MLflow refuses in names; every run maps
    them the same way so ablation runs compare column by column.
    """
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class TrackingSession:
    """One client to one store; turns offline after a call fails for the store's sake."""

    # MLflow's UI opens an experiment by its kind: "custom_model_development" ("Machine learning")
    # shows the training runs table first, not the GenAI overview; the primary metric (the
    # registry's gating metric) is what the runs table and charts lead with.
    primary_metric: tuple[str, bool] | None = None

    def __init__(self, cfg: TrackingConfig, repo_root: Path | None = None):
        self.cfg = cfg
        self.repo_root = repo_root or find_repo_root()
        self.tracking_uri = resolve_tracking_uri(cfg, self.repo_root)
        self.offline = not cfg.enabled
        self.error: str | None = None
        self.failed_call: str | None = None
        self.since: str | None = None
        self._client = None
        self._on_offline: list[Callable[[], None]] = []
        if cfg.enabled:
            configure_http(cfg.retries, cfg.backoff_s, cfg.timeout_s, where="tracking")

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def on_offline(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (errors ignored) when the session goes offline."""
        self._on_offline.append(callback)

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``; raises :class:`TrackingOffline` when the store is (now) down."""
        if self.offline:
            raise TrackingOffline(what)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_server_error(exc):
                raise
            self.go_offline(what, exc)
            raise TrackingOffline(what) from exc

    def go_offline(self, what: str, exc: BaseException) -> None:
        self.offline = True
        self.failed_call = what
        self.error = short_error(exc)
        self.since = now_iso()
        log.info("tracking store %s unreachable during %s; continuing offline", self.tracking_uri, what)
        for callback in self._on_offline:
            with contextlib.suppress(Exception):
                callback()

    def experiment_tags(self) -> dict[str, str]:
        tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        if self.primary_metric is not None:
            name, greater = self.primary_metric
            tags[PRIMARY_METRIC_TAG] = mlflow_key(name)
            tags[PRIMARY_METRIC_GREATER_TAG] = str(bool(greater)).lower()
        return tags

    def ensure_experiment(self, dataset: str) -> str:
        """Id of the experiment for ``dataset``, created (race-safe) if missing."""
        return self.experiment_id(self.cfg.experiment_name(dataset))

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created (race-safe, artifacts under the repo root) if missing."""
        from mlflow.exceptions import MlflowException

        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = (
                local_artifact_location(self.cfg, self.repo_root) if is_local_store(self.tracking_uri) else None
            )
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=self.experiment_tags())
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return self.client.get_experiment_by_name(name).experiment_id

        return self.call(f"get/create experiment {name}", get_or_create)
