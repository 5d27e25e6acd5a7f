"""Send what offline stages could not log, once the tracking store is reachable again.

A stage that lost its tracking store keeps everything it could not send in the offline record
(``tracking.offline_record``). :func:`replay_offline_record` logs those params, tags, metric
values (with their original steps and timestamps), artifacts and data set inputs to the run the
stage had started (or a new run when it never got one), sets the run's final status, and
removes the replayed stages from the record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detailfusion.config import repo_default
from detailfusion.errors import DataFormatError, DetailFusionError
from detailfusion.fsutil import read_json_object
from detailfusion.tracking.config import TrackingConfig
from detailfusion.tracking.offline import update_offline_record
from detailfusion.tracking.session import MLFLOW_PARENT, TrackingOffline, TrackingSession

TAG_REPLAYED = "detailfusion.replayed"


def _read(path: Path) -> dict[str, Any]:
    record = read_json_object(path, missing="offline record not found (nothing to replay)")
    if "stages" not in record:
        raise DataFormatError(path, "not an offline tracking record: no 'stages'")
    stages = record["stages"]
    if not isinstance(stages, dict):
        raise DataFormatError(path, "'stages' must be an object")
    return stages


def _replay_stage(session: TrackingSession, stage: str, entry: dict[str, Any]) -> str:
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    client = session.client
    run_id = entry.get("run_id")
    tags = {**entry.get("tags", {}), TAG_REPLAYED: "true"}
    if run_id is None:
        experiment_id = session.experiment_id(entry["experiment"])
        if entry.get("parent_run_id"):
            tags[MLFLOW_PARENT] = entry["parent_run_id"]
        run_id = session.call(f"create run {stage}", client.create_run, experiment_id, run_name=stage).info.run_id
    session.call("set tags", client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    params = list(entry.get("params", {}).items())
    for start in range(0, len(params), 100):
        chunk = [Param(k, str(v)) for k, v in params[start : start + 100]]
        session.call("log params", client.log_batch, run_id, params=chunk)
    metrics = [Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"])) for m in entry.get("metrics", [])]
    for start in range(0, len(metrics), 1000):
        session.call("log metrics", client.log_batch, run_id, metrics=metrics[start : start + 1000])
    for art in entry.get("artifacts", []):
        target = entry.get("parent_run_id") if art.get("run") == "parent" else run_id
        if art.get("path") is None:
            session.call("log dict", client.log_dict, target, art["content"], art["artifact_path"])
            continue
        path = Path(art["path"])
        if not path.exists():
            raise DetailFusionError(f"{path}: artifact recorded by stage '{stage}' no longer exists; cannot replay it")
        log = client.log_artifacts if path.is_dir() else client.log_artifact
        session.call(f"log artifact {path}", log, target, str(path), art.get("artifact_path"))
    for ds in entry.get("datasets", []):
        dataset = Dataset(ds["name"], ds["digest"], "local", json.dumps({"uri": ds["source"]}))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", ds.get("context", "training"))])]
        session.call(f"log input {ds['name']}", client.log_inputs, run_id, datasets=inputs)
    if entry.get("status"):
        session.call("end run", client.set_terminated, run_id, status=entry["status"])
    return run_id


def replay_offline_record(path: str | Path | None = None, config: TrackingConfig | None = None) -> dict[str, str]:
    """Replay every stage in the offline record; returns ``{stage: run_id}`` of what was sent.

    Stages are removed from the record as they succeed; when the store is still unreachable a
    :class:`~detailfusion.errors.DetailFusionError` says so and the record keeps the rest.
    """
    cfg = config or repo_default(TrackingConfig, "tracking")
    path = Path(path or cfg.offline_record)
    stages = _read(path)
    session = TrackingSession(cfg)
    done: dict[str, str] = {}
    for stage, entry in stages.items():
        try:
            done[stage] = _replay_stage(session, stage, entry)
        except TrackingOffline:
            raise DetailFusionError(
                f"{path}: tracking at {session.tracking_uri} is still unreachable ({session.error}); "
                f"replayed {sorted(done) or 'nothing'}, the rest stays in the record"
            ) from None
        finally:
            if stage in done:
                update_offline_record(path, lambda s, st=stage: s.pop(st, None))
    return done
