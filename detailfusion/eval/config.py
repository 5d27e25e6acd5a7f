"""The ``evaluate:`` section of ``params.yaml`` (kept apart from the torch-heavy evaluation code so
``params.yaml`` is checked before anything heavy is imported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvaluateConfig:
    """The ``evaluate:`` params section (no defaults: ``params.yaml`` holds them)."""

    split: str
    batch_size: int
    bootstrap: int
    report_samples: int
    report_top_k: int
    out_metrics: str
    out_plots: str
    out_reports: str
    seed: int

    def validate(self) -> None:
        for name in ("batch_size", "bootstrap", "report_top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.report_samples < 0:
            raise ValueError(f"report_samples: must be >= 0, got {self.report_samples}")
