"""Nearest-neighbour search over L2-normalised embeddings: exact (torch) and FAISS indexes.

:func:`exact_search` is a blocked matrix product with a running top-k: the gallery is visited in
blocks, each block's similarities are filtered by group maxima against the running k-th score,
reduced to their top ``k`` and merged into the running list. The order is (score descending, gallery index
ascending), the evaluate stage's ranking (:func:`detailfusion.eval.metrics.rank_gallery`), so ties
are deterministic. :func:`build_index` wraps FAISS ``IndexFlatIP``, IVF-Flat and IVF-PQ (trained
on a sample; IVF-PQ candidates re-ranked by their exact inner product) behind the same
``(scores, indices)`` result, and :func:`recall_at_k` measures an approximate index against exact
search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from detailfusion.errors import DetailFusionError

INDEX_KINDS: tuple[str, ...] = ("flat", "ivf_flat", "ivf_pq")
# Similarity entries per (query chunk x gallery block) product on CPU: 8M float32 = 32 MB. On CPU
# few queries against long gallery blocks measured fastest (fewer, better-filtered blocks).
_CPU_BLOCK_ELEMENTS = 1 << 23
_CPU_QUERY_ROWS = 256
_GPU_BLOCK_ELEMENTS = 1 << 28
# Columns per group in the group-maximum filter of the running top-k.
_GROUP = 32
_HALF_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}

Array = np.ndarray | torch.Tensor


class SearchError(DetailFusionError, ValueError):
    """Search inputs are unusable (shape, dimension, non-finite values, empty gallery, bad k...)."""


def exact_search(
    queries: Array,
    gallery: Array,
    k: int,
    *,
    batch_size: int = 4096,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    exclude: Array | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery rows of each query by inner product (cosine for normalised inputs).

    ``queries`` (``[nq, d]``) and ``gallery`` (``[n, d]``) are numpy arrays or torch tensors.
    ``batch_size`` queries (on CPU at most 256) are scored at a time against gallery blocks sized
    to keep the similarity block near 32 MB on CPU (1 GB on CUDA). ``dtype`` ``fp16``/``bf16`` computes on CUDA in half
    precision (scores are returned as float32); CPU computes in float32 (float64 inputs stay
    float64). ``exclude[i]`` is a gallery index dropped from query ``i``'s ranking (``-1``: none),
    the CIRR protocol's reference removal. ``k`` larger than the rankable gallery is clamped to
    ``n`` (``n - 1`` when anything is excluded), as ``rank_gallery`` does.

    Returns ``(scores float32 [nq, k], indices int64 [nq, k])``, best first, ties broken by the
    lower gallery index.
    """
    dev = _device(device)
    compute = _compute_dtype(dtype, dev, queries, gallery)
    q = _as_matrix(queries, "queries")
    g = _as_matrix(gallery, "gallery")
    _check_pair(q, g)
    if batch_size < 1:
        raise SearchError(f"exact_search: batch_size must be >= 1, got {batch_size}")
    n_query, n_gallery = q.shape[0], g.shape[0]
    excl = _exclusions(exclude, n_query, n_gallery)
    k = _clamp_k(k, n_gallery, excl)

    q = q.to(device=dev, dtype=compute)
    g = g.to(device=dev, dtype=compute)
    budget = _GPU_BLOCK_ELEMENTS if dev.type == "cuda" else _CPU_BLOCK_ELEMENTS
    scores = np.empty((n_query, k), dtype=np.float32)
    indices = np.empty((n_query, k), dtype=np.int64)
    step = batch_size if dev.type == "cuda" else min(batch_size, _CPU_QUERY_ROWS)
    for start in range(0, n_query, step):
        stop = min(start + step, n_query)
        rows_excl = None if excl is None else excl[start:stop].to(dev)
        block = max(_GROUP, min(budget // (stop - start), n_gallery) // _GROUP * _GROUP)
        vals, idx = _search_chunk(q[start:stop], g, k, block, rows_excl)
        scores[start:stop] = vals.float().cpu().numpy()
        indices[start:stop] = idx.cpu().numpy()
    return scores, indices


def _search_chunk(
    q: torch.Tensor, g: torch.Tensor, k: int, block: int, excl: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k of one query chunk over gallery blocks of ``block`` rows (a multiple of the group).

    Each block's similarities are cut into groups of :data:`_GROUP` columns. Only groups whose
    maximum beats the running k-th score can contribute, and at most the ``k`` groups with the
    largest maxima: those are gathered and reduced exactly, so the costly top-k runs on a few
    hundred columns per row instead of the whole block.
    """
    n_query, n_gallery = q.shape[0], g.shape[0]
    top_v = torch.full((n_query, k), float("-inf"), dtype=q.dtype, device=q.device)
    # Placeholder entries carry index n_gallery so that every real row wins a tie against them.
    top_i = torch.full((n_query, k), n_gallery, dtype=torch.int64, device=q.device)
    offsets = torch.arange(_GROUP, device=q.device)
    buffer = torch.empty((n_query, block), dtype=q.dtype, device=q.device)
    for b0 in range(0, n_gallery, block):
        b1 = min(b0 + block, n_gallery)
        width = b1 - b0
        if width == block:
            sims = torch.mm(q, g[b0:b1].T, out=buffer)
        else:
            padded = -(-width // _GROUP) * _GROUP
            sims = torch.full((n_query, padded), float("-inf"), dtype=q.dtype, device=q.device)
            sims[:, :width] = q @ g[b0:b1].T
        if excl is not None:
            hit = (excl >= b0) & (excl < b1)
            if bool(hit.any()):
                rows = torch.nonzero(hit).squeeze(1)
                sims[rows, excl[rows] - b0] = float("-inf")
        n_groups = sims.shape[1] // _GROUP
        grouped = sims.view(n_query, n_groups, _GROUP)
        group_max = grouped.amax(dim=2)
        # Later blocks hold higher indices, so a score equal to the running k-th one never enters.
        threshold = top_v[:, -1:]
        live = int((group_max > threshold).sum(dim=1).max())
        if live == 0:
            continue
        kg = min(k, n_groups, live)
        gv, gi = torch.topk(group_max, kg, dim=1, sorted=False)
        gi = torch.sort(gi, dim=1).values  # gathered columns then run in gallery order
        cand = grouped.gather(1, gi[:, :, None].expand(-1, -1, _GROUP)).reshape(n_query, kg * _GROUP)
        cand_idx = (gi[:, :, None] * _GROUP + offsets).reshape(n_query, kg * _GROUP)
        bv, local = _block_top_k(cand, min(k, kg * _GROUP))
        bi = cand_idx.gather(1, local) + b0
        if kg == k < n_groups:
            _fix_group_ties(sims[:, :width], group_max, gv, threshold, bv, bi, b0)
        top_v, top_i = _merge(top_v, top_i, bv, bi, k)
    return top_v, top_i


def _fix_group_ties(
    sims: torch.Tensor, group_max: torch.Tensor, gv: torch.Tensor, threshold: torch.Tensor,
    bv: torch.Tensor, bi: torch.Tensor, b0: int,
) -> None:
    """Rows where a group left out ties the k-th chosen group's maximum: rank the whole block row.

    Only exact ties get here (the left-out group may hold an equal score at a lower index).
    """
    kth = gv.min(dim=1, keepdim=True).values
    crossing = (torch.count_nonzero(group_max >= kth, dim=1) > gv.shape[1]) & (kth[:, 0] > threshold[:, 0])
    if bool(crossing.any()):
        rows = torch.nonzero(crossing).squeeze(1)
        order = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        width = bv.shape[1]
        bv[rows] = order.values[:, :width]
        bi[rows] = order.indices[:, :width] + b0


def _block_top_k(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of each row ordered by (value desc, column asc), exact on ties at the k-th value."""
    if k >= sims.shape[1]:
        order = torch.sort(sims, dim=1, descending=True, stable=True)
        return order.values, order.indices
    vals, idx = torch.topk(sims, k, dim=1, sorted=False)
    # topk picks arbitrarily among values equal to the k-th: redo rows where a tie crosses the cut.
    kth = vals.min(dim=1, keepdim=True).values
    crossing = torch.count_nonzero(sims >= kth, dim=1) > k
    if bool(crossing.any()):
        rows = torch.nonzero(crossing).squeeze(1)
        order = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = order.values[:, :k], order.indices[:, :k]
    return _lex_order(vals, idx)


def _lex_order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row by (value desc, index asc)."""
    idx_sorted, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx_sorted.gather(1, order)


def _merge(
    av: torch.Tensor, ai: torch.Tensor, bv: torch.Tensor, bi: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of two row-wise candidate lists (disjoint indices) by (value desc, index asc)."""
    vals, idx = _lex_order(torch.cat([av, bv], dim=1), torch.cat([ai, bi], dim=1))
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


# ---------------------------------------------------------------------------------------------
# FAISS indexes


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
        q = _as_matrix(queries, "queries").to(torch.float32)
        _check_pair(q, torch.from_numpy(self.gallery[:1]))
        n_query = q.shape[0]
        excl = _exclusions(exclude, n_query, self.ntotal)
        k = _clamp_k(k, self.ntotal, excl)
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
        vals, idx = _lex_order(cand_v, cand_i)
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
    g = _as_matrix(gallery, "gallery").to(torch.float32)
    if g.shape[0] == 0:
        raise SearchError("build_index: the gallery is empty")
    _check_finite(g, "gallery")
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


# ---------------------------------------------------------------------------------------------
# Input checks


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SearchError(f"exact_search: unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SearchError(f"exact_search: device {device!r} requested but CUDA is not available")
    return dev


def _compute_dtype(dtype: str | torch.dtype | None, dev: torch.device, *arrays: Array) -> torch.dtype:
    if dtype is None:
        wide = any(a.dtype == (torch.float64 if isinstance(a, torch.Tensor) else np.float64) for a in arrays)
        return torch.float64 if wide else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower()
        resolved = _HALF_DTYPES.get(key) or {"fp32": torch.float32, "float32": torch.float32}.get(key)
        if resolved is None:
            raise SearchError(f"exact_search: unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        dtype = resolved
    if dtype in (torch.float16, torch.bfloat16) and dev.type != "cuda":
        raise SearchError(f"exact_search: dtype {dtype} needs a CUDA device (got {dev}); use fp32 on CPU")
    return dtype


def _as_matrix(x: Array, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise SearchError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != 2:
        raise SearchError(f"{what}: expected a 2-D array (rows, dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _check_finite(t: torch.Tensor, what: str, rows: int = 1 << 16) -> None:
    # In row blocks: isfinite over a whole 1M x 256 gallery allocates ~1.7 GB of temporaries.
    for start in range(0, t.shape[0], rows):
        bad = ~torch.isfinite(t[start : start + rows]).all(dim=1)
        if bool(bad.any()):
            row = start + int(torch.nonzero(bad)[0])
            raise SearchError(f"{what}: row {row} contains NaN or inf")


def _check_pair(q: torch.Tensor, g: torch.Tensor) -> None:
    if g.shape[0] == 0:
        raise SearchError("the gallery is empty: nothing to search")
    if q.shape[1] != g.shape[1]:
        raise SearchError(f"dimension mismatch: queries have dim {q.shape[1]}, gallery has dim {g.shape[1]}")
    _check_finite(q, "queries")
    _check_finite(g, "gallery")


def _exclusions(exclude: Array | None, n_query: int, n_gallery: int) -> torch.Tensor | None:
    if exclude is None:
        return None
    ex = torch.as_tensor(np.asarray(exclude.cpu() if isinstance(exclude, torch.Tensor) else exclude))
    if ex.ndim != 1 or ex.shape[0] != n_query:
        raise SearchError(f"exclude: expected one gallery index per query ({n_query}), got shape {tuple(ex.shape)}")
    if ex.dtype.is_floating_point or ex.dtype == torch.bool:
        raise SearchError(f"exclude: expected integer gallery indices, got dtype {ex.dtype}")
    ex = ex.to(torch.int64)
    bad = (ex < -1) | (ex >= n_gallery)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise SearchError(f"exclude: query {i} names gallery index {int(ex[i])}, outside [-1, {n_gallery - 1}]")
    return ex if bool((ex >= 0).any()) else None


def _clamp_k(k: int, n_gallery: int, excl: torch.Tensor | None) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    rankable = n_gallery - (1 if excl is not None else 0)
    if rankable < 1:
        raise SearchError("the gallery holds only the excluded item: nothing left to rank")
    return min(int(k), rankable)
