"""Image decoding/targetpad, the ``prepare`` stage and ``load_prepared`` on hand-made fixtures."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import params_file
from native_fixtures import (
    FIQ_SHARED_ASIN,
    image_bytes,
    write_cirr,
    write_fashioniq,
    write_ipr2pr_parquet,
)
from PIL import Image

from detailfusion.cli import main
from detailfusion.config import load_params, load_section
from detailfusion.data import read_cirr
from detailfusion.data.images import NOTES_KEY, ImageDecodeError, decode_image, preprocess_bytes, targetpad
from detailfusion.data.manifest import PREPARED_IMAGE_COLUMNS, QUERY_COLUMNS
from detailfusion.data.prepare import PrepareConfig, run_prepare
from detailfusion.data.prepared import load_prepared
from detailfusion.errors import ConfigError, DataFormatError
from detailfusion.params import repo_section

REPO = Path(__file__).resolve().parents[1]


def _png(size, mode="RGB", color=None) -> bytes:
    img = Image.new(mode, size, color if color is not None else (0 if mode in ("L", "P") else (10, 200, 30)))
    if mode == "P":
        img.putpalette([200, 10, 10] + [i % 256 for i in range(3, 768)])  # index 0 is red, not black
        img.paste(5, (1, 1, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _siblings(out: Path) -> list[str]:
    return sorted(
        p.name for p in out.parent.iterdir() if p.name != out.name and p.name.startswith(f".{out.name}")
    )


def _cfg(**kw) -> PrepareConfig:
    kw.setdefault("image_size", 16)
    return repo_section("prepare", **kw)


@pytest.fixture
def raw(tmp_path) -> Path:
    root = tmp_path / "raw"
    write_cirr(root / "cirr")
    write_fashioniq(root / "fashioniq")
    write_ipr2pr_parquet(root / "ipr2pr")
    return root


# --------------------------------------------------------------------------- images


def _clip4cir_targetpad(img: Image.Image, size: int, ratio: float) -> np.ndarray:
    """CLIP4Cir's TargetPad + Resize + CenterCrop + RGB, written with torchvision as they do."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    w, h = img.size
    if max(w, h) / min(w, h) >= ratio:
        scaled = max(w, h) / ratio
        hp, vp = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
        img = F.pad(img, [hp, vp, hp, vp], 0, "constant")
    img = CenterCrop(size)(Resize(size, interpolation=InterpolationMode.BICUBIC)(img))
    return np.asarray(img.convert("RGB"))


@pytest.mark.slow  # imports torch/torchvision (~5 s) for the reference implementation
@pytest.mark.parametrize(
    ("size", "mode"),
    [
        ((40, 20), "RGB"),
        ((20, 41), "RGB"),
        ((30, 27), "RGB"),
        ((33, 33), "RGB"),
        ((64, 17), "RGBA"),
        ((25, 50), "L"),
        ((45, 20), "P"),
        ((7, 300), "RGB"),
    ],
)
def test_targetpad_matches_clip4cir_torchvision(size, mode):
    rng = np.random.default_rng(sum(size))
    if mode == "P":
        img = Image.open(io.BytesIO(_png(size, "P")))
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)
    for out_size, ratio in ((16, 1.25), (24, 1.25), (16, 1.0)):
        expected = _clip4cir_targetpad(img, out_size, ratio)
        got = np.asarray(targetpad(img, out_size, ratio))
        assert got.shape == (out_size, out_size, 3)
        np.testing.assert_array_equal(got, expected)


def test_preprocess_bytes_and_padding_colour():
    arr = preprocess_bytes(_png((40, 20), color=(250, 250, 250)), 20, 1.25)
    assert arr.dtype == np.uint8 and arr.shape == (20, 20, 3)
    # 40x20 pads vertically to 40x32 -> black bands top and bottom after resize/crop.
    assert arr[0].max() < 30 and arr[10, 10].min() > 200


def test_decode_errors_are_explicit():
    good = _png((20, 20))
    with pytest.raises(ImageDecodeError, match="truncated/corrupt") as err:
        decode_image(good[: len(good) // 2], source="x.png")
    assert str(err.value).startswith("x.png: ")
    with pytest.raises(ImageDecodeError, match="truncated/corrupt image: not a recognised image format"):
        decode_image(b"<html>not an image</html>")
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="decompression bomb refused"):
        decode_image(_png((30, 30)), max_image_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == before  # the process-wide PIL setting is restored
    assert decode_image(_png((30, 30)), max_image_pixels=900).size == (30, 30)
    assert decode_image(_png((30, 30)), max_image_pixels=None).size == (30, 30)


# --------------------------------------------------------------------------- prepare


def test_prepare_writes_manifests_pixels_and_summaries(raw, tmp_path):
    out = tmp_path / "prepared"
    summary = run_prepare(_cfg(), raw, out, progress=False)
    assert set(summary["datasets"]) == {"cirr", "fashioniq", "ipr2pr"}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["warnings"] == []
    for name in ("cirr", "fashioniq", "ipr2pr"):
        d = out / name
        assert sorted(p.name for p in d.iterdir()) == [
            "images.parquet",
            "pixels.npy",
            "quarantine.json",
            "queries.parquet",
            "summary.json",
        ]
        assert json.loads((d / "quarantine.json").read_text()) == []
    assert _siblings(out) == []

    fiq = load_prepared(out, "fashioniq")
    assert list(fiq.images.columns) == list(PREPARED_IMAGE_COLUMNS)
    assert list(fiq.queries.columns) == list(QUERY_COLUMNS)
    # The shared shirt/toptee image is decoded once and both gallery rows point at it.
    assert fiq.pixel_index("train", FIQ_SHARED_ASIN, "shirt") == fiq.pixel_index(
        "val", FIQ_SHARED_ASIN, "toptee"
    )
    assert fiq.pixels.shape == (37, 16, 16, 3) and fiq.summary["unique_images"] == 37
    assert fiq.summary["gallery_images"] == 38 and fiq.summary["splits"]["val"]["empty_captions"] == 3
    assert fiq.queries.loc[1, "captions"] == ["", "is grey with a pocket"]
    assert fiq.queries["target"].isna().sum() == 9

    cirr = load_prepared(out, "cirr")
    ids, idx = cirr.gallery("val")
    native = read_cirr(raw / "cirr", splits=["val"])
    assert ids == native.images["image_id"].tolist()  # split-file order
    for image_id, row in zip(ids[:4], native.images.itertuples(), strict=False):
        expected = preprocess_bytes((raw / "cirr" / row.path).read_bytes(), 16, 1.25)
        np.testing.assert_array_equal(cirr.pixels[cirr.pixel_index("val", image_id)], expected)
    first = cirr.images.iloc[0]
    assert (first["width"], first["height"]) in ((24, 16), (18, 18)) and first["status"] == "ok"
    assert cirr.queries["pairid"].dtype == "Int64" and cirr.queries.loc[0, "members"].__len__() == 6
    assert cirr.summary["splits"]["test1"]["queries_without_target"] == 4
    assert cirr.split_queries("val")["query_id"].tolist() == native.queries["query_id"].tolist()
    with pytest.raises(KeyError, match="not in the val gallery"):
        cirr.pixel_index("val", "dev-0-0-img0")

    ip = load_prepared(out, "ipr2pr")
    assert ip.pixels.shape == (10, 16, 16, 3) and (ip.images["status"] == "ok").all()


def test_planted_faults_are_quarantined_with_reasons(tmp_path):
    root = tmp_path / "raw"
    cirr = write_cirr(root / "cirr", splits=("val",))
    ds = read_cirr(cirr)
    paths = ds.images["path"].tolist()
    truncated = cirr / paths[0]
    truncated.write_bytes(truncated.read_bytes()[:40])
    (cirr / paths[1]).unlink()
    (cirr / paths[2]).write_bytes(b"")
    split = cirr / "image_splits" / "split.rc2.val.json"
    gallery = json.loads(split.read_text())
    gallery["dev-99999-0-img0"] = "./dev/dev-99999-0-img0.png"  # named by the split, no file
    split.write_text(json.dumps(gallery))
    cap = cirr / "captions" / "cap.rc2.val.json"
    records = json.loads(cap.read_text())
    records[3]["caption"] = "   "
    cap.write_text(json.dumps(records))

    out = tmp_path / "prepared"
    summary = run_prepare(_cfg(datasets=["cirr"]), root, out, progress=False)
    quarantine = {q["image_id"]: q for q in json.loads((out / "cirr" / "quarantine.json").read_text())}
    assert set(quarantine) == {ds.images.loc[i, "image_id"] for i in range(3)} | {"dev-99999-0-img0"}
    bad = quarantine[ds.images.loc[0, "image_id"]]
    assert bad["status"] == "corrupt" and "truncated/corrupt" in bad["reason"] and bad["splits"] == ["val"]
    assert bad["path"] == paths[0]
    assert quarantine[ds.images.loc[1, "image_id"]]["status"] == "missing"
    assert "file not found" in quarantine[ds.images.loc[1, "image_id"]]["reason"]
    assert quarantine[ds.images.loc[2, "image_id"]]["reason"] == "empty file (0 bytes)"
    assert quarantine["dev-99999-0-img0"]["status"] == "missing"

    assert summary["datasets"]["cirr"]["quarantined"] == {"missing": 2, "corrupt": 2}
    per_split = json.loads((out / "cirr" / "summary.json").read_text())["splits"]["val"]
    assert (
        per_split["quarantined"] == 4
        and per_split["empty_captions"] == 1
        and per_split["gallery_images"] == 13
    )
    prepared = load_prepared(out, "cirr")
    assert prepared.pixels.shape[0] == 9
    assert prepared.pixel_index("val", "dev-99999-0-img0") == -1
    assert prepared.images.set_index("image_id").loc["dev-99999-0-img0", "status"] == "missing"
    # The shrunk pixel file is a plain valid .npy.
    assert np.load(out / "cirr" / "pixels.npy").shape == (9, 16, 16, 3)


def test_structural_error_leaves_previous_output_untouched(raw, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(_cfg(), raw, out, progress=False)
    before = _tree_digest(out)
    # fashioniq (the second data set) is broken: cirr was already written into the temp folder.
    cap = raw / "fashioniq" / "captions" / "cap.shirt.val.json"
    cap.write_text(cap.read_text().replace('"candidate"', '"candidate" "', 1))
    with pytest.raises(DataFormatError, match=r"malformed JSON at line \d+ column \d+") as err:
        run_prepare(_cfg(image_size=24), raw, out, progress=False)
    assert err.value.path == cap
    assert _tree_digest(out) == before
    assert _siblings(out) == []

    with pytest.raises(DataFormatError, match="data set folder not found"):
        run_prepare(_cfg(datasets=["cirr", "ipr2pr"]), tmp_path / "elsewhere", out, progress=False)
    assert _tree_digest(out) == before and _siblings(out) == []


def test_failed_first_run_leaves_nothing(tmp_path):
    root = tmp_path / "raw"
    write_cirr(root / "cirr", splits=("val",))
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text("[1, 2")
    out = tmp_path / "prepared"
    with pytest.raises(DataFormatError):
        run_prepare(_cfg(datasets=["cirr"]), root, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_stale_temp_folders_of_dead_runs_are_cleaned(raw, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(_cfg(datasets=["ipr2pr"]), raw, out, progress=False)
    before = _tree_digest(out)
    dead_pid = 2**22 + 12345  # above Linux's pid_max default, so never a live process
    (tmp_path / f".prepared.tmp-{dead_pid}-abcd1234" / "cirr").mkdir(parents=True)
    # A run killed between moving `out` aside and swapping the new one in: out must come back.
    out.rename(tmp_path / f".prepared.old-{dead_pid}-abcd1234")
    broken = tmp_path / "broken"
    (broken / "ipr2pr").mkdir(parents=True)  # exists, but holds no shards: the reader fails
    with pytest.raises(DataFormatError, match="neither parquet shards"):
        run_prepare(_cfg(datasets=["ipr2pr"]), broken, out, progress=False)
    assert _siblings(out) == []
    assert _tree_digest(out) == before


def test_prepare_is_deterministic_and_pool_gives_same_bytes(raw, tmp_path):
    run_prepare(_cfg(workers=1), raw, tmp_path / "a", progress=False)
    run_prepare(_cfg(workers=1), raw, tmp_path / "b", progress=False)
    run_prepare(_cfg(workers=2), raw, tmp_path / "c", progress=False)
    a = _tree_digest(tmp_path / "a")
    assert a == _tree_digest(tmp_path / "b") == _tree_digest(tmp_path / "c")
    assert len(a) == 16


def test_annotation_only_data_set_is_all_quarantined_without_crash(tmp_path, caplog):
    root = tmp_path / "raw"
    write_cirr(root / "cirr", with_images=False)
    out = tmp_path / "prepared"
    summary = run_prepare(_cfg(datasets=["cirr"]), root, out, progress=False)
    s = summary["datasets"]["cirr"]
    assert s["images_found"] == 0 and s["images_ok"] == 0 and s["quarantined"]["missing"] == 37
    assert any("images absent" in w for w in summary["warnings"])
    assert any("images absent" in r.getMessage() for r in caplog.records)
    quarantine = json.loads((out / "cirr" / "quarantine.json").read_text())
    assert len(quarantine) == 37 and {q["status"] for q in quarantine} == {"missing"}
    prepared = load_prepared(out, "cirr")
    assert prepared.pixels.shape == (0, 16, 16, 3)
    assert (prepared.images["pixel_index"] == -1).all() and prepared.images["width"].isna().all()


def test_load_prepared_rejects_missing_or_inconsistent_files(raw, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(_cfg(datasets=["cirr"]), raw, out, progress=False)
    with pytest.raises(DataFormatError, match="prepared data set not found"):
        load_prepared(out, "fashioniq")
    pixels = out / "cirr" / "pixels.npy"
    data = pixels.read_bytes()
    pixels.write_bytes(data[: -16 * 16 * 3])
    with pytest.raises(DataFormatError) as err:
        load_prepared(out, "cirr")
    assert err.value.path == pixels
    pixels.write_bytes(data)
    (out / "cirr" / "images.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataFormatError, match="not a readable parquet file"):
        load_prepared(out, "cirr")
    (out / "cirr" / "images.parquet").unlink()
    with pytest.raises(DataFormatError, match="file not found"):
        load_prepared(out, "cirr")


def test_prepare_config_from_params():
    cfg = load_section(PrepareConfig, REPO / "params.yaml", "prepare")
    assert cfg.out == Path("data/prepared") and cfg.target_ratio == 1.25 and cfg.workers == 0
    real = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match=r"prepare\.datasets: unknown \['coco'\]"):
        load_section(PrepareConfig, {"prepare": {**real["prepare"], "datasets": ["cirr", "coco"]}}, "prepare")
    with pytest.raises(ConfigError, match=r"prepare\.image_size: must be >= 8"):
        load_section(PrepareConfig, {"prepare": {**real["prepare"], "image_size": 2}}, "prepare")
    with pytest.raises(ConfigError, match=r"prepare: missing required key\(s\) \['out'"):
        load_section(PrepareConfig, {"prepare": {"image_size": 64}}, "prepare")


def test_cli_prepare(raw, tmp_path, capsys):
    params = params_file(tmp_path / "params.yaml", {
        "data": {"root": str(raw)},
        "prepare": {"out": str(tmp_path / "p"), "datasets": ["ipr2pr"], "image_size": 16},
    })
    assert main(["--params", str(params), "-q", "data", "prepare"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["datasets"]["ipr2pr"]["images_ok"] == 10
    assert (tmp_path / "p" / "ipr2pr" / "pixels.npy").is_file()
    assert main(["--params", str(params), "-q", "data", "prepare", "--root", str(tmp_path / "nowhere")]) == 2
    assert "data set folder not found" in capsys.readouterr().err


def test_prepare_decodes_parquet_and_quarantines_null_cells(tmp_path):
    root = tmp_path / "raw"
    write_ipr2pr_parquet(root / "ipr2pr", shards=1, rows_per_shard=2, struct_paths=False)
    shard = next((root / "ipr2pr" / "data").glob("*.parquet"))
    table = pq.read_table(shard)
    col = table.column("edited_image").to_pylist()
    col[1] = {"bytes": image_bytes(3)[:30], "path": None}
    col[0] = None
    table = table.set_column(
        table.schema.get_field_index("edited_image"),
        "edited_image",
        pa.array(col, type=table.schema.field("edited_image").type),
    )
    pq.write_table(table, shard)
    run_prepare(_cfg(datasets=["ipr2pr"]), root, tmp_path / "out", progress=False)
    quarantine = json.loads((tmp_path / "out" / "ipr2pr" / "quarantine.json").read_text())
    assert [(q["status"], q["path"].endswith("#0/edited_image")) for q in quarantine] == [
        ("missing", True),
        ("corrupt", False),
    ]
    assert "truncated/corrupt" in quarantine[1]["reason"]


# --------------------------------------------------------------------------- unusual image modes


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_rgb16(arr16: np.ndarray) -> bytes:
    """A 48-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))  # fmt: skip


def test_16bit_greyscale_is_scaled_not_saturated():
    grad = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    img = decode_image(_encode(Image.fromarray(grad)))
    assert img.mode == "L" and img.info[NOTES_KEY] == ["16-bit greyscale scaled to 8 bits"]
    np.testing.assert_array_equal(np.asarray(img), np.rint(grad / 257.0).astype(np.uint8))
    assert len(np.unique(np.asarray(img))) > 200  # a gradient, not {0, 255}
    # through the whole prepare path: RGB with three equal channels, many grey levels
    arr = preprocess_bytes(_encode(Image.fromarray(grad)), 32, 1.0)
    assert (arr[..., 0] == arr[..., 1]).all() and len(np.unique(arr)) > 200


def test_16bit_rgb_keeps_the_high_byte():
    rgb16 = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 1000 % 65536).astype(np.uint16)
    img = decode_image(_png_rgb16(rgb16))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), (rgb16 >> 8).astype(np.uint8))


def test_palette_image_decodes_to_its_colours():
    img = decode_image(_png((10, 10), "P"))
    assert img.mode == "P" and NOTES_KEY not in img.info
    rgb = np.asarray(img.convert("RGB"))
    assert tuple(rgb[0, 0]) == (200, 10, 10) and tuple(rgb[2, 2]) == (15, 16, 17)  # palette[0], palette[5]


def test_transparency_is_flattened_onto_white_and_noted():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red everywhere...
    arr[..., 3] = 255
    arr[0, 0, 3] = 0  # ...one fully transparent pixel
    arr[0, 1, 3] = 128  # one half transparent
    img = decode_image(_encode(Image.fromarray(arr, "RGBA")))
    got = np.asarray(img)
    assert img.mode == "RGB" and img.info[NOTES_KEY] == ["transparency flattened onto white"]
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (200, 0, 0)
    assert tuple(got[0, 1]) == (227, 127, 127)  # 50% red over white: 200*128/255 + 255*127/255
    opaque = decode_image(_encode(Image.fromarray(np.full((4, 4, 4), 255, np.uint8), "RGBA")))
    assert opaque.mode == "RGB" and NOTES_KEY not in opaque.info
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 1
    assert tuple(np.asarray(decode_image(_encode(pal, transparency=1)))[0, 0]) == (255, 255, 255)


def test_cmyk_and_exif_rotated_jpegs():
    cmyk = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    assert cmyk.mode == "RGB" and cmyk.info[NOTES_KEY] == ["CMYK converted to RGB"]
    r, g, b = np.asarray(cmyk)[4, 4].astype(int)
    assert r > 240 and g < 15 and b < 15  # pure red
    # 4 rows x 8 columns, left half black, right half white, stored with "rotate 90 CW to view"
    arr = np.zeros((4, 8, 3), np.uint8)
    arr[:, 4:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=100, exif=exif.tobytes()))
    assert img.size == (4, 8) and img.info[NOTES_KEY] == ["rotated per EXIF orientation 6"]
    got = np.asarray(img.convert("L")).astype(int)
    assert got[:3].mean() < 30 and got[-3:].mean() > 225  # the left half ended up on top


def test_modes_without_an_8bit_mapping_are_refused():
    with pytest.raises(ImageDecodeError, match="32-bit float"):
        decode_image(_encode(Image.fromarray(np.ones((4, 4), np.float32)), "TIFF"))


def test_prepare_of_a_subset_leaves_the_other_data_sets_byte_identical(raw, tmp_path):
    out = tmp_path / "prepared"
    run_prepare(_cfg(), raw, out, progress=False)
    before = _tree_digest(out)
    summary = run_prepare(_cfg(datasets=["ipr2pr"]), raw, out, progress=False)
    after = _tree_digest(out)
    for name in ("cirr", "fashioniq"):
        kept = {k: v for k, v in before.items() if k.startswith(f"{name}/")}
        assert kept and kept == {k: v for k, v in after.items() if k.startswith(f"{name}/")}
    assert set(summary["datasets"]) == {"cirr", "fashioniq", "ipr2pr"}
    assert load_prepared(out, "cirr").pixels.shape[0] > 0 and _siblings(out) == []


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_broken_symlinks_are_quarantined_with_the_missing_warning(tmp_path, kind, caplog):
    root = tmp_path / "raw"
    write_cirr(root / "cirr")
    victim = sorted((root / "cirr").rglob("*.png"))[0]
    victim.unlink()
    os.symlink(tmp_path / "nowhere.png" if kind == "dangling" else victim, victim)
    summary = run_prepare(_cfg(datasets=["cirr"]), root, tmp_path / "out", progress=False)
    assert any("1 of" in w and "gallery images missing" in w for w in summary["warnings"])
    (entry,) = json.loads((tmp_path / "out" / "cirr" / "quarantine.json").read_text())
    expected = "is a broken symbolic link" if kind == "dangling" else "Too many levels of symbolic links"
    assert entry["path"].endswith(victim.name) and expected in entry["reason"]
    # `data stats` reads the same tree without a traceback
    from detailfusion.data import get_reader

    assert len(get_reader("cirr")(root / "cirr").images) > 0
