"""Install lock files into the running interpreter's venv, exactly as pinned (``make install``).

Usage: python requirements/install.py LOCK [LOCK ...] [--editable DIR]

Every lock is installed with ``--no-deps``: it is complete (``make lock``), so there is nothing to
resolve, and ``pip check`` afterwards (Makefile) fails the install on a missing or broken
requirement. The installer is uv (pinned below, bootstrapped with this venv's pip): it downloads
and unpacks the wheels in parallel, so a fresh venv with the run lock and the project (6.3 GB,
most of it torch and the CUDA libraries) takes about 18 s instead of about 95 s with pip (README
"Where the time goes"). The versions are the lock's either way.

uv does not read pip's configuration, and a machine's package sources live there (this project's
machines add a local wheel folder, file indexes and a constraints file). So the settings of
``pip config list`` (pip.conf files and ``PIP_*`` variables: ``index-url``, ``extra-index-url``,
``find-links``, ``no-index``, ``constraint``) are passed to uv as the same options, pip's ``cert``
(a CA bundle, e.g. for a TLS-inspecting proxy) as ``SSL_CERT_FILE``, and uv picks among all
indexes as pip does (``--index-strategy unsafe-best-match``). If uv cannot be installed
or fails, the install falls back to pip with a one-line warning, so no machine is worse off than
with pip alone.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

UV = "uv==0.13.9"
# pip option -> uv option; all of them may hold several whitespace-separated values
_OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
_SECTION_RANK = {":env:": 2, "install": 1}


def pip_config(text: str) -> dict[str, list[str]]:
    """``pip config list`` output -> ``{option: [values]}`` for the options uv needs.

    Lines look like ``global.find-links='/opt/wheels'`` or ``:env:.find-links='/opt/wheels'``.
    Where an option is set in several places the one pip uses wins: a ``PIP_*`` variable
    (``:env:``) over the ``[install]`` section over ``[global]``."""
    found: dict[str, tuple[int, list[str]]] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, option = key.rsplit(".", 1)
        if option not in _OPTIONS and option not in ("no-index", "cert"):
            continue
        rank = _SECTION_RANK.get(section, 0)
        if option not in found or rank >= found[option][0]:
            found[option] = (rank, " ".join(shlex.split(raw)).split())
    return {option: values for option, (_, values) in found.items()}


def uv_source_args(config: dict[str, list[str]]) -> list[str]:
    """uv options for the package sources pip is configured with."""
    args: list[str] = []
    for option, flag in _OPTIONS.items():
        for value in config.get(option, []):
            args += [flag, value]
    if config.get("no-index") and config["no-index"][0].lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    return args + ["--index-strategy", "unsafe-best-match"]


def uv_env(config: dict[str, list[str]], environ: dict[str, str]) -> dict[str, str]:
    """The environment for uv: pip's CA bundle (``cert``) as ``SSL_CERT_FILE``, which uv reads."""
    env = dict(environ)
    if config.get("cert"):
        env["SSL_CERT_FILE"] = config["cert"][0]
    return env


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(list(cmd), env=env).returncode == 0


def install_with_uv(python: str, locks: Sequence[str], editable: str | None) -> bool:
    """True when uv installed everything; False (after a warning) when pip has to."""
    bootstrap = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", UV]
    if not _run(bootstrap):
        print(f"warning: could not install {UV}; installing with pip instead", file=sys.stderr)
        return False
    uv = str(Path(python).parent / "uv")
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = pip_config(listed)
    env = uv_env(config, dict(os.environ))
    base = [uv, "pip", "install", "--quiet", "--python", python, "--no-deps", *uv_source_args(config)]
    steps = [[*base, "-r", lock] for lock in locks] + ([[*base, "-e", editable]] if editable else [])
    for cmd in steps:
        if not _run(cmd, env):
            print(
                f"warning: `{shlex.join(cmd[:3] + cmd[-2:])}` failed; installing with pip instead",
                file=sys.stderr,
            )
            return False
    return True


def install_with_pip(python: str, locks: Sequence[str], editable: str | None) -> bool:
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-compile"]
    steps = [[python, "-m", "pip", "install", "-q", "-U", "pip"]] + [[*pip, "-r", lock] for lock in locks]
    return all(_run(cmd) for cmd in steps + ([[*pip, "-e", editable]] if editable else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("locks", nargs="+", help="lock files (requirements/*.lock)")
    ap.add_argument("--editable", help="also install this project folder in editable mode, without deps")
    ap.add_argument("--pip", action="store_true", help="use pip only (no uv)")
    args = ap.parse_args(argv)
    for lock in args.locks:
        if not Path(lock).is_file():
            print(f"error: {lock}: no such lock file", file=sys.stderr)
            return 2
    python = sys.executable
    if not args.pip and install_with_uv(python, args.locks, args.editable):
        return 0
    return 0 if install_with_pip(python, args.locks, args.editable) else 1


if __name__ == "__main__":
    sys.exit(main())
