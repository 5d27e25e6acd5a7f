"""The evaluate stage's held-out split: scored on synthetic test1 (targets from the sidecar), skipped on real data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from native_fixtures import write_cirr

from detailfusion.data.prepare import run_prepare
from detailfusion.data.prepared import load_prepared
from detailfusion.eval.evaluate import HELDOUT_HEADLINE, EvaluateConfig, run_evaluate
from detailfusion.models import create_model, save_pretrained
from detailfusion.params import repo_section


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)  # an untrained tiny model: the protocol, not the numbers, is under test
    return save_pretrained(create_model("tiny", "full"), tmp_path_factory.mktemp("model") / "model")


def _config(root: Path) -> EvaluateConfig:
    return repo_section("evaluate", bootstrap=20, report_samples=2, out_metrics=str(root / "metrics" / "eval.json"),
                          out_plots=str(root / "plots"), out_reports=str(root / "reports"))


def test_heldout_metrics_on_synthetic_test1(tiny_world, model_dir, tmp_path):
    prepared = Path(tiny_world["params"]["prepare"]["out"])
    # prepare carried the sidecar's targets into the test1 manifest
    sidecar = json.loads((Path(tiny_world["params"]["data"]["root"]) / "cirr" / "synthetic_targets.json").read_text())
    test1 = load_prepared(prepared, "cirr").split_queries("test1")
    assert dict(zip(test1["query_id"], test1["target"], strict=True)) == sidecar["test1"]
    summary = run_evaluate(_config(tmp_path), model_dir, prepared, "cirr", progress=False)
    heldout = summary["heldout"]
    n_test1 = tiny_world["params"]["synthesize"]["cirr"]["test1_queries"]
    assert heldout["split"] == "test1" and heldout["n_queries"] == n_test1
    assert set(heldout["metrics"]) == set(summary["metrics"])
    assert set(heldout["baselines"]) == {"reference_only", "text_only", "pixel_reference"}
    assert all(0.0 <= v <= 100.0 for v in heldout["metrics"].values())
    assert heldout["metrics"] != summary["metrics"]  # another split, other queries

    written = json.loads((tmp_path / "metrics" / "eval.json").read_text())["cirr"]
    assert written["heldout"] == heldout and written["split"] == "val"
    headline = json.loads((tmp_path / "metrics" / "headline.json").read_text())
    assert headline == {**summary["metrics"], **{f"heldout/{k}": heldout["metrics"][k] for k in HELDOUT_HEADLINE}}

    # Evaluating test1 itself leaves nothing held out.
    cfg = _config(tmp_path / "t1")
    cfg.split = "test1"
    summary = run_evaluate(cfg, model_dir, prepared, "cirr", progress=False)
    assert "heldout" not in summary and summary["n_queries"] == n_test1


def test_no_heldout_part_on_real_format_data(model_dir, tmp_path):
    root = tmp_path / "raw"
    # real-format files: test1 without targets and no targets sidecar; 60 images per gallery, so the
    # submission files (50 names per query) can be written
    write_cirr(root / "cirr", sets_per_split=10)
    run_prepare(repo_section("prepare", out=tmp_path / "prepared", datasets=["cirr"]), root, tmp_path / "prepared",
                progress=False)
    summary = run_evaluate(_config(tmp_path), model_dir, tmp_path / "prepared", "cirr", progress=False)
    assert "heldout" not in summary
    assert "heldout" not in json.loads((tmp_path / "metrics" / "eval.json").read_text())["cirr"]
    headline = json.loads((tmp_path / "metrics" / "headline.json").read_text())
    assert headline == summary["metrics"] and not any(k.startswith("heldout/") for k in headline)
