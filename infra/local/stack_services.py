"""What each service of the local stack is: its command line, environment, readiness check and the
setup done once it answers (databases, bucket, work pools).

Processes (PID file names): ``postgres``, ``s3`` (moto's server mode), ``mlflow``, ``prefect`` and
the workers ``worker-cpu`` / ``worker-gpu`` (the ``workers`` service). ``Stack`` (stack.py) hands
each function itself as ``st``: ``st.home``, ``st.port(name)``, ``st.settings``, ``st.env()``.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from stack_proc import StackError, http_ok

HOST = "127.0.0.1"
PG_USER = "postgres"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
POOLS = {"cpu": None, "gpu": 1}  # work pool -> concurrency limit (one training at a time on a GPU worker)
WORKER_PROCS = {f"worker-{pool}": pool for pool in POOLS}
SERVICES = ("postgres", "s3", "mlflow", "prefect", "workers")
PROCS = {"postgres": ["postgres"], "s3": ["s3"], "mlflow": ["mlflow"], "prefect": ["prefect"],
         "workers": list(WORKER_PROCS)}  # fmt: skip
TIMEOUT_S = {"postgres": 60, "s3": 30, "mlflow": 150, "prefect": 150, "worker-cpu": 90, "worker-gpu": 90}


def tool(name: str, hint: str) -> str:
    """A program from this Python's environment (the venv) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found next to {sys.executable} or on PATH; {hint}", name)
    return found


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server bin directory (with initdb and postgres), if any."""
    dirs = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if (d / "initdb").exists() and (d / "postgres").exists()]
    dirs.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return dirs[-1] if dirs else None


def postgres_missing() -> str | None:
    """None when a private PostgreSQL cluster can be started here, else why not (one line)."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); run `apt-get install postgresql`"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_USER)
        except KeyError:
            return f"running as root but there is no '{PG_USER}' user to own the cluster (apt-get install postgresql)"
    return None


def pg_user() -> str | None:
    """initdb refuses to run as root: as root the cluster belongs to the postgres user."""
    return PG_USER if os.geteuid() == 0 else None


def pg_dir(st) -> Path:
    """Where the cluster lives: ``<home>/postgres`` when the cluster's owner can reach it, else a
    folder under the system temp dir (e.g. a 0700 pytest tmp dir as root), remembered in stack.json."""
    if st.settings.get("pg_dir"):
        return Path(st.settings["pg_dir"])
    user = pg_user()
    inside = st.home / "postgres"
    inside.mkdir(parents=True, exist_ok=True)
    chosen = inside
    if user:
        shutil.chown(inside, user, user)
        reach = subprocess.run(["test", "-w", str(inside)], user=user, group=user, check=False)
        if reach.returncode != 0:
            import hashlib
            import tempfile

            tag = hashlib.sha1(str(st.home).encode()).hexdigest()[:12]
            chosen = Path(tempfile.gettempdir()) / f"detailfusion-stack-pg-{tag}"
            chosen.mkdir(mode=0o700, exist_ok=True)
            shutil.chown(chosen, user, user)
            inside.rmdir()
    st.settings["pg_dir"] = str(chosen)
    st.save()
    return chosen


def postgres_cmd(st) -> list[str]:
    reason = postgres_missing()
    if reason:
        raise StackError(f"postgres: {reason}", "postgres")
    bindir, data = postgres_bin(), pg_dir(st) / "data"
    if not (data / "PG_VERSION").exists():
        res = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", PG_USER, "--no-sync", "-E", "UTF8"],
            capture_output=True, text=True, user=pg_user(), group=pg_user(), check=False,
        )  # fmt: skip
        st.log("postgres").parent.mkdir(parents=True, exist_ok=True)
        with open(st.log("postgres"), "a") as log:
            log.write(res.stdout + res.stderr)
        if res.returncode != 0:
            raise StackError(f"postgres: initdb failed (exit {res.returncode}); see {st.log('postgres')}", "postgres",
                             st.log("postgres"))  # fmt: skip
    return [
        str(bindir / "postgres"), "-D", str(data), "-p", str(st.port("postgres")),
        "-c", f"listen_addresses={HOST}", "-c", "unix_socket_directories=", "-c", "synchronous_commit=off",
    ]  # fmt: skip


def postgres_connect(st, dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host=HOST, port=st.port("postgres"), user=PG_USER, dbname=dbname, connect_timeout=3)


def postgres_ready(st) -> bool:
    try:
        postgres_connect(st).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def postgres_setup(st) -> None:
    conn = postgres_connect(st)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for db in ("mlflow", "prefect"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
    finally:
        conn.close()


def postgres_url(st, db: str, driver: str) -> str:
    return f"{driver}://{PG_USER}@{HOST}:{st.port('postgres')}/{db}"


# --------------------------------------------------------------------------- S3 (moto)


def s3_url(st) -> str:
    return f"http://{HOST}:{st.port('s3')}"


def s3_cmd(st) -> list[str]:
    moto = tool("moto_server", "install the test extras: pip install 'moto[server]'")
    return [moto, "-H", HOST, "-p", str(st.port("s3"))]


def s3_ready(st) -> bool:
    return http_ok(f"{s3_url(st)}/moto-api/")


def s3_client(st):
    import boto3

    return boto3.client("s3", endpoint_url=s3_url(st), aws_access_key_id=FAKE_AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
                        region_name=FAKE_AWS["AWS_DEFAULT_REGION"])  # fmt: skip


def s3_setup(st) -> None:
    client, bucket = s3_client(st), st.settings["bucket"]
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


def s3_bucket_exists(st) -> bool:
    try:
        s3_client(st).head_bucket(Bucket=st.settings["bucket"])
        return True
    except Exception:  # noqa: BLE001 - unreachable or missing
        return False


# --------------------------------------------------------------------------- MLflow


def mlflow_backend(st) -> str:
    kind = st.settings["mlflow_backend"]
    if kind == "postgres":
        return postgres_url(st, "mlflow", "postgresql+psycopg2")
    if kind == "sqlite":
        return f"sqlite:///{st.home / 'mlflow' / 'mlflow.db'}"
    return kind


def mlflow_artifacts(st) -> str:
    kind = st.settings["mlflow_artifacts"]
    if kind == "s3":
        return f"s3://{st.settings['bucket']}/mlflow"
    if kind == "local":
        return str(st.home / "mlflow" / "artifacts")
    return kind


def mlflow_cmd(st) -> list[str]:
    (st.home / "mlflow").mkdir(parents=True, exist_ok=True)
    return [
        tool("mlflow", "install the project (make install)"), "server",
        "--backend-store-uri", mlflow_backend(st), "--artifacts-destination", mlflow_artifacts(st),
        "--host", HOST, "--port", str(st.port("mlflow")), "--workers", "1",
    ]  # fmt: skip


def mlflow_env(st) -> dict[str, str]:
    # No huey job consumers: faster start, and SIGTERM stops the whole server.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if st.settings["mlflow_artifacts"] == "s3":
        env.update(FAKE_AWS, MLFLOW_S3_ENDPOINT_URL=s3_url(st), AWS_ENDPOINT_URL=s3_url(st))
    return env


def mlflow_ready(st) -> bool:
    return http_ok(f"http://{HOST}:{st.port('mlflow')}/health")


# --------------------------------------------------------------------------- Prefect


def prefect_api(st) -> str:
    return f"http://{HOST}:{st.port('prefect')}/api"


def prefect_cmd(st) -> list[str]:
    (st.home / "prefect").mkdir(parents=True, exist_ok=True)
    prefect = tool("prefect", "install the project (make install)")
    return [prefect, "server", "start", "--host", HOST, "--port", str(st.port("prefect"))]


def prefect_env(st) -> dict[str, str]:
    if st.settings["prefect_db"] == "postgres":
        db = postgres_url(st, "prefect", "postgresql+asyncpg")
    else:
        db = f"sqlite+aiosqlite:///{st.home / 'prefect' / 'prefect.db'}"
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": db,
            "PREFECT_UI_ENABLED": "true" if st.settings["prefect_ui"] else "false"}  # fmt: skip


def prefect_ready(st) -> bool:
    return http_ok(f"{prefect_api(st)}/health")


def _api(st, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{prefect_api(st)}{path}", method=method,
                                 data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def pools_setup(st) -> None:
    """Give the work pools their concurrency limits (each worker creates its pool, of type
    ``process``, when it first starts)."""
    for pool, limit in POOLS.items():
        info = pool_info(st, pool)
        if info is None:
            raise StackError(f"prefect: work pool {pool} not found after its worker started; see "
                             f"{st.log('worker-' + pool)}", "prefect", st.log("worker-" + pool))  # fmt: skip
        if info.get("type") != "process":
            raise StackError(f"prefect: work pool {pool} exists with type {info.get('type')!r}, expected 'process'; "
                             f"delete it (prefect work-pool delete {pool}) or use another stack home", "prefect")  # fmt: skip
        if info.get("concurrency_limit") != limit:
            _api(st, "PATCH", f"/work_pools/{pool}", {"concurrency_limit": limit})


def worker_name(proc: str) -> str:
    return f"local-{WORKER_PROCS[proc]}"


def worker_cmd(st, proc: str) -> list[str]:
    prefect = tool("prefect", "install the project (make install)")
    return [prefect, "worker", "start", "--pool", WORKER_PROCS[proc], "--type", "process", "--name", worker_name(proc)]


def worker_online(st, proc: str) -> bool:
    try:
        workers = _api(st, "POST", f"/work_pools/{WORKER_PROCS[proc]}/workers/filter", {})
    except Exception:  # noqa: BLE001 - server down or pool missing
        return False
    return any(w.get("name") == worker_name(proc) and w.get("status") == "ONLINE" for w in workers or [])


def pool_info(st, pool: str) -> dict | None:
    try:
        return _api(st, "GET", f"/work_pools/{pool}")
    except Exception:  # noqa: BLE001
        return None


def gpu_present() -> bool:
    nvsmi = shutil.which("nvidia-smi")
    if not nvsmi:
        return False
    res = subprocess.run([nvsmi, "-L"], capture_output=True, text=True, check=False)
    return res.returncode == 0 and "GPU" in res.stdout
