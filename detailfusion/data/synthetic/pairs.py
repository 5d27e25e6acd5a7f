"""The edits that turn one scene into another, when there are one or two: what a CIRR caption says.

CIRR forms query pairs among the six images of a set in any direction, so a caption must be
derivable for *any* two members, not only from the set's centre to a variant. ``edits_between``
compares two scenes object by object (objects keep their ``oid`` through edits) and returns the
atomic edits, in an order in which every step is a valid edit (distinct cells, unique
(size, colour, shape) triples, 1-5 objects), or ``None`` when more than two edits are needed or no
valid order exists. Inverting an edit (variant -> centre) and composing two edits (variant ->
variant) are both special cases of this comparison.
"""

from __future__ import annotations

from itertools import permutations

from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import (
    MAX_OBJECTS,
    MIN_OBJECTS,
    Edit,
    Scene,
    apply_edit,
    describe_edit,
)

MAX_EDITS = 2
_OBJECT_ATTRS = ("colour", "shape", "size", "pattern")


def _diff(a: Scene, b: Scene) -> list[Edit] | None:
    """The unordered edits from ``a`` to ``b`` (None as soon as there are more than MAX_EDITS)."""
    edits: list[Edit] = []
    if a.background != b.background:
        edits.append(Edit("background", None, b.background))
    if a.style != b.style:
        edits.append(Edit("style", None, b.style))
    ao = {o.oid: o for o in a.objects}
    bo = {o.oid: o for o in b.objects}
    common = sorted(ao.keys() & bo.keys())
    recoloured = [oid for oid in common if ao[oid].colour != bo[oid].colour]
    b_colours = {o.colour for o in b.objects}
    # Several objects turning the same colour, and every object ending in it, is one "recolour all".
    recolour_all = len(recoloured) >= 2 and ao.keys() == bo.keys() and len(b_colours) == 1
    if recolour_all:
        edits.append(Edit("recolour_all", None, b.objects[0].colour, touched=frozenset(ao)))
    for oid in sorted(ao.keys() - bo.keys()):
        edits.append(Edit("remove", oid, None, touched=frozenset({oid})))
    for oid in sorted(bo.keys() - ao.keys()):
        obj = bo[oid]
        edits.append(Edit("add", oid, obj.cell, added=obj, touched=frozenset({oid})))
    if len(edits) > MAX_EDITS:
        return None
    for oid in common:
        x, y = ao[oid], bo[oid]
        for attr in _OBJECT_ATTRS:
            if attr == "colour" and recolour_all:
                continue
            if getattr(x, attr) != getattr(y, attr):
                edits.append(Edit(attr, oid, getattr(y, attr), touched=frozenset({oid})))
        if x.cell != y.cell:
            edits.append(Edit("position", oid, y.cell, touched=frozenset({oid})))
        if len(edits) > MAX_EDITS:
            return None
    return edits


def _well_formed(scene: Scene) -> bool:
    objs = scene.objects
    return (MIN_OBJECTS <= len(objs) <= MAX_OBJECTS and len({o.cell for o in objs}) == len(objs)
            and len({o.triple for o in objs}) == len(objs))


def _step_valid(before: Scene, edit: Edit) -> bool:
    """Is ``edit`` a change ``sample_edit`` could have drawn on ``before``?"""
    if edit.kind == "recolour_all":
        pairs = [(o.size, o.shape) for o in before.objects]
        return len(set(pairs)) == len(pairs) and any(o.colour != edit.value for o in before.objects)
    if edit.kind == "add":
        return edit.added is not None and before.get(edit.added.oid) is None
    if edit.oid is not None:
        obj = before.get(edit.oid)
        if obj is None:
            return False
        if edit.kind in _OBJECT_ATTRS:
            return getattr(obj, edit.kind) != edit.value
        if edit.kind == "position":
            return obj.cell != edit.value
    return True


def edits_between(a: Scene, b: Scene) -> tuple[list[Edit], list[Scene]] | None:
    """Edits turning ``a`` into ``b`` and the scene before each of them, or None if not 1-2 valid edits.

    The scenes ``b`` is reached through are rebuilt from ``a`` without jitter; only their keys and
    the objects' attributes are used (to check validity and to word the captions).
    """
    if a.key() == b.key():
        return None
    edits = _diff(a, b)
    if not edits:
        return None
    target = b.key()
    for order in permutations(edits):
        scene, befores, ok = a, [], True
        for edit in order:
            if not _step_valid(scene, edit):
                ok = False
                break
            befores.append(scene)
            scene = apply_edit(scene, edit)
            if not _well_formed(scene):
                ok = False
                break
        if ok and scene.key() == target:
            return list(order), befores
    return None


def edit_distance(a: Scene, b: Scene) -> int | None:
    """How many atomic edits separate ``a`` and ``b`` (1 or 2), None when more or not describable."""
    found = edits_between(a, b)
    return None if found is None else len(found[0])


def describe_path(rng: Stream, edits: list[Edit], befores: list[Scene]) -> str:
    """The caption of ``edits`` applied in order (``befores[i]`` is the scene before edit ``i``)."""
    parts = [describe_edit(rng, befores[0], edits[0])]
    for i in range(1, len(edits)):
        # The referring expression must be unambiguous in the reference and in the scene it acts on.
        parts.append(describe_edit(rng, befores[i], edits[i], also=(befores[0],)))
    return " and ".join(parts)
