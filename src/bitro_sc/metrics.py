"""Per-gene accuracy of expression predictions: Pearson, Spearman, HEST-style score, significance.

The correlation functions take two ``observations × genes`` arrays (measured, predicted) on the same scale
(``bs.tl.evaluate`` passes ``log1p`` counts-per-10k) and compute one value per gene (column),
vectorised over genes.

Conventions
-----------
- A gene whose measured *or* predicted values are constant over the observations (for instance
  never detected in the test slide, or predicted identically everywhere, as the "mean" baseline
  does) has an undefined correlation: its value is ``NaN``, never ``0``. Means over genes skip
  ``NaN`` genes and report how many were skipped (:func:`summarize`).
- Non-finite inputs (``NaN``/``inf``) are not allowed; the error names the array.

:func:`cell_truth_scores` scores cell-level predictions against the simulated truth of
``bs.datasets.synthetic(return_truth=True)``.

Examples
--------
>>> import numpy as np
>>> from bitro_sc import metrics
>>> rng = np.random.default_rng(0)
>>> y = rng.normal(size=(50, 3))
>>> r = metrics.pearson(y, y + rng.normal(scale=0.1, size=y.shape))
>>> bool(np.all(r > 0.9))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import _keys as K

__all__ = [
    "benjamini_hochberg",
    "cell_truth_scores",
    "hest_score",
    "pearson",
    "pearson_pvalues",
    "significant_genes",
    "spearman",
    "summarize",
]


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y_true, dtype=np.float64)
    b = np.asarray(y_pred, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"`y_true` and `y_pred` must be observations × genes arrays of the same shape; "
            f"got {np.shape(y_true)} and {np.shape(y_pred)}."
        )
    for name, arr in (("y_true", a), ("y_pred", b)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(
                f"`{name}` contains NaN or infinite values; drop those observations or genes first."
            )
    return a, b


def pearson(y_true: Any, y_pred: Any) -> np.ndarray:
    """Pearson correlation per gene (column) between measured and predicted values.

    Parameters
    ----------
    y_true, y_pred
        ``observations × genes`` arrays of the same shape (1-D arrays count as one gene).

    Returns
    -------
    ``float64`` array of length ``n_genes``; ``NaN`` where either column is constant or there are
    fewer than 2 observations.
    """
    a, b = _check_pair(y_true, y_pred)
    n = a.shape[0]
    if n < 2:
        return np.full(a.shape[1], np.nan)
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    ss_a = np.einsum("ij,ij->j", a, a)
    ss_b = np.einsum("ij,ij->j", b, b)
    cov = np.einsum("ij,ij->j", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(ss_a * ss_b)
    r[constant] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman(y_true: Any, y_pred: Any) -> np.ndarray:
    """Spearman rank correlation per gene: Pearson of the (average-tie) ranks.

    Same shapes and ``NaN`` rule as :func:`pearson`.
    """
    from scipy.stats import rankdata

    a, b = _check_pair(y_true, y_pred)
    return pearson(rankdata(a, axis=0), rankdata(b, axis=0)) if a.shape[0] >= 2 else pearson(a, b)


def pearson_pvalues(r: Any, n: int | np.ndarray, *, alternative: str = "greater") -> np.ndarray:
    """P-values of Pearson correlations under the null of no correlation (Student's t, ``n - 2`` d.o.f.).

    Parameters
    ----------
    r
        Correlations (``NaN`` stays ``NaN``).
    n
        Number of observations each correlation was computed on (scalar or per gene); needs ``n >= 3``.
    alternative
        ``"greater"`` (one-sided, positive correlation: the prediction tracks the measurement),
        ``"two-sided"`` or ``"less"``. Matches :func:`scipy.stats.pearsonr`.
    """
    from scipy import stats

    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"`alternative` must be 'greater', 'less' or 'two-sided', got {alternative!r}.")
    r = np.asarray(r, dtype=np.float64)
    n_arr = np.broadcast_to(np.asarray(n, dtype=np.float64), r.shape)
    if np.any(n_arr < 3):
        raise ValueError("P-values of a correlation need at least 3 observations per gene.")
    dof = n_arr - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dof / np.clip(1.0 - r**2, 0.0, None))
    if alternative == "greater":
        p = stats.t.sf(t, dof)
    elif alternative == "less":
        p = stats.t.cdf(t, dof)
    else:
        p = np.minimum(2 * stats.t.sf(np.abs(t), dof), 1.0)
    return np.where(np.isnan(r), np.nan, p)


def benjamini_hochberg(pvalues: Any) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); ``NaN`` entries are ignored and stay ``NaN``.

    Equivalent to ``scipy.stats.false_discovery_control(p, method="bh")`` over the finite entries.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.clip(q, 0.0, 1.0)
    out[ok] = adj
    return out


def significant_genes(
    y_true: Any, y_pred: Any, *, alpha: float = 0.05
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Number of *significantly predicted* genes (the bulk benchmark's count).

    Definition: for each gene, the Pearson correlation ``r`` between measured and predicted
    values across the held-out samples (slides); the one-sided p-value of ``r > 0`` (Student's t
    with ``n - 2`` degrees of freedom); Benjamini–Hochberg adjustment over all genes with a
    defined ``r``. A gene is significantly predicted when its adjusted p-value is below ``alpha``.
    Genes with an undefined ``r`` (constant values) are never significant.

    Returns
    -------
    ``(count, r, p, q)``: the count and the per-gene correlation, raw and adjusted p-values.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    a, b = _check_pair(y_true, y_pred)
    r = pearson(a, b)
    p = pearson_pvalues(r, a.shape[0])
    q = benjamini_hochberg(p)
    count = int(np.sum(np.nan_to_num(q, nan=1.0) < alpha))
    return count, r, p, q


def hest_score(per_gene: pd.Series | Mapping[str, float], hvgs: Iterable[str], *, top_k: int = 50) -> float:
    """HEST-benchmark score: mean Pearson over the top-``top_k`` highly variable genes.

    Parameters
    ----------
    per_gene
        Pearson correlation per gene name.
    hvgs
        Highly variable genes of the **training** data, most variable first
        (:func:`bitro_sc.pp.highly_variable_genes`); only the first ``top_k`` are used.

    Returns
    -------
    The mean over those HVGs that have a finite correlation; ``NaN`` when none has.
    """
    s = pd.Series(per_gene, dtype=np.float64)
    chosen = [g for g in list(hvgs)[:top_k] if g in s.index]
    vals = s.loc[chosen].to_numpy()
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def summarize(
    df: pd.DataFrame, *, columns: Sequence[str] = ("pearson", "spearman")
) -> dict[str, float | int]:
    """Means of per-gene metric columns, skipping ``NaN`` genes, with counts.

    Returns ``{"n_genes", "n_nan", "mean_<col>", "median_<col>"}``; ``n_nan`` counts genes whose
    ``pearson`` (first column) is undefined.
    """
    out: dict[str, float | int] = {"n_genes": len(df)}
    first = True
    for col in columns:
        if col not in df:
            continue
        v = df[col].to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        if first:
            out["n_nan"] = int(v.size - finite.size)
            first = False
        out[f"mean_{col}"] = float(finite.mean()) if finite.size else float("nan")
        out[f"median_{col}"] = float(np.median(finite)) if finite.size else float("nan")
    return out


def cell_truth_scores(
    frame: pd.DataFrame, sdata: Any, truth: Any, *, cells_key: str = K.CELLS
) -> pd.DataFrame:
    """Per-gene Pearson and Spearman of cell-level predictions against a simulated truth.

    Each segmented cell is matched to the true nucleus under its centroid (``truth.labels``);
    unmatched cells are dropped. Both sides are compared as ``log1p`` of counts per 10k of the
    cell: the prediction (a cell's share of its spot, counts-per-10k scale) and the noise-free
    expected counts ``truth.expression.layers["rate"]`` rescaled so that the average cell has the
    same total as the average predicted cell over these genes.

    Parameters
    ----------
    frame
        Cells × genes predictions (``model.predict_frame(sdata, level="cell")``), indexed by the
        obs names of the cells table.
    sdata
        The slide, with its segmented cells table ``tables[cells_key]`` (``x_px`` / ``y_px``).
    truth
        The slide's truth from ``bs.datasets.synthetic(..., return_truth=True)`` (``labels``:
        true nucleus label image; ``expression``: AnnData of the true cells, ``obs["cell_id"]``).

    Returns
    -------
    One row per gene (predicted genes the truth has) with ``pearson`` and ``spearman``;
    ``attrs["n_cells_matched"]`` and ``attrs["n_cells"]``.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> from bitro_sc import metrics
    >>> pairs = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0, return_truth=True)
    >>> slides = [s for s, _ in pairs]
    >>> for s in slides:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features(slides, progress=False)
    >>> for s in slides:
    ...     bs.tl.assign_cells(s)
    >>> model = bs.tl.fit_baseline(slides[:2], method="ridge", n_top_genes=20)
    >>> slide, truth = pairs[2]
    >>> frame = model.predict_frame(slide, level="cell")
    >>> scores = metrics.cell_truth_scores(frame, slide, truth)
    >>> len(scores), 0 < scores.attrs["n_cells_matched"] <= scores.attrs["n_cells"]
    (20, True)
    """
    cells = sdata.tables[cells_key]
    labels = np.asarray(truth.labels)
    y = np.clip(np.round(cells.obs[K.Y_PX].to_numpy()).astype(int), 0, labels.shape[0] - 1)
    x = np.clip(np.round(cells.obs[K.X_PX].to_numpy()).astype(int), 0, labels.shape[1] - 1)
    true_id = labels[y, x]
    expr = truth.expression
    row_of = pd.Index(expr.obs[K.CELL_ID].to_numpy()).get_indexer(true_id)
    ok = (true_id > 0) & (row_of >= 0)
    genes = [g for g in frame.columns if g in expr.var_names]
    rate = expr.layers.get("rate", expr.X)
    rate = rate.toarray() if hasattr(rate, "toarray") else np.asarray(rate)
    truth_vals = rate[row_of[ok]][:, expr.var_names.get_indexer(genes)].astype(np.float64)
    pred = frame.loc[cells.obs_names[ok], genes].to_numpy(dtype=np.float64)
    scale = pred.sum(axis=1).mean() / max(truth_vals.sum(axis=1).mean(), 1e-12)
    t, p = np.log1p(truth_vals * scale), np.log1p(pred)
    out = pd.DataFrame(
        {"pearson": pearson(t, p), "spearman": spearman(t, p)}, index=pd.Index(genes, name="gene")
    )
    out.attrs["n_cells_matched"] = int(ok.sum())
    out.attrs["n_cells"] = int(cells.n_obs)
    return out
