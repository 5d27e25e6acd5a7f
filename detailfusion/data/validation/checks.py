"""The rules of the ``validate`` stage, as specifications that :mod:`.gx_runner` runs as GX suites.

A :class:`Check` names one Great Expectations expectation class, its arguments, the manifest
column it is about and, in words, what it expects; the words go into the report summary and,
as the expectation's description, into Data Docs.

Rules that span two tables or look inside a list column (is the reference in its split's
image list? does the CIRR image set contain the target?) are not one GX expectation on one
column, so :func:`query_frame` and :func:`image_frame` compute them as boolean helper columns
with vectorised pandas and the suites expect those columns to be True. The verdicts therefore
still come from GX and show in its results and Data Docs, with the offending ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from detailfusion.data.manifest import FIQ_CATEGORIES, LIST_COLUMNS

QUERY_ID_COLUMNS = ("query_id",)
# quarantine_reason rides along with the ids so a quarantined image's failure says why.
IMAGE_ID_COLUMNS = ("split", "category", "image_id", "quarantine_reason")
IMAGE_STATUSES = ("ok", "missing", "corrupt")
CIRR_SET_SIZE = 6
FIQ_CAPTIONS = 2
TABLE_LEVEL = "(table)"  # ``Check.about`` of a rule on the whole table
_KEY_SEP = "\x1f"  # cannot occur in an image id, so (split, category, id) keys never collide


@dataclass(frozen=True)
class FormatRules:
    """What one format allows: its split names, the splits whose queries have targets, its categories."""

    splits: tuple[str, ...]
    labelled_splits: tuple[str, ...]
    categories: tuple[str, ...]


FORMAT_RULES: dict[str, FormatRules] = {
    "cirr": FormatRules(("train", "val", "test1"), ("train", "val"), ("",)),
    "fashioniq": FormatRules(("train", "val", "test"), ("train", "val"), FIQ_CATEGORIES),
    # The reader writes every triplet as ``train``; val/test are allowed for held-out splits of
    # the same triplets, which keep their edited image, so every IPr2Pr split needs a target.
    "ipr2pr": FormatRules(("train", "val", "test"), ("train", "val", "test"), ("",)),
}


@dataclass(frozen=True)
class RowCondition:
    """Restricts an expectation to rows where ``column <op> value``; ``op`` is ``==``, ``!=`` or ``in``."""

    column: str
    op: str
    value: Any

    def __str__(self) -> str:
        value = "[" + ", ".join(map(str, self.value)) + "]" if self.op == "in" else repr(self.value)
        return f"{self.column} {self.op} {value}"


ONLY_OK = RowCondition("status", "==", "ok")
ONLY_QUARANTINED = RowCondition("status", "!=", "ok")


@dataclass
class Check:
    """One rule: a GX expectation (class name in ``great_expectations.expectations``) and its wording.

    ``column`` is the column GX looks at (a manifest column or a helper column); ``about`` is
    the manifest column the rule is about, which the summary names. ``column=None`` is a
    table-level expectation.
    """

    name: str
    expectation: str
    column: str | None
    about: str
    expected: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    row_condition: RowCondition | None = None


# --------------------------------------------------------------------------- helper columns


def query_frame(queries: pd.DataFrame, images: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """``queries`` without its list columns, plus the boolean/count helper columns the suites check.

    Computed with pyarrow kernels: pandas' own ``isin`` on arrow strings loops in Python,
    which takes seconds on a 25k-row manifest.
    """
    q = queries.reset_index(drop=True)
    out = q.drop(columns=[c for c in LIST_COLUMNS if c in q.columns])
    n = len(q)
    gallery = pc.unique(
        _keys(_strings(images["split"]), _strings(images["category"]), _strings(images["image_id"]))
    )
    split, category = _strings(q["split"]), _strings(q["category"])
    ref, tgt = _strings(q["reference"]), _strings(q["target"])
    has_target = _bools(pc.is_valid(tgt))

    out["reference_in_gallery"] = _isin(_keys(split, category, ref), gallery)
    out["target_in_gallery"] = ~has_target | _isin(_keys(split, category, tgt), gallery)
    out["reference_differs_from_target"] = ~has_target | ~_bools(pc.equal(ref, tgt))
    out["caption_word_count"] = _word_count(_strings(q["caption"]))

    if dataset == "cirr":
        members = pa.array(q["members"], type=pa.list_(pa.string()))
        names = pc.list_flatten(members)
        owner = pc.list_parent_indices(members)
        owner_np = owner.to_numpy()
        out["members_count"] = pc.fill_null(pc.list_value_length(members), 0).to_numpy().astype("int64")
        pairs = pd.DataFrame(
            {"owner": owner_np, "name": names.to_numpy(zero_copy_only=False)}
        ).drop_duplicates()
        out["members_distinct_count"] = np.bincount(pairs["owner"].to_numpy(), minlength=n).astype("int64")
        has_ref = _bools(pc.equal(names, pc.take(ref, owner)))
        has_tgt = _bools(pc.equal(names, pc.take(tgt, owner)))
        out["members_contain_reference"] = _any_per_row(owner_np, has_ref, n)
        out["members_contain_target"] = ~has_target | _any_per_row(owner_np, has_tgt, n)
        member_keys = _keys(pc.take(split, owner), pc.take(category, owner), names)
        out["members_in_gallery"] = ~_any_per_row(owner_np, ~_isin(member_keys, gallery), n)
    if dataset == "fashioniq":
        captions = pa.array(q["captions"], type=pa.list_(pa.string()))
        out["captions_count"] = pc.fill_null(pc.list_value_length(captions), 0).to_numpy().astype("int64")
    return out


def image_frame(images: pd.DataFrame, quarantine: list[dict[str, str]]) -> pd.DataFrame:
    """``images`` plus helper columns: quarantine reason and listing, one pixel row per image file.

    ``quarantine`` holds the ``image_id``, ``path`` and ``reason`` of each quarantine.json entry.
    ``prepare`` keeps one entry and one ``pixels.npy`` row per image *file*, so rows that share
    a path (FashionIQ shirt/toptee share ASINs) share both; entries are matched by path, or by
    image_id when the path differs.
    """
    out = images.reset_index(drop=True).copy()
    by_path = {e["path"]: e["reason"] for e in quarantine if e.get("path")}
    by_id = {e["image_id"]: e["reason"] for e in quarantine}
    ids, paths = out["image_id"].tolist(), out["path"].tolist()
    out["quarantine_reason"] = pd.Series(
        [by_path.get(p, by_id.get(i, "")) for i, p in zip(ids, paths, strict=True)], dtype="str"
    )
    ok = _bools(pc.equal(_strings(out["status"]), "ok"))
    listed = np.array([p in by_path or i in by_id for i, p in zip(ids, paths, strict=True)], dtype=bool)
    out["listed_in_quarantine"] = ok | listed

    readable = out.loc[ok, ["path", "pixel_index"]]
    paths_per_row = readable.groupby("pixel_index", dropna=False)["path"].transform("nunique")
    rows_per_path = readable.groupby("path", dropna=False)["pixel_index"].transform("nunique")
    one_to_one = np.ones(len(out), dtype=bool)
    one_to_one[ok] = ((paths_per_row == 1) & (rows_per_path == 1)).to_numpy(dtype=bool)
    out["pixel_row_per_file"] = one_to_one
    return out


def _strings(col: pd.Series) -> pa.Array:
    return pa.array(col.astype("str"), type=pa.string())


def _bools(arr: pa.Array) -> np.ndarray:
    """Arrow booleans as numpy, null counted as False."""
    return pc.fill_null(arr, False).to_numpy(zero_copy_only=False).astype(bool)


def _keys(split: pa.Array, category: pa.Array, ids: pa.Array) -> pa.Array:
    """``split|category|id`` keys; a null part gives a null key (never in any gallery)."""
    return pc.binary_join_element_wise(split, category, ids, _KEY_SEP)


def _isin(keys: pa.Array, values: pa.Array) -> np.ndarray:
    return _bools(pc.is_in(keys, value_set=values))


def _word_count(text: pa.Array) -> pd.Series:
    trimmed = pc.utf8_trim_whitespace(text)
    words = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    # Splitting an empty string yields one empty word; a blank caption has none.
    words = pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), 0, words)
    return pd.Series(words.to_pandas(types_mapper={pa.int32(): pd.Int64Dtype()}.get), dtype="Int64")


def _any_per_row(owner: np.ndarray, hits: np.ndarray, n: int) -> np.ndarray:
    """OR of ``hits`` grouped by the row each flattened list element came from."""
    return np.bincount(owner.astype(np.int64), weights=hits.astype(np.float64), minlength=n) > 0


# --------------------------------------------------------------------------- rules


def query_checks(dataset: str, queries: pd.DataFrame, *, max_caption_words: int) -> list[Check]:
    """The ``queries`` suite of one data set (``queries`` decides only which optional rules apply)."""
    rules = FORMAT_RULES[dataset]
    labelled = ", ".join(rules.labelled_splits)
    target_condition = (
        None
        if rules.labelled_splits == rules.splits
        else RowCondition("split", "in", list(rules.labelled_splits))
    )
    checks = [
        Check(
            "queries_not_empty",
            "ExpectTableRowCountToBeBetween",
            None,
            TABLE_LEVEL,
            "the table has at least one query",
            {"min_value": 1},
        ),
        _in_set("dataset_name", "dataset", [dataset], f"every row belongs to data set {dataset!r}"),
        _not_null("query_id_present", "query_id", "query_id is not null"),
        Check(
            "query_id_unique", "ExpectColumnValuesToBeUnique", "query_id", "query_id", "query_id is unique"
        ),
        _in_set("split_allowed", "split", list(rules.splits), f"split is one of {', '.join(rules.splits)}"),
        _in_set(
            "category_allowed",
            "category",
            list(rules.categories),
            "category is one of " + ", ".join(repr(c) for c in rules.categories),
        ),
        _not_null("reference_present", "reference", "reference is not null"),
        _true(
            "reference_in_gallery",
            "reference",
            "the reference is in the image list of the query's split" + _category_note(dataset),
        ),
        Check(
            "target_present",
            "ExpectColumnValuesToNotBeNull",
            "target",
            "target",
            f"target is not null on the {labelled} split(s)",
            row_condition=target_condition,
        ),
        _true(
            "target_in_gallery",
            "target",
            "the target (when present) is in the image list of the query's split" + _category_note(dataset),
        ),
        _true(
            "reference_differs_from_target", "reference", "the reference image differs from the target image"
        ),
        _not_null("caption_present", "caption", "caption is not null"),
        Check(
            "caption_not_blank",
            "ExpectColumnValuesToMatchRegex",
            "caption",
            "caption",
            "caption is non-empty after stripping whitespace",
            {"regex": r"\S"},
        ),
        Check(
            "caption_word_count",
            "ExpectColumnValuesToBeBetween",
            "caption_word_count",
            "caption",
            f"caption has at most {max_caption_words} words",
            {"min_value": 0, "max_value": max_caption_words},
        ),
    ]
    if dataset == "cirr":
        checks += [
            _not_null("pairid_present", "pairid", "pairid is not null"),
            Check("pairid_unique", "ExpectColumnValuesToBeUnique", "pairid", "pairid", "pairid is unique"),
            _not_null("set_id_present", "set_id", "img_set.id (set_id) is not null"),
            _exactly(
                "members_count",
                "members_count",
                "members",
                f"members lists exactly {CIRR_SET_SIZE} images",
                CIRR_SET_SIZE,
            ),
            _exactly(
                "members_distinct",
                "members_distinct_count",
                "members",
                f"members holds {CIRR_SET_SIZE} distinct image names",
                CIRR_SET_SIZE,
            ),
            _true("members_contain_reference", "members", "members contains the reference image"),
            _true("members_contain_target", "members", "members contains the target image (when present)"),
            _true("members_in_gallery", "members", "every member is in the image list of the query's split"),
        ]
    if dataset == "fashioniq":
        # An individual raw caption may be empty (3 are in the real val split); the joined
        # ``caption`` above must not be.
        checks.append(
            _exactly(
                "captions_count",
                "captions_count",
                "captions",
                f"captions holds the {FIQ_CAPTIONS} raw relative captions",
                FIQ_CAPTIONS,
            )
        )
    if dataset == "ipr2pr":
        for col in ("reference_caption", "target_caption"):
            # Shards without prompt columns (diffusers' toy set) leave the column null throughout;
            # there is nothing to check then, and validate.py notes it in the report.
            if queries[col].notna().any():
                checks.append(_not_null(f"{col}_present", col, f"{col} is not null"))
    return checks


def image_checks(
    dataset: str,
    *,
    max_quarantined_fraction: float,
    min_image_side: int,
    max_image_side: int,
    n_pixels: int,
) -> list[Check]:
    """The ``images`` suite of one data set; ``n_pixels`` is the number of rows in ``pixels.npy``."""
    rules = FORMAT_RULES[dataset]
    checks = [
        Check(
            "images_not_empty",
            "ExpectTableRowCountToBeBetween",
            None,
            TABLE_LEVEL,
            "the table has at least one image",
            {"min_value": 1},
        ),
        _in_set("dataset_name", "dataset", [dataset], f"every row belongs to data set {dataset!r}"),
        _in_set("split_allowed", "split", list(rules.splits), f"split is one of {', '.join(rules.splits)}"),
        _in_set(
            "category_allowed",
            "category",
            list(rules.categories),
            "category is one of " + ", ".join(repr(c) for c in rules.categories),
        ),
        _not_null("image_id_present", "image_id", "image_id is not null"),
        _not_null("path_present", "path", "path is not null"),
        Check(
            "image_key_unique",
            "ExpectCompoundColumnsToBeUnique",
            None,
            "image_id",
            "(split, category, image_id) is unique",
            {"column_list": ["split", "category", "image_id"]},
        ),
        _not_null("status_present", "status", "status is not null"),
        _in_set(
            "status_allowed", "status", list(IMAGE_STATUSES), f"status is one of {', '.join(IMAGE_STATUSES)}"
        ),
        Check(
            "quarantined_fraction",
            "ExpectColumnValuesToBeInSet",
            "status",
            "status",
            f"at most {max_quarantined_fraction * 100:g}% of the gallery images are quarantined (status not ok)",
            {"value_set": ["ok"], "mostly": 1.0 - max_quarantined_fraction},
        ),
        _true("listed_in_quarantine", "status", "every quarantined image is listed in quarantine.json"),
    ]
    for side in ("width", "height"):
        checks += [
            Check(
                f"{side}_present",
                "ExpectColumnValuesToNotBeNull",
                side,
                side,
                f"{side} is known for readable (ok) images",
                row_condition=ONLY_OK,
            ),
            Check(
                f"{side}_range",
                "ExpectColumnValuesToBeBetween",
                side,
                side,
                f"{side} of readable (ok) images is between {min_image_side} and {max_image_side} pixels",
                {"min_value": min_image_side, "max_value": max_image_side},
                row_condition=ONLY_OK,
            ),
        ]
    checks += [
        _true(
            "pixel_row_per_file",
            "pixel_index",
            "each readable image file has its own pixels.npy row (rows share a pixel_index only if they share the path)",
        ),
        Check(
            "pixel_rows_all_used",
            "ExpectColumnUniqueValueCountToBeBetween",
            "pixel_index",
            "pixel_index",
            f"the readable (ok) images use all {n_pixels} rows of pixels.npy",
            {"min_value": n_pixels, "max_value": n_pixels},
            row_condition=ONLY_OK,
        ),
        Check(
            "pixel_index_range",
            "ExpectColumnValuesToBeBetween",
            "pixel_index",
            "pixel_index",
            f"pixel_index of readable (ok) images is a row of pixels.npy (0..{n_pixels - 1})",
            {"min_value": 0, "max_value": n_pixels - 1},
            row_condition=ONLY_OK,
        ),
        Check(
            "pixel_index_quarantined",
            "ExpectColumnValuesToBeInSet",
            "pixel_index",
            "pixel_index",
            "pixel_index is -1 for quarantined images",
            {"value_set": [-1]},
            row_condition=ONLY_QUARANTINED,
        ),
    ]
    return checks


def _category_note(dataset: str) -> str:
    return " and category" if dataset == "fashioniq" else ""


def _in_set(name: str, column: str, values: list[Any], expected: str) -> Check:
    return Check(name, "ExpectColumnValuesToBeInSet", column, column, expected, {"value_set": values})


def _not_null(name: str, column: str, expected: str) -> Check:
    return Check(name, "ExpectColumnValuesToNotBeNull", column, column, expected)


def _true(name: str, about: str, expected: str) -> Check:
    """A helper column named ``name`` must be True on every row."""
    return Check(name, "ExpectColumnValuesToBeInSet", name, about, expected, {"value_set": [True]})


def _exactly(name: str, column: str, about: str, expected: str, value: int) -> Check:
    return Check(
        name,
        "ExpectColumnValuesToBeBetween",
        column,
        about,
        expected,
        {"min_value": value, "max_value": value},
    )
