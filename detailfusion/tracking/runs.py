"""MLflow runs for the pipeline: one parent run per pipeline invocation, one nested run per stage.

Use::

    with stage_run("stage2_branches", params=params, dataset="cirr", variant="full", config=cfg) as run:
        for step, loss in enumerate(train()):
            run.log_metrics({"train/loss": loss}, step=step)
        run.log_metrics_file("metrics/stage2.json")
        run.log_artifacts("plots/stage2", artifact_path="plots")

**Parent run.** DVC runs each stage as its own process, so the stages of one ``dvc repro`` /
``dvc exp run`` find their common parent run on the server: the parent carries the tag
``detailfusion.pipeline_key``, built from the DVC process that runs the stages (pid and start
time, so one invocation = one key) and ``DVC_EXP_NAME``. The first stage creates it, later
stages find it by that tag. A caller that owns a parent itself (the Prefect ablation flow
fanning out ``dvc exp run`` s) exports its run id as ``DETAILFUSION_PIPELINE_RUN_ID``, and every
stage nests under it instead.

**Resilience.** Every tracking call is retried with exponential backoff. When the store stays
unreachable the run degrades to an offline logger: the stage goes on, what could not be logged
is kept in ``tracking.offline_record`` (JSON, per stage) and one warning at the end says what is
missing; ``detailfusion tracking replay`` (:mod:`detailfusion.tracking.replay`) sends it once the
store is back. Tracking never raises into training code except for programming errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from detailfusion.config import flatten
from detailfusion.tracking.config import (
    TrackingConfig,
    find_repo_root,
    is_local_store,
    local_artifact_location,
    resolve_tracking_uri,
)
from detailfusion.tracking.lineage import TAG_DVC_STAGE, frame_digest, lineage_tags

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

T = TypeVar("T")

PIPELINE_RUN_ENV = "DETAILFUSION_PIPELINE_RUN_ID"
TAG_PIPELINE_KEY = "detailfusion.pipeline_key"
TAG_RUN_KIND = "detailfusion.run_kind"
TAG_STAGE = "detailfusion.stage"
MLFLOW_PARENT = "mlflow.parentRunId"
MLFLOW_RUN_NAME = "mlflow.runName"

# MLflow error codes that mean "the request was wrong", not "the server is unreachable".
_CLIENT_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "NOT_FOUND",
}
_PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. /:]")


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC_GREATER_TAG = "mlflow.experiment.primaryMetric.greaterIsBetter"


class TrackingOfflineWarning(UserWarning):
    """The tracking store was unreachable; some of a stage's tracking data was not logged."""


class _Offline(Exception):
    """Internal: the session is offline, record instead of sending."""


def mlflow_key(name: str) -> str:
    """A metric/param key MLflow accepts: ``R@1`` -> ``R_at_1``; other invalid characters -> ``_``.

    The evaluation metrics use ``@`` (``Rsub@1``), which MLflow refuses in names; every run maps
    them the same way so ablation runs compare column by column.
    """
    return _INVALID_KEY_CHARS.sub("_", name.replace("@", "_at_"))


def is_retryable(exc: BaseException) -> bool:
    """True for failures of the transport or the server (retry), False for rejected requests."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in _CLIENT_ERRORS
    try:
        import requests

        if isinstance(exc, requests.RequestException):
            return True
    except ImportError:  # requests ships with mlflow; keep the check independent of it anyway
        pass
    return isinstance(exc, OSError | TimeoutError)


def call_with_retries(fn: Callable[[], T], *, retries: int, backoff_s: float, what: str = "tracking call") -> T:
    """Run ``fn``; on a retryable failure wait ``backoff_s * 2**i`` and try again, ``retries`` times.

    Non-retryable errors (a rejected request) propagate at once; the last retryable error
    propagates after the final attempt.
    """
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_retryable(exc) or attempt == retries:
                raise
            delay = backoff_s * (2**attempt)
            log.info("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__, _short(exc), attempt + 1,
                     retries, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_HTTP_KEYS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_policy_lock = threading.Lock()
_policy_depth = 0
_policy_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def http_policy(timeout_s: float) -> Iterator[None]:
    """Within the block MLflow makes one HTTP attempt per call with ``timeout_s``: our retry loop
    replaces its own (7 retries by default, minutes of waiting on a dead server).

    MLflow reads these settings from the environment; a counter keeps overlapping blocks in
    several threads from restoring them while another thread still relies on them.
    """
    global _policy_depth, _policy_saved
    with _policy_lock:
        if _policy_depth == 0:
            _policy_saved = {k: os.environ.get(k) for k in _HTTP_KEYS}
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(timeout_s)))
        _policy_depth += 1
    try:
        yield
    finally:
        with _policy_lock:
            _policy_depth -= 1
            if _policy_depth == 0:
                for key, value in _policy_saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- offline record


@dataclasses.dataclass
class OfflineRecord:
    """What one stage could not log, kept on disk so nothing is lost silently."""

    stage: str
    tracking_uri: str
    experiment: str
    run_id: str | None = None
    parent_run_id: str | None = None
    error: str | None = None
    failed_call: str | None = None
    since: str | None = None
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    artifacts: list[dict[str, str | None]] = dataclasses.field(default_factory=list)
    datasets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str | None = None

    def summary(self) -> str:
        parts = []
        if self.params:
            parts.append(f"{len(self.params)} params")
        if self.tags:
            parts.append(f"{len(self.tags)} tags")
        if self.metrics:
            keys = sorted({m["key"] for m in self.metrics})
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            parts.append(f"{len(self.metrics)} metric values ({shown})")
        if self.artifacts:
            parts.append(f"{len(self.artifacts)} artifacts")
        if self.datasets:
            parts.append(f"{len(self.datasets)} data set inputs")
        if self.run_id is None:
            parts.append("the run itself")
        elif self.status:
            parts.append(f"the final run status {self.status}")
        return ", ".join(parts) or "nothing"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        """Merge this stage's entry into the JSON file at ``path`` (atomic replace)."""
        _update_record_file(path, lambda stages: stages.__setitem__(self.stage, self.to_dict()))


def _update_record_file(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _directory_lock(path.parent):
        stages: dict[str, Any] = {}
        if path.is_file():
            try:
                stages = json.loads(path.read_text(encoding="utf-8")).get("stages", {})
            except (json.JSONDecodeError, AttributeError, OSError):
                stages = {}
        change(stages)
        if not stages:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"stages": stages}, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def clear_offline_record(path: Path, stage: str) -> None:
    """Drop ``stage`` from the offline record (it logged fine this time)."""
    if path.is_file():
        _update_record_file(path, lambda stages: stages.pop(stage, None))


@contextlib.contextmanager
def _directory_lock(folder: Path) -> Iterator[None]:
    """Exclusive flock on a folder: stages of parallel experiments share metrics/, and locking the
    folder itself leaves no lock file behind in it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- session


class TrackingSession:
    """One client to one store; sends calls with retries and turns offline after a lasting failure."""

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

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with retries; raises :class:`_Offline` when the store is (now) down."""
        if self.offline:
            raise _Offline(what)
        try:
            with http_policy(self.cfg.timeout_s):
                return call_with_retries(
                    lambda: fn(*args, **kwargs), retries=self.cfg.retries, backoff_s=self.cfg.backoff_s, what=what
                )
        except Exception as exc:
            if not is_retryable(exc):
                raise
            self.go_offline(what, exc)
            raise _Offline(what) from exc

    def go_offline(self, what: str, exc: BaseException) -> None:
        self.offline = True
        self.failed_call = what
        self.error = f"{type(exc).__name__}: {_short(exc)}"
        self.since = _now_iso()
        log.info("tracking store %s unreachable during %s; continuing offline", self.tracking_uri, what)
        for callback in self._on_offline:
            with contextlib.suppress(Exception):
                callback()

    # MLflow's UI opens an experiment by its kind: "custom_model_development" ("Machine learning")
    # shows the training runs table first, not the GenAI overview; the primary metric (the
    # registry's gating metric) is what the runs table and charts lead with.
    primary_metric: tuple[str, bool] | None = None

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


# --------------------------------------------------------------------------- pipeline (parent) run


@dataclasses.dataclass
class PipelineRun:
    """The parent run of one pipeline invocation; ``owned`` when this code manages its status."""

    session: TrackingSession
    run_id: str | None
    experiment_id: str | None
    key: str
    owned: bool

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Attach a file (e.g. the ablation summary table) to the parent run; False when offline."""
        if self.run_id is None:
            return False
        try:
            self.session.call(f"log_artifact {path}", self.session.client.log_artifact, self.run_id, str(path),
                              artifact_path)  # fmt: skip
        except _Offline:
            return False
        return True

    def log_metrics(self, metrics: dict[str, float]) -> bool:
        """Headline metrics on the parent, so pipelines compare at the top level of the runs table."""
        if self.run_id is None:
            return False
        import time as _time

        from mlflow.entities import Metric

        now = int(_time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()]
        try:
            self.session.call("log parent metrics", self.session.client.log_batch, self.run_id, metrics=batch)
        except _Offline:
            return False
        return True

    def set_tags(self, tags: dict[str, Any]) -> bool:
        if self.run_id is None:
            return False
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), str(v)) for k, v in tags.items()]
        try:
            self.session.call("set parent tags", self.session.client.log_batch, self.run_id, tags=batch)
        except _Offline:
            return False
        return True


def _dvc_ancestor():
    """The ``dvc`` process (repro, exp run, queue worker) that started us, if any."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        for proc in psutil.Process().parents():
            try:
                cmd = proc.cmdline()
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            head = [Path(a).name for a in cmd[:3]]
            if head and (head[0] == "dvc" or (len(head) > 1 and head[1] == "dvc") or head[1:3] == ["-m", "dvc"]):
                return proc
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_key() -> str:
    """Identifies one pipeline invocation: the DVC process running the stages (or this process)."""
    proc = _dvc_ancestor()
    kind = "dvc" if proc is not None else "process"
    if proc is None:
        try:
            import psutil

            proc = psutil.Process()
        except ImportError:  # without psutil, this process alone is the invocation
            proc = None
    start = int(proc.create_time() * 1000) if proc is not None else 0
    ident = f"{socket.gethostname()}:{proc.pid if proc is not None else os.getpid()}:{start}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{kind}:{ident}" + (f":exp={exp}" if exp else "")


def _pipeline_run_name() -> str:
    exp = os.environ.get("DVC_EXP_NAME")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"exp-{exp}" if exp else f"pipeline-{stamp}"


def pipeline_run(
    dataset: str, config: TrackingConfig | None = None, *, session: TrackingSession | None = None
) -> PipelineRun:
    """Find or create the parent run of the current pipeline invocation (see the module docs).

    With ``$DETAILFUSION_PIPELINE_RUN_ID`` set, that run is the parent and is left to its owner.
    Offline (store unreachable), the returned run has ``run_id=None``.
    """
    session = session or TrackingSession(config or TrackingConfig())
    key = pipeline_key()
    external = os.environ.get(PIPELINE_RUN_ENV)
    if session.offline:
        return PipelineRun(session, external, None, key, owned=False)
    try:
        if external:
            run = session.call("get pipeline run", session.client.get_run, external)
            return PipelineRun(session, external, run.info.experiment_id, key, owned=False)
        experiment_id = session.ensure_experiment(dataset)
        return _find_or_create_parent(session, experiment_id, dataset, key)
    except _Offline:
        return PipelineRun(session, external, None, key, owned=False)


def _find_or_create_parent(session: TrackingSession, experiment_id: str, dataset: str, key: str) -> PipelineRun:
    # The stages of one invocation run one after the other (DVC runs a pipeline sequentially, and
    # only rank 0 of a distributed stage tracks), so find-then-create needs no lock.
    found = session.call(
        "find pipeline run",
        session.client.search_runs,
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE_KEY}` = '{key}'",
        max_results=1,
    )
    if found:
        return PipelineRun(session, found[0].info.run_id, experiment_id, key, owned=True)
    tags = {TAG_PIPELINE_KEY: key, TAG_RUN_KIND: "pipeline", **lineage_tags(session.repo_root, dataset=dataset)}
    tags.pop(TAG_DVC_STAGE, None)  # the parent spans stages
    run = session.call(
        "create pipeline run", session.client.create_run, experiment_id, run_name=_pipeline_run_name(), tags=tags
    )
    return PipelineRun(session, run.info.run_id, experiment_id, key, owned=True)


# --------------------------------------------------------------------------- stage (nested) run


class StageRun:
    """A nested run for one stage. Every method is safe to call offline (it records instead)."""

    def __init__(self, session: TrackingSession, stage: str, dataset: str, variant: str | None):
        self.session = session
        self.cfg = session.cfg
        self.stage = stage
        self.dataset = dataset
        self.variant = variant
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.parent: PipelineRun | None = None
        self.lineage: dict[str, str] = {}
        self._pending: list[Any] = []  # mlflow Metric objects not yet sent
        self._monitor = None
        self.record = OfflineRecord(stage, session.tracking_uri, self.cfg.experiment_name(dataset))
        session._on_offline.append(self._stop_monitor)

    # ------------------------------------------------------------ state
    @property
    def offline(self) -> bool:
        return self.session.offline

    @property
    def parent_run_id(self) -> str | None:
        return self.parent.run_id if self.parent else None

    def _send(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Send one call; False (and the caller records what it was) when offline or no run exists."""
        if self.run_id is None:
            return False
        try:
            self.session.call(what, fn, *args, **kwargs)
        except _Offline:
            return False
        return True

    # ------------------------------------------------------------ open / close
    def open(self, params: dict[str, Any] | None) -> StageRun:
        self.lineage = lineage_tags(self.session.repo_root, dataset=self.dataset, variant=self.variant)
        self.parent = pipeline_run(self.dataset, session=self.session)
        tags = {**self.lineage, TAG_RUN_KIND: "stage", TAG_STAGE: self.stage}
        if self.parent.run_id and not self.offline:
            tags[MLFLOW_PARENT] = self.parent.run_id
            try:
                self.experiment_id = self.parent.experiment_id or self.session.ensure_experiment(self.dataset)
                if self.parent.owned:
                    self.session.call("mark pipeline run running", self.session.client.update_run,
                                      self.parent.run_id, status="RUNNING")  # fmt: skip
                run = self.session.call(
                    f"create run {self.stage}",
                    self.session.client.create_run,
                    self.experiment_id,
                    run_name=self.stage,
                    tags=tags,
                )
                self.run_id = run.info.run_id
                self.record.run_id = self.run_id
                self.record.parent_run_id = self.parent.run_id
            except _Offline:
                pass
        if self.run_id is None:
            self.record.tags.update(tags)
        if params:
            self.log_params(params)
        if self.cfg.system_metrics and self.run_id is not None:
            self._start_monitor()
        return self

    def _start_monitor(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval_s,
                tracking_uri=self.session.tracking_uri,
            )
            self._monitor.start()
        except Exception as exc:  # psutil missing or the monitor refusing: tracking goes on without it
            log.info("system metrics not logged: %s", exc)
            self._monitor = None

    def _stop_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        if self.offline:
            # finish() joins the sampling thread, which may sit in MLflow's own HTTP retries
            # (minutes against a dead server). It is a daemon that stops at its next failed
            # call; setting its shutdown event is enough.
            event = getattr(monitor, "_shutdown_event", None)
            if event is not None:
                event.set()
            return
        monitor.finish()

    def close(self, status: str = "FINISHED") -> None:
        """Flush metrics, end the run (and the owned parent) with ``status``, report what was lost."""
        self.flush()
        if not self.offline:
            self._stop_monitor()
        if self.run_id is not None and not self.offline:
            self._send("end run", self.session.client.set_terminated, self.run_id, status=status)
            if self.parent and self.parent.owned and self.parent.run_id and not self.offline:
                # The last stage to finish leaves the parent FINISHED; a later stage reopens it.
                self._send("end pipeline run", self.session.client.set_terminated, self.parent.run_id, status=status)
        self._stop_monitor()
        record_path = Path(self.cfg.offline_record)
        if self.offline and self.cfg.enabled:
            self.record.status = status
            self.record.error, self.record.failed_call, self.record.since = (
                self.session.error, self.session.failed_call, self.session.since,
            )  # fmt: skip
            self.record.write(record_path)
            warnings.warn(
                f"MLflow tracking at {self.session.tracking_uri} was unreachable during stage '{self.stage}' "
                f"({self.session.failed_call}: {self.session.error}). The stage itself completed and its outputs "
                f"are on disk, but these were NOT logged to MLflow: {self.record.summary()}. "
                f"They are kept in {record_path.resolve()}.",
                TrackingOfflineWarning,
                stacklevel=3,
            )
        elif self.cfg.enabled:
            clear_offline_record(record_path, self.stage)

    # ------------------------------------------------------------ params and tags
    def log_params(self, params: dict[str, Any]) -> None:
        """Log (nested) params flattened to dotted keys, as DVC shows them."""
        from mlflow.entities import Param

        flat = {mlflow_key(k): _param_value(v) for k, v in flatten(params).items()}
        items = list(flat.items())
        for start in range(0, len(items), 100):  # MLflow accepts 100 params per batch
            chunk = items[start : start + 100]
            sent = self._send("log params", self.session.client.log_batch, self.run_id,
                              params=[Param(k, v) for k, v in chunk])  # fmt: skip
            if not sent:
                self.record.params.update(chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        clean = {str(k): str(v) for k, v in tags.items()}
        sent = self._send("set tags", self.session.client.log_batch, self.run_id,
                          tags=[RunTag(k, v) for k, v in clean.items()])  # fmt: skip
        if not sent:
            self.record.tags.update(clean)

    # ------------------------------------------------------------ metrics
    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metric values (keys go through :func:`mlflow_key`); sent in batches."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            self._pending.append(Metric(mlflow_key(key), float(value), stamp, int(step or 0)))
        if len(self._pending) >= self.cfg.metrics_batch:
            self.flush()

    def flush(self) -> None:
        """Send queued metric values now."""
        while self._pending:
            chunk, self._pending = self._pending[: self.cfg.metrics_batch], self._pending[self.cfg.metrics_batch :]
            if not self._send("log metrics", self.session.client.log_batch, self.run_id, metrics=chunk):
                self.record.metrics.extend(
                    {"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp} for m in chunk
                )

    def log_metrics_file(self, path: str | Path, *, prefix: str = "", step: int | None = None) -> dict[str, float]:
        """Log a stage's metrics JSON (numbers, nested keys joined with ``/``) and the file itself.

        Returns the metrics as logged (MLflow keys). A missing or malformed file raises
        :class:`~detailfusion.errors.DataFormatError`: the stage wrote it, so that is a bug.
        """
        path = Path(path)
        metrics = {mlflow_key(prefix + k): v for k, v in read_metrics_json(path).items()}
        self.log_metrics(metrics, step=step)
        self.flush()
        self.log_artifact(path, artifact_path="metrics")
        return metrics

    # ------------------------------------------------------------ artifacts and data
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a whole folder when ``path`` is a directory)."""
        path = Path(path)
        fn = self.session.client.log_artifacts if path.is_dir() else self.session.client.log_artifact
        if not self._send(f"log artifact {path}", fn, self.run_id, str(path), artifact_path):
            self.record.artifacts.append({"path": str(path.resolve()), "artifact_path": artifact_path})

    log_artifacts = log_artifact

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as JSON (or YAML by extension) into the run's artifacts."""
        if not self._send(f"log dict {artifact_file}", self.session.client.log_dict, self.run_id, obj, artifact_file):
            self.record.artifacts.append({"path": None, "artifact_path": artifact_file, "content": obj})

    def log_dataset(
        self,
        df: pd.DataFrame,
        *,
        name: str,
        source: str | Path,
        context: str = "training",
        digest: str | None = None,
        on_parent: bool = False,
    ) -> str:
        """``mlflow.log_input`` of a manifest table: name (the data source), content digest, source.

        Returns the digest (computed over every row unless given).
        """
        import mlflow
        from mlflow.entities import DatasetInput, InputTag

        digest = digest or frame_digest(df)
        source = str(Path(source).resolve()) if not re.match(r"^[a-z0-9+]+://", str(source)) else str(source)
        entry = {"name": name, "digest": digest, "source": source, "context": context, "rows": len(df)}
        run_id = self.parent_run_id if on_parent else self.run_id
        if run_id is None or self.offline:
            if not on_parent:
                self.record.datasets.append(entry)
            return digest
        with warnings.catch_warnings():
            # MLflow hints about integer columns and ambiguous local sources; neither applies here.
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
            entity = dataset._to_mlflow_entity()
        inputs = [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
        if not self._send(f"log input {name}", self.session.client.log_inputs, run_id, datasets=inputs) and not on_parent:
            self.record.datasets.append(entry)
        return digest

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        """Also put ``metrics`` on the pipeline (parent) run (best effort: the stage run has them)."""
        if self.parent is not None and not self.offline:
            self.parent.log_metrics(metrics)

    def log_manifest(self, path: str | Path, *, name: str, context: str = "training",
                     also_on_parent: bool = False) -> str:
        """:meth:`log_dataset` for a parquet manifest on disk."""
        import pandas as pd

        from detailfusion.errors import DataFormatError

        path = Path(path)
        try:
            df = pd.read_parquet(path)
        except FileNotFoundError:
            raise DataFormatError(path, "manifest not found") from None
        except Exception as exc:  # pyarrow raises several types for broken files
            raise DataFormatError(path, f"not a readable parquet manifest: {exc}") from None
        digest = self.log_dataset(df, name=name, source=path, context=context)
        if also_on_parent:  # the same frame and digest: the manifest is read and hashed once
            self.log_dataset(df, name=name, source=path, context=context, digest=digest, on_parent=True)
        return digest

    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file to the pipeline (parent) run, e.g. the ablation summary table."""
        if not (self.parent and self.parent.log_artifact(path, artifact_path)):
            self.record.artifacts.append({"path": str(Path(path).resolve()), "artifact_path": artifact_path,
                                          "run": "parent"})  # fmt: skip


def read_metrics_json(path: str | Path) -> dict[str, float]:
    """The finite numbers of a metrics JSON file, nested keys joined with ``/``.

    A missing or malformed file raises :class:`~detailfusion.errors.DataFormatError` naming it.
    """
    from detailfusion.errors import DataFormatError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(path, "metrics file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, f"top level must be an object, got {type(data).__name__}")
    return {
        k.replace(".", "/"): float(v)
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


@contextlib.contextmanager
def stage_run(
    stage_name: str,
    params: dict[str, Any] | None,
    dataset: str,
    variant: str | None = None,
    *,
    config: TrackingConfig | None = None,
    repo_root: Path | None = None,
    primary_metric: tuple[str, bool] | None = None,
) -> Iterator[StageRun]:
    """Open a nested MLflow run for one stage under the pipeline's parent run (module docs).

    The run ends FINISHED, or FAILED when the block raises (KILLED on Ctrl-C). Under
    ``torchrun`` only rank 0 tracks; other ranks get a disabled run.
    """
    cfg = config or TrackingConfig()
    if os.environ.get("RANK", "0") != "0":
        cfg = TrackingConfig(**{**cfg.__dict__, "enabled": False})
    session = TrackingSession(cfg, repo_root)
    session.primary_metric = primary_metric
    run = StageRun(session, stage_name, dataset, variant)
    status = "FINISHED"
    try:
        if cfg.enabled:
            run.open(params)
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if cfg.enabled:
            run.close(status)
