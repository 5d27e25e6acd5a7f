"""The ``train`` flow: the three training stages as one DVC experiment, on a ``gpu`` worker.

It checks out the project at the caller's revision, restores the caller's ``params.yaml`` and
``dvc.lock`` (so the data stages are up to date), pulls their outputs from the DVC remote, runs
``dvc exp run -n <name>`` of the training stages (plus ``evaluate`` when asked, as ablations do)
and pushes the experiment (``dvc exp push origin <name>``: git refs to the git remote, outputs to
the DVC remote). Any clone then lists it in ``dvc exp show`` and restores it with
``dvc exp apply``. Every MLflow stage run nests under the caller's parent run and carries the
caller's flow-run id and the experiment name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from detailfusion.pipeline import TRAIN_STAGES
from flows.tasks import (
    FLOW_RUN_ENV,
    PIPELINE_RUN_ENV,
    StageFailed,
    check_exp_name,
    checkout,
    configure_dvc_remote,
    dvc_pull,
    exp_push,
    repo_url_or_default,
    run_command,
    run_workdir,
    tool_env,
)

GPU_SLOT_ENV = "DETAILFUSION_GPU_SLOTS"  # trainings one machine runs at once (default 1)


class InjectedFault(RuntimeError):
    """Raised on purpose by ``fail_first_attempts`` to exercise the retry path."""


@task(name="restore-inputs", cache_policy=NO_CACHE)
def restore_inputs(workdir: str, params_yaml: str | None, dvc_lock: str | None) -> None:
    """Write the caller's params.yaml and dvc.lock into the checkout (the data stages' state)."""
    for name, text in (("params.yaml", params_yaml), ("dvc.lock", dvc_lock)):
        if text:
            (Path(workdir) / name).write_text(text, encoding="utf-8")


@contextlib.contextmanager
def gpu_slot() -> Iterator[str]:
    """Hold one slot of this machine's global concurrency limit ``gpu-training-<host>`` (created
    with ``$DETAILFUSION_GPU_SLOTS`` slots, default 1), so a GPU machine trains one model at a time
    whatever the work pool lets through."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = f"gpu-training-{socket.gethostname()}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                limit = int(os.environ.get(GPU_SLOT_ENV, "1"))
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
    get_run_logger().info("waiting for a slot of concurrency limit %s", name)
    with concurrency(name, occupy=1, strict=True):
        yield name


def retry_unless_rejected(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a crash, not a stage that refused its input: ``detailfusion`` exits 2 for a clear
    error (bad params, bad data), which a second attempt would only repeat."""
    try:
        state.result()
    except StageFailed as exc:
        return "exited with 2" not in str(exc)
    except Exception:
        return True
    return True


# One retry for a crashed training (a lost worker, an OOM); the experiment only exists once the
# stages succeed, so the retry reruns it under the same name.
@task(name="dvc-exp-run", task_run_name="dvc-exp-run-{name}", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=5, retry_condition_fn=retry_unless_rejected)  # fmt: skip
def run_experiment(workdir: str, name: str, stages: list[str], env: dict[str, str], fail_first_attempts: int = 0) -> str:
    attempt = task_run.run_count or 1
    if attempt <= fail_first_attempts:
        raise InjectedFault(f"injected fault: attempt {attempt} of experiment {name} fails on purpose "
                            f"(fail_first_attempts={fail_first_attempts})")  # fmt: skip
    with gpu_slot():
        run_command(["dvc", "exp", "run", "-n", name, "--single-item", *stages], cwd=workdir, env=env,
                    what=f"dvc exp run {name} ({', '.join(stages)})")  # fmt: skip
    return name


@flow(name="train", log_prints=True)
def train(
    exp_name: str,
    revision: str = "main",
    repo_url: str | None = None,
    params_yaml: str | None = None,
    dvc_lock: str | None = None,
    pull_targets: list[str] | None = None,
    with_evaluate: bool = False,
    parent_run_id: str | None = None,
    caller_flow_run_id: str | None = None,
    fail_first_attempts: int = 0,
    keep_workdir: bool = False,
) -> dict[str, Any]:
    """Run stage1_detail -> stage2_branches -> stage3_fusion (-> evaluate) as DVC experiment ``exp_name``.

    ``params_yaml``/``dvc_lock`` are the caller's files after its data stages; ``pull_targets``
    the stages whose outputs to pull first (default: synthesize, prepare).
    """
    logger = get_run_logger()
    check_exp_name(exp_name)
    url = repo_url_or_default(repo_url)
    workdir = run_workdir(f"train-{exp_name}")
    sha = checkout(url, revision, str(workdir))
    configure_dvc_remote(str(workdir))
    restore_inputs(str(workdir), params_yaml, dvc_lock)
    dvc_pull(str(workdir), list(pull_targets or ["synthesize", "prepare"]))
    stages = [*TRAIN_STAGES, *(["evaluate"] if with_evaluate else [])]
    env = tool_env(workdir, DVC_EXP_NAME=exp_name, **{FLOW_RUN_ENV: caller_flow_run_id or str(flow_run.id),
                                                     PIPELINE_RUN_ENV: parent_run_id})  # fmt: skip
    run_experiment(str(workdir), exp_name, stages, env, fail_first_attempts)
    exp_push(str(workdir), exp_name)
    logger.info("experiment %s (baseline %s) pushed to origin and the DVC remote", exp_name, sha[:12])
    if not keep_workdir:
        shutil.rmtree(workdir.parent, ignore_errors=True)  # the per-run folder
    return {"exp_name": exp_name, "baseline": sha, "stages": stages}
