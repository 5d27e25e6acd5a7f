"""CIRR-format composed queries over overlapping 6-image sets, with query pairs in any direction.

A set is built around a *centre* scene: the centre, and variants each made from it with one edit
or, on top of a one-edit variant that is also a member, a second edit. Queries are pairs of
members in either direction (centre -> variant, variant -> centre, variant -> variant), as in
CIRR where most members of a set are the reference of some query. A pair is used only when one
or two atomic edits turn the reference into the target (``pairs.edits_between``), and its caption
states exactly those edits. Every member is made from the centre (never by perturbing a target),
so the reference alone does not single out the target (``docs/synthetic-benchmark.md``, lesson 1).

Sets overlap as in CIRR: a set's centre (and sometimes one more member) can be an image of a
recent earlier set of the same split, so ``shared_fraction`` of the gallery images belong to more
than one set.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from detailfusion.data.synthetic.pairs import describe_path, edits_between
from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import (
    EDIT_TYPES,
    EDIT_WEIGHTS,
    Edit,
    Scene,
    apply_edit,
    random_scene,
    sample_edit,
    second_edit_kinds,
)

SET_SIZE = 6  # as in CIRR
PRIMARY_P = 0.7  # share of variants that use the set's primary edit type
DOUBLE_P = 0.2  # share of new variants that are two edits from the centre (the first edit's variant is a member)
# A pair whose target is the only member as many edits from the reference as the caption has
# can be solved by counting edits; such pairs are used only when a set has no others.
MIN_TIED = 2
SOURCE_WINDOW = 25  # shared images are taken from the last sets built
MAX_SHARED_PER_SET = 2  # the reused centre and at most one reused neighbour of it
SPLIT_PREFIX = {"train": "train", "val": "dev", "test1": "test1"}
SPLIT_INDEX = {"train": 0, "val": 1, "test1": 2}
_WEIGHTS = [EDIT_WEIGHTS[k] for k in EDIT_TYPES]


@dataclass
class Variant:
    edits: tuple[Edit, ...]
    scene: Scene


@dataclass
class Query:
    reference: int  # image index in the split
    target: int
    edits: list[Edit]
    befores: list[Scene]  # the scene each edit acts on


@dataclass
class ImageSet:
    members: list[int]  # image indices, in the order the files list them
    queries: list[Query]


@dataclass
class CirrSplit:
    """One split, ready to write: records in native format, the split map and the images to draw."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    split_map: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, Scene]] = field(default_factory=list)  # (path relative to the cirr root, scene)
    edits: dict[str, list[str]] = field(default_factory=dict)  # str(pairid) -> edit types
    targets: dict[str, str] = field(default_factory=dict)  # test splits: str(pairid) -> held-out target
    n_sets: int = 0


class _VariantMaker:
    """New members made from ``centre``: one edit (primary type with p=0.7), or a second edit on a variant."""

    def __init__(self, rng: Stream, centre: Scene, taken: set[tuple]):
        self.rng, self.centre, self.keys = rng, centre, taken
        self.primary = rng.weighted(EDIT_TYPES, _WEIGHTS)

    def _kind(self, allowed: list[str], preferred: str | None, attempt: int) -> str:
        if preferred in allowed and attempt < 8 and self.rng.chance(PRIMARY_P):
            return preferred  # type: ignore[return-value]
        return self.rng.weighted(allowed, [EDIT_WEIGHTS[k] for k in allowed])

    def single(self) -> Variant:
        for attempt in range(40):
            edit = sample_edit(self.rng, self.centre, self._kind(list(EDIT_TYPES), self.primary, attempt))
            if edit is None:
                continue
            scene = apply_edit(self.centre, edit, self.rng)
            if scene.key() not in self.keys:
                self.keys.add(scene.key())
                return Variant((edit,), scene)
        # Unreachable in practice (a background edit alone gives 3 options); fail loudly if it ever happens.
        raise RuntimeError(f"could not find a distinct edit for centre {self.centre.key()}")

    def double(self, base: Variant) -> Variant | None:
        first = base.edits[0]
        allowed = second_edit_kinds(first)
        for attempt in range(30):
            edit = sample_edit(self.rng, base.scene, self._kind(allowed, None, attempt), avoid=first.touched)
            if edit is None:
                continue
            scene = apply_edit(base.scene, edit, self.rng)
            if scene.key() not in self.keys:
                self.keys.add(scene.key())
                return Variant((first, edit), scene)
        return None


class _SplitBuilder:
    def __init__(self, rng: Stream, two_edit_fraction: float, shared_fraction: float):
        self.rng = rng
        self.two_edit_fraction = two_edit_fraction
        self.shared_fraction = shared_fraction
        self.scenes: list[Scene] = []
        self.uses: list[int] = []
        self.n_shared = 0  # images in more than one set
        self.sets: list[ImageSet] = []

    def _new_image(self, scene: Scene) -> int:
        self.scenes.append(scene)
        self.uses.append(1)
        return len(self.scenes) - 1

    def _reuse(self, idx: int) -> int:
        self.uses[idx] += 1
        self.n_shared += self.uses[idx] == 2
        return idx

    def _n_reused(self) -> int:
        """How many images of an earlier set to reuse, so the running share stays nearest the target."""
        if not self.sets:
            return 0
        shared, unique = self.n_shared, len(self.scenes)
        return min(range(MAX_SHARED_PER_SET + 1),
                   key=lambda k: (abs((shared + k) / (unique + SET_SIZE - k) - self.shared_fraction), k))

    def _pick(self, candidates: list[int]) -> int:
        fresh = [i for i in candidates if self.uses[i] == 1]  # prefer images not shared yet
        return self.rng.choice(fresh or candidates)

    def build_set(self, n_queries: int) -> ImageSet:
        rng = self.rng
        n_reused = self._n_reused()
        members: list[int] = []
        singles: list[Variant] = []
        if n_reused:
            source = rng.choice(self.sets[-SOURCE_WINDOW:])
            centre_idx = self._reuse(self._pick(source.members))
            centre = self.scenes[centre_idx]
            members.append(centre_idx)
            if n_reused > 1:
                near = [m for m in source.members if m != centre_idx
                        and (found := edits_between(centre, self.scenes[m])) is not None and len(found[0]) == 1]
                if near:
                    idx = self._reuse(self._pick(near))
                    members.append(idx)
                    singles.append(Variant((edits_between(centre, self.scenes[idx])[0][0],),  # type: ignore[index]
                                           self.scenes[idx]))
        else:
            centre = random_scene(rng)
            members.append(self._new_image(centre))
        maker = _VariantMaker(rng, centre, {self.scenes[m].key() for m in members})
        while len(members) < SET_SIZE:
            v = maker.double(rng.choice(singles)) if singles and rng.chance(DOUBLE_P) else None
            if v is None:
                v = maker.single()
                singles.append(v)
            members.append(self._new_image(v.scene))
        members = rng.shuffle(members)
        image_set = ImageSet(members, self._choose_queries(members, n_queries))
        self.sets.append(image_set)
        return image_set

    def _choose_queries(self, members: list[int], n: int) -> list[Query]:
        """``n`` describable pairs: 2-edit with p=two_edit_fraction, spread over references, no pair twice."""
        rng = self.rng
        pairs = []
        dist: dict[tuple[int, int], int] = {}
        for a in members:
            for b in members:
                if a != b and (found := edits_between(self.scenes[a], self.scenes[b])) is not None:
                    pairs.append(Query(a, b, *found))
                    dist[a, b] = len(found[0])
        # How many members sit as many edits from the reference as the caption has (MIN_TIED).
        tied = {(p.reference, p.target): sum(dist.get((p.reference, m)) == len(p.edits) for m in members)
                for p in pairs}
        used: set[tuple[int, int]] = set()
        as_ref: Counter[int] = Counter()
        out: list[Query] = []
        for _ in range(n):
            pool = [p for p in pairs if (p.reference, p.target) not in used and (p.target, p.reference) not in used]
            if not pool:
                break
            two = rng.chance(self.two_edit_fraction)
            pool = [p for p in pool if (len(p.edits) == 2) == two] or pool
            pool = [p for p in pool if tied[p.reference, p.target] >= MIN_TIED] or pool
            fewest = min(as_ref[p.reference] for p in pool)
            q = rng.choice([p for p in pool if as_ref[p.reference] == fewest])
            used.add((q.reference, q.target))
            as_ref[q.reference] += 1
            out.append(q)
        return out


def _image_names(rng: Stream, prefix: str, count: int) -> list[tuple[str, int]]:
    """``count`` distinct CIRR-style names ``{prefix}-{n}-{m}-img{j}`` (and their ``n``), in random order."""
    per_n = 8  # m in 0..3, j in 0..1
    pool = int(math.ceil(count * 1.5 / per_n)) + 1
    codes = rng.generator.permutation(pool * per_n)[:count].tolist()
    return [(f"{prefix}-{c // per_n}-{(c % per_n) // 2}-img{c % 2}", c // per_n) for c in codes]


def build_sets(seed: int, split: str, n_queries: int, queries_per_set: int, two_edit_fraction: float,
               shared_fraction: float, on_set: Callable[[int], None] | None = None) -> tuple[Stream, _SplitBuilder]:
    """The sets of one split from the split's own random stream, until they hold ``n_queries`` queries."""
    rng = Stream(seed, f"cirr/{split}")
    builder = _SplitBuilder(rng, two_edit_fraction, shared_fraction)
    total = 0
    while total < n_queries:
        got = len(builder.build_set(min(queries_per_set, n_queries - total)).queries)
        total += got
        if on_set and got:
            on_set(got)
    return rng, builder


def build_split(seed: int, split: str, n_queries: int, queries_per_set: int, two_edit_fraction: float,
                shared_fraction: float = 0.0, on_set: Callable[[int], None] | None = None) -> CirrSplit:
    """All sets and queries of one split, as native records, split map and images to draw."""
    rng, builder = build_sets(seed, split, n_queries, queries_per_set, two_edit_fraction, shared_fraction, on_set)
    prefix = SPLIT_PREFIX[split]
    names = _image_names(rng, prefix, len(builder.scenes))
    out = CirrSplit(split, n_sets=len(builder.sets))
    for (name, n), scene in zip(names, builder.scenes, strict=True):
        rel = f"./train/{n % 100}/{name}.png" if split == "train" else f"./{prefix}/{name}.png"
        out.split_map[name] = rel
        out.images.append((rel[2:], scene))
    set_ids = rng.shuffle(list(range(len(builder.sets))))
    is_test = split.startswith("test")
    pending: list[tuple[dict[str, Any], list[str], str]] = []
    for s_idx, image_set in enumerate(builder.sets):
        members = [names[m][0] for m in image_set.members]
        for q in image_set.queries:
            ref, target = names[q.reference][0], names[q.target][0]
            caption = describe_path(rng, q.edits, q.befores)
            img_set: dict[str, Any] = {"id": set_ids[s_idx], "members": members, "reference_rank": rng.below(6)}
            if is_test:
                record = {"pairid": 0, "reference": ref, "caption": caption, "img_set": img_set}
            else:
                img_set["target_rank"] = rng.below(6)
                record = {"pairid": 0, "reference": ref, "target_hard": target, "target_soft": {target: 1.0},
                          "caption": caption, "img_set": img_set}
            pending.append((record, [e.kind for e in q.edits], target))

    # File order is shuffled so queries of one set are not adjacent; pairids increase along the file,
    # are non-contiguous and are unique across splits (each split owns one residue mod 3).
    rng.shuffle(pending)
    pid = 3000
    for record, kinds, target in pending:
        pid += rng.between(1, 3)
        record["pairid"] = 3 * pid + SPLIT_INDEX[split]
        out.records.append(record)
        out.edits[str(record["pairid"])] = kinds
        if is_test:
            out.targets[str(record["pairid"])] = target
    out.split_map = dict(sorted(out.split_map.items()))
    return out
