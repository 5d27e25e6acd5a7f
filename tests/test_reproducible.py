"""Reproducible outputs: what DVC hashes is a pure function of code, params and data.

* safetensors weights: same tensors, same bytes (the metadata keys used to come out in a random
  order on every save);
* the validate stage's report folder: same data, same bytes (GX drew its run time, load time,
  logo cache buster and block ids from the clock and uuid4);
* stage timings live in ``reports/timings/<stage>.json`` (not hashed) and MLflow, not in outputs;
* end to end (slow): two copies of the repository in different folders run ``dvc repro`` on the
  shrunk params and their ``dvc.lock`` files give every stage output the same hash.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import shrink_params
from repo_copy import make_repo_copy, run
from test_validate import BUILDERS, prepared_images, write_prepared

from detailfusion import timings
from detailfusion.data.validate import ValidateConfig, run_validate
from detailfusion.errors import ValidationFailed
from detailfusion.models import create_model, get_model_config
from detailfusion.models.io import load_pretrained, read_state_dict, save_pretrained, write_safetensors


def _tree(folder: Path) -> dict[str, str]:
    """``{relative path: md5}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- (a) safetensors


def test_saved_weights_are_byte_identical_across_saves(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(get_model_config("tiny"), variant="full", load_backbone_weights=False)
    # safetensors' random metadata order shows up within one process too: 8 saves all agreeing
    # by chance would happen once in 128 runs without the canonical header
    digests = {hashlib.md5((save_pretrained(model, tmp_path / f"m{i}") / "model.safetensors").read_bytes())
               .hexdigest() for i in range(8)}
    assert len(digests) == 1
    loaded = load_pretrained(tmp_path / "m0")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_safetensors_header_sorts_metadata_and_still_loads(tmp_path: Path) -> None:
    tensors = {"b": torch.arange(5.0), "a": torch.ones(3, dtype=torch.int64)}
    metadata = {key: key * 3 for key in "qwertyuiop"}  # 10! orders
    files = [write_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata) for i in range(4)]
    assert len({f.read_bytes() for f in files}) == 1
    size = int.from_bytes(files[0].read_bytes()[:8], "little")
    header = json.loads(files[0].read_bytes()[8 : 8 + size])
    assert list(header["__metadata__"]) == sorted(metadata)
    state = read_state_dict(files[0])
    assert torch.equal(state["a"], tensors["a"]) and torch.equal(state["b"], tensors["b"])


# --------------------------------------------------------------------------- (b) validate report


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    for name, build in BUILDERS.items():
        queries, images = build()
        write_prepared(root, name, queries, prepared_images(images))
    return root


@pytest.mark.parametrize("passing", [True, False], ids=["passing", "failing"])
def test_validation_report_folder_is_byte_identical(tmp_path: Path, prepared: Path, passing: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ValidateConfig() if passing else ValidateConfig(max_caption_words=1)  # every caption too long
    trees = []
    for run_dir in (tmp_path / "one", tmp_path / "second" / "run"):  # two checkouts, as DVC runs it
        run_dir.mkdir(parents=True)
        monkeypatch.chdir(run_dir)
        try:
            run_validate(cfg, prepared, Path("reports/validation"))
        except ValidationFailed:
            assert not passing
        else:
            assert passing
        trees.append(_tree(run_dir / "reports" / "validation"))
    assert trees[0] == trees[1]
    pages = [p for p in trees[0] if p.endswith(".html")]
    assert "data_docs/index.html" in pages and any(p.startswith("data_docs/validations/") for p in pages)
    assert all("19700101T000000" in p for p in pages if p.startswith("data_docs/validations/"))


# --------------------------------------------------------------------------- register


def test_register_output_drops_mlflow_ids_and_times_only() -> None:
    from detailfusion.registry.cli import stable_summary

    summary = {"model_name": "m", "version": 3, "model_uri": "models:/m-1", "run_id": "r",
               "parent_run_id": "p",
               "promotion": {"decision": "promoted", "challenger_value": 1.5, "decided_at": "2026-01-01"}}
    assert stable_summary(summary) == {"model_name": "m", "version": 3,
                                       "promotion": {"decision": "promoted", "challenger_value": 1.5}}


# --------------------------------------------------------------------------- timings


def test_stage_timer_phases_do_not_overlap_and_file_lands_beside_params(tmp_path: Path) -> None:
    class Args:
        command, stage, params = "train", "stage2_branches", str(tmp_path / "params.yaml")

    with timings.stage_timer(Args()) as timer:
        assert timings.current() is timer
        with timings.phase("train"):
            with timings.phase("validate"):
                pass
            with timings.phase("validate"):
                pass
        summary = timings.split_run_facts({"steps": 4, "seconds": 1.5, "samples_per_s": 9.0})
    assert timings.current() is None
    assert summary == {"steps": 4}
    result = json.loads((tmp_path / "reports" / "timings" / "stage2_branches.json").read_text())
    assert result["status"] == "ok" and result["stage"] == "stage2_branches"
    assert {"imports", "train", "validate"} <= set(result["phases"])
    assert result["info"] == {"train_seconds": 1.5, "train_samples_per_s": 9.0}
    assert sum(result["phases"].values()) <= result["body_s"] + 1e-3
    assert result["wall_s"] == pytest.approx(result["startup_s"] + result["body_s"], abs=2e-3)
    assert result["startup_s"] > 0  # this interpreter started before the timer
    # outside a stage command the helpers do nothing
    with timings.phase("anything"):
        timings.note(x=1)


# --------------------------------------------------------------------------- end to end


def _out_hashes(lock: Path, key: str = "outs") -> dict[str, dict[str, str]]:
    stages = yaml.safe_load(lock.read_text())["stages"]
    return {name: {o["path"]: o["md5"] for o in stage.get(key, [])} for name, stage in stages.items()}


@pytest.mark.slow
def test_two_copies_in_different_folders_lock_identical_output_hashes(tmp_path: Path,
                                                                      real_params: dict) -> None:
    roots = [tmp_path / "a" / "repo", tmp_path / "elsewhere" / "copy-b"]
    envs = [make_repo_copy(root, shrink_params(real_params, root, relative=True)) for root in roots]
    # byte code is no stage's code: a stray __pycache__ in one copy changes no hash (.dvcignore)
    stray = roots[1] / "detailfusion" / "models" / "__pycache__"
    stray.mkdir(exist_ok=True)
    (stray / "stray.cpython-311.pyc").write_bytes(b"\0" * 16)
    # both at once: the machine's two cores, and clocks that certainly differ
    procs = [subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for root, env in zip(roots, envs, strict=True)]
    for proc in procs:
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-5000:]

    hashes = [_out_hashes(root / "dvc.lock") for root in roots]
    assert hashes[0] == hashes[1]
    deps = [_out_hashes(root / "dvc.lock", "deps") for root in roots]
    assert deps[0] == deps[1]
    stages = set(yaml.safe_load((roots[0] / "dvc.yaml").read_text())["stages"])
    assert set(hashes[0]) == stages and all(hashes[0].values())

    root = roots[0]
    # wall-clock figures are not in what DVC hashes, they are in reports/timings (not an output)
    for n in (1, 2, 3):
        metrics = json.loads((root / "metrics" / f"stage{n}.json").read_text())
        assert "seconds" not in metrics and "samples_per_s" not in metrics
    outs = {path for stage in hashes[0].values() for path in stage}
    assert not any(path.startswith("reports/timings") for path in outs)
    for stage in stages:
        timing = json.loads((root / "reports" / "timings" / f"{stage}.json").read_text())
        assert timing["status"] == "ok" and timing["wall_s"] > 0 and timing["startup_s"] > 0
    stage2 = json.loads((root / "reports" / "timings" / "stage2_branches.json").read_text())
    assert stage2["phases"]["train"] > 0 and stage2["info"]["train_samples_per_s"] > 0
    assert "reports/timings" in run(["git", "status", "--short", "--ignored"], root, envs[0]).stdout
    # ... and in each stage's MLflow run
    with sqlite3.connect(root / "mlflow.db") as db:
        rows = db.execute("SELECT DISTINCT key FROM latest_metrics WHERE key LIKE 'time/%'")
        keys = {k for (k,) in rows}
    assert {"time/wall_s", "time/startup_s", "time/train_s", "time/tracking_start_s"} <= keys
