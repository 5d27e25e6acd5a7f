"""Retrieval metrics against slow brute-force references and hand-made cases with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detailfusion.eval.baselines import pixel_reference_baseline, reference_only_queries, text_only_queries
from detailfusion.eval.hit_stats import MULTI_EDIT_KEY, NO_EDIT_KEY, bootstrap_ci, breakdown_by
from detailfusion.eval.metrics import (
    EvalInputError,
    cirr_hits,
    cirr_metrics,
    cirr_rankings,
    fiq_hits,
    fiq_metrics,
    rank_gallery,
    recall_at_ks,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-annotations"


# ---------------------------------------------------------------- brute-force references


def brute_order(q: np.ndarray, gallery: np.ndarray) -> list[list[int]]:
    """Full gallery order per query: cosine by explicit loops, ties by gallery position."""
    orders = []
    for qv in q:
        qn = math.sqrt(sum(float(x) * float(x) for x in qv))
        sims = []
        for j, gv in enumerate(gallery):
            gn = math.sqrt(sum(float(x) * float(x) for x in gv))
            dot = sum(float(a) * float(b) for a, b in zip(qv, gv, strict=True))
            sims.append((-dot / (qn * gn), j))
        orders.append([j for _, j in sorted(sims)])
    return orders


def brute_cirr(q, gallery, names, refs, members, targets) -> dict[str, float]:
    counts = dict.fromkeys(["R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3"], 0)
    for order, ref, group, target in zip(brute_order(q, gallery), refs, members, targets, strict=True):
        ranked = [names[j] for j in order if names[j] != ref]
        subset = [n for n in ranked if n in group]
        for k in (1, 5, 10, 50):
            counts[f"R@{k}"] += target in ranked[:k]
        for k in (1, 2, 3):
            counts[f"Rsub@{k}"] += target in subset[:k]
    out = {key: 100.0 * v / len(targets) for key, v in counts.items()}
    out["Avg"] = (out["R@5"] + out["Rsub@1"]) / 2
    return out


def make_cirr_case(n_query: int, n_gallery: int, dim: int, seed: int, noise: float = 1.0):
    """Random gallery; each query = its target's feature + noise, members = reference, target + 4 others."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim))
    names = [f"img-{j:04d}" for j in range(n_gallery)]
    refs, targets, members = [], [], []
    for _ in range(n_query):
        pick = rng.choice(n_gallery, size=6, replace=False)
        refs.append(names[pick[0]])
        targets.append(names[pick[1]])
        group = [names[j] for j in pick]
        rng.shuffle(group)
        members.append(group)
    target_idx = [names.index(t) for t in targets]
    q = gallery[target_idx] + noise * rng.standard_normal((n_query, dim))
    return q, gallery, names, refs, members, targets


# ---------------------------------------------------------------- rank_gallery


@pytest.mark.parametrize("n_query,n_gallery,dim", [(1, 3, 2), (7, 20, 5), (40, 130, 16)])
def test_rank_gallery_matches_brute_force(n_query, n_gallery, dim):
    rng = np.random.default_rng(n_gallery)
    q = rng.standard_normal((n_query, dim))
    g = rng.standard_normal((n_gallery, dim)) * rng.uniform(0.5, 3, size=(n_gallery, 1))
    expected = np.array(brute_order(q, g))
    np.testing.assert_array_equal(rank_gallery(q, g), expected)
    k = min(10, n_gallery)
    np.testing.assert_array_equal(rank_gallery(q, g, k=k, chunk_size=3), expected[:, :k])
    np.testing.assert_array_equal(
        rank_gallery(torch.from_numpy(q), torch.from_numpy(g), k=k), expected[:, :k]
    )


def test_rank_gallery_breaks_ties_by_gallery_order():
    # One-hot gallery rows make every similarity exact, so repeated rows tie exactly.
    eye = np.eye(3)
    gallery = eye[[2, 0, 1, 0, 2, 0, 1, 0, 0, 1]]
    query = np.array([[0.5, 0.3, 0.2], [0.0, 1.0, 1.0]])
    full = rank_gallery(query, gallery)
    np.testing.assert_array_equal(full[0], [1, 3, 5, 7, 8, 2, 6, 9, 0, 4])
    np.testing.assert_array_equal(full[1], [0, 2, 4, 6, 9, 1, 3, 5, 7, 8])
    # k cuts through a block of ties: the earliest gallery positions must win.
    np.testing.assert_array_equal(rank_gallery(query, gallery, k=3)[0], [1, 3, 5])
    np.testing.assert_array_equal(rank_gallery(query, gallery, k=7)[1], [0, 2, 4, 6, 9, 1, 3])
    np.testing.assert_array_equal(rank_gallery(query, gallery, k=4), full[:, :4])


def test_rank_gallery_rejects_bad_features():
    g = np.ones((4, 3))
    with pytest.raises(EvalInputError, match="row 1 contains NaN"):
        rank_gallery(np.array([[1.0, 0, 0], [np.nan, 0, 0]]), g)
    with pytest.raises(EvalInputError, match="dim"):
        rank_gallery(np.ones((2, 5)), g)
    with pytest.raises(EvalInputError, match="empty"):
        rank_gallery(np.ones((2, 3)), np.ones((0, 3)))


# ---------------------------------------------------------------- CIRR


@pytest.mark.parametrize(
    "n_query,n_gallery,dim,noise", [(6, 12, 4, 0.8), (30, 80, 8, 1.0), (60, 300, 16, 1.5)]
)
def test_cirr_metrics_match_brute_force(n_query, n_gallery, dim, noise):
    q, g, names, refs, members, targets = make_cirr_case(n_query, n_gallery, dim, seed=n_gallery, noise=noise)
    ranked, subset = cirr_rankings(q, g, names, refs, members, targets=targets, chunk_size=7)
    assert all(len(r) == min(50, n_gallery - 1) for r in ranked)
    assert all(len(s) == 5 for s in subset)
    for row, ref, group in zip(subset, refs, members, strict=True):
        assert ref not in row and set(row) == set(group) - {ref}
    got = cirr_metrics(ranked, subset, targets)
    expected = brute_cirr(q, g, names, refs, members, targets)
    assert list(got) == ["R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg"]
    assert got == pytest.approx(expected, abs=1e-12)
    # The test case is informative: neither all hits nor all misses.
    assert 0 < got["R@1"] < 100 and 0 < got["Rsub@1"] < 100


def test_cirr_subset_is_the_global_order_restricted_to_members():
    q, g, names, refs, members, _ = make_cirr_case(25, 60, 6, seed=3)
    ranked, subset = cirr_rankings(q, g, names, refs, members, top_k=59)
    for full, sub, group in zip(ranked, subset, members, strict=True):
        assert sub == [n for n in full if n in group]


def test_cirr_hand_made_case():
    # 2-D features at known angles: similarity to the query (angle 0) falls with the angle.
    angles = {"a": 0.0, "b": 0.1, "c": 0.2, "d": 0.3, "e": 0.4, "f": 0.5, "g": 0.6, "h": 2.0}
    names = list(angles)
    gallery = np.array([[math.cos(t), math.sin(t)] for t in angles.values()])
    q = np.array([[1.0, 0.0]] * 3)
    refs = ["a", "b", "h"]
    members = [["a", "b", "c", "d", "e", "f"], ["b", "a", "h", "g", "f", "e"], ["h", "c", "d", "e", "f", "g"]]
    targets = ["b", "a", "d"]
    ranked, subset = cirr_rankings(q, gallery, names, refs, members)
    assert ranked[0] == ["b", "c", "d", "e", "f", "g", "h"]  # reference "a" removed
    assert ranked[1] == ["a", "c", "d", "e", "f", "g", "h"]
    assert subset == [["b", "c", "d", "e", "f"], ["a", "e", "f", "g", "h"], ["c", "d", "e", "f", "g"]]
    m = cirr_metrics(ranked, subset, targets)
    # Queries 0 and 1 hit at rank 1 only because their reference is removed; query 2 ranks its
    # target 4th overall and 2nd in its subset.
    assert m["R@1"] == pytest.approx(200 / 3)
    assert m["R@5"] == 100.0
    assert m["Rsub@1"] == pytest.approx(200 / 3)
    assert m["Rsub@2"] == 100.0
    assert m["Avg"] == pytest.approx((100 + 200 / 3) / 2)
    hits = cirr_hits(ranked, subset, targets)
    np.testing.assert_array_equal(hits["R@1"], [True, True, False])


def test_reference_removal_changes_recall_at_1():
    # The query sits on its reference; the target is the second nearest image.
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    names = ["ref", "tgt", "other"]
    ranked, subset = cirr_rankings(np.array([[1.0, 0.0]]), gallery, names, ["ref"], [["ref", "tgt", "other"]])
    assert cirr_metrics(ranked, subset, ["tgt"])["R@1"] == 100.0
    # Without removal (the FashionIQ protocol) the same query misses at 1.
    fiq = fiq_hits(np.array([[1.0, 0.0]]), gallery, names, ["tgt"], ks=(1, 2))
    assert not fiq["R@1"][0] and fiq["R@2"][0]


def test_target_beyond_rank_50_is_a_miss():
    n = 70
    gallery = np.array([[math.cos(0.01 * j), math.sin(0.01 * j)] for j in range(n)])
    names = [f"g{j}" for j in range(n)]
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    members = [names[:6], names[:6]]
    ranked, subset = cirr_rankings(q, gallery, names, ["g0", "g0"], members)
    # Without the reference g0, g50 is the 50th name and g51 the 51st.
    m = cirr_metrics(ranked, subset, ["g50", "g51"])
    assert m["R@50"] == 50.0 and m["R@10"] == 0.0
    assert len(ranked[0]) == 50 and ranked[0][-1] == "g50"


def test_cirr_rankings_reports_protocol_violations():
    g = np.eye(4)
    names = ["a", "b", "c", "d"]
    q = np.ones((1, 4))
    with pytest.raises(EvalInputError, match="'b' occurs twice"):
        cirr_rankings(q, g, ["a", "b", "b", "d"], ["a"], [["a", "d"]])
    with pytest.raises(EvalInputError, match="reference 'z' does not occur"):
        cirr_rankings(q, g, names, ["z"], [["a", "b"]])
    with pytest.raises(EvalInputError, match="set member 'y' is not in the gallery"):
        cirr_rankings(q, g, names, ["a"], [["a", "y"]])
    with pytest.raises(EvalInputError, match="target 'x' is not in the gallery"):
        cirr_rankings(q, g, names, ["a"], [["a", "b"]], targets=["x"])
    with pytest.raises(EvalInputError, match="equals the reference"):
        cirr_rankings(q, g, names, ["a"], [["a", "b"]], targets=["a"])
    with pytest.raises(EvalInputError, match="3 gallery names"):
        cirr_rankings(q, g, names[:3], ["a"], [["a", "b"]])
    with pytest.raises(EvalInputError, match="query 0 has no target"):
        cirr_metrics([["b"]], [["b"]], [None])


# ---------------------------------------------------------------- FashionIQ


def brute_fiq(q, gallery, names, targets, k):
    hits = [
        target in [names[j] for j in order][:k]
        for order, target in zip(brute_order(q, gallery), targets, strict=True)
    ]
    return 100.0 * sum(hits) / len(hits)


def test_fiq_metrics_match_brute_force():
    rng = np.random.default_rng(11)
    per_category, expected = {}, {}
    for cat, (n_query, n_gallery) in {"shirt": (20, 70), "dress": (15, 90), "toptee": (25, 60)}.items():
        g = rng.standard_normal((n_gallery, 8))
        names = [f"{cat}{j}" for j in range(n_gallery)]
        tgt = rng.integers(0, n_gallery, size=n_query)
        q = g[tgt] + 2.2 * rng.standard_normal((n_query, 8))
        targets = [names[j] for j in tgt]
        per_category[cat] = (q, g, names, targets)
        for k in (10, 50):
            expected[f"{cat}/R@{k}"] = brute_fiq(q, g, names, targets, k)
    got = fiq_metrics(per_category)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12)
    for k in (10, 50):
        assert got[f"avg/R@{k}"] == pytest.approx(np.mean([expected[f"{c}/R@{k}"] for c in per_category]))
    assert got["Avg"] == pytest.approx((got["avg/R@10"] + got["avg/R@50"]) / 2)
    assert 0 < got["avg/R@10"] < got["avg/R@50"] < 100


def test_fiq_keeps_the_reference_in_the_gallery():
    # Images at growing angles: the reference p0 (angle 0) is nearest, the target p10 is 11th.
    gallery = np.array([[math.cos(0.05 * j), math.sin(0.05 * j)] for j in range(60)])
    names = [f"p{j}" for j in range(60)]
    got = fiq_metrics({"dress": (np.array([[1.0, 0.0]]), gallery, names, ["p10"])})
    # With the reference removed (CIRR style) p10 would be 10th and count for R@10.
    assert got["dress/R@10"] == 0.0 and got["dress/R@50"] == 100.0


def test_fiq_requires_each_target_exactly_once():
    g = np.eye(3)
    with pytest.raises(EvalInputError, match="category 'shirt'.*target 'zz' occurs 0 times"):
        fiq_metrics({"shirt": (np.ones((1, 3)), g, ["a", "b", "c"], ["zz"])})
    with pytest.raises(EvalInputError, match="target 'b' occurs 2 times"):
        fiq_metrics({"shirt": (np.ones((1, 3)), g, ["a", "b", "b"], ["b"])})
    # A repeated non-target name is allowed, as in CLIP4Cir.
    assert fiq_metrics({"shirt": (np.ones((1, 3)), g, ["a", "a", "b"], ["b"])})["shirt/R@10"] == 100.0


# ---------------------------------------------------------------- bootstrap, breakdown, curves


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(100) < 0.3
    large = rng.random(10_000) < 0.3
    lo_s, hi_s = bootstrap_ci(small, n_boot=500, seed=1)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500, seed=1)
    assert lo_s <= 100 * small.mean() <= hi_s
    assert lo_l <= 100 * large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4  # ~sqrt(100) narrower
    assert bootstrap_ci(small, n_boot=500, seed=1) == (lo_s, hi_s)
    assert bootstrap_ci(np.ones(50, dtype=bool)) == (100.0, 100.0)
    # A paired difference of two "models": b hits wherever a does and on 10% more queries.
    a = rng.random(2000) < 0.4
    b = a | (rng.random(2000) < 0.1)
    lo, hi = bootstrap_ci(b.astype(float) - a.astype(float), n_boot=300)
    assert 0 < lo <= 100 * (b.mean() - a.mean()) <= hi
    with pytest.raises(EvalInputError):
        bootstrap_ci(np.array([], dtype=bool))


def test_breakdown_by_edit_types():
    hits = {
        "Rsub@1": np.array([1, 0, 1, 1, 0, 1], dtype=bool),
        "R@1": np.array([0, 0, 1, 0, 0, 1], dtype=bool),
    }
    keys = [["colour"], ["colour"], ["shape", "colour"], ["bg"], [], ["size", "add"]]
    out = breakdown_by(hits, keys)
    assert list(out) == ["bg", "colour", MULTI_EDIT_KEY, NO_EDIT_KEY]
    assert out["colour"] == {"Rsub@1": 50.0, "R@1": 0.0, "n": 2}
    assert out[MULTI_EDIT_KEY] == {"Rsub@1": 100.0, "R@1": 100.0, "n": 2}
    assert out[NO_EDIT_KEY]["n"] == 1
    assert sum(v["n"] for v in out.values()) == 6
    by_cat = breakdown_by({"R@10": np.array([True, False, True])}, ["dress", "shirt", "dress"])
    assert by_cat == {"dress": {"R@10": 100.0, "n": 2}, "shirt": {"R@10": 0.0, "n": 1}}
    with pytest.raises(EvalInputError, match="2 hits for 3 keys"):
        breakdown_by({"R@1": np.array([True, False])}, ["a", "b", "c"])


def test_recall_at_ks_agrees_with_cirr_hits():
    q, g, names, refs, members, targets = make_cirr_case(40, 120, 8, seed=5, noise=1.2)
    ranked, subset = cirr_rankings(q, g, names, refs, members)
    curve = recall_at_ks(ranked, targets, [1, 2, 5, 10, 20, 50])
    m = cirr_metrics(ranked, subset, targets)
    for k in (1, 5, 10, 50):
        assert curve[k] == m[f"R@{k}"]
    assert list(curve.values()) == sorted(curve.values())


# ---------------------------------------------------------------- baselines


def test_pixel_reference_baseline_is_centred_cosine():
    rng = np.random.default_rng(2)
    gallery_px = rng.integers(0, 256, size=(30, 4, 4, 3), dtype=np.uint8)
    ref_px = gallery_px[[3, 7]]
    qf, gf = pixel_reference_baseline(ref_px, gallery_px)
    assert qf.shape == (2, 48) and gf.shape == (30, 48) and qf.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gf, axis=1), 1.0, rtol=1e-5)
    flat = gallery_px.reshape(30, -1).astype(np.float64)
    centred = flat - flat.mean(axis=0)
    expected = centred[[3, 7]] / np.linalg.norm(centred[[3, 7]], axis=1, keepdims=True)
    np.testing.assert_allclose(qf, expected, atol=1e-6)
    # Each reference's nearest gallery image is itself.
    np.testing.assert_array_equal(rank_gallery(qf, gf, k=1)[:, 0], [3, 7])
    with pytest.raises(EvalInputError, match="differ in shape"):
        pixel_reference_baseline(ref_px[:, :2], gallery_px)


def test_reference_and_text_only_queries():
    rng = np.random.default_rng(4)
    g = rng.standard_normal((10, 5)).astype(np.float32)
    names = [f"n{j}" for j in range(10)]
    ref_q = reference_only_queries(["n2", "n9"], names, torch.from_numpy(g))
    np.testing.assert_allclose(ref_q, g[[2, 9]] / np.linalg.norm(g[[2, 9]], axis=1, keepdims=True), rtol=1e-6)
    # Under the CIRR protocol the reference is removed, so a reference-only query ranks its neighbours.
    ranked, _ = cirr_rankings(ref_q, g, names, ["n2", "n9"], [["n2", "n1"], ["n9", "n1"]])
    assert "n2" not in ranked[0] and "n9" not in ranked[1]
    text = text_only_queries(rng.standard_normal((3, 5)))
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-6)
    with pytest.raises(EvalInputError, match="'zz' is not in the gallery"):
        reference_only_queries(["zz"], names, g)


# ---------------------------------------------------------------- real annotation files


@pytest.mark.skipif(not REAL.is_dir(), reason="real annotations not available")
def test_protocol_holds_on_real_cirr_val_and_fiq_val():
    cirr = REAL / "cirr"
    gallery_names = list(json.loads((cirr / "image_splits" / "split.rc2.val.json").read_text()))
    caps = json.loads((cirr / "captions" / "cap.rc2.val.json").read_text())
    refs = [c["reference"] for c in caps]
    targets = [c["target_hard"] for c in caps]
    members = [c["img_set"]["members"] for c in caps]
    rng = np.random.default_rng(0)
    g = rng.standard_normal((len(gallery_names), 16)).astype(np.float32)
    q = rng.standard_normal((len(caps), 16)).astype(np.float32)
    ranked, subset = cirr_rankings(q, g, gallery_names, refs, members, targets=targets)
    assert all(len(r) == 50 for r in ranked) and all(len(s) == 5 for s in subset)
    m = cirr_metrics(ranked, subset, targets)
    assert 5 < m["Rsub@1"] < 40  # random features: chance is 20%
    fiq = REAL / "fashioniq"
    per_category = {}
    for cat in ("shirt", "dress", "toptee"):
        names = json.loads((fiq / "image_splits" / f"split.{cat}.val.json").read_text())
        tgts = [c["target"] for c in json.loads((fiq / "captions" / f"cap.{cat}.val.json").read_text())]
        per_category[cat] = (
            rng.standard_normal((len(tgts), 8)).astype(np.float32),
            rng.standard_normal((len(names), 8)).astype(np.float32),
            names,
            tgts,
        )
    got = fiq_metrics(per_category)
    assert got["avg/R@50"] < 10  # random features over ~5k images
