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
