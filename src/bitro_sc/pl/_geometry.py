"""Geometry of the plots: pixel transformations, crops, and spot / cell centres and radii."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .._sdata import get_mpp

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


# --------------------------------------------------------------------------------------------
# transformations
# --------------------------------------------------------------------------------------------
def _to_pixel_affine(element: Any) -> tuple[float, float, float, float]:
    """``(sx, sy, tx, ty)`` mapping an element's own coordinates to the pixel coordinate system.

    Identity when the element has no transformation to :data:`~bitro_sc._keys.PIXEL_CS`.
    Rotations / shears are not supported by the plots (an error says so).
    """
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    t = transforms.get(K.PIXEL_CS) if isinstance(transforms, dict) else None
    if t is None:
        return 1.0, 1.0, 0.0, 0.0
    m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    if abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9:
        raise NotImplementedError(
            "The plots support scale and translation to the pixel coordinate system, not rotation; "
            "transform the element (e.g. `spatialdata.transform`) before plotting."
        )
    return float(m[0, 0]), float(m[1, 1]), float(m[0, 2]), float(m[1, 2])


def resolve_mpp(sdata: SpatialData, image_key: str | None, mpp: float | None) -> float | None:
    """Pixel size (µm/px) from ``mpp=`` or the image; ``None`` when unknown (never guessed)."""
    if mpp is not None:
        return get_mpp(sdata, "", mpp)
    if image_key is None:
        return None
    try:
        return get_mpp(sdata, image_key)
    except ValueError:
        return None


def crop_box_px(crop_um: Sequence[float] | None, mpp: float | None) -> Box | None:
    """``crop_um = (x0, y0, x1, y1)`` in µm → the same box in pixels of the full-resolution image."""
    if crop_um is None:
        return None
    box = tuple(float(v) for v in crop_um)
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(
            f"`crop_um` must be (x_min, y_min, x_max, y_max) in µm with max > min; got {crop_um!r}."
        )
    if mpp is None:
        raise ValueError(
            "`crop_um` needs the image's pixel size, which is unknown. Pass `mpp=` (µm per pixel), or "
            "read the data with `bs.io.read_*`, which records it."
        )
    return box[0] / mpp, box[1] / mpp, box[2] / mpp, box[3] / mpp


def union_box(*boxes: Box | None) -> Box | None:
    """The smallest box holding every given box (``None`` when none is given)."""
    valid = [b for b in boxes if b is not None]
    if not valid:
        return None
    return (
        min(b[0] for b in valid),
        min(b[1] for b in valid),
        max(b[2] for b in valid),
        max(b[3] for b in valid),
    )


# --------------------------------------------------------------------------------------------
# geometry of spots and cells
# --------------------------------------------------------------------------------------------
@dataclass
class Geometry:
    """Centres (pixels of the full-resolution image) and radii (pixels) aligned with table rows."""

    x: np.ndarray
    y: np.ndarray
    r: np.ndarray

    def box(self) -> Box | None:
        if not len(self.x):
            return None
        return (
            float(np.min(self.x - self.r)),
            float(np.min(self.y - self.r)),
            float(np.max(self.x + self.r)),
            float(np.max(self.y + self.r)),
        )

    def in_box(self, box: Box | None) -> np.ndarray:
        if box is None:
            return np.ones(len(self.x), dtype=bool)
        return (
            (self.x + self.r >= box[0])
            & (self.x - self.r <= box[2])
            & (self.y + self.r >= box[1])
            & (self.y - self.r <= box[3])
        )


def _table_attrs(table: AnnData) -> tuple[str | None, str | None]:
    attrs = table.uns.get("spatialdata_attrs", {}) or {}
    region = attrs.get("region")
    if isinstance(region, list | tuple | np.ndarray):
        region = next(iter(region)) if len(region) == 1 else None
    return region, attrs.get("instance_key")


def _shape_geometry(sdata: SpatialData, shapes_key: str, ids: np.ndarray) -> Geometry | None:
    """Circles of a shapes element, reindexed by instance ids; ``None`` if not circles."""
    shapes = sdata.shapes[shapes_key]
    if "radius" not in shapes.columns:
        return None
    sx, sy, tx, ty = _to_pixel_affine(shapes)
    df = shapes.reindex(ids)
    x = df.geometry.x.to_numpy(dtype=float) * sx + tx
    y = df.geometry.y.to_numpy(dtype=float) * sy + ty
    r = df["radius"].to_numpy(dtype=float) * abs(sx)
    return Geometry(x, y, r)


def spot_geometry(sdata: SpatialData, table_key: str) -> Geometry:
    """Spot centres and radii (pixels) in the row order of the spot table."""
    table = sdata.tables[table_key]
    region, instance_key = _table_attrs(table)
    shapes_key = region if region in sdata.shapes else (K.SPOTS if K.SPOTS in sdata.shapes else None)
    instance_key = instance_key or K.SPOT_ID
    if shapes_key is not None:
        ids = table.obs[instance_key].to_numpy() if instance_key in table.obs else np.arange(table.n_obs)
        geo = _shape_geometry(sdata, shapes_key, ids)
        if geo is not None and np.isfinite(geo.x).all():
            return geo
    if K.SPATIAL in table.obsm and shapes_key is not None and "radius" in sdata.shapes[shapes_key]:
        xy = np.asarray(table.obsm[K.SPATIAL], dtype=float)
        r = float(np.median(sdata.shapes[shapes_key]["radius"]))
        return Geometry(xy[:, 0], xy[:, 1], np.full(len(xy), r))
    raise KeyError(
        f"Cannot place the spots of table {table_key!r}: no circles shapes element "
        f"({region or K.SPOTS!r}) annotated by it. Read the data with `bs.io.read_*`, which writes them."
    )


def cell_geometry(sdata: SpatialData, cells_key: str, mpp: float | None) -> Geometry:
    """Cell centroids (pixels) and equivalent radii (pixels) in the row order of the cells table."""
    cells = sdata.tables[cells_key]
    obs = cells.obs
    region, instance_key = _table_attrs(cells)
    if K.X_PX in obs and K.Y_PX in obs:
        x = obs[K.X_PX].to_numpy(dtype=float)
        y = obs[K.Y_PX].to_numpy(dtype=float)
    elif K.SPATIAL in cells.obsm:  # centroid in pixels
        xy = np.asarray(cells.obsm[K.SPATIAL], dtype=float)
        x, y = xy[:, 0], xy[:, 1]
    else:
        raise KeyError(
            f"The cells table {cells_key!r} has no obs[{K.X_PX!r}]/obs[{K.Y_PX!r}] centroids: "
            "run `bs.tl.segment` first."
        )
    r = np.full(len(x), np.nan)
    shapes_key = next((k for k in (region, K.CELL_SHAPES, cells_key) if k and k in sdata.shapes), None)
    instance_key = instance_key or K.CELL_ID
    if shapes_key is not None and "radius" in sdata.shapes[shapes_key].columns:
        ids = obs[instance_key].to_numpy() if instance_key in obs else np.asarray(obs.index)
        geo = _shape_geometry(sdata, shapes_key, ids)
        if geo is not None:
            r = geo.r
    if np.isnan(r).any() and K.AREA_UM2 in obs and mpp is not None:
        r_area = np.sqrt(obs[K.AREA_UM2].to_numpy(dtype=float) / np.pi) / mpp
        r = np.where(np.isnan(r), r_area, r)
    if np.isnan(r).any():
        fallback = 4.0 / mpp if mpp is not None else 5.0  # a typical nucleus (4 µm) where unknown
        r = np.where(np.isnan(r), fallback, r)
    return Geometry(x, y, r)
