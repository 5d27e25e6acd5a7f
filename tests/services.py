"""Real services on loopback for integration tests, started by the project's local stack
(``infra/local/stack.py``, the one place that knows how to run them).

Each context manager runs a stack with only the services a test needs in its own home (a tmp
folder), waits until they answer, yields their connection details and, on exit, takes the stack
``down`` (every process group: SIGTERM, then SIGKILL) and deletes its data; the logs stay in
``<home>/logs``. When a service does not start, ``ServiceError`` carries the command and the tail
of its log.

Test modules share them by declaring ``pytest_plugins = ["services"]``: the session-scoped
fixtures at the bottom then start each stack once per test session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

STACK_PY = Path(__file__).resolve().parents[1] / "infra" / "local" / "stack.py"


def _load_stack():
    name = "detailfusion_local_stack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, STACK_PY)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


stack = _load_stack()
StackError = stack.StackError
free_port = stack.proc.free_port
FAKE_AWS = dict(stack.svc.FAKE_AWS)
QUIET_ENV = dict(stack.QUIET_ENV)


class ServiceError(RuntimeError):
    """A service did not start (or stop); the message holds the command and its log tail."""


def _service_error(exc: Exception) -> ServiceError:
    message = str(exc)
    cmd, log = getattr(exc, "cmd", None), getattr(exc, "log", None)
    if cmd:
        message += f"\ncommand: {' '.join(cmd)}"
    if log:
        message += f"\n--- last lines of {log} ---\n{stack.proc.log_tail(Path(log))}"
    return ServiceError(message)


def skip_reason(services: list[str] | None, settings: dict | None = None) -> str | None:
    """Why a stack with these services cannot run here (None when it can)."""
    services = list(services or stack.svc.SERVICES)
    needs_pg = "postgres" in services or (settings or {}).get("mlflow_backend") == "postgres"
    if needs_pg and stack.svc.postgres_missing():
        return stack.svc.postgres_missing()
    if "s3" in services and not Path(sys.executable).with_name("moto_server").exists():
        return f"moto server not installed ({Path(sys.executable).with_name('moto_server')} missing; pip install 'moto[server]')"
    return None


@contextlib.contextmanager
def local_stack(home: Path, services: list[str] | None = None, settings: dict | None = None,
                timeout_s: float | None = None) -> Iterator[dict]:  # fmt: skip
    """``up`` a stack in ``home`` (skips the test when a program is missing); yields ``status()``
    with ``env`` (stack.env as a dict) added; ``down`` (purging its data) afterwards."""
    reason = skip_reason(services, settings)
    if reason:
        pytest.skip(reason)
    try:
        try:
            report = stack.up(home, services, settings=settings, timeout_s=timeout_s)
        except StackError as exc:
            raise _service_error(exc) from exc
        report["env"] = stack.read_env(home)
        yield report
    finally:
        stack.down(home, purge=True)


# --------------------------------------------------------------------------- MLflow


@dataclasses.dataclass
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"


@dataclasses.dataclass
class S3Server:
    endpoint_url: str

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to reach it."""
        return {**FAKE_AWS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
                            region_name=FAKE_AWS["AWS_DEFAULT_REGION"])  # fmt: skip


@dataclasses.dataclass
class MlflowServer:
    """The stack's ``mlflow server``; ``stop()``/``start()`` let a test take it down mid-way (it
    comes back on the same port)."""

    url: str
    backend: str
    artifacts: str
    home: Path
    s3: S3Server | None = None
    postgres: PostgresServer | None = None

    def stop(self) -> None:
        stack.stop_service(self.home, "mlflow")

    def start(self, timeout_s: float | None = None) -> None:
        try:
            stack.up(self.home, ["mlflow"], timeout_s=timeout_s)
        except StackError as exc:
            raise _service_error(exc) from exc


def _mlflow(report: dict, home: Path) -> MlflowServer:
    st = stack.Stack(home)
    server = MlflowServer(report["env"]["MLFLOW_TRACKING_URI"], stack.svc.mlflow_backend(st),
                          stack.svc.mlflow_artifacts(st), st.home)  # fmt: skip
    if "s3" in st.services:
        server.s3 = S3Server(report["env"]["AWS_ENDPOINT_URL"])
    if "postgres" in st.services:
        server.postgres = PostgresServer(stack.svc.HOST, st.port("postgres"), stack.svc.PG_USER)
    return server


@contextlib.contextmanager
def mlflow_server(workdir: Path, backend: str = "sqlite", artifacts: str | None = None,
                  timeout_s: float | None = None) -> Iterator[MlflowServer]:  # fmt: skip
    """A stack with only ``mlflow server`` (proxied artifacts) in ``workdir/stack``.

    ``backend`` is ``"sqlite"`` (a new database file) or a database URL; ``artifacts`` a local
    folder or URI (default: a folder in the stack home).
    """
    home = Path(workdir) / "stack"
    settings = {"mlflow_backend": backend, "mlflow_artifacts": artifacts or "local"}
    with local_stack(home, ["mlflow"], settings, timeout_s) as report:
        yield _mlflow(report, home)


# --------------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session")
def mlflow_sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One MLflow server (SQLite backend, local proxied artifacts) for the whole session."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-sqlite")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_postgres_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """MLflow with a PostgreSQL backend and proxied artifacts in S3 (moto, bucket
    ``mlflow-artifacts``), as in production. Tests check objects in the bucket and rows in the
    database through ``.s3`` and ``.postgres``."""
    home = tmp_path_factory.mktemp("mlflow-pg-s3") / "stack"
    with local_stack(home, ["postgres", "s3", "mlflow"], {"bucket": "mlflow-artifacts"}) as report:
        yield _mlflow(report, home)


@pytest.fixture(scope="session")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The whole local stack (PostgreSQL, S3, MLflow, Prefect server, cpu/gpu workers) for the
    session: ``status()`` plus ``env`` (the stack.env variables) and ``home``."""
    home = tmp_path_factory.mktemp("stack") / "home"
    with local_stack(home) as report:
        yield report


@pytest.fixture
def tracking_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Quiet, offline client settings; tests then set MLFLOW_TRACKING_URI themselves."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY"):
        monkeypatch.setenv(key, QUIET_ENV[key])
    return monkeypatch
