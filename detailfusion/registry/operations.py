"""Promote (gated) and roll back versions of ``detailfusion-<dataset>``: the alias moves.

Aliases carry the state: every new version gets ``@challenger``; :func:`promote` moves
``@champion`` to the challenger only when it beats the champion on the configured validation
metric by ``min_margin`` (the first version always becomes champion); the replaced champion
becomes ``@previous-champion`` so :func:`rollback` can restore it. Every decision, with both
metric values and the reason, is written to the challenger version's tags.

Registering (:mod:`detailfusion.registry.registration`) and reading versions
(:mod:`detailfusion.registry.versions`) live beside this module.

Promotions and roll-backs hold a server-side lock (:mod:`detailfusion.registry.lock`), so
concurrent callers never leave two champions, none, or a ``@previous-champion`` that does not
match the promotion history.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from detailfusion.config import repo_default
from detailfusion.registry.config import RegistryConfig
from detailfusion.registry.lock import PromotionLock, RegistryError
from detailfusion.registry.versions import ALIAS_CHALLENGER, ALIAS_CHAMPION, ALIAS_PREVIOUS, Registry, now_iso


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
    cfg = config or repo_default(RegistryConfig, "registry")
    reg = Registry(client, cfg)
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
                            c.version if c else None, c_val, ch_ver, ch_val, after, prev_after, now_iso())  # fmt: skip

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
    cfg = config or repo_default(RegistryConfig, "registry")
    reg = Registry(client, cfg)
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
                          older if older_ok else None, now_iso())  # fmt: skip
        if champion is not None:
            # its promotion no longer stands: `registry list` must not keep showing "promoted"
            reg.set_tags(name, champion.version, {"promotion.decision": "rolled-back",
                                                  "rollback.replaced_by": previous.version,
                                                  "rollback.at": result.decided_at})  # fmt: skip
        reg.set_tags(name, previous.version, {"rollback.restored_from": result.rolled_back_version,
                                              "rollback.at": result.decided_at})  # fmt: skip
        return result
