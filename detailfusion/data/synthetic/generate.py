"""Write the whole synthetic benchmark (CIRR, FashionIQ, IPr2Pr native formats) atomically.

Everything is generated into a temporary folder beside ``out`` and swapped in at the end, so a
failed or interrupted run never leaves a half-written ``out`` and an existing good ``out``
survives. Same config and seed give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from detailfusion.config import to_dict
from detailfusion.data.cirr import TARGETS_SIDECAR
from detailfusion.data.synthetic import render
from detailfusion.data.synthetic.cirr import CirrSplit, build_split
from detailfusion.data.synthetic.config import SynthConfig
from detailfusion.data.synthetic.fashioniq import SPLITS as FIQ_SPLITS
from detailfusion.data.synthetic.fashioniq import FiqData, build_fashioniq
from detailfusion.data.synthetic.garments import CATEGORIES, FIQ_EDITS
from detailfusion.data.synthetic.ipr2pr import build_ipr2pr, write_shards
from detailfusion.data.synthetic.scenes import DETAIL_EDITS, GLOBAL_EDITS
from detailfusion.errors import ConfigError
from detailfusion.fsutil import replace_dir

FORMAT_VERSION = 1
MARKER = "SYNTHETIC.json"  # written last; its presence marks a folder as this generator's output
CIRR_SPLITS = ("train", "val", "test1")


def _dump_json(path: Path, obj: Any, *, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path exists and is not a folder")
    # The run replaces ``out`` as a whole, so refuse to replace a folder this generator did not write.
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out}: folder exists, is not empty and has no {MARKER}; refusing to replace it")


def generate(cfg: SynthConfig, out: Path, progress: bool = True, *, workers: int | None = None) -> dict:
    """Write ``out/cirr``, ``out/fashioniq``, ``out/ipr2pr`` and ``out/SYNTHETIC.json``.

    ``workers``: render processes (default: one per available core; 1 renders in-process).
    Returns a JSON-able summary with the counts per split, the size and the seconds taken.
    """
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"synthesize: {exc}") from exc
    out = Path(out)
    _check_out(out)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a leftover of an earlier run of this same process id
    tmp.mkdir()
    try:
        counts = _write_all(cfg, tmp, progress, render.default_workers() if workers is None else workers)
        size = _tree_size(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "seed": cfg.seed,
        "counts": counts,
        "megabytes": round(size / 2**20, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _tree_size(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):
        total += sum(os.stat(os.path.join(base, f)).st_size for f in files)
    return total


def _write_all(cfg: SynthConfig, root: Path, progress: bool, workers: int) -> dict[str, Any]:
    c, f, p = cfg.cirr, cfg.fashioniq, cfg.ipr2pr
    n_cirr = {"train": c.train_queries, "val": c.val_queries, "test1": c.test1_queries}
    fiq_per_split = {"train": f.train_per_category, "val": f.val_per_category, "test": f.test_per_category}

    # 1. Content (scenes, garments, captions) from per-split random streams; cheap next to drawing.
    total = sum(n_cirr.values()) + len(CATEGORIES) * sum(fiq_per_split.values()) + p.originals
    with tqdm(total=total, desc="synthesize: content", unit="q", disable=not progress) as bar:
        cirr = {s: build_split(cfg.seed, s, n_cirr[s], c.queries_per_set, c.two_edit_fraction, c.shared_fraction,
                               bar.update)
                for s in CIRR_SPLITS}
        fiq = build_fashioniq(cfg.seed, fiq_per_split, f.shared_fraction, bar.update)
        ip = build_ipr2pr(cfg.seed, p.originals, p.edits_per_original, bar.update)

    # 2. Draw every image (in worker processes when there are many).
    cirr_root, fiq_root, ip_root = root / "cirr", root / "fashioniq", root / "ipr2pr"
    jobs: list[render.Job] = []
    for s in CIRR_SPLITS:
        jobs.extend(("scene", scene, f"cirr/{rel}") for rel, scene in cirr[s].images)
    jobs.extend(("garment", g, f"fashioniq/images/{asin}.png") for asin, g in fiq.images.items())
    n_files = len(jobs)
    for folder in sorted({os.path.dirname(job[2]) for job in jobs if job[2]}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    jobs.extend(("scene", scene, None) for scene in ip.originals)
    jobs.extend(("scene", row.edited, None) for row in ip.rows)
    with tqdm(total=len(jobs), desc="synthesize: images", unit="img", disable=not progress) as bar:
        pngs = render.render_jobs(jobs, root, cfg.image_size, cfg.render_scale, workers=workers,
                                  on_progress=bar.update)
    ip_bytes = pngs[n_files:]
    original_png = [b for b in ip_bytes[: len(ip.originals)] if b is not None]
    edited_png = [b for b in ip_bytes[len(ip.originals) :] if b is not None]

    # 3. Annotations in the native formats, sidecars, and the marker file last.
    counts: dict[str, Any] = {
        "cirr": _write_cirr(cirr_root, cirr),
        "fashioniq": _write_fiq(fiq_root, fiq),
        "ipr2pr": {"originals": len(ip.originals), "rows": len(ip.rows), "shards": p.shards},
    }
    ip_sidecar = write_shards(ip_root, ip, original_png, edited_png, p.shards)
    _dump_json(ip_root / "synthetic_edits.json", ip_sidecar)
    counts["ipr2pr"]["files"] = sorted(ip_sidecar)
    _dump_json(
        root / MARKER,
        {
            "generator": "detailfusion.data.synthetic",
            "format_version": FORMAT_VERSION,
            "config": to_dict(cfg),
            "counts": counts,
            "edit_types": {
                "cirr": {"global": list(GLOBAL_EDITS), "detail": list(DETAIL_EDITS)},
                "fashioniq": list(FIQ_EDITS),
                "ipr2pr": list(DETAIL_EDITS),
            },
        },
        indent=2,
    )
    return counts


def _write_cirr(root: Path, splits: dict[str, CirrSplit]) -> dict[str, dict[str, int]]:
    counts = {}
    for s, sp in splits.items():
        _dump_json(root / "captions" / f"cap.rc2.{s}.json", sp.records)
        _dump_json(root / "image_splits" / f"split.rc2.{s}.json", sp.split_map)
        counts[s] = {"queries": len(sp.records), "images": len(sp.split_map), "sets": sp.n_sets}
    _dump_json(root / "synthetic_edits.json", {s: sp.edits for s, sp in splits.items()})
    # The held-out targets of the test splits, which the official files do not carry.
    _dump_json(root / TARGETS_SIDECAR, {s: sp.targets for s, sp in splits.items() if sp.targets})
    return counts


def _write_fiq(root: Path, data: FiqData) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    sidecar = {}
    for cat in CATEGORIES:
        for s in FIQ_SPLITS:
            f = data.files[f"{cat}.{s}"]
            _dump_json(root / "captions" / f"cap.{cat}.{s}.json", f.records)
            _dump_json(root / "image_splits" / f"split.{cat}.{s}.json", f.split_list)
            sidecar[f"{cat}.{s}"] = f.edits
            counts[f"{cat}.{s}"] = {"queries": len(f.records), "images": len(f.split_list)}
    _dump_json(root / "synthetic_edits.json", sidecar)
    counts["unique_images"] = len(data.images)
    return counts
