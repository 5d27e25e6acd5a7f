"""Every command that talks to the tracking server, against a server that is down (a loopback
port nothing listens on, MLflow's retries set low through params.yaml): commands that need the
server end with one ``error:`` line naming its URI and the problem and exit non-zero; a training
stage finishes, keeps what it could not log in the offline record and says so in one
``warning:`` line. (``registry list|promote|rollback``: tests/test_registry.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import params_file

from detailfusion.cli import main

REPO = Path(__file__).resolve().parents[1]
DOWN = "http://127.0.0.1:9"  # the discard port: nothing answers on loopback
LOW_RETRIES = {"retries": 0, "backoff_s": 0.0, "timeout_s": 2}


def _error_line(err: str) -> str:
    """The one ``error:`` line (MLflow may log its own lines around it); never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    for var in ("DVC_ROOT", "DVC_EXP_NAME", "DETAILFUSION_PIPELINE_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    return DOWN


def test_tracking_replay_names_the_server_and_keeps_the_record(down, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = params_file(tmp_path / "params.yaml", {"tracking": LOW_RETRIES})
    record = tmp_path / "metrics" / "tracking_offline.json"
    record.parent.mkdir()
    entry = {"stage": "prepare", "tracking_uri": down, "experiment": "detailfusion-cirr", "run_id": None,
             "params": {"prepare.image_size": "64"}, "metrics": [], "artifacts": [], "datasets": [], "tags": {},
             "status": "FINISHED"}  # fmt: skip
    record.write_text(json.dumps({"stages": {"prepare": entry}}))
    before = record.read_text()

    assert main(["--params", str(params), "tracking", "replay", "--record", str(record)]) == 2
    line = _error_line(capsys.readouterr().err)
    assert down in line and "unreachable" in line and "Error" in line, line
    assert record.read_text() == before  # nothing replayed, nothing lost


def test_retrieve_of_the_champion_names_the_server(down, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = params_file(tmp_path / "params.yaml", {"tracking": LOW_RETRIES, "registry": LOW_RETRIES})
    (tmp_path / "gallery").mkdir()
    (tmp_path / "q.jsonl").write_text(json.dumps({"reference": "a", "caption": "make it red"}) + "\n")
    args = ["--params", str(params), "-q", "retrieve", "--gallery", "gallery", "--queries", "q.jsonl", "--out", "out"]
    assert main(args) == 2  # default model: models:/detailfusion-cirr@champion, resolved on the server
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: tracking server {down}: unreachable"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ablations_stop_before_running_anything(down, tmp_path, monkeypatch, capsys):
    """The experiments run in temporary copies where offline records would be lost with the copy:
    a server that is down at the start stops the suite with one line, before any experiment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tracking"].update(LOW_RETRIES)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
           "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com", "DVC_NO_ANALYTICS": "1"}  # fmt: skip
    dvc = str(Path(sys.executable).with_name("dvc"))
    for cmd in (["git", "init", "-q", "-b", "main"], [dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "init"]):  # fmt: skip
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

    assert main(["ablations", "--variants", "full", "--seeds", "0"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: tracking server {down}: unreachable"), line
    assert not (repo / "reports" / "ablation_logs").exists() and not (repo / "metrics" / "ablations.json").exists()


@pytest.mark.slow
def test_training_stage_finishes_offline_with_one_warning_line(world_copy, down):
    root = world_copy["root"]
    params = world_copy["params"]
    params["tracking"].update(LOW_RETRIES)
    world_copy["params_path"].write_text(yaml.safe_dump(params, sort_keys=False))
    models, metrics = root / "models", root / "metrics"
    cmd = [sys.executable, "-m", "detailfusion.cli", "--params", str(world_copy["params_path"]), "--quiet",
           "train", "stage1_detail", "--models-dir", str(models), "--metrics-dir", str(metrics)]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLFLOW_TRACKING_URI": down})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    warned = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1, done.stderr
    assert warned[0].startswith(f"warning: MLflow tracking at {down} was unreachable during stage 'stage1_detail'")
    assert "NOT logged" in warned[0] and "the run itself" in warned[0]
    assert (metrics / "stage1.json").is_file()  # the stage's own outputs are all there
    record = json.loads((root / "metrics" / "tracking_offline.json").read_text())
    entry = record["stages"]["stage1_detail"]
    assert entry["run_id"] is None and entry["tracking_uri"] == down
    assert any(m["key"].startswith("stage1/") for m in entry["metrics"])
