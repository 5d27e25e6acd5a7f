"""Real services on loopback for integration tests: MLflow server, PostgreSQL, S3 (moto).

Each starter is a context manager that picks a free port, starts the real program in its own
process group, waits until it answers, yields its connection details and, on exit, stops the
whole process group (SIGTERM, then SIGKILL) so no child outlives the test. When a service does
not come up, the error carries the tail of its log.

Test modules share them by declaring ``pytest_plugins = ["services"]``: the session-scoped
fixtures at the bottom then start each service once per test session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Keep every tool offline and quiet, whatever the caller's environment holds.
QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class ServiceError(RuntimeError):
    """A service did not start (or stop); the message holds the command and its log tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A program started in its own session so its whole process group can be stopped."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until it exits
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fail(self, problem: str) -> ServiceError:
        return ServiceError(
            f"{self.name}: {problem}\ncommand: {' '.join(self.cmd)}\n"
            f"--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}"
        )

    def wait_until(self, ready: callable, timeout_s: float) -> None:
        """Poll ``ready()`` until it is true; fail early when the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise self.fail(f"exited with code {self.proc.returncode if self.proc else '?'} before it was ready")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise self.fail(f"not ready after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; children that ignored SIGTERM may linger in the group.
            if _group_alive(pgid):
                deadline = time.monotonic() + wait
                while _group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _group_alive(pgid):
                    continue
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


# --------------------------------------------------------------------------- MLflow


@dataclasses.dataclass
class MlflowServer:
    """A running ``mlflow server``; ``stop()``/``start()`` let a test take it down mid-way."""

    url: str
    backend: str
    artifacts: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()

    def start(self, timeout_s: float = 90.0) -> None:
        self.process.start()
        self.process.wait_until(lambda: _http_ok(f"{self.url}/health"), timeout_s)


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    backend: str = "sqlite",
    artifacts: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 90.0,
) -> Iterator[MlflowServer]:
    """Run ``mlflow server`` on 127.0.0.1 with proxied artifacts.

    ``backend`` is ``"sqlite"`` (a new database file in ``workdir``) or a database URL;
    ``artifacts`` a local folder or an ``s3://`` URL (default ``workdir/artifacts``); ``env``
    adds server-side variables such as ``MLFLOW_S3_ENDPOINT_URL`` and AWS credentials.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend_uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}" if backend == "sqlite" else backend
    artifacts = artifacts or str((workdir / "artifacts").resolve())
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", artifacts,
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    server_env = {
        **os.environ,
        **QUIET_ENV,
        # No huey job consumers: faster start and SIGTERM stops everything (dependencies.md 3c).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **(env or {}),
    }
    server_env.pop("MLFLOW_TRACKING_URI", None)
    proc = ManagedProcess(f"mlflow server :{port}", cmd, workdir / f"mlflow-server-{port}.log", server_env)
    server = MlflowServer(f"http://127.0.0.1:{port}", backend_uri, artifacts, proc)
    try:
        server.start(timeout_s)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- PostgreSQL


@dataclasses.dataclass
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"


def postgres_available() -> str | None:
    """``None`` when a throwaway cluster can be started here, else the reason why not."""
    for tool in ("initdb", "pg_ctl", "postgres"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL 15 binaries not found ({PG_BIN / tool} is missing)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root but `runuser` is missing (initdb refuses to run as root)"
    return None


@contextlib.contextmanager
def postgres_server(databases: tuple[str, ...] = ("mlflow",), timeout_s: float = 60.0) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL 15 cluster (trust auth, fsync off) on 127.0.0.1.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user and
    lives in its own directory under the system temp dir (pytest's tmp dirs are 0700 root).
    """
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    import psycopg2

    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="detailfusion-pg-"))
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    data, log = base / "data", base / "postgres.log"
    port = free_port()

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout_s)

    started = False
    try:
        res = pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        if res.returncode != 0:
            raise ServiceError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        res = pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout_s)), "-o", opts,
                 "start")  # fmt: skip
        started = True
        if res.returncode != 0:
            raise ServiceError(f"pg_ctl start failed ({res.returncode}): {res.stderr}\n{log_tail(log)}")
        server = PostgresServer("127.0.0.1", port, "postgres")
        conn = psycopg2.connect(host=server.host, port=port, user=server.user, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f'CREATE DATABASE "{db}"')
        conn.close()
        yield server
    finally:
        if started:
            res = pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
            if res.returncode != 0:
                _kill_postmaster(data)
        shutil.rmtree(base, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- S3 (moto)


@dataclasses.dataclass
class S3Server:
    endpoint_url: str

    @property
    def env(self) -> dict[str, str]:
        """What a client (or the MLflow server, for proxied artifacts) needs to reach it."""
        return {**FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS["AWS_DEFAULT_REGION"],
        )


@contextlib.contextmanager
def moto_s3_server(workdir: Path, buckets: tuple[str, ...] = ("mlflow",), timeout_s: float = 30.0) -> Iterator[S3Server]:
    """moto's server mode on 127.0.0.1 with ``buckets`` created; state lives only in memory."""
    moto_bin = Path(sys.executable).with_name("moto_server")
    if not moto_bin.exists():
        pytest.skip(f"moto server not installed ({moto_bin} missing; pip install 'moto[server]')")
    port = free_port()
    proc = ManagedProcess(
        f"moto_server :{port}",
        [str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
        Path(workdir) / f"moto-{port}.log",
        {**os.environ, **FAKE_AWS},
    )
    server = S3Server(f"http://127.0.0.1:{port}")
    proc.start()
    try:
        proc.wait_until(lambda: _http_ok(f"{server.endpoint_url}/moto-api/"), timeout_s)
        s3 = server.client()
        for bucket in buckets:
            s3.create_bucket(Bucket=bucket)
        yield server
    finally:
        proc.stop()


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def mlflow_sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server (SQLite backend, local proxied artifacts) for the whole session."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-sqlite")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_postgres_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """MLflow with a PostgreSQL backend and proxied artifacts in S3 (moto), as in production."""
    workdir = tmp_path_factory.mktemp("mlflow-pg-s3")
    with postgres_server(("mlflow",)) as pg, moto_s3_server(workdir, ("mlflow-artifacts",)) as s3:
        with mlflow_server(workdir, backend=pg.url("mlflow"), artifacts="s3://mlflow-artifacts/proxied", env=s3.env) as srv:
            # Tests check that objects really landed in the bucket and rows in the database.
            srv.s3, srv.postgres = s3, pg
            yield srv


@pytest.fixture
def tracking_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Quiet, offline client settings; tests then set MLFLOW_TRACKING_URI themselves."""
    for key, value in QUIET_ENV.items():
        monkeypatch.setenv(key, value)
    return monkeypatch
