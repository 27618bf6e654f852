"""`bs.tl.assign_cells`: each cell to the spot whose disc contains it."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from .. import _keys as K
from .. import _sdata

#: recorded as the writer of the assignment
WRITER = "bs.tl.assign_cells"

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData


def spot_discs_um(sdata: SpatialData, spots_key: str = K.SPOTS) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Spot centres ``(n, 2)`` as (x, y) µm, radii (µm) and spot ids of a circles shapes element."""
    from spatialdata.transformations import get_transformation

    spots = _sdata.require(
        sdata,
        spots_key,
        kind="shapes",
        step="read the data with `bs.io.read_visium` / `bs.io.read_st` / `bs.io.read_hest`, which write the "
        "spots, or pass `spots_key=`",
    )
    if "radius" not in spots.columns:
        raise ValueError(f"Shapes {spots_key!r} are not circles (no 'radius' column); spots must be circles.")
    transforms = get_transformation(spots, get_all=True)
    if K.MICRON_CS not in transforms:
        raise ValueError(
            f"Shapes {spots_key!r} have no transformation to the {K.MICRON_CS!r} coordinate system, so their "
            "size in µm is unknown; read the data with `bs.io.read_*`, which records it."
        )
    m = transforms[K.MICRON_CS].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    xy = np.column_stack([spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()])
    centres = xy @ m[:2, :2].T + m[:2, 2]
    scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    radii = spots["radius"].to_numpy(dtype=np.float64) * scale
    return centres, radii, spots.index


def assign_cells(
    sdata: SpatialData,
    *,
    spots_key: str = K.SPOTS,
    cells_key: str = K.CELLS,
    key_added: str = K.SPOT_ID,
    overwrite: bool = False,
) -> None:
    """Assign each cell to the spot whose disc contains its centroid.

    Distances are in µm (cell centroids ``obs["x_um"]``/``["y_um"]``; spot centres and radii mapped to
    µm with the spots' transformation). Where discs overlap, the spot with the nearest centre wins;
    a cell in no disc gets a missing value. Spot centres are indexed in a KD-tree, so the cost is
    ``O(n_cells log n_spots)``.

    Parameters
    ----------
    sdata
        Slide with a cells table (``bs.tl.segment``) and a circles shapes element of spots.
    spots_key
        Shapes element of the spots (index = spot id, ``radius`` in pixels of the image).
    cells_key
        Cells table.
    key_added
        ``obs`` column written.
    overwrite
        Replace an existing ``obs[key_added]`` (or ``uns["bitro_assign"]``) that the user or another
        function wrote; what ``assign_cells`` wrote before is replaced anyway (a re-run).

    Returns
    -------
    ``None``. Writes to ``sdata.tables[cells_key]``:

    - ``obs[key_added]``: spot id (nullable ``Int64``; ``<NA>`` for a cell outside every spot — use
      ``.fillna(-1)`` for a plain integer column);
    - ``uns["bitro_assign"]``: ``spots_key``, ``key_added``, ``n_assigned``, ``n_unassigned``, and per
      spot ``spot_ids`` / ``n_cells`` (cells per spot, 0 for an empty spot, in the spots' order).

    Warns when no cell falls in any spot (usually coordinates that do not match, e.g. a pixel size
    that differs between the image and the spots).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> bs.tl.segment(sdata, progress=False)
    >>> bs.tl.assign_cells(sdata)
    >>> cells = sdata.tables["cells"]
    >>> in_spot = int((cells.obs["spot_id"] >= 0).sum())  # the others lie between spots
    >>> 0 < in_spot < cells.n_obs
    True
    """
    import pandas as pd
    from scipy.spatial import cKDTree

    table = _sdata.require(sdata, cells_key, kind="tables", step="run `bs.tl.segment` first")
    written = (
        _sdata.part_key(cells_key, "obs", key_added),
        _sdata.part_key(cells_key, "uns", K.ASSIGN_PARAMS),
    )
    _sdata.check_free(
        sdata,
        written[0],
        exists=key_added in table.obs.columns,
        overwrite=overwrite,
        writer=WRITER,
        what="column",
    )
    _sdata.check_free(
        sdata,
        written[1],
        exists=K.ASSIGN_PARAMS in table.uns,
        overwrite=overwrite,
        writer=WRITER,
        what="record",
    )
    centres, radii, spot_ids = spot_discs_um(sdata, spots_key)
    cells_xy = _sdata.cell_centroids_um(table, cells_key=cells_key)
    n = len(cells_xy)
    best = np.full(n, -1, dtype=np.int64)
    if n and len(centres):
        k = int(min(8, len(centres)))
        dist, idx = cKDTree(centres).query(cells_xy, k=k, distance_upper_bound=float(radii.max()))
        dist, idx = dist.reshape(n, k), idx.reshape(n, k)
        valid = idx < len(centres)
        inside = valid & (dist <= radii[np.where(valid, idx, 0)])
        first = np.argmax(inside, axis=1)  # neighbours come sorted by distance: nearest containing disc
        hit = inside[np.arange(n), first]
        best[hit] = idx[np.arange(n), first][hit]

    assigned = best >= 0
    ids = np.asarray(spot_ids)
    column = pd.array(np.where(assigned, ids[np.maximum(best, 0)], 0), dtype="Int64")
    column[~assigned] = pd.NA
    table.obs[key_added] = pd.Series(column, index=table.obs.index)
    counts = np.bincount(best[assigned], minlength=len(ids)).astype(np.int64)
    table.uns[K.ASSIGN_PARAMS] = {
        "spots_key": spots_key,
        "key_added": key_added,
        "n_assigned": int(assigned.sum()),
        "n_unassigned": int((~assigned).sum()),
        "spot_ids": ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str),
        "n_cells": counts,
    }
    _sdata.record_writer(sdata, WRITER, *written)
    if n and not assigned.any():
        warnings.warn(
            f"No cell of {cells_key!r} falls inside any spot of {spots_key!r}: the cells span "
            f"x {cells_xy[:, 0].min():.0f}–{cells_xy[:, 0].max():.0f} µm, the spots "
            f"x {centres[:, 0].min() if len(centres) else np.nan:.0f}–"
            f"{centres[:, 0].max() if len(centres) else np.nan:.0f} µm. Check that the image and the spots "
            "share a pixel size (`mpp`) and coordinate frame.",
            UserWarning,
            stacklevel=2,
        )
