"""The ``validate`` stage: Great Expectations suites on the prepared manifests, a report, Data Docs.

For each prepared data set folder (``<prepared>/<cirr|fashioniq|ipr2pr>/`` written by
``prepare``: ``queries.parquet``, ``images.parquet``, ``quarantine.json``, ``pixels.npy``) it
validates one ``queries`` suite and one ``images`` suite (the rules are in
:mod:`detailfusion.data.validation.checks`), then writes into ``report_dir``:

* ``report.json``: per data set, per suite, per expectation the verdict, the observed value,
  the number of offending rows and a few of their ids, plus the overall ``success`` and a
  readable ``summary_text``;
* ``data_docs/index.html``: the Great Expectations Data Docs site of this run.

Both are replaced atomically (written aside, then renamed), so a crash never leaves a
half-written report. Both are a pure function of the prepared data, the params and the code
(no clock readings, run ids or temporary paths; see ``validation/gx_runner.py``), since the
folder is a DVC output. When any expectation fails, the report and Data Docs are written first
and then :class:`~detailfusion.errors.ValidationFailed` is raised with the summary, which stops
the DVC pipeline with a message naming the data set, table, column and offending ids.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from detailfusion import timings
from detailfusion.config import to_dict
from detailfusion.data.config import ValidateConfig
from detailfusion.data.manifest import DATASETS, PREPARED_IMAGE_COLUMNS, QUERY_COLUMNS
from detailfusion.data.prepared import open_pixels, read_manifest, read_quarantine
from detailfusion.data.validation.checks import (
    IMAGE_ID_COLUMNS,
    QUERY_ID_COLUMNS,
    TABLE_LEVEL,
    Check,
    image_checks,
    query_checks,
)
from detailfusion.data.validation.columns import image_frame, query_frame
from detailfusion.data.validation.gx_runner import TableRun, gx_version, run_suites
from detailfusion.errors import DataFormatError, ValidationFailed
from detailfusion.fsutil import replace_dir, write_json_atomic

REPORT_NAME = "report.json"
DOCS_NAME = "data_docs"


@dataclass
class PreparedDataset:
    """The files of one prepared data set folder, loaded."""

    name: str
    folder: Path
    queries: pd.DataFrame
    images: pd.DataFrame
    quarantine: list[dict[str, str]]
    n_pixels: int
    notes: list[str] = field(default_factory=list)


def run_validate(cfg: ValidateConfig, prepared: Path, report_dir: Path) -> dict[str, Any]:
    """Validate every prepared data set under ``prepared``; write the report and Data Docs.

    Returns ``{"success", "summary_text", "report_path", "data_docs_index", "report"}``.
    Raises :class:`ValidationFailed` (after writing both) when an expectation fails, and
    :class:`DataFormatError` when a prepared folder is absent, incomplete or unreadable.
    """
    cfg.validate()
    prepared, report_dir = Path(prepared), Path(report_dir)
    with timings.phase("load_data"):
        datasets = [load_prepared(prepared / name, name) for name in find_datasets(prepared)]

    runs: list[TableRun] = []
    for ds in datasets:
        qchecks = query_checks(ds.name, ds.queries, max_caption_words=cfg.max_caption_words)
        ichecks = image_checks(
            ds.name,
            max_quarantined_fraction=cfg.max_quarantined_fraction,
            min_image_side=cfg.min_image_side,
            max_image_side=cfg.max_image_side,
            n_pixels=ds.n_pixels,
        )
        if ds.name == "ipr2pr":
            unchecked = sorted({"reference_caption", "target_caption"} - {c.about for c in qchecks})
            ds.notes += [
                f"{c} is null on every row (no prompt column in the source): not checked" for c in unchecked
            ]
        runs.append(
            TableRun(
                ds.name, "queries", query_frame(ds.queries, ds.images, ds.name), qchecks, QUERY_ID_COLUMNS
            )
        )
        runs.append(
            TableRun(ds.name, "images", image_frame(ds.images, ds.quarantine), ichecks, IMAGE_ID_COLUMNS)
        )

    report_dir.mkdir(parents=True, exist_ok=True)
    docs_tmp = Path(tempfile.mkdtemp(prefix=f".{DOCS_NAME}-", dir=report_dir))
    try:
        with timings.phase("checks"):  # GX's import and the Data Docs are phases of their own
            results = run_suites(runs, docs_tmp)
        report = build_report(cfg, prepared, report_dir, datasets, runs, results, gx_version())
        with timings.phase("write"):
            replace_dir(docs_tmp, report_dir / DOCS_NAME)
    finally:
        shutil.rmtree(docs_tmp, ignore_errors=True)
    report_path = report_dir / REPORT_NAME
    with timings.phase("write"):
        write_json_atomic(report_path, report, sort_keys=False, fsync=True)

    if not report["success"]:
        raise ValidationFailed(report["summary_text"])
    return {
        "success": report["success"],
        "summary_text": report["summary_text"],
        "report_path": str(report_path),
        "data_docs_index": str(report_dir / DOCS_NAME / "index.html"),
        "report": report,
    }


# --------------------------------------------------------------------------- loading


def find_datasets(prepared: Path) -> list[str]:
    """Names of the data set folders present under ``prepared`` (at least one, else an error)."""
    if not prepared.is_dir():
        raise DataFormatError(prepared, "prepared folder not found; run `detailfusion data prepare` first")
    names = [name for name in DATASETS if (prepared / name).is_dir()]
    if not names:
        raise DataFormatError(
            prepared,
            f"no prepared data set folder found (expected one of {', '.join(d + '/' for d in DATASETS)})",
        )
    return names


def load_prepared(folder: Path, name: str) -> PreparedDataset:
    """Load one prepared folder with the readers of :mod:`detailfusion.data.prepared`, but not its
    cross-file checks (pixel rows, indices): those are expectations here. Structural problems raise
    :class:`DataFormatError` naming the file."""
    queries = _integers(read_manifest(folder / "queries.parquet", QUERY_COLUMNS), folder / "queries.parquet",
                        QUERY_COLUMNS)
    images_path = folder / "images.parquet"
    images = _integers(read_manifest(images_path, PREPARED_IMAGE_COLUMNS), images_path, PREPARED_IMAGE_COLUMNS)
    quarantine = read_quarantine(folder / "quarantine.json")
    pixels = open_pixels(folder / "pixels.npy")
    if pixels.ndim < 1:
        raise DataFormatError(folder / "pixels.npy", f"expected one row per image, got a {pixels.ndim}-d array")
    return PreparedDataset(name=name, folder=folder, queries=queries, images=images, quarantine=quarantine,
                           n_pixels=int(pixels.shape[0]))


def _integers(df: pd.DataFrame, path: Path, schema: dict[str, str]) -> pd.DataFrame:
    """Integer columns of ``schema`` that came back as float become nullable ``Int64``."""
    for col in schema:
        # Parquet written without pandas metadata reads a nullable int column back as float.
        if schema[col] in ("Int64", "int64") and not pd.api.types.is_integer_dtype(df[col]):
            try:
                df[col] = df[col].astype("Int64")
            except (TypeError, ValueError) as exc:
                raise DataFormatError(path, f"column {col!r} must hold integers: {exc}") from exc
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- report


def build_report(
    cfg: ValidateConfig,
    prepared: Path,
    report_dir: Path,
    datasets: list[PreparedDataset],
    runs: list[TableRun],
    results: dict[str, dict[str, dict[str, Any]]],
    gx_version: str,
) -> dict[str, Any]:
    """The JSON report: per data set, per suite, per expectation; ``summary_text`` at the top."""
    notes = {ds.name: ds.notes for ds in datasets}
    report_datasets: dict[str, Any] = {}
    failures: list[dict[str, Any]] = []
    n_expectations = 0
    for run in runs:
        entries = []
        for check in run.checks:
            res = results[run.suite_name].get(check.name) or _missing_result()
            entry = {**_describe(check), **res, "unexpected_examples": _examples(res, run.id_columns)}
            entries.append(entry)
            n_expectations += 1
            if not entry["success"]:
                failures.append({"dataset": run.dataset, "table": run.table, **entry})
        ds_entry = report_datasets.setdefault(
            run.dataset, {"success": True, "notes": notes[run.dataset], "tables": {}}
        )
        table_ok = all(e["success"] for e in entries)
        ds_entry["tables"][run.table] = {
            "suite": run.suite_name,
            "rows": len(run.frame),
            "success": table_ok,
            "expectations": entries,
        }
        ds_entry["success"] = ds_entry["success"] and table_ok

    report: dict[str, Any] = {
        "success": not failures,
        "summary_text": "",
        "prepared": str(prepared),
        "data_docs": f"{DOCS_NAME}/index.html",
        "great_expectations_version": gx_version,
        "params": to_dict(cfg),
        "expectations": n_expectations,
        "failed": len(failures),
        "datasets": report_datasets,
        "failures": [
            {
                k: f[k]
                for k in (
                    "dataset",
                    "table",
                    "about",
                    "check",
                    "expectation",
                    "expected",
                    "unexpected_count",
                    "element_count",
                    "unexpected_examples",
                )
            }
            for f in failures
        ],
    }
    report["summary_text"] = summary_text(report, report_dir)
    return report


def summary_text(report: dict[str, Any], report_dir: Path) -> str:
    """A readable multi-line summary: one line per failed expectation, or per data set when all pass."""
    names = ", ".join(report["datasets"])
    where = f"Report: {report_dir / REPORT_NAME}; Data Docs: {report_dir / report['data_docs']}"
    if report["success"]:
        lines = [
            f"Data validation passed: {report['expectations']} expectations on {names} ({report['prepared']})"
        ]
        for name, ds in report["datasets"].items():
            tables = ", ".join(
                f"{t} {v['rows']} rows / {len(v['expectations'])} expectations"
                for t, v in ds["tables"].items()
            )
            lines.append(f"  {name}: {tables}")
            lines += [f"  {name}: note: {n}" for n in ds["notes"]]
        return "\n".join([*lines, where])

    lines = [
        f"Data validation FAILED: {report['failed']} of {report['expectations']} expectations failed "
        f"on {names} ({report['prepared']})"
    ]
    for name, ds in report["datasets"].items():
        for table, t in ds["tables"].items():
            for e in t["expectations"]:
                if not e["success"]:
                    what = "whole table" if e["about"] == TABLE_LEVEL else f"column {e['about']!r}"
                    lines.append(f"  - {name} / {table} / {what}: {_failure_line(e, table)}")
    return "\n".join([*lines, where])


def _failure_line(e: dict[str, Any], table: str) -> str:
    text = f"expected: {e['expected']}"
    if e["row_condition"]:
        text += f" (rows where {e['row_condition']})"
    gx = e["expectation"] + ("" if e["column"] in (None, e["about"]) else f" on {e['column']}")
    if e["exception"]:
        return f"{text}; the check raised an error: {e['exception']} [{gx}]"
    count, total = e["unexpected_count"], e["element_count"]
    if count is None:
        return f"{text}; observed: {e['observed_value']} [{gx}]"
    text += f"; {count} of {total} rows failed"
    if e["unexpected_examples"]:
        id_name = "query_id" if table == "queries" else "split/category/image_id"
        text += f"; {id_name} e.g. " + ", ".join(e["unexpected_examples"])
    # Values of a helper column are just False; those of a manifest column say what is wrong.
    if e["unexpected_values"] and e["column"] == e["about"]:
        values = list(
            dict.fromkeys(repr(v) if isinstance(v, str) else str(v) for v in e["unexpected_values"])
        )
        text += "; values e.g. " + ", ".join(values)
    return f"{text} [{gx}]"


def _describe(check: Check) -> dict[str, Any]:
    return {
        "check": check.name,
        "expectation": _snake(check.expectation),
        "column": check.column,
        "about": check.about,
        "expected": check.expected,
        "row_condition": None if check.row_condition is None else str(check.row_condition),
        "kwargs": check.kwargs,
    }


def _examples(res: dict[str, Any], id_columns: tuple[str, ...]) -> list[str]:
    """Offending rows as short ids (``query_id``, or ``split/category/image_id (reason)``), deduplicated."""
    out: list[str] = []
    for row in res.get("unexpected_rows") or []:
        if id_columns == QUERY_ID_COLUMNS:
            text = str(row.get("query_id"))
        else:
            text = "/".join(
                str(row.get(c)) for c in ("split", "category", "image_id") if row.get(c) not in ("", None)
            )
            if row.get("quarantine_reason"):
                text += f" ({row['quarantine_reason']})"
        if text not in out:
            out.append(text)
    return out


def _missing_result() -> dict[str, Any]:
    # Only reachable if GX dropped an expectation from its results; count it as a failure.
    return {
        "success": False,
        "observed_value": None,
        "element_count": None,
        "unexpected_count": None,
        "unexpected_percent": None,
        "unexpected_rows": [],
        "unexpected_values": [],
        "exception": "no result returned by Great Expectations",
    }


def _snake(class_name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in class_name).lstrip("_")
