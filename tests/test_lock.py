"""The lock files `make install` / `make run` / CI install from pin every dependency that
pyproject.toml declares, at a version its specifier allows (a dependency added to pyproject.toml
without `make lock`, or a lock edited by hand, would otherwise be missing on a fresh machine)."""

from __future__ import annotations

import json
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "requirements"))
import lock  # noqa: E402
from lock import canonical, python_conditional_gaps, read_lock  # noqa: E402


def _declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    reqs = [Requirement(r) for r in raw]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": extra or ""})]


@pytest.mark.parametrize("extra, locks", [(None, ["run.lock"]), ("test", ["run.lock", "test.lock"])])
def test_every_declared_dependency_is_pinned_within_its_specifier(extra, locks):
    pinned: dict[str, str] = {}
    for name in locks:
        pinned.update(read_lock(ROOT / "requirements" / name))
    for req in _declared(extra):
        name = canonical(req.name)
        assert name in pinned, f"{req} (pyproject.toml) is not pinned in {' / '.join(locks)}: run `make lock`"
        assert req.specifier.contains(Version(pinned[name]), prereleases=True), (
            f"{name}=={pinned[name]} in {' / '.join(locks)} does not satisfy {req} (pyproject.toml)")


def test_the_yaml_c_loader_is_pinned_for_dvc():
    # DVC parses dvc.yaml / dvc.lock / params.yaml with ruamel.yaml's safe loader on every repro;
    # ruamel.yaml 0.19 no longer pulls its C extension in, so the project pins it.
    assert "ruamel-yaml-clib" in read_lock(ROOT / "requirements" / "run.lock")


def _all_pins() -> dict[str, str]:
    return {**read_lock(ROOT / "requirements" / "run.lock"), **read_lock(ROOT / "requirements" / "test.lock")}


def test_the_locks_hold_what_other_pythons_of_requires_python_need():
    # The locks are installed with --no-deps, so a requirement a locked package has only on another
    # 3.11 (redis needs async-timeout below 3.11.3; Debian 12 ships 3.11.2) must be pinned too.
    pinned = _all_pins()
    requires = {}
    for name in pinned:
        try:
            requires[name] = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a test-lock package in a venv without the extras
            continue
    assert "redis" in requires
    assert python_conditional_gaps(requires, set(pinned), lock.requires_python()) == []


def test_conditional_gaps_are_found_for_other_python_versions_only():
    redis = {"redis": ['async-timeout>=4.0.3; python_full_version < "3.11.3"',
                       "hiredis>=3.2.0; extra == 'hiredis'", "pyjwt; python_version >= '3.9' and extra == 'jwt'"]}
    assert python_conditional_gaps(redis, {"redis"}, ">=3.11,<3.12") == [
        'redis: async-timeout>=4.0.3; python_full_version < "3.11.3"']
    assert python_conditional_gaps(redis, {"redis", "async-timeout"}, ">=3.11,<3.12") == []
    assert python_conditional_gaps(redis, {"redis"}, ">=3.12") == []


def test_lock_refuses_a_report_with_a_conditional_gap(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"install": [
        {"metadata": {"name": "redis", "version": "8.1.0",
                      "requires_dist": ['async-timeout>=4.0.3; python_full_version < "3.11.3"']}},
        {"metadata": {"name": "detailfusion", "version": "0.1.0", "requires_dist": ["redis"]}},
    ]}), encoding="utf-8")
    assert lock.main([str(report)]) == 1
    err = capsys.readouterr().err
    assert str(report) in err and "redis: async-timeout>=4.0.3" in err
    report.write_text(json.dumps({"install": [
        {"metadata": {"name": "redis", "version": "8.1.0", "requires_dist": []}}]}), encoding="utf-8")
    assert lock.main([str(report)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["redis==8.1.0"]
