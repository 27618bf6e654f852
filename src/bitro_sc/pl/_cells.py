"""`bs.pl.cells`: the segmentation over the H&E image, coloured by phenotype or any cell column."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from . import _geometry as G
from . import _utils as U

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

_STYLES = ("auto", "outline", "circle", "point")
#: above this many cells in view, ``style="auto"`` draws points instead of circles
MAX_CIRCLES = 100_000


def _palette(categories: Sequence[str], colors: Any) -> dict[str, Any]:
    import matplotlib as mpl

    if isinstance(colors, Mapping):
        missing = [c for c in categories if c not in colors]
        if missing:
            raise KeyError(f"`palette` has no colour for categories {missing}.")
        return {c: mpl.colors.to_rgba(colors[c]) for c in categories}
    if colors is not None and not isinstance(colors, str):
        colors = list(colors)
        if len(colors) < len(categories):
            raise ValueError(f"`palette` has {len(colors)} colours for {len(categories)} categories.")
        return {c: mpl.colors.to_rgba(colors[i]) for i, c in enumerate(categories)}
    name = colors or ("tab10" if len(categories) <= 10 else "tab20")
    cmap = mpl.colormaps[name]
    n = getattr(cmap, "N", 256)
    if n < 256:  # qualitative
        return {c: cmap(i % n) for i, c in enumerate(categories)}
    return {c: cmap(i / max(len(categories) - 1, 1)) for i, c in enumerate(categories)}


def _outline_image(
    sdata: SpatialData,
    labels_key: str,
    view: G.Box,
    cell_ids: np.ndarray,
    rgba: np.ndarray,
    *,
    max_px: int,
) -> tuple[np.ndarray, G.Box] | None:
    """RGBA image of the cell boundaries in ``view``, each boundary in its cell's colour."""
    from skimage.segmentation import find_boundaries

    out = U.read_region(sdata, labels_key, view, max_px=max_px, reduce="stride")
    if out is None:
        return None
    labels, extent = out
    labels = np.asarray(labels).astype(np.int64, copy=False)
    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    overlay = np.zeros((*labels.shape, 4), dtype=np.float32)
    if not edges.any():
        return overlay, extent
    order = np.argsort(cell_ids)
    sorted_ids = cell_ids[order]
    values = labels[edges]
    pos = np.searchsorted(sorted_ids, values)
    pos = np.clip(pos, 0, len(sorted_ids) - 1)
    found = sorted_ids[pos] == values if len(sorted_ids) else np.zeros(values.shape, dtype=bool)
    colours = np.tile(np.array([0.2, 0.2, 0.2, 1.0], dtype=np.float32), (len(values), 1))
    colours[found] = rgba[order[pos[found]]]
    overlay[edges] = colours
    return overlay, extent


def cells(
    sdata: SpatialData,
    *,
    color: str | None = K.PHENOTYPE,
    crop_um: Sequence[float] | None = None,
    ax: Axes | None = None,
    image_key: str | None = None,
    cells_key: str = K.CELLS,
    labels_key: str = K.CELL_LABELS,
    mpp: float | None = None,
    style: Literal["auto", "outline", "circle", "point"] = "auto",
    palette: str | Sequence[Any] | Mapping[str, Any] | None = None,
    cmap: str = "viridis",
    alpha: float = 0.25,
    point_size: float = 2.0,
    img_cmap: str | None = None,
    img_alpha: float = 1.0,
    show_image: bool = True,
    scalebar: bool = True,
    legend: bool = True,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 6.0),
    max_px: int = U.MAX_DISPLAY_PX,
    save: str | Path | None = None,
) -> Axes:
    """The segmented cells over the H&E image, on a crop or the whole slide.

    Cells are drawn as their outlines when a labels element exists and the view fits in
    ``max_px`` pixels at full resolution (``style="auto"``); otherwise as circles of their
    equivalent radius, or as points when more than 100,000 cells are in view.

    Parameters
    ----------
    sdata
        A slide after `bs.tl.segment`.
    color
        Column of ``tables[cells_key].obs``: categorical (e.g. ``"bitro_phenotype"``, legend with one
        entry per category) or numeric (colour bar). ``None``: one colour. The default
        ``"bitro_phenotype"`` falls back to one colour when `bs.tl.phenotypes` has not run, so
        the outlines can be checked right after `bs.tl.segment`.
    crop_um
        ``(x_min, y_min, x_max, y_max)`` in µm from the image origin; ``None``: the extent of the cells.
    ax
        Axes to draw into; ``None`` creates a figure.
    image_key, cells_key, labels_key
        Element keys (image auto-picked when there is one; labels optional).
    mpp
        Pixel size (µm/px) when the image does not record it.
    style
        ``"outline"`` (needs the labels element), ``"circle"``, ``"point"`` or ``"auto"``.
    palette
        Colours of the categories: a colour-map name, a list, or a ``{category: colour}`` mapping.
        Default: ``uns[f"{color}_colors"]`` of the cells table when present (scanpy's convention),
        else ``tab10`` / ``tab20``.
    cmap
        Colour map of a numeric ``color``.
    alpha, point_size
        Fill opacity of circles (their edges and outlines are opaque, so the nuclei stay
        visible); marker size of points (pt²).
    img_cmap, img_alpha
        The H&E: ``img_cmap=None`` (default) in colour, or a colour map of its luminance (e.g.
        ``"gray"``); ``img_alpha`` its opacity over white (default 1.0).
    show_image, scalebar, legend, title
        Draw the H&E image; a scale bar in µm; the legend of categories; the panel title
        (default: ``color``).
    figsize
        Size of a new figure (inches).
    max_px
        Longest side (pixels) of the displayed image region.
    save
        Path to save the figure to.

    Returns
    -------
    The Axes.

    Raises
    ------
    KeyError
        No cells table (run `bs.tl.segment` first), or a ``color`` other than the default that is
        not a column (the error lists them).
    ValueError
        ``style="outline"`` without a labels element.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> bs.tl.segment(sdata, progress=False)
    >>> ax = bs.pl.cells(sdata, color="area_um2", crop_um=(0, 0, 200, 200))
    >>> type(ax).__name__
    'Axes'
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    if style not in _STYLES:
        raise ValueError(f"`style` must be one of {list(_STYLES)}, got {style!r}.")
    if cells_key not in sdata.tables:
        raise KeyError(
            f"No cells table {cells_key!r} (tables: {list(sdata.tables.keys()) or 'none'}): "
            "run `bs.tl.segment` first."
        )
    U.check_image_style(img_cmap, img_alpha)
    table = sdata.tables[cells_key]
    if color == K.PHENOTYPE and color not in table.obs:
        color = None  # segmentation alone: outlines in one colour
    if color is not None and color not in table.obs:
        raise KeyError(
            f"No column {color!r} in the cells table {cells_key!r} (columns: {list(table.obs.columns)}). "
            + ("Run `bs.tl.phenotypes` first." if color == K.PHENOTYPE else "Pass one of the columns.")
        )
    image_key = U.auto_image_key(sdata, image_key)
    mpp_value = G.resolve_mpp(sdata, image_key, mpp)
    box = G.crop_box_px(crop_um, mpp_value)
    geo = G.cell_geometry(sdata, cells_key, mpp_value)
    keep = geo.in_box(box)
    view = box
    if view is None:
        view = geo.box()
        if view is not None:
            pad = 0.03 * max(view[2] - view[0], view[3] - view[1])
            view = (view[0] - pad, view[1] - pad, view[2] + pad, view[3] + pad)

    has_labels = labels_key in sdata.labels
    fits = view is not None and max(view[2] - view[0], view[3] - view[1]) <= max_px
    if style == "outline" and not has_labels:
        raise ValueError(
            f"`style='outline'` needs the labels element {labels_key!r}, which is missing "
            f"(labels: {list(sdata.labels.keys()) or 'none'}); use `style='circle'`."
        )
    if style == "auto":
        style = "outline" if has_labels and fits else ("circle" if keep.sum() <= MAX_CIRCLES else "point")

    # colours
    rgba = np.tile(np.array(mpl.colors.to_rgba("tab:orange")), (table.n_obs, 1))
    categories: dict[str, Any] = {}
    numeric: np.ndarray | None = None
    if color is not None:
        col = table.obs[color]
        if isinstance(col.dtype, pd.CategoricalDtype) or not pd.api.types.is_numeric_dtype(col):
            col = col.astype("category")
            cats = [str(c) for c in col.cat.categories]
            stored = table.uns.get(f"{color}_colors")
            if stored is not None and len(list(stored)) < len(cats):
                stored = None  # stale colours of an earlier clustering: use the default palette
            pal = palette if palette is not None else (list(stored) if stored is not None else None)
            categories = _palette(cats, pal)
            codes = col.cat.codes.to_numpy()
            table_rgba = np.array([categories[c] for c in cats] + [(0.6, 0.6, 0.6, 1.0)])
            rgba = table_rgba[np.where(codes < 0, len(cats), codes)]
        else:
            numeric = col.to_numpy(dtype=float)
            finite = numeric[keep & np.isfinite(numeric)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            norm = mpl.colors.Normalize(lo, hi if hi > lo else lo + 1e-6)
            rgba = mpl.colormaps[cmap](norm(numeric))

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    else:
        fig = U.figure_of(ax)
    if show_image:
        U.draw_image(ax, sdata, image_key, view, max_px=max_px, cmap=img_cmap, alpha=img_alpha)

    if style == "outline":
        _, instance_key = G._table_attrs(table)
        ids_col = instance_key or K.CELL_ID
        ids = table.obs[ids_col].to_numpy() if ids_col in table.obs else np.asarray(table.obs_names)
        ids = np.asarray(pd.to_numeric(pd.Series(ids), errors="coerce").fillna(-1), dtype=np.int64)
        assert view is not None
        out = _outline_image(sdata, labels_key, view, ids, rgba.astype(np.float32), max_px=max_px)
        if out is not None:
            overlay, (x0, y0, x1, y1) = out
            ax.imshow(overlay, extent=(x0, x1, y1, y0), origin="upper", interpolation="nearest", zorder=2)
    else:
        shown = G.Geometry(geo.x[keep], geo.y[keep], geo.r[keep])
        face = rgba[keep].copy()
        if style == "circle":
            face[:, 3] = alpha
            U.draw_discs(ax, shown, colors=face, style="circle", edgecolors=rgba[keep], linewidths=1.0)
        else:
            U.draw_discs(ax, shown, colors=rgba[keep], style="point", s=point_size)

    if numeric is not None:
        sm = mpl.cm.ScalarMappable(norm=norm, cmap=cmap)
        U.colorbar(fig, ax, sm, label=color or "")
    if categories and legend:
        present = set(table.obs[color].astype(str)[keep])
        handles = [
            Line2D(
                [], [], marker="o", linestyle="", markersize=7, markerfacecolor=c, markeredgecolor=c, label=k
            )
            for k, c in categories.items()
            if k in present
        ]
        ax.legend(
            handles=handles,
            title=color,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            fontsize="small",
        )
    U.finish_axes(
        ax,
        view,
        None,
        mpp=mpp_value,
        scalebar=scalebar,
        title=title if title is not None else (color or "cells"),
    )
    U.save_figure(fig, save)
    return ax
