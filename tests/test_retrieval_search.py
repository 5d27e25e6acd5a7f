"""Exact search, FAISS indexes and recall: against brute force and the evaluate stage's ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detailfusion.eval import metrics
from detailfusion.retrieval import search
from detailfusion.retrieval.faiss_index import build_index, recall_at_k
from detailfusion.retrieval.search import SearchError, exact_search


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _tied(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    """Unit vectors with four entries of +-0.5: every dot product is exact and ties abound."""
    x = np.zeros((n, d), dtype=np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


def _brute_force(q: np.ndarray, g: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Full similarity matrix in float64, ordered by (score desc, index asc) with a lexsort."""
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    if exclude is not None:
        rows = np.nonzero(exclude >= 0)[0]
        sims[rows, exclude[rows]] = -np.inf
    cols = np.arange(g.shape[0])
    idx = np.stack([np.lexsort((cols, -row))[:k] for row in sims])
    return np.take_along_axis(sims, idx, axis=1), idx


@pytest.fixture
def small_blocks(monkeypatch):
    """Gallery blocks of 6 groups of 4 rows, so the group filter and the merge run many times."""
    monkeypatch.setattr(search, "_GROUP", 4)
    monkeypatch.setattr(search, "_CPU_BLOCK_ELEMENTS", 24 * 13)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_exact_search_matches_brute_force_on_ties(small_blocks, k):
    rng = np.random.default_rng(0)
    q, g = _tied(rng, 50), _tied(rng, 300)
    scores, idx = exact_search(q, g, k, batch_size=13)
    ref_scores, ref_idx = _brute_force(q, g, k)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (50, k)


def test_exact_search_matches_brute_force_on_random_features(small_blocks):
    rng = np.random.default_rng(1)
    q, g = _unit(rng, 64, 32), _unit(rng, 500, 32)
    scores, idx = exact_search(q, g, 20, batch_size=17)
    ref_scores, ref_idx = _brute_force(q, g, 20)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("make", [_unit, _tied], ids=["random", "tied"])
def test_exact_search_equals_evaluate_ranking(small_blocks, make):
    rng = np.random.default_rng(2)
    d = 16
    q = torch.nn.functional.normalize(torch.from_numpy(make(rng, 40, d)), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(make(rng, 250, d)), dim=1)
    _, idx = exact_search(q, g, 50, batch_size=9)
    np.testing.assert_array_equal(idx, metrics.rank_gallery(q, g, k=50))


def test_cirr_exclusion_equals_evaluate_ranking(small_blocks):
    rng = np.random.default_rng(3)
    g = _tied(rng, 120)
    ref = rng.integers(0, 120, 30)
    q = g[ref].copy()
    q[::2] = _tied(rng, 15)  # half the queries equal their reference: it must not come back
    names = [f"img{i}" for i in range(120)]
    ranked, _ = metrics.cirr_rankings(q, g, names, [names[r] for r in ref], [[] for _ in ref], top_k=50)
    _, idx = exact_search(q, g, 50, exclude=ref, batch_size=8)
    assert [[names[j] for j in row] for row in idx] == ranked
    assert not (idx == ref[:, None]).any()


def test_exclude_minus_one_and_k_clamped():
    rng = np.random.default_rng(4)
    q, g = _unit(rng, 3, 8), _unit(rng, 6, 8)
    exclude = np.array([-1, 2, 5])
    scores, idx = exact_search(q, g, 100, exclude=exclude)
    assert idx.shape == (3, 5)  # n - 1: one gallery row is excluded for some queries
    _, ref_idx = _brute_force(q, g, 5, exclude)
    np.testing.assert_array_equal(idx, ref_idx)
    assert np.isfinite(scores).all()
    _, idx_all = exact_search(q, g, 100)
    assert idx_all.shape == (3, 6)
    np.testing.assert_array_equal(np.sort(idx_all, axis=1), np.tile(np.arange(6), (3, 1)))


def test_torch_inputs_and_float64():
    rng = np.random.default_rng(5)
    q, g = _unit(rng, 10, 24), _unit(rng, 90, 24)
    s32, i32 = exact_search(torch.from_numpy(q), torch.from_numpy(g), 7)
    s64, i64 = exact_search(q.astype(np.float64), g.astype(np.float64), 7)
    np.testing.assert_array_equal(i32, i64)
    np.testing.assert_allclose(s32, s64, atol=1e-5)
    np.testing.assert_array_equal(i64, metrics.rank_gallery(q.astype(np.float64), g.astype(np.float64), k=7))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": np.ones((2, 8)), "gallery": np.ones((5, 4))}, "dimension mismatch: queries have dim 8"),
        ({"gallery": np.zeros((0, 4))}, "the gallery is empty"),
        ({"gallery": np.array([[1.0, 0, 0, 0], [np.nan, 0, 0, 0]])}, "gallery: row 1 contains NaN or inf"),
        ({"queries": np.array([[np.inf, 0, 0, 0]])}, "queries: row 0 contains NaN or inf"),
        ({"queries": np.ones(4)}, "queries: expected a 2-D array"),
        ({"k": 0}, "k must be a positive integer"),
        ({"exclude": np.array([7])}, "exclude: query 0 names gallery index 7, outside [-1, 2]"),
        ({"exclude": np.array([0, 1])}, "exclude: expected one gallery index per query (1)"),
        ({"dtype": "fp16"}, "needs a CUDA device"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"gallery": np.ones((1, 4)), "exclude": np.array([0])}, "nothing left to rank"),
    ],
)
def test_exact_search_rejects_bad_input(kwargs, message):
    args = {"queries": np.ones((1, 4)), "gallery": np.eye(3, 4), "k": 2} | kwargs
    with pytest.raises(SearchError) as err:
        exact_search(**args)
    assert message in str(err.value)


def _clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int) -> np.ndarray:
    centres = _unit(rng, n_clusters, d)
    x = centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_equals_exact_search():
    rng = np.random.default_rng(6)
    g = _clustered(rng, 2000, 32, 20)
    q = _clustered(rng, 50, 32, 20)
    exact_s, exact_i = exact_search(q, g, 10)
    s, i = build_index(g, "flat").search(q, 10)
    np.testing.assert_array_equal(i, exact_i)
    np.testing.assert_allclose(s, exact_s, atol=1e-5)
    ref = rng.integers(0, 2000, 50)
    _, i_ex = build_index(g, "flat").search(q, 10, exclude=ref)
    np.testing.assert_array_equal(i_ex, exact_search(q, g, 10, exclude=ref)[1])


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_ivf_indexes_are_exact_when_probing_everything(kind):
    rng = np.random.default_rng(7)
    g = _clustered(rng, 3000, 32, 30)
    q = _clustered(rng, 40, 32, 30)
    index = build_index(g, kind, nlist=16, pq_m=8, nbits=4, train_size=1000, seed=1)
    _, exact_i = exact_search(q, g, 10)
    # Every list probed and (IVF-PQ) every row re-ranked exactly: the exact top-10.
    _, i = index.search(q, 10, nprobe=16, rerank=3000)
    np.testing.assert_array_equal(i, exact_i)
    assert recall_at_k(i, exact_i, 10) == 1.0


def test_ivf_pq_recall_on_clustered_data_and_rerank_helps():
    rng = np.random.default_rng(8)
    g = _clustered(rng, 5000, 32, 40)
    q = g[rng.choice(5000, 100, replace=False)] + 0.05 * rng.standard_normal((100, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = build_index(g, "ivf_pq", nlist=32, pq_m=8, nbits=5, seed=0)
    _, exact_i = exact_search(q, g, 10)
    r_plain = recall_at_k(index.search(q, 10, nprobe=8, rerank=10)[1], exact_i, 10)
    r_rerank = recall_at_k(index.search(q, 10, nprobe=8, rerank=200)[1], exact_i, 10)
    assert r_rerank > r_plain
    assert r_rerank >= 0.9


def test_build_index_rejects_bad_settings():
    g = _unit(np.random.default_rng(9), 500, 16)
    with pytest.raises(SearchError, match="unknown index kind 'hnsw'"):
        build_index(g, "hnsw")
    with pytest.raises(SearchError, match="pq_m=5 must be a positive divisor of the dimension 16"):
        build_index(g, "ivf_pq", nlist=4, pq_m=5)
    with pytest.raises(SearchError, match="nlist must be in"):
        build_index(g, "ivf_flat", nlist=501)
    with pytest.raises(SearchError, match="train_size must be in"):
        build_index(g, "ivf_flat", nlist=10, train_size=5)
    with pytest.raises(SearchError, match="the gallery is empty"):
        build_index(np.zeros((0, 16), np.float32), "flat")
    index = build_index(g, "ivf_flat", nlist=4)
    with pytest.raises(SearchError, match="dimension mismatch"):
        index.search(np.ones((2, 8), np.float32), 5)
    with pytest.raises(SearchError, match="nprobe must be >= 1"):
        index.search(g[:2], 5, nprobe=0)


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[2, 0, 9], [-1, -1, -1]])
    assert recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.0)
    assert recall_at_k(exact, exact, 2) == 1.0
    # tie-aware with scores: gallery items 7 and 9 have the same score at the k-th place
    ex_i, ex_s = np.array([[3, 7]]), np.array([[0.9, 0.5]])
    ap_i, ap_s = np.array([[3, 9]]), np.array([[0.9, 0.5 - 1e-7]])
    assert recall_at_k(ap_i, ex_i, 2) == pytest.approx(0.5)
    assert recall_at_k(ap_i, ex_i, 2, approx_scores=ap_s, exact_scores=ex_s) == 1.0
    worse = np.array([[0.9, 0.4]])  # a genuinely lower score is a miss
    assert recall_at_k(ap_i, ex_i, 2, approx_scores=worse, exact_scores=ex_s) == pytest.approx(0.5)
    with pytest.raises(SearchError, match="k=4 must be in"):
        recall_at_k(approx, exact, 4)
