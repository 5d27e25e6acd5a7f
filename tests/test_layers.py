"""The layering of docs/architecture.md holds: no import runs against it (e.g. eval importing train)."""

from __future__ import annotations

from pathlib import Path

import layers

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_runs_against_the_layers():
    assert layers.violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "detailfusion" / "eval"
    pkg.mkdir(parents=True)
    (tmp_path / "flows").mkdir()
    (pkg / "bad.py").write_text("from detailfusion.train.stages import run_stage1\n")
    (tmp_path / "detailfusion" / "retrieval").mkdir()
    (tmp_path / "detailfusion" / "retrieval" / "embed.py").write_text("import detailfusion.registry\n")
    found = layers.violations(tmp_path)
    assert any("eval -> train" in v for v in found) and any("retrieval.core -> registry" in v for v in found)


def test_the_stage_names_are_those_of_dvc_yaml_in_order():
    import yaml

    from detailfusion.pipeline import DATA_STAGES, METHOD_STAGES, STAGES, TRAIN_STAGES

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert tuple(dvc["stages"]) == STAGES
    assert set(DATA_STAGES) | set(TRAIN_STAGES) | set(METHOD_STAGES) <= set(STAGES)


def test_only_rank_0_is_the_main_process(monkeypatch):
    from detailfusion.pipeline import is_main_process, local_rank

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert is_main_process() and local_rank() == 0
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_main_process() and local_rank() == 1
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


def test_every_top_level_module_has_a_row_in_the_table_and_the_doc():
    """A new package or top-level module gets its place in the layering (``ALLOWED`` and the table of
    docs/architecture.md) before it is used, instead of slipping past the check."""
    pkg = ROOT / "detailfusion"
    names = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert names - set(layers.ALLOWED) == set()
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert {n for n in names if f"`{n}`" not in doc} == set()
