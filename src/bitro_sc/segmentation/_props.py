"""Per-cell shape measures from a label image, vectorised (numpy + a small numba kernel).

All measures are in pixels here; :func:`~bitro_sc.segmentation.write_cells` converts them to µm.
Conventions follow :func:`skimage.measure.regionprops` where they can be computed from moments
(centroid, area, axis lengths, eccentricity, orientation); the perimeter and the convex hull are
estimated as documented in :func:`cell_props`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

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


def cell_props(labels: np.ndarray, *, offset_px: tuple[float, float] = (0.0, 0.0)) -> pd.DataFrame:
    """Shape measures of every labelled object, in pixels.

    Parameters
    ----------
    labels
        ``(y, x)`` integer label image, 0 = background; each positive value one cell.
    offset_px
        ``(y, x)`` of the label image's top-left pixel in the full image; added to the centroids.

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
    from ._kernels import label_moments  # numba, compiled once and cached on disk

    nmax = int(lab.max(initial=0))
    if nmax <= 0:
        return pd.DataFrame({c: np.zeros(0, np.int64 if c == "cell_id" else np.float64) for c in PROPS_PX})
    if lab.min() < 0:
        raise ValueError("A label image must not have negative values.")
    if nmax > 4 * lab.size + 1024:  # sparse huge ids: compact them first
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
