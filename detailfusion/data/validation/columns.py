"""Helper columns of the ``validate`` stage: the rules that span two tables or look inside a list column.

:func:`query_frame` and :func:`image_frame` add boolean/count columns (is the reference in its
split's gallery? does the CIRR image set contain the target? one pixel row per image file?) that
the suites of :mod:`.checks` expect to be True, so GX still gives the verdicts, with the
offending ids. Computed with pyarrow kernels: pandas' own ``isin`` on arrow strings loops in
Python, which takes seconds on a 25k-row manifest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from detailfusion.data.manifest import LIST_COLUMNS

_KEY_SEP = "\x1f"  # cannot occur in an image id, so (split, category, id) keys never collide


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
