"""Training: the three stage runners end to end on the shrunk real params, deterministic batches,
and resume-after-kill giving the same model as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from detailfusion.params import load_config
from detailfusion.train.data import StepSampler, fiq_training_caption, patch_mask
from detailfusion.train.stages import RUNNERS, StageContext


def test_step_sampler_is_a_pure_function_of_step():
    groups = np.repeat(np.arange(20), 3)
    a = StepSampler(groups, 12, seed=3, grouped=True)
    b = StepSampler(groups, 12, seed=3, grouped=True)
    steps = [0, 7, 2, 9, 4]
    assert all((a.batch(s) == b.batch(s)).all() for s in steps)
    # an epoch covers every row once, and groups stay together
    epoch = np.concatenate([a.batch(s) for s in range(a.per_epoch)])
    assert sorted(epoch.tolist()) == list(range(60))
    first = a.batch(0)
    assert len(set(groups[first].tolist())) == 4  # 12 rows = 4 whole groups of 3
    assert not (StepSampler(groups, 12, seed=4).batch(0) == a.batch(0)).all()


def test_patch_mask_same_count_per_row():
    import torch

    m = patch_mask(5, 64, 0.5, torch.Generator().manual_seed(0))
    assert m.shape == (5, 64) and (m.sum(1) == 32).all()
    assert patch_mask(5, 64, 0.0, torch.Generator()) is None


def test_fiq_training_caption_four_ways():
    outs = {fiq_training_caption(" is red.", "has long sleeves", r) for r in (0.1, 0.3, 0.6, 0.9)}
    assert outs == {"Is red and has long sleeves", "Has long sleeves and is red", "Is red", "Has long sleeves"}


def test_stage3_cache_embeds_each_gallery_image_once_with_the_same_vectors(tiny_world):
    """The stage-3 cache embeds each distinct target/negative image once; its rows must be the
    vectors one gets by embedding every (query, slot) occurrence, padding slots zero."""
    import torch

    from detailfusion.data.pixels import gather_pixels
    from detailfusion.data.prepared import load_prepared
    from detailfusion.models import create_model, get_model_config
    from detailfusion.retrieval.embed import encode_images
    from detailfusion.train.data import build_triplets
    from detailfusion.train.stages import cache_branch_outputs

    prepared = load_prepared(Path(tiny_world["params"]["prepare"]["out"]), "cirr")
    triplets = build_triplets(prepared, "train")
    negs = triplets.negatives.copy()
    negs[::3, 2:] = -1  # sets smaller than the slots (real CIRR sets have 6 members, some fewer)
    triplets = dataclasses.replace(triplets, negatives=negs)
    torch.manual_seed(0)
    model = create_model(get_model_config("tiny"), variant="full")
    cache = cache_branch_outputs(model, triplets, prepared.pixels, batch_size=64, progress=False)
    assert len(np.unique(np.concatenate([triplets.target, negs[negs >= 0]]))) < negs.size / 2  # images recur
    want_target = encode_images(model, gather_pixels(prepared.pixels, triplets.target))
    flat = encode_images(model, gather_pixels(prepared.pixels, np.where(negs >= 0, negs, 0).reshape(-1)))
    want_negs = flat.view(*negs.shape, -1) * torch.from_numpy(negs >= 0).unsqueeze(-1).float()
    # the same vectors (bitwise on the machines measured; a BLAS may round a last bit by batch size)
    torch.testing.assert_close(cache["target"], want_target, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache["negatives"], want_negs, rtol=0, atol=1e-6)
    assert (cache["negatives"][::3, 2:] == 0).all()  # padding slots are zero vectors
    assert cache["gm"].shape == (len(triplets), model.embed_dim)


def test_stage3_gallery_objective_is_a_full_softmax_over_the_cached_images(tiny_world):
    """``negatives: gallery``: the cache holds one row per distinct target/reference/member image
    (the same vectors as the per-query targets), and the loss is, per query, the cross-entropy of
    its target over every row of that table with its own reference left out; brute force here."""
    import torch

    from detailfusion.data.prepared import load_prepared
    from detailfusion.models import create_model, get_model_config
    from detailfusion.train.data import build_triplets
    from detailfusion.train.stages import cache_branch_outputs
    from detailfusion.train.tasks import FusionTask

    prepared = load_prepared(Path(tiny_world["params"]["prepare"]["out"]), "cirr")
    triplets = build_triplets(prepared, "train")
    torch.manual_seed(0)
    model = create_model(get_model_config("tiny"), variant="full")
    torch.nn.init.normal_(model.afc.head[-1].weight, std=0.5)  # a compositor that is not the plain average
    cache = cache_branch_outputs(model, triplets, prepared.pixels, batch_size=64, progress=False, gallery=True)
    negs = triplets.negatives
    images = np.unique(np.concatenate([triplets.target, triplets.ref, negs[negs >= 0]]))
    table = cache["gallery"]
    assert table.shape == (len(images), model.embed_dim)
    assert (table[cache["target_index"]] == cache["target"]).all()
    assert (images[cache["reference_index"].numpy()] == triplets.ref).all()
    assert (images[cache["target_index"].numpy()] == triplets.target).all()

    sampler = StepSampler(np.full(len(triplets), -1), 16, 0)
    task = FusionTask(model, cache, sampler, 0)
    assert "gallery" not in task.cache and "negatives" not in task.batch(0, 0, 1, 0, 1)
    model.eval()
    batch = task.batch(0, 0, 1, 0, 1)
    loss = task(batch)["loss"]
    with torch.no_grad():
        query = model.fuse({k: batch[k] for k in ("gm", "di", "gm_tokens", "di_tokens")})["query"]
        scale = model.logit_scale
        want = []
        for i in range(len(query)):
            keep = [j for j in range(len(table)) if j != batch["reference_index"][i]]
            scores = torch.stack([scale * query[i] @ table[j] for j in keep])
            label = keep.index(int(batch["target_index"][i]))
            want.append(-torch.log_softmax(scores, 0)[label])
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-5)
    # FashionIQ keeps the reference in its ranking: there it is one more negative
    kept = FusionTask(model, cache, sampler, 0, exclude_reference=False)(batch)["loss"]
    assert kept > loss
    # without the table: the batch objective, with the set members as extra negatives
    plain = FusionTask(model, {k: v for k, v in cache.items() if k != "gallery"}, sampler, 0)
    assert plain.gallery is None and plain.batch(0, 0, 1, 0, 1)["negatives"].shape == (16, 4, model.embed_dim)


def test_stage2_target_bank_follows_the_data_set_ranking_rule(tiny_world, tmp_path, monkeypatch):
    """run_stage2 builds its target bank so that a query's reference is masked for CIRR (whose
    ranking drops it) and stays a negative for FashionIQ (whose ranking keeps it)."""
    from detailfusion.models import create_model
    from detailfusion.models import io as model_io
    from detailfusion.train import stages

    class Built(Exception):
        pass

    def capture(task, *args, **kwargs):
        raise Built(task.bank.size, task.bank.mask_reference)

    monkeypatch.setattr(model_io, "load_pretrained", lambda folder: create_model("tiny", variant="full"))
    monkeypatch.setattr(stages, "run_training", capture)
    p = yaml.safe_load(tiny_world["params_path"].read_text())
    for dataset, mask_reference in (("cirr", True), ("fashioniq", False)):
        p["stage2_branches"].update(dataset=dataset, bank_size=16)
        path = tmp_path / f"params-bank-{dataset}.yaml"
        path.write_text(yaml.safe_dump(p))
        ctx = StageContext(load_config(path), models_dir=tmp_path / "models", metrics_dir=tmp_path / "metrics",
                           prepared_dir=p["prepare"]["out"])
        with pytest.raises(Built) as built:
            stages.run_stage2(ctx, progress=False)
        assert built.value.args == (16, mask_reference), dataset


def _run_all_stages(world: dict, models: Path, metrics: Path) -> dict:
    ctx = StageContext(load_config(world["params_path"]), models_dir=models, metrics_dir=metrics,
                       prepared_dir=world["params"]["prepare"]["out"])
    return {name: run(ctx, progress=False) for name, run in RUNNERS.items()}


@pytest.mark.slow
def test_three_stages_end_to_end(world_copy):
    root = world_copy["root"]
    out = _run_all_stages(world_copy, root / "models", root / "metrics")
    for n in (1, 2, 3):
        assert (root / "models" / f"stage{n}" / "model" / "model.safetensors").is_file()
        assert json.loads((root / "metrics" / f"stage{n}.json").read_text())["variant"] == "full"
    assert out["stage1_detail"]["steps"] == 3 and not out["stage1_detail"]["skipped"]
    assert out["stage2_branches"]["steps"] == 4
    assert set(out["stage3_fusion"]["val"]) >= {"model", "gm", "di"}
    assert not (root / "models" / "checkpoints").exists() or not any((root / "models" / "checkpoints").iterdir())

    # the files real users upload: test1 has no targets, 50 / 3 names per pairid, no reference
    from detailfusion.cli import main
    from detailfusion.eval.submission import read_cirr_submission

    sub = root / "submission"
    assert main(["--params", str(world_copy["params_path"]), "-q", "evaluate", "--submission-only", "--split",
                 "test1", "--model", str(root / "models" / "stage3" / "model"), "--out", str(sub)]) == 0
    metric, recall = read_cirr_submission(sub / "recall_submission_test1.json")
    _, subset = read_cirr_submission(sub / "recall_subset_submission_test1.json")
    test1 = json.loads((Path(world_copy["params"]["data"]["root"]) / "cirr" / "captions" / "cap.rc2.test1.json").read_text())
    assert metric == "recall" and set(recall) == {str(q["pairid"]) for q in test1} == set(subset)
    for q in test1:
        assert len(recall[str(q["pairid"])]) == 50 and q["reference"] not in recall[str(q["pairid"])]
        assert len(subset[str(q["pairid"])]) == 3 and set(subset[str(q["pairid"])]) <= set(q["img_set"]["members"])


@pytest.mark.slow
def test_variant_without_stage1_gets_the_same_step_budget(world_copy):
    p = world_copy["params"]
    p["model"]["variant"] = "gm_only"
    world_copy["params_path"].write_text(yaml.safe_dump(p))
    root = world_copy["root"]
    out = _run_all_stages(world_copy, root / "models", root / "metrics")
    assert out["stage1_detail"]["skipped"] is True
    assert out["stage2_branches"]["steps"] == 3 + 4
    assert out["stage3_fusion"]["skipped"] is True
    assert set(out["stage3_fusion"]["val"]) == {"model", "gm"}


def _stage2_cmd(world: dict, models: Path, metrics: Path) -> list[str]:
    return [sys.executable, "-m", "detailfusion.cli", "--params", str(world["params_path"]), "--quiet",
            "train", "stage2_branches", "--models-dir", str(models), "--metrics-dir", str(metrics)]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(world_copy):
    root = world_copy["root"]
    p = world_copy["params"]
    p["stage2_branches"]["loop"].update(max_steps=24, checkpoint_every=3)
    p["stage2_branches"]["bank_size"] = 40  # the target bank's state must come back from the checkpoint too
    world_copy["params_path"].write_text(yaml.safe_dump(p))
    ctx = StageContext(load_config(world_copy["params_path"]), models_dir=root / "models", metrics_dir=root / "metrics",
                       prepared_dir=p["prepare"]["out"])
    RUNNERS["stage1_detail"](ctx, progress=False)
    import shutil

    shutil.copytree(root / "models" / "stage1", root / "models_b" / "stage1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    # uninterrupted reference run
    subprocess.run(_stage2_cmd(world_copy, root / "models", root / "metrics"), check=True, env=env,
                   capture_output=True)

    # interrupted run: SIGKILL once a mid-stage checkpoint exists, then rerun
    proc = subprocess.Popen(_stage2_cmd(world_copy, root / "models_b", root / "metrics_b"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = root / "models_b" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(ckpts.glob("stage2_branches-*/checkpoints/last.pt")):
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (root / "models_b" / "stage2").exists()
    done = subprocess.run(_stage2_cmd(world_copy, root / "models_b", root / "metrics_b"), check=True, env=env,
                          capture_output=True, text=True)
    resumed = json.loads((root / "metrics_b" / "stage2.json").read_text())
    reference = json.loads((root / "metrics" / "stage2.json").read_text())
    timing = json.loads((root / "reports" / "timings" / "stage2_branches.json").read_text())
    assert timing["info"]["train_resumed_from"] > 0, done.stderr  # a fact of the run, kept out of the output
    assert resumed == reference  # the whole stage output, final_* loss means and sample count included
    a = load_file(str(root / "models" / "stage2" / "model" / "model.safetensors"))
    b = load_file(str(root / "models_b" / "stage2" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fashioniq_target_dataset_trains_and_evaluates_per_category(world_copy):
    from detailfusion.eval.evaluate import EvaluateConfig, run_evaluate

    root = world_copy["root"]
    p = world_copy["params"]
    p["stage2_branches"]["dataset"] = "fashioniq"
    world_copy["params_path"].write_text(yaml.safe_dump(p))
    out = _run_all_stages(world_copy, root / "models", root / "metrics")
    assert out["stage2_branches"]["train_queries"] > 0
    assert {"dress/R@10", "shirt/R@50", "Avg"} <= set(out["stage3_fusion"]["val"]["model"])
    cfg = EvaluateConfig(**{**p["evaluate"], "bootstrap": 10})
    summary = run_evaluate(cfg, root / "models" / "stage3" / "model", Path(p["prepare"]["out"]), "fashioniq",
                           progress=False)
    assert set(summary["metrics"]) == {f"{c}/R@{k}" for c in ("dress", "shirt", "toptee") for k in (10, 50)} | {
        "avg/R@10", "avg/R@50", "Avg"}
    assert json.loads((root / "metrics" / "headline.json").read_text()) == summary["metrics"]


@pytest.mark.slow
def test_ddp_under_torchrun_two_cpu_processes(world_copy):
    """DDP (gloo) under torchrun: both ranks train on their shard of each batch, rank 0 writes;
    the target bank gathers both ranks' targets (a collective inside the forward)."""
    root = world_copy["root"]
    p = world_copy["params"]
    p["stage2_branches"]["bank_size"] = 24
    world_copy["params_path"].write_text(yaml.safe_dump(p))
    ctx = StageContext(load_config(world_copy["params_path"]), models_dir=root / "models", metrics_dir=root / "metrics",
                       prepared_dir=world_copy["params"]["prepare"]["out"])
    RUNNERS["stage1_detail"](ctx, progress=False)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "detailfusion.cli", "--params",
         str(world_copy["params_path"]), "--quiet", "train", "stage2_branches", "--models-dir", str(root / "models"),
         "--metrics-dir", str(root / "metrics")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((root / "metrics" / "stage2.json").read_text())
    assert metrics["steps"] == 4 and metrics["samples"] == 4 * 16  # global batch of 16 over 2 ranks
    assert (root / "models" / "stage2" / "model" / "model.safetensors").is_file()


def test_cli_reports_bad_params_and_missing_inputs_clearly(world_copy, capsys):
    from detailfusion.cli import main

    root = world_copy["root"]
    params = world_copy["params"]
    bad = root / "bad.yaml"

    params_bad = yaml.safe_load(yaml.safe_dump(params))
    params_bad["model"]["variant"] = "gm_onyl"
    bad.write_text(yaml.safe_dump(params_bad))
    assert main(["--params", str(bad), "-q", "train", "stage1_detail", "--models-dir", str(root / "m")]) == 2
    assert "gm_onyl" in capsys.readouterr().err

    params_bad = yaml.safe_load(yaml.safe_dump(params))
    params_bad["stage2_branches"]["loop"]["batch_size"] = 1
    bad.write_text(yaml.safe_dump(params_bad))
    assert main(["--params", str(bad), "-q", "train", "stage2_branches", "--models-dir", str(root / "m")]) == 2
    err = capsys.readouterr().err
    assert "stage2_branches.loop" in err and "batch_size" in err

    # stage 2 without a stage-1 model names the missing folder; nothing is written
    assert main(["--params", str(world_copy["params_path"]), "-q", "train", "stage2_branches",
                 "--models-dir", str(root / "empty")]) == 2
    assert str(root / "empty" / "stage1") in capsys.readouterr().err
    assert not (root / "empty" / "stage2").exists()


@pytest.mark.slow
def test_stage3_objective_bench_pairs_the_two_objectives_on_one_stage2_model(world_copy, tmp_path):
    """bench/stage3_objective.py: per run, stages 1-2 once and stage 3 once per objective, so the
    branches (frozen in stage 3) are the same and only the fused model differs; a variant without
    a compositor gives one result; a finished run is read back, not rerun."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "stage3_objective.py"
    spec = importlib.util.spec_from_file_location("stage3_objective", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, work = tmp_path / "result.json", tmp_path / "work"
    argv = ["--params", str(world_copy["params_path"]), "--variants", "full,gm_only", "--seeds", "0",
            "--workdir", str(work), "--out", str(out), "--no-progress"]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    full, gm_only = doc["runs"]
    assert (full["variant"], gm_only["variant"]) == ("full", "gm_only")
    for branch in ("gm", "di"):
        assert full["gallery"][branch] == full["batch"][branch]
    assert gm_only["skipped_stage3"] and gm_only["gallery"] == gm_only["batch"]
    assert set(doc["summary"]) == {"gallery", "batch"} and set(doc["gallery_minus_batch"]) == {"full"}
    # the held-out split (test1, targets from the sidecar) beside val, per objective
    assert set(full["heldout"]) == {"gallery", "batch"} and set(full["heldout"]["gallery"]) >= {"model", "gm", "di"}
    assert full["heldout"]["gallery"]["gm"] == full["heldout"]["batch"]["gm"]
    assert full["heldout"]["gallery"]["model"] != full["gallery"]["model"]  # another split, other numbers
    held = full["heldout"]["gallery"]["model"]["Avg"] - full["heldout"]["batch"]["model"]["Avg"]
    assert doc["heldout"]["gallery_minus_batch"]["full"]["Avg"] == pytest.approx(held, abs=1e-3)
    want = full["gallery"]["model"]["R@1"] - full["batch"]["model"]["R@1"]
    assert doc["gallery_minus_batch"]["full"]["R@1"] == pytest.approx(want, abs=1e-3)
    stage3 = {m: json.loads((work / "full-s0" / f"metrics-{m}" / "stage3.json").read_text()) for m in ("gallery", "batch")}
    assert [stage3[m]["negatives"] for m in stage3] == ["gallery", "batch"]
    assert stage3["gallery"]["final_loss"] != stage3["batch"]["final_loss"]  # two objectives trained
    assert stage3["gallery"]["gallery_images"] > 0 == stage3["batch"]["gallery_images"]
    stamp = (work / "full-s0" / "result.json").stat().st_mtime_ns
    assert bench.main(argv) == 0 and (work / "full-s0" / "result.json").stat().st_mtime_ns == stamp
    # a result without held-out numbers (an older run) reruns stage 3 only: the same val numbers
    older = {k: v for k, v in full.items() if k != "heldout"}
    (work / "full-s0" / "result.json").write_text(json.dumps(older))
    stage2 = (work / "full-s0" / "models" / "stage2" / "model" / "model.safetensors").stat().st_mtime_ns
    assert bench.main(argv) == 0
    again = json.loads(out.read_text())["runs"][0]
    assert again["gallery"] == full["gallery"] and again["heldout"] == full["heldout"]
    assert (work / "full-s0" / "models" / "stage2" / "model" / "model.safetensors").stat().st_mtime_ns == stage2
    assert bench.main([*argv[:-1], "--params", str(tmp_path / "none.yaml")]) == 2
