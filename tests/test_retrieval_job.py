"""``detailfusion retrieve``: rankings equal the evaluate stage's, resumable shards, per-item error
rows, clear errors that leave no partial output, and a cache keyed by model + gallery content."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from detailfusion.cli import main as cli_main
from detailfusion.errors import DetailFusionError
from detailfusion.params import repo_section
from detailfusion.retrieval import shards
from detailfusion.retrieval.job import RetrieveConfig, run_retrieval

NO_TRACKING = repo_section("tracking", enabled=False)
RESULT_FILES = ("results.parquet", "errors.parquet", "summary.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from detailfusion.models import create_model
    from detailfusion.models.io import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(create_model("tiny", "full").eval(), tmp_path_factory.mktemp("model") / "model")


@pytest.fixture
def world(tiny_world) -> dict:
    root = tiny_world["root"]
    cirr = root / "data" / "synthetic" / "cirr"
    return {"root": root, "prepared": root / "data" / "prepared" / "cirr", "cirr": cirr,
            "captions": cirr / "captions" / "cap.rc2.val.json", "split": json.loads(
                (cirr / "image_splits" / "split.rc2.val.json").read_text())}


def _cfg(world, model_dir, out: Path, **kw) -> RetrieveConfig:
    base = dict(gallery=str(world["prepared"]), queries=str(world["captions"]), out=str(out), model=str(model_dir),
                shard_size=16, batch_size=256, report_samples=3)
    return RetrieveConfig(**{**base, **kw})


def _run(cfg: RetrieveConfig) -> dict:
    return run_retrieval(cfg, tracking=NO_TRACKING, progress=False)


def _no_results(out: Path) -> None:
    for name in RESULT_FILES:
        assert not (out / name).exists(), name
    leftovers = list(out.parent.glob(".retrieve-staging-*"))
    assert not leftovers, leftovers


def _image_folder(world, dest: Path, n: int = 20) -> Path:
    dest.mkdir(parents=True)
    for name in list(world["split"])[:n]:
        shutil.copy2(world["cirr"] / world["split"][name], dest / f"{name}.png")
    return dest


def test_cli_reproduces_the_evaluate_stage_rankings(world, model_dir, tmp_path, capsys):
    """Same model, CIRR val: the submission files of `retrieve` equal the evaluate stage's byte for
    byte, from the pixel cache and from the PNG files alike; results.parquet holds the same lists."""
    from detailfusion.eval.evaluate import write_test_submission

    expected = write_test_submission(model_dir, world["prepared"].parent, "val", tmp_path / "eval", progress=False)
    outs = {"prepared": tmp_path / "from-cache", "native": tmp_path / "from-png"}
    for kind, out in outs.items():
        gallery = world["prepared"] if kind == "prepared" else world["cirr"]
        rc = cli_main(["-q", "--params", str(world["root"] / "params.yaml"), "retrieve", "--no-track",
                       "--model", str(model_dir), "--gallery", str(gallery), "--queries", str(world["captions"]),
                       "--out", str(out), "--shard-size", "16", "--report-samples", "2"])
        assert rc == 0
        for path in expected:
            assert (out / "submission" / path.name).read_bytes() == path.read_bytes(), (kind, path.name)
    capsys.readouterr()

    ranked = json.loads(expected[0].read_text())
    results = pd.read_parquet(outs["prepared"] / "results.parquet")
    got = {qid: g.sort_values("rank")["image_id"].tolist() for qid, g in results.groupby("query_id")}
    assert got == {k: v for k, v in ranked.items() if k not in ("version", "metric")}
    summary = json.loads((outs["prepared"] / "summary.json").read_text())
    assert summary["exclude_reference"] is True and summary["protocol"] == "cirr"
    assert summary["queries"] == {**summary["queries"], "queries": 48, "searched": 48, "errors": 0}
    assert summary["submission"]["written"] and summary["submission"]["complete"]
    html = (outs["prepared"] / "report" / "index.html").read_text()
    assert html.count('class="sample"') == 2 and "data:image/png;base64" in html
    # clip-retrieval-style shard layout, row-aligned metadata
    emb = sorted((outs["prepared"] / "gallery" / "embeddings").glob("img_emb_*.npy"))
    meta = sorted((outs["prepared"] / "gallery" / "metadata").glob("metadata_*.parquet"))
    assert [p.name for p in emb][:2] == ["img_emb_00000.npy", "img_emb_00001.npy"] and len(emb) == len(meta)


def test_interrupted_run_resumes_without_reembedding(world, model_dir, tmp_path, monkeypatch):
    full = _run(_cfg(world, model_dir, tmp_path / "full"))
    n_shards = full["gallery"]["shards"]
    assert n_shards >= 4

    real_write = shards._write_shard
    calls = []

    def failing_write(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("injected crash after 2 shards")
        calls.append(args[1])
        return real_write(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(shards, "_write_shard", failing_write)
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(_cfg(world, model_dir, out))
    _no_results(out)
    done = sorted((out / "gallery" / "embeddings").glob("*.npy"))
    assert [p.name for p in done] == ["img_emb_00000.npy", "img_emb_00001.npy"]
    stamps = {p: p.stat().st_mtime_ns for p in done}

    monkeypatch.setattr(shards, "_write_shard", real_write)
    summary = _run(_cfg(world, model_dir, out))
    assert summary["gallery"]["shards_reused"] == 2
    assert summary["gallery"]["shards_embedded"] == n_shards - 2
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished shards untouched
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"),
                                  pd.read_parquet(tmp_path / "full" / "results.parquet"))
    for name in ("recall_submission_val.json", "recall_subset_submission_val.json"):
        assert (out / "submission" / name).read_bytes() == (tmp_path / "full" / "submission" / name).read_bytes()
    # a plain rerun embeds nothing
    again = _run(_cfg(world, model_dir, out))
    assert again["gallery"]["shards_embedded"] == 0 and again["gallery"]["shards_reused"] == n_shards


def test_changed_model_or_gallery_content_invalidates_the_cache(world, model_dir, tmp_path):
    from detailfusion.models import create_model
    from detailfusion.models.io import save_pretrained

    folder = _image_folder(world, tmp_path / "images", n=20)
    queries = tmp_path / "q.jsonl"
    names = sorted(p.stem for p in folder.glob("*.png"))
    queries.write_text("".join(json.dumps({"query_id": f"q{i}", "reference": n, "caption": "make it blue"}) + "\n"
                               for i, n in enumerate(names[:4])))
    cfg = _cfg(world, model_dir, tmp_path / "out", gallery=str(folder), queries=str(queries), shard_size=8)
    first = _run(cfg)
    assert first["gallery"]["shards"] == 3 and first["gallery"]["shards_embedded"] == 3
    assert first["protocol"] == "generic" and first["exclude_reference"] is False

    # one image's content changes: only its shard is embedded again
    victim = folder / f"{names[9]}.png"
    shutil.copy2(folder / f"{names[0]}.png", victim)
    second = _run(cfg)
    assert (second["gallery"]["shards_embedded"], second["gallery"]["shards_reused"]) == (1, 2)
    assert second["gallery"]["content_digest"] != first["gallery"]["content_digest"]

    # another model: the whole cache is invalid
    torch.manual_seed(1)
    other = save_pretrained(create_model("tiny", "full").eval(), tmp_path / "other-model")
    third = _run(replace(cfg, model=str(other)))
    assert third["gallery"]["cache_invalidated"] is True and third["gallery"]["shards_embedded"] == 3
    assert third["model"]["identity"] != first["model"]["identity"]
    # so does another embedding precision
    fourth = _run(replace(cfg, model=str(other), embed_dtype="bf16"))
    assert fourth["gallery"]["cache_invalidated"] is True and fourth["gallery"]["shards_reused"] == 0


def test_unreadable_gallery_image_and_missing_reference_become_error_rows(world, model_dir, tmp_path):
    folder = _image_folder(world, tmp_path / "images", n=12)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    names = sorted(p.stem for p in folder.glob("*.png") if p.stem != "broken")
    queries = pd.DataFrame({"query_id": ["a", "b", "c"], "reference": [names[0], "missing-image.png", names[1]],
                            "text": ["make it red", "make it green", "make it blue"]})
    queries.to_parquet(tmp_path / "q.parquet")
    cfg = _cfg(world, model_dir, tmp_path / "out", gallery=str(folder), queries=str(tmp_path / "q.parquet"))
    summary = _run(cfg)

    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet")
    assert errors[["kind", "item_id"]].values.tolist() == [["gallery", "broken"], ["query", "b"]]
    assert "broken.png" in errors["source"].iloc[0] and "corrupt" in errors["error"].iloc[0]
    assert "missing-image.png" in errors["error"].iloc[1] and "not found" in errors["error"].iloc[1]
    assert summary["gallery"]["errors"] == 1 and summary["gallery"]["embedded"] == 12
    assert summary["queries"]["errors"] == 1 and summary["queries"]["searched"] == 2
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(results["query_id"]) == {"a", "c"} and "broken" not in set(results["image_id"])
    assert (results.groupby("query_id")["rank"].max() == 12).all()

    # the strict policy stops at the first bad item and writes no result
    strict = tmp_path / "strict"
    with pytest.raises(DetailFusionError, match=r"broken\.png.*corrupt"):
        _run(replace(cfg, out=str(strict), on_error="fail"))
    _no_results(strict)


@pytest.mark.parametrize("case", ["s3-endpoint", "model-folder",
                                  pytest.param("registry-model", marks=pytest.mark.slow)])  # sqlite store setup
def test_bad_inputs_fail_with_one_clear_line_and_no_output(case, world, model_dir, tmp_path, capsys, monkeypatch):
    from services import free_port  # the helper the integration fixtures use

    out = tmp_path / "out"
    args = ["-q", "--params", str(world["root"] / "params.yaml"), "retrieve", "--no-track",
            "--gallery", str(world["prepared"]), "--queries", str(world["captions"]), "--out", str(out)]
    if case == "s3-endpoint":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        uri = "s3://nowhere-bucket/gallery"
        args[args.index("--gallery") + 1] = uri
        args += ["--model", str(model_dir), "--endpoint-url", f"http://127.0.0.1:{free_port()}"]
        needle = f"{uri}: S3 endpoint http://127.0.0.1"
    elif case == "model-folder":
        args += ["--model", str(tmp_path / "no-such-model")]
        needle = "no-such-model: model folder not found"
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        args += ["--model", "models:/detailfusion-nothing@champion"]
        needle = "models:/detailfusion-nothing@champion: registered model 'detailfusion-nothing' has no alias"
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # MLflow logs its own INFO lines
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    _no_results(out)


def test_tracking_store_down_loses_no_result(world, model_dir, tmp_path):
    from services import free_port

    from detailfusion.tracking import TrackingOfflineWarning

    folder = _image_folder(world, tmp_path / "images", n=8)
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"reference": p.stem, "caption": "make it blue"}) + "\n"
                               for p in sorted(folder.glob("*.png"))[:2]))
    tracking = repo_section("tracking", tracking_uri=f"http://127.0.0.1:{free_port()}", retries=0, backoff_s=0.0,
                              timeout_s=2.0, system_metrics=False,
                              offline_record=str(tmp_path / "tracking_offline.json"))
    out = tmp_path / "out"
    cfg = _cfg(world, model_dir, out, gallery=str(folder), queries=str(queries), report_samples=1)
    with pytest.warns(TrackingOfflineWarning, match="unreachable"):
        summary = run_retrieval(cfg, tracking=tracking, progress=False)
    assert summary["tracking"]["logged"] is False
    for name in RESULT_FILES:
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["results"]["rows"] == 2 * 8
    record = json.loads((tmp_path / "tracking_offline.json").read_text())
    assert "batch_retrieval" in json.dumps(record)


KILL_AFTER_SHARDS = r'''
import os, signal, sys
from detailfusion.cli import main
from detailfusion.retrieval import shards
from detailfusion.params import repo_section

real, done = shards._write_shard, []

def write_then_die(*args, **kwargs):
    if len(done) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no cleanup: a hard kill mid-job
    real(*args, **kwargs)
    done.append(args[1])

shards._write_shard = write_then_die
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow
def test_sigkilled_run_reruns_to_the_uninterrupted_result(world, model_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "killed"
    args = ["-q", "--params", str(world["root"] / "params.yaml"), "retrieve", "--no-track", "--model",
            str(model_dir), "--gallery", str(world["prepared"]), "--queries", str(world["captions"]),
            "--out", str(out), "--shard-size", "16"]
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, "3", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not (out / "results.parquet").exists() and not (out / "summary.json").exists()
    assert len(list((out / "gallery" / "embeddings").glob("img_emb_*.npy"))) == 3

    resumed = _run(_cfg(world, model_dir, out))
    assert resumed["gallery"]["shards_reused"] == 3
    assert resumed["gallery"]["shards_embedded"] == resumed["gallery"]["shards"] - 3
    _run(_cfg(world, model_dir, tmp_path / "clean"))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"),
                                  pd.read_parquet(tmp_path / "clean" / "results.parquet"))


def test_approximate_index_reports_recall_against_exact(world, model_dir, tmp_path):
    exact = _run(_cfg(world, model_dir, tmp_path / "exact", report_samples=1))
    approx = _run(_cfg(world, model_dir, tmp_path / "ivf", index="ivf_flat", nlist=2, nprobe=2, recall_sample=20,
                       report_samples=1))
    assert exact["index"] == {"kind": "exact", "k": 50}
    info = approx["index"]
    assert (info["kind"], info["nlist"], info["nprobe"], info["recall_sample"]) == ("ivf_flat", 2, 2, 20)
    assert info["recall_at_k_vs_exact"] == 1.0  # every list probed: the exact answer (up to ties)
    a = pd.read_parquet(tmp_path / "ivf" / "results.parquet")
    e = pd.read_parquet(tmp_path / "exact" / "results.parquet")
    # the same ranking up to ties: rank by rank the same scores, and an image may only trade places
    # with one of (nearly) the same score (FAISS and our matmul sum in a different order)
    pd.testing.assert_series_equal(a["query_id"], e["query_id"])
    assert np.allclose(a["score"], e["score"], atol=1e-5)
    differ = a["image_id"] != e["image_id"]
    for (qid, rank) in zip(a["query_id"][differ], a["rank"][differ], strict=True):
        ours = e[(e["query_id"] == qid)].set_index("image_id")["score"]
        theirs = a[(a["query_id"] == qid) & (a["rank"] == rank)]
        img = theirs["image_id"].iloc[0]
        swapped_with = e[(e["query_id"] == qid) & (e["rank"] == rank)]["score"].iloc[0]
        assert abs(float(theirs["score"].iloc[0]) - swapped_with) < 1e-5
        assert img not in ours.index or abs(float(ours[img]) - swapped_with) < 1e-5
