"""The ``detailfusion`` command: one entry point with subcommands; ``dvc.yaml`` calls these.

Each subcommand imports its module lazily so ``detailfusion data stats`` does not pay for
importing torch, and a failing command prints one clear line (the file and the problem)
instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from detailfusion.errors import DetailFusionError
from detailfusion.pipeline import TRAIN_STAGES
from detailfusion.timings import phase


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# --------------------------------------------------------------------------- tracking


def tracked(args: argparse.Namespace, stage: str, logged: dict, variant: str | None = None):
    """The stage's MLflow run, or ``None`` untracked (``detailfusion.tracking.stages.tracked``), with
    ``logged`` (the stage's effective config) as run params; the stage's wall-time breakdown is
    logged to it before it closes (``detailfusion.timings``)."""
    from detailfusion.timings import timed_run
    from detailfusion.tracking.stages import tracked as stage_tracking

    return timed_run(stage_tracking(args.config, stage, logged, variant))


def _load_config(args: argparse.Namespace):
    """All of ``--params``, checked once before the command reads any data (detailfusion.params).

    The registry, batch-retrieval and tracking commands also run outside a checkout: there, with
    ``--params`` left at its default and no such file, they use the installed checkout's file."""
    from detailfusion.params import REPO_PARAMS, load_config

    path = Path(args.params)
    if not path.is_file() and args.params == "params.yaml" and args.command in ("registry", "retrieve", "tracking"):
        path = REPO_PARAMS
    return load_config(path)


# --------------------------------------------------------------------------- data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from detailfusion.config import to_dict
    from detailfusion.data.synthetic import generate

    cfg = replace(args.config.synthesize, **({} if args.seed is None else {"seed": args.seed}))
    out = Path(args.out) if args.out else args.config.data.root
    with tracked(args, "synthesize", {"synthesize": to_dict(cfg)}) as run:
        summary = generate(cfg, out, progress=not args.quiet)
        from detailfusion.tracking.stages import log_synthesize

        with phase("tracking_log"):
            log_synthesize(run, summary, out)
    _print_json(summary)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from detailfusion.config import to_dict
    from detailfusion.data.prepare import run_prepare

    cfg = args.config.prepare
    root = Path(args.root) if args.root else args.config.data.root
    out = Path(args.out) if args.out else cfg.out
    logged = {"data": {"root": str(root)}, "prepare": to_dict(replace(cfg, out=out))}
    with tracked(args, "prepare", logged) as run:
        summary = run_prepare(cfg, root, out, progress=not args.quiet)
        from detailfusion.tracking.stages import log_prepare

        with phase("tracking_log"):
            log_prepare(run, args.config, out, cfg.datasets)
    _print_json(summary)
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from detailfusion.config import to_dict
    from detailfusion.data.validate import run_validate

    cfg = args.config.validate
    prepared = Path(args.prepared) if args.prepared else cfg.prepared
    report_dir = Path(args.report_dir) if args.report_dir else cfg.report_dir
    from detailfusion.tracking.stages import log_validate, log_validation_report

    logged = {"validate": to_dict(replace(cfg, prepared=prepared, report_dir=report_dir))}
    with tracked(args, "validate", logged) as run:
        try:
            report = run_validate(cfg, prepared, report_dir)
        finally:
            # the report and Data Docs are written before a violation is raised: log them either way
            with phase("tracking_log"):
                log_validation_report(run, report_dir)
        log_validate(run)
    print(report["summary_text"])
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from detailfusion.data.stats import dataset_stats

    _print_json(dataset_stats(args.format, Path(args.root), split=args.split, category=args.category))
    return 0


# --------------------------------------------------------------------------- train / evaluate


def cmd_pretrain_backbone(args: argparse.Namespace) -> int:
    from detailfusion.tracking.stages import log_pretrain, step_logger
    from detailfusion.train.pretrain import METRICS_FILE, run_pretrain

    logged = args.config.section_dict(("model", "synthesize", "pretrain_backbone"))
    with tracked(args, "pretrain_backbone", logged) as run:
        metrics = run_pretrain(args.config, args.metrics_dir, progress=not args.quiet, on_log=step_logger(run))
        log_pretrain(run, Path(args.metrics_dir) / METRICS_FILE)
    _print_json(metrics)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.stage == "pretrain_backbone":
        return cmd_pretrain_backbone(args)
    from detailfusion.train.stages import RUNNERS, StageContext, effective_config

    ctx = StageContext(args.config, models_dir=args.models_dir, metrics_dir=args.metrics_dir)
    from detailfusion.tracking.stages import log_train, step_logger

    with tracked(args, args.stage, effective_config(args.config, args.stage)) as run:
        metrics = RUNNERS[args.stage](ctx, progress=not args.quiet, on_log=step_logger(run))
        with phase("tracking_log"):
            log_train(run, args.stage, ctx.params, Path(args.metrics_dir), ctx.prepared_dir)
    _print_json(metrics)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from detailfusion.config import to_dict
    from detailfusion.eval.evaluate import run_evaluate, write_test_submission

    params = args.config
    cfg = replace(params.evaluate, **({"split": args.split} if args.split else {}))
    prepared = Path(args.prepared) if args.prepared else params.prepare.out
    dataset = args.dataset or params.dataset
    if args.submission_only:
        paths = write_test_submission(Path(args.model), prepared, cfg.split, Path(args.out), cfg.batch_size,
                                      progress=not args.quiet)
        _print_json({"recall": str(paths[0]), "recall_subset": str(paths[1])})
        return 0
    with tracked(args, "evaluate", {"evaluate": to_dict(cfg)}) as run:
        summary = run_evaluate(cfg, Path(args.model), prepared, dataset, progress=not args.quiet)
        from detailfusion.tracking.stages import log_evaluate

        with phase("tracking_log"):
            log_evaluate(run, params, cfg, summary, prepared, dataset)
    _print_json(summary)
    return 0


def _key_values(items: list[str], what: str) -> list[str]:
    from detailfusion.errors import ConfigError

    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what}: expected KEY=VALUE, got {item!r}")
    return items


def cmd_ablations(args: argparse.Namespace) -> int:
    """The ablation suite as DVC experiments (detailfusion.experiments.runner); exit 1 if a run failed."""
    from detailfusion.errors import ConfigError
    from detailfusion.experiments.runner import collect_suite, run_suite
    from detailfusion.tracking.config import find_repo_root as dvc_root

    repo = dvc_root(Path.cwd())
    if Path(args.params).resolve() != (repo / "params.yaml").resolve():
        raise ConfigError(f"--params {args.params}: ablations run DVC experiments of {repo / 'params.yaml'}; "
                          "run from the repository and leave --params at its default")
    args.config = _load_config(args)  # every experiment starts from this file: a bad value stops the suite here
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    extra: dict[str | None, list[str]] = {None: _key_values(args.set or [], "--set")}
    for variant, item in args.set_for or []:
        extra.setdefault(variant, []).extend(_key_values([item], f"--set-for {variant}"))
    if args.collect:
        ignored = [flag for flag, given in (("--set", args.set), ("--set-for", args.set_for), ("--rerun", args.rerun),
                                            ("--push", args.push), ("--budget-scale", args.budget_scale != 1.0))
                   if given]  # fmt: skip
        if ignored:
            raise ConfigError(f"--collect runs nothing, so {', '.join(ignored)} would be ignored; drop them")
        result = collect_suite(repo, variants=variants, seeds=seeds, summary_path=args.summary, table_path=args.table,
                               parent_run_id=args.parent_run_id, prefix=args.prefix,
                               every_seed=args.every_seed)  # fmt: skip
    else:
        result = run_suite(repo, variants=variants, seeds=seeds, budget_scale=args.budget_scale, extra_params=extra,
                           summary_path=args.summary, table_path=args.table, log_dir=args.logs, push=args.push,
                           parent_run_id=args.parent_run_id, rerun=args.rerun, echo=not args.quiet,
                           prefix=args.prefix, every_seed=args.every_seed)  # fmt: skip
    print(result.table, end="")  # what the table file holds: per-variant means, held-out, Welch and same-seed differences
    print(f"experiments: {', '.join(result.experiments)} (dvc exp show --only-changed)")
    if result.parent_run_id:
        print(f"MLflow parent run: {result.parent_run_id}")
    if result.failed:
        print(f"error: {len(result.failed)} of {len(result.experiments)} ablation runs failed: "
              + "; ".join(f"{n}: {e}" for n, e in result.failed.items()), file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detailfusion",
        description="DetailFusion composed image retrieval: data, training stages, evaluation, registry, "
        "batch retrieval and ablations. The DVC pipeline (dvc.yaml) runs these subcommands.",
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthetic benchmark, native-format readers, prepare, validate")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("synth", help="write the synthetic detail benchmark in CIRR/FashionIQ/IPr2Pr formats")
    p.add_argument("--out", help="output root (default: params data.root)")
    p.add_argument("--seed", type=int, help="override synthesize.seed")
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser("prepare", help="native formats -> canonical manifests + decoded image cache")
    p.add_argument("--root", help="raw data root holding cirr/ fashioniq/ ipr2pr/ (default: params data.root)")
    p.add_argument("--out", help="output folder (default: params prepare.out)")
    p.set_defaults(func=cmd_data_prepare)

    p = dsub.add_parser("validate", help="Great Expectations suites on the prepared manifests")
    p.add_argument("--prepared", help="prepared folder (default: params validate.prepared)")
    p.add_argument("--report-dir", help="report folder (default: params validate.report_dir)")
    p.set_defaults(func=cmd_data_validate)

    p = dsub.add_parser("stats", help="JSON counts for a data set in a native format")
    p.add_argument("format", choices=["cirr", "fashioniq", "ipr2pr"])
    p.add_argument("root", help="data set root (the folder holding captions/ and image_splits/)")
    p.add_argument("--split", help="only this split (cirr: train/val/test1; fashioniq: train/val/test)")
    p.add_argument("--category", help="fashioniq only: dress, shirt or toptee")
    p.set_defaults(func=cmd_data_stats)

    p = sub.add_parser("train", help=f"run one training stage ({', '.join(TRAIN_STAGES)})")
    p.add_argument("stage", choices=TRAIN_STAGES)
    p.add_argument("--models-dir", default="models")
    p.add_argument("--metrics-dir", default="metrics")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="CIRR/FashionIQ protocol metrics, submission files, plots, report")
    p.add_argument("--model", default="models/stage3/model", help="saved model folder (config.json + safetensors)")
    p.add_argument("--prepared", help="prepared data folder (default: params prepare.out)")
    p.add_argument("--dataset", choices=["cirr", "fashioniq"], help="default: params stage2_branches.dataset")
    p.add_argument("--split", help="default: params evaluate.split")
    p.add_argument("--submission-only", action="store_true",
                   help="only write the CIRR test-server files for --split (e.g. test1) into --out")
    p.add_argument("--out", default="reports/submission", help="folder for --submission-only files")
    p.set_defaults(func=cmd_evaluate)

    from detailfusion.registry.cli import add_parser as add_registry_parser
    from detailfusion.tracking.cli import add_parser as add_tracking_parser

    add_registry_parser(sub)
    add_tracking_parser(sub)
    from detailfusion.retrieval.cli import add_parser as add_retrieve_parser

    add_retrieve_parser(sub)

    p = sub.add_parser("ablations", help="run the ablation suite (method.md) as DVC experiments abl-<variant>-s<seed>")
    p.add_argument("--variants", help="comma-separated suite entries (default: all: the six variants and "
                                      "no_pretrain_dropped)")
    p.add_argument("--seeds", help="comma-separated seeds for full/gm_only/no_pretrain/no_pretrain_dropped "
                                   "(default: 0,1,2; the others run the first unless --every-seed)")
    p.add_argument("--every-seed", action="store_true",
                   help="every suite entry runs (or --collect expects) every seed, not only the four above")
    p.add_argument("--summary", default="metrics/ablations.json", help="summary JSON path")
    p.add_argument("--table", default="reports/ablations.md", help="markdown table path")
    p.add_argument("--logs", default="reports/ablation_logs", help="folder for each experiment's full output")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="scale every stage's max_steps by this factor (same for all variants)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="extra params.yaml override (dvc exp run -S) for every variant; repeatable")
    p.add_argument("--set-for", action="append", nargs=2, metavar=("VARIANT", "KEY=VALUE"),
                   help="extra params.yaml override for one variant only; repeatable")
    p.add_argument("--prefix", default="abl",
                   help="experiment names <prefix>-<variant>-s<seed> (default: abl); another prefix keeps a tuning "
                        "sweep (--set) apart from the suite's own runs")
    p.add_argument("--rerun", action="store_true",
                   help="run every experiment again (default: reuse a finished one with the same params)")
    p.add_argument("--push", metavar="GIT_REMOTE", help="dvc exp push each finished experiment to this git remote")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: summarise the suite's finished experiments of any commit (newest per name; "
                        "pulled ones too) into --summary/--table and a new MLflow parent; missing ones fail")
    p.add_argument("--parent-run-id", help="nest the runs under this MLflow run (default: "
                   "$DETAILFUSION_PIPELINE_RUN_ID, else a new 'ablation-suite' run)")
    p.set_defaults(func=cmd_ablations)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from detailfusion.timings import stage_timer

    try:
        # every command but `data stats` reads params.yaml: all of it is checked here, once, before
        # any data is read or any output (timings included) is written (`ablations` first checks that
        # --params is the repository's file, then loads it)
        args.config = None if args.func in (cmd_data_stats, cmd_ablations) else _load_config(args)
        with stage_timer(args):  # reports/timings/<stage>.json for the pipeline stages (not a DVC output)
            return int(args.func(args) or 0)
    except DetailFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
