"""Tissue mask: where on the slide there is tissue (not glass), as polygons."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .. import _sdata
from .._validate import check_um

#: recorded as the writer of the tissue polygons
WRITER = "bs.pp.tissue_mask"

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    from spatialdata import SpatialData


def thumbnail(
    sdata: SpatialData, image_key: str, *, mpp: float, target_um: float
) -> tuple[np.ndarray, float]:
    """An ``(y, x, 3)`` uint8 overview near ``target_um`` µm/px and its scale (full px per px).

    Uses the coarsest pyramid level that is not coarser than ``target_um``, then block means.
    """
    import dask.array as da

    element = sdata.images[image_key]
    full = _sdata.get_image(sdata, image_key)
    height = full.sizes["y"]
    arr = full
    # multiscale: a DataTree of levels (a DataTree has `dims` too, so test `children`, not `dims`)
    if getattr(element, "children", None):
        for level in sorted(element.children):
            cand = next(iter(element[level].values()))
            f = height / cand.sizes["y"]
            if f * mpp <= target_um and cand.sizes["y"] < arr.sizes["y"]:
                arr = cand
    level_scale = height / arr.sizes["y"]
    factor = max(1, int(target_um / (mpp * level_scale)))
    data = arr.transpose("c", "y", "x").data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(3, 4096, 4096))
    if factor > 1:
        _, h, w = data.shape
        data = data[:, : h - h % factor or h, : w - w % factor or w]
        data = da.coarsen(np.mean, data.astype(np.float32), {1: factor, 2: factor}, trim_excess=True)
    thumb = np.moveaxis(np.asarray(data.compute()), 0, -1)
    if thumb.dtype != np.uint8:
        if thumb.size and float(thumb.max()) <= 1.0 and not np.issubdtype(arr.dtype, np.integer):
            thumb = thumb * 255.0
        thumb = np.clip(np.rint(thumb), 0, 255).astype(np.uint8)
    return thumb, level_scale * factor


def tissue_mask_array(
    rgb: np.ndarray,
    *,
    um_per_px: float,
    min_area_um2: float = 20_000.0,
    max_hole_um2: float = 5_000.0,
    closing_um: float = 20.0,
    threshold: float | None = None,
) -> np.ndarray:
    """Boolean tissue mask of an ``(y, x, 3)`` uint8 overview image with ``um_per_px`` pixels.

    Tissue = saturation above Otsu's threshold (clipped to [0.05, 0.25], so that an image that is
    all tissue or all glass is not split in two) and not white; then a closing (``closing_um``),
    holes up to ``max_hole_um2`` filled and pieces under ``min_area_um2`` removed.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    x = rgb.astype(np.float32) / 255.0
    mx = x.max(-1)
    mn = x.min(-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    if threshold is None:
        t = float(threshold_otsu(sat)) if np.ptp(sat) > 0 else 0.15
        threshold = float(np.clip(t, 0.05, 0.25))
    mask = (sat > threshold) & (mx > 0.05)  # black (pen, scanner border) is not tissue
    r = round(closing_um / um_per_px)
    if r >= 1:
        mask = ndi.binary_closing(np.pad(mask, r), structure=disk(r))[r:-r, r:-r]
    px2 = um_per_px**2
    if max_hole_um2 / px2 >= 1:
        mask = ~_drop_small(~mask, max_hole_um2 / px2, keep_border=True)
    if min_area_um2 / px2 >= 1:
        mask = _drop_small(mask, min_area_um2 / px2, keep_border=False)
    return mask


def _drop_small(mask: np.ndarray, max_px: float, *, keep_border: bool) -> np.ndarray:
    """``mask`` without its connected pieces of at most ``max_px`` pixels (optionally keeping
    pieces that touch the image border, e.g. glass around the tissue)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if not n:
        return mask
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    drop = sizes <= max_px
    if keep_border:
        edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        drop[edge] = False
    drop[0] = False
    return mask & ~drop[lab]


def mask_to_polygons(mask: np.ndarray, *, scale: float) -> list[Any]:
    """Shapely polygons (with holes) of a boolean mask, in full-resolution pixel coordinates.

    Mask pixel ``i`` covers full-resolution pixels ``[i * scale, (i + 1) * scale)``.
    """
    import shapely
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    lab, _ = ndi.label(mask)
    polys = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = np.pad(lab[sl] == i, 1)
        rings = [c for c in find_contours(comp.astype(np.float32), 0.5) if len(c) >= 4]
        if not rings:
            continue
        off = np.array([sl[0].start - 1, sl[1].start - 1], float)
        xy = [(r + off + 0.5)[:, ::-1] * scale - 0.5 for r in rings]  # (row, col) -> (x, y), full px
        shells = [shapely.Polygon(c) for c in xy]
        areas = [p.area for p in shells]
        k = int(np.argmax(areas))
        holes = [xy[j] for j in range(len(xy)) if j != k]
        poly = shapely.Polygon(xy[k], holes=holes).buffer(0)
        polys.extend(list(getattr(poly, "geoms", [poly])))
    return [p.simplify(scale * 0.5) for p in polys if not p.is_empty]


def rasterize_tissue(shapes: gpd.GeoDataFrame, shape: tuple[int, int], *, scale: float) -> np.ndarray:
    """Boolean mask of ``shape`` (pixels of ``scale`` full-resolution pixels) inside the polygons.

    A raster pixel is tissue when its centre lies in a polygon or on its boundary (holes excluded).
    GEOS's prepared point-in-polygon test (``shapely.intersects_xy``) costs about
    ``pixels × log(vertices)``; a per-pixel test against every vertex (``skimage.draw.polygon``)
    grew with pixels × vertices and cost minutes on a gigapixel mosaic.
    """
    import shapely
    from shapely import affinity

    out = np.zeros(shape, bool)
    # raster coordinates: full-resolution pixel centre p maps to (p + 0.5) / scale - 0.5
    offset = 0.5 / scale - 0.5
    geoms = [g for g in shapes.geometry.values if g is not None]
    for poly in shapely.get_parts(np.asarray(geoms, dtype=object)) if geoms else []:
        if poly.is_empty or poly.geom_type != "Polygon":
            continue
        g = affinity.affine_transform(poly, [1 / scale, 0, 0, 1 / scale, offset, offset])
        shapely.prepare(g)
        minx, miny, maxx, maxy = g.bounds
        r0, r1 = max(0, int(np.ceil(miny))), min(shape[0], int(np.floor(maxy)) + 1)
        c0, c1 = max(0, int(np.ceil(minx))), min(shape[1], int(np.floor(maxx)) + 1)
        if r0 >= r1 or c0 >= c1:
            continue
        rows, cols = np.mgrid[r0:r1, c0:c1]
        out[r0:r1, c0:c1] |= shapely.intersects_xy(g, cols, rows)
    return out


def tissue_mask(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    key_added: str = K.TISSUE,
    mpp: float | None = None,
    level_um: float = 8.0,
    min_area_um2: float = 20_000.0,
    max_hole_um2: float = 5_000.0,
    closing_um: float = 20.0,
    threshold: float | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> gpd.GeoDataFrame:
    """Find the tissue on an H&E slide and store it as polygons.

    Works on an overview of about ``level_um`` µm/px (a pyramid level or block means, so a whole
    slide costs seconds): saturation above a threshold (Otsu, clipped to [0.05, 0.25]; or
    ``threshold=``), a morphological closing over ``closing_um``, holes up to ``max_hole_um2``
    filled, pieces under ``min_area_um2`` dropped.

    Parameters
    ----------
    sdata
        A slide with an RGB H&E image.
    image_key
        Image element; the only one when ``None``.
    key_added
        Name of the shapes element written.
    mpp
        Pixel size (µm/px) of the full-resolution image; read from the element when ``None``.
    level_um
        Pixel size of the overview the mask is computed on (µm/px).
    min_area_um2, max_hole_um2
        Smallest tissue piece kept, largest hole filled (µm²).
    closing_um
        Radius of the closing that joins nearby tissue (µm).
    threshold
        Saturation threshold in [0, 1]; ``None`` picks it with Otsu.
    overwrite
        Replace an existing element ``key_added`` that the user or another function wrote (one that
        ``tissue_mask`` wrote is replaced anyway, so a notebook cell can be re-run).
    inplace
        Write the shapes element into ``sdata`` (otherwise only return it).

    Returns
    -------
    The tissue polygons (GeoDataFrame, full-resolution pixel coordinates, one row per piece of
    tissue, with the pixel and micron transformations). With no tissue found, an empty frame is
    returned and nothing is written (spatialdata cannot store an empty shapes element).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> tissue = bs.pp.tissue_mask(sdata)
    >>> len(tissue) >= 1, bool(tissue.geometry.area.sum() > 0)
    (True, True)
    """
    import geopandas as gpd
    from spatialdata.models import ShapesModel

    image_key = _sdata.resolve_image_key(sdata, image_key)
    mpp = _sdata.get_mpp(sdata, image_key, mpp)
    if inplace:
        _sdata.check_free(sdata, key_added, overwrite=overwrite, writer=WRITER)
    check_um(level_um, "level_um")
    for name, value in (("min_area_um2", min_area_um2), ("max_hole_um2", max_hole_um2)):
        check_um(value, name, allow_zero=True)
    check_um(closing_um, "closing_um", allow_zero=True)
    if threshold is not None and not (_is_number(threshold) and 0 <= threshold <= 1):
        raise ValueError(f"`threshold` must be a saturation in [0, 1] or None, got {threshold!r}.")
    thumb, scale = thumbnail(sdata, image_key, mpp=mpp, target_um=level_um)
    mask = tissue_mask_array(
        thumb,
        um_per_px=scale * mpp,
        min_area_um2=min_area_um2,
        max_hole_um2=max_hole_um2,
        closing_um=closing_um,
        threshold=threshold,
    )
    polys = mask_to_polygons(mask, scale=scale)
    gdf = gpd.GeoDataFrame({"geometry": gpd.GeoSeries(polys)})
    if not len(gdf):
        import warnings

        warnings.warn(
            f"No tissue found on image {image_key!r}; nothing written to {key_added!r}. Lower "
            "`threshold=` or `min_area_um2=` if the slide does have tissue.",
            UserWarning,
            stacklevel=2,
        )
        return gdf
    gdf["area_um2"] = gdf.geometry.area.to_numpy() * mpp**2
    gdf = ShapesModel.parse(gdf, transformations=_sdata.micron_transformations(mpp))
    if inplace:
        if key_added in sdata:
            del sdata[key_added]
        sdata.shapes[key_added] = gdf
        _sdata.record_writer(sdata, WRITER, key_added)
    return gdf


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
