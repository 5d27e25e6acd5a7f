"""Logging a retrieval run to MLflow with the project's tracking helpers (``stage_run``).

Run ``batch_retrieval`` in the ``detailfusion-<dataset>`` experiment: the job's options as params,
counts / timings / throughput / recall as metrics, the model used as tags (registered name,
version, run id, weights digest) and, where the store knows it, as a model input of the run;
``summary.json`` and the HTML page as artifacts. The results are already computed when this
runs; a tracking store that is down or refuses a call never fails the job (the offline record of
``stage_run`` keeps what was not logged, and the summary says so).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict
from pathlib import Path

from detailfusion.config import flatten


def summary_metrics(summary: dict) -> dict[str, float]:
    out = {}
    for section in ("timings", "throughput", "gallery", "queries", "results", "index"):
        for key, value in flatten({section: summary.get(section) or {}}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value is not None:
                out[key.replace(".", "/")] = float(value)
    return out


def log_run(summary: dict, staging, cfg, tracking, params: dict | None, resolved) -> dict:
    """Log the run; returns what the summary records about it (never raises)."""
    from detailfusion.tracking.runs import stage_run

    if tracking is None or not tracking.enabled:
        return {"logged": False, "reason": "tracking disabled"}
    model = resolved.info()
    try:
        with stage_run("batch_retrieval", {"retrieve": asdict(cfg)}, cfg.dataset, model["variant"],
                       config=tracking) as run:
            run.set_tags({k: v for k, v in {
                "retrieval.model_uri": model["uri"], "retrieval.model_name": model["name"],
                "retrieval.model_version": model["version"], "retrieval.model_run_id": model["run_id"],
                "retrieval.model_identity": model["identity"], "retrieval.index": cfg.index,
            }.items() if v is not None})
            run.log_metrics({f"retrieve/{k}": v for k, v in summary_metrics(summary).items()})
            run.flush()
            if model.get("model_id") and run.run_id and not run.offline:
                with contextlib.suppress(Exception):  # older stores do not know model inputs
                    from mlflow.entities import LoggedModelInput

                    run.session.client.log_inputs(run.run_id, models=[LoggedModelInput(model["model_id"])])
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "summary.json"
                from detailfusion.fsutil import write_json_atomic

                write_json_atomic(path, {**summary, "tracking": {"run_id": run.run_id}})
                run.log_artifact(path, artifact_path="retrieval")
            report = staging.dir / "report" / "index.html"
            if report.is_file():
                run.log_artifact(report, artifact_path="retrieval/report")
            return {"logged": run.run_id is not None and not run.offline, "run_id": run.run_id,
                    "tracking_uri": run.session.tracking_uri,
                    "error": run.session.error}
    except Exception as exc:  # tracking must never lose the computed results
        return {"logged": False, "error": f"{type(exc).__name__}: {exc}"}
