"""Run :class:`~.checks.Check` lists as Great Expectations 1.x suites and build the Data Docs site.

Great Expectations is imported here only, lazily (the import alone takes seconds), with its
usage analytics switched off before the import and its progress bars off, since this runs
inside a DVC stage. Each (data set, table) becomes one suite validated through a
``ValidationDefinition`` of an ephemeral context; the validation results stay in the
context's in-memory store, from which ``build_data_docs`` renders the HTML site into a
filesystem folder.

The site is a DVC output, so it must be a pure function of the data, the params and the code:
the run time is fixed (:data:`RUN_TIME`, the Unix epoch, which also names the validation
pages' folder), and :func:`canonicalize_docs` then removes what GX still draws from the clock
or from ``uuid4`` (the logo's ``?d=<now>`` cache buster, the batch's ``ge_load_time``, the ids
of collapsible blocks). The real time of a run is in the stage's MLflow run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from detailfusion import timings
from detailfusion.data.validation.checks import Check, RowCondition

DOCS_SITE = "detailfusion"
RUN_NAME = "detailfusion-validate"
EXAMPLES = 10  # offending rows kept per failed expectation
RUN_TIME = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)  # fixed: the Data Docs are a DVC output
# What GX 1.x renders from the clock or uuid4 (render/view/view.py, templates collapse.j2, top_navbar.j2)
_CACHE_BUSTER = re.compile(r"\?d=\d{8}T\d{6}\.\d+Z(&?)")
_LOAD_TIME = re.compile(r"(ge_load_time</span>.{0,400}?)\d{8}T\d{6}\.\d+Z", re.DOTALL)
_UUID = re.compile(r"(?<=-collapse-body-)[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


@dataclass
class TableRun:
    """One table of one data set, ready for GX: the frame (with helper columns) and its rules."""

    dataset: str
    table: str
    frame: pd.DataFrame
    checks: list[Check]
    id_columns: tuple[str, ...]

    @property
    def suite_name(self) -> str:
        return f"{self.dataset}.{self.table}"


def gx_version() -> str:
    return _import_gx()[0].__version__


def run_suites(runs: list[TableRun], docs_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Validate every table, build Data Docs into ``docs_dir``; ``{suite: {check name: result}}``.

    A result holds ``success``, ``observed_value``, ``element_count``, ``unexpected_count``,
    ``unexpected_percent``, ``unexpected_rows`` (the id columns of a few offending rows),
    ``unexpected_values`` and ``exception`` (GX's message when the expectation itself crashed).
    """
    with timings.phase("imports"):
        gx, gxe = _import_gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.add_data_docs_site(
        site_name=DOCS_SITE,
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
        },
    )
    run_id = RunIdentifier(run_name=RUN_NAME, run_time=RUN_TIME)
    sources: dict[str, Any] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        if run.dataset not in sources:
            sources[run.dataset] = ctx.data_sources.add_pandas(name=run.dataset)
        batch = (
            sources[run.dataset]
            .add_dataframe_asset(name=run.table)
            .add_batch_definition_whole_dataframe("all")
        )
        # Built whole and added once: add_expectation one by one rewrites the suite store each time.
        suite = ctx.suites.add(
            gx.ExpectationSuite(name=run.suite_name, expectations=[_expectation(gxe, c) for c in run.checks])
        )
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=run.suite_name, data=batch, suite=suite)
        )
        result_format = {
            "result_format": "SUMMARY",
            "unexpected_index_column_names": list(run.id_columns),
            "partial_unexpected_count": EXAMPLES,
        }
        outcome = vd.run(
            batch_parameters={"dataframe": run.frame}, result_format=result_format, run_id=run_id
        )
        by_check = {}
        for res in outcome.results:
            name = (res.expectation_config.meta or {}).get("check")
            by_check[name] = _result(res, run.id_columns)
        results[run.suite_name] = by_check
    with timings.phase("data_docs"):
        ctx.build_data_docs(site_names=[DOCS_SITE])
        canonicalize_docs(docs_dir)
    return results


def canonicalize_docs(docs_dir: Path) -> None:
    """Make the rendered site reproducible: same results, same bytes (see the module docstring).

    The logo's cache buster goes, ``ge_load_time`` becomes :data:`RUN_TIME`, and each distinct
    ``uuid4`` of a collapsible block becomes a counter-based id, numbered in order of first
    appearance over the pages in sorted path order (the link and its target stay paired).
    """
    stamp = RUN_TIME.strftime("%Y%m%dT%H%M%S.%fZ")
    ids: dict[str, str] = {}

    def stable_id(match: re.Match[str]) -> str:
        return ids.setdefault(match.group(), f"00000000-0000-4000-8000-{len(ids) + 1:012d}")

    for page in sorted(docs_dir.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        new = _CACHE_BUSTER.sub(lambda m: "?" if m.group(1) else "", text)
        new = _UUID.sub(stable_id, _LOAD_TIME.sub(lambda m: m.group(1) + stamp, new))
        if new != text:
            page.write_text(new, encoding="utf-8")


def _import_gx() -> tuple[Any, Any]:
    # Must be set before the first import: GX reads it when the module loads.
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx
    import great_expectations.expectations as gxe

    return gx, gxe


def _expectation(gxe: Any, check: Check) -> Any:
    kwargs: dict[str, Any] = dict(check.kwargs)
    if check.column is not None:
        kwargs["column"] = check.column
    if check.row_condition is not None:
        kwargs["row_condition"] = _condition(check.row_condition)
    cls = getattr(gxe, check.expectation)
    return cls(description=check.expected, meta={"check": check.name}, **kwargs)


def _condition(cond: RowCondition) -> Any:
    from great_expectations.expectations.row_conditions import Column

    col = Column(cond.column)
    if cond.op == "==":
        return col == cond.value
    if cond.op == "!=":
        return col != cond.value
    if cond.op == "in":
        return col.is_in(cond.value)
    raise ValueError(f"unsupported row condition operator {cond.op!r}")


def _result(res: Any, id_columns: tuple[str, ...]) -> dict[str, Any]:
    info = res.result or {}
    rows = [
        {c: r.get(c) for c in id_columns if c in r} for r in info.get("partial_unexpected_index_list") or []
    ]
    observed = info.get("observed_value")
    if observed is None and info.get("unexpected_count") is not None:
        # Column-map expectations report counts, not one observed value; say it in one line.
        observed = f"{info['unexpected_count']} of {info.get('element_count')} rows unexpected"
    return _jsonable(
        {
            "success": bool(res.success),
            "observed_value": observed,
            "element_count": info.get("element_count"),
            "unexpected_count": info.get("unexpected_count"),
            "unexpected_percent": info.get("unexpected_percent"),
            "unexpected_rows": rows,
            "unexpected_values": info.get("partial_unexpected_list") or [],
            "exception": _exception_message(res.exception_info),
        }
    )


def _exception_message(info: Any) -> str | None:
    """GX keeps either one ``{raised_exception, exception_message}`` dict or one per metric."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for sub in info.values():
        if isinstance(sub, dict) and sub.get("raised_exception"):
            return sub.get("exception_message")
    return None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars become Python numbers, anything else odd becomes a string."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
