"""Reader for CIRR (rc2) in its published layout, into the canonical manifests.

Layouts understood (``docs/data-formats.md``, "CIRR (version rc2)"):

* official: ``root/{captions,image_splits}`` with images under ``root/img_raw/{train/<k>,dev,test1}``
  or directly under ``root/{train/<k>,dev,test1}``;
* CLIP4Cir/SPRC: ``cirr_dataset/cirr/{captions,image_splits}`` with images under
  ``cirr_dataset/{train/<k>,dev,test1}``; ``root`` may be either ``cirr_dataset`` or its ``cirr``;
* any other place for the images, given as ``image_root``.

The gallery of a split is its ``split.rc2.<split>.json`` (never a folder glob). Image paths are
resolved from that file's relative paths, falling back to a basename index when the relative
path is missing (the URL-download route has no ``train/<k>`` sub-folders). Test records carry no
target; ``target_soft`` is kept verbatim as JSON text because it is noisy, and
``reference_rank``/``target_rank`` are ignored (they are not indices into ``members``).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

from detailfusion.data.native import (
    SIDECAR_NAME,
    DirIndex,
    NativeDataset,
    basename_index,
    edit_type_list,
    expect_type,
    image_presence_warning,
    load_json,
    load_sidecar,
    no_split_found,
    relative_to_root,
    require_keys,
    split_file_pair,
    str_list,
)
from detailfusion.errors import DataFormatError

CIRR_SPLITS = ("train", "val", "test1")
VERSION = "rc2"
MEMBERS_PER_SET = 6
# The synthetic generator's held-out targets of the test splits: {split: {str(pairid): target}}.
# Real CIRR keeps test targets on its evaluation server, so real data has no such file.
TARGETS_SIDECAR = "synthetic_targets.json"


def read_cirr(
    root: str | Path,
    splits: list[str] | tuple[str, ...] | None = None,
    *,
    image_root: str | Path | None = None,
    version: str = VERSION,
) -> NativeDataset:
    """Read CIRR captions, split files and image locations below ``root``.

    ``splits`` defaults to all of train/val/test1; splits whose files are absent are skipped
    (a split file without its caption file gives a gallery-only split and a warning).
    """
    root = Path(root)
    wanted = _check_splits(root, splits)
    ann = _annotation_dir(root)
    warnings: list[str] = []

    present: list[tuple[str, Path | None, Path]] = []
    for split in wanted:
        pair = split_file_pair(ann / "captions" / f"cap.{version}.{split}.json",
                               ann / "image_splits" / f"split.{version}.{split}.json", f"split {split}", warnings)
        if pair is not None:
            present.append((split, *pair))
    if not present:
        raise no_split_found(root, f"captions/cap.{version}.<{'|'.join(wanted)}>.json and image_splits/")

    galleries = {split: _read_split_file(spl) for split, _, spl in present}
    sidecar_path, sidecar = load_sidecar([ann / SIDECAR_NAME, root / SIDECAR_NAME])
    targets_path, targets_sidecar = load_sidecar([ann / TARGETS_SIDECAR, root / TARGETS_SIDECAR])

    query_rows: list[dict] = []
    seen_pairids: dict[int, str] = {}
    for split, cap, _ in present:
        if cap is None:
            continue
        edits = _sidecar_for(sidecar_path, sidecar, split)
        rows = _read_captions(cap, split, seen_pairids, edits)
        if split.startswith("test"):
            _add_heldout_targets(targets_path, targets_sidecar, split, rows)
        query_rows.extend(rows)

    dirs = DirIndex()
    base = _image_base(root, ann, image_root, galleries, dirs)
    base_rel, base_str = relative_to_root(base, root), os.fspath(base)
    fallback: dict[str, Path] | None = None
    image_rows: list[dict] = []
    known: dict[str, bool] = {}
    for split, gallery in galleries.items():
        for name, rel in gallery.items():
            rel = posixpath.normpath(rel)
            found = dirs.exists(os.path.join(base_str, rel))
            rel_path = posixpath.join(base_rel, rel)
            if not found:
                if fallback is None:
                    fallback = basename_index(base)
                alt = fallback.get(posixpath.basename(rel))
                if alt is not None:
                    rel_path, found = relative_to_root(alt, root), True
            known[rel_path] = found
            image_rows.append(
                {"dataset": "cirr", "split": split, "category": "", "image_id": name, "path": rel_path}
            )

    warnings += image_presence_warning(known, "gallery images", f"under {base}")
    return NativeDataset.from_rows("cirr", root, query_rows, image_rows, warnings=warnings, _known=known)


def _check_splits(root: Path, splits: list[str] | tuple[str, ...] | None) -> list[str]:
    if splits is None:
        return list(CIRR_SPLITS)
    unknown = [s for s in splits if s not in CIRR_SPLITS]
    if unknown:
        raise DataFormatError(root, f"unknown CIRR split(s) {unknown}; CIRR splits are {list(CIRR_SPLITS)}")
    return list(splits)


def _annotation_dir(root: Path) -> Path:
    """The folder holding ``captions/`` and ``image_splits/`` (``root`` or CLIP4Cir's ``root/cirr``)."""
    for cand in (root, root / "cirr"):
        if (cand / "captions").is_dir() or (cand / "image_splits").is_dir():
            return cand
    return root


def _read_split_file(path: Path) -> dict[str, str]:
    data = load_json(path)
    expect_type(path, data, dict, "top level (image name -> relative path)")
    for name, rel in data.items():
        expect_type(path, rel, str, f"path of image {name!r}", record=name)
    return data


def _image_base(
    root: Path, ann: Path, image_root: str | Path | None, galleries: dict[str, dict[str, str]], dirs: DirIndex
) -> Path:
    """Pick the folder the split files' relative paths resolve against: the candidate where most
    of them exist (official, ``img_raw``, or CLIP4Cir's parent folder)."""
    if image_root is not None:
        return Path(image_root)
    candidates = list(dict.fromkeys([ann, ann / "img_raw", ann.parent, root, root / "img_raw"]))
    best, best_count = ann, 0
    for cand in candidates:
        folder = os.fspath(cand)
        count = sum(
            dirs.exists(os.path.join(folder, rel))
            for gallery in galleries.values()
            for rel in gallery.values()
        )
        if count > best_count:
            best, best_count = cand, count
    return best


def _sidecar_for(path: Path | None, sidecar: dict, split: str) -> dict[str, list[str]]:
    if path is None or split not in sidecar:
        return {}
    entry = expect_type(path, sidecar[split], dict, f"entry {split!r} (pairid -> edit types)")
    return {str(k): edit_type_list(path, v, f"{split}/{k}") for k, v in entry.items()}


def _add_heldout_targets(path: Path | None, sidecar: dict, split: str, rows: list[dict]) -> None:
    """Fill ``target`` of a test split's queries from the held-out targets sidecar, when it covers the split.

    The sidecar must name a target for every query of the split: a partial held-out set would be
    scored on a silent subset.
    """
    if path is None or split not in sidecar:
        return
    entry = expect_type(path, sidecar[split], dict, f"entry {split!r} (pairid -> held-out target)")
    for row in rows:
        pid = row["query_id"]
        if pid not in entry:
            raise DataFormatError(path, f"no held-out target for {split} pairid {pid}", f"{split}/{pid}")
        row["target"] = expect_type(path, entry[pid], str, "held-out target", f"{split}/{pid}")
    extra = set(entry) - {row["query_id"] for row in rows}
    if extra:
        raise DataFormatError(path, f"{len(extra)} held-out target(s) for pairids not in {split}, "
                              f"e.g. {sorted(extra)[0]}", split)


def _read_captions(path: Path, split: str, seen: dict[int, str], edits: dict[str, list[str]]) -> list[dict]:
    data = load_json(path)
    expect_type(path, data, list, "top level (list of query records)")
    is_test = split.startswith("test")
    keys = ["pairid", "reference", "caption", "img_set"] + ([] if is_test else ["target_hard", "target_soft"])
    rows = []
    for i, rec in enumerate(data):
        rid: str = f"#{i}"
        require_keys(path, rec, keys, rid)
        pairid = expect_type(path, rec["pairid"], int, "pairid", rid)
        rid = f"#{i} pairid={pairid}"
        if pairid in seen:
            raise DataFormatError(path, f"duplicate pairid {pairid} (first seen in {seen[pairid]})", rid)
        seen[pairid] = f"{path} record #{i}"
        reference = expect_type(path, rec["reference"], str, "reference", rid)
        caption = expect_type(path, rec["caption"], str, "caption", rid)
        img_set = rec["img_set"]
        require_keys(path, img_set, ["id", "members"], f"{rid} img_set")
        set_id = expect_type(path, img_set["id"], int, "img_set.id", rid)
        members = str_list(path, img_set["members"], "img_set.members", rid)
        if len(members) != MEMBERS_PER_SET:
            raise DataFormatError(
                path, f"img_set.members must hold {MEMBERS_PER_SET} names, got {len(members)}", rid
            )
        target = target_soft = None
        if not is_test:
            target = expect_type(path, rec["target_hard"], str, "target_hard", rid)
            soft = expect_type(path, rec["target_soft"], dict, "target_soft", rid)
            for name, score in soft.items():
                expect_type(path, score, (int, float), f"target_soft[{name!r}]", rid)
            # Kept verbatim (key order and values): it is noisy and only a metric variant reads it.
            target_soft = json.dumps(soft, ensure_ascii=False)
        rows.append(
            {
                "dataset": "cirr",
                "split": split,
                "category": "",
                "query_id": str(pairid),
                "pairid": pairid,
                "reference": reference,
                "target": target,
                "target_soft": target_soft,
                "caption": caption,
                "captions": [caption],
                "members": members,
                "set_id": set_id,
                "group": str(set_id),
                "reference_caption": None,
                "target_caption": None,
                "edit_types": edits.get(str(pairid), []),
            }
        )
    return rows
