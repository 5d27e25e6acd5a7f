"""Gallery embeddings in resumable shards, in the layout clip-retrieval-style tools read.

::

    <cache>/cache.json                     the cache key (model identity, preprocessing, shard size)
    <cache>/embeddings/img_emb_00000.npy   float32 [rows, D], unit rows, one per embedded image
    <cache>/metadata/metadata_00000.parquet  image_id, image_path, gallery_position (row-aligned)
    <cache>/errors/errors_00000.parquet    images of that shard that could not be embedded (if any)

Every file is written to a temporary name and renamed into place, the embeddings file last, so
a shard exists completely or not at all. A rerun (after a crash, a kill, a Ctrl-C) keeps every
shard whose content digest still matches (image ids, sources and the bytes/pixels of its
images, hashed while reading them) and embeds only the others. A different model (weights
digest), image size, targetpad ratio or shard size changes the key in ``cache.json`` and
invalidates the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from detailfusion.errors import DetailFusionError
from detailfusion.fsutil import atomic_path, write_json_atomic
from detailfusion.retrieval.embed import autocast_dtype, encode_images, pixels_from_bytes

CACHE_FILE = "cache.json"
CACHE_FORMAT = 1
DIGEST_KEY = b"detailfusion.shard_digest"
ERROR_COLUMNS = ("kind", "item_id", "source", "error")


@dataclass
class GalleryEmbeddings:
    """The embedded gallery: rows aligned with ``ids``/``positions`` (positions in the gallery)."""

    ids: list[str]
    positions: np.ndarray
    embeddings: np.ndarray
    errors: pd.DataFrame
    stats: dict = field(default_factory=dict)


def shard_files(cache: Path, i: int) -> tuple[Path, Path, Path]:
    return (cache / "embeddings" / f"img_emb_{i:05d}.npy", cache / "metadata" / f"metadata_{i:05d}.parquet",
            cache / "errors" / f"errors_{i:05d}.parquet")


def _atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def _write_shard(cache: Path, i: int, emb: np.ndarray, meta: pd.DataFrame, errors: pd.DataFrame, digest: str) -> None:
    emb_path, meta_path, err_path = shard_files(cache, i)
    if len(errors):
        _atomic(err_path, lambda t: errors.to_parquet(t, index=False))
    else:
        err_path.unlink(missing_ok=True)
    table = pa.Table.from_pandas(meta, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), DIGEST_KEY: digest.encode()})
    _atomic(meta_path, lambda t: pq.write_table(table, t))

    def save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, emb.astype(np.float32, copy=False))

    _atomic(emb_path, save)  # last: its presence marks the shard complete


def _shard_done(cache: Path, i: int, digest: str) -> bool:
    emb_path, meta_path, _ = shard_files(cache, i)
    if not (emb_path.is_file() and meta_path.is_file()):
        return False
    try:
        schema = pq.read_schema(meta_path)
        rows = pq.ParquetFile(meta_path).metadata.num_rows
        emb = np.load(emb_path, mmap_mode="r")
    except Exception:  # a damaged shard is simply embedded again
        return False
    return (schema.metadata or {}).get(DIGEST_KEY, b"").decode() == digest and emb.shape[0] == rows


def _open_cache(cache: Path, key: dict) -> bool:
    """Make ``cache`` hold ``key``; returns True when an existing cache was invalidated."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / CACHE_FILE
    invalidated = False
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old == key:
            return False
        invalidated = True
    for sub in ("embeddings", "metadata", "errors"):
        shutil.rmtree(cache / sub, ignore_errors=True)
    write_json_atomic(path, key)
    return invalidated


def _drop_partial_writes(cache: Path) -> None:
    """Temporary files a killed run left behind (a shard being written when it died)."""
    for sub in ("embeddings", "metadata", "errors"):
        for tmp in (cache / sub).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def cache_key(model_identity: str, image_size: int, target_ratio: float, shard_size: int, embed_dim: int,
              dtype: str | None = None) -> dict:
    return {"format": CACHE_FORMAT, "model": model_identity, "image_size": int(image_size),
            "target_ratio": float(target_ratio), "shard_size": int(shard_size), "embed_dim": int(embed_dim),
            "dtype": dtype or "fp32"}


def prepare_cache(cache: str | Path, *, n: int, model_identity: str, image_size: int, target_ratio: float,
                  shard_size: int, batch_size: int, embed_dim: int, dtype: str | None
                  ) -> tuple[Path, str, bool, int, int]:  # fmt: skip
    """Open (or invalidate) the shard cache for ``n`` gallery images and clean it up for a run:
    partial writes of a killed run and shards beyond the gallery's end are removed. Returns
    ``(cache, key, invalidated, n, n_shards)``; shared by the local and the Ray engine."""
    if shard_size < 1 or batch_size < 1:
        raise DetailFusionError(f"shard_size and batch_size must be >= 1 (got {shard_size}, {batch_size})")
    cache = Path(cache)
    key = cache_key(model_identity, image_size, target_ratio, shard_size, embed_dim, dtype)
    invalidated = _open_cache(cache, key)
    _drop_partial_writes(cache)
    n_shards = max(1, -(-n // shard_size))
    for sub, pattern in (("embeddings", "img_emb_*.npy"), ("metadata", "metadata_*.parquet"),
                         ("errors", "errors_*.parquet")):
        for stale in (cache / sub).glob(pattern):
            if int(stale.stem.rsplit("_", 1)[1]) >= n_shards:
                stale.unlink()
    return cache, key, invalidated, n, n_shards


def embed_gallery_shards(model, gallery, cache: str | Path, *, model_identity: str, image_size: int,
                         target_ratio: float, shard_size: int = 10_000, batch_size: int = 256,
                         readers: int = 8, dtype: str | None = None, progress: bool = True) -> GalleryEmbeddings:
    """Embed ``gallery`` (:class:`~detailfusion.retrieval.inputs.Gallery`) into ``cache`` shard by shard.

    Images that cannot be read or decoded become error rows (``errors``), never silent drops.
    ``dtype`` (``bf16``/``fp16``) embeds under autocast; it is part of the cache key.
    """
    cache, key, invalidated, n, n_shards = prepare_cache(
        cache, n=len(gallery), model_identity=model_identity, image_size=image_size, target_ratio=target_ratio,
        shard_size=shard_size, batch_size=batch_size, embed_dim=model.embed_dim, dtype=dtype)
    model.eval()
    stats = {"shards": n_shards, "shards_embedded": 0, "shards_reused": 0, "images_embedded": 0,
             "cache_invalidated": invalidated, "embed_seconds": 0.0}
    digests = []
    pool = ThreadPoolExecutor(max_workers=max(1, readers)) if gallery.pixels is None else None
    try:
        with tqdm(total=n, desc="gallery shards", unit="img", disable=not progress) as bar:
            for i in range(n_shards):
                done = ensure_shard(model, gallery, cache, i, shard_size=shard_size, image_size=image_size,
                                    target_ratio=target_ratio, batch_size=batch_size, dtype=dtype, pool=pool)
                digests.append(done.digest)
                if done.embedded is None:
                    stats["shards_reused"] += 1
                else:
                    stats["embed_seconds"] += done.seconds
                    stats["shards_embedded"] += 1
                    stats["images_embedded"] += done.embedded
                bar.update(done.rows)
    finally:
        if pool is not None:
            pool.shutdown()
    out = load_shards(cache, n_shards, model.embed_dim)
    out.stats.update(stats)
    out.stats["content_digest"] = hashlib.sha256("".join(digests).encode()).hexdigest()
    out.stats["images_per_s"] = (stats["images_embedded"] / stats["embed_seconds"]) if stats["embed_seconds"] else None
    return out


@dataclass(frozen=True)
class ShardResult:
    """What :func:`ensure_shard` did: ``embedded`` is None when a finished shard was reused."""

    digest: str
    rows: int
    embedded: int | None
    seconds: float


def ensure_shard(model, gallery, cache: Path, i: int, *, shard_size: int, image_size: int, target_ratio: float,
                 batch_size: int, dtype: str | None, pool: ThreadPoolExecutor | None = None) -> ShardResult:
    """Make shard ``i`` of ``cache`` complete: reuse it when its content digest matches, else embed and write it.

    The one shard worker of both engines (the local loop above and the Ray actors).
    """
    rows = range(i * shard_size, min(len(gallery), (i + 1) * shard_size))
    raws = list(pool.map(lambda r: _read(gallery, r), rows)) if pool else [_read(gallery, r) for r in rows]
    digest = _digest(gallery, rows, raws)
    if _shard_done(cache, i, digest):
        return ShardResult(digest, len(rows), None, 0.0)
    start = time.perf_counter()
    emb, meta, errors = _embed_shard(model, gallery, rows, raws, image_size, target_ratio, batch_size,
                                     autocast_dtype(dtype))
    _write_shard(cache, i, emb, meta, errors, digest)
    return ShardResult(digest, len(rows), len(meta), time.perf_counter() - start)


def _read(gallery, row: int) -> bytes | np.ndarray | Exception:
    try:
        return gallery.raw(row)
    except DetailFusionError as exc:
        return exc


def _digest(gallery, rows: range, raws: list) -> str:
    h = hashlib.sha256()
    for r, raw in zip(rows, raws, strict=True):
        h.update(f"{gallery.ids[r]}\0{gallery.sources[r]}\0".encode())
        if isinstance(raw, Exception):
            h.update(f"error:{raw}".encode())
        else:
            h.update(raw if isinstance(raw, bytes) else np.ascontiguousarray(raw).tobytes())
        h.update(b"\1")
    return h.hexdigest()


def _embed_shard(model, gallery, rows: range, raws: list, size: int, ratio: float, batch_size: int, dtype=None):
    pixels, keep, errors = [], [], []
    for r, raw in zip(rows, raws, strict=True):
        try:
            if isinstance(raw, Exception):
                raise raw
            pixels.append(raw if isinstance(raw, np.ndarray) else pixels_from_bytes(raw, size, ratio,
                                                                                   source=gallery.sources[r]))
            keep.append(r)
        except DetailFusionError as exc:
            errors.append({"kind": "gallery", "item_id": gallery.ids[r], "source": gallery.sources[r],
                           "error": str(exc)})
    parts = [encode_images(model, np.stack(pixels[s : s + batch_size]), dtype=dtype)
             for s in range(0, len(pixels), batch_size)]
    emb = np.concatenate([p.numpy() for p in parts]) if parts else np.zeros((0, model.embed_dim), np.float32)
    meta = pd.DataFrame({"image_id": [gallery.ids[r] for r in keep], "image_path": [gallery.sources[r] for r in keep],
                         "gallery_position": np.asarray(keep, dtype=np.int64)})
    return emb, meta, pd.DataFrame(errors, columns=list(ERROR_COLUMNS))


def load_shards(cache: str | Path, n_shards: int, dim: int) -> GalleryEmbeddings:
    """Concatenate the shards of ``cache`` (all must be complete)."""
    cache = Path(cache)
    embs, metas, errs = [], [], []
    for i in range(n_shards):
        emb_path, meta_path, err_path = shard_files(cache, i)
        embs.append(np.load(emb_path))
        metas.append(pd.read_parquet(meta_path))
        if err_path.is_file():
            errs.append(pd.read_parquet(err_path))
    meta = pd.concat(metas, ignore_index=True)
    errors = pd.concat(errs, ignore_index=True) if errs else pd.DataFrame(columns=list(ERROR_COLUMNS))
    emb = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
    return GalleryEmbeddings(meta["image_id"].tolist(), meta["gallery_position"].to_numpy(np.int64), emb, errors)
