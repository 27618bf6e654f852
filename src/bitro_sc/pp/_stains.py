"""Stain normalisation of H&E images (Macenko).

Written here rather than taken from torchstain because a slide needs *one* stain estimate for the
whole image applied chunk by chunk (dask), which torchstain's in-memory ``fit``/``normalize`` API
does not offer; the maths is Macenko et al., ISBI 2009, with torchstain's reference values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import _keys as K
from .. import _sdata

#: recorded as the writer of the normalised image
WRITER = "bs.pp.normalize_stains"

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr
    from spatialdata import SpatialData

#: reference H and E optical-density vectors (columns) and 99th-percentile concentrations
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])
_IO = 240.0  # transmitted light intensity


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1.0) / _IO)


def estimate_stains(
    rgb: np.ndarray, *, alpha: float = 1.0, beta: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Macenko estimate of the (3, 2) H&E stain matrix and the 99th-percentile concentrations.

    Parameters
    ----------
    rgb
        ``(..., 3)`` uint8 pixels (any shape; a subsample of the slide is enough).
    alpha
        Percentile (in %) of the angular distribution taken as the extreme stain directions.
    beta
        Optical-density threshold below which a pixel counts as background.
    """
    od = _optical_density(rgb.reshape(-1, 3))
    od = od[np.all(od > beta, axis=1)]
    if len(od) < 100:
        raise ValueError(
            "Too few stained pixels to estimate the stains (is the image blank or not H&E?). "
            "Check the image, or lower `beta`."
        )
    _, eigvecs = np.linalg.eigh(np.cov(od.T))
    plane = eigvecs[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin first: its OD vector has the larger red component
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains *= np.sign(stains.sum(axis=0, keepdims=True))
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


def _normalize_block(
    block: np.ndarray, stains: np.ndarray, max_conc: np.ndarray, ref: np.ndarray, ref_max: np.ndarray
) -> np.ndarray:
    _, h, w = block.shape
    od = _optical_density(np.moveaxis(block, 0, -1).reshape(-1, 3))
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0] * (ref_max / max_conc)[:, None]
    out = _IO * np.exp(-(ref @ conc))
    return np.clip(out, 0, 255).astype(np.uint8).T.reshape(h, w, 3).transpose(2, 0, 1)


def normalize_stains(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    method: Literal["macenko"] = "macenko",
    reference: SpatialData | np.ndarray | None = None,
    key_added: str | None = None,
    max_fit_pixels: int = 2_000_000,
    overwrite: bool = False,
    inplace: bool = True,
) -> xr.DataArray | None:
    """Normalise the H&E stains of an image to a reference (Macenko).

    The stain vectors are estimated once per slide on a strided subsample of at most
    ``max_fit_pixels`` pixels of the full-resolution image, then applied lazily chunk by chunk,
    so memory stays bounded on whole slides.

    Parameters
    ----------
    sdata
        Slide with an RGB image element.
    image_key
        Image to normalise; the only image when ``None``.
    method
        Only ``"macenko"``.
    reference
        Stains to normalise to: another slide (its image is estimated the same way), an RGB array
        ``(y, x, 3)``, or ``None`` for the standard Macenko reference.
    key_added
        Name of the new image element; default ``f"{image_key}_normalized"``.
    max_fit_pixels
        Pixels sampled for the stain estimate.
    overwrite
        Replace an existing element named ``key_added``.
    inplace
        Write the new element into ``sdata`` (and return ``None``); else return it.

    Returns
    -------
    ``None``, or the normalised ``(c, y, x)`` uint8 image when ``inplace=False``.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> bs.pp.normalize_stains(sdata)
    >>> img = sdata.images["he_normalized"]
    >>> img.dims, img.dtype.name
    (('c', 'y', 'x'), 'uint8')
    """
    import dask.array as da
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import get_transformation

    if method != "macenko":
        raise ValueError(f"Unknown stain normalisation method {method!r}; available: 'macenko'.")
    image_key = _sdata.resolve_image_key(sdata, image_key)
    key_added = key_added or f"{image_key}_normalized"
    if inplace:
        _sdata.check_free(sdata, key_added, overwrite=overwrite, writer=WRITER)
    image = _sdata.get_image(sdata, image_key)
    stains, max_conc = estimate_stains(subsample_rgb(image, max_fit_pixels))
    if reference is None:
        ref, ref_max = REFERENCE_STAINS, REFERENCE_MAX_CONC
    elif isinstance(reference, np.ndarray):
        ref, ref_max = estimate_stains(reference)
    else:
        ref_image = _sdata.get_image(reference, _sdata.resolve_image_key(reference, None))
        ref, ref_max = estimate_stains(subsample_rgb(ref_image, max_fit_pixels))
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data)
    data = data.rechunk({0: 3})
    out = data.map_blocks(_normalize_block, stains, max_conc, ref, ref_max, dtype=np.uint8)
    element = Image2DModel.parse(
        out, dims=("c", "y", "x"), transformations=get_transformation(image, get_all=True)
    )
    if not inplace:
        return element
    if key_added in sdata:
        del sdata[key_added]
    sdata.images[key_added] = element
    _sdata.record_writer(sdata, WRITER, key_added)
    src = _sdata.mpp_source(sdata, image_key)
    if src is not None:
        sdata.attrs[K.ATTRS]["mpp_source"][key_added] = src
    return None


def subsample_rgb(image: xr.DataArray, max_pixels: int) -> np.ndarray:
    """``(y, x, 3)`` pixels of a ``(c, y, x)`` image on a regular stride, at most ``max_pixels``."""
    h, w = image.sizes["y"], image.sizes["x"]
    stride = max(1, int(np.ceil(np.sqrt(h * w / max_pixels))))
    sub = image.data[:, ::stride, ::stride]
    sub = np.asarray(sub.compute() if hasattr(sub, "compute") else sub)
    return np.moveaxis(sub, 0, -1)
