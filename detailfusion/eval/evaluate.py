"""The ``evaluate`` stage: a trained model + prepared data -> protocol metrics and reports.

Glue between the model (embeddings) and the model-independent protocol code in this package:
CIRR / FashionIQ metrics, the CIRR test-server submission files (and a check that the metrics
recomputed from those files equal the ones reported), reference-only / text-only / pixel
baselines beside the model, per-branch and per-edit-type results, bootstrap CIs, Recall@K curves,
the HTML retrieval report, and the same metrics on a held-out split whose targets are known
(the synthetic ``test1``, see :func:`heldout_evaluation`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from detailfusion import timings
from detailfusion.errors import DetailFusionError
from detailfusion.eval import hit_stats
from detailfusion.eval import metrics as M
from detailfusion.eval.baselines import pixel_reference_baseline, reference_only_queries
from detailfusion.eval.config import EvaluateConfig
from detailfusion.fsutil import write_json_atomic
from detailfusion.retrieval.embed import embed_gallery, embed_queries

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- embeddings

# The embedding code lives in detailfusion.retrieval.embed (shared with the stage-3 cache, the
# pyfunc and batch retrieval); these names stay importable from here.
embed_images = embed_gallery


# --------------------------------------------------------------------------- protocols


def _ref_index(prepared, split: str, q, category: str = "") -> np.ndarray:
    return np.asarray([prepared.pixel_index(split, r, category) for r in q["reference"]], dtype=np.int64)


def cirr_evaluation(model, prepared, split: str = "val", batch_size: int = 256, progress: bool = False,
                    baselines: bool = True) -> dict:
    """Everything the CIRR protocol needs for one model on one split (features, rankings, hits)."""
    q = prepared.split_queries(split)
    names, gidx = prepared.gallery(split)
    names = list(names)
    gallery = embed_gallery(model, prepared.pixels, np.asarray(gidx), batch_size, progress)
    emb = embed_queries(model, prepared.pixels, _ref_index(prepared, split, q), q["caption"].tolist(), batch_size,
                        progress)
    refs, members = q["reference"].tolist(), [list(m) for m in q["members"]]
    has_targets = q["target"].notna().all()
    targets = q["target"].tolist() if has_targets else None
    result = {"queries": q, "gallery_names": names, "gallery": gallery, "embeddings": emb, "variants": {}}
    feats = {"model": emb["query"], "gm": emb["gm"], "di": emb["di"]}
    if baselines:
        feats["reference_only"] = reference_only_queries(refs, names, gallery)
        text = embed_queries(model, prepared.pixels, None, q["caption"].tolist(), batch_size, blank_reference=True)
        feats["text_only"] = text["query"]
    for name, f in feats.items():
        if f is None:
            continue
        ranked, subset = M.cirr_rankings(f, gallery, names, refs, members, top_k=50, targets=targets)
        entry = {"ranked": ranked, "subset": subset}
        if has_targets:
            entry["hits"] = M.cirr_hits(ranked, subset, targets)
            entry["metrics"] = M.cirr_metrics(ranked, subset, targets)
        result["variants"][name] = entry
    if baselines and has_targets:
        ref_pix = np.asarray(prepared.pixels[_ref_index(prepared, split, q)])
        gal_pix = np.asarray(prepared.pixels[np.asarray(gidx)])
        qf, gf = pixel_reference_baseline(ref_pix, gal_pix)
        ranked, subset = M.cirr_rankings(qf, gf, names, refs, members, top_k=50, targets=targets)
        result["variants"]["pixel_reference"] = {
            "ranked": ranked, "subset": subset,
            "hits": M.cirr_hits(ranked, subset, targets), "metrics": M.cirr_metrics(ranked, subset, targets),
        }
    return result


def fiq_evaluation(model, prepared, split: str = "val", batch_size: int = 256, progress: bool = False) -> dict:
    """FashionIQ protocol: per category, own gallery, reference kept; fused model and branches."""
    per_variant: dict[str, dict] = {}
    hits_all: dict[str, dict] = {}
    for cat in sorted(set(prepared.queries["category"]) - {""}):
        q = prepared.split_queries(split, cat)
        names, gidx = prepared.gallery(split, cat)
        gallery = embed_gallery(model, prepared.pixels, np.asarray(gidx), batch_size, progress, desc=f"gallery {cat}")
        emb = embed_queries(model, prepared.pixels, _ref_index(prepared, split, q, cat), q["caption"].tolist(),
                            batch_size, progress)
        for name, f in (("model", emb["query"]), ("gm", emb["gm"]), ("di", emb["di"])):
            if f is not None:
                per_variant.setdefault(name, {})[cat] = (f, gallery, list(names), q["target"].tolist())
                hits_all.setdefault(name, {})[cat] = M.fiq_hits(f, gallery, list(names), q["target"].tolist())
    return {name: {"metrics": M.fiq_metrics(cats), "hits": hits_all[name]} for name, cats in per_variant.items()}


def quick_validation(model, prepared, split: str = "val", progress: bool = False) -> dict:
    """Headline val metrics logged at the end of a training stage (no baselines, no files)."""
    if prepared.name == "fashioniq":
        res = fiq_evaluation(model, prepared, split, progress=progress)
        return {name: v["metrics"] for name, v in res.items()}
    res = cirr_evaluation(model, prepared, split, progress=progress, baselines=False)
    return {name: v["metrics"] for name, v in res["variants"].items() if "metrics" in v}


def _round(d: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- the stage


def _report_samples(res: dict, prepared, split: str, cfg: EvaluateConfig) -> list:
    from detailfusion.eval.report import ReportSample

    q = res["queries"]
    n = len(q)
    rng = np.random.default_rng(cfg.seed)
    rows = np.sort(rng.choice(n, size=min(cfg.report_samples, n), replace=False))
    names = res["gallery_names"]
    pos = {name: i for i, name in enumerate(names)}
    gallery = res["gallery"]
    query = res["embeddings"]["query"]
    weights = res["embeddings"]["weights"]
    ranked = res["variants"]["model"]["ranked"]
    samples = []
    for i in rows:
        row = q.iloc[i]
        top = ranked[i][: cfg.report_top_k]
        scores = [float(query[i] @ gallery[pos[t]]) for t in top]
        samples.append(ReportSample(
            query_id=str(row["query_id"]),
            reference_image=np.asarray(prepared.pixels[prepared.pixel_index(split, row["reference"])]),
            caption=str(row["caption"]),
            result_names=top,
            result_scores=scores,
            result_images=[np.asarray(prepared.pixels[prepared.pixel_index(split, t)]) for t in top],
            target=row["target"] if isinstance(row["target"], str) else None,
            reference_name=str(row["reference"]),
            branch_weights=None if weights is None else (float(weights[i][0]), float(weights[i][1])),
            notes=[f"edit types: {', '.join(row['edit_types'])}"] if len(row["edit_types"]) else [],
        ))
    return samples


def run_evaluate(cfg: EvaluateConfig, model_dir: Path, prepared_dir: Path, dataset: str,
                 progress: bool = True) -> dict:
    """Evaluate the final model on ``dataset``'s ``cfg.split``; writes metrics, submissions, plots, report."""
    from detailfusion.data.prepared import load_prepared
    from detailfusion.eval.plots import write_edit_type_breakdown, write_recall_curves
    from detailfusion.eval.report import write_retrieval_report
    from detailfusion.eval.submission import metrics_from_submission, write_cirr_submission
    from detailfusion.models.io import load_pretrained

    with timings.phase("load_data"):
        model = load_pretrained(Path(model_dir))
        prepared = load_prepared(Path(prepared_dir), dataset)
    out_metrics = Path(cfg.out_metrics)
    plots_dir = Path(cfg.out_plots)
    reports_dir = Path(cfg.out_reports)
    summary: dict = {"dataset": dataset, "split": cfg.split, "variant": model.variant.name}
    if dataset == "fashioniq":
        res = fiq_evaluation(model, prepared, cfg.split, cfg.batch_size, progress)
        summary["metrics"] = _round(res["model"]["metrics"])
        summary["branches"] = {k: _round(v["metrics"]) for k, v in res.items() if k != "model"}
        curves = {name: {k: v["metrics"][f"avg/R@{k}"] for k in M.FIQ_KS} for name, v in res.items()}
        write_recall_curves(curves, plots_dir / "recall_curves.csv", plots_dir / "recall_curves.png")
        write_edit_type_breakdown({}, plots_dir / "by_edit_type.csv")  # FashionIQ has no edit types
        write_json_atomic(out_metrics, {dataset: summary})
        write_json_atomic(out_metrics.with_name("headline.json"), summary["metrics"])
        return summary

    with timings.phase("retrieval"):  # embed, rank, per-variant metrics
        res = cirr_evaluation(model, prepared, cfg.split, cfg.batch_size, progress)
    q = res["queries"]
    variants = res["variants"]
    main = variants["model"]
    summary["n_queries"] = len(q)
    summary["n_gallery"] = len(res["gallery_names"])
    summary["metrics"] = _round(main["metrics"])
    summary["branches"] = {k: _round(variants[k]["metrics"]) for k in ("gm", "di") if k in variants}
    summary["baselines"] = {k: _round(variants[k]["metrics"])
                            for k in ("reference_only", "text_only", "pixel_reference") if k in variants}
    summary["ci95"] = {m: [round(x, 3) for x in hit_stats.bootstrap_ci(main["hits"][m], cfg.bootstrap, cfg.seed)]
                       for m in ("R@1", "Rsub@1")}
    if q["edit_types"].map(len).sum():
        summary["by_edit_type"] = {k: _round(v) for k, v in
                                   hit_stats.breakdown_by(main["hits"], [list(e) for e in q["edit_types"]]).items()}
    if "weights" in res["embeddings"] and res["embeddings"]["weights"] is not None:
        w = res["embeddings"]["weights"]
        summary["afc_weight_di"] = {"mean": round(float(w[:, 1].mean()), 4), "std": round(float(w[:, 1].std()), 4)}

    sub_dir = reports_dir / "submission"
    recall_path, subset_path = write_cirr_submission(
        q["pairid"].tolist(), main["ranked"], main["subset"], sub_dir, cfg.split, references=q["reference"].tolist()
    )
    recomputed = metrics_from_submission(recall_path, subset_path, q)
    mismatch = {k: (summary["metrics"][k], recomputed[k]) for k in recomputed
                if round(recomputed[k], 4) != summary["metrics"][k]}
    if mismatch:
        raise DetailFusionError(f"{recall_path}: metrics recomputed from the submission files differ: {mismatch}")
    summary["submission"] = {"recall": str(recall_path), "recall_subset": str(subset_path), "agrees": True}

    ks = (1, 5, 10, 50)
    curves = {name: M.recall_at_ks(v["ranked"], q["target"].tolist(), ks) for name, v in variants.items()}
    write_recall_curves(curves, plots_dir / "recall_curves.csv", plots_dir / "recall_curves.png")
    # always written (header only without edit-type sidecars) so the DVC plot's file exists
    write_edit_type_breakdown(summary.get("by_edit_type", {}), plots_dir / "by_edit_type.csv")
    write_retrieval_report(reports_dir / "retrieval" / "index.html", _report_samples(res, prepared, cfg.split, cfg),
                           title=f"DetailFusion ({model.variant.name}) on {dataset} {cfg.split}")
    with timings.phase("retrieval"):
        heldout = heldout_evaluation(model, prepared, cfg, progress)
    headline = dict(summary["metrics"])
    if heldout is not None:
        summary["heldout"] = heldout
        headline.update({f"heldout/{k}": heldout["metrics"][k] for k in HELDOUT_HEADLINE})
    write_json_atomic(out_metrics, {dataset: summary})
    # flat headline metrics of the evaluated data set: what the registry gate compares
    write_json_atomic(out_metrics.with_name("headline.json"), headline)
    return summary


HELDOUT_SPLIT = "test1"
HELDOUT_HEADLINE = ("R@1", "R@5", "Rsub@1", "Avg")  # the held-out keys of headline.json, kept few


def heldout_evaluation(model, prepared, cfg: EvaluateConfig, progress: bool = False) -> dict | None:
    """CIRR metrics on the held-out split (``test1``) when its targets are known, else None.

    Only the synthetic benchmark knows them (its ``synthetic_targets.json`` sidecar, carried into
    the manifest by ``prepare``); real CIRR keeps them on the evaluation server, so on real data,
    or when ``test1`` itself is the evaluated split, this part is skipped.
    """
    q = prepared.queries
    q = q[q["split"] == HELDOUT_SPLIT]
    if cfg.split == HELDOUT_SPLIT or q.empty or not q["target"].notna().all():
        return None
    res = cirr_evaluation(model, prepared, HELDOUT_SPLIT, cfg.batch_size, progress)
    variants = res["variants"]
    main = variants["model"]
    return {
        "split": HELDOUT_SPLIT,
        "n_queries": len(res["queries"]),
        "n_gallery": len(res["gallery_names"]),
        "metrics": _round(main["metrics"]),
        "baselines": {k: _round(variants[k]["metrics"])
                      for k in ("reference_only", "text_only", "pixel_reference") if k in variants},
        "ci95": {m: [round(x, 3) for x in hit_stats.bootstrap_ci(main["hits"][m], cfg.bootstrap, cfg.seed)]
                 for m in ("R@1", "Rsub@1")},
    }


def write_test_submission(model_dir: Path, prepared_dir: Path, split: str, out_dir: Path,
                          batch_size: int = 256, progress: bool = True) -> tuple[Path, Path]:
    """CIRR test-server files for ``split`` (e.g. ``test1``, which has no targets)."""
    from detailfusion.data.prepared import load_prepared
    from detailfusion.eval.submission import write_cirr_submission
    from detailfusion.models.io import load_pretrained

    model = load_pretrained(Path(model_dir))
    prepared = load_prepared(Path(prepared_dir), "cirr")
    res = cirr_evaluation(model, prepared, split, batch_size, progress, baselines=False)
    q = res["queries"]
    main = res["variants"]["model"]
    return write_cirr_submission(q["pairid"].tolist(), main["ranked"], main["subset"], out_dir, split,
                                 references=q["reference"].tolist())
