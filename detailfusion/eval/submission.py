"""CIRR test-server submission files: write them, read them back, and score them on a labelled split.

The server takes two flat JSON dicts (``docs/data-formats.md``, "CIRR test-server submission files")::

    {"version": "rc2", "metric": "recall",        "<pairid>": [50 names, best first], ...}
    {"version": "rc2", "metric": "recall_subset", "<pairid>": [3 names, best first], ...}

Keys are ``str(int(pairid))``, names carry no file extension, no list contains the query's
reference, files are dumped with ``sort_keys=True`` and must stay under 5 MB.
:func:`metrics_from_submission` recomputes the CIRR metrics from the files and a ``queries``
manifest, so the pipeline can check that what it uploads scores exactly what it logged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from detailfusion.errors import DataFormatError
from detailfusion.eval.metrics import cirr_metrics
from detailfusion.fsutil import read_json_object, write_text_atomic

VERSION = "rc2"
RECALL_METRIC = "recall"
SUBSET_METRIC = "recall_subset"
LIST_LENGTH = {RECALL_METRIC: 50, SUBSET_METRIC: 3}
# The server's limit is "5 MB"; the decimal reading is the stricter one.
MAX_SUBMISSION_BYTES = 5_000_000
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def submission_paths(out_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(recall_submission_<split>.json, recall_subset_submission_<split>.json)`` under ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"recall_submission_{split}.json", out_dir / f"recall_subset_submission_{split}.json"


def write_cirr_submission(
    pairids: Sequence[int | str],
    ranked_names: Sequence[Sequence[str]],
    subset_ranked: Sequence[Sequence[str]],
    out_dir: str | Path,
    split: str,
    references: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write both submission files for ``split`` atomically; returns ``(recall_path, subset_path)``.

    ``ranked_names`` / ``subset_ranked`` are reference-free rankings (as from
    :func:`detailfusion.eval.metrics.cirr_rankings`), of which the top 50 / top 3 are kept. Raises
    :class:`DataFormatError` naming the file and pairid when a list is too short, repeats a name,
    holds a name with an image extension or (given ``references``) the reference, when pairids
    repeat, or when a file would exceed :data:`MAX_SUBMISSION_BYTES`. Nothing is written on error.
    """
    recall_path, subset_path = submission_paths(out_dir, split)
    n = len(pairids)
    if len(ranked_names) != n or len(subset_ranked) != n:
        raise DataFormatError(
            recall_path,
            f"{n} pairids but {len(ranked_names)} rankings and {len(subset_ranked)} subset rankings",
        )
    if references is not None and len(references) != n:
        raise DataFormatError(recall_path, f"{n} pairids but {len(references)} references")
    keys = [_pairid_key(p, recall_path) for p in pairids]
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise DataFormatError(recall_path, "pairid occurs twice", record=key)
        seen.add(key)

    texts = {}
    for path, metric, rankings in (
        (recall_path, RECALL_METRIC, ranked_names),
        (subset_path, SUBSET_METRIC, subset_ranked),
    ):
        length = LIST_LENGTH[metric]
        payload: dict[str, object] = {"version": VERSION, "metric": metric}
        for i, (key, row) in enumerate(zip(keys, rankings, strict=True)):
            names = [str(name) for name in row[:length]]
            reference = None if references is None else str(references[i])
            _check_names(names, length, reference, path, key)
            payload[key] = names
        text = json.dumps(payload, sort_keys=True)
        size = len(text.encode("utf-8"))
        if size > MAX_SUBMISSION_BYTES:
            raise DataFormatError(
                path, f"{size} bytes exceeds the server limit of {MAX_SUBMISSION_BYTES} bytes"
            )
        texts[path] = text
    for path, text in texts.items():
        write_text_atomic(path, text)
    return recall_path, subset_path


def read_cirr_submission(path: str | Path) -> tuple[str, dict[str, list[str]]]:
    """Read and validate one submission file; returns ``(metric, {pairid: names})``.

    Raises :class:`DataFormatError` naming the file (and pairid) when the file is missing or not
    JSON, ``version``/``metric`` are wrong, a key is not a canonical integer string, or a list
    has the wrong length, non-string entries, repeated names or names with an image extension.
    """
    path = Path(path)
    data = read_json_object(path, missing="submission file not found")
    if data.get("version") != VERSION:
        raise DataFormatError(path, f"'version' must be {VERSION!r}, got {data.get('version')!r}")
    metric = data.get("metric")
    if metric not in LIST_LENGTH:
        raise DataFormatError(path, f"'metric' must be one of {sorted(LIST_LENGTH)}, got {metric!r}")
    length = LIST_LENGTH[metric]
    rankings: dict[str, list[str]] = {}
    for key, names in data.items():
        if key in ("version", "metric"):
            continue
        if not key.isdigit() or str(int(key)) != key:
            raise DataFormatError(path, "key is not a pairid written as str(int(pairid))", record=key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataFormatError(path, "value must be a list of image-name strings", record=key)
        _check_names(names, length, None, path, key)
        rankings[key] = names
    return metric, rankings


def metrics_from_submission(
    recall_path: str | Path, subset_path: str | Path, queries_df: pd.DataFrame
) -> dict[str, float]:
    """CIRR metrics (``R@1/5/10/50``, ``Rsub@1/2/3``, ``Avg``) recomputed from submission files.

    ``queries_df`` is a ``queries`` manifest with at least ``pairid``, ``target``, ``reference``
    and ``members``. The files must hold exactly the manifest's pairids, no list may contain the
    query's reference and every subset name must be one of the query's members; the result equals
    :func:`detailfusion.eval.metrics.cirr_metrics` on the same rankings.
    """
    missing = {"pairid", "target", "reference", "members"} - set(queries_df.columns)
    if missing:
        raise DataFormatError(recall_path, f"queries manifest lacks columns {sorted(missing)}")
    recall_path, subset_path = Path(recall_path), Path(subset_path)
    files = {}
    for path, expected in ((recall_path, RECALL_METRIC), (subset_path, SUBSET_METRIC)):
        metric, rankings = read_cirr_submission(path)
        if metric != expected:
            raise DataFormatError(path, f"'metric' is {metric!r}, expected {expected!r}")
        files[path] = rankings

    keys = []
    for pairid in queries_df["pairid"]:
        if pd.isna(pairid):
            raise DataFormatError(recall_path, "queries manifest has a query without pairid")
        keys.append(str(int(pairid)))
    key_set = set(keys)
    for path, rankings in files.items():
        for key in keys:
            if key not in rankings:
                raise DataFormatError(path, "pairid of the queries manifest is missing", record=key)
        extra = sorted(set(rankings) - key_set, key=int)
        if extra:
            raise DataFormatError(path, "pairid is not in the queries manifest", record=extra[0])

    recall, subset = files[recall_path], files[subset_path]
    targets = []
    for key, target, reference, members in zip(
        keys, queries_df["target"], queries_df["reference"], queries_df["members"], strict=True
    ):
        if not isinstance(target, str):
            raise DataFormatError(
                recall_path, "query has no target (test split?): cannot be scored", record=key
            )
        for path, names in ((recall_path, recall[key]), (subset_path, subset[key])):
            if reference in names:
                raise DataFormatError(path, f"list contains the query's reference {reference!r}", record=key)
        allowed = set(members)
        outside = [n for n in subset[key] if n not in allowed]
        if outside:
            raise DataFormatError(
                subset_path, f"{outside[0]!r} is not one of the query's set members", record=key
            )
        targets.append(target)
    return cirr_metrics([recall[k] for k in keys], [subset[k] for k in keys], targets)


def _pairid_key(pairid: int | str, path: Path) -> str:
    try:
        return str(int(pairid))
    except (TypeError, ValueError) as exc:
        raise DataFormatError(path, f"pairid {pairid!r} is not an integer") from exc


def _check_names(names: list[str], length: int, reference: str | None, path: Path, key: str) -> None:
    if len(names) != length:
        raise DataFormatError(path, f"list holds {len(names)} names, the server expects {length}", record=key)
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise DataFormatError(path, f"name {dup!r} occurs twice in one list", record=key)
    for name in names:
        if name.lower().endswith(_IMAGE_EXTENSIONS):
            raise DataFormatError(path, f"name {name!r} must not carry a file extension", record=key)
    if reference is not None and reference in names:
        raise DataFormatError(path, f"list contains the query's reference {reference!r}", record=key)

