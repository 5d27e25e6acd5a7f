"""Reading a stage's metrics JSON as the flat numbers MLflow and the registry take."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detailfusion.config import flatten


def read_metrics_json(path: str | Path) -> dict[str, float]:
    """The finite numbers of a metrics JSON file, nested keys joined with ``/``.

    A missing or malformed file raises :class:`~detailfusion.errors.DataFormatError` naming it.
    """
    from detailfusion.errors import DataFormatError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(path, "metrics file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, f"top level must be an object, got {type(data).__name__}")
    return {
        k.replace(".", "/"): float(v)
        for k, v in flatten(data).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
