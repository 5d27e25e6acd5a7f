"""How this process talks HTTP to the MLflow server: MLflow's own retries, configured once.

MLflow's REST client retries a failed request itself (connection errors and the statuses 408,
429, 500, 502, 503, 504) with exponential backoff, and reads its policy from three documented
settings: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` (whole
seconds: the waits are 0, 2x, 4x... the factor plus up to 1 s of jitter) and
``MLFLOW_HTTP_REQUEST_TIMEOUT`` (seconds per attempt). :func:`configure_http` sets them from a
``params.yaml`` section's ``retries`` / ``backoff_s`` / ``timeout_s`` (``tracking`` or
``registry``; their defaults are the same), so every MLflow call of the process, including the
system-metrics sampler and ``models:/`` loads, follows one policy. A setting already in the
environment when the process first configures wins, as ``MLFLOW_TRACKING_URI`` does.

A call that still fails after MLflow's retries is either a rejected request (a bug or bad input:
it propagates) or the store being unavailable (:func:`is_server_error`); the tracking session
turns the latter into the offline record.
"""

from __future__ import annotations

import logging
import math
import os
import threading

from detailfusion.errors import ConfigError, DetailFusionError

log = logging.getLogger(__name__)

ENV_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
ENV_BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
ENV_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
HTTP_SETTINGS = (ENV_MAX_RETRIES, ENV_BACKOFF_FACTOR, ENV_TIMEOUT)
MAX_RETRIES_LIMIT = 10  # MLflow refuses more (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT)
MAX_BACKOFF_LIMIT = 120  # MLflow refuses a larger factor (_MLFLOW_HTTP_REQUEST_MAX_BACKOFF_FACTOR_LIMIT)

# MLflow error codes that mean "the request was wrong", not "the server is unavailable".
CLIENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "NOT_FOUND",
})  # fmt: skip

_lock = threading.Lock()
_external: frozenset[str] | None = None  # settings the environment had before we first configured


def http_settings(retries: int, backoff_s: float, timeout_s: float, *, where: str = "tracking") -> dict[str, str]:
    """The MLflow environment settings for a ``retries`` / ``backoff_s`` / ``timeout_s`` section.

    Raises :class:`~detailfusion.errors.ConfigError` naming ``where`` for values MLflow refuses.
    """
    if not 0 <= retries <= MAX_RETRIES_LIMIT:
        raise ConfigError(f"{where}.retries: {retries} is outside 0..{MAX_RETRIES_LIMIT} (MLflow's limit)")
    if not 0 <= backoff_s <= MAX_BACKOFF_LIMIT:
        raise ConfigError(f"{where}.backoff_s: {backoff_s} is outside 0..{MAX_BACKOFF_LIMIT} (MLflow's limit)")
    if timeout_s <= 0:
        raise ConfigError(f"{where}.timeout_s: must be > 0, got {timeout_s}")
    return {
        ENV_MAX_RETRIES: str(int(retries)),
        ENV_BACKOFF_FACTOR: str(int(round(backoff_s))),  # MLflow reads an integer factor
        ENV_TIMEOUT: str(max(1, math.ceil(timeout_s))),
    }


def configure_http(retries: int, backoff_s: float, timeout_s: float, *, where: str = "tracking") -> None:
    """Set MLflow's HTTP retry policy for this process (see the module docs); cheap when unchanged.

    Settings the environment carried before the first call are left alone.
    """
    global _external
    wanted = http_settings(retries, backoff_s, timeout_s, where=where)
    with _lock:
        if _external is None:
            _external = frozenset(k for k in HTTP_SETTINGS if k in os.environ)
            if _external:
                log.info("MLflow HTTP settings from the environment win over params.yaml: %s", sorted(_external))
        for key, value in wanted.items():
            if key not in _external and os.environ.get(key) != value:
                os.environ[key] = value


class TrackingServerDown(DetailFusionError):
    """A command that needs the tracking server found it unavailable after MLflow's retries."""


def server_down(uri: str, exc: BaseException | str) -> TrackingServerDown:
    """The one-line error a command ends with when the tracking server at ``uri`` is down."""
    problem = exc if isinstance(exc, str) else short_error(exc, limit=200)
    return TrackingServerDown(f"tracking server {uri}: unreachable or failing after retries ({problem})")


def is_server_error(exc: BaseException) -> bool:
    """True when the store is unavailable or failing (transport, 5xx, timeouts), False when it
    rejected the request (MLflow's client error codes) or for any other exception."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code not in CLIENT_ERRORS
    try:
        import requests

        if isinstance(exc, requests.RequestException):
            return True
    except ImportError:  # requests ships with mlflow; keep the check independent of it anyway
        pass
    return isinstance(exc, OSError | TimeoutError)


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of message."""
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"
