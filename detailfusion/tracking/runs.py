"""MLflow runs for the pipeline: one nested run per stage under the pipeline's parent run.

Use::

    with stage_run("stage2_branches", params=params, dataset="cirr", variant="full", config=cfg) as run:
        for step, loss in enumerate(train()):
            run.log_metrics({"train/loss": loss}, step=step)
        run.log_metrics_file("metrics/stage2.json")
        run.log_artifacts("plots/stage2", artifact_path="plots")

The parent run is found through the DVC process (:mod:`detailfusion.tracking.parent`). MLflow
retries each call (:mod:`detailfusion.tracking.transport`); when the store stays unavailable
the session turns offline (:mod:`detailfusion.tracking.session`) and the run degrades to an
offline logger: the stage goes on, what could not be logged is kept in
``tracking.offline_record`` (:mod:`detailfusion.tracking.offline`) and one warning at the end
says what is missing; ``detailfusion tracking replay`` sends it once the store is back.
Tracking never raises into training code except for programming errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detailfusion.config import flatten, repo_default
from detailfusion.pipeline import is_main_process
from detailfusion.tracking.config import TrackingConfig
from detailfusion.tracking.lineage import frame_digest, lineage_tags
from detailfusion.tracking.metrics import read_metrics_json
from detailfusion.tracking.offline import OfflineRecord, TrackingOfflineWarning, clear_offline_record
from detailfusion.tracking.parent import PipelineRun, pipeline_run
from detailfusion.tracking.session import (
    MLFLOW_PARENT,
    TAG_RUN_KIND,
    TAG_STAGE,
    TrackingOffline,
    TrackingSession,
    mlflow_key,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

_PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length
SCHEMA_ROWS = 1000  # manifest rows MLflow infers a logged data set's column types from


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
        session.on_offline(self._stop_monitor)

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
        except TrackingOffline:
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
            except TrackingOffline:
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
        from mlflow.entities import Dataset as DatasetEntity
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
            # MLflow infers the schema by visiting every element of list columns (~6 s for the
            # 60k-row IPr2Pr manifest on one core); the column types come from a sample of rows
            # (see schema_sample), while the digest and the profile (rows, elements) cover the
            # whole table.
            dataset = mlflow.data.from_pandas(schema_sample(df), source=source, name=name, digest=digest)
            sampled = dataset._to_mlflow_entity()  # name, source and schema, from the sample
        entity = DatasetEntity(name=sampled.name, digest=digest, source_type=sampled.source_type,
                               source=sampled.source, schema=sampled.schema,
                               profile=json.dumps({"num_rows": len(df), "num_elements": int(df.size)}))
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


def schema_sample(df: pd.DataFrame, rows: int = SCHEMA_ROWS) -> pd.DataFrame:
    """The rows a logged data set's schema is inferred from: ``rows`` evenly spaced ones plus, per
    column, its first missing value (MLflow marks a column required when no sampled value is
    missing, so every optional column must show one)."""
    import numpy as np

    if len(df) <= rows:
        return df
    picked = set(np.linspace(0, len(df) - 1, rows).astype(int).tolist())
    for col in df.columns:
        missing = df[col].isna().to_numpy()
        if missing.any():
            picked.add(int(missing.argmax()))
    return df.iloc[sorted(picked)]


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
    cfg = config or repo_default(TrackingConfig, "tracking")
    if not is_main_process():
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
