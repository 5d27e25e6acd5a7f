"""Training triplets from a prepared data set with quarantined images (real FashionIQ has ~2%)."""

from __future__ import annotations

import logging
from pathlib import Path

from detailfusion.data.prepared import load_prepared
from detailfusion.train.data import build_triplets


def test_queries_with_a_quarantined_image_are_dropped_and_counted(tiny_world, caplog):
    prepared = load_prepared(Path(tiny_world["params"]["prepare"]["out"]), "cirr")
    train = prepared.queries[prepared.queries["split"] == "train"]
    full = build_triplets(prepared, "train")
    assert full.dropped == 0 and len(full) == len(train)

    victim = train["reference"].iloc[0]
    hit = int(((train["reference"] == victim) | (train["target"] == victim)).sum())
    images = prepared.images.copy()
    quarantined = (images["split"] == "train") & (images["image_id"] == victim)
    images.loc[quarantined, "pixel_index"] = -1
    images.loc[quarantined, "status"] = "corrupt"
    prepared.images, prepared._lookup = images, {}

    with caplog.at_level(logging.WARNING):
        some = build_triplets(prepared, "train")
    assert some.dropped == hit >= 1 and len(some) == len(train) - hit
    assert f"{hit} queries dropped (quarantined images)" in caplog.text
    assert str(prepared.path) in caplog.text


def test_evaluating_an_unknown_split_names_the_data_set_and_split(tiny_world):
    import pytest

    from detailfusion.errors import DetailFusionError

    prepared = load_prepared(Path(tiny_world["params"]["prepare"]["out"]), "cirr")
    with pytest.raises(DetailFusionError, match=r"cirr: no queries in split 'bogus'"):
        prepared.split_queries("bogus")
