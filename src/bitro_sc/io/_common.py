"""Shared building blocks of the readers: image element, spot shapes, spot table, checks.

Every reader ends in :func:`spot_sdata` (or :func:`image_element` for image-only slides), so
the layout of CONTRIBUTING.md ("Image", "Spots", "Spot table") is written in one place.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from .._validate import sum_duplicate_genes
from .._validate import to_rgb_uint8 as to_rgb_uint8  # public as bs.io.to_rgb_uint8

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData

#: longest image side (px) above which the image element becomes a multiscale pyramid
PYRAMID_MIN_SIDE = 4096
#: the coarsest pyramid level built by :func:`image_element` is at most this many px on its long side
PYRAMID_TOP_SIDE = 2048
#: chunk side (px) of dask-backed image levels
CHUNK_PX = 1024
#: channel names of the RGB image element
RGB = ["r", "g", "b"]


def check_file(path: str | Path, *, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; a clear error when it is not an existing file."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = " (it is a directory)" if p.is_dir() else ""
        raise FileNotFoundError(f"The {what} file {str(p)!r} does not exist{hint}. Check the path.")
    return p


def check_dir(path: str | Path, *, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`; a clear error when it is not an existing directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"The {what} directory {str(p)!r} does not exist. Check the path.")
    return p


def strip_suffixes(name: str) -> str:
    """File name without its (possibly double) extension: ``"C2_counts.tsv.gz"`` -> ``"C2_counts"``."""
    return re.sub(r"(\.[A-Za-z0-9]{1,8})+$", "", name)


def rgb_uint8(arr: Any, *, what: str, sample: Any = None) -> Any:
    """A 2-D image as RGB uint8 (y, x, 3): :func:`bitro_sc._validate.to_rgb_uint8` (channel-first,
    RGBA, 8-/12-/16-bit uint16 and [0, 1] / [0, 255] floats converted with a warning; greyscale refused).
    """
    from .._validate import to_rgb_uint8

    return to_rgb_uint8(arr, what=what, sample=sample)


def pyramid_factors(shape_yx: Sequence[int]) -> list[int] | None:
    """Scale factors (all 2) for an image of this size, or ``None`` when it is small enough for one level."""
    side = max(shape_yx)
    if side <= PYRAMID_MIN_SIDE:
        return None
    factors = []
    while side > PYRAMID_TOP_SIDE:
        side //= 2
        factors.append(2)
    return factors


def downsample2(arr: Any) -> Any:
    """2 × 2 box-filter downsampling of a (y, x, c) uint8 array (numpy: eager; dask: lazy).

    An odd last row / column is dropped (as ``xarray.coarsen(boundary="trim")`` does).
    """
    h, w = (arr.shape[0] // 2) * 2, (arr.shape[1] // 2) * 2
    acc = arr[0:h:2, 0:w:2].astype(np.uint16)
    acc = acc + arr[1:h:2, 0:w:2] + arr[0:h:2, 1:w:2] + arr[1:h:2, 1:w:2] + 2
    return (acc // 4).astype(np.uint8)


def image_element(image_yxc: Any, *, mpp: float, chunk_px: int = CHUNK_PX) -> Any:
    """The ``"he"`` image element: RGB uint8 (c, y, x), dask-backed, multiscale when large.

    ``image_yxc`` is a (y, x, 3) numpy or dask array, or a list of them (a file's own pyramid,
    finest first, used as it is when it has several levels). A numpy image is wrapped without a
    copy and its pyramid levels are computed now (2 × 2 box filter, about a third more memory); a
    dask image stays lazy, levels included. Transformations are
    :func:`bitro_sc._sdata.micron_transformations` of ``mpp`` (µm per pixel of the finest level).
    """
    if isinstance(image_yxc, list):
        if len(image_yxc) > 1:
            return multiscale_from_levels(image_yxc, mpp=mpp, chunk_px=chunk_px)
        image_yxc = image_yxc[0]
    levels = [image_yxc]
    for _ in pyramid_factors(image_yxc.shape[:2]) or []:
        levels.append(downsample2(levels[-1]))
    if len(levels) > 1:
        return multiscale_from_levels(levels, mpp=mpp, chunk_px=chunk_px)
    import dask.array as da
    from spatialdata.models import Image2DModel

    arr = (
        image_yxc
        if isinstance(image_yxc, da.Array)
        else da.from_array(image_yxc, chunks=(chunk_px, chunk_px, 3))
    )
    return Image2DModel.parse(
        arr.rechunk((chunk_px, chunk_px, 3)).transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=RGB,
        transformations=_sdata.micron_transformations(mpp),
    )


def multiscale_from_levels(levels: list[Any], *, mpp: float, chunk_px: int = CHUNK_PX) -> Any:
    """A spatialdata multiscale image (DataTree ``scale0``, ``scale1``, ...) from (y, x, 3) levels.

    Levels are ordered finest first.

    ``mpp`` is µm per pixel of the finest level; the coarser levels' scales follow from their shapes.
    """
    import dask.array as da
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation
    from spatialdata.transformations._utils import compute_coordinates

    nodes = {}
    for i, lv in enumerate(levels):
        arr = lv if isinstance(lv, da.Array) else da.from_array(lv, chunks=(chunk_px, chunk_px, 3))
        arr = arr.rechunk((chunk_px, chunk_px, 3)).transpose(2, 0, 1)
        nodes[f"scale{i}"] = xr.Dataset({"image": xr.DataArray(arr, dims=("c", "y", "x"), coords={"c": RGB})})
    tree = xr.DataTree.from_dict(nodes)
    set_transformation(tree, _sdata.micron_transformations(mpp), set_all=True)
    tree = compute_coordinates(tree)
    Image2DModel.validate(tree)
    return tree


def image_shape_yx(element: Any) -> tuple[int, int]:
    """(height, width) in px of an image element's full-resolution level."""
    import xarray as xr

    arr = next(iter(element["scale0"].data_vars.values())) if isinstance(element, xr.DataTree) else element
    return int(arr.sizes["y"]), int(arr.sizes["x"])


def integer_counts(x: Any, *, what: str, names: Sequence[str] | None = None) -> Any:
    """Counts as a CSR matrix of an integer type; clear errors for non-integer or negative values.

    ``names`` (row names) lets the error point at the first offending row.
    """
    from scipy import sparse

    m = sparse.csr_matrix(x)
    data = m.data

    def first_row(mask: np.ndarray) -> str:
        row = int(np.searchsorted(m.indptr, np.flatnonzero(mask)[0], side="right") - 1)
        return f" (first in row {names[row]!r})" if names is not None else ""

    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            raise ValueError(
                f"The {what} contain NaN or infinite values{first_row(bad)}; raw integer counts are needed."
            )
        frac = data != np.round(data)
        if frac.any():
            where = first_row(frac)
            raise ValueError(
                f"The {what} contain non-integer values{where}, e.g. {float(data[frac][0]):g}; "
                "raw integer UMI counts are needed (not normalised or log-transformed values)."
            )
    elif data.dtype.kind not in "iub":
        raise ValueError(f"The {what} have dtype {data.dtype}; raw integer counts are needed.")
    if data.size and data.min() < 0:
        raise ValueError(
            f"The {what} contain negative values{first_row(data < 0)}; raw integer counts are needed."
        )
    top = data.max() if data.size else 0
    dtype = np.int32 if top < np.iinfo(np.int32).max else np.int64
    out = sparse.csr_matrix((data.astype(dtype), m.indices, m.indptr), shape=m.shape)
    out.sort_indices()
    out.eliminate_zeros()
    return out


def spot_sdata(
    *,
    image_yxc: Any,
    counts: Any,
    barcodes: Sequence[str],
    genes: Sequence[str],
    xy_px: np.ndarray,
    radius_px: float,
    mpp: float,
    mpp_source: str,
    sample_id: str,
    patient_id: str | None,
    in_tissue: np.ndarray | None = None,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    var: pd.DataFrame | None = None,
) -> SpatialData:
    """Assemble a spot-based slide: image ``"he"``, shapes ``"spots"``, table ``"table"``.

    ``image_yxc`` is what :func:`image_element` takes. ``xy_px`` are spot centres (x, y) in pixels of
    its finest level; ``mpp`` is µm per pixel of that level. Spots outside the image raise.
    ``counts`` must already be integer CSR (spots × genes).
    """
    from spatialdata import SpatialData

    image = image_element(image_yxc, mpp=mpp)
    h, w = image_shape_yx(image)
    xy = np.asarray(xy_px, dtype=np.float64)
    check_spots_in_image(xy, (h, w), radius_px=radius_px)
    spots = spot_shapes(xy, radius_px=radius_px, mpp=mpp)
    table = spot_table(
        counts=counts,
        barcodes=barcodes,
        genes=genes,
        xy_px=xy,
        sample_id=sample_id,
        patient_id=patient_id,
        in_tissue=in_tissue,
        array_row=array_row,
        array_col=array_col,
        var=var,
        mpp=mpp,
    )
    sdata = SpatialData(images={K.IMAGE: image}, shapes={K.SPOTS: spots}, tables={K.TABLE: table})
    _sdata.set_mpp(sdata, K.IMAGE, mpp, source=mpp_source)
    _sdata.set_slide_info(sdata, sample_id=sample_id, patient_id=patient_id)
    return sdata


def check_spots_in_image(xy_px: np.ndarray, shape_yx: tuple[int, int], *, radius_px: float) -> None:
    """Raise when spot centres fall outside the image (a wrong image, scale or x/y swap)."""
    h, w = shape_yx
    x, y = xy_px[:, 0], xy_px[:, 1]
    missing = ~np.isfinite(x) | ~np.isfinite(y)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"{int(missing.sum())} of {len(x)} spot centres have a missing (NaN or infinite) pixel "
            f"coordinate (first: spot {first}, x={float(x[first])!r}, y={float(y[first])!r}). Drop those "
            "spots or fix their coordinates in the spot positions file."
        )
    outside = (x < 0) | (y < 0) | (x >= w) | (y >= h)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} of {len(x)} spot centres lie outside the image ({w} × {h} px, width × "
            f"height): x spans {np.nanmin(x):.1f}–{np.nanmax(x):.1f}, y spans {np.nanmin(y):.1f}–"
            f"{np.nanmax(y):.1f} px. The image is smaller than the spot coordinates: check that the image "
            "belongs to these spots and is at the resolution the coordinates refer to (scale factor)."
        )


def spot_shapes(xy_px: np.ndarray, *, radius_px: float, mpp: float) -> Any:
    """Shapes ``"spots"``: circles at ``xy_px`` (x, y) with ``radius_px``, index ``0..n-1``."""
    from spatialdata.models import ShapesModel

    n = len(xy_px)
    return ShapesModel.parse(
        np.asarray(xy_px, dtype=np.float64),
        geometry=0,
        radius=np.full(n, float(radius_px)),
        index=pd.Index(np.arange(n), name=K.SPOT_ID),
        transformations=_sdata.micron_transformations(mpp),
    )


def spot_table(
    *,
    counts: Any,
    barcodes: Sequence[str],
    genes: Sequence[str],
    xy_px: np.ndarray,
    sample_id: str,
    patient_id: str | None,
    in_tissue: np.ndarray | None = None,
    array_row: np.ndarray | None = None,
    array_col: np.ndarray | None = None,
    var: pd.DataFrame | None = None,
    mpp: float | None = None,
) -> AnnData:
    """Table ``"table"`` annotating ``"spots"`` (layout in CONTRIBUTING.md, "Spot table").

    ``obsm["spatial"]`` holds the centres in pixels; with ``mpp``, obs ``x_um``/``y_um`` in µm.
    """
    from anndata import AnnData
    from spatialdata.models import TableModel

    n = len(barcodes)
    obs_names = pd.Index([str(b) for b in barcodes])
    if not obs_names.is_unique:
        dup = obs_names[obs_names.duplicated()].unique()[:5].tolist()
        raise ValueError(
            f"Spot names (barcodes) are not unique (e.g. {dup}); each spot must appear once. Drop or rename "
            "the duplicated rows of the counts / positions files."
        )
    obs = pd.DataFrame(index=obs_names)
    obs[K.SPOT_ID] = np.arange(n, dtype=np.int64)
    obs[K.REGION] = pd.Categorical([K.SPOTS] * n)
    obs[K.IN_TISSUE] = np.ones(n, dtype=bool) if in_tissue is None else np.asarray(in_tissue, dtype=bool)
    na = np.full(n, -1, dtype=np.int64)
    obs["array_row"] = na if array_row is None else np.asarray(array_row, dtype=np.int64)
    obs["array_col"] = na if array_col is None else np.asarray(array_col, dtype=np.int64)
    obs[K.SAMPLE_ID] = pd.Categorical([str(sample_id)] * n)
    obs[K.PATIENT_ID] = pd.Categorical([None if patient_id is None else str(patient_id)] * n)
    if mpp is not None:
        xy_um = np.asarray(xy_px, dtype=np.float64).reshape(n, 2) * float(mpp)
        obs[K.X_UM], obs[K.Y_UM] = xy_um[:, 0], xy_um[:, 1]

    var_names = pd.Index([str(g) for g in genes])
    if var is None:
        var = pd.DataFrame(index=var_names)
    else:
        var = var.copy()
        var.index = var_names
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = AnnData(X=counts, obs=obs, var=var)
    adata = sum_duplicate_genes(adata)  # one documented rule for every reader (see _validate)
    adata.obsm[K.SPATIAL] = np.asarray(xy_px, dtype=np.float64)
    return TableModel.parse(adata, region=K.SPOTS, region_key=K.REGION, instance_key=K.SPOT_ID)


def gene_names(names: Sequence[str]) -> list[str]:
    """Gene symbols as strings; duplicates are kept here and summed by :func:`spot_table`."""
    return [str(n) for n in names]
