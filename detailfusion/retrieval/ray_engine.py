"""The retrieval job on Ray Data: ``detailfusion retrieve --engine ray``.

:func:`run_retrieval_ray` runs :func:`detailfusion.retrieval.job.run_retrieval` with a
:class:`RayEngine` doing its two heavy steps:

* gallery embedding: a Ray dataset of shard numbers goes through ``map_batches`` over an actor
  pool. Each actor (:class:`_ShardEmbedder`) takes the model from the object store once, moves it
  to its GPU when it was given one (``num_gpus=1`` per actor on a cluster with GPUs), and embeds
  and writes whole shards with the local engine's own code (same digest, same shard files), so a
  resumed run reuses finished shards exactly as the local engine does;
* exact search: the queries are cut into shards searched by actors (:class:`_QueryShardSearch`)
  that hold the gallery embeddings; :func:`~detailfusion.retrieval.search.exact_search` ranks each
  query on its own, so the results equal the local engine's. FAISS index kinds are built and
  searched once on the driver.

Ray connects as ``ray.init()`` does: to ``RAY_ADDRESS`` when set (e.g. a KubeRay cluster's head,
``ray://<head>:10001``), otherwise to a local instance it starts and stops. The shard cache
(``--work-dir``) must be a path every actor can write (shared storage on a cluster).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

QUERY_SHARD = 1024  # queries per search task


class _ShardEmbedder:
    """Ray Data actor: embeds gallery shards with a model loaded once per actor."""

    def __init__(self, model_ref: list, gallery_ref: list, cache: str, image_size: int, target_ratio: float,
                 shard_size: int, batch_size: int, dtype: str | None):
        import ray
        import torch

        self.model = ray.get(model_ref[0])
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.model.eval()
        self.gallery = ray.get(gallery_ref[0])
        self.cache = Path(cache)
        self.size, self.ratio = image_size, target_ratio
        self.shard_size, self.batch_size, self.dtype = shard_size, batch_size, dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from detailfusion.retrieval.shards import ensure_shard

        out = {"shard": [], "digest": [], "embedded": [], "seconds": []}
        for i in batch["shard"].tolist():
            done = ensure_shard(self.model, self.gallery, self.cache, i, shard_size=self.shard_size,
                                image_size=self.size, target_ratio=self.ratio, batch_size=self.batch_size,
                                dtype=self.dtype)
            out["shard"].append(i)
            out["digest"].append(done.digest)
            out["embedded"].append(done.embedded or 0)
            out["seconds"].append(done.seconds)
        return {k: np.asarray(v) for k, v in out.items()}


class _QueryShardSearch:
    """Ray Data actor: exact top-k of query shards against the gallery embeddings it holds."""

    def __init__(self, refs: list, k: int, shard: int, device: str, dtype: str | None):
        import ray

        self.queries, self.gallery, self.exclude = ray.get(refs)
        self.k, self.shard, self.device, self.dtype = k, shard, device, dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from detailfusion.retrieval.search import exact_search

        starts, scores, idx = [], [], []
        for start in batch["start"].tolist():
            stop = min(start + self.shard, len(self.queries))
            ex = None if self.exclude is None else self.exclude[start:stop]
            s, i = exact_search(self.queries[start:stop], self.gallery, self.k, device=self.device,
                                dtype=self.dtype, exclude=ex)
            starts.append(start)
            scores.append(s)
            idx.append(i)
        return {"start": np.asarray(starts), "scores": np.stack(scores), "indices": np.stack(idx)}


class RayEngine:
    """The job's gallery-embedding and search steps on Ray Data (see the module docs)."""

    name = "ray"

    def __init__(self, num_actors: int | None = None, query_shard: int = QUERY_SHARD):
        import ray

        self.query_shard = int(query_shard)
        resources = ray.cluster_resources()
        self.gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        self.num_actors = num_actors or max(1, self.gpus or min(cpus, 4))

    def _map(self, ds, cls, kwargs: dict, gpu: bool):
        extra = {"num_gpus": 1} if gpu and self.gpus else {"num_cpus": 1}
        import ray

        pool = ray.data.ActorPoolStrategy(size=self.num_actors)
        return ds.map_batches(cls, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy", compute=pool,
                              **extra)

    def embed_gallery_shards(self, model, gallery, cache: str | Path, *, model_identity: str, image_size: int,
                             target_ratio: float, shard_size: int = 10_000, batch_size: int = 256,
                             readers: int = 8, dtype: str | None = None, progress: bool = True):
        """Same contract and cache as :func:`detailfusion.retrieval.shards.embed_gallery_shards`."""
        import hashlib

        import ray

        from detailfusion.errors import DetailFusionError
        from detailfusion.retrieval.shards import load_shards, prepare_cache

        cache, key, invalidated, n, n_shards = prepare_cache(
            cache, n=len(gallery), model_identity=model_identity, image_size=image_size,
            target_ratio=target_ratio, shard_size=shard_size, batch_size=batch_size, embed_dim=model.embed_dim,
            dtype=dtype)
        shipped = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
        kwargs = {"model_ref": [ray.put(shipped)], "gallery_ref": [ray.put(gallery)],
                  "cache": str(cache.resolve()), "image_size": image_size, "target_ratio": target_ratio,
                  "shard_size": shard_size, "batch_size": batch_size, "dtype": dtype}
        ds = ray.data.from_items([{"shard": i} for i in range(n_shards)], override_num_blocks=n_shards)
        rows = self._map(ds, _ShardEmbedder, kwargs, gpu=True).take_all()
        rows.sort(key=lambda r: int(r["shard"]))
        if [int(r["shard"]) for r in rows] != list(range(n_shards)):
            raise DetailFusionError(f"ray engine: {len(rows)} of {n_shards} gallery shards came back")
        embedded = [int(r["embedded"]) for r in rows]
        seconds = float(sum(float(r["seconds"]) for r in rows))
        out = load_shards(cache, n_shards, model.embed_dim)
        out.stats.update({
            "shards": n_shards, "shards_embedded": sum(e > 0 for e in embedded),
            "shards_reused": sum(e == 0 for e in embedded), "images_embedded": sum(embedded),
            "cache_invalidated": invalidated, "embed_seconds": seconds, "engine": "ray",
            "ray_actors": self.num_actors,
        })
        out.stats["content_digest"] = hashlib.sha256("".join(str(r["digest"]) for r in rows).encode()).hexdigest()
        out.stats["images_per_s"] = sum(embedded) / seconds if seconds else None
        return out

    def run_search(self, queries: np.ndarray, gallery: np.ndarray, cfg, exclude: np.ndarray | None):
        """Same contract as :func:`detailfusion.retrieval.searching.run_search`; exact search per query shard."""
        import ray

        from detailfusion.retrieval.searching import run_search

        if cfg.index != "exact" or len(queries) == 0:
            return run_search(queries, gallery, cfg, exclude)
        k = max(1, min(cfg.top_k, gallery.shape[0] - (1 if exclude is not None else 0)))
        refs = [ray.put(np.ascontiguousarray(queries)), ray.put(np.ascontiguousarray(gallery)),
                ray.put(exclude)]
        starts = list(range(0, len(queries), self.query_shard))
        ds = ray.data.from_items([{"start": s} for s in starts], override_num_blocks=len(starts))
        kwargs = {"refs": refs, "k": k, "shard": self.query_shard, "device": cfg.device, "dtype": cfg.search_dtype}
        rows = sorted(self._map(ds, _QueryShardSearch, kwargs, gpu=cfg.device.startswith("cuda")).take_all(),
                      key=lambda r: int(r["start"]))
        scores = np.concatenate([np.asarray(r["scores"], dtype=np.float32) for r in rows])
        idx = np.concatenate([np.asarray(r["indices"], dtype=np.int64) for r in rows])
        return scores, idx, {"kind": "exact", "k": k, "engine": "ray", "query_shards": len(starts)}


def run_retrieval_ray(cfg, *, tracking=None, registry=None, params: dict | None = None, progress: bool = True,
                      num_actors: int | None = None, query_shard: int = QUERY_SHARD) -> dict:
    """:func:`~detailfusion.retrieval.job.run_retrieval` on Ray (connects like ``ray.init()``)."""
    import ray

    from detailfusion.retrieval.job import run_retrieval

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=progress)
    try:
        return run_retrieval(cfg, tracking=tracking, registry=registry, params=params, progress=progress,
                             engine=RayEngine(num_actors, query_shard))
    finally:
        if started:
            ray.shutdown()
