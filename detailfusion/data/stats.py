"""Counts for a data set in a native format (``detailfusion data stats``), without decoding images.

It reads the annotations with the format's reader and only checks whether each image file is
there (for CIRR it adds how queries use the 6-image sets: :func:`cirr_structure`), so it runs in seconds on the real annotation files even when no image is present, and
says so (``images_absent``) instead of failing. ``prepare`` reuses :func:`breakdown` for the
per-split counts of its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detailfusion.data import get_reader
from detailfusion.data.native import NativeDataset
from detailfusion.errors import ConfigError


def dataset_stats(
    fmt: str, root: str | Path, split: str | None = None, category: str | None = None
) -> dict[str, Any]:
    """JSON-able counts for the data set at ``root`` in format ``fmt`` (optionally one split/category)."""
    reader = get_reader(fmt)
    kwargs: dict[str, Any] = {}
    if split is not None:
        kwargs["splits"] = [split]
    if category is not None:
        if fmt != "fashioniq":
            raise ConfigError(f"--category applies to fashioniq only, not {fmt}")
        kwargs["categories"] = [category]
    ds = reader(Path(root), **kwargs)
    found = image_presence(ds)
    counts = breakdown(ds.queries, ds.images, found)
    unique = ds.images.assign(found=found).drop_duplicates("path")
    n_found = int(unique["found"].sum())
    out = {
        "format": fmt,
        "root": str(root),
        "split": split,
        "category": category,
        "splits": counts,
        "total": {
            **_counts(ds.queries, ds.images, found),
            "unique_image_files": len(unique),
            "image_files_found": n_found,
            "image_files_missing": len(unique) - n_found,
        },
        "images_absent": bool(len(unique)) and n_found == 0,
        "warnings": list(ds.warnings),
    }
    if fmt == "cirr":
        for name, entry in counts.items():
            structure = cirr_structure(ds.queries[ds.queries["split"] == name], ds.images[ds.images["split"] == name])
            if structure:
                entry["structure"] = structure
    return out


def cirr_structure(queries: pd.DataFrame, images: pd.DataFrame) -> dict[str, Any]:
    """How a CIRR split's queries use its 6-image sets, from the annotations alone.

    ``shared_image_fraction`` is the share of the split's gallery images that are members of more
    than one set (real CIRR val: 549 of 2,297). Empty for a split without queries.
    """
    if queries.empty:
        return {}
    members: dict[int, set[str]] = {}
    references: dict[int, set[str]] = {}
    for set_id, names, ref in zip(queries["set_id"], queries["members"], queries["reference"], strict=True):
        members.setdefault(int(set_id), set()).update(names)
        references.setdefault(int(set_id), set()).add(ref)
    sets_of: dict[str, int] = {}
    for names in members.values():
        for name in names:
            sets_of[name] = sets_of.get(name, 0) + 1
    gallery = set(images["image_id"])
    shared = sum(1 for name in gallery if sets_of.get(name, 0) > 1)
    n_sets = len(members)
    return {
        "sets": n_sets,
        "queries_per_set": round(len(queries) / n_sets, 3),
        "images_per_set": round(sum(len(m) for m in members.values()) / n_sets, 3),
        "references_per_set": round(sum(len(r) for r in references.values()) / n_sets, 3),
        "shared_images": shared,
        "shared_image_fraction": round(shared / len(gallery), 4) if gallery else 0.0,
        "gallery_images_in_no_set": len(gallery - set(sets_of)),
    }


def image_presence(ds: NativeDataset) -> np.ndarray:
    """Per gallery row: are the image bytes there? (one check per distinct file)"""
    cache: dict[str, bool] = {}
    out = np.zeros(len(ds.images), dtype=bool)
    for i, path in enumerate(ds.images["path"]):
        if path not in cache:
            cache[path] = ds.image_exists(path)
        out[i] = cache[path]
    return out


def breakdown(
    queries: pd.DataFrame, images: pd.DataFrame, found: np.ndarray, ok: np.ndarray | None = None
) -> dict[str, dict[str, Any]]:
    """Counts per split, and per category inside a split when the data set has categories."""
    out: dict[str, dict[str, Any]] = {}
    splits = list(dict.fromkeys(list(images["split"]) + list(queries["split"])))
    for split in splits:
        qm = (queries["split"] == split).to_numpy()
        im = (images["split"] == split).to_numpy()
        entry = _counts(queries[qm], images[im], found[im], None if ok is None else ok[im])
        cats = [
            c
            for c in dict.fromkeys(list(images.loc[im, "category"]) + list(queries.loc[qm, "category"]))
            if c
        ]
        if cats:
            entry["categories"] = {}
            for cat in cats:
                qc = qm & (queries["category"] == cat).to_numpy()
                ic = im & (images["category"] == cat).to_numpy()
                entry["categories"][cat] = _counts(
                    queries[qc], images[ic], found[ic], None if ok is None else ok[ic]
                )
        out[split] = entry
    return out


def _counts(
    q: pd.DataFrame, im: pd.DataFrame, found: np.ndarray, ok: np.ndarray | None = None
) -> dict[str, int]:
    empty = sum(1 for caps in q["captions"] for c in caps if not c.strip()) + int(q["caption"].isna().sum())
    counts = {
        "queries": len(q),
        "queries_without_target": int(q["target"].isna().sum()),
        "empty_captions": empty,
        "gallery_images": len(im),
        "images_found": int(np.sum(found)),
        "images_missing": len(im) - int(np.sum(found)),
    }
    if ok is not None:
        counts["quarantined"] = len(im) - int(np.sum(ok))
    return counts
