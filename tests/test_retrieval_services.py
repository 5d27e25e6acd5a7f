"""``detailfusion retrieve`` against real services: gallery, queries and results on S3 (moto, via the
local stack), and the default model ``models:/detailfusion-<dataset>@champion`` from an MLflow
registry, with the run logged there (params, metrics, summary artifact, the version used)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from detailfusion.errors import DetailFusionError
from detailfusion.params import repo_section
from detailfusion.retrieval.job import RetrieveConfig, run_retrieval

pytest_plugins = ["services"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_model():
    from detailfusion.models import create_model

    torch.manual_seed(0)
    return create_model("tiny", "full").eval()


def _gallery_files(tiny_world, n: int = 12) -> dict[str, Path]:
    cirr = tiny_world["root"] / "data" / "synthetic" / "cirr"
    split = json.loads((cirr / "image_splits" / "split.rc2.val.json").read_text())
    return {name: cirr / rel for name, rel in list(split.items())[:n]}


def test_s3_gallery_queries_and_results(tiny_world, tiny_model, tmp_path, monkeypatch):
    from services import local_stack

    from detailfusion.models.io import save_pretrained

    model_dir = save_pretrained(tiny_model, tmp_path / "model")
    files = _gallery_files(tiny_world)
    names = list(files)
    with local_stack(tmp_path / "stack", ["s3"]) as stack:
        env = stack["env"]
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.setenv(key, env[key])
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="retrieval")
        local = tmp_path / "gallery"
        local.mkdir()
        for name, path in files.items():
            s3.upload_file(str(path), "retrieval", f"gallery/{name}.png")
            shutil.copy2(path, local / f"{name}.png")
        s3.upload_file(str(files[names[3]]), "retrieval", "refs/outside.png")
        queries = [{"query_id": "q0", "reference": names[0], "caption": "make the circle blue"},
                   {"query_id": "q1", "reference": "refs/outside.png", "caption": "add a square"},
                   {"query_id": "q2", "reference": "refs/missing.png", "caption": "remove it"}]
        body = "".join(json.dumps(q) + "\n" for q in queries)
        s3.put_object(Bucket="retrieval", Key="queries.jsonl", Body=body.encode())
        (tmp_path / "queries.jsonl").write_text(body)
        (tmp_path / "refs").mkdir()
        shutil.copy2(files[names[3]], tmp_path / "refs" / "outside.png")

        common = dict(model=str(model_dir), shard_size=5, report_samples=2, top_k=5)
        remote = run_retrieval(RetrieveConfig(gallery="s3://retrieval/gallery", queries="s3://retrieval/queries.jsonl",
                                              out="s3://retrieval/runs/1", work_dir=str(tmp_path / "work"), **common),
                               tracking=repo_section("tracking", enabled=False), progress=False)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="retrieval", Prefix="runs/1/")["Contents"]}
        for rel in ("results.parquet", "errors.parquet", "summary.json", "report/index.html",
                    "gallery/embeddings/img_emb_00000.npy", "gallery/metadata/metadata_00002.parquet"):
            assert f"runs/1/{rel}" in keys, (rel, sorted(keys))
        got = pd.read_parquet("s3://retrieval/runs/1/results.parquet",
                              storage_options={"client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}})
        errors = pd.read_parquet("s3://retrieval/runs/1/errors.parquet",
                                 storage_options={"client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]}})
        assert errors[["kind", "item_id"]].values.tolist() == [["query", "q2"]]
        assert "s3://retrieval/refs/missing.png" in errors["error"].iloc[0]
        assert remote["gallery"]["embedded"] == 12 and remote["queries"]["searched"] == 2

        # the same job on local copies ranks identically
        run_retrieval(RetrieveConfig(gallery=str(local), queries=str(tmp_path / "queries.jsonl"),
                                     out=str(tmp_path / "local-out"), **common),
                      tracking=repo_section("tracking", enabled=False), progress=False)
        pd.testing.assert_frame_equal(got, pd.read_parquet(tmp_path / "local-out" / "results.parquet"))

        # a failing job (a query file that is not there) leaves nothing under its output prefix
        with pytest.raises(DetailFusionError, match=r"s3://retrieval/nope\.jsonl: not found"):
            run_retrieval(RetrieveConfig(gallery="s3://retrieval/gallery", queries="s3://retrieval/nope.jsonl",
                                         out="s3://retrieval/runs/2", work_dir=str(tmp_path / "work"), **common),
                          tracking=repo_section("tracking", enabled=False), progress=False)
        assert s3.list_objects_v2(Bucket="retrieval", Prefix="runs/2/")["KeyCount"] == 0


def test_champion_from_the_registry_and_the_run_in_mlflow(tiny_world, tiny_model, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from detailfusion.registry import promote, register, registry_client
    from detailfusion.tracking import stage_run
    from detailfusion.tracking.pyfunc import log_fused_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    tracking = repo_section("tracking", system_metrics=False, artifact_location=str(tmp_path / "artifacts"),
                              offline_record=str(tmp_path / "offline.json"))
    dataset = f"ret{uuid.uuid4().hex[:6]}"
    with stage_run("register", {}, dataset, variant="full", config=tracking) as run:
        info = log_fused_model(tiny_model, run=run, image_size=64, target_ratio=1.25)
    client = registry_client(tracking)
    version = register(info.model_uri, dataset, {"Avg": 1.0}, run.lineage, client=client)
    assert promote(version.name, client=client).promoted

    prepared = tiny_world["root"] / "data" / "prepared" / "cirr"
    captions = tiny_world["root"] / "data" / "synthetic" / "cirr" / "captions" / "cap.rc2.val.json"
    cfg = RetrieveConfig(gallery=str(prepared), queries=str(captions), out=str(tmp_path / "out"), dataset=dataset,
                         report_samples=2)
    summary = run_retrieval(cfg, tracking=tracking, progress=False)
    assert summary["model"]["uri"] == f"models:/detailfusion-{dataset}@champion"
    assert (summary["model"]["name"], summary["model"]["version"]) == (version.name, str(version.version))
    assert summary["model"]["run_id"] == run.run_id
    assert summary["tracking"]["logged"] is True

    mlflow = MlflowClient(uri)
    logged = mlflow.get_run(summary["tracking"]["run_id"])
    assert logged.data.tags["retrieval.model_version"] == str(version.version)
    assert logged.data.tags["retrieval.model_name"] == version.name
    assert logged.data.params["retrieve.index"] == "exact"
    assert logged.data.metrics["retrieve/results/rows"] == 48 * 50
    assert "retrieve/throughput/gallery_images_per_s" in logged.data.metrics
    arts = {a.path for a in mlflow.list_artifacts(logged.info.run_id, "retrieval")}
    assert "retrieval/summary.json" in arts and "retrieval/report" in arts
