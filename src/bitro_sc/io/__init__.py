"""Readers that return SpatialData following the bitro_sc data contract."""

from __future__ import annotations

from .._lazy import attach

# public name -> private module that defines it; loaded on first access (fast `import bitro_sc`)
_EXPORTS = {
    "read_visium": "_visium",
    "read_st": "_st",
    "read_hest": "_hest",
    "read_wsi": "_wsi",
    "read_bulk": "_bulk",
    "read_zarr": "_zarr",
    "write_zarr": "_zarr",
    "to_rgb_uint8": "_common",
}

__getattr__, __dir__, __all__ = attach(__name__, _EXPORTS)
