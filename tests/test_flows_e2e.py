"""The Prefect flows end to end on the local stack (infra/local): PostgreSQL, S3 (moto), MLflow,
Prefect server and the ``cpu`` / ``gpu`` process workers.

One stack serves the module. A copy of the working tree, committed in a temporary git repository,
is the "origin" the workers clone; ``prefect --no-prompt deploy --all`` deploys prefect.yaml, and
``prefect deployment run`` starts the flows with the shrunk params of ``conftest.shrink_params``
passed as params.yaml overrides. Then the real stores are inspected: the S3 DVC remote (through a
fresh clone that ``dvc exp apply`` s the pushed experiment), MLflow runs and the registry, the
Prefect API (states, task runs, logs, events).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import REPO_ROOT, shrink_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
STACK_PY = REPO_ROOT / "infra" / "local" / "stack.py"
RUN_TIMEOUT_S = 1500
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _stack_module():
    spec = importlib.util.spec_from_file_location("detailfusion_stack", STACK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd: list[str], cwd: Path, env: dict, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def shrunk_overrides(real_params: dict) -> dict:
    """The dotted-key differences between params.yaml and its shrunk test version."""
    real, small = _flatten(real_params), _flatten(shrink_params(real_params, Path("/unused"), relative=True))
    out = {k: v for k, v in small.items() if not k.startswith("tracking.") and real.get(k, object()) != v}
    out["tracking.system_metrics"] = False
    return out


class Stack:
    def __init__(self, env: dict, origin: Path, work: Path):
        self.env, self.origin, self.work = env, origin, work
        self.api = env["PREFECT_API_URL"].rstrip("/")

    def prefect(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run([str(BIN / "prefect"), *args], self.origin, self.env, check=check)

    def post(self, path: str, body: dict) -> dict | list:
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def flow_run(self, run_id: str) -> dict:
        r = httpx.get(f"{self.api}/flow_runs/{run_id}", timeout=30)
        r.raise_for_status()
        return r.json()

    def start(self, deployment: str, params: dict) -> str:
        args = ["deployment", "run", deployment]
        for key, value in params.items():
            args += ["-p", f"{key}={json.dumps(value)}"]
        out = self.prefect(*args).stdout
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert found, out
        return found.group(1)

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in TERMINAL:
                return run
            time.sleep(3)
        raise AssertionError(f"flow run {run_id} still {run['state_type']} after {timeout}s")

    def logs(self, run_ids: list[str]) -> str:
        lines, offset = [], 0
        while True:
            page = self.post("/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}}, "limit": 200,
                                              "offset": offset, "sort": "TIMESTAMP_ASC"})  # fmt: skip
            lines += [entry["message"] for entry in page]
            if len(page) < 200:
                return "\n".join(lines)
            offset += 200

    def children(self, run_id: str) -> list[dict]:
        return self.post("/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [run_id]}}})

    def task_runs(self, run_id: str) -> list[dict]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200})

    def clone(self, name: str) -> Path:
        """A fresh clone of origin with the S3 remote configured (what any user would have)."""
        dest = self.work / name
        _run(["git", "clone", "-q", str(self.origin), str(dest)], self.work, self.env)
        _run(["dvc", "remote", "add", "--local", "-d", "s3", self.env["DVC_REMOTE_URL"]], dest, self.env)
        _run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", self.env["AWS_ENDPOINT_URL"]], dest, self.env)
        return dest

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.env.get("AWS_DEFAULT_REGION", "us-east-1"))  # fmt: skip

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.env["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory, real_params):
    if not STACK_PY.is_file():
        pytest.skip("infra/local/stack.py is missing")
    stack_mod = _stack_module()
    work = tmp_path_factory.mktemp("flows")
    home = work / "stack"
    origin = work / "origin"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")  # fmt: skip
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (origin / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, origin / rel)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DETAILFUSION_", "PREFECT_",
                                                                      "AWS_"))}  # fmt: skip
    base.update(PATH=f"{BIN}:{base['PATH']}", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@t")  # fmt: skip
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "origin"]):
        _run(cmd, origin, base)
    try:
        stack_mod.down(home, purge=True)  # nothing of an earlier stack at this path (its databases) carries over
        stack_mod.up(home)
        env = {**base, **stack_mod.read_env(home), "DETAILFUSION_REPO_URL": str(origin)}
        st = Stack(env, origin, work)
        st.prefect("--no-prompt", "deploy", "--all")
        yield st
    finally:
        try:  # the per-run folders that failed runs keep for inspection
            for run in Stack.post(st, "/flow_runs/filter", {"limit": 200}):
                shutil.rmtree(Path("/tmp/detailfusion-runs") / run["id"], ignore_errors=True)
        except Exception:  # noqa: BLE001 - the stack may not have come up at all
            pass
        stack_mod.down(home)
        report = stack_mod.status(home)
        stack_mod.down(home, purge=True)  # the databases live outside the tmp dir when root runs the tests
        running = [r["name"] for r in report["processes"] if r["running"]]
        assert not running and not report["strays"], f"stack down left processes: {running} {report['strays']}"


@pytest.fixture(scope="module")
def overrides(real_params) -> dict:
    return shrunk_overrides(real_params)


@pytest.fixture(scope="module")
def started(stack, overrides, real_params, tmp_path_factory) -> dict:
    """Three flow runs started at once (the cpu worker runs them side by side; training queues on
    the gpu pool): the pipeline with its first training attempt failing on purpose, the pipeline on
    a broken data set, and the ablation suite with one variant made to fail."""
    ids = {"pipeline": stack.start("pipeline/default", {"overrides": overrides, "fail_first_attempts": 1})}
    # a tiny data set in the native formats with one CIRR image truncated
    tmp = tmp_path_factory.mktemp("broken")
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(shrink_params(real_params, tmp), sort_keys=False))
    broken = tmp / "data"
    _run(["detailfusion", "--quiet", "--params", str(params_file), "data", "synth", "--out", str(broken)], tmp,
         stack.env)  # fmt: skip
    image = sorted((broken / "cirr").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:100])
    ids["broken"] = stack.start("pipeline/default", {"overrides": {**overrides, "data.root": str(broken)}})
    ids["broken_image"] = image.stem  # the validation summary names the image id (file name without suffix)
    ids["ablations"] = stack.start("ablations/suite", {
        "variants": ["full", "gm_only"], "seeds": [0], "overrides": overrides,
        # an impossible setting for one variant only: its stage 1 refuses to start
        "variant_overrides": {"full": {"stage1_detail.loop.batch_size": 1}},
    })  # fmt: skip
    return ids


@pytest.fixture(scope="module")
def pipeline_run(stack, started) -> dict:
    return stack.wait(started["pipeline"])


def promoted_versions(stack: Stack, until: str, timeout: float = 120) -> list[str]:
    """Versions named by ``detailfusion.champion.promoted`` events; waits for ``until`` (the server
    stores an event a moment after the emitting flow run has finished)."""
    deadline = time.monotonic() + timeout
    while True:
        events = stack.post("/events/filter", {"filter": {"event": {"name": ["detailfusion.champion.promoted"]}}})
        versions = [str(e["payload"].get("version")) for e in events["events"]]
        if until in versions or time.monotonic() > deadline:
            return versions
        time.sleep(3)


def _exp_name(stack: Stack, prefix: str) -> list[str]:
    out = _run(["dvc", "exp", "list", "--all-commits", "--name-only"], stack.origin, stack.env).stdout.split()
    return sorted(n for n in out if n.startswith(prefix))


def test_pipeline_end_to_end(stack, pipeline_run):
    run_id = pipeline_run["id"]
    assert pipeline_run["state_type"] == "COMPLETED", stack.logs([run_id])[-4000:]

    # the training experiment is on the git remote; a fresh clone restores it from the S3 DVC remote
    (exp,) = _exp_name(stack, f"pipeline-{run_id[:8]}")
    clone = stack.clone("check-pipeline")
    _run(["dvc", "exp", "pull", "origin", exp], clone, stack.env)
    shown = _run(["dvc", "exp", "show", "--json", "--no-pager"], clone, stack.env).stdout
    assert exp in shown
    _run(["dvc", "exp", "apply", exp], clone, stack.env)
    _run(["dvc", "pull", "prepare", "stage1_detail", "stage2_branches", "stage3_fusion"], clone, stack.env)
    for n in (1, 2, 3):
        assert (clone / "models" / f"stage{n}" / "model" / "model.safetensors").is_file()
    assert (clone / "data" / "prepared" / "cirr" / "queries.parquet").is_file()
    s3 = stack.s3()
    bucket, _, prefix = stack.env["DVC_REMOTE_URL"].removeprefix("s3://").partition("/")
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")["KeyCount"] > 0
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert params["stage1_detail"]["loop"]["max_steps"] == 3  # the run's overrides are part of the experiment

    # MLflow: every stage ran tracked, tagged with this flow run's id, under one parent run
    client = stack.mlflow()
    experiment = client.get_experiment_by_name("detailfusion-cirr")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'", max_results=100)
    by_stage = {r.data.tags.get("detailfusion.stage"): r for r in runs if r.data.tags.get("detailfusion.stage")}
    stages = {"synthesize", "prepare", "validate", "pretrain_backbone", "stage1_detail", "stage2_branches",
              "stage3_fusion", "evaluate", "register"}  # fmt: skip
    assert stages <= set(by_stage), sorted(by_stage)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in by_stage.values()}
    assert len(parents) == 1 and None not in parents
    parent = client.get_run(parents.pop())
    assert parent.data.tags["prefect.flow_run_id"] == run_id and parent.info.status == "FINISHED"
    for stage in ("pretrain_backbone", "stage1_detail", "stage2_branches", "stage3_fusion"):
        assert by_stage[stage].data.tags.get("dvc.exp_name") == exp

    # the registry has a champion, and the promotion was announced as a Prefect event
    champion = client.get_model_version_by_alias("detailfusion-cirr", "champion")
    assert champion.tags.get("lineage.dvc.exp_name") == exp  # this run's model is the champion
    assert str(champion.version) in promoted_versions(stack, until=str(champion.version))


def test_training_fault_is_retried(stack, pipeline_run):
    assert pipeline_run["state_type"] == "COMPLETED"
    (train,) = [r for r in stack.children(pipeline_run["id"]) if r["name"]] or [None]
    assert train is not None and train["state_type"] == "COMPLETED"
    (exp_task,) = [t for t in stack.task_runs(train["id"]) if t["name"].startswith("dvc-exp-run-")]
    assert exp_task["run_count"] == 2 and exp_task["state_type"] == "COMPLETED"
    assert "injected fault: attempt 1" in stack.logs([train["id"]])


def test_promotion_event_triggers_batch_retrieval(stack, pipeline_run):
    """The pipeline's promotion event starts batch_retrieval/nightly with the new champion, which
    retrieves over the CIRR val data of the champion's DVC experiment and writes to S3."""
    assert pipeline_run["state_type"] == "COMPLETED"
    champion = stack.mlflow().get_model_version_by_alias("detailfusion-cirr", "champion").version
    deadline = time.monotonic() + 300
    runs: list = []
    while not runs and time.monotonic() < deadline:
        runs = [r for r in stack.post("/flow_runs/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
                if r["parameters"].get("version")]  # the trigger sets the version; the schedule does not
        time.sleep(3)
    assert runs, "the promotion event started no batch_retrieval run"
    run = stack.wait(runs[0]["id"])
    assert run["state_type"] == "COMPLETED", stack.logs([run["id"]])[-3000:]
    assert str(run["parameters"]["version"]) == str(champion)
    listed = stack.s3().list_objects_v2(Bucket=stack.env["DETAILFUSION_S3_BUCKET"],
                                Prefix=f"retrieval/detailfusion-cirr/v{champion}/")  # fmt: skip
    assert listed["KeyCount"] > 0


def test_broken_dataset_fails_at_validate(stack, started):
    run_id, image = started["broken"], started["broken_image"]
    run = stack.wait(run_id)
    assert run["state_type"] == "FAILED"
    logs = stack.logs([run_id])
    assert "stage validate failed" in logs and "truncated" in logs and image in logs, logs[-3000:]
    assert stack.children(run_id) == []  # no training started
    names = [t["name"] for t in stack.task_runs(run_id)]
    assert "dvc-repro-validate" in names and not any(n.startswith(("dvc-push", "dvc-exp")) for n in names), names


def test_ablations_one_variant_fails_others_complete(stack, started):
    client = stack.mlflow()
    run_id = started["ablations"]
    run = stack.wait(run_id)
    assert run["state_type"] == "FAILED"
    prefix = f"abl-{run_id[:8]}"
    ok, bad = f"{prefix}-gm_only-s0", f"{prefix}-full-s0"
    logs = stack.logs([run_id])
    assert f"variant {bad} failed" in logs and "1 of 2 runs failed" in logs, logs[-3000:]
    assert "params.yaml: stage1_detail.loop.batch_size: must be >= 2" in stack.logs([c["id"] for c in stack.children(run_id)])

    # the surviving variant is a DVC experiment any clone can list, with its evaluation metrics
    assert _exp_name(stack, prefix) == [ok]
    clone = stack.clone("check-ablations")
    _run(["dvc", "exp", "pull", "origin", ok], clone, stack.env)
    shown = json.loads(_run(["dvc", "exp", "show", "--json", "--no-pager"], clone, stack.env).stdout)
    assert ok in json.dumps(shown) and "metrics/eval.json" in json.dumps(shown)

    # MLflow: one parent for the suite, the surviving variant's stage runs under it, failure recorded
    experiment = client.get_experiment_by_name("detailfusion-cirr")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   f"tags.`detailfusion.run_kind` = 'ablation_suite' and "
                                   f"tags.`prefect.flow_run_id` = '{run_id}'")  # fmt: skip
    assert parent.data.tags["ablation.failed"] == bad
    assert any(k.startswith("gm_only/") for k in parent.data.metrics), parent.data.metrics
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=100)  # fmt: skip
    stages = {r.data.tags.get("detailfusion.stage") for r in children if r.data.tags.get("dvc.exp_name") == ok}
    assert {"stage1_detail", "stage2_branches", "stage3_fusion", "evaluate"} <= stages, stages
    # ablations never register a model, so they never move @champion
    assert "register" not in {r.data.tags.get("detailfusion.stage") for r in children}
    versions = client.search_model_versions("name = 'detailfusion-cirr'")
    assert not any(v.tags.get("lineage.dvc.exp_name", "").startswith(prefix) for v in versions)


def _challenger(stack: Stack, client, avg: float) -> str:
    """Register the champion's logged model again with the given Avg: a new @challenger version."""
    source = client.get_model_version_by_alias("detailfusion-cirr", "champion").source
    metrics = stack.work / f"metrics-{avg}.json"
    metrics.write_text(json.dumps({"Avg": avg}))
    out = _run(["detailfusion", "registry", "register", "--model", source, "--dataset", "cirr", "--metrics",
                str(metrics), "--json"], stack.origin, stack.env).stdout  # fmt: skip
    return str(json.loads(out[out.index("{") :])["version"])


def _paused(stack: Stack, run_id: str, timeout: float = 600) -> str:
    """Wait until the run pauses for input; its input form's description."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = stack.flow_run(run_id)
        assert run["state_type"] not in TERMINAL, stack.logs([run_id])[-3000:]
        keyset = (run["state"].get("state_details") or {}).get("run_input_keyset") if run["state_type"] == "PAUSED" \
            else None  # fmt: skip
        if keyset:
            r = httpx.get(f"{stack.api}/flow_runs/{run_id}/input/{keyset['description']}", timeout=30)
            r.raise_for_status()
            return r.json()
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} did not pause within {timeout}s")


def test_promotion_waits_for_approval(stack, pipeline_run):
    client = stack.mlflow()
    champion = client.get_model_version_by_alias("detailfusion-cirr", "champion").version
    resume = [sys.executable, "-m", "flows.promote"]

    # rejected: the champion stays
    weak = _challenger(stack, client, avg=1.0)
    run_id = stack.start("promote/approval", {"dataset": "cirr"})
    description = _paused(stack, run_id)
    assert f"challenger v{weak}" in description and f"champion v{champion}" in description
    assert "| **Avg** (gate) | 1.0000 |" in description, description
    _run([*resume, "reject", run_id], REPO_ROOT, stack.env)
    assert stack.wait(run_id)["state_type"] == "COMPLETED"
    assert client.get_model_version_by_alias("detailfusion-cirr", "champion").version == champion

    # approved and better: promoted, and the promotion event names the new version
    strong = _challenger(stack, client, avg=1000.0)
    run_id = stack.start("promote/approval", {"dataset": "cirr"})
    assert f"challenger v{strong}" in _paused(stack, run_id)
    _run([*resume, "approve", run_id, "--comment", "test"], REPO_ROOT, stack.env)
    assert stack.wait(run_id)["state_type"] == "COMPLETED", stack.logs([run_id])[-3000:]
    assert client.get_model_version_by_alias("detailfusion-cirr", "champion").version == strong
    assert strong in promoted_versions(stack, until=strong)
