"""CIRR test-server submission files: exact format, round trip to metrics, and malformed-file errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detailfusion.data.manifest import make_queries
from detailfusion.errors import DataFormatError
from detailfusion.eval.metrics import cirr_metrics, cirr_rankings
from detailfusion.eval.submission import (
    MAX_SUBMISSION_BYTES,
    metrics_from_submission,
    read_cirr_submission,
    write_cirr_submission,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-annotations"


def synthetic_split(n_query: int = 40, n_gallery: int = 150, dim: int = 8, seed: int = 0):
    """A CIRR-like split: 6-image sets, queries near their targets, pairids not in file order."""
    rng = np.random.default_rng(seed)
    names = [f"val-{j}-{j % 4}-img{j % 2}" for j in range(n_gallery)]
    gallery = rng.standard_normal((n_gallery, dim))
    rows = []
    pairids = rng.permutation(np.arange(1000, 1000 + n_query))
    for i in range(n_query):
        pick = rng.choice(n_gallery, size=6, replace=False)
        rows.append(
            {
                "dataset": "cirr",
                "split": "val",
                "category": "",
                "query_id": str(pairids[i]),
                "pairid": int(pairids[i]),
                "reference": names[pick[0]],
                "target": names[pick[1]],
                "caption": f"caption {i}",
                "members": [names[j] for j in pick],
            }
        )
    queries = make_queries(rows)
    target_idx = [names.index(t) for t in queries["target"]]
    feats = gallery[target_idx] + 1.2 * rng.standard_normal((n_query, dim))
    return queries, feats, gallery, names


def rank(queries, feats, gallery, names):
    return cirr_rankings(
        feats,
        gallery,
        names,
        list(queries["reference"]),
        list(queries["members"]),
        targets=list(queries["target"]),
    )


def test_submission_files_have_the_server_format(tmp_path):
    queries, feats, gallery, names = synthetic_split()
    ranked, subset = rank(queries, feats, gallery, names)
    recall_path, subset_path = write_cirr_submission(
        list(queries["pairid"]),
        ranked,
        subset,
        tmp_path / "sub",
        "val",
        references=list(queries["reference"]),
    )
    assert recall_path.name == "recall_submission_val.json"
    assert subset_path.name == "recall_subset_submission_val.json"
    for path, metric, length, rankings in (
        (recall_path, "recall", 50, ranked),
        (subset_path, "recall_subset", 3, subset),
    ):
        text = path.read_text()
        data = json.loads(text)
        assert text == json.dumps(data, sort_keys=True)  # written with sort_keys, default separators
        assert data["version"] == "rc2" and data["metric"] == metric
        keys = set(data) - {"version", "metric"}
        assert keys == {str(p) for p in queries["pairid"]}
        for pairid, ref, row in zip(queries["pairid"], queries["reference"], rankings, strict=True):
            names_out = data[str(pairid)]
            assert names_out == row[:length] and len(names_out) == length
            assert ref not in names_out
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [recall_path.name, subset_path.name]
    metric, read = read_cirr_submission(subset_path)
    assert metric == "recall_subset" and read[str(queries["pairid"][0])] == subset[0][:3]


def test_metrics_from_submission_equal_cirr_metrics_exactly(tmp_path):
    for seed in (0, 1, 2):
        queries, feats, gallery, names = synthetic_split(n_query=60, n_gallery=200, seed=seed)
        ranked, subset = rank(queries, feats, gallery, names)
        paths = write_cirr_submission(list(queries["pairid"]), ranked, subset, tmp_path, f"s{seed}")
        from_files = metrics_from_submission(*paths, queries)
        direct = cirr_metrics(ranked, subset, list(queries["target"]))
        assert from_files == direct
        assert 0 < direct["R@1"] < 100


def test_write_rejects_bad_rankings_and_writes_nothing(tmp_path):
    queries, feats, gallery, names = synthetic_split()
    ranked, subset = rank(queries, feats, gallery, names)
    pairids = list(queries["pairid"])
    refs = list(queries["reference"])
    key = str(pairids[1])

    short = [list(r) for r in ranked]
    short[1] = short[1][:49]
    with pytest.raises(
        DataFormatError, match=rf"recall_submission_val\.json \(record {key}\): list holds 49 names"
    ):
        write_cirr_submission(pairids, short, subset, tmp_path, "val")
    with_ref = [list(s) for s in subset]
    with_ref[1] = [refs[1]] + with_ref[1][:2]
    with pytest.raises(
        DataFormatError, match=rf"recall_subset_submission_val\.json \(record {key}\): .*reference"
    ):
        write_cirr_submission(pairids, ranked, with_ref, tmp_path, "val", references=refs)
    with pytest.raises(DataFormatError, match="occurs twice"):
        write_cirr_submission([pairids[0]] + pairids[:-1], ranked, subset, tmp_path, "val")
    ext = [list(r) for r in ranked]
    ext[0][0] = ext[0][0] + ".png"
    with pytest.raises(DataFormatError, match="file extension"):
        write_cirr_submission(pairids, ext, subset, tmp_path, "val")
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_files_over_the_upload_limit(tmp_path):
    # 2,600 queries x 50 names of ~40 characters is well over 5 MB.
    names = [f"a-very-long-image-name-for-size-{j:08d}" for j in range(60)]
    n = 2600
    ranked = [names[:50]] * n
    subset = [names[:3]] * n
    with pytest.raises(DataFormatError, match=f"exceeds the server limit of {MAX_SUBMISSION_BYTES}"):
        write_cirr_submission(list(range(n)), ranked, subset, tmp_path, "test1")
    assert list(tmp_path.iterdir()) == []


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data,message",
    [
        ([1, 2], "top level must be an object"),
        ({"version": "rc1", "metric": "recall"}, "'version' must be 'rc2'"),
        ({"version": "rc2", "metric": "recall_at_k"}, "'metric' must be one of"),
        (
            {"version": "rc2", "metric": "recall_subset", "012": ["a", "b", "c"]},
            r"\(record 012\): key is not a pairid",
        ),
        (
            {"version": "rc2", "metric": "recall_subset", "x7": ["a", "b", "c"]},
            r"\(record x7\): key is not a pairid",
        ),
        ({"version": "rc2", "metric": "recall_subset", "7": ["a", "b"]}, r"\(record 7\): list holds 2 names"),
        (
            {"version": "rc2", "metric": "recall_subset", "7": ["a", "b", 3]},
            r"\(record 7\): value must be a list",
        ),
        ({"version": "rc2", "metric": "recall_subset", "7": "abc"}, r"\(record 7\): value must be a list"),
        (
            {"version": "rc2", "metric": "recall_subset", "7": ["a", "b", "a"]},
            r"\(record 7\): name 'a' occurs twice",
        ),
        (
            {"version": "rc2", "metric": "recall", "7": ["a"] * 3},
            r"\(record 7\): list holds 3 names, .* expects 50",
        ),
    ],
)
def test_read_rejects_malformed_submissions(tmp_path, data, message):
    path = _write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataFormatError, match=message) as info:
        read_cirr_submission(path)
    assert "bad.json" in str(info.value)


def test_read_rejects_missing_and_non_json_files(tmp_path):
    with pytest.raises(DataFormatError, match="nope.json: submission file not found"):
        read_cirr_submission(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="broken.json: not valid JSON"):
        read_cirr_submission(tmp_path / "broken.json")


def test_metrics_from_submission_checks_files_against_the_manifest(tmp_path):
    queries, feats, gallery, names = synthetic_split()
    ranked, subset = rank(queries, feats, gallery, names)
    recall_path, subset_path = write_cirr_submission(list(queries["pairid"]), ranked, subset, tmp_path, "val")
    key = str(queries["pairid"][0])

    with pytest.raises(DataFormatError, match="'metric' is 'recall_subset', expected 'recall'"):
        metrics_from_submission(subset_path, recall_path, queries)
    with pytest.raises(DataFormatError, match=r"\(record \d+\): pairid is not in the queries manifest"):
        metrics_from_submission(recall_path, subset_path, queries.iloc[1:])
    test_split = queries.copy()
    test_split["target"] = None
    with pytest.raises(DataFormatError, match="no target"):
        metrics_from_submission(recall_path, subset_path, test_split)

    data = json.loads(recall_path.read_text())
    data[key] = [queries["reference"][0]] + data[key][:49]
    _write_json(recall_path, data)
    with pytest.raises(DataFormatError, match=rf"recall_submission_val.json \(record {key}\): .*reference"):
        metrics_from_submission(recall_path, subset_path, queries)

    recall_path, subset_path = write_cirr_submission(list(queries["pairid"]), ranked, subset, tmp_path, "val")
    data = json.loads(subset_path.read_text())
    outsider = next(n for n in names if n not in queries["members"][0])
    data[key] = [outsider] + data[key][:2]
    _write_json(subset_path, data)
    with pytest.raises(
        DataFormatError, match=rf"\(record {key}\): '{outsider}' is not one of the query's set members"
    ):
        metrics_from_submission(recall_path, subset_path, queries)

    del data[key]
    _write_json(subset_path, data)
    with pytest.raises(
        DataFormatError, match=rf"\(record {key}\): pairid of the queries manifest is missing"
    ):
        metrics_from_submission(recall_path, subset_path, queries)


@pytest.mark.skipif(not REAL.is_dir(), reason="real annotations not available")
def test_real_scale_cirr_val_submission_round_trips_under_the_size_limit(tmp_path):
    cirr = REAL / "cirr"
    gallery_names = list(json.loads((cirr / "image_splits" / "split.rc2.val.json").read_text()))
    caps = json.loads((cirr / "captions" / "cap.rc2.val.json").read_text())
    queries = make_queries(
        [
            {
                "dataset": "cirr",
                "split": "val",
                "category": "",
                "query_id": str(c["pairid"]),
                "pairid": c["pairid"],
                "reference": c["reference"],
                "target": c["target_hard"],
                "caption": c["caption"],
                "members": c["img_set"]["members"],
            }
            for c in caps
        ]
    )
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((len(gallery_names), 16)).astype(np.float32)
    feats = rng.standard_normal((len(queries), 16)).astype(np.float32)
    ranked, subset = cirr_rankings(
        feats, gallery, gallery_names, list(queries["reference"]), list(queries["members"])
    )
    paths = write_cirr_submission(
        list(queries["pairid"]), ranked, subset, tmp_path, "val", references=list(queries["reference"])
    )
    assert paths[0].stat().st_size < MAX_SUBMISSION_BYTES
    assert metrics_from_submission(*paths, queries) == cirr_metrics(ranked, subset, list(queries["target"]))
