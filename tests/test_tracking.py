"""Tracking: stage runs nested under one pipeline run, params, lineage, data set inputs, metrics,
artifacts and system metrics against a real ``mlflow server``; the parent run shared by separate
DVC stage processes (``dvc repro``, ``dvc exp run --temp``); and training surviving a tracking
server that goes down mid-stage."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import params_file

from detailfusion.config import load_section
from detailfusion.errors import ConfigError, DataFormatError
from detailfusion.params import repo_section
from detailfusion.tracking import (
    PIPELINE_RUN_ENV,
    TrackingConfig,
    TrackingOfflineWarning,
    find_repo_root,
    frame_digest,
    mlflow_key,
    resolve_tracking_uri,
    stage_run,
)
from detailfusion.tracking.replay import replay_offline_record
from detailfusion.tracking.runs import schema_sample

pytest_plugins = ["services"]



def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny committed DVC-style project (dvc.yaml, data.dvc) as the working directory."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data/raw\n")
    (root / "train.py").write_text("print('train')\n")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "init")
    monkeypatch.chdir(root)
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", PIPELINE_RUN_ENV, "PREFECT__FLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return root


def _manifest() -> pd.DataFrame:
    from detailfusion.data.manifest import make_queries

    rows = [
        dict(dataset="cirr", split="val", category="", query_id=str(i), pairid=i, reference=f"ref-{i}",
             target=f"tgt-{i}", target_soft=None, caption=f"make object {i} red", captions=[f"make object {i} red"],
             members=[f"ref-{i}", f"tgt-{i}"], set_id=i, group=str(i), reference_caption=None, target_caption=None,
             edit_types=["colour"])
        for i in range(5)
    ]  # fmt: skip
    return make_queries(rows)


# --------------------------------------------------------------------------- unit


def test_repo_root_and_tracking_uri_resolution(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    exp_copy = root / ".dvc" / "tmp" / "exps" / "tmpab12" / "src"
    exp_copy.mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (exp_copy.parent / "dvc.yaml").write_text("stages: {}\n")
    for var in ("DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)

    # A DVC experiment temp copy resolves to the real repository, so all runs share one store.
    assert find_repo_root(exp_copy) == root.resolve()
    assert find_repo_root(root / ".dvc") == root.resolve()
    monkeypatch.chdir(exp_copy)
    assert resolve_tracking_uri(repo_section("tracking")) == f"sqlite:///{root.resolve()}/mlflow.db"
    assert resolve_tracking_uri(repo_section("tracking", tracking_uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri(repo_section("tracking", tracking_uri="http://mlflow:5000")) == "http://mlflow:5000"
    monkeypatch.setenv("DVC_ROOT", str(root))
    assert find_repo_root(tmp_path) == root.resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert resolve_tracking_uri(repo_section("tracking")) == "http://elsewhere:5000"


def test_tracking_config_is_strict(tmp_path):
    params = params_file(tmp_path / "params.yaml", "tracking:\n  retries: 2\n  experiment: df-{dataset}\n")
    cfg = load_section(TrackingConfig, params, "tracking")
    assert (cfg.retries, cfg.experiment_name("cirr"), cfg.backoff_s) == (2, "df-cirr", 1.0)
    params_file(params, "tracking:\n  retrys: 2\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_section(TrackingConfig, params, "tracking")
    params_file(params, "tracking:\n  experiment: fixed-name\n")
    with pytest.raises(ConfigError, match="must contain"):
        load_section(TrackingConfig, params, "tracking")
    params.write_text("tracking:\n  retries: 2\n")
    with pytest.raises(ConfigError, match=r"tracking: missing required key\(s\) \['enabled'"):
        load_section(TrackingConfig, params, "tracking")


def test_schema_sample_gives_the_whole_tables_schema():
    """A logged manifest's schema comes from a row sample (MLflow walks every list element
    otherwise); it must equal the schema of every row, optional columns included."""
    import mlflow

    n = 5000
    df = pd.DataFrame({
        "query_id": [f"q{i}" for i in range(n)],
        "members": [[f"img-{i}", f"img-{i + 1}"] for i in range(n)],
        "target": [f"t{i}" if i != n - 7 else None for i in range(n)],  # one missing value, far from the head
        "pairid": np.arange(n, dtype=float),
    })
    sample = schema_sample(df, rows=100)
    assert 100 <= len(sample) <= 101 and n - 7 in set(sample.index)

    def schema(frame):
        return mlflow.data.from_pandas(frame, source="/q.parquet", name="q", digest="d")._to_mlflow_entity().schema

    assert schema(sample) == schema(df) != schema(df.head(100))
    assert len(schema_sample(df.head(50), rows=100)) == 50


def test_metric_keys_and_frame_digest():
    assert mlflow_key("Rsub@1") == "Rsub_at_1"
    assert mlflow_key("dress/R@10") == "dress/R_at_10"
    assert mlflow_key("a(b)") == "a_b_"
    df = _manifest()
    assert frame_digest(df) == frame_digest(_manifest())
    changed = df.copy()
    changed.loc[4, "caption"] = "make object 4 blue"  # the last row: MLflow's own digest samples the head
    assert frame_digest(changed) != frame_digest(df)
    changed = df.copy()
    changed.at[0, "members"] = ["ref-0", "other"]
    assert frame_digest(changed) != frame_digest(df)


def test_http_policy_maps_params_to_mlflow_settings(monkeypatch):
    from detailfusion.tracking import transport

    assert transport.http_settings(3, 1.0, 30) == {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip
    assert transport.http_settings(0, 0.01, 0.5)["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
    with pytest.raises(ConfigError, match=r"registry.retries: 11 is outside 0..10"):
        transport.http_settings(11, 1.0, 30, where="registry")
    with pytest.raises(ConfigError, match=r"tracking.timeout_s: must be > 0"):
        transport.http_settings(1, 1.0, 0)

    # Set once for the process; a setting the environment already had wins.
    monkeypatch.setattr(transport, "_external", None)
    for key in transport.HTTP_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    transport.configure_http(2, 0.0, 30)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    monkeypatch.setattr(transport, "_external", None)


class _FailingServer:
    """A loopback HTTP server that answers every request with ``status`` and counts them: a
    tracking server that is failing (503) or rejecting a request (400)."""

    def __init__(self, status: int, body: dict):
        import http.server
        import threading

        self.hits = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                outer.hits += 1
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_mlflow_retries_a_failing_server_then_the_session_goes_offline(project, monkeypatch):
    """The retry policy is MLflow's own (params retries -> MLFLOW_HTTP_REQUEST_MAX_RETRIES); once
    they are spent the session turns offline; a rejected request is neither retried nor offline."""
    from mlflow.exceptions import MlflowException

    from detailfusion.tracking import TrackingOffline, TrackingSession

    cfg = repo_section("tracking", retries=2, backoff_s=0, timeout_s=5)
    with _FailingServer(503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "down"}) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        session = TrackingSession(cfg)
        with pytest.raises(TrackingOffline):
            session.ensure_experiment("cirr")
        assert server.hits == 3  # the first attempt and two retries
        assert session.offline and session.failed_call == "get/create experiment detailfusion-cirr"
        with pytest.raises(TrackingOffline):  # offline for good: no more requests
            session.call("get run", session.client.get_run, "abc")
        assert server.hits == 3
    with _FailingServer(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        session = TrackingSession(cfg)
        with pytest.raises(MlflowException, match="bad name"):
            session.ensure_experiment("cirr")
        assert server.hits == 1 and not session.offline


def test_a_corrupt_offline_record_is_moved_aside_not_dropped(project, caplog):
    from detailfusion.tracking.offline import OfflineRecord, update_offline_record

    record = project / "metrics" / "tracking_offline.json"
    record.parent.mkdir()
    record.write_text('{"stages": {"stage1_detail": {"metrics": [')  # cut off mid-write by a crash
    with caplog.at_level("WARNING", logger="detailfusion.tracking.offline"):
        OfflineRecord("evaluate", "http://127.0.0.1:9", "detailfusion-cirr", status="FINISHED").write(record)
    (aside,) = record.parent.glob("tracking_offline.json.corrupt-*")
    assert aside.read_text() == '{"stages": {"stage1_detail": {"metrics": ['  # kept as it was
    assert set(json.loads(record.read_text())["stages"]) == {"evaluate"}
    (line,) = [r.getMessage() for r in caplog.records if "offline tracking record" in r.getMessage()]
    assert str(record) in line and "not valid JSON" in line and str(aside) in line

    record.write_text('["not", "a", "record"]')
    update_offline_record(record, lambda stages: stages.pop("evaluate", None))
    assert not record.exists() and len(list(record.parent.glob("tracking_offline.json.corrupt-*"))) == 2


def test_disabled_tracking_is_a_silent_no_op(project, recwarn):
    cfg = repo_section("tracking", enabled=False)
    with stage_run("train", {"train": {"lr": 1}}, "cirr", config=cfg) as run:
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_params({"x": 1})
    assert run.run_id is None
    assert not [w for w in recwarn if issubclass(w.category, TrackingOfflineWarning)]
    assert not (project / cfg.offline_record).exists()


# --------------------------------------------------------------------------- against a server


@pytest.mark.integration
@pytest.mark.slow
def test_stage_runs_params_lineage_inputs_metrics_artifacts(project, mlflow_sqlite_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    monkeypatch.setenv("DVC_EXP_NAME", "quiet-lake")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    monkeypatch.setenv("DVC_STAGE", "stage2_branches")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "7d9c2a8e-0000-4000-8000-000000000001")
    (project / "train.py").write_text("print('edited')\n")  # a dirty work tree
    commit = _git(project, "rev-parse", "HEAD")
    dataset = f"trk{uuid.uuid4().hex[:8]}"
    cfg = repo_section("tracking", system_metrics=True, system_metrics_interval_s=0.3, metrics_batch=4)
    metrics_file = project / "metrics" / "eval.json"
    metrics_file.parent.mkdir()
    metrics_file.write_text(json.dumps({"R@1": 41.5, "Avg": 55.0, "per_type": {"colour": {"R@1": 60.0}}, "n": "x"}))
    plot = project / "plots" / "recall.png"
    plot.parent.mkdir()
    plot.write_bytes(b"\x89PNG fake")
    manifest = _manifest()
    params = {"stage2": {"lr": 1e-4, "epochs": 2, "layers": [1, 2]}, "data": {"root": "data/synthetic"}}

    with stage_run("stage2_branches", params, dataset, variant="gm_only", config=cfg) as first:
        digest = first.log_dataset(manifest, name="synthetic-cirr", source="data/prepared/cirr/queries.parquet")
        for step in range(10):
            first.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-4}, step=step)
        time.sleep(1.0)  # long enough for a few system metric samples
        logged = first.log_metrics_file(metrics_file)
        first.log_artifacts(plot.parent, artifact_path="plots")
    with stage_run("evaluate", {"evaluate": {"k": [1, 5]}}, dataset, variant="gm_only",
                   config=repo_section("tracking", system_metrics=False)) as second:  # fmt: skip
        second.log_metric("Avg", 55.0)
        second.log_parent_artifact(metrics_file, artifact_path="ablation")
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("stage3_fusion", {}, dataset, config=repo_section("tracking", system_metrics=False)) as failing:
            raise RuntimeError("boom")

    client = MlflowClient(mlflow_sqlite_server.url)
    parent_id = first.parent_run_id
    assert parent_id and parent_id == second.parent_run_id == failing.parent_run_id
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "exp-quiet-lake"
    assert parent.data.tags["detailfusion.run_kind"] == "pipeline"
    assert parent.info.status == "FAILED"  # the last stage failed
    assert [a.path for a in client.list_artifacts(parent_id, "ablation")] == ["ablation/eval.json"]

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "stage2_branches"
    assert run.info.experiment_id == parent.info.experiment_id
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent_id
    assert tags["git.commit"] == commit == tags["mlflow.source.git.commit"]
    assert tags["git.dirty"] == "true"
    assert tags["data.dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["dvc.exp_name"] == "quiet-lake" and tags["dvc.baseline_rev"] == "f" * 40
    assert tags["dvc.stage"] == "stage2_branches"
    assert tags["prefect.flow_run_id"] == "7d9c2a8e-0000-4000-8000-000000000001"
    assert tags["ablation"] == "gm_only" and tags["dataset"] == dataset
    p = run.data.params
    assert (p["stage2.lr"], p["stage2.epochs"], p["stage2.layers"], p["data.root"]) == ("0.0001", "2", "[1, 2]",
                                                                                      "data/synthetic")  # fmt: skip

    history = client.get_metric_history(first.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(10))
    assert logged == {"R_at_1": 41.5, "Avg": 55.0, "per_type/colour/R_at_1": 60.0}
    assert run.data.metrics["per_type/colour/R_at_1"] == 60.0
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    assert [a.path for a in client.list_artifacts(first.run_id, "metrics")] == ["metrics/eval.json"]
    assert [a.path for a in client.list_artifacts(first.run_id, "plots")] == ["plots/recall.png"]

    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.name == "synthetic-cirr" and ds_input.dataset.digest == digest == frame_digest(manifest)
    assert "data/prepared/cirr/queries.parquet" in ds_input.dataset.source
    assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "training"
    assert json.loads(ds_input.dataset.profile) == {"num_rows": len(manifest), "num_elements": int(manifest.size)}
    assert "caption" in ds_input.dataset.schema

    assert client.get_run(failing.run_id).info.status == "FAILED"
    assert not (project / cfg.offline_record).exists()


@pytest.mark.integration
@pytest.mark.slow
def test_external_parent_run_from_env(project, mlflow_sqlite_server, monkeypatch):
    """A flow that owns the parent (ablation fan-out) exports its id; stages nest under it and
    leave its status alone."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_sqlite_server.url)
    dataset = f"abl{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(f"detailfusion-{dataset}")
    suite = client.create_run(exp_id, run_name="ablation-suite")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    monkeypatch.setenv(PIPELINE_RUN_ENV, suite.info.run_id)
    runs = []
    for variant in ("full", "gm_only"):
        with stage_run("stage3_fusion", {"v": variant}, dataset, variant=variant,
                       config=repo_section("tracking", system_metrics=False)) as run:  # fmt: skip
            run.log_metrics({"Avg": 1.0})
        runs.append(run.run_id)
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{suite.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(runs)
    assert sorted(r.data.tags["ablation"] for r in children) == ["full", "gm_only"]
    assert client.get_run(suite.info.run_id).info.status == "RUNNING"


STAGE_SCRIPT = textwrap.dedent(
    """
    import sys, yaml
    from detailfusion.params import repo_section
    from detailfusion.tracking import stage_run

    name = sys.argv[1]
    params = yaml.safe_load(open("params.yaml"))
    with stage_run(name, params, "dvcflow", variant="full", config=repo_section("tracking", system_metrics=False)) as run:
        run.log_metrics({"loss": params["lr"] * 10}, step=0)
    open(f"{name}.txt", "w").write(str(run.run_id))
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_stages_in_separate_processes_share_one_parent(tmp_path, mlflow_sqlite_server):
    """``dvc repro`` runs stages as separate processes; they find one parent per invocation. A
    ``dvc exp run --temp`` with the default SQLite store logs to the repository root's store."""
    from mlflow import MlflowClient

    repo = tmp_path / "flow"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    (repo / "params.yaml").write_text("lr: 0.1\n")
    py = sys.executable
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(
            f"""
            stages:
              a:
                cmd: {py} stage.py a
                deps: [stage.py]
                params: [lr]
                outs: [a.txt]
              b:
                cmd: {py} stage.py b
                deps: [a.txt]
                outs: [b.txt]
            """
        )
    )
    (repo / ".gitignore").write_text("mlflow.db\nmlartifacts/\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING_URI"))}
    env.update(DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true",
               GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com", GIT_COMMITTER_NAME="ci",
               GIT_COMMITTER_EMAIL="ci@example.com")  # fmt: skip
    dvc = str(Path(py).with_name("dvc"))

    def run(*cmd: str, **extra: str) -> None:
        res = subprocess.run(cmd, cwd=repo, env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"

    _git(repo, "init", "-q", "-b", "main")
    run(dvc, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    baseline = _git(repo, "rev-parse", "HEAD")

    client = MlflowClient(mlflow_sqlite_server.url)
    served = {"MLFLOW_TRACKING_URI": mlflow_sqlite_server.url}
    run(dvc, "repro", **served)
    first = {s: (repo / f"{s}.txt").read_text() for s in "ab"}
    run(dvc, "repro", "--force", **served)
    second = {s: (repo / f"{s}.txt").read_text() for s in "ab"}

    def parent(run_id: str) -> str:
        return client.get_run(run_id).data.tags["mlflow.parentRunId"]

    assert parent(first["a"]) == parent(first["b"])
    assert parent(second["a"]) == parent(second["b"])
    assert parent(first["a"]) != parent(second["a"])  # one parent per invocation
    stage_tags = client.get_run(first["b"]).data.tags
    assert stage_tags["dvc.stage"] == "b" and stage_tags["git.commit"] == baseline
    pipeline = client.get_run(parent(first["a"]))
    assert pipeline.data.tags["detailfusion.pipeline_key"].startswith("dvc:")
    assert pipeline.info.status == "FINISHED"

    # An experiment in a temp copy, with no MLFLOW_TRACKING_URI: the default SQLite store at the
    # repository root (not in the temp copy, which DVC deletes afterwards).
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "lock")
    baseline = _git(repo, "rev-parse", "HEAD")
    run(dvc, "exp", "run", "--temp", "-n", "warm-fern", "-S", "lr=0.2")
    db = repo / "mlflow.db"
    assert db.is_file(), "the experiment did not log to the repository root's store"
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "select r.name, t.key, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key in ('dvc.exp_name', 'dvc.baseline_rev', 'mlflow.parentRunId', 'detailfusion.run_kind')"
        ).fetchall()
    tags_by_run: dict[str, dict[str, str]] = {}
    for name, key, value in rows:
        tags_by_run.setdefault(name, {})[key] = value
    assert set(tags_by_run) == {"exp-warm-fern", "a", "b"}
    assert tags_by_run["a"]["dvc.exp_name"] == "warm-fern" and tags_by_run["a"]["dvc.baseline_rev"] == baseline
    assert tags_by_run["a"]["mlflow.parentRunId"] == tags_by_run["b"]["mlflow.parentRunId"]
    assert tags_by_run["exp-warm-fern"]["detailfusion.run_kind"] == "pipeline"
    with sqlite3.connect(db) as con:
        (location,) = con.execute("select artifact_location from experiments where name = 'detailfusion-dvcflow'").fetchone()
    assert location == (repo / "mlartifacts").resolve().as_uri()


# --------------------------------------------------------------------------- server down


@pytest.mark.integration
@pytest.mark.slow
def test_server_stopped_mid_stage_training_completes_and_nothing_is_lost(project, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from services import mlflow_server

    dataset = f"down{uuid.uuid4().hex[:6]}"
    record = project / "metrics" / "tracking_offline.json"
    # System metrics on: their sampling thread must not hold up the stage once the server is gone.
    cfg = repo_section("tracking", retries=2, backoff_s=0.05, timeout_s=5, metrics_batch=5, system_metrics_interval_s=0.2,
                         offline_record=str(record))  # fmt: skip
    (project / "metrics").mkdir()
    final = project / "metrics" / "train.json"
    with mlflow_server(tmp_path / "own-server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        losses = []
        with pytest.warns(TrackingOfflineWarning) as caught:
            with stage_run("stage1_detail", {"stage1": {"lr": 0.1}}, dataset, config=cfg) as run:
                for step in range(20):
                    losses.append(1.0 / (step + 1))
                    run.log_metrics({"train/loss": losses[-1]}, step=step)
                    if step == 9:
                        server.stop()  # the tracking server dies mid-training
                final.write_text(json.dumps({"loss": losses[-1]}))
                run.log_metrics_file(final)
                run.log_artifact(final)
        assert len(losses) == 20 and final.is_file()  # training finished and kept its outputs
        warned = [w for w in caught if issubclass(w.category, TrackingOfflineWarning)]
        assert len(warned) == 1
        message = str(warned[0].message)
        assert "stage1_detail" in message and "NOT logged" in message and str(record.resolve()) in message
        assert "11 metric values" in message and "2 artifacts" in message, message

        entry = json.loads(record.read_text())["stages"]["stage1_detail"]
        assert entry["run_id"] == run.run_id and entry["status"] == "FINISHED"
        assert entry["failed_call"] == "log metrics"
        offline_steps = sorted(m["step"] for m in entry["metrics"] if m["key"] == "train/loss")
        assert offline_steps == list(range(10, 20))
        assert {m["key"] for m in entry["metrics"]} == {"train/loss", "loss"}
        assert [a["path"] for a in entry["artifacts"]] == [str(final.resolve())] * 2

        server.start()  # back up: what was sent before the failure is there, the rest is in the record
        client = MlflowClient(server.url)
        online_steps = sorted(m.step for m in client.get_metric_history(run.run_id, "train/loss"))
        assert online_steps == list(range(10))
        assert client.get_run(run.run_id).data.params == {"stage1.lr": "0.1"}

        # The next stage logs fine again and clears only its own entry from the record.
        with stage_run("evaluate", {}, dataset, config=cfg) as ok:
            ok.log_metric("Avg", 1.0)
        assert ok.run_id and set(json.loads(record.read_text())["stages"]) == {"stage1_detail"}

        # Replaying the record completes the run exactly as if the server had never gone away.
        assert replay_offline_record(record, cfg) == {"stage1_detail": run.run_id}
        assert sorted(p.name for p in record.parent.iterdir()) == ["train.json"]  # no record, no lock files
        history = client.get_metric_history(run.run_id, "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(i, 1.0 / (i + 1)) for i in range(20)]
        replayed = client.get_run(run.run_id)
        assert replayed.info.status == "FINISHED" and replayed.data.metrics["loss"] == 0.05
        assert sorted(a.path for a in client.list_artifacts(run.run_id)) == ["metrics", "train.json"]


@pytest.mark.integration
@pytest.mark.slow
def test_server_down_from_the_start(project, monkeypatch, mlflow_sqlite_server):
    from mlflow import MlflowClient
    from services import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    cfg = repo_section("tracking", retries=1, backoff_s=0.01, timeout_s=2, system_metrics=False)
    with pytest.warns(TrackingOfflineWarning, match="the run itself") as caught:
        with stage_run("prepare", {"prepare": {"image_size": 64}}, "cirr", variant="full", config=cfg) as run:
            run.log_metrics({"images": 10.0}, step=0)
            run.log_dataset(_manifest(), name="synthetic-cirr", source="q.parquet")
    assert len([w for w in caught if issubclass(w.category, TrackingOfflineWarning)]) == 1
    entry = json.loads((project / cfg.offline_record).read_text())["stages"]["prepare"]
    assert entry["run_id"] is None and entry["params"] == {"prepare.image_size": "64"}
    assert entry["tags"]["ablation"] == "full" and entry["tags"]["detailfusion.stage"] == "prepare"
    assert entry["metrics"][0]["key"] == "images" and entry["datasets"][0]["name"] == "synthetic-cirr"
    assert entry["failed_call"] == "get/create experiment detailfusion-cirr"

    # Once a server is reachable, replay creates the run the stage never got.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    (run_id,) = replay_offline_record(project / cfg.offline_record, cfg).values()
    replayed = MlflowClient(mlflow_sqlite_server.url).get_run(run_id)
    assert replayed.info.run_name == "prepare" and replayed.info.status == "FINISHED"
    assert replayed.data.params == {"prepare.image_size": "64"} and replayed.data.metrics == {"images": 10.0}
    assert replayed.data.tags["ablation"] == "full" and replayed.data.tags["detailfusion.replayed"] == "true"
    (ds_input,) = replayed.inputs.dataset_inputs
    assert (ds_input.dataset.name, ds_input.dataset.digest) == ("synthetic-cirr", frame_digest(_manifest()))


def test_metrics_file_errors_name_the_file(project):
    cfg = repo_section("tracking", enabled=False)
    bad = project / "bad.json"
    bad.write_text("{not json")
    with stage_run("evaluate", {}, "cirr", config=cfg) as run:
        with pytest.raises(DataFormatError, match="bad.json: not valid JSON"):
            run.log_metrics_file(bad)
        with pytest.raises(DataFormatError, match="missing.json: metrics file not found"):
            run.log_metrics_file(project / "missing.json")


@pytest.mark.integration
def test_a_service_that_does_not_start_fails_with_its_log(tmp_path):
    from services import ServiceError, mlflow_server

    with pytest.raises(ServiceError) as info:
        with mlflow_server(tmp_path, backend="bogus-scheme://nowhere", timeout_s=60):
            pass
    message = str(info.value)
    assert "exited with code" in message and "bogus-scheme" in message and "--- last lines of" in message


def test_experiment_opens_as_machine_learning_and_the_parent_carries_headline_and_data(
        project, mlflow_sqlite_server, monkeypatch):
    """MLflow's UI shows training runs first (experiment kind), leads with the registry's gating
    metric, and lists the headline metrics and data set on the pipeline (parent) run itself."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    dataset = f"ui{uuid.uuid4().hex[:8]}"
    with stage_run("evaluate", {"evaluate": {"split": "val"}}, dataset, config=repo_section("tracking", system_metrics=False),
                   primary_metric=("Rsub@1", True)) as run:  # fmt: skip
        run.log_parent_metrics({"R@1": 20.5, "Avg": 48.0})
        run.log_dataset(_manifest(), name="synthetic-cirr", source="data/prepared/cirr/queries.parquet",
                        context="evaluation", on_parent=True)
        parent_id = run.parent_run_id
    client = MlflowClient(mlflow_sqlite_server.url)
    exp = client.get_experiment_by_name(f"detailfusion-{dataset}")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.tags["mlflow.experiment.primaryMetric.name"] == "Rsub_at_1"
    assert exp.tags["mlflow.experiment.primaryMetric.greaterIsBetter"] == "true"
    parent = client.get_run(parent_id)
    assert parent.data.metrics == {"R_at_1": 20.5, "Avg": 48.0}
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["synthetic-cirr"]
