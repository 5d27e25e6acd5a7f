"""The ``validate`` stage: GX suites on prepared manifests, the report, Data Docs, and the CLI.

Prepared folders are built here directly from ``make_queries`` / ``make_images`` plus the
columns ``prepare`` adds, so these tests do not depend on the prepare stage's code. Each
planted fault must fail validation with a summary naming the data set, the column and the
offending id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import params_file

from detailfusion.cli import main
from detailfusion.config import load_section
from detailfusion.data.manifest import make_images, make_queries
from detailfusion.data.validate import ValidateConfig, run_validate
from detailfusion.data.validation.gx_runner import gx_version
from detailfusion.errors import ConfigError, DataFormatError, ValidationFailed
from detailfusion.params import repo_section

# --------------------------------------------------------------------------- fixtures: tiny prepared data


def _cirr() -> tuple[pd.DataFrame, pd.DataFrame]:
    queries, images = [], []
    pairid = 100
    for split, prefix in (("train", "train"), ("val", "dev"), ("test1", "test1")):
        names = [f"{prefix}-{i}-0-img{i % 2}" for i in range(12)]
        images += [
            {"dataset": "cirr", "split": split, "category": "", "image_id": n, "path": f"./{prefix}/{n}.png"}
            for n in names
        ]
        for set_id, members in enumerate((names[:6], names[6:])):
            for k in range(2):
                pairid += 1
                target = None if split == "test1" else members[k + 1]
                queries.append(
                    {
                        "dataset": "cirr",
                        "split": split,
                        "category": "",
                        "query_id": str(pairid),
                        "pairid": pairid,
                        "reference": members[k],
                        "target": target,
                        "target_soft": None if target is None else json.dumps({target: 1.0}),
                        "caption": f"add {k + 2} red balloons",
                        "captions": [f"add {k + 2} red balloons"],
                        "members": list(members),
                        "set_id": set_id,
                        "group": str(set_id),
                    }
                )
    return make_queries(queries), make_images(images)


def _fashioniq() -> tuple[pd.DataFrame, pd.DataFrame]:
    queries, images = [], []
    for split in ("train", "val", "test"):
        for cat in ("dress", "shirt"):
            asins = [f"B{cat[:2].upper()}{split[:2].upper()}{i:04d}" for i in range(6)]
            images += [
                {
                    "dataset": "fashioniq",
                    "split": split,
                    "category": cat,
                    "image_id": a,
                    "path": f"images/{a}.jpg",
                }
                for a in asins
            ]
            if cat == "shirt":
                # Shirt and toptee share ASINs in the real data: one file, two gallery rows.
                images.append(
                    {
                        "dataset": "fashioniq",
                        "split": split,
                        "category": "toptee",
                        "image_id": asins[0],
                        "path": f"images/{asins[0]}.jpg",
                    }
                )
            for i in range(3):
                # The real val split has empty individual captions; the joined caption is not empty.
                raw = ["is darker", "" if split == "val" and i == 0 else "has short sleeves"]
                queries.append(
                    {
                        "dataset": "fashioniq",
                        "split": split,
                        "category": cat,
                        "query_id": f"{cat}-{split}-{i:05d}",
                        "reference": asins[i],
                        "target": None if split == "test" else asins[i + 1],
                        "caption": f"Is darker and {raw[1]}",
                        "captions": raw,
                        "group": "",
                    }
                )
    return make_queries(queries), make_images(images)


def _ipr2pr() -> tuple[pd.DataFrame, pd.DataFrame]:
    queries, images = [], []
    for i in range(5):
        ref, tgt = f"orig-{i:03d}", f"edit-{i:03d}"
        images += [
            {
                "dataset": "ipr2pr",
                "split": "train",
                "category": "",
                "image_id": n,
                "path": f"data/train-0.parquet#{i}/{col}",
            }
            for n, col in ((ref, "original_image"), (tgt, "edited_image"))
        ]
        queries.append(
            {
                "dataset": "ipr2pr",
                "split": "train",
                "category": "",
                "query_id": f"0-{i}",
                "reference": ref,
                "target": tgt,
                "caption": "make the small circle blue",
                "captions": ["make the small circle blue"],
                "group": ref,
                "reference_caption": "a small red circle",
                "target_caption": "a small blue circle",
            }
        )
    return make_queries(queries), make_images(images)


BUILDERS: dict[str, Callable[[], tuple[pd.DataFrame, pd.DataFrame]]] = {
    "cirr": _cirr,
    "fashioniq": _fashioniq,
    "ipr2pr": _ipr2pr,
}


def prepared_images(images: pd.DataFrame) -> pd.DataFrame:
    """Add the columns ``prepare`` writes: every image readable, 64x64, one pixel row per file."""
    out = images.copy()
    out["width"] = pd.array([64] * len(out), dtype="Int64")
    out["height"] = pd.array([64] * len(out), dtype="Int64")
    out["status"] = pd.Series(["ok"] * len(out), dtype="str")
    _number_pixels(out)
    return out


def _number_pixels(images: pd.DataFrame) -> None:
    """Pixel rows as prepare numbers them: one per distinct readable file, -1 when quarantined."""
    ok = (images["status"] == "ok").to_numpy()
    index = np.full(len(images), -1, dtype="int64")
    index[ok] = pd.factorize(images.loc[ok, "path"])[0]
    images["pixel_index"] = index


def write_prepared(
    root: Path, name: str, queries: pd.DataFrame, images: pd.DataFrame, quarantine: list[dict] | None = None
) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    queries.to_parquet(folder / "queries.parquet", index=False)
    images.to_parquet(folder / "images.parquet", index=False)
    (folder / "quarantine.json").write_text(json.dumps(quarantine or []), encoding="utf-8")
    (folder / "summary.json").write_text(
        json.dumps({"queries": len(queries), "images": len(images)}), encoding="utf-8"
    )
    ok = images["status"] == "ok" if "status" in images else slice(None)
    n_rows = images.loc[ok, "pixel_index"].nunique()
    np.save(folder / "pixels.npy", np.zeros((n_rows, 4, 4, 3), dtype=np.uint8))
    return folder


@pytest.fixture(scope="session", autouse=True)
def _gx_imported() -> None:
    """Pay the Great Expectations import (seconds) once, outside any one test's timing."""
    gx_version()


@pytest.fixture(scope="session")
def frames() -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    return {name: (q, prepared_images(i)) for name, (q, i) in ((n, b()) for n, b in BUILDERS.items())}


def _copy(frames: dict, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    q, i = frames[name]
    return q.copy(deep=True), i.copy(deep=True)


def _run_failing(tmp_path: Path) -> tuple[str, dict]:
    with pytest.raises(ValidationFailed) as info:
        run_validate(repo_section("validate"), tmp_path / "prepared", tmp_path / "reports")
    report = json.loads((tmp_path / "reports" / "report.json").read_text(encoding="utf-8"))
    return str(info.value), report


# --------------------------------------------------------------------------- config


def test_config_rejects_nonsense(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_quarantined_fraction"):
        repo_section("validate", max_quarantined_fraction=1.5).validate()
    with pytest.raises(ValueError, match="max_image_side"):
        repo_section("validate", min_image_side=100, max_image_side=10).validate()
    with pytest.raises(ValueError, match="max_caption_words"):
        repo_section("validate", max_caption_words=0).validate()
    params = params_file(tmp_path / "params.yaml", {"validate": {"prepared": "p", "max_image_side": "big"}})
    with pytest.raises(ConfigError, match="max_image_side"):
        load_section(ValidateConfig, params, "validate")


def test_repo_params_section_loads() -> None:
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cfg = load_section(ValidateConfig, params, "validate")
    assert cfg.max_quarantined_fraction == 0.0 and isinstance(cfg.prepared, Path)


# --------------------------------------------------------------------------- valid data


def test_valid_manifests_pass_and_write_report_and_data_docs(tmp_path: Path, frames: dict) -> None:
    prepared, reports = tmp_path / "prepared", tmp_path / "reports"
    for name in BUILDERS:
        write_prepared(prepared, name, *frames[name])
    # The fixture really holds the FashionIQ quirks that must be tolerated: an empty raw
    # caption, and one image file listed under two categories (sharing its pixel row).
    fiq_q, fiq_i = frames["fashioniq"]
    assert "" in set(fiq_q["captions"].explode())
    assert fiq_i["path"].duplicated().any() and fiq_i["pixel_index"].duplicated().any()

    out = run_validate(repo_section("validate"), prepared, reports)

    assert out["success"] is True
    assert "passed" in out["summary_text"]
    report = json.loads((reports / "report.json").read_text(encoding="utf-8"))
    assert report["success"] is True and report["failed"] == 0
    assert set(report["datasets"]) == set(BUILDERS)
    for name in BUILDERS:
        tables = report["datasets"][name]["tables"]
        assert set(tables) == {"queries", "images"}
        assert tables["queries"]["rows"] == len(frames[name][0])
        checks = {e["check"]: e for e in tables["queries"]["expectations"]}
        assert checks["reference_in_gallery"]["success"] is True
        assert checks["reference_in_gallery"]["element_count"] == len(frames[name][0])
        assert all(e["success"] for t in tables.values() for e in t["expectations"])
    cirr_checks = {e["check"] for e in report["datasets"]["cirr"]["tables"]["queries"]["expectations"]}
    assert {"pairid_unique", "members_contain_target", "members_distinct"} <= cirr_checks
    docs = reports / "data_docs"
    assert (docs / "index.html").is_file()
    # Data Docs hold the validation results pages, not only the suites.
    pages = {p.name for p in (docs / "validations").rglob("*.html")}
    assert len(pages) == 2 * len(BUILDERS)
    # Only the final files remain: no temp report, no staging folder.
    assert sorted(p.name for p in reports.iterdir()) == ["data_docs", "report.json"]


def test_ipr2pr_without_prompt_columns_is_noted_not_failed(tmp_path: Path, frames: dict) -> None:
    q, i = _copy(frames, "ipr2pr")
    q["reference_caption"] = None
    q["target_caption"] = None
    write_prepared(tmp_path / "prepared", "ipr2pr", q, i)
    out = run_validate(repo_section("validate"), tmp_path / "prepared", tmp_path / "reports")
    assert out["success"] is True
    assert any("reference_caption" in n for n in out["report"]["datasets"]["ipr2pr"]["notes"])


# --------------------------------------------------------------------------- planted faults
# Each plant function breaks one thing on rows no other fault touches and returns the offending
# query_id or image_id; quarantined images are appended to ``quarantine`` (quarantine.json).

Plant = Callable[[pd.DataFrame, pd.DataFrame, list], str]


def _dup_query_id(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    q.loc[1, "query_id"] = q.loc[0, "query_id"]
    return q.loc[0, "query_id"]


def _dup_pairid(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    q.loc[5, "pairid"] = q.loc[4, "pairid"]
    return q.loc[5, "query_id"]


def _fiq_row(q: pd.DataFrame, split: str, category: str, n: int) -> int:
    return q.index[(q["split"] == split) & (q["category"] == category)][n]


def _reference_from_other_split(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    row = _fiq_row(q, "val", "dress", 1)
    q.loc[row, "reference"] = i.loc[(i["split"] == "train") & (i["category"] == "dress"), "image_id"].iloc[5]
    return q.loc[row, "query_id"]


def _reference_from_other_category(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    row = _fiq_row(q, "train", "dress", 2)
    q.loc[row, "reference"] = i.loc[(i["split"] == "train") & (i["category"] == "shirt"), "image_id"].iloc[5]
    return q.loc[row, "query_id"]


def _reference_is_target(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    q.loc[3, "target"] = q.loc[3, "reference"]
    return q.loc[3, "query_id"]


def _blank_caption(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    q.loc[2, "caption"] = "   "
    return q.loc[2, "query_id"]


def _missing_target_caption(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    q.loc[4, "target_caption"] = None
    return q.loc[4, "query_id"]


def _members_without_target(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    # Swap the target for an image of the other set of the same split: still 6 distinct gallery names.
    outsider = q.loc[2, "members"][5]
    q.at[0, "members"] = [outsider if m == q.loc[0, "target"] else m for m in q.loc[0, "members"]]
    return q.loc[0, "query_id"]


def _quarantine(i: pd.DataFrame, row: int, status: str) -> None:
    i.loc[row, ["status", "width", "height"]] = [status, None, None]
    _number_pixels(i)


def _corrupt_image(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    _quarantine(i, 4, "corrupt")
    quarantine.append(
        {
            "image_id": i.loc[4, "image_id"],
            "path": i.loc[4, "path"],
            "splits": [i.loc[4, "split"]],
            "status": "corrupt",
            "reason": "truncated PNG",
        }
    )
    return i.loc[4, "image_id"]


def _unlisted_quarantine(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    _quarantine(i, 0, "missing")
    return i.loc[0, "image_id"]


def _two_files_one_pixel_row(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    # The last pixel row's file takes row 8's pixels instead: rows stay in range, one goes unused
    # (pixels.npy is written one row shorter), and two files now share a row.
    last = int(i["pixel_index"].idxmax())
    i.loc[last, "pixel_index"] = i.loc[8, "pixel_index"]
    return i.loc[last, "image_id"]


def _silly_size(q: pd.DataFrame, i: pd.DataFrame, quarantine: list) -> str:
    i.loc[7, "width"] = 100_000
    return i.loc[7, "image_id"]


# data set -> (fault, expectations that must fail, table / column the summary names, plant)
FAULTS: dict[str, list[tuple[str, tuple[str, ...], str, Plant]]] = {
    "cirr": [
        ("duplicate query_id", ("query_id_unique",), "queries / column 'query_id'", _dup_query_id),
        ("duplicate pairid", ("pairid_unique",), "queries / column 'pairid'", _dup_pairid),
        ("empty caption", ("caption_not_blank",), "queries / column 'caption'", _blank_caption),
        (
            "members without the target",
            ("members_contain_target",),
            "queries / column 'members'",
            _members_without_target,
        ),
        (
            "corrupt image, no quarantine budget",
            ("quarantined_fraction",),
            "images / column 'status'",
            _corrupt_image,
        ),
    ],
    "fashioniq": [
        (
            "reference from another split",
            ("reference_in_gallery",),
            "queries / column 'reference'",
            _reference_from_other_split,
        ),
        (
            "reference from another category",
            ("reference_in_gallery",),
            "queries / column 'reference'",
            _reference_from_other_category,
        ),
        ("silly image size", ("width_range",), "images / column 'width'", _silly_size),
        (
            "two image files share one pixels.npy row",
            ("pixel_row_per_file",),
            "images / column 'pixel_index'",
            _two_files_one_pixel_row,
        ),
    ],
    "ipr2pr": [
        (
            "reference == target",
            ("reference_differs_from_target",),
            "queries / column 'reference'",
            _reference_is_target,
        ),
        ("empty caption", ("caption_not_blank",), "queries / column 'caption'", _blank_caption),
        (
            "missing target caption",
            ("target_caption_present",),
            "queries / column 'target_caption'",
            _missing_target_caption,
        ),
        (
            "quarantined image not in quarantine.json",
            ("listed_in_quarantine", "quarantined_fraction"),
            "images / column 'status'",
            _unlisted_quarantine,
        ),
    ],
}


@pytest.mark.parametrize("dataset", list(FAULTS))
def test_planted_faults_fail_with_readable_summary(tmp_path: Path, frames: dict, dataset: str) -> None:
    q, i = _copy(frames, dataset)
    quarantine: list[dict] = []
    planted = [
        (fault, checks, where, plant(q, i, quarantine)) for fault, checks, where, plant in FAULTS[dataset]
    ]
    write_prepared(tmp_path / "prepared", dataset, q, i, quarantine)

    summary, report = _run_failing(tmp_path)

    assert report["success"] is False and report["summary_text"] == summary
    failed = {f["check"]: f for f in report["failures"]}
    # Exactly the planted faults fail: no false alarm elsewhere.
    assert set(failed) == {c for _, checks, _, _ in planted for c in checks}
    lines = summary.splitlines()
    for fault, checks, where, offending in planted:
        for check in checks:
            assert offending in " ".join(failed[check]["unexpected_examples"]), (fault, check)
        assert any(f"{dataset} / {where}" in line and offending in line for line in lines), (fault, summary)
    assert (tmp_path / "reports" / "data_docs" / "index.html").is_file()
    if dataset == "cirr":
        assert "corrupt: truncated PNG" in summary  # the reason from quarantine.json


def test_quarantine_budget_allows_quarantined_images(tmp_path: Path, frames: dict) -> None:
    q, i = _copy(frames, "cirr")
    quarantine: list[dict] = []
    _corrupt_image(q, i, quarantine)
    write_prepared(tmp_path / "prepared", "cirr", q, i, quarantine)
    # One image in 36 is within a 5% quarantine budget.
    out = run_validate(
        repo_section("validate", max_quarantined_fraction=0.05), tmp_path / "prepared", tmp_path / "reports"
    )
    assert out["success"] is True
    checks = {e["check"]: e for e in out["report"]["datasets"]["cirr"]["tables"]["images"]["expectations"]}
    assert checks["quarantined_fraction"]["unexpected_count"] == 1


def test_empty_queries_table_fails(tmp_path: Path, frames: dict) -> None:
    q, i = _copy(frames, "cirr")
    write_prepared(tmp_path / "prepared", "cirr", q.iloc[0:0], i)
    summary, report = _run_failing(tmp_path)
    assert "cirr / queries / whole table" in summary and "observed: 0" in summary
    assert {f["check"] for f in report["failures"]} == {"queries_not_empty"}


REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-annotations"


@pytest.mark.slow
def test_real_annotations_validate_clean(tmp_path: Path) -> None:
    """Real CIRR/FashionIQ val manifests (images assumed readable) raise no false alarm."""
    if not (REAL / "cirr").is_dir() or not (REAL / "fashioniq").is_dir():
        pytest.skip(f"real annotations not present at {REAL}")
    from detailfusion.data.cirr import read_cirr
    from detailfusion.data.fashioniq import read_fashioniq

    cirr = read_cirr(REAL / "cirr", splits=["val"])
    fiq = read_fashioniq(REAL / "fashioniq", splits=["val"])
    write_prepared(tmp_path / "prepared", "cirr", cirr.queries, prepared_images(cirr.images))
    write_prepared(tmp_path / "prepared", "fashioniq", fiq.queries, prepared_images(fiq.images))

    out = run_validate(repo_section("validate"), tmp_path / "prepared", tmp_path / "reports")

    assert out["success"] is True, out["summary_text"]
    fiq_queries = out["report"]["datasets"]["fashioniq"]["tables"]["queries"]
    assert fiq_queries["rows"] == len(fiq.queries) > 1000
    # The real val split has empty individual captions, and they are tolerated.
    assert "" in set(fiq.queries["captions"].explode())


# --------------------------------------------------------------------------- report files and errors


def test_failed_run_replaces_previous_report_whole(tmp_path: Path, frames: dict) -> None:
    prepared, reports = tmp_path / "prepared", tmp_path / "reports"
    write_prepared(prepared, "cirr", *frames["cirr"])
    run_validate(repo_section("validate"), prepared, reports)
    assert json.loads((reports / "report.json").read_text(encoding="utf-8"))["success"] is True

    q, i = _copy(frames, "cirr")
    _dup_query_id(q, i, [])
    write_prepared(prepared, "cirr", q, i)
    _, report = _run_failing(tmp_path)

    assert report["success"] is False
    assert sorted(p.name for p in reports.iterdir()) == ["data_docs", "report.json"]
    assert (reports / "data_docs" / "index.html").is_file()


def test_format_error_leaves_previous_report_untouched(tmp_path: Path, frames: dict) -> None:
    prepared, reports = tmp_path / "prepared", tmp_path / "reports"
    write_prepared(prepared, "ipr2pr", *frames["ipr2pr"])
    run_validate(repo_section("validate"), prepared, reports)
    before = (reports / "report.json").read_bytes()

    (prepared / "ipr2pr" / "images.parquet").unlink()
    with pytest.raises(DataFormatError, match=r"ipr2pr/images\.parquet"):
        run_validate(repo_section("validate"), prepared, reports)
    (prepared / "ipr2pr" / "quarantine.json").write_text("{not json", encoding="utf-8")
    frames["ipr2pr"][1].to_parquet(prepared / "ipr2pr" / "images.parquet", index=False)
    with pytest.raises(DataFormatError, match=r"quarantine\.json.*not valid JSON"):
        run_validate(repo_section("validate"), prepared, reports)

    assert (reports / "report.json").read_bytes() == before


def test_missing_columns_and_missing_folders_are_format_errors(tmp_path: Path, frames: dict) -> None:
    with pytest.raises(DataFormatError, match="prepared folder not found"):
        run_validate(repo_section("validate"), tmp_path / "nowhere", tmp_path / "reports")
    (tmp_path / "prepared" / "other").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no prepared data set folder"):
        run_validate(repo_section("validate"), tmp_path / "prepared", tmp_path / "reports")
    q, i = _copy(frames, "cirr")
    write_prepared(tmp_path / "prepared", "cirr", q, i.drop(columns=["status"]))
    with pytest.raises(DataFormatError, match=r"images\.parquet.*missing column.*status"):
        run_validate(repo_section("validate"), tmp_path / "prepared", tmp_path / "reports")


# --------------------------------------------------------------------------- CLI


def _params(tmp_path: Path) -> Path:
    return params_file(tmp_path / "params.yaml", {
        "validate": {
            "prepared": str(tmp_path / "prepared"),
            "report_dir": str(tmp_path / "reports"),
            "max_quarantined_fraction": 0.0,
            "max_caption_words": 80,
            "min_image_side": 8,
            "max_image_side": 20000,
        }
    })


def test_cli_validate_passes(tmp_path: Path, frames: dict, capsys: pytest.CaptureFixture[str]) -> None:
    write_prepared(tmp_path / "prepared", "fashioniq", *frames["fashioniq"])
    rc = main(["--params", str(_params(tmp_path)), "data", "validate"])
    assert rc == 0
    assert "Data validation passed" in capsys.readouterr().out
    assert (tmp_path / "reports" / "report.json").is_file()


def test_cli_validate_failure_exits_2_with_summary(
    tmp_path: Path, frames: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    q, i = _copy(frames, "cirr")
    _members_without_target(q, i, [])
    write_prepared(tmp_path / "elsewhere", "cirr", q, i)
    rc = main(
        [
            "--params",
            str(_params(tmp_path)),
            "data",
            "validate",
            "--prepared",
            str(tmp_path / "elsewhere"),
            "--report-dir",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "Data validation FAILED" in err
    assert "cirr / queries / column 'members'" in err and q.loc[0, "query_id"] in err
    assert json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))["success"] is False
