"""Atomic file writes: a reader (or a failed run) never sees a half-written file or folder.

The one place that knows how: :func:`atomic_path` (any writer that takes a path),
:func:`write_text_atomic` / :func:`write_json_atomic`, :func:`replace_dir` for outputs that
are whole folders, and :func:`write_stage_outputs` (a training stage's model folder and metrics).
Also the one reader of a JSON file that must hold an object, :func:`read_json_object`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from detailfusion.errors import DataFormatError, DetailFusionError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; it is renamed onto ``path`` (mode 0644) when
    the block succeeds and removed when it fails. ``fsync`` flushes it to disk before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Swap the finished folder ``tmp`` in as ``out``; on failure the previous ``out`` is put back."""
    tmp, out = Path(tmp), Path(out)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)  # put the previous good output back
        raise
    if old.exists():
        shutil.rmtree(old)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` to a temp file beside ``path`` and rename it into place (mode 0644)."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | Path, obj: Any, *, sort_keys: bool = True, fsync: bool = False) -> Path:
    """Pretty JSON written atomically, keys sorted unless ``sort_keys=False`` keeps the object's own
    order (metrics files DVC and MLflow read; the validation report)."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n"
    return write_text_atomic(path, text, fsync=fsync)


def write_stage_outputs(out_dir: str | Path, summary: dict, metrics_path: str | Path, metrics: dict,
                        write_model: Callable[[Path], None] | None = None) -> None:
    """A training stage's outputs: the folder ``out_dir`` (what ``write_model`` writes into it, plus
    ``summary.json``) is built aside and swapped in whole, then ``metrics_path`` is written."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if write_model is not None:
        write_model(tmp)
    write_json_atomic(tmp / "summary.json", summary)
    replace_dir(tmp, out_dir)
    write_json_atomic(metrics_path, metrics)


def read_json_object(path: str | Path, missing: str = "file not found",
                     error: type[DetailFusionError] | None = None) -> dict[str, Any]:
    """The JSON object stored in ``path``. Anything else raises one error ``<path>: <problem>``: the
    file is absent (``missing`` is the problem then), unreadable, not UTF-8 JSON, or its top level
    is not an object. The error is a :class:`DataFormatError` unless ``error`` names another
    :class:`DetailFusionError` (e.g. ``ConfigError`` for a config file)."""
    path = Path(path)

    def fail(problem: str) -> DetailFusionError:
        return DataFormatError(path, problem) if error is None else error(f"{path}: {problem}")

    if not path.is_file():
        raise fail(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"not valid JSON: {exc}") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise fail(f"top level must be an object, got {type(data).__name__}")
    return data
