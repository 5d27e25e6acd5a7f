"""params.yaml is the one place where a setting lives: the typed sections (detailfusion.params) and
the file agree key for key, and a bad value anywhere fails the command at once, before any data is
read or any output written, with ``params.yaml: <section>.<key>: <problem>``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from detailfusion.cli import main as cli_main
from detailfusion.errors import ConfigError
from detailfusion.params import Params, load_config, params_from_mapping, repo_section
from detailfusion.train.config import LoopConfig
from detailfusion.train.stages import effective_config

REAL = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def _disagreements(cls: type, data: dict, where: str) -> list[str]:
    """Keys in ``data`` that ``cls`` lacks, fields of ``cls`` that ``data`` lacks (unless documented
    as deliberately not params), and defaults that compete with the file, recursively."""
    problems = []
    hints = typing.get_type_hints(cls)
    # Params.source records the file's path; it is not a section
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Params and f.name == "source")}
    not_params = set(getattr(cls, "NOT_PARAMS", ()))
    for key in data:
        if key not in fields:
            problems.append(f"{where}.{key}: in params.yaml, not in {cls.__name__}")
    for name, f in fields.items():
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if name in not_params:
            if not has_default:
                problems.append(f"{where}.{name}: listed in {cls.__name__}.NOT_PARAMS but has no default")
            continue
        if has_default:
            problems.append(f"{where}.{name}: {cls.__name__} has a default that competes with params.yaml")
        if name not in data:
            problems.append(f"{where}.{name}: in {cls.__name__}, not in params.yaml")
        elif dataclasses.is_dataclass(hints[name]):
            problems += _disagreements(hints[name], data[name] or {}, f"{where}.{name}")
    return problems


def test_params_yaml_and_the_typed_sections_agree_on_every_key():
    assert _disagreements(Params, REAL, "params.yaml") == []


def test_the_key_check_sees_a_key_missing_on_either_side():
    extra = yaml.safe_load(yaml.safe_dump(REAL))
    extra["stage3_fusion"]["loop"]["momentum"] = 0.9
    del extra["evaluate"]["seed"]
    assert sorted(_disagreements(Params, extra, "params.yaml")) == [
        "params.yaml.evaluate.seed: in EvaluateConfig, not in params.yaml",
        "params.yaml.stage3_fusion.loop.momentum: in params.yaml, not in LoopConfig",
    ]


def test_only_documented_loop_fields_are_not_params():
    assert set(LoopConfig.NOT_PARAMS) == {"device", "log_every", "num_threads"}
    for name in LoopConfig.NOT_PARAMS:
        assert "not a param" in LoopConfig.__doc__ + _source_comment(name)


def _source_comment(name: str) -> str:
    import inspect

    return next(line for line in inspect.getsource(LoopConfig).splitlines() if line.strip().startswith(f"{name}:"))


def test_the_real_file_loads_with_its_values():
    params = load_config(REPO_ROOT / "params.yaml")
    assert params.stage3_fusion.cache_queries == REAL["stage3_fusion"]["cache_queries"]
    assert params.prepare.out == Path(REAL["prepare"]["out"])
    assert params.dataset == REAL["stage2_branches"]["dataset"]
    assert repo_section("stage3_fusion", cache_queries=7).cache_queries == 7
    assert repo_section("stage3_fusion").cache_queries == REAL["stage3_fusion"]["cache_queries"]  # a fresh copy


def test_effective_config_is_what_the_stage_runs():
    params = params_from_mapping(yaml.safe_load(yaml.safe_dump(REAL)))
    s1, s2 = REAL["stage1_detail"]["loop"]["max_steps"], REAL["stage2_branches"]["loop"]["max_steps"]
    assert effective_config(params, "stage2_branches")["stage2_branches"]["loop"]["max_steps"] == s2
    params.model.variant = "no_pretrain"  # skips stage 1: its steps go to stage 2 (equalize_budget)
    eff = effective_config(params, "stage2_branches")
    assert eff["stage2_branches"]["loop"]["max_steps"] == s1 + s2
    assert eff["model"]["variant"] == "no_pretrain" and eff["stage2_branches"]["loop"]["device"] == "auto"
    assert params.stage2_branches.loop.max_steps == s2  # the loaded params are left as they were


# --------------------------------------------------------------------------- bad values


def _bad(change) -> dict:
    params = yaml.safe_load(yaml.safe_dump(REAL))
    change(params)
    return params


BAD = {
    "negative lr": (lambda p: p["stage1_detail"]["loop"].update(lr=-0.001),
                    "params.yaml: stage1_detail.loop.lr: must be > 0, got -0.001"),
    "zero lr": (lambda p: p["stage2_branches"]["loop"].update(lr=0),
                "params.yaml: stage2_branches.loop.lr: must be > 0, got 0"),
    "warm-up as long as the run": (lambda p: p["stage3_fusion"]["loop"].update(warmup_steps=150),
                                   "params.yaml: stage3_fusion.loop.warmup_steps: 150 is not shorter than the run"),
    "unknown section": (lambda p: p.update(stage4_rerank={"lr": 0.1}),
                        "params.yaml: stage4_rerank: unknown section; allowed: ['data', 'synthesize'"),
    "misspelt variant": (lambda p: p["model"].update(variant="ful"),
                         "params.yaml: model.variant: 'ful' is unknown; choose from ['full'"),
    "wrong type": (lambda p: p["stage1_detail"]["loop"].update(batch_size="64"),
                   "params.yaml: stage1_detail.loop.batch_size: expected an integer, got '64'"),
    "unknown key": (lambda p: p["evaluate"].update(boostrap=10),
                    "params.yaml: evaluate: unknown key(s) ['boostrap']"),
    "missing key": (lambda p: p["stage3_fusion"].pop("cache_queries"),
                    "params.yaml: stage3_fusion: missing required key(s) ['cache_queries']"),
    "bad choice": (lambda p: p["stage2_branches"]["loop"].update(schedule="linear"),
                   "params.yaml: stage2_branches.loop.schedule: 'linear' is not one of ['cosine'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_fail_at_load_naming_section_and_key(case):
    change, message = BAD[case]
    with pytest.raises(ConfigError) as err:
        params_from_mapping(_bad(change))
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("case", "command"), [
    ("negative lr", ["train", "stage1_detail"]),
    ("warm-up as long as the run", ["train", "stage3_fusion"]),
    ("misspelt variant", ["evaluate"]),
    ("unknown section", ["data", "prepare"]),
    ("wrong type", ["data", "synth"]),
    ("zero lr", ["data", "prepare"]),  # a section the command does not read: the whole file is checked
])
def test_the_cli_fails_before_reading_data_or_writing_anything(tmp_path, monkeypatch, capsys, case, command):
    change, message = BAD[case]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_bad(change), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["--params", "params.yaml", *command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, models, timings...


def test_the_installed_command_prints_one_line(tmp_path):
    change, message = BAD["negative lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_bad(change), sort_keys=False))
    done = subprocess.run([str(Path(sys.executable).parent / "detailfusion"), "--quiet", "train", "stage1_detail"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
