"""The job's search step: exact search (``retrieval/search.py``) or a FAISS index (``faiss_index.py``).

Both drop each query's excluded gallery row (the CIRR protocol: the reference). For an
approximate index, recall@k against exact search is measured on a seeded sample of queries and
goes into the run summary.
"""

from __future__ import annotations

import numpy as np


def run_search(queries: np.ndarray, gallery: np.ndarray, cfg, exclude: np.ndarray | None):
    """``(scores [nq, k], indices [nq, k] into gallery rows (-1 = none), index info for the summary)``."""
    from detailfusion.retrieval.faiss_index import build_index, recall_at_k
    from detailfusion.retrieval.search import exact_search

    n_gallery = gallery.shape[0]
    k = max(1, min(cfg.top_k, n_gallery - (1 if exclude is not None else 0)))
    info: dict = {"kind": cfg.index, "k": k}
    if len(queries) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), info
    if cfg.index == "exact":
        dtype = None if cfg.search_dtype in (None, "fp32") else cfg.search_dtype
        scores, idx = exact_search(queries, gallery, k, device=cfg.device, dtype=dtype, exclude=exclude)
        return np.asarray(scores), np.asarray(idx), info
    index = build_index(gallery, cfg.index, nlist=cfg.nlist, pq_m=cfg.pq_m, seed=cfg.seed)
    scores, idx = index.search(queries, k, nprobe=cfg.nprobe, exclude=exclude)
    info.update(nprobe=cfg.nprobe, nlist=index.nlist, pq_m=index.pq_m)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(len(queries), size=min(cfg.recall_sample, len(queries)), replace=False))
    ex = None if exclude is None else exclude[sample]
    exact_scores, exact_idx = exact_search(queries[sample], gallery, k, device=cfg.device, exclude=ex)
    info["recall_sample"] = int(len(sample))
    info["recall_at_k_vs_exact"] = float(recall_at_k(idx[sample], np.asarray(exact_idx), k,
                                                     approx_scores=scores[sample],
                                                     exact_scores=np.asarray(exact_scores)))
    return scores, idx, info
