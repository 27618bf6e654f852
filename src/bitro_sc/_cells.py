"""The cells contract: per-cell record, cells table and the writer used by every cell source.

Segmentation backends (``bs.tl.segment``), readers with their own segmentation (``bs.io.read_hest``)
and the toy slides (``bs.datasets.toy``) all write cells here, so the layout of CONTRIBUTING.md
("Cells") is written in one place.

- :data:`PROPS_PX` / :func:`cell_props`: the per-cell record in pixels (from a label image).
- :data:`CELL_OBS` / :func:`cells_table_obs`: the cells table ``obs`` (µm).
- :func:`write_cells`: shapes, table and labels elements of the cells.

Shape measures follow :func:`skimage.measure.regionprops` where they can be computed from moments
(centroid, area, axis lengths, eccentricity, orientation); the perimeter and the convex hull are
estimated as documented in :func:`cell_props`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import _keys as K
from . import _sdata

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from spatialdata import SpatialData

#: columns of the per-cell record in pixel units (the interface between backends and writer)
PROPS_PX = (
    "cell_id",
    "x_px",
    "y_px",
    "area_px",
    "perimeter_px",
    "eccentricity",
    "solidity",
    "major_axis_px",
    "minor_axis_px",
    "orientation",
)


def cell_props(
    labels: np.ndarray,
    *,
    offset_px: tuple[float, float] = (0.0, 0.0),
    block: int = 1,
    shape: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Shape measures of every labelled object, in pixels.

    Parameters
    ----------
    labels
        ``(y, x)`` integer label image, 0 = background; each positive value one cell.
    offset_px
        ``(y, x)`` of the label image's top-left pixel in the full image; added to the centroids.
    block, shape
        ``labels`` is binned: each of its pixels stands for a ``block × block`` square of the
        ``shape`` (y, x) image (cropped at the bottom and right). The measures are those of that
        image, exactly (the same integer sums, edges and hulls), without making it.

    Returns
    -------
    One row per label present, sorted by label, with the columns of :data:`PROPS_PX`:
    ``cell_id`` (the label value), centroid ``x_px``/``y_px`` (pixel-centre convention of
    ``regionprops``), ``area_px`` (pixel count), ``perimeter_px`` (length of the pixel-edge boundary
    times π/4, which is unbiased for discs), ``solidity`` (area / area of the convex hull of the
    pixel squares; 1 for a rectangle), ``major_axis_px``/``minor_axis_px``/``eccentricity``/
    ``orientation`` (radians) from second moments as in ``regionprops``. Empty input gives an
    empty frame with these columns.
    """
    import pandas as pd

    if labels.ndim != 2:
        raise ValueError(f"A label image must be 2-D (y, x); got shape {labels.shape}.")
    lab = np.asarray(labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"A label image must have an integer dtype; got {lab.dtype}.")
    from ._cells_kernel import label_moments  # numba: compiled once, cached on disk

    nmax = int(lab.max(initial=0))
    if block > 1:
        bh, bw = lab.shape[0] * block, lab.shape[1] * block
        if shape is None or not (0 < shape[0] <= bh and 0 < shape[1] <= bw):
            raise ValueError(f"`shape` {shape} must be covered by the {lab.shape} labels binned by {block}.")
        full_h, full_w = int(shape[0]), int(shape[1])
        lab = lab[: -(-full_h // block), : -(-full_w // block)]
    if nmax <= 0:
        return pd.DataFrame({c: np.zeros(0, np.int64 if c == "cell_id" else np.float64) for c in PROPS_PX})
    if lab.min() < 0:
        raise ValueError("A label image must not have negative values.")
    if block > 1:
        from ._cells_kernel import label_moments_blocks

        binned = np.ascontiguousarray(lab if lab.dtype.itemsize >= 4 else lab.astype(np.int32))
        stats, hull = label_moments_blocks(binned, nmax, int(block), full_h, full_w)
        present = stats[:, 0] > 0
        present[0] = False
        ids = np.nonzero(present)[0]
        stats, hull = stats[ids], hull[ids]
    elif nmax > 4 * lab.size + 1024:  # sparse huge ids: compact them first
        uniq, inv = np.unique(lab, return_inverse=True)
        compact = inv.reshape(lab.shape).astype(np.int64) + (0 if uniq[0] == 0 else 1)
        ids = uniq[uniq > 0]
        stats, hull = label_moments(compact, len(ids))
        stats, hull = stats[1:], hull[1:]
    else:
        stats, hull = label_moments(lab if lab.dtype.itemsize >= 4 else lab.astype(np.int32), nmax)
        present = stats[:, 0] > 0
        present[0] = False
        ids = np.nonzero(present)[0]
        stats, hull = stats[ids], hull[ids]
    area = stats[:, 0]
    my = stats[:, 1] / area
    mx = stats[:, 2] / area
    cyy = np.maximum(stats[:, 3] / area - my**2, 0.0)
    cxx = np.maximum(stats[:, 4] / area - mx**2, 0.0)
    cxy = stats[:, 5] / area - mx * my
    index = ids.astype(np.int64)
    # eigenvalues of the covariance (regionprops' inertia tensor eigenvalues)
    tr = cyy + cxx
    disc = np.sqrt(np.maximum(((cyy - cxx) / 2) ** 2 + cxy**2, 0.0))
    l1 = np.maximum(tr / 2 + disc, 0.0)
    l2 = np.maximum(tr / 2 - disc, 0.0)
    major = 4 * np.sqrt(l1)
    minor = 4 * np.sqrt(l2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    # regionprops: angle between the row axis and the major axis, in [-pi/2, pi/2]
    tol = 1e-12 * np.maximum(tr, 1.0)
    orientation = np.where(
        np.abs(cxx - cyy) <= tol,
        np.where(cxy > tol, np.pi / 4, np.where(cxy < -tol, -np.pi / 4, 0.0)),
        0.5 * np.arctan2(2 * cxy, cyy - cxx),
    )
    perimeter = stats[:, 6] * (np.pi / 4)  # crack length × π/4
    with np.errstate(invalid="ignore", divide="ignore"):
        solidity = np.where(hull > 0, np.minimum(area / hull, 1.0), 1.0)
    return pd.DataFrame(
        {
            "cell_id": index,
            "x_px": mx + offset_px[1],
            "y_px": my + offset_px[0],
            "area_px": area,
            "perimeter_px": perimeter,
            "eccentricity": ecc,
            "solidity": solidity,
            "major_axis_px": major,
            "minor_axis_px": minor,
            "orientation": orientation,
        }
    )


#: obs columns of the cells table, in order (lengths in µm, areas in µm², angles in radians)
CELL_OBS = (
    K.CELL_ID,
    K.REGION,
    K.X_PX,
    K.Y_PX,
    K.X_UM,
    K.Y_UM,
    K.AREA_UM2,
    "perimeter_um",
    "eccentricity",
    "solidity",
    "major_axis_um",
    "minor_axis_um",
    "orientation",
    K.SAMPLE_ID,
    K.PATIENT_ID,
)


def shapes_key_for(table_key: str) -> str:
    """Name of the cells shapes element that goes with the cells table ``table_key``."""
    return K.CELL_SHAPES if table_key == K.CELLS else f"{table_key}_circles"


def cells_table_obs(props: pd.DataFrame, *, mpp: float, region: str, sdata: SpatialData | None = None):
    """Convert a per-cell record in pixels (:data:`PROPS_PX`) to the cells-table ``obs`` (µm)."""
    import pandas as pd

    missing = [c for c in PROPS_PX if c not in props.columns]
    if missing:
        raise ValueError(
            f"The per-cell record lacks columns {missing}; it needs {list(PROPS_PX)} "
            "(pixel units), as returned by `bitro_sc.segmentation.cell_props`."
        )
    ids = np.asarray(props["cell_id"]).astype(np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("`cell_id` values must be unique (one per cell).")
    if len(ids) and ids.min() < 1:
        raise ValueError("`cell_id` values must be positive integers (0 is the label background).")
    info = _sdata.slide_info(sdata) if sdata is not None else {K.SAMPLE_ID: None, K.PATIENT_ID: None}
    x = np.asarray(props["x_px"], np.float64)
    y = np.asarray(props["y_px"], np.float64)
    obs = pd.DataFrame(
        {
            K.CELL_ID: ids,
            K.REGION: pd.Categorical([region] * len(ids), categories=[region]),
            K.X_PX: x,
            K.Y_PX: y,
            K.X_UM: x * mpp,
            K.Y_UM: y * mpp,
            K.AREA_UM2: np.asarray(props["area_px"], np.float64) * mpp**2,
            "perimeter_um": np.asarray(props["perimeter_px"], np.float64) * mpp,
            "eccentricity": np.asarray(props["eccentricity"], np.float64),
            "solidity": np.asarray(props["solidity"], np.float64),
            "major_axis_um": np.asarray(props["major_axis_px"], np.float64) * mpp,
            "minor_axis_um": np.asarray(props["minor_axis_px"], np.float64) * mpp,
            "orientation": np.asarray(props["orientation"], np.float64),
            K.SAMPLE_ID: pd.Categorical([info[K.SAMPLE_ID] or "sample"] * len(ids)),
            K.PATIENT_ID: pd.Categorical([info[K.PATIENT_ID] or info[K.SAMPLE_ID] or "patient"] * len(ids)),
        },
        index=pd.Index(ids.astype(str), name=None),
    )
    return obs


def write_cells(
    sdata: SpatialData,
    labels_or_props: np.ndarray | pd.DataFrame,
    *,
    mpp: float,
    key_added: str = K.CELLS,
    shapes_key: str | None = None,
    labels_key: str | None = K.CELL_LABELS,
    offset_px: tuple[float, float] = (0.0, 0.0),
    labels: np.ndarray | None = None,
    overwrite: bool = False,
    uns: dict | None = None,
    writer: str = "bs.segmentation.write_cells",
) -> None:
    """Write cells as a shapes element, a table and (optionally) a label image.

    Parameters
    ----------
    sdata
        Modified in place.
    labels_or_props
        Either a ``(y, x)`` integer label image (0 = background, value = ``cell_id``) whose
        measures are computed with :func:`cell_props`, or a per-cell record in pixels with the
        columns of :data:`~bitro_sc.segmentation.PROPS_PX` (centroids in full-image pixels).
    mpp
        Pixel size of the full-resolution image in µm/px.
    key_added
        Name of the cells table (``"cells"``).
    shapes_key
        Name of the shapes element the table annotates; default :func:`shapes_key_for`
        (``"cell_circles"`` for the default table, ``f"{key_added}_circles"`` otherwise).
        spatialdata forbids a shapes element and a table of the same name.
    labels_key
        Name of the labels element, written when a label image is given (as ``labels_or_props``
        or ``labels=``); ``None`` writes no labels.
    offset_px
        ``(y, x)`` of the label image's top-left pixel in the full image (a crop); the label
        element is placed there and the centroids are shifted by it. With a per-cell record the
        centroids are taken as they are (already full-image pixels).
    labels
        A label image to write alongside a per-cell record (its values must be the record's ids).
    overwrite
        Replace existing elements of these names; otherwise an existing name is an error unless
        ``writer`` wrote it (a re-run replaces its own output, see :func:`bitro_sc._sdata.check_free`).
    writer
        The function recorded as the writer of the elements.
    uns
        Stored as ``tables[key_added].uns["bitro_segmentation"]`` (parameters of the run).

    Notes
    -----
    Writes shapes ``shapes_key`` (circles at the centroid with the equivalent radius
    ``sqrt(area / π)`` in pixels, index = ``cell_id``), table ``key_added`` (zero gene columns,
    ``obs`` = :data:`CELL_OBS`, ``obsm["spatial"]`` = centroid in pixels, annotating the shapes:
    ``region`` = ``shapes_key``, instance key ``cell_id``) and labels ``labels_key`` (uint32).
    Every element gets the pixel and micron transformations of
    :func:`bitro_sc._sdata.micron_transformations`. Zero cells give an empty table that
    annotates nothing, no shapes element (spatialdata can store neither an empty shapes element
    nor an empty annotating table) and a warning.
    """
    import anndata as ad
    import pandas as pd
    from spatialdata.models import Labels2DModel, ShapesModel, TableModel

    from ._validate import check_mpp

    mpp = check_mpp(mpp)
    offset = (float(offset_px[0]), float(offset_px[1]))
    if isinstance(labels_or_props, pd.DataFrame):
        props = labels_or_props
        if "cell_id" not in props.columns:
            props = props.assign(cell_id=np.asarray(props.index, np.int64))
    else:
        labels = np.asarray(labels_or_props)
        props = cell_props(labels, offset_px=offset)
    write_labels = labels is not None and labels_key is not None
    shapes_key = shapes_key or shapes_key_for(key_added)
    if shapes_key == key_added:
        raise ValueError(
            f"`shapes_key` and `key_added` are both {key_added!r}; spatialdata needs distinct names."
        )
    written = [key_added, shapes_key, *([labels_key] if write_labels and labels_key is not None else [])]
    for k in written:
        _sdata.check_free(sdata, k, overwrite=overwrite, writer=writer)
    if write_labels and np.asarray(labels).max(initial=0) > np.iinfo(np.uint32).max:
        raise ValueError("Label values do not fit uint32; relabel the cells 1..n first.")
    # replaced (checked above): an element of another kind under the same name would make the object
    # invalid, and the shapes of an earlier run must not outlive it when this run finds no cells
    for k in written:
        if k in sdata:
            del sdata[k]

    obs = cells_table_obs(props, mpp=mpp, region=shapes_key, sdata=sdata)
    n = len(obs)
    transforms = _sdata.micron_transformations(mpp)
    centres = np.stack([obs[K.X_PX].to_numpy(), obs[K.Y_PX].to_numpy()], axis=1).reshape(n, 2)
    radius = np.sqrt(np.asarray(props["area_px"], np.float64) / np.pi)
    if n:
        shapes = ShapesModel.parse(
            centres, geometry=0, radius=radius, index=obs[K.CELL_ID].to_numpy(), transformations=transforms
        )
        shapes.index.name = K.CELL_ID
        sdata.shapes[shapes_key] = shapes
    else:  # spatialdata cannot store an empty shapes element
        warnings.warn(
            f"No cells to write: table {key_added!r} is empty and no shapes element {shapes_key!r} "
            "is written.",
            UserWarning,
            stacklevel=2,
        )

    adata = ad.AnnData(X=np.zeros((n, 0), np.float32), obs=obs)
    # pixels of the image, as on the spot table (squidpy's convention); µm in obs x_um / y_um
    adata.obsm[K.SPATIAL] = np.stack([obs[K.X_PX].to_numpy(), obs[K.Y_PX].to_numpy()], axis=1).reshape(n, 2)
    adata.uns["bitro_segmentation"] = dict(uns or {}) | {"mpp": float(mpp), "n_cells": int(n)}
    if n:
        sdata.tables[key_added] = TableModel.parse(
            adata, region=shapes_key, region_key=K.REGION, instance_key=K.CELL_ID
        )
    else:  # an empty table cannot annotate a region
        sdata.tables[key_added] = TableModel.parse(adata)
    if write_labels:
        lab = np.asarray(labels)
        sdata.labels[labels_key] = Labels2DModel.parse(
            lab.astype(np.uint32, copy=False),
            dims=("y", "x"),
            transformations=_sdata.micron_transformations(mpp, offset_px=offset),
        )
    _sdata.record_writer(sdata, writer, *written)
