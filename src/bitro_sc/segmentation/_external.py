"""Optional backends: StarDist and Cellpose (local weights), and polygons from a file."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    import pandas as pd


def _import_extra(module: str, *, method: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"method={method!r} needs the optional package {module.split('.')[0]!r}, which is not "
            f"installed. Install the extra: pip install 'bitro-sc[{extra}]' (or use the default "
            "method='watershed', which needs no extra package and no weights)."
        ) from err


def _check_model_path(model_path: str | Path | None, *, method: str, what: str) -> Path:
    if model_path is None:
        raise ValueError(
            f"method={method!r} needs local weights: pass `model_path=` ({what}). Nothing is downloaded."
        )
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"The {method} model path {str(path)!r} does not exist; pass {what}.")
    return path


@dataclass
class StarDistSegmenter:
    """StarDist 2D (``pip install 'bitro-sc[stardist]'``) with a local model folder.

    Parameters
    ----------
    model_path
        Folder of a trained StarDist2D model (``config.json`` + weights), e.g. a copy of the
        ``2D_versatile_he`` model; nothing is downloaded.
    model_mpp
        Pixel size (µm/px) the model was trained at; tiles are rescaled to it (``None``: as is).
    prob_thresh, nms_thresh
        Passed to ``predict_instances`` (``None``: the model's own).
    """

    model_path: str | Path | None = None
    model_mpp: float | None = 0.5
    prob_thresh: float | None = None
    nms_thresh: float | None = None
    min_mpp: float = 2.0
    max_diameter_um: float = 25.0
    _model: Any = field(default=None, init=False, repr=False, compare=False)

    def _load(self) -> Any:
        models = _import_extra("stardist.models", method="stardist", extra="stardist")
        path = _check_model_path(self.model_path, method="stardist", what="a StarDist2D model folder")
        if self._model is None:
            self._model = models.StarDist2D(None, name=path.name, basedir=str(path.parent))
        return self._model

    def __call__(self, tile: np.ndarray, *, mpp: float) -> np.ndarray:
        model = self._load()
        normalize = _import_extra("csbdeep.utils", method="stardist", extra="stardist").normalize
        scale = None if self.model_mpp is None else mpp / self.model_mpp
        labels, _ = model.predict_instances(
            normalize(tile, 1, 99.8, axis=(0, 1)),
            scale=scale,
            prob_thresh=self.prob_thresh,
            nms_thresh=self.nms_thresh,
        )
        return np.asarray(labels)


@dataclass
class CellposeSegmenter:
    """Cellpose (``pip install 'bitro-sc[cellpose]'``) with a local model file.

    Parameters
    ----------
    model_path
        A trained Cellpose model file (e.g. a copy of ``nuclei`` or ``cpsam``); nothing is
        downloaded.
    diameter_um
        Typical nucleus diameter (µm), converted to pixels with the tile's pixel size.
    gpu
        Use a GPU when Cellpose finds one.
    """

    model_path: str | Path | None = None
    diameter_um: float = 8.0
    gpu: bool = False
    min_mpp: float = 2.0
    max_diameter_um: float = 25.0
    _model: Any = field(default=None, init=False, repr=False, compare=False)

    def _load(self) -> Any:
        models = _import_extra("cellpose.models", method="cellpose", extra="cellpose")
        path = _check_model_path(self.model_path, method="cellpose", what="a Cellpose model file")
        if self._model is None:
            self._model = models.CellposeModel(gpu=self.gpu, pretrained_model=str(path))
        return self._model

    def __call__(self, tile: np.ndarray, *, mpp: float) -> np.ndarray:
        model = self._load()
        out = model.eval(tile, diameter=self.diameter_um / mpp)
        return np.asarray(out[0])


# --- polygons from a file ----------------------------------------------------------------------


def read_polygons(path: str | Path) -> gpd.GeoSeries:
    """Nucleus polygons from a GeoJSON, HoVer-Net JSON or (geo)parquet file, one per nucleus.

    Accepted: a GeoJSON ``FeatureCollection`` or a JSON list of features (CellViT exports a list
    of ``MultiPolygon`` features, one per class); HoVer-Net's ``{"nuc": {id: {"contour": ...}}}``;
    a GeoParquet file or a parquet file with a WKB ``geometry`` column (HEST's CellViT
    segmentations). Multi-polygons are split into their polygons. Coordinates are read as they
    are (pixels of the full-resolution image).
    """
    import geopandas as gpd
    import shapely

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No polygon file {str(path)!r}; pass `path=` to a GeoJSON or parquet file.")
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        import pandas as pd

        df = pd.read_parquet(path)
        if "geometry" not in df.columns:
            raise ValueError(f"{str(path)!r} has no 'geometry' column; columns: {list(df.columns)}.")
        geom = df["geometry"].to_numpy()
        geoms = shapely.from_wkb(geom) if len(geom) and isinstance(geom[0], bytes) else geom
    elif suffix in {".json", ".geojson"}:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "nuc" in data:  # HoVer-Net
            geoms = [
                shapely.Polygon(np.asarray(v["contour"], float))
                for v in data["nuc"].values()
                if len(v.get("contour", [])) >= 3
            ]
        else:
            features = data if isinstance(data, list) else data.get("features")
            if features is None:
                raise ValueError(
                    f"{str(path)!r} is neither a GeoJSON FeatureCollection nor a list of features."
                )
            geoms = [shapely.geometry.shape(f["geometry"]) for f in features if f.get("geometry")]
    else:
        raise ValueError(f"Unsupported polygon file type {suffix!r}: use .geojson/.json or .parquet.")
    series = gpd.GeoSeries(list(geoms)).explode(index_parts=False)
    series = series[series.geom_type == "Polygon"]
    series = series[~series.is_empty & (series.area > 0)]
    return series.reset_index(drop=True)


def polygons_to_cells(polygons: gpd.GeoSeries, *, scale: float = 1.0) -> pd.DataFrame:
    """Per-cell record in pixels (:data:`~bitro_sc.segmentation.PROPS_PX`) from nucleus polygons.

    Area, centroid and second moments come from the exterior ring (Green's theorem, so they are
    exact for the polygon), the perimeter is the ring length, solidity is area over convex hull
    area; axis lengths, eccentricity and orientation follow ``regionprops`` conventions.
    ``scale`` multiplies coordinates (polygons stored at another resolution). Ids are ``1..n``.
    """
    import pandas as pd
    import shapely

    polys = shapely.polygons(shapely.get_exterior_ring(np.asarray(polygons.values)))
    if scale != 1.0:
        polys = shapely.transform(polys, lambda c: c * scale)
    coords, idx = shapely.get_coordinates(polys, return_index=True)
    n = len(polys)
    # edges (x0, y0) -> (x1, y1) of each closed ring; the last vertex repeats the first
    nxt = np.r_[1 : len(coords), 0]
    same = idx[nxt] == idx
    x0, y0 = coords[:, 0], coords[:, 1]
    x1, y1 = coords[nxt, 0], coords[nxt, 1]
    cross = np.where(same, x0 * y1 - x1 * y0, 0.0)
    a = np.bincount(idx, cross, n) / 2.0
    sign = np.where(a < 0, -1.0, 1.0)
    area = np.abs(a)
    cx = np.bincount(idx, (x0 + x1) * cross, n) / (6.0 * a)
    cy = np.bincount(idx, (y0 + y1) * cross, n) / (6.0 * a)
    sxx = np.bincount(idx, (x0 * x0 + x0 * x1 + x1 * x1) * cross, n) / 12.0 * sign
    syy = np.bincount(idx, (y0 * y0 + y0 * y1 + y1 * y1) * cross, n) / 12.0 * sign
    sxy = np.bincount(idx, (x0 * y1 + 2 * x0 * y0 + 2 * x1 * y1 + x1 * y0) * cross, n) / 24.0 * sign
    cxx = sxx / area - cx**2
    cyy = syy / area - cy**2
    cxy = sxy / area - cx * cy
    tr = cxx + cyy
    disc = np.sqrt(np.maximum(((cyy - cxx) / 2) ** 2 + cxy**2, 0.0))
    l1 = np.maximum(tr / 2 + disc, 0.0)
    l2 = np.maximum(tr / 2 - disc, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1), 0, 1)), 0.0)
    orientation = np.where(
        cxx - cyy == 0,
        np.where(cxy > 0, np.pi / 4, -np.pi / 4) * (cxy != 0),
        0.5 * np.arctan2(2 * cxy, cyy - cxx),
    )
    hull = shapely.area(shapely.convex_hull(polys))
    return pd.DataFrame(
        {
            "cell_id": np.arange(1, n + 1, dtype=np.int64),
            "x_px": cx,
            "y_px": cy,
            "area_px": area,
            "perimeter_px": shapely.length(polys),
            "eccentricity": ecc,
            "solidity": np.where(hull > 0, np.minimum(area / np.where(hull > 0, hull, 1), 1.0), 1.0),
            "major_axis_px": 4 * np.sqrt(l1),
            "minor_axis_px": 4 * np.sqrt(l2),
            "orientation": orientation,
        }
    )


def rasterize_polygons(polygons: gpd.GeoSeries, shape: tuple[int, int], *, scale: float = 1.0) -> np.ndarray:
    """uint32 label image of ``shape`` with polygon ``i`` drawn as value ``i + 1``."""
    import shapely
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, np.uint32)
    for i, poly in enumerate(polygons.values, start=1):
        xy = shapely.get_coordinates(shapely.get_exterior_ring(poly)) * scale
        # vertices in pixel-index coordinates (x = column, y = row), as contour tracers write them
        rr, cc = draw_polygon(xy[:, 1], xy[:, 0], shape=shape)
        out[rr, cc] = i
    return out


@dataclass
class FileSegmenter:
    """Nucleus polygons computed elsewhere (HEST, CellViT, HoVer-Net): ``method="file", path=...``.

    Parameters
    ----------
    path
        GeoJSON / HoVer-Net JSON / (geo)parquet file of polygons in full-resolution pixels
        (see :func:`read_polygons`).
    scale
        Multiplies the coordinates (e.g. 4 for polygons drawn on a 4× downsampled image).
    """

    path: str | Path | None = None
    scale: float = 1.0
    min_mpp: float = float("inf")  # nothing is resolved here: any pixel size works

    def load(self) -> gpd.GeoSeries:
        if self.path is None:
            raise ValueError('method="file" needs `path=`: a GeoJSON or parquet file of nucleus polygons.')
        return read_polygons(self.path)

    def __call__(self, tile: np.ndarray, *, mpp: float) -> np.ndarray:
        raise TypeError(
            'method="file" reads whole-slide polygons; call it through `bs.tl.segment(..., method="file", '
            "path=...)`, not tile by tile."
        )
