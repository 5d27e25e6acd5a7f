"""Retrieval benchmarks: exact search vs FAISS and NumPy, IVF indexes on clustered 1M vectors, embedding.

    python bench/retrieval.py                               # all parts on CPU (~10 min on 2 cores)
    python bench/retrieval.py --parts search --sizes 10000,100000 --dims 256
    python bench/retrieval.py --device cuda                 # fp16 exact search + bf16 embedding on a GPU

Parts, all measured in one run on the same machine:

* ``search``: top-50 throughput (queries/s) of :func:`detailfusion.retrieval.search.exact_search`,
  FAISS ``IndexFlatIP`` and plain NumPy (BLAS product + ``argpartition``) on unit-Gaussian galleries
  of each size x dimension, fp32. Every case runs in its own subprocess so its peak RSS is its own
  (``resource.getrusage`` in the child; reported as the peak while searching minus the peak after
  the gallery was built). Our top-50 is compared with FAISS's: identical sets, or differing only
  among scores tied with the 50th (within 1e-5).
* ``ann``: FAISS IVF-Flat and IVF-PQ (exact re-ranking) on a clustered 1M gallery (see
  :func:`clustered_gallery`): queries/s, speed-up over our exact search on the same queries,
  recall@50 against exact.
* ``embed``: gallery embedding images/s with the tiny default model and the ViT-B-32-sized config
  (random init), from the uint8 pixel cache and from PNG/JPEG files (decode + targetpad + encode).

Prints markdown tables and writes JSON (``--out``).

One script on purpose (a little over 400 lines): the three parts share the galleries, the
one-subprocess-per-case runner that gives each case its own peak RSS, and the report of one run;
split up, a single benchmark run would be spread over several files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

K = 50
ROOT = Path(__file__).resolve().parents[1]


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def unit_gallery(n: int, d: int, seed: int) -> np.ndarray:
    """Unit-Gaussian rows, generated in chunks so the peak memory is the gallery itself."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        out[s : s + 65536] = _normalize_rows(rng.standard_normal((min(65536, n - s), d), dtype=np.float32))
    return out


def clustered_gallery(n: int, d: int, seed: int) -> np.ndarray:
    """Embeddings with the structure of a real image gallery (fixed before any index was tuned).

    An anisotropic space (axis standard deviations fall as ``j**-0.5``, then a random rotation,
    like the decaying spectrum of trained embeddings); 100 coarse categories, each with fine
    clusters (2,000 in all) whose sizes follow a log-normal law (sigma 1: a few large, many
    small) and whose spreads vary (log-normal around 0.55 of the category spread); a shared
    direction of weight 0.7 is added after a first normalisation (trained embeddings sit in a
    narrow cone: random pairs have a positive mean cosine); rows are in random order, as in a
    gallery of mixed sources, and L2-normalised.
    """
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, d + 1) ** -0.5).astype(np.float32)
    scale *= np.sqrt(d) / np.linalg.norm(scale)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
    coarse = rng.standard_normal((100, d)).astype(np.float32) * scale
    n_fine = 2000
    parent = rng.integers(0, 100, n_fine)
    fine = coarse[parent] + 0.7 * rng.standard_normal((n_fine, d)).astype(np.float32) * scale
    weights = rng.lognormal(0.0, 1.0, n_fine)
    members = rng.choice(n_fine, size=n, p=weights / weights.sum())
    spread = rng.lognormal(np.log(0.55), 0.3, n_fine).astype(np.float32)
    shared = _normalize_rows(rng.standard_normal((1, d)).astype(np.float32))
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65536):
        m = members[s : s + 65536]
        x = fine[m] + spread[m, None] * rng.standard_normal((len(m), d)).astype(np.float32) * scale
        out[s : s + 65536] = _normalize_rows(_normalize_rows(x @ rotation) + 0.7 * shared)
    return out


def perturbed_queries(gallery: np.ndarray, nq: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """Queries near gallery items (cosine ~0.9 to their source), not uniform noise."""
    rng = np.random.default_rng(seed + 1)
    src = gallery[np.sort(rng.choice(len(gallery), nq, replace=False))]
    d = gallery.shape[1]
    q = src + np.float32(noise / np.sqrt(d)) * rng.standard_normal(src.shape, dtype=np.float32)
    return _normalize_rows(q.astype(np.float32, copy=False))


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def _numpy_search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain way: a similarity block per query chunk, argpartition, sort the k winners."""
    rows = max(1, (1 << 24) // g.shape[0])
    scores = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), rows):
        sims = q[s : s + rows] @ g.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx[s : s + rows] = np.take_along_axis(part, order, axis=1)
        scores[s : s + rows] = np.take_along_axis(vals, order, axis=1)
    return scores, idx


def case_search(spec: dict) -> dict:
    """One (method, n, d): build the gallery, warm up, time ``repeats`` searches of ``nq`` queries."""
    import torch

    from detailfusion.retrieval.search import exact_search

    n, d, nq, method = spec["n"], spec["d"], spec["nq"], spec["method"]
    g = unit_gallery(n, d, seed=n + d)
    q = perturbed_queries(g, nq, seed=n + d)
    extra: dict = {}
    if method == "ours":
        dev = spec["device"]
        dtype = "fp16" if dev == "cuda" else None
        gallery = torch.from_numpy(g).to(dev, torch.float16) if dev == "cuda" else g

        def search(queries):
            return exact_search(queries, gallery, K, device=dev, dtype=dtype)
    elif method == "faiss":
        import faiss

        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(d)
        index.add(g)
        extra["build_s"] = round(time.perf_counter() - t0, 3)

        def search(queries):
            return index.search(queries, K)
    else:
        def search(queries):
            return _numpy_search(queries, g, K)
    rss_before = _rss_peak_mb()
    search(q[:8])  # warm-up (thread pools, allocator, CUDA context) outside the timing
    seconds, (scores, idx) = _timed(lambda: search(q), spec["repeats"])
    np.save(spec["out_prefix"] + "_idx.npy", np.asarray(idx))
    np.save(spec["out_prefix"] + "_scores.npy", np.asarray(scores, dtype=np.float32))
    return {
        **{k: spec[k] for k in ("method", "n", "d", "nq", "repeats", "device")},
        "seconds_median": round(seconds, 4),
        "queries_per_s": round(nq / seconds, 1),
        "peak_rss_mb": round(_rss_peak_mb(), 1),
        "search_rss_delta_mb": round(_rss_peak_mb() - rss_before, 1),
        "threads": torch.get_num_threads(),
        **extra,
    }


def case_ann(spec: dict) -> dict:
    """IVF-Flat / IVF-PQ on the clustered gallery against our exact search on the same queries."""
    from detailfusion.retrieval.faiss_index import build_index, recall_at_k
    from detailfusion.retrieval.search import exact_search

    n, d, nq, repeats = spec["n"], spec["d"], spec["nq"], spec["repeats"]
    g = clustered_gallery(n, d, seed=7)
    q = perturbed_queries(g, nq, seed=7)
    exact_search(q[:8], g, K)
    exact_s, (exact_scores, exact_idx) = _timed(lambda: exact_search(q, g, K), repeats)
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, n, (20000, 2))
    stats = {
        "cos_random_pairs_mean": round(float(np.mean(np.sum(g[pairs[:, 0]] * g[pairs[:, 1]], axis=1))), 3),
        "cos_query_top1_mean": round(float(exact_scores[:, 0].mean()), 3),
        "cos_query_top50_mean": round(float(exact_scores[:, K - 1].mean()), 3),
    }
    rows = []
    for cfg in spec["configs"]:
        t0 = time.perf_counter()
        index = build_index(g, cfg["kind"], nlist=cfg["nlist"], pq_m=cfg.get("pq_m"), nbits=cfg.get("nbits", 8),
                            seed=0)
        build_s = time.perf_counter() - t0
        for probe in cfg["nprobe"]:
            for rerank in cfg.get("rerank", [None]):
                index.search(q[:8], K, nprobe=probe, rerank=rerank)
                sec, (_, idx) = _timed(partial(index.search, q, K, nprobe=probe, rerank=rerank), repeats)
                rows.append({
                    "kind": cfg["kind"], "nlist": cfg["nlist"], "pq_m": cfg.get("pq_m"),
                    "nbits": cfg.get("nbits") if cfg["kind"] == "ivf_pq" else None, "nprobe": probe,
                    "rerank": rerank, "build_s": round(build_s, 1), "queries_per_s": round(nq / sec, 1),
                    "speedup_vs_exact": round(exact_s / sec, 2),
                    "recall_at_50": round(recall_at_k(idx, exact_idx, K), 4),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"n": n, "d": d, "nq": nq, "exact_queries_per_s": round(nq / exact_s, 1), "data": stats,
            "configs": rows, "peak_rss_mb": round(_rss_peak_mb(), 1)}


def _synthetic_picture(rng: np.random.Generator, w: int, h: int):
    """A smooth picture with shapes (compresses like a photo far more than noise does)."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([(np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80))) for c in range(3)], 2)
    img = Image.fromarray(((base * 0.5 + 0.5) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return img.filter(ImageFilter.GaussianBlur(1))


def case_embed(spec: dict) -> dict:
    """Gallery embedding images/s of one model config, from the pixel cache or from image files."""
    import torch

    from detailfusion.models import create_model
    from detailfusion.params import repo_section
    from detailfusion.retrieval.embed import embed_gallery, encode_images, pixels_from_bytes

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    model = create_model(spec["config"]).to(dev).eval()
    size, n, batch = model.image_size, spec["images"], spec["batch"]
    ratio = repo_section("prepare").target_ratio  # the pipeline's targetpad ratio
    rng = np.random.default_rng(0)
    if spec["source"] == "cache":
        pixels = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        embed_gallery(model, pixels, np.arange(min(batch, n)), batch_size=batch, dtype=dtype)

        def run():
            return embed_gallery(model, pixels, np.arange(n), batch_size=batch, dtype=dtype)
    else:
        fmt = spec["source"]
        blobs = []
        for _ in range(min(n, 16)):
            buf = io.BytesIO()
            _synthetic_picture(rng, 640, 480).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
            blobs.append(buf.getvalue())
        folder = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
        paths = []
        for i in range(n):
            p = folder / f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}"
            p.write_bytes(blobs[i % len(blobs)])
            paths.append(p)

        def run():
            out = []
            for s in range(0, n, batch):
                raw = np.stack([pixels_from_bytes(p.read_bytes(), size, ratio, source=str(p)) for p in paths[s : s + batch]])
                out.append(encode_images(model, raw, dtype=dtype))
            return torch.cat(out)

        run_small = paths[:batch]
        encode_images(model, np.stack([pixels_from_bytes(p.read_bytes(), size, ratio) for p in run_small]), dtype=dtype)
        spec["mean_file_kb"] = round(float(np.mean([len(b) for b in blobs])) / 1024, 1)
    seconds, emb = _timed(run, spec["repeats"])
    assert emb.shape == (n, model.embed_dim)
    return {**spec, "images_per_s": round(n / seconds, 2), "image_size": size,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "peak_rss_mb": round(_rss_peak_mb(), 1), "threads": torch.get_num_threads()}


CASES = {"search": case_search, "ann": case_ann, "embed": case_embed}


def _child(kind: str, spec: dict, timeout: int = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {kind} {spec} failed with exit code {proc.returncode} (see stderr above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_top_k(a_prefix: str, b_prefix: str, tol: float = 1e-5) -> dict:
    """Same top-50 up to ties: identical sets, or differing only where scores tie the 50th."""
    ia, ib = np.load(a_prefix + "_idx.npy"), np.load(b_prefix + "_idx.npy")
    sa, sb = np.load(a_prefix + "_scores.npy"), np.load(b_prefix + "_scores.npy")
    identical = tied = 0
    for row_a, row_b, sc_a, sc_b in zip(ia, ib, sa, sb, strict=True):
        only_a, only_b = set(row_a) - set(row_b), set(row_b) - set(row_a)
        if not only_a:
            identical += 1
            continue
        kth = min(sc_a[-1], sc_b[-1])
        diff_scores = [sc_a[list(row_a).index(j)] for j in only_a] + [sc_b[list(row_b).index(j)] for j in only_b]
        tied += all(abs(s - kth) <= tol for s in diff_scores)
    n = len(ia)
    return {"queries": n, "identical_sets": identical, "differ_only_in_ties": tied,
            "differ_otherwise": n - identical - tied}


def run_search_part(args, scratch: Path) -> list[dict]:
    rows = []
    methods = ("ours", "faiss", "numpy")
    for d in args.dims:
        for n in args.sizes:
            nq = args.queries or max(256, min(2000, 200_000_000 // (n * d) * 4))
            for method in methods:
                spec = {"method": method, "n": n, "d": d, "nq": nq, "repeats": args.repeats,
                        "device": args.device if method == "ours" else "cpu",
                        "out_prefix": str(scratch / f"{method}_{n}_{d}")}
                row = _child("search", spec)
                rows.append(row)
                print(f"search {method:6s} n={n:>8} d={d}: {row['queries_per_s']:>9.1f} q/s, "
                      f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
            same = compare_top_k(str(scratch / f"ours_{n}_{d}"), str(scratch / f"faiss_{n}_{d}"))
            rows[-3]["top50_vs_faiss"] = same
    return rows


def ann_configs(nlist: int) -> list[dict]:
    return [
        {"kind": "ivf_flat", "nlist": nlist, "nprobe": [8, 16, 32, 64]},
        {"kind": "ivf_pq", "nlist": nlist, "pq_m": 64, "nbits": 4, "nprobe": [8, 16, 32], "rerank": [200, 500]},
        {"kind": "ivf_pq", "nlist": nlist, "pq_m": 32, "nbits": 4, "nprobe": [16, 32], "rerank": [500]},
    ]


def markdown(results: dict) -> str:
    lines = []
    search_rows = results.get("search", [])
    if search_rows:
        lines += ["| gallery | d | queries | method | queries/s | peak RSS (MB) | search RSS delta (MB) | top-50 vs FAISS |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in search_rows:
            same = r.get("top50_vs_faiss")
            note = ""
            if same:
                note = f"{same['identical_sets']}/{same['queries']} identical, {same['differ_only_in_ties']} tie-only"
            method = {"ours": f"exact_search ({r['device']})", "faiss": "FAISS IndexFlatIP", "numpy": "NumPy"}[r["method"]]
            lines.append(f"| {r['n']:,} | {r['d']} | {r['nq']} | {method} | {r['queries_per_s']:,.1f} | "
                         f"{r['peak_rss_mb']:,.0f} | {r['search_rss_delta_mb']:,.0f} | {note} |")
    ann = results.get("ann")
    if ann:
        lines += ["", f"Clustered {ann['n']:,} x {ann['d']} ({ann['nq']} queries): exact_search "
                  f"{ann['exact_queries_per_s']:,.1f} queries/s; data: {ann['data']}", "",
                  "| index | nlist | PQ | nprobe | rerank | build (s) | queries/s | speed-up vs exact | recall@50 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ann["configs"]:
            pq = f"{r['pq_m']}x{r['nbits']}" if r["pq_m"] else "-"
            lines.append(f"| {r['kind']} | {r['nlist']} | {pq} | {r['nprobe']} | {r['rerank'] or '-'} | "
                         f"{r['build_s']} | {r['queries_per_s']:,.1f} | {r['speedup_vs_exact']}x | {r['recall_at_50']:.4f} |")
    emb = results.get("embed", [])
    if emb:
        lines += ["", "| model | params (M) | image size | source | images | batch | images/s | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in emb:
            lines.append(f"| {r['config']} | {r['params_m']} | {r['image_size']} | {r['source']} | {r['images']} | "
                         f"{r['batch']} | {r['images_per_s']:,.2f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="search,ann,embed")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="256,512")
    ap.add_argument("--queries", type=int, default=0, help="queries per search case (0: more for small galleries)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per case; the median is reported")
    ap.add_argument("--ann-size", type=int, default=1_000_000)
    ap.add_argument("--ann-queries", type=int, default=500)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--configs", default="tiny,vit-b-32")
    ap.add_argument("--ann-pq-only", action="store_true", help="IVF-Flat + IVF-PQ 64x4 only (shorter run)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp16 exact search, bf16 embedding)")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, spec = args.child
        print(json.dumps(CASES[kind](json.loads(spec))))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here; GPU figures not measured", file=sys.stderr)
            return 2
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.dims = [int(x) for x in args.dims.split(",") if x]
    parts = set(args.parts.split(","))
    results: dict = {"machine": {"cpus": os.cpu_count(), "load_start": [round(x, 2) for x in os.getloadavg()],
                                 "device": args.device}}
    t0 = time.perf_counter()
    out = Path(args.out or f"bench/results/retrieval_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json")
    sys.path.insert(0, str(ROOT))
    from detailfusion.fsutil import write_json_atomic

    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        if "search" in parts:
            results["search"] = run_search_part(args, Path(tmp))
            write_json_atomic(out, results)
        if "ann" in parts:
            spec = {"n": args.ann_size, "d": 256, "nq": args.ann_queries, "repeats": args.repeats,
                    "configs": ann_configs(args.nlist)[: 2 if args.ann_pq_only else None]}
            results["ann"] = _child("ann", spec, timeout=3600)
            print(f"ann: exact {results['ann']['exact_queries_per_s']} q/s", flush=True)
            write_json_atomic(out, results)
    if "embed" in parts:
        results["embed"] = []
        for config in args.configs.split(","):
            small = config == "tiny"
            for source in ("cache", "png", "jpeg"):
                spec = {"config": config, "source": source, "device": args.device, "repeats": args.repeats,
                        "images": (512 if source == "cache" else 256) if small else 32, "batch": 128 if small else 16}
                row = _child("embed", spec)
                results["embed"].append(row)
                print(f"embed {config} {source}: {row['images_per_s']} images/s", flush=True)
    results["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    results["machine"]["wall_s"] = round(time.perf_counter() - t0, 1)
    table = markdown(results)
    print(table)
    write_json_atomic(out, results)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
