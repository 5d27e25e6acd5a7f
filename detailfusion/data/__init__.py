"""Data: native-format readers, the synthetic benchmark, preprocessing and canonical manifests.

``READERS`` maps a format name to its reader; each returns a :class:`NativeDataset` holding the
canonical ``queries`` and ``images`` frames (see ``manifest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from detailfusion.data.cirr import read_cirr
from detailfusion.data.fashioniq import read_fashioniq
from detailfusion.data.ipr2pr import Ipr2prColumns, read_ipr2pr
from detailfusion.data.native import NativeDataset
from detailfusion.errors import ConfigError

READERS: dict[str, Callable[..., NativeDataset]] = {
    "cirr": read_cirr,
    "fashioniq": read_fashioniq,
    "ipr2pr": read_ipr2pr,
}


def get_reader(name: str) -> Callable[..., NativeDataset]:
    """The reader for format ``name``; an unknown name raises a ConfigError listing the formats."""
    if name not in READERS:
        raise ConfigError(f"unknown data set format {name!r}; known: {sorted(READERS)}")
    return READERS[name]


__all__ = [
    "READERS",
    "Ipr2prColumns",
    "NativeDataset",
    "get_reader",
    "read_cirr",
    "read_fashioniq",
    "read_ipr2pr",
]
