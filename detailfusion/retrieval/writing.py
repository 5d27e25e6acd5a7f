"""The files of a retrieval run (results, errors, CIRR submission, HTML page) and its summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from detailfusion.errors import DetailFusionError
from detailfusion.retrieval.outputs import results_frame
from detailfusion.retrieval.shards import ERROR_COLUMNS


def member_rankings(q_emb: np.ndarray, g_emb: np.ndarray, ids: list[str], row_of_id: dict[str, int],
                    references: list[str], members: list[list[str]]) -> list[list[str]]:
    """CIRR Recall_subset order: each query's set members (reference removed) by similarity, ties by
    gallery order, with the similarities computed as the evaluate stage computes them."""
    q = torch.nn.functional.normalize(torch.from_numpy(np.asarray(q_emb, np.float32)), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(np.asarray(g_emb, np.float32)), dim=1)
    out = []
    step = max(1, 4_000_000 // max(1, g.shape[0]))
    for start in range(0, q.shape[0], step):
        sims = q[start : start + step] @ g.T
        for r in range(sims.shape[0]):
            i = start + r
            rows = sorted({row_of_id[m] for m in members[i] if m != references[i] and m in row_of_id})
            if not rows:
                out.append([])
                continue
            idx = torch.tensor(rows, dtype=torch.long)
            order = torch.sort(sims[r, idx], descending=True, stable=True).indices
            out.append([ids[int(j)] for j in idx[order]])
    return out


def write_outputs(staging, cfg, resolved, gallery, queries, q_ok: list[int], q_pixels: dict, emb, scores, idx,
                  errors: list[pd.DataFrame], exclude_ref: bool, size: int, ratio: float, q_emb) -> dict:
    frame = queries.frame.iloc[q_ok].reset_index(drop=True)
    results = results_frame(frame["query_id"].tolist(), idx, scores, emb.ids)
    results.to_parquet(staging.path("results.parquet"), index=False)
    err = pd.concat([e for e in errors if len(e)], ignore_index=True) if any(len(e) for e in errors) else \
        pd.DataFrame(columns=list(ERROR_COLUMNS))
    err.to_parquet(staging.path("errors.parquet"), index=False)
    n_gal_err = int((err["kind"] == "gallery").sum()) if len(err) else 0
    n_q_err = int((err["kind"] == "query").sum()) if len(err) else 0
    summary: dict = {
        "model": resolved.info(),
        "protocol": queries.protocol,
        "exclude_reference": exclude_ref,
        "preprocess": {"image_size": size, "target_ratio": ratio},
        "gallery": {"source": gallery.description, "images": len(gallery), "embedded": len(emb.ids),
                    "errors": n_gal_err},
        "queries": {"source": queries.description, "queries": len(queries), "searched": len(frame),
                    "errors": n_q_err},
        "results": {"rows": len(results), "top_k": int(idx.shape[1]) if idx.ndim == 2 else 0},
    }
    row_of_id = {name: i for i, name in enumerate(emb.ids)}
    if queries.protocol == "cirr" and exclude_ref and len(frame):
        summary["submission"] = _submission(staging, cfg, queries, frame, idx, emb, row_of_id, q_emb, len(err) > 0)
    summary["report"] = _report(staging, cfg, resolved, gallery, queries, q_ok, q_pixels, emb, scores, idx,
                                size, ratio)
    return summary


def _submission(staging, cfg, queries, frame, idx, emb, row_of_id, q_emb, had_errors: bool) -> dict:
    from detailfusion.eval.submission import write_cirr_submission

    if frame["pairid"].isna().any():
        return {"written": False, "reason": "queries without pairid"}
    ranked = [[emb.ids[j] for j in row if j >= 0] for row in idx]
    refs = frame["reference"].tolist()
    subset = member_rankings(q_emb, emb.embeddings, emb.ids, row_of_id, refs, [list(m) for m in frame["members"]])
    out_dir = staging.path("submission/x").parent
    try:
        recall, sub = write_cirr_submission(frame["pairid"].tolist(), ranked, subset, out_dir, queries.split,
                                            references=refs)
    except DetailFusionError as exc:
        return {"written": False, "reason": str(exc)}
    return {"written": True, "recall": f"submission/{recall.name}", "recall_subset": f"submission/{sub.name}",
            "complete": not had_errors}


def _report(staging, cfg, resolved, gallery, queries, q_ok, q_pixels, emb, scores, idx, size, ratio) -> dict:
    from detailfusion.eval.report import ReportSample, write_retrieval_report
    from detailfusion.retrieval.embed import pixels_from_bytes

    def image(pos: int) -> np.ndarray:
        raw = gallery.raw(pos)
        return np.asarray(raw) if isinstance(raw, np.ndarray) else pixels_from_bytes(raw, size, ratio)

    where = {row: i for i, row in enumerate(q_ok)}
    samples = []
    for row in sorted(q_pixels):
        i = where[row]
        q = queries.frame.iloc[row]
        top = [int(j) for j in idx[i][: cfg.report_top_k] if j >= 0]
        try:
            images = [image(int(emb.positions[j])) for j in top]
        except DetailFusionError:
            continue
        samples.append(ReportSample(
            query_id=str(q["query_id"]), reference_image=np.asarray(q_pixels[row]), caption=str(q["caption"]),
            result_names=[emb.ids[j] for j in top], result_scores=[float(scores[i][k]) for k in range(len(top))],
            result_images=images, target=q["target"] if isinstance(q["target"], str) else None,
            reference_name=str(q["reference"]),
        ))
    model = resolved.info()
    title = f"Batch retrieval: {model['name'] or model['uri']}" + (f" v{model['version']}" if model["version"] else "")
    write_retrieval_report(staging.path("report/index.html"), samples, title=title)
    return {"path": "report/index.html", "samples": len(samples)}
