"""Galleries and query sets of a batch retrieval job, read from local paths or ``s3://`` URIs.

Galleries:

* a prepared data set (``data/prepared/cirr``: ``images.parquet`` + the ``pixels.npy`` cache) and a
  split (and a FashionIQ category): pixels come from the cache, no decoding;
* a folder of images (local or ``s3://bucket/prefix``), recursively; the image id is the path
  below the folder without its extension;
* a CIRR / FashionIQ data set in its native layout (``--gallery-format cirr|fashioniq``), read
  with the project's readers: the split file defines the gallery.

Query sets: parquet or JSONL with a reference column (``reference``/``reference_image``/``image``:
a gallery image id or an image path/URI) and a text column (``caption``/``text``), optional
``query_id``, ``target``, ``pairid``, ``members``; or a CIRR / FashionIQ captions file
(``cap.rc2.<split>.json``, ``cap.<category>.<split>.json``) read with the native readers.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from detailfusion.errors import DataFormatError, DetailFusionError
from detailfusion.retrieval.storage import (
    StorageError,
    describe,
    filesystem,
    is_remote,
    join,
    local_path,
    read_bytes,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
REFERENCE_COLUMNS = ("reference", "reference_image", "image")
TEXT_COLUMNS = ("caption", "text")


@dataclass
class Gallery:
    """Ordered gallery items: ids, where each one comes from, and how to get its pixels."""

    ids: list[str]
    sources: list[str]  # path/URI of the image file, or "<pixels.npy>#<row>" for the cache
    description: str
    pixels: np.ndarray | None = None  # the prepared cache (memmap), if the gallery comes from one
    pixel_index: np.ndarray | None = None  # row per item, -1 = quarantined by prepare
    dataset: str = ""
    split: str = ""
    endpoint: str | None = None
    _pos: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, image_id: str) -> int:
        """Index of ``image_id`` in the gallery, -1 when absent."""
        if not self._pos:
            self._pos = {name: i for i, name in enumerate(self.ids)}
        return self._pos.get(image_id, -1)

    def raw(self, i: int) -> bytes | np.ndarray:
        """The item's encoded bytes (files) or cached uint8 pixels (prepared); raises on failure."""
        if self.pixels is not None:
            row = int(self.pixel_index[i])
            if row < 0:
                raise DetailFusionError(f"{self.ids[i]}: quarantined by prepare (see quarantine.json)")
            return np.asarray(self.pixels[row])
        return read_bytes(self.sources[i], self.endpoint)


@dataclass
class QuerySet:
    """Queries in file order; ``reference`` is a gallery id or an image path/URI."""

    frame: pd.DataFrame  # query_id, reference, caption, target, pairid, members
    description: str
    protocol: str = "generic"  # "cirr" (reference excluded, submission files) | "fashioniq" | "generic"
    split: str = "custom"
    image_root: str = ""
    endpoint: str | None = None

    def __len__(self) -> int:
        return len(self.frame)


# --------------------------------------------------------------------------- galleries


def load_gallery(uri: str, *, fmt: str = "auto", split: str | None = None, category: str = "",
                 endpoint: str | None = None) -> Gallery:
    """The gallery at ``uri`` (see the module docs); ``fmt``: auto | prepared | folder | cirr | fashioniq."""
    if fmt == "auto":
        fmt = _guess_gallery_format(uri)
    if fmt == "prepared":
        return _prepared_gallery(uri, split or "val", category)
    if fmt in ("cirr", "fashioniq"):
        return _native_gallery(uri, fmt, split or "val", category)
    if fmt == "folder":
        return _folder_gallery(uri, endpoint)
    raise DetailFusionError(f"gallery format {fmt!r} unknown; use auto, prepared, folder, cirr or fashioniq")


def _guess_gallery_format(uri: str) -> str:
    if is_remote(uri):
        return "folder"
    path = local_path(uri)
    if not path.exists():
        raise DataFormatError(path, "gallery not found")
    if (path / "images.parquet").is_file() and (path / "pixels.npy").is_file():
        return "prepared"
    for ann in (path, path / "cirr"):
        if list(ann.glob("image_splits/split.rc2.*.json")):
            return "cirr"
    if list(path.glob("image_splits/split.*.*.json")):
        return "fashioniq"
    return "folder"


def _prepared_gallery(uri: str, split: str, category: str) -> Gallery:
    from detailfusion.data.prepared import load_prepared

    path = local_path(uri)
    if is_remote(uri):
        raise DetailFusionError(f"{uri}: a prepared gallery must be local (its pixel cache is memory-mapped)")
    prepared = load_prepared(path.parent, path.name)
    try:
        ids, index = prepared.gallery(split, category)
    except KeyError as exc:
        raise DataFormatError(path / "images.parquet", str(exc.args[0])) from None
    sources = [f"{path / 'pixels.npy'}#{int(r)}" for r in index]
    return Gallery(list(ids), sources, f"prepared {path} ({split}{'/' + category if category else ''})",
                   pixels=prepared.pixels, pixel_index=np.asarray(index), dataset=prepared.name, split=split)


def _native_gallery(uri: str, fmt: str, split: str, category: str) -> Gallery:
    if is_remote(uri):
        raise DetailFusionError(f"{uri}: native-format galleries are read from a local copy (sync it first)")
    ds = _read_native(local_path(uri), fmt, split, category)
    images = ds.images[ds.images["split"] == split]
    if category:
        images = images[images["category"] == category]
    if images.empty:
        raise DataFormatError(uri, f"no {fmt} gallery for split {split!r}" + (f" category {category!r}" if category else ""))
    sources = [str(ds.root / p) for p in images["path"]]
    return Gallery(images["image_id"].tolist(), sources, f"{fmt} {uri} ({split})", dataset=fmt, split=split)


def _read_native(root: Path, fmt: str, split: str, category: str):
    if fmt == "cirr":
        from detailfusion.data.cirr import read_cirr

        return read_cirr(root, [split])
    from detailfusion.data.fashioniq import read_fashioniq

    return read_fashioniq(root, [split], [category] if category else None)


def _folder_gallery(uri: str, endpoint: str | None) -> Gallery:
    fs, root = filesystem(uri, endpoint)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        raise DataFormatError(uri, "gallery folder not found") from None
    except Exception as exc:
        raise StorageError(f"{uri}: cannot list the gallery: {describe(exc)}") from None
    files = sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataFormatError(uri, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the gallery folder")
    prefix = root.rstrip("/") + "/"
    ids = [str(Path(f[len(prefix):]).with_suffix("")) for f in files]
    if is_remote(uri):
        scheme = str(uri).split("://", 1)[0]
        sources = [f"{scheme}://{f}" for f in files]
    else:
        sources = files
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise DataFormatError(uri, f"two files give the image id {dup.iloc[0]!r} (same name, other extension)")
    return Gallery(ids, sources, f"folder {uri}", endpoint=endpoint)


# --------------------------------------------------------------------------- query sets

_CIRR_CAPTIONS = re.compile(r"^cap\.rc2\.(?P<split>[^.]+)\.json$")
_FIQ_CAPTIONS = re.compile(r"^cap\.(?P<category>dress|shirt|toptee)\.(?P<split>[^.]+)\.json$")


def load_queries(uri: str, *, image_root: str | None = None, endpoint: str | None = None) -> QuerySet:
    """The query set at ``uri``: parquet / JSONL, or a CIRR / FashionIQ captions file."""
    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    if m := _CIRR_CAPTIONS.match(name):
        return _native_queries(uri, "cirr", m["split"], "")
    if m := _FIQ_CAPTIONS.match(name):
        return _native_queries(uri, "fashioniq", m["split"], m["category"])
    data = read_bytes(uri, endpoint)
    try:
        if name.endswith(".parquet"):
            frame = pd.read_parquet(io.BytesIO(data))
        elif name.endswith((".jsonl", ".json")):
            frame = pd.read_json(io.BytesIO(data), lines=name.endswith(".jsonl"))
        else:
            raise DataFormatError(uri, "query set must be .parquet, .jsonl or a CIRR/FashionIQ captions file")
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(uri, f"not a readable query file: {describe(exc)}") from None
    root = image_root if image_root is not None else str(uri).rsplit("/", 1)[0] if "/" in str(uri) else "."
    frame = _canonical_queries(frame, uri)
    protocol = "cirr" if frame["pairid"].notna().all() and frame["members"].map(len).gt(0).all() else "generic"
    return QuerySet(frame, f"queries {uri}", protocol=protocol, image_root=root, endpoint=endpoint)


def _canonical_queries(frame: pd.DataFrame, uri: str) -> pd.DataFrame:
    ref_col = next((c for c in REFERENCE_COLUMNS if c in frame.columns), None)
    text_col = next((c for c in TEXT_COLUMNS if c in frame.columns), None)
    if ref_col is None or text_col is None:
        raise DataFormatError(uri, f"query set needs a reference column (one of {list(REFERENCE_COLUMNS)}) "
                                   f"and a text column (one of {list(TEXT_COLUMNS)}); has {list(frame.columns)}")
    n = len(frame)
    if n == 0:
        raise DataFormatError(uri, "query set is empty")
    out = pd.DataFrame({
        "query_id": frame["query_id"].astype(str) if "query_id" in frame.columns else [str(i) for i in range(n)],
        "reference": frame[ref_col].astype(str),
        "caption": frame[text_col],
        "target": frame["target"] if "target" in frame.columns else None,
        "pairid": frame["pairid"] if "pairid" in frame.columns else None,
        "members": [list(m) if isinstance(m, list | tuple | np.ndarray) else [] for m in frame["members"]]
        if "members" in frame.columns else [[] for _ in range(n)],
    })
    bad = [i for i, c in enumerate(out["caption"]) if not isinstance(c, str)]
    if bad:
        raise DataFormatError(uri, f"text is not a string ({out['caption'].iloc[bad[0]]!r})", record=bad[0])
    dup = out["query_id"][out["query_id"].duplicated()]
    if len(dup):
        raise DataFormatError(uri, f"query_id {dup.iloc[0]!r} occurs twice")
    out["target"] = [t if isinstance(t, str) else None for t in out["target"]]
    return out


def _native_queries(uri: str, fmt: str, split: str, category: str) -> QuerySet:
    if is_remote(uri):
        raise DetailFusionError(f"{uri}: native-format captions are read from a local copy (sync it first)")
    path = local_path(uri)
    if not path.is_file():
        raise DataFormatError(path, "captions file not found")
    ds = _read_native(path.parent.parent, fmt, split, category)  # <root>/captions/<file>
    q = ds.queries[(ds.queries["split"] == split) & (ds.queries["category"] == category)].reset_index(drop=True)
    frame = pd.DataFrame({
        "query_id": q["query_id"].astype(str),
        "reference": q["reference"],
        "caption": q["caption"],
        "target": [t if isinstance(t, str) else None for t in q["target"]],
        "pairid": q["pairid"],
        "members": [list(m) for m in q["members"]],
    })
    return QuerySet(frame, f"{fmt} captions {uri}", protocol=fmt, split=split, image_root=str(ds.root))


__all__ = ["Gallery", "QuerySet", "load_gallery", "load_queries", "join"]
