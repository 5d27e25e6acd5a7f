"""Object scenes, atomic edits and their captions: the content of the CIRR and IPr2Pr benchmarks.

A scene is a background, a drawing style (filled or outlined) and 1-5 objects on a 3x3 grid.
Each object has a shape, colour, size, pattern and cell; no two objects share a
(size, colour, shape) triple, so "the small red circle" always names exactly one object.

An edit changes one thing. *Detail* edits touch one object (colour, shape, size, position,
pattern, add, remove); *global* edits touch the whole image (background, style, recolouring
every object). Captions are drawn from several paraphrase templates per edit type and state
only what the edit changes: the target is determined by the reference plus the caption, and
nothing else about the target is given away.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from detailfusion.data.synthetic.rng import Stream

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
SIZES = ("small", "large")
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = ("white", "gray", "black", "beige")
STYLES = ("filled", "outlined")

# Cells are numbered row-major: 0 = top left ... 8 = bottom right.
CELL_NAMES = (
    ("top left", "upper left"),
    ("top", "top middle"),
    ("top right", "upper right"),
    ("left", "middle left"),
    ("center", "middle"),
    ("right", "middle right"),
    ("bottom left", "lower left"),
    ("bottom", "bottom middle"),
    ("bottom right", "lower right"),
)

MIN_OBJECTS, MAX_OBJECTS = 1, 5
SCENE_MIN_OBJECTS, SCENE_MAX_OBJECTS = 2, 4
JITTER = 2  # objects sit in their cell with +-2 units (1 unit = image_size/64 pixels) of jitter

GLOBAL_EDITS = ("background", "style", "recolour_all")
DETAIL_EDITS = ("colour", "shape", "size", "position", "pattern", "add", "remove")
EDIT_TYPES = DETAIL_EDITS + GLOBAL_EDITS
# Background edits are trivially easy (docs/synthetic-benchmark.md, lesson 4), so global edits are kept a
# minority (about 19% of first edits) while still frequent enough to be learned.
EDIT_WEIGHTS = {
    "colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "pattern": 1.0, "add": 1.0, "remove": 1.0,
    "background": 0.6, "style": 0.5, "recolour_all": 0.5,
}


@dataclass(frozen=True, slots=True)
class Obj:
    """One object; ``oid`` follows the object through edits so edits can say what they touched."""

    oid: int
    shape: str
    colour: str
    size: str
    cell: int
    pattern: str
    jx: int
    jy: int

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True, slots=True)
class Scene:
    background: str
    style: str
    objects: tuple[Obj, ...]
    next_oid: int

    def key(self) -> tuple:
        """Identity of what is drawn, ignoring jitter: two scenes with equal keys look the same."""
        objs = tuple(sorted((o.cell, o.shape, o.colour, o.size, o.pattern) for o in self.objects))
        return (self.background, self.style, objs)

    def get(self, oid: int) -> Obj | None:
        for o in self.objects:
            if o.oid == oid:
                return o
        return None

    def free_cells(self) -> list[int]:
        used = {o.cell for o in self.objects}
        return [c for c in range(9) if c not in used]


@dataclass(frozen=True, slots=True)
class Edit:
    """An atomic edit: ``kind`` from EDIT_TYPES, the object it acts on, and the new value.

    For ``add`` the new object is ``added``; ``touched`` holds the object ids whose appearance the
    edit decides (a second edit must not touch them, or it would overwrite the first).
    """

    kind: str
    oid: int | None
    value: str | int | None
    added: Obj | None = None
    touched: frozenset[int] = frozenset()


def random_object(rng: Stream, oid: int, cell: int, taken: set[tuple[str, str, str]], plain_p: float = 0.6) -> Obj:
    """A random object in ``cell`` whose (size, colour, shape) is not in ``taken``."""
    while True:
        size, colour, shape = rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES)
        if (size, colour, shape) not in taken:
            break
    pattern = "plain" if rng.chance(plain_p) else rng.choice(PATTERNS[1:])
    return Obj(oid, shape, colour, size, cell, pattern, rng.between(-JITTER, JITTER), rng.between(-JITTER, JITTER))


def random_scene(rng: Stream) -> Scene:
    """A fresh scene: 2-4 objects in distinct cells on a random background."""
    n = rng.between(SCENE_MIN_OBJECTS, SCENE_MAX_OBJECTS)
    cells = rng.sample(range(9), n)
    taken: set[tuple[str, str, str]] = set()
    objects = []
    for oid, cell in enumerate(cells):
        obj = random_object(rng, oid, cell, taken)
        taken.add(obj.triple)
        objects.append(obj)
    style = "outlined" if rng.chance(0.25) else "filled"
    objects.sort(key=lambda o: o.cell)
    return Scene(rng.choice(BACKGROUNDS), style, tuple(objects), n)


# --------------------------------------------------------------------------- edits


def _unique_after(scene: Scene, oid: int, triple: tuple[str, str, str]) -> bool:
    return all(o.triple != triple for o in scene.objects if o.oid != oid)


def _pick_object(rng: Stream, scene: Scene, avoid: frozenset[int]) -> Obj | None:
    pool = [o for o in scene.objects if o.oid not in avoid]
    return rng.choice(pool) if pool else None


def sample_edit(rng: Stream, scene: Scene, kind: str, avoid: frozenset[int] = frozenset()) -> Edit | None:
    """A random valid edit of type ``kind`` on ``scene``, or None if the scene admits none.

    ``avoid`` lists object ids the edit must not touch (those a previous edit decided).
    """
    if kind in ("colour", "shape", "size", "pattern", "position", "remove"):
        for _ in range(6):
            obj = _pick_object(rng, scene, avoid)
            if obj is None:
                return None
            edit = _object_edit(rng, scene, obj, kind)
            if edit is not None:
                return edit
        return None
    if kind == "add":
        free = scene.free_cells()
        if len(scene.objects) >= MAX_OBJECTS or not free:
            return None
        taken = {o.triple for o in scene.objects}
        obj = random_object(rng, scene.next_oid, rng.choice(free), taken, plain_p=0.7)
        return Edit("add", obj.oid, obj.cell, added=obj, touched=frozenset({obj.oid}))
    if kind == "background":
        return Edit("background", None, rng.choice([b for b in BACKGROUNDS if b != scene.background]))
    if kind == "style":
        return Edit("style", None, "outlined" if scene.style == "filled" else "filled")
    if kind == "recolour_all":
        oids = frozenset(o.oid for o in scene.objects)
        pairs = [(o.size, o.shape) for o in scene.objects]
        # Same-coloured objects must still be distinguishable, and an earlier edit's object must not be overwritten.
        if len(set(pairs)) != len(pairs) or oids & avoid:
            return None
        colour = rng.choice(COLOURS)
        if all(o.colour == colour for o in scene.objects):
            colour = rng.choice([c for c in COLOURS if c != colour])
        return Edit("recolour_all", None, colour, touched=oids)
    raise ValueError(f"unknown edit type {kind!r}")


def _object_edit(rng: Stream, scene: Scene, obj: Obj, kind: str) -> Edit | None:
    touched = frozenset({obj.oid})
    if kind == "colour":
        options = [c for c in COLOURS if c != obj.colour and _unique_after(scene, obj.oid, (obj.size, c, obj.shape))]
    elif kind == "shape":
        options = [s for s in SHAPES if s != obj.shape and _unique_after(scene, obj.oid, (obj.size, obj.colour, s))]
    elif kind == "size":
        new = "large" if obj.size == "small" else "small"
        options = [new] if _unique_after(scene, obj.oid, (new, obj.colour, obj.shape)) else []
    elif kind == "pattern":
        options = [p for p in PATTERNS if p != obj.pattern]
    elif kind == "position":
        options = scene.free_cells()
    elif kind == "remove":
        return Edit("remove", obj.oid, None, touched=touched) if len(scene.objects) > MIN_OBJECTS else None
    else:  # pragma: no cover - callers pass only object edit kinds
        raise ValueError(kind)
    if not options:
        return None
    return Edit(kind, obj.oid, rng.choice(options), touched=touched)


def apply_edit(scene: Scene, edit: Edit, rng: Stream | None = None) -> Scene:
    """The scene after ``edit``. A moved object gets fresh jitter from ``rng`` (none without one)."""
    kind = edit.kind
    if kind == "background":
        return replace(scene, background=str(edit.value))
    if kind == "style":
        return replace(scene, style=str(edit.value))
    if kind == "recolour_all":
        return replace(scene, objects=tuple(replace(o, colour=str(edit.value)) for o in scene.objects))
    if kind == "add":
        assert edit.added is not None
        objs = tuple(sorted((*scene.objects, edit.added), key=lambda o: o.cell))
        return replace(scene, objects=objs, next_oid=max(scene.next_oid, edit.added.oid + 1))
    if kind == "remove":
        return replace(scene, objects=tuple(o for o in scene.objects if o.oid != edit.oid))
    out = []
    for o in scene.objects:
        if o.oid == edit.oid:
            if kind == "position":
                jx, jy = (rng.between(-JITTER, JITTER), rng.between(-JITTER, JITTER)) if rng else (0, 0)
                o = replace(o, cell=int(edit.value), jx=jx, jy=jy)  # type: ignore[arg-type]
            else:
                o = replace(o, **{kind: edit.value})
        out.append(o)
    return replace(scene, objects=tuple(sorted(out, key=lambda o: o.cell)))


def second_edit_kinds(first: Edit) -> list[str]:
    """Edit types allowed after ``first`` in a 2-edit query: a different type, except that add may repeat."""
    return [k for k in EDIT_TYPES if k != first.kind or k == "add"]


# --------------------------------------------------------------------------- captions


def refer(rng: Stream, obj: Obj, scenes: tuple[Scene, ...]) -> str:
    """A referring expression ("the small red circle", "the red circle", "the circle") for ``obj``.

    Half the time it is the full triple; otherwise the shortest description that names exactly
    one object in every scene of ``scenes`` (the reference and, for a second edit, the
    intermediate scene), so it is never ambiguous.
    """
    full = f"the {obj.size} {obj.colour} {obj.shape}"
    if rng.chance(0.5):
        return full
    for attrs in (("shape",), ("colour", "shape"), ("size", "shape")):
        ok = True
        for sc in scenes:
            for other in sc.objects:
                if other.oid != obj.oid and all(getattr(other, a) == getattr(obj, a) for a in attrs):
                    ok = False
                    break
            if not ok:
                break
        if ok:
            return "the " + " ".join(getattr(obj, a) for a in ("size", "colour", "shape") if a in attrs)
    return full


def _pattern_words(pattern: str) -> str:
    return {"striped": "striped ", "dotted": "dotted ", "plain": ""}[pattern]


_MOVE_DIRS = {(-1, 0): "up", (1, 0): "down", (0, -1): "to the left", (0, 1): "to the right"}


def describe_edit(rng: Stream, before: Scene, edit: Edit, also: tuple[Scene, ...] = ()) -> str:
    """A paraphrased instruction for ``edit`` applied to ``before`` (``also``: more scenes the
    referring expression must be unambiguous in)."""
    kind, value = edit.kind, edit.value
    if kind == "background":
        return rng.choice((
            f"change the background to {value}",
            f"make the background {value}",
            f"use a {value} background",
            f"put everything on a {value} background",
        ))
    if kind == "style":
        if value == "outlined":
            return rng.choice((
                "draw the shapes as outlines",
                "make all the objects hollow",
                "show only the outlines of the shapes",
                "turn every shape into an outline",
            ))
        return rng.choice((
            "fill in all the shapes",
            "make the objects solid",
            "draw the shapes filled",
            "make every outline a filled shape",
        ))
    if kind == "recolour_all":
        return rng.choice((
            f"make all the objects {value}",
            f"color every shape {value}",
            f"turn everything {value}",
            f"paint all the shapes {value}",
        ))
    if kind == "add":
        obj = edit.added
        assert obj is not None
        pos = rng.choice(CELL_NAMES[obj.cell])
        thing = f"{obj.size} {_pattern_words(obj.pattern)}{obj.colour} {obj.shape}"
        return rng.choice((
            f"add a {thing} at the {pos}",
            f"put a {thing} in the {pos}",
            f"insert a {thing} at the {pos}",
            f"place a new {thing} in the {pos}",
        ))
    assert edit.oid is not None
    obj = before.get(edit.oid)
    assert obj is not None
    ref = refer(rng, obj, (before, *also))
    if kind == "colour":
        return rng.choice((
            f"make {ref} {value}",
            f"change the color of {ref} to {value}",
            f"turn {ref} {value}",
            f"paint {ref} {value}",
        ))
    if kind == "shape":
        return rng.choice((
            f"turn {ref} into a {value}",
            f"change {ref} to a {value}",
            f"make {ref} a {value}",
            f"replace {ref} with a {obj.size} {obj.colour} {value}",
        ))
    if kind == "size":
        if value == "large":
            return rng.choice((f"make {ref} bigger", f"enlarge {ref}", f"make {ref} large",
                               f"increase the size of {ref}"))
        return rng.choice((f"make {ref} smaller", f"shrink {ref}", f"make {ref} small",
                           f"reduce the size of {ref}"))
    if kind == "pattern":
        if value == "striped":
            return rng.choice((f"add stripes to {ref}", f"make {ref} striped", f"give {ref} stripes"))
        if value == "dotted":
            return rng.choice((f"add dots to {ref}", f"make {ref} dotted", f"give {ref} polka dots"))
        old = "stripes" if obj.pattern == "striped" else "dots"
        return rng.choice((f"make {ref} plain", f"remove the {old} from {ref}", f"remove the pattern from {ref}"))
    if kind == "position":
        cell = int(value)  # type: ignore[arg-type]
        step = (cell // 3 - obj.cell // 3, cell % 3 - obj.cell % 3)
        if step in _MOVE_DIRS and rng.chance(0.4):
            return f"move {ref} one step {_MOVE_DIRS[step]}" if rng.chance(0.5) else f"move {ref} {_MOVE_DIRS[step]}"
        pos = rng.choice(CELL_NAMES[cell])
        return rng.choice((
            f"move {ref} to the {pos}",
            f"put {ref} in the {pos}",
            f"place {ref} at the {pos}",
            f"shift {ref} to the {pos}",
        ))
    if kind == "remove":
        return rng.choice((f"remove {ref}", f"delete {ref}", f"take away {ref}", f"get rid of {ref}"))
    raise ValueError(f"unknown edit type {kind!r}")


def describe_scene(scene: Scene) -> str:
    """A plain scene description (IPr2Pr ``original_prompt`` / ``edited_prompt``)."""
    parts = [
        f"a {o.size} {_pattern_words(o.pattern)}{o.colour} {o.shape} at the {CELL_NAMES[o.cell][0]}"
        for o in scene.objects
    ]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    prefix = "outlines of " if scene.style == "outlined" else ""
    return f"{prefix}{things} on a {scene.background} background"
