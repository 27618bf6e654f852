"""`bs.pl.expression`: predicted or measured expression of spots / cells over the H&E image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _keys as K
from .._sdata import check_level, level_table_key
from ..pp._expression import get_counts, normalize_expression
from . import _field as F
from . import _geometry as G
from . import _utils as U

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from matplotlib.axes import Axes
    from spatialdata import SpatialData

#: levels that can be drawn (bulk has no positions)
_PLOT_LEVELS = ("spot", "cell")
_STYLES = ("auto", "circle", "point", "smooth")
#: above this many cells in view, ``style="auto"`` draws points instead of true-size circles
MAX_CIRCLES = 100_000


@dataclass
class _Panel:
    gene: str
    level: str  # "spot" | "cell"
    table_key: str
    layer: str | None  # None = measured counts
    values: np.ndarray
    label: str
    title: str


def _column(x: Any, j: int) -> np.ndarray:
    from scipy import sparse

    col = x[:, j]
    col = col.toarray() if sparse.issparse(col) else np.asarray(col)
    return np.asarray(col, dtype=np.float64).ravel()


def _measured(table: AnnData, gene: str) -> np.ndarray:
    """log1p counts-per-10k of one gene, library size over all genes of the table."""
    counts = get_counts(table)
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    col = _column(counts, int(table.var_names.get_loc(gene)))
    if np.any(col < 0):
        raise ValueError(
            "Measured counts must be non-negative; `X` / layers['counts'] should hold raw counts."
        )
    return normalize_expression(col[:, None], library_size=lib)[:, 0].astype(np.float64)


class GeneNotPredictedError(KeyError, ValueError):
    """A gene the data has but the model did not predict (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def not_predicted(gene: str, table: AnnData, layer: str, table_key: str) -> GeneNotPredictedError:
    """The one error for a gene without predictions, at every level."""
    record = table.uns.get(layer)
    genes = list(record.get("genes", [])) if hasattr(record, "get") else []
    what = f"it predicted {len(genes)} genes, e.g. {', '.join(map(str, genes[:5]))}" if genes else ""
    return GeneNotPredictedError(
        f"{gene!r} was not predicted: the model behind layer {layer!r} of table {table_key!r} did not "
        f"include it{' (' + what + ')' if what else ''}. Fit it with this gene in `genes=` (e.g. "
        f"`bs.tl.fit_bitro(sdata, genes=[..., {gene!r}])`; by default a fit predicts the top HVGs plus "
        "`bs.pp.MARKER_GENES`), then run `bs.tl.predict_bitro` again."
    )


def _predicted(table: AnnData, gene: str, layer: str, *, table_key: str, log1p: bool) -> np.ndarray:
    if layer not in table.layers:
        have = list(table.layers.keys())
        raise KeyError(
            f"Table {table_key!r} has no layer {layer!r} (layers: {have or 'none'}): run "
            "`bs.tl.predict_bitro` first, or pass `layer=None` to plot the measured counts."
        )
    values = _column(table.layers[layer], int(table.var_names.get_loc(gene)))
    if np.all(np.isnan(values)):
        raise not_predicted(gene, table, layer, table_key)
    if log1p:
        if np.nanmin(values) < 0:
            raise ValueError(
                f"Layer {layer!r} has negative values, so it is not on the counts-per-10k scale; "
                "pass `log1p=False` to plot it as is."
            )
        values = np.log1p(values)
    return values


def expression(
    sdata: SpatialData,
    gene: str | Sequence[str],
    *,
    level: Literal["spot", "cell"] = "spot",
    layer: str | None = K.PREDICTION,
    compare: bool | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    image_key: str | None = None,
    table_key: str | None = None,
    spot_table_key: str = K.TABLE,
    crop_um: Sequence[float] | None = None,
    mpp: float | None = None,
    cmap: str = "viridis",
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    log1p: bool = True,
    alpha: float | None = None,
    style: Literal["auto", "circle", "point", "smooth"] = "auto",
    bin_um: float | None = None,
    share_scale: bool | None = None,
    img_cmap: str | None = "gray",
    img_alpha: float = 0.6,
    show_image: bool = True,
    scalebar: bool = True,
    ncols: int = 3,
    panel_size: tuple[float, float] = (4.6, 4.0),
    max_px: int = U.MAX_DISPLAY_PX,
    save: str | Path | None = None,
) -> Axes | list[Axes]:
    """Expression of one or several genes on the tissue: spots as discs or cells as circles/points.

    The H&E image is drawn underneath, dimmed and in grey by default (``img_alpha``, ``img_cmap``)
    so that the colour map stays readable, downsampled so that at most ``max_px`` pixels are shown
    on the long side (the pyramid level is picked accordingly; the full-resolution whole slide is
    never loaded). Spots are drawn as discs of their true radius; cells as circles of their
    equivalent radius, or as points when more than 100,000 are in view (``style="auto"``), or as a
    smoothed field (``style="smooth"``, for whole-slide cell maps).

    Parameters
    ----------
    sdata
        A slide following the bitro_sc data contract.
    gene
        A gene name, or several (one row of panels per gene, or a grid).
    level
        ``"spot"``: the spot table (``table_key``, default ``"table"``); ``"cell"``: the cells table
        (default ``"cells"``) after `bs.tl.predict_bitro` with ``level="cell"``.
    layer
        Layer of predictions (counts per 10k; shown as ``log1p`` unless ``log1p=False``), e.g.
        ``"bitro"``. ``None`` plots the measured expression of the spots: ``log1p`` of counts per
        10k from the raw counts (``layers["counts"]`` or ``X``); the colour bar says which.
    compare
        Draw predicted and measured side by side (measured = the spots, also for ``level="cell"``).
        ``None``: when the spot table has measured counts for every gene and ``ax`` is not a
        single Axes.
    ax
        Axes to draw into: one per panel (a single Axes for one panel). ``None`` creates a figure.
    image_key, table_key, spot_table_key
        Element keys; the image is auto-picked when there is one, and omitted when there is none.
    crop_um
        ``(x_min, y_min, x_max, y_max)`` in µm from the image origin (the ``"um"`` coordinate
        system). ``None``: the extent of the spots / cells.
    mpp
        Pixel size (µm/px) when the image does not record it (needed for ``crop_um`` and the scale bar).
    cmap, vmin, vmax
        Colour map and limits; a limit is a number, a percentile string such as ``"p99"``, or
        ``None`` for the minimum / maximum of the values shown in that panel (of the panels that
        share a scale, see ``share_scale``). Spots / cells without a value (``NaN``, e.g. spots
        that hold no cell) are light grey.
    log1p
        Apply ``log1p`` to the layer values (predictions are counts per 10k).
    alpha
        Opacity of spots / cells (default 0.9 for spots, 1.0 for cells).
    style
        Cell drawing: ``"circle"`` (equivalent radius), ``"point"``, ``"smooth"`` (the mean of the
        cells' values in square bins of ``bin_um``, smoothed with a Gaussian of one bin; bins far
        from any cell are transparent) or ``"auto"`` (circles up to 100,000 cells in view, else
        points).
    bin_um
        Bin size of ``style="smooth"`` in µm; ``None``: the view's long side / 150, at least 10 µm.
    share_scale
        One colour scale (limits from the values of both panels) for the predicted and the measured
        panel of a gene. ``None``: shared when both are spot values (same unit); cell values are on
        a per-cell scale (see docs/data_model.md), so cell and spot panels keep their own.
    img_cmap, img_alpha
        The H&E under the values: ``img_cmap=None`` in colour, or a colour map of its luminance
        (default ``"gray"``); ``img_alpha`` its opacity over white (default 0.6: dimmed).
    show_image, scalebar
        Draw the H&E image underneath; draw a scale bar in µm.
    ncols, panel_size
        Grid of a new figure without ``compare`` (panels per row), and the size of one panel (inches).
    max_px
        Longest side (pixels) of the displayed image region.
    save
        Path to save the figure to (PNG, PDF, SVG…), at 150 dpi.

    Returns
    -------
    The Axes of the single panel, or the list of panel Axes (gene by gene; predicted then
    measured when comparing).

    Raises
    ------
    KeyError
        An unknown gene (the error lists close matches), a missing table or a missing ``layer``
        (the error names `bs.tl.predict_bitro`). A gene in the data that the model did not predict
        raises :class:`GeneNotPredictedError` (a ``KeyError`` and a ``ValueError``) with the same
        message at spot and cell level.
    ValueError
        ``layer=None`` with ``level="cell"`` (cells have no measured expression), or ``crop_um``
        without a known pixel size.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> sdata = bs.datasets.synthetic(kind="visium", size_um=250, seed=0)
    >>> ax = bs.pl.expression(sdata, "EPCAM", layer=None)  # measured
    >>> type(ax).__name__
    'Axes'
    """
    import matplotlib as mpl

    level = check_level(level, _PLOT_LEVELS)  # type: ignore[assignment]
    if style not in _STYLES:
        raise ValueError(f"`style` must be one of {list(_STYLES)}, got {style!r}.")
    U.check_image_style(img_cmap, img_alpha)
    if bin_um is not None and not bin_um > 0:
        raise ValueError(f"`bin_um` must be a positive length in µm, got {bin_um!r}.")
    if level == "cell" and layer is None:
        raise ValueError(
            "Cells have no measured expression: pass a layer of cell-level predictions (e.g. "
            "`layer='bitro'` after `bs.tl.predict_bitro(sdata, model, level='cell')`), or plot the "
            "measured spots with `level='spot', layer=None`."
        )
    genes = [gene] if isinstance(gene, str) else [str(g) for g in gene]
    if not genes:
        raise ValueError("`gene` is empty; pass a gene name or a list of them.")
    table_key = table_key or level_table_key(level)
    step = (
        "run `bs.tl.segment` and `bs.tl.predict_bitro(..., level='cell')` first"
        if level == "cell"
        else ("read the slide with `bs.io.read_*`")
    )
    if table_key not in sdata.tables:
        raise KeyError(f"No table {table_key!r} (tables: {list(sdata.tables.keys()) or 'none'}): {step}.")
    table = sdata.tables[table_key]
    spot_table = sdata.tables.get(spot_table_key)
    if level == "cell" and layer is not None:
        # genes of the data that the cell-level prediction lacks: the same error as for spots
        known = set(table.var_names) | (set(spot_table.var_names) if spot_table is not None else set())
        for g in genes:
            if g not in table.var_names and g in known:
                raise not_predicted(g, table, layer, table_key)
        U.check_genes(genes, list(table.var_names) + sorted(known - set(table.var_names)), where="the data")
    else:
        U.check_genes(genes, table.var_names, where=f"table {table_key!r}")

    image_key = U.auto_image_key(sdata, image_key) if show_image or scalebar or crop_um else image_key
    mpp_value = G.resolve_mpp(sdata, image_key, mpp)
    box = G.crop_box_px(crop_um, mpp_value)

    single_ax = ax is not None and not isinstance(ax, Sequence | np.ndarray)

    if compare is None:  # side by side when every gene has measured counts, and axes allow it
        compare = (
            layer is not None
            and not single_ax
            and spot_table is not None
            and all(g in spot_table.var_names for g in genes)
        )
    panels: list[_Panel] = []
    for g in genes:
        if layer is None:
            panels.append(
                _Panel(
                    g,
                    "spot",
                    table_key,
                    None,
                    _measured(table, g),
                    "measured, log1p CP10k",
                    f"{g} — measured",
                )
            )
            continue
        scale = "log1p CP10k" if log1p else "CP10k"
        where = "per cell" if level == "cell" else ""
        pred_label = f"predicted {where} ({layer}), {scale}".replace("  ", " ")
        panels.append(
            _Panel(
                g,
                level,
                table_key,
                layer,
                _predicted(table, g, layer, table_key=table_key, log1p=log1p),
                pred_label,
                f"{g} — predicted" + (" (cells)" if level == "cell" else ""),
            )
        )
        if compare:
            if spot_table is None or g not in spot_table.var_names:
                raise KeyError(
                    f"No measured expression of {g!r} to compare with: the spot table "
                    f"{spot_table_key!r} {'lacks this gene' if spot_table is not None else 'is missing'}. "
                    "Pass `compare=False`."
                )
            panels.append(
                _Panel(
                    g,
                    "spot",
                    spot_table_key,
                    None,
                    _measured(spot_table, g),
                    "measured, log1p CP10k",
                    f"{g} — measured" + (" (spots)" if level == "cell" else ""),
                )
            )

    comparing = len(panels) > len(genes)
    geometry: dict[str, G.Geometry] = {}
    for p in panels:
        if p.table_key not in geometry:
            geometry[p.table_key] = (
                G.cell_geometry(sdata, p.table_key, mpp_value)
                if p.level == "cell"
                else G.spot_geometry(sdata, p.table_key)
            )
    # one common view for all panels: the crop, or the extent of what is drawn plus a margin
    view = box
    if view is None:
        view = G.union_box(*(geometry[p.table_key].box() for p in panels))
        if view is not None:
            pad = 0.03 * max(view[2] - view[0], view[3] - view[1])
            view = (view[0] - pad, view[1] - pad, view[2] + pad, view[3] + pad)
    fig, axes = U.axes_list(
        ax,
        len(panels),
        ncols=(len(panels) // len(genes)) if comparing else ncols,
        panel_size=U.panel_size_for(view, panel_size),
    )
    colormap = mpl.colormaps[cmap].with_extremes(bad="lightgrey")  # NaN: no prediction there
    background = U.read_region(sdata, image_key, view, max_px=max_px) if show_image and image_key else None
    shown_values = [p.values[geometry[p.table_key].in_box(view)] for p in panels]
    limits = _limits(panels, shown_values, vmin, vmax, share_scale)
    if style == "smooth" and mpp_value is None and bin_um is not None:
        raise ValueError("`bin_um` needs the pixel size: pass `mpp=` (µm per pixel).")
    for axis, p, values, (lo, hi) in zip(axes, panels, shown_values, limits, strict=True):
        geo = geometry[p.table_key]
        keep = geo.in_box(view)
        shown = G.Geometry(geo.x[keep], geo.y[keep], geo.r[keep])
        if background is not None:
            U.draw_image(axis, sdata, image_key, view, region=background, cmap=img_cmap, alpha=img_alpha)
        draw_style = "circle"
        if p.level == "cell":
            draw_style = style if style != "auto" else ("circle" if keep.sum() <= MAX_CIRCLES else "point")
        a = alpha if alpha is not None else (0.9 if p.level == "spot" else 1.0)
        if draw_style == "smooth" and view is not None:
            bin_px = (bin_um or F.auto_bin_um(view, mpp_value or 1.0)) / (mpp_value or 1.0)
            field, extent = F.smoothed_field(shown.x, shown.y, values, view=view, bin_px=bin_px)
            coll = F.draw_field(axis, field, extent, cmap=colormap, alpha=a)
        else:
            coll = U.draw_discs(
                axis, shown, values=values, style=draw_style, cmap=colormap, alpha=a, linewidths=0.0
            )
        coll.set_clim(lo, hi)
        U.colorbar(fig, axis, coll, label=p.label)
        U.finish_axes(axis, view, None, mpp=mpp_value, scalebar=scalebar, title=p.title)

    U.save_figure(fig, save)
    return axes[0] if len(axes) == 1 else axes


def _limits(
    panels: list[_Panel],
    values: list[np.ndarray],
    vmin: float | str | None,
    vmax: float | str | None,
    share: bool | None,
) -> list[tuple[float | None, float | None]]:
    """Colour limits per panel; panels of one gene share them when asked (``None``: when all of
    that gene's panels are spot values)."""
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(panels):
        same = [j for j in range(len(panels)) if panels[j].gene == p.gene]
        joint = share if share is not None else all(panels[j].level == "spot" for j in same)
        groups[i] = same if joint else [i]
    out = []
    for i in range(len(panels)):
        pooled = np.concatenate([values[j] for j in groups[i]])
        lo = U.normalise_vlim(vmin, pooled, default="min")
        hi = U.normalise_vlim(vmax, pooled, default="max")
        if lo is not None and hi is not None and hi <= lo:
            hi = lo + 1e-6
        out.append((lo, hi))
    return out
