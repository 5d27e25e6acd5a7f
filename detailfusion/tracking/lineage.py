"""Lineage: the tags that lead from any MLflow number back to exact code, data and params.

Every run carries the git commit (and whether the working tree was dirty), the ``data.dvc``
hash, the DVC experiment name and baseline revision when ``dvc exp run`` runs the stage, the
Prefect flow-run id when a flow runs it, the DVC stage and the ablation variant. Data sets are
identified by a content digest of their manifest (:func:`frame_digest`), logged with
``mlflow.log_input`` so the MLflow UI shows which data each run read.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import pandas as pd

UNKNOWN = "unknown"

# Tag keys, in one place so runs, registry versions and tests agree.
TAG_GIT_COMMIT = "git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_GIT_BRANCH = "git.branch"
TAG_DATA_DVC = "data.dvc_md5"
TAG_DVC_EXP = "dvc.exp_name"
TAG_DVC_BASELINE = "dvc.baseline_rev"
TAG_DVC_STAGE = "dvc.stage"
TAG_PREFECT_FLOW_RUN = "prefect.flow_run_id"
TAG_ABLATION = "ablation"
TAG_DATASET = "dataset"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_state(root: Path) -> dict[str, str]:
    """Commit, dirty flag and branch of the work tree at ``root`` (``unknown`` outside git)."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {TAG_GIT_COMMIT: UNKNOWN, TAG_GIT_DIRTY: UNKNOWN, TAG_GIT_BRANCH: UNKNOWN}
    # Untracked files do not change what the tracked code computes; modified tracked files do.
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        TAG_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: UNKNOWN if status is None else str(bool(status)).lower(),
        TAG_GIT_BRANCH: branch or UNKNOWN,
    }


def data_dvc_hash(root: Path, dvc_file: str = "data.dvc") -> str:
    """The md5 DVC recorded for the raw data (``outs[].md5``, joined when several); ``absent``/``unknown``."""
    path = root / dvc_file
    if not path.is_file():
        return "absent"
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        hashes = [str(out.get("md5") or out.get("etag") or UNKNOWN) for out in meta.get("outs", [])]
    except (yaml.YAMLError, AttributeError, OSError):
        return UNKNOWN
    return ",".join(hashes) or UNKNOWN


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run we are inside, if any (context first, then the env var).

    Prefect's runtime context only exists in a process that already imported prefect (code
    running in a flow); the stage commands the flows start get the id in ``PREFECT__FLOW_RUN_ID``.
    So prefect is not imported here for it (that import costs every stage process seconds)."""
    run_id = None
    if "prefect" in sys.modules:
        try:
            from prefect.runtime import flow_run

            run_id = flow_run.id
        except Exception:  # its runtime unusable here: fall back to the env var
            pass
    return str(run_id) if run_id else os.environ.get("PREFECT__FLOW_RUN_ID") or None


def lineage_tags(root: Path, *, dataset: str | None = None, variant: str | None = None) -> dict[str, str]:
    """All lineage tags for a run started now in the repository at ``root``."""
    tags = git_state(root)
    if tags[TAG_GIT_COMMIT] != UNKNOWN:
        tags[MLFLOW_GIT_COMMIT] = tags[TAG_GIT_COMMIT]
    tags[TAG_DATA_DVC] = data_dvc_hash(root)
    for tag, env in ((TAG_DVC_EXP, "DVC_EXP_NAME"), (TAG_DVC_BASELINE, "DVC_EXP_BASELINE_REV"), (TAG_DVC_STAGE, "DVC_STAGE")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        tags[TAG_PREFECT_FLOW_RUN] = flow_run_id
    if dataset:
        tags[TAG_DATASET] = dataset
    if variant:
        tags[TAG_ABLATION] = variant
    return tags


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True, default=str)
    if hasattr(value, "tolist"):  # numpy arrays from parquet list columns
        return json.dumps(value.tolist(), sort_keys=True, default=str)
    return value


def frame_digest(df: pd.DataFrame) -> str:
    """A content digest of a whole table (columns, dtypes and every row), 16 hex characters.

    MLflow's own pandas digest looks at the first rows only; a manifest digest must change when
    any row does.
    """
    import pandas as pd

    h = hashlib.sha256()
    h.update(json.dumps([[str(c), str(t)] for c, t in df.dtypes.items()]).encode())
    norm = df.copy()
    for col in norm.columns:
        if norm[col].dtype == object:
            norm[col] = norm[col].map(_hashable).astype("str")
    if len(norm):
        h.update(pd.util.hash_pandas_object(norm, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]
