"""Reading the model registry: the client, versions by alias or number, their gate metric, the version table.

The state of ``detailfusion-<dataset>`` is carried by aliases (``@challenger``, ``@champion``,
``@previous-champion``) and version tags (``metric.<key>``, ``lineage.<key>``, ``promotion.*``);
:mod:`detailfusion.registry.registration` adds versions and :mod:`detailfusion.registry.operations`
moves the aliases. :class:`Registry` is the reading side they share; :func:`list_versions` and
:func:`format_versions` show the table of ``detailfusion registry list``.
"""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any

from detailfusion.config import repo_default
from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.lock import RegistryError
from detailfusion.tracking.config import TrackingConfig, resolve_tracking_uri
from detailfusion.tracking.session import mlflow_key
from detailfusion.tracking.transport import configure_http

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
ALIAS_PREVIOUS = "previous-champion"
METRIC_TAG = "metric."
# MLflow error codes of a missing model, version or run (servers differ).
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def registry_client(tracking: TrackingConfig | None = None) -> Any:
    """An MlflowClient on the tracking store (``$MLFLOW_TRACKING_URI`` or ``params.yaml`` tracking)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking or repo_default(TrackingConfig, "tracking"))
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def now_iso() -> str:
    """Now in UTC, ISO 8601 to the second (the time stamps of decisions and registrations)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class Registry:
    """Client calls and the alias/tag reads shared by registering, promotion, roll-back and listing."""

    def __init__(self, client: Any | None, cfg: RegistryConfig):
        configure_http(cfg.retries, cfg.backoff_s, cfg.timeout_s, where="registry")
        self.client = client or registry_client()
        self.cfg = cfg

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # MLflow retries a failing server itself (detailfusion.tracking.transport)
        return fn(*args, **kwargs)

    def by_alias(self, name: str, alias: str) -> Any | None:
        # Read through the model's alias map: servers report a missing alias with different
        # error codes, a missing key is unambiguous.
        version = (self.require_model(name).aliases or {}).get(alias)
        return None if version is None else self.version(name, str(version))

    def version(self, name: str, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.call(self.client.get_model_version, name, str(version))
        except MlflowException as exc:
            if exc.error_code in MISSING_CODES:
                raise RegistryError(f"registered model '{name}' has no version {version}") from None
            raise

    def require_model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if exc.error_code in MISSING_CODES:
                raise RegistryError(f"no registered model named '{name}'") from None
            raise

    def set_tags(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.call(self.client.set_model_version_tag, name, str(version), key, str(value))

    def metric(self, mv: Any, metric: str) -> float | None:
        raw = (mv.tags or {}).get(METRIC_TAG + mlflow_key(metric))
        try:
            value = float(raw) if raw is not None else None
        except ValueError:
            return None
        return value if value is not None and math.isfinite(value) else None


def list_versions(name: str, *, config: RegistryConfig | None = None, client: Any | None = None) -> list[dict[str, Any]]:
    """One row per version, newest first: version, aliases, metrics, decision, status, run, created."""
    reg = Registry(client, config or repo_default(RegistryConfig, "registry"))
    model = reg.require_model(name)
    by_version: dict[str, list[str]] = {}
    for alias, ver in (model.aliases or {}).items():
        by_version.setdefault(str(ver), []).append(alias)
    versions = reg.call(reg.client.search_model_versions, f"name = '{name}'")
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = mv.tags or {}
        rows.append(
            {
                "version": int(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "metrics": {k[len(METRIC_TAG) :]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG)},
                "decision": tags.get("promotion.decision", ""),
                "status": mv.status,
                "run_id": mv.run_id or "",
                "created": _dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, _dt.UTC).strftime("%Y-%m-%d %H:%M"),
            }
        )
    return rows


def format_versions(rows: list[dict[str, Any]], metrics: list[str] | None = None, max_metrics: int = 6) -> str:
    """A plain-text table of :func:`list_versions` rows; ``metrics`` picks and orders metric columns."""
    if not rows:
        return "(no versions)"
    available = sorted({k for r in rows for k in r["metrics"]})
    wanted = [mlflow_key(m) for m in metrics] if metrics else []
    columns = [m for m in wanted if m in available] + [m for m in available if m not in wanted]
    columns = columns[: max(max_metrics, len(wanted))]
    header = ["version", "aliases", *columns, "decision", "created", "run"]
    table = [header]
    for r in rows:
        table.append(
            [
                f"v{r['version']}",
                ",".join("@" + a for a in r["aliases"]) or "-",
                *(f"{r['metrics'][c]:.4f}" if c in r["metrics"] else "-" for c in columns),
                r["decision"] or "-",
                r["created"],
                r["run_id"][:12] or "-",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
