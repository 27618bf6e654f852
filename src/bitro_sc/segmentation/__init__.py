"""Segmentation backends behind `bs.tl.segment` (a registry) and the cell writer.

- :data:`SEGMENTERS`: the registry (``"watershed"``, ``"stardist"``, ``"cellpose"``, ``"file"``);
  any callable ``tile (y, x, 3) uint8 -> label tile (y, x)`` works wherever a name does.
- :class:`Segmenter`: the backend protocol.
- :func:`write_cells`: write a label image or a per-cell record as the contract's cells elements.
- :func:`cell_props`: per-cell shape measures (pixels) of a label image.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "SEGMENTERS": "_base",
    "Segmenter": "_base",
    "HaematoxylinWatershed": "_watershed",
    "segment_image": "_tiling",
    "polygons_to_cells": "_external",
    "read_polygons": "_external",
    "write_cells": "_write",
    "cells_table_obs": "_write",
    "shapes_key_for": "_write",
    "CELL_OBS": "_write",
    "cell_props": "_props",
    "PROPS_PX": "_props",
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
