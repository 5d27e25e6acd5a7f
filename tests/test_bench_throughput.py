"""bench/train_throughput.py: which configs it times at full length on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["tiny", "tiny-p16", "bench/configs/tiny-p16.json", "/abs/path/tiny.json"])
def test_tiny_configs_run_at_full_length_on_the_cpu(bench, config):
    # the default model (tiny-p16) used to fall through to the large-model rule: batch 8, a third of the steps
    assert bench.run_size(config, "cpu", 0, 20) == (64, 20)
    assert bench.run_size(config, "cpu", 32, 20) == (32, 20)


@pytest.mark.parametrize("config", ["vit-b-32", "configs/vit-b-32.json", "my-tiny.json"])
def test_large_configs_are_shortened_on_the_cpu_only(bench, config):
    assert bench.run_size(config, "cpu", 0, 20) == (8, 6)
    assert bench.run_size(config, "cpu", 0, 3) == (8, 2)
    assert bench.run_size(config, "cpu", 16, 20) == (16, 6)
    assert bench.run_size(config, "cuda", 0, 20) == (64, 20)
