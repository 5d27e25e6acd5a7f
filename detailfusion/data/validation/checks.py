"""The rules of the ``validate`` stage, as specifications that :mod:`.gx_runner` runs as GX suites.

A :class:`Check` names one Great Expectations expectation class, its arguments, the manifest
column it is about and, in words, what it expects; the words go into the report summary and,
as the expectation's description, into Data Docs.

Rules that span two tables or look inside a list column (is the reference in its split's
image list? does the CIRR image set contain the target?) are not one GX expectation on one
column, so :mod:`.columns` computes them as boolean helper columns and the suites expect those
columns to be True. The verdicts therefore
still come from GX and show in its results and Data Docs, with the offending ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from detailfusion.data.manifest import FIQ_CATEGORIES

QUERY_ID_COLUMNS = ("query_id",)
# quarantine_reason rides along with the ids so a quarantined image's failure says why.
IMAGE_ID_COLUMNS = ("split", "category", "image_id", "quarantine_reason")
IMAGE_STATUSES = ("ok", "missing", "corrupt")
CIRR_SET_SIZE = 6
FIQ_CAPTIONS = 2
TABLE_LEVEL = "(table)"  # ``Check.about`` of a rule on the whole table


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
        _not_empty("queries_not_empty", "query"),
        _in_set("dataset_name", "dataset", [dataset], f"every row belongs to data set {dataset!r}"),
        _not_null("query_id_present", "query_id", "query_id is not null"),
        Check(
            "query_id_unique", "ExpectColumnValuesToBeUnique", "query_id", "query_id", "query_id is unique"
        ),
        *_split_and_category(rules),
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
        _not_empty("images_not_empty", "image"),
        _in_set("dataset_name", "dataset", [dataset], f"every row belongs to data set {dataset!r}"),
        *_split_and_category(rules),
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


def _split_and_category(rules: FormatRules) -> list[Check]:
    """The format's split names and categories: both suites check them."""
    return [
        _in_set("split_allowed", "split", list(rules.splits), f"split is one of {', '.join(rules.splits)}"),
        _in_set(
            "category_allowed",
            "category",
            list(rules.categories),
            "category is one of " + ", ".join(repr(c) for c in rules.categories),
        ),
    ]


def _in_set(name: str, column: str, values: list[Any], expected: str) -> Check:
    return Check(name, "ExpectColumnValuesToBeInSet", column, column, expected, {"value_set": values})


def _not_empty(name: str, row: str) -> Check:
    return Check(
        name, "ExpectTableRowCountToBeBetween", None, TABLE_LEVEL, f"the table has at least one {row}", {"min_value": 1}
    )


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
