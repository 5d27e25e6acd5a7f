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

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

TASKS = ("query", "gallery")


class DetailFusionEmbedder(PythonModel):
    """Embeds composed queries and gallery images with a saved DetailFusion model."""

    def load_context(self, context: Any) -> None:
        from detailfusion.models.io import load_pretrained

        settings = context.model_config or {}
        self.image_size = int(settings["image_size"])
        self.target_ratio = float(settings["target_ratio"])
        self.default_batch_size = int(settings.get("batch_size", 256))
        self.model = load_pretrained(context.artifacts["weights"]).eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        params = params or {}
        raw = params.get("batch_size")
        batch_size = self.default_batch_size if raw is None else int(raw)  # 0 is an error, not "default"
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

    # The same encoders as evaluation, the stage-3 cache and batch retrieval.
    def _encode_queries(self, pixels: np.ndarray, captions: list[str]) -> np.ndarray:
        from detailfusion.retrieval.embed import encode_queries

        return encode_queries(self.model, pixels, captions, keys=("query",))["query"].numpy()

    def _encode_gallery(self, pixels: np.ndarray) -> np.ndarray:
        from detailfusion.retrieval.embed import encode_images

        return encode_images(self.model, pixels).numpy()

    def _pixels(self, value: Any, row: int, image_root: str) -> np.ndarray:
        from detailfusion.retrieval.embed import pixels_from_bytes

        source = f"row {row}"
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif isinstance(value, str) and value:
            source = f"row {row} ({value})"
            data = _read_uri(value, image_root, source)
        else:
            raise ValueError(f"row {row}: image must be bytes or a path/URI string, got {type(value).__name__}")
        return pixels_from_bytes(data, self.image_size, self.target_ratio, source=source)


def _read_uri(uri: str, image_root: str, source: str) -> bytes:
    from detailfusion.retrieval.storage import StorageError, is_remote, join, local_path, read_bytes

    if not is_remote(uri) and not local_path(uri).is_absolute() and image_root:
        uri = join(image_root, str(local_path(uri)))
    try:
        return read_bytes(uri)
    except StorageError as exc:
        raise ValueError(f"{source}: cannot read image: {exc}") from None


mlflow.models.set_model(DetailFusionEmbedder())
