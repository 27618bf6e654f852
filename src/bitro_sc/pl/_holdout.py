"""`bs.pl.holdout`: per-gene accuracy of a hold-out evaluation, spot (or bulk) and cell level."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import _utils as U
from ._gene_correlation import gene_correlation

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from ..tl import Holdout


def holdout(
    result: Holdout,
    *,
    title: str | None = None,
    save: str | Path | None = None,
    dpi: int = 110,
) -> Figure:
    """Per-gene Pearson by method on the held-out slides, and at cell level against the truth.

    Left: the per-gene correlation of each method on the held-out slides (the box plot of
    :func:`bitro_sc.pl.gene_correlation`). Right, when ``result.cell_scores`` is present
    (simulated slides): the per-gene Pearson of the cell-level predictions against the simulated
    truth, one box per method with its median printed.

    Parameters
    ----------
    result
        The output of :func:`bitro_sc.tl.holdout`.
    title
        Figure title.
    save
        Path to save the figure to (its folder is created).
    dpi
        Resolution of the saved figure.

    Returns
    -------
    The figure.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> slides = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in slides:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(slides, progress=False)
    >>> for s in slides:
    ...     bs.tl.assign_cells(s)
    >>> res = bs.tl.holdout(slides, test=["S2"], methods=("ridge", "mean"), top_hvg=20, progress=False)
    >>> fig = bs.pl.holdout(res)
    >>> type(fig).__name__
    'Figure'
    """
    import matplotlib.pyplot as plt

    scores = getattr(result, "scores", None)
    if scores is None:
        raise TypeError(f"`result` must be the output of `bs.tl.holdout`, got {type(result).__name__}.")
    cells = result.cell_scores if result.cell_scores is not None else scores.iloc[:0]
    has_cell = len(cells) > 0
    fig, axes = plt.subplots(1, 2 if has_cell else 1, figsize=(11 if has_cell else 6, 4.2), squeeze=False)
    if len(scores):
        gene_correlation(scores, kind="box", ax=axes[0, 0])
        axes[0, 0].set_title(f"{result.level} level: per-gene Pearson, held-out slide")
    if has_cell:
        ax = axes[0, 1]
        names = list(dict.fromkeys(cells["method"]))
        vals = [cells.loc[cells["method"] == m, "pearson"].dropna().to_numpy() for m in names]
        ax.boxplot(vals, tick_labels=names)
        for i, v in enumerate(vals, start=1):
            if v.size:
                ax.scatter(np.full(v.size, i) + np.linspace(-0.12, 0.12, v.size), v, s=6, alpha=0.5)
                ax.text(i, 1.02, f"median {np.median(v):.2f}", ha="center", fontsize=8)
        ax.set_ylim(-0.5, 1.1)
        ax.set_ylabel("Pearson r vs truth (per gene)")
        ax.set_title("cell level (only spots supervised)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        U.save_figure(fig, save, dpi=dpi)
    return fig
