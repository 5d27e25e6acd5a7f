"""The data sections of ``params.yaml`` (``data``, ``prepare``, ``validate``) as typed dataclasses.

They live apart from the stage code (pandas, pyarrow, Great Expectations) so the CLI can read and
check all of ``params.yaml`` before importing anything heavy. Fields have no defaults:
``params.yaml`` is the only place where a value is written down (:mod:`detailfusion.params`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detailfusion.data.manifest import DATASETS


@dataclass
class DataSection:
    """``params.yaml: data``: where the native-format data sets live (``cirr/``, ``fashioniq/``...)."""

    root: Path


@dataclass
class PrepareConfig:
    """``params.yaml: prepare``."""

    out: Path
    datasets: list[str]
    image_size: int
    target_ratio: float
    max_image_pixels: int
    # Decoding processes; 0 = auto: 2 for large galleries on machines with >= 4 cores, else 1
    # (on 2 cores the pool's transfer overhead outweighs decoding small images in parallel).
    workers: int

    def validate(self) -> None:
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ValueError(f"datasets: unknown {unknown}; allowed: {list(DATASETS)}")
        if not self.datasets:
            raise ValueError("datasets: empty list")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"datasets: duplicates in {self.datasets}")
        if self.image_size < 8:
            raise ValueError(f"image_size: must be >= 8, got {self.image_size}")
        if self.target_ratio < 1.0:
            raise ValueError(f"target_ratio: must be >= 1.0, got {self.target_ratio}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels: must be positive, got {self.max_image_pixels}")
        if self.workers < 0:
            raise ValueError(f"workers: must be >= 0, got {self.workers}")


@dataclass
class ValidateConfig:
    """``params.yaml: validate``."""

    prepared: Path
    report_dir: Path
    # Share of gallery images (per data set) allowed in quarantine; real FashionIQ needs ~0.02.
    max_quarantined_fraction: float
    max_caption_words: int
    min_image_side: int
    max_image_side: int

    def validate(self) -> None:
        """Raise ValueError when a value makes no sense."""
        if not 0.0 <= self.max_quarantined_fraction <= 1.0:
            raise ValueError(
                f"max_quarantined_fraction: must be in [0, 1], got {self.max_quarantined_fraction}"
            )
        if self.max_caption_words < 1:
            raise ValueError(f"max_caption_words: must be >= 1, got {self.max_caption_words}")
        if self.min_image_side < 1:
            raise ValueError(f"min_image_side: must be >= 1, got {self.min_image_side}")
        if self.max_image_side < self.min_image_side:
            raise ValueError(
                f"max_image_side: ({self.max_image_side}) must be >= min_image_side ({self.min_image_side})"
            )
