"""The flows' pure pieces, without a Prefect server: params overrides, experiment names, the
ablation variants' params, the approval form's table, JSON in command output. The flows
themselves run end to end in test_flows_e2e.py."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT

from detailfusion.errors import ConfigError
from detailfusion.experiments.ablations import AblationRun
from flows.ablations import variant_params
from flows.promote import comparison
from flows.tasks import StageFailed, check_exp_name, last_json, set_dotted


def test_overrides_set_nested_keys_and_name_a_typo():
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    set_dotted(params, "stage2_branches.loop.max_steps", 7)
    set_dotted(params, "stage1_detail.loop.log_every", 1)  # a new leaf in an existing section is allowed
    assert params["stage2_branches"]["loop"]["max_steps"] == 7 and params["stage1_detail"]["loop"]["log_every"] == 1
    with pytest.raises(ConfigError, match=r"params override 'stage2_brances.loop.lr': params.yaml has no section "
                                          r"'stage2_brances'"):  # fmt: skip
        set_dotted(params, "stage2_brances.loop.lr", 0.1)
    with pytest.raises(ConfigError, match="'model.variant' in params.yaml is a value, not a section"):
        set_dotted(params, "model.variant.x.y", 1)  # model.variant is a value, not a section


def test_experiment_names_are_checked():
    assert check_exp_name("pipeline-1a2b3c4d-green-crow") == "pipeline-1a2b3c4d-green-crow"
    for bad in ("", "-x", "a b", "a/b", "x" * 101):
        with pytest.raises(ConfigError, match="experiment name"):
            check_exp_name(bad)


def test_variant_params_apply_the_suite_settings_then_the_variant_overrides():
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    text = variant_params(base, AblationRun("gm_only", 2, "abl-x"), 0.5, {"stage1_detail.loop.batch_size": 8})
    p = yaml.safe_load(text)
    assert p["model"]["variant"] == "gm_only"
    assert {p[s]["loop"]["seed"] for s in ("stage1_detail", "stage2_branches", "stage3_fusion")} == {2}
    assert p["stage2_branches"]["loop"]["max_steps"] == round(base["stage2_branches"]["loop"]["max_steps"] * 0.5)
    assert p["stage1_detail"]["loop"]["batch_size"] == 8
    assert base["model"]["variant"] == "full"  # the base params are not modified


def test_approval_table_shows_challenger_and_champion():
    rows = [
        {"version": 3, "aliases": ["challenger"], "metrics": {"Avg": 31.5, "Rsub_at_1": 40.0}},
        {"version": 2, "aliases": ["champion"], "metrics": {"Avg": 30.25, "R_at_1": 9.0}},
    ]
    challenger, champion, table = comparison(rows, None, "Avg")
    assert challenger["version"] == 3 and champion["version"] == 2
    lines = table.splitlines()
    assert lines[0] == "| metric | challenger v3 | champion v2 |"
    assert lines[2] == "| **Avg** (gate) | 31.5000 | 30.2500 |"  # the gate metric first
    assert "| R_at_1 | - | 9.0000 |" in lines
    _, _, table = comparison(rows, None, "Rsub@1")  # metric names as the registry tags them
    assert table.splitlines()[2] == "| **Rsub_at_1** (gate) | 40.0000 | - |"
    assert comparison(rows, "2", "Avg")[0]["version"] == 2
    assert comparison([rows[1]], None, "Avg")[0] is None


def test_last_json_skips_what_a_command_printed_around_it():
    out = 'INFO {not json}\n{\n  "decision": "promoted",\n  "x": {"y": 1}\n}\nView run at http://...\n'
    assert last_json(out, "cmd") == {"decision": "promoted", "x": {"y": 1}}
    with pytest.raises(StageFailed, match="cmd: no JSON"):
        last_json("nothing here", "cmd")
