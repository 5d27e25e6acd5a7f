"""What each pipeline stage logs to MLflow: the one place for the per-stage tracking policy.

The ``detailfusion`` stage commands open their run with :func:`tracked` (which params sections
become run params, the data set, the ablation variant, the registry's gating metric as the
experiment's primary metric) and hand their results to the ``log_<stage>`` functions here.
Every function takes ``run=None`` (tracking absent or disabled) and then does nothing; a store
that is down never fails a stage (the run records what it could not send).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from detailfusion.pipeline import DATA_STAGES, is_main_process
from detailfusion.tracking.config import TrackingConfig
from detailfusion.tracking.offline import TrackingOfflineWarning
from detailfusion.tracking.runs import StageRun


def tracking_config(params: dict[str, Any], source: str = "params.yaml") -> TrackingConfig | None:
    """The ``tracking`` section when present and enabled, else None (run untracked)."""
    from detailfusion.config import load_section

    if "tracking" not in params:
        return None
    cfg = load_section(TrackingConfig, params, "tracking", source=source)
    return cfg if cfg.enabled else None


def pipeline_dataset(params: dict[str, Any], source: str = "params.yaml") -> str:
    """The data set the pipeline trains on (``stage2_branches.dataset``) of a raw params mapping."""
    from detailfusion.errors import ConfigError

    dataset = (params.get("stage2_branches") or {}).get("dataset")
    if not dataset:
        raise ConfigError(f"{source}: stage2_branches.dataset: missing")
    return str(dataset)


@contextlib.contextmanager
def tracked(params: Any, stage: str, logged: dict[str, Any],
            variant: str | None = None) -> Iterator[StageRun | None]:
    """A stage run (nested under the pipeline's parent run) for a stage command.

    ``params`` is the command's checked ``params.yaml`` (:class:`detailfusion.params.Params`);
    ``logged`` the stage's *effective* config, section -> plain mapping, as the stage runs it
    (every value filled in, the loop after ``equalize_budget``): it becomes the run's params.
    Yields ``None`` when tracking is disabled or this is not rank 0 of a ``torchrun`` stage. A
    store that was down shows as one ``warning:`` line.
    """
    from detailfusion.tracking.runs import stage_run

    cfg = params.tracking
    if not cfg.enabled or not is_main_process():
        yield None
        return
    if variant is None and stage not in DATA_STAGES:
        variant = params.model.variant
    primary = (params.registry.metric, params.registry.greater_is_better)
    with _one_line_offline_warning(), stage_run(stage, logged, params.dataset, variant, config=cfg,
                                                 primary_metric=primary) as run:  # fmt: skip
        yield run


@contextlib.contextmanager
def _one_line_offline_warning() -> Iterator[None]:
    """Show :class:`TrackingOfflineWarning` as ``warning: <message>`` (one line, no source line);
    other warnings as Python shows them."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, TrackingOfflineWarning):
                print(f"warning: {message}", file=file or sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def data_source_name(params: Any, dataset: str) -> str:
    """Name of the data set input in MLflow: ``synthetic-cirr`` for the embedded default, else ``cirr``."""
    return f"synthetic-{dataset}" if "synthetic" in Path(params.data.root).parts else dataset


def step_logger(run: StageRun | None) -> Callable[[int, dict[str, float]], None] | None:
    """The training loop's ``on_log`` callback: per-step values as ``train/<name>``."""
    if run is None:
        return None
    return lambda step, logs: run.log_metrics({f"train/{k}": v for k, v in logs.items()}, step=step)


def log_synthesize(run: StageRun | None, summary: dict[str, Any], out: Path) -> None:
    if run is None:
        return
    run.log_metrics({"synth/seconds": summary["seconds"], "synth/megabytes": summary["megabytes"]})
    if (out / "SYNTHETIC.json").is_file():
        run.log_artifact(out / "SYNTHETIC.json")


def log_prepare(run: StageRun | None, params: Any, out: Path, datasets: Iterable[str]) -> None:
    if run is None:
        return
    run.log_metrics_file(out / "summary.json", prefix="prepare/")
    for name in datasets:
        run.log_manifest(out / name / "queries.parquet", name=data_source_name(params, name), context="prepared")
        run.log_artifact(out / name / "quarantine.json", artifact_path=f"quarantine/{name}")


def log_validation_report(run: StageRun | None, report_dir: Path) -> None:
    """The report and Data Docs; called whether validation passed or not (they exist either way)."""
    if run is not None and (report_dir / "report.json").is_file():
        run.log_artifact(report_dir, artifact_path="validation")


def log_validate(run: StageRun | None) -> None:
    if run is not None:
        run.log_metrics({"validate/success": 1.0})


def log_pretrain(run: StageRun | None, metrics_file: Path) -> None:
    """The pretrain_backbone stage's metrics file (``pretrain/...``: held-out image<->text top-k)."""
    if run is not None:
        run.log_metrics_file(metrics_file, prefix="pretrain/")


def log_train(run: StageRun | None, stage: str, params: Any, metrics_dir: Path, prepared_dir: Path) -> None:
    """A training stage's metrics file (``stage<n>/...``) and its training manifest as data input."""
    if run is None:
        return
    n = stage[5]
    run.log_metrics_file(metrics_dir / f"stage{n}.json", prefix=f"stage{n}/")
    dataset = params.stage1_detail.dataset if stage == "stage1_detail" else params.dataset
    manifest = prepared_dir / dataset / "queries.parquet"
    if manifest.is_file():
        run.log_manifest(manifest, name=data_source_name(params, dataset))


def log_evaluate(run: StageRun | None, params: Any, cfg: Any, summary: dict[str, Any], prepared: Path,
                 dataset: str) -> None:
    """Metrics, plots and reports; the headline numbers and the data set on the parent run too,
    so two pipelines compare in the runs table without expanding their children."""
    if run is None:
        return
    run.log_metrics_file(cfg.out_metrics)
    run.log_manifest(prepared / dataset / "queries.parquet", name=data_source_name(params, dataset),
                     context="evaluation", also_on_parent=True)  # fmt: skip
    run.log_parent_metrics(summary["metrics"])
    for folder, name in ((Path(cfg.out_plots), "plots"), (Path(cfg.out_reports) / "retrieval", "retrieval"),
                         (Path(cfg.out_reports) / "submission", "submission")):  # fmt: skip
        if folder.exists():
            run.log_artifact(folder, artifact_path=name)
