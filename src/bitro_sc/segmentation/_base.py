"""The segmenter protocol and registry."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._registry import Registry
from ._external import CellposeSegmenter, FileSegmenter, StarDistSegmenter
from ._watershed import HaematoxylinWatershed


@runtime_checkable
class Segmenter(Protocol):
    """A nucleus segmentation backend.

    A segmenter is called on one RGB tile and returns a label tile of the same height and width
    (integer, 0 = background, one positive value per nucleus; values need not be consecutive).
    ``mpp`` is the tile's pixel size in µm/px. Any callable with this signature works; a plain
    function ``f(tile) -> labels`` works too (``segment`` passes ``mpp`` only when accepted).

    Optional attributes, used when present:

    - ``min_mpp`` (float): the coarsest pixel size (µm/px) the method can resolve nuclei at;
      ``segment`` raises a clear error on coarser images (default 2.0 µm/px).
    - ``max_diameter_um`` (float): the largest nucleus diameter; tiles overlap by at least this.
    - ``calibrate(rgb, *, mpp, mask) -> dict``: fitted once per slide on sample tissue pixels;
      the returned keyword arguments are passed to every tile call, so that every tile uses the
      same rule (e.g. one threshold) and the result does not depend on the tiling.
    """

    def __call__(self, tile: np.ndarray, *, mpp: float, **kwargs: Any) -> np.ndarray: ...


def _builtin_segmenters() -> Registry[Any]:
    reg: Registry[Any] = Registry("segmentation method")
    reg.register("watershed", HaematoxylinWatershed())
    reg.register("stardist", StarDistSegmenter())
    reg.register("cellpose", CellposeSegmenter())
    reg.register("file", FileSegmenter())
    return reg


#: registered segmentation methods: ``"watershed"`` (default, no weights), ``"stardist"`` and
#: ``"cellpose"`` (optional extras, local model path), ``"file"`` (polygons from HEST / CellViT /
#: HoVer-Net GeoJSON or parquet). Register more with ``SEGMENTERS.register(name, backend)``.
SEGMENTERS = _builtin_segmenters()
