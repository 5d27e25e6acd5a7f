"""MLflow tracking for the pipeline: run context with lineage, resilient logging, the logged model.

* ``transport.py``: MLflow's HTTP retry policy (retries, backoff, timeout) set once per process.
* ``session.py``: :class:`TrackingSession`, one client to one store that turns offline
  (:class:`TrackingOffline`) when the store stays unavailable after the retries.
* ``offline.py``: the offline record of what could not be logged; ``replay.py`` sends it later.
* ``parent.py``: :func:`pipeline_run`, the parent run shared by the stages of one invocation.
* ``runs.py``: :func:`stage_run`, one nested run per DVC stage.
* ``stages.py``: :func:`tracked` and what each pipeline stage logs (used by the CLI).
* ``metrics.py``: :func:`read_metrics_json`, a stage's metrics file as flat numbers.
* :func:`lineage_tags` (``lineage.py``): git, ``data.dvc``, DVC experiment, Prefect flow run.
* :func:`~detailfusion.tracking.pyfunc.log_fused_model` (``pyfunc.py``, imported on demand since
  it needs torch): the fused model as a pickle-free pyfunc.
"""

from detailfusion.tracking.config import TrackingConfig, find_repo_root, resolve_tracking_uri
from detailfusion.tracking.lineage import frame_digest, lineage_tags
from detailfusion.tracking.metrics import read_metrics_json
from detailfusion.tracking.offline import OfflineRecord, TrackingOfflineWarning
from detailfusion.tracking.parent import PipelineRun, pipeline_key, pipeline_run
from detailfusion.tracking.runs import StageRun, stage_run
from detailfusion.tracking.session import PIPELINE_RUN_ENV, TrackingOffline, TrackingSession, mlflow_key
from detailfusion.tracking.transport import configure_http, is_server_error

__all__ = [
    "PIPELINE_RUN_ENV",
    "OfflineRecord",
    "PipelineRun",
    "StageRun",
    "TrackingConfig",
    "TrackingOffline",
    "TrackingOfflineWarning",
    "TrackingSession",
    "configure_http",
    "find_repo_root",
    "frame_digest",
    "is_server_error",
    "lineage_tags",
    "mlflow_key",
    "pipeline_key",
    "pipeline_run",
    "read_metrics_json",
    "resolve_tracking_uri",
    "stage_run",
]
