"""`bs.tl.segment`: nuclei of an H&E slide into the cells elements of the data contract."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from .. import _sdata
from .._cells import shapes_key_for, write_cells
from ..pp._tissue import rasterize_tissue, tissue_mask
from ..segmentation._base import SEGMENTERS
from ..segmentation._external import FileSegmenter, polygons_to_cells, rasterize_polygons
from ..segmentation._tiling import TissueRaster, segment_image

if TYPE_CHECKING:  # pragma: no cover
    import geopandas as gpd
    from spatialdata import SpatialData

#: images up to this many pixels get a label image by default (whole slides do not)
LABELS_MAX_PIXELS = 50_000_000
#: recorded as the writer of the cells elements (a re-run replaces them) and of a computed tissue mask
WRITER = "bs.tl.segment"
TISSUE_WRITER = "bs.pp.tissue_mask"
#: at most this many tiles (a tile size that would make more is refused: it costs minutes of overhead)
MAX_TILES = 100_000
#: pixel size of the tissue raster used to decide which tiles and cells are on tissue (µm/px)
_TISSUE_UM = 8.0


def _configure(backend: Any, method_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Apply ``method_kwargs`` to a dataclass backend (a copy); other backends get them per call."""
    if not method_kwargs:
        return backend, {}
    if dataclasses.is_dataclass(backend) and not isinstance(backend, type):
        fields = {f.name for f in dataclasses.fields(backend) if f.init}
        unknown = sorted(set(method_kwargs) - fields)
        if unknown:
            raise TypeError(
                f"Unknown option(s) {unknown} for segmentation method {type(backend).__name__}; "
                f"it accepts {sorted(fields)}."
            )
        return dataclasses.replace(backend, **method_kwargs), {}
    return backend, dict(method_kwargs)


def _check_tissue(sdata: SpatialData, tissue: Any) -> Any:
    """``tissue`` normalised (``True`` → :data:`~bitro_sc._keys.TISSUE`, ``False`` → ``None``), checked."""
    import geopandas as gpd

    if tissue is None or tissue is False:
        return None
    if tissue is True:
        return K.TISSUE
    if isinstance(tissue, str):
        if tissue in sdata and tissue not in sdata.shapes:
            raise ValueError(
                f"{tissue!r} is not a shapes element; pass `tissue=` the name of a shapes element of "
                "tissue polygons, or `tissue=False` to segment the whole image."
            )
        return tissue
    if isinstance(tissue, gpd.GeoDataFrame):
        return tissue
    raise TypeError(
        f"`tissue` must be a shapes element name, a GeoDataFrame, True or False; got {type(tissue)}."
    )


def _tissue_raster(
    sdata: SpatialData,
    image_key: str,
    tissue: str | gpd.GeoDataFrame | None,
    *,
    mpp: float,
    shape: tuple[int, int],
) -> tuple[Any, str | None, Any]:
    """The tissue as a :class:`TissueRaster` (``None``: segment everywhere), its element name, and the
    polygons to write under that name when they were computed here (else ``None``)."""
    if tissue is None:
        return None, None, None
    name: str | None = None
    new = None
    if isinstance(tissue, str):
        name = tissue
        if tissue in sdata.shapes:
            shapes = sdata.shapes[tissue]
        else:  # computed now and written with the cells, so that it can be inspected
            shapes = new = tissue_mask(sdata, image_key=image_key, key_added=tissue, mpp=mpp, inplace=False)
    else:
        shapes = tissue
    scale = max(1.0, float(int(_TISSUE_UM / mpp)))
    raster_shape = (int(np.ceil(shape[0] / scale)), int(np.ceil(shape[1] / scale)))
    mask = (
        rasterize_tissue(shapes, raster_shape, scale=scale) if len(shapes) else np.zeros(raster_shape, bool)
    )
    return TissueRaster(mask, scale), name, (new if new is not None and len(new) else None)


def _check_tiles(
    backend: Any, tile_um: Any, overlap_um: Any, *, mpp: float, shape: tuple[int, int]
) -> tuple[float, float]:
    """``(tile_um, overlap_um)`` checked against the method's largest nucleus; default overlap filled in."""
    from .._validate import check_um

    largest = float(getattr(backend, "max_diameter_um", 25.0))
    tile = check_um(tile_um, "tile_um")
    if tile < largest:
        raise ValueError(
            f"`tile_um`={tile:g} µm is smaller than the largest nucleus ({largest:g} µm): tiles would "
            f"cost far more than the nuclei in them. Use `tile_um` ≥ {largest:g} µm (default 600)."
        )
    n_tiles = np.ceil(shape[0] * mpp / tile) * np.ceil(shape[1] * mpp / tile)
    if n_tiles > MAX_TILES:
        raise ValueError(
            f"`tile_um`={tile:g} µm cuts this {shape[1] * mpp:.0f} × {shape[0] * mpp:.0f} µm image into "
            f"{n_tiles:.0f} tiles (at most {MAX_TILES}); use a larger `tile_um` (default 600)."
        )
    if overlap_um is None:
        context = getattr(backend, "context_um", None)
        overlap = float(context) if context is not None else largest + 5.0
    else:
        overlap = check_um(overlap_um, "overlap_um", allow_zero=True)
    if overlap < largest:
        raise ValueError(
            f"`overlap_um`={overlap:g} µm is smaller than the largest nucleus ({largest:g} µm): nuclei on "
            f"tile borders would be cut in two. Use `overlap_um` ≥ {largest:g} µm, or leave it as None (the "
            "method's own context)."
        )
    return tile, overlap


def _calibration_sample(
    arr: Any, tissue: Any, *, mpp: float, window_um: float = 200.0, n: int = 16
) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to ``n`` windows of ``window_um`` from the tissue, stacked into one RGB mosaic."""
    _, height, width = arr.shape
    win = int(min(window_um / mpp, height, width))
    if tissue is not None:
        cand = np.argwhere(tissue.mask) * tissue.scale + tissue.scale / 2
        if not len(cand):
            return np.zeros((0, 0, 3), np.uint8), None
    else:
        g = np.linspace(0.1, 0.9, 4)
        cand = np.array([(y * height, x * width) for y in g for x in g])
    picks = cand[np.unique(np.linspace(0, len(cand) - 1, min(n, len(cand))).astype(int))]
    import dask

    origins = [
        (int(np.clip(cy - win // 2, 0, height - win)), int(np.clip(cx - win // 2, 0, width - win)))
        for cy, cx in picks
    ]
    windows = dask.compute(*[arr[:, y0 : y0 + win, x0 : x0 + win] for y0, x0 in origins])
    tiles = [np.moveaxis(np.asarray(chw), 0, -1) for chw in windows]
    masks = [tissue.window(y0, y0 + win, x0, x0 + win) for y0, x0 in origins] if tissue is not None else []
    rgb = np.ascontiguousarray(np.concatenate(tiles, axis=0))
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return rgb, (np.concatenate(masks, axis=0) if masks else None)


def segment(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    method: str | Callable[..., Any] = "watershed",
    mpp: float | None = None,
    key_added: str = K.CELLS,
    tile_um: float = 600.0,
    overlap_um: float | None = None,
    tissue: str | bool | gpd.GeoDataFrame | None = K.TISSUE,
    write_labels: bool | None = None,
    labels_key: str = K.CELL_LABELS,
    overwrite: bool = False,
    progress: bool = True,
    **method_kwargs: Any,
) -> None:
    """Segment the nuclei of an H&E image and write them as cells.

    The image is cut into tiles of ``tile_um`` overlapping by ``overlap_um``; each tile is
    segmented by the method (as a dask task, so any dask scheduler or cluster can run it; memory
    is bounded by a few tiles), and a nucleus belongs to the tile whose core contains its
    centroid, so nuclei on tile borders are kept exactly once and the result does not depend on
    the tile size. Only tissue is segmented: tiles without tissue are skipped and nuclei whose
    centroid is off tissue dropped.

    Parameters
    ----------
    sdata
        A slide with an RGB H&E image; modified in place.
    image_key
        Image element; the only one when ``None``. Always segmented at full resolution.
    method
        ``"watershed"`` (default: haematoxylin colour deconvolution, threshold, distance-transform
        watershed; no weights, CPU; options of
        :class:`~bitro_sc.segmentation.HaematoxylinWatershed`), ``"stardist"`` / ``"cellpose"``
        (optional extras, ``model_path=`` to local weights), ``"file"`` (``path=`` to HEST /
        CellViT / HoVer-Net polygons in full-resolution pixels), another name registered in
        :data:`~bitro_sc.segmentation.SEGMENTERS`, or a callable ``tile (y, x, 3) uint8 ->
        labels (y, x)`` (it receives ``mpp=`` if it accepts it).
    mpp
        Pixel size (µm/px); read from the image element when ``None``.
    key_added
        Name of the cells table; the shapes element is
        :func:`~bitro_sc.segmentation.shapes_key_for` of it (``"cell_circles"``).
    tile_um
        Tile core size (µm); at least the method's largest nucleus (``max_diameter_um``, 25 µm).
    overlap_um
        Overlap on each side (µm); default: the method's ``context_um`` (how far its result
        depends on the image; 38.5 µm for the default method), else its largest nucleus diameter
        (``max_diameter_um``, 25 µm) + 5 µm. Smaller than the largest nucleus is refused (nuclei
        on tile borders would be split).
    tissue
        Name of a shapes element of tissue polygons (pixel coordinates); computed with
        :func:`bitro_sc.pp.tissue_mask` and written under that name when absent. A GeoDataFrame
        is used as given; ``False`` segments the whole image.
    write_labels
        Write the label image ``labels_key`` (uint32, value = ``cell_id``). Default: for images
        up to 50 megapixels; whole slides keep only per-cell records.
    labels_key
        Name of the labels element.
    overwrite
        Replace existing elements of these names written by someone else (the user, another
        function). Elements ``segment`` wrote before are replaced anyway, so a notebook cell can
        be re-run.
    progress
        Show a progress bar over tiles.
    **method_kwargs
        Options of the method (e.g. ``min_area_um2=``, ``model_path=``, ``path=``).

    Notes
    -----
    Writes table ``key_added`` (obs ``cell_id``, centroid ``x_px``/``y_px``/``x_um``/``y_um``,
    ``area_um2``, ``perimeter_um``, ``eccentricity``, ``solidity``, ``major_axis_um``,
    ``minor_axis_um``, ``orientation``, ``sample_id``, ``patient_id``; ``obsm["spatial"]`` in pixels;
    parameters in ``uns["bitro_segmentation"]``), shapes ``"cell_circles"`` and, when asked,
    labels ``labels_key`` — see :func:`~bitro_sc.segmentation.write_cells`. A slide with no
    tissue or no nuclei gets an empty table and a warning. Every argument is checked before any
    work: a failing call leaves ``sdata`` as it was (a computed tissue mask is written only with
    the cells).

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> bs.tl.segment(sdata, progress=False)
    >>> cells = sdata.tables["cells"].obs[["x_um", "y_um", "area_um2"]]
    >>> len(cells) > 50, bool((cells["area_um2"] > 0).all())
    (True, True)
    """
    image_key = _sdata.resolve_image_key(sdata, image_key)
    arr = _sdata.get_image(sdata, image_key).transpose("c", "y", "x")
    mpp = _sdata.get_mpp(sdata, image_key, mpp)
    if isinstance(method, str):
        backend = SEGMENTERS.get(method)
        method_name = method
    elif callable(method):
        backend, method_name = method, getattr(method, "__name__", type(method).__name__)
    else:
        raise TypeError(f"`method` must be a registered name or a callable; got {type(method)}.")
    backend, call_kwargs = _configure(backend, method_kwargs)
    min_mpp = float(getattr(backend, "min_mpp", 2.0))
    if mpp > min_mpp:
        raise ValueError(
            f"Image {image_key!r} has {mpp:.3g} µm/px, too coarse to resolve nuclei (method "
            f"{method_name!r} needs ≤ {min_mpp:g} µm/px). Segment the full-resolution H&E image: for "
            "a Visium run, read it with `bs.io.read_visium(path, fullres_image='<the full-resolution "
            "TIFF given to Space Ranger>')` instead of its 'hires'/'lowres' PNGs."
        )
    height, width = int(arr.sizes["y"]), int(arr.sizes["x"])
    if write_labels is None:
        write_labels = height * width <= LABELS_MAX_PIXELS
    tile_um, overlap_um = _check_tiles(backend, tile_um, overlap_um, mpp=mpp, shape=(height, width))
    tissue = _check_tissue(sdata, tissue)
    shapes_key = shapes_key_for(key_added)
    for key in (key_added, shapes_key, *([labels_key] if write_labels else [])):
        _sdata.check_free(sdata, key, overwrite=overwrite, writer=WRITER)
    if isinstance(tissue, str) and tissue not in sdata:
        _sdata.check_free(sdata, tissue, overwrite=overwrite, writer=TISSUE_WRITER)
    params: dict[str, Any] = {
        "method": method_name,
        "image_key": image_key,
        "mpp": mpp,
        "tile_um": float(tile_um),
        "overlap_um": overlap_um,
    }
    if dataclasses.is_dataclass(backend) and not isinstance(backend, type):
        params["method_params"] = {
            f.name: (str(v) if not isinstance(v := getattr(backend, f.name), (int, float, str, bool)) else v)
            for f in dataclasses.fields(backend)
            if f.init and getattr(backend, f.name) is not None
        }

    labels = None
    new_tissue = None
    if isinstance(backend, FileSegmenter):
        polygons = backend.load()
        props = polygons_to_cells(polygons, scale=backend.scale)
        if write_labels:
            labels = rasterize_polygons(polygons, (height, width), scale=backend.scale)
        params["path"] = str(backend.path)
    else:
        raster, tissue_name, new_tissue = _tissue_raster(
            sdata, image_key, tissue, mpp=mpp, shape=(height, width)
        )
        params["tissue"] = tissue_name
        calibrate = getattr(backend, "calibrate", None)
        if callable(calibrate):
            sample, sample_mask = _calibration_sample(arr.data, raster, mpp=mpp)
            if sample.size:
                fitted = calibrate(sample, mpp=mpp, mask=sample_mask)
                call_kwargs = {**fitted, **call_kwargs}
                params["calibrated"] = {k: v for k, v in fitted.items() if isinstance(v, (int, float, str))}
        props, labels = segment_image(
            arr.data,
            backend,
            mpp=mpp,
            tile_px=max(1, round(tile_um / mpp)),
            overlap_px=int(np.ceil(overlap_um / mpp)),
            tissue=raster,
            kwargs=call_kwargs,
            return_labels=bool(write_labels),
            progress=progress,
        )
    write_cells(
        sdata,
        props,
        mpp=mpp,
        key_added=key_added,
        shapes_key=shapes_key,
        labels_key=labels_key if write_labels else None,
        labels=labels,
        overwrite=overwrite,
        uns=params,
        writer=WRITER,
    )
    if new_tissue is not None and isinstance(tissue, str):
        sdata.shapes[tissue] = new_tissue
        _sdata.record_writer(sdata, TISSUE_WRITER, tissue)
