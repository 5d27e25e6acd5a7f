"""The real entry point end to end: ``dvc repro`` of the committed dvc.yaml on a shrunk
params.yaml, in a fresh git + DVC copy of the repository, offline, with a local MLflow store."""

from __future__ import annotations

import json
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


@pytest.mark.slow
def test_dvc_repro_end_to_end_then_gated_promotion(repo):
    root, env = repo
    _run(["dvc", "repro"], root, env)

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
    # ranks the val queries exactly as the evaluate stage's submission file says
    got = _champion_rankings(root, env)
    assert got["training_modules_loaded"] == []
    written = json.loads((root / "reports" / "submission" / "recall_submission_val.json").read_text())
    assert got["rankings"] == written

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

root = Path(sys.argv[1])
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
for q, s in zip(queries, sims):
    order = np.argsort(-s, kind="stable")
    out[str(q["pairid"])] = [names[j] for j in order if names[j] != q["reference"]][:50]
loaded = [m for m in sys.modules if m.startswith("detailfusion.") and m.split(".")[1] in ("train", "eval")]
print(json.dumps({"rankings": out, "training_modules_loaded": loaded}))
'''


def _champion_rankings(root: Path, env: dict) -> dict:
    done = _run([sys.executable, "-c", CHAMPION_RANKING, str(root)], root, env)
    return json.loads(done.stdout.strip().splitlines()[-1])
