"""FashionIQ-format garment queries: captions, split lists and the images to draw.

Per (category, split): each query has a candidate garment (new, or reused from the previous
query as real FashionIQ reuses candidates) and a target that changes one or two attributes.
With some probability the gallery also gets a counterfactual distractor: the candidate with
the same attributes changed to other values. The real quirks are reproduced on purpose:
test records have no ``target``; each caption file has one empty caption and a few captions
with a leading space or a trailing '.'; a small share of shirt and toptee images is listed in
both categories' split files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detailfusion.data.synthetic.garments import (
    CATEGORIES,
    CATEGORY_OPTIONS,
    FIQ_EDITS,
    Garment,
    change,
    full_caption,
    random_garment,
    relative_captions,
    sample_changes,
)
from detailfusion.data.synthetic.rng import Stream

SPLITS = ("train", "val", "test")
REUSE_CANDIDATE_P = 0.2
DISTRACTOR_P = 0.4
TWO_CHANGE_P = 0.4
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class FiqFile:
    """One (category, split): caption records, the split list and the edit types per record."""

    category: str
    split: str
    records: list[dict[str, Any]] = field(default_factory=list)
    split_list: list[str] = field(default_factory=list)
    changes: list[dict[str, str]] = field(default_factory=list)  # attribute -> new value, per record

    @property
    def edits(self) -> list[list[str]]:
        """Edit types per record (the sidecar content)."""
        return [list(c) for c in self.changes]


@dataclass
class FiqData:
    files: dict[str, FiqFile] = field(default_factory=dict)  # "<cat>.<split>" -> file
    images: dict[str, Garment] = field(default_factory=dict)  # asin -> garment (each drawn once)


def _editable(category: str) -> list[str]:
    return [k for k in FIQ_EDITS if k in ("colour", "pattern") or len(CATEGORY_OPTIONS[category][k]) > 1]


class _AsinMaker:
    """ASIN-like ids ("B0" + 8 upper-case alphanumerics), unique over the whole data set."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def new(self, rng: Stream) -> str:
        while True:
            asin = "B0" + "".join(_ALNUM[rng.below(len(_ALNUM))] for _ in range(8))
            if asin not in self.used:
                self.used.add(asin)
                return asin


def _build_file(seed: int, category: str, split: str, n: int, asins: _AsinMaker, data: FiqData,
                on_query: Callable[[int], None] | None) -> FiqFile:
    rng = Stream(seed, f"fashioniq/{category}/{split}")
    f = FiqFile(category, split)
    listed: list[str] = []
    cand_asin, cand = "", None
    used: list[dict[str, str]] = []  # change sets already drawn from this candidate (no look-alike images)
    editable = _editable(category)
    for _ in range(n):
        if cand is None or not rng.chance(REUSE_CANDIDATE_P):
            cand = random_garment(rng, category)
            cand_asin = asins.new(rng)
            data.images[cand_asin] = cand
            listed.append(cand_asin)
            used = []
        changes = None
        while changes is None:
            kinds = rng.sample(editable, 2 if rng.chance(TWO_CHANGE_P) else 1)
            changes = sample_changes(rng, cand, kinds, avoid=used)
        used.append(changes)
        t_asin = asins.new(rng)
        data.images[t_asin] = change(rng, cand, changes)
        listed.append(t_asin)
        if rng.chance(DISTRACTOR_P):
            alt = sample_changes(rng, cand, kinds, avoid=used)
            if alt is not None:
                used.append(alt)
                d_asin = asins.new(rng)
                data.images[d_asin] = change(rng, cand, alt)
                listed.append(d_asin)
        captions = relative_captions(rng, category, changes)
        record: dict[str, Any] = {"candidate": cand_asin, "captions": captions}
        if split != "test":
            record = {"target": t_asin, **record}  # the real files' key order: target, candidate, captions
        f.records.append(record)
        f.changes.append(changes)
        if on_query:
            on_query(1)
    _add_caption_quirks(rng, f)
    f.split_list = rng.shuffle(listed)
    return f


def _add_caption_quirks(rng: Stream, f: FiqFile) -> None:
    """One empty caption, and a few leading spaces and trailing dots, as in the real files."""
    n = len(f.records)
    if n == 0:
        return
    empty_at = rng.below(n)
    j = rng.below(2)
    rec = f.records[empty_at]
    # The other caption must then describe the whole change on its own.
    rec["captions"][1 - j] = full_caption(rng, f.category, f.changes[empty_at])
    rec["captions"][j] = ""
    cells = [(i, k) for i in range(n) for k in range(2) if (i, k) != (empty_at, j)]
    if not cells:
        return
    picks = rng.sample(cells, min(len(cells), max(2, round(0.03 * len(cells)) + 1)))
    half = max(1, len(picks) // 2)
    for i, k in picks[:half]:
        f.records[i]["captions"][k] = " " + f.records[i]["captions"][k]
    for i, k in picks[half:] or picks[:1]:
        f.records[i]["captions"][k] = f.records[i]["captions"][k] + "."


def build_fashioniq(seed: int, per_split: dict[str, int], shared_fraction: float,
                    on_query: Callable[[int], None] | None = None) -> FiqData:
    data = FiqData()
    asins = _AsinMaker()
    for category in CATEGORIES:
        for split in SPLITS:
            data.files[f"{category}.{split}"] = _build_file(seed, category, split, per_split[split], asins, data,
                                                            on_query)
    for split in SPLITS:
        _share_shirt_toptee(Stream(seed, f"fashioniq/shared/{split}"), data, split, shared_fraction)
    return data


def _share_shirt_toptee(rng: Stream, data: FiqData, split: str, fraction: float) -> None:
    """List a ``fraction`` of shirt images in the toptee split file too, and vice versa."""
    if fraction <= 0:
        return
    shirt, toptee = data.files[f"shirt.{split}"].split_list, data.files[f"toptee.{split}"].split_list
    from_shirt = rng.sample(shirt, max(1, round(fraction * len(shirt))))
    from_toptee = rng.sample(toptee, max(1, round(fraction * len(toptee))))
    for dest, extra in ((toptee, from_shirt), (shirt, from_toptee)):
        for asin in extra:
            dest.insert(rng.below(len(dest) + 1), asin)
