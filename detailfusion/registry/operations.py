"""Register, promote (gated), roll back and list versions of ``detailfusion-<dataset>``.

Aliases carry the state: every new version gets ``@challenger``; :func:`promote` moves
``@champion`` to the challenger only when it beats the champion on the configured validation
metric by ``min_margin`` (the first version always becomes champion); the replaced champion
becomes ``@previous-champion`` so :func:`rollback` can restore it. Every decision, with both
metric values and the reason, is written to the challenger version's tags.

Promotions and roll-backs hold a server-side lock (:mod:`detailfusion.registry.lock`), so
concurrent callers never leave two champions, none, or a ``@previous-champion`` that does not
match the promotion history.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from pathlib import Path
from typing import Any

from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.lock import PromotionLock, RegistryError
from detailfusion.tracking.config import TrackingConfig, resolve_tracking_uri
from detailfusion.tracking.lineage import (
    TAG_ABLATION,
    TAG_DATA_DVC,
    TAG_DATASET,
    TAG_DVC_BASELINE,
    TAG_DVC_EXP,
    TAG_GIT_BRANCH,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_PREFECT_FLOW_RUN,
)
from detailfusion.tracking.session import mlflow_key
from detailfusion.tracking.transport import configure_http

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
ALIAS_PREVIOUS = "previous-champion"
METRIC_TAG = "metric."
LINEAGE_TAG = "lineage."
LINEAGE_KEYS = (
    TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_GIT_BRANCH, TAG_DATA_DVC, TAG_DVC_EXP, TAG_DVC_BASELINE,
    TAG_PREFECT_FLOW_RUN, TAG_ABLATION, TAG_DATASET,
)  # fmt: skip
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def registry_client(tracking: TrackingConfig | None = None) -> Any:
    """An MlflowClient on the tracking store (``$MLFLOW_TRACKING_URI`` or ``params.yaml`` tracking)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking or TrackingConfig())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class _Registry:
    """Retried client calls and the alias/tag reads shared by the operations."""

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
            if exc.error_code in _MISSING:
                raise RegistryError(f"registered model '{name}' has no version {version}") from None
            raise

    def require_model(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if exc.error_code in _MISSING:
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


# --------------------------------------------------------------------------- register


def metrics_from_files(paths: list[str | Path]) -> dict[str, float]:
    """Numbers from metrics JSON files (nested keys joined with ``/``), later files winning."""
    from detailfusion.tracking.metrics import read_metrics_json

    out: dict[str, float] = {}
    for path in paths:
        out.update(read_metrics_json(path))
    return out


def resolve_model_source(client: Any, model: str) -> tuple[str, str | None, str | None]:
    """``(source, run_id, model_id)`` for a ``models:/m-...`` URI, a ``runs:/`` URI or a bare run id.

    A run id resolves to the newest LoggedModel that run produced (MLflow 3 keeps models
    outside the run's artifacts).
    """
    from mlflow.exceptions import MlflowException

    if model.startswith("models:/m-") or model.startswith("m-"):
        model_id = model.removeprefix("models:/").split("/")[0]
        logged = client.get_logged_model(model_id)
        return f"models:/{model_id}", logged.source_run_id, model_id
    if model.startswith("models:/"):
        raise RegistryError(f"{model}: give the logged model (models:/m-...), a runs:/ URI or a run id")
    run_id, name = model, None
    if model.startswith("runs:/"):
        run_id, _, name = model.removeprefix("runs:/").partition("/")
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise RegistryError(f"{model}: no such run") from None
        raise
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    found = [m for m in found if name in (None, "", m.name)]
    if not found:
        raise RegistryError(f"{model}: run {run_id} logged no model" + (f" named '{name}'" if name else ""))
    newest = max(found, key=lambda m: m.creation_timestamp)
    return f"models:/{newest.model_id}", run_id, newest.model_id


def lineage_from_run(client: Any, run_id: str | None) -> dict[str, str]:
    """The lineage tags of the run that produced a model (``{}`` without a run)."""
    if not run_id:
        return {}
    tags = client.get_run(run_id).data.tags
    return {key: tags[key] for key in LINEAGE_KEYS if key in tags}


def register(
    model: str,
    dataset: str,
    metrics: dict[str, float],
    lineage: dict[str, str] | None = None,
    *,
    config: RegistryConfig | None = None,
    client: Any | None = None,
) -> Any:
    """Register a logged model as a new version of ``detailfusion-<dataset>`` and make it ``@challenger``.

    ``model``: ``models:/m-...``, ``runs:/<run>/<name>`` or a run id. ``metrics`` become
    ``metric.<key>`` version tags (keys through ``mlflow_key``); ``lineage`` (default: the
    producing run's lineage tags) becomes ``lineage.<key>`` tags. Returns the ModelVersion.
    """
    from mlflow.exceptions import MlflowException

    cfg = config or RegistryConfig()
    reg = _Registry(client, cfg)
    name = cfg.name_for(dataset)
    source, run_id, model_id = reg.call(resolve_model_source, reg.client, model)
    if lineage is None:
        lineage = reg.call(lineage_from_run, reg.client, run_id)
    if mlflow_key(cfg.metric) not in {mlflow_key(k) for k in metrics}:
        raise RegistryError(
            f"metrics for {name} lack the gate metric '{cfg.metric}' (registry.metric); got {sorted(metrics)}"
        )
    try:
        reg.call(reg.client.create_registered_model, name, tags={"dataset": dataset},
                 description=f"DetailFusion composed image retrieval on {dataset}; see @champion.")  # fmt: skip
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {METRIC_TAG + mlflow_key(k): repr(float(v)) for k, v in metrics.items()}
    tags.update({LINEAGE_TAG + k: str(v) for k, v in lineage.items()})
    tags["registered_at"] = _now_iso()
    mv = reg.call(reg.client.create_model_version, name, source, run_id=run_id, tags=tags, model_id=model_id)
    reg.call(reg.client.set_registered_model_alias, name, ALIAS_CHALLENGER, mv.version)
    return reg.version(name, mv.version)


# --------------------------------------------------------------------------- promote


@dataclasses.dataclass
class Decision:
    """The outcome of one promotion attempt (also written to the challenger's version tags)."""

    model_name: str
    decision: str  # promoted | refused | unchanged
    reason: str
    metric: str
    greater_is_better: bool
    min_margin: float
    forced: bool
    challenger_version: str | None
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    champion_after: str | None
    previous_champion_after: str | None
    decided_at: str

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        def val(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        lines = [
            f"{self.model_name}: {self.decision.upper()}" + (" (forced)" if self.forced and self.promoted else ""),
            f"  metric      {self.metric} ({'higher' if self.greater_is_better else 'lower'} is better, "
            f"min margin {self.min_margin:g})",
            f"  challenger  v{self.challenger_version or '-'}  {val(self.challenger_value)}",
            f"  champion    v{self.champion_version or '-'}  {val(self.champion_value)}",
            f"  reason      {self.reason}",
            f"  now         @champion=v{self.champion_after or '-'}  @previous-champion=v{self.previous_champion_after or '-'}",
        ]
        return "\n".join(lines)


def _gate(cfg: RegistryConfig, challenger: float | None, champion: float | None, c_ver: str, ch_ver: str | None
          ) -> tuple[bool, str]:  # fmt: skip
    """(passes, reason) of the metric gate alone."""
    metric = cfg.metric
    if challenger is None:
        return False, f"challenger v{c_ver} has no '{metric}' metric tag; cannot compare"
    if ch_ver is None:
        return True, f"no champion yet: v{c_ver} becomes the first champion ({metric}={challenger:.4f})"
    if champion is None:
        return False, f"champion v{ch_ver} has no '{metric}' metric tag; cannot compare (use --force)"
    gain = challenger - champion if cfg.greater_is_better else champion - challenger
    better = "higher" if cfg.greater_is_better else "lower"
    if gain > cfg.min_margin:
        return True, (
            f"challenger v{c_ver} {metric}={challenger:.4f} beats champion v{ch_ver} {metric}={champion:.4f} "
            f"by {gain:.4f}, more than min_margin {cfg.min_margin:g}"
        )
    return False, (
        f"challenger v{c_ver} {metric}={challenger:.4f} does not beat champion v{ch_ver} {metric}={champion:.4f} "
        f"({better} is better) by more than min_margin {cfg.min_margin:g} (improvement {gain:+.4f})"
    )


def promote(
    name: str,
    *,
    version: str | int | None = None,
    force: bool = False,
    config: RegistryConfig | None = None,
    client: Any | None = None,
) -> Decision:
    """Move ``@champion`` to the challenger (``@challenger``, or ``version``) if it passes the gate.

    ``force`` promotes regardless and records that it did. The decision is written to the
    challenger's tags (``promotion.*``) and returned; promotion also moves the old champion to
    ``@previous-champion`` and clears ``@challenger``.
    """
    cfg = config or RegistryConfig()
    reg = _Registry(client, cfg)
    reg.require_model(name)
    with PromotionLock(reg.client, name, cfg, purpose="promote"):
        # Everything is read inside the lock: a decision made on state read before it could
        # be stale by the time it is applied.
        challenger = reg.version(name, str(version)) if version is not None else reg.by_alias(name, ALIAS_CHALLENGER)
        champion = reg.by_alias(name, ALIAS_CHAMPION)
        previous = reg.by_alias(name, ALIAS_PREVIOUS)
        ch_ver = champion.version if champion else None
        ch_val = reg.metric(champion, cfg.metric) if champion else None

        def decision(kind: str, reason: str, c: Any | None, c_val: float | None, after: str | None,
                     prev_after: str | None) -> Decision:  # fmt: skip
            return Decision(name, kind, reason, cfg.metric, cfg.greater_is_better, cfg.min_margin, force,
                            c.version if c else None, c_val, ch_ver, ch_val, after, prev_after, _now_iso())  # fmt: skip

        prev_ver = previous.version if previous else None
        if challenger is None:
            return decision("unchanged", "no @challenger to promote (register a version first)", None, None, ch_ver,
                            prev_ver)  # fmt: skip
        c_val = reg.metric(challenger, cfg.metric)
        if ch_ver == challenger.version:
            return decision("unchanged", f"v{ch_ver} is already the champion", challenger, c_val, ch_ver, prev_ver)

        passes, reason = _gate(cfg, c_val, ch_val, challenger.version, ch_ver)
        if force and not passes:
            reason = f"forced (--force); the gate alone would refuse: {reason}"
        elif force:
            reason = f"forced (--force); the gate passes too: {reason}"
        if passes or force:
            if champion is not None:
                reg.call(reg.client.set_registered_model_alias, name, ALIAS_PREVIOUS, champion.version)
            reg.call(reg.client.set_registered_model_alias, name, ALIAS_CHAMPION, challenger.version)
            current_challenger = reg.by_alias(name, ALIAS_CHALLENGER)
            if current_challenger is not None and current_challenger.version == challenger.version:
                reg.call(reg.client.delete_registered_model_alias, name, ALIAS_CHALLENGER)
            result = decision("promoted", reason, challenger, c_val, challenger.version, ch_ver or prev_ver)
            if champion is not None:
                reg.set_tags(name, champion.version, {"demoted.by": challenger.version, "demoted.at": result.decided_at})
        else:
            result = decision("refused", reason, challenger, c_val, ch_ver, prev_ver)
        tags = {
            "promotion.decision": result.decision,
            "promotion.reason": result.reason,
            "promotion.metric": cfg.metric,
            "promotion.challenger_value": "none" if c_val is None else repr(c_val),
            "promotion.champion_value": "none" if ch_val is None else repr(ch_val),
            "promotion.champion_version": ch_ver or "none",
            "promotion.min_margin": repr(cfg.min_margin),
            "promotion.forced": str(force).lower(),
            "promotion.decided_at": result.decided_at,
        }
        if result.promoted:
            tags["promotion.previous_champion"] = ch_ver or "none"
        reg.set_tags(name, challenger.version, tags)
        return result


# --------------------------------------------------------------------------- rollback


@dataclasses.dataclass
class Rollback:
    model_name: str
    rolled_back_version: str
    restored_version: str
    previous_champion_after: str | None
    decided_at: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        return (
            f"{self.model_name}: ROLLED BACK @champion v{self.rolled_back_version} -> v{self.restored_version}; "
            f"@previous-champion=v{self.previous_champion_after or '-'}"
        )


def rollback(name: str, *, config: RegistryConfig | None = None, client: Any | None = None) -> Rollback:
    """Make ``@previous-champion`` the champion again and record it on both versions.

    ``@previous-champion`` then steps one further back in the promotion history (the champion
    the restored version had replaced), or disappears when there is none.
    """
    cfg = config or RegistryConfig()
    reg = _Registry(client, cfg)
    reg.require_model(name)
    with PromotionLock(reg.client, name, cfg, purpose="rollback"):
        champion = reg.by_alias(name, ALIAS_CHAMPION)
        previous = reg.by_alias(name, ALIAS_PREVIOUS)
        if previous is None:
            raise RegistryError(f"{name}: no @previous-champion to roll back to")
        if champion is not None and champion.version == previous.version:
            raise RegistryError(f"{name}: @previous-champion is already the champion (v{previous.version})")
        older = (previous.tags or {}).get("promotion.previous_champion")
        older_ok = older not in (None, "none", previous.version, champion.version if champion else None)
        reg.call(reg.client.set_registered_model_alias, name, ALIAS_CHAMPION, previous.version)
        if older_ok:
            try:
                reg.version(name, older)
                reg.call(reg.client.set_registered_model_alias, name, ALIAS_PREVIOUS, older)
            except RegistryError:
                older_ok = False
        if not older_ok:
            reg.call(reg.client.delete_registered_model_alias, name, ALIAS_PREVIOUS)
        result = Rollback(name, champion.version if champion else "none", previous.version,
                          older if older_ok else None, _now_iso())  # fmt: skip
        if champion is not None:
            # its promotion no longer stands: `registry list` must not keep showing "promoted"
            reg.set_tags(name, champion.version, {"promotion.decision": "rolled-back",
                                                  "rollback.replaced_by": previous.version,
                                                  "rollback.at": result.decided_at})  # fmt: skip
        reg.set_tags(name, previous.version, {"rollback.restored_from": result.rolled_back_version,
                                              "rollback.at": result.decided_at})  # fmt: skip
        return result


# --------------------------------------------------------------------------- list


def list_versions(name: str, *, config: RegistryConfig | None = None, client: Any | None = None) -> list[dict[str, Any]]:
    """One row per version, newest first: version, aliases, metrics, decision, status, run, created."""
    reg = _Registry(client, config or RegistryConfig())
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
