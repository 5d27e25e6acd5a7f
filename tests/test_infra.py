"""infra/: the compose file validates, the Kubernetes worker values and GPU job template expose
what GPU jobs need, and the local stack (infra/local/stack.py) comes up, stays up on a second
``up``, reports its health and leaves nothing running after ``down``."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
STACK_CLI = INFRA / "local" / "stack"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")


def _stack():
    """infra/local/stack.py as loaded by tests/services.py (imported lazily: the other test
    modules register ``services`` as a pytest plugin first)."""
    from services import stack

    return stack


# --------------------------------------------------------------------------- compose


def _compose(*args: str, env_file: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed (apt-get install docker-compose; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "S3_"))}
    return subprocess.run([binary, "--env-file", str(env_file), "-f", str(INFRA / "compose.yaml"), *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip


def test_compose_validates_with_the_example_env():
    res = _compose("config", env_file=INFRA / ".env.example")
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)
    services = cfg["services"]
    assert set(services) >= {"postgres", "s3", "buckets", "mlflow", "prefect-server", "work-pools", "worker-cpu",
                             "worker-gpu"}  # fmt: skip
    assert services["s3"]["image"].startswith("quay.io/minio/minio:RELEASE.")
    assert services["buckets"]["image"].startswith("quay.io/minio/mc:RELEASE.")
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "buckets": {"condition": "service_completed_successfully"}}  # fmt: skip
    assert services["worker-cpu"]["depends_on"]["work-pools"] == {"condition": "service_completed_successfully"}
    for name in ("postgres", "s3", "mlflow", "prefect-server"):
        assert services[name]["healthcheck"]["test"], name
    (gpu,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "--pool" in services["worker-gpu"]["command"] and "gpu" in services["worker-gpu"]["command"]
    assert services["worker-gpu"]["build"]["dockerfile"] == "infra/docker/Dockerfile.train"
    assert services["worker-cpu"]["build"]["dockerfile"] == "infra/docker/Dockerfile.flows"
    # Both databases are created by the init script; the secrets came from the env file only.
    init = (INFRA / "postgres" / "init-databases.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and "CREATE DATABASE prefect" in init
    assert "change-me" not in (INFRA / "compose.yaml").read_text()


def test_compose_names_a_missing_secret(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    res = _compose("config", env_file=empty)
    assert res.returncode != 0
    assert "set POSTGRES_PASSWORD in infra/.env" in res.stderr or "set S3_ACCESS_KEY in infra/.env" in res.stderr


def test_dockerfiles_build_from_the_repo_root():
    train = (INFRA / "docker" / "Dockerfile.train").read_text()
    flows = (INFRA / "docker" / "Dockerfile.flows").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", train, re.M)
    assert re.search(r"^FROM python:3\.11-slim\S*", flows, re.M)
    for text in (train, flows):
        assert "COPY pyproject.toml" in text and "install" in text


# --------------------------------------------------------------------------- Kubernetes


def test_helm_values_point_the_worker_at_the_gpu_pool():
    values = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    worker = values["worker"]
    assert worker["config"]["workPool"] == "gpu" and worker["config"]["type"] == "kubernetes"
    assert worker["apiConfig"] == "server"
    assert worker["serverApiConfig"]["apiUrl"].endswith("/api")
    assert "kubernetes" in worker["image"]["prefectTag"]


def _render(template: dict, overrides: dict) -> dict:
    """The job configuration with the variables' defaults and ``overrides`` filled in by Prefect's
    own templating (what a worker does for a flow run)."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in props.items() if "default" in spec}
    return apply_values(template["job_configuration"], {**values, **overrides})


def test_gpu_job_template_exposes_gpus_node_selector_and_tolerations():
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    props = template["variables"]["properties"]
    assert props["gpus"]["type"] == "integer" and props["gpus"]["default"] == 1
    assert props["node_selector"]["type"] == "object" and props["tolerations"]["type"] == "array"

    # Every placeholder refers to a declared job variable.
    text = json.dumps(template["job_configuration"])
    assert set(PLACEHOLDER.findall(text)) <= set(props)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"

    tolerate = [{"key": "gpu-pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
    cfg = _render(template, {"gpus": 4, "node_selector": {"pool": "a100"}, "tolerations": tolerate,
                             "image": "registry.example.com/detailfusion-train:1"})  # fmt: skip
    pod = cfg["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4  # an integer, not a string
    assert container["image"] == "registry.example.com/detailfusion-train:1"
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == tolerate
    assert PLACEHOLDER.search(json.dumps(cfg["job_manifest"])) is None

    defaults = _render(template, {})["job_manifest"]["spec"]["template"]["spec"]
    assert defaults["tolerations"][0]["key"] == "nvidia.com/gpu"


# --------------------------------------------------------------------------- local stack: errors


def test_unknown_service_is_one_clear_error(tmp_path):
    with pytest.raises(_stack().StackError, match=r"unknown service\(s\) mlfow; choose from postgres,s3,mlflow"):
        _stack().up(tmp_path / "home", ["mlfow"])


def test_busy_port_names_the_service_and_port(tmp_path):
    home = tmp_path / "home"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        home.mkdir()
        (home / "stack.json").write_text(json.dumps({"ports": {"s3": port}, "services": ["s3"]}))
        with pytest.raises(_stack().StackError, match=rf"s3: port {port} on 127.0.0.1 is already in use"):
            _stack().up(home, ["s3"])
    assert not (home / "run").exists()  # nothing was started


def test_missing_postgres_binaries_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(_stack().svc, "postgres_bin", lambda: None)
    with pytest.raises(_stack().StackError, match=r"postgres: .*run `apt-get install postgresql`"):
        _stack().up(tmp_path / "home", ["postgres"])


def test_broken_state_file_is_named(tmp_path):
    (tmp_path / "stack.json").write_text("{oops")
    res = subprocess.run([str(STACK_CLI), "status", "--home", str(tmp_path)], capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"error: {tmp_path / 'stack.json'}: not valid JSON "
                                               f"(Expecting property name enclosed in double quotes: line 1 column 2 "
                                               f"(char 1)); fix or delete it"]  # fmt: skip


def test_strays_are_only_this_homes_processes_and_kill_strays_spares_the_rest(tmp_path):
    """Processes carry their stack home in the environment: ``kill_strays`` stops exactly those
    not in a known process group (and not their descendants), never another program."""
    home, other = tmp_path / "home", tmp_path / "other"
    env = {**os.environ, _stack().proc.HOME_VAR: str(home)}
    mine = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    known = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
    theirs = subprocess.Popen(["sleep", "60"], env={**os.environ, _stack().proc.HOME_VAR: str(other)})
    unmarked = subprocess.Popen(["sleep", "60"])
    try:
        assert _stack().proc.strays(home, groups={known.pid}) == [mine.pid]
        assert sorted(_stack().proc.strays(home)) == sorted([mine.pid, known.pid])
        assert _stack().proc.strays(other) == [theirs.pid]
        assert _stack().proc.kill_strays(home) == sorted([mine.pid, known.pid])
        assert mine.wait(timeout=10) == -9 and known.wait(timeout=10) == -9
        assert theirs.poll() is None and unmarked.poll() is None
    finally:
        for proc in (mine, known, theirs, unmarked):
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_a_service_that_dies_names_its_log(tmp_path):
    home = tmp_path / "home"
    _stack().Stack(home).save()
    state = json.loads((home / "stack.json").read_text())
    state["settings"]["mlflow_backend"] = "bogus-scheme://nowhere"
    (home / "stack.json").write_text(json.dumps(state))
    try:
        res = subprocess.run([str(STACK_CLI), "up", "--home", str(home), "--services", "mlflow"],
                             capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    finally:
        _stack().down(home)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: mlflow: exited with code") and line.endswith(f"see {home / 'logs' / 'mlflow.log'}")
    assert "bogus-scheme" in (home / "logs" / "mlflow.log").read_text()


# --------------------------------------------------------------------------- local stack: full


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_naming(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text in cmdline and state != "Z":
                found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_full_stack_up_twice_status_workers_and_clean_down(tmp_path):
    from services import skip_reason

    reason = skip_reason(None)
    if reason:
        pytest.skip(reason)
    home = tmp_path / "stack-home"
    try:
        _up_twice_check_and_down(home)
    finally:  # also after a failure: no process and no PostgreSQL cluster left behind
        _stack().down(home, purge=True)


def _up_twice_check_and_down(home: Path) -> None:
    try:
        first = _stack().up(home)
        pids = {p["name"]: p["pid"] for p in first["processes"]}
        assert set(pids) == {"postgres", "s3", "mlflow", "prefect", "worker-cpu", "worker-gpu"}
        assert first["healthy"], first

        # A second up keeps everything as it is.
        second = _stack().up(home)
        assert {p["name"]: p["pid"] for p in second["processes"]} == pids and second["healthy"]

        # The CLI agrees: exit code 0 and the same processes as JSON.
        res = subprocess.run([str(STACK_CLI), "status", "--home", str(home), "--json"], capture_output=True,
                             text=True, timeout=120, check=False)  # fmt: skip
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert {p["name"]: p["pid"] for p in report["processes"]} == pids and report["strays"] == []

        env = _stack().read_env(home)
        assert env["DVC_REMOTE_URL"] == "s3://detailfusion/dvc" and env["PREFECT_HOME"] == str(home / "prefect")
        # A worker of each pool is online; the gpu pool runs one flow at a time.
        for pool in ("cpu", "gpu"):
            workers = _post(f"{env['PREFECT_API_URL']}/work_pools/{pool}/workers/filter", {})
            assert [w["status"] for w in workers if w["name"] == f"local-{pool}"] == ["ONLINE"]
        with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/work_pools/gpu", timeout=10) as resp:
            gpu_pool = json.loads(resp.read())
        assert gpu_pool["type"] == "process" and gpu_pool["concurrency_limit"] == 1
        # The bucket exists on the S3 endpoint; MLflow answers and keeps data in PostgreSQL.
        s3 = _stack().svc.s3_client(_stack().Stack(home))
        assert "detailfusion" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
        assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"]
        made = _post(f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/create", {"name": "infra-check"})
        assert made["experiment_id"]
        import psycopg2

        st = _stack().Stack(home)
        con = psycopg2.connect(host="127.0.0.1", port=st.port("postgres"), user="postgres", dbname="mlflow")
        try:
            with con.cursor() as cur:
                cur.execute("select name from experiments where name = 'infra-check'")
                assert cur.fetchall() == [("infra-check",)]
        finally:
            con.close()
        pg_dir = st.settings["pg_dir"]
    finally:
        _stack().down(home)

    for name, pid in pids.items():
        assert not _group_alive(pid), f"{name} (process group {pid}) still running"
    assert _processes_naming(str(home)) == [] and _processes_naming(pg_dir) == []
    assert _stack().proc.strays(home) == []
    assert not list((home / "run").glob("*.pid"))
    after = _stack().status(home)
    assert not after["healthy"] and all(not p["running"] for p in after["processes"])
    _stack().down(home, purge=True)  # idempotent; deletes the data, keeps the logs
    assert sorted(p.name for p in home.iterdir()) == ["logs"] and not Path(pg_dir).exists()
