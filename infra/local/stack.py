"""The DetailFusion stack on loopback, without Docker: PostgreSQL (Debian's binaries, a private
cluster), S3 (moto's server mode), an MLflow server, a Prefect server and one process worker for
each of the work pools ``cpu`` and ``gpu``.

    python infra/local/stack.py up     [--home DIR] [--services postgres,s3,mlflow,prefect,workers]
    python infra/local/stack.py status [--home DIR] [--json]
    python infra/local/stack.py down   [--home DIR] [--purge]

Everything lives in the stack home (default ``<repo>/.stack``): ``stack.json`` (ports chosen at the
first ``up``, settings), ``stack.env`` (what clients need, ``KEY=VALUE``), ``run/*.pid``,
``logs/*.log`` and the data of PostgreSQL, MLflow and Prefect. ``up`` keeps running services and
starts the missing ones; ``down`` stops every process group (SIGTERM, then SIGKILL).

From Python (tests): ``up(home, services=None) -> dict``, ``down(home)``, ``status(home) -> dict``,
``read_env(home) -> dict``, ``stop_service(home, name)``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack_proc as proc  # noqa: E402
import stack_services as svc  # noqa: E402
from stack_proc import StackError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HOME = REPO / ".stack"
PHASES = (("postgres", "s3"), ("mlflow", "prefect"), ("workers",))
PORTED = ("postgres", "s3", "mlflow", "prefect")
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}  # fmt: skip
# Variables of another stack or server that must not leak into the services' environment.
DROP_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_API_URL", "PREFECT_HOME", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
DEFAULT_SETTINGS = {"bucket": "detailfusion", "mlflow_backend": None, "mlflow_artifacts": None, "prefect_db": None,
                    "prefect_ui": True, "pg_dir": None}  # fmt: skip


class Stack:
    """One stack home: its state file, ports, settings, PID files and logs."""

    def __init__(self, home: Path | str | None = None):
        self.home = Path(home or DEFAULT_HOME).expanduser().resolve()
        self.state_path = self.home / "stack.json"
        state = {}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
            except ValueError as exc:
                raise StackError(f"{self.state_path}: not valid JSON ({exc}); fix or delete it") from exc
        self.ports: dict[str, int] = state.get("ports", {})
        self.services: list[str] = state.get("services", [])
        self.settings: dict = {**DEFAULT_SETTINGS, **state.get("settings", {})}

    # ----------------------------------------------------------------- state
    def save(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"ports": self.ports, "services": self.services, "settings": self.settings}, indent=2))
        os.replace(tmp, self.state_path)

    def port(self, name: str) -> int:
        return self.ports[name]

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def pidfile(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def info(self, name: str) -> dict | None:
        return proc.read_pidfile(self.pidfile(name))

    @contextlib.contextmanager
    def locked(self):
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def configure(self, requested: list[str]) -> list[str]:
        """Remember the requested services (and what they need); return them in start order."""
        unknown = sorted(set(requested) - set(svc.SERVICES))
        if unknown:
            raise StackError(f"unknown service(s) {', '.join(unknown)}; choose from {','.join(svc.SERVICES)}")
        wanted = set(requested) | ({"prefect"} if "workers" in requested else set())
        known = set(self.services) | wanted
        s = self.settings
        if "mlflow" in wanted:
            s["mlflow_backend"] = s["mlflow_backend"] or ("postgres" if "postgres" in known else "sqlite")
            s["mlflow_artifacts"] = s["mlflow_artifacts"] or ("s3" if "s3" in known else "local")
            wanted |= {"postgres"} if s["mlflow_backend"] == "postgres" else set()
            wanted |= {"s3"} if s["mlflow_artifacts"] == "s3" else set()
        if "prefect" in wanted:
            s["prefect_db"] = s["prefect_db"] or ("postgres" if "postgres" in known else "sqlite")
            wanted |= {"postgres"} if s["prefect_db"] == "postgres" else set()
        for name in wanted & set(PORTED):
            self.ports.setdefault(name, proc.free_port())
        self.services = [name for name in svc.SERVICES if name in wanted or name in self.services]
        self.save()
        return [name for name in svc.SERVICES if name in wanted]

    # ----------------------------------------------------------------- environment
    def env(self, include_marker: bool = False) -> dict[str, str]:
        """The environment for the services and their clients (os.environ + stack.env)."""
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV and k != proc.HOME_VAR}
        env.update(self.client_env())
        if include_marker:
            env[proc.HOME_VAR] = str(self.home)
        return env

    def client_env(self) -> dict[str, str]:
        out = dict(QUIET_ENV)
        if "mlflow" in self.services:
            out["MLFLOW_TRACKING_URI"] = f"http://{svc.HOST}:{self.port('mlflow')}"
        if "prefect" in self.services:
            out["PREFECT_API_URL"] = svc.prefect_api(self)
            out["PREFECT_HOME"] = str(self.home / "prefect")
        if "s3" in self.services:
            bucket = self.settings["bucket"]
            out.update(svc.FAKE_AWS, AWS_ENDPOINT_URL=svc.s3_url(self), MLFLOW_S3_ENDPOINT_URL=svc.s3_url(self),
                       DVC_REMOTE_URL=f"s3://{bucket}/dvc", DETAILFUSION_S3_BUCKET=bucket)  # fmt: skip
        return out

    def write_env(self) -> None:
        lines = [f"{k}={v}" for k, v in self.client_env().items()]
        path = self.home / "stack.env"
        path.with_suffix(".env.tmp").write_text("# written by infra/local/stack.py up\n" + "\n".join(lines) + "\n")
        os.replace(path.with_suffix(".env.tmp"), path)

    # ----------------------------------------------------------------- processes
    def command(self, name: str) -> tuple[list[str], dict[str, str], str | None]:
        """(command, extra environment, user) of a stack process."""
        if name == "postgres":
            return svc.postgres_cmd(self), {}, svc.pg_user()
        if name == "s3":
            return svc.s3_cmd(self), dict(svc.FAKE_AWS), None
        if name == "mlflow":
            return svc.mlflow_cmd(self), svc.mlflow_env(self), None
        if name == "prefect":
            return svc.prefect_cmd(self), svc.prefect_env(self), None
        return svc.worker_cmd(self, name), {}, None

    def ready(self, name: str) -> bool:
        checks = {"postgres": svc.postgres_ready, "s3": svc.s3_ready, "mlflow": svc.mlflow_ready,
                  "prefect": svc.prefect_ready}  # fmt: skip
        return checks[name](self) if name in checks else svc.worker_online(self, name)

    def start(self, name: str) -> dict | None:
        """Start one process unless it runs already; None when it was kept."""
        if proc.alive(self.info(name)):
            return None
        service = name if name in PORTED else "workers"
        if service in PORTED and proc.port_busy(self.port(service)):
            raise StackError(
                f"{name}: port {self.port(service)} on {svc.HOST} is already in use by another program; stop it, "
                f"or delete the \"{service}\" entry under \"ports\" in {self.state_path} to pick a new port", name)
        cmd, extra, user = self.command(name)
        env, cwd = {**self.env(include_marker=True), **extra}, self.home
        if user:  # the cluster's owner may not be able to enter the home (pg_dir() explains)
            env["HOME"] = str(svc.pg_dir(self))
            cwd = svc.pg_dir(self)
        return proc.spawn(name, cmd, self.log(name), self.pidfile(name), env, user=user, cwd=cwd)

    def wait_ready(self, name: str, timeout_s: float | None) -> None:
        deadline = time.monotonic() + (timeout_s or svc.TIMEOUT_S[name])
        while True:
            info = self.info(name)
            if not proc.alive(info):
                code = proc.exit_code(info) if info else "?"
                self.stop(name)
                raise StackError(f"{name}: exited with code {code} before it was ready; see {self.log(name)}",
                                 name, self.log(name), info.get("cmd") if info else None)  # fmt: skip
            if self.ready(name):
                return
            if time.monotonic() > deadline:
                self.stop(name)
                raise StackError(f"{name}: not ready after {timeout_s or svc.TIMEOUT_S[name]:.0f} s; see "
                                 f"{self.log(name)}", name, self.log(name), info.get("cmd"))  # fmt: skip
            time.sleep(0.25)

    def stop(self, *names: str) -> None:
        """Stop these processes together (each: signal, wait, SIGKILL what is left of its group)."""
        items = []
        for name in names:
            if name == "postgres":  # SIGINT = fast shutdown; the postmaster then stops its backends
                items.append((self.info(name), self.pidfile(name), signal.SIGINT, False))
            else:
                items.append((self.info(name), self.pidfile(name), signal.SIGTERM, True))
        proc.stop_all(items)

    def procs(self, services: list[str] | None = None) -> list[str]:
        return [p for s in (services or self.services) for p in svc.PROCS[s]]


def up(home: Path | str | None = None, services: list[str] | None = None, *, settings: dict | None = None,
       timeout_s: float | None = None) -> dict:  # fmt: skip
    """Start the stack (or only ``services`` and what they need); running services are kept.

    ``settings`` (first ``up`` of a home) may set ``bucket``, ``mlflow_backend`` ("postgres",
    "sqlite" or a database URL), ``mlflow_artifacts`` ("s3", "local" or a URI), ``prefect_db``
    ("postgres"/"sqlite") and ``prefect_ui``. Raises StackError (one line) when something fails.
    """
    st = Stack(home)
    with st.locked():
        st.settings.update(settings or {})
        order = st.configure(list(services or svc.SERVICES))
        stores = [p for s in ("postgres", "s3") if s in order for p in svc.PROCS[s]]
        for name in stores:
            st.start(name)
        for name in stores:
            st.wait_ready(name, timeout_s)
        if "postgres" in order:
            svc.postgres_setup(st)
        if "s3" in order:
            svc.s3_setup(st)
        servers = [s for s in ("mlflow", "prefect") if s in order]
        for name in servers:
            st.start(name)
        workers = svc.PROCS["workers"] if "workers" in order else []
        if workers:  # the workers need only the Prefect server: start them while MLflow comes up
            st.wait_ready("prefect", timeout_s)
            for name in workers:
                st.start(name)
        for name in servers + workers:
            st.wait_ready(name, timeout_s)
        if workers:
            svc.pools_setup(st)
        st.write_env()
    return status(st.home)


def stop_service(home: Path | str | None, name: str) -> None:
    """Stop one service (its processes) and keep the rest; ``up`` starts it again on its port."""
    st = Stack(home)
    with st.locked():
        st.stop(*st.procs([name]))


def down(home: Path | str | None = None, *, purge: bool = False) -> None:
    """Stop every process of the stack; ``purge`` also deletes its data and state (not the logs)."""
    st = Stack(home)
    if not st.home.exists():
        return
    with st.locked():
        for phase in reversed(PHASES):
            st.stop(*st.procs(list(phase)))
        proc.kill_strays(st.home)
    if purge:  # everything but the logs
        if st.settings.get("pg_dir"):
            shutil.rmtree(st.settings["pg_dir"], ignore_errors=True)
        for path in st.home.iterdir():
            if path.name == "logs":
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def read_env(home: Path | str | None = None) -> dict[str, str]:
    """``stack.env`` as a dict (written by ``up``)."""
    path = Stack(home).home / "stack.env"
    if not path.exists():
        raise StackError(f"{path} not found; start the stack first (infra/local/stack up)")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


def status(home: Path | str | None = None) -> dict:
    """Each process: pid, running, healthy (answers / bucket exists / worker online), port, log."""
    st = Stack(home)
    rows = []
    for name in st.procs():
        info = st.info(name)
        running = proc.alive(info)
        healthy = running and st.ready(name)
        service = name if name in PORTED else "workers"
        row = {"name": name, "service": service, "pid": info["pid"] if running else None, "running": running,
               "healthy": bool(healthy), "port": st.ports.get(service), "log": str(st.log(name))}  # fmt: skip
        if name == "s3":
            row["bucket"] = st.settings["bucket"]
            row["healthy"] = bool(healthy and svc.s3_bucket_exists(st))
        if name.startswith("worker-"):
            pool = svc.pool_info(st, svc.WORKER_PROCS[name]) if healthy else None
            row["pool"] = svc.WORKER_PROCS[name]
            row["concurrency_limit"] = pool.get("concurrency_limit") if pool else None
        rows.append(row)
    urls = {k: v for k, v in st.client_env().items() if k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                                                               "AWS_ENDPOINT_URL")}  # fmt: skip
    return {"home": str(st.home), "configured": bool(st.services), "healthy": bool(rows) and all(r["healthy"] for r in rows),
            "processes": rows, "urls": urls, "strays": proc.strays(st.home, groups={r["pid"] for r in rows if r["pid"]}),
            "gpu": svc.gpu_present(), "env_file": str(st.home / "stack.env")}  # fmt: skip


def _table(report: dict) -> str:
    if not report["configured"]:
        return f"no stack in {report['home']} (start one with: infra/local/stack up --home {report['home']})"
    lines = [f"stack home {report['home']}", f"{'PROCESS':<11} {'PID':>7}  {'STATE':<9} {'PORT':>5}  LOG"]
    for r in report["processes"]:
        state = "healthy" if r["healthy"] else ("starting" if r["running"] else "stopped")
        lines.append(f"{r['name']:<11} {r['pid'] or '-':>7}  {state:<9} {r['port'] or '-':>5}  {r['log']}")
    lines += [f"{k}={v}" for k, v in report["urls"].items()]
    if not report["gpu"] and any(r["name"] == "worker-gpu" for r in report["processes"]):
        lines.append("no GPU found: the gpu pool's worker runs its flows on the CPU")
    if report["strays"]:
        lines.append(f"stray processes of this stack (not in a PID file): {report['strays']}")
    lines.append(f"environment: set -a; source {report['env_file']}; set +a")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("up", "down", "status"))
    ap.add_argument("--home", default=os.environ.get(proc.HOME_VAR) or str(DEFAULT_HOME),
                    help="stack home (default: <repo>/.stack)")
    ap.add_argument("--services", help=f"comma-separated subset of {','.join(svc.SERVICES)} (up only)")
    ap.add_argument("--json", action="store_true", help="status as JSON")
    ap.add_argument("--purge", action="store_true", help="down: also delete the stack's data (logs stay)")
    args = ap.parse_args(argv)
    try:
        if args.command == "up":
            services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
            report = up(args.home, services)
        elif args.command == "down":
            down(args.home, purge=args.purge)
            print(f"stack in {Path(args.home).resolve()} stopped" + (", its data deleted" if args.purge else ""))
            return 0
        else:
            report = status(args.home)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0 if report["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
