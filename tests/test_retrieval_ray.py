"""``detailfusion retrieve --engine ray``: the job on a local Ray instance equals the local engine."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from detailfusion.params import repo_section
from detailfusion.retrieval.job import RetrieveConfig, run_retrieval

ray = pytest.importorskip("ray")

NO_TRACKING = repo_section("tracking", enabled=False)


def _raylets() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"]


@pytest.fixture(scope="module")
def local_ray():
    before = {p.pid for p in _raylets()}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and {p.pid for p in _raylets()} - before:
            time.sleep(0.5)
        assert not {p.pid for p in _raylets()} - before, "a raylet outlived ray.shutdown()"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from detailfusion.models import create_model
    from detailfusion.models.io import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(create_model("tiny", "full").eval(), tmp_path_factory.mktemp("model") / "model")


def _cfg(tiny_world, model_dir, out: Path) -> RetrieveConfig:
    root = tiny_world["root"]
    captions = root / "data" / "synthetic" / "cirr" / "captions" / "cap.rc2.val.json"
    return RetrieveConfig(gallery=str(root / "data" / "prepared" / "cirr"), queries=str(captions), out=str(out),
                          model=str(model_dir), shard_size=16, batch_size=64, report_samples=2)


@pytest.mark.slow  # a Ray instance and actor pools: about a minute on 2 cores
def test_ray_engine_equals_local_engine_and_resumes(local_ray, tiny_world, model_dir, tmp_path):
    from detailfusion.retrieval import ray_engine

    local = run_retrieval(_cfg(tiny_world, model_dir, tmp_path / "local"), tracking=NO_TRACKING, progress=False)
    cfg = _cfg(tiny_world, model_dir, tmp_path / "ray")
    # Small query shards, so the search really runs as several Ray tasks.
    remote = ray_engine.run_retrieval_ray(cfg, tracking=NO_TRACKING, progress=False, num_actors=2, query_shard=7)
    assert ray.is_initialized()  # an instance it did not start is left running

    a = pd.read_parquet(tmp_path / "local" / "results.parquet")
    b = pd.read_parquet(tmp_path / "ray" / "results.parquet")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    gallery = remote["gallery"]
    assert gallery["engine"] == "ray" and gallery["ray_actors"] == 2
    assert gallery["shards"] > 1 and gallery["shards_embedded"] == gallery["shards"]
    assert gallery["content_digest"] == local["gallery"]["content_digest"]
    assert remote["index"]["engine"] == "ray" and remote["index"]["query_shards"] > 1

    # Rerun on the same shard cache: every shard is reused, nothing is embedded again.
    again = ray_engine.run_retrieval_ray(cfg, tracking=NO_TRACKING, progress=False, num_actors=2)
    assert again["gallery"]["shards_reused"] == gallery["shards"]
    assert again["gallery"]["images_embedded"] == 0
    pd.testing.assert_frame_equal(a, pd.read_parquet(tmp_path / "ray" / "results.parquet"))
