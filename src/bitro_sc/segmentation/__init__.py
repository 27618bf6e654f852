"""Segmentation backends behind `bs.tl.segment` (a registry) and the cell writer.

- :data:`SEGMENTERS`: the registry (``"watershed"``, ``"stardist"``, ``"cellpose"``, ``"file"``);
  any callable ``tile (y, x, 3) uint8 -> label tile (y, x)`` works wherever a name does.
- :class:`Segmenter`: the backend protocol.
- :func:`write_cells`: write a label image or a per-cell record as the contract's cells elements.
- :func:`cell_props`: per-cell shape measures (pixels) of a label image.
"""

from __future__ import annotations

from .._lazy import attach

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

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
