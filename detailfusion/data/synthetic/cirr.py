"""CIRR-format composed queries with counterfactual 6-image sets.

A set is a reference scene plus 5 variants, **each made from the reference** with its own
edit(s) (counterfactual negatives, ``docs/synthetic-benchmark.md``): mostly the set's primary
edit type on another object or with another value, sometimes a random edit. ``queries_per_set``
variants are query targets, each with the caption of its own edit(s); the other variants are
distractors. For a 2-edit query the partial target (the first edit only) is always a member,
and a spare slot may hold the same first edit with another second edit. No member is made by
perturbing a target, so the reference alone does not single out the target
(``docs/synthetic-benchmark.md``, "what calibration taught", lesson 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import (
    EDIT_TYPES,
    EDIT_WEIGHTS,
    Edit,
    Scene,
    apply_edit,
    describe_edit,
    random_scene,
    sample_edit,
    second_edit_kinds,
)

SET_SIZE = 6  # reference + 5 variants, as in CIRR
PRIMARY_P = 0.7  # share of variants that use the set's primary edit type
# A 2-edit target is the farthest member from the reference unless another 2-edit variant sits
# beside it; reusing an existing variant as the partial keeps a slot free for such a
# counterfactual (same first edit, another second edit), which blunts the "caption has two
# edits -> pick the member least like the reference" shortcut.
REUSE_PARTIAL_P = 0.8
ALT_SECOND_P = 0.9
SPLIT_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}
SPLIT_INDEX = {"train": 0, "val": 1, "test1": 2}
_WEIGHTS = [EDIT_WEIGHTS[k] for k in EDIT_TYPES]


@dataclass
class Variant:
    edits: tuple[Edit, ...]
    scene: Scene
    partial: Scene | None = None  # the scene after the first edit, for 2-edit variants


@dataclass
class ImageSet:
    reference: Scene
    variants: list[Variant]
    queries: list[int]  # indices into variants that are query targets


@dataclass
class CirrSplit:
    """One split, ready to write: records in native format, the split map and the images to draw."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    split_map: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, Scene]] = field(default_factory=list)  # (path relative to the cirr root, scene)
    edits: dict[str, list[str]] = field(default_factory=dict)  # str(pairid) -> edit types
    n_sets: int = 0


class _SetBuilder:
    def __init__(self, rng: Stream, reference: Scene):
        self.rng = rng
        self.ref = reference
        self.keys = {reference.key()}
        self.primary = rng.weighted(EDIT_TYPES, _WEIGHTS)

    def _kind(self, allowed: list[str], preferred: str | None, attempt: int) -> str:
        if preferred in allowed and attempt < 8 and self.rng.chance(PRIMARY_P):
            return preferred  # type: ignore[return-value]
        return self.rng.weighted(allowed, [EDIT_WEIGHTS[k] for k in allowed])

    def single(self) -> Variant:
        """The reference with one edit (primary type with p=0.7), distinct from every member so far."""
        for attempt in range(40):
            edit = sample_edit(self.rng, self.ref, self._kind(list(EDIT_TYPES), self.primary, attempt))
            if edit is None:
                continue
            scene = apply_edit(self.ref, edit, self.rng)
            if scene.key() not in self.keys:
                self.keys.add(scene.key())
                return Variant((edit,), scene)
        # Unreachable in practice (a background edit alone gives 3 options); fail loudly if it ever happens.
        raise RuntimeError(f"could not find a distinct edit for reference {self.ref.key()}")

    def double(self, base: Variant, preferred: str | None = None) -> Variant | None:
        """``base`` (a 1-edit variant) with a second edit that does not undo or overwrite the first."""
        first = base.edits[0]
        allowed = second_edit_kinds(first)
        for attempt in range(30):
            edit = sample_edit(self.rng, base.scene, self._kind(allowed, preferred, attempt), avoid=first.touched)
            if edit is None:
                continue
            scene = apply_edit(base.scene, edit, self.rng)
            if scene.key() not in self.keys:
                self.keys.add(scene.key())
                return Variant((first, edit), scene, partial=base.scene)
        return None


def build_set(rng: Stream, queries: int, two_edit_fraction: float) -> ImageSet:
    """A reference, 5 variants made from it, and which variants are query targets."""
    b = _SetBuilder(rng, random_scene(rng))
    n_two = sum(rng.chance(two_edit_fraction) for _ in range(queries))
    free = SET_SIZE - 1 - queries  # member slots that are not query targets
    variants: list[Variant] = []
    targets: list[int] = []
    for _ in range(queries - n_two):
        variants.append(b.single())
        targets.append(len(variants) - 1)
    for _ in range(n_two):
        singles = [v for v in variants if len(v.edits) == 1]
        if singles and (free == 0 or rng.chance(REUSE_PARTIAL_P)):
            base = rng.choice(singles)  # the partial is already a member (maybe another query's target)
        elif free > 0:
            base = b.single()
            variants.append(base)
            free -= 1
        else:
            base = None  # no room for a partial: this query gets one edit
        v = b.double(base) if base is not None else None
        variants.append(v if v is not None else b.single())
        targets.append(len(variants) - 1)
    while len(variants) < SET_SIZE - 1:
        doubles = [v for v in variants if len(v.edits) == 2]
        v = None
        if doubles and rng.chance(ALT_SECOND_P):
            # Same first edit, another second edit of the same type: a counterfactual for the 2-edit query.
            other = rng.choice(doubles)
            v = b.double(Variant(other.edits[:1], other.partial), preferred=other.edits[1].kind)  # type: ignore[arg-type]
        variants.append(v if v is not None else b.single())
    return ImageSet(b.ref, variants, targets)


def caption_for(rng: Stream, reference: Scene, variant: Variant) -> str:
    first = describe_edit(rng, reference, variant.edits[0])
    if len(variant.edits) == 1:
        return first
    assert variant.partial is not None
    second = describe_edit(rng, variant.partial, variant.edits[1], also=(reference,))
    return f"{first} and {second}"


def _image_names(rng: Stream, prefix: str, count: int) -> list[tuple[str, int]]:
    """``count`` distinct CIRR-style names ``{prefix}-{n}-{m}-img{j}`` (and their ``n``), in random order."""
    per_n = 8  # m in 0..3, j in 0..1
    pool = int(math.ceil(count * 1.5 / per_n)) + 1
    codes = rng.generator.permutation(pool * per_n)[:count].tolist()
    return [(f"{prefix}-{c // per_n}-{(c % per_n) // 2}-img{c % 2}", c // per_n) for c in codes]


def build_split(seed: int, split: str, n_queries: int, queries_per_set: int, two_edit_fraction: float,
                on_set: Callable[[int], None] | None = None) -> CirrSplit:
    """All sets and queries of one split, from the split's own random stream."""
    rng = Stream(seed, f"cirr/{split}")
    n_sets = int(math.ceil(n_queries / queries_per_set))
    sets = []
    remaining = n_queries
    for _ in range(n_sets):
        q = min(queries_per_set, remaining)
        sets.append(build_set(rng, q, two_edit_fraction))
        remaining -= q
        if on_set:
            on_set(q)

    prefix = SPLIT_PREFIX[split]
    names = _image_names(rng, prefix, n_sets * SET_SIZE)
    set_ids = rng.shuffle(list(range(n_sets)))
    out = CirrSplit(split, n_sets=n_sets)
    pending: list[tuple[dict[str, Any], list[str]]] = []
    for s_idx, image_set in enumerate(sets):
        scenes = [image_set.reference] + [v.scene for v in image_set.variants]
        slot = names[s_idx * SET_SIZE : (s_idx + 1) * SET_SIZE]
        for (name, n), scene in zip(slot, scenes, strict=True):
            rel = f"./train/{n % 100}/{name}.png" if split == "train" else f"./{prefix}/{name}.png"
            out.split_map[name] = rel
            out.images.append((rel[2:], scene))
        ref_name = slot[0][0]
        members = rng.shuffle([name for name, _ in slot])
        for t in image_set.queries:
            variant = image_set.variants[t]
            target = slot[1 + t][0]
            caption = caption_for(rng, image_set.reference, variant)
            img_set: dict[str, Any] = {"id": set_ids[s_idx], "members": members, "reference_rank": rng.below(6)}
            if split == "test1":
                record = {"pairid": 0, "reference": ref_name, "caption": caption, "img_set": img_set}
            else:
                img_set["target_rank"] = rng.below(6)
                record = {"pairid": 0, "reference": ref_name, "target_hard": target, "target_soft": {target: 1.0},
                          "caption": caption, "img_set": img_set}
            pending.append((record, [e.kind for e in variant.edits]))

    # File order is shuffled so queries of one set are not adjacent; pairids increase along the file,
    # are non-contiguous and are unique across splits (each split owns one residue mod 3).
    rng.shuffle(pending)
    pid = 3000
    for record, kinds in pending:
        pid += rng.between(1, 3)
        record["pairid"] = 3 * pid + SPLIT_INDEX[split]
        out.records.append(record)
        out.edits[str(record["pairid"])] = kinds
    out.split_map = dict(sorted(out.split_map.items()))
    return out
