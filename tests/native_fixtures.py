"""Small hand-made data sets in the exact native formats of CIRR, FashionIQ and IPr2Pr, for tests.

Each ``write_*`` function writes one data set below ``root`` (real PNG/JPEG files included) and
returns the folder a reader takes. Every quirk of the real files that ``docs/data-formats.md`` lists is
present, so tests of readers, prepare, validation and evaluation exercise them:

* CIRR: train paths in ``./train/<k>/`` sub-folders, val images named ``dev-*``, ``test1`` records
  without any target field, one ``target_soft`` naming the reference instead of the target, one
  with a ``-1.0`` score, ranks that are not member indices, non-square images (targetpad pads).
* FashionIQ: space-padded, dot-ended and empty captions, test records without ``target``, one
  ASIN shared by shirt and toptee (and across splits), ``.jpg`` and ``.png`` files mixed.
* IPr2Pr: parquet shards with ``struct<bytes, path>`` image columns (one original shared by two
  edits), and the original ``seeds.json`` layout with the ``caption`` (or ``input``) key.

Names, ids and captions are invented; none is copied from the real annotation files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

CIRR_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}
CIRR_CAPTIONS = [
    "make the circle red",
    "add a small blue square in the corner",
    "remove the triangle and make the background green",
    "show two of them side by side",
    "change the stripes to dots",
    "turn the large star yellow",
]
FIQ_CAPTION_PAIRS = [
    ["is longer and red.", " has no sleeves"],  # leading space, trailing dot
    ["", "is grey with a pocket"],  # empty first caption: CLIP4Cir join gives " and ..."
    ["is more colorful?", "is darker ,"],
]
IPR2PR_EDITS = [
    "make it snowy",
    "turn the car blue",
    "add a hat",
    "make it night",
    "paint it gold",
    "add rain",
]


# --------------------------------------------------------------------------- images


def image_bytes(index: int, size: tuple[int, int] = (20, 16), fmt: str = "PNG") -> bytes:
    """A small deterministic picture (colour and a marker depend on ``index``)."""
    img = Image.new("RGB", size, ((37 * index) % 256, (91 * index + 40) % 256, (53 * index + 90) % 256))
    draw = ImageDraw.Draw(img)
    x = index % max(1, size[0] - 4)
    draw.rectangle([x, 2, x + 3, 5], fill=(255 - (37 * index) % 256, 10, 200))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, index: int, size: tuple[int, int] = (20, 16)) -> Path:
    """Write a PNG or JPEG (chosen by suffix) for ``index``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(image_bytes(index, size, fmt))
    return path


def _dump(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CIRR


def cirr_name(split: str, set_id: int, j: int) -> str:
    """An image name in CIRR's ``{split}-{pair}-{sentence}-img{0|1}`` pattern (invented numbers)."""
    return f"{CIRR_PREFIX[split]}-{90000 + set_id * 10 + j // 2}-{j % 3}-img{j % 2}"


def write_cirr(
    root: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "val", "test1"),
    sets_per_split: int = 2,
    layout: str = "flat",
    with_images: bool = True,
    sidecar: bool = False,
) -> Path:
    """Write a CIRR rc2 data set; returns the folder to pass to ``read_cirr``.

    ``layout``: ``flat`` (images relative to the annotation folder: ``root/dev/x.png``),
    ``img_raw`` (official: ``root/img_raw/dev/x.png``), ``clip4cir`` (``root/cirr/{captions,
    image_splits}`` with images at ``root/dev/x.png``; ``root`` is returned).
    Per split: ``sets_per_split`` 6-image sets, two queries per set; train also has one gallery
    image that no query uses.
    """
    root = Path(root)
    ann = root / "cirr" if layout == "clip4cir" else root
    image_base = {"flat": root, "img_raw": root / "img_raw", "clip4cir": root}[layout]
    pairid = 900100
    edits: dict[str, dict[str, list[str]]] = {}
    image_index = 0
    for split in splits:
        gallery: dict[str, str] = {}
        records = []
        for s in range(sets_per_split):
            set_id = 100 * (list(CIRR_PREFIX).index(split) + 1) + s
            members = [cirr_name(split, set_id, j) for j in range(6)]
            for name in members:
                folder = f"./train/{set_id % 3}" if split == "train" else f"./{CIRR_PREFIX[split]}"
                gallery[name] = f"{folder}/{name}.png"
            for q in range(2):
                ref, tgt = members[2 * q], members[2 * q + 1]
                rec: dict[str, Any] = {"pairid": pairid, "reference": ref}
                if split != "test1":
                    rec["target_hard"] = tgt
                    rec["target_soft"] = {tgt: 1.0}
                rec["caption"] = CIRR_CAPTIONS[(s * 2 + q) % len(CIRR_CAPTIONS)]
                img_set: dict[str, Any] = {"id": set_id, "members": members, "reference_rank": (q + 3) % 6}
                if split != "test1":
                    img_set["target_rank"] = (q + 5) % 6
                rec["img_set"] = img_set
                records.append(rec)
                edits.setdefault(split, {})[str(pairid)] = ["color"] if q == 0 else ["color", "add"]
                pairid += 7
        if split == "train":
            extra = f"train-{90999}-1-img1"
            gallery[extra] = f"./train/1/{extra}.png"
        if split == "val" and len(records) >= 2:
            # Noisy soft targets as in the real val file: one names the reference, one scores -1.
            records[0]["target_soft"] = {records[0]["reference"]: 1.0}
            r1 = records[1]
            r1["target_soft"] = {r1["target_hard"]: -1.0, r1["img_set"]["members"][5]: 0.5}
        _dump(ann / "captions" / f"cap.rc2.{split}.json", records)
        _dump(ann / "image_splits" / f"split.rc2.{split}.json", gallery)
        if with_images:
            for rel in gallery.values():
                # Non-square sizes so targetpad really pads some images.
                size = (24, 16) if image_index % 3 == 0 else (18, 18)
                write_image(image_base / rel, image_index, size)
                image_index += 1
    if sidecar:
        _dump(ann / "synthetic_edits.json", edits)
    return root


# --------------------------------------------------------------------------- FashionIQ


def fiq_asin(cat: str, split: str, i: int) -> str:
    """An invented 10-character ASIN-like id."""
    return f"BF{cat[:2].upper()}{split[:2].upper()}{i:04d}"


FIQ_SHARED_ASIN = "BFSHARED01"


def write_fashioniq(
    root: str | Path,
    *,
    categories: tuple[str, ...] = ("dress", "shirt", "toptee"),
    splits: tuple[str, ...] = ("train", "val", "test"),
    images_per_split: int = 4,
    layout: str = "images",
    with_images: bool = True,
    sidecar: bool = False,
) -> Path:
    """Write a FashionIQ data set; returns ``root``.

    ``layout``: ``images`` (flat ``images/<asin>.jpg|png``) or ``resized_images`` (starter kit,
    ``resized_images/<cat>/<asin>.jpg``). Per (category, split): ``images_per_split`` ASINs and
    three caption records. ``FIQ_SHARED_ASIN`` is in shirt/train and toptee/val (when present).
    """
    root = Path(root)
    edits: dict[str, list[list[str]]] = {}
    written: set[Path] = set()
    for split in splits:
        for cat in categories:
            asins = [fiq_asin(cat, split, i) for i in range(images_per_split)]
            if (cat, split) in (("shirt", "train"), ("toptee", "val")):
                asins.append(FIQ_SHARED_ASIN)
            records = []
            for k, pair in enumerate(FIQ_CAPTION_PAIRS):
                rec: dict[str, Any] = {}
                if split != "test":
                    rec["target"] = asins[(k + 1) % len(asins)]
                rec["candidate"] = asins[k % len(asins)]
                rec["captions"] = list(pair)
                records.append(rec)
            if (cat, split) == ("toptee", "val"):
                records[2]["candidate"] = FIQ_SHARED_ASIN
            edits[f"{cat}.{split}"] = [["color"] for _ in records]
            _dump(root / "captions" / f"cap.{cat}.{split}.json", records)
            _dump(root / "image_splits" / f"split.{cat}.{split}.json", asins)
            if not with_images:
                continue
            for i, asin in enumerate(asins):
                # Both extensions occur (CLIP4Cir reads .jpg, SPRC .png).
                ext = ".png" if i % 3 == 2 else ".jpg"
                if layout == "images":
                    path = root / "images" / f"{asin}{ext}"
                else:
                    path = root / "resized_images" / cat / f"{asin}{ext}"
                if path not in written and not path.with_suffix(".jpg" if ext == ".png" else ".png").exists():
                    write_image(path, len(written), (16, 22))
                    written.add(path)
    if sidecar:
        _dump(root / "synthetic_edits.json", edits)
    return root


# --------------------------------------------------------------------------- IPr2Pr


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_ipr2pr_parquet(
    root: str | Path,
    *,
    shards: int = 2,
    rows_per_shard: int = 3,
    original_column: str = "original_image",
    with_prompts: bool = True,
    struct_paths: bool = True,
    drop_column: str | None = None,
    sidecar: bool = False,
) -> Path:
    """Write Hugging Face style shards ``root/data/train-0000i-of-0000n-<hash>.parquet``; returns ``root``.

    Rows 2k and 2k+1 of a shard edit the same original image (same struct ``path`` when
    ``struct_paths``). ``original_column="input_image"`` and ``with_prompts=False`` give the
    diffusers toy-set columns; ``drop_column`` leaves one column out (a structural fault).
    """
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    edits: dict[str, list[list[str]]] = {}
    counter = 0
    for s in range(shards):
        cols: dict[str, list] = {original_column: [], "edit_prompt": [], "edited_image": []}
        if with_prompts:
            cols.update(original_prompt=[], edited_prompt=[])
        for r in range(rows_per_shard):
            orig = s * 100 + r // 2
            cols[original_column].append(
                {
                    "bytes": image_bytes(orig, (24, 24), "JPEG"),
                    "path": f"orig-{orig:04d}.jpg" if struct_paths else None,
                }
            )
            cols["edited_image"].append(
                {
                    "bytes": image_bytes(500 + counter, (24, 24), "JPEG"),
                    "path": f"edit-{counter:04d}.jpg" if struct_paths else None,
                }
            )
            cols["edit_prompt"].append(IPR2PR_EDITS[counter % len(IPR2PR_EDITS)])
            if with_prompts:
                cols["original_prompt"].append(f"a photo of scene {orig}")
                cols["edited_prompt"].append(
                    f"a photo of scene {orig}, {IPR2PR_EDITS[counter % len(IPR2PR_EDITS)]}"
                )
            counter += 1
        if drop_column is not None:
            cols.pop(drop_column)
        types = {c: (IMAGE_STRUCT if c.endswith("_image") else pa.string()) for c in cols}
        table = pa.table({c: pa.array(v, type=types[c]) for c, v in cols.items()})
        name = f"train-{s:05d}-of-{shards:05d}-f1x7ure{s}.parquet"
        pq.write_table(table, root / "data" / name)
        edits[name] = [["color"] for _ in range(rows_per_shard)]
    if sidecar:
        _dump(root / "data" / "synthetic_edits.json", edits)
    return root


def write_ipr2pr_seeds(
    root: str | Path,
    *,
    prompts: int = 2,
    seeds_per_prompt: int = 2,
    caption_key: str = "caption",
    with_images: bool = True,
) -> Path:
    """Write the original release layout: ``seeds.json``, ``<7-digit>/prompt.json`` (text key
    ``caption_key``: ``input`` or ``caption``), ``<seed>_0.jpg`` and ``<seed>_1.jpg``; returns ``root``."""
    root = Path(root)
    seeds_list = []
    for p in range(prompts):
        folder = f"{p:07d}"
        seeds = [str(4000 + 17 * p + s) for s in range(seeds_per_prompt)]
        seeds_list.append([folder, seeds])
        _dump(
            root / folder / "prompt.json",
            {
                caption_key: f"a drawing of object {p}",
                "edit": IPR2PR_EDITS[p % len(IPR2PR_EDITS)],
                "output": f"a drawing of object {p}, edited",
            },
        )
        if with_images:
            for k, seed in enumerate(seeds):
                write_image(root / folder / f"{seed}_0.jpg", 10 * p + k, (20, 20))
                write_image(root / folder / f"{seed}_1.jpg", 10 * p + k + 300, (20, 20))
    _dump(root / "seeds.json", seeds_list)
    return root
