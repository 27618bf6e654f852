"""The encoder interface behind :func:`bitro_sc.tl.cell_features`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd
    import xarray as xr


@runtime_checkable
class CellEncoder(Protocol):
    """Turns the cells of one slide into one feature vector per cell.

    An encoder streams over the slide itself (tiles, batches), so memory stays bounded by a tile,
    and bundles its own preprocessing (input size, normalisation).

    Parameters of :meth:`encode`
    ----------------------------
    image
        Full-resolution H&E, ``(c, y, x)`` RGB, dask- or numpy-backed.
    cells
        The cells table's ``obs`` (one row per cell, in table order) with at least ``x_px``, ``y_px``
        (centroid, full-resolution pixels), ``cell_id`` and ``area_um2``.
    mpp
        Pixel size of ``image`` in µm per pixel.
    fov_um
        Side of the square field of view around each cell, in µm.
    labels
        Nucleus label image ``(y, x)`` on the image's pixel grid (value = ``cell_id``), or ``None``.

    Returns ``(features, names)``: a ``(n_cells, n_features)`` float32 array (NaN where a value
    could not be measured) and one name per feature.
    """

    name: str

    def encode(
        self,
        image: xr.DataArray,
        cells: pd.DataFrame,
        *,
        mpp: float,
        fov_um: float,
        labels: xr.DataArray | None = None,
        batch_size: int = 256,
        device: str | None = None,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[str]]: ...
