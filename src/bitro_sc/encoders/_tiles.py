"""Streaming over a slide in tiles: bounded memory, each cell handled by the tile owning its centroid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr


@dataclass(frozen=True)
class Tile:
    """One tile: the pixel window read (core + margin, clipped to the image) and the cells it owns.

    ``y0, x0`` is the top-left pixel of the window in full-resolution image pixels; ``cells`` are
    positional indices (into the cells table) of the cells whose centroid lies in the tile's core.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    cells: np.ndarray


def iter_tiles(
    shape_yx: tuple[int, int],
    x_px: np.ndarray,
    y_px: np.ndarray,
    *,
    tile_px: int,
    margin_px: int,
) -> Iterator[Tile]:
    """Tiles of ``tile_px`` (core) plus ``margin_px`` on each side that own at least one cell.

    Every cell is owned by exactly one tile (the one whose core contains its centroid, after
    clipping the centroid into the image), so a cell on a tile border is processed once. Tiles
    without cells (glass) are never read.
    """
    h, w = shape_yx
    if len(x_px) == 0:  # no cells: nothing to read
        return
    tile_px = max(int(tile_px), 1)
    ty = np.clip(np.floor(np.asarray(y_px, dtype=np.float64)).astype(np.int64), 0, h - 1) // tile_px
    tx = np.clip(np.floor(np.asarray(x_px, dtype=np.float64)).astype(np.int64), 0, w - 1) // tile_px
    n_tx = (w + tile_px - 1) // tile_px
    tid = ty * n_tx + tx
    order = np.argsort(tid, kind="stable")
    uniq, starts = np.unique(tid[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for t, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist(), strict=True):
        iy, ix = divmod(t, n_tx)
        y0 = max(iy * tile_px - margin_px, 0)
        x0 = max(ix * tile_px - margin_px, 0)
        y1 = min((iy + 1) * tile_px + margin_px, h)
        x1 = min((ix + 1) * tile_px + margin_px, w)
        yield Tile(y0=y0, y1=y1, x0=x0, x1=x1, cells=order[s:e])


def read_rgb(image: xr.DataArray, tile: Tile) -> np.ndarray:
    """The tile window of a ``(c, y, x)`` image as a ``(y, x, 3)`` uint8 array (computes dask)."""
    block = image.data[:, tile.y0 : tile.y1, tile.x0 : tile.x1]
    arr = np.asarray(block.compute() if hasattr(block, "compute") else block)
    arr = np.moveaxis(arr, 0, -1)
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_labels(labels: xr.DataArray, tile: Tile) -> np.ndarray:
    """The tile window of a ``(y, x)`` label image as a numpy array."""
    block = labels.data[tile.y0 : tile.y1, tile.x0 : tile.x1]
    return np.asarray(block.compute() if hasattr(block, "compute") else block)


def n_owning_tiles(shape_yx: tuple[int, int], x_px: np.ndarray, y_px: np.ndarray, *, tile_px: int) -> int:
    """How many tiles :func:`iter_tiles` will yield (for a progress bar)."""
    h, w = shape_yx
    ty = np.clip(np.floor(np.asarray(y_px, dtype=np.float64)).astype(np.int64), 0, h - 1) // tile_px
    tx = np.clip(np.floor(np.asarray(x_px, dtype=np.float64)).astype(np.int64), 0, w - 1) // tile_px
    return int(np.unique(ty * ((w + tile_px - 1) // tile_px) + tx).size)
