"""Recall@K curves per model variant, as a DVC-plots CSV and a PNG.

The CSV is wide: one row per K and one column per series (``k,model,gm,di,reference_only,
text_only,pixel_reference``), so ``dvc plots show`` draws each series as its own line (``dvc.yaml``
lists the columns as the plot's ``y``); a series a variant lacks (``di`` of ``gm_only``) is left
empty. The per-edit-type breakdown is a second CSV for a bar plot. The PNG is drawn with matplotlib's Agg canvas, which needs
no display and leaves the global backend untouched.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detailfusion.eval.metrics import EvalInputError
from detailfusion.fsutil import atomic_path

# Every series the evaluate stage can draw, in this column order (dvc.yaml's plot lists them).
SERIES = ("model", "gm", "di", "reference_only", "text_only", "pixel_reference")
EDIT_TYPE_COLUMNS = ("edit_type", "queries", "R@1", "Rsub@1")


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


def recall_curve_table(curves: Mapping[str, Mapping[int, float]]) -> tuple[list[str], list[dict[str, object]]]:
    """``{series: {K: recall}}`` -> (columns, rows) of the wide CSV: ``k`` then one column per series
    (the known :data:`SERIES` first, in order, then any other), ``""`` where a series has no point."""
    rows_long = recall_curve_rows(curves)
    names = [s for s in SERIES if s in curves] + [str(s) for s in curves if s not in SERIES]
    columns = ["k", *SERIES, *[n for n in names if n not in SERIES]]
    by_k: dict[int, dict[str, object]] = {}
    for row in rows_long:
        by_k.setdefault(int(row["k"]), {c: "" for c in columns} | {"k": int(row["k"])})[str(row["variant"])] = row["recall"]
    return columns, [by_k[k] for k in sorted(by_k)]


def _write_csv_atomic(path: Path, columns: list[str] | tuple[str, ...], rows: list[dict[str, object]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_edit_type_breakdown(by_edit_type: Mapping[str, Mapping[str, float]], out_csv: str | Path) -> Path:
    """One row per edit type (``edit_type,queries,R@1,Rsub@1``) for DVC's bar plot."""
    rows = [{"edit_type": name, "queries": int(v.get("n", v.get("queries", 0))), "R@1": v.get("R@1", ""),
             "Rsub@1": v.get("Rsub@1", "")} for name, v in sorted(by_edit_type.items())]  # fmt: skip
    out_csv = Path(out_csv)
    _write_csv_atomic(out_csv, EDIT_TYPE_COLUMNS, rows)
    return out_csv


def write_recall_curves(
    curves: Mapping[str, Mapping[int, float]], out_csv: str | Path, out_png: str | Path | None = None
) -> tuple[Path, Path | None]:
    """Write the curves as CSV (and PNG when ``out_png`` is given); returns the written paths."""
    columns, rows = recall_curve_table(curves)
    out_csv = Path(out_csv)
    _write_csv_atomic(out_csv, columns, rows)
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
