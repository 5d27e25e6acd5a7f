"""What every native-format reader returns, and the small helpers the readers share.

A reader (``cirr``, ``fashioniq``, ``ipr2pr``) turns a data set in its published layout into a
:class:`NativeDataset`: the canonical ``queries`` and ``images`` frames (``manifest.py``) plus
the knowledge of where each gallery image's bytes are. Readers raise
:class:`~detailfusion.errors.DataFormatError` for *structural* problems only (malformed JSON,
wrong types, missing keys, duplicate ids); problems about content (a caption naming an image
that is not in the split file, empty captions) stay in the frames for the ``validate`` stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from detailfusion.data.manifest import make_images, make_queries
from detailfusion.errors import DataFormatError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SIDECAR_NAME = "synthetic_edits.json"


@dataclass
class NativeDataset:
    """A data set read from its native files into the canonical manifests.

    ``images.path`` is relative to ``root`` for files, or ``{shard}#{row}/{column}`` for images
    embedded in parquet shards. ``open_image_bytes`` returns the encoded bytes of a gallery row
    and ``image_exists`` says whether they are there, without decoding anything.
    """

    name: str
    root: Path
    queries: pd.DataFrame
    images: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    # Hooks a reader sets when its images are not plain files under ``root``.
    _exists: Callable[[str], bool] | None = field(default=None, repr=False)
    _open: Callable[[str], bytes] | None = field(default=None, repr=False)
    _known: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def from_rows(
        cls, name: str, root: Path, query_rows: list[dict[str, Any]], image_rows: list[dict[str, Any]], **fields: Any
    ) -> NativeDataset:
        """A reader's result from its query and image rows (made canonical by ``manifest.py``);
        ``fields``: its ``warnings`` and image hooks."""
        return cls(name=name, root=root, queries=make_queries(query_rows), images=make_images(image_rows), **fields)

    def image_source(self, row: Any) -> str | Path:
        """A gallery row's file (a :class:`Path`) or, for embedded images, its ``shard#row/column`` ref."""
        rel = _row_path(row)
        if self._open is not None:
            return rel
        return self.root / rel

    def image_exists(self, row: Any) -> bool:
        """True when the row's image bytes are present (file exists / parquet cell not null).

        For files this is what the reader found when it listed the folders, not re-checked."""
        rel = _row_path(row)
        if rel in self._known:
            return self._known[rel]
        if self._exists is not None:
            return self._exists(rel)
        return (self.root / rel).is_file()

    def open_image_bytes(self, row: Any) -> bytes:
        """The encoded bytes of a gallery row's image; FileNotFoundError when they are absent."""
        rel = _row_path(row)
        if self._open is not None:
            return self._open(rel)
        return (self.root / rel).read_bytes()

    @property
    def embedded(self) -> bool:
        """True when image bytes live inside data files (parquet), not as one file per image."""
        return self._open is not None


def _row_path(row: Any) -> str:
    if isinstance(row, str | os.PathLike):
        return os.fspath(row)
    if isinstance(row, Mapping):
        return str(row["path"])
    if isinstance(row, pd.Series):
        return str(row["path"])
    return str(row.path)


# --------------------------------------------------------------------------- JSON


def load_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, f"not UTF-8 text: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def expect_type(
    path: Path, value: Any, kind: type | tuple[type, ...], what: str, record: str | int | None = None
) -> Any:
    """Raise a DataFormatError unless ``value`` is of ``kind`` (bools never count as ints)."""
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
    if not ok:
        names = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise DataFormatError(
            path, f"{what} must be {names}, got {type(value).__name__} {_short(value)}", record
        )
    return value


def require_keys(path: Path, rec: Any, keys: Iterable[str], record: str | int) -> dict:
    """Check that a record is an object holding ``keys``."""
    if not isinstance(rec, dict):
        raise DataFormatError(
            path, f"record must be an object, got {type(rec).__name__} {_short(rec)}", record
        )
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DataFormatError(path, f"missing required key(s) {missing}; has {sorted(rec)}", record)
    return rec


def str_list(path: Path, value: Any, what: str, record: str | int | None = None) -> list[str]:
    """Check a JSON list of strings."""
    expect_type(path, value, list, what, record)
    for i, v in enumerate(value):
        expect_type(path, v, str, f"{what}[{i}]", record)
    return list(value)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- sidecar


def load_sidecar(candidates: Iterable[Path]) -> tuple[Path | None, dict[str, Any]]:
    """Read the synthetic generator's edit-type sidecar (first candidate that exists), else ``{}``."""
    for path in candidates:
        if path.is_file():
            data = load_json(path)
            expect_type(path, data, dict, "top level")
            return path, data
    return None, {}


def edit_type_list(path: Path, value: Any, where: str) -> list[str]:
    """One sidecar entry: a list of edit-type strings."""
    return str_list(path, value, f"edit types of {where}")


def edit_types_per_item(path: Path | None, sidecar: dict, key: str, n_items: int, item: str) -> list[list[str]]:
    """Sidecar entry ``key``: the edit types of each of ``n_items`` items (records, rows), in order.

    ``[]`` when there is no sidecar or it has no such entry; a length mismatch is an error, never a
    silent misalignment.
    """
    if path is None or key not in sidecar:
        return []
    entry = expect_type(path, sidecar[key], list, f"entry {key!r} (edit types per {item})")
    if len(entry) != n_items:
        raise DataFormatError(path, f"entry {key!r} has {len(entry)} items for {n_items} {item}s")
    return [edit_type_list(path, v, f"{key}[{i}]") for i, v in enumerate(entry)]


# --------------------------------------------------------------------------- split files and images


def split_file_pair(cap: Path, spl: Path, label: str, warnings: list[str]) -> tuple[Path | None, Path] | None:
    """The (captions, split) files of one split: None when neither exists.

    The split file lists the gallery, so captions without it are an error; a split file without
    captions is a gallery-only split (a warning naming ``label``).
    """
    if not cap.is_file() and not spl.is_file():
        return None
    if not spl.is_file():
        raise DataFormatError(spl, f"split file missing while {cap.name} exists; the gallery comes from it")
    if not cap.is_file():
        warnings.append(f"{cap} absent: {label} has a gallery but no queries")
        return None, spl
    return cap, spl


def image_presence_warning(known: dict[str, bool], what: str, where: str) -> list[str]:
    """The warning for images listed but not found (``known``: path -> found), or none.

    ``what`` names the images ("gallery images", "image files"), ``where`` the place ("under x").
    """
    n_found = sum(known.values())
    if known and n_found == 0:
        return [f"images absent: none of the {len(known)} {what} found {where}"]
    if n_found < len(known):
        return [f"{len(known) - n_found} of {len(known)} {what} missing {where}"]
    return []


# --------------------------------------------------------------------------- file lookup


class DirIndex:
    """Existence checks through cached directory listings: one ``scandir`` per folder.

    Checking tens of thousands of image files one ``stat`` at a time is slow on network disks;
    listing each folder once is not, and an absent folder costs one failed call. Paths are plain
    strings here because pathlib objects dominate the cost at this scale.
    """

    def __init__(self) -> None:
        self._listing: dict[str, frozenset[str]] = {}

    def names(self, folder: str | os.PathLike) -> frozenset[str]:
        key = os.path.normpath(os.fspath(folder))
        listing = self._listing.get(key)
        if listing is None:
            try:
                with os.scandir(key) as it:
                    listing = frozenset(e.name for e in it if _entry_is_file(e))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                listing = frozenset()
            self._listing[key] = listing
        return listing

    def exists(self, path: str | os.PathLike) -> bool:
        folder, name = os.path.split(os.path.normpath(os.fspath(path)))
        return name in self.names(folder or ".")


def _entry_is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()`` that says False for a symlink loop instead of raising ELOOP (a dangling
    link is already False): neither is an image that can be read."""
    try:
        return entry.is_file()
    except OSError:
        return False


def basename_index(base: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """Map file name -> path for every image file below ``base`` (first in sorted walk order wins)."""
    index: dict[str, Path] = {}
    if not base.is_dir():
        return index
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(filenames):
            # os.path.isfile follows links: dangling links and link loops are not images
            if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(dirpath, name)):
                index.setdefault(name, Path(dirpath) / name)
    return index


def relative_to_root(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as a POSIX string (``..`` allowed), so manifests do not hold
    machine-specific absolute paths."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return "" if rel == "." else Path(rel).as_posix()


def no_split_found(root: Path, looked_for: str) -> DataFormatError:
    return DataFormatError(root, f"no split found: looked for {looked_for}")
