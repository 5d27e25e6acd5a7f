"""The offline record: what stages could not log while the tracking store was down.

One JSON file (``tracking.offline_record``, default ``metrics/tracking_offline.json``) holds
``{"stages": {stage: entry}}``; stages of parallel experiments share it, so every change is a
read-modify-replace under an exclusive lock on its folder. ``detailfusion tracking replay``
(:mod:`detailfusion.tracking.replay`) sends it once the store is back.

A record that is not readable JSON is never silently replaced (it may hold other stages' unsent
data): it is moved aside to ``<name>.corrupt-<UTC timestamp>`` and one log line says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from detailfusion.fsutil import write_text_atomic

log = logging.getLogger(__name__)


class TrackingOfflineWarning(UserWarning):
    """The tracking store was unreachable; some of a stage's tracking data was not logged."""


@dataclasses.dataclass
class OfflineRecord:
    """What one stage could not log, kept on disk so nothing is lost silently."""

    stage: str
    tracking_uri: str
    experiment: str
    run_id: str | None = None
    parent_run_id: str | None = None
    error: str | None = None
    failed_call: str | None = None
    since: str | None = None
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    artifacts: list[dict[str, str | None]] = dataclasses.field(default_factory=list)
    datasets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str | None = None

    def summary(self) -> str:
        parts = []
        if self.params:
            parts.append(f"{len(self.params)} params")
        if self.tags:
            parts.append(f"{len(self.tags)} tags")
        if self.metrics:
            keys = sorted({m["key"] for m in self.metrics})
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            parts.append(f"{len(self.metrics)} metric values ({shown})")
        if self.artifacts:
            parts.append(f"{len(self.artifacts)} artifacts")
        if self.datasets:
            parts.append(f"{len(self.datasets)} data set inputs")
        if self.run_id is None:
            parts.append("the run itself")
        elif self.status:
            parts.append(f"the final run status {self.status}")
        return ", ".join(parts) or "nothing"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        """Merge this stage's entry into the JSON file at ``path`` (atomic replace)."""
        update_offline_record(path, lambda stages: stages.__setitem__(self.stage, self.to_dict()))


def update_offline_record(path: str | Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the record's ``{stage: entry}`` map under the folder lock and write it
    back (an empty map removes the file). A corrupt record is moved aside first (module docs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(path.parent):
        stages = _read_or_move_aside(path)
        change(stages)
        if not stages:
            path.unlink(missing_ok=True)
            return
        write_text_atomic(path, json.dumps({"stages": stages}, indent=2, default=str) + "\n")


def clear_offline_record(path: str | Path, stage: str) -> None:
    """Drop ``stage`` from the offline record (it logged fine this time)."""
    if Path(path).is_file():
        update_offline_record(path, lambda stages: stages.pop(stage, None))


def _read_or_move_aside(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stages = data["stages"] if isinstance(data, dict) else None
        if isinstance(stages, dict):
            return stages
        problem = "no 'stages' object"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = f"not valid JSON: {exc}"
    except KeyError:
        problem = "no 'stages' object"
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, aside)
    log.warning("%s: unreadable offline tracking record (%s); moved it to %s and started a new one",
                path, problem, aside)  # fmt: skip
    return {}


@contextlib.contextmanager
def directory_lock(folder: Path) -> Iterator[None]:
    """Exclusive flock on a folder: stages of parallel experiments share metrics/, and locking the
    folder itself leaves no lock file behind in it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
