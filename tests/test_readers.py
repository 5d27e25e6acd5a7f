"""Native-format readers (CIRR, FashionIQ, IPr2Pr) and ``data stats`` on hand-made fixtures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from native_fixtures import (
    FIQ_SHARED_ASIN,
    write_cirr,
    write_fashioniq,
    write_ipr2pr_parquet,
    write_ipr2pr_seeds,
)

from detailfusion.cli import main
from detailfusion.data import READERS, Ipr2prColumns, read_cirr, read_fashioniq, read_ipr2pr
from detailfusion.data.fashioniq import join_captions
from detailfusion.data.manifest import IMAGE_COLUMNS, QUERY_COLUMNS
from detailfusion.data.stats import dataset_stats
from detailfusion.errors import DataFormatError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _frames_are_canonical(ds) -> None:
    assert list(ds.queries.columns) == list(QUERY_COLUMNS)
    assert list(ds.images.columns) == list(IMAGE_COLUMNS)


def test_readers_registry():
    assert READERS == {"cirr": read_cirr, "fashioniq": read_fashioniq, "ipr2pr": read_ipr2pr}


# --------------------------------------------------------------------------- CIRR


def test_cirr_reads_every_split_with_its_quirks(tmp_path):
    ds = read_cirr(write_cirr(tmp_path / "cirr"))
    _frames_are_canonical(ds)
    q, im = ds.queries, ds.images
    assert q.groupby("split").size().to_dict() == {"train": 4, "val": 4, "test1": 4}
    # Gallery = split file: 2 sets x 6 images, train has one image no query uses.
    assert im.groupby("split").size().to_dict() == {"train": 13, "val": 12, "test1": 12}
    assert ds.warnings == []

    test1 = q[q["split"] == "test1"]
    assert test1["target"].isna().all() and test1["target_soft"].isna().all()
    trainval = q[q["split"] != "test1"]
    assert trainval["target"].notna().all()
    assert q["query_id"].tolist() == [str(p) for p in q["pairid"]]
    assert str(q["pairid"].dtype) == "Int64"
    for row in q.itertuples():
        assert len(row.members) == 6 and row.reference in row.members
        assert row.group == str(row.set_id)
        assert row.captions == [row.caption]
        assert row.edit_types == []

    val = q[q["split"] == "val"].reset_index(drop=True)
    # Noisy soft targets stay verbatim; the target is always target_hard.
    soft0 = json.loads(val.loc[0, "target_soft"])
    assert soft0 == {val.loc[0, "reference"]: 1.0} and val.loc[0, "target"] not in soft0
    assert val.loc[1, "target_soft"] == json.dumps(
        {val.loc[1, "target"]: -1.0, val.loc[1, "members"][5]: 0.5}
    )


@pytest.mark.parametrize("layout", ["flat", "img_raw", "clip4cir"])
def test_cirr_layouts_resolve_every_image(tmp_path, layout):
    root = write_cirr(tmp_path / "c", layout=layout)
    roots = [root, root / "cirr"] if layout == "clip4cir" else [root]
    for r in roots:
        ds = read_cirr(r)
        assert ds.warnings == []
        assert all(ds.image_exists(row) for row in ds.images.itertuples())
        row = ds.images.iloc[0]
        assert ds.open_image_bytes(row).startswith(PNG_MAGIC)
        assert ds.image_source(row) == r / row["path"]
        assert (r / row["path"]).resolve().is_file()


def test_cirr_basename_fallback_when_train_subfolders_are_missing(tmp_path):
    root = write_cirr(tmp_path / "c", splits=("train",))
    # The URL-download route puts train images flat in train/, without the <k> sub-folders.
    for sub in sorted((root / "train").iterdir()):
        for f in sub.iterdir():
            f.rename(root / "train" / f.name)
        sub.rmdir()
    ds = read_cirr(root)
    assert ds.warnings == []
    assert all(p.count("/") == 1 and p.startswith("train/") for p in ds.images["path"])
    assert all(ds.image_exists(p) for p in ds.images["path"])


def test_cirr_separate_image_root(tmp_path):
    root = write_cirr(tmp_path / "ann", splits=("val",))
    (tmp_path / "pictures").mkdir()
    shutil.move(root / "dev", tmp_path / "pictures" / "dev")
    without = read_cirr(root)
    assert not without.image_exists(without.images.iloc[0])
    ds = read_cirr(root, image_root=tmp_path / "pictures")
    assert ds.warnings == []
    assert ds.images["path"].str.startswith("../pictures/dev/").all()
    assert ds.open_image_bytes(ds.images.iloc[3]).startswith(PNG_MAGIC)


def test_cirr_absent_splits_are_skipped_and_gallery_only_split_warns(tmp_path):
    root = write_cirr(tmp_path / "c")
    (root / "captions" / "cap.rc2.test1.json").unlink()
    (root / "image_splits" / "split.rc2.test1.json").unlink()
    (root / "captions" / "cap.rc2.train.json").unlink()
    ds = read_cirr(root)
    assert set(ds.images["split"]) == {"train", "val"}
    assert set(ds.queries["split"]) == {"val"}
    assert any("cap.rc2.train.json absent" in w for w in ds.warnings)
    only_val = read_cirr(root, splits=["val"])
    assert set(only_val.images["split"]) == {"val"}


def test_cirr_no_split_at_all_names_the_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no split found") as err:
        read_cirr(tmp_path / "empty")
    assert err.value.path == tmp_path / "empty"
    with pytest.raises(DataFormatError, match="unknown CIRR split"):
        read_cirr(write_cirr(tmp_path / "c"), splits=["dev"])


def test_cirr_malformed_json_names_file_line_and_column(tmp_path):
    root = write_cirr(tmp_path / "c")
    cap = root / "captions" / "cap.rc2.val.json"
    lines = cap.read_text().splitlines()
    lines[3] = lines[3].rstrip(",")  # drop a comma between two keys
    cap.write_text("\n".join(lines))
    with pytest.raises(DataFormatError, match=r"malformed JSON at line \d+ column \d+") as err:
        read_cirr(root)
    assert err.value.path == cap
    assert "cap.rc2.val.json" in str(err.value)


def test_cirr_duplicate_pairid_within_and_between_splits(tmp_path):
    root = write_cirr(tmp_path / "c")
    val = root / "captions" / "cap.rc2.val.json"
    first = json.loads(val.read_text())[0]["pairid"]
    _edit_json(val, lambda d: d[2].__setitem__("pairid", first))
    with pytest.raises(DataFormatError, match=f"duplicate pairid {first}") as err:
        read_cirr(root)
    assert err.value.path == val and "#2" in str(err.value.record)

    root2 = write_cirr(tmp_path / "c2")
    train_id = json.loads((root2 / "captions" / "cap.rc2.train.json").read_text())[0]["pairid"]
    test1 = root2 / "captions" / "cap.rc2.test1.json"
    _edit_json(test1, lambda d: d[1].__setitem__("pairid", train_id))
    with pytest.raises(DataFormatError, match=f"duplicate pairid {train_id}.*cap.rc2.train.json"):
        read_cirr(root2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d[1]["img_set"]["members"].pop(), "must hold 6 names, got 5"),
        (lambda d: d[1].pop("target_hard"), r"missing required key\(s\) \['target_hard'\]"),
        (lambda d: d[1].__setitem__("pairid", "12"), "pairid must be int, got str"),
        (lambda d: d[1].__setitem__("pairid", True), "pairid must be int, got bool"),
        (lambda d: d[1].__setitem__("target_soft", [1.0]), "target_soft must be dict"),
        (lambda d: d[1]["target_soft"].__setitem__("x", "high"), "target_soft.*must be int or float"),
        (lambda d: d[1].__setitem__("caption", None), "caption must be str"),
        (lambda d: d.__setitem__(1, "not a record"), "record must be an object"),
    ],
)
def test_cirr_structural_record_errors_name_file_and_record(tmp_path, edit, match):
    root = write_cirr(tmp_path / "c", splits=("val",))
    cap = root / "captions" / "cap.rc2.val.json"
    _edit_json(cap, edit)
    with pytest.raises(DataFormatError, match=match) as err:
        read_cirr(root)
    assert err.value.path == cap
    assert str(err.value.record).startswith("#1")


def test_cirr_wrong_top_level_types(tmp_path):
    root = write_cirr(tmp_path / "c", splits=("val",))
    (root / "image_splits" / "split.rc2.val.json").write_text('["dev-1-0-img0"]')
    with pytest.raises(DataFormatError, match="top level.*must be dict, got list"):
        read_cirr(root)
    root = write_cirr(tmp_path / "d", splits=("val",))
    (root / "captions" / "cap.rc2.val.json").write_text('{"pairid": 1}')
    with pytest.raises(DataFormatError, match="top level.*must be list, got dict"):
        read_cirr(root)


def test_cirr_content_problems_stay_in_the_manifest(tmp_path):
    root = write_cirr(tmp_path / "c", splits=("val",))

    def spoil(d):
        d[0]["target_hard"] = d[0]["reference"]  # reference == target
        d[1]["reference"] = "dev-00000-0-img0"  # not in the split file
        d[2]["caption"] = ""  # empty caption

    _edit_json(root / "captions" / "cap.rc2.val.json", spoil)
    ds = read_cirr(root)
    q = ds.queries
    assert q.loc[0, "target"] == q.loc[0, "reference"]
    assert q.loc[1, "reference"] not in set(ds.images["image_id"])
    assert q.loc[2, "caption"] == ""
    assert dataset_stats("cirr", root)["splits"]["val"]["empty_captions"] == 1


def test_cirr_sidecar_fills_edit_types(tmp_path):
    ds = read_cirr(write_cirr(tmp_path / "c", sidecar=True))
    assert ds.queries["edit_types"].tolist() == [["color"], ["color", "add"]] * 6


def _write_heldout_targets(root: Path, drop: int = 0, extra: bool = False) -> dict[str, str]:
    """The held-out targets sidecar for the fixture's test1 (each reference's target is the next member)."""
    records = json.loads((root / "captions" / "cap.rc2.test1.json").read_text())
    targets = {}
    for r in records[drop:]:
        members = r["img_set"]["members"]
        targets[str(r["pairid"])] = members[members.index(r["reference"]) + 1]
    if extra:
        targets["123"] = records[0]["img_set"]["members"][0]
    (root / "synthetic_targets.json").write_text(json.dumps({"test1": targets}))
    return targets


def test_cirr_heldout_targets_sidecar_fills_test1_targets_only(tmp_path):
    root = write_cirr(tmp_path / "c")
    plain = read_cirr(root).queries
    assert plain.loc[plain["split"] == "test1", "target"].isna().all()  # real data: no sidecar, no targets
    targets = _write_heldout_targets(root)
    q = read_cirr(root).queries
    test1 = q[q["split"] == "test1"]
    assert dict(zip(test1["query_id"], test1["target"], strict=True)) == targets
    assert test1["target_soft"].isna().all()
    assert q.loc[q["split"] != "test1", "target"].tolist() == plain.loc[plain["split"] != "test1", "target"].tolist()
    assert read_cirr(root, splits=["val"]).queries["split"].eq("val").all()


@pytest.mark.parametrize("spoil, match", [
    ("missing", "no held-out target for test1 pairid"),
    ("extra", "held-out target\\(s\\) for pairids not in test1"),
    ("type", "held-out target must be str"),
])
def test_cirr_heldout_targets_sidecar_errors_name_the_file(tmp_path, spoil, match):
    root = write_cirr(tmp_path / "c")
    side = root / "synthetic_targets.json"
    _write_heldout_targets(root, drop=1 if spoil == "missing" else 0, extra=spoil == "extra")
    if spoil == "type":
        _edit_json(side, lambda d: d["test1"].update({next(iter(d["test1"])): 7}))
    with pytest.raises(DataFormatError, match=match) as err:
        read_cirr(root)
    assert str(side) in str(err.value)


def test_cirr_missing_image_raises_file_not_found(tmp_path):
    root = write_cirr(tmp_path / "c", splits=("val",))
    ds = read_cirr(root)
    row = ds.images.iloc[0]
    (root / row["path"]).unlink()
    assert not read_cirr(root).image_exists(row)
    with pytest.raises(FileNotFoundError):
        ds.open_image_bytes(row)


# --------------------------------------------------------------------------- FashionIQ


def test_fiq_join_matches_clip4cir():
    assert join_captions("is longer and red.", " has no sleeves") == "Is longer and red and has no sleeves"
    assert join_captions("", "is grey with a pocket") == " and is grey with a pocket"
    assert join_captions("is more colorful?", "is darker ,") == "Is more colorful and is darker"
    assert join_captions(" Is BLUE", "...") == "Is blue and "


def test_fiq_reads_raw_captions_targets_and_galleries(tmp_path):
    ds = read_fashioniq(write_fashioniq(tmp_path / "f"))
    _frames_are_canonical(ds)
    q, im = ds.queries, ds.images
    assert len(q) == 27 and q.groupby(["split", "category"]).size().eq(3).all()
    assert q[q["split"] == "test"]["target"].isna().all()
    assert q[q["split"] != "test"]["target"].notna().all()
    first = q.iloc[0]
    assert first["query_id"] == "dress-train-00000"
    assert first["captions"] == ["is longer and red.", " has no sleeves"]  # raw, padded
    assert first["caption"] == "Is longer and red and has no sleeves"
    assert q.iloc[1]["captions"][0] == "" and q.iloc[1]["caption"] == " and is grey with a pocket"
    assert q["group"].eq("").all() and q["members"].map(len).eq(0).all() and q["pairid"].isna().all()
    # 4 images per (category, split) plus the shared ASIN in shirt/train and toptee/val.
    assert len(im) == 9 * 4 + 2
    shared = im[im["image_id"] == FIQ_SHARED_ASIN]
    assert shared[["category", "split"]].values.tolist() == [["shirt", "train"], ["toptee", "val"]]
    assert shared["path"].nunique() == 1
    assert {Path(p).suffix for p in im["path"]} == {".jpg", ".png"}
    assert all(ds.image_exists(p) for p in im["path"])
    png = im[im["path"].str.endswith(".png")].iloc[0]
    assert ds.open_image_bytes(png).startswith(PNG_MAGIC)
    assert ds.open_image_bytes(im.iloc[0]).startswith(JPEG_MAGIC)


def test_fiq_starter_kit_layout_and_subsets(tmp_path):
    root = write_fashioniq(tmp_path / "f", layout="resized_images")
    ds = read_fashioniq(root, splits=["val"], categories=["shirt", "toptee"])
    assert set(ds.queries["category"]) == {"shirt", "toptee"} and set(ds.images["split"]) == {"val"}
    assert ds.images["path"].str.startswith("resized_images/").all()
    assert all(ds.image_exists(p) for p in ds.images["path"])
    with pytest.raises(DataFormatError, match="unknown FashionIQ category"):
        read_fashioniq(root, categories=["shoes"])


def test_fiq_missing_test_files_are_skipped(tmp_path):
    root = write_fashioniq(tmp_path / "f", splits=("train", "val"))
    ds = read_fashioniq(root)
    assert set(ds.queries["split"]) == {"train", "val"}
    with pytest.raises(DataFormatError, match="no split found"):
        read_fashioniq(root, splits=["test"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d[2].pop("target"), r"missing required key\(s\) \['target'\]"),
        (lambda d: d[2]["captions"].append("third"), "captions must hold 2 strings, got 3"),
        (lambda d: d[2].__setitem__("captions", "one string"), "captions must be list"),
        (lambda d: d[2].__setitem__("candidate", 17), "candidate must be str"),
    ],
)
def test_fiq_structural_errors(tmp_path, edit, match):
    root = write_fashioniq(tmp_path / "f", splits=("val",))
    cap = root / "captions" / "cap.toptee.val.json"
    _edit_json(cap, edit)
    with pytest.raises(DataFormatError, match=match) as err:
        read_fashioniq(root)
    assert err.value.path == cap and err.value.record == 2


def test_fiq_caption_file_without_split_file_is_an_error(tmp_path):
    root = write_fashioniq(tmp_path / "f", splits=("val",))
    (root / "image_splits" / "split.dress.val.json").unlink()
    with pytest.raises(DataFormatError, match="split file missing") as err:
        read_fashioniq(root)
    assert err.value.path.name == "split.dress.val.json"


def test_fiq_sidecar(tmp_path):
    ds = read_fashioniq(write_fashioniq(tmp_path / "f", sidecar=True))
    assert ds.queries["edit_types"].map(lambda t: t == ["color"]).all()
    side = tmp_path / "f" / "synthetic_edits.json"
    _edit_json(side, lambda d: d["dress.val"].pop())
    with pytest.raises(DataFormatError, match="'dress.val' has 2 items for 3 caption records"):
        read_fashioniq(tmp_path / "f")


# --------------------------------------------------------------------------- IPr2Pr


def test_ipr2pr_parquet_struct_images(tmp_path):
    root = write_ipr2pr_parquet(tmp_path / "ip", shards=2, rows_per_shard=3, sidecar=True)
    ds = read_ipr2pr(root)
    _frames_are_canonical(ds)
    q, im = ds.queries, ds.images
    assert len(q) == 6 and set(q["split"]) == {"train"}
    assert q["query_id"].iloc[0] == "train-00000-of-00002-f1x7ure0-0"
    # Rows 0 and 1 edit one original: one gallery image, one hard-negative group.
    assert q.loc[0, "reference"] == q.loc[1, "reference"] == q.loc[0, "group"] == "orig-0000"
    assert q.loc[0, "target"] != q.loc[1, "target"]
    assert len(im) == 2 * (2 + 3) and im["image_id"].is_unique
    assert q.loc[0, "caption"] == "make it snowy" and q.loc[0, "captions"] == ["make it snowy"]
    assert q.loc[0, "reference_caption"] == "a photo of scene 0"
    assert q.loc[0, "target_caption"] == "a photo of scene 0, make it snowy"
    assert q["edit_types"].map(lambda t: t == ["color"]).all()
    assert im.loc[0, "path"] == "data/train-00000-of-00002-f1x7ure0.parquet#0/original_image"
    assert ds.embedded
    assert all(ds.open_image_bytes(r).startswith(JPEG_MAGIC) for r in im.itertuples())


def test_ipr2pr_toy_set_columns_without_paths(tmp_path):
    root = write_ipr2pr_parquet(
        tmp_path / "ip", original_column="input_image", with_prompts=False, struct_paths=False
    )
    ds = read_ipr2pr(root)
    q = ds.queries
    assert q.loc[0, "reference"] == "train-00000-of-00002-f1x7ure0-000000-original"
    assert q["reference_caption"].isna().all()
    assert len(ds.images) == 12  # no paths: every cell is its own image
    assert ds.open_image_bytes(ds.images.iloc[0]).startswith(JPEG_MAGIC)
    named = read_ipr2pr(
        root,
        columns=Ipr2prColumns(
            original_image="input_image", original_prompt=None, edited_prompt=None, optional_prompts=False
        ),
    )
    assert named.queries["caption"].tolist() == q["caption"].tolist()


def test_ipr2pr_missing_required_column(tmp_path):
    root = write_ipr2pr_parquet(tmp_path / "ip", drop_column="edited_image")
    with pytest.raises(DataFormatError, match="missing required column 'edited_image'") as err:
        read_ipr2pr(root)
    assert err.value.path.name == "train-00000-of-00002-f1x7ure0.parquet"
    strict = Ipr2prColumns(optional_prompts=False)
    root = write_ipr2pr_parquet(tmp_path / "ip2", with_prompts=False)
    with pytest.raises(DataFormatError, match="missing required column 'original_prompt'"):
        read_ipr2pr(root, columns=strict)


def test_ipr2pr_wrong_column_type_and_null_image(tmp_path):
    root = tmp_path / "ip"
    (root / "data").mkdir(parents=True)
    table = pa.table(
        {
            "original_image": pa.array(["not bytes"]),
            "edit_prompt": ["x"],
            "edited_image": pa.array([b"\xff\xd8\xff"]),
        }
    )
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(DataFormatError, match="image column 'original_image' must be struct"):
        read_ipr2pr(root)

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "original_image": pa.array([None, {"bytes": b"\xff\xd8\xffdata", "path": None}], type=struct),
            "edit_prompt": ["a", "b"],
            "edited_image": pa.array([b"", b"\xff\xd8\xffxx"]),
        }
    )
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")
    ds = read_ipr2pr(root)
    refs = ds.images["path"].tolist()
    assert [ds.image_exists(r) for r in refs] == [False, False, True, True]
    with pytest.raises(FileNotFoundError, match="no image bytes"):
        ds.open_image_bytes(refs[0])


@pytest.mark.parametrize("key", ["caption", "input"])
def test_ipr2pr_seeds_layout(tmp_path, key):
    root = write_ipr2pr_seeds(tmp_path / "raw", prompts=2, seeds_per_prompt=2, caption_key=key)
    ds = read_ipr2pr(root)
    q = ds.queries
    assert len(q) == 4 and len(ds.images) == 8
    assert q.loc[0, "query_id"] == "0000000-4000"
    assert q.loc[0, "reference"] == "0000000/4000_0" and q.loc[0, "target"] == "0000000/4000_1"
    assert q.loc[0, "reference_caption"] == "a drawing of object 0"
    assert q["group"].tolist() == ["0000000", "0000000", "0000001", "0000001"]
    assert all(ds.image_exists(p) for p in ds.images["path"])
    assert not ds.embedded and ds.warnings == []


def test_ipr2pr_seeds_missing_prompt_and_no_layout(tmp_path):
    root = write_ipr2pr_seeds(tmp_path / "raw")
    (root / "0000001" / "prompt.json").unlink()
    with pytest.raises(DataFormatError, match="file not found") as err:
        read_ipr2pr(root)
    assert err.value.path == root / "0000001" / "prompt.json"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataFormatError, match="neither parquet shards"):
        read_ipr2pr(tmp_path / "nothing")


# --------------------------------------------------------------------------- stats + CLI


def test_stats_cli_fashioniq(tmp_path, capsys):
    root = write_fashioniq(tmp_path / "f")
    (root / "images" / f"{FIQ_SHARED_ASIN}.jpg").unlink()
    assert main(["data", "stats", "fashioniq", str(root), "--split", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    val = out["splits"]["val"]
    assert list(out["splits"]) == ["val"]
    assert val["queries"] == 9 and val["empty_captions"] == 3 and val["queries_without_target"] == 0
    assert val["categories"]["toptee"] == {
        "queries": 3,
        "queries_without_target": 0,
        "empty_captions": 1,
        "gallery_images": 5,
        "images_found": 4,
        "images_missing": 1,
    }
    assert out["images_absent"] is False
    assert main(["data", "stats", "fashioniq", str(root), "--split", "test", "--category", "dress"]) == 0
    test = json.loads(capsys.readouterr().out)["splits"]["test"]
    assert test["queries_without_target"] == 3 and list(test["categories"]) == ["dress"]


def test_stats_says_images_absent_and_cli_errors_are_one_line(tmp_path, capsys):
    root = write_cirr(tmp_path / "c", with_images=False)
    stats = dataset_stats("cirr", root)
    assert stats["images_absent"] is True
    assert stats["total"]["images_found"] == 0 and stats["total"]["images_missing"] == 37
    assert stats["splits"]["test1"]["queries_without_target"] == 4
    assert any(w.startswith("images absent") for w in stats["warnings"])

    assert main(["data", "stats", "cirr", str(root), "--category", "dress"]) == 2
    assert "applies to fashioniq only" in capsys.readouterr().err
    (root / "captions" / "cap.rc2.val.json").write_text("[{")
    assert main(["data", "stats", "cirr", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cap.rc2.val.json" in err and "line 1" in err


def test_fiq_separate_image_root(tmp_path):
    root = write_fashioniq(tmp_path / "f", splits=("val",))
    (root / "images").rename(tmp_path / "pics")
    assert any(w.startswith("images absent") for w in read_fashioniq(root).warnings)
    ds = read_fashioniq(root, image_root=tmp_path / "pics")
    assert ds.warnings == []
    assert ds.images["path"].str.startswith("../pics/").all()
    assert ds.open_image_bytes(ds.images.iloc[0]).startswith(JPEG_MAGIC)


# --------------------------------------------------------------------------- CIRR set structure (stats)

REAL_CIRR = Path(__file__).resolve().parents[2] / "shared" / "real-annotations" / "cirr"


def test_stats_cirr_structure_on_fixture(tmp_path):
    root = write_cirr(tmp_path / "c")
    out = dataset_stats("cirr", root)
    val = out["splits"]["val"]["structure"]
    # 2 disjoint sets, 2 queries each with its own reference; train has one image in no set.
    assert val == {"sets": 2, "queries_per_set": 2.0, "images_per_set": 6.0, "references_per_set": 2.0,
                   "shared_images": 0, "shared_image_fraction": 0.0, "gallery_images_in_no_set": 0}
    assert out["splits"]["train"]["structure"]["gallery_images_in_no_set"] == 1

    def share(d):  # the second set reuses two images of the first
        d[2]["img_set"]["members"][:2] = d[0]["img_set"]["members"][2:4]
        d[3]["img_set"]["members"] = d[2]["img_set"]["members"]

    _edit_json(root / "captions" / "cap.rc2.val.json", share)
    val = dataset_stats("cirr", root, split="val")["splits"]["val"]["structure"]
    assert val["shared_images"] == 2 and val["shared_image_fraction"] == round(2 / 12, 4)
    assert val["gallery_images_in_no_set"] == 2


@pytest.mark.skipif(not REAL_CIRR.is_dir(), reason=f"real annotations not present at {REAL_CIRR}")
def test_stats_cirr_structure_on_the_real_val_annotations(capsys):
    assert main(["data", "stats", "cirr", str(REAL_CIRR), "--split", "val"]) == 0
    val = json.loads(capsys.readouterr().out)["splits"]["val"]["structure"]
    assert val["sets"] == 503 and val["queries_per_set"] == round(4181 / 503, 3)
    assert val["images_per_set"] == 6.0 and val["shared_images"] == 549
    assert val["shared_image_fraction"] == round(549 / 2297, 4)
    assert val["references_per_set"] > 5
