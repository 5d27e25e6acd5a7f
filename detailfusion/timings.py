"""Where a pipeline stage's wall time goes, kept out of everything DVC hashes.

DVC outputs must be a pure function of code, params and data, so no output holds a clock
reading. Instead each stage command (``detailfusion data synth|prepare|validate``, ``train
<stage>``, ``evaluate``, ``registry publish``) runs under a :class:`StageTimer` that

* measures the process start-up before the stage body (interpreter, ``detailfusion.cli``
  import, argument parsing) from the process's creation time,
* adds up named phases that stage code marks with :func:`phase` (``imports``,
  ``tracking_start``, ``load_data``, ``train``, ``validate``, ``write``, ...; a nested phase's
  time counts for the inner phase only, so phases never overlap),
* logs the figures so far to the stage's MLflow run as ``time/<phase>_s`` metrics (see
  :func:`log_to_run`), and
* writes the whole breakdown to ``reports/timings/<stage>.json`` beside the params file when
  the command ends, failed or not. That folder is git-ignored and is not a DVC output.

Stage code calls the module-level :func:`phase` / :func:`note`; with no active timer (a library
call, a test) they do nothing, so nothing depends on timing being on.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TIMINGS_DIR = Path("reports") / "timings"
# Phases that are overhead around the stage's own work (bench/pipeline_time.py splits on this).
OVERHEAD_PHASES = ("imports", "tracking_start", "tracking_log", "tracking_end")
# Figures of the training loop's summary that are clock readings, not results.
RUN_FACT_KEYS = ("seconds", "samples_per_s", "resumed_from")  # facts of this run, not results
# Stage modules imported under the "imports" phase before the stage body runs.
STAGE_MODULES = {
    "synthesize": ("detailfusion.data.synthetic",),
    "prepare": ("detailfusion.data.prepare",),
    "validate": ("detailfusion.data.validate",),
    "train": ("torch", "detailfusion.train.stages"),
    "evaluate": ("torch", "detailfusion.eval.evaluate"),
    "register": ("mlflow", "detailfusion.registry.publish"),  # the whole stage is MLflow work
}


def process_start_time() -> float:
    """Epoch seconds at which this process was created (psutil; falls back to now)."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # psutil missing or /proc unreadable: no start-up figure, never a failure
        return time.time()


class StageTimer:
    """Named, non-overlapping phases of one stage process, plus its start-up before the body."""

    def __init__(self, stage: str, process_started: float | None = None):
        self.stage = stage
        self.started_at = time.time()
        self.process_started = process_start_time() if process_started is None else process_started
        self.startup_s = max(0.0, self.started_at - self.process_started)
        self._t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        self._stack: list[list[Any]] = []  # [name, started] of the open phases, innermost last

    def elapsed(self) -> float:
        """Seconds since the stage body started."""
        return time.perf_counter() - self._t0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self._add(outer[0], now - outer[1])
        self._stack.append([name, now])
        try:
            yield
        finally:
            now = time.perf_counter()
            _, started = self._stack.pop()
            self._add(name, now - started)
            if self._stack:
                self._stack[-1][1] = now  # resume the enclosing phase

    def _add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def note(self, **values: Any) -> None:
        """Record run facts that are not results (the training loop's seconds and samples/s)."""
        self.info.update(values)

    def result(self, status: str = "ok") -> dict[str, Any]:
        body = self.elapsed()
        phases = {k: round(v, 3) for k, v in self.phases.items()}
        other = max(0.0, body - sum(self.phases.values()))
        overhead = sum(v for k, v in self.phases.items() if k in OVERHEAD_PHASES)
        return {
            "stage": self.stage,
            "status": status,
            "wall_s": round(self.startup_s + body, 3),
            "startup_s": round(self.startup_s, 3),
            "body_s": round(body, 3),
            "compute_s": round(body - overhead, 3),
            "phases": phases,
            "other_s": round(other, 3),
            "info": self.info,
            "started_at": _dt.datetime.fromtimestamp(self.process_started, _dt.UTC).isoformat(
                timespec="seconds"
            ),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def metrics(self) -> dict[str, float]:
        """The figures so far as MLflow metrics: ``time/startup_s``, ``time/<phase>_s``, ...,
        and the numeric run facts as ``run/<name>``."""
        res = self.result()
        out = {f"time/{k}": float(res[k]) for k in ("wall_s", "startup_s", "body_s", "compute_s", "other_s")}
        out.update({f"time/{name}_s": float(v) for name, v in res["phases"].items()})
        out.update({f"run/{k}": float(v) for k, v in self.info.items() if isinstance(v, int | float)})
        return out


_current: StageTimer | None = None


def current() -> StageTimer | None:
    """The timer of the stage command running in this process, if any."""
    return _current


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Time a block as phase ``name`` of the running stage (a no-op without one)."""
    return _current.phase(name) if _current is not None else contextlib.nullcontext()


def note(**values: Any) -> None:
    """Add run facts to the running stage's timings (a no-op without one)."""
    if _current is not None:
        _current.note(**values)


def split_run_facts(summary: dict[str, Any], prefix: str = "train_") -> dict[str, Any]:
    """Move the run facts of a training-loop summary (:data:`RUN_FACT_KEYS`) into the running
    stage's timings, noted as ``<prefix><key>``; returns the summary without them."""
    note(**{f"{prefix}{k}": summary[k] for k in RUN_FACT_KEYS if k in summary})
    return {k: v for k, v in summary.items() if k not in RUN_FACT_KEYS}


def log_to_run(run: Any) -> None:
    """Log the running stage's timings so far to its MLflow run (``run`` may be None)."""
    if run is None or _current is None:
        return
    try:
        run.log_metrics(_current.metrics())
    except Exception as exc:  # a timing figure never fails a stage
        log.warning("could not log stage timings to MLflow: %s", exc)


@contextlib.contextmanager
def timed_run(tracked_run: contextlib.AbstractContextManager[Any]) -> Iterator[Any]:
    """Wrap a stage's tracking context: time opening it (``tracking_start``), log the timings to
    the run before it closes, and time the closing (``tracking_end``, in the JSON file only)."""
    with phase("tracking_start"):
        run = tracked_run.__enter__()
    try:
        yield run
    except BaseException as exc:
        log_to_run(run)
        with phase("tracking_end"):
            if not tracked_run.__exit__(type(exc), exc, exc.__traceback__):
                raise
    else:
        log_to_run(run)
        with phase("tracking_end"):
            tracked_run.__exit__(None, None, None)


def stage_name(args: Any) -> str | None:
    """The DVC stage a parsed ``detailfusion`` command line runs, or None for other commands."""
    command = getattr(args, "command", None)
    if command == "data":
        return {"synth": "synthesize", "prepare": "prepare", "validate": "validate"}.get(args.data_command)
    if command == "train":
        return args.stage
    if command == "evaluate" and not getattr(args, "submission_only", False):
        return "evaluate"
    if command == "registry" and getattr(args, "registry_command", None) == "publish":
        return "register"
    return None


@contextlib.contextmanager
def stage_timer(args: Any) -> Iterator[StageTimer | None]:
    """Time the stage command ``args`` names; write ``reports/timings/<stage>.json`` at the end.

    The file goes beside the params file (the repository root under ``dvc repro``). Commands
    that are no pipeline stage run untimed.
    """
    global _current
    stage = stage_name(args)
    if stage is None or _current is not None:
        yield None
        return
    timer = StageTimer(stage)
    _current = timer
    status = "failed"
    try:
        with timer.phase("imports"):
            import importlib

            key = "train" if getattr(args, "command", None) == "train" else stage
            for module in STAGE_MODULES.get(key, ()):
                importlib.import_module(module)
        yield timer
        status = "ok"
    finally:
        _current = None
        out = Path(getattr(args, "params", "params.yaml")).resolve().parent / TIMINGS_DIR / f"{stage}.json"
        try:
            from detailfusion.fsutil import write_json_atomic

            write_json_atomic(out, timer.result(status))
        except OSError as exc:
            log.warning("%s: could not write the stage timings: %s", out, exc)
