"""Per-gene accuracy of predictions written by ``bs.tl.predict_bitro`` (BiTro or a baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _keys as K
from .. import _sdata
from ..metrics import hest_score, pearson, significant_genes, spearman, summarize
from ..pp._expression import get_counts, normalize_expression

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


def _dense(x: Any) -> np.ndarray:
    from scipy import sparse

    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def run_record(table: AnnData, layer: str) -> tuple[str, dict[str, Any] | None]:
    """``(uns key, record)`` of the model that wrote ``layers[layer]``.

    ``bs.tl.predict_bitro`` copies the model's record to ``uns[key_added]``, so ``uns[layer]`` is
    looked up first, then ``uns["bitro"]``; ``(layer, None)`` when neither holds a record.
    """
    for key in (layer, K.RUN):
        rec = table.uns.get(key)
        if isinstance(rec, dict) and ("hvgs" in rec or "genes" in rec):
            return key, rec
    return layer, None


def _collect_tables(
    data: SpatialData | Sequence[SpatialData] | AnnData,
    level: str,
    table_key: str | None,
) -> tuple[AnnData, list[AnnData]]:
    """The table to evaluate (rows = observations) and the tables the summary is stored in."""
    import anndata as ad
    from spatialdata import SpatialData

    if isinstance(data, ad.AnnData):
        return data, [data]
    if isinstance(data, SpatialData):
        key = table_key or (K.TABLE if level == "spot" else K.BULK)
        if key not in data.tables:
            step = "run `bs.io.read_*`" if level == "spot" else "add a bulk table (e.g. `bs.io.read_bulk`)"
            raise KeyError(f"No table {key!r} (tables: {list(data.tables.keys()) or 'none'}): {step}.")
        table = data.tables[key]
        if level == "bulk" and table.n_obs < 3:
            raise ValueError(
                f"Bulk evaluation correlates across slides; the table {key!r} has {table.n_obs} row(s). "
                "Pass a list of held-out slides or a bulk AnnData with at least 3 rows."
            )
        return table, [table]
    slides = list(data)
    if level != "bulk":
        raise TypeError(
            "A list of slides is evaluated across slides: pass `level='bulk'`, or evaluate each slide's "
            "spot table separately."
        )
    if len(slides) < 3:
        raise ValueError(f"Bulk evaluation correlates across slides and needs at least 3, got {len(slides)}.")
    key = table_key or K.BULK
    rows = [_sdata.bulk_table(s, bulk_key=key, i=i) for i, s in enumerate(slides)]
    combined = ad.concat(rows, join="inner", merge="same")
    combined.obs_names_make_unique()
    return combined, [s.tables[key] for s in slides]


def _choose_genes(
    table: AnnData,
    layer: str,
    genes: Sequence[str] | None,
    top_hvg: int | None,
    record: dict[str, Any] | None,
) -> tuple[list[str], list[str]]:
    """(genes to evaluate, training HVGs used for the HEST score)."""
    hvgs: list[str] = list(record.get("hvgs", [])) if record else []
    recorded = record.get("genes") if record else None
    if top_hvg is not None:
        if top_hvg < 1:
            raise ValueError(f"`top_hvg` must be a positive number of genes or None, got {top_hvg!r}.")
        hvgs = hvgs[:top_hvg]
    if genes is not None:
        chosen = list(dict.fromkeys(genes))
        missing = [g for g in chosen if g not in table.var_names]
        if missing:
            raise ValueError(
                f"{len(missing)} gene(s) are not in the table: {missing[:10]}. Pass genes from `var_names`."
            )
        return chosen, hvgs
    if top_hvg is not None:
        if not hvgs:
            raise ValueError(
                f"No training HVGs recorded in `uns[{K.RUN!r}]['hvgs']` (or `uns[{layer!r}]`) of the table: "
                "predict with `bs.tl.predict_bitro`, which copies the model's record there, or pass `genes=` "
                "(the HVGs of the *training* data), or `top_hvg=None` to evaluate every predicted gene."
            )
        predicted = set(recorded) if recorded is not None and len(recorded) else set(table.var_names)
        return [g for g in hvgs if g in predicted and g in table.var_names], hvgs
    if recorded is not None and len(recorded):
        return [g for g in recorded if g in table.var_names], hvgs
    values = _dense(table.layers[layer])
    predicted = np.isfinite(values).any(axis=0)
    return list(table.var_names[predicted]), hvgs


def evaluate(
    sdata: SpatialData | Sequence[SpatialData] | AnnData,
    *,
    layer: str = K.PREDICTION,
    genes: Sequence[str] | None = None,
    top_hvg: int | None = 50,
    level: Literal["spot", "bulk"] = "spot",
    table_key: str | None = None,
    in_tissue_only: bool = True,
    alpha: float = 0.05,
    store: bool = True,
) -> pd.DataFrame:
    """Per-gene Pearson and Spearman correlation of predicted against measured expression.

    Both sides are compared as ``log1p`` counts-per-10k: the measured raw counts
    (``layers["counts"]`` or ``X``) are library-normalised over *all* genes of the table, the
    prediction ``layers[layer]`` (counts per 10k, as ``bs.tl.predict_bitro`` writes it) is
    ``log1p``-transformed. ``level="spot"`` correlates across the spots of one slide;
    ``level="bulk"`` across slides (a list of held-out slides with a ``"bulk"`` table each, or a
    bulk AnnData with one row per slide and both layers).

    Genes: ``genes`` when given. Otherwise, with ``top_hvg``, the first ``top_hvg`` highly
    variable genes of the *training* data as recorded at fit time (``uns[layer]["hvgs"]`` or
    ``uns["bitro"]["hvgs"]``, copied there by ``predict_bitro``) that the model predicts -- never
    chosen on the evaluated slide; an error when no record is present. With ``top_hvg=None``,
    every predicted gene.

    Parameters
    ----------
    sdata
        A slide (spot level), a list of slides or an AnnData (bulk level); an AnnData is accepted
        at both levels (rows = observations).
    layer
        Layer holding the predictions (counts per 10k; ``NaN`` = not predicted).
    table_key
        Table to evaluate; default ``"table"`` (spot) or ``"bulk"``.
    in_tissue_only
        Spot level: use only spots with ``obs["in_tissue"]`` true (when that column exists).
    alpha
        Bulk level: false discovery rate for the count of significantly predicted genes.
    store
        Store the summary in ``uns[key]["metrics"]`` of the evaluated table(s), where ``key`` holds
        the run record of the predictions (``uns[layer]``, as ``predict_bitro`` writes it, else
        ``uns["bitro"]``): ``uns["bitro"]["metrics"]`` for the default layer.

    Returns
    -------
    One row per gene (index = gene) with ``pearson``, ``spearman`` (``NaN`` when the gene is
    constant in the measurement or the prediction), ``n`` (observations used),
    ``mean_measured`` and ``mean_predicted`` (``log1p`` scale) and ``is_hvg`` (a recorded
    training HVG within ``top_hvg``); at bulk level also ``p_value`` and ``q_value``
    (one-sided Pearson test, Benjamini--Hochberg, see :func:`bitro_sc.metrics.significant_genes`).
    ``df.attrs`` holds the summary: ``hest_score`` (mean Pearson over the training HVGs
    evaluated), ``n_hvg``, ``mean_pearson``, ``mean_spearman``, ``n_genes``, ``n_nan``
    (genes with undefined correlation, excluded from means), ``n_observations``, and at bulk
    level ``n_significant``. Observations with no measured counts or no prediction are dropped.

    Examples
    --------
    >>> import bitro_sc as bs
    >>> *train_slides, test_slide = bs.datasets.synthetic(3, kind="visium", size_um=250, seed=0)
    >>> for s in [*train_slides, test_slide]:
    ...     bs.tl.segment(s, progress=False)
    >>> bs.tl.cell_features([*train_slides, test_slide], progress=False)
    >>> for s in [*train_slides, test_slide]:
    ...     bs.tl.assign_cells(s)
    >>> model = bs.tl.fit_baseline(train_slides, method="ridge", n_top_genes=20)
    >>> bs.tl.predict_bitro(test_slide, model)
    >>> df = bs.tl.evaluate(test_slide)
    >>> len(df), -1.0 <= df.attrs["hest_score"] <= 1.0
    (20, True)
    """
    level = _sdata.check_level(level, K.FIT_LEVELS)  # type: ignore[assignment]
    table, stores = _collect_tables(sdata, level, table_key)
    if layer not in table.layers:
        raise KeyError(
            f"The table has no layer {layer!r} (layers: {list(table.layers.keys()) or 'none'}): "
            f"run `bs.tl.predict_bitro(..., level={level!r}, key_added={layer!r})` first."
        )
    record_key, record = run_record(stores[0], layer)
    chosen, hvgs = _choose_genes(table, layer, genes, top_hvg, record)
    if not chosen:
        raise ValueError("No gene to evaluate: the recorded genes are not in the table; pass `genes=`.")

    counts = get_counts(table)
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    idx = table.var_names.get_indexer(chosen)
    measured = normalize_expression(counts[:, idx], library_size=lib).astype(np.float64)
    predicted = _dense(table.layers[layer])[:, idx].astype(np.float64)
    if np.nanmin(predicted, initial=0.0) < 0:
        raise ValueError(
            f"`layers[{layer!r}]` has negative values; "
            "it must hold predicted counts per 10k (not log values)."
        )
    not_predicted = np.asarray(~np.isfinite(predicted).any(axis=0))
    if not_predicted.any():
        names = [g for g, m in zip(chosen, not_predicted.tolist(), strict=True) if m]
        raise ValueError(
            f"{len(names)} gene(s) have no prediction in `layers[{layer!r}]`: {names[:10]}. "
            "Evaluate the genes the model predicts (`genes=None`) or refit with these genes."
        )
    keep = (lib > 0) & np.isfinite(predicted).all(axis=1)
    if level == "spot" and in_tissue_only and K.IN_TISSUE in table.obs:
        keep &= table.obs[K.IN_TISSUE].astype(bool).to_numpy()
    measured, predicted = measured[keep], np.log1p(predicted[keep])
    n_obs = int(keep.sum())
    if n_obs < 3:
        raise ValueError(
            f"Only {n_obs} observation(s) have both measured counts and a prediction; at least 3 are needed."
        )

    hvg_set = set(hvgs)
    df = pd.DataFrame(
        {
            "pearson": pearson(measured, predicted),
            "spearman": spearman(measured, predicted),
            "n": n_obs,
            "mean_measured": measured.mean(axis=0),
            "mean_predicted": predicted.mean(axis=0),
            "is_hvg": [g in hvg_set for g in chosen],
        },
        index=pd.Index(chosen, name="gene"),
    )
    summary: dict[str, Any] = {"level": level, "layer": layer, "n_observations": n_obs}
    summary.update(summarize(df))
    evaluated_hvgs = [g for g in hvgs if g in df.index]
    summary["hest_score"] = hest_score(df["pearson"], evaluated_hvgs, top_k=len(evaluated_hvgs) or 1)
    summary["n_hvg"] = len(evaluated_hvgs)
    summary["n_hvg_not_evaluated"] = len(hvgs) - len(evaluated_hvgs)
    summary["top_hvg"] = top_hvg
    if level == "bulk":
        count, _, p, q = significant_genes(measured, predicted, alpha=alpha)
        df["p_value"], df["q_value"] = p, q
        summary["n_significant"] = count
        summary["significance"] = (
            f"one-sided Pearson test (r > 0) across {n_obs} slides, Benjamini-Hochberg q < {alpha}"
        )
    df.attrs.update(summary)
    if store:
        for t in stores:
            rec = t.uns.setdefault(record_key, {})
            if not isinstance(rec, dict):
                raise TypeError(
                    f"`uns[{record_key!r}]` of the table is not a dict; cannot store metrics there."
                )
            rec["metrics"] = {k: v for k, v in summary.items() if v is not None}
    return df
