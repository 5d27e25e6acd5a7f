"""Decoding a data set's distinct gallery image files for the ``prepare`` stage.

:func:`decode_all` yields one result per file, in order: ``(status, reason, width, height,
pixels)`` with status ``ok``, ``missing`` or ``corrupt`` and the exact reason (for an ``ok`` image
the reason field holds its conversion notes). Files are read by the decoder, so a worker pool
(large galleries only) parallelises the I/O too; embedded (parquet) images are read up front.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
from collections.abc import Generator, Iterator

import numpy as np

from detailfusion.data.images import NOTES_KEY, ImageDecodeError, decode_image, preprocess_image
from detailfusion.data.native import NativeDataset

# Below this many images a worker pool costs more to start than it saves.
POOL_MIN_IMAGES = 4000
POOL_CHUNKSIZE = 256
POOL_BLOCK = 4096

OK, MISSING, CORRUPT = "ok", "missing", "corrupt"


def _missing_reason(file: str | os.PathLike, path: str) -> str:
    if os.path.islink(file):
        return f"file not found: {path} is a broken symbolic link (-> {os.readlink(file)})"
    return f"file not found: {path}"


def conversion_counts(results: dict) -> dict[str, int]:
    """How many decoded images needed each kind of conversion to 8-bit RGB (notes of OK images)."""
    counts: dict[str, int] = {}
    for status, notes, *_ in results.values():
        if status == OK and notes:
            for note in notes.split("; "):
                counts[note] = counts.get(note, 0) + 1
    return dict(sorted(counts.items()))


def decode_all(
    ds: NativeDataset,
    unique: list[str],
    *,
    size: int,
    target_ratio: float,
    max_image_pixels: int,
    workers: int,
) -> Generator[tuple, None, None]:
    """Decode results in the order of ``unique``; a pool when the gallery is large enough.

    ``workers`` 0 = auto: 2 for galleries of :data:`POOL_MIN_IMAGES` or more on machines with >= 4
    cores, else 1. Close the generator to stop the pool at once.
    """
    decode = functools.partial(
        decode_task, size=size, target_ratio=target_ratio, max_image_pixels=max_image_pixels
    )
    tasks = _tasks(ds, unique)
    workers = workers or (2 if len(unique) >= POOL_MIN_IMAGES and (os.cpu_count() or 1) >= 4 else 1)
    if workers <= 1:
        yield from map(decode, tasks)
        return
    # fork: workers inherit the imported modules; spawn would re-import pandas/pyarrow per worker.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        # Pool.imap drains its input eagerly; feeding bounded blocks keeps embedded (parquet)
        # image bytes from piling up in memory.
        while block := list(itertools.islice(tasks, POOL_BLOCK)):
            yield from pool.imap(decode, block, chunksize=POOL_CHUNKSIZE)


def _tasks(
    ds: NativeDataset, unique: list[str]
) -> Iterator[tuple[str, str | None, bytes | None, str | None]]:
    """(path, file to read, bytes already read, missing reason): files are read by the decoder so
    the pool parallelises I/O too; embedded (parquet) images are read here."""
    root = os.fspath(ds.root)
    for path in unique:
        if not ds.embedded:
            yield path, os.path.join(root, path), None, None
            continue
        try:
            yield path, None, ds.open_image_bytes(path), None
        except FileNotFoundError as exc:
            yield path, None, None, str(exc)


def decode_task(
    task: tuple[str, str | None, bytes | None, str | None],
    *,
    size: int,
    target_ratio: float,
    max_image_pixels: int,
) -> tuple[str, str, int | None, int | None, np.ndarray | None]:
    """One image -> (status, reason, width, height, pixels); never raises for bad images."""
    path, file, data, missing = task
    if missing is not None:
        return MISSING, missing, None, None, None
    if file is not None:
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, IsADirectoryError):
            return MISSING, _missing_reason(file, path), None, None, None
        except OSError as exc:
            return CORRUPT, f"unreadable file: {type(exc).__name__}: {exc}", None, None, None
    assert data is not None
    try:
        img = decode_image(data, max_image_pixels=max_image_pixels)
        w, h = img.size
        notes = "; ".join(img.info.get(NOTES_KEY, ()))
        arr = preprocess_image(img, size, target_ratio)
    except ImageDecodeError as exc:
        return CORRUPT, exc.reason, None, None, None
    return OK, notes, w, h, arr  # for an OK image the reason field holds its conversion notes
