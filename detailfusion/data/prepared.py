"""Loading what ``prepare`` wrote: manifests plus the memory-mapped pixel cache.

Training and evaluation read only this (never the native files):

    ds = load_prepared("data/prepared", "cirr")
    ids, idx = ds.gallery("val")            # split-file order; idx -1 marks a quarantined image
    ref = ds.pixels[ds.pixel_index("val", "dev-1-0-img0")]

Missing or inconsistent files raise a DataFormatError naming the file, so a half-copied
prepared folder fails at load time rather than as a shape error inside a training step.

The readers of the single files (:func:`read_manifest`, :func:`read_quarantine`,
:func:`open_pixels`) are also what the ``validate`` stage reads: it checks the cross-file
consistency that :func:`load_prepared` insists on as expectations with a report instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from detailfusion.data.manifest import LIST_COLUMNS, PREPARED_IMAGE_COLUMNS, QUERY_COLUMNS
from detailfusion.errors import DataFormatError, DetailFusionError
from detailfusion.fsutil import read_json_object


@dataclass
class PreparedDataset:
    """One prepared data set: ``queries``, ``images`` (with ``pixel_index``/``status``) and ``pixels``."""

    name: str
    path: Path
    queries: pd.DataFrame
    images: pd.DataFrame
    pixels: np.ndarray
    summary: dict[str, Any]
    _lookup: dict[tuple[str, str, str], int] = field(default_factory=dict, repr=False)

    def pixel_index(self, split: str, image_id: str, category: str = "") -> int:
        """Row of ``pixels`` for a gallery image (-1 if quarantined); KeyError if not in that gallery."""
        if not self._lookup:
            im = self.images
            self._lookup = dict(
                zip(
                    zip(im["split"], im["category"], im["image_id"], strict=True),
                    im["pixel_index"],
                    strict=True,
                )
            )
        key = (split, category, image_id)
        if key not in self._lookup:
            where = f"{split}/{category}" if category else split
            raise KeyError(f"{self.name}: image {image_id!r} is not in the {where} gallery")
        return int(self._lookup[key])

    def gallery(self, split: str, category: str = "") -> tuple[list[str], np.ndarray]:
        """(image ids, pixel indices) of one gallery in split-file order, quarantined ones included (-1)."""
        im = self.images
        sel = im[(im["split"] == split) & (im["category"] == category)]
        if sel.empty:
            have = sorted({f"{s}/{c}" if c else s for s, c in zip(im["split"], im["category"], strict=True)})
            raise KeyError(f"{self.name}: no gallery for split {split!r} category {category!r}; have {have}")
        return sel["image_id"].tolist(), sel["pixel_index"].to_numpy(dtype=np.int64)

    def split_queries(self, split: str, category: str | None = None) -> pd.DataFrame:
        """The queries of one split (of one category when given), in file order; an error when none."""
        q = self.queries
        q = q[q["split"] == split]
        if category is not None:
            q = q[q["category"] == category]
        if q.empty:
            raise DetailFusionError(f"{self.path}: no queries in split '{split}'" + (f" ({category})" if category else ""))
        return q.reset_index(drop=True)


def load_prepared(prepared_dir: str | Path, dataset: str) -> PreparedDataset:
    """Load ``prepared_dir/dataset`` as written by ``prepare``; checks the files agree."""
    path = Path(prepared_dir) / dataset
    if not path.is_dir():
        raise DataFormatError(path, "prepared data set not found (run `detailfusion data prepare` first)")
    queries = _typed(read_manifest(path / "queries.parquet", QUERY_COLUMNS), QUERY_COLUMNS)
    images = _typed(read_manifest(path / "images.parquet", PREPARED_IMAGE_COLUMNS), PREPARED_IMAGE_COLUMNS)
    summary = read_json_object(path / "summary.json")

    pixels_path = path / "pixels.npy"
    pixels = open_pixels(pixels_path)
    if (
        pixels.dtype != np.uint8
        or pixels.ndim != 4
        or pixels.shape[3] != 3
        or pixels.shape[1] != pixels.shape[2]
    ):
        raise DataFormatError(pixels_path, f"expected uint8 [n, S, S, 3], got {pixels.dtype} {pixels.shape}")
    n_ok = int((images["status"] == "ok").sum())
    top = int(images["pixel_index"].max()) if len(images) else -1
    if len(pixels) != len(images.loc[images["status"] == "ok", "path"].unique()) or top >= len(pixels):
        raise DataFormatError(
            pixels_path,
            f"holds {len(pixels)} images but images.parquet has {n_ok} ok rows (max pixel_index {top})",
        )
    return PreparedDataset(
        name=dataset, path=path, queries=queries, images=images, pixels=pixels, summary=summary
    )


def read_manifest(path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """A manifest (``queries.parquet``/``images.parquet``) as stored, every column kept; a
    DataFormatError when the file is absent or unreadable or lacks one of ``columns``."""
    if not path.is_file():
        raise DataFormatError(path, "file not found; run `detailfusion data prepare` first")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, f"not a readable parquet file: {exc}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataFormatError(path, f"missing column(s) {missing}")
    return table.to_pandas()


def read_quarantine(path: Path) -> list[dict[str, str]]:
    """The prepare stage's quarantine list as ``{image_id, path, reason}`` with ``reason`` = "status: why"."""
    if not path.is_file():
        raise DataFormatError(path, "file not found; run `detailfusion data prepare` first")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise DataFormatError(
            path, f"expected a JSON list of quarantined images, got {type(entries).__name__}"
        )
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_id"), str):
            raise DataFormatError(path, "entry must be an object with a string image_id", record=i)
        reason = ": ".join(str(entry[k]) for k in ("status", "reason") if entry.get(k))
        out.append({"image_id": entry["image_id"], "path": str(entry.get("path") or ""), "reason": reason})
    return out


def open_pixels(path: Path) -> np.ndarray:
    """``pixels.npy`` memory-mapped (only the header is read: the cache can be hundreds of MB)."""
    if not path.is_file():
        raise DataFormatError(path, "file not found; run `detailfusion data prepare` first")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataFormatError(path, f"not a readable .npy array: {exc}") from None


def _typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The manifest's ``columns`` only, list columns as Python lists, integer columns as ``columns`` says."""
    df = frame[list(columns)].copy()
    for col, dtype in columns.items():
        if col in LIST_COLUMNS:
            df[col] = [list(v) if v is not None else [] for v in df[col]]
        elif dtype in ("Int64", "int64"):
            df[col] = df[col].astype(dtype)
    return df
