"""The ablation suite as DVC experiments: the pure pieces, and ``detailfusion ablations`` on a
shrunk copy of the repository (one variant made to fail; the other one completes, is a DVC
experiment that a fresh clone sees after ``dvc exp push``, and its runs nest under one MLflow
parent)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from scipy.stats import t as scipy_t
from test_pipeline import _run, repo  # noqa: F401  (the fixture: a shrunk git copy of the repository)

from detailfusion.errors import ConfigError
from detailfusion.experiments import (
    EXP_TARGETS,
    METRICS,
    MULTI_SEED,
    SUITE_ENTRIES,
    SUITE_ORDER,
    VARIANT_ORDER,
    AblationRun,
    collect_from_dvc,
    error_lines,
    exp_run_command,
    markdown_table,
    parse_exp_show,
    parse_name,
    plan,
    set_params,
    summarize,
)
from detailfusion.params import repo_section

BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- pure pieces


def test_plan_names_and_multi_seed_only_where_asked():
    from detailfusion.models.variants import list_variants

    assert list(VARIANT_ORDER) == list_variants()
    assert set(SUITE_ORDER) == set(VARIANT_ORDER) | set(SUITE_ENTRIES)
    runs = plan()
    for multi in ("full", "gm_only", "no_pretrain", "no_pretrain_dropped"):
        assert [r.seed for r in runs if r.variant == multi] == [0, 1, 2]
    assert [r.seed for r in runs if r.variant == "di_only"] == [0]
    assert len(runs) == 3 * len(MULTI_SEED) + len(SUITE_ORDER) - len(MULTI_SEED)
    assert AblationRun("gm_only", 2).name == "abl-gm_only-s2"
    assert all(parse_name(r.name) == (r.variant, r.seed) for r in runs)
    assert parse_name("pipeline-647a0ddc-green-crow") is None
    assert [r.name for r in plan(["gm_only", "avg_fusion"], [5, 7], prefix="x-y")] == [
        "x-y-gm_only-s5", "x-y-gm_only-s7", "x-y-avg_fusion-s5"]
    assert [r.name for r in plan(["gm_only", "avg_fusion"], [5, 7], prefix="x-y", every_seed=True)] == [
        "x-y-gm_only-s5", "x-y-gm_only-s7", "x-y-avg_fusion-s5", "x-y-avg_fusion-s7"]
    every = plan(every_seed=True)
    assert len(every) == 3 * len(SUITE_ORDER)
    assert {r.name for r in runs} < {r.name for r in every}


@pytest.mark.parametrize("variants,seeds,match", [
    (["full", "nope"], None, "unknown variant"),
    (["full", "full"], None, "unique"),
    (None, [0, 0], "unique"),
    (None, [-1], ">= 0"),
    (None, [], "non-empty"),
])
def test_plan_rejects_bad_input(variants, seeds, match):
    with pytest.raises(ConfigError, match=match):
        plan(variants, seeds)


def test_set_params_variant_seeds_and_budget_scale_from_params_yaml(tmp_path):
    real = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    run = AblationRun("no_pretrain", 3)
    assert set_params(run, params=REPO_ROOT / "params.yaml") == [
        "model.variant=no_pretrain", "stage1_detail.loop.seed=3", "stage2_branches.loop.seed=3",
        "stage3_fusion.loop.seed=3"]
    # no_pretrain both ways: stage 1's steps given to stage 2 (default) or stage 1 simply dropped
    dropped = set_params(AblationRun("no_pretrain_dropped", 1), params=REPO_ROOT / "params.yaml")
    assert dropped[:2] == ["model.variant=no_pretrain", "stage2_branches.equalize_budget=false"]
    assert AblationRun("no_pretrain_dropped", 1).model_variant == "no_pretrain"
    scaled = dict(s.split("=") for s in set_params(run, 0.5, REPO_ROOT / "params.yaml"))
    for section in ("stage1_detail", "stage2_branches", "stage3_fusion"):
        assert int(scaled[f"{section}.loop.max_steps"]) == round(real[section]["loop"]["max_steps"] * 0.5)
    tiny = {s: {"loop": {"max_steps": 1}} for s in ("stage1_detail", "stage2_branches", "stage3_fusion")}
    assert "stage1_detail.loop.max_steps=1" in set_params(run, 0.01, tiny)  # never below one step
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="budget scale"):
            set_params(run, bad, REPO_ROOT / "params.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text(yaml.safe_dump({**tiny, "stage3_fusion": {"loop": {"max_steps": "many"}}}))
    with pytest.raises(ConfigError, match=r"params.yaml: stage3_fusion.loop.max_steps"):
        set_params(run, 0.5, broken)


def test_exp_run_command_stops_before_register():
    cmd = exp_run_command(AblationRun("full", 0), ["model.variant=full"])
    assert cmd[:3] == ["dvc", "exp", "run"] and "register" not in cmd
    assert cmd[3:3 + len(EXP_TARGETS)] == list(EXP_TARGETS) == ["validate", "evaluate"]
    assert cmd[-5:] == ["--temp", "-n", "abl-full-s0", "-S", "model.variant=full"]
    assert "--temp" not in exp_run_command(AblationRun("full", 0), [], temp=False)
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert set(EXP_TARGETS) <= set(dvc_yaml) and "register" in dvc_yaml


def _eval(r1: float) -> dict:
    metrics = {m: r1 for m in ("R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg")}
    return {"metrics": metrics, "baselines": {"text_only": {"R@1": 1.0}}}


def test_summarize_mean_std_ci_over_seeds_and_table():
    results = {f"abl-full-s{s}": _eval(v) for s, v in enumerate((10.0, 12.0, 14.0))}
    results["abl-gm_only-s0"] = {"variant": "gm_only", "seed": 0, **_eval(30.0)}
    summary = summarize(results)
    assert list(summary) == ["full", "gm_only"]  # VARIANT_ORDER, not insertion order
    full = summary["full"]
    assert full["n_seeds"] == 3 and full["seeds"] == [0, 1, 2] and full["R@1"] == 12.0 and full["R@1_std"] == 2.0
    half = 4.302653 * 2.0 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert full["R@1_ci95"] == pytest.approx([12.0 - half, 12.0 + half], abs=1e-3)
    assert full["baseline_text_only_R@1"] == 1.0
    gm = summary["gm_only"]
    assert gm["n_seeds"] == 1 and gm["R@1_std"] == 0.0 and "R@1_ci95" not in gm and gm["runs"] == ["abl-gm_only-s0"]
    table = markdown_table(summary, {"abl-di_only-s0": "exit 1: error: boom"})
    assert "| full | 3 | 12.0 ± 2.0 |" in table and "| gm_only | 1 | 30.0 |" in table
    assert "- `abl-di_only-s0`: exit 1: error: boom" in table


def _eval_heldout(r1: float, heldout_r1: float) -> dict:
    res = _eval(r1)
    res["heldout"] = {m: heldout_r1 for m in ("R@1", "R@5", "R@10", "R@50", "Rsub@1", "Rsub@2", "Rsub@3", "Avg")}
    return res


def test_summary_heldout_and_welch_differences():
    """Held-out statistics next to val's, and full minus each multi-seed entry with the Welch
    interval (computed here by hand), in the summary, the table and the MLflow keys."""
    from detailfusion.experiments.ablations import differences
    from detailfusion.experiments.tracking import summary_metrics

    results = {f"abl-full-s{s}": _eval_heldout(v, h) for s, (v, h) in enumerate(((10.0, 20.0), (12.0, 22.0), (14.0, 27.0)))}
    results |= {f"abl-gm_only-s{s}": {"variant": "gm_only", "seed": s, **_eval_heldout(v, h)}
                for s, (v, h) in enumerate(((8.0, 19.0), (9.0, 19.0)))}
    results["abl-di_only-s0"] = {"variant": "di_only", "seed": 0, **_eval_heldout(5.0, 6.0)}
    summary = summarize(results)
    assert summary["full"]["heldout"]["R@1"] == 23.0 and summary["full"]["heldout"]["R@1_std"] == pytest.approx(3.606, abs=1e-3)
    assert summary["di_only"]["heldout"] == {**{m: 6.0 for m in METRICS}, **{f"{m}_std": 0.0 for m in METRICS}}
    diffs = differences(results)
    assert list(diffs) == ["full - gm_only"]  # di_only has one seed: no interval
    va, vb = 4.0 / 3, 0.5 / 2  # sample variances over n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 1)
    half = scipy_t.ppf(0.975, df) * math.sqrt(va + vb)
    cell = diffs["full - gm_only"]["val"]["R@1"]
    assert cell["diff"] == 3.5 and cell["ci95"] == pytest.approx([3.5 - half, 3.5 + half], abs=1e-3)
    assert diffs["full - gm_only"]["heldout"]["Avg"]["diff"] == 4.0
    # paired by seed: seeds 0 and 1 are common, differences 10 - 8 and 12 - 9
    paired = cell["paired"]
    p_half = scipy_t.ppf(0.975, 1) * math.sqrt(0.5) / math.sqrt(2)
    assert paired["diff"] == 2.5 and paired["seeds"] == [0, 1]
    assert paired["ci95"] == pytest.approx([2.5 - p_half, 2.5 + p_half], abs=1e-3)
    assert diffs["full - gm_only"]["heldout"]["R@1"]["paired"]["diff"] == 2.0  # (20 - 19 + 22 - 19) / 2
    assert differences({"abl-full-s0": _eval(1.0), "abl-gm_only-s0": _eval(1.0), "abl-gm_only-s1": _eval(2.0)}) == {}
    table = markdown_table(summary, diffs=diffs)
    assert "Held-out split (not tuned on):" in table and "| full | 3 | 23.0 ± 3.6 |" in table
    assert f"| full - gm_only | +3.5 [{3.5 - half:+.1f}, {3.5 + half:+.1f}] |" in table
    assert "held out (95 % Welch interval)" in table
    assert "Same-seed differences, val (mean, 95 % t interval):" in table
    assert f"| full - gm_only | +2.5 [{2.5 - p_half:+.1f}, {2.5 + p_half:+.1f}] |" in table
    # seeds that do not match give no paired interval
    shifted = {f"abl-gm_only-s{s}": {"variant": "gm_only", "seed": s, **_eval(v)} for s, v in ((5, 8.0), (6, 9.0))}
    lone = differences({k: v for k, v in results.items() if "full" in k} | shifted)
    assert "paired" not in lone["full - gm_only"]["val"]["R@1"] and "Same-seed" not in markdown_table({}, diffs=lone)
    keys = summary_metrics(summary)
    assert keys["full/heldout/R_at_1"] == 23.0 and keys["full/R_at_1"] == 12.0
    assert not any(k.endswith("ci95") for k in keys)  # intervals are lists: in the JSON, not metrics


def test_parse_exp_show_dvc3_schema():
    def rev(name, variant, evaluation, error=None):
        data = {"timestamp": "2026-12-01T20:54:00", "params": {"params.yaml": {"data": {
            "model": {"variant": variant}, "stage2_branches": {"loop": {"seed": 1}}}}},
            "metrics": {"metrics/eval.json": {"data": evaluation}}}
        return {"rev": f"rev-{name}", "name": name, "error": error, "data": data}

    doc = [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
           {"rev": "base1", "name": "main", "data": {}, "experiments": [
               {"name": "abl-full-s1", "executor": None, "revs": [rev("abl-full-s1", "full", {"cirr": _eval(5.0)})]},
               {"name": "abl-di_only-s0", "executor": None,
                "revs": [rev("abl-di_only-s0", "di_only", {}, error={"type": "failed"})]},
               {"name": "pipeline-x", "executor": None, "revs": [rev("pipeline-x", "full", {"cirr": _eval(1.0)})]},
               {"name": "abl-no_pretrain_dropped-s1", "executor": None,
                "revs": [rev("abl-no_pretrain_dropped-s1", "no_pretrain", {"cirr": _eval(3.0)})]},
               # a run killed mid-way leaves a 'running' temp executor whose data are the baseline's
               {"name": "abl-gm_only-s0", "executor": {"state": "running", "name": "tempdir", "local": None},
                "revs": [rev("abl-gm_only-s0", "gm_only", {"cirr": _eval(9.0)})]},
           ]}]
    got = parse_exp_show(doc)
    # the suite entry comes from the name: no_pretrain_dropped runs model.variant no_pretrain
    assert got.pop("abl-no_pretrain_dropped-s1")["variant"] == "no_pretrain_dropped"
    assert list(got) == ["abl-full-s1"]
    assert got["abl-full-s1"]["variant"] == "full" and got["abl-full-s1"]["seed"] == 1
    assert got["abl-full-s1"]["dataset"] == "cirr" and got["abl-full-s1"]["metrics"]["R@1"] == 5.0
    assert got["abl-full-s1"]["rev"] == "rev-abl-full-s1" and got["abl-full-s1"]["baseline"] == "base1"
    assert list(parse_exp_show(doc, ["pipeline-x"])) == ["pipeline-x"]

    # eval.json is an output, not a DVC metric: the result is read from the experiment's commit
    for baseline in doc:
        for exp in baseline.get("experiments") or []:
            for r in exp["revs"]:
                r["data"]["metrics"] = {"metrics/headline.json": {"data": {"R@1": 0.0}}}
    assert parse_exp_show(doc, ["abl-full-s1"]) == {}
    files = {("rev-abl-full-s1", "metrics/eval.json"): json.dumps({"cirr": _eval(7.0)})}
    got = parse_exp_show(doc, ["abl-full-s1"], read_file=lambda rev, path: files.get((rev, path)))
    assert list(got) == ["abl-full-s1"] and got["abl-full-s1"]["metrics"]["R@1"] == 7.0
    assert got["abl-full-s1"]["heldout"] == {}  # not evaluated on a held-out split
    files = {("rev-abl-full-s1", "metrics/eval.json"): json.dumps(
        {"cirr": {**_eval(7.0), "heldout": {"split": "test1", "metrics": {"R@1": 9.0}}}})}
    got = parse_exp_show(doc, ["abl-full-s1"], read_file=lambda rev, path: files.get((rev, path)))
    assert got["abl-full-s1"]["heldout"] == {"R@1": 9.0}


def test_error_lines_pick_the_errors():
    out = ("Running stage 'stage1_detail':\n> detailfusion --quiet train stage1_detail\n"
           "error: params.yaml: model.arch 'bogus' not found\n"
           "ERROR: failed to reproduce 'stage1_detail': failed to run: detailfusion, exited with 2\n")
    assert error_lines(out) == ("error: params.yaml: model.arch 'bogus' not found | ERROR: failed to reproduce "
                                "'stage1_detail': failed to run: detailfusion, exited with 2")
    tb = "Traceback (most recent call last):\n  File x\nValueError: broken\n"
    assert error_lines(tb) == "ValueError: broken"
    assert error_lines("just\nlast line\n") == "last line"


@pytest.mark.parametrize("argv,match", [
    (["ablations", "--variants", "full,nope"], "unknown variant"),
    (["ablations", "--seeds", "0,x"], "--seeds"),
    (["ablations", "--set", "novalue"], "--set: expected KEY=VALUE"),
    (["ablations", "--variants", "full", "--set-for", "gm_only", "a=1"], "not in the suite"),
    (["ablations", "--budget-scale", "0"], "budget scale"),
    (["--params", "other.yaml", "ablations"], "--params other.yaml"),
])
def test_cli_bad_input_one_line_and_nothing_run(argv, match, capsys, monkeypatch):
    from detailfusion.cli import main

    monkeypatch.chdir(REPO_ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


# --------------------------------------------------------------------------- the suite, for real


@pytest.mark.slow
def test_suite_as_dvc_experiments_one_variant_failing(repo, tmp_path):  # noqa: F811
    root, env = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    for stage, steps in (("stage1_detail", 2), ("stage2_branches", 2), ("stage3_fusion", 2)):
        params[stage]["loop"]["max_steps"] = steps
    params["evaluate"].update(bootstrap=10, report_samples=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # a git remote and a DVC remote, so the experiment can be pushed and seen from a fresh clone
    _run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], root, env)
    _run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], root, env)
    _run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvc-store")], root, env)
    _run(["git", "commit", "-qam", "shrunk, remotes"], root, env)
    _run(["git", "push", "-q", "origin", "main"], root, env)

    done = _run(["detailfusion", "ablations", "--variants", "gm_only,di_only", "--seeds", "0", "--push", "origin",
                 "--set-for", "di_only", "model.arch=bogus"], root, env, check=False)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    # the failure is reported with its error, the other variant is unaffected
    assert "1 of 2 ablation runs failed" in done.stderr and "abl-di_only-s0" in done.stderr and "bogus" in done.stderr
    summary = json.loads((root / "metrics" / "ablations.json").read_text())
    assert list(summary["variants"]) == ["gm_only"]
    assert summary["variants"]["gm_only"]["n_seeds"] == 1 and 0 <= summary["variants"]["gm_only"]["R@1"] <= 100
    assert summary["runs"]["abl-di_only-s0"]["status"] == "failed" and "bogus" in summary["runs"]["abl-di_only-s0"]["error"]
    assert summary["runs"]["abl-gm_only-s0"]["status"] == "ok"
    table = (root / "reports" / "ablations.md").read_text()
    assert "| gm_only | 1 |" in table and "`abl-di_only-s0`" in table
    assert table in done.stdout  # the CLI prints the very table it wrote (held-out and differences included)
    assert (root / "reports" / "ablation_logs" / "abl-di_only-s0.log").is_file()
    # the workspace is untouched (--temp): params.yaml still the baseline's
    assert yaml.safe_load((root / "params.yaml").read_text())["model"]["variant"] == "full"

    # DVC: the finished variant is an experiment with the evaluation metrics; the failed one is not
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], root, env).stdout)
    names = {e["name"] for b in shown for e in (b.get("experiments") or [])}
    assert "abl-gm_only-s0" in names and "abl-di_only-s0" not in names
    exp = collect_from_dvc(root, ["abl-gm_only-s0"], dvc=str(BIN / "dvc"))["abl-gm_only-s0"]  # eval.json read from the exp commit
    assert exp["variant"] == "gm_only" and exp["baselines"]
    assert exp["metrics"]["R@1"] == pytest.approx(summary["variants"]["gm_only"]["R@1"], abs=1e-3)
    # the synthetic test1 (sidecar targets) is evaluated too: its metrics reach the summary
    assert set(exp["heldout"]) == set(exp["metrics"])
    assert exp["heldout"]["Avg"] == pytest.approx(summary["variants"]["gm_only"]["heldout"]["Avg"], abs=1e-3)
    assert "Held-out split (not tuned on):" in table
    # --collect runs nothing and summarises the finished experiments of any commit; a missing one fails
    collected = _run(["detailfusion", "ablations", "--collect", "--variants", "gm_only,di_only", "--seeds", "0",
                      "--summary", "metrics/collected.json", "--table", "reports/collected.md"], root, env, check=False)
    assert collected.returncode == 1 and "abl-di_only-s0: no finished experiment" in collected.stderr, collected.stderr
    assert "s1" not in collected.stderr
    # --every-seed: the single-seed entries are expected at every seed too
    every = _run(["detailfusion", "ablations", "--collect", "--every-seed", "--variants", "gm_only,di_only", "--seeds",
                  "0,1", "--summary", "metrics/every.json", "--table", "reports/every.md"], root, env, check=False)
    assert every.returncode == 1 and "3 of 4 ablation runs failed" in every.stderr, every.stderr
    assert all(f"{n}: no finished experiment" in every.stderr for n in ("abl-gm_only-s1", "abl-di_only-s0",
                                                                        "abl-di_only-s1")), every.stderr
    doc = json.loads((root / "metrics" / "collected.json").read_text())
    assert (root / "reports" / "collected.md").read_text() in collected.stdout
    assert doc["variants"] == summary["variants"] and doc["runs"]["abl-gm_only-s0"]["status"] == "collected"
    assert doc["runs"]["abl-gm_only-s0"]["baseline"] == _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    bad = _run(["detailfusion", "ablations", "--collect", "--rerun"], root, env, check=False)
    assert bad.returncode == 2 and "--collect runs nothing, so --rerun would be ignored" in bad.stderr
    # a fresh clone sees it after dvc exp pull (pushed by the suite)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", "-b", "main", str(tmp_path / "origin.git"), str(clone)], tmp_path, env)
    _run(["dvc", "exp", "pull", "origin", "abl-gm_only-s0"], clone, env)

    assert collect_from_dvc(clone, ["abl-gm_only-s0"], dvc=str(BIN / "dvc"))["abl-gm_only-s0"]["metrics"] == exp["metrics"]

    # MLflow: one parent with the summary; every stage run nested under it, tagged with the
    # variant and the experiment name; the failed variant's stage run FAILED; no model registered
    from mlflow import MlflowClient

    client = MlflowClient(params["tracking"]["tracking_uri"])
    experiment = client.get_experiment_by_name("detailfusion-cirr")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["detailfusion.run_kind"] == "ablation_suite" and parent.info.status == "FAILED"
    assert parent.data.tags["ablation.failed"] == "abl-di_only-s0"
    assert parent.data.metrics["gm_only/R_at_1"] == summary["variants"]["gm_only"]["R@1"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablations")} >= {
        "ablations/ablations.json", "ablations/ablations.md", "ablations/failed.json"}
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    trained = [r for r in children if r.data.tags.get("detailfusion.stage") in ("stage2_branches", "evaluate")]
    assert {(r.data.tags["ablation"], r.data.tags["dvc.exp_name"], r.data.tags["detailfusion.stage"]) for r in trained
            if r.info.status == "FINISHED"} == {("gm_only", "abl-gm_only-s0", "stage2_branches"),
                                                ("gm_only", "abl-gm_only-s0", "evaluate")}
    failed = [r for r in children if r.data.tags.get("ablation") == "di_only"]
    assert failed and all(r.data.tags["dvc.exp_name"] == "abl-di_only-s0" for r in failed)
    assert "FAILED" in {r.info.status for r in failed}
    assert not any(r.data.tags.get("detailfusion.stage") == "register" for r in children)
    assert client.search_registered_models() == []
    assert not (root / "reports" / "registry" / "summary.json").exists()


    # a rerun of a finished variant with the same params reuses its experiment instead of training
    again = _run(["detailfusion", "ablations", "--variants", "gm_only", "--seeds", "0"], root, env, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing finished experiments with the same params" in again.stderr and "abl-gm_only-s0" in again.stderr
    rerun = json.loads((root / "metrics" / "ablations.json").read_text())
    assert rerun["runs"]["abl-gm_only-s0"] == {**summary["runs"]["abl-gm_only-s0"], "status": "reused"}
    assert rerun["variants"]["gm_only"] == summary["variants"]["gm_only"]

    # a tuning sweep under its own prefix runs beside the suite's experiments, never replacing them
    sweep = _run(["detailfusion", "ablations", "--prefix", "tune-lrb", "--variants", "gm_only", "--seeds", "0",
                  "--set", "stage2_branches.loop.lr_backbone=0.0003", "--summary", "metrics/tune.json",
                  "--table", "reports/tune.md"], root, env, check=False)  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert "reusing" not in sweep.stderr
    tuned = json.loads((root / "metrics" / "tune.json").read_text())
    assert list(tuned["runs"]) == ["tune-lrb-gm_only-s0"] and tuned["runs"]["tune-lrb-gm_only-s0"]["status"] == "ok"
    both = collect_from_dvc(root, ["abl-gm_only-s0", "tune-lrb-gm_only-s0"], dvc=str(BIN / "dvc"))
    assert both["abl-gm_only-s0"]["metrics"] == exp["metrics"]  # the suite's run is still there, unchanged
    shown = _run(["dvc", "exp", "show", "--json"], root, env).stdout
    assert "0.0003" in shown  # the sweep's override is in its experiment's params

    # a commit made while (or after) a suite runs moves HEAD; the suite's experiments keep their
    # baseline, and the runner collects from every baseline its runs started at, not only HEAD
    suite_head = _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    (root / "NOTES.md").write_text("a commit made while the suite ran\n")
    _run(["git", "add", "NOTES.md"], root, env)
    _run(["git", "commit", "-qm", "moves HEAD"], root, env)
    new_head = _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert collect_from_dvc(root, ["abl-gm_only-s0"], dvc=str(BIN / "dvc")) == {}  # HEAD's own: none yet
    moved = collect_from_dvc(root, ["abl-gm_only-s0", "tune-lrb-gm_only-s0"], baselines=[suite_head, new_head],
                             dvc=str(BIN / "dvc"))  # fmt: skip
    assert moved["abl-gm_only-s0"]["metrics"] == exp["metrics"] and moved["abl-gm_only-s0"]["baseline"] == suite_head
    assert set(moved) == {"abl-gm_only-s0", "tune-lrb-gm_only-s0"}


def test_suite_parent_and_summary_in_mlflow(tmp_path):
    """The suite's parent run (a local store): summary metrics, tags, files, FAILED when a run
    failed; an id that names no run is one clear ConfigError."""
    from mlflow import MlflowClient

    from detailfusion.experiments.tracking import log_suite_summary, suite_parent

    cfg = repo_section("tracking", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", system_metrics=False, retries=0)
    parent = suite_parent(cfg, "cirr", repo_root=tmp_path)
    assert parent.owned and parent.run_id
    summary = summarize({"abl-full-s0": _eval(10.0), "abl-full-s1": _eval(14.0)})
    table = tmp_path / "ablations.md"
    table.write_text(markdown_table(summary))
    assert log_suite_summary(parent, summary, {"abl-gm_only-s0": "exit 1: boom"},
                             experiments=["abl-full-s0", "abl-full-s1", "abl-gm_only-s0"], files=[table])
    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "ablation-suite"
    assert run.data.metrics["full/R_at_1"] == 12.0 and run.data.metrics["full/n_seeds"] == 2.0
    assert run.data.tags["ablation.failed"] == "abl-gm_only-s0"
    assert run.data.tags["ablation.experiments"] == "abl-full-s0,abl-full-s1,abl-gm_only-s0"
    assert {a.path for a in client.list_artifacts(parent.run_id, "ablations")} == {
        "ablations/ablations.md", "ablations/failed.json"}
    # an existing run (a flow's) is attached to, not owned: its status stays with its owner
    attached = suite_parent(cfg, "cirr", run_id=parent.run_id, repo_root=tmp_path)
    assert not attached.owned and attached.run_id == parent.run_id
    with pytest.raises(ConfigError, match="'nope'.*not a run in MLflow"):
        suite_parent(cfg, "cirr", run_id="nope", repo_root=tmp_path)
