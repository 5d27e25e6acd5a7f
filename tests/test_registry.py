"""The model registry against a real ``mlflow server``: register, the promotion gate, force,
rollback, listing, the CLI, the promotion lock and concurrent promotions (threads and processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import params_file

from detailfusion.params import repo_section
from detailfusion.registry import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    RegistryConfig,
    RegistryError,
    format_versions,
    list_versions,
    promote,
    register,
    rollback,
)
from detailfusion.registry.cli import main as registry_main
from detailfusion.registry.lock import TAG_ACQUIRED_AT, TAG_HOLDER, TAG_OWNER, lock_name

pytest_plugins = ["services"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(mlflow_sqlite_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    return MlflowClient(tracking_uri=mlflow_sqlite_server.url, registry_uri=mlflow_sqlite_server.url)


@pytest.fixture
def dataset() -> str:
    """A fresh data set name per test, so each test has its own registered model."""
    return f"reg{uuid.uuid4().hex[:8]}"


def _logged_model(client, dataset: str, **run_tags: str) -> str:
    """A finished run with lineage tags and a LoggedModel produced by it; returns the run id."""
    exp_name = f"detailfusion-{dataset}"
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp else client.create_experiment(exp_name)
    tags = {"git.commit": "abc123", "data.dvc_md5": "d41d8cd9.dir", "ablation": "full", **run_tags}
    run = client.create_run(exp_id, run_name="register", tags=tags)
    model = client.create_logged_model(exp_id, name="model", source_run_id=run.info.run_id)
    client.finalize_logged_model(model.model_id, "READY")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _version(client, dataset: str, avg: float, cfg: RegistryConfig | None = None, **metrics: float) -> str:
    run_id = _logged_model(client, dataset)
    mv = register(run_id, dataset, {"Avg": avg, "Rsub@1": avg + 1, **metrics}, config=cfg, client=client)
    return mv.version


def _alias(client, name: str, alias: str) -> str | None:
    return client.get_registered_model(name).aliases.get(alias)


def test_register_sets_challenger_metrics_and_lineage(client, dataset):
    run_id = _logged_model(client, dataset, **{"dvc.exp_name": "bushy-reef"})
    mv = register(run_id, dataset, {"Avg": 61.5, "Rsub@1": 70.25, "R@5": 52.75}, client=client)

    assert mv.name == f"detailfusion-{dataset}" and mv.version == "1"
    assert mv.run_id == run_id
    assert mv.tags["metric.Avg"] == "61.5" and mv.tags["metric.Rsub_at_1"] == "70.25"
    assert mv.tags["lineage.git.commit"] == "abc123"
    assert mv.tags["lineage.data.dvc_md5"] == "d41d8cd9.dir"
    assert mv.tags["lineage.dvc.exp_name"] == "bushy-reef"
    assert mv.tags["lineage.ablation"] == "full"
    assert _alias(client, mv.name, ALIAS_CHALLENGER) == "1"
    assert _alias(client, mv.name, ALIAS_CHAMPION) is None


def test_register_refuses_metrics_without_the_gate_metric(client, dataset):
    run_id = _logged_model(client, dataset)
    with pytest.raises(RegistryError, match="gate metric 'Avg'"):
        register(run_id, dataset, {"R@5": 1.0}, client=client)


def test_register_refuses_a_run_without_a_model(client, dataset):
    exp_id = client.create_experiment(f"detailfusion-{dataset}")
    run = client.create_run(exp_id)
    with pytest.raises(RegistryError, match="logged no model"):
        register(run.info.run_id, dataset, {"Avg": 1.0}, client=client)


def test_gate_first_champion_refusals_and_promotion(client, dataset):
    cfg = repo_section("registry", min_margin=1.0)
    name = cfg.name_for(dataset)

    v1 = _version(client, dataset, 50.0)
    first = promote(name, config=cfg, client=client)
    assert first.decision == "promoted" and "first champion" in first.reason
    assert _alias(client, name, ALIAS_CHAMPION) == v1
    assert _alias(client, name, ALIAS_CHALLENGER) is None  # moved on, not left dangling

    v2 = _version(client, dataset, 40.0)
    lower = promote(name, config=cfg, client=client)
    assert lower.decision == "refused"
    assert (lower.challenger_value, lower.champion_value) == (40.0, 50.0)
    assert "does not beat" in lower.reason
    assert _alias(client, name, ALIAS_CHAMPION) == v1
    assert _alias(client, name, ALIAS_CHALLENGER) == v2  # still waiting for a decision
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.challenger_value"] == "40.0" and tags["promotion.champion_value"] == "50.0"
    assert tags["promotion.champion_version"] == v1 and tags["promotion.forced"] == "false"
    assert "does not beat" in tags["promotion.reason"]

    _version(client, dataset, 50.5)  # better, but by less than min_margin
    assert promote(name, config=cfg, client=client).decision == "refused"
    assert _alias(client, name, ALIAS_CHAMPION) == v1

    v4 = _version(client, dataset, 60.0)
    better = promote(name, config=cfg, client=client)
    assert better.promoted and better.champion_version == v1 and better.champion_after == v4
    assert "beats champion" in better.reason
    assert _alias(client, name, ALIAS_CHAMPION) == v4
    assert _alias(client, name, ALIAS_PREVIOUS) == v1
    assert client.get_model_version(name, v4).tags["promotion.previous_champion"] == v1
    assert client.get_model_version(name, v1).tags["demoted.by"] == v4

    again = promote(name, config=cfg, client=client)
    assert again.decision == "unchanged" and "no @challenger" in again.reason


def test_lower_is_better_metric(client, dataset):
    cfg = repo_section("registry", metric="loss", greater_is_better=False)
    name = cfg.name_for(dataset)
    _version(client, dataset, 1.0, cfg, loss=0.5)
    promote(name, config=cfg, client=client)
    worse = _version(client, dataset, 1.0, cfg, loss=0.7)
    assert promote(name, config=cfg, client=client).decision == "refused"
    better = _version(client, dataset, 1.0, cfg, loss=0.3)
    assert promote(name, config=cfg, client=client).promoted
    assert _alias(client, name, ALIAS_CHAMPION) == better != worse


def test_force_promotes_a_worse_challenger_and_records_it(client, dataset):
    name = f"detailfusion-{dataset}"
    v1 = _version(client, dataset, 50.0)
    promote(name, client=client)
    v2 = _version(client, dataset, 10.0)
    forced = promote(name, force=True, client=client)
    assert forced.promoted and forced.forced
    assert "forced" in forced.reason and "would refuse" in forced.reason
    assert _alias(client, name, ALIAS_CHAMPION) == v2 and _alias(client, name, ALIAS_PREVIOUS) == v1
    assert client.get_model_version(name, v2).tags["promotion.forced"] == "true"


def test_rollback_walks_back_the_promotion_history(client, dataset):
    name = f"detailfusion-{dataset}"
    versions = []
    for avg in (10.0, 20.0, 30.0):
        versions.append(_version(client, dataset, avg))
        assert promote(name, client=client).promoted
    v1, v2, v3 = versions
    assert (_alias(client, name, ALIAS_CHAMPION), _alias(client, name, ALIAS_PREVIOUS)) == (v3, v2)

    back = rollback(name, client=client)
    assert (back.rolled_back_version, back.restored_version, back.previous_champion_after) == (v3, v2, v1)
    assert (_alias(client, name, ALIAS_CHAMPION), _alias(client, name, ALIAS_PREVIOUS)) == (v2, v1)
    assert client.get_model_version(name, v3).tags["rollback.replaced_by"] == v2
    assert client.get_model_version(name, v2).tags["rollback.restored_from"] == v3

    rollback(name, client=client)
    assert _alias(client, name, ALIAS_CHAMPION) == v1
    assert _alias(client, name, ALIAS_PREVIOUS) is None
    with pytest.raises(RegistryError, match="no @previous-champion"):
        rollback(name, client=client)


def test_promote_unknown_model_is_a_clear_error(client):
    with pytest.raises(RegistryError, match="no registered model named 'detailfusion-nope'"):
        promote("detailfusion-nope", client=client)


def test_list_versions_and_table(client, dataset):
    name = f"detailfusion-{dataset}"
    v1 = _version(client, dataset, 50.0)
    promote(name, client=client)
    v2 = _version(client, dataset, 40.0)
    promote(name, client=client)

    rows = list_versions(name, client=client)
    assert [r["version"] for r in rows] == [int(v2), int(v1)]
    assert rows[1]["aliases"] == [ALIAS_CHAMPION] and rows[0]["aliases"] == [ALIAS_CHALLENGER]
    assert rows[1]["metrics"]["Avg"] == 50.0 and rows[0]["decision"] == "refused"
    table = format_versions(rows, metrics=["Avg"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["version", "aliases", "Avg"]
    assert "@champion" in lines[3] and "50.0000" in lines[3]
    assert "@challenger" in lines[2] and "refused" in lines[2]


def test_cli_promote_list_rollback(client, dataset, tmp_path, capsys):
    params = params_file(tmp_path / "params.yaml", "registry:\n  metric: Avg\n  min_margin: 0.5\n")
    name = f"detailfusion-{dataset}"
    _version(client, dataset, 50.0)
    assert registry_main(["promote", "--params", str(params), "--dataset", dataset]) == 0
    _version(client, dataset, 50.2)
    assert registry_main(["promote", "--params", str(params), "--dataset", dataset]) == 1  # refused
    out = capsys.readouterr().out
    assert "PROMOTED" in out and "REFUSED" in out and "min margin 0.5" in out

    assert registry_main(["list", "--params", str(params), "--name", name, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["aliases"] for r in rows] == [[ALIAS_CHALLENGER], [ALIAS_CHAMPION]]

    assert registry_main(["rollback", "--params", str(params), "--name", name]) == 2
    assert "no @previous-champion" in capsys.readouterr().err

    missing = tmp_path / "nowhere.yaml"
    assert registry_main(["list", "--params", str(missing), "--name", name]) == 2
    assert f"{missing}: params file not found" in capsys.readouterr().err

    params_file(params, "registry:\n  metrc: Avg\n")
    assert registry_main(["list", "--params", str(params), "--name", name]) == 2
    assert "registry: unknown key(s) ['metrc']" in capsys.readouterr().err


def test_stale_lock_is_broken_and_a_live_one_waited_for(client, dataset):
    name = f"detailfusion-{dataset}"
    _version(client, dataset, 50.0)
    stale = {TAG_OWNER: "dead", TAG_ACQUIRED_AT: f"{time.time() - 3600:.3f}", TAG_HOLDER: "gone:1"}
    client.create_registered_model(lock_name(name), tags=stale)
    assert promote(name, config=repo_section("registry", lock_timeout_s=60), client=client).promoted
    assert not client.search_registered_models(f"name = '{lock_name(name)}'")

    _version(client, dataset, 60.0)
    live = {TAG_OWNER: "alive", TAG_ACQUIRED_AT: f"{time.time():.3f}", TAG_HOLDER: "busy-host:42"}
    client.create_registered_model(lock_name(name), tags=live)
    with pytest.raises(RegistryError, match="busy-host:42"):
        promote(name, config=repo_section("registry", lock_wait_s=0.5), client=client)
    assert client.get_registered_model(lock_name(name)).tags[TAG_OWNER] == "alive"  # not ours to delete
    client.delete_registered_model(lock_name(name))


def _assert_consistent_history(client, name: str, best: str, promotions: int) -> None:
    """One champion (the best), and the chain of previous champions recorded at each promotion
    has one link per promotion that happened, with strictly improving metrics. Without the lock,
    two promotions racing would record the same previous champion and the chain would be short."""
    model = client.get_registered_model(name)
    assert model.aliases[ALIAS_CHAMPION] == best
    versions = {mv.version: mv for mv in client.search_model_versions(f"name = '{name}'")}
    chain, current = [], best
    while current != "none":
        assert current not in chain, f"cycle in the promotion history: {chain + [current]}"
        chain.append(current)
        current = versions[current].tags["promotion.previous_champion"]
    assert len(chain) == promotions, f"promotion history {chain} does not match {promotions} promotions"
    ever_promoted = {v for v, mv in versions.items() if "promotion.previous_champion" in mv.tags}
    assert set(chain) == ever_promoted
    values = [float(versions[v].tags["metric.Avg"]) for v in chain]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    if len(chain) > 1:
        assert model.aliases[ALIAS_PREVIOUS] == chain[1]
    assert not client.search_registered_models(f"name = '{lock_name(name)}'")


def test_concurrent_promotions_threads(client, dataset):
    name = f"detailfusion-{dataset}"
    scores = [30.0, 10.0, 50.0, 20.0, 40.0]
    versions = [_version(client, dataset, s) for s in scores]
    best = versions[scores.index(max(scores))]
    barrier = threading.Barrier(len(versions) * 2)
    errors: list[BaseException] = []
    decisions = []

    def worker(version: str) -> None:
        from mlflow import MlflowClient

        own = MlflowClient(tracking_uri=client.tracking_uri, registry_uri=client.tracking_uri)
        barrier.wait()
        try:
            decisions.append(promote(name, version=version, client=own))
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(v,)) for v in versions * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(decisions) == 2 * len(versions)
    _assert_consistent_history(client, name, best, sum(d.promoted for d in decisions))


def test_concurrent_promotions_processes(client, dataset, mlflow_sqlite_server):
    name = f"detailfusion-{dataset}"
    scores = [20.0, 40.0, 10.0, 30.0]
    versions = [_version(client, dataset, s) for s in scores]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_sqlite_server.url}
    # All processes start together and take turns only through the server-side lock.
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "detailfusion.registry.cli", "promote", "--name", name, "--version", v, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for v in versions
    ]
    results = [p.communicate(timeout=240) for p in procs]
    decisions = []
    for p, (out, err) in zip(procs, results, strict=True):
        decision = json.loads(out)["decision"]
        assert p.returncode == {"promoted": 0, "refused": 1}.get(decision, -1), err  # documented exit codes
        decisions.append(decision)
    assert set(decisions) <= {"promoted", "refused"}
    _assert_consistent_history(client, name, versions[scores.index(max(scores))], decisions.count("promoted"))


def test_margin_is_strict_and_the_reason_says_so(client, dataset):
    cfg = repo_section("registry", min_margin=1.0)
    name = cfg.name_for(dataset)
    _version(client, dataset, 50.0)
    promote(name, config=cfg, client=client)
    _version(client, dataset, 51.0)  # exactly the margin: not "more than"
    tie = promote(name, config=cfg, client=client)
    assert tie.decision == "refused"
    assert "by more than min_margin 1 (improvement +1.0000)" in tie.reason
    _version(client, dataset, 40.0)
    worse = promote(name, config=cfg, client=client)
    assert "needs" not in worse.reason and "(improvement -10.0000)" in worse.reason


def test_forced_promote_without_challenger_is_not_reported_as_forced(client, dataset):
    name = f"detailfusion-{dataset}"
    _version(client, dataset, 50.0)
    promote(name, client=client)
    nothing = promote(name, force=True, client=client)
    assert nothing.decision == "unchanged"
    assert nothing.format().splitlines()[0] == f"{name}: UNCHANGED"


def test_rollback_marks_the_demoted_version(client, dataset):
    name = f"detailfusion-{dataset}"
    v1 = _version(client, dataset, 10.0)
    promote(name, client=client)
    v2 = _version(client, dataset, 20.0)
    promote(name, client=client)
    rollback(name, client=client)
    rows = {str(r["version"]): r for r in list_versions(name, client=client)}
    assert rows[v2]["decision"] == "rolled-back" and rows[v1]["aliases"] == [ALIAS_CHAMPION]


def free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_says_one_line_when_the_tracking_server_is_down(tmp_path, capsys, monkeypatch):
    port = free_tcp_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    params = params_file(tmp_path / "params.yaml", "registry:\n  retries: 1\n  backoff_s: 0.1\n  timeout_s: 2\n")
    for command in (["list"], ["promote"], ["rollback"]):
        assert registry_main([*command, "--params", str(params), "--name", "detailfusion-x"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(f"error: tracking server http://127.0.0.1:{port}: unreachable"), err
