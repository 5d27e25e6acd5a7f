"""Image-description pairs for pretraining the embedded default's backbone (CLIP-style).

A real run starts from a CLIP-class backbone pretrained on web image-text pairs; the embedded
default has none to download, so the ``pretrain_backbone`` stage makes one from this module's
pairs: random object scenes (the CIRR / IPr2Pr domain) and garments (the FashionIQ domain), each
with a plain description of everything visible: for scenes the background, the drawing style and
every object's size, pattern, colour, shape and position; for garments the category, colour,
pattern, sleeves, neckline and length.

The pairs come from their own random stream (``pretrain`` plus the seed), not from the streams of
the CIR splits, so they are different scenes from the ones the benchmark queries are built on
(with 2-4 objects of 4 shapes x 7 colours x 2 sizes x 3 patterns in 9 cells, plus background and
style, a repeat of a whole scene is vanishingly rare). Objects are listed in a random order so
that a description cut at the text tower's context length drops a random object, not always the
last one, and the scene-wide facts (background, style) come first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detailfusion.data.synthetic.garments import CATEGORIES, Garment, random_garment
from detailfusion.data.synthetic.render import render_garment, render_scene
from detailfusion.data.synthetic.rng import Stream
from detailfusion.data.synthetic.scenes import CELL_NAMES, Scene, random_scene

CATEGORY_WORDS = {"dress": "dress", "shirt": "shirt", "toptee": "top"}


def describe_scene_for_pretraining(rng: Stream, scene: Scene) -> str:
    """``black background, outlined: large orange circle bottom, small dotted green square top left, ...``."""
    order = list(scene.objects)
    for i in range(len(order) - 1, 0, -1):  # Fisher-Yates with the seeded stream
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    things = []
    for o in order:
        pattern = "" if o.pattern == "plain" else f"{o.pattern} "
        things.append(f"{o.size} {pattern}{o.colour} {o.shape} {CELL_NAMES[o.cell][0]}")
    style = "outlined" if scene.style == "outlined" else "filled"
    return f"{scene.background} background, {style}: " + ", ".join(things)


def describe_garment(g: Garment) -> str:
    """``red striped dress, long sleeves, v-neck neckline, knee length``."""
    pattern = "" if g.pattern == "plain" else f"{g.pattern} "
    sleeves = "sleeveless" if g.sleeves == "sleeveless" else f"{g.sleeves} sleeves"
    return f"{g.colour} {pattern}{CATEGORY_WORDS[g.category]}, {sleeves}, {g.neckline} neckline, {g.length} length"


def pretraining_pairs(seed: int, scenes: int, garments: int, image_size: int, render_scale: int,
                      on_item: Callable[[int], object] | None = None) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``scenes + garments`` rendered images (uint8 ``[N, S, S, 3]``), their descriptions and domain ids.

    Domain 0 = object scene, 1 = garment. Deterministic for a given seed and counts.
    """
    n = scenes + garments
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    texts: list[str] = []
    domain = np.zeros(n, dtype=np.int8)
    scene_rng, garment_rng, text_rng = (Stream(seed, f"pretrain/{part}") for part in ("scenes", "garments", "text"))
    for i in range(scenes):
        scene = random_scene(scene_rng)
        pixels[i] = np.asarray(render_scene(scene, image_size, render_scale).convert("RGB"))
        texts.append(describe_scene_for_pretraining(text_rng, scene))
        if on_item is not None:
            on_item(1)
    for i in range(scenes, n):
        g = random_garment(garment_rng, garment_rng.choice(CATEGORIES))
        pixels[i] = np.asarray(render_garment(g, image_size, render_scale).convert("RGB"))
        texts.append(describe_garment(g))
        domain[i] = 1
        if on_item is not None:
            on_item(1)
    return pixels, texts, domain
