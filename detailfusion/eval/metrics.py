"""Leaderboard retrieval metrics for CIRR and FashionIQ, computed from features and image names.

The definitions reproduce CLIP4Cir/SPRC exactly (``docs/data-formats.md``, "Metrics"):

* CIRR: rank the whole split gallery by cosine similarity, remove the query's reference image,
  Recall@{1,5,10,50} on the hard target; Recall_subset@{1,2,3} on the same global order restricted
  to the query's set members minus the reference; ``Avg = (R@5 + Rsub@1) / 2``.
* FashionIQ: per category, the category's own gallery, reference *kept*, R@10 and R@50;
  ``Avg`` = mean of the category-averaged R@10 and R@50.

Ties are broken by gallery order (a stable sort), so results are deterministic; CLIP4Cir's
non-stable argsort only differs on exact ties. Every assert of the reference code is a
:class:`EvalInputError` that names the query and the problem. Per-query boolean hits
(:func:`cirr_hits`, :func:`fiq_hits`) feed the confidence intervals and per-group breakdowns of
:mod:`detailfusion.eval.hit_stats`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from detailfusion.errors import DetailFusionError

CIRR_RECALL_KS: tuple[int, ...] = (1, 5, 10, 50)
CIRR_SUBSET_KS: tuple[int, ...] = (1, 2, 3)
FIQ_KS: tuple[int, ...] = (10, 50)

# Similarity entries held at once per query chunk: 4M float32 = 16 MB, plus sort buffers.
_CHUNK_ELEMENTS = 1 << 22

FeatureArray = np.ndarray | torch.Tensor


class EvalInputError(DetailFusionError, ValueError):
    """Evaluation inputs break the protocol (reference not in gallery, duplicate names, NaN features...)."""


def rank_gallery(
    query_feats: FeatureArray,
    gallery_feats: FeatureArray,
    k: int | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Gallery indices of each query, best first, by cosine similarity.

    Features are L2-normalised here. Equal similarities keep gallery order. ``k`` limits the
    result to the top ``k`` columns (default: the whole gallery); queries are processed in chunks
    of ``chunk_size`` rows (default: about 4M similarity entries per chunk). Computation runs in
    the features' dtype (float64 stays float64, half precision is promoted to float32) on the
    query tensor's device. Returns an int64 array of shape ``(n_queries, min(k, n_gallery))``.
    """
    q, g = _prepare_features(query_feats, gallery_feats)
    n_gallery = g.shape[0]
    k = n_gallery if k is None else min(int(k), n_gallery)
    if k < 1:
        raise EvalInputError(f"rank_gallery: k must be >= 1, got {k}")
    out = np.empty((q.shape[0], k), dtype=np.int64)
    for start, sims in _similarity_chunks(q, g, chunk_size):
        out[start : start + sims.shape[0]] = _top_k_stable(sims, k).cpu().numpy()
    return out


def cirr_rankings(
    query_feats: FeatureArray,
    gallery_feats: FeatureArray,
    gallery_names: Sequence[str],
    references: Sequence[str],
    members: Sequence[Sequence[str]],
    top_k: int = 50,
    targets: Sequence[str | None] | None = None,
    chunk_size: int | None = None,
) -> tuple[list[list[str]], list[list[str]]]:
    """CIRR rankings as CLIP4Cir builds them, with the query's reference removed.

    Returns ``(ranked_names, subset_ranked)``: ``ranked_names[i]`` holds the top
    ``min(top_k, n_gallery - 1)`` gallery names of query ``i`` without its reference;
    ``subset_ranked[i]`` is the *global* order restricted to ``members[i]`` minus the reference
    (usually 5 names). Raises :class:`EvalInputError` when gallery names repeat, a reference or a
    member is not in the gallery, or (when ``targets`` is given) a target is missing from the
    gallery or equals the reference; ``None`` targets (test split) are not checked.
    """
    q, g = _prepare_features(query_feats, gallery_feats)
    n_query, n_gallery = q.shape[0], g.shape[0]
    names = [str(n) for n in gallery_names]
    if len(names) != n_gallery:
        raise EvalInputError(f"cirr_rankings: {len(names)} gallery names for {n_gallery} gallery features")
    for what, seq in (("references", references), ("members", members)):
        if len(seq) != n_query:
            raise EvalInputError(f"cirr_rankings: {len(seq)} {what} for {n_query} queries")
    if top_k < 1:
        raise EvalInputError(f"cirr_rankings: top_k must be >= 1, got {top_k}")
    index = gallery_index(names)

    ref_idx = np.empty(n_query, dtype=np.int64)
    for i, ref in enumerate(references):
        if ref not in index:
            raise EvalInputError(
                f"query {i}: reference {ref!r} does not occur in the gallery (it must occur exactly once)"
            )
        ref_idx[i] = index[ref]
    if targets is not None:
        _check_targets_in_gallery(targets, references, index, n_query)

    member_lists = []
    for i, (ref, group) in enumerate(zip(references, members, strict=True)):
        idx = []
        for name in dict.fromkeys(str(m) for m in group):
            if name not in index:
                raise EvalInputError(
                    f"query {i} (reference {ref!r}): set member {name!r} is not in the gallery"
                )
            if name != ref:
                idx.append(index[name])
        member_lists.append(sorted(idx))
    width = max((len(m) for m in member_lists), default=0)
    member_idx = np.full((n_query, width), -1, dtype=np.int64)
    for i, idx in enumerate(member_lists):
        member_idx[i, : len(idx)] = idx

    k = min(top_k + 1, n_gallery)
    keep = min(top_k, n_gallery - 1)
    ranked: list[list[str]] = []
    subset: list[list[str]] = []
    for start, sims in _similarity_chunks(q, g, chunk_size):
        stop = start + sims.shape[0]
        top = _top_k_stable(sims, k).cpu().numpy()
        for row, r in zip(top, ref_idx[start:stop], strict=True):
            ranked.append([names[j] for j in row[row != r][:keep]])
        if width:
            subset.extend(_rank_members(sims, member_idx[start:stop], names))
        else:
            subset.extend([] for _ in range(sims.shape[0]))
    return ranked, subset


def cirr_hits(
    ranked_names: Sequence[Sequence[str]],
    subset_ranked: Sequence[Sequence[str]],
    targets: Sequence[str | None],
) -> dict[str, np.ndarray]:
    """Per-query boolean hits for ``R@1/5/10/50`` and ``Rsub@1/2/3``.

    ``ranked_names`` must hold at least the top 50 of each reference-free ranking (or the whole
    gallery minus the reference when that is smaller): a target beyond the given list is a miss.
    """
    n = len(targets)
    if len(ranked_names) != n or len(subset_ranked) != n:
        raise EvalInputError(
            f"cirr_hits: {len(ranked_names)} rankings, {len(subset_ranked)} subset rankings, {n} targets"
        )
    _check_targets_present(targets)
    hits: dict[str, np.ndarray] = {}
    positions = _target_positions(ranked_names, targets)
    for k in CIRR_RECALL_KS:
        hits[f"R@{k}"] = (positions >= 0) & (positions < k)
    sub_positions = _target_positions(subset_ranked, targets)
    for k in CIRR_SUBSET_KS:
        hits[f"Rsub@{k}"] = (sub_positions >= 0) & (sub_positions < k)
    return hits


def cirr_metrics(
    ranked_names: Sequence[Sequence[str]],
    subset_ranked: Sequence[Sequence[str]],
    targets: Sequence[str | None],
) -> dict[str, float]:
    """CIRR ``R@1, R@5, R@10, R@50, Rsub@1, Rsub@2, Rsub@3, Avg`` in percent."""
    metrics = hits_to_metrics(cirr_hits(ranked_names, subset_ranked, targets))
    metrics["Avg"] = (metrics["R@5"] + metrics["Rsub@1"]) / 2
    return metrics


def fiq_hits(
    query_feats: FeatureArray,
    gallery_feats: FeatureArray,
    gallery_names: Sequence[str],
    targets: Sequence[str | None],
    ks: Sequence[int] = FIQ_KS,
    chunk_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query FashionIQ hits ``R@K`` for one category; the reference stays in the gallery.

    As CLIP4Cir asserts, each target must occur exactly once among ``gallery_names``.
    """
    names = [str(n) for n in gallery_names]
    gallery_count = len(gallery_feats)
    if len(names) != gallery_count:
        raise EvalInputError(f"fiq_hits: {len(names)} gallery names for {gallery_count} gallery features")
    if len(targets) != len(query_feats):
        raise EvalInputError(f"fiq_hits: {len(targets)} targets for {len(query_feats)} queries")
    _check_targets_present(targets)
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    for i, t in enumerate(targets):
        if counts.get(t, 0) != 1:
            raise EvalInputError(
                f"query {i}: target {t!r} occurs {counts.get(t, 0)} times in the gallery (must be exactly once)"
            )
    top = rank_gallery(query_feats, gallery_feats, k=max(ks), chunk_size=chunk_size)
    ranked = [[names[j] for j in row] for row in top]
    positions = _target_positions(ranked, targets)
    return {f"R@{k}": (positions >= 0) & (positions < k) for k in ks}


def fiq_metrics(
    per_category: Mapping[str, tuple[FeatureArray, FeatureArray, Sequence[str], Sequence[str | None]]],
) -> dict[str, float]:
    """FashionIQ metrics in percent from ``{category: (query_feats, gallery_feats, gallery_names, targets)}``.

    Keys: ``{cat}/R@10``, ``{cat}/R@50`` per category, ``avg/R@10``, ``avg/R@50`` (means over
    categories) and ``Avg = (avg/R@10 + avg/R@50) / 2``. Each category is ranked in its own gallery.
    """
    if not per_category:
        raise EvalInputError("fiq_metrics: no categories given")
    metrics: dict[str, float] = {}
    for cat, (qf, gf, names, targets) in per_category.items():
        try:
            cat_metrics = hits_to_metrics(fiq_hits(qf, gf, names, targets))
        except EvalInputError as exc:
            raise EvalInputError(f"category {cat!r}: {exc}") from exc
        for key, value in cat_metrics.items():
            metrics[f"{cat}/{key}"] = value
    for k in FIQ_KS:
        metrics[f"avg/R@{k}"] = float(np.mean([metrics[f"{cat}/R@{k}"] for cat in per_category]))
    metrics["Avg"] = (metrics["avg/R@10"] + metrics["avg/R@50"]) / 2
    return metrics


def recall_at_ks(
    ranked_names: Sequence[Sequence[str]], targets: Sequence[str | None], ks: Sequence[int]
) -> dict[int, float]:
    """Recall@K in percent for every K in ``ks`` (for recall curves); rankings must hold max(ks) names."""
    _check_targets_present(targets)
    positions = _target_positions(ranked_names, targets)
    hit = positions >= 0
    return {int(k): 100.0 * float(np.mean(hit & (positions < k))) for k in ks}


def hits_to_metrics(hits: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean of each boolean hit array, in percent."""
    out = {}
    for key, h in hits.items():
        if len(h) == 0:
            raise EvalInputError(f"metric {key!r}: no queries to average")
        out[key] = 100.0 * float(np.mean(h))
    return out


def gallery_index(names: Sequence[str]) -> dict[str, int]:
    """``{name: position}``; raises :class:`EvalInputError` naming a name that occurs twice."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise EvalInputError(
                f"gallery name {name!r} occurs twice (positions {index[name]} and {i}); names must be unique"
            )
        index[name] = i
    return index


def _as_tensor(x: FeatureArray, what: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.detach()
    if t.ndim != 2:
        raise EvalInputError(f"{what} features must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.to(torch.float32)
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        row = int(torch.nonzero(bad)[0])
        raise EvalInputError(f"{what} features: row {row} contains NaN or inf")
    return t


def _prepare_features(
    query_feats: FeatureArray, gallery_feats: FeatureArray
) -> tuple[torch.Tensor, torch.Tensor]:
    q = _as_tensor(query_feats, "query")
    g = _as_tensor(gallery_feats, "gallery")
    if q.shape[1] != g.shape[1]:
        raise EvalInputError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    if g.shape[0] == 0:
        raise EvalInputError("the gallery is empty")
    dtype = torch.promote_types(q.dtype, g.dtype)
    g = g.to(device=q.device, dtype=dtype)
    q = q.to(dtype)
    return torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(g, dim=1)


def _similarity_chunks(
    q: torch.Tensor, g: torch.Tensor, chunk_size: int | None
) -> Iterator[tuple[int, torch.Tensor]]:
    step = chunk_size or max(1, _CHUNK_ELEMENTS // g.shape[0])
    gt = g.T
    for start in range(0, q.shape[0], step):
        yield start, q[start : start + step] @ gt


def _top_k_stable(sims: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` column indices per row ordered by (similarity desc, column asc)."""
    if k >= sims.shape[1]:
        return torch.sort(sims, dim=1, descending=True, stable=True).indices
    vals, idx = torch.topk(sims, k, dim=1)
    # topk's order among equal values is unspecified: re-sort its k winners by column, then by value.
    idx_sorted, perm = torch.sort(idx, dim=1)
    order = torch.sort(vals.gather(1, perm), dim=1, descending=True, stable=True).indices
    top = idx_sorted.gather(1, order)
    # A tie at the k-th value may have left out a column that comes earlier in gallery order.
    boundary_tie = torch.count_nonzero(sims >= vals[:, -1:], dim=1) > k
    if boundary_tie.any():
        top[boundary_tie] = torch.sort(sims[boundary_tie], dim=1, descending=True, stable=True).indices[:, :k]
    return top


def _rank_members(sims: torch.Tensor, member_idx: np.ndarray, names: Sequence[str]) -> list[list[str]]:
    """Order each row's members by the same similarities as the global ranking (-1 = padding)."""
    idx = torch.from_numpy(member_idx).to(sims.device)
    valid = idx >= 0
    vals = sims.gather(1, idx.clamp(min=0)).masked_fill(~valid, float("-inf"))
    # member_idx rows are sorted ascending, so a stable sort keeps gallery order on ties.
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    ranked = idx.gather(1, order).cpu().numpy()
    return [[names[j] for j in row if j >= 0] for row in ranked]


def _check_targets_present(targets: Sequence[str | None]) -> None:
    for i, t in enumerate(targets):
        if not isinstance(t, str):
            raise EvalInputError(f"query {i} has no target (test split?): recall cannot be computed")


def _check_targets_in_gallery(
    targets: Sequence[str | None], references: Sequence[str], index: Mapping[str, int], n_query: int
) -> None:
    if len(targets) != n_query:
        raise EvalInputError(f"cirr_rankings: {len(targets)} targets for {n_query} queries")
    for i, (t, ref) in enumerate(zip(targets, references, strict=True)):
        if not isinstance(t, str):
            continue
        if t not in index:
            raise EvalInputError(f"query {i} (reference {ref!r}): target {t!r} is not in the gallery")
        if t == ref:
            raise EvalInputError(f"query {i}: target {t!r} equals the reference, which the ranking removes")


def _target_positions(ranked: Sequence[Sequence[str]], targets: Sequence[str | None]) -> np.ndarray:
    """0-based position of each target in its ranking, -1 when absent."""
    positions = np.full(len(targets), -1, dtype=np.int64)
    for i, (row, t) in enumerate(zip(ranked, targets, strict=True)):
        for pos, name in enumerate(row):
            if name == t:
                positions[i] = pos
                break
    return positions
