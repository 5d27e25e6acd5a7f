"""The parent run of one pipeline invocation, found by every stage process of that invocation.

DVC runs each stage as its own process, so the stages of one ``dvc repro`` / ``dvc exp run``
find their common parent run on the server: the parent carries the tag
``detailfusion.pipeline_key``, built from the DVC process that runs the stages (pid and start
time, so one invocation = one key) and ``DVC_EXP_NAME``. The first stage creates it, later
stages find it by that tag. A caller that owns a parent itself (the Prefect ablation flow
fanning out ``dvc exp run`` s) exports its run id as ``DETAILFUSION_PIPELINE_RUN_ID``, and every
stage nests under it instead.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import socket
import time
from pathlib import Path
from typing import Any

from detailfusion.config import repo_default
from detailfusion.tracking.config import TrackingConfig
from detailfusion.tracking.lineage import TAG_DVC_STAGE, lineage_tags
from detailfusion.tracking.session import (
    PIPELINE_RUN_ENV,
    TAG_PIPELINE_KEY,
    TAG_RUN_KIND,
    TrackingOffline,
    TrackingSession,
    mlflow_key,
)


@dataclasses.dataclass
class PipelineRun:
    """The parent run of one pipeline invocation; ``owned`` when this code manages its status."""

    session: TrackingSession
    run_id: str | None
    experiment_id: str | None
    key: str
    owned: bool

    def _send(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """One call on the parent run; False when there is none or the store is unavailable."""
        if self.run_id is None:
            return False
        try:
            self.session.call(what, fn, self.run_id, *args, **kwargs)
        except TrackingOffline:
            return False
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        """Attach a file (e.g. the ablation summary table) to the parent run; False when offline."""
        return self._send(f"log_artifact {path}", self.session.client.log_artifact, str(path), artifact_path)

    def log_metrics(self, metrics: dict[str, float], what: str = "log parent metrics") -> bool:
        """Headline metrics on the parent, so pipelines compare at the top level of the runs table."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), now, 0) for k, v in metrics.items()]
        ok = True
        for start in range(0, max(len(batch), 1), 1000):  # MLflow's log_batch limit
            ok = self._send(what, self.session.client.log_batch, metrics=batch[start : start + 1000]) and ok
        return ok

    def set_tags(self, tags: dict[str, Any]) -> bool:
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), str(v)) for k, v in tags.items()]
        return self._send("set parent tags", self.session.client.log_batch, tags=batch)

    def log_dict(self, obj: Any, artifact_file: str) -> bool:
        return self._send(f"log dict {artifact_file}", self.session.client.log_dict, obj, artifact_file)

    def end(self, status: str = "FINISHED") -> bool:
        """Set the run's final status (only meaningful for a parent this code owns)."""
        return self._send("end parent run", self.session.client.set_terminated, status=status)

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
    session = session or TrackingSession(config or repo_default(TrackingConfig, "tracking"))
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
    except TrackingOffline:
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
