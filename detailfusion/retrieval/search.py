"""Exact nearest-neighbour search over L2-normalised embeddings (torch), and its input checks.

:func:`exact_search` is a blocked matrix product with a running top-k: the gallery is visited in
blocks, each block's similarities are filtered by group maxima against the running k-th score,
reduced to their top ``k`` and merged into the running list. The order is (score descending, gallery index
ascending), the evaluate stage's ranking (:func:`detailfusion.eval.metrics.rank_gallery`), so ties
are deterministic. The FAISS indexes (:mod:`detailfusion.retrieval.faiss_index`) return the same
``(scores, indices)`` result and share the input checks and the ordering (:func:`lex_order`) here.
"""

from __future__ import annotations

import numpy as np
import torch

from detailfusion.errors import DetailFusionError

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
    q = as_matrix(queries, "queries")
    g = as_matrix(gallery, "gallery")
    check_pair(q, g)
    if batch_size < 1:
        raise SearchError(f"exact_search: batch_size must be >= 1, got {batch_size}")
    n_query, n_gallery = q.shape[0], g.shape[0]
    excl = exclusions(exclude, n_query, n_gallery)
    k = clamp_k(k, n_gallery, excl)

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
    return lex_order(vals, idx)


def lex_order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row by (value desc, index asc)."""
    idx_sorted, perm = torch.sort(idx, dim=1)
    vals = vals.gather(1, perm)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), idx_sorted.gather(1, order)


def _merge(
    av: torch.Tensor, ai: torch.Tensor, bv: torch.Tensor, bi: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` of two row-wise candidate lists (disjoint indices) by (value desc, index asc)."""
    vals, idx = lex_order(torch.cat([av, bv], dim=1), torch.cat([ai, bi], dim=1))
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


# ---------------------------------------------------------------------------------------------
# Input checks (shared with detailfusion.retrieval.faiss_index)


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


def as_matrix(x: Array, what: str) -> torch.Tensor:
    """A 2-D numeric array or tensor as a detached floating-point tensor (integers become float32)."""
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


def check_finite(t: torch.Tensor, what: str, rows: int = 1 << 16) -> None:
    """Raise :class:`SearchError` naming the first row of ``t`` that holds NaN or inf."""
    # In row blocks: isfinite over a whole 1M x 256 gallery allocates ~1.7 GB of temporaries.
    for start in range(0, t.shape[0], rows):
        bad = ~torch.isfinite(t[start : start + rows]).all(dim=1)
        if bool(bad.any()):
            row = start + int(torch.nonzero(bad)[0])
            raise SearchError(f"{what}: row {row} contains NaN or inf")


def check_pair(q: torch.Tensor, g: torch.Tensor) -> None:
    """Queries and gallery are searchable together: non-empty gallery, same dimension, finite."""
    if g.shape[0] == 0:
        raise SearchError("the gallery is empty: nothing to search")
    if q.shape[1] != g.shape[1]:
        raise SearchError(f"dimension mismatch: queries have dim {q.shape[1]}, gallery has dim {g.shape[1]}")
    check_finite(q, "queries")
    check_finite(g, "gallery")


def exclusions(exclude: Array | None, n_query: int, n_gallery: int) -> torch.Tensor | None:
    """``exclude`` checked as one gallery index (or -1) per query; ``None`` when nothing is excluded."""
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


def clamp_k(k: int, n_gallery: int, excl: torch.Tensor | None) -> int:
    """``k`` checked and clamped to the rankable gallery (one row fewer when anything is excluded)."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise SearchError(f"k must be a positive integer, got {k!r}")
    rankable = n_gallery - (1 if excl is not None else 0)
    if rankable < 1:
        raise SearchError("the gallery holds only the excluded item: nothing left to rank")
    return min(int(k), rankable)
