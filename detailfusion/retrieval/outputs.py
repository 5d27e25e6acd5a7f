"""Writing a retrieval job's results: staged locally, then published all at once.

Everything is written into a staging folder first; only when every file is complete are they
moved into the output (local: ``os.replace`` per file, ``summary.json`` last; ``s3://``: uploaded
after everything was computed, ``summary.json`` last). A failure before that leaves no result
file in the output, half-written or otherwise.

Layout of an output folder::

    results.parquet      query_id, rank (1-based), image_id, score
    errors.parquet       kind (gallery|query), item_id, source, error  (always written, maybe empty)
    summary.json         counts, timings, throughput, model, index, recall estimate, tracking
    report/index.html    sample queries with their top-k (target outlined where known)
    submission/          CIRR test-server files (CIRR-format queries only)
    gallery/             embeddings/img_emb_*.npy + metadata/metadata_*.parquet (the shard cache)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from detailfusion.retrieval.storage import StorageError, describe, filesystem, is_remote, join, local_path

RESULT_COLUMNS = ("query_id", "rank", "image_id", "score")


def results_frame(query_ids: list[str], indices: np.ndarray, scores: np.ndarray, names: list[str]) -> pd.DataFrame:
    """Long format: one row per (query, rank); ``indices`` into ``names``, -1 = no result."""
    q_rep = np.repeat(np.asarray(query_ids, dtype=object), indices.shape[1])
    ranks = np.tile(np.arange(1, indices.shape[1] + 1, dtype=np.int32), indices.shape[0])
    flat, sc = indices.reshape(-1), scores.reshape(-1).astype(np.float32)
    keep = flat >= 0
    name_arr = np.asarray(names, dtype=object)
    return pd.DataFrame({"query_id": q_rep[keep], "rank": ranks[keep], "image_id": name_arr[flat[keep]],
                         "score": sc[keep]})


class Staging:
    """A private folder the job writes into; :meth:`publish` moves it to the output."""

    def __init__(self, out: str, endpoint: str | None = None):
        self.out = out
        self.endpoint = endpoint
        base = None if is_remote(out) else local_path(out).resolve().parent
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".retrieve-staging-", dir=base))

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def files(self) -> list[str]:
        rels = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
        return [r for r in rels if r != "summary.json"] + (["summary.json"] if "summary.json" in rels else [])

    def publish(self, extra: dict[str, Path] | None = None) -> list[str]:
        """Move every staged file (and ``extra`` {relative name: local file}) into the output."""
        extra = extra or {}
        names = self.files()
        if is_remote(self.out):
            fs, root = filesystem(self.out, self.endpoint)
            uploads = [(self.dir / r, r) for r in names if r != "summary.json"] + list(
                (p, r) for r, p in extra.items())
            if "summary.json" in names:
                uploads.append((self.dir / "summary.json", "summary.json"))
            for src, rel in uploads:
                try:
                    fs.put_file(str(src), f"{root.rstrip('/')}/{rel}")
                except Exception as exc:
                    raise StorageError(f"{join(self.out, rel)}: upload failed: {describe(exc)}") from None
            return [join(self.out, rel) for _, rel in uploads]
        out = local_path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for rel in names:
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.dir / rel, dest)
            written.append(str(dest))
        return written

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
