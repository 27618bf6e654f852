"""Tiled segmentation with overlap and centroid ownership, expressed as dask tasks.

A tile is its *core* (a cell of a regular grid) plus ``overlap_px`` on every side. A nucleus
belongs to the tile whose core contains its centroid, so a nucleus on a core border is kept
exactly once. With an overlap larger than the largest nucleus, an owned nucleus lies entirely
inside its tile and the result does not depend on the tile size (given a segmenter whose output
near a pixel depends only on a neighbourhood smaller than the overlap, as the default one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._cells import PROPS_PX, cell_props

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


@dataclass(frozen=True)
class TissueRaster:
    """A boolean tissue mask sampled every ``scale`` full-resolution pixels."""

    mask: np.ndarray
    scale: float

    def at(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Mask value at full-resolution pixel positions (nearest sample; outside = False)."""
        iy = np.floor(np.asarray(y) / self.scale).astype(np.int64)
        ix = np.floor(np.asarray(x) / self.scale).astype(np.int64)
        h, w = self.mask.shape
        ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        out = np.zeros(iy.shape, bool)
        out[ok] = self.mask[iy[ok], ix[ok]]
        return out

    def any_in(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        s = self.scale
        sub = self.mask[
            int(np.floor(y0 / s)) : int(np.ceil(y1 / s)) + 1, int(np.floor(x0 / s)) : int(np.ceil(x1 / s)) + 1
        ]
        return bool(sub.any())

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The mask over a full-resolution window (nearest upsampling)."""
        ys = np.minimum((np.arange(y0, y1) / self.scale).astype(np.int64), self.mask.shape[0] - 1)
        xs = np.minimum((np.arange(x0, x1) / self.scale).astype(np.int64), self.mask.shape[1] - 1)
        return self.mask[np.ix_(ys, xs)]


def tile_grid(height: int, width: int, tile_px: int, overlap_px: int) -> list[tuple[int, ...]]:
    """Tiles as ``(cy0, cy1, cx0, cx1, y0, y1, x0, x1)``: core and extent (half-open, pixels)."""
    tiles: list[tuple[int, ...]] = []
    for cy0 in range(0, height, tile_px):
        cy1 = min(cy0 + tile_px, height)
        for cx0 in range(0, width, tile_px):
            cx1 = min(cx0 + tile_px, width)
            tiles.append(
                (
                    cy0,
                    cy1,
                    cx0,
                    cx1,
                    max(cy0 - overlap_px, 0),
                    min(cy1 + overlap_px, height),
                    max(cx0 - overlap_px, 0),
                    min(cx1 + overlap_px, width),
                )
            )
    return tiles


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_segmenter(backend: Callable[..., Any], tile: np.ndarray, *, mpp: float, **kwargs: Any) -> np.ndarray:
    """Call a backend on one tile and check its output."""
    if _accepts(backend, "mpp"):
        kwargs["mpp"] = mpp
    out = np.asarray(backend(tile, **kwargs))
    if out.shape != tile.shape[:2]:
        raise ValueError(
            f"The segmentation method returned an array of shape {out.shape} for a tile of shape "
            f"{tile.shape[:2]}; it must return a (y, x) label image of the tile's size."
        )
    if out.dtype.kind not in "iu":
        if out.dtype.kind == "b":
            from scipy import ndimage as ndi

            out = ndi.label(out)[0]
        else:
            raise TypeError(
                f"The segmentation method returned dtype {out.dtype}; it must return integer labels."
            )
    return out


def run_tile(
    chw: np.ndarray,
    *,
    backend: Callable[..., Any],
    mpp: float,
    core: tuple[int, int, int, int],
    origin: tuple[int, int],
    tissue: TissueRaster | None,
    kwargs: dict[str, Any],
    keep_labels: bool,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Segment one tile; return the owned cells (full-image pixels) and their label crop."""
    rgb = np.moveaxis(np.asarray(chw), 0, -1)  # a (y, x, 3) view, no copy
    if rgb.dtype != np.uint8:
        if np.issubdtype(rgb.dtype, np.floating) and rgb.size and float(rgb.max()) <= 1.0:
            rgb = rgb * 255.0
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    offset = (float(origin[0]), float(origin[1]))
    binned = getattr(backend, "labels_binned", None)
    if callable(binned) and not keep_labels:  # measured on the binned labels: the same numbers
        small, f = binned(rgb, mpp=mpp, **kwargs)
        props = cell_props(small, offset_px=offset, block=int(f), shape=rgb.shape[:2])
    else:
        labels = call_segmenter(backend, rgb, mpp=mpp, **kwargs)
        props = cell_props(labels, offset_px=offset)
    cy0, cy1, cx0, cx1 = core
    y, x = props["y_px"].to_numpy(), props["x_px"].to_numpy()
    own = (y >= cy0) & (y < cy1) & (x >= cx0) & (x < cx1)
    if tissue is not None:
        own &= tissue.at(y, x)
    props = props.loc[own].reset_index(drop=True)
    crop = None
    if keep_labels:
        lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint32)
        lut[props["cell_id"].to_numpy()] = np.arange(1, len(props) + 1, dtype=np.uint32)
        crop = lut[labels]
    props["cell_id"] = np.arange(1, len(props) + 1, dtype=np.int64)
    return props, crop


def segment_image(
    image: Any,
    backend: Callable[..., Any],
    *,
    mpp: float,
    tile_px: int,
    overlap_px: int,
    tissue: TissueRaster | None = None,
    kwargs: dict[str, Any] | None = None,
    return_labels: bool = False,
    progress: bool = True,
    batch_size: int | None = None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Segment a ``(c, y, x)`` RGB image tile by tile through dask.

    Returns the per-cell record (pixel units, :data:`~bitro_sc.segmentation.PROPS_PX`, ids
    ``1..n`` in tile order) and, when ``return_labels``, the full label image (uint32). Tiles with
    no tissue are skipped; cells whose centroid is off tissue are dropped. Tiles are computed in
    batches of ``batch_size`` (default: twice the dask worker count) with the active dask
    scheduler, so memory stays bounded by a few tiles (plus the label image when requested).
    """
    import dask
    import dask.array as da
    import pandas as pd
    from tqdm.auto import tqdm

    arr = getattr(image, "data", image)
    if not isinstance(arr, da.Array):
        arr = da.from_array(np.asarray(arr), chunks=(3, 4096, 4096))
    _, height, width = arr.shape
    multiple = getattr(backend, "tile_multiple", None)
    m = max(1, int(multiple(mpp))) if callable(multiple) else 1
    tile_px = max(m, round(tile_px / m) * m)
    overlap_px = int(np.ceil(max(0, overlap_px) / m)) * m
    tiles = tile_grid(height, width, tile_px, overlap_px)
    if tissue is not None:
        tiles = [t for t in tiles if tissue.any_in(*t[4:])]
    kwargs = dict(kwargs or {})
    labels = np.zeros((height, width), np.uint32) if return_labels else None
    if batch_size is None:
        import os

        batch_size = 2 * (os.cpu_count() or 1)
    frames: list[pd.DataFrame] = []
    next_id = 1
    run = dask.delayed(run_tile, pure=False)
    with tqdm(total=len(tiles), desc="segment", unit="tile", disable=not progress) as bar:
        for start in range(0, len(tiles), batch_size):
            batch = tiles[start : start + batch_size]
            tasks = [
                run(
                    arr[:, y0:y1, x0:x1],
                    backend=backend,
                    mpp=mpp,
                    core=(cy0, cy1, cx0, cx1),
                    origin=(y0, x0),
                    tissue=tissue,
                    kwargs=kwargs,
                    keep_labels=return_labels,
                )
                for (cy0, cy1, cx0, cx1, y0, y1, x0, x1) in batch
            ]
            results = dask.compute(*tasks)
            for (_, _, _, _, y0, y1, x0, x1), (props, crop) in zip(batch, results, strict=True):
                n = len(props)
                if n:
                    props["cell_id"] = props["cell_id"].to_numpy() + (next_id - 1)
                    frames.append(props)
                    if labels is not None and crop is not None:
                        view = labels[y0:y1, x0:x1]
                        sel = crop > 0
                        view[sel] = crop[sel] + np.uint32(next_id - 1)
                    next_id += n
            bar.update(len(batch))
    if frames:
        props = pd.concat(frames, ignore_index=True)
    else:
        props = pd.DataFrame({c: np.zeros(0, np.int64 if c == "cell_id" else np.float64) for c in PROPS_PX})
    return props, labels
