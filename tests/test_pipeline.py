"""The real entry point end to end: ``dvc repro`` of the committed dvc.yaml on a shrunk
params.yaml, in a fresh git + DVC copy of the repository, offline, with a local MLflow store."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import shrink_params
from repo_copy import make_repo_copy
from repo_copy import run as _run


@pytest.fixture
def repo(tmp_path: Path, real_params: dict):
    root = tmp_path / "repo"
    env = make_repo_copy(root, shrink_params(real_params, root, relative=True))
    return root, env


def _lock_hashes(lock: Path, key: str) -> dict[str, dict[str, str]]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in stage.get(key, [])} for name, stage in stages.items()}


def _repro_in_two_copies(root: Path, env: dict, other: Path, real_params: dict) -> None:
    """``dvc repro`` in ``root`` and, at the same time, in a second copy in another folder (with a
    stray ``__pycache__``): every stage's out and dep hashes in the two ``dvc.lock`` are identical,
    and no hashed output holds a clock reading (those are in ``reports/timings``)."""
    other_env = make_repo_copy(other, shrink_params(real_params, other, relative=True))
    stray = other / "detailfusion" / "models" / "__pycache__"  # byte code is no stage's code (.dvcignore)
    stray.mkdir(exist_ok=True)
    (stray / "stray.cpython-311.pyc").write_bytes(b"\0" * 16)
    procs = [subprocess.Popen(["dvc", "repro"], cwd=r, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r, e in ((root, env), (other, other_env))]
    for proc in procs:
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-5000:]
    for key in ("outs", "deps"):
        assert _lock_hashes(root / "dvc.lock", key) == _lock_hashes(other / "dvc.lock", key), key
    stages = set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    outs = _lock_hashes(root / "dvc.lock", "outs")
    assert set(outs) == stages and all(outs.values())
    for n in (1, 2, 3):
        metrics = json.loads((root / "metrics" / f"stage{n}.json").read_text())
        assert "seconds" not in metrics and "samples_per_s" not in metrics
    assert not any(path.startswith("reports/timings") for stage in outs.values() for path in stage)
    for stage in stages:
        timing = json.loads((root / "reports" / "timings" / f"{stage}.json").read_text())
        assert timing["status"] == "ok" and timing["wall_s"] > 0 and timing["startup_s"] > 0
    stage2 = json.loads((root / "reports" / "timings" / "stage2_branches.json").read_text())
    assert stage2["phases"]["train"] > 0 and stage2["info"]["train_samples_per_s"] > 0
    assert "reports/timings" in _run(["git", "status", "--short", "--ignored"], root, env).stdout
    with sqlite3.connect(root / "mlflow.db") as db:  # ... and in each stage's MLflow run
        keys = {k for (k,) in db.execute("SELECT DISTINCT key FROM latest_metrics WHERE key LIKE 'time/%'")}
    assert {"time/wall_s", "time/startup_s", "time/train_s", "time/tracking_start_s"} <= keys


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_gated_promotion(repo, tmp_path: Path, real_params: dict):
    root, env = repo
    # two fresh copies in different folders at once: identical dvc.lock hashes (reproducible outputs)
    _repro_in_two_copies(root, env, tmp_path / "elsewhere" / "copy-b", real_params)

    # data stages
    assert (root / "data" / "prepared" / "cirr" / "queries.parquet").is_file()
    assert json.loads((root / "reports" / "validation" / "report.json").read_text())["success"] is True
    # training + evaluation
    for n in (1, 2, 3):
        assert (root / "models" / f"stage{n}" / "model" / "model.safetensors").is_file()
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())["cirr"]
    assert set(evaluation["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg"}
    assert evaluation["submission"]["agrees"] is True
    assert {"reference_only", "text_only", "pixel_reference"} <= set(evaluation["baselines"])
    assert (root / "reports" / "retrieval" / "index.html").is_file()
    # a fresh clone's repro leaves nothing for DVC to report
    status = _run(["dvc", "status"], root, env).stdout
    assert "up to date" in status, status
    # the DVC views people use: a readable metrics table, one plotted line per series
    table = _run(["dvc", "metrics", "show"], root, env).stdout
    assert max(len(line) for line in table.splitlines()) <= 160, table
    assert "R@1" in table and "Rsub@1" in table and "metrics/headline.json" in table
    plots = json.loads(_run(["dvc", "plots", "show", "--json", "--split"], root, env).stdout)["data"]
    (curve,) = plots["Recall@K on the validation split"]
    dashes = curve["anchor_definitions"]["<DVC_METRIC_STROKE_DASH>"]["scale"]["domain"]
    assert sorted(dashes) == sorted(["model", "gm", "di", "reference_only", "text_only", "pixel_reference"])
    (bars,) = plots["Rsub@1 by edit type"]
    assert len({row["edit_type"] for row in bars["anchor_definitions"]["<DVC_METRIC_DATA>"]}) >= 2

    # registry: version 1 is the champion
    listing = _run(["detailfusion", "registry", "list", "--json"], root, env).stdout
    versions = json.loads(listing)
    assert [v["version"] for v in versions] == ["1"] or [str(v["version"]) for v in versions] == ["1"]
    assert "champion" in versions[0]["aliases"]

    # the champion, loaded from the registry in a fresh process without the training/eval code,
    # ranks the val queries as the evaluate stage's submission file says: the same lists, except
    # that two images whose scores agree to 1e-5 (sets share images; the pyfunc embeds in other
    # batches) may come in either order -- rank by rank the champion's scores must agree
    got = _champion_rankings(root, env)
    assert got["training_modules_loaded"] == []
    written = json.loads((root / "reports" / "submission" / "recall_submission_val.json").read_text())
    assert set(got["rankings"]) == set(written)
    assert got["tie_swapped_queries"] <= len(written) // 4
    assert got["mismatches"] == [], got["mismatches"]

    # a second model that does not beat the champion by the margin leaves the champion in place
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["registry"]["min_margin"] = 1000.0
    params["stage3_fusion"]["loop"]["max_steps"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["dvc", "repro"], root, env)
    summary = json.loads((root / "reports" / "registry" / "summary.json").read_text())
    text = json.dumps(summary)
    assert "champion" in text and "margin" in text.lower(), text
    versions = {str(v["version"]): v for v in json.loads(_run(["detailfusion", "registry", "list", "--json"], root,
                                                                env).stdout)}
    assert set(versions) == {"1", "2"}
    assert "champion" in versions["1"]["aliases"] and "champion" not in versions["2"]["aliases"]


CHAMPION_RANKING = r'''
import json, sys
from pathlib import Path
import numpy as np, pandas as pd, mlflow

root, written = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
model = mlflow.pyfunc.load_model("models:/detailfusion-cirr@champion")
cirr = root / "data" / "synthetic" / "cirr"
split = json.loads((cirr / "image_splits" / "split.rc2.val.json").read_text())
queries = json.loads((cirr / "captions" / "cap.rc2.val.json").read_text())
names = list(split)
gallery = model.predict(pd.DataFrame({"task": "gallery", "image": [split[n] for n in names]}),
                        params={"image_root": str(cirr)})
emb = model.predict(pd.DataFrame({"task": "query", "image": [split[q["reference"]] for q in queries],
                                  "text": [q["caption"] for q in queries]}), params={"image_root": str(cirr)})
out = {"version": "rc2", "metric": "recall"}
sims = emb @ gallery.T
mismatches, swapped = [], 0
for q, s in zip(queries, sims):
    order = np.argsort(-s, kind="stable")
    pid = str(q["pairid"])
    out[pid] = [names[j] for j in order if names[j] != q["reference"]][:50]
    theirs = written.get(pid, [])
    if out[pid] != theirs:
        swapped += 1
        score = dict(zip(names, s.tolist()))
        if len(theirs) != len(out[pid]) or any(n not in score for n in theirs) or any(
                abs(score[a] - score[b]) > 1e-5 for a, b in zip(out[pid], theirs)):
            mismatches.append(pid)
loaded = [m for m in sys.modules if m.startswith("detailfusion.") and m.split(".")[1] in ("train", "eval")]
print(json.dumps({"rankings": out, "training_modules_loaded": loaded, "mismatches": mismatches,
                  "tie_swapped_queries": swapped}))
'''


def _champion_rankings(root: Path, env: dict) -> dict:
    written = root / "reports" / "submission" / "recall_submission_val.json"
    done = _run([sys.executable, "-c", CHAMPION_RANKING, str(root), str(written)], root, env)
    return json.loads(done.stdout.strip().splitlines()[-1])
