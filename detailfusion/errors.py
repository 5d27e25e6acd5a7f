"""Error types that carry the file, the record and the problem, for messages a user can act on."""

from __future__ import annotations

from pathlib import Path


class DetailFusionError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(DetailFusionError):
    """A params file or config section is missing, malformed or holds a wrong value."""


class DataFormatError(DetailFusionError):
    """A data set file is structurally broken (malformed JSON, missing keys, duplicate ids...)."""

    def __init__(self, path: str | Path, problem: str, record: str | int | None = None):
        self.path = Path(path)
        self.problem = problem
        self.record = record
        where = f"{self.path}"
        if record is not None:
            where += f" (record {record})"
        super().__init__(f"{where}: {problem}")


class ValidationFailed(DetailFusionError):
    """A data validation suite found violations; the message is a readable summary."""
