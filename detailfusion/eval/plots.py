"""Recall@K curves per model variant, as a DVC-plots CSV and a PNG.

The CSV has one row per (variant, K) with columns ``variant,k,recall`` so ``dvc plots show``
can draw it (``x: k``, ``y: recall``); the PNG is drawn with matplotlib's Agg canvas, which needs
no display and leaves the global backend untouched.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detailfusion.eval.metrics import EvalInputError

CSV_COLUMNS = ("variant", "k", "recall")


def recall_curve_rows(curves: Mapping[str, Mapping[int, float]]) -> list[dict[str, object]]:
    """Flatten ``{variant: {K: recall}}`` into rows ``{"variant", "k", "recall"}``, K ascending per variant."""
    rows: list[dict[str, object]] = []
    for variant, curve in curves.items():
        for k in sorted(curve):
            recall = float(curve[k])
            if int(k) < 1 or not math.isfinite(recall):
                raise EvalInputError(f"recall curve {variant!r}: invalid point K={k!r}, recall={curve[k]!r}")
            rows.append({"variant": str(variant), "k": int(k), "recall": recall})
    return rows


def write_recall_curves(
    curves: Mapping[str, Mapping[int, float]], out_csv: str | Path, out_png: str | Path | None = None
) -> tuple[Path, Path | None]:
    """Write the curves as CSV (and PNG when ``out_png`` is given); returns the written paths."""
    rows = recall_curve_rows(curves)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_csv.parent, prefix=f".{out_csv.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, out_csv)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if out_png is None:
        return out_csv, None
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    for variant, curve in curves.items():
        ks = sorted(int(k) for k in curve)
        all_ks.update(ks)
        ax.plot(ks, [float(curve[k]) for k in sorted(curve)], marker="o", label=str(variant))
    if all_ks and max(all_ks) / min(all_ks) >= 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, format="png")
    return out_csv, out_png
