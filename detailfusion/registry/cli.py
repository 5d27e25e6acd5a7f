"""``detailfusion registry {publish,register,promote,rollback,list}``: the registry on the command line.

:func:`add_parser` registers the subcommands on the top-level ``detailfusion`` parser; each reads
the ``tracking`` and ``registry`` sections of ``--params`` (the top-level CLI has checked the whole
file; the installed checkout's ``params.yaml`` when the default file is absent)
and prints a human-readable result, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from detailfusion.config import REPO_PARAMS, load_params, load_section, to_dict
from detailfusion.errors import ConfigError
from detailfusion.registry.config import RegistryConfig
from detailfusion.tracking.config import TrackingConfig

# Exit codes of the registry commands, for scripts and flows (README "register").
EXIT_OK = 0  # done (promoted, rolled back, listed), or nothing to do (no challenger, already champion)
EXIT_REFUSED = 1  # `promote`: the gate refused the challenger; @champion unchanged
EXIT_ERROR = 2  # bad input, a missing model/version, or the tracking server unreachable


def _params_path(path: str) -> Path:
    """``--params``; the installed checkout's ``params.yaml`` when the default file is absent
    (running the registry outside a checkout)."""
    if Path(path).is_file() or path != "params.yaml":
        return Path(path)
    return REPO_PARAMS


def _configs(args: argparse.Namespace) -> tuple[TrackingConfig, RegistryConfig, dict[str, Any]]:
    """The tracking and registry sections and the raw params: from the checked params the top-level
    CLI loaded (``args.config``), else (``python -m detailfusion.registry.cli``) from the file."""
    config = getattr(args, "config", None)
    if config is not None:
        return config.tracking, config.registry, {"prepare": to_dict(config.prepare), "registry": to_dict(config.registry),
                                                  "stage2_branches": {"dataset": config.dataset}}
    path = _params_path(args.params)
    params = load_params(path)
    tracking = load_section(TrackingConfig, params, "tracking", source=str(path))
    registry = load_section(RegistryConfig, params, "registry", source=str(path))
    for section, key in (("prepare", "image_size"), ("prepare", "target_ratio"), ("stage2_branches", "dataset")):
        if key not in (params.get(section) or {}):
            raise ConfigError(f"{path}: {section}.{key}: missing")
    return tracking, registry, params


def _server_errors_as_one_line(cmd):
    """A tracking server that is down or failing ends the command with one line naming its URI
    (after the configured retries), not a traceback from deep inside MLflow."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from detailfusion.errors import DetailFusionError
        from detailfusion.tracking.transport import is_server_error

        try:
            return cmd(args)
        except DetailFusionError:
            raise
        except Exception as exc:
            if not is_server_error(exc):
                raise
            from detailfusion.registry.lock import RegistryError
            from detailfusion.tracking.config import resolve_tracking_uri

            uri = resolve_tracking_uri(_configs(args)[0])
            problem = " ".join(str(exc).split())
            problem = problem if len(problem) <= 200 else problem[:197] + "..."
            raise RegistryError(f"tracking server {uri}: unreachable or failing after retries "
                                f"({type(exc).__name__}: {problem})") from None  # fmt: skip

    return run


def _model_name(args: argparse.Namespace, registry: RegistryConfig) -> str:
    if args.name:
        return args.name
    dataset = args.dataset
    if dataset is None:  # the data set the pipeline trains on (params stage2_branches.dataset)
        dataset = _configs(args)[2]["stage2_branches"]["dataset"]
    return registry.name_for(dataset)


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if args.json else text)


# What differs between two runs that registered identical models: MLflow ids and the clock.
RUN_SPECIFIC_KEYS = ("model_uri", "run_id", "parent_run_id", "decided_at")


def stable_summary(summary: Any) -> Any:
    """The publish summary without :data:`RUN_SPECIFIC_KEYS` (at any depth): the register stage's
    DVC output, so two runs on the same registry state write the same bytes."""
    if isinstance(summary, dict):
        return {k: stable_summary(v) for k, v in summary.items() if k not in RUN_SPECIFIC_KEYS}
    return summary


def cmd_publish(args: argparse.Namespace) -> int:
    from detailfusion.registry.publish import publish_model

    tracking, registry, params = _configs(args)
    prepare = params["prepare"]
    summary = publish_model(
        args.model_dir,
        args.dataset,
        args.metrics,
        tracking=tracking,
        registry=registry,
        params={"registry": params["registry"], "prepare": prepare},
        image_size=prepare["image_size"],
        target_ratio=float(prepare["target_ratio"]),
        run_promotion=not args.no_promote,
        force=args.force,
    )
    text = f"registered {summary['model_name']} v{summary['version']} ({summary['model_uri']}) as @challenger"
    if "promotion" in summary:
        from detailfusion.registry.operations import Decision

        text += "\n" + Decision(**summary["promotion"]).format()
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if args.decision:
        from detailfusion.fsutil import write_json_atomic

        write_json_atomic(args.decision, stable_summary(summary))
    _emit(args, summary, text)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from detailfusion.registry.registration import metrics_from_files, register
    from detailfusion.registry.versions import registry_client

    tracking, registry, _ = _configs(args)
    metrics = metrics_from_files(args.metrics)
    mv = register(args.model, args.dataset, metrics, config=registry, client=registry_client(tracking))
    _emit(args, {"model_name": mv.name, "version": mv.version, "tags": mv.tags},
          f"registered {mv.name} v{mv.version} as @challenger")  # fmt: skip
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from detailfusion.registry.operations import promote
    from detailfusion.registry.versions import registry_client

    tracking, registry, _ = _configs(args)
    decision = promote(_model_name(args, registry), version=args.version, force=args.force, config=registry,
                       client=registry_client(tracking))  # fmt: skip
    _emit(args, decision.to_dict(), decision.format())
    return EXIT_REFUSED if decision.decision == "refused" else EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from detailfusion.registry.operations import rollback
    from detailfusion.registry.versions import registry_client

    tracking, registry, _ = _configs(args)
    result = rollback(_model_name(args, registry), config=registry, client=registry_client(tracking))
    _emit(args, result.to_dict(), result.format())
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from detailfusion.registry.versions import format_versions, list_versions, registry_client

    tracking, registry, _ = _configs(args)
    name = _model_name(args, registry)
    rows = list_versions(name, config=registry, client=registry_client(tracking))
    _emit(args, rows, f"{name}\n{format_versions(rows, metrics=[registry.metric])}")
    return 0


def _target(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--dataset", help="data set (model name from registry.model_name; default: the "
                       "params' stage2_branches.dataset)")
    group.add_argument("--name", help="registered model name")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``registry`` and its subcommands to the top-level subparsers object."""
    reg = subparsers.add_parser("registry", help="register, promote (gated), roll back, list model versions")
    rsub = reg.add_subparsers(dest="registry_command", required=True)

    p = rsub.add_parser("publish", help="log a saved model to MLflow, register it and run the promotion gate")
    p.add_argument("--model-dir", required=True, help="folder written by save_pretrained (config.json + safetensors)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSON file(s) of the evaluate stage")
    p.add_argument("--no-promote", action="store_true", help="register only, leave @champion alone")
    p.add_argument("--force", action="store_true", help="promote even when the gate refuses (recorded)")
    p.add_argument("--summary", help="also write the JSON summary to this file")
    p.add_argument("--decision", help="also write the summary without MLflow ids and times to this file "
                   "(the register stage's DVC output)")
    p.set_defaults(func=_server_errors_as_one_line(cmd_publish))

    p = rsub.add_parser("register", help="register an already logged model as the new @challenger")
    p.add_argument("--model", required=True, help="models:/m-<id>, runs:/<run>/<name> or a run id")
    p.add_argument("--dataset", required=True)
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSON file(s) (must hold registry.metric)")
    p.set_defaults(func=_server_errors_as_one_line(cmd_register))

    p = rsub.add_parser("promote", help="move @champion to @challenger if it beats the champion by the margin")
    _target(p)
    p.add_argument("--version", help="promote this version instead of @challenger")
    p.add_argument("--force", action="store_true", help="promote even when the gate refuses (recorded)")
    p.set_defaults(func=_server_errors_as_one_line(cmd_promote))

    p = rsub.add_parser("rollback", help="restore @previous-champion as @champion")
    _target(p)
    p.set_defaults(func=_server_errors_as_one_line(cmd_rollback))

    p = rsub.add_parser("list", help="versions, aliases and metrics as a table")
    _target(p)
    p.set_defaults(func=_server_errors_as_one_line(cmd_list))

    for sub in rsub.choices.values():
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        # Also accepted after the subcommand; SUPPRESS keeps the top-level value when absent.
        sub.add_argument("--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)")
    return reg


def main(argv: list[str] | None = None) -> int:
    """``python -m detailfusion.registry.cli <subcommand> ...``: the same commands without the full CLI
    (what the Prefect ``promote`` flow runs)."""
    import sys

    from detailfusion.errors import DetailFusionError

    parser = argparse.ArgumentParser(prog="python -m detailfusion.registry.cli")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["registry", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except DetailFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
