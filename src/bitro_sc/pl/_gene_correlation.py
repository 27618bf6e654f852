"""`bs.pl.gene_correlation`: per-gene accuracy of BiTro against baselines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from . import _utils as U

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

_KINDS = ("auto", "box", "scatter", "both")
_METRICS = ("pearson", "spearman")


def _long_table(result: Any, metric: str) -> pd.DataFrame:
    """Any accepted input → long table with columns method, gene, fold, value."""
    if isinstance(result, Mapping):
        if not result:
            raise ValueError("`result_df` is an empty mapping; pass {method name: evaluate() table}.")
        parts = []
        for name, frame in result.items():
            if not isinstance(frame, pd.DataFrame):
                raise TypeError(
                    f"`result_df[{name!r}]` is a {type(frame).__name__}; expected the DataFrame "
                    "returned by `bs.tl.evaluate`."
                )
            part = _long_table(frame, metric)
            part["method"] = str(name)
            parts.append(part)
        return pd.concat(parts, ignore_index=True)
    if not isinstance(result, pd.DataFrame):
        raise TypeError(
            f"`result_df` must be a DataFrame from `bs.tl.evaluate` / `bs.tl.cross_validate`, or a "
            f"mapping {{method: DataFrame}}; got {type(result).__name__}."
        )
    if metric not in result.columns:
        raise KeyError(
            f"The table has no {metric!r} column (columns: {list(result.columns)}); pass the output of "
            "`bs.tl.evaluate` or `bs.tl.cross_validate`."
        )
    df = result.reset_index() if "gene" not in result.columns else result.copy()
    if "gene" not in df.columns:  # an unnamed index of genes
        df = df.rename(columns={df.columns[0]: "gene"})
    out = pd.DataFrame(
        {
            "method": df["method"].astype(str) if "method" in df.columns else "bitro",
            "gene": df["gene"].astype(str),
            "fold": df["fold"].astype(str) if "fold" in df.columns else "all",
            "value": pd.to_numeric(df[metric], errors="coerce"),
        }
    )
    return out


def gene_correlation(
    result_df: pd.DataFrame | Mapping[str, pd.DataFrame],
    *,
    methods: Sequence[str] | None = None,
    metric: Literal["pearson", "spearman"] = "pearson",
    kind: Literal["auto", "box", "scatter", "both"] = "auto",
    pair: tuple[str, str] | None = None,
    genes: Sequence[str] | None = None,
    label_top: int = 5,
    ax: Axes | Sequence[Axes] | None = None,
    palette: str = "tab10",
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    save: str | Path | None = None,
) -> Axes | list[Axes]:
    """Per-gene correlation of predictions with measurements, BiTro against baselines.

    Per-gene values are averaged over folds first (a gene's mean Pearson over the folds where
    it was scored). The box plot shows one point per gene and method, the mean marked by a
    diamond and printed; the paired scatter shows each gene's value under two methods with the
    diagonal, and counts the genes above it. Genes with an undefined correlation (``NaN``,
    e.g. the constant ``"mean"`` baseline) are left out of a panel and the count says how many.

    Parameters
    ----------
    result_df
        The long table of `bs.tl.cross_validate` (columns ``fold``, ``method``, ``gene``, ``pearson``,
        ``spearman``), one table of `bs.tl.evaluate` (one row per gene; shown as method
        ``"bitro"``), or a mapping ``{method name: evaluate table}``.
    methods
        Methods to show, in this order (default: all, ``"bitro"`` first).
    metric
        ``"pearson"`` or ``"spearman"``.
    kind
        ``"box"`` (per method), ``"scatter"`` (paired per gene), ``"both"``, or ``"auto"``
        (both when there are two or more methods, else the box plot).
    pair
        ``(x method, y method)`` of the scatter. Default: ``y = "bitro"`` (or the first method) and
        ``x`` = ``"ridge"`` when present, else the next method.
    genes
        Restrict to these genes (e.g. a marker panel).
    label_top
        In the scatter, name the genes with the largest ``y`` values (0: none).
    ax
        One Axes per panel (one for a single panel); ``None`` creates a figure.
    palette, title, figsize
        Colour map of the methods; figure title; size of a new figure (inches).
    save
        Path to save the figure to.

    Returns
    -------
    The Axes of the single panel, or ``[box Axes, scatter Axes]``.

    Examples
    --------
    >>> import pandas as pd, bitro_sc as bs
    >>> df = pd.DataFrame({"fold": [0, 0, 0, 0], "method": ["bitro", "bitro", "ridge", "ridge"],
    ...                    "gene": ["A", "B", "A", "B"], "pearson": [0.5, 0.3, 0.4, 0.1],
    ...                    "spearman": [0.5, 0.3, 0.4, 0.1]})
    >>> axes = bs.pl.gene_correlation(df)
    >>> [a.get_title() for a in axes]
    ['pearson per gene', 'bitro vs ridge']
    """
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    if metric not in _METRICS:
        raise ValueError(f"`metric` must be one of {list(_METRICS)}, got {metric!r}.")
    if kind not in _KINDS:
        raise ValueError(f"`kind` must be one of {list(_KINDS)}, got {kind!r}.")
    long = _long_table(result_df, metric)
    if genes is not None:
        U.check_genes(list(genes), long["gene"].unique(), where="the results table")
        long = long[long["gene"].isin(list(genes))]
    present = list(dict.fromkeys(long["method"]))
    if methods is None:
        methods = (["bitro"] if "bitro" in present else []) + [m for m in present if m != "bitro"]
    else:
        missing = [m for m in methods if m not in present]
        if missing:
            raise KeyError(f"Method(s) {missing} are not in the results table (methods: {present}).")
        methods = list(methods)
    n_folds = long["fold"].nunique()
    per_gene = (
        long[long["method"].isin(methods)]
        .groupby(["method", "gene"], sort=False)["value"]
        .mean()
        .unstack("method")
        .reindex(columns=methods)
    )
    if kind == "auto":
        kind = "both" if len(methods) >= 2 else "box"
    if kind in ("scatter", "both") and len(methods) < 2:
        raise ValueError(
            f"The paired scatter needs two methods; the table has {methods}. Use `kind='box'`, or pass "
            "several results (`{'bitro': df1, 'ridge': df2}`)."
        )
    if pair is None and kind in ("scatter", "both"):
        y_m = "bitro" if "bitro" in methods else methods[0]
        others = [m for m in methods if m != y_m]
        x_m = "ridge" if "ridge" in others else others[0]
        pair = (x_m, y_m)
    elif pair is not None:
        bad = [m for m in pair if m not in methods]
        if bad:
            raise KeyError(f"`pair` method(s) {bad} are not among the methods shown {methods}.")

    n_panels = 2 if kind == "both" else 1
    if ax is None:
        size = figsize or (4.8 * n_panels + 0.4, 4.4)
        fig, axes_arr = plt.subplots(1, n_panels, figsize=size, layout="constrained", squeeze=False)
        axes = list(axes_arr.ravel())
    else:
        fig, axes = U.axes_list(ax, n_panels, ncols=n_panels, panel_size=(4.8, 4.4))
    cmap = mpl.colormaps[palette]
    colours = {m: cmap(i % getattr(cmap, "N", 10)) for i, m in enumerate(methods)}
    fold_note = f" (mean over {n_folds} folds)" if n_folds > 1 else ""
    label = f"{metric.capitalize()} r per gene{fold_note}"

    panels = iter(axes)
    if kind in ("box", "both"):
        a = next(panels)
        data = [per_gene[m].dropna().to_numpy() for m in methods]
        rng = np.random.default_rng(0)
        if any(len(d) for d in data):
            a.boxplot(
                [d if len(d) else [np.nan] for d in data],
                positions=np.arange(len(methods)),
                widths=0.55,
                showfliers=False,
                medianprops={"color": "black"},
                boxprops={"color": "0.4"},
                whiskerprops={"color": "0.4"},
                capprops={"color": "0.4"},
            )
        for i, (m, d) in enumerate(zip(methods, data, strict=True)):
            jitter = rng.uniform(-0.18, 0.18, size=len(d))
            a.scatter(
                np.full(len(d), i) + jitter, d, s=12, color=colours[m], alpha=0.7, zorder=3, linewidths=0
            )
            if len(d):
                mean = float(np.mean(d))
                a.scatter([i], [mean], marker="D", s=50, color="white", edgecolors="black", zorder=4)
                a.annotate(
                    f"{mean:.2f}", (i + 0.3, mean), va="center", fontsize="small", annotation_clip=False
                )
        a.axhline(0, color="0.7", lw=0.8, zorder=0)
        a.set_xticks(np.arange(len(methods)))
        a.set_xticklabels(
            [
                f"{m}\n(n={len(d)})" if len(d) else f"{m}\n(undefined)"
                for m, d in zip(methods, data, strict=True)
            ],
            fontsize="small",
        )
        a.set_xlim(-0.6, len(methods) - 0.4)
        a.set_ylabel(label)
        a.set_title(f"{metric} per gene")
    if kind in ("scatter", "both"):
        assert pair is not None
        a = next(panels)
        x_m, y_m = pair
        both = per_gene[[x_m, y_m]].dropna()
        x, y = both[x_m].to_numpy(), both[y_m].to_numpy()
        above = y > x
        a.scatter(
            x[above], y[above], s=16, color=colours[y_m], label=f"{y_m} better ({above.sum()})", zorder=3
        )
        a.scatter(
            x[~above], y[~above], s=16, color=colours[x_m], label=f"{x_m} better ({(~above).sum()})", zorder=3
        )
        values = np.concatenate([x, y]) if len(x) else np.array([0.0, 1.0])
        lo = min(0.0, float(values.min())) - 0.05
        hi = max(0.0, float(values.max())) + 0.05
        a.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", zorder=1)
        a.set_xlim(lo, hi)
        a.set_ylim(lo, hi)
        a.set_aspect("equal")
        if label_top > 0 and len(both):
            top = both.sort_values(y_m, ascending=False).head(label_top)
            for i, (gene_name, row) in enumerate(top.iterrows()):
                left = i % 2 == 0  # alternate sides so that neighbouring labels do not overlap
                a.annotate(
                    str(gene_name),
                    (row[x_m], row[y_m]),
                    fontsize="x-small",
                    xytext=(-5, 2) if left else (5, -6),
                    textcoords="offset points",
                    ha="right" if left else "left",
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5},
                )
        dropped = len(per_gene) - len(both)
        a.set_xlabel(f"{x_m}: {metric} r")
        a.set_ylabel(f"{y_m}: {metric} r")
        a.set_title(f"{y_m} vs {x_m}")
        a.legend(
            loc="upper left",
            fontsize="small",
            frameon=False,
            title=f"{len(both)} genes" + (f", {dropped} undefined" if dropped else ""),
            title_fontsize="small",
        )
    if title is not None:
        fig.suptitle(title)
    U.save_figure(fig, save)
    return axes[0] if len(axes) == 1 else axes
