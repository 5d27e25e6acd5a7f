"""Garments and their relative captions: the content of the FashionIQ-format benchmark.

A garment is a dress, shirt or top/tee with a colour, a pattern, a sleeve length, a neckline
and a length; a few nuisance values (fit, scale, offset) make two garments with the same
attributes different "product photos". A target is the candidate with one or two attributes
changed, described the way FashionIQ annotators do it ("is red with long sleeves", "has a
v-neck and is striped"): two captions per query that paraphrase the change or each cover part
of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from detailfusion.data.synthetic.rng import Stream

CATEGORIES = ("dress", "shirt", "toptee")
FIQ_COLOURS = ("black", "white", "gray", "red", "pink", "orange", "yellow", "green", "blue", "purple")
FIQ_PATTERNS = ("plain", "striped", "dotted", "checked")

# Attribute values each category allows (a shirt has a collar option, a top can be cropped...).
CATEGORY_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "dress": {
        "sleeves": ("sleeveless", "short", "long"),
        "neckline": ("round", "v-neck", "square"),
        "length": ("short", "knee", "long"),
    },
    "shirt": {
        "sleeves": ("short", "long"),
        "neckline": ("collar", "v-neck", "round"),
        "length": ("regular", "long"),
    },
    "toptee": {
        "sleeves": ("sleeveless", "short", "long"),
        "neckline": ("round", "v-neck", "square"),
        "length": ("cropped", "regular"),
    },
}
FIQ_EDITS = ("colour", "pattern", "sleeves", "neckline", "length")


@dataclass(frozen=True, slots=True)
class Garment:
    category: str
    colour: str
    pattern: str
    sleeves: str
    neckline: str
    length: str
    fit: int  # nuisance: 0 slim, 1 regular, 2 loose
    scale: int  # nuisance: 0..4, the size of the garment in the photo
    dx: int  # nuisance: -2..2 offset
    dy: int

    def key(self) -> tuple[str, ...]:
        return (self.category, self.colour, self.pattern, self.sleeves, self.neckline, self.length)


def options(category: str, attr: str) -> tuple[str, ...]:
    if attr == "colour":
        return FIQ_COLOURS
    if attr == "pattern":
        return FIQ_PATTERNS
    return CATEGORY_OPTIONS[category][attr]


def _nuisance(rng: Stream) -> dict[str, int]:
    return {"fit": rng.below(3), "scale": rng.below(5), "dx": rng.between(-2, 2), "dy": rng.between(-2, 2)}


def random_garment(rng: Stream, category: str) -> Garment:
    pattern = "plain" if rng.chance(0.55) else rng.choice(FIQ_PATTERNS[1:])
    return Garment(
        category,
        rng.choice(FIQ_COLOURS),
        pattern,
        rng.choice(options(category, "sleeves")),
        rng.choice(options(category, "neckline")),
        rng.choice(options(category, "length")),
        **_nuisance(rng),
    )


def change(rng: Stream, g: Garment, changes: dict[str, str]) -> Garment:
    """``g`` with ``changes`` applied; half the time it is a different photo (fresh nuisance)."""
    new = replace(g, **changes)
    if rng.chance(0.5):
        new = replace(new, **_nuisance(rng))
    return new


def sample_changes(rng: Stream, g: Garment, kinds: list[str],
                   avoid: Sequence[dict[str, str]] = ()) -> dict[str, str] | None:
    """New values for the attributes ``kinds`` (each differs from ``g``) that equal none of the
    change sets in ``avoid``; None if a few tries find none."""
    for _ in range(12):
        out = {k: rng.choice([v for v in options(g.category, k) if v != getattr(g, k)]) for k in kinds}
        if out not in avoid:
            return out
    return None


# --------------------------------------------------------------------------- captions

_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {c: (f"is {c}", f"is {c} in color", f"{c}", f"is a {c} one", f"in {c}") for c in FIQ_COLOURS},
    "pattern": {
        "plain": ("is plain", "has no pattern", "is solid colored"),
        "striped": ("is striped", "has stripes", "has horizontal stripes"),
        "dotted": ("has polka dots", "is dotted", "has dots"),
        "checked": ("is checked", "has a plaid pattern", "is checkered"),
    },
    "sleeves": {
        "sleeveless": ("is sleeveless", "has no sleeves"),
        "short": ("has short sleeves", "is short sleeved"),
        "long": ("has long sleeves", "is long sleeved"),
    },
    "neckline": {
        "round": ("has a round neck", "has a crew neck"),
        "v-neck": ("has a v-neck", "has a v neckline"),
        "square": ("has a square neckline", "has a square neck"),
        "collar": ("has a collar", "is collared"),
    },
}
_LENGTH_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("dress", "short"): ("is a mini dress", "is short"),
    ("dress", "knee"): ("is knee length", "is midi length"),
    ("dress", "long"): ("is floor length", "is a maxi dress", "is long"),
    ("shirt", "regular"): ("is regular length", "is a standard length shirt"),
    ("shirt", "long"): ("is a long shirt", "is tunic length"),
    ("toptee", "cropped"): ("is cropped", "is a crop top"),
    ("toptee", "regular"): ("is not cropped", "is regular length"),
}


def _phrases(category: str, attr: str, value: str) -> tuple[str, ...]:
    if attr == "length":
        return _LENGTH_PHRASES[(category, value)]
    return _PHRASES[attr][value]


def _join(first: str, second: str) -> str:
    # "is red" + "has long sleeves" -> "is red with long sleeves", as annotators write it.
    if second.startswith("has "):
        return f"{first} with {second[4:]}"
    return f"{first} and {second}"


def _caption(rng: Stream, category: str, items: list[tuple[str, str]]) -> str:
    parts = [rng.choice(_phrases(category, a, v)) for a, v in items]
    text = parts[0]
    for p in parts[1:]:
        text = _join(text, p)
    return text


def relative_captions(rng: Stream, category: str, changes: dict[str, str]) -> list[str]:
    """Two captions for the change: both paraphrase it all, or one covers part of it.

    The two together always mention every changed attribute.
    """
    items = list(changes.items())
    if len(items) == 1:
        first = _caption(rng, category, items)
        second = _caption(rng, category, items)
        for _ in range(4):  # prefer a different wording, as from a second annotator
            if second != first:
                break
            second = _caption(rng, category, items)
        return [first, second]
    mode = rng.below(4)
    full_a = _caption(rng, category, rng.shuffle(list(items)))
    full_b = _caption(rng, category, rng.shuffle(list(items)))
    if mode == 0:
        return [full_a, full_b]
    if mode == 1:
        return [full_a, _caption(rng, category, [rng.choice(items)])]
    if mode == 2:
        return [_caption(rng, category, [rng.choice(items)]), full_a]
    order = rng.shuffle(list(items))
    return [_caption(rng, category, [order[0]]), _caption(rng, category, order[1:])]


def full_caption(rng: Stream, category: str, changes: dict[str, str]) -> str:
    """One caption that covers every change (used beside an empty caption)."""
    return _caption(rng, category, rng.shuffle(list(changes.items())))
