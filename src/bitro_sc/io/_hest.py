"""A local HEST-1k download (``st/``, ``wsis/``, ``metadata/``, optional ``cellvit_seg/``)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _keys as K
from .._cells import write_cells
from .._validate import check_mpp
from ._common import check_dir, check_file, gene_names, integer_counts, rgb_uint8, spot_sdata
from ._wsi import tiff_levels

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: spot diameter (µm) by HEST ``st_technology`` when the metadata has no ``spot_diameter``
SPOT_DIAMETER_UM = {"visium": 55.0, "spatial transcriptomics": 100.0, "st": 100.0}
#: obs column of the cells table with the CellViT nucleus class
CELLVIT_CLASS = "cellvit_class"


def read_hest(
    root: str | Path,
    sample_id: str,
    *,
    mpp: float | None = None,
    patient_id: str | None = None,
    cells: bool = True,
) -> SpatialData:
    """Read one sample of a local HEST-1k download into SpatialData.

    Parameters
    ----------
    root
        Folder with ``st/<id>.h5ad`` (spots × genes, ``obsm["spatial"]`` = spot centre (x, y) in
        full-resolution pixels), ``wsis/<id>.tif`` (pyramidal TIFF, read lazily),
        ``metadata/<id>.json`` and optionally ``cellvit_seg/<id>_cellvit_seg.geojson`` (or ``.parquet``).
    sample_id
        HEST sample id (e.g. ``"TENX95"``); also written as the slide's ``sample_id``.
    mpp
        µm per pixel of the WSI; ``None`` takes ``pixel_size_um_estimated`` (else
        ``pixel_size_um_embedded``) from the metadata.
    patient_id
        Overrides the metadata's ``patient``.
    cells
        Read the CellViT nuclei when present (shapes ``"cell_circles"`` and table ``"cells"``, as
        written by ``bs.tl.segment``, plus ``obs["cellvit_class"]``).

    Returns
    -------
    SpatialData with image ``"he"`` (multiscale, lazy), shapes ``"spots"`` (radius = metadata
    ``spot_diameter`` / 2 in pixels; by ``st_technology`` when absent) and table ``"table"``
    (raw integer counts), as in CONTRIBUTING.md; the cells elements when ``cells`` and present.

    Raises
    ------
    FileNotFoundError
        The h5ad, the WSI or the metadata of ``sample_id`` is missing.
    ValueError
        No pixel size or spot diameter is known; spots lie outside the WSI; counts are not integers.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.io.read_hest("hest_data", "TENX95")  # doctest: +SKIP
    """
    import anndata as ad

    base = check_dir(root, what="HEST")
    h5ad = check_file(base / "st" / f"{sample_id}.h5ad", what=f"HEST expression ({sample_id})")
    wsi = _find_wsi(base, sample_id)
    meta_path = check_file(base / "metadata" / f"{sample_id}.json", what=f"HEST metadata ({sample_id})")
    meta = json.loads(meta_path.read_text())

    if mpp is None:
        mpp = _first_number(meta, "pixel_size_um_estimated", "pixel_size_um_embedded")
        if mpp is None:
            raise ValueError(
                f"{str(meta_path)!r} has no `pixel_size_um_estimated` or `pixel_size_um_embedded`; "
                "pass `mpp=`."
            )
        mpp = check_mpp(mpp, name=f"pixel size in {meta_path.name}")
        source = "metadata"
    else:
        mpp = check_mpp(mpp)
        source = "user"
    diameter_um = _first_number(meta, "spot_diameter")
    if diameter_um is None:
        tech = str(meta.get("st_technology", "")).lower()
        diameter_um = SPOT_DIAMETER_UM.get(tech)
        if diameter_um is None:
            raise ValueError(
                f"{str(meta_path)!r} has no `spot_diameter` and its st_technology {tech!r} is not one of "
                f"{sorted(SPOT_DIAMETER_UM)}; add `spot_diameter` (µm) to the metadata."
            )
    if patient_id is None:
        patient = meta.get("patient")
        patient_id = (
            None if patient is None or (isinstance(patient, float) and math.isnan(patient)) else patient
        )

    adata = ad.read_h5ad(h5ad)
    if K.SPATIAL not in adata.obsm:
        raise ValueError(f"{str(h5ad)!r} has no `obsm['spatial']` (spot centres in full-resolution pixels).")
    xy = np.asarray(adata.obsm[K.SPATIAL], dtype=np.float64)[:, :2]
    obs = adata.obs
    x = integer_counts(adata.X, what=f"HEST counts of {sample_id}", names=list(adata.obs_names))
    raw_levels = tiff_levels(wsi)
    levels = [rgb_uint8(lv, what=f"HEST WSI {str(wsi)!r}", sample=raw_levels[-1]) for lv in raw_levels]

    def col(name: str) -> np.ndarray | None:
        return obs[name].to_numpy() if name in obs.columns else None

    in_tissue = col(K.IN_TISSUE)
    sdata = spot_sdata(
        image_yxc=levels,  # the file's own pyramid
        counts=x,
        barcodes=list(adata.obs_names),
        genes=gene_names(adata.var_names),
        xy_px=xy,
        radius_px=diameter_um / 2.0 / float(mpp),
        mpp=float(mpp),
        mpp_source=source,
        sample_id=str(sample_id),
        patient_id=None if patient_id is None else str(patient_id),
        in_tissue=None if in_tissue is None else in_tissue.astype(float) == 1,
        array_row=col("array_row"),
        array_col=col("array_col"),
        var=adata.var,
    )
    if cells:
        seg = _find_cellvit(base, sample_id)
        if seg is not None:
            add_polygon_cells(sdata, read_polygons(seg), mpp=float(mpp))
    return sdata


def _find_wsi(base: Path, sample_id: str) -> Path:
    for suffix in (".tif", ".tiff", ".btf"):
        p = base / "wsis" / f"{sample_id}{suffix}"
        if p.is_file():
            return p
    return check_file(base / "wsis" / f"{sample_id}.tif", what=f"HEST WSI ({sample_id})")


def _find_cellvit(base: Path, sample_id: str) -> Path | None:
    for suffix in (".geojson", ".parquet"):
        p = base / "cellvit_seg" / f"{sample_id}_cellvit_seg{suffix}"
        if p.is_file():
            return p
    return None


def _first_number(meta: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = meta.get(k)
        if v is not None:
            try:
                value = float(v)
            except (TypeError, ValueError) as err:
                raise ValueError(f"HEST metadata `{k}` = {v!r} is not a number.") from err
            if math.isfinite(value) and value > 0:
                return value
    return None


# --- CellViT nuclei ----------------------------------------------------------------------------


def read_polygons(path: Path) -> pd.DataFrame:
    """Nucleus polygons of a CellViT GeoJSON / GeoParquet: DataFrame with ``geometry`` and ``class``."""
    import shapely

    geoms: list[Any] = []
    classes: list[str | None] = []
    if path.suffix == ".parquet":
        import geopandas as gpd

        gdf = gpd.read_parquet(path)
        cls_col = next((c for c in ("class", "classification", "class_name") if c in gdf.columns), None)
        for g, c in zip(gdf.geometry, gdf[cls_col] if cls_col else [None] * len(gdf), strict=True):
            _add_geometry(g, _class_name(c), geoms, classes)
    else:
        data = json.loads(path.read_text())
        features = data.get("features", []) if isinstance(data, dict) else data
        for f in features:
            if not isinstance(f, dict) or "geometry" not in f:
                continue
            props = f.get("properties") or {}
            name = _class_name(props.get("classification", props.get("class", props.get("name"))))
            _add_geometry(shapely.geometry.shape(f["geometry"]), name, geoms, classes)
    return pd.DataFrame({"geometry": geoms, "class": classes})


def _class_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _add_geometry(g: Any, name: str | None, geoms: list[Any], classes: list[str | None]) -> None:
    if g is None or g.is_empty:
        return
    parts = list(g.geoms) if hasattr(g, "geoms") else [g]  # CellViT: one MultiPolygon per class
    for part in parts:
        if part.geom_type == "Polygon" and part.area > 0:
            geoms.append(part)
            classes.append(name)


def polygon_props(polygons: list[Any]) -> pd.DataFrame:
    """Per-cell record in pixels (``segmentation.PROPS_PX`` columns) from polygons, moment-based.

    Axis lengths, eccentricity and orientation follow :func:`skimage.measure.regionprops`
    conventions computed from the polygon's second moments; solidity = area / convex-hull area.
    """
    n = len(polygons)
    rec = {k: np.zeros(n) for k in ("x_px", "y_px", "area_px", "perimeter_px", "solidity")}
    rec.update({k: np.zeros(n) for k in ("eccentricity", "major_axis_px", "minor_axis_px", "orientation")})
    for i, poly in enumerate(polygons):
        xy = np.asarray(poly.exterior.coords, dtype=np.float64)
        x0, y0 = xy[:-1, 0], xy[:-1, 1]
        x1, y1 = xy[1:, 0], xy[1:, 1]
        cross = x0 * y1 - x1 * y0
        a = cross.sum() / 2.0
        cx = ((x0 + x1) * cross).sum() / (6.0 * a)
        cy = ((y0 + y1) * cross).sum() / (6.0 * a)
        sxx = ((x0**2 + x0 * x1 + x1**2) * cross).sum() / (12.0 * a) - cx**2
        syy = ((y0**2 + y0 * y1 + y1**2) * cross).sum() / (12.0 * a) - cy**2
        sxy = ((x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross).sum() / (24.0 * a) - cx * cy
        half_diff = math.sqrt(((sxx - syy) / 2.0) ** 2 + sxy**2)
        l1, l2 = (sxx + syy) / 2.0 + half_diff, max((sxx + syy) / 2.0 - half_diff, 0.0)
        area = poly.area  # holes (rare for nuclei) reduce the area; moments use the exterior ring
        rec["x_px"][i], rec["y_px"][i], rec["area_px"][i] = cx, cy, area
        rec["perimeter_px"][i] = poly.exterior.length
        rec["solidity"][i] = area / max(poly.convex_hull.area, 1e-12)
        rec["major_axis_px"][i], rec["minor_axis_px"][i] = 4.0 * math.sqrt(l1), 4.0 * math.sqrt(l2)
        rec["eccentricity"][i] = math.sqrt(1.0 - l2 / l1) if l1 > 0 else 0.0
        rec["orientation"][i] = 0.5 * math.atan2(2.0 * sxy, syy - sxx)
    return pd.DataFrame({"cell_id": np.arange(1, n + 1, dtype=np.int64), **rec})


def add_polygon_cells(sdata: SpatialData, cells: pd.DataFrame, *, mpp: float) -> None:
    """Write nucleus polygons as the cells elements (``bs.tl.segment``'s layout) plus their class."""
    if not len(cells):
        warnings.warn(
            "The CellViT segmentation has no nuclei; no cells are written.", UserWarning, stacklevel=3
        )
        return
    props = polygon_props(list(cells["geometry"]))
    write_cells(sdata, props, mpp=mpp, labels_key=None, uns={"source": "CellViT (HEST cellvit_seg)"})
    table = sdata.tables[K.CELLS]
    table.obs[CELLVIT_CLASS] = pd.Categorical(cells["class"].to_numpy())
