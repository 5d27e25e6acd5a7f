"""The ablation suite: every variant of ``method.md`` with identical data, backbone and budget.

Each (variant, seed) run is the real pipeline (stage 1 -> 2 -> 3 -> evaluate) with only
``model.variant`` and the loop seeds changed, in its own folder ``<out>/<variant>-seed<k>/``
(params.yaml, models/, metrics/, reports/). A finished run is skipped when rerun with the same
params, so an interrupted suite resumes. The summary is ``metrics/ablations.json``
(``{variant: {metric: mean, metric_std: ..., n_seeds}}``) and a markdown table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from pathlib import Path

import yaml

from detailfusion.config import load_params, load_section
from detailfusion.fsutil import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

VARIANT_ORDER = ("full", "no_pretrain", "gm_only", "di_only", "avg_fusion", "no_detail_opt")
MULTI_SEED = ("full", "gm_only", "di_only")
METRICS = ("R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg")
STAGE_SECTIONS = ("stage1_detail", "stage2_branches", "stage3_fusion")


def plan(variants: list[str] | None = None, seeds: list[int] | None = None) -> list[tuple[str, int]]:
    """(variant, seed) runs: ``seeds`` for full/gm_only/di_only, the first seed for the others."""
    variants = list(variants or VARIANT_ORDER)
    seeds = list(seeds if seeds is not None else (0, 1, 2))
    return [(v, s) for v in variants for s in (seeds if v in MULTI_SEED else seeds[:1])]


def run_params(base: dict, variant: str, seed: int, run_dir: Path, budget_scale: float = 1.0) -> dict:
    """The base params with the variant and seeds set and the run's outputs under ``run_dir``.

    ``budget_scale`` scales every stage's ``max_steps`` (the same for all variants), to fit a
    whole suite into a time budget.
    """
    p = yaml.safe_load(yaml.safe_dump(base))
    p["model"]["variant"] = variant
    for section in STAGE_SECTIONS:
        loop = p[section]["loop"]
        loop["seed"] = seed
        if budget_scale != 1.0:
            loop["max_steps"] = max(1, round(loop["max_steps"] * budget_scale))
    p["evaluate"].update(
        out_metrics=str(run_dir / "metrics" / "eval.json"),
        out_plots=str(run_dir / "plots"),
        out_reports=str(run_dir / "reports"),
        report_samples=4,
    )
    return p


def _run_one(params: dict, run_dir: Path, progress: bool, run=None) -> dict:
    from detailfusion.eval.evaluate import EvaluateConfig, run_evaluate
    from detailfusion.train.stages import RUNNERS, StageContext

    params_path = run_dir / "params.yaml"
    ctx = StageContext(params_path, models_dir=run_dir / "models", metrics_dir=run_dir / "metrics")
    for n, stage in enumerate(STAGE_SECTIONS, start=1):
        log.warning("ablation %s: %s", run_dir.name, stage)
        on_log = None
        if run is not None:
            def on_log(step, logs, n=n):
                run.log_metrics({f"stage{n}/train/{k}": v for k, v in logs.items()}, step=step)
        RUNNERS[stage](ctx, progress=progress, on_log=on_log)
    cfg = load_section(EvaluateConfig, params, "evaluate")
    dataset = params["stage2_branches"]["dataset"]
    return run_evaluate(cfg, run_dir / "models" / "stage3" / "model", ctx.prepared_dir, dataset, progress=progress)


def _tracking_config(params: dict):
    """The ``tracking`` section when present and enabled, else None (the suite runs untracked)."""
    if "tracking" not in params:
        return None
    from detailfusion.tracking import TrackingConfig

    cfg = load_section(TrackingConfig, params, "tracking")
    return cfg if cfg.enabled else None


@contextlib.contextmanager
def _ablation_run(tracking, params: dict, variant: str, seed: int):
    """One MLflow run per (variant, seed), nested under this suite's parent run (one per process)."""
    if tracking is None:
        yield None
        return
    from detailfusion.tracking import stage_run

    sections = {k: params[k] for k in ("model", *STAGE_SECTIONS, "evaluate") if k in params}
    dataset = params["stage2_branches"]["dataset"]
    with stage_run("ablation", sections, dataset, variant, config=tracking) as run:
        run.set_tags({"ablation.seed": seed, "ablation.run": f"{variant}-seed{seed}"})
        yield run


def run_suite(params_path: str | Path = "params.yaml", out: str | Path = "ablations", variants=None, seeds=None,
              summary_path: str | Path = "metrics/ablations.json", table_path: str | Path = "reports/ablations.md",
              progress: bool = True, budget_scale: float = 1.0) -> dict:
    """Run (or resume) the suite and write the summary JSON and markdown table."""
    base = load_params(params_path)
    tracking = _tracking_config(base)
    out = Path(out)
    results: dict[str, dict[int, dict]] = {}
    for variant, seed in plan(variants, seeds):
        run_dir = out / f"{variant}-seed{seed}"
        params = run_params(base, variant, seed, run_dir, budget_scale)
        done = run_dir / "metrics" / "eval.json"
        params_path_run = run_dir / "params.yaml"
        same = params_path_run.is_file() and yaml.safe_load(params_path_run.read_text()) == params
        with _ablation_run(tracking, params, variant, seed) as run:
            if not (same and done.is_file()):
                run_dir.mkdir(parents=True, exist_ok=True)
                params_path_run.write_text(yaml.safe_dump(params, sort_keys=False))
                done.unlink(missing_ok=True)
                _run_one(params, run_dir, progress, run)
            elif run is not None:
                run.set_tags({"ablation.reused_results": str(run_dir)})
            if run is not None:
                # the flat headline file gives every variant the same metric keys for Compare
                run.log_metrics_file(done.with_name("headline.json"))
                run.log_artifact(done, artifact_path="evaluation")
        evaluation = json.loads(done.read_text())
        dataset = next(iter(evaluation))
        results.setdefault(variant, {})[seed] = evaluation[dataset]
    summary = summarise(results)
    write_json_atomic(summary_path, summary)
    write_text_atomic(table_path, markdown_table(summary))
    if tracking is not None:
        from detailfusion.tracking import stage_run

        with stage_run("ablation_summary", {}, base["stage2_branches"]["dataset"], config=tracking) as run:
            run.log_parent_artifact(summary_path, artifact_path="ablations")
            run.log_parent_artifact(table_path, artifact_path="ablations")
    return summary


def summarise(results: dict[str, dict[int, dict]]) -> dict:
    summary = {}
    for variant in [v for v in VARIANT_ORDER if v in results] + sorted(set(results) - set(VARIANT_ORDER)):
        runs = results[variant]
        row: dict = {"n_seeds": len(runs), "seeds": sorted(runs)}
        for m in METRICS:
            values = [r["metrics"][m] for r in runs.values() if m in r.get("metrics", {})]
            if not values:
                continue
            row[m] = round(statistics.fmean(values), 3)
            row[f"{m}_std"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
        for base in ("reference_only", "text_only", "pixel_reference"):
            values = [r["baselines"][base]["R@1"] for r in runs.values() if base in r.get("baselines", {})]
            if values:
                row[f"baseline_{base}_R@1"] = round(statistics.fmean(values), 3)
        summary[variant] = row
    return summary


def markdown_table(summary: dict) -> str:
    cols = ("R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg")
    lines = ["| variant | seeds | " + " | ".join(cols) + " |", "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for variant, row in summary.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append("")
            elif row["n_seeds"] > 1:
                cells.append(f"{row[c]:.1f} ± {row[c + '_std']:.1f}")
            else:
                cells.append(f"{row[c]:.1f}")
        lines.append(f"| {variant} | {row['n_seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

