"""Statistics over per-query hits: bootstrap confidence intervals and per-group breakdowns.

The hits are the per-query boolean arrays of :func:`detailfusion.eval.metrics.cirr_hits` and
:func:`~detailfusion.eval.metrics.fiq_hits`; the results are in percent like the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detailfusion.eval.metrics import EvalInputError

MULTI_EDIT_KEY = "multi_edit"
NO_EDIT_KEY = "no_edit_type"

# Resampled entries held at once per block of bootstrap rows: 4M float64 = 32 MB.
_BOOT_ELEMENTS = 1 << 22


def bootstrap_ci(
    hits: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``100 * mean(hits)``, resampling queries.

    ``hits`` is a 1-D boolean (or numeric) array, one entry per query. For a *paired* difference
    between two models evaluated on the same queries pass ``a.astype(float) - b.astype(float)``:
    the interval is then in percentage points.
    """
    values = np.asarray(hits, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise EvalInputError(f"bootstrap_ci: hits must be a non-empty 1-D array, got shape {values.shape}")
    if not 0 < level < 1:
        raise EvalInputError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise EvalInputError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, _BOOT_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        stop = min(start + rows, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return 100.0 * float(low), 100.0 * float(high)


def breakdown_by(
    hits: Mapping[str, np.ndarray], keys: Sequence[Sequence[str]] | Sequence[str]
) -> dict[str, dict[str, float]]:
    """Metrics per group of queries, e.g. per edit type: ``{key: {metric: percent, ..., "n": count}}``.

    ``keys`` holds one entry per query: a string (e.g. a FashionIQ category) or a list of edit
    types. A list with one type counts under that type; a list with two or more types counts once
    under :data:`MULTI_EDIT_KEY` (``"multi_edit"``), so every query is in exactly one group and the
    groups' ``n`` sum to the number of queries; an empty list counts under :data:`NO_EDIT_KEY`.
    Groups are returned sorted by key.
    """
    n = len(keys)
    for metric, h in hits.items():
        if len(h) != n:
            raise EvalInputError(f"breakdown_by: metric {metric!r} has {len(h)} hits for {n} keys")
    groups = np.array([_group_key(k) for k in keys], dtype=object)
    out: dict[str, dict[str, float]] = {}
    for group in sorted(set(groups.tolist())):
        mask = groups == group
        row: dict[str, float] = {
            metric: 100.0 * float(np.mean(np.asarray(h)[mask])) for metric, h in hits.items()
        }
        row["n"] = int(mask.sum())
        out[group] = row
    return out


def _group_key(key: Sequence[str] | str) -> str:
    if isinstance(key, str):
        return key
    types = list(key)
    if not types:
        return NO_EDIT_KEY
    if len(types) == 1:
        return str(types[0])
    return MULTI_EDIT_KEY
