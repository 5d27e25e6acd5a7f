"""FAISS indexes over a gallery behind the ``(scores, indices)`` result of exact search.

:func:`build_index` wraps FAISS ``IndexFlatIP``, IVF-Flat and IVF-PQ (trained on a sample; IVF-PQ
candidates re-ranked by their exact inner product); :meth:`SearchIndex.search` keeps the order,
tie rule and ``exclude`` of :func:`detailfusion.retrieval.search.exact_search`, and
:func:`recall_at_k` measures an approximate index against exact search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from detailfusion.retrieval.search import (
    Array,
    SearchError,
    as_matrix,
    check_finite,
    check_pair,
    clamp_k,
    exclusions,
    lex_order,
)

INDEX_KINDS: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq")


@dataclass
class SearchIndex:
    """A FAISS index over a gallery plus the float32 gallery kept for exact re-ranking."""

    kind: str
    index: object
    gallery: np.ndarray = field(repr=False)
    nlist: int | None = None
    pq_m: int | None = None
    nbits: int | None = None
    train_size: int | None = None

    @property
    def ntotal(self) -> int:
        return int(self.gallery.shape[0])

    def search(
        self,
        queries: Array,
        k: int,
        *,
        nprobe: int | None = None,
        rerank: int | None = None,
        exclude: Array | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` like :func:`exact_search` (same order and tie rule, same ``exclude``).

        ``nprobe`` (IVF kinds, default 8) is the number of inverted lists visited per query.
        ``rerank`` (IVF-PQ, default ``10 * k``) is the number of PQ candidates re-scored with their
        exact inner product before the top ``k`` is kept. An approximate index can find fewer
        than ``k`` rows for a query; missing places hold index ``-1`` and score ``-inf``.
        """
        q = as_matrix(queries, "queries").to(torch.float32)
        check_pair(q, torch.from_numpy(self.gallery[:1]))
        n_query = q.shape[0]
        excl = exclusions(exclude, n_query, self.ntotal)
        k = clamp_k(k, self.ntotal, excl)
        if self.kind != "flat":
            probe = 8 if nprobe is None else int(nprobe)
            if probe < 1:
                raise SearchError(f"SearchIndex.search: nprobe must be >= 1, got {probe}")
            faiss_ivf(self.index).nprobe = min(probe, self.nlist)
        wanted = k
        if self.kind == "ivf_pq":
            wanted = max(k, 10 * k if rerank is None else int(rerank))
        wanted = min(wanted + (excl is not None), self.ntotal)
        qn = np.ascontiguousarray(q.numpy())
        cand_v, cand_i = self.index.search(qn, wanted)
        if self.kind == "ivf_pq":
            cand_v = _exact_scores(qn, self.gallery, cand_i)
        cand_v = torch.from_numpy(np.asarray(cand_v, dtype=np.float32))
        cand_i = torch.from_numpy(np.asarray(cand_i, dtype=np.int64))
        missing = cand_i < 0
        if excl is not None:
            missing |= cand_i == excl[:, None]
        cand_v = cand_v.masked_fill(missing, float("-inf"))
        # Missing rows sort last: index n_gallery beats no real index on ties at -inf.
        cand_i = cand_i.masked_fill(missing, self.ntotal)
        vals, idx = lex_order(cand_v, cand_i)
        vals, idx = vals[:, :k], idx[:, :k]
        idx = idx.masked_fill(idx == self.ntotal, -1)
        return vals.numpy().astype(np.float32, copy=False), idx.numpy().astype(np.int64, copy=False)


def build_index(
    gallery: Array,
    kind: str = "flat",
    *,
    nlist: int | None = None,
    pq_m: int | None = None,
    nbits: int = 8,
    train_size: int | None = None,
    seed: int = 0,
) -> SearchIndex:
    """Build a FAISS inner-product index of ``kind`` ``flat``, ``ivf_flat`` or ``ivf_pq``.

    IVF kinds cluster the gallery into ``nlist`` lists (default ``4 * sqrt(n)``, at most ``n / 39``)
    with k-means on ``train_size`` rows sampled with ``seed`` (default ``64 * nlist``, at least
    the ``2**nbits * 39`` rows PQ needs, at most ``n``). IVF-PQ stores ``pq_m`` sub-quantizer codes
    of ``nbits`` bits per vector (``pq_m`` must divide the dimension; default ``d / 4``); with
    ``nbits=4`` it is FAISS's fast-scan variant (``PQ<m>x4fs``), much quicker to train and scan.
    """
    import faiss

    if kind not in INDEX_KINDS:
        raise SearchError(f"build_index: unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    g = as_matrix(gallery, "gallery").to(torch.float32)
    if g.shape[0] == 0:
        raise SearchError("build_index: the gallery is empty")
    check_finite(g, "gallery")
    xb = np.ascontiguousarray(g.numpy())
    n, d = xb.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        return SearchIndex(kind, index, xb)

    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39)) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise SearchError(f"build_index: nlist must be in [1, {n}] (gallery size), got {nlist}")
    spec = f"IVF{nlist},Flat"
    if kind == "ivf_pq":
        pq_m = max(1, d // 4) if pq_m is None else int(pq_m)
        if pq_m < 1 or d % pq_m:
            raise SearchError(f"build_index: pq_m={pq_m} must be a positive divisor of the dimension {d}")
        if not 1 <= nbits <= 16:
            raise SearchError(f"build_index: nbits must be in [1, 16], got {nbits}")
        spec = f"IVF{nlist},PQ{pq_m}x{nbits}"
        if nbits == 4:
            # 4-bit codes use FAISS's SIMD fast-scan layout: ~16x cheaper PQ training, faster scans.
            if pq_m % 2:
                raise SearchError(f"build_index: 4-bit (fast-scan) IVF-PQ needs an even pq_m, got {pq_m}")
            spec += "fs"
    need = nlist if kind == "ivf_flat" else max(nlist, 2**nbits)
    if train_size is None:
        train_size = min(n, max(64 * nlist, 39 * 2**nbits if kind == "ivf_pq" else 0))
    if not need <= train_size <= n:
        raise SearchError(f"build_index: train_size must be in [{need}, {n}] for {spec}, got {train_size}")
    rng = np.random.default_rng(seed)
    sample = xb[np.sort(rng.choice(n, size=train_size, replace=False))]
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    faiss_ivf(index).cp.seed = seed
    if kind == "ivf_pq":
        index.pq.cp.seed = seed
    index.train(sample)
    index.add(xb)
    return SearchIndex(kind, index, xb, nlist=nlist, pq_m=pq_m, nbits=nbits if kind == "ivf_pq" else None,
                       train_size=train_size)


def _exact_scores(queries: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner product of each query with its candidate rows (``-1`` ids score ``-inf``)."""
    chunk = max(1, (1 << 22) // max(1, ids.shape[1] * gallery.shape[1]))  # ~16 MB of gathered rows
    q = torch.from_numpy(queries)
    g = torch.from_numpy(gallery)
    idx = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    out = torch.empty(idx.shape, dtype=torch.float32)
    for s in range(0, q.shape[0], chunk):
        rows = idx[s : s + chunk]
        cand = g[rows.clamp(min=0)]
        out[s : s + chunk] = torch.bmm(cand, q[s : s + chunk, :, None]).squeeze(2).masked_fill(rows < 0, float("-inf"))
    return out.numpy()


def recall_at_k(approx_idx: Array, exact_idx: Array, k: int, *, approx_scores: Array | None = None,
                exact_scores: Array | None = None, tie_tol: float = 1e-5) -> float:
    """Mean fraction of each query's exact top-``k`` found in its approximate top-``k``.

    Index ``-1`` (no result) never counts as found; a query whose exact list is shorter than
    ``k`` is scored against the entries it has. With both score arrays, recall is tie-aware: an
    approximate result that is not in the exact list still counts when its score is within
    ``tie_tol`` of the exact ``k``-th score (two galleries items with the same score, or scores that
    differ only by the summation order of two libraries, may come in either order).
    """
    a = np.asarray(approx_idx)
    e = np.asarray(exact_idx)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise SearchError(f"recall_at_k: index arrays must be 2-D with the same rows, got {a.shape} and {e.shape}")
    if k < 1 or k > e.shape[1] or k > a.shape[1]:
        raise SearchError(f"recall_at_k: k={k} must be in [1, {min(a.shape[1], e.shape[1])}]")
    if a.shape[0] == 0:
        raise SearchError("recall_at_k: no queries")
    a, e = a[:, :k], e[:, :k]
    wanted = np.maximum((e >= 0).sum(axis=1), 1)
    if approx_scores is None or exact_scores is None:
        found = (e[:, :, None] == a[:, None, :]).any(axis=2) & (e >= 0)
        return float(np.mean(found.sum(axis=1) / wanted))
    sa, se = np.asarray(approx_scores)[:, :k], np.asarray(exact_scores)[:, :k]
    in_exact = (a[:, :, None] == e[:, None, :]).any(axis=2)
    kth = np.where(e >= 0, se, np.inf).min(axis=1, keepdims=True)
    hits = ((in_exact | (sa >= kth - tie_tol)) & (a >= 0)).sum(axis=1)
    return float(np.mean(np.minimum(hits, wanted) / wanted))


def faiss_ivf(index: object) -> object:
    """The inverted-file part of a FAISS index (where ``nprobe`` and the k-means seed live)."""
    import faiss

    return faiss.extract_index_ivf(index)
