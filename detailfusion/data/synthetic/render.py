"""Drawing scenes and garments with Pillow, and encoding them as deterministic PNG bytes.

Everything is drawn at ``image_size * render_scale`` and reduced with a box filter (exact area
averaging, the right filter for supersampling), so edges are anti-aliased and small details such
as stripes survive as texture. PNG encoding (:func:`png_bytes`) uses fixed parameters and writes
no metadata, so the same scene always gives the same bytes.

Rendering many images can run in worker processes (:func:`render_jobs`); each image depends only
on its spec, so the output does not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from detailfusion.data.synthetic.garments import Garment
from detailfusion.data.synthetic.scenes import Obj, Scene

PNG_COMPRESS_LEVEL = 1  # zlib level: 1 is ~2.5x faster than 6 for ~25% larger files

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (145, 60, 185),
    "orange": (245, 140, 25),
    "cyan": (40, 200, 215),
}
BACKGROUND_RGB = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (20, 20, 20), "beige": (225, 210, 170)}
FIQ_COLOUR_RGB = {
    "black": (30, 30, 30),
    "white": (236, 236, 236),
    "gray": (140, 140, 140),
    "red": (200, 30, 40),
    "pink": (240, 135, 175),
    "orange": (240, 130, 30),
    "yellow": (240, 210, 50),
    "green": (40, 150, 70),
    "blue": (40, 80, 200),
    "purple": (120, 60, 160),
}
FIQ_BACKGROUND = (255, 255, 255)

# A job is (kind, spec, relative path or None): "scene"/"garment"; with a path the PNG is written
# under the output root, without one its bytes are returned (IPr2Pr embeds them in parquet).
Job = tuple[str, Scene | Garment, str | None]


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return (int(rgb[0] * f), int(rgb[1] * f), int(rgb[2] * f))


@lru_cache(maxsize=32)
def _pattern_mask(kind: str, size: int) -> Image.Image:
    """A (2*size)^2 pattern mask whose phase is anchored at its centre, so a crop around an
    object gives the same pattern wherever the object sits. ``size`` is the render side."""
    n = 2 * size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) - size
    # The centre row is a stripe and the centre holds a dot, so even the smallest object shows
    # its pattern (a patterned and a plain object never render alike).
    if kind in ("striped", "striped_garment"):
        period = max(4.0, size / (16 if kind == "striped" else 12))
        on = np.mod(yy + period / 4, period) < period / 2
    elif kind in ("dotted", "dotted_garment"):
        period = max(4.0, size / (12.8 if kind == "dotted" else 10))
        radius = period * 0.3
        dx = np.mod(xx + period / 2, period) - period / 2
        dy = np.mod(yy + period / 2, period) - period / 2
        on = dx * dx + dy * dy < radius * radius
    elif kind == "checked_garment":
        period = max(4.0, size / 10)
        width = max(1.0, period / 4)
        on = (np.mod(xx, period) < width) | (np.mod(yy, period) < width)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return Image.fromarray(np.where(on, 255, 0).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------- scenes


def _shape_geometry(shape: str, cx: float, cy: float, r: float) -> tuple[str, list[tuple[float, float]]]:
    if shape == "circle":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = 0.85 * r
        return "rectangle", [(cx - h, cy - h), (cx + h, cy + h)]
    if shape == "triangle":
        big = 1.2 * r  # circumradius, so its area is close to the circle's
        return "polygon", [(cx, cy - 0.75 * big), (cx + 0.866 * big, cy + 0.75 * big), (cx - 0.866 * big, cy + 0.75 * big)]
    if shape == "cross":
        a = 0.34 * r
        return "polygon", [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a), (cx + a, cy + a),
            (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, *, fill=None, outline=None,
                width: int = 1) -> None:
    kind, pts = _shape_geometry(shape, cx, cy, r)
    if kind == "ellipse":
        draw.ellipse(pts, fill=fill, outline=outline, width=width)
    elif kind == "rectangle":
        draw.rectangle(pts, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(pts, fill=fill, outline=outline, width=width)


def _object_geometry(o: Obj, size: int) -> tuple[float, float, float]:
    unit = size / 64  # jitter unit: 1 px of a 64 px image
    cell = size / 3
    cx = (o.cell % 3 + 0.5) * cell + o.jx * unit
    cy = (o.cell // 3 + 0.5) * cell + o.jy * unit
    r = (0.075 if o.size == "small" else 0.14) * size
    return cx, cy, r


@lru_cache(maxsize=1024)
def _object_pattern(shape: str, r: float, pattern: str, fx: float, fy: float, size: int) -> tuple[Image.Image, int, int]:
    """The pattern clipped to a shape, as a mask, and its offset from the object's integer centre.

    Objects sit at a handful of sub-pixel offsets (3 per axis) with 2 sizes, so these masks are
    computed once and reused; the pattern's phase is anchored at the object, so it does not
    depend on where the object sits.
    """
    half = int(1.3 * r) + 2
    mask = Image.new("L", (2 * half, 2 * half), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, half + fx, half + fy, r, fill=255)
    pat = _pattern_mask(pattern, size).crop((size - half, size - half, size + half, size + half))
    return ImageChops.multiply(mask, pat), -half, -half


def _paste_pattern(img: Image.Image, shape: str, cx: float, cy: float, r: float, pattern: str,
                   tone: tuple[int, int, int]) -> None:
    ix, iy = int(cx), int(cy)
    mask, ox, oy = _object_pattern(shape, r, pattern, round(cx - ix, 6), round(cy - iy, 6), img.size[0])
    x0, y0 = ix + ox, iy + oy
    # Clip to the image by hand: paste() wants the box and the mask to have the same size.
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = min(mask.size[0], img.size[0] - x0), min(mask.size[1], img.size[1] - y0)
    if (cx0, cy0, cx1, cy1) != (0, 0, mask.size[0], mask.size[1]):
        mask = mask.crop((cx0, cy0, cx1, cy1))
    img.paste(tone, (x0 + cx0, y0 + cy0, x0 + cx1, y0 + cy1), mask)


def draw_scene(scene: Scene, size: int) -> Image.Image:
    """The scene drawn at ``size`` pixels (no downsampling)."""
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = _object_geometry(o, size)
        rgb = COLOUR_RGB[o.colour]
        width = max(1, round(0.22 * r))  # thinner for small objects, so their inside stays visible
        if scene.style == "filled":
            _draw_shape(draw, o.shape, cx, cy, r, fill=rgb)
            if o.pattern != "plain":
                _paste_pattern(img, o.shape, cx, cy, r, o.pattern, _shade(rgb, 0.45))
        else:
            # Outlined: the pattern (in the object's colour) fills the inside of the outline.
            if o.pattern != "plain":
                _paste_pattern(img, o.shape, cx, cy, r, o.pattern, rgb)
            _draw_shape(draw, o.shape, cx, cy, r, outline=rgb, width=width)
    return img


def render_scene(scene: Scene, image_size: int, render_scale: int) -> Image.Image:
    img = draw_scene(scene, image_size * render_scale)
    return img.reduce(render_scale) if render_scale > 1 else img


# --------------------------------------------------------------------------- garments


def _garment_polygons(g: Garment, size: int) -> tuple[list[list[tuple[float, float]]], dict[str, float]]:
    """Body and sleeve polygons in pixels, plus the neckline anchor (all symmetric about x)."""
    fit = (0.92, 1.0, 1.08)[g.fit]
    scale = (0.9, 0.95, 1.0, 1.04, 1.08)[g.scale]
    ox, oy = 0.5 + g.dx * 0.012, 0.5 + g.dy * 0.012

    def pt(x: float, y: float) -> tuple[float, float]:
        return ((ox + x * scale) * size, (oy + (y - 0.5) * scale) * size)

    neck_y, shoulder_y, armpit_y = 0.13, 0.17, 0.31
    neck_w, shoulder_w, armpit_w = 0.065, 0.17 * fit, 0.145 * fit
    if g.category == "dress":
        waist_y, waist_w = 0.45, 0.12 * fit
        hem_y, hem_w = {"short": (0.63, 0.21), "knee": (0.77, 0.25), "long": (0.93, 0.29)}[g.length]
        half = [(neck_w, neck_y), (shoulder_w, shoulder_y), (armpit_w, armpit_y), (waist_w, waist_y),
                (hem_w * fit, hem_y)]
    else:
        hem_y = {"cropped": 0.50, "regular": 0.66, "long": 0.80}[g.length]
        hem_w = (0.15 if g.category == "shirt" else 0.165) * fit
        half = [(neck_w, neck_y), (shoulder_w, shoulder_y), (armpit_w, armpit_y), (hem_w, hem_y)]
    body = [pt(-x, y) for x, y in half] + [pt(x, y) for x, y in reversed(half)]
    polys = [body]
    if g.sleeves != "sleeveless":
        if g.sleeves == "short":
            outer, inner = (shoulder_w + 0.11, shoulder_y + 0.11), (armpit_w + 0.075, armpit_y + 0.07)
        else:
            outer, inner = (shoulder_w + 0.17, shoulder_y + 0.44), (armpit_w + 0.09, armpit_y + 0.32)
        for s in (-1, 1):
            polys.append([pt(s * shoulder_w, shoulder_y), pt(s * outer[0], outer[1]), pt(s * inner[0], inner[1]),
                          pt(s * armpit_w, armpit_y)])
    anchor = {"cx": pt(0, neck_y)[0], "top": pt(0, neck_y)[1], "unit": size * scale, "neck_w": neck_w * size * scale}
    return polys, anchor


def draw_garment(g: Garment, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), FIQ_BACKGROUND)
    draw = ImageDraw.Draw(img)
    mask = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask)
    rgb = FIQ_COLOUR_RGB[g.colour]
    polys, a = _garment_polygons(g, size)
    for poly in polys:
        draw.polygon(poly, fill=rgb)
        mdraw.polygon(poly, fill=255)
    if g.pattern != "plain":
        luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        tone = (245, 245, 245) if luma < 110 else _shade(rgb, 0.5)
        pat = _pattern_mask(f"{g.pattern}_garment", size).crop((size // 2, size // 2, size // 2 + size, size // 2 + size))
        img.paste(tone, (0, 0, size, size), ImageChops.multiply(mask, pat))
    edge = _shade(rgb, 0.6) if g.colour != "black" else (90, 90, 90)
    line = max(1, round(size / 96))
    for poly in polys:
        draw.polygon(poly, outline=edge, width=line)
    cx, top, unit, nw = a["cx"], a["top"], a["unit"], a["neck_w"]
    if g.neckline == "round":
        # Lower half of an ellipse: the cut shows inside the garment only.
        draw.chord([cx - nw, top - 0.06 * unit, cx + nw, top + 0.06 * unit], 0, 180, fill=FIQ_BACKGROUND, outline=edge,
                   width=line)
    elif g.neckline == "v-neck":
        draw.polygon([(cx - nw, top - 1), (cx + nw, top - 1), (cx, top + 0.14 * unit)], fill=FIQ_BACKGROUND,
                     outline=edge, width=line)
    elif g.neckline == "square":
        draw.rectangle([cx - 0.8 * nw, top - 1, cx + 0.8 * nw, top + 0.08 * unit], fill=FIQ_BACKGROUND, outline=edge,
                       width=line)
    else:  # collar: a small round cut, two collar flaps and a button placket
        draw.ellipse([cx - 0.7 * nw, top - 0.03 * unit, cx + 0.7 * nw, top + 0.03 * unit], fill=FIQ_BACKGROUND)
        flap = _shade(rgb, 0.8) if g.colour != "black" else (70, 70, 70)
        for s in (-1, 1):
            draw.polygon([(cx + s * 1.15 * nw, top - 0.01 * unit), (cx, top + 0.04 * unit),
                          (cx + s * 0.9 * nw, top + 0.09 * unit)], fill=flap, outline=edge, width=line)
        bottom = polys[0][len(polys[0]) // 2 - 1][1]
        draw.line([(cx, top + 0.05 * unit), (cx, bottom)], fill=edge, width=line)
        y = top + 0.09 * unit
        while y < bottom - 0.03 * unit:
            draw.ellipse([cx - 1.5 * line, y - 1.5 * line, cx + 1.5 * line, y + 1.5 * line], fill=edge)
            y += 0.09 * unit
    return img


def render_garment(g: Garment, image_size: int, render_scale: int) -> Image.Image:
    img = draw_garment(g, image_size * render_scale)
    return img.reduce(render_scale) if render_scale > 1 else img


# --------------------------------------------------------------------------- encoding, workers


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(img: Image.Image) -> bytes:
    """Encode an RGB image as a minimal PNG (IHDR, one IDAT, IEND; no metadata).

    Written by hand rather than through ``Image.save``: Pillow's per-call overhead and adaptive
    row filtering cost about 3x more on these small images, and generation writes ~50k of them.
    Rows use filter type 0 and zlib level 1, which also compresses these flat drawings smaller.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    raw = np.zeros((h, 3 * w + 1), dtype=np.uint8)  # first byte of each row: filter type 0
    raw[:, 1:] = np.frombuffer(img.tobytes(), dtype=np.uint8).reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), PNG_COMPRESS_LEVEL))
        + _png_chunk(b"IEND", b"")
    )


def render_job(job: Job, image_size: int, render_scale: int) -> bytes:
    kind, spec, _ = job
    if kind == "scene":
        img = render_scene(spec, image_size, render_scale)  # type: ignore[arg-type]
    elif kind == "garment":
        img = render_garment(spec, image_size, render_scale)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown render job kind {kind!r}")
    return png_bytes(img)


def _render_chunk(root: str, image_size: int, render_scale: int, jobs: Sequence[Job]) -> list[bytes | None]:
    out: list[bytes | None] = []
    for job in jobs:
        data = render_job(job, image_size, render_scale)
        if job[2] is None:
            out.append(data)
        else:
            # os-level calls: tens of thousands of tiny files, where buffered file objects cost more.
            fd = os.open(os.path.join(root, job[2]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            out.append(None)
    return out


PARALLEL_MIN_JOBS = 2000  # below this, starting worker processes costs more than it saves
_CHUNK = 250


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def render_jobs(jobs: Sequence[Job], root: Path, image_size: int, render_scale: int, *, workers: int = 1,
                on_progress: Callable[[int], None] | None = None) -> list[bytes | None]:
    """Render every job: write the PNGs with a path under ``root``, return the bytes of the others
    (in job order; None where written)."""
    chunks = [jobs[i : i + _CHUNK] for i in range(0, len(jobs), _CHUNK)]
    results: list[bytes | None] = []
    if workers <= 1 or len(jobs) < PARALLEL_MIN_JOBS:
        for chunk in chunks:
            results.extend(_render_chunk(str(root), image_size, render_scale, chunk))
            if on_progress:
                on_progress(len(chunk))
        return results
    # fork on Linux: spawn would re-import the caller's __main__, which breaks scripts without an
    # ``if __name__ == "__main__"`` guard; the children only draw with Pillow and write files, so
    # threads the parent may hold (tqdm's monitor, torch's pools) are never touched in them.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_render_chunk, str(root), image_size, render_scale, c) for c in chunks]
        try:
            for chunk, fut in zip(chunks, futures, strict=True):
                results.extend(fut.result())
                if on_progress:
                    on_progress(len(chunk))
        except BaseException:
            # Stop queued work at once: the caller is about to delete the folder it writes into.
            for fut in futures:
                fut.cancel()
            raise
    return results
