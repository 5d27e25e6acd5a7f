"""The ablation suite's MLflow parent run: every stage run of every ablation experiment nests
under it, and it carries the summary (metrics per variant, the JSON and the markdown table).

The runner (or a Prefect flow) opens the parent with :func:`suite_parent`, exports its id as
``$DETAILFUSION_PIPELINE_RUN_ID`` to the ``dvc exp run`` processes (the stages' tracking code
nests under that run and tags each stage run ``ablation=<variant>`` and ``dvc.exp_name``), and
at the end calls :func:`log_suite_summary`.

A tracking server that is down when the suite starts stops it before anything runs, with one
line naming the server (:class:`~detailfusion.tracking.transport.TrackingServerDown`): the
experiments run in temporary copies of the repository, where the stages' offline records would
be lost with the copy. A server that goes away later never fails the suite: logging the summary
returns False and the runner says so.
"""

from __future__ import annotations

from pathlib import Path

from detailfusion.errors import ConfigError
from detailfusion.tracking import (
    PIPELINE_RUN_ENV,
    PipelineRun,
    TrackingConfig,
    TrackingOffline,
    TrackingSession,
    lineage_tags,
    mlflow_key,
)
from detailfusion.tracking.session import MLFLOW_RUN_NAME, TAG_RUN_KIND
from detailfusion.tracking.stages import tracking_config
from detailfusion.tracking.transport import server_down

RUN_KIND = "ablation_suite"
TAG_FAILED = "ablation.failed"
TAG_EXPERIMENTS = "ablation.experiments"

__all__ = ["RUN_KIND", "log_suite_summary", "suite_parent", "summary_metrics", "tracking_config"]


def suite_parent(cfg: TrackingConfig, dataset: str, *, run_id: str | None = None, run_name: str = "ablation-suite",
                 repo_root: Path | None = None) -> PipelineRun:
    """The suite's parent run: the existing run ``run_id`` (left to its owner) or a new one in the
    data set's experiment, tagged with the lineage and ``detailfusion.run_kind=ablation_suite``.

    Raises :class:`~detailfusion.tracking.transport.TrackingServerDown` when the store is
    unavailable, :class:`~detailfusion.errors.ConfigError` when ``run_id`` names no run. With
    tracking disabled, the parent has no run (``run_id`` as given, unverified)."""
    session = TrackingSession(cfg, repo_root)
    if not cfg.enabled:
        return PipelineRun(session, run_id, None, RUN_KIND, owned=False)
    try:
        if run_id:
            from mlflow.exceptions import MlflowException

            try:
                run = session.call("get ablation parent run", session.client.get_run, run_id)
            except MlflowException as exc:  # a rejected request: the id names no run in this store
                raise ConfigError(f"ablation parent run {run_id!r} (--parent-run-id or ${PIPELINE_RUN_ENV}): "
                                  f"not a run in MLflow at {session.tracking_uri}: {exc.message}") from None
            return PipelineRun(session, run_id, run.info.experiment_id, RUN_KIND, owned=False)
        experiment_id = session.ensure_experiment(dataset)
        tags = {TAG_RUN_KIND: RUN_KIND, MLFLOW_RUN_NAME: run_name,
                **lineage_tags(session.repo_root, dataset=dataset)}
        run = session.call("create ablation parent run", session.client.create_run, experiment_id,
                           run_name=run_name, tags=tags)  # fmt: skip
        return PipelineRun(session, run.info.run_id, experiment_id, RUN_KIND, owned=True)
    except TrackingOffline:
        raise server_down(session.tracking_uri, session.error or "no answer") from None


def summary_metrics(summary: dict) -> dict[str, float]:
    """``<variant>/<metric>`` -> mean (MLflow keys: ``full/R_at_1``; the held-out split's as
    ``full/heldout/R_at_1``), the numbers of the summary."""
    out = {}
    for variant, row in summary.items():
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "n_seeds":
                out[mlflow_key(f"{variant}/{key}")] = float(value)
            elif isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        out[mlflow_key(f"{variant}/{key}/{sub}")] = float(v)
        out[mlflow_key(f"{variant}/n_seeds")] = float(row.get("n_seeds", 0))
    return out


def log_suite_summary(parent: PipelineRun, summary: dict, failed: dict[str, str], *,
                      experiments: list[str], files: list[str | Path] = (), close: bool = True) -> bool:
    """Log the summary to the parent run: per-variant metrics, the experiment names and failures
    as tags, ``files`` (the JSON and the table) under ``ablations/``; a parent this code owns ends
    FINISHED, or FAILED when a run failed. Returns False when (part of) it could not be logged."""
    if parent.run_id is None:
        return False
    ok = parent.set_tags({TAG_EXPERIMENTS: ",".join(experiments), TAG_FAILED: ",".join(sorted(failed)) or "none"})
    ok = parent.log_metrics(summary_metrics(summary), what="log ablation summary") and ok
    if failed:
        ok = parent.log_dict(failed, "ablations/failed.json") and ok
    for path in files:
        ok = parent.log_artifact(path, artifact_path="ablations") and ok
    if close and parent.owned:
        ok = parent.end("FAILED" if failed else "FINISHED") and ok
    return ok
