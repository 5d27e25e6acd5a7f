"""``detailfusion ablations``: run the suite locally as DVC experiments, one after the other.

Each run is ``dvc exp run validate evaluate --temp -n abl-<variant>-s<seed> -S ...``
(:func:`~detailfusion.experiments.ablations.exp_run_command`), the same command the Prefect
``ablations`` flow runs per GPU worker. Sequential ``--temp`` runs rather than ``--queue`` +
``dvc queue start``: a queue worker keeps the environment it was started with, so a worker
already running for the repository would run our experiments without this suite's MLflow
parent (``$DETAILFUSION_PIPELINE_RUN_ID``), and ``--temp`` gives each run's exit status and
error output directly. Either way the workspace stays untouched and every finished run is a
DVC experiment (``dvc exp show``; ``dvc exp push <remote>`` publishes it to other clones).

A failing run is reported with its error (and its full output in ``<logs>/<name>.log``) and
loses none of the others. Rerunning the suite (e.g. after an interruption) reuses each
experiment of the same name at the same baseline that finished with the same params, and
replaces the others (``--rerun`` replaces all). Inside an experiment, a stage whose deps and
params match the baseline's ``dvc.lock`` is skipped (the data stages, the pretrained backbone,
and any training stage the run's overrides leave as it is); ``validate`` and ``evaluate``, whose
outputs are not cached, run each time. DVC's run cache does not help across experiments here: it skips every
stage with an uncached output that is not a DVC metric or plot, and each training stage (the
backbone's pretraining included) writes its metrics file as an uncached output (git tracks it;
an output, not a metric, so that ``dvc metrics show`` stays one readable row), so two experiments
with the same params both train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from detailfusion.config import flatten, load_params
from detailfusion.errors import ConfigError
from detailfusion.experiments.ablations import (
    NAME_PREFIX,
    AblationRun,
    DvcError,
    collect_from_dvc,
    differences,
    dvc_executable,
    dvc_exp_show,
    error_lines,
    exp_run_command,
    git_file_reader,
    markdown_table,
    parse_exp_show,
    plan,
    set_params,
    summarize,
)
from detailfusion.fsutil import write_json_atomic, write_text_atomic
from detailfusion.tracking import PIPELINE_RUN_ENV

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SuiteResult:
    """What :func:`run_suite` did: the summary, the failures (``{name: error}``), the MLflow parent
    and the markdown table written to the table file (the CLI prints it)."""

    summary: dict
    failed: dict[str, str]
    experiments: list[str]
    parent_run_id: str | None
    tracked: bool
    table: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def _git_head(repo: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"{repo}: ablations run as DVC experiments and need a git repository with a commit "
                          f"({done.stderr.strip() or 'git rev-parse HEAD failed'})")
    return done.stdout.strip()


def _with_overrides(params: dict, set_args: list[str]) -> dict:
    """``params`` with ``key.path=value`` overrides applied (values parsed as YAML, as DVC does)."""
    out = yaml.safe_load(yaml.safe_dump(params))
    for item in set_args:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def _existing(repo: Path, head: str, expected: dict[str, dict], dvc: str) -> tuple[list[str], list[str]]:
    """Experiments of baseline ``head`` named like ours: (reusable, stale). Reusable = finished
    with evaluation metrics and exactly the params this suite would run it with."""
    doc = [b for b in dvc_exp_show(repo, dvc=dvc) if b.get("rev") == head]
    finished = parse_exp_show(doc, list(expected), git_file_reader(repo))
    reuse, stale = [], []
    for baseline in doc:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name")
            if name not in expected:
                continue
            data = ((exp.get("revs") or [{}])[0].get("data") or {})
            ran_with = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            same = name in finished and flatten(ran_with) == flatten(expected[name])
            (reuse if same else stale).append(name)
    return reuse, stale


def _run_logged(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path, echo: bool) -> tuple[int, str]:
    """Run ``cmd``; its output goes to ``log_path`` (and stderr when ``echo``). Returns (rc, output)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    chunks: list[str] = []
    with log_path.open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()  # the log can be followed while the experiment runs
                chunks.append(line)
                if echo:
                    sys.stderr.write(line)
            rc = proc.wait()
        except BaseException:  # Ctrl-C: stop the experiment too, then re-raise
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return rc, "".join(chunks)


def run_suite(repo_dir: str | Path = ".", *, variants: list[str] | None = None, seeds: list[int] | None = None,
              budget_scale: float = 1.0, extra_params: dict[str | None, list[str]] | None = None,
              summary_path: str | Path = "metrics/ablations.json", table_path: str | Path = "reports/ablations.md",
              log_dir: str | Path = "reports/ablation_logs", push: str | None = None,
              parent_run_id: str | None = None, rerun: bool = False, echo: bool = True,
              dvc: str | None = None, prefix: str = NAME_PREFIX, every_seed: bool = False) -> SuiteResult:
    """Run every planned experiment (:func:`plan`; ``every_seed``: every seed for every entry),
    collect their metrics from DVC, write the summary JSON and table and log them to the MLflow
    parent. ``extra_params``: more ``-S key=value`` for every
    run (key None) or for one variant (key = variant name). ``push``: a git remote to
    ``dvc exp push`` each finished experiment to. An experiment of the same name at this baseline
    that finished with the same params is reused (resume) unless ``rerun``. ``prefix`` names the
    experiments ``<prefix>-<variant>-s<seed>``: a tuning sweep (``--set`` with another prefix) never
    replaces the suite's own ``abl-*`` runs. Paths are relative to ``repo_dir``."""
    from detailfusion.experiments.tracking import log_suite_summary

    repo = Path(repo_dir).resolve()
    dvc = dvc or dvc_executable()
    params_path = repo / "params.yaml"
    params = load_params(params_path)
    runs = plan(variants, seeds, prefix=prefix, every_seed=every_seed)
    extra = extra_params or {}
    bad = sorted(k for k in extra if k is not None and k not in {r.variant for r in runs})
    if bad:
        raise ConfigError(f"ablations: extra params given for variant(s) {bad} that are not in the suite")
    set_args = {r.name: set_params(r, budget_scale, params) + list(extra.get(None, [])) + list(extra.get(r.variant, []))
                for r in runs}  # fmt: skip
    head = _git_head(repo)
    names = [r.name for r in runs]

    expected = {r.name: _with_overrides(params, set_args[r.name]) for r in runs}
    reuse, stale = _existing(repo, head, expected, dvc)
    if rerun:
        reuse, stale = [], sorted(set(reuse) | set(stale))
    if reuse:
        print(f"reusing finished experiments with the same params (--rerun to run them again): {', '.join(reuse)}",
              file=sys.stderr)
    if stale:  # the suite replaces its own experiments at this baseline (same names)
        done = subprocess.run([dvc, "exp", "remove", *stale], cwd=repo, capture_output=True, text=True)
        if done.returncode:
            raise DvcError(f"dvc exp remove {' '.join(stale)} failed: {error_lines(done.stdout + done.stderr)}")

    parent = _open_parent(repo, params, params_path, parent_run_id or os.environ.get(PIPELINE_RUN_ENV) or None)
    env = dict(os.environ)
    # the stages' `detailfusion` commands, also when this venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if parent is not None and parent.run_id:
        env[PIPELINE_RUN_ENV] = parent.run_id

    failed: dict[str, str] = {}
    log_dir = repo / log_dir
    baselines = [head]  # every HEAD an experiment ran at: a commit made while the suite runs moves it
    try:
        _run_all(repo, [r for r in runs if r.name not in reuse], set_args, env, log_dir, failed, echo, dvc,
                 baselines)
    except BaseException:
        if parent is not None and parent.owned and parent.run_id:  # interrupted: do not leave it RUNNING
            with contextlib.suppress(Exception):
                parent.session.client.set_terminated(parent.run_id, status="KILLED")
        raise

    try:
        results = collect_from_dvc(repo, [n for n in names if n not in failed], baselines=baselines, dvc=dvc)
    except DvcError as exc:
        results = {}
        failed.update({n: f"finished, but its metrics could not be read: {exc}" for n in names if n not in failed})
    for name in names:
        if name not in failed and name not in results:
            failed[name] = "finished, but dvc exp show has no evaluation metrics for it"
    for name in [n for n in names if n not in failed and push]:
        done = subprocess.run([dvc, "exp", "push", push, name], cwd=repo, env=env, capture_output=True, text=True)
        if done.returncode:
            failed[name] = f"finished, but dvc exp push {push} failed: {error_lines(done.stdout + done.stderr)}"
    return _finish(repo, runs, results, failed, reuse, summary_path, table_path, parent, log_suite_summary)



def _run_all(repo: Path, runs: list[AblationRun], set_args: dict[str, list[str]], env: dict[str, str], log_dir: Path,
             failed: dict[str, str], echo: bool, dvc: str, baselines: list[str]) -> None:
    """Run the experiments one after the other; a failure goes into ``failed`` and the next one
    runs. Each experiment's baseline (HEAD when it starts) is added to ``baselines``."""
    for i, run in enumerate(runs, start=1):
        head = _git_head(repo)
        if head not in baselines:
            print(f"[{i}/{len(runs)}] HEAD moved to {head[:7]} while the suite ran: {run.name} and the runs after it "
                  f"have that baseline (the summary collects them from every baseline of the suite)", file=sys.stderr)
            baselines.append(head)
        print(f"[{i}/{len(runs)}] {run.name}: dvc exp run ({' '.join(set_args[run.name])})", file=sys.stderr)
        started = time.monotonic()
        rc, output = _run_logged(exp_run_command(run, set_args[run.name], dvc=dvc), repo, env,
                                 log_dir / f"{run.name}.log", echo)  # fmt: skip
        if rc:
            failed[run.name] = f"exit {rc}: {error_lines(output)} (log: {log_dir / (run.name + '.log')})"
        status = "FAILED: " + failed[run.name] if run.name in failed else "done"
        print(f"[{i}/{len(runs)}] {run.name}: {status} ({time.monotonic() - started:.0f} s)", file=sys.stderr)


def collect_suite(repo_dir: str | Path, variants: list[str] | None = None, seeds: list[int] | None = None, *,
                  summary_path: str | Path = "metrics/ablations.json", table_path: str | Path = "reports/ablations.md",
                  parent_run_id: str | None = None, dvc: str | None = None,
                  prefix: str = NAME_PREFIX, every_seed: bool = False) -> SuiteResult:
    """Run nothing: summarise the suite's experiments that finished at ANY commit of ``repo_dir``
    (the newest of each name; e.g. pulled from GPU workers with ``dvc exp pull``, or run at
    earlier commits whose stage code is the same), write the summary JSON and table and log them
    to a new MLflow parent. Each run's baseline commit is in the summary; a planned name with no
    finished experiment is reported as missing."""
    from detailfusion.experiments.tracking import log_suite_summary

    repo = Path(repo_dir).resolve()
    dvc = dvc or dvc_executable()
    params_path = repo / "params.yaml"
    params = load_params(params_path)
    runs = plan(variants, seeds, prefix=prefix, every_seed=every_seed)
    results = collect_from_dvc(repo, [r.name for r in runs], all_commits=True, dvc=dvc)
    missing = {r.name: "no finished experiment of this name at any commit" for r in runs if r.name not in results}
    parent = _open_parent(repo, params, params_path, parent_run_id)
    return _finish(repo, runs, results, missing, list(results), summary_path, table_path, parent, log_suite_summary,
                   found_label="collected")


def _open_parent(repo: Path, params, params_path: Path, run_id: str | None):
    """The suite's MLflow parent run (``run_id``: an existing run to log under), or None when
    params.yaml turns tracking off."""
    from detailfusion.experiments.tracking import suite_parent, tracking_config
    from detailfusion.tracking.stages import pipeline_dataset

    cfg = tracking_config(params, str(params_path))
    if cfg is None:
        return None
    return suite_parent(cfg, pipeline_dataset(params, str(params_path)), run_id=run_id, repo_root=repo)


def _finish(repo: Path, runs: list[AblationRun], results: dict, failed: dict[str, str], reused: list[str],
            summary_path, table_path, parent, log_summary, found_label: str = "reused") -> SuiteResult:
    summary = summarize(results)
    diffs = differences(results)
    doc = {
        "variants": summary,
        "differences": diffs,
        "runs": {r.name: {"variant": r.variant, "seed": r.seed,
                          "status": "failed" if r.name in failed else found_label if r.name in reused else "ok",
                          **({"error": failed[r.name]} if r.name in failed else
                             {"rev": results[r.name]["rev"], "baseline": results[r.name]["baseline"]})}
                 for r in runs},
        "parent_run_id": parent.run_id if parent is not None else None,
    }
    summary_file = write_json_atomic(repo / summary_path, doc)
    table = markdown_table(summary, failed, diffs)
    table_file = write_text_atomic(repo / table_path, table)
    tracked = False
    if parent is not None:
        tracked = log_summary(parent, summary, failed, experiments=[r.name for r in runs],
                              files=[summary_file, table_file])  # fmt: skip
        if not tracked:
            print(f"warning: the summary could not be logged to MLflow run {parent.run_id}", file=sys.stderr)
    return SuiteResult(summary, failed, [r.name for r in runs], parent.run_id if parent else None, tracked,
                       table=table)
