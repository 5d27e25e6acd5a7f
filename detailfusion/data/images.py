"""Safe image decoding and the CLIP4Cir/SPRC ``targetpad`` preprocessing, as uint8 arrays.

``prepare`` decodes every gallery image once with :func:`decode_image` and stores
:func:`targetpad` output in ``pixels.npy``; model serving turns raw request bytes into the same
arrays with :func:`preprocess_bytes`, so training, evaluation and serving see identical pixels.

The transform reproduces CLIP4Cir's ``targetpad`` exactly (``docs/data-formats.md``, "Decoding and
targetpad"): pad to the target ratio in the image's own mode, resize the shorter side with BICUBIC,
centre-crop, and only then convert to RGB. Normalisation belongs to the model and is not applied here.

Every decoded image is brought to 8-bit greyscale or RGB before that (:func:`to_8bit`), so
nothing is silently saturated: 16-bit greyscale is scaled (``v / 257``), 16-bit RGB keeps its high
byte (Pillow's own reduction), transparency is composited onto white, CMYK and other colour
spaces are converted, EXIF orientation is applied; each such change is recorded as a note in
``img.info["detailfusion.notes"]`` (``prepare`` counts them in its summary). Modes without a
defined 8-bit mapping (32-bit float, integers beyond 16 bits) are refused with the reason.

Decompression bombs have an explicit policy: an image whose header announces more than
``max_image_pixels`` pixels is refused before its pixel data is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from detailfusion.errors import DetailFusionError

DEFAULT_MAX_IMAGE_PIXELS = 200_000_000


class ImageDecodeError(DetailFusionError):
    """Image bytes that cannot be turned into pixels; ``reason`` is the exact cause."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


def decode_image(
    data: bytes, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, source: str | None = None
) -> Image.Image:
    """Decode encoded image bytes into a fully loaded PIL image in its original mode.

    Raises :class:`ImageDecodeError` for empty, unidentifiable, truncated or corrupt data and for
    images above ``max_image_pixels`` (``None`` disables the limit).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", source)
    # PIL's own bomb check reads a process-wide setting; align it with ours for this call and
    # turn its warning into an error so no oversized image is ever decoded.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageDecodeError(f"decompression bomb refused: {exc}", source) from None
            except Image.UnidentifiedImageError:
                raise ImageDecodeError(
                    f"truncated/corrupt image: not a recognised image format ({len(data)} bytes)", source
                ) from None
            except Exception as exc:  # PIL raises many types for broken headers
                raise ImageDecodeError(
                    f"truncated/corrupt image: {type(exc).__name__}: {exc}", source
                ) from None
            w, h = img.size
            if max_image_pixels is not None and w * h > max_image_pixels:
                raise ImageDecodeError(
                    f"decompression bomb refused: {w}x{h} = {w * h} pixels > max_image_pixels {max_image_pixels}",
                    source,
                )
            if w <= 0 or h <= 0:
                raise ImageDecodeError(f"truncated/corrupt image: size {w}x{h}", source)
            try:
                img.load()
            except Exception as exc:  # truncated data surfaces as OSError, SyntaxError, ...
                raise ImageDecodeError(
                    f"truncated/corrupt image: {type(exc).__name__}: {exc}", source
                ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return to_8bit(img, source=source)


NOTES_KEY = "detailfusion.notes"
_WHITE = (255, 255, 255, 255)


def to_8bit(img: Image.Image, *, source: str | None = None) -> Image.Image:
    """A loaded image in any mode -> mode ``1``, ``L`` or ``RGB`` with 8-bit values (see module doc).

    What was changed is appended to ``img.info[NOTES_KEY]``; an image that has no faithful 8-bit
    form raises :class:`ImageDecodeError` with the reason.
    """
    notes: list[str] = []
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
        notes.append(f"rotated per EXIF orientation {orientation}")
    mode = img.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N (16-bit) and I (32-bit signed)
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageDecodeError(
                f"unsupported image: {mode} values in [{lo}, {hi}] have no defined 8-bit mapping", source
            )
        img = Image.fromarray(np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8), "L")
        notes.append("16-bit greyscale scaled to 8 bits")
    elif mode == "F":
        raise ImageDecodeError("unsupported image: 32-bit float pixels have no defined 8-bit mapping", source)
    elif mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    elif mode == "P":
        pass  # 8-bit palette: kept, so targetpad pads with palette index 0 exactly as CLIP4Cir does
    elif mode == "CMYK":
        img = img.convert("RGB")
        notes.append("CMYK converted to RGB")
    elif mode not in ("1", "L", "RGB", "RGBA", "LA", "La", "RGBa", "P"):
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as exc:
            raise ImageDecodeError(f"unsupported image mode {mode}: {exc}", source) from None
        notes.append(f"{mode} converted to RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            img = rgba.convert("RGB")  # an alpha channel without transparency: nothing to flatten
        else:
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
            notes.append("transparency flattened onto white")
    if notes:
        img.info[NOTES_KEY] = notes
    return img


def targetpad(img: Image.Image, size: int, target_ratio: float) -> Image.Image:
    """CLIP4Cir ``targetpad``: TargetPad(ratio) -> Resize(size, BICUBIC) -> CenterCrop(size) -> RGB.

    Every step calls PIL the way torchvision's PIL backend does, so the pixels match.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    if max(w, h) / min(w, h) >= target_ratio:
        scaled_max = max(w, h) / target_ratio
        hp = max(int((scaled_max - w) / 2), 0)
        vp = max(int((scaled_max - h) / 2), 0)
        if hp or vp:
            # torchvision pads PIL images with ImageOps.expand in the image's own mode.
            img = ImageOps.expand(img, border=(hp, vp, hp, vp), fill=0)
        w, h = img.size
    # torchvision Resize(int): the shorter side becomes `size`, the longer one is truncated.
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if (new_w, new_h) != (size, size):
        # torchvision CenterCrop rounds half to even (Python round), as here.
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> contiguous uint8 array (H, W, 3)."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def preprocess_image(img: Image.Image, size: int, target_ratio: float) -> np.ndarray:
    """A decoded image -> targetpadded uint8 (size, size, 3)."""
    try:
        return to_array(targetpad(img, size, target_ratio))
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"truncated/corrupt image: cannot convert mode {img.mode}: {exc}") from None


def preprocess_bytes(
    data: bytes,
    size: int,
    target_ratio: float,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    source: str | None = None,
) -> np.ndarray:
    """Encoded bytes -> targetpadded uint8 (size, size, 3); the one path serving and prepare share."""
    img = decode_image(data, max_image_pixels=max_image_pixels, source=source)
    try:
        return preprocess_image(img, size, target_ratio)
    except ImageDecodeError as exc:
        raise ImageDecodeError(exc.reason, source) from None
