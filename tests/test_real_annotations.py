"""Readers, stats and prepare on the real CIRR/FashionIQ annotation files (no images).

The files live outside the repository (``../shared/real-annotations`` relative to the repo
root) and are never copied into it; every test skips when they are absent. The expected numbers
are the published counts (``docs/data-formats.md``, "Real annotation counts").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detailfusion.cli import main
from detailfusion.data import read_cirr, read_fashioniq
from detailfusion.data.prepare import run_prepare
from detailfusion.data.stats import dataset_stats
from detailfusion.params import repo_section

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-annotations"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real annotations not present at {REAL}")

FIQ_COUNTS = {  # (queries, gallery images) per split and category
    "val": {"dress": (2017, 3817), "shirt": (2038, 6346), "toptee": (1961, 5373)},
    "train": {"dress": (5985, 11452), "shirt": (5988, 19036), "toptee": (6027, 16121)},
}


@pytest.fixture(scope="module")
def cirr_val():
    return read_cirr(REAL / "cirr", splits=["val"])


@pytest.fixture(scope="module")
def fiq():
    return read_fashioniq(REAL / "fashioniq")


def test_cirr_val_counts_and_invariants(cirr_val):
    q, im = cirr_val.queries, cirr_val.images
    assert len(q) == 4181 and len(im) == 2297
    assert q["pairid"].is_unique and q["query_id"].is_unique
    assert im["image_id"].is_unique
    gallery = set(im["image_id"])
    for row in q.itertuples():
        assert len(set(row.members)) == 6
        assert row.reference in row.members and row.target in row.members
        assert row.reference in gallery and row.target in gallery
    assert q.groupby("set_id")["members"].apply(lambda m: len({tuple(x) for x in m})).eq(1).all()
    assert q["set_id"].nunique() == 503


def test_cirr_noisy_target_soft_is_kept_verbatim(cirr_val):
    noisy = 0
    scores = set()
    for row in cirr_val.queries.itertuples():
        soft = json.loads(row.target_soft)
        scores.update(soft.values())
        if row.target not in soft and row.reference in soft:
            noisy += 1
    assert noisy == 37
    assert scores == {1.0, 0.5, 0.2, -1.0}


def test_cirr_train_gallery_without_captions(tmp_path):
    ds = read_cirr(REAL / "cirr")
    assert ds.images.groupby("split").size().to_dict() == {"train": 16939, "val": 2297}
    assert set(ds.queries["split"]) == {"val"}
    assert any("cap.rc2.train.json absent" in w for w in ds.warnings)
    assert any(w.startswith("images absent") for w in ds.warnings)


def test_cirr_stats_cli(capsys):
    assert main(["data", "stats", "cirr", str(REAL / "cirr"), "--split", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    val = out["splits"]["val"]
    assert val["queries"] == 4181 and val["gallery_images"] == 2297
    assert val["images_found"] == 0 and val["images_missing"] == 2297 and val["empty_captions"] == 0
    assert out["images_absent"] is True


def test_fiq_counts_per_split_and_category(fiq):
    q, im = fiq.queries, fiq.images
    for split, cats in FIQ_COUNTS.items():
        for cat, (n_queries, n_images) in cats.items():
            assert ((q["split"] == split) & (q["category"] == cat)).sum() == n_queries
            assert ((im["split"] == split) & (im["category"] == cat)).sum() == n_images
    assert q["query_id"].is_unique
    assert q["target"].notna().all()


def test_fiq_empty_captions_and_shared_images(fiq):
    q, im = fiq.queries, fiq.images
    empty = q.assign(n=q["captions"].map(lambda cs: sum(not c.strip() for c in cs)))
    by = empty.groupby(["split", "category"])["n"].sum().to_dict()
    assert by[("val", "shirt")] + by[("val", "toptee")] + by[("val", "dress")] == 3
    assert by[("train", "toptee")] == 12
    # An empty first caption keeps CLIP4Cir's leading " and ...".
    assert q.loc[q["captions"].map(lambda cs: cs[0] == ""), "caption"].str.startswith(" and ").all()
    shirt = set(im.loc[im["category"] == "shirt", "image_id"])
    toptee = set(im.loc[im["category"] == "toptee", "image_id"])
    shared = shirt & toptee
    assert shared
    one = next(iter(sorted(shared)))
    assert im.loc[im["image_id"] == one, "path"].nunique() == 1


def test_fiq_stats_cli(capsys):
    assert main(["data", "stats", "fashioniq", str(REAL / "fashioniq")]) == 0
    out = json.loads(capsys.readouterr().out)
    for split, cats in FIQ_COUNTS.items():
        for cat, (n_queries, n_images) in cats.items():
            entry = out["splits"][split]["categories"][cat]
            assert (entry["queries"], entry["gallery_images"]) == (n_queries, n_images)
    assert out["splits"]["val"]["empty_captions"] == 3
    assert out["splits"]["train"]["categories"]["toptee"]["empty_captions"] == 12
    assert out["images_absent"] is True
    stats = dataset_stats("fashioniq", REAL / "fashioniq", split="val", category="dress")
    assert stats["splits"]["val"]["categories"]["dress"]["queries"] == 2017


def test_prepare_annotation_only(tmp_path):
    summary = run_prepare(
        repo_section("prepare", datasets=["cirr"], image_size=16), REAL, tmp_path / "out", progress=False
    )
    s = summary["datasets"]["cirr"]
    assert s["queries"] == 4181 and s["images_found"] == 0 and s["quarantined"]["missing"] == 2297 + 16939
    assert any("images absent" in w for w in summary["warnings"])
