"""The ``prepare`` stage: native data sets -> canonical manifests + a decoded image cache.

For each data set named in ``params.yaml: prepare.datasets`` it reads ``<root>/<name>`` with
that format's reader, decodes every distinct gallery image file exactly once (targetpad to
``image_size``; :mod:`detailfusion.data.decoding`), and writes ``<out>/<name>/``:

* ``queries.parquet`` and ``images.parquet`` (the manifests; images gain ``pixel_index``,
  ``width``, ``height`` and ``status``),
* ``pixels.npy``: uint8 ``[n_ok, S, S, 3]``, streamed to disk through a memory map,
* ``quarantine.json``: every missing or undecodable image with the exact reason,
* ``summary.json``: counts per split,

plus ``<out>/summary.json`` over all data sets. The run is atomic: everything is written into
a temporary folder beside ``out`` and swapped in only when all data sets succeeded, so a
structural error or Ctrl-C leaves the previous ``out`` as it was and no partial folder behind.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from detailfusion.data import get_reader
from detailfusion.data.config import PrepareConfig
from detailfusion.data.decoding import CORRUPT, MISSING, OK, conversion_counts, decode_all
from detailfusion.data.manifest import DATASETS, PREPARED_IMAGE_COLUMNS, QUERY_COLUMNS
from detailfusion.data.native import NativeDataset
from detailfusion.data.stats import breakdown
from detailfusion.errors import DataFormatError

log = logging.getLogger(__name__)

def run_prepare(
    cfg: PrepareConfig, root: str | Path, out: str | Path, progress: bool = True
) -> dict[str, Any]:
    """Prepare every data set of ``cfg.datasets`` from ``root/<name>`` into ``out``; returns the summary."""
    cfg.validate()
    root, out = Path(root), Path(out)
    for name in cfg.datasets:
        if not (root / name).is_dir():
            raise DataFormatError(root / name, f"data set folder not found (prepare.datasets lists {name!r})")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        per_dataset = {}
        for name in cfg.datasets:
            ds = get_reader(name)(root / name)
            per_dataset[name] = prepare_dataset(ds, tmp / name, cfg, progress=progress)
        summary = {
            "root": str(root),
            "image_size": cfg.image_size,
            "target_ratio": cfg.target_ratio,
            "max_image_pixels": cfg.max_image_pixels,
            "datasets": {
                name: {
                    k: s[k]
                    for k in (
                        "queries",
                        "gallery_images",
                        "unique_images",
                        "images_found",
                        "images_ok",
                        "quarantined",
                    )
                }
                for name, s in per_dataset.items()
            },
            "warnings": [f"{name}: {w}" for name, s in per_dataset.items() for w in s["warnings"]],
        }
        _keep_other_datasets(out, tmp, cfg, summary)
        _write_json(tmp / "summary.json", summary)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def prepare_dataset(
    ds: NativeDataset, dest: Path, cfg: PrepareConfig, progress: bool = True
) -> dict[str, Any]:
    """Write one data set's manifests, pixel cache, quarantine list and summary into ``dest``."""
    dest.mkdir(parents=True)
    images = ds.images.copy()
    paths = images["path"].tolist()
    unique = list(dict.fromkeys(paths))
    size = cfg.image_size

    pixels = np.lib.format.open_memmap(
        dest / "pixels.npy", mode="w+", dtype=np.uint8, shape=(len(unique), size, size, 3)
    )
    header_len = pixels.offset
    results: dict[str, tuple[str, str, int | None, int | None, int]] = {}
    n_ok = 0
    bar = tqdm(total=len(unique), desc=f"prepare {ds.name}", unit="img", disable=not progress)
    decoded = decode_all(ds, unique, size=size, target_ratio=cfg.target_ratio,
                         max_image_pixels=cfg.max_image_pixels, workers=cfg.workers)
    try:
        for path, (status, reason, w, h, arr) in zip(unique, decoded, strict=True):
            index = -1
            if status == OK:
                pixels[n_ok] = arr
                index = n_ok
                n_ok += 1
            results[path] = (status, reason, w, h, index)
            bar.update()
    finally:
        decoded.close()  # stops the worker pool at once on an error or Ctrl-C
        bar.close()
    pixels.flush()
    del pixels
    _shrink_npy(dest / "pixels.npy", header_len, (n_ok, size, size, 3))

    images["pixel_index"] = [results[p][4] for p in paths]
    images["width"] = pd.array([results[p][2] for p in paths], dtype="Int64")
    images["height"] = pd.array([results[p][3] for p in paths], dtype="Int64")
    images["status"] = [results[p][0] for p in paths]
    write_table(ds.queries, dest / "queries.parquet", QUERY_COLUMNS)
    write_table(images, dest / "images.parquet", PREPARED_IMAGE_COLUMNS)

    quarantine = _quarantine(images, results)
    _write_json(dest / "quarantine.json", quarantine)

    status = images["status"].to_numpy()
    found_unique = sum(1 for p in unique if results[p][0] != MISSING)
    warnings = list(ds.warnings)
    if unique and found_unique == 0 and not any(w.startswith("images absent") for w in warnings):
        warnings.append(f"images absent: all {len(unique)} image files missing; every image quarantined")
    for note, n in conversion_counts(results).items():
        warnings.append(f"{n} image(s) decoded with a conversion: {note} (see summary.json 'converted')")
    for w in warnings:
        log.warning("%s: %s", ds.name, w)
    summary = {
        "dataset": ds.name,
        "source": str(ds.root),
        "queries": len(ds.queries),
        "gallery_images": len(images),
        "unique_images": len(unique),
        "images_found": found_unique,
        "images_ok": n_ok,
        "quarantined": {
            MISSING: sum(1 for q in quarantine if q["status"] == MISSING),
            CORRUPT: sum(1 for q in quarantine if q["status"] == CORRUPT),
        },
        "converted": conversion_counts(results),
        "splits": breakdown(ds.queries, images, status != MISSING, status == OK),
        "warnings": warnings,
    }
    _write_json(dest / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- outputs


def write_table(df: pd.DataFrame, path: Path, columns: dict[str, str]) -> None:
    """Write a manifest frame as parquet with explicit arrow types (empty and all-null columns too)."""
    arrays = {}
    for col, dtype in columns.items():
        values = df[col].tolist()
        if dtype == "object":
            arrays[col] = pa.array([list(v) for v in values], type=pa.list_(pa.string()))
        elif dtype == "str":
            arrays[col] = pa.array([None if _isnull(v) else str(v) for v in values], type=pa.string())
        else:
            arrays[col] = pa.array([None if _isnull(v) else int(v) for v in values], type=pa.int64())
    pq.write_table(pa.table(arrays), path)


def _isnull(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _quarantine(images: pd.DataFrame, results: dict) -> list[dict[str, Any]]:
    bad = images[images["status"] != OK]
    entries: dict[str, dict[str, Any]] = {}
    for row in bad.itertuples(index=False):
        label = f"{row.category}.{row.split}" if row.category else row.split
        entry = entries.get(row.path)
        if entry is None:
            status, reason = results[row.path][:2]
            entry = entries[row.path] = {
                "image_id": row.image_id,
                "path": row.path,
                "splits": [],
                "status": status,
                "reason": reason,
            }
        if label not in entry["splits"]:
            entry["splits"].append(label)
    return list(entries.values())


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _npy_header(shape: tuple[int, ...], length: int) -> bytes:
    """A version 1.0 ``.npy`` header for uint8 C-order data, space-padded to exactly ``length`` bytes."""
    body = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    pad = length - (10 + len(body) + 1)
    if pad < 0:
        raise ValueError(f"npy header for shape {shape} does not fit in {length} bytes")
    return b"\x93NUMPY\x01\x00" + (len(body) + pad + 1).to_bytes(2, "little") + body + b" " * pad + b"\n"


def _shrink_npy(path: Path, header_len: int, shape: tuple[int, ...]) -> None:
    """Rewrite the shape in place and cut the file to the images that decoded.

    The memory map was sized for every distinct image before knowing which decode; rewriting
    the header (same length: fewer or equal digits) and truncating avoids copying the data.
    """
    with open(path, "r+b") as fh:
        fh.write(_npy_header(shape, header_len))
        fh.truncate(header_len + int(np.prod(shape)))


def _keep_other_datasets(out: Path, tmp: Path, cfg: PrepareConfig, summary: dict[str, Any]) -> None:
    """Carry the data sets this run did not prepare (e.g. ``datasets: [ipr2pr]`` into a folder that
    holds cirr/ and fashioniq/) over into the new folder unchanged (hard links: byte-identical,
    no copy), with their entries of the old ``summary.json``; the swap then replaces only what
    this run made."""
    if not out.is_dir():
        return
    try:
        old_summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old_summary = {}
    old_entries = old_summary.get("datasets", {}) if isinstance(old_summary, dict) else {}
    for name in DATASETS:
        if name in cfg.datasets or not (out / name).is_dir():
            continue
        shutil.copytree(out / name, tmp / name, copy_function=_link_or_copy)
        summary["datasets"][name] = old_entries.get(name, {"kept_from_previous_run": True})
        if (old_summary.get("image_size"), old_summary.get("target_ratio")) != (cfg.image_size, cfg.target_ratio):
            summary["warnings"].append(
                f"{name}: kept from the previous run, prepared with image_size {old_summary.get('image_size')} / "
                f"target_ratio {old_summary.get('target_ratio')}, not this run's {cfg.image_size} / {cfg.target_ratio}"
            )
    summary["datasets"] = {k: summary["datasets"][k] for k in DATASETS if k in summary["datasets"]}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` with ``tmp`` (the old one is moved aside first and restored on failure)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(out: Path) -> None:
    """Clean up after runs that were killed outright (their process is gone): delete their temp
    folders, and put back a previous ``out`` that was moved aside just before the swap."""
    for p in sorted(out.parent.glob(f".{out.name}.*-*-*")):
        kind, _, rest = p.name[len(out.name) + 2 :].partition("-")
        pid_text = rest.split("-", 1)[0]
        if (
            kind not in ("tmp", "old")
            or not pid_text.isdigit()
            or not p.is_dir()
            or _pid_alive(int(pid_text))
        ):
            continue
        if kind == "old" and not out.exists():
            os.rename(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
