"""Small tasks the flows share: check out the project at a revision into a per-run folder,
point DVC at the S3 remote, apply ``params.yaml`` overrides, run one DVC stage, move outputs
through the DVC remote, and keep the parent MLflow run of a flow.

Every command runs as a subprocess in the checkout (``cwd``), with the checkout first on
``PYTHONPATH`` so ``detailfusion`` imports the code of that revision, not whatever package the
worker has installed. A failed command raises :class:`StageFailed` carrying the tail of its
output (for ``validate`` that is the validation summary) and logs it to the flow run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from detailfusion.errors import ConfigError, DetailFusionError
from detailfusion.pipeline import DATA_STAGES

REMOTE_NAME = "storage"
RUNS_DIR_ENV = "DETAILFUSION_RUNS_DIR"
REPO_URL_ENV = "DETAILFUSION_REPO_URL"
PIPELINE_RUN_ENV = "DETAILFUSION_PIPELINE_RUN_ID"  # read by detailfusion.tracking.runs
FLOW_RUN_ENV = "PREFECT__FLOW_RUN_ID"  # read by detailfusion.tracking.lineage
EVENT_PROMOTED = "detailfusion.champion.promoted"

# Tasks that talk to the network (git remote, DVC remote, MLflow) retry with exponential backoff.
NETWORK_RETRY = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.3}
_EXP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


class StageFailed(DetailFusionError):
    """A ``dvc`` / ``detailfusion`` command exited non-zero; the message holds its output tail."""


# --------------------------------------------------------------------------- processes


def tool_env(workdir: str | Path, **extra: str | None) -> dict[str, str]:
    """The environment for commands in ``workdir``: the worker's, plus the project on PYTHONPATH,
    the venv's tools on PATH, offline/telemetry switches and ``extra`` (None values are dropped)."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir), env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               GX_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1")  # fmt: skip
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def run_command(args: list[str], *, cwd: str | Path, env: dict[str, str] | None = None, what: str,
                echo: bool = True, tail_lines: int = 60) -> str:  # fmt: skip
    """Run ``args`` in ``cwd``, echo its output lines to the run's log, return the whole output
    (with ``echo=False``: nothing echoed, stdout alone returned).

    On a non-zero exit the last ``tail_lines`` lines go to the log as one ERROR record and into
    the raised :class:`StageFailed`.
    """
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", shlex.join(args), cwd)
    if not echo:  # output is data (JSON...): keep stdout apart from stderr's warnings
        try:
            done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, errors="replace")
        except OSError as exc:
            raise StageFailed(f"{what}: cannot start {args[0]!r}: {exc}") from exc
        if done.returncode:
            message = f"{what} failed (exit {done.returncode}):\n" + "\n".join(
                (done.stdout + done.stderr).splitlines()[-tail_lines:])
            logger.error(message)
            raise StageFailed(message)
        return done.stdout
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=tail_lines)
    try:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")  # fmt: skip
    except OSError as exc:
        raise StageFailed(f"{what}: cannot start {args[0]!r}: {exc}") from exc
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        tail.append(line)
        if echo and line.strip():
            logger.info(line)
    code = proc.wait()
    if code:
        message = f"{what} failed (exit {code}):\n" + "\n".join(tail)
        logger.error(message)
        raise StageFailed(message)
    return "\n".join(lines)


def last_json(output: str, what: str) -> Any:
    """The last top-level JSON document of a command's output (``--json`` / summary printers start
    it at column 0, after whatever else the command printed)."""
    import json

    starts = [m.start() for m in re.finditer(r"^[\[{]", output, flags=re.M)]
    for start in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(output[start:])[0]
        except json.JSONDecodeError:
            continue
    raise StageFailed(f"{what}: no JSON in its output: {output[-500:]!r}")


def git(workdir: str | Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(workdir), *args], capture_output=True, text=True)
    if done.returncode:
        raise StageFailed(f"git {' '.join(args)} failed in {workdir}: {done.stderr.strip()}")
    return done.stdout.strip()


# --------------------------------------------------------------------------- checkout


def repo_url_or_default(repo_url: str | None) -> str:
    url = repo_url or os.environ.get(REPO_URL_ENV)
    if not url:
        raise ConfigError(f"no repository to check out: pass the flow parameter repo_url or set ${REPO_URL_ENV}")
    return url


def run_workdir(kind: str) -> Path:
    """A fresh folder for this flow run's checkout: ``$DETAILFUSION_RUNS_DIR/<flow-run-id>/<kind>``."""
    from prefect.runtime import flow_run

    base = Path(os.environ.get(RUNS_DIR_ENV) or Path(tempfile.gettempdir()) / "detailfusion-runs")
    path = base / str(flow_run.id or f"local-{os.getpid()}") / kind
    if path.exists():  # a retried flow run starts from a clean checkout
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_exp_name(name: str) -> str:
    if not _EXP_NAME.match(name):
        raise ConfigError(f"experiment name {name!r}: use letters, digits, '-' and '_' (at most 100)")
    return name


@task(name="checkout", cache_policy=NO_CACHE, **NETWORK_RETRY)
def checkout(repo_url: str, revision: str, workdir: str) -> str:
    """Clone ``repo_url`` into ``workdir`` and check out ``revision``; returns the commit sha."""
    path = Path(workdir)
    if path.exists():
        shutil.rmtree(path)
    env = tool_env(path)
    run_command(["git", "clone", "--quiet", repo_url, str(path)], cwd=path.parent, env=env, what=f"git clone {repo_url}")
    sha = None
    for candidate in (revision, f"origin/{revision}"):
        done = subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0:
            sha = done.stdout.strip()
            break
    if sha is None:
        raise ConfigError(f"revision {revision!r} does not exist in {repo_url}")
    git(path, "checkout", "--quiet", "-B", "detailfusion-run", sha)
    git(path, "config", "user.name", os.environ.get("GIT_AUTHOR_NAME", "detailfusion-flows"))
    git(path, "config", "user.email", os.environ.get("GIT_AUTHOR_EMAIL", "flows@detailfusion.invalid"))
    get_run_logger().info("checked out %s at %s (%s) into %s", repo_url, revision, sha[:12], path)
    return sha


@task(name="configure-dvc-remote", cache_policy=NO_CACHE)
def configure_dvc_remote(workdir: str) -> str:
    """Make the S3 remote from ``$DVC_REMOTE_URL`` (+ ``$AWS_ENDPOINT_URL``) the checkout's default."""
    url = os.environ.get("DVC_REMOTE_URL")
    if not url:
        raise ConfigError("DVC_REMOTE_URL is not set on this worker: flows move data between workers only "
                          "through the DVC remote (e.g. s3://bucket/dvc)")  # fmt: skip
    env = tool_env(workdir)
    run_command(["dvc", "remote", "add", "--local", "--force", "-d", REMOTE_NAME, url], cwd=workdir, env=env,
                what="dvc remote add", echo=False)  # fmt: skip
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        run_command(["dvc", "remote", "modify", "--local", REMOTE_NAME, "endpointurl", endpoint], cwd=workdir,
                    env=env, what="dvc remote modify", echo=False)  # fmt: skip
    return url


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested ``params``; every parent must exist (a typo fails, naming the key)."""
    parts = key.split(".")
    node: Any = params
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if part not in node:
            raise ConfigError(f"params override {key!r}: params.yaml has no section {where!r}")
        if not isinstance(node[part], dict):
            raise ConfigError(f"params override {key!r}: {where!r} in params.yaml is a value, not a section")
        node = node[part]
    node[parts[-1]] = value


@task(name="apply-params-overrides", cache_policy=NO_CACHE)
def apply_overrides(workdir: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``overrides`` (dotted key -> value) into the checkout's params.yaml; returns the params."""
    path = Path(workdir) / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key, value in (overrides or {}).items():
        set_dotted(params, key, value)
    if overrides:
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        get_run_logger().info("params.yaml overrides: %s", ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    return params


# --------------------------------------------------------------------------- DVC


@task(name="dvc-repro-stage", task_run_name="dvc-repro-{stage}", cache_policy=NO_CACHE)
def repro_stage(workdir: str, stage: str, env: dict[str, str]) -> None:
    """Run one stage of dvc.yaml (``dvc repro --single-item``); its upstream must be up to date."""
    run_command(["dvc", "repro", "--single-item", stage], cwd=workdir, env=env, what=f"stage {stage}")


@task(name="dvc-pull", cache_policy=NO_CACHE, **NETWORK_RETRY)
def dvc_pull(workdir: str, targets: list[str]) -> None:
    run_command(["dvc", "pull", *targets], cwd=workdir, env=tool_env(workdir), what=f"dvc pull {' '.join(targets)}")


@task(name="dvc-push", cache_policy=NO_CACHE, **NETWORK_RETRY)
def dvc_push(workdir: str, targets: list[str]) -> None:
    run_command(["dvc", "push", *targets], cwd=workdir, env=tool_env(workdir), what=f"dvc push {' '.join(targets)}")


@task(name="dvc-exp-push", cache_policy=NO_CACHE, **NETWORK_RETRY)
def exp_push(workdir: str, name: str) -> None:
    """Push experiment ``name`` to the git remote ``origin`` and its outputs to the DVC remote."""
    run_command(["dvc", "exp", "push", "origin", name], cwd=workdir, env=tool_env(workdir), what=f"dvc exp push {name}")


@task(name="dvc-exp-pull", cache_policy=NO_CACHE, **NETWORK_RETRY)
def exp_pull(workdir: str, names: list[str]) -> None:
    """Fetch experiments from ``origin`` (git refs and their outputs from the DVC remote)."""
    run_command(["dvc", "exp", "pull", "origin", *names], cwd=workdir, env=tool_env(workdir),
                what=f"dvc exp pull {' '.join(names)}")  # fmt: skip


@task(name="dvc-exp-apply", cache_policy=NO_CACHE)
def exp_apply(workdir: str, name: str) -> None:
    """Restore experiment ``name`` (params, dvc.lock, outputs) into the checkout's workspace."""
    git(workdir, "checkout", "--quiet", "--", ".")  # the workspace holds the baseline again
    run_command(["dvc", "exp", "apply", name], cwd=workdir, env=tool_env(workdir), what=f"dvc exp apply {name}")


def run_data_stages(workdir: str, params: dict[str, Any], env: dict[str, str]) -> list[str]:
    """synthesize (only when the data root is its output) -> prepare -> validate; returns the
    stages whose outputs the training workers need (to push)."""
    synth_out = "data/synthetic"
    root = str((params.get("data") or {}).get("root", synth_out)).rstrip("/")
    stages = list(DATA_STAGES) if root == synth_out else [s for s in DATA_STAGES if s != "synthesize"]
    for stage in stages:
        repro_stage(workdir, stage, env)
    return [s for s in stages if s != "validate"]  # validate's report is not cached (cache: false)


# --------------------------------------------------------------------------- MLflow


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError("MLFLOW_TRACKING_URI is not set on this worker: flow runs log to a shared MLflow server")
    return uri


@task(name="mlflow-start-parent-run", cache_policy=NO_CACHE, **NETWORK_RETRY)
def start_parent_run(workdir: str, params: dict[str, Any], dataset: str, kind: str, run_name: str,
                     extra_tags: dict[str, str] | None = None) -> str:  # fmt: skip
    """Create the parent MLflow run that every stage run of this flow nests under; returns its id."""
    from mlflow import MlflowClient

    from detailfusion.config import from_dict
    from detailfusion.tracking.config import TrackingConfig
    from detailfusion.tracking.lineage import lineage_tags
    from detailfusion.tracking.session import TAG_RUN_KIND

    cfg = from_dict(TrackingConfig, params.get("tracking"), where="params.yaml: tracking")
    client = MlflowClient(tracking_uri())
    name = cfg.experiment_name(dataset)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = {**lineage_tags(Path(workdir), dataset=dataset), TAG_RUN_KIND: kind, **(extra_tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    get_run_logger().info("MLflow parent run %s (%s) in experiment %s", run.info.run_id, run_name, name)
    return run.info.run_id


@task(name="mlflow-end-parent-run", cache_policy=NO_CACHE, **NETWORK_RETRY)
def end_parent_run(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri()).set_terminated(run_id, status=status)


@task(name="mlflow-log-to-parent-run", cache_policy=NO_CACHE, **NETWORK_RETRY)
def log_to_parent(run_id: str, *, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
                  texts: dict[str, str] | None = None) -> None:  # fmt: skip
    """Log metrics, tags and text artifacts (file name -> content) to an MLflow run."""
    from mlflow import MlflowClient

    from detailfusion.tracking import mlflow_key

    client = MlflowClient(tracking_uri())
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, mlflow_key(key), float(value))
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    for name, text in (texts or {}).items():
        client.log_text(run_id, text, name)


# --------------------------------------------------------------------------- events


@task(name="emit-champion-promoted", cache_policy=NO_CACHE)
def emit_promoted(decision: dict[str, Any], source: str) -> str | None:
    """Emit ``detailfusion.champion.promoted`` for a decision that moved ``@champion``."""
    from prefect.events import emit_event

    if decision.get("decision") != "promoted":
        return None
    name, version = str(decision["model_name"]), str(decision["challenger_version"])
    event = emit_event(
        event=EVENT_PROMOTED,
        resource={"prefect.resource.id": f"detailfusion.model.{name}", "prefect.resource.name": name,
                  "detailfusion.model.name": name, "detailfusion.model.version": version},  # fmt: skip
        payload={"model_name": name, "version": version, "source": source,
                 **{k: decision.get(k) for k in ("metric", "challenger_value", "champion_value", "champion_version")}},
    )  # fmt: skip
    get_run_logger().info("emitted %s for %s v%s", EVENT_PROMOTED, name, version)
    return str(event.id) if event else None
