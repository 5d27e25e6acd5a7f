"""Reproducible outputs: what DVC hashes is a pure function of code, params and data.

* safetensors weights: same tensors, same bytes (the metadata keys used to come out in a random
  order on every save);
* the validate stage's report folder: same data, same bytes (GX drew its run time, load time,
  logo cache buster and block ids from the clock and uuid4);
* stage timings live in ``reports/timings/<stage>.json`` (not hashed) and MLflow, not in outputs;
* end to end: ``tests/test_pipeline.py`` runs ``dvc repro`` on the shrunk params in two copies of
  the repository in different folders at once and compares every out and dep hash of their
  ``dvc.lock`` files (one run serves both tests).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from test_validate import BUILDERS, prepared_images, write_prepared

from detailfusion import timings
from detailfusion.data.validate import run_validate
from detailfusion.errors import ValidationFailed
from detailfusion.models import create_model, get_model_config
from detailfusion.models.io import load_pretrained, read_state_dict, save_pretrained, write_safetensors
from detailfusion.params import repo_section


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
    cfg = repo_section("validate") if passing else repo_section("validate", max_caption_words=1)  # every caption too long
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
