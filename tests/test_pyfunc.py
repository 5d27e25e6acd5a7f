"""The fused model as a pickle-free MLflow pyfunc: logged, registered, promoted, then loaded as
``models:/detailfusion-<dataset>@champion`` in a fresh process that gives the training code's
embeddings; and the ``register`` stage end to end on PostgreSQL + S3 (moto) artifacts."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import params_file
from PIL import Image, ImageDraw

from detailfusion.data.images import preprocess_bytes
from detailfusion.params import repo_section
from detailfusion.registry import ALIAS_CHALLENGER, ALIAS_CHAMPION, promote, register, registry_client
from detailfusion.registry.cli import main as registry_main
from detailfusion.tracking import stage_run
from detailfusion.tracking.pyfunc import log_fused_model

pytest_plugins = ["services"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGE_SIZE, TARGET_RATIO = 64, 1.25
NO_SYSTEM_METRICS = repo_section("tracking", system_metrics=False)

LOAD_SCRIPT = textwrap.dedent(
    """
    import base64, json, sys
    import numpy as np, pandas as pd, mlflow

    model = mlflow.pyfunc.load_model(sys.argv[1])
    spec = json.load(open(sys.argv[2]))
    spec["image"] = [base64.b64decode(v["b64"]) if "b64" in v else v["path"] for v in spec["image"]]
    frame = pd.DataFrame(spec)
    out = model.predict(frame, params={"batch_size": 2, "image_root": sys.argv[4]})
    np.save(sys.argv[3], out)
    print(json.dumps(sorted(m for m in sys.modules if m.startswith("detailfusion"))))
    """
)


@pytest.fixture(scope="module")
def tiny_model():
    from detailfusion.models import create_model

    torch.manual_seed(0)
    return create_model("tiny", "full").eval()


def _image(colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A non-square scene, so targetpad's padding and crop matter."""
    img = Image.new("RGB", size, (90, 90, 90))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w // 5, h // 5, w // 2, h // 2), fill=colour)
    draw.rectangle((w // 2, h // 2, 4 * w // 5, 4 * h // 5), fill=tuple(255 - c for c in colour))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _inputs(folder: Path) -> pd.DataFrame:
    """Queries and gallery images interleaved, as bytes, relative paths, absolute paths and file URIs."""
    folder.mkdir(parents=True, exist_ok=True)
    images = [
        _image((200, 30, 30), (96, 64)),
        _image((30, 200, 30), (64, 128), "JPEG"),
        _image((30, 30, 200), (80, 80)),
        _image((200, 200, 30), (120, 60)),
        _image((200, 30, 200), (50, 90)),
    ]
    (folder / "q-rel.png").write_bytes(images[2])
    (folder / "g-abs.jpg").write_bytes(images[1])
    return pd.DataFrame(
        {
            "task": ["query", "gallery", "query", "gallery", "gallery", "query"],
            "image": [
                images[0],
                images[1],
                "q-rel.png",
                str(folder / "g-abs.jpg"),
                (folder / "g-abs.jpg").as_uri(),
                images[4],
            ],
            "text": ["make the circle blue", None, "remove the square", None, None, "add a second circle"],
        }
    )


def _training_path(model, frame: pd.DataFrame, folder: Path) -> np.ndarray:
    """What training/evaluation compute: preprocess_bytes pixels -> encode_query / encode_target."""

    def raw(value) -> bytes:
        if isinstance(value, bytes):
            return value
        path = Path(value.removeprefix("file://"))
        return (path if path.is_absolute() else folder / path).read_bytes()

    out = np.zeros((len(frame), model.embed_dim), np.float32)
    with torch.no_grad():
        for i, row in frame.iterrows():
            pixels = np.stack([preprocess_bytes(raw(row["image"]), IMAGE_SIZE, TARGET_RATIO)])
            if row["task"] == "query":
                q = model.encode_query(model.preprocess_uint8(pixels), model.tokenize([row["text"]]))["query"]
            else:
                q = model.encode_target(model.preprocess_uint8(pixels))
            out[i] = q[0].numpy()
    return out


def _ranking(emb: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
    queries, gallery = emb[frame["task"] == "query"], emb[frame["task"] == "gallery"]
    return np.argsort(-(queries @ gallery.T), axis=1, kind="stable")


def test_champion_loads_in_a_fresh_process_with_the_training_embeddings(
    tiny_model, mlflow_sqlite_server, tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    monkeypatch.chdir(tmp_path)
    dataset = f"pyf{uuid.uuid4().hex[:8]}"
    with stage_run("register", {}, dataset, variant="full", config=NO_SYSTEM_METRICS) as run:
        info = log_fused_model(tiny_model, run=run, image_size=IMAGE_SIZE, target_ratio=TARGET_RATIO)
    assert tiny_model.training is False
    client = registry_client()
    version = register(info.model_uri, dataset, {"Avg": 42.0}, run.lineage, client=client)
    assert version.run_id == run.run_id
    assert promote(version.name, client=client).promoted

    # No pickled code: the model is its code file, safetensors weights and a JSON config.
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert "artifacts/weights/model.safetensors" in files and "artifacts/weights/config.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))], files
    flavor = mlflow.models.Model.load(str(local)).flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["config"] == {"image_size": IMAGE_SIZE, "target_ratio": TARGET_RATIO, "batch_size": 256}
    requirements = (local / "requirements.txt").read_text().split()
    for package in ("torch", "open_clip_torch", "transformers", "safetensors", "pillow", "numpy", "pandas",
                    "detailfusion"):  # fmt: skip
        assert any(r.startswith(f"{package}==") for r in requirements), (package, requirements)

    frame = _inputs(tmp_path / "images")
    # JSON keeps bytes and path strings apart (a parquet column would turn both into bytes).
    spec = {
        "task": frame["task"].tolist(),
        "image": [{"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else {"path": v} for v in frame["image"]],
        "text": frame["text"].tolist(),
    }
    (tmp_path / "input.json").write_text(json.dumps(spec))
    uri = f"models:/detailfusion-{dataset}@{ALIAS_CHAMPION}"
    res = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, uri, "input.json", "out.npy", str(tmp_path / "images")],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_sqlite_server.url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    modules = json.loads(res.stdout.strip().splitlines()[-1])
    assert "detailfusion.models.io" in modules and "detailfusion.data.images" in modules
    training_code = ("detailfusion.train", "detailfusion.eval", "detailfusion.tracking", "detailfusion.registry")
    assert not [m for m in modules if m.startswith(training_code)], modules

    served = np.load(tmp_path / "out.npy")
    expected = _training_path(tiny_model, frame, tmp_path / "images")
    assert served.shape == (len(frame), tiny_model.embed_dim) and served.dtype == np.float32
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(_ranking(served, frame), _ranking(expected, frame))


def test_pyfunc_rejects_bad_rows_naming_them(tiny_model, mlflow_sqlite_server, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_sqlite_server.url)
    monkeypatch.chdir(tmp_path)
    with stage_run("register", {}, f"bad{uuid.uuid4().hex[:6]}", config=NO_SYSTEM_METRICS) as run:
        info = log_fused_model(tiny_model, run=run, image_size=IMAGE_SIZE, target_ratio=TARGET_RATIO)
    model = mlflow.pyfunc.load_model(info.model_uri)
    good = _image((10, 200, 10), (64, 64))
    cases = [
        (pd.DataFrame({"task": ["gallery", "banana"], "image": [good, good], "text": [None, "x"]}),
         "row 1: task 'banana'"),
        (pd.DataFrame({"task": ["gallery", "gallery"], "image": [good, b"not an image"], "text": [None, None]}),
         "row 1"),
        (pd.DataFrame({"task": ["query"], "image": [good], "text": [None]}), "row 0: a query needs a text"),
        (pd.DataFrame({"task": ["gallery"], "image": [str(tmp_path / "missing.png")], "text": [None]}),
         "missing.png"),
    ]  # fmt: skip
    for frame, message in cases:
        with pytest.raises(Exception, match=message):
            model.predict(frame)
    gallery = pd.DataFrame({"task": ["gallery"], "image": [good], "text": [None]})
    with pytest.raises(Exception, match="batch_size must be >= 1, got 0"):  # never silently the default
        model.predict(gallery, params={"batch_size": 0})


def test_register_stage_end_to_end_on_postgres_and_s3(tiny_model, mlflow_postgres_s3_server, tmp_path, monkeypatch,
                                                      capsys):  # fmt: skip
    """``detailfusion registry publish`` twice: the first version becomes champion, a worse second
    one is refused with the reason; artifacts are in S3, registry rows in PostgreSQL; the champion
    serves the training embeddings."""
    import mlflow
    import psycopg2

    from detailfusion.models.io import save_pretrained

    server = mlflow_postgres_s3_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.chdir(tmp_path)
    dataset = f"e2e{uuid.uuid4().hex[:6]}"
    name = f"detailfusion-{dataset}"
    model_dir = save_pretrained(tiny_model, tmp_path / "models" / "stage3")
    params = params_file(tmp_path / "params.yaml",
        "prepare:\n  image_size: 64\n  target_ratio: 1.25\n"
        "tracking:\n  system_metrics: false\n"
        "registry:\n  metric: Rsub@1\n  min_margin: 0.5\n"
    )  # fmt: skip
    metrics = []
    for i, rsub in enumerate((70.0, 65.0)):
        path = tmp_path / "metrics" / f"eval{i}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"Avg": 50.0 + i, "Rsub@1": rsub, "R@5": 40.0}))
        metrics.append(path)

    common = ["--params", str(params), "--model-dir", str(model_dir), "--dataset", dataset]
    assert registry_main(["publish", *common, "--metrics", str(metrics[0]), "--summary", "s1.json"]) == 0
    first = json.loads((tmp_path / "s1.json").read_text())
    assert first["version"] == "1" and first["promotion"]["decision"] == "promoted"
    capsys.readouterr()
    assert registry_main(["publish", *common, "--metrics", str(metrics[1])]) == 0
    out = capsys.readouterr().out
    assert "REFUSED" in out and "does not beat champion v1 Rsub@1=70.0000" in out

    assert registry_main(["list", "--params", str(params), "--dataset", dataset]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == name and table[1].split()[:3] == ["version", "aliases", "Rsub_at_1"]
    assert table[3].split()[:3] == ["v2", f"@{ALIAS_CHALLENGER}", "65.0000"]
    assert table[4].split()[:3] == ["v1", f"@{ALIAS_CHAMPION}", "70.0000"]

    # The model files went to the S3 bucket through the server (the client has no S3 settings).
    keys = [o["Key"] for o in server.s3.client().list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(k.endswith("artifacts/weights/model.safetensors") for k in keys)
    assert any(k.endswith("/metrics/eval0.json") for k in keys)
    pg = server.postgres
    with psycopg2.connect(host=pg.host, port=pg.port, user=pg.user, dbname="mlflow") as con, con.cursor() as cur:
        cur.execute("select version from model_versions where name = %s order by version", (name,))
        assert [r[0] for r in cur.fetchall()] == [1, 2]
        cur.execute("select alias, version from registered_model_aliases where name = %s order by alias", (name,))
        assert cur.fetchall() == [(ALIAS_CHALLENGER, 2), (ALIAS_CHAMPION, 1)]

    champion = mlflow.pyfunc.load_model(f"models:/{name}@{ALIAS_CHAMPION}")
    frame = _inputs(tmp_path / "images")
    served = champion.predict(frame, params={"image_root": str(tmp_path / "images")})
    np.testing.assert_allclose(served, _training_path(tiny_model, frame, tmp_path / "images"), rtol=0, atol=1e-5)

    run = mlflow.MlflowClient(server.url).get_run(first["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == first["parent_run_id"]
    assert run.data.metrics["Rsub_at_1"] == 70.0 and run.data.tags["promotion.decision"] == "promoted"
