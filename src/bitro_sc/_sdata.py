"""Shared validation and metadata helpers for SpatialData objects.

Where things live (the contract every module relies on):

- **Pixel size.** Every element of a slide has a transformation to the pixel coordinate system
  :data:`~bitro_sc._keys.PIXEL_CS` (identity for the full-resolution image) and to the micron
  coordinate system :data:`~bitro_sc._keys.MICRON_CS`. The scale of an image's transformation to
  the micron system is its pixel size in µm/px: :func:`get_mpp` reads it, :func:`set_mpp` writes it.
  How it was obtained (``"metadata"``, ``"user"``, ``"estimated from ..."``) is recorded in
  ``sdata.attrs["bitro_sc"]["mpp_source"][image_key]``.
- **Slide identity.** ``sdata.attrs["bitro_sc"]["sample_id"]`` and ``["patient_id"]``
  (:func:`slide_info`, :func:`set_slide_info`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _keys as K
from ._provenance import (  # noqa: F401 - re-exported: the overwrite rule is part of this module's API
    RECORD_WRITERS,
    RESERVED_UNS,
    WRITERS,
    check_free,
    check_table_free,
    part_key,
    record_writer,
    written_by,
)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import xarray as xr
    from anndata import AnnData
    from spatialdata import SpatialData


def micron_transformations(mpp: float, *, offset_px: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """Transformations of a pixel-space element to the pixel and micron coordinate systems.

    ``offset_px`` (y, x) places an element that starts at that pixel of the full image
    (e.g. a crop); the micron system then measures from the full image's origin too.
    """
    from spatialdata.transformations import Identity, Scale, Sequence, Translation

    if offset_px == (0.0, 0.0):
        return {K.PIXEL_CS: Identity(), K.MICRON_CS: Scale([mpp, mpp], axes=("y", "x"))}
    shift = Translation(list(offset_px), axes=("y", "x"))
    return {
        K.PIXEL_CS: shift,
        K.MICRON_CS: Sequence([shift, Scale([mpp, mpp], axes=("y", "x"))]),
    }


def _attrs(sdata: SpatialData) -> dict[str, Any]:
    return sdata.attrs.setdefault(K.ATTRS, {})


def resolve_image_key(sdata: SpatialData, image_key: str | None = None) -> str:
    """Return ``image_key``, or the only image element when it is ``None``."""
    names = list(sdata.images.keys())
    if image_key is not None:
        if image_key not in sdata.images:
            raise KeyError(
                f"No image element {image_key!r} in the SpatialData object; it has {names or 'none'}."
            )
        return image_key
    if not names:
        raise ValueError(
            "The SpatialData object has no image element. Read the slide with `bs.io.read_*`, "
            "or add an H&E image with `spatialdata.models.Image2DModel.parse`."
        )
    if len(names) > 1:
        raise ValueError(f"The SpatialData object has several images {names}; pass `image_key=` to pick one.")
    return names[0]


def get_image(sdata: SpatialData, image_key: str, *, scale: str | None = None) -> xr.DataArray:
    """The image as a (c, y, x) dask-backed DataArray; the full-resolution level of a pyramid.

    Raises a clear error when the image is not RGB.
    """
    import xarray as xr

    element = sdata.images[image_key]
    arr: xr.DataArray
    if isinstance(element, xr.DataTree):  # multiscale (a DataTree has `.dims` too, so test the type)
        level = scale or sorted(element.children)[0]
        arr = next(iter(element[level].data_vars.values()))
    else:
        arr = element
    if "c" not in arr.dims or arr.sizes["c"] != 3:
        n = arr.sizes.get("c", 1)
        sizes = {d: int(arr.sizes[d]) for d in arr.dims}
        swapped = [d for d in ("y", "x") if sizes.get(d) in (3, 4)]
        hint = (
            f" Its axes look swapped ({sizes}): the image was parsed channel-last as (c, y, x). Parse it "
            "with `Image2DModel.parse(img, dims=('y', 'x', 'c'))`."
            if swapped
            else " Convert it with `bs.io.to_rgb_uint8` (drops an alpha channel, refuses greyscale) and "
            "parse it again."
        )
        raise ValueError(
            f"Image {image_key!r} has {n} channel(s); an RGB H&E image with 3 channels is needed.{hint}"
        )
    if arr.dtype != "uint8":
        raise ValueError(
            f"Image {image_key!r} has pixel type {arr.dtype}; bitro_sc works on RGB uint8. Convert it: "
            "`Image2DModel.parse(bs.io.to_rgb_uint8(img), dims=('y', 'x', 'c'))` (scales 8-/12-/16-bit and "
            "[0, 1] / [0, 255] float images correctly), or read the slide with `bs.io.read_*`, which does it."
        )
    return arr


def get_mpp(sdata: SpatialData, element_key: str, mpp: float | None = None) -> float:
    """Pixel size (µm/px) of an image (or of any element in pixel units).

    ``mpp`` given explicitly wins (and must be positive). Otherwise it is read from the element's
    transformation to the micron coordinate system. Never guessed.
    """
    from ._validate import check_mpp

    if mpp is not None:
        return check_mpp(mpp)
    from spatialdata.transformations import get_transformation

    element = sdata[element_key]
    transforms = get_transformation(element, get_all=True)
    if K.MICRON_CS not in transforms:
        raise ValueError(
            f"Element {element_key!r} has no known pixel size (no transformation to the {K.MICRON_CS!r} "
            "coordinate system). Pass `mpp=` (µm per pixel), or read the data with `bs.io.read_*`, "
            "which records it."
        )
    to_um = transforms[K.MICRON_CS]
    matrix = to_um.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    sx = float((matrix[0, 0] ** 2 + matrix[1, 0] ** 2) ** 0.5)
    to_px = transforms.get(K.PIXEL_CS)
    if to_px is not None:  # an element stored at a coarser level: µm per *full-resolution* pixel
        px_matrix = to_px.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        sx /= float((px_matrix[0, 0] ** 2 + px_matrix[1, 0] ** 2) ** 0.5)
    return check_mpp(sx, name=f"pixel size of {element_key!r} (its transformation to {K.MICRON_CS!r})")


def set_mpp(sdata: SpatialData, element_key: str, mpp: float, *, source: str) -> None:
    """Record the pixel size of ``element_key`` (an image in full-resolution pixels) and its source."""
    from spatialdata.transformations import set_transformation

    from ._validate import check_mpp

    mpp = check_mpp(mpp)
    for cs, t in micron_transformations(float(mpp)).items():
        set_transformation(sdata[element_key], t, to_coordinate_system=cs)
    _attrs(sdata).setdefault("mpp_source", {})[element_key] = source


def mpp_source(sdata: SpatialData, element_key: str) -> str | None:
    """How the pixel size of ``element_key`` was obtained, if recorded."""
    return _attrs(sdata).get("mpp_source", {}).get(element_key)


def slide_info(sdata: SpatialData) -> dict[str, str | None]:
    """``{"sample_id": ..., "patient_id": ...}`` of a slide (``None`` where unknown)."""
    a = _attrs(sdata)
    return {K.SAMPLE_ID: a.get(K.SAMPLE_ID), K.PATIENT_ID: a.get(K.PATIENT_ID)}


def set_slide_info(
    sdata: SpatialData, *, sample_id: str | None = None, patient_id: str | None = None
) -> None:
    a = _attrs(sdata)
    if sample_id is not None:
        a[K.SAMPLE_ID] = str(sample_id)
    if patient_id is not None:
        a[K.PATIENT_ID] = str(patient_id)


def require(sdata: SpatialData, key: str, *, kind: str, step: str) -> Any:
    """Return element ``key`` of the given kind (``"images"``, ``"shapes"``, ``"tables"``, ``"labels"``).

    When it is absent the error names the step that creates it, e.g. ``"run `bs.tl.segment` first"``.
    """
    container = getattr(sdata, kind)
    if key not in container:
        have = list(container.keys())
        raise KeyError(f"No {kind[:-1]} element {key!r} (have {have or 'none'}): {step}.")
    return container[key]


def cell_centroids_um(table: AnnData, *, cells_key: str = K.CELLS) -> np.ndarray:
    """Cell centroids ``(n, 2)`` (x, y) in µm, float64, from obs ``x_um``/``y_um``
    (``obsm["spatial"]`` holds pixels, see docs/data_model.md).

    Raises a clear error naming `bs.tl.segment` when the table lacks them.
    """
    import numpy as np

    if K.X_UM in table.obs.columns and K.Y_UM in table.obs.columns:
        return table.obs[[K.X_UM, K.Y_UM]].to_numpy(dtype=np.float64)
    raise ValueError(
        f"The cells table {cells_key!r} has no {K.X_UM!r}/{K.Y_UM!r} columns (centroids in µm); "
        "run `bs.tl.segment` to make a cells table that follows the data contract."
    )


# ----------------------------------------------------------------------------------------------
# slides: lists, identity, which table holds a level, the cells table, spot ids
# ----------------------------------------------------------------------------------------------
def as_slides(sdata_or_list: SpatialData | Any, *, what: str = "slide") -> list[SpatialData]:
    """One SpatialData or a sequence of them, as a non-empty list (``TypeError`` for anything else)."""
    from spatialdata import SpatialData

    slides = [sdata_or_list] if isinstance(sdata_or_list, SpatialData) else list(sdata_or_list)
    if not slides:
        raise ValueError(f"No {what} given: pass a SpatialData object or a non-empty list of them.")
    bad = sorted({type(s).__name__ for s in slides if not isinstance(s, SpatialData)})
    if bad:
        raise TypeError(f"Expected SpatialData objects, got {bad}.")
    return slides


def sample_id(sdata: SpatialData, i: int = 0, *, table_key: str | None = None) -> str:
    """The slide's sample id: ``attrs``, else the single value of ``obs["sample_id"]`` of
    ``tables[table_key]``, else :data:`~bitro_sc._keys.FALLBACK_SAMPLE` for position ``i``."""
    value = _slide_value(sdata, K.SAMPLE_ID, table_key)
    return value if value is not None else K.FALLBACK_SAMPLE.format(i=i)


def patient_id(sdata: SpatialData, *, table_key: str | None = None) -> str | None:
    """The slide's patient id (``attrs``, else the single value of the table's ``obs``), or ``None``."""
    return _slide_value(sdata, K.PATIENT_ID, table_key)


def sample_ids(slides: Any, *, table_key: str | None = None) -> list[str]:
    """:func:`sample_id` of every slide of a list."""
    return [sample_id(s, i, table_key=table_key) for i, s in enumerate(slides)]


def _slide_value(sdata: SpatialData, column: str, table_key: str | None) -> str | None:
    value = slide_info(sdata)[column]
    if value is None and table_key is not None and table_key in sdata.tables:
        obs = sdata.tables[table_key].obs
        if column in obs:
            unique = obs[column].astype(str).unique()
            if len(unique) == 1:
                value = unique[0]
    return None if value is None else str(value)


def level_table_key(
    level: str, *, table_key: str = K.TABLE, bulk_key: str = K.BULK, cells_key: str = K.CELLS
) -> str:
    """The table that holds ``level`` (``"spot"`` → spot table, ``"bulk"`` → bulk, ``"cell"`` → cells)."""
    keys = {"spot": table_key, "bulk": bulk_key, "cell": cells_key}
    if level not in keys:
        raise ValueError(f"`level` must be one of {list(keys)}, got {level!r}.")
    return keys[level]


def check_level(level: Any, allowed: tuple[str, ...] = K.PREDICT_LEVELS) -> str:
    """``level`` if it is one of ``allowed``, else a ``ValueError`` listing them."""
    if level not in allowed:
        raise ValueError(f"`level` must be one of {list(allowed)}, got {level!r}.")
    return str(level)


def bulk_row(sdata: SpatialData, *, bulk_key: str = K.BULK, i: int = 0) -> int:
    """Row of ``tables[bulk_key]`` that measures this slide.

    The row whose ``obs["sample_id"]`` (else obs name) equals the slide's sample id; a one-row
    table when the slide has no sample id. Errors name the fix when the table is missing, when no
    row matches, or when several do.
    """
    import numpy as np
    import pandas as pd

    name = sample_id(sdata, i)
    if bulk_key not in sdata.tables:
        raise KeyError(
            f"Slide {name!r} has no bulk table {bulk_key!r}: add one (e.g. from `bs.io.read_bulk`) "
            "or train at `level='spot'`."
        )
    table = sdata.tables[bulk_key]
    own = slide_info(sdata)[K.SAMPLE_ID]
    if own is None and table.n_obs == 1:
        return 0
    ids = table.obs[K.SAMPLE_ID].astype(str) if K.SAMPLE_ID in table.obs else pd.Series(table.obs_names)
    hit = np.flatnonzero(ids.to_numpy() == str(own))
    if hit.size == 1:
        return int(hit[0])
    found = "none matches" if hit.size == 0 else f"{hit.size} match"
    note = ": the bulk samples match no slide" if hit.size == 0 else ""
    raise ValueError(
        f"The bulk table {bulk_key!r} has samples {list(ids)[:5]}{' ...' if len(ids) > 5 else ''} and "
        f"{found} the slide's sample_id {own!r}{note}. Set the slide's identity with "
        "`bs.set_slide_info(sdata, sample_id=...)` or fix obs['sample_id'] of the bulk table "
        "(one row per sample)."
    )


def cells_table(sdata: SpatialData, cells_key: str = K.CELLS, *, features_key: str | None = None) -> AnnData:
    """The cells table (with ``obsm[features_key]`` when given), or an error naming the missing step."""
    if cells_key not in sdata.tables:
        raise KeyError(
            f"The SpatialData object has no cells table {cells_key!r} "
            f"(tables: {list(sdata.tables.keys()) or 'none'}): run `bs.tl.segment` first"
            + (" and `bs.tl.cell_features`." if features_key else ".")
        )
    cells = sdata.tables[cells_key]
    if features_key is not None and features_key not in cells.obsm:
        raise KeyError(
            f"The cells table {cells_key!r} has no obsm[{features_key!r}]: run `bs.tl.cell_features` "
            f"first (or pass the `features_key` it wrote; present: {list(cells.obsm) or 'none'})."
        )
    return cells


def cell_spot_ids(cells: AnnData, *, spot_key: str = K.SPOT_ID, cells_key: str = K.CELLS) -> np.ndarray:
    """Spot instance id of every cell (int64, ``-1`` where a cell is in no spot).

    Raises a ``KeyError`` naming `bs.tl.assign_cells` when the cells were never assigned.
    """
    import numpy as np
    import pandas as pd

    if spot_key not in cells.obs:
        raise KeyError(
            f"The cells table {cells_key!r} has no obs[{spot_key!r}]: run `bs.tl.assign_cells` first."
        )
    ids = pd.to_numeric(cells.obs[spot_key], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    out = np.full(ids.shape, -1, dtype=np.int64)
    ok = np.isfinite(ids) & (ids >= 0)
    out[ok] = ids[ok].astype(np.int64)
    return out


def spot_instance_ids(table: AnnData) -> np.ndarray:
    """Spot instance id of every row of a spot table (``obs["spot_id"]``, else the row number), int64."""
    import numpy as np
    import pandas as pd

    if K.SPOT_ID in table.obs:
        return pd.to_numeric(table.obs[K.SPOT_ID]).to_numpy(dtype=np.int64)
    return np.arange(table.n_obs, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# run records: one serialiser for JSON (model files) and for AnnData's uns (zarr / h5ad)
# ----------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy (numpy → lists / scalars; unknown objects → str)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)


def to_uns(obj: Any) -> Any:
    """A copy of a (JSON-able) record that AnnData can write to zarr / h5ad: ``None`` → ``"none"``,
    ragged lists → ``{"0": ..., "1": ...}``, lists → arrays."""
    import math

    import numpy as np

    obj = jsonable(obj)
    if isinstance(obj, dict):
        return {k: to_uns(v) for k, v in obj.items()}
    if obj is None:
        return "none"
    if isinstance(obj, list):
        if any(isinstance(v, dict | list) for v in obj):
            return {str(i): to_uns(v) for i, v in enumerate(obj)}
        if any(isinstance(v, str) for v in obj):
            return np.asarray(["none" if v is None else str(v) for v in obj], dtype=object)
        if any(v is None for v in obj):
            return np.asarray([math.nan if v is None else v for v in obj], dtype=float)
        return np.asarray(obj) if obj else np.zeros(0)
    return obj


def features_params_key(features_key: str) -> str:
    """The ``uns`` key of the cells table that records how ``obsm[features_key]`` was computed."""
    return K.FEATURES_PARAMS if features_key == K.FEATURES else f"{features_key}_params"


def bulk_table(sdata: SpatialData, *, bulk_key: str = K.BULK, i: int = 0) -> AnnData:
    """The one-row slice of ``tables[bulk_key]`` that measures this slide (:func:`bulk_row`)."""
    row = bulk_row(sdata, bulk_key=bulk_key, i=i)
    return sdata.tables[bulk_key][row : row + 1]
