"""The ``ablations`` flow: the ablation suite fanned out as parallel ``train`` deployment runs.

The suite is the one of :mod:`detailfusion.experiments.ablations` (``plan`` / ``set_params`` /
``collect_from_dvc`` / ``summarize`` / ``markdown_table``), the same as ``detailfusion ablations``
runs locally. Here the data stages run once on this worker (``cpu``) and are pushed to the DVC
remote; then every (variant, seed) is one ``train`` run on the ``gpu`` pool, each a DVC
experiment up to ``evaluate`` pushed to the git remote. All runs are started at once and waited
for; a failed variant is reported (logs, the summary's failure list, the parent MLflow run) and
loses none of the others. The summary goes to one parent MLflow run that every stage run nests
under. No ``register`` stage runs, so ``@champion`` never moves.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from detailfusion.experiments import ablations as suite
from detailfusion.experiments.tracking import log_suite_summary, suite_parent, tracking_config
from flows.tasks import (
    FLOW_RUN_ENV,
    PIPELINE_RUN_ENV,
    StageFailed,
    apply_overrides,
    checkout,
    configure_dvc_remote,
    dvc_push,
    exp_pull,
    repo_url_or_default,
    run_data_stages,
    run_workdir,
    set_dotted,
    tool_env,
)

TRAIN_DEPLOYMENT = "train/gpu"


def variant_params(base: dict[str, Any], run: suite.AblationRun, budget_scale: float,
                   extra: dict[str, Any] | None) -> str:  # fmt: skip
    """params.yaml text of one run: the base params + the suite's ``-S`` settings + ``extra``."""
    params = yaml.safe_load(yaml.safe_dump(base))
    for item in suite.set_params(run, budget_scale, params):
        key, _, value = item.partition("=")
        set_dotted(params, key, yaml.safe_load(value))  # the -S syntax: YAML values
    for key, value in (extra or {}).items():
        set_dotted(params, key, value)
    return yaml.safe_dump(params, sort_keys=False)


@task(name="train-variant", task_run_name="train-{name}", cache_policy=NO_CACHE)
def train_variant(deployment: str, name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """One ``train`` deployment run, waited for; its outcome (never raises for a failed run)."""
    run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True)
    state = run.state
    ok = state is not None and state.is_completed()
    if not ok:
        get_run_logger().error("variant %s failed: flow run %s ended %s: %s", name, run.name,
                               state.name if state else "?", state.message if state else "no state")  # fmt: skip
    return {"name": name, "ok": ok, "flow_run_id": str(run.id), "state": state.name if state else None,
            "message": None if ok or state is None else state.message}  # fmt: skip


@flow(name="ablations", log_prints=True)
def ablations(
    dataset: str = "cirr",
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    budget_scale: float = 1.0,
    overrides: dict[str, Any] | None = None,
    variant_overrides: dict[str, dict[str, Any]] | None = None,
    revision: str = "main",
    repo_url: str | None = None,
    train_deployment: str = TRAIN_DEPLOYMENT,
    keep_workdir: bool = False,
    every_seed: bool = False,
) -> dict[str, Any]:
    """Run the suite: ``variants`` x ``seeds`` as in ``method.md`` (``plan``; ``every_seed``: every
    seed for every entry, not only the multi-seed ones), ``budget_scale`` on
    every stage's steps alike, ``overrides`` for all runs, ``variant_overrides`` ({variant: {dotted
    key: value}}) for single variants. Fails at the end, after the summary, if any run failed."""
    logger = get_run_logger()
    url = repo_url_or_default(repo_url)
    workdir = str(run_workdir("ablations"))
    prefix = f"abl-{str(flow_run.id or 'local')[:8]}"
    runs = suite.plan(variants, seeds, prefix=prefix, every_seed=every_seed)
    checkout(url, revision, workdir)
    configure_dvc_remote(workdir)
    params = apply_overrides(workdir, {**(overrides or {}), "stage2_branches.dataset": dataset})
    cfg = tracking_config(params)
    parent = suite_parent(cfg, dataset, run_name=f"ablation-suite-{prefix}", repo_root=Path(workdir)) if cfg else None
    parent_id = parent.run_id if parent else None
    logger.info("ablation suite %s: %d runs %s; MLflow parent run %s", prefix, len(runs),
                [r.name for r in runs], parent_id)  # fmt: skip
    env = tool_env(workdir, **{FLOW_RUN_ENV: str(flow_run.id), PIPELINE_RUN_ENV: parent_id})
    try:
        pushed = run_data_stages(workdir, params, env)
        dvc_push(workdir, pushed)
    except Exception:
        if parent is not None and parent.owned and parent_id:
            log_suite_summary(parent, {}, {"data stages": "synthesize/prepare/validate failed"}, experiments=[])
        raise
    dvc_lock = Path(workdir, "dvc.lock").read_text(encoding="utf-8")
    futures = [
        train_variant.submit(train_deployment, run.name, {
            "exp_name": run.name, "revision": revision, "repo_url": url,
            "params_yaml": variant_params(params, run, budget_scale, (variant_overrides or {}).get(run.variant)),
            "dvc_lock": dvc_lock, "pull_targets": pushed, "with_evaluate": True,
            "parent_run_id": parent_id, "caller_flow_run_id": str(flow_run.id),
        })
        for run in runs
    ]  # fmt: skip
    outcomes = [f.result() for f in futures]
    done = [o["name"] for o in outcomes if o["ok"]]
    failed = {o["name"]: f"flow run {o['flow_run_id']} {o['state']}: {o['message']}" for o in outcomes if not o["ok"]}
    results: dict[str, dict] = {}
    if done:
        exp_pull(workdir, done)
        results = suite.collect_from_dvc(workdir, done, dvc=str(Path(sys.executable).parent / "dvc"))
        for name in set(done) - set(results):
            failed[name] = "finished without evaluation metrics in dvc exp show"
    summary = suite.summarize(results)
    diffs = suite.differences(results)
    table = suite.markdown_table(summary, failed, diffs)
    out = Path(workdir, "reports", "ablations")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "differences": diffs, "failed": failed}, indent=2), encoding="utf-8")
    (out / "ablations.md").write_text(table, encoding="utf-8")
    if parent is not None and parent_id:
        log_suite_summary(parent, summary, failed, experiments=[r.name for r in runs],
                          files=[out / "summary.json", out / "ablations.md"])  # fmt: skip
    logger.info("ablation suite %s:\n%s", prefix, table)
    if not keep_workdir:
        shutil.rmtree(Path(workdir).parent, ignore_errors=True)
    if failed:
        raise StageFailed(f"ablation suite {prefix}: {len(failed)} of {len(runs)} runs failed "
                          f"({', '.join(sorted(failed))}); the others are in the summary and in dvc exp show")  # fmt: skip
    return {"prefix": prefix, "experiments": [r.name for r in runs], "summary": summary, "mlflow_parent_run_id": parent_id}
