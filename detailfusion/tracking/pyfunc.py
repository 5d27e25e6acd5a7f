"""Logging the fused model as an MLflow pyfunc that loads without pickled code.

:func:`log_fused_model` saves the model with ``save_pretrained`` (safetensors + JSON config),
logs it as a *models-from-code* pyfunc whose code is :mod:`detailfusion.tracking.pyfunc_model`
(see there for the input/output contract), with a signature, an input example, the
preprocessing settings and pip requirements pinned to the versions installed now. A batch job
then needs only::

    model = mlflow.pyfunc.load_model("models:/detailfusion-cirr@champion")
    emb = model.predict(pd.DataFrame({"task": [...], "image": [...], "text": [...]}))

The serving environment must have the ``detailfusion`` package installed (``pip install .`` or
its wheel): it is pinned in the requirements and provides ``load_pretrained`` and
``preprocess_bytes``, the same code training and evaluation use.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from detailfusion.errors import DetailFusionError

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from detailfusion.tracking.runs import StageRun

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_BATCH_SIZE = 256

# What the pyfunc imports at load/predict time (directly or through detailfusion).
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "open_clip_torch",
    "timm",
    "transformers",
    "safetensors",
    "pillow",
    "numpy",
    "pandas",
    "pyyaml",
    "detailfusion",
)


def pinned_requirements(packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """``name==version`` for each installed package (the versions this model was built with)."""
    reqs = []
    for name in packages:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise DetailFusionError(
                f"cannot pin serving requirement '{name}': it is not installed in this environment"
            ) from None
    return reqs


def example_image_bytes(size: int = 32, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A small PNG (a coloured square on grey) for input examples and smoke tests."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(img).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def default_input_example() -> pd.DataFrame:
    """One query row and one gallery row, images as PNG bytes."""
    return pd.DataFrame(
        {
            "task": ["query", "gallery"],
            "image": [example_image_bytes(colour=(200, 40, 40)), example_image_bytes(colour=(40, 40, 200))],
            "text": ["make the square blue", None],
        }
    )


def model_signature(embed_dim: int, batch_size: int = DEFAULT_BATCH_SIZE):
    """Inputs ``task`` (str), ``image`` (bytes, or a path/URI string), optional ``text``; output ``[N, D]``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    # `binary` accepts object columns, so bytes and path strings both pass schema enforcement.
    inputs = Schema(
        [
            ColSpec("string", "task"),
            ColSpec("binary", "image"),
            ColSpec("string", "text", required=False),
        ]
    )
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim))])
    params = ParamSchema([ParamSpec("batch_size", "long", batch_size), ParamSpec("image_root", "string", "")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_fused_model(
    model: Any,
    name: str = "model",
    *,
    run: StageRun | str | None = None,
    image_size: int | None = None,
    target_ratio: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_example: pd.DataFrame | None = None,
    registered_model_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> ModelInfo:
    """Log ``model`` (a ``DetailFusionModel``) as a pyfunc without pickled code; returns its ModelInfo.

    ``run``: the :class:`StageRun` (or run id) the model belongs to; default: the active MLflow run.
    ``image_size``/``target_ratio``: the ``preprocess_bytes`` settings, i.e. ``prepare.image_size``
    and ``prepare.target_ratio`` (image size default: the backbone's input size), so served pixels
    equal the evaluation pixel cache. ``registered_model_name`` also registers a version.
    """
    import mlflow

    from detailfusion.models.io import save_pretrained

    run_id = run if isinstance(run, str) or run is None else run.run_id
    if run is not None and not isinstance(run, str):
        if run.run_id is None:
            raise DetailFusionError(
                f"cannot log the model: MLflow tracking at {run.session.tracking_uri} is unreachable "
                f"({run.session.error or 'no run'})"
            )
        mlflow.set_tracking_uri(run.session.tracking_uri)
    image_size = int(image_size or model.backbone.image_size)
    example = default_input_example() if input_example is None else input_example
    settings = {"image_size": image_size, "target_ratio": float(target_ratio), "batch_size": int(batch_size)}
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="detailfusion-model-") as tmp:
            weights = save_pretrained(model, Path(tmp) / "weights")
            active = mlflow.active_run()
            use_run = (
                mlflow.start_run(run_id=run_id)
                if run_id and (active is None or active.info.run_id != run_id)
                else contextlib.nullcontext()
            )
            with use_run:
                return mlflow.pyfunc.log_model(
                    name=name,
                    python_model=str(PYFUNC_MODEL_FILE),
                    artifacts={"weights": str(weights)},
                    model_config=settings,
                    signature=model_signature(model.embed_dim, batch_size),
                    input_example=example,
                    pip_requirements=pinned_requirements(),
                    registered_model_name=registered_model_name,
                    metadata={"variant": model.variant.name, "embed_dim": model.embed_dim, **settings},
                    tags=tags,
                )
    finally:
        model.train(was_training)
