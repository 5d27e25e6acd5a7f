"""``detailfusion retrieve``: a batch retrieval job from the command line (see ``job.py``)."""

from __future__ import annotations

import argparse
import json
import os


def cmd_retrieve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from detailfusion.config import to_dict
    from detailfusion.retrieval.job import RetrieveConfig, run_retrieval

    # the top-level CLI has checked all of --params (the checkout's params.yaml outside a checkout)
    config = args.config
    tracking = replace(config.tracking, enabled=False) if args.no_track else config.tracking
    registry = config.registry
    params = {"prepare": to_dict(config.prepare)}
    dataset = args.dataset or config.dataset
    cfg = RetrieveConfig(
        gallery=args.gallery, queries=args.queries, out=args.out, model=args.model, dataset=dataset,
        gallery_format=args.gallery_format, split=args.split, category=args.category or "",
        query_image_root=args.query_image_root, work_dir=args.work_dir, top_k=args.top_k, index=args.index,
        nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, recall_sample=args.recall_sample,
        shard_size=args.shard_size, batch_size=args.batch_size, device=args.device, embed_dtype=args.embed_dtype,
        search_dtype=args.search_dtype, image_size=args.image_size,
        target_ratio=args.target_ratio, exclude_reference=args.exclude_reference, on_error=args.on_error,
        report_samples=args.report_samples, report_top_k=args.report_top_k,
        endpoint_url=args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None, seed=args.seed,
    )
    if args.engine == "ray":
        try:
            from detailfusion.retrieval.ray_engine import run_retrieval_ray
        except ImportError as exc:
            from detailfusion.errors import DetailFusionError

            raise DetailFusionError(f"--engine ray is not available here: {exc}") from None

        summary = run_retrieval_ray(cfg, tracking=tracking, registry=registry, params=params,
                                    progress=not args.quiet)
    else:
        summary = run_retrieval(cfg, tracking=tracking, registry=registry, params=params, progress=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("retrieve", help="batch retrieval: embed a gallery (resumable shards), search, write")
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a saved model "
                                   "folder (default: models:/detailfusion-<dataset>@champion)")
    p.add_argument("--dataset", help="data set whose registered model is the default (default: params "
                                     "stage2_branches.dataset)")
    p.add_argument("--gallery", required=True, help="prepared data set folder, image folder (local or s3://) "
                                                    "or a CIRR/FashionIQ data set root")
    p.add_argument("--gallery-format", default="auto", choices=["auto", "prepared", "folder", "cirr", "fashioniq"])
    p.add_argument("--split", default="val", help="gallery split of a prepared/native gallery (default: val)")
    p.add_argument("--category", help="FashionIQ category of the gallery")
    p.add_argument("--queries", required=True, help="parquet/JSONL (reference + caption columns) or a "
                                                    "CIRR/FashionIQ captions file; local or s3://")
    p.add_argument("--query-image-root", help="folder that relative reference image paths resolve against "
                                              "(default: the query file's folder)")
    p.add_argument("--out", required=True, help="output folder, local or s3://bucket/prefix")
    p.add_argument("--work-dir", help="local folder for the resumable gallery shards (default: OUT/gallery, "
                                      "or ~/.cache/detailfusion/retrieve/<hash> for an s3:// OUT)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--index", default="exact", choices=["exact", "flat", "ivf_flat", "ivf_pq"])
    p.add_argument("--nlist", type=int, help="IVF lists (default: chosen from the gallery size)")
    p.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantizers")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--recall-sample", type=int, default=1000, help="queries checked against exact search "
                                                                   "(approximate indexes)")
    p.add_argument("--shard-size", type=int, default=4096, help="gallery images per embedding shard")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for embedding and exact search")
    p.add_argument("--embed-dtype", choices=["fp32", "bf16", "fp16"], help="embed under autocast (GPU: bf16)")
    p.add_argument("--search-dtype", choices=["fp32", "bf16", "fp16"], help="exact search precision (CUDA only)")
    p.add_argument("--image-size", type=int, help="decode size for image files (default: the model's setting)")
    p.add_argument("--target-ratio", type=float, help="targetpad ratio (default: the model's setting)")
    p.add_argument("--exclude-reference", default="auto", choices=["auto", "yes", "no"],
                   help="drop each query's reference from its ranking (auto: CIRR-format queries)")
    p.add_argument("--on-error", default="record", choices=["record", "fail"],
                   help="unreadable gallery images / queries: error rows (record) or stop (fail)")
    p.add_argument("--report-samples", type=int, default=12)
    p.add_argument("--report-top-k", type=int, default=8)
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_retrieve)
    return p
