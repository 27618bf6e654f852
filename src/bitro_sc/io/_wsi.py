"""Whole-slide images: pyramidal (OME-)TIFF through tifffile, other formats through OpenSlide; lazy."""

from __future__ import annotations

import re
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from .. import _sdata
from .._validate import check_choice, check_mpp
from ._common import CHUNK_PX, check_file, image_element, rgb_uint8, strip_suffixes

if TYPE_CHECKING:  # pragma: no cover
    from spatialdata import SpatialData

#: file suffixes read with tifffile by ``backend="auto"``
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi")
#: file suffixes read with OpenSlide by ``backend="auto"``
OPENSLIDE_SUFFIXES = (".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
#: plain image files read with PIL (one level) by ``backend="auto"``
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
#: pixel sizes outside this range (µm/px) in file metadata are treated as absent (e.g. 72 dpi defaults)
PLAUSIBLE_MPP = (0.05, 20.0)
#: decoded TIFF regions cached per pyramid level: this many rows of chunks, at most CACHE_MAX_BYTES
CACHE_ROWS = 3
CACHE_MAX_BYTES = 384 * 2**20

Backend = Literal["auto", "tifffile", "openslide"]


def read_wsi(
    path: str | Path,
    *,
    mpp: float | None = None,
    backend: Backend = "auto",
    sample_id: str | None = None,
    patient_id: str | None = None,
    chunk_px: int = CHUNK_PX,
) -> SpatialData:
    """Read a whole-slide H&E image lazily into SpatialData (image element ``"he"`` only).

    Parameters
    ----------
    path
        Slide file. Pyramidal TIFF / OME-TIFF / SVS / NDPI are read with tifffile; other formats
        (``.mrxs``, ``.scn``, ...) with OpenSlide (the ``wsi`` extra: ``pip install 'bitro-sc[wsi]'``).
    mpp
        µm per pixel of the full-resolution level. ``None`` reads it from the file (OME
        ``PhysicalSizeX``, Aperio ``MPP``, TIFF resolution tags, OpenSlide ``openslide.mpp-x``);
        values outside 0.05–20 µm/px (e.g. a 72 dpi default) are ignored. When the file has none,
        an error asks for ``mpp=``.
    backend
        ``"auto"`` picks tifffile for TIFF-like suffixes and OpenSlide otherwise.
    sample_id, patient_id
        Slide identity; ``sample_id`` defaults to the file name without extensions.
    chunk_px
        Dask chunk side (px) of every level.

    Returns
    -------
    SpatialData with a multiscale RGB uint8 image ``"he"`` (one level per pyramid level of the
    file; a pyramid is built lazily when the file has a single large level). Nothing is read
    into memory: pixels are read tile by tile when computed.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unknown pixel size without ``mpp=``; not an RGB image.
    ImportError
        OpenSlide is needed but not installed.

    Examples
    --------
    >>> import pathlib
    >>> import tempfile
    >>> import numpy as np
    >>> import tifffile
    >>> import bitro_sc as bs
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "slide_01.tif"
    >>> rgb = np.full((256, 320, 3), 220, np.uint8)
    >>> tifffile.imwrite(path, rgb, photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    >>> sdata = bs.io.read_wsi(path)  # 2e4 px/cm in the file: 0.5 µm/px
    >>> bs.get_mpp(sdata, "he"), bs.slide_info(sdata)["sample_id"]
    (0.5, 'slide_01')
    >>> scan = path.with_name("scan.tif")
    >>> tifffile.imwrite(scan, rgb, photometric="rgb")  # no resolution tags: give the pixel size
    >>> sdata = bs.io.read_wsi(scan, mpp=0.25)
    >>> bs.get_mpp(sdata, "he")
    0.25
    """
    p = check_file(path, what="slide")
    check_choice(backend, ("auto", "tifffile", "openslide"), "backend")
    if mpp is not None:
        mpp = check_mpp(mpp)
    name = p.name.lower()
    chosen: str = backend
    if backend == "auto":
        if name.endswith(TIFF_SUFFIXES):
            chosen = "tifffile"
        elif name.endswith(OPENSLIDE_SUFFIXES):
            chosen = "openslide"
        elif name.endswith(PIL_SUFFIXES):
            chosen = "pil"
        else:
            raise ValueError(
                f"{str(p)!r} is not a slide image bitro_sc can read (suffix {p.suffix or 'none'!r}). Whole "
                f"slides: {', '.join(TIFF_SUFFIXES)} (tifffile) or {', '.join(OPENSLIDE_SUFFIXES)} "
                f"(OpenSlide, the `wsi` extra); plain images: {', '.join(PIL_SUFFIXES)}. For another format, "
                "convert it to a pyramidal TIFF, or pass `backend='openslide'` if OpenSlide reads it."
            )
    if chosen == "pil":
        levels, file_mpp, where = [read_image_file(p)], None, "a PNG/JPEG records no pixel size"
    elif chosen == "tifffile":
        levels = tiff_levels(p, chunk_px=chunk_px)
        file_mpp, where = tiff_mpp(p)
    else:
        levels, file_mpp, where = openslide_levels(p, chunk_px=chunk_px)
    levels = [rgb_uint8(lv, what=f"slide {str(p)!r}", sample=levels[-1]) for lv in levels]

    mpp, source = resolve_mpp(mpp, file_mpp, where=where, path=p)
    sdata = sdata_from_levels(levels, mpp=mpp, chunk_px=chunk_px)
    _sdata.set_mpp(sdata, K.IMAGE, mpp, source=source)
    _sdata.set_slide_info(sdata, sample_id=sample_id or strip_suffixes(p.name), patient_id=patient_id)
    return sdata


def resolve_mpp(mpp: float | None, file_mpp: float | None, *, where: str, path: Path) -> tuple[float, str]:
    """``(mpp, source)`` from the user's value and the file's; user wins, with a warning on conflict."""
    if mpp is not None:
        mpp = check_mpp(mpp)
        if file_mpp is not None and abs(mpp / file_mpp - 1) > 0.1:
            warnings.warn(
                f"`mpp={mpp}` differs from the file's {file_mpp:.4g} µm/px ({where}); using `mpp={mpp}`.",
                UserWarning,
                stacklevel=3,
            )
        return float(mpp), "user"
    if file_mpp is None:
        raise ValueError(
            f"The slide {str(path)!r} records no usable pixel size ({where}). Pass `mpp=` (µm per pixel "
            "of the full-resolution level, e.g. 0.25 at 40x, 0.5 at 20x)."
        )
    return float(file_mpp), "metadata"


def sdata_from_levels(levels: list[Any], *, mpp: float, chunk_px: int = CHUNK_PX) -> SpatialData:
    """SpatialData with image ``"he"`` from (y, x, 3) dask levels, finest first."""
    from spatialdata import SpatialData

    return SpatialData(images={K.IMAGE: image_element(levels, mpp=mpp, chunk_px=chunk_px)})


def read_image_file(path: Path) -> Any:
    """An RGB uint8 (y, x, 3) array from a JPEG/PNG (PIL) or TIFF (tifffile, lazily for pyramids)."""
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".ome.tif"):
        return rgb_uint8(tiff_levels(path)[0], what=f"image {str(path)!r}")
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # H&E images are legitimately huge; it is the user's own file
    try:
        with Image.open(path) as raw:
            im: Image.Image = raw
            if raw.getexif().get(0x0112, 1) != 1:  # honour an EXIF orientation tag
                from PIL import ImageOps

                im = ImageOps.exif_transpose(raw)
            arr = np.asarray(im if im.mode in ("RGB", "RGBA") else im.convert("RGB"))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    return rgb_uint8(arr, what=f"image {str(path)!r}")


# --- tifffile ----------------------------------------------------------------------------------


def tiff_levels(path: Path, *, chunk_px: int = CHUNK_PX, series: int = 0) -> list[Any]:
    """Pyramid levels of a TIFF as lazy (y, x, c) dask arrays (finest first); nothing is read.

    The arrays hold the file's path, not an open handle, so their tasks can be sent to the worker
    processes of a dask cluster (each process opens the file when it first reads a chunk).
    """
    import dask.array as da
    import tifffile

    with tifffile.TiffFile(path) as tif:
        s = tif.series[series]
        axes = s.axes
        shapes = [(tuple(lv.shape), lv.dtype) for lv in s.levels]
    stat = Path(path).stat()
    out = []
    for i, (shape, dtype) in enumerate(shapes):
        arr = _TiffLevel(str(path), series, i, shape, dtype, chunk_px=chunk_px)
        chunks = tuple(chunk_px if a in "YX" else -1 for a in axes)
        name = f"tiff-{Path(path).name}-{stat.st_size}-{stat.st_mtime_ns}-{series}-{i}"
        out.append(_to_yxc(da.from_array(arr, chunks=chunks, name=name, asarray=False), axes, path))
    return out


class _TiffLevel:
    """Array-like view of one level of a TIFF series, read region by region; picklable (path only).

    Decoded regions are kept in a small least-recently-used cache (:data:`CACHE_ROWS` rows of chunks,
    at most :data:`CACHE_MAX_BYTES`): tiles that overlap (segmentation tiles with their context,
    feature tiles with their margin) read the same JPEG tiles again, and decoding is most of the cost
    of reading. Each read returns its own copy, so a caller may write into it.
    """

    def __init__(
        self, path: str, series: int, level: int, shape: tuple[int, ...], dtype: Any, *, chunk_px: int = 0
    ) -> None:
        self.path, self.series, self.level = path, series, level
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)
        row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize * chunk_px // max(max(shape), 1)
        self.cache_bytes = int(min(CACHE_ROWS * row_bytes, CACHE_MAX_BYTES))
        self._zarr: Any = None
        self._cache: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zarr": None, "_cache": OrderedDict(), "_cached": 0, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, index: Any) -> np.ndarray:
        key = _index_key(index)
        if key is not None and self.cache_bytes > 0:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                return hit.copy()
        if self._zarr is None:
            import tifffile
            import zarr

            store = tifffile.TiffFile(self.path).series[self.series].aszarr(level=self.level)
            self._zarr = zarr.open(store, mode="r")
        out = np.asarray(self._zarr[index])
        if key is not None and 0 < out.nbytes <= self.cache_bytes:
            with self._lock:
                if key not in self._cache:
                    self._cache[key] = out.copy()
                    self._cached += out.nbytes
                while self._cached > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return out


def _index_key(index: Any) -> tuple[Any, ...] | None:
    """A hashable key of a basic index (slices and integers), ``None`` for anything else."""
    items = index if isinstance(index, tuple) else (index,)
    key: list[Any] = []
    for i in items:
        if isinstance(i, slice):
            key.append((i.start, i.stop, i.step))
        elif isinstance(i, (int, np.integer)):
            key.append(int(i))
        else:
            return None
    return tuple(key)


def _to_yxc(arr: Any, axes: str, path: Path) -> Any:
    """Reorder a tifffile series to (y, x, c); singleton extra axes are dropped."""
    index = tuple(
        0 if (a not in "YXSC" and n == 1) else slice(None) for a, n in zip(axes, arr.shape, strict=True)
    )
    arr = arr[index]
    axes = "".join(a for a, i in zip(axes, index, strict=True) if not isinstance(i, int))
    if set(axes) - set("YXSC"):
        raise ValueError(
            f"The TIFF {str(path)!r} has axes {axes!r} (shape {arr.shape}); a 2-D RGB slide (YXS or CYX) "
            "is needed."
        )
    if axes == "YX":
        return arr  # rgb_uint8 raises with the channel count
    ch = "S" if "S" in axes else "C"
    order = [axes.index("Y"), axes.index("X"), axes.index(ch)]
    return arr.transpose(order)


def tiff_mpp(path: Path) -> tuple[float | None, str]:
    """Pixel size (µm/px) from a TIFF's metadata and a note saying where it came from (or why not)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tried = []
        if tif.is_ome and tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            if m:
                u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
                factor = _UNIT_UM.get(u.group(1) if u else "µm")
                if factor is not None:
                    value = float(m.group(1)) * factor
                    if _plausible(value):
                        return value, "OME PhysicalSizeX"
                    tried.append(f"OME PhysicalSizeX {value:g} µm")
        desc = page.description or ""
        m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)
        if m:
            value = float(m.group(1))
            if _plausible(value):
                return value, "Aperio MPP"
            tried.append(f"Aperio MPP {value:g}")
        unit = int(page.resolutionunit)
        xres = page.resolution[0] if page.resolution else 0.0
        per_unit, unit_name = {2: (25400.0, "inch"), 3: (1e4, "cm"), 4: (1e3, "mm"), 5: (1.0, "µm")}.get(
            unit, (None, "")
        )
        if per_unit is not None and xres > 0:
            value = per_unit / xres
            if _plausible(value):
                return value, "TIFF resolution tags"
            tried.append(f"TIFF resolution {xres:g} px per {unit_name} = {value:.1f} µm/px, implausible")
    return None, "; ".join(tried) or "no OME, Aperio or TIFF resolution metadata"


_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _plausible(value: float) -> bool:
    return bool(np.isfinite(value)) and PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]


# --- openslide ---------------------------------------------------------------------------------


class _OpenSlideLevel:
    """Array-like (y, x, 3) uint8 view of one OpenSlide level; slicing reads that region only."""

    def __init__(self, slide: Any, level: int) -> None:
        self.slide = slide
        self.level = level
        w, h = slide.level_dimensions[level]
        self.shape = (h, w, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(slide.level_downsamples[level])

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), np.uint8)
        loc = (round(x0 * self.downsample), round(y0 * self.downsample))
        rgba = np.asarray(self.slide.read_region(loc, self.level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)  # no-data -> white
        out = (rgb + 0.5).astype(np.uint8)
        return out[:, :, key[2]] if len(key) > 2 else out


def openslide_levels(path: Path, *, chunk_px: int = CHUNK_PX) -> tuple[list[Any], float | None, str]:
    """Lazy (y, x, 3) dask levels of an OpenSlide-readable slide, its mpp and where the mpp came from."""
    import dask.array as da

    try:
        import openslide
    except ImportError as err:
        raise ImportError(
            f"Reading {path.suffix or 'this'} slides needs OpenSlide, which is not installed. Install the "
            "`wsi` extra: pip install 'bitro-sc[wsi]' (or convert the slide to a pyramidal TIFF)."
        ) from err
    slide = openslide.OpenSlide(str(path))
    levels = []
    for lvl in range(slide.level_count):
        view = _OpenSlideLevel(slide, lvl)
        levels.append(
            da.from_array(
                view,
                chunks=(chunk_px, chunk_px, 3),
                name=f"openslide-{path.resolve()}-{lvl}",
                meta=np.empty((0, 0, 0), np.uint8),
            )
        )
    raw = slide.properties.get("openslide.mpp-x")
    if raw is not None:
        value = float(raw)
        if _plausible(value):
            return levels, value, "openslide.mpp-x"
        return levels, None, f"openslide.mpp-x {value:g} implausible"
    return levels, None, "no openslide.mpp-x property"
