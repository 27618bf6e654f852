"""A smoothed field of per-cell values: binned means, Gaussian-smoothed, for whole-slide cell maps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ._geometry import Box

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

#: ``bin_um=None``: the view's long side is cut into this many bins
AUTO_BINS = 150
#: smallest automatic bin (µm): about two cells
MIN_AUTO_BIN_UM = 10.0


def auto_bin_um(view: Box, mpp: float) -> float:
    """Bin size (µm) for ``view`` (pixels): the long side / :data:`AUTO_BINS`, at least 10 µm."""
    long_px = max(view[2] - view[0], view[3] - view[1])
    return max(long_px * mpp / AUTO_BINS, MIN_AUTO_BIN_UM)


def smoothed_field(
    x: np.ndarray, y: np.ndarray, values: np.ndarray, *, view: Box, bin_px: float
) -> tuple[np.ndarray, Box]:
    """Mean of ``values`` per square bin of ``bin_px`` pixels, smoothed with a Gaussian of one bin.

    Normalised convolution: the smoothed sum of values over the smoothed number of cells, so bins
    with few cells are not pulled towards zero. Bins far from any cell (smoothed occupancy < 0.3)
    are ``NaN``. Returns ``(field (ny, nx), extent (x0, y0, x1, y1) in pixels)``.

    Examples
    --------
    >>> import numpy as np
    >>> from bitro_sc.pl._field import smoothed_field
    >>> x = np.repeat(np.arange(10.0), 10); y = np.tile(np.arange(10.0), 10)
    >>> field, extent = smoothed_field(x, y, np.ones(100), view=(0, 0, 10, 10), bin_px=2)
    >>> field.shape, float(np.nanmax(np.abs(field - 1))) < 1e-9
    ((5, 5), True)
    """
    from scipy.ndimage import gaussian_filter

    if bin_px <= 0:
        raise ValueError(f"The bin size must be positive, got {bin_px!r} px.")
    x0, y0 = float(view[0]), float(view[1])
    nx = max(1, math.ceil((view[2] - view[0]) / bin_px))
    ny = max(1, math.ceil((view[3] - view[1]) / bin_px))
    ix = np.floor((np.asarray(x) - x0) / bin_px).astype(np.int64)
    iy = np.floor((np.asarray(y) - y0) / bin_px).astype(np.int64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    total = np.zeros((ny, nx))
    count = np.zeros((ny, nx))
    np.add.at(total, (iy[ok], ix[ok]), v[ok])
    np.add.at(count, (iy[ok], ix[ok]), 1.0)
    smooth_total = gaussian_filter(total, 1.0, mode="constant")
    smooth_count = gaussian_filter(count, 1.0, mode="constant")
    occupied = gaussian_filter((count > 0).astype(np.float64), 1.0, mode="constant") >= 0.3
    with np.errstate(invalid="ignore", divide="ignore"):
        field = np.where(occupied & (smooth_count > 0), smooth_total / smooth_count, np.nan)
    return field, (x0, y0, x0 + nx * bin_px, y0 + ny * bin_px)


def draw_field(ax: Axes, field: np.ndarray, extent: Box, *, cmap: Any, alpha: float) -> Any:
    """Draw a smoothed field (NaN transparent) above the image; returns the image artist."""
    x0, y0, x1, y1 = extent
    return ax.imshow(
        np.ma.masked_invalid(field),
        extent=(x0, x1, y1, y0),
        origin="upper",
        interpolation="nearest",
        cmap=cmap.with_extremes(bad=(0.0, 0.0, 0.0, 0.0)),
        alpha=alpha,
        zorder=2,
    )
