"""params.yaml loading: YAML 1.2 numbers and values rejected at load time with a clear line."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT, merge_params

from detailfusion.config import load_params, load_section
from detailfusion.errors import ConfigError
from detailfusion.train.config import ModelSection, Stage1Config, Stage3Config


def _write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_scientific_notation_reads_as_numbers(tmp_path):
    # h: what `dvc exp run -S stage1_detail.loop.lr=1e-5` writes into params.yaml (checked with DVC 3.67)
    path = _write(tmp_path, "a: 1e-3\nb: 1E5\nc: .5\nd: 10\ne: '1e-3'\nf: -2e+2\ng: 1.0e-5\nh: 1e-05\n")
    got = load_params(path)
    assert got == {"a": 0.001, "b": 100000.0, "c": 0.5, "d": 10, "e": "1e-3", "f": -200.0, "g": 1e-5, "h": 1e-5}
    assert isinstance(got["d"], int)


def _real_with(tmp_path, **sections):
    """params.yaml with some sections' keys replaced (nested mappings merge)."""
    params = merge_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), sections)
    return _write(tmp_path, yaml.safe_dump(params, sort_keys=False))


def test_loop_lr_in_scientific_notation_is_accepted(tmp_path):
    path = _write(tmp_path, (REPO_ROOT / "params.yaml").read_text().replace(
        "    lr_backbone: 0.0      #", "    lr_backbone: 1e-5     #").replace("    lr: 0.001\n", "    lr: 1e-3\n"))
    cfg = load_section(Stage1Config, path, "stage1_detail")
    assert cfg.loop.lr == pytest.approx(1e-3) and cfg.loop.lr_backbone == pytest.approx(1e-5)


@pytest.mark.parametrize(
    ("loop", "problem"),
    [
        ({"lr": -0.001}, "lr: must be > 0"),
        ({"lr": 0}, "lr: must be > 0"),
        ({"lr_backbone": -1e-5}, "lr_backbone: must be >= 0"),
        ({"max_steps": 10, "warmup_steps": 20}, "warmup_steps: 20 is not shorter than the run"),
        ({"max_steps": 10, "warmup_steps": 10}, "warmup_steps: 10 is not shorter than the run"),
    ],
)
def test_bad_loop_values_fail_at_load_naming_the_key(tmp_path, loop, problem):
    path = _real_with(tmp_path, stage3_fusion={"loop": {"max_steps": 50, "warmup_steps": 5, **loop}})
    with pytest.raises(ConfigError) as err:
        load_section(Stage3Config, path, "stage3_fusion")
    msg = str(err.value)
    assert msg.startswith(f"{path}: stage3_fusion.loop.") and problem in msg


def test_frozen_backbone_lr_zero_is_allowed(tmp_path):
    path = _real_with(tmp_path, stage1_detail={"loop": {"lr_backbone": 0}})
    assert load_section(Stage1Config, path, "stage1_detail").loop.lr_backbone == 0


def test_unknown_stage3_objective_fails_at_load_naming_the_key(tmp_path):
    path = _real_with(tmp_path, stage3_fusion={"negatives": "galery"})
    with pytest.raises(ConfigError) as err:
        load_section(Stage3Config, path, "stage3_fusion")
    assert str(err.value) == f"{path}: stage3_fusion.negatives: 'galery' is not one of ['gallery', 'batch']"


def test_misspelt_variant_fails_at_load(tmp_path):
    path = _real_with(tmp_path, model={"variant": "fulll"})
    with pytest.raises(ConfigError, match=r"model\.variant: 'fulll' is unknown; choose from \["):
        load_section(ModelSection, path, "model")


def test_a_section_missing_a_key_fails_naming_it(tmp_path):
    path = _write(tmp_path, "stage1_detail:\n  loop:\n    lr: 0.001\n")
    with pytest.raises(ConfigError, match=r"stage1_detail: missing required key\(s\) \['dataset'"):
        load_section(Stage1Config, path, "stage1_detail")


def test_top_level_help_is_plain_text():
    from detailfusion.cli import build_parser

    text = build_parser().format_help()
    assert "``" not in text and ":func:" not in text and "DetailFusion composed image retrieval" in text
