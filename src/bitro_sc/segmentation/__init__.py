"""Segmentation backends behind `bs.tl.segment` (a registry) and the cell writer.

- :data:`SEGMENTERS`: the registry (``"watershed"``, ``"stardist"``, ``"cellpose"``, ``"file"``);
  any callable ``tile (y, x, 3) uint8 -> label tile (y, x)`` works wherever a name does.
- :class:`Segmenter`: the backend protocol.
- :func:`write_cells`: write a label image or a per-cell record as the contract's cells elements.
- :func:`cell_props`: per-cell shape measures (pixels) of a label image.
"""

from __future__ import annotations

from .._cells import CELL_OBS, PROPS_PX, cell_props, cells_table_obs, shapes_key_for, write_cells
from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "SEGMENTERS": "_base",
    "Segmenter": "_base",
    "HaematoxylinWatershed": "_watershed",
    "segment_image": "_tiling",
    "polygons_to_cells": "_external",
    "read_polygons": "_external",
}

__getattr__, _, _lazy_names = attach(__name__, _EXPORTS)
# the cells contract (write_cells, ...) lives in bitro_sc._cells, shared with bs.io and bs.datasets
__all__ = ["CELL_OBS", "PROPS_PX", "cell_props", "cells_table_obs", "shapes_key_for", "write_cells"]
__all__ += _lazy_names


def __dir__() -> list[str]:
    return sorted(__all__)
