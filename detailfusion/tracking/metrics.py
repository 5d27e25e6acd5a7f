"""Reading a stage's metrics JSON as the flat numbers MLflow and the registry take."""

from __future__ import annotations

import math
from pathlib import Path

from detailfusion.config import flatten
from detailfusion.fsutil import read_json_object


def read_metrics_json(path: str | Path) -> dict[str, float]:
    """The finite numbers of a metrics JSON file, nested keys joined with ``/``.

    A missing or malformed file raises :class:`~detailfusion.errors.DataFormatError` naming it.
    """
    data = read_json_object(path, missing="metrics file not found")
    return {
        k.replace(".", "/"): float(v)
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
