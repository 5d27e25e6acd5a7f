"""The one place that turns images and captions into DetailFusion embeddings.

Evaluation, the stage-3 branch cache, the logged MLflow pyfunc and the batch retrieval job all
call these functions, so a gallery image or a composed query gets the same vector everywhere:

* :func:`encode_images` / :func:`encode_queries`: one batch of uint8 pixels (``[B, H, W, 3]``,
  numpy or torch, as ``prepare`` caches them or :func:`pixels_from_bytes` decodes them) ->
  float32 CPU tensors. Target side: ``normalize(pooled image)``; query side: the fused query and
  the per-branch outputs.
* :func:`embed_gallery` / :func:`embed_queries`: batched over rows of the pixel cache, with a
  progress bar.
* :func:`pixels_from_bytes`: encoded image bytes -> the cache's pixels (``targetpad`` at the
  prepare size), through :mod:`detailfusion.data.images`, the decoder ``prepare`` uses.

This module imports only the model-side code (never training or evaluation), so the pyfunc
can use it in a serving environment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from detailfusion.data.pixels import blank_pixels, gather_pixels

# What evaluation keeps of a query's encoding: fused query, branch outputs, AFC weights.
QUERY_KEYS = ("query", "gm", "di", "weights")
# What the stage-3 cache keeps: unfused branch outputs and their token sequences.
BRANCH_KEYS = ("gm", "di", "gm_tokens", "di_tokens")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": None, "float32": None}


def autocast_dtype(name: str | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` -> the torch dtype to autocast to; None/``"fp32"`` -> None (full precision)."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"embedding dtype {name!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _as_uint8_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw


@torch.no_grad()
def encode_images(model, raw: np.ndarray | torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> unit target embeddings, float32 on the CPU ``[B, D]``.

    ``dtype`` (bf16/fp16) runs the encoder under autocast (GPU batch jobs); None = full precision.
    """
    device = model_device(model)
    with _autocast(device, dtype):
        x = model.preprocess_uint8(_as_uint8_tensor(raw).to(device))
        return model.encode_target(x).float().cpu()


@torch.no_grad()
def encode_queries(
    model,
    raw: np.ndarray | torch.Tensor,
    texts: Sequence[str] | torch.Tensor,
    *,
    keys: Sequence[str] = QUERY_KEYS,
    fuse: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor | None]:
    """Reference pixels + captions (or their tokens) -> ``{key: float32 CPU tensor or None}``.

    ``fuse=False`` stops after the branches (``model.branch_outputs``), as the stage-3 cache
    needs; a key the variant does not produce maps to None.
    """
    device = model_device(model)
    tokens = texts if isinstance(texts, torch.Tensor) else model.tokenize(list(texts))
    with _autocast(device, dtype):
        ref = model.preprocess_uint8(_as_uint8_tensor(raw).to(device))
        tokens = tokens.to(device)
        out = model.encode_query(ref, tokens) if fuse else model.branch_outputs(ref, tokens)
    return {k: (None if out.get(k) is None else out[k].float().cpu()) for k in keys}


def embed_gallery(model, pixels, index: np.ndarray, batch_size: int = 256, progress: bool = False,
                  desc: str = "gallery", dtype: torch.dtype | None = None) -> np.ndarray:
    """Unit target embeddings ``float32 [len(index), D]`` of the cached images ``pixels[index]``."""
    model.eval()
    index = np.asarray(index, dtype=np.int64)
    out = []
    for s in tqdm(range(0, len(index), batch_size), desc=desc, disable=not progress):
        out.append(encode_images(model, gather_pixels(pixels, index[s : s + batch_size]), dtype=dtype))
    return torch.cat(out).numpy() if out else np.zeros((0, model.embed_dim), np.float32)


def embed_queries(model, pixels, ref_index: np.ndarray | None, texts: list[str], batch_size: int = 256,
                  progress: bool = False, blank_reference: bool = False,
                  dtype: torch.dtype | None = None) -> dict[str, np.ndarray | None]:
    """Fused and per-branch query embeddings of cached references + captions.

    ``blank_reference`` replaces every reference by a mean-colour image (the text-only query).
    Returns ``{"query", "gm", "di", "weights"}`` arrays (None where the variant has no such output).
    """
    model.eval()
    parts: dict[str, list] = {k: [] for k in QUERY_KEYS}
    size = pixels.shape[1]
    for s in tqdm(range(0, len(texts), batch_size), desc="queries", disable=not progress):
        stop = min(s + batch_size, len(texts))
        if blank_reference:
            raw = blank_pixels(model.backbone.mean, stop - s, size)
        else:
            raw = gather_pixels(pixels, ref_index[s:stop])
        out = encode_queries(model, raw, texts[s:stop], dtype=dtype)
        for k in QUERY_KEYS:
            parts[k].append(out[k])
    return {k: (None if not v or v[0] is None else torch.cat(v).numpy()) for k, v in parts.items()}


def pixels_from_bytes(data: bytes, size: int, target_ratio: float, source: str | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[size, size, 3]`` exactly as ``prepare`` caches them.

    Raises :class:`detailfusion.data.images.ImageDecodeError` (naming ``source``) for bytes that
    do not decode.
    """
    from detailfusion.data.images import preprocess_bytes

    return preprocess_bytes(data, size, target_ratio, source=source)
