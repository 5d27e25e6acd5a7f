"""Deterministic synthetic detail benchmark, written in the native CIRR / FashionIQ / IPr2Pr formats.

``generate(cfg, out)`` draws object scenes and garments with Pillow and writes them exactly as
the real data sets lie on disk, so the same readers, validation, metrics and submission writers
run on synthetic and real data. See ``docs/synthetic-benchmark.md`` for the design,
its reasons and its known biases, and the per-module docstrings for the details.
"""

from detailfusion.data.synthetic.config import CirrSynthConfig, FiqSynthConfig, Ipr2prSynthConfig, SynthConfig
from detailfusion.data.synthetic.garments import FIQ_EDITS
from detailfusion.data.synthetic.generate import generate
from detailfusion.data.synthetic.scenes import DETAIL_EDITS, EDIT_TYPES, GLOBAL_EDITS

__all__ = [
    "DETAIL_EDITS",
    "EDIT_TYPES",
    "FIQ_EDITS",
    "GLOBAL_EDITS",
    "CirrSynthConfig",
    "FiqSynthConfig",
    "Ipr2prSynthConfig",
    "SynthConfig",
    "generate",
]
