"""The ``promote`` flow: the registry's gated promotion of ``@challenger``, optionally after a
human approval.

With ``require_approval`` the flow run pauses (``pause_flow_run(wait_for_input=...)``); the
resume form in the Prefect UI shows the challenger's and the champion's metrics, and the user
answers ``approve`` (and optionally ``force``) there or with ``prefect flow-run resume``.
``approve: false`` leaves ``@champion`` where it is. Approved, ``detailfusion registry promote``
applies the gate from ``params.yaml`` (metric, margin) at ``revision``. A promotion that moves
``@champion`` emits the ``detailfusion.champion.promoted`` event, which triggers batch retrieval.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from detailfusion.tracking import mlflow_key
from flows.tasks import (
    NETWORK_RETRY,
    checkout,
    emit_promoted,
    last_json,
    repo_url_or_default,
    run_command,
    run_workdir,
    tool_env,
)


class PromotionApproval(RunInput):
    """What the approver answers in the resume form."""

    approve: bool = Field(default=False, description="Promote the challenger (still subject to the metric gate)")
    force: bool = Field(default=False, description="Promote even if the metric gate refuses (recorded on the version)")
    comment: str = Field(default="", description="Why (kept in the flow run's logs)")


@task(name="registry-versions", cache_policy=NO_CACHE, **NETWORK_RETRY)
def registry_versions(workdir: str, dataset: str) -> list[dict[str, Any]]:
    out = run_command(["detailfusion", "registry", "list", "--dataset", dataset, "--json"], cwd=workdir,
                      env=tool_env(workdir), what="detailfusion registry list", echo=False)  # fmt: skip
    return last_json(out, "detailfusion registry list")


@task(name="registry-promote", cache_policy=NO_CACHE, **NETWORK_RETRY)
def registry_promote(workdir: str, dataset: str, version: str | None, force: bool) -> dict[str, Any]:
    args = ["detailfusion", "registry", "promote", "--dataset", dataset, "--json"]
    args += ["--version", str(version)] if version else []
    args += ["--force"] if force else []
    out = run_command(args, cwd=workdir, env=tool_env(workdir), what="detailfusion registry promote")
    return last_json(out, "detailfusion registry promote")


def comparison(rows: list[dict[str, Any]], version: str | None, metric: str) -> tuple[dict | None, dict | None, str]:
    """(challenger row, champion row, markdown table of their metrics)."""
    by_alias = {alias: row for row in rows for alias in row["aliases"]}
    challenger = next((r for r in rows if str(r["version"]) == str(version)), None) if version else \
        by_alias.get("challenger")  # fmt: skip
    champion = by_alias.get("champion")
    metric = mlflow_key(metric)  # the registry's metric tags use MLflow-safe names (Rsub@1 -> Rsub_at_1)
    names = sorted({k for r in (challenger, champion) if r for k in r["metrics"]}, key=lambda k: (k != metric, k))
    def cell(row: dict | None, key: str) -> str:
        return "-" if not row or key not in row["metrics"] else f"{row['metrics'][key]:.4f}"
    head = (f"| metric | challenger v{challenger['version'] if challenger else '-'} "
            f"| champion v{champion['version'] if champion else '-'} |")  # fmt: skip
    lines = [head, "| --- | ---: | ---: |"]
    lines += [f"| {'**' + k + '** (gate)' if k == metric else k} | {cell(challenger, k)} | {cell(champion, k)} |"
              for k in names]  # fmt: skip
    return challenger, champion, "\n".join(lines)


@flow(name="promote", log_prints=True)
def promote(
    dataset: str = "cirr",
    version: str | None = None,
    require_approval: bool = True,
    approval_timeout_s: int = 24 * 3600,
    revision: str = "main",
    repo_url: str | None = None,
) -> dict[str, Any]:
    """Promote ``@challenger`` (or ``version``) of the data set's model through the metric gate."""
    import yaml

    logger = get_run_logger()
    workdir = str(run_workdir("promote"))
    checkout(repo_url_or_default(repo_url), revision, workdir)
    registry = yaml.safe_load(Path(workdir, "params.yaml").read_text(encoding="utf-8")).get("registry") or {}
    metric = str(registry.get("metric", "Avg"))
    rows = registry_versions(workdir, dataset)
    challenger, champion, table = comparison(rows, version, metric)
    if challenger is None:
        logger.warning("nothing to promote: no %s in the registry", f"version {version}" if version else "@challenger")
        return {"decision": "unchanged", "reason": "no challenger"}
    force = False
    if require_approval:
        description = (f"**Promote {dataset} challenger v{challenger['version']} to @champion?**\n\n{table}\n\n"
                       f"The gate compares **{metric}** (min margin {registry.get('min_margin', 0.0)}); "
                       "`force` promotes even if the gate refuses.")  # fmt: skip
        logger.info("waiting for approval:\n%s", description)
        answer = pause_flow_run(wait_for_input=PromotionApproval.with_initial_data(description=description),
                                timeout=approval_timeout_s)  # fmt: skip
        logger.info("approval answer: approve=%s force=%s comment=%r", answer.approve, answer.force, answer.comment)
        if not answer.approve:
            logger.info("not approved: @champion stays at v%s", champion["version"] if champion else "-")
            shutil.rmtree(Path(workdir).parent, ignore_errors=True)
            return {"decision": "rejected", "challenger_version": str(challenger["version"]),
                    "champion_version": str(champion["version"]) if champion else None}  # fmt: skip
        force = answer.force
    decision = registry_promote(workdir, dataset, str(challenger["version"]), force)
    logger.info("promotion: %s (%s)", decision["decision"], decision["reason"])
    emit_promoted(decision, source="promote flow")
    shutil.rmtree(Path(workdir).parent, ignore_errors=True)
    return decision


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.promote {approve,reject} <flow-run-id> [--force] [--comment TEXT]``: answer a
    paused promote run from a shell (Prefect 3 has no ``prefect flow-run resume``; the UI's
    Resume button shows the same form)."""
    import argparse
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=main.__doc__.splitlines()[0])
    parser.add_argument("answer", choices=["approve", "reject"])
    parser.add_argument("flow_run_id", type=UUID)
    parser.add_argument("--force", action="store_true", help="promote even if the metric gate refuses")
    parser.add_argument("--comment", default="")
    args = parser.parse_args(argv)
    answer = {"approve": args.answer == "approve", "force": args.force, "comment": args.comment}
    resume_flow_run(args.flow_run_id, run_input=answer)
    print(f"resumed promote flow run {args.flow_run_id} with {answer}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
