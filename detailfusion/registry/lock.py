"""A mutex held on the MLflow server, so promotions from any process or machine run one at a time.

Creating a registered model is atomic on every MLflow backend: exactly one caller creates
``<name>.promotion-lock``, the others get ``RESOURCE_ALREADY_EXISTS`` and wait. The lock model's
tags say who holds it and since when; a lock older than ``lock_timeout_s`` belongs to a holder
that died and is broken. Only the holder's own token releases it.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from typing import Any

from detailfusion.errors import DetailFusionError
from detailfusion.registry.config import RegistryConfig
from detailfusion.tracking.transport import configure_http

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
TAG_OWNER = "lock.owner"
TAG_ACQUIRED_AT = "lock.acquired_at"
TAG_HOLDER = "lock.holder"
TAG_PURPOSE = "lock.purpose"
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class RegistryError(DetailFusionError):
    """A registry operation cannot proceed (no challenger, lock held too long, unknown model...)."""


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


class PromotionLock:
    """Context manager: ``with PromotionLock(client, name, cfg, purpose="promote"): ...``."""

    def __init__(self, client: Any, model_name: str, cfg: RegistryConfig, purpose: str = "promote"):
        self.client = client
        self.model_name = model_name
        self.name = lock_name(model_name)
        self.cfg = cfg
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.held = False
        configure_http(cfg.retries, cfg.backoff_s, cfg.timeout_s, where="registry")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # MLflow retries a failing server itself (detailfusion.tracking.transport)
        return fn(*args, **kwargs)

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.cfg.lock_wait_s
        delay = 0.05
        while True:
            tags = {
                TAG_OWNER: self.token,
                TAG_ACQUIRED_AT: f"{time.time():.3f}",
                TAG_HOLDER: f"{socket.gethostname()}:{os.getpid()}",
                TAG_PURPOSE: self.purpose,
            }
            try:
                self._call(self.client.create_registered_model, self.name, tags=tags,
                           description=f"Mutex for promotions of {self.model_name}; deleted when released.")  # fmt: skip
                self.held = True
                return
            except MlflowException as exc:
                # "does not exist" is what the server answers when the lock it collided with
                # was released before it could read it back: contention all the same.
                if exc.error_code not in _EXISTS + _MISSING:
                    raise
                # A retried create whose first attempt did succeed reports "exists" too.
                current = self._current()
                if current is not None and (current.tags or {}).get(TAG_OWNER) == self.token:
                    self.held = True
                    return
            holder = self._break_if_stale()
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"registered model '{self.name}' (the promotion lock of {self.model_name}) is held by "
                    f"{holder}; gave up after {self.cfg.lock_wait_s:.0f} s. It is broken automatically after "
                    f"{self.cfg.lock_timeout_s:.0f} s, or delete that registered model if its holder is gone."
                )
            # Jitter spreads the waiters so they do not hit the server in lockstep.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def _current(self) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self._call(self.client.get_registered_model, self.name)
        except MlflowException as exc:
            if exc.error_code in _MISSING:
                return None
            raise

    def _break_if_stale(self) -> str:
        """Delete the lock when its holder has held it longer than ``lock_timeout_s``; returns who holds it."""
        from mlflow.exceptions import MlflowException

        current = self._current()
        if current is None:
            return "nobody (just released)"
        tags = current.tags or {}
        try:
            acquired = float(tags[TAG_ACQUIRED_AT])
        except (KeyError, ValueError):
            acquired = (current.creation_timestamp or 0) / 1000.0
        age = time.time() - acquired
        holder = f"{tags.get(TAG_HOLDER, 'unknown')} ({tags.get(TAG_PURPOSE, '?')}, {age:.0f} s ago)"
        if age <= self.cfg.lock_timeout_s:
            return holder
        # Re-read right before deleting: only break the very lock judged stale, not a fresh one
        # another waiter may have taken in between.
        again = self._current()
        if again is None or (again.tags or {}).get(TAG_OWNER) != tags.get(TAG_OWNER):
            return holder
        log.warning("breaking stale promotion lock %s held by %s", self.name, holder)
        try:
            self._call(self.client.delete_registered_model, self.name)
        except MlflowException as exc:
            if exc.error_code not in _MISSING:
                raise
        return holder

    def release(self) -> None:
        if not self.held:
            return
        from mlflow.exceptions import MlflowException

        self.held = False
        current = self._current()
        if current is None or (current.tags or {}).get(TAG_OWNER) != self.token:
            log.warning("promotion lock %s was no longer ours when releasing (broken as stale?)", self.name)
            return
        try:
            self._call(self.client.delete_registered_model, self.name)
        except MlflowException as exc:
            if exc.error_code not in _MISSING:
                raise

    def __enter__(self) -> PromotionLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
