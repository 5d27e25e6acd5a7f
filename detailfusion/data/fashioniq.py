"""Reader for FashionIQ in its published layout, into the canonical manifests.

``root/captions/cap.<cat>.<split>.json`` (lists of ``{target, candidate, captions[2]}``; test
records have no target) and ``root/image_splits/split.<cat>.<split>.json`` (lists of ASINs, the
per-category gallery). Images are looked up as ``images/<asin>.jpg`` or ``.png`` (CLIP4Cir and
SPRC disagree on the extension), or in the starter kit's ``resized_images/<cat>/<asin>.jpg``,
or below an explicit ``image_root``.

Captions are kept raw (leading spaces, trailing dots, empty strings) in ``captions``; ``caption``
is CLIP4Cir's deterministic validation join so evaluation matches the leaderboards. The same ASIN
may appear in several categories and splits: it gets one gallery row per (category, split) and
the rows share one file.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from detailfusion.data.manifest import FIQ_CATEGORIES
from detailfusion.data.native import (
    SIDECAR_NAME,
    DirIndex,
    NativeDataset,
    edit_types_per_item,
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

FIQ_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".png")
CAPTIONS_PER_RECORD = 2


def join_captions(c1: str, c2: str) -> str:
    """CLIP4Cir/SPRC validation-time join of the two relative captions (kept bug-for-bug: an
    empty first caption gives a leading ``" and ..."``)."""
    return f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"


def read_fashioniq(
    root: str | Path,
    splits: list[str] | tuple[str, ...] | None = None,
    categories: list[str] | tuple[str, ...] | None = None,
    *,
    image_root: str | Path | None = None,
) -> NativeDataset:
    """Read FashionIQ captions, split files and image locations below ``root``.

    Category/split pairs whose files are both absent are skipped; a caption file without its
    split file is an error (the gallery comes from the split file), a split file without its
    caption file gives a gallery-only pair and a warning.
    """
    root = Path(root)
    wanted_splits = _check(root, splits, FIQ_SPLITS, "split")
    wanted_cats = _check(root, categories, FIQ_CATEGORIES, "category")
    warnings: list[str] = []

    present: list[tuple[str, str, Path | None, Path]] = []
    for split in wanted_splits:
        for cat in wanted_cats:
            pair = split_file_pair(root / "captions" / f"cap.{cat}.{split}.json",
                                   root / "image_splits" / f"split.{cat}.{split}.json", f"{cat}.{split}", warnings)
            if pair is not None:
                present.append((split, cat, *pair))
    if not present:
        raise no_split_found(
            root, "captions/cap.<category>.<split>.json and image_splits/split.<category>.<split>.json"
        )

    sidecar_path, sidecar = load_sidecar([root / SIDECAR_NAME])
    locator = _ImageLocator(root, image_root)
    query_rows: list[dict] = []
    image_rows: list[dict] = []
    known: dict[str, bool] = {}
    for split, cat, cap, spl in present:
        if cap is not None:
            query_rows.extend(_read_captions(cap, split, cat, sidecar_path, sidecar))
        asins = str_list(spl, load_json(spl), "top level (list of ASINs)")
        for asin in asins:
            rel, found = locator.locate(cat, asin)
            known[rel] = found
            image_rows.append(
                {"dataset": "fashioniq", "split": split, "category": cat, "image_id": asin, "path": rel}
            )

    warnings += image_presence_warning(known, "image files", f"below {image_root or root}")
    return NativeDataset.from_rows("fashioniq", root, query_rows, image_rows, warnings=warnings, _known=known)


def _check(
    root: Path, values: list[str] | tuple[str, ...] | None, allowed: tuple[str, ...], what: str
) -> list[str]:
    if values is None:
        return list(allowed)
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise DataFormatError(root, f"unknown FashionIQ {what}(s) {unknown}; allowed: {list(allowed)}")
    return list(values)


class _ImageLocator:
    """Finds an ASIN's file: flat ``images/`` first, then per-category folders, ``.jpg`` before ``.png``."""

    def __init__(self, root: Path, image_root: str | Path | None):
        self.root = root
        self.image_root = Path(image_root) if image_root is not None else None
        self.dirs = DirIndex()
        self._bases: dict[str, list[tuple[str, frozenset[str]]]] = {}

    def _bases_for(self, cat: str) -> list[tuple[str, frozenset[str]]]:
        if cat not in self._bases:
            if self.image_root is not None:
                folders = [self.image_root, self.image_root / cat]
            else:
                r = self.root
                folders = [r / "images", r / "resized_images" / cat, r / "data" / "resized_images" / cat]
            self._bases[cat] = [(relative_to_root(f, self.root), self.dirs.names(f)) for f in folders]
        return self._bases[cat]

    def locate(self, cat: str, asin: str) -> tuple[str, bool]:
        """(path relative to root, found); a missing image gets its expected flat-folder path."""
        bases = self._bases_for(cat)
        for base, names in bases:
            for ext in IMAGE_EXTENSIONS:
                if asin + ext in names:
                    return posixpath.join(base, asin + ext), True
        return posixpath.join(bases[0][0], asin + IMAGE_EXTENSIONS[0]), False


def _read_captions(path: Path, split: str, cat: str, sidecar_path: Path | None, sidecar: dict) -> list[dict]:
    data = load_json(path)
    expect_type(path, data, list, "top level (list of query records)")
    is_test = split.startswith("test")
    keys = ["candidate", "captions"] + ([] if is_test else ["target"])
    edits = edit_types_per_item(sidecar_path, sidecar, f"{cat}.{split}", len(data), "caption record")
    rows = []
    for i, rec in enumerate(data):
        require_keys(path, rec, keys, i)
        candidate = expect_type(path, rec["candidate"], str, "candidate", i)
        captions = str_list(path, rec["captions"], "captions", i)
        if len(captions) != CAPTIONS_PER_RECORD:
            raise DataFormatError(
                path, f"captions must hold {CAPTIONS_PER_RECORD} strings, got {len(captions)}", i
            )
        target = None if is_test else expect_type(path, rec["target"], str, "target", i)
        rows.append(
            {
                "dataset": "fashioniq",
                "split": split,
                "category": cat,
                "query_id": f"{cat}-{split}-{i:05d}",
                "pairid": None,
                "reference": candidate,
                "target": target,
                "target_soft": None,
                "caption": join_captions(captions[0], captions[1]),
                "captions": captions,
                "members": [],
                "set_id": None,
                "group": "",
                "reference_caption": None,
                "target_caption": None,
                "edit_types": edits[i] if edits else [],
            }
        )
    return rows


