"""Stage 3's objective, measured: the compositor trained against the whole training gallery
(``stage3_fusion.negatives: gallery``) vs the batch's targets plus set members (``batch``).

For each variant and seed it runs the three training stages with the pipeline's own stage
runners (``detailfusion.train.stages``) on the prepared data of this checkout (``dvc repro
prepare`` first), the checkout's ``params.yaml`` (or ``--params``) with ``model.variant`` and
every stage's ``loop.seed`` set as ``detailfusion ablations`` sets them, in a scratch folder.
Then stage 3 runs twice on the same stage-2 model, once per objective, so the two differ in that
alone. Each result is the stage's own validation (the val split's CIRR metrics, as
``metrics/stage3.json`` holds them) and the same metrics on the held-out split (``test1``, whose
targets only the synthetic benchmark's sidecar knows; no choice is made on it). Variants without
a compositor (``gm_only``, ``di_only``, ``avg_fusion``) skip stage 3, and their one result
stands beside the others for the ranking.

Runs are resumable (a finished run's result file is read, not rerun; a run whose stage 2
finished reruns stage 3 only). It writes per objective the mean, std and 95 % t interval over
seeds (``detailfusion.experiments.ablations.summarize``) and, per variant, the paired difference
gallery − batch with its t interval, to ``bench/results/stage3_objective.json`` (val at the top
level, the held-out split under ``heldout``), and prints markdown tables.

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


def _heldout_data(prepared_dir: Path, dataset: str):
    """The prepared data set when its held-out split (``test1``) has known targets (the synthetic
    benchmark's sidecar), else None (real data): loaded once per run, used for both objectives."""
    from detailfusion.data.prepared import load_prepared
    from detailfusion.eval.evaluate import HELDOUT_SPLIT

    prepared = load_prepared(prepared_dir, dataset)
    q = prepared.queries
    q = q[q["split"] == HELDOUT_SPLIT]
    return prepared if prepared.name == "cirr" and not q.empty and q["target"].notna().all() else None


def run_one(params_path: Path, variant: str, seed: int, workdir: Path, progress: bool) -> dict:
    """Stages 1-2 once, stage 3 once per objective -> ``{objective: {branch: val metrics}}`` and
    ``heldout: {objective: {branch: metrics}}`` (None without held-out targets).

    A run with a result file is read back; one whose stage 2 finished (an older result without
    held-out numbers, or an interrupted run) reruns stage 3 only, which repeats its val numbers
    (said when it does not)."""
    from detailfusion.eval.evaluate import HELDOUT_SPLIT, quick_validation
    from detailfusion.models.io import load_pretrained
    from detailfusion.params import load_config
    from detailfusion.train.stages import StageContext, run_stage1, run_stage2, run_stage3

    folder = workdir / f"{variant}-s{seed}"
    result_path = folder / "result.json"
    before = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if "heldout" in before:
        return before
    folder.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(params_path.read_text())
    home = params_path.resolve().parent  # relative paths in a params file are the repo's (its folder's)
    prepared_dir = home / base["prepare"]["out"]

    def context(negatives: str) -> StageContext:
        params = load_config(_params_file(base, home, variant, seed, negatives, folder))
        return StageContext(params, models_dir=folder / "models", metrics_dir=folder / f"metrics-{negatives}",
                            prepared_dir=prepared_dir)

    first = context(OBJECTIVES[0])
    if not (first.metrics_dir / "stage2.json").is_file():
        run_stage1(first, progress=progress)
        run_stage2(first, progress=progress)
    heldout = _heldout_data(prepared_dir, base["stage2_branches"]["dataset"])
    result: dict = {"variant": variant, "seed": seed, "heldout": None if heldout is None else {}}
    for negatives in OBJECTIVES:
        out = run_stage3(context(negatives), progress=progress)
        result[negatives] = out["val"]
        result["skipped_stage3"] = bool(out.get("skipped"))
        if before.get(negatives) not in (None, out["val"]):
            print(f"{folder}: stage 3 ({negatives}) gave other val metrics than its earlier run", flush=True)
        if heldout is not None:  # the stage-3 model this objective just wrote, per branch as on val
            model = load_pretrained(first.models_dir / "stage3" / "model")
            result["heldout"][negatives] = quick_validation(model, heldout, split=HELDOUT_SPLIT)
    result_path.write_text(json.dumps(result, indent=1))
    return result


def _model_metrics(results: list[dict], split: str, negatives: str) -> list[dict]:
    """Each run's fused-model metrics for one split (``val`` or ``heldout``) and objective."""
    rows = []
    for r in results:
        metrics = r[negatives] if split == "val" else (r["heldout"] or {}).get(negatives)
        if metrics is not None:
            rows.append({**r, "metrics": metrics["model"]})
    return rows


def paired(results: list[dict], split: str = "val") -> dict:
    """Per variant with a compositor: mean gallery − batch over seeds, with its 95 % t interval."""
    gallery = {(r["variant"], r["seed"]): r["metrics"] for r in _model_metrics(results, split, "gallery")}
    batch = {(r["variant"], r["seed"]): r["metrics"] for r in _model_metrics(results, split, "batch")}
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant and not r["skipped_stage3"]
                and (variant, r["seed"]) in gallery and (variant, r["seed"]) in batch]
        if not runs:
            continue
        row: dict = {"n_seeds": len(runs), "seeds": sorted(r["seed"] for r in runs)}
        for m in METRICS:
            diffs = [gallery[variant, r["seed"]][m] - batch[variant, r["seed"]][m] for r in runs]
            mean = statistics.fmean(diffs)
            row[m] = round(mean, 3)
            if len(diffs) > 1:
                half = _ci95(diffs)
                row[f"{m}_ci95"] = [round(mean - half, 3), round(mean + half, 3)]
        out[variant] = row
    return out


def split_summary(results: list[dict], split: str) -> dict:
    """Per objective the ablation summary (mean, std, 95 % t interval over seeds) of one split."""
    return {negatives: summarize({f"{r['variant']}-s{r['seed']}": r for r in _model_metrics(results, split, negatives)})
            for negatives in OBJECTIVES}


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
    summary, diffs = split_summary(results, "val"), paired(results, "val")
    doc: dict = {"summary": summary, "gallery_minus_batch": diffs}
    if any(r["heldout"] for r in results):
        doc["heldout"] = {"summary": split_summary(results, "heldout"),
                          "gallery_minus_batch": paired(results, "heldout")}
    doc["branches"] = {f"{r['variant']}-s{r['seed']}": {o: {b: r[o][b] for b in r[o] if b != "model"}
                                                        for o in OBJECTIVES} for r in results}
    doc["runs"] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print("val split\n\n" + tables(summary, diffs))
    if "heldout" in doc:
        print("held-out split\n\n" + tables(doc["heldout"]["summary"], doc["heldout"]["gallery_minus_batch"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
