"""Reader for InstructPix2Pix (IPr2Pr) edit triplets, into the canonical manifests.

Two layouts are detected automatically (``docs/data-formats.md``, "InstructPix2Pix (IPr2Pr)"):

* Hugging Face parquet shards (``root/data/*.parquet`` or ``root/*.parquet``) with image columns
  of type ``struct<bytes, path>`` (or plain binary). Column names differ between variants (the
  diffusers toy set says ``input_image``), so they are configurable through :class:`Ipr2prColumns`.
* The original release: ``seeds.json`` + ``<7-digit>/prompt.json`` (text key ``input`` or
  ``caption``, plus ``edit`` and ``output``) + ``<seed>_0.jpg`` / ``<seed>_1.jpg``.

A query is (reference = original image, caption = edit prompt, target = edited image). Images
are identified by the struct's ``path`` when the shard carries one (so one original shared by
several edits is one gallery image), else by ``{shard}-{row}-original|edited``. ``group`` (the
hard-negative group) is the original image id, or for path-less shards the original prompt,
which is how the IP2P authors group several seeds of one prompt. Everything is split ``train``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from detailfusion.data.native import (
    SIDECAR_NAME,
    DirIndex,
    NativeDataset,
    edit_types_per_item,
    expect_type,
    image_presence_warning,
    load_json,
    load_sidecar,
    require_keys,
)
from detailfusion.errors import DataFormatError

SPLIT = "train"
SEEDS_FILE = "seeds.json"


@dataclass(frozen=True)
class Ipr2prColumns:
    """Parquet column names. ``None`` for a prompt column means the shards do not have it.

    ``original_image=None`` (the default) takes ``original_image``, or ``input_image`` when only
    that exists (diffusers' ``fusing/instructpix2pix-1000-samples``).
    """

    original_image: str | None = None
    edited_image: str = "edited_image"
    edit_prompt: str = "edit_prompt"
    original_prompt: str | None = "original_prompt"
    edited_prompt: str | None = "edited_prompt"
    # Prompt columns named by default may be absent (the toy set has none); named ones may not.
    optional_prompts: bool = True


ORIGINAL_IMAGE_NAMES = ("original_image", "input_image")


def read_ipr2pr(
    root: str | Path,
    splits: list[str] | tuple[str, ...] | None = None,
    *,
    columns: Ipr2prColumns | None = None,
) -> NativeDataset:
    """Read IPr2Pr triplets below ``root`` (parquet shards or the ``seeds.json`` layout)."""
    root = Path(root)
    if splits is not None and SPLIT not in splits:
        raise DataFormatError(
            root, f"no split found: IPr2Pr has only split {SPLIT!r}, asked for {list(splits)}"
        )
    shards = find_shards(root)
    if shards:
        return _read_parquet(root, shards, columns or Ipr2prColumns())
    if (root / SEEDS_FILE).is_file():
        return _read_seeds(root)
    raise DataFormatError(
        root, "no split found: neither parquet shards (data/*.parquet, *.parquet) nor seeds.json"
    )


def find_shards(root: Path) -> list[Path]:
    """Parquet shards in ``root/data`` (the Hugging Face layout) or else directly in ``root``."""
    for folder in (root / "data", root):
        shards = sorted(p for p in folder.glob("*.parquet") if p.is_file())
        if shards:
            return shards
    return []


# --------------------------------------------------------------------------- parquet


def _read_parquet(root: Path, shards: list[Path], cols: Ipr2prColumns) -> NativeDataset:
    sidecar_path, sidecar = load_sidecar([root / SIDECAR_NAME, root / "data" / SIDECAR_NAME])
    query_rows: list[dict] = []
    image_rows: list[dict] = []
    image_index: dict[str, str] = {}  # image id -> ref of its first occurrence
    for shard in shards:
        shard_rel = shard.relative_to(root).as_posix()
        pf = _open_parquet(shard)
        names = _resolve_columns(shard, pf.schema_arrow, cols)
        n = pf.metadata.num_rows
        text = {
            role: _read_text(pf, col) if col else [None] * n
            for role, col in names.items()
            if "prompt" in role
        }
        paths = {role: _read_struct_paths(pf, names[role], n) for role in ("original_image", "edited_image")}
        edits = edit_types_per_item(sidecar_path, sidecar, shard.name, n, "row")
        stem = shard.stem
        for row in range(n):
            ids = {}
            for role, tag in (("original_image", "original"), ("edited_image", "edited")):
                p = paths[role][row]
                image_id = PurePosixPath(p).with_suffix("").as_posix() if p else f"{stem}-{row:06d}-{tag}"
                ids[role] = image_id
                if image_id not in image_index:
                    ref = f"{shard_rel}#{row}/{names[role]}"
                    image_index[image_id] = ref
                    image_rows.append(
                        {
                            "dataset": "ipr2pr",
                            "split": SPLIT,
                            "category": "",
                            "image_id": image_id,
                            "path": ref,
                        }
                    )
            original_prompt = text["original_prompt"][row]
            if paths["original_image"][row] or original_prompt is None:
                group = ids["original_image"]
            else:
                group = "prompt-" + hashlib.sha1(original_prompt.encode("utf-8")).hexdigest()[:16]
            query_rows.append(
                _query(
                    f"{stem}-{row}",
                    ids["original_image"],
                    ids["edited_image"],
                    text["edit_prompt"][row],
                    original_prompt,
                    text["edited_prompt"][row],
                    group,
                    edits[row] if edits else [],
                )
            )
    store = _ParquetImages(root)
    return NativeDataset.from_rows("ipr2pr", root, query_rows, image_rows, _exists=store.exists, _open=store.open)


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, f"not a readable parquet file: {exc}") from None


def _resolve_columns(shard: Path, schema: pa.Schema, cols: Ipr2prColumns) -> dict[str, str | None]:
    present = set(schema.names)
    have = sorted(present)
    if cols.original_image is None:
        original = next((c for c in ORIGINAL_IMAGE_NAMES if c in present), None)
        if original is None:
            raise DataFormatError(
                shard, f"missing required column {' or '.join(ORIGINAL_IMAGE_NAMES)}; has {have}"
            )
    else:
        original = cols.original_image
    names: dict[str, str | None] = {
        "original_image": original,
        "edited_image": cols.edited_image,
        "edit_prompt": cols.edit_prompt,
        "original_prompt": cols.original_prompt,
        "edited_prompt": cols.edited_prompt,
    }
    for role, col in names.items():
        if col is None or col in present:
            continue
        if role in ("original_prompt", "edited_prompt") and cols.optional_prompts:
            names[role] = None
            continue
        raise DataFormatError(shard, f"missing required column {col!r} ({role}); has {have}")
    for role in ("original_image", "edited_image"):
        _check_image_type(shard, names[role], schema.field(names[role]).type)
    for role in ("edit_prompt", "original_prompt", "edited_prompt"):
        col = names[role]
        if col is not None:
            t = schema.field(col).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
                raise DataFormatError(shard, f"column {col!r} must be string, got {t}")
    return names


def _check_image_type(shard: Path, col: str, t: pa.DataType) -> None:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return
    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        if "bytes" in fields and (
            pa.types.is_binary(fields["bytes"]) or pa.types.is_large_binary(fields["bytes"])
        ):
            return
    raise DataFormatError(
        shard, f"image column {col!r} must be struct<bytes: binary, path: string> or binary, got {t}"
    )


def _read_text(pf: pq.ParquetFile, col: str) -> list[str | None]:
    return pf.read(columns=[col]).column(0).to_pylist()


def _read_struct_paths(pf: pq.ParquetFile, col: str, n: int) -> list[str | None]:
    """The struct's ``path`` child only (no image bytes are read)."""
    t = pf.schema_arrow.field(col).type
    if not pa.types.is_struct(t) or t.get_field_index("path") < 0:
        return [None] * n
    return _read_child(pf, col, "path").to_pylist()


def _read_child(pf: pq.ParquetFile, col: str, child: str) -> pa.Array:
    """One child of a struct column as a flat array (a null struct gives a null child)."""
    arr = pf.read(columns=[f"{col}.{child}"]).column(0).combine_chunks()
    if pa.types.is_struct(arr.type):
        # flatten() (unlike field()) carries the struct's own nulls into the child.
        arr = arr.flatten()[arr.type.get_field_index(child)]
    return arr


def _query(
    query_id: str,
    reference: str,
    target: str,
    caption: str | None,
    ref_caption: str | None,
    tgt_caption: str | None,
    group: str,
    edit_types: list[str],
) -> dict:
    return {
        "dataset": "ipr2pr",
        "split": SPLIT,
        "category": "",
        "query_id": query_id,
        "pairid": None,
        "reference": reference,
        "target": target,
        "target_soft": None,
        "caption": caption,
        "captions": [caption] if caption is not None else [],
        "members": [],
        "set_id": None,
        "group": group,
        "reference_caption": ref_caption,
        "target_caption": tgt_caption,
        "edit_types": edit_types,
    }


class _ParquetImages:
    """Image bytes embedded in parquet shards, addressed as ``{shard}#{row}/{column}``.

    Reading one cell at a time would re-read a row group per image; the image columns of one
    shard are loaded once each and kept while consecutive lookups stay in that shard (prepare
    reads ``original_image`` and ``edited_image`` alternately, so one cached column would be
    reloaded for nearly every image).
    """

    def __init__(self, root: Path):
        self.root = root
        self._shard: str | None = None
        self._columns: dict[str, pa.Array] = {}

    def _column(self, shard_rel: str, col: str) -> pa.Array:
        if self._shard != shard_rel:
            self._shard, self._columns = shard_rel, {}
        if col not in self._columns:
            pf = _open_parquet(self.root / shard_rel)
            t = pf.schema_arrow.field(col).type
            if pa.types.is_struct(t):
                self._columns[col] = _read_child(pf, col, "bytes")
            else:
                self._columns[col] = pf.read(columns=[col]).column(0).combine_chunks()
        return self._columns[col]

    def _cell(self, ref: str) -> bytes | None:
        shard_rel, _, rest = ref.rpartition("#")
        row_text, _, col = rest.partition("/")
        if not shard_rel or not col or not row_text.isdigit():
            raise ValueError(f"not an embedded-image reference: {ref!r}")
        value = self._column(shard_rel, col)[int(row_text)].as_py()
        return value or None

    def exists(self, ref: str) -> bool:
        return self._cell(ref) is not None

    def open(self, ref: str) -> bytes:
        data = self._cell(ref)
        if data is None:
            raise FileNotFoundError(f"{ref}: no image bytes (null cell)")
        return data


# --------------------------------------------------------------------------- seeds.json layout


def _read_seeds(root: Path) -> NativeDataset:
    seeds_path = root / SEEDS_FILE
    data = load_json(seeds_path)
    expect_type(seeds_path, data, list, "top level (list of [prompt folder, [seeds]])")
    sidecar_path, sidecar = load_sidecar([root / SIDECAR_NAME])
    n_total = sum(len(e[1]) for e in data if isinstance(e, list) and len(e) == 2 and isinstance(e[1], list))
    edits = edit_types_per_item(sidecar_path, sidecar, SEEDS_FILE, n_total, "row") if sidecar else []
    dirs = DirIndex()
    query_rows: list[dict] = []
    image_rows: list[dict] = []
    known: dict[str, bool] = {}
    row = 0
    for i, entry in enumerate(data):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise DataFormatError(seeds_path, f"entry must be [prompt folder, [seeds]], got {entry!r:.60}", i)
        folder = expect_type(seeds_path, entry[0], str, "prompt folder", i)
        seeds = expect_type(seeds_path, entry[1], list, "seeds", i)
        prompt_path = root / folder / "prompt.json"
        prompt = require_keys(prompt_path, load_json(prompt_path), ["edit", "output"], folder)
        key = "input" if "input" in prompt else "caption"
        require_keys(prompt_path, prompt, [key], folder)
        texts = {k: expect_type(prompt_path, prompt[k], str, k, folder) for k in (key, "edit", "output")}
        for seed in seeds:
            expect_type(seeds_path, seed, (str, int), "seed", i)
            ids = []
            for tag in ("0", "1"):
                image_id = f"{folder}/{seed}_{tag}"
                rel = f"{image_id}.jpg"
                found = dirs.exists(root / rel)
                known[rel] = found
                ids.append(image_id)
                image_rows.append(
                    {"dataset": "ipr2pr", "split": SPLIT, "category": "", "image_id": image_id, "path": rel}
                )
            query_rows.append(
                _query(
                    f"{folder}-{seed}",
                    ids[0],
                    ids[1],
                    texts["edit"],
                    texts[key],
                    texts["output"],
                    folder,
                    edits[row] if edits else [],
                )
            )
            row += 1
    warnings = image_presence_warning(known, "image files", f"below {root}")
    return NativeDataset.from_rows("ipr2pr", root, query_rows, image_rows, warnings=warnings, _known=known)
