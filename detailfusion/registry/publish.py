"""The ``register`` stage in one call: log the trained model, register it, run the promotion gate.

:func:`publish_model` opens the stage's MLflow run (nested under the pipeline run), logs the
evaluation metrics files, logs the fused model as a pickle-free pyfunc, registers it as a new
``@challenger`` version with its metrics and lineage, and (optionally) runs :func:`promote`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detailfusion.config import repo_default
from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.operations import promote
from detailfusion.registry.registration import register
from detailfusion.registry.versions import registry_client
from detailfusion.tracking.config import TrackingConfig
from detailfusion.tracking.runs import stage_run


def publish_model(
    model_dir: str | Path,
    dataset: str,
    metrics_files: list[str | Path],
    *,
    tracking: TrackingConfig | None = None,
    registry: RegistryConfig | None = None,
    params: dict[str, Any] | None = None,
    image_size: int | None = None,
    target_ratio: float,
    run_promotion: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Log + register + (gate-)promote the model saved in ``model_dir``; returns a JSON-able summary.

    ``image_size``/``target_ratio`` are the ``prepare`` settings the pyfunc must reproduce.
    Unlike training stages, this stage fails when the tracking store is unreachable: its whole
    purpose is to write there.
    """
    from detailfusion.errors import DetailFusionError
    from detailfusion.models.io import load_pretrained
    from detailfusion.registry.registration import metrics_from_files
    from detailfusion.tracking.pyfunc import log_fused_model

    tracking = tracking or repo_default(TrackingConfig, "tracking")
    registry = registry or repo_default(RegistryConfig, "registry")
    model = load_pretrained(model_dir)
    metrics = metrics_from_files(list(metrics_files))
    with stage_run("register", params or {}, dataset, model.variant.name, config=tracking) as run:
        if run.run_id is None or run.offline:
            raise DetailFusionError(
                f"register: MLflow tracking at {run.session.tracking_uri} is unreachable "
                f"({run.session.error or 'tracking disabled'}); the model was not registered"
            )
        for path in metrics_files:
            run.log_metrics_file(path)
        info = log_fused_model(model, "model", run=run, image_size=image_size, target_ratio=target_ratio)
        client = registry_client(tracking)
        version = register(info.model_uri, dataset, metrics, run.lineage, config=registry, client=client)
        summary: dict[str, Any] = {
            "model_name": version.name,
            "version": version.version,
            "model_uri": info.model_uri,
            "run_id": run.run_id,
            "parent_run_id": run.parent_run_id,
        }
        if run_promotion:
            decision = promote(version.name, version=version.version, force=force, config=registry, client=client)
            summary["promotion"] = decision.to_dict()
            run.set_tags({"promotion.decision": decision.decision, "registry.version": version.version})
        return summary
