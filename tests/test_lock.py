"""The lock files `make install` / `make run` / CI install from pin every dependency that
pyproject.toml declares, at a version its specifier allows (a dependency added to pyproject.toml
without `make lock`, or a lock edited by hand, would otherwise be missing on a fresh machine)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "requirements"))
from lock import canonical, read_lock  # noqa: E402


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
