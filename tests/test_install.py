"""requirements/install.py: pip's package sources handed to uv, and the pip fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "requirements"))
import install  # noqa: E402

# `pip config list` on this project's machines: a PIP_* variable and two pip.conf files
CONFIG = """:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/other-wheels'
"""


def test_pip_config_keeps_the_sources_pip_uses():
    config = install.pip_config(CONFIG)
    assert config == {
        "find-links": ["/opt/wheels"],  # the variable wins over pip.conf, as in pip
        "cert": ["/etc/ssl/certs/ca-certificates.crt"],
        "constraint": ["/etc/xdg/pip/constraints.txt"],
        "extra-index-url": ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"],
    }
    # [install] over [global], whatever the order of the lines
    assert install.pip_config(
        "install.index-url='https://a/simple'\nglobal.index-url='https://b/simple'\n"
    ) == {"index-url": ["https://a/simple"]}


def test_uv_gets_the_same_sources_and_picks_across_indexes_like_pip():
    args = install.uv_source_args(install.pip_config(CONFIG))
    pairs = list(zip(args[::2], args[1::2], strict=True))
    assert ("--find-links", "/opt/wheels") in pairs
    assert ("--extra-index-url", "file:///opt/pypi/simple") in pairs
    assert ("--extra-index-url", "file:///opt/pypi-more/simple") in pairs
    assert ("--constraint", "/etc/xdg/pip/constraints.txt") in pairs
    assert args[-2:] == ["--index-strategy", "unsafe-best-match"]
    assert "--no-index" in install.uv_source_args({"no-index": ["true"]})
    assert "--no-index" not in install.uv_source_args({"no-index": ["false"]})
    assert install.uv_source_args({}) == ["--index-strategy", "unsafe-best-match"]


def test_pip_cert_becomes_uv_ssl_cert_file():
    config = install.pip_config(CONFIG + ":env:.cert='/srv/proxy-ca.pem'\n")
    assert install.uv_env(config, {"SSL_CERT_FILE": "/etc/other.pem", "HOME": "/root"}) == {
        "SSL_CERT_FILE": "/srv/proxy-ca.pem",
        "HOME": "/root",
    }
    assert install.uv_env(install.pip_config(""), {"HOME": "/root"}) == {"HOME": "/root"}


def test_missing_lock_file_is_one_clear_error(tmp_path, capsys):
    assert install.main([str(tmp_path / "run.lock")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'run.lock'}: no such lock file"


@pytest.mark.parametrize("fail_at", ["bootstrap", "lock"])
def test_falls_back_to_pip_when_uv_cannot_install(tmp_path, monkeypatch, capsys, fail_at):
    lock = tmp_path / "run.lock"
    lock.write_text("six==1.17.0\n")
    ran: list[list[str]] = []

    def run(cmd, env=None):
        ran.append(cmd)
        if fail_at == "bootstrap":
            return install.UV not in cmd
        return not ("-r" in cmd and cmd[0].endswith("uv"))

    monkeypatch.setattr(install, "_run", run)
    assert install.main([str(lock), "--editable", str(tmp_path)]) == 0
    assert "installing with pip instead" in capsys.readouterr().err
    pip_installs = [c for c in ran if c[1:4] == ["-m", "pip", "install"] and "--no-deps" in c]
    assert [c[-2:] for c in pip_installs] == [["-r", str(lock)], ["-e", str(tmp_path)]]
    assert all("--no-compile" in c for c in pip_installs)


def test_uv_path_installs_every_lock_then_the_project_without_deps(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CERT", "/srv/ca.pem")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    locks = [tmp_path / "run.lock", tmp_path / "test.lock"]
    for lock in locks:
        lock.write_text("six==1.17.0\n")
    ran: list[list[str]] = []
    envs: list[dict | None] = []
    monkeypatch.setattr(install, "_run", lambda cmd, env=None: ran.append(cmd) or envs.append(env) or True)
    assert install.main([str(p) for p in locks] + ["--editable", "."]) == 0
    assert ran[0][-1] == install.UV  # bootstrapped with this venv's pip
    uv_cmds = ran[1:]
    assert all(c[0] == str(Path(sys.executable).parent / "uv") and "--no-deps" in c for c in uv_cmds)
    assert [c[-2:] for c in uv_cmds] == [["-r", str(locks[0])], ["-r", str(locks[1])], ["-e", "."]]
    assert not any(c[1:4] == ["-m", "pip", "install"] and "--no-deps" in c for c in ran)
    # uv runs with pip's CA bundle when pip has one (PIP_CERT here)
    assert {e["SSL_CERT_FILE"] for e in envs[1:]} == {"/srv/ca.pem"}
