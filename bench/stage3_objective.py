"""Stage 3's objective, measured: the compositor trained against the whole training gallery
(``stage3_fusion.negatives: gallery``) vs the batch's targets plus set members (``batch``).

For each variant and seed it runs the three training stages with the pipeline's own stage
runners (``detailfusion.train.stages``) on the prepared data of this checkout (``dvc repro
prepare`` first), the checkout's ``params.yaml`` with ``model.variant`` and every stage's
``loop.seed`` set as ``detailfusion ablations`` sets them, in a scratch folder (``--params`` for another params file). Then stage 3 runs
twice on the same stage-2 model, once per objective, so the two differ in that alone, and each
result is the stage's own validation (the val split's CIRR metrics, as ``metrics/stage3.json``
holds them). Variants without a compositor (``gm_only``, ``di_only``, ``avg_fusion``) skip
stage 3, and their one result stands beside the others for the ranking.

Runs are resumable (a run whose result file exists is read, not rerun). It writes per
objective the mean, std and 95 % t interval over seeds (``detailfusion.experiments.ablations
.summarize``) and, per variant, the paired difference gallery − batch with its t interval, to
``bench/results/stage3_objective.json``, and prints markdown tables.

    python bench/stage3_objective.py                                  # full, no_pretrain, gm_only; seeds 0 1 2
    python bench/stage3_objective.py --variants full --seeds 0 --workdir /tmp/s3obj
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detailfusion.experiments.ablations import METRICS, _ci95, summarize  # noqa: E402
from detailfusion.pipeline import METHOD_STAGES  # noqa: E402

OBJECTIVES = ("gallery", "batch")


def _params_file(base: dict, home: Path, variant: str, seed: int, negatives: str, folder: Path) -> Path:
    params = json.loads(json.dumps(base))
    params["model"]["variant"] = variant
    for stage in METHOD_STAGES:
        params[stage]["loop"]["seed"] = seed
    params["stage3_fusion"]["negatives"] = negatives
    pretrained = params["model"]["pretrained"]
    if pretrained and (home / pretrained).is_file():  # the pretrain_backbone stage's checkpoint, by repo path
        params["model"]["pretrained"] = str(home / pretrained)
    path = folder / f"params-{negatives}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_one(params_path: Path, variant: str, seed: int, workdir: Path, progress: bool) -> dict:
    """Stages 1-2 once, stage 3 once per objective -> ``{objective: {branch: val metrics}}``."""
    from detailfusion.params import load_config
    from detailfusion.train.stages import StageContext, run_stage1, run_stage2, run_stage3

    folder = workdir / f"{variant}-s{seed}"
    result_path = folder / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(params_path.read_text())
    home = params_path.resolve().parent  # relative paths in a params file are the repo's (its folder's)

    def context(negatives: str) -> StageContext:
        params = load_config(_params_file(base, home, variant, seed, negatives, folder))
        return StageContext(params, models_dir=folder / "models", metrics_dir=folder / f"metrics-{negatives}",
                            prepared_dir=home / base["prepare"]["out"])

    first = context(OBJECTIVES[0])
    run_stage1(first, progress=progress)
    run_stage2(first, progress=progress)
    result = {"variant": variant, "seed": seed}
    for negatives in OBJECTIVES:
        out = run_stage3(context(negatives), progress=progress)
        result[negatives] = out["val"]
        result["skipped_stage3"] = bool(out.get("skipped"))
    result_path.write_text(json.dumps(result, indent=1))
    return result


def paired(results: list[dict]) -> dict:
    """Per variant with a compositor: mean gallery − batch over seeds, with its 95 % t interval."""
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant and not r["skipped_stage3"]]
        if not runs:
            continue
        row: dict = {"n_seeds": len(runs), "seeds": sorted(r["seed"] for r in runs)}
        for m in METRICS:
            diffs = [r["gallery"]["model"][m] - r["batch"]["model"][m] for r in runs]
            mean = statistics.fmean(diffs)
            row[m] = round(mean, 3)
            if len(diffs) > 1:
                half = _ci95(diffs)
                row[f"{m}_ci95"] = [round(mean - half, 3), round(mean + half, 3)]
        out[variant] = row
    return out


def _cell(row: dict, m: str, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(row[m])
    if f"{m}_ci95" in row:
        low, high = row[f"{m}_ci95"]
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text


def tables(summary: dict, diffs: dict) -> str:
    lines = ["| variant | stage-3 objective | seeds | " + " | ".join(METRICS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for negatives in OBJECTIVES:
        for variant, row in summary[negatives].items():
            lines.append(f"| {variant} | {negatives} | {row['n_seeds']} | " + " | ".join(_cell(row, m) for m in METRICS) + " |")
    lines += ["", "| variant | gallery − batch (paired) | seeds | " + " | ".join(METRICS) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for variant, row in diffs.items():
        lines.append(f"| {variant} | | {row['n_seeds']} | " + " | ".join(_cell(row, m, True) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--variants", default="full,no_pretrain,gm_only")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/detailfusion-stage3-objective"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stage3_objective.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.params.is_file():
        print(f"{args.params}: no such params file", file=sys.stderr)
        return 2
    prepared = args.params.resolve().parent / yaml.safe_load(args.params.read_text())["prepare"]["out"]
    if not prepared.is_dir():
        print(f"{prepared}: missing; run `dvc repro prepare` (and pretrain_backbone) first", file=sys.stderr)
        return 2
    results = []
    for variant in variants:
        for seed in seeds:
            print(f"== {variant} seed {seed}", flush=True)
            results.append(run_one(args.params, variant, seed, args.workdir, not args.no_progress))
    summary = {
        negatives: summarize({f"{r['variant']}-s{r['seed']}": {"variant": r["variant"], "seed": r["seed"],
                                                                "metrics": r[negatives]["model"]} for r in results})
        for negatives in OBJECTIVES
    }
    diffs = paired(results)
    branches = {f"{r['variant']}-s{r['seed']}": {o: {b: r[o][b] for b in r[o] if b != "model"} for o in OBJECTIVES}
                for r in results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "gallery_minus_batch": diffs, "branches": branches,
                                    "runs": results}, indent=1))
    print(tables(summary, diffs))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
