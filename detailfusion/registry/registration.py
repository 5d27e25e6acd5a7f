"""Register a logged model as a new ``@challenger`` version of ``detailfusion-<dataset>``.

The version carries its metrics (``metric.<key>`` tags, the promotion gate reads them) and the
lineage of the run that produced the model (``lineage.<key>`` tags: git commit, DVC experiment,
Prefect flow run...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detailfusion.config import repo_default
from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.lock import RegistryError
from detailfusion.registry.versions import ALIAS_CHALLENGER, METRIC_TAG, MISSING_CODES, Registry, now_iso
from detailfusion.tracking.lineage import (
    TAG_ABLATION,
    TAG_DATA_DVC,
    TAG_DATASET,
    TAG_DVC_BASELINE,
    TAG_DVC_EXP,
    TAG_GIT_BRANCH,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_PREFECT_FLOW_RUN,
)
from detailfusion.tracking.session import mlflow_key

LINEAGE_TAG = "lineage."
LINEAGE_KEYS = (
    TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_GIT_BRANCH, TAG_DATA_DVC, TAG_DVC_EXP, TAG_DVC_BASELINE,
    TAG_PREFECT_FLOW_RUN, TAG_ABLATION, TAG_DATASET,
)  # fmt: skip


def metrics_from_files(paths: list[str | Path]) -> dict[str, float]:
    """Numbers from metrics JSON files (nested keys joined with ``/``), later files winning."""
    from detailfusion.tracking.metrics import read_metrics_json

    out: dict[str, float] = {}
    for path in paths:
        out.update(read_metrics_json(path))
    return out


def resolve_model_source(client: Any, model: str) -> tuple[str, str | None, str | None]:
    """``(source, run_id, model_id)`` for a ``models:/m-...`` URI, a ``runs:/`` URI or a bare run id.

    A run id resolves to the newest LoggedModel that run produced (MLflow 3 keeps models
    outside the run's artifacts).
    """
    from mlflow.exceptions import MlflowException

    if model.startswith("models:/m-") or model.startswith("m-"):
        model_id = model.removeprefix("models:/").split("/")[0]
        logged = client.get_logged_model(model_id)
        return f"models:/{model_id}", logged.source_run_id, model_id
    if model.startswith("models:/"):
        raise RegistryError(f"{model}: give the logged model (models:/m-...), a runs:/ URI or a run id")
    run_id, name = model, None
    if model.startswith("runs:/"):
        run_id, _, name = model.removeprefix("runs:/").partition("/")
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in MISSING_CODES:
            raise RegistryError(f"{model}: no such run") from None
        raise
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    found = [m for m in found if name in (None, "", m.name)]
    if not found:
        raise RegistryError(f"{model}: run {run_id} logged no model" + (f" named '{name}'" if name else ""))
    newest = max(found, key=lambda m: m.creation_timestamp)
    return f"models:/{newest.model_id}", run_id, newest.model_id


def lineage_from_run(client: Any, run_id: str | None) -> dict[str, str]:
    """The lineage tags of the run that produced a model (``{}`` without a run)."""
    if not run_id:
        return {}
    tags = client.get_run(run_id).data.tags
    return {key: tags[key] for key in LINEAGE_KEYS if key in tags}


def register(
    model: str,
    dataset: str,
    metrics: dict[str, float],
    lineage: dict[str, str] | None = None,
    *,
    config: RegistryConfig | None = None,
    client: Any | None = None,
) -> Any:
    """Register a logged model as a new version of ``detailfusion-<dataset>`` and make it ``@challenger``.

    ``model``: ``models:/m-...``, ``runs:/<run>/<name>`` or a run id. ``metrics`` become
    ``metric.<key>`` version tags (keys through ``mlflow_key``); ``lineage`` (default: the
    producing run's lineage tags) becomes ``lineage.<key>`` tags. Returns the ModelVersion.
    """
    from mlflow.exceptions import MlflowException

    cfg = config or repo_default(RegistryConfig, "registry")
    reg = Registry(client, cfg)
    name = cfg.name_for(dataset)
    source, run_id, model_id = reg.call(resolve_model_source, reg.client, model)
    if lineage is None:
        lineage = reg.call(lineage_from_run, reg.client, run_id)
    if mlflow_key(cfg.metric) not in {mlflow_key(k) for k in metrics}:
        raise RegistryError(
            f"metrics for {name} lack the gate metric '{cfg.metric}' (registry.metric); got {sorted(metrics)}"
        )
    try:
        reg.call(reg.client.create_registered_model, name, tags={"dataset": dataset},
                 description=f"DetailFusion composed image retrieval on {dataset}; see @champion.")  # fmt: skip
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {METRIC_TAG + mlflow_key(k): repr(float(v)) for k, v in metrics.items()}
    tags.update({LINEAGE_TAG + k: str(v) for k, v in lineage.items()})
    tags["registered_at"] = now_iso()
    mv = reg.call(reg.client.create_model_version, name, source, run_id=run_id, tags=tags, model_id=model_id)
    reg.call(reg.client.set_registered_model_alias, name, ALIAS_CHALLENGER, mv.version)
    return reg.version(name, mv.version)
