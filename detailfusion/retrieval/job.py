"""The batch retrieval job: model + gallery + queries -> ranked results, summary, report.

``run_retrieval(config)`` does, in order: check every ``s3://`` endpoint is reachable, resolve and
load the model, list the gallery and read the queries, embed the gallery in resumable shards
(:mod:`~detailfusion.retrieval.shards`), embed the queries, search (exact by default, a FAISS
index on request, with recall@k against exact on a sample of queries), write results, errors,
the CIRR test-server files for CIRR-format queries and an HTML page into a staging folder,
publish them, and log the run to MLflow. Per-item failures (an unreadable gallery image, a query
whose reference cannot be found) become rows of ``errors.parquet`` and counts in the summary;
with ``on_error="fail"`` the first one stops the job instead.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from detailfusion.config import repo_default
from detailfusion.data.manifest import ranking_drops_reference
from detailfusion.errors import DetailFusionError
from detailfusion.retrieval.embed import autocast_dtype, encode_queries, pixels_from_bytes
from detailfusion.retrieval.storage import check_reachable, is_remote, join, local_path, read_bytes

INDEX_KINDS = ("exact", "flat", "ivf_flat", "ivf_pq")


@dataclass
class RetrieveConfig:
    """One retrieval job (the ``detailfusion retrieve`` options)."""

    gallery: str
    queries: str
    out: str
    model: str | None = None  # default: models:/<registry model name for dataset>@champion
    dataset: str = "cirr"
    gallery_format: str = "auto"  # auto | prepared | folder | cirr | fashioniq
    split: str = "val"
    category: str = ""
    query_image_root: str | None = None
    work_dir: str | None = None  # shard cache; default <out>/gallery (local out) or ~/.cache/...
    top_k: int = 50
    index: str = "exact"
    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int = 16
    recall_sample: int = 1000
    shard_size: int = 4096
    batch_size: int = 256
    device: str = "cpu"
    embed_dtype: str | None = None  # bf16 | fp16: embed under autocast (GPU); part of the shard cache key
    search_dtype: str | None = None  # fp16 | bf16: exact search in half precision (CUDA only)
    image_size: int | None = None
    target_ratio: float | None = None
    exclude_reference: str = "auto"  # auto (CIRR-format queries) | yes | no
    on_error: str = "record"  # record (error rows) | fail
    report_samples: int = 12
    report_top_k: int = 8
    endpoint_url: str | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.index not in INDEX_KINDS:
            raise DetailFusionError(f"--index {self.index!r}: choose from {list(INDEX_KINDS)}")
        if self.exclude_reference not in ("auto", "yes", "no"):
            raise DetailFusionError(f"--exclude-reference {self.exclude_reference!r}: choose auto, yes or no")
        if self.embed_dtype not in (None, "fp32", "bf16", "fp16"):
            raise DetailFusionError(f"--embed-dtype {self.embed_dtype!r}: choose fp32, bf16 or fp16")
        if self.search_dtype not in (None, "fp32", "bf16", "fp16"):
            raise DetailFusionError(f"--search-dtype {self.search_dtype!r}: choose fp32, bf16 or fp16")
        if self.on_error not in ("record", "fail"):
            raise DetailFusionError(f"--on-error {self.on_error!r}: choose record or fail")
        for name in ("top_k", "shard_size", "batch_size", "nprobe", "recall_sample"):
            if getattr(self, name) < 1:
                raise DetailFusionError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def default_work_dir(cfg: RetrieveConfig) -> Path:
    if cfg.work_dir:
        return local_path(cfg.work_dir)
    if not is_remote(cfg.out):
        return local_path(cfg.out) / "gallery"
    tag = hashlib.sha256(cfg.out.encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "detailfusion" / "retrieve" / tag


def _settings(cfg: RetrieveConfig, resolved, params: dict | None) -> tuple[int, float]:
    prepare = (params or {}).get("prepare") or {}
    size = cfg.image_size or resolved.settings.get("image_size") or prepare.get("image_size") or resolved.model.image_size
    ratio = cfg.target_ratio or resolved.settings.get("target_ratio") or prepare.get("target_ratio")
    if not ratio:  # no params given (an API call): the checkout's prepare.target_ratio
        from detailfusion.data.config import PrepareConfig

        ratio = repo_default(PrepareConfig, "prepare").target_ratio
    return int(size), float(ratio)


def run_retrieval(cfg: RetrieveConfig, *, tracking=None, registry=None, params: dict | None = None,
                  progress: bool = True, engine=None) -> dict:
    """Run one job (module docs); returns the summary that ``summary.json`` holds.

    ``engine`` (e.g. :class:`~detailfusion.retrieval.ray_engine.RayEngine`) replaces the gallery
    embedding and search steps; it offers ``embed_gallery_shards`` and ``run_search`` with the
    local functions' signatures.
    """
    from detailfusion.registry.config import RegistryConfig
    from detailfusion.retrieval.inputs import load_gallery, load_queries
    from detailfusion.retrieval.outputs import Staging
    from detailfusion.retrieval.resolve import resolve_model
    from detailfusion.retrieval.shards import embed_gallery_shards
    from detailfusion.tracking.config import TrackingConfig, resolve_tracking_uri

    cfg.validate()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    for uri in (cfg.gallery, cfg.queries, cfg.out):
        check_reachable(uri, cfg.endpoint_url)
    tracking = tracking or repo_default(TrackingConfig, "tracking")
    registry = registry or repo_default(RegistryConfig, "registry")
    model_uri = cfg.model or f"models:/{registry.name_for(cfg.dataset)}@champion"
    from detailfusion.tracking.transport import configure_http

    configure_http(registry.retries, registry.backoff_s, registry.timeout_s, where="registry")
    resolved = resolve_model(model_uri, resolve_tracking_uri(tracking))
    model = resolved.model.to(cfg.device)
    size, ratio = _settings(cfg, resolved, params)
    timings["load_model_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    gallery = load_gallery(cfg.gallery, fmt=cfg.gallery_format, split=cfg.split, category=cfg.category,
                           endpoint=cfg.endpoint_url)
    queries = load_queries(cfg.queries, image_root=cfg.query_image_root, endpoint=cfg.endpoint_url)
    work = default_work_dir(cfg)
    if engine is not None:  # e.g. the Ray engine (ray_engine.py): same contract, distributed
        embed_gallery_shards = engine.embed_gallery_shards
    emb = embed_gallery_shards(model, gallery, work, model_identity=resolved.identity, image_size=size,
                               target_ratio=ratio, shard_size=cfg.shard_size, batch_size=cfg.batch_size,
                               dtype=cfg.embed_dtype, progress=progress)
    timings["embed_gallery_s"] = time.perf_counter() - t
    errors = [emb.errors]
    if len(emb.errors) and cfg.on_error == "fail":
        row = emb.errors.iloc[0]
        raise DetailFusionError(f"gallery image {row['source']}: {row['error']} (--on-error fail)")
    if len(emb.ids) == 0:
        raise DetailFusionError(f"{cfg.gallery}: no gallery image could be embedded (see the errors above)")

    t = time.perf_counter()
    q_ok, q_emb, q_pixels, q_err = _embed_queries(model, gallery, queries, size, ratio, cfg, progress)
    timings["embed_queries_s"] = time.perf_counter() - t
    errors.append(q_err)
    if len(q_err) and cfg.on_error == "fail":
        row = q_err.iloc[0]
        raise DetailFusionError(f"query {row['item_id']}: {row['error']} (--on-error fail)")

    exclude_ref = cfg.exclude_reference == "yes" or (cfg.exclude_reference == "auto" and ranking_drops_reference(queries.protocol))
    row_of = {int(p): i for i, p in enumerate(emb.positions)}
    frame = queries.frame.iloc[q_ok].reset_index(drop=True)
    exclude = np.asarray([row_of.get(gallery.position(r), -1) for r in frame["reference"]], dtype=np.int64)
    if not exclude_ref:
        exclude = None

    from detailfusion.retrieval.searching import run_search

    t = time.perf_counter()
    if engine is not None:
        run_search = engine.run_search
    scores, idx, index_info = run_search(q_emb, emb.embeddings, cfg, exclude)
    timings["search_s"] = time.perf_counter() - t

    staging = Staging(cfg.out, cfg.endpoint_url)
    try:
        from detailfusion.retrieval.writing import write_outputs

        t = time.perf_counter()
        summary = write_outputs(staging, cfg, resolved, gallery, queries, q_ok, q_pixels, emb, scores, idx,
                                errors, exclude_ref, size, ratio, q_emb)
        timings["write_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        n_q = len(frame)
        summary.update({
            "index": index_info,
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "throughput": {
                "gallery_images_per_s": emb.stats.get("images_per_s"),
                "queries_per_s_search": n_q / timings["search_s"] if timings["search_s"] else None,
                "queries_per_s_embed": n_q / timings["embed_queries_s"] if timings["embed_queries_s"] else None,
            },
            "gallery": {**summary["gallery"], **{k: v for k, v in emb.stats.items() if k != "images_per_s"},
                        "work_dir": str(work)},
            "config": asdict(cfg),
        })
        from detailfusion.retrieval.tracking import log_run

        summary["tracking"] = log_run(summary, staging, cfg, tracking, params, resolved)
        from detailfusion.fsutil import write_json_atomic

        write_json_atomic(staging.path("summary.json"), summary)
        extra = {}
        if is_remote(cfg.out):
            extra = {str(p.relative_to(work)).replace("\\", "/"): p for sub in ("embeddings", "metadata", "errors")
                     for p in sorted((work / sub).glob("*")) if p.is_file()}
            extra = {f"gallery/{k}": v for k, v in extra.items()}
        summary["outputs"] = staging.publish(extra)
        return summary
    finally:
        staging.close()


def _embed_queries(model, gallery, queries, size: int, ratio: float, cfg: RetrieveConfig, progress: bool):
    """Embeddings of the queries whose reference image can be read (in batches of ``batch_size``).

    Returns ``(ok rows, embeddings, {row: reference pixels} for the report sample, error rows)``.
    """
    from tqdm.auto import tqdm

    frame = queries.frame
    n = len(frame)
    sample = set(np.random.default_rng(cfg.seed).choice(n, size=min(cfg.report_samples, n), replace=False).tolist())
    texts = frame["caption"].tolist()
    ok: list[int] = []
    kept: dict[int, np.ndarray] = {}
    errors: list[dict] = []
    pending: list[tuple[int, np.ndarray]] = []
    parts: list[torch.Tensor] = []
    model.eval()

    def flush() -> None:
        rows = [r for r, _ in pending]
        out = encode_queries(model, np.stack([p for _, p in pending]), [texts[r] for r in rows], keys=("query",),
                             dtype=autocast_dtype(cfg.embed_dtype))
        parts.append(out["query"])
        ok.extend(rows)
        pending.clear()

    for i in tqdm(range(n), desc="queries", unit="query", disable=not progress):
        ref = frame["reference"].iloc[i]
        try:
            pixels = _reference_pixels(gallery, queries, ref, size, ratio, cfg.endpoint_url)
        except DetailFusionError as exc:
            errors.append({"kind": "query", "item_id": str(frame["query_id"].iloc[i]), "source": str(ref),
                           "error": str(exc)})
            continue
        if i in sample:
            kept[i] = pixels
        pending.append((i, pixels))
        if len(pending) == cfg.batch_size:
            flush()
    if pending:
        flush()
    q_emb = torch.cat(parts).numpy() if parts else np.zeros((0, model.embed_dim), np.float32)
    return ok, q_emb, kept, pd.DataFrame(errors, columns=["kind", "item_id", "source", "error"])


def _reference_pixels(gallery, queries, ref: str, size: int, ratio: float, endpoint: str | None) -> np.ndarray:
    pos = gallery.position(ref)
    if pos >= 0:
        raw, source = gallery.raw(pos), gallery.sources[pos]
    else:
        source = ref if is_remote(ref) or Path(ref).is_absolute() else join(queries.image_root or ".", ref)
        if not Path(source).suffix:
            raise DetailFusionError(f"reference {ref!r} is not in the gallery and is not an image path")
        raw = read_bytes(source, endpoint)
    return raw if isinstance(raw, np.ndarray) else pixels_from_bytes(raw, size, ratio, source=source)
