"""The ``batch_retrieval`` flow: ``detailfusion retrieve`` with the ``@champion`` model (or a given
version) on a ``gpu`` worker.

Deployed nightly and triggered by ``detailfusion.champion.promoted`` (prefect.yaml), so the
retrieval results always follow the champion. Without an explicit gallery it retrieves over the
data the model was trained and evaluated on: the version's lineage names its DVC experiment,
which is pulled from the git remote and applied, and the data set's native files are pulled
from the DVC remote. Results go to ``out`` (default ``s3://$DETAILFUSION_S3_BUCKET/retrieval/
<model>/v<version>``); the job's MLflow run carries this flow run's id.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from detailfusion.errors import ConfigError
from flows.tasks import (
    FLOW_RUN_ENV,
    NETWORK_RETRY,
    checkout,
    configure_dvc_remote,
    dvc_pull,
    exp_apply,
    exp_pull,
    last_json,
    repo_url_or_default,
    run_command,
    run_workdir,
    tool_env,
    tracking_uri,
)

LINEAGE_EXP_TAG = "lineage.dvc.exp_name"  # written by detailfusion.registry.registration.register


@task(name="resolve-model-version", cache_policy=NO_CACHE, **NETWORK_RETRY)
def resolve_version(model_name: str, version: str | None, alias: str) -> dict[str, Any]:
    """The registered version to use (``version``, else the one holding ``alias``) and its tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri())
    mv = client.get_model_version(model_name, str(version)) if version else \
        client.get_model_version_by_alias(model_name, alias)  # fmt: skip
    return {"name": mv.name, "version": str(mv.version), "tags": dict(mv.tags or {})}


def default_inputs(params: dict[str, Any], dataset: str, split: str) -> tuple[str, str, list[str]]:
    """(gallery, queries, stages to pull) for the data set's native files under ``data.root``."""
    if dataset != "cirr":
        raise ConfigError(f"batch_retrieval: no default gallery for data set {dataset!r}; pass gallery and queries")
    root = str((params.get("data") or {}).get("root", "data/synthetic")).rstrip("/")
    pull = ["synthesize"] if root == "data/synthetic" else []
    return f"{root}/cirr", f"{root}/cirr/captions/cap.rc2.{split}.json", pull


@flow(name="batch_retrieval", log_prints=True)
def batch_retrieval(
    dataset: str = "cirr",
    model_name: str | None = None,
    version: str | None = None,
    alias: str = "champion",
    gallery: str | None = None,
    queries: str | None = None,
    split: str = "val",
    out: str | None = None,
    top_k: int = 50,
    index: str = "exact",
    extra_args: list[str] | None = None,
    revision: str = "main",
    repo_url: str | None = None,
) -> dict[str, Any]:
    """Retrieve with ``model_name`` (default ``detailfusion-<dataset>``) at ``version`` or ``@alias``.

    ``gallery``/``queries`` accept what ``detailfusion retrieve`` accepts (local or ``s3://``);
    ``extra_args`` are passed through (``["--index", "ivf_pq", "--nprobe", "16"]``).
    """
    logger = get_run_logger()
    url = repo_url_or_default(repo_url)
    workdir = str(run_workdir("batch-retrieval"))
    checkout(url, revision, workdir)
    configure_dvc_remote(workdir)
    params = yaml.safe_load(Path(workdir, "params.yaml").read_text(encoding="utf-8")) or {}
    name = model_name or str((params.get("registry") or {}).get("model_name", "detailfusion-{dataset}")).format(
        dataset=dataset)
    mv = resolve_version(name, version, alias)
    logger.info("model %s v%s (%s)", mv["name"], mv["version"], f"@{alias}" if not version else "pinned")
    if gallery is None or queries is None:
        exp = mv["tags"].get(LINEAGE_EXP_TAG)
        if not exp:
            raise ConfigError(f"{name} v{mv['version']} has no '{LINEAGE_EXP_TAG}' tag (not trained by a flow): "
                              "pass gallery and queries")  # fmt: skip
        exp_pull(workdir, [exp])
        exp_apply(workdir, exp)
        params = yaml.safe_load(Path(workdir, "params.yaml").read_text(encoding="utf-8")) or {}
        default_gallery, default_queries, pull = default_inputs(params, dataset, split)
        if pull:
            dvc_pull(workdir, pull)
        gallery, queries = gallery or default_gallery, queries or default_queries
    if out is None:
        bucket = os.environ.get("DETAILFUSION_S3_BUCKET")
        base = f"s3://{bucket}/retrieval" if bucket else str(Path(tempfile.gettempdir()) / "detailfusion-retrieval")
        out = f"{base}/{name}/v{mv['version']}"
    args = ["detailfusion", "--quiet", "retrieve", "--model", f"models:/{name}/{mv['version']}", "--dataset", dataset,
            "--gallery", gallery, "--queries", queries, "--split", split, "--out", out, "--top-k", str(top_k),
            "--index", index, *(extra_args or [])]  # fmt: skip
    stdout = run_command(args, cwd=workdir, env=tool_env(workdir, **{FLOW_RUN_ENV: str(flow_run.id)}),
                         what="detailfusion retrieve", echo=False)  # fmt: skip
    summary = last_json(stdout, "detailfusion retrieve")
    logger.info("batch retrieval of %s v%s -> %s:\n%s", name, mv["version"], out, json.dumps(summary, indent=2,
                                                                                           default=str)[:4000])
    shutil.rmtree(Path(workdir).parent, ignore_errors=True)
    return {"model": f"{name}/{mv['version']}", "out": out, "summary": summary}
