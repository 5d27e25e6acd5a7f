"""The ablation suite as DVC experiments: one implementation for the CLI and the Prefect flow.

Every (variant, seed) of ``method.md`` is one DVC experiment of the committed ``dvc.yaml``,
named ``abl-<variant>-s<seed>``, that differs from the baseline only in ``model.variant``, the
three training stages' ``loop.seed`` and (optionally, for every variant alike) a scaled
``loop.max_steps``. It runs the pipeline up to ``evaluate`` (:data:`EXP_TARGETS`), never the
``register`` stage, so an ablation never registers a model or moves ``@champion``.

The pieces here are pure (no side effects except the documented subprocess / MLflow calls):

* :func:`plan` -> the :class:`AblationRun` s; :func:`set_params` -> the ``-S key=value`` strings;
  :func:`exp_run_command` -> the whole ``dvc exp run`` command line for one run.
* :func:`collect_from_dvc` reads ``dvc exp show --json`` (DVC 3.x schema, parsed by
  :func:`parse_exp_show`) into ``{name: result}``; :func:`summarize` turns results into
  mean / std / 95 % CI over seeds; :func:`markdown_table` renders the summary.
* :func:`suite_parent` / :func:`log_suite_summary` (``tracking.py``) put the suite into one MLflow
  parent run; stages nest under it via ``$DETAILFUSION_PIPELINE_RUN_ID``.

The local runner (``detailfusion ablations``) is :mod:`detailfusion.experiments.runner`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detailfusion.config import load_params
from detailfusion.errors import ConfigError, DetailFusionError
from detailfusion.pipeline import METHOD_STAGES

VARIANT_ORDER = ("full", "no_pretrain", "gm_only", "di_only", "avg_fusion", "no_detail_opt")
# Suite entries that are a model variant plus fixed params: ``no_pretrain`` is run both ways, with
# stage 1's steps given to stage 2 (equal compute, the variant's default) and with stage 1 simply
# dropped (``no_pretrain_dropped``, as ablation tables usually read).
SUITE_ENTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "no_pretrain_dropped": ("no_pretrain", ("stage2_branches.equalize_budget=false",)),
}
SUITE_ORDER = ("full", "no_pretrain", "no_pretrain_dropped", "gm_only", "di_only", "avg_fusion", "no_detail_opt")
MULTI_SEED = ("full", "gm_only", "no_pretrain", "no_pretrain_dropped")
DEFAULT_SEEDS = (0, 1, 2)
METRICS = ("R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg")
BASELINES = ("reference_only", "text_only", "pixel_reference")
# What an ablation experiment reproduces: validation of the data, then training up to evaluate.
# DVC orders stages of several targets by their order in dvc.yaml, so validate runs first and a
# data violation stops the experiment before any training. `register` is not among them.
EXP_TARGETS = ("validate", "evaluate")
EVAL_METRICS_FILE = "metrics/eval.json"
NAME_PREFIX = "abl"
_NAME_RE = re.compile(r"^(?P<prefix>.+?)-(?P<variant>[A-Za-z0-9_]+)-s(?P<seed>\d+)$")


class DvcError(DetailFusionError):
    """A ``dvc`` command needed to run or read the suite failed."""


@dataclass(frozen=True)
class AblationRun:
    """One (variant, seed) of the suite; ``name`` is its DVC experiment name (stable, so a rerun
    replaces the experiment of the same baseline instead of adding another)."""

    variant: str  # a suite entry: a model variant or a key of SUITE_ENTRIES
    seed: int
    prefix: str = NAME_PREFIX

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.variant}-s{self.seed}"

    @property
    def model_variant(self) -> str:
        return SUITE_ENTRIES[self.variant][0] if self.variant in SUITE_ENTRIES else self.variant

    @property
    def fixed_params(self) -> tuple[str, ...]:
        return SUITE_ENTRIES[self.variant][1] if self.variant in SUITE_ENTRIES else ()


def parse_name(name: str) -> tuple[str, int] | None:
    """``abl-gm_only-s2`` -> ``("gm_only", 2)``; None when ``name`` is not an ablation name."""
    m = _NAME_RE.match(name)
    return (m["variant"], int(m["seed"])) if m else None


def plan(variants: list[str] | None = None, seeds: list[int] | None = None, *,
         prefix: str = NAME_PREFIX, every_seed: bool = False) -> list[AblationRun]:
    """The suite's runs: every seed for the entries in :data:`MULTI_SEED`, the first seed for the
    others (the ``method.md`` protocol), or every seed for every entry with ``every_seed``.
    Unknown or repeated variants/seeds raise ConfigError."""
    variants = list(SUITE_ORDER if variants is None else variants)
    seeds = list(DEFAULT_SEEDS if seeds is None else seeds)
    unknown = [v for v in variants if v not in SUITE_ORDER]
    if unknown:
        raise ConfigError(f"ablations: unknown variant(s) {unknown}; choose from {list(SUITE_ORDER)}")
    if not variants or len(set(variants)) != len(variants):
        raise ConfigError(f"ablations: variants must be non-empty and unique, got {variants}")
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"ablations: seeds must be non-empty, unique integers >= 0, got {seeds}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise ConfigError(f"ablations: experiment name prefix {prefix!r} must be letters, digits, '.', '_', '-'")
    return [AblationRun(v, s, prefix) for v in variants
            for s in (seeds if every_seed or v in MULTI_SEED else seeds[:1])]


def set_params(run: AblationRun, budget_scale: float = 1.0,
               params: dict[str, Any] | str | Path = "params.yaml") -> list[str]:
    """The ``key=value`` strings for ``dvc exp run -S``: the variant, the three stages' seeds and,
    when ``budget_scale != 1``, every stage's ``loop.max_steps`` scaled from ``params`` (a dict or
    the params.yaml path) and rounded, at least 1. The same scale for every variant keeps the
    budgets equal."""
    if not (isinstance(budget_scale, int | float) and math.isfinite(budget_scale) and budget_scale > 0):
        raise ConfigError(f"ablations: budget scale must be a number > 0, got {budget_scale!r}")
    out = [f"model.variant={run.model_variant}", *run.fixed_params]
    out += [f"{s}.loop.seed={run.seed}" for s in METHOD_STAGES]
    if budget_scale != 1.0:
        source = "params" if isinstance(params, dict) else str(params)
        data = params if isinstance(params, dict) else load_params(params)
        for section in METHOD_STAGES:
            steps = ((data.get(section) or {}).get("loop") or {}).get("max_steps")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ConfigError(f"{source}: {section}.loop.max_steps must be an integer >= 1 to scale it, "
                                  f"got {steps!r}")
            out.append(f"{section}.loop.max_steps={max(1, round(steps * budget_scale))}")
    return out


def exp_run_command(run: AblationRun, set_args: list[str], *, temp: bool = True, dvc: str = "dvc") -> list[str]:
    """``dvc exp run validate evaluate [--temp] -n <name> -S ...`` for one run.

    ``temp`` runs it in a temporary copy of the repository (the workspace stays untouched); a
    Prefect worker that trains in its own clone can run it in the workspace (``temp=False``).
    """
    cmd = [dvc, "exp", "run", *EXP_TARGETS]
    if temp:
        cmd.append("--temp")
    cmd += ["-n", run.name]
    for item in set_args:
        cmd += ["-S", item]
    return cmd


# --------------------------------------------------------------------------- results from DVC


def dvc_executable() -> str:
    """``dvc`` on PATH, else the one installed beside this Python (a venv that is not activated)."""
    beside = Path(sys.executable).parent / "dvc"
    return shutil.which("dvc") or (str(beside) if beside.is_file() else "dvc")


def dvc_exp_show(repo_dir: str | Path, *, all_commits: bool = False, rev: str | None = None,
                 dvc: str | None = None) -> list[dict]:
    """``dvc exp show --json`` in ``repo_dir``: the experiments of baseline ``rev`` (HEAD when
    None), or of every commit with ``all_commits`` (DvcError with its message when it fails)."""
    cmd = [dvc or dvc_executable(), "exp", "show", "--json", "--no-pager"]
    cmd += ["--all-commits"] if all_commits else (["--rev", rev] if rev else [])
    try:
        done = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DvcError(f"{' '.join(cmd)} (in {repo_dir}): {exc}") from exc
    if done.returncode:
        raise DvcError(f"{' '.join(cmd)} (in {repo_dir}) failed: {error_lines(done.stdout + done.stderr)}")
    try:
        doc = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise DvcError(f"{' '.join(cmd)} (in {repo_dir}): output is not JSON ({exc})") from exc
    if not isinstance(doc, list):
        raise DvcError(f"{' '.join(cmd)} (in {repo_dir}): expected a JSON list, got {type(doc).__name__}")
    return doc


def parse_exp_show(doc: list[dict], names: list[str] | None = None,
                   read_file: Callable[[str, str], str | None] | None = None) -> dict[str, dict]:
    """The ablation results in a ``dvc exp show --json`` document (DVC 3.x).

    Schema: a list of baseline commits ``{rev, name, data, experiments}``; each experiment is
    ``{name, executor, revs: [{rev, name, data: {params, metrics, timestamp}, error}]}`` and
    the evaluate stage's JSON (``{dataset: {metrics, baselines, ...}}``) is
    ``data.metrics["metrics/eval.json"]["data"]`` when ``dvc.yaml`` declares it a metric; it is an
    output (the headline metrics are the DVC metric), so it is otherwise read from the experiment's
    commit with ``read_file(rev, path)`` (``git show``; see :func:`collect_from_dvc`). Returns ``{name: result}`` for the experiments in
    ``names`` (all ablation-named ones when None) that finished with evaluation metrics; a name
    found at several baselines keeps the newest. ``result`` = ``{variant, seed, rev, baseline,
    timestamp, dataset, metrics, baselines}``.
    """
    wanted = set(names) if names is not None else None
    found: dict[str, dict] = {}
    for baseline in doc:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name")
            revs = exp.get("revs") or []
            if not name or not revs or (wanted is not None and name not in wanted):
                continue
            if wanted is None and parse_name(name) is None:
                continue
            if (exp.get("executor") or {}).get("state") not in (None, "success"):
                continue  # queued, running or failed: a killed run leaves a temp executor with the baseline's data
            result = _result_from_rev(name, revs[0], baseline.get("rev"), read_file)
            if result is not None and (name not in found or result["timestamp"] > found[name]["timestamp"]):
                found[name] = result
    return found


def _result_from_rev(name: str, rev: dict, baseline_rev: str | None,
                     read_file: Callable[[str, str], str | None] | None = None) -> dict | None:
    data = rev.get("data") or {}
    if rev.get("error") or not data:
        return None
    evaluation = ((data.get("metrics") or {}).get(EVAL_METRICS_FILE) or {}).get("data") or {}
    if not evaluation and read_file is not None and rev.get("rev"):
        try:
            evaluation = json.loads(read_file(rev["rev"], EVAL_METRICS_FILE) or "{}")
        except json.JSONDecodeError:
            evaluation = {}
        evaluation = evaluation if isinstance(evaluation, dict) else {}
    datasets = [k for k, v in evaluation.items() if isinstance(v, dict) and "metrics" in v]
    if not datasets:
        return None
    dataset = datasets[0]
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    parsed = parse_name(name)
    # the suite entry of the name first: no_pretrain_dropped runs model.variant no_pretrain
    variant = (parsed[0] if parsed else None) or (params.get("model") or {}).get("variant")
    seed = (((params.get("stage2_branches") or {}).get("loop") or {}).get("seed"))
    if seed is None and parsed:
        seed = parsed[1]
    return {
        "variant": variant,
        "seed": seed,
        "rev": rev.get("rev"),
        "baseline": baseline_rev,
        "timestamp": data.get("timestamp") or "",
        "dataset": dataset,
        "metrics": evaluation[dataset]["metrics"],
        "baselines": evaluation[dataset].get("baselines") or {},
        # the held-out split (CIRR test1 with the generator's sidecar targets), when evaluated
        "heldout": ((evaluation[dataset].get("heldout") or {}).get("metrics")) or {},
    }


def collect_from_dvc(repo_dir: str | Path, names: list[str], *, all_commits: bool = False,
                     baselines: list[str] | None = None, dvc: str | None = None) -> dict[str, dict]:
    """``{name: result}`` (see :func:`parse_exp_show`) for the experiments ``names`` that DVC
    knows in ``repo_dir``: those of the current HEAD, of the given ``baselines`` (commits; e.g.
    every HEAD a suite ran its experiments at, when commits were made while it ran) or of every
    commit with ``all_commits``. Experiments pushed from elsewhere must be pulled first
    (``dvc exp pull <git remote> <name>``); names without results are left out."""
    if all_commits or not baselines:
        doc = dvc_exp_show(repo_dir, all_commits=all_commits, dvc=dvc)
    else:
        wanted = list(dict.fromkeys(baselines))
        doc = [b for rev in wanted for b in dvc_exp_show(repo_dir, rev=rev, dvc=dvc) if b.get("rev") in wanted]
    return parse_exp_show(doc, names, git_file_reader(repo_dir))


def git_file_reader(repo_dir: str | Path) -> Callable[[str, str], str | None]:
    """``read_file(rev, path)`` for :func:`parse_exp_show`: a file of an experiment's commit
    (``git show rev:path``), None when it is not there."""

    def read_file(rev: str, path: str) -> str | None:
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo_dir, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None

    return read_file


def error_lines(output: str, limit: int = 600) -> str:
    """The error lines of a failed ``dvc`` / ``detailfusion`` run (``error:``, ``ERROR:``, the last
    line of a traceback), joined; the last non-empty line when there are none."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    picked: list[str] = []
    for i, ln in enumerate(lines):
        is_error = ln.lower().startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)
        if ln.startswith("Traceback") and i + 1 < len(lines):
            continue
        if is_error and ln not in picked:
            picked.append(ln)
    text = " | ".join(picked) if picked else (lines[-1] if lines else "no output")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- summary


def _ci95(values: list[float]) -> float:
    """Half-width of the two-sided 95 % t confidence interval of the mean."""
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _by_entry(results: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """``{suite entry: {name: result}}`` in :data:`SUITE_ORDER` (unknown entries after, sorted)."""
    by_variant: dict[str, dict[str, dict]] = {}
    for name, res in results.items():
        parsed = parse_name(name)
        variant = res.get("variant") or (parsed[0] if parsed else name)
        by_variant.setdefault(variant, {})[name] = res
    order = [v for v in SUITE_ORDER if v in by_variant] + sorted(set(by_variant) - set(SUITE_ORDER))
    return {v: by_variant[v] for v in order}


def _values(runs: list[dict], key: str, metric: str) -> list[float]:
    """``run[key][metric]`` of every run that has it (``key``: ``metrics`` or ``heldout``)."""
    return [float(r[key][metric]) for r in runs if metric in (r.get(key) or {})]


def _metric_stats(runs: list[dict], key: str) -> dict[str, Any]:
    """Mean, sample std and (two or more runs) 95 % t interval of each metric of ``run[key]``."""
    row: dict[str, Any] = {}
    for m in METRICS:
        values = _values(runs, key, m)
        if not values:
            continue
        mean = statistics.fmean(values)
        row[m] = round(mean, 3)
        row[f"{m}_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
        if len(values) > 1:
            half = _ci95(values)
            row[f"{m}_ci95"] = [round(mean - half, 3), round(mean + half, 3)]
    return row


def summarize(results: dict[str, dict]) -> dict:
    """Per suite entry (in :data:`SUITE_ORDER`): ``n_seeds``, ``seeds``, ``runs`` (experiment names)
    and for each metric the mean over seeds, ``<m>_std`` (sample std, 0 for one seed) and, with two
    or more seeds, ``<m>_ci95`` = [low, high] (t interval); plus the baselines' mean R@1, and the
    same statistics of the held-out split under ``heldout`` when the runs evaluated it.

    ``results``: ``{name: {variant, seed, metrics, baselines[, heldout]}}`` as
    :func:`collect_from_dvc` returns (variant/seed are taken from the name
    ``abl-<variant>-s<seed>`` when absent).
    """
    summary: dict[str, dict] = {}
    for variant, runs in _by_entry(results).items():
        seeds = sorted(s for s in (_seed_of(n, r) for n, r in runs.items()) if s is not None)
        row: dict[str, Any] = {"n_seeds": len(runs), "seeds": seeds, "runs": sorted(runs)}
        row.update(_metric_stats(list(runs.values()), "metrics"))
        for base in BASELINES:
            values = [r["baselines"][base]["R@1"] for r in runs.values() if base in (r.get("baselines") or {})]
            if values:
                row[f"baseline_{base}_R@1"] = round(statistics.fmean(values), 3)
        heldout = _metric_stats(list(runs.values()), "heldout")
        if heldout:
            row["heldout"] = heldout
        summary[variant] = row
    return summary


def _welch(a: list[float], b: list[float]) -> dict[str, Any]:
    """``mean(a) - mean(b)`` with its two-sided 95 % Welch interval (unequal variances)."""
    from scipy.stats import t

    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"diff": round(diff, 3), "ci95": [round(diff, 3), round(diff, 3)], "df": None}
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(t.ppf(0.975, df)) * se
    return {"diff": round(diff, 3), "ci95": [round(diff - half, 3), round(diff + half, 3)], "df": round(df, 2)}


def _paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """Mean of ``a[s] - b[s]`` over the seeds both have, with the two-sided 95 % t interval of that
    mean (``n - 1`` degrees of freedom); None with fewer than two common seeds."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        return None
    d = [a[s] - b[s] for s in common]
    mean = statistics.fmean(d)
    half = _ci95(d)
    return {"diff": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)], "seeds": common}


def _seed_of(name: str, res: dict) -> int | None:
    seed = res.get("seed")
    if seed is None:
        parsed = parse_name(name)
        seed = parsed[1] if parsed else None
    return seed


def _by_seed(runs: dict[str, dict], key: str, metric: str) -> dict[int, float]:
    """``{seed: run[key][metric]}`` of the runs that have it and a seed."""
    out = {}
    for name, r in runs.items():
        seed = _seed_of(name, r)
        if seed is not None and metric in (r.get(key) or {}):
            out[seed] = float(r[key][metric])
    return out


def differences(results: dict[str, dict], reference: str = "full") -> dict[str, dict]:
    """``reference`` minus each other suite entry with two or more seeds, per metric, on val
    (``val``) and, when evaluated, the held-out split (``heldout``): the difference of the means
    over seeds with its 95 % Welch interval, and under ``paired`` the mean of the same-seed
    differences with its 95 % t interval when two or more seeds are common (a seed fixes the
    batches and the initialisation of every variant alike, and variants that train the same
    branches share them bit for bit, e.g. ``full`` and ``avg_fusion`` up to stage 2).
    ``{"full - gm_only": {"val": {"R@1": {diff, ci95, df, paired: {diff, ci95, seeds}}, ...},
    "heldout": {...}}}``; empty when ``reference`` has fewer than two seeds."""
    entries = _by_entry(results)
    ref_runs = entries.get(reference) or {}
    ref = list(ref_runs.values())
    if len(ref) < 2:
        return {}
    out: dict[str, dict] = {}
    for variant, runs in entries.items():
        other = list(runs.values())
        if variant == reference or len(other) < 2:
            continue
        row: dict[str, dict] = {}
        for split, key in (("val", "metrics"), ("heldout", "heldout")):
            cells = {}
            for m in METRICS:
                a, b = _values(ref, key, m), _values(other, key, m)
                if len(a) > 1 and len(b) > 1:
                    cells[m] = _welch(a, b)
                    paired = _paired(_by_seed(ref_runs, key, m), _by_seed(runs, key, m))
                    if paired is not None:
                        cells[m]["paired"] = paired
            if cells:
                row[split] = cells
        out[f"{reference} - {variant}"] = row
    return out


def _stat_cells(row: dict, n_seeds: int) -> list[str]:
    cells = []
    for c in METRICS:
        if c not in row:
            cells.append("")
        elif n_seeds > 1:
            cells.append(f"{row[c]:.1f} ± {row[c + '_std']:.1f}")
        else:
            cells.append(f"{row[c]:.1f}")
    return cells


def markdown_table(summary: dict, failed: dict[str, str] | None = None,
                   diffs: dict[str, dict] | None = None) -> str:
    """The summary as a markdown table (mean ± std over seeds; then the held-out split's when the
    runs evaluated it, and ``diffs`` from :func:`differences` with their 95 % Welch intervals and
    their same-seed (paired) intervals), then one line per failed run."""
    head = ["| variant | seeds | " + " | ".join(METRICS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    lines = list(head)
    for variant, row in summary.items():
        lines.append(f"| {variant} | {row['n_seeds']} | " + " | ".join(_stat_cells(row, row["n_seeds"])) + " |")
    if any(row.get("heldout") for row in summary.values()):
        lines += ["", "Held-out split (not tuned on):", "", *head]
        for variant, row in summary.items():
            if row.get("heldout"):
                lines.append(f"| {variant} | {row['n_seeds']} | "
                             + " | ".join(_stat_cells(row["heldout"], row["n_seeds"])) + " |")
    for split, label in (("val", "val"), ("heldout", "held out")):
        rows = {k: v[split] for k, v in (diffs or {}).items() if v.get(split)}
        for title, pick in (("Differences of the means over seeds, {} (95 % Welch interval):", lambda c: c),
                            ("Same-seed differences, {} (mean, 95 % t interval):", lambda c: c.get("paired"))):
            table = {name: {m: v for m, c in cells.items() if (v := pick(c))} for name, cells in rows.items()}
            table = {name: cells for name, cells in table.items() if cells}
            if not table:
                continue
            lines += ["", title.format(label), "",
                      "| difference | " + " | ".join(METRICS) + " |",
                      "| --- | " + " | ".join("---" for _ in METRICS) + " |"]
            for name, cells in table.items():
                out = [f"{cells[m]['diff']:+.1f} [{cells[m]['ci95'][0]:+.1f}, {cells[m]['ci95'][1]:+.1f}]"
                       if m in cells else "" for m in METRICS]
                lines.append(f"| {name} | " + " | ".join(out) + " |")
    if failed:
        lines += ["", "Failed runs (not in the table):", ""]
        lines += [f"- `{name}`: {error}" for name, error in sorted(failed.items())]
    return "\n".join(lines) + "\n"
