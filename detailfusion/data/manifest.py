"""Canonical manifests: the one in-memory/on-disk shape every native format is read into.

Readers (``cirr``, ``fashioniq``, ``ipr2pr``) turn a data set in its native layout into two
tables; ``prepare`` adds the decoded-image columns and writes them as parquet; ``validate``
checks them; training and evaluation read only these tables, never the native files.

``queries`` — one row per query (a composed triplet, or a test query without target):

==================  ===========  ==============================================================
column              dtype        meaning
==================  ===========  ==============================================================
dataset             str          ``cirr`` | ``fashioniq`` | ``ipr2pr``
split               str          native split name (cirr: train/val/test1; fiq: train/val/test)
category            str          FashionIQ category (dress/shirt/toptee), ``""`` otherwise
query_id            str          unique per data set: CIRR ``str(pairid)``; FIQ
                                 ``{category}-{split}-{index:05d}``; IPr2Pr ``{shard}-{row}``
pairid              Int64        CIRR pairid, null elsewhere
reference           str          reference image id (CIRR name, FIQ ASIN, IPr2Pr image id)
target              str|null     hard target image id; null on test splits
target_soft         str|null     CIRR ``target_soft`` as JSON text, kept verbatim (it is noisy)
caption             str          the text a model reads: CIRR caption; FIQ the two captions
                                 joined as CLIP4Cir does at validation; IPr2Pr edit_prompt
captions            list[str]    the raw caption strings (FIQ: both, unstripped)
members             list[str]    CIRR ``img_set.members`` (6 names); empty elsewhere
set_id              Int64        CIRR ``img_set.id``; null elsewhere
group               str          hard-negative group: CIRR set id, IPr2Pr original image id,
                                 ``""`` for FIQ
reference_caption   str|null     IPr2Pr ``original_prompt``
target_caption      str|null     IPr2Pr ``edited_prompt``
edit_types          list[str]    edit types from the synthetic sidecar; empty for real data
==================  ===========  ==============================================================

``images`` — one row per (split, category, image): the gallery of each split:

==================  ===========  ==============================================================
dataset, split,     str          as above
category
image_id            str          name used in the caption files
path                str          where the bytes are, relative to the data set root; for
                                 parquet-embedded images ``{shard path}#{row}/{column}``
pixel_index         int64        row in ``pixels.npy`` (added by prepare; -1 when quarantined)
width, height       Int64        original size (added by prepare; null when unreadable)
status              str          ``ok`` | ``missing`` | ``corrupt`` (added by prepare)
==================  ===========  ==============================================================
"""

from __future__ import annotations

import pandas as pd

QUERY_COLUMNS: dict[str, str] = {
    "dataset": "str",
    "split": "str",
    "category": "str",
    "query_id": "str",
    "pairid": "Int64",
    "reference": "str",
    "target": "str",
    "target_soft": "str",
    "caption": "str",
    "captions": "object",
    "members": "object",
    "set_id": "Int64",
    "group": "str",
    "reference_caption": "str",
    "target_caption": "str",
    "edit_types": "object",
}

IMAGE_COLUMNS: dict[str, str] = {
    "dataset": "str",
    "split": "str",
    "category": "str",
    "image_id": "str",
    "path": "str",
}

PREPARED_IMAGE_COLUMNS: dict[str, str] = {
    **IMAGE_COLUMNS,
    "pixel_index": "int64",
    "width": "Int64",
    "height": "Int64",
    "status": "str",
}

LIST_COLUMNS = ("captions", "members", "edit_types")

DATASETS = ("cirr", "fashioniq", "ipr2pr")
FIQ_CATEGORIES = ("dress", "shirt", "toptee")


def ranking_drops_reference(dataset: str) -> bool:
    """Whether the data set's ranking removes each query's reference image (CIRR's does, so the
    reference is never a negative there); FashionIQ's keeps it among the candidates."""
    return dataset == "cirr"


def make_queries(rows: list[dict]) -> pd.DataFrame:
    """Build a ``queries`` frame with the canonical columns, order and dtypes."""
    return _frame(rows, QUERY_COLUMNS)


def make_images(rows: list[dict]) -> pd.DataFrame:
    """Build an ``images`` frame with the canonical columns, order and dtypes."""
    return _frame(rows, IMAGE_COLUMNS)


def _frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    for col, dtype in columns.items():
        if dtype == "object":
            df[col] = [list(v) if isinstance(v, list | tuple) else [] for v in df[col]]
        elif dtype == "str":
            df[col] = df[col].astype("str").where(df[col].notna(), None) if len(df) else df[col].astype("str")
        else:
            df[col] = df[col].astype(dtype)
    return df.reset_index(drop=True)
