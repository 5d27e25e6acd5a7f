"""The DetailFusion embedder as an MLflow *models-from-code* pyfunc (this file is the model's code).

MLflow copies this file into the logged model and executes it at load time; nothing is pickled.
The weights travel as the ``weights`` artifact (``config.json`` + ``model.safetensors`` from
``save_pretrained``) and are rebuilt with ``load_pretrained``; preprocessing settings come from
the model config MLflow stores next to it. The ``detailfusion`` package must be installed in the
serving environment (it is one of the model's pip requirements); only its model and image code
is imported, never the training code.

Input: a DataFrame, one row per item to embed:

* ``task``: ``"query"`` (reference image + modification text -> fused query embedding) or
  ``"gallery"`` (a candidate image -> target embedding);
* ``image``: encoded image bytes, or a path / URI string (local path, ``file://``, or any URI
  fsspec opens, e.g. ``s3://``); relative paths resolve against the ``image_root`` param;
* ``text``: the modification text (queries only; ignored for gallery rows).

Output: float32 array ``[rows, D]``, unit-norm rows, in input order. Params: ``batch_size``,
``image_root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

TASKS = ("query", "gallery")


class DetailFusionEmbedder(PythonModel):
    """Embeds composed queries and gallery images with a saved DetailFusion model."""

    def load_context(self, context: Any) -> None:
        import torch

        from detailfusion.models.io import load_pretrained

        settings = context.model_config or {}
        self.image_size = int(settings["image_size"])
        self.target_ratio = float(settings["target_ratio"])
        self.default_batch_size = int(settings.get("batch_size", 256))
        self.model = load_pretrained(context.artifacts["weights"]).eval()
        self._torch = torch

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        batch_size = int(params.get("batch_size") or self.default_batch_size)
        if batch_size < 1:
            raise ValueError(f"params.batch_size must be >= 1, got {batch_size}")
        image_root = str(params.get("image_root") or "")
        frame = pd.DataFrame(model_input)
        missing = [c for c in ("task", "image") if c not in frame.columns]
        if missing:
            raise ValueError(f"model input is missing column(s) {missing}; expected task, image[, text]")
        tasks = frame["task"].astype(str).str.lower().to_numpy()
        bad = [i for i, t in enumerate(tasks) if t not in TASKS]
        if bad:
            raise ValueError(f"row {bad[0]}: task {frame['task'].iloc[bad[0]]!r} is not one of {list(TASKS)}")
        texts = frame["text"].tolist() if "text" in frame.columns else [None] * len(frame)

        out = np.zeros((len(frame), self.model.embed_dim), dtype=np.float32)
        for task in TASKS:
            rows = np.flatnonzero(tasks == task)
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                pixels = np.stack([self._pixels(frame["image"].iloc[i], i, image_root) for i in chunk])
                if task == "query":
                    captions = []
                    for i in chunk:
                        if not isinstance(texts[i], str):
                            raise ValueError(f"row {i}: a query needs a text (got {texts[i]!r})")
                        captions.append(texts[i])
                    out[chunk] = self._encode_queries(pixels, captions)
                else:
                    out[chunk] = self._encode_gallery(pixels)
        return out

    # The two encoders mirror detailfusion.eval.evaluate.embed_queries / embed_images exactly.
    def _encode_queries(self, pixels: np.ndarray, captions: list[str]) -> np.ndarray:
        with self._torch.no_grad():
            tokens = self.model.tokenize(captions)
            query = self.model.encode_query(self.model.preprocess_uint8(pixels), tokens)["query"]
        return query.float().cpu().numpy()

    def _encode_gallery(self, pixels: np.ndarray) -> np.ndarray:
        with self._torch.no_grad():
            return self.model.encode_target(self.model.preprocess_uint8(pixels)).float().cpu().numpy()

    def _pixels(self, value: Any, row: int, image_root: str) -> np.ndarray:
        from detailfusion.data.images import preprocess_bytes

        source = f"row {row}"
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif isinstance(value, str) and value:
            source = f"row {row} ({value})"
            data = _read_uri(value, image_root, source)
        else:
            raise ValueError(f"row {row}: image must be bytes or a path/URI string, got {type(value).__name__}")
        return preprocess_bytes(data, self.image_size, self.target_ratio, source=source)


def _read_uri(uri: str, image_root: str, source: str) -> bytes:
    if "://" in uri and not uri.startswith("file://"):
        import fsspec

        try:
            with fsspec.open(uri, "rb") as handle:
                return handle.read()
        except Exception as exc:  # fsspec backends raise their own error types
            raise ValueError(f"{source}: cannot read image: {type(exc).__name__}: {exc}") from None
    path = Path(uri.removeprefix("file://"))
    if not path.is_absolute() and image_root:
        if "://" in image_root and not image_root.startswith("file://"):
            return _read_uri(image_root.rstrip("/") + "/" + uri, "", source)
        path = Path(image_root.removeprefix("file://")) / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{source}: cannot read image file {path}: {exc.strerror or exc}") from None


mlflow.models.set_model(DetailFusionEmbedder())
