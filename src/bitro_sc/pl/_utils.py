"""Shared plumbing of the plots: image background, discs, axes and figures, scale bar, colour limits.

Geometry (transformations, crops, spot and cell positions) lives in :mod:`._geometry`.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _keys as K
from ._geometry import Box, Geometry, _to_pixel_affine

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

#: long side (pixels) of the image drawn under a plot; pyramid level / stride are picked to match
MAX_DISPLAY_PX = 2000


# --------------------------------------------------------------------------------------------
# image background
# --------------------------------------------------------------------------------------------
def _levels(element: Any) -> list[Any]:
    """The pyramid levels of an image / labels element (finest first), as DataArrays."""
    from xarray import DataTree

    if isinstance(element, DataTree):  # multiscale: scale0, scale1, ...
        names = sorted(element.children, key=lambda n: (len(n), n))
        return [next(iter(element[name].values())) for name in names]  # type: ignore[operator]
    return [element]


def image_extent(sdata: SpatialData, key: str) -> Box:
    """Bounds ``(x0, y0, x1, y1)`` of an image / labels element in the pixel coordinate system."""
    element = sdata[key]
    full = _levels(element)[0]
    sx, sy, tx, ty = _to_pixel_affine(element)
    return tx, ty, tx + full.sizes["x"] * sx, ty + full.sizes["y"] * sy


def read_region(
    sdata: SpatialData,
    key: str,
    box: Box | None,
    *,
    max_px: int = MAX_DISPLAY_PX,
    reduce: str = "mean",
) -> tuple[np.ndarray, Box] | None:
    """A downsampled region of an image (or labels) element, never loading the full resolution.

    Picks the coarsest pyramid level that still has at least ``max_px / 2`` pixels on the
    region's long side (or the finest level), then block-averages (``reduce="mean"``, images) or strides
    (``reduce="stride"``, labels) so the result has at most ``max_px`` pixels on its long side.

    Returns ``(array, extent)``: array ``(y, x, c)`` for images or ``(y, x)`` for labels, and its
    extent ``(x0, y0, x1, y1)`` in pixels of the full-resolution image; ``None`` when the region
    does not overlap the element.
    """
    element = sdata[key]
    levels = _levels(element)
    full = levels[0]
    sx, sy, tx, ty = _to_pixel_affine(element)
    fx0, fy0, fx1, fy1 = (0.0, 0.0, float(full.sizes["x"]), float(full.sizes["y"]))
    if box is not None:  # global pixels → the element's full-resolution pixels
        fx0 = max(fx0, (box[0] - tx) / sx)
        fy0 = max(fy0, (box[1] - ty) / sy)
        fx1 = min(fx1, (box[2] - tx) / sx)
        fy1 = min(fy1, (box[3] - ty) / sy)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    long_side = max(fx1 - fx0, fy1 - fy0)
    chosen, factor = levels[0], 1.0
    for arr in levels:  # the coarsest level that still shows at least max_px / 2 pixels
        f = full.sizes["x"] / arr.sizes["x"]
        if long_side / f >= max_px / 2 or arr is levels[0]:
            chosen, factor = arr, f
    # level pixel window
    x0, y0 = math.floor(fx0 / factor), math.floor(fy0 / factor)
    x1 = min(math.ceil(fx1 / factor), chosen.sizes["x"])
    y1 = min(math.ceil(fy1 / factor), chosen.sizes["y"])
    region = chosen.isel(x=slice(x0, x1), y=slice(y0, y1))
    stride = max(1, math.ceil(max(x1 - x0, y1 - y0) / max_px))
    if stride > 1:
        if reduce == "mean":
            region = region.coarsen(x=stride, y=stride, boundary="trim").mean()
        else:
            region = region.isel(x=slice(None, None, stride), y=slice(None, None, stride))
    data = np.asarray(region.data.compute() if hasattr(region.data, "compute") else region.data)
    if "c" in region.dims:
        data = np.moveaxis(data, region.dims.index("c"), -1)
        if data.dtype != np.uint8:
            data = _as_display_rgb(data)
    ny, nx = data.shape[:2]
    step = factor * stride
    extent = (
        tx + x0 * factor * sx,
        ty + y0 * factor * sy,
        tx + (x0 * factor + nx * step) * sx,
        ty + (y0 * factor + ny * step) * sy,
    )
    return data, extent


def _as_display_rgb(data: np.ndarray) -> np.ndarray:
    """Averaged / float image data → uint8 RGB for display (floats in [0, 1] are scaled)."""
    if data.size and np.issubdtype(data.dtype, np.floating) and np.nanmax(data) <= 1.0:
        data = data * 255.0
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def draw_image(
    ax: Axes,
    sdata: SpatialData,
    image_key: str | None,
    box: Box | None,
    *,
    max_px: int = MAX_DISPLAY_PX,
    region: tuple[np.ndarray, Box] | None = None,
    cmap: str | None = None,
    alpha: float = 1.0,
) -> Box | None:
    """Draw the (downsampled) H&E region under ``box`` (or an already read ``region``).

    ``cmap``: ``None`` shows the colours; a colour-map name (e.g. ``"gray"``) shows the image's
    luminance in it. ``alpha``: opacity over the white axes (< 1 dims the image).
    Returns the image extent, or ``None`` when there is no image there.
    """
    if region is None:
        if image_key is None:
            return None
        region = read_region(sdata, image_key, box, max_px=max_px)
        if region is None:
            return None
    data, (x0, y0, x1, y1) = region
    kw: dict[str, Any] = {}
    if cmap is not None and data.ndim == 3:
        rgb = data[..., :3].astype(np.float32)
        data = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # luminance (ITU-R 601)
        kw = {"cmap": cmap, "vmin": 0.0, "vmax": 255.0}
    ax.imshow(
        data,
        extent=(x0, x1, y1, y0),
        origin="upper",
        interpolation="antialiased",
        zorder=0,
        alpha=float(alpha),
        **kw,
    )
    return x0, y0, x1, y1


def check_image_style(img_cmap: str | None, img_alpha: float) -> None:
    """Errors for an unknown ``img_cmap`` or an ``img_alpha`` outside [0, 1]."""
    import matplotlib as mpl

    if img_cmap is not None and img_cmap not in mpl.colormaps:
        raise ValueError(
            f"`img_cmap` must be None or a matplotlib colour map such as 'gray', got {img_cmap!r}."
        )
    if not 0.0 <= float(img_alpha) <= 1.0:
        raise ValueError(f"`img_alpha` must be in [0, 1], got {img_alpha!r}.")


def auto_image_key(sdata: SpatialData, image_key: str | None) -> str | None:
    """``image_key`` checked, or the only image; ``None`` when the object has no image."""
    from .._sdata import resolve_image_key

    if image_key is None and not len(sdata.images):
        return None
    if image_key is None and K.IMAGE in sdata.images and len(sdata.images) > 1:
        return K.IMAGE
    return resolve_image_key(sdata, image_key)


def finish_axes(
    ax: Axes,
    box: Box | None,
    data_box: Box | None,
    *,
    mpp: float | None,
    scalebar: bool,
    title: str | None,
) -> None:
    """Equal aspect, image-style y axis, limits = crop (or data), no ticks, µm scale bar."""
    ax.set_aspect("equal")
    limits = box or data_box
    if limits is not None:
        ax.set_xlim(limits[0], limits[2])
        ax.set_ylim(limits[3], limits[1])
    elif not ax.yaxis_inverted():
        ax.invert_yaxis()
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if scalebar:
        if mpp is None:
            warnings.warn(
                "No scale bar: the image's pixel size is unknown. Pass `mpp=` to draw one.", stacklevel=3
            )
        else:
            from matplotlib_scalebar.scalebar import ScaleBar

            ax.add_artist(ScaleBar(mpp, units="um", location="lower right", box_alpha=0.7))


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------
def draw_discs(
    ax: Axes,
    geo: Geometry,
    *,
    values: np.ndarray | None = None,
    colors: Any = None,
    style: str = "circle",
    **kwargs: Any,
) -> Any:
    """Discs of the true radius (``style="circle"``) or fixed-size points (``"point"``)."""
    from matplotlib.collections import EllipseCollection

    offsets = np.column_stack([geo.x, geo.y])
    if style == "point":
        kwargs.setdefault("linewidths", 0)
        kw = {"s": kwargs.pop("s", 2.0), "marker": "o"}
        if values is not None:
            kw["c"] = values
        elif colors is not None:
            kw["c"] = colors
        return ax.scatter(geo.x, geo.y, rasterized=True, zorder=2, **kw, **kwargs)
    coll = EllipseCollection(
        2 * geo.r,
        2 * geo.r,
        np.zeros(len(geo.r)),
        units="xy",
        offsets=offsets,
        offset_transform=ax.transData,
        rasterized=len(geo.r) > 5000,
        zorder=2,
        **kwargs,
    )
    if values is not None:
        coll.set_array(np.ma.masked_invalid(values))
    elif colors is not None:
        coll.set_facecolor(colors)
    ax.add_collection(coll)
    ax.update_datalim(np.column_stack([geo.x - geo.r, geo.y - geo.r]))
    ax.update_datalim(np.column_stack([geo.x + geo.r, geo.y + geo.r]))
    return coll


def new_axes(n: int, *, ncols: int, panel_size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for extra in flat[n:]:
        extra.remove()
    return fig, flat[:n]


def axes_list(ax: Any, n: int, *, ncols: int, panel_size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """``n`` axes: the user's (one Axes or a sequence of ``n``) or a new grid of them."""
    if ax is None:
        return new_axes(n, ncols=ncols, panel_size=panel_size)
    axs = list(np.ravel(ax)) if isinstance(ax, Sequence | np.ndarray) else [ax]
    if len(axs) != n:
        raise ValueError(
            f"This plot has {n} panel(s) but `ax=` holds {len(axs)} Axes. Pass {n} Axes, or `ax=None` "
            "to create the figure."
        )
    return figure_of(axs[0]), axs


def figure_of(ax: Axes) -> Figure:
    """The top-level figure holding ``ax``."""
    from matplotlib.figure import Figure

    fig = ax.get_figure(root=True)
    if not isinstance(fig, Figure):
        raise ValueError("`ax` is not attached to a figure.")
    return fig


def save_figure(fig: Figure, save: str | Path | None, *, dpi: int = 150) -> None:
    if save is not None:
        path = Path(save)
        if path.parent and not path.parent.exists():
            raise FileNotFoundError(
                f"Cannot save the figure to {str(path)!r}: folder {path.parent} does not exist."
            )
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


def check_genes(genes: Sequence[str], var_names: Any, *, where: str) -> None:
    """Error naming unknown genes with their closest matches."""
    names = [str(g) for g in var_names]
    known = set(names)
    missing = [g for g in genes if g not in known]
    if not missing:
        return
    parts = []
    for g in missing:
        close = difflib.get_close_matches(g, names, n=5, cutoff=0.6)
        upper = [n for n in names if n.upper() == g.upper()]
        hints = list(dict.fromkeys(upper + close))
        parts.append(f"{g!r} (did you mean {', '.join(map(repr, hints))}?)" if hints else repr(g))
    raise KeyError(f"Gene(s) not in {where}: {'; '.join(parts)}.")


def normalise_vlim(value: float | str | None, data: np.ndarray, *, default: str) -> float | None:
    """``None`` → data min/max (``default``), ``"pNN"`` → that percentile, a number → itself."""
    finite = data[np.isfinite(data)]
    if value is None:
        if not finite.size:
            return None
        return float(finite.max() if default == "max" else finite.min())
    if isinstance(value, str):
        if not (value.startswith("p") and value[1:].replace(".", "", 1).isdigit()):
            raise ValueError(f"A colour limit string must look like 'p99' (a percentile); got {value!r}.")
        q = float(value[1:])
        if not 0 <= q <= 100:
            raise ValueError(f"Percentile colour limit must be in [0, 100]; got {value!r}.")
        return float(np.percentile(finite, q)) if finite.size else None
    return float(value)


def panel_size_for(view: Box | None, panel_size: tuple[float, float]) -> tuple[float, float]:
    """Panel size (inches) whose height follows the view's aspect ratio (room kept for a colour bar)."""
    width, height = panel_size
    if view is None:
        return width, height
    aspect = (view[3] - view[1]) / max(view[2] - view[0], 1e-9)
    plot_width = 0.8 * width
    return width, float(np.clip(plot_width * aspect + 0.6, 0.4 * width, 2.5 * width))


def colorbar(fig: Figure, ax: Axes, mappable: Any, *, label: str) -> Any:
    """A colour bar as tall as the (equal-aspect) panel, to its right."""
    cax = ax.inset_axes((1.03, 0.0, 0.045, 1.0))
    cbar = fig.colorbar(mappable, cax=cax)
    cbar.set_label(label)
    return cbar
