"""Readers that return SpatialData following the bitro_sc data contract."""

from __future__ import annotations

import importlib
from typing import Any

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "read_visium": "_visium",
    "read_st": "_st",
    "read_hest": "_hest",
    "read_wsi": "_wsi",
    "read_bulk": "_bulk",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
