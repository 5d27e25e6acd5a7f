"""Shared fixtures: the REAL params.yaml, shrunk (tiny data, a few steps, CPU) with every output
under a temporary folder, so tests exercise what users run rather than a test-only config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_ANNOTATIONS = REPO_ROOT.parent / "shared" / "real-annotations"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def shrink_params(params: dict, root: Path, relative: bool = False) -> dict:
    """The real params with tiny sizes and every path under ``root``.

    With ``relative`` the paths stay as in params.yaml (relative to a repo copy at ``root``),
    as ``dvc.yaml`` names them literally.
    """
    p = yaml.safe_load(yaml.safe_dump(params))
    if "tracking" in p:
        p["tracking"].update(tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                             artifact_location=str(root / "mlartifacts"),
                             offline_record=str(root / "metrics" / "tracking_offline.json"),
                             system_metrics=False)
    s = p["synthesize"]
    # 4 queries per set and few shared images keep the val/test1 galleries above the 51 images a
    # CIRR submission needs (50 names besides the reference).
    s["cirr"].update(train_queries=160, val_queries=48, test1_queries=40, queries_per_set=4, shared_fraction=0.1)
    s["fashioniq"].update(train_per_category=24, val_per_category=12, test_per_category=6)
    s["ipr2pr"].update(originals=24, edits_per_original=3, shards=2)
    for stage, steps in (("stage1_detail", 3), ("stage2_branches", 4), ("stage3_fusion", 3)):
        loop = p[stage]["loop"]
        loop.update(max_steps=steps, batch_size=16, warmup_steps=1, checkpoint_every=2, log_every=1)
    p["stage3_fusion"]["cache_queries"] = 64
    p["pretrain_backbone"].update(scenes=200, garments=80, heldout=40)
    p["pretrain_backbone"]["loop"].update(max_steps=3, batch_size=16, warmup_steps=1, checkpoint_every=2,
                                          log_every=1)
    p["evaluate"].update(bootstrap=50, report_samples=3)
    if not relative:
        # Stages called directly (not through dvc repro) start from a random backbone; the pipeline
        # tests (relative paths) run the pretrain_backbone stage and use its checkpoint.
        p["model"]["pretrained"] = None
        p["pretrain_backbone"]["out"] = str(root / "models" / "backbone")
        p["data"]["root"] = str(root / "data" / "synthetic")
        p["prepare"]["out"] = str(root / "data" / "prepared")
        p["validate"].update(prepared=str(root / "data" / "prepared"), report_dir=str(root / "reports" / "validation"))
        p["evaluate"].update(
            out_metrics=str(root / "metrics" / "eval.json"),
            out_plots=str(root / "plots"),
            out_reports=str(root / "reports"),
        )
    return p


def merge_params(into: dict, new: dict) -> dict:
    """Merge ``new`` into ``into`` key by key (nested mappings merge, other values replace)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_params(into[key], value)
        else:
            into[key] = value
    return into


def params_file(path: Path, sections: dict | str | None = None) -> Path:
    """Write the real params.yaml to ``path`` with ``sections`` (a mapping or YAML text) merged in.

    Every command checks the whole file, so a test that changes a few keys starts from the real
    one. Tracking is off unless ``sections`` sets a ``tracking`` key."""
    new = (yaml.safe_load(sections) if isinstance(sections, str) else sections) or {}
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    if "tracking" not in new:
        params["tracking"]["enabled"] = False
    path.write_text(yaml.safe_dump(merge_params(params, new), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def real_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


@pytest.fixture
def shrunk_params(tmp_path: Path, real_params: dict) -> Path:
    """A shrunk copy of params.yaml in ``tmp_path``; returns its path."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shrink_params(real_params, tmp_path), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, real_params) -> dict:
    """Synthetic data generated and prepared once per session with the shrunk params."""
    from detailfusion.config import load_section
    from detailfusion.data.prepare import PrepareConfig, run_prepare
    from detailfusion.data.synthetic import SynthConfig, generate

    root = tmp_path_factory.mktemp("world")
    params = shrink_params(real_params, root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(load_section(SynthConfig, params, "synthesize"), Path(params["data"]["root"]), progress=False)
    prep = load_section(PrepareConfig, params, "prepare")
    run_prepare(prep, Path(params["data"]["root"]), Path(params["prepare"]["out"]), progress=False)
    return {"root": root, "params": params, "params_path": root / "params.yaml"}


@pytest.fixture
def world_copy(tiny_world, tmp_path) -> dict:
    """A private copy of the prepared tiny world (tests that write models/metrics)."""
    root = tmp_path / "world"
    shutil.copytree(tiny_world["root"], root)
    params = shrink_params(tiny_world["params"], root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return {"root": root, "params": params, "params_path": root / "params.yaml"}


# The longest files first (measured serial durations, longest first), the rest in their usual
# order: with `pytest -n 2 --dist loadfile` (make test) a worker takes the end-to-end flows file
# at once while the other one works through the rest, instead of it starting last. Order within a
# file is kept (module fixtures).
LONGEST_FIRST = ("test_flows_e2e.py", "test_pipeline.py", "test_ablations.py", "test_train.py",
                 "test_retrieval_ray.py", "test_tracking.py", "test_pyfunc.py", "test_registry.py",
                 "test_infra.py", "test_retrieval_services.py", "test_retrieval_job.py", "test_server_down.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
