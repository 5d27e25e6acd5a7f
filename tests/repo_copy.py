"""A private git + DVC copy of this repository for tests that run the real pipeline (``dvc repro``).

The copy holds the working tree (tracked and untracked, not ignored, files), a shrunk
``params.yaml`` and one commit; its commands run offline, with this interpreter's tools first on
``PATH`` and the COPY's package first on ``PYTHONPATH``, so the code under test is the copy's
(not whatever the editable install points at). Used by test_pipeline and test_reproducible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_repo(dest: Path) -> None:
    """Copy the working tree's files (``git ls-files -co --exclude-standard``) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for rel in files:
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``check`` a failure raises an AssertionError with the output's tail."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


def repo_env(root: Path) -> dict[str, str]:
    """The environment for commands in the copy at ``root``: no inherited MLflow/DVC settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "DETAILFUSION_"))}
    env.update(PATH=f"{BIN}:{env['PATH']}", PYTHONPATH=str(root), HF_HUB_OFFLINE="1",
               GX_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return env


def make_repo_copy(root: Path, params: dict) -> dict[str, str]:
    """Copy the repository to ``root`` with ``params`` as its params.yaml, commit; returns the env."""
    root.mkdir(parents=True)
    copy_repo(root)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = repo_env(root)
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "copy"], root, env)
    return env
