"""The ``pipeline`` flow: the whole DVC pipeline across the ``cpu`` and ``gpu`` work pools.

On the worker running it (the ``cpu`` pool): check out the project at ``revision``, apply the
``params.yaml`` overrides, run synthesize -> prepare -> validate (``dvc repro --single-item``)
and push their outputs to the DVC remote. Then the ``train`` deployment runs the three training
stages as one DVC experiment on the ``gpu`` pool (``run_deployment``); back here the experiment
is pulled and applied (``dvc exp pull`` / ``dvc exp apply``), and evaluate and register run.
All MLflow stage runs, on either worker, nest under one parent run created here and carry this
flow run's id. A register that moves ``@champion`` emits ``detailfusion.champion.promoted``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.tasks import (
    FLOW_RUN_ENV,
    PIPELINE_RUN_ENV,
    StageFailed,
    apply_overrides,
    checkout,
    configure_dvc_remote,
    dvc_pull,
    dvc_push,
    emit_promoted,
    end_parent_run,
    exp_apply,
    exp_pull,
    repo_url_or_default,
    repro_stage,
    run_data_stages,
    run_workdir,
    start_parent_run,
    tool_env,
)

TRAIN_DEPLOYMENT = "train/gpu"


def exp_name_for(prefix: str) -> str:
    """A DVC experiment name unique to this flow run."""
    run_name = str(flow_run.name or "local").replace(" ", "-")
    return f"{prefix}-{str(flow_run.id or 'local')[:8]}-{run_name}"[:90]


def run_training(deployment: str, parameters: dict[str, Any], what: str) -> dict[str, Any]:
    """Run the ``train`` deployment as a subflow and wait; fail with its state message if it fails."""
    run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True)
    state = run.state
    if state is None or not state.is_completed():
        message = state.message if state is not None else "no state"
        raise StageFailed(f"{what}: training flow run {run.name} ({run.id}) ended {state.name if state else '?'}: "
                          f"{message}")  # fmt: skip
    return {"flow_run_id": str(run.id), "flow_run_name": run.name}


@flow(name="pipeline", log_prints=True)
def pipeline(
    dataset: str = "cirr",
    overrides: dict[str, Any] | None = None,
    revision: str = "main",
    repo_url: str | None = None,
    train_deployment: str = TRAIN_DEPLOYMENT,
    fail_first_attempts: int = 0,
    keep_workdir: bool = False,
) -> dict[str, Any]:
    """Data stages -> training (gpu deployment, one DVC experiment) -> evaluate -> register.

    ``dataset`` is the target data set (``stage2_branches.dataset``); ``overrides`` maps dotted
    params.yaml keys to values (``{"stage2_branches.loop.max_steps": 50}``); ``revision`` is a
    branch, tag or commit of ``repo_url`` (default ``$DETAILFUSION_REPO_URL``).
    ``fail_first_attempts`` makes the first training attempts fail on purpose (retry drill).
    """
    logger = get_run_logger()
    url = repo_url_or_default(repo_url)
    workdir = str(run_workdir("pipeline"))
    flow_run_id = str(flow_run.id)
    exp_name = exp_name_for("pipeline")
    checkout(url, revision, workdir)
    configure_dvc_remote(workdir)
    params = apply_overrides(workdir, {**(overrides or {}), "stage2_branches.dataset": dataset})
    parent = start_parent_run(workdir, params, dataset, "pipeline", f"pipeline-{exp_name}",
                              {"dvc.exp_name": exp_name})  # fmt: skip
    env = tool_env(workdir, DVC_EXP_NAME=exp_name, **{FLOW_RUN_ENV: flow_run_id, PIPELINE_RUN_ENV: parent})
    status = "FAILED"
    try:
        pushed = run_data_stages(workdir, params, env)
        dvc_push(workdir, pushed)
        training = run_training(train_deployment, {
            "exp_name": exp_name, "revision": revision, "repo_url": url,
            "params_yaml": Path(workdir, "params.yaml").read_text(encoding="utf-8"),
            "dvc_lock": Path(workdir, "dvc.lock").read_text(encoding="utf-8"),
            "pull_targets": pushed, "parent_run_id": parent, "caller_flow_run_id": flow_run_id,
            "fail_first_attempts": fail_first_attempts,
        }, f"experiment {exp_name}")  # fmt: skip
        exp_pull(workdir, [exp_name])
        exp_apply(workdir, exp_name)
        dvc_pull(workdir, ["stage3_fusion"])
        repro_stage(workdir, "evaluate", env)
        repro_stage(workdir, "register", env)
        summary = json.loads(Path(workdir, "reports", "registry", "summary.json").read_text(encoding="utf-8"))
        promotion = summary.get("promotion") or {}
        if promotion:
            emit_promoted(promotion, source=f"pipeline flow run {flow_run_id}")
        headline = json.loads(Path(workdir, "metrics", "headline.json").read_text(encoding="utf-8"))
        status = "FINISHED"
    finally:
        end_parent_run(parent, status)
    if not keep_workdir:
        shutil.rmtree(Path(workdir).parent, ignore_errors=True)
    result = {"exp_name": exp_name, "mlflow_parent_run_id": parent, "train_flow_run": training,
              "registry": {k: summary.get(k) for k in ("model_name", "version", "model_uri")},
              "promotion": promotion.get("decision"), "headline": headline}  # fmt: skip
    logger.info("pipeline done: %s", json.dumps(result, default=str))
    return result
