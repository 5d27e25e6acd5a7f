"""MLflow tracking for the pipeline: run context with lineage, resilient logging, the logged model.

* :func:`stage_run` / :func:`pipeline_run` (``runs.py``): one nested run per DVC stage under one
  parent run per pipeline invocation; retries, then an offline record instead of lost training.
* :func:`lineage_tags` (``lineage.py``): git, ``data.dvc``, DVC experiment, Prefect flow run.
* :func:`~detailfusion.tracking.pyfunc.log_fused_model` (``pyfunc.py``, imported on demand since
  it needs torch): the fused model as a pickle-free pyfunc.
"""

from detailfusion.tracking.config import TrackingConfig, find_repo_root, resolve_tracking_uri
from detailfusion.tracking.lineage import frame_digest, lineage_tags
from detailfusion.tracking.runs import (
    PIPELINE_RUN_ENV,
    OfflineRecord,
    PipelineRun,
    StageRun,
    TrackingOfflineWarning,
    TrackingSession,
    call_with_retries,
    mlflow_key,
    pipeline_key,
    pipeline_run,
    stage_run,
)

__all__ = [
    "PIPELINE_RUN_ENV",
    "OfflineRecord",
    "PipelineRun",
    "StageRun",
    "TrackingConfig",
    "TrackingOfflineWarning",
    "TrackingSession",
    "call_with_retries",
    "find_repo_root",
    "frame_digest",
    "lineage_tags",
    "mlflow_key",
    "pipeline_key",
    "pipeline_run",
    "resolve_tracking_uri",
    "stage_run",
]
