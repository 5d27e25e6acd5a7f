"""Model-free and single-modality query features to report next to every model.

* :func:`pixel_reference_baseline`: the query is the reference image's raw pixels, the gallery its
  raw pixels, both centred on the gallery mean and L2-normalised. It measures how much of a
  benchmark "nearest image to the reference" already solves (``docs/synthetic-benchmark.md``,
  lessons 1 and 3: a benchmark whose negatives leak the answer scores high here).
* :func:`reference_only_queries`: the query is the reference's own image embedding, looked up
  in the gallery features by name (the caption is ignored).
* :func:`text_only_queries`: the query is the caption embedding alone (the reference is ignored);
  gallery R@K from it exposes caption leakage, Rsub@1 should stay near chance.

All return float32 features ready for :func:`detailfusion.eval.metrics.rank_gallery` and
:func:`detailfusion.eval.metrics.cirr_rankings`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from detailfusion.eval.metrics import EvalInputError, FeatureArray, gallery_index

# Rows converted to float at once when centring pixel arrays (bounds memory for memmaps).
_PIXEL_ROWS_PER_CHUNK = 1024


def pixel_reference_baseline(
    ref_pixels: np.ndarray, gallery_pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery features of the pixel nearest-neighbour baseline.

    ``ref_pixels`` is ``(n_queries, ...)`` and ``gallery_pixels`` ``(n_gallery, ...)`` with the
    same trailing shape (e.g. uint8 ``H x W x 3``; a memmap is read in chunks). Every image is
    flattened, the per-pixel mean of the *gallery* is subtracted from both, and the vectors are
    L2-normalised, so cosine ranking equals ranking by centred pixel correlation.
    Returns ``(query_feats, gallery_feats)``, float32 arrays of shape ``(n, H*W*3)``.
    """
    if ref_pixels.shape[1:] != gallery_pixels.shape[1:]:
        raise EvalInputError(
            f"pixel baseline: reference images {ref_pixels.shape[1:]} and gallery images "
            f"{gallery_pixels.shape[1:]} differ in shape"
        )
    if len(gallery_pixels) == 0:
        raise EvalInputError("pixel baseline: the gallery is empty")
    dim = int(np.prod(gallery_pixels.shape[1:]))
    total = np.zeros(dim, dtype=np.float64)
    for start in range(0, len(gallery_pixels), _PIXEL_ROWS_PER_CHUNK):
        chunk = np.asarray(gallery_pixels[start : start + _PIXEL_ROWS_PER_CHUNK]).reshape(-1, dim)
        total += chunk.sum(axis=0, dtype=np.float64)
    mean = (total / len(gallery_pixels)).astype(np.float32)
    return _centre_and_normalise(ref_pixels, mean), _centre_and_normalise(gallery_pixels, mean)


def reference_only_queries(
    references: Sequence[str], gallery_names: Sequence[str], gallery_feats: FeatureArray
) -> np.ndarray:
    """Each query's feature is its reference image's gallery feature (L2-normalised), looked up by name.

    With the CIRR protocol the reference itself is removed from the ranking, so this ranks the
    reference's nearest neighbours.
    """
    feats = _to_numpy(gallery_feats)
    if len(gallery_names) != len(feats):
        raise EvalInputError(f"reference-only: {len(gallery_names)} gallery names for {len(feats)} features")
    index = gallery_index([str(n) for n in gallery_names])
    rows = []
    for i, ref in enumerate(references):
        if ref not in index:
            raise EvalInputError(f"reference-only: query {i} reference {ref!r} is not in the gallery")
        rows.append(index[ref])
    return _normalise(feats[np.asarray(rows, dtype=np.int64)])


def text_only_queries(text_feats: FeatureArray) -> np.ndarray:
    """Each query's feature is its caption embedding alone (L2-normalised)."""
    return _normalise(_to_numpy(text_feats))


def _to_numpy(x: FeatureArray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise EvalInputError(f"features must be 2-D (rows, dim), got shape {arr.shape}")
    return arr


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _centre_and_normalise(pixels: np.ndarray, mean: np.ndarray) -> np.ndarray:
    out = np.empty((len(pixels), mean.size), dtype=np.float32)
    for start in range(0, len(pixels), _PIXEL_ROWS_PER_CHUNK):
        chunk = np.asarray(pixels[start : start + _PIXEL_ROWS_PER_CHUNK]).reshape(-1, mean.size)
        out[start : start + len(chunk)] = _normalise(chunk.astype(np.float32) - mean)
    return out
