"""The ``registry:`` section of ``params.yaml``: model naming and the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RegistryConfig:
    """Which registered model a data set's versions go to and when a challenger becomes champion."""

    model_name: str
    # Validation metric the gate compares, as the evaluate stage names it (``Avg``, ``Rsub@1``...).
    metric: str
    greater_is_better: bool
    # The challenger must beat the champion by MORE than this (in the metric's units).
    min_margin: float
    # A promotion lock older than this is considered abandoned (its holder crashed) and broken.
    lock_timeout_s: float
    # How long a promotion waits for another one to release the lock before giving up.
    lock_wait_s: float
    # Registry calls are retried with exponential backoff (backoff_s, 2*backoff_s, ...), each
    # attempt waiting at most timeout_s for the server.
    retries: int
    backoff_s: float
    timeout_s: float

    def validate(self) -> None:
        if "{dataset}" not in self.model_name:
            raise ValueError(f"model_name must contain '{{dataset}}', got {self.model_name!r}")
        if any(c in self.model_name for c in "/:"):
            raise ValueError(f"model_name must not contain '/' or ':' (MLflow), got {self.model_name!r}")
        if self.min_margin < 0:
            raise ValueError("min_margin must be >= 0")
        if self.lock_timeout_s <= 0 or self.lock_wait_s < 0:
            raise ValueError("lock_timeout_s must be > 0 and lock_wait_s >= 0")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0")

    def name_for(self, dataset: str) -> str:
        return self.model_name.format(dataset=dataset)
