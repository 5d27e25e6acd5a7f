"""The shared file helpers: the JSON-object reader and a training stage's output writer."""

from __future__ import annotations

import json

import pytest

from detailfusion.errors import ConfigError, DataFormatError
from detailfusion.fsutil import read_json_object, write_stage_outputs


def test_read_json_object_returns_the_object(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text('{"a": 1, "b": [2]}', encoding="utf-8")
    assert read_json_object(path) == {"a": 1, "b": [2]}


@pytest.mark.parametrize(("content", "problem"), [
    (None, "thing not found"),
    ("{oops", "not valid JSON: Expecting property name"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "top level must be an object, got list"),
])  # fmt: skip
def test_read_json_object_names_the_file_and_the_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        read_json_object(path, missing="thing not found")
    assert err.value.path == path and str(err.value).startswith(f"{path}: {problem}")
    with pytest.raises(ConfigError, match=f"^{path}: {problem}"):
        read_json_object(path, missing="thing not found", error=ConfigError)


def test_write_stage_outputs_swaps_the_folder_in_whole(tmp_path):
    out, metrics = tmp_path / "models" / "stage1", tmp_path / "metrics" / "stage1.json"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from the previous run")
    write_stage_outputs(out, {"steps": 3}, metrics, {"R@1": 1.0},
                        lambda folder: (folder / "model").mkdir())  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["model", "summary.json"]
    assert json.loads((out / "summary.json").read_text()) == {"steps": 3}
    assert json.loads(metrics.read_text()) == {"R@1": 1.0}

    def crash(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_stage_outputs(out, {"steps": 4}, metrics, {"R@1": 2.0}, crash)
    assert json.loads((out / "summary.json").read_text()) == {"steps": 3}  # the previous output is intact
    assert json.loads(metrics.read_text()) == {"R@1": 1.0}
