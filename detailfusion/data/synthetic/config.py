"""The ``synthesize:`` section of ``params.yaml`` as typed, validated dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

MAX_QUERIES_PER_SET = 15
MAX_SHARED_FRACTION = 0.3


def _int(name: str, value: object) -> None:
    # Called directly (not through load_section), a config may carry a wrong type; say so plainly.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _positive(name: str, value: int) -> None:
    _int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclass
class CirrSynthConfig:
    """CIRR-format composed queries: counts per split, queries per 6-image set, images shared by sets.

    Real CIRR val has 8.3 queries per set and 24 % of its images in more than one set.
    """

    train_queries: int
    val_queries: int
    test1_queries: int
    queries_per_set: int
    two_edit_fraction: float
    shared_fraction: float

    def validate(self) -> None:
        for name in ("train_queries", "val_queries", "test1_queries"):
            _positive(f"cirr.{name}", getattr(self, name))
        _int("cirr.queries_per_set", self.queries_per_set)
        if not 1 <= self.queries_per_set <= MAX_QUERIES_PER_SET:
            # Queries are pairs of distinct members in one direction: at most 6 * 5 / 2 per set.
            raise ValueError(f"cirr.queries_per_set must be in 1..{MAX_QUERIES_PER_SET}, got {self.queries_per_set}")
        _fraction("cirr.two_edit_fraction", self.two_edit_fraction)
        _fraction("cirr.shared_fraction", self.shared_fraction)
        if self.shared_fraction > MAX_SHARED_FRACTION:
            # A set reuses at most two images of an earlier set, which caps the share near 1/3.
            raise ValueError(f"cirr.shared_fraction must be <= {MAX_SHARED_FRACTION}, got {self.shared_fraction}")


@dataclass
class FiqSynthConfig:
    """FashionIQ-format garment queries per category and split."""

    train_per_category: int
    val_per_category: int
    test_per_category: int
    shared_fraction: float

    def validate(self) -> None:
        for name in ("train_per_category", "val_per_category", "test_per_category"):
            _positive(f"fashioniq.{name}", getattr(self, name))
        _fraction("fashioniq.shared_fraction", self.shared_fraction)


@dataclass
class Ipr2prSynthConfig:
    """IPr2Pr-format (HF parquet) atomic edits."""

    originals: int
    edits_per_original: int
    shards: int

    def validate(self) -> None:
        _positive("ipr2pr.originals", self.originals)
        _positive("ipr2pr.edits_per_original", self.edits_per_original)
        _positive("ipr2pr.shards", self.shards)
        if self.edits_per_original > 12:
            raise ValueError(f"ipr2pr.edits_per_original must be <= 12, got {self.edits_per_original}")
        if self.shards > self.originals:
            raise ValueError(f"ipr2pr.shards ({self.shards}) must not exceed ipr2pr.originals ({self.originals})")
        if self.shards > 99999:
            raise ValueError(f"ipr2pr.shards must be <= 99999, got {self.shards}")


@dataclass
class SynthConfig:
    """Everything the synthetic benchmark generator reads (``params.yaml`` section ``synthesize``; no
    defaults here: ``params.yaml`` holds the values)."""

    seed: int
    image_size: int
    render_scale: int
    cirr: CirrSynthConfig
    fashioniq: FiqSynthConfig
    ipr2pr: Ipr2prSynthConfig

    def validate(self) -> None:
        for name in ("seed", "image_size", "render_scale"):
            _int(name, getattr(self, name))
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.image_size > 1024:
            raise ValueError(f"image_size must be <= 1024 pixels, got {self.image_size}")
        if not 1 <= self.render_scale <= 8:
            raise ValueError(f"render_scale must be in 1..8, got {self.render_scale}")
        for name, cls in (("cirr", CirrSynthConfig), ("fashioniq", FiqSynthConfig), ("ipr2pr", Ipr2prSynthConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self.cirr.validate()
        self.fashioniq.validate()
        self.ipr2pr.validate()
