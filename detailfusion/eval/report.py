"""A self-contained HTML page of example retrievals, for eyeballing what a model gets right and wrong.

Each :class:`ReportSample` becomes one ``<section class="sample">`` block: the reference image,
the caption, the top-k results with names and scores, the target outlined and labelled (or a
"target not in top-k" note), and the adaptive compositor's branch weights when known. Images are
embedded as base64 PNG data URIs, so the file can be attached to an MLflow run or mailed as is;
every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from detailfusion.eval.metrics import EvalInputError
from detailfusion.fsutil import write_text_atomic

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.sample { border-top: 1px solid #ccc; padding: 0.8em 0; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: 11px; width: 104px; word-break: break-all; }
figure img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
             border: 4px solid transparent; }
figure.reference img { border-color: #888; }
figure.target img { border-color: #1a9c3a; }
.label { font-weight: bold; color: #1a9c3a; }
.caption { font-size: 15px; margin: 0.3em 0 0.6em; }
.miss { color: #b3261e; font-weight: bold; }
.weights { font-size: 12px; color: #555; }
"""


@dataclass
class ReportSample:
    """One query to show: reference image (uint8 ``H x W x 3``), caption and ranked results.

    ``result_names``, ``result_scores`` and ``result_images`` are parallel, best first.
    ``target`` is ``None`` on splits without labels; ``branch_weights`` is ``(w_gm, w_di)``.
    """

    query_id: str
    reference_image: np.ndarray
    caption: str
    result_names: list[str]
    result_scores: list[float]
    result_images: list[np.ndarray]
    target: str | None = None
    reference_name: str | None = None
    branch_weights: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)


def image_data_uri(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` for a uint8 ``H x W x 3`` array."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise EvalInputError(f"report image must be uint8 H x W x 3, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_retrieval_report(samples: Sequence[ReportSample], title: str) -> str:
    """The report as an HTML string (see :func:`write_retrieval_report`)."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(samples)} queries.</p>",
    ]
    for sample in samples:
        parts.append(_render_sample(sample))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_retrieval_report(path: str | Path, samples: Sequence[ReportSample], title: str) -> Path:
    """Write the self-contained HTML report to ``path`` (atomically) and return the path."""
    return write_text_atomic(path, render_retrieval_report(samples, title))


def _render_sample(s: ReportSample) -> str:
    esc = html.escape
    n = len(s.result_names)
    if len(s.result_scores) != n or len(s.result_images) != n:
        raise EvalInputError(
            f"report query {s.query_id!r}: {n} result names, {len(s.result_scores)} scores, "
            f"{len(s.result_images)} images"
        )
    ref_label = "reference" if s.reference_name is None else f"reference<br>{esc(s.reference_name)}"
    figures = [
        f'<figure class="reference"><img src="{image_data_uri(s.reference_image)}" '
        f'alt="reference"><figcaption>{ref_label}</figcaption></figure>'
    ]
    for rank, (name, score, image) in enumerate(
        zip(s.result_names, s.result_scores, s.result_images, strict=True), start=1
    ):
        is_target = s.target is not None and name == s.target
        label = '<br><span class="label">target</span>' if is_target else ""
        figures.append(
            f'<figure class="{"result target" if is_target else "result"}">'
            f'<img src="{image_data_uri(image)}" alt="{esc(name)}">'
            f"<figcaption>#{rank} {esc(name)}<br>{float(score):.4f}{label}</figcaption></figure>"
        )
    lines = [
        f'<section class="sample" id="query-{esc(s.query_id)}">',
        f"<h2>query {esc(s.query_id)}</h2>",
        f'<p class="caption">{esc(s.caption)}</p>',
    ]
    if s.branch_weights is not None:
        w_gm, w_di = s.branch_weights
        lines.append(f'<p class="weights">branch weights: w_gm = {w_gm:.3f}, w_di = {w_di:.3f}</p>')
    if s.target is not None and s.target not in s.result_names:
        lines.append(f'<p class="miss">target not in top-{n}: {esc(s.target)}</p>')
    lines.extend(f"<p>{esc(note)}</p>" for note in s.notes)
    lines.append(f'<div class="row">{"".join(figures)}</div>')
    lines.append("</section>")
    return "\n".join(lines)
