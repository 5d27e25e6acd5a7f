"""Experiments built on ``dvc exp run``: the ablation suite (:mod:`.ablations`), its local runner
(:mod:`.runner`, ``detailfusion ablations``) and its MLflow parent run (:mod:`.tracking`).

The Prefect ``ablations`` flow uses the same pieces: :func:`plan`, :func:`set_params` /
:func:`exp_run_command` for each GPU worker's ``dvc exp run``, then :func:`collect_from_dvc`,
:func:`summarize`, :func:`differences`, :func:`markdown_table` and :func:`log_suite_summary` for the result.
"""

from detailfusion.experiments.ablations import (
    EXP_TARGETS,
    METRICS,
    MULTI_SEED,
    SUITE_ENTRIES,
    SUITE_ORDER,
    VARIANT_ORDER,
    AblationRun,
    DvcError,
    collect_from_dvc,
    differences,
    error_lines,
    exp_run_command,
    markdown_table,
    parse_exp_show,
    parse_name,
    plan,
    set_params,
    summarize,
)

__all__ = [
    "EXP_TARGETS",
    "METRICS",
    "MULTI_SEED",
    "SUITE_ENTRIES",
    "SUITE_ORDER",
    "VARIANT_ORDER",
    "AblationRun",
    "DvcError",
    "collect_from_dvc",
    "differences",
    "error_lines",
    "exp_run_command",
    "markdown_table",
    "parse_exp_show",
    "parse_name",
    "plan",
    "set_params",
    "summarize",
]
