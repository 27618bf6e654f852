"""`bs.pl.history`: training and validation loss per epoch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _keys as K
from . import _utils as U

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes


def _find(record: Any, key: str, depth: int = 3) -> Any:
    """First value of ``key`` in a nested mapping (breadth first, a few levels deep)."""
    if not isinstance(record, Mapping) or depth < 0:
        return None
    if key in record:
        return record[key]
    for value in record.values():
        found = _find(value, key, depth - 1)
        if found is not None:
            return found
    return None


def _record_of(obj: Any) -> tuple[Any, Mapping[str, Any]]:
    """(history-like, run record) of a model, a SpatialData, an AnnData, a dict or a table."""
    from anndata import AnnData

    if isinstance(obj, pd.DataFrame | list):
        return obj, {}
    if isinstance(obj, Mapping):
        if "history" in obj:
            return obj["history"], obj
        return obj, {}
    if isinstance(obj, AnnData):
        record = obj.uns.get(K.RUN)
        if not isinstance(record, Mapping) or "history" not in record:
            raise KeyError(
                f"This table has no training history (`uns[{K.RUN!r}]['history']`); run "
                "`bs.tl.fit_bitro` and `bs.tl.predict_bitro` first, or pass the fitted model."
            )
        return record["history"], record
    if hasattr(obj, "tables"):  # SpatialData: the first table that carries a history
        for key in (K.TABLE, K.BULK, K.CELLS, *obj.tables.keys()):
            if key in obj.tables:
                record = obj.tables[key].uns.get(K.RUN)
                if isinstance(record, Mapping) and "history" in record:
                    return record["history"], record
        raise KeyError(
            f"No table of this SpatialData has a training history (`uns[{K.RUN!r}]['history']`): "
            "run `bs.tl.predict_bitro` with a fitted model first, or pass the model itself."
        )
    record = getattr(obj, "record", None)
    if isinstance(record, Mapping) and "history" in record:
        return record["history"], record
    hist = getattr(obj, "history", None)
    if hist is not None:
        return (hist() if callable(hist) else hist), (record if isinstance(record, Mapping) else {})
    raise TypeError(
        f"Cannot find a training history in a {type(obj).__name__}. Pass a fitted model "
        "(`bs.tl.fit_bitro`), a SpatialData / table after `bs.tl.predict_bitro`, or a table with "
        "columns epoch, train_loss, val_loss."
    )


def history(
    model_or_sdata: Any,
    *,
    ax: Axes | None = None,
    log_scale: bool = False,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 3.6),
    save: str | Path | None = None,
) -> Axes:
    """Training and validation loss per epoch, with the epoch whose weights were kept marked.

    Parameters
    ----------
    model_or_sdata
        A fitted `BiTroModel` (its ``record["history"]``), a SpatialData or table after
        `bs.tl.predict_bitro` (``uns["bitro"]["history"]``), or the history itself: a DataFrame or
        a list of ``{"epoch", "train_loss", "val_loss"}`` records, or a dict of such columns.
    ax
        Axes to draw into; ``None`` creates a figure.
    log_scale
        Logarithmic loss axis.
    title, figsize
        Panel title (default: ``"training history"``); size of a new figure (inches).
    save
        Path to save the figure to.

    Returns
    -------
    The Axes. The best epoch is ``record["best_epoch"]`` when recorded, else the epoch of the
    lowest validation loss; without a validation loss, no epoch is marked. A transfer run
    (``record["route"]``, ``policy="auto"``) also shows every route's mean validation curve (thin
    lines; epoch -1 = before training, the zero-shot start) with its best score, and the chosen
    route and epochs in the title.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> hist = {"epoch": [0, 1, 2], "train_loss": [1.0, 0.6, 0.5], "val_loss": [1.1, 0.8, 0.9]}
    >>> ax = bs.pl.history(hist)
    >>> ax.get_xlabel()
    'epoch'
    """
    import matplotlib.pyplot as plt

    raw, record = _record_of(model_or_sdata)
    try:
        df = pd.DataFrame(raw)
    except ValueError as err:
        raise ValueError(
            "The training history must be a table of per-epoch records (epoch, train_loss, val_loss)."
        ) from err
    route = record.get("route") if isinstance(record, Mapping) else None
    route = route if isinstance(route, Mapping) and route.get("curves") else None
    if "train_loss" not in df.columns and "val_loss" not in df.columns and not (route and df.empty):
        raise KeyError(
            f"The training history has no 'train_loss' / 'val_loss' column (columns: {list(df.columns)})."
        )
    if df.empty and route is None:
        raise ValueError("The training history is empty (no epoch was run).")
    epochs = df["epoch"].to_numpy() if "epoch" in df.columns else np.arange(len(df))
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    else:
        fig = U.figure_of(ax)
    if route is not None:
        _route_curves(ax, route)
    if "train_loss" in df.columns and not df.empty:
        ax.plot(epochs, df["train_loss"].to_numpy(dtype=float), marker=".", label="training")
    best = _find(record, "best_epoch")
    if "val_loss" in df.columns and not df.empty:
        val = df["val_loss"].to_numpy(dtype=float)
        ax.plot(epochs, val, marker=".", label="validation")
        if best is None and np.isfinite(val).any():
            best = epochs[int(np.nanargmin(val))]
        if best is not None and best in set(epochs.tolist()):
            i = int(np.flatnonzero(epochs == best)[0])
            ax.axvline(best, color="0.5", ls="--", lw=1, zorder=0)
            ax.scatter(
                [best],
                [val[i]],
                marker="*",
                s=140,
                color="tab:red",
                zorder=4,
                label=f"best epoch ({best}): {val[i]:.3g}",
            )
    loss_name = _find(record, "loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"loss ({loss_name})" if isinstance(loss_name, str) else "loss")
    if log_scale:
        ax.set_yscale("log")
    if title is None:
        title = "training history"
        if route is not None:
            title = f"route: {route.get('chosen')} ({route.get('epochs')} epochs)" + _margin_note(route)
    ax.set_title(title)
    ax.legend(frameon=False)
    U.save_figure(fig, save)
    return ax


def _margin_note(route: Mapping[str, Any]) -> str:
    """Second title line: each step of the noise-margin choice (``route["margin"]``), e.g.
    ``"lora r8 vs zero-shot: +0.004 ≤ 1 SE (0.012), kept zero-shot"``; empty without one."""
    margin = route.get("margin")
    if not isinstance(margin, Mapping) or not margin.get("steps"):
        return ""
    k = float(margin.get("k_se", 1.0))
    parts = []
    steps = margin["steps"]  # a list, or {"0": ..., "1": ...} as stored in ``uns``
    for st in steps.values() if isinstance(steps, Mapping) else steps:
        gain, se = float(st["gain"]), float(st["se"])
        verdict = f"> {k:g} SE ({se:.3f}), taken"
        if not bool(st["taken"]):
            verdict = f"≤ {k:g} SE ({se:.3f}), kept {st['against']}"
        parts.append(f"{st['candidate']} vs {st['against']}: {gain:+.3f} {verdict}")
    return "\n" + "; ".join(parts)


def _route_curves(ax: Axes, route: Mapping[str, Any]) -> None:
    """Every route's mean validation curve (epoch -1: the common start, i.e. zero-shot), labelled
    with its best score; the chosen route's label is marked (with its shrinkage toward the start)."""
    scores = route.get("scores") or {}
    chosen = route.get("chosen")
    trained, shrink = route.get("route", chosen), route.get("shrink", 1.0)
    zero = scores.get("zero-shot")
    for name, curve in route["curves"].items():
        vals = np.asarray(curve, dtype=float)
        mark = " (chosen)" if name == chosen else ""
        if name == trained and name != chosen:
            mark = f" (chosen, shrunk {shrink:g} toward the start)"
        score = scores.get(name)
        label = f"{name}: {score:.3g}{mark}" if score is not None else name
        ax.plot(np.arange(len(vals)) - 1, vals, lw=0.8, alpha=0.6, ls=":", label=label)
    if zero is not None:
        mark = " (chosen)" if chosen == "zero-shot" else ""
        ax.scatter([-1], [zero], marker="D", color="k", s=30, zorder=4, label=f"zero-shot: {zero:.3g}{mark}")
